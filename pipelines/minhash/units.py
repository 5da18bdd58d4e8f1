"""The units of work of distributed dedup; each reads and writes files of the artifact being
built (through its writer, so a local directory, a shared filesystem or an object store alike)
and holds at most one shard's or one band's data in memory.

    signatures  per input shard: MinHash signatures, exact hashes, band hashes (band-major)
    exact       per hash partition: exact duplicates (-> their first occurrence), and documents
                an earlier corpus already holds
    band        per LSH band: candidate pairs among the active documents, verified on the full
                signatures (the edges), and documents near an earlier corpus's
    (cluster)   one step, in the driver: union-find over the edges (sparse: only documents
                that have a duplicate), the root always the lowest document number, so the
                result is the one-machine result exactly (see pipelines/dedup.py)
    filter      per input shard: the kept rows
    index       per band (and one for the signatures, one for the exact hashes): the
                signature index of everything kept so far, as SignatureIndex.write makes it

Documents are numbered across the corpus (shard by shard, row by row); a shard's first number
is its `offset`. Work files live under `work/` in the staging directory and are removed before
the commit; each unit's last file marks it done, so a killed build resumes from finished units.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.minhash.config import MinHashConfig
from pipelines.minhash.files import NpyRows
from pipelines.minhash.hashing import U64
from pipelines.minhash.lsh import (band_hashes, bucket_pairs, indexed_matches, required_matches, unique_pairs,
                                   verify_pairs)
from pipelines.minhash.signatures import SIGNATURE_DTYPE, MinHasher, nonempty
from storage import ArtifactStore, ArtifactWriter, Manifest

WORK = "work"


def work(kind: str, index: int, suffix: str = "npy") -> str:
    return f"{WORK}/{kind}/{index:05d}.{suffix}"


def save_npy(writer: ArtifactWriter, relpath: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    writer.write_bytes(relpath, buffer.getvalue())


def load_npy(writer: ArtifactWriter, relpath: str) -> np.ndarray:
    with writer.fs.open(writer.path(relpath), "rb") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


def load_json(writer: ArtifactWriter, relpath: str) -> Any:
    with writer.fs.open(writer.path(relpath), "rb") as handle:
        return json.loads(handle.read())


@dataclass(frozen=True)
class Earlier:
    """The signature index of an earlier corpus (`dedup.against`), read where it lies."""

    store_url: str
    storage_options: dict
    manifest: Manifest
    num_docs: int
    has_exact: bool

    def _fs_path(self, name: str):
        store = ArtifactStore(self.store_url, **self.storage_options)
        return store.fs, posixpath.join(store.artifact_dir(self.manifest.stage, self.manifest.fingerprint), "index", name)

    def load(self, name: str) -> np.ndarray:
        fs, path = self._fs_path(name)
        with fs.open(path, "rb") as handle:
            return np.load(io.BytesIO(handle.read()), allow_pickle=False)

    def signatures(self) -> NpyRows:
        return NpyRows(*self._fs_path("signatures.npy"))


@dataclass(frozen=True)
class Corpus:
    """What every unit knows of the corpus: where the work files are, and the documents per shard."""

    writer: ArtifactWriter
    config: MinHashConfig
    exact: bool
    counts: tuple[int, ...] = ()       # documents per input shard (known after the signatures)
    earlier: Earlier | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)

    def signatures(self) -> "RunSignatures":
        return RunSignatures(self)


class RunSignatures:
    """The corpus's signatures by document number, read shard by shard as they are asked for."""

    def __init__(self, corpus: Corpus):
        self.corpus, self.offsets = corpus, corpus.offsets
        self.files: dict[int, NpyRows] = {}

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.corpus.config.num_hashes), dtype=SIGNATURE_DTYPE)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for shard in np.unique(shard_of):
            here = shard_of == shard
            if shard not in self.files:
                writer = self.corpus.writer
                self.files[int(shard)] = NpyRows(writer.fs, writer.path(work("sig", int(shard))))
            out[here] = self.files[int(shard)][ids[here] - self.offsets[shard]]
        return out


# ------------------------------------------------------------------ signatures, per shard


@dataclass(frozen=True)
class SignatureTask:
    corpus: Corpus
    shard: int
    relpath: str
    source: Manifest
    batch_size: int


def signature_unit(task: SignatureTask) -> dict[str, Any]:
    writer = task.corpus.writer
    done = work("docs", task.shard, "json")
    if writer.done(done):
        return load_json(writer, done)
    from pipelines.common import read_shard

    store = ArtifactStore(writer.store_url, **writer.storage_options)
    texts = [t or "" for t in read_shard(store, task.source, task.relpath, columns=["text"]).column("text").to_pylist()]
    config = task.corpus.config
    hasher = MinHasher(config)
    sigs = np.empty((len(texts), config.num_hashes), dtype=SIGNATURE_DTYPE)
    exact = np.zeros(len(texts), dtype=U64)
    for start in range(0, len(texts), task.batch_size):
        part_sigs, part_exact = hasher.process(texts[start:start + task.batch_size], exact=task.corpus.exact)
        sigs[start:start + len(part_sigs)] = part_sigs
        if part_exact is not None:
            exact[start:start + len(part_exact)] = part_exact
    save_npy(writer, work("sig", task.shard), sigs)
    save_npy(writer, work("exact", task.shard), exact)
    save_npy(writer, work("bands", task.shard), band_hashes(sigs, config).T)  # [band, document]
    result = {"documents": len(texts), "empty": np.flatnonzero(~nonempty(sigs)).tolist()}
    writer.write_json(done, result)  # last: the unit is done
    return result


# ------------------------------------------------------------------ exact duplicates, per partition


@dataclass(frozen=True)
class ExactTask:
    corpus: Corpus
    partition: int
    partitions: int


def exact_unit(task: ExactTask) -> None:
    """(duplicate, its first occurrence) for every exact duplicate whose hash falls in this
    partition, and the documents whose normalised text an earlier corpus holds."""
    corpus, writer = task.corpus, task.corpus.writer
    if writer.done(work("exactdup", task.partition)):
        return
    hashes, ids = [], []
    for shard, offset in enumerate(corpus.offsets[:-1]):
        values = load_npy(writer, work("exact", shard))
        mine = np.flatnonzero((values != 0) & (values % U64(task.partitions) == U64(task.partition)))
        hashes.append(values[mine])
        ids.append(mine.astype(np.int64) + offset)
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, U64)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    in_earlier = np.zeros(0, np.int64)
    if corpus.earlier is not None and corpus.earlier.has_exact and len(hashes):
        known = corpus.earlier.load("exact_hashes.npy")
        if len(known):
            pos = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
            in_earlier = ids[known[pos] == hashes]
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)  # ids ascend: first = lowest
    first_id = ids[first][inverse]
    dup = first_id != ids
    save_npy(writer, work("exactidx", task.partition), np.sort(in_earlier))
    save_npy(writer, work("exactdup", task.partition), np.stack([ids[dup], first_id[dup]], axis=1))  # last


def inactive_documents(corpus: Corpus, partitions: int) -> np.ndarray:
    """Sorted document numbers left out of the LSH: exact duplicates, and what an earlier corpus holds."""
    parts = [np.zeros(0, np.int64)]
    for p in range(partitions):
        parts.append(load_npy(corpus.writer, work("exactdup", p))[:, 0].astype(np.int64))
        parts.append(load_npy(corpus.writer, work("exactidx", p)).astype(np.int64))
    return np.unique(np.concatenate(parts))


# ------------------------------------------------------------------ LSH, per band


@dataclass(frozen=True)
class BandTask:
    corpus: Corpus
    band: int
    partitions: int
    empty: tuple[tuple[int, ...], ...] = field(default=())  # per shard: rows without shingles


def band_unit(task: BandTask) -> dict[str, int]:
    """The verified pairs (edges) of one band among the active documents, and the documents
    near an earlier corpus's in this band."""
    corpus, writer, b = task.corpus, task.corpus.writer, task.band
    if writer.done(work("edges", b)):
        return load_json(writer, work("bandstats", b, "json"))
    hashes, ids = [], []
    for shard, offset in enumerate(corpus.offsets[:-1]):
        rows = NpyRows(writer.fs, writer.path(work("bands", shard)))
        keep = np.ones(rows.shape[1], dtype=bool)
        keep[list(task.empty[shard])] = False
        hashes.append(rows.row(b)[keep])
        ids.append(np.flatnonzero(keep).astype(np.int64) + offset)
    h = np.concatenate(hashes) if hashes else np.zeros(0, U64)
    d = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    inactive = inactive_documents(corpus, task.partitions)
    active = ~np.isin(d, inactive, assume_unique=False)
    h, d = h[active], d[active]
    need = required_matches(corpus.config)
    signatures = corpus.signatures()
    flagged = np.zeros(0, np.int64)
    if corpus.earlier is not None and corpus.earlier.num_docs:
        flagged = _near_earlier(corpus.earlier, b, h, d, signatures, need)
    i, j = bucket_pairs(h, d)
    if len(i) > 1:
        i, j = unique_pairs(i, j)
    ok = verify_pairs(signatures, i, signatures, j, need)
    stats = {"candidate_pairs": int(len(i)), "verified_pairs": int(ok.sum())}
    save_npy(writer, work("flagged", b), flagged)
    writer.write_json(work("bandstats", b, "json"), stats)
    save_npy(writer, work("edges", b), np.stack([i[ok], j[ok]], axis=1))  # last: the unit is done
    return stats


def _near_earlier(earlier: Earlier, b: int, h: np.ndarray, d: np.ndarray, signatures, need) -> np.ndarray:
    """Documents sharing a band-b bucket with an indexed document and agreeing with it in >= need
    signature values (SignatureIndex._query_band, reading the index where it lies)."""
    ih = earlier.load(f"band_{b:03d}.hashes.npy")
    idoc = earlier.load(f"band_{b:03d}.docs.npy")
    if len(h) == 0 or len(ih) == 0:
        return np.zeros(0, np.int64)
    q, targets = indexed_matches(ih, idoc, h, d)
    if len(q) == 0:
        return np.zeros(0, np.int64)
    ok = verify_pairs(signatures, q, earlier.signatures(), targets, need)
    return np.unique(q[ok])


# ------------------------------------------------------------------ the kept rows, per shard


@dataclass(frozen=True)
class FilterTask:
    corpus: Corpus
    shard: int
    relpath: str
    source: Manifest
    dropped: tuple[int, ...]   # rows of this shard that go


def filter_unit(task: FilterTask) -> int:
    from pipelines.common import read_shard

    writer = task.corpus.writer
    if writer.done(task.relpath):
        return 0  # written by an earlier, interrupted run (the decisions are deterministic)
    store = ArtifactStore(writer.store_url, **writer.storage_options)
    table = read_shard(store, task.source, task.relpath)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[list(task.dropped)] = False
    writer.write_parquet(task.relpath, table.filter(pa.array(keep)))
    return int(keep.sum())


# ------------------------------------------------------------------ the signature index, per band


@dataclass(frozen=True)
class IndexTask:
    corpus: Corpus
    part: str                          # "signatures", "exact" or "band"
    band: int = -1
    kept: tuple[tuple[int, ...], ...] = ()   # per shard: the kept rows, ascending


def _kept_rows(task: IndexTask):
    """(shard, its kept rows, the new document number of the first of them) for each shard."""
    number = task.corpus.earlier.num_docs if task.corpus.earlier is not None else 0
    for shard, rows in enumerate(task.kept):
        yield shard, np.asarray(rows, dtype=np.int64), number
        number += len(rows)


def index_unit(task: IndexTask) -> None:
    """One file of the new index: earlier documents first, then the kept ones, numbered on."""
    corpus, writer = task.corpus, task.corpus.writer
    name = {"signatures": "index/signatures.npy", "exact": "index/exact_hashes.npy",
            "band": f"index/band_{task.band:03d}.docs.npy"}[task.part]
    if writer.done(name):
        return
    earlier = corpus.earlier
    if task.part == "signatures":
        total = (earlier.num_docs if earlier else 0) + sum(len(rows) for rows in task.kept)
        with writer.open(name) as handle:
            np.lib.format.write_array_header_1_0(handle, {
                "descr": np.lib.format.dtype_to_descr(SIGNATURE_DTYPE), "fortran_order": False,
                "shape": (total, corpus.config.num_hashes)})
            if earlier is not None:
                old = earlier.signatures()
                for start in range(0, len(old), 1 << 16):
                    handle.write(old[np.arange(start, min(start + (1 << 16), len(old)))].tobytes())
            for shard, rows, _ in _kept_rows(task):
                if len(rows):
                    handle.write(NpyRows(writer.fs, writer.path(work("sig", shard)))[rows].tobytes())
        return
    if task.part == "exact":
        new = [load_npy(writer, work("exact", shard))[rows] for shard, rows, _ in _kept_rows(task)]
        new = np.concatenate(new) if new else np.zeros(0, U64)
        merged = np.unique(new[new != 0])
        if earlier is not None:
            known = earlier.load("exact_hashes.npy")
            if len(known):
                merged = np.union1d(known, merged)
        save_npy(writer, name, merged.astype(U64))
        return
    b = task.band
    h_parts, d_parts = [], []
    if earlier is not None:
        h_parts.append(earlier.load(f"band_{b:03d}.hashes.npy"))
        d_parts.append(earlier.load(f"band_{b:03d}.docs.npy").astype(np.int64))
    for shard, rows, first in _kept_rows(task):
        hashes = NpyRows(writer.fs, writer.path(work("bands", shard))).row(b)[rows]
        full = nonempty(NpyRows(writer.fs, writer.path(work("sig", shard)))[rows]) if len(rows) else np.zeros(0, bool)
        h_parts.append(hashes[full])
        d_parts.append(first + np.flatnonzero(full))
    h = np.concatenate(h_parts) if h_parts else np.zeros(0, U64)
    d = np.concatenate(d_parts) if d_parts else np.zeros(0, np.int64)
    order = np.argsort(h, kind="stable")  # two sorted runs; keeps document order in buckets
    save_npy(writer, f"index/band_{b:03d}.hashes.npy", h[order].astype(U64))
    save_npy(writer, name, d[order].astype(np.uint32))  # last: the unit is done
