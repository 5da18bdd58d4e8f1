"""Exact + near-duplicate removal in one process, with bounded memory: the reference for the
dedup stage, which runs the same steps as units of work (pipelines/minhash/units.py) and must
keep the same documents and write the same index bytes (tests/pipelines/test_dedup.py); the
tests of the MinHash rules themselves run on it (tests/pipelines/test_minhash.py). `kiln dedup`
does not use it.

``add()`` batches of texts; signatures go to a ``.npy`` and band hashes to one spill file per
band. ``finalize()`` drops exact duplicates, then takes one band at a time (sort, candidates,
verification on the memory-mapped signatures, union-find), optionally also against the
:class:`SignatureIndex` of an earlier corpus.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.minhash.config import IndexConfigError, MinHashConfig
from pipelines.minhash.files import BandSpill, NpyAppender, load_npy
from pipelines.minhash.hashing import U64
from pipelines.minhash.index import SignatureIndex
from pipelines.minhash.lsh import UnionFind, band_hashes, bucket_pairs, merge_candidates, required_matches
from pipelines.minhash.signatures import SIGNATURE_DTYPE, MinHasher, nonempty


@dataclass
class DedupResult:
    """Outcome of a dedup run over ``num_docs`` documents (in the order they were added).

    ``representative[i]`` is the document kept in place of ``i`` (``i`` itself when kept; -1
    when ``i`` was dropped because its cluster contains a document of the index).
    ``exact_duplicate``: dropped, same normalised text as an earlier or indexed document.
    ``near_duplicate``: dropped by MinHash (and not an exact duplicate).
    ``index_duplicate``: dropped because it matches (exactly or nearly) the index.
    """

    keep: np.ndarray
    representative: np.ndarray
    exact_duplicate: np.ndarray
    near_duplicate: np.ndarray
    index_duplicate: np.ndarray
    num_clusters: int
    candidate_pairs: int
    verified_pairs: int

    @property
    def num_docs(self) -> int:
        return len(self.keep)

    @property
    def num_removed(self) -> int:
        return int(self.num_docs - np.count_nonzero(self.keep))

    @property
    def drop_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)

    def stats(self) -> dict:
        return {
            "num_docs": self.num_docs,
            "num_kept": int(np.count_nonzero(self.keep)),
            "num_removed": self.num_removed,
            "num_exact_duplicates": int(np.count_nonzero(self.exact_duplicate)),
            "num_near_duplicates": int(np.count_nonzero(self.near_duplicate)),
            "num_index_duplicates": int(np.count_nonzero(self.index_duplicate)),
            "num_clusters": self.num_clusters,
            "candidate_pairs": self.candidate_pairs,
            "verified_pairs": self.verified_pairs,
        }


class MinHashDeduplicator:
    """Streaming near-duplicate removal with bounded memory.

    ``add()`` batches of texts (or precomputed signatures); signatures go to
    ``workdir/signatures.npy`` and band hashes to one spill file per band.  ``finalize()``
    drops exact duplicates (first occurrence kept), then processes one band at a time (sort,
    candidates, verification on the memory-mapped signatures, union-find), optionally also
    against a :class:`SignatureIndex` of an earlier corpus (the indexed documents count as
    coming first: a document whose cluster reaches an indexed one is dropped, with
    ``representative == -1``).  ``write_index()`` then writes the index of the kept documents
    (as a union with ``index`` when ``union=True``).  ``workdir`` (default: a temporary
    directory removed by ``close()``) holds ``signatures.npy`` and ``bands/band_XXX.bin``
    (records of uint64 band hash + uint32 document number).

    Memory beyond the on-disk signatures: one band's records (12 bytes/doc) and a few arrays of
    8 bytes/doc (exact hashes, union-find parents).
    """

    def __init__(
        self,
        config: MinHashConfig | None = None,
        workdir: str | os.PathLike | None = None,
        index: SignatureIndex | None = None,
        exact: bool = True,
    ):
        self.config = config or MinHashConfig()
        if index is not None and index.config.signature_fields() != self.config.signature_fields():
            raise IndexConfigError("the index was loaded with a different MinHash config")
        self.index = index
        self.exact = exact
        self.hasher = MinHasher(self.config)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-minhash-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sig_out = NpyAppender(self.workdir / "signatures.npy", SIGNATURE_DTYPE, self.config.num_hashes)
        self._spill = BandSpill(self.workdir / "bands", self.config.num_bands)
        self._exact_parts: list[np.ndarray] = []
        self.num_docs = 0
        self.result: DedupResult | None = None

    def __enter__(self) -> MinHashDeduplicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sig_out.close()
        self._spill.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def add(self, texts: Sequence[str]) -> np.ndarray:
        """Add a batch of documents; returns their document numbers."""
        sigs, ex = self.hasher.process(texts, exact=self.exact)
        return self.add_signatures(sigs, ex)

    def add_signatures(self, signatures: np.ndarray, exact_hashes: np.ndarray | None = None) -> np.ndarray:
        """Add precomputed signatures (and exact hashes, when ``exact``); returns doc numbers."""
        if self.result is not None:
            raise RuntimeError("finalize() was already called")
        sigs = np.asarray(signatures, dtype=SIGNATURE_DTYPE)
        if sigs.ndim != 2 or sigs.shape[1] != self.config.num_hashes:
            raise ValueError(f"signatures must have shape [n, {self.config.num_hashes}], got {sigs.shape}")
        if self.exact:
            if exact_hashes is None or len(exact_hashes) != len(sigs):
                raise ValueError("exact hashes are required (exact=True)")
            self._exact_parts.append(np.asarray(exact_hashes, dtype=U64))
        first = self.num_docs
        if first + len(sigs) >= 2**32:
            raise ValueError("at most 2**32 - 1 documents per run")
        self._sig_out.append(sigs)
        ne = nonempty(sigs)
        self._spill.append(band_hashes(sigs[ne], self.config), first + np.flatnonzero(ne))
        self.num_docs += len(sigs)
        return np.arange(first, self.num_docs)

    @property
    def signatures(self) -> np.ndarray:
        """The run's signatures, memory-mapped (after ``finalize()``)."""
        return load_npy(self.workdir / "signatures.npy")

    @property
    def exact_hashes(self) -> np.ndarray | None:
        if not self.exact:
            return None
        if self._exact_parts:
            return np.concatenate(self._exact_parts)
        return np.zeros(0, dtype=U64)

    def finalize(self) -> DedupResult:
        if self.result is not None:
            return self.result
        self._sig_out.close()
        self._spill.close()
        n = self.num_docs
        sigs = self.signatures
        arange = np.arange(n, dtype=np.int64)

        # 1. exact duplicates
        first_occ = arange.copy()
        ex_index = np.zeros(n, dtype=bool)
        eh = self.exact_hashes
        if eh is not None and n:
            self._exact_parts = [eh]
            _, first, inverse = np.unique(eh, return_index=True, return_inverse=True)
            first_occ = np.where(eh != 0, first[inverse], arange)
            if self.index is not None:
                ex_index = self.index.contains_exact(eh)
        ex_within = first_occ != arange
        active = ~ex_within & ~ex_index

        # 2. near duplicates, one band at a time
        uf = UnionFind(n)
        flagged = np.zeros(n, dtype=bool)  # near-duplicate of an indexed document
        need = required_matches(self.config)
        n_cand = n_ok = 0
        for b in range(self.config.num_bands):
            h, d = self._spill.read(b)
            keep = active[d]
            h, d = h[keep], d[keep]
            if self.index is not None:
                self.index._query_band(b, h, d, sigs, flagged, need)
            i, j = bucket_pairs(h, d)
            c, ok = merge_candidates(uf, sigs, i, j, need)
            n_cand += c
            n_ok += ok
            del h, d, i, j
        roots = uf.roots()

        # 3. decisions
        anchored_root = np.zeros(n, dtype=bool)
        anchored_root[roots[flagged]] = True
        anchored = anchored_root[roots] | ex_index
        rep = roots
        rep[ex_within] = roots[first_occ[ex_within]]
        anchored[ex_within] |= anchored[first_occ[ex_within]]
        keep = (rep == arange) & ~anchored
        rep[anchored] = -1
        exact_dup = ex_within | ex_index
        near_dup = ~keep & ~exact_dup
        dropped_reps = rep[~keep & (rep >= 0)]
        self.result = DedupResult(
            keep=keep,
            representative=rep,
            exact_duplicate=exact_dup,
            near_duplicate=near_dup,
            index_duplicate=anchored,
            num_clusters=int(len(np.unique(dropped_reps))),
            candidate_pairs=n_cand,
            verified_pairs=n_ok,
        )
        return self.result

    def write_index(
        self, path: str | os.PathLike, union: bool = True, overwrite: bool = False
    ) -> SignatureIndex:
        """Write a :class:`SignatureIndex` of the kept documents (after the index's documents
        when ``union`` and an index was given), so later runs need only the newest index."""
        result = self.finalize()
        return SignatureIndex.write(
            path,
            self.config,
            self.signatures,
            exact_hashes=self.exact_hashes,
            base=self.index if union else None,
            rows=np.flatnonzero(result.keep),
            overwrite=overwrite,
        )


def deduplicate(
    texts: Sequence[str],
    config: MinHashConfig | None = None,
    index: SignatureIndex | None = None,
    exact: bool = True,
    workdir: str | os.PathLike | None = None,
    batch_size: int = 4096,
) -> DedupResult:
    """Convenience: exact + MinHash dedup of an in-memory list of texts."""
    with MinHashDeduplicator(config, workdir=workdir, index=index, exact=exact) as dd:
        texts = list(texts)
        for s in range(0, len(texts), batch_size):
            dd.add(texts[s : s + batch_size])
        return dd.finalize()
