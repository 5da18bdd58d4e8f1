"""The signature index of a corpus, on disk: a later crawl is deduplicated against it.

A directory::

    header.json                 format, version, config (signature-relevant fields),
                                num_docs, num_hashes, unicode version, has_exact
    signatures.npy              uint32 [num_docs, num_hashes] (np.load(mmap_mode="r"))
    band_000.hashes.npy ...     uint64 [m] band hashes of band b, sorted ascending
    band_000.docs.npy ...       uint32 [m] document number (row of signatures.npy) of each entry,
                                ascending within equal hashes; documents without shingles omitted
    exact_hashes.npy            uint64 sorted unique normalised-text hashes (optional)

Written whole or not at all (storage.atomic_dir); read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
import warnings
from pathlib import Path

import numpy as np

from pipelines.minhash.config import IndexConfigError, MinHashConfig
from pipelines.minhash.files import BandSpill, NpyAppender, load_npy
from pipelines.minhash.hashing import U64
from pipelines.minhash.lsh import band_hashes, indexed_matches, required_matches, verify_pairs
from pipelines.minhash.signatures import SIGNATURE_DTYPE, nonempty
from storage import atomic_dir

FORMAT = "kiln-minhash-index"
FORMAT_VERSION = 1


def index_header(config: MinHashConfig, num_docs: int, has_exact: bool) -> dict:
    """`header.json` of an index (SignatureIndex.write and the dedup stage write it)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.signature_fields(),
        "num_docs": num_docs,
        "num_hashes": config.num_hashes,
        "signature_dtype": "uint32",
        "band_hash_dtype": "uint64",
        "unicode_version": unicodedata.unidata_version,
        "has_exact": has_exact,
    }


def header_bytes(header: dict) -> bytes:
    return (json.dumps(header, indent=2, sort_keys=True) + "\n").encode()


class SignatureIndex:
    """Signatures + sorted per-band hashes (+ exact hashes) of an earlier corpus, on disk.

    Use :meth:`write` to create one (optionally as the union of an existing index and new
    documents) and :meth:`load` to open one; see the module docstring for the file layout.
    """

    def __init__(self, path: Path, header: dict, config: MinHashConfig):
        self.path = Path(path)
        self.header = header
        self.config = config
        self.num_docs = int(header["num_docs"])
        self.has_exact = bool(header.get("has_exact", False))
        self._signatures: np.ndarray | None = None
        self._exact: np.ndarray | None = None

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, config: MinHashConfig | None = None) -> SignatureIndex:
        """Open an index; raises :class:`IndexConfigError` if it was built with other parameters.

        ``config`` (default: the index's own parameters) supplies the ``similarity_threshold``
        of :meth:`query` (a :class:`MinHashDeduplicator` uses its own config's threshold).
        After :meth:`write` overwrote an index in place, use the index object it returns.
        """
        path = Path(path)
        header_path = path / "header.json"
        if not header_path.is_file():
            raise FileNotFoundError(f"no signature index at {path} (missing header.json)")
        header = json.loads(header_path.read_text())
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise IndexConfigError(
                f"{path}: not a {FORMAT} v{FORMAT_VERSION} index "
                f"(format={header.get('format')!r}, version={header.get('version')!r})"
            )
        stored = header["config"]
        if config is None:
            config = MinHashConfig(**{k: v for k, v in stored.items() if k in MinHashConfig.model_fields})
        wanted = config.signature_fields()
        diff = {k: (stored.get(k), wanted[k]) for k in wanted if stored.get(k) != wanted[k]}
        if diff:
            detail = ", ".join(f"{k}: index={a!r} current={b!r}" for k, (a, b) in diff.items())
            raise IndexConfigError(f"signature index {path} was built with a different MinHash config ({detail})")
        if header.get("unicode_version") != unicodedata.unidata_version:
            warnings.warn(
                f"signature index {path} was built with Unicode {header.get('unicode_version')}, this Python "
                f"has {unicodedata.unidata_version}: texts with characters new in between may hash differently",
                stacklevel=2,
            )
        return cls(path, header, config)

    @property
    def signatures(self) -> np.ndarray:
        """uint32 [num_docs, num_hashes], memory-mapped."""
        if self._signatures is None:
            self._signatures = load_npy(self.path / "signatures.npy")
        return self._signatures

    @property
    def exact_hashes(self) -> np.ndarray | None:
        """Sorted unique exact hashes of the indexed documents (None if not stored)."""
        if not self.has_exact:
            return None
        if self._exact is None:
            self._exact = load_npy(self.path / "exact_hashes.npy")
        return self._exact

    def band(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted band hashes and their document numbers for band ``b`` (memory-mapped)."""
        return (
            load_npy(self.path / f"band_{b:03d}.hashes.npy"),
            load_npy(self.path / f"band_{b:03d}.docs.npy"),
        )

    # ---- queries ---------------------------------------------------------------------------
    def contains_exact(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of (non-zero) exact hashes present in the index."""
        hashes = np.asarray(hashes, dtype=U64)
        ex = self.exact_hashes
        if ex is None or len(ex) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        pos = np.minimum(np.searchsorted(ex, hashes), len(ex) - 1)
        return (np.asarray(ex[pos]) == hashes) & (hashes != 0)

    def _query_band(self, b: int, h: np.ndarray, d: np.ndarray, sigs, flagged: np.ndarray, need: int | None) -> None:
        """Flag documents ``d`` (band-``b`` hashes ``h``, signatures in ``sigs``) that share a
        bucket with an indexed document and agree with it in >= ``need`` signature values."""
        sel = ~flagged[d]
        h, d = h[sel], d[sel]
        if len(h) == 0 or self.num_docs == 0:
            return
        ih, idoc = self.band(b)
        if len(ih) == 0:
            return
        q, targets = indexed_matches(ih, idoc, h, d)
        if len(q) == 0:
            return
        ok = verify_pairs(sigs, q, self.signatures, targets, need)
        flagged[q[ok]] = True

    def query(self, signatures: np.ndarray) -> np.ndarray:
        """Mask of documents (in-memory signatures) that are near-duplicates of an indexed one."""
        sig = np.asarray(signatures)
        flagged = np.zeros(len(sig), dtype=bool)
        bands = band_hashes(sig, self.config)
        docs = np.flatnonzero(nonempty(sig))
        for b in range(self.config.num_bands):
            self._query_band(b, bands[docs, b], docs, sig, flagged, required_matches(self.config))
        return flagged

    # ---- writing ---------------------------------------------------------------------------
    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        config: MinHashConfig,
        signatures: np.ndarray,
        exact_hashes: np.ndarray | None = None,
        base: SignatureIndex | None = None,
        rows: np.ndarray | None = None,
        overwrite: bool = False,
        chunk_docs: int = 1 << 16,
    ) -> SignatureIndex:
        """Write an index of ``base``'s documents (if any) followed by the given documents.

        ``signatures`` may be a memory-mapped array; ``rows`` optionally selects the documents
        to add (e.g. the kept ones).  ``exact_hashes`` (aligned with ``signatures``) are stored
        if given and ``base`` has them too.  The new documents are numbered after ``base``'s.
        """
        path = Path(path)
        k = config.num_hashes
        if base is not None:
            base_fields, fields = base.config.signature_fields(), config.signature_fields()
            if base_fields != fields:
                raise IndexConfigError(f"base index {base.path} has config {base_fields}, writing with {fields}")
        sig_src = signatures
        if np.ndim(sig_src) != 2 or np.shape(sig_src)[1] != k:
            raise ValueError(f"signatures must have shape [n, {k}], got {np.shape(sig_src)}")
        if rows is None:
            rows = np.arange(len(sig_src), dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        n_base = base.num_docs if base is not None else 0
        n_total = n_base + len(rows)
        if n_total >= 2**32:
            raise ValueError("a signature index holds at most 2**32 - 1 documents")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")

        def fill(tmp: Path) -> None:
            sig_out = NpyAppender(tmp / "signatures.npy", SIGNATURE_DTYPE, k)
            if base is not None:
                for s in range(0, n_base, chunk_docs):
                    sig_out.append(np.asarray(base.signatures[s : s + chunk_docs]))
            spill = BandSpill(tmp / "spill", config.num_bands)
            for s in range(0, len(rows), chunk_docs):
                r = rows[s : s + chunk_docs]
                chunk = np.asarray(sig_src[r], dtype=SIGNATURE_DTYPE)
                sig_out.append(chunk)
                ne = nonempty(chunk)
                spill.append(band_hashes(chunk[ne], config), n_base + s + np.flatnonzero(ne))
            sig_out.close()
            spill.close()
            for b in range(config.num_bands):
                h, d = spill.read(b)
                if base is not None:
                    bh, bd = base.band(b)
                    h = np.concatenate([np.asarray(bh), h])
                    d = np.concatenate([np.asarray(bd, dtype=np.int64), d])
                order = np.argsort(h, kind="stable")  # two sorted runs; keeps doc order in buckets
                np.save(tmp / f"band_{b:03d}.hashes.npy", h[order], allow_pickle=False)
                np.save(tmp / f"band_{b:03d}.docs.npy", d[order].astype(np.uint32), allow_pickle=False)
                os.remove(spill.paths[b])
            shutil.rmtree(tmp / "spill")
            has_exact = exact_hashes is not None and (base is None or base.has_exact)
            if has_exact:
                new = np.asarray(exact_hashes, dtype=U64)[rows]
                merged = np.unique(new[new != 0])
                known = base.exact_hashes if base is not None else None
                if known is not None and len(known):
                    merged = np.union1d(np.asarray(known), merged)
                np.save(tmp / "exact_hashes.npy", merged.astype(U64), allow_pickle=False)
            (tmp / "header.json").write_bytes(header_bytes(index_header(config, n_total, has_exact)))

        atomic_dir(path, fill)
        return cls.load(path, config)
