"""The units of work of the dedup stage; each reads and writes files of the artifact being
built (through its writer, so a local directory, a shared filesystem or an object store alike)
and holds at most one shard's or one band's data in memory.

    signatures  per part (an input shard, or a run of its rows when there are fewer shards than
                the workers can share): MinHash signatures, exact hashes, band hashes (band-major)
    exact       per hash partition: exact duplicates (-> their first occurrence), and documents
                an earlier corpus already holds
    band        per LSH band: candidate pairs among the active documents, verified on the full
                signatures (the edges), and documents near an earlier corpus's
    (cluster)   one step, in the driver: union-find over the edges (sparse: only documents
                that have a duplicate), the root always the lowest document number, so the
                result is the one-machine result exactly (see pipelines/dedup.py)
    output      per input shard: the kept rows; per band (and one for the signatures, one for
                the exact hashes): the signature index of everything kept so far, as
                SignatureIndex.write makes it

Documents are numbered across the corpus (shard by shard, row by row); a part's first number
is its `offset`. The signatures, the one costly phase, are the work files: they live under
`work/` in the staging directory, are removed before the commit, and the last of a part's files
marks it done, so a killed build resumes from the finished parts (and from the output files
already written). The exact and band units hand their results (the duplicates, no more) back to
the driver instead: they take a fraction of the time and are run again on a resume.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq  # here, not in the units: the forkserver imports it once for every worker

from pipelines.minhash.config import MinHashConfig
from pipelines.minhash.files import NpyRows
from pipelines.minhash.hashing import U64
from pipelines.minhash.lsh import (
    band_hashes,
    bucket_pairs,
    indexed_matches,
    required_matches,
    unique_pairs,
    verify_pairs,
)
from pipelines.minhash.signatures import SIGNATURE_DTYPE, MinHasher, nonempty
from storage import ArtifactStore, ArtifactWriter, Manifest

WORK = "work"
NO_DOCS = np.zeros(0, np.int64)


def work(kind: str, name: str, suffix: str = "npy") -> str:
    return f"{WORK}/{kind}/{name}.{suffix}"


def save_npy(writer: ArtifactWriter, relpath: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    writer.write_bytes(relpath, buffer.getvalue())


def load_npy(writer: ArtifactWriter, relpath: str) -> np.ndarray:
    with writer.fs.open(writer.path(relpath), "rb") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


def concat(arrays: list[np.ndarray], empty: np.ndarray = NO_DOCS) -> np.ndarray:
    return np.concatenate(arrays) if arrays else empty


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
        directory = store.artifact_dir(self.manifest.stage, self.manifest.fingerprint)
        return store.fs, posixpath.join(directory, "index", name)

    def load(self, name: str) -> np.ndarray:
        fs, path = self._fs_path(name)
        with fs.open(path, "rb") as handle:
            return np.load(io.BytesIO(handle.read()), allow_pickle=False)

    def signatures(self) -> NpyRows:
        return NpyRows(*self._fs_path("signatures.npy"))


@dataclass(frozen=True)
class Part:
    """The rows `first .. first + rows` of the input shard `shard` (at `relpath`): one signature unit."""

    shard: int
    relpath: str
    first: int
    rows: int

    @property
    def name(self) -> str:
        return f"{self.shard:05d}-{self.first:09d}"


MIN_PART_ROWS = 1024  # fewer documents are not worth a unit of their own (its shard is read once per part)


def plan_parts(shards: list[str], rows: list[int], workers: int) -> tuple[Part, ...]:
    """One part per shard; shards cut into runs of rows when there are fewer than two per worker,
    so that a corpus of a few large shards still keeps every worker busy."""
    target = 1 if workers <= 1 else 2 * workers
    total = sum(rows)
    part_rows = max(MIN_PART_ROWS, -(-total // target)) if len(shards) < target else max(rows + [1])
    parts: list[Part] = []
    for shard, (relpath, n) in enumerate(zip(shards, rows)):
        pieces = max(1, n // part_rows)  # each of at least part_rows rows
        bounds = [n * k // pieces for k in range(pieces + 1)]
        parts.extend(Part(shard, relpath, a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a or n == 0)
    return tuple(parts)


@dataclass(frozen=True)
class Corpus:
    """What every unit knows of the corpus: where the work files are, and its parts."""

    writer: ArtifactWriter
    config: MinHashConfig
    exact: bool
    parts: tuple[Part, ...] = ()
    earlier: Earlier | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([p.rows for p in self.parts], dtype=np.int64)]).astype(np.int64)

    def signatures(self) -> RunSignatures:
        return RunSignatures(self)

    def rows(self, kind: str, part: Part) -> NpyRows:
        return NpyRows(self.writer.fs, self.writer.path(work(kind, part.name)))


class RunSignatures:
    """The corpus's signatures by document number, read part by part as they are asked for."""

    def __init__(self, corpus: Corpus):
        self.corpus, self.offsets = corpus, corpus.offsets
        self.files: dict[int, NpyRows] = {}

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.corpus.config.num_hashes), dtype=SIGNATURE_DTYPE)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of).tolist():
            here = part_of == p
            if p not in self.files:
                self.files[p] = self.corpus.rows("sig", self.corpus.parts[p])
            out[here] = self.files[p][ids[here] - self.offsets[p]]
        return out


def read_shard_columns(store: ArtifactStore, manifest: Manifest, relpath: str, columns: list[str] | None = None,
                       first: int = 0, rows: int | None = None) -> pa.Table:
    """Rows `first .. first + rows` of a Parquet shard (only the row groups that hold them are read)."""
    with store.open(manifest, relpath) as handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        rows = sum(sizes) - first if rows is None else rows
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        groups = [g for g in range(len(sizes)) if starts[g] < first + rows and starts[g + 1] > first]
        if not groups:
            return parquet.schema_arrow.empty_table().select(columns) if columns else parquet.schema_arrow.empty_table()
        table = parquet.read_row_groups(groups, columns=columns, use_threads=False)
    return table.slice(first - int(starts[groups[0]]), rows)


# ------------------------------------------------------------------ signatures, per part


@dataclass(frozen=True)
class SignatureTask:
    corpus: Corpus
    part: int
    source: Manifest
    batch_size: int


def signature_unit(task: SignatureTask) -> dict[str, Any]:
    corpus = task.corpus
    writer, part, config = corpus.writer, corpus.parts[task.part], corpus.config
    done = work("bands", part.name)
    if writer.done(done):  # finished by an earlier, killed run
        sigs = corpus.rows("sig", part)[np.arange(part.rows)]
    else:
        store = ArtifactStore(writer.store_url, **writer.storage_options)
        column = read_shard_columns(store, task.source, part.relpath, ["text"], part.first, part.rows).column("text")
        texts = [t or "" for t in column.to_pylist()]
        if len(texts) != part.rows:
            raise ValueError(f"{part.relpath}: {len(texts)} rows from {part.first}, the manifest says {part.rows}")
        hasher = MinHasher(config)
        sigs = np.empty((len(texts), config.num_hashes), dtype=SIGNATURE_DTYPE)
        exact = np.zeros(len(texts), dtype=U64)
        for start in range(0, len(texts), task.batch_size):
            part_sigs, part_exact = hasher.process(texts[start:start + task.batch_size], exact=corpus.exact)
            sigs[start:start + len(part_sigs)] = part_sigs
            if part_exact is not None:
                exact[start:start + len(part_exact)] = part_exact
        save_npy(writer, work("sig", part.name), sigs)
        save_npy(writer, work("exact", part.name), exact)
        save_npy(writer, done, band_hashes(sigs, config).T)  # [band, document]; last: the part is done
    return {"documents": part.rows, "empty": np.flatnonzero(~nonempty(sigs))}


# ------------------------------------------------------------------ exact duplicates, per partition


@dataclass(frozen=True)
class ExactTask:
    corpus: Corpus
    partition: int
    partitions: int


def exact_unit(task: ExactTask) -> dict[str, np.ndarray]:
    """(duplicate, its first occurrence) for every exact duplicate whose hash falls in this
    partition, and the documents whose normalised text an earlier corpus holds."""
    corpus, writer = task.corpus, task.corpus.writer
    hash_parts, id_parts = [], []
    for part, offset in zip(corpus.parts, corpus.offsets[:-1].tolist()):
        values = load_npy(writer, work("exact", part.name))
        mine = np.flatnonzero((values != 0) & (values % U64(task.partitions) == U64(task.partition)))
        hash_parts.append(values[mine])
        id_parts.append(mine.astype(np.int64) + offset)
    hashes, ids = concat(hash_parts, np.zeros(0, U64)), concat(id_parts)
    in_earlier = NO_DOCS
    if corpus.earlier is not None and corpus.earlier.has_exact and len(hashes):
        known = corpus.earlier.load("exact_hashes.npy")
        if len(known):
            pos = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
            in_earlier = ids[known[pos] == hashes]
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)  # ids ascend: first = lowest
    first_id = ids[first][inverse]
    dup = first_id != ids
    return {"duplicates": np.stack([ids[dup], first_id[dup]], axis=1), "in_earlier": np.sort(in_earlier)}


# ------------------------------------------------------------------ LSH, per band


@dataclass(frozen=True)
class BandTask:
    corpus: Corpus
    band: int
    inactive: np.ndarray   # sorted document numbers left out: exact duplicates, what an earlier corpus holds
    empty: tuple[np.ndarray, ...]  # per part: rows without shingles


def band_unit(task: BandTask) -> dict[str, Any]:
    """The verified pairs (edges) of one band among the active documents, and the documents
    near an earlier corpus's in this band."""
    corpus, b = task.corpus, task.band
    hashes, ids = [], []
    for p, (part, offset) in enumerate(zip(corpus.parts, corpus.offsets[:-1].tolist())):
        keep = np.ones(part.rows, dtype=bool)
        keep[task.empty[p]] = False
        hashes.append(corpus.rows("bands", part).row(b)[keep])
        ids.append(np.flatnonzero(keep).astype(np.int64) + offset)
    h, d = concat(hashes, np.zeros(0, U64)), concat(ids)
    if len(task.inactive):
        active = ~np.isin(d, task.inactive)
        h, d = h[active], d[active]
    need = required_matches(corpus.config)
    signatures = corpus.signatures()
    flagged = NO_DOCS
    if corpus.earlier is not None and corpus.earlier.num_docs:
        flagged = _near_earlier(corpus.earlier, b, h, d, signatures, need)
    i, j = bucket_pairs(h, d)
    if len(i) > 1:
        i, j = unique_pairs(i, j)
    ok = verify_pairs(signatures, i, signatures, j, need)
    return {"edges": np.stack([i[ok], j[ok]], axis=1), "flagged": flagged,
            "candidate_pairs": int(len(i)), "verified_pairs": int(ok.sum())}


def _near_earlier(earlier: Earlier, b: int, h: np.ndarray, d: np.ndarray, signatures, need) -> np.ndarray:
    """Documents sharing a band-b bucket with an indexed document and agreeing with it in >= need
    signature values (SignatureIndex._query_band, reading the index where it lies)."""
    ih = earlier.load(f"band_{b:03d}.hashes.npy")
    idoc = earlier.load(f"band_{b:03d}.docs.npy")
    if len(h) == 0 or len(ih) == 0:
        return NO_DOCS
    q, targets = indexed_matches(ih, idoc, h, d)
    if len(q) == 0:
        return NO_DOCS
    ok = verify_pairs(signatures, q, earlier.signatures(), targets, need)
    return np.unique(q[ok])


# ------------------------------------------------------------------ the output: kept rows, the index


@dataclass(frozen=True)
class FilterTask:
    corpus: Corpus
    shard: int
    relpath: str
    source: Manifest
    dropped: np.ndarray   # rows of this shard that go


@dataclass(frozen=True)
class IndexTask:
    corpus: Corpus
    part: str                          # "signatures", "exact" or "band"
    band: int = -1
    dropped: tuple[np.ndarray, ...] = ()   # per corpus part: its rows that go, ascending
    empty: tuple[np.ndarray, ...] = ()     # per corpus part: its rows without shingles


def output_unit(task: FilterTask | IndexTask) -> int | None:
    """The kept rows of a shard, or one file of the new index: the output phase's units."""
    if isinstance(task, FilterTask):
        return filter_unit(task)
    index_unit(task)
    return None


def filter_unit(task: FilterTask) -> int:
    writer = task.corpus.writer
    if writer.done(task.relpath):
        return 0  # written by an earlier, interrupted run (the decisions are deterministic)
    store = ArtifactStore(writer.store_url, **writer.storage_options)
    table = read_shard_columns(store, task.source, task.relpath)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[task.dropped] = False
    # a mask made from its bits: pa.array(numpy) would import pandas (0.3 s) to ask if it is one
    bits = pa.py_buffer(np.packbits(keep, bitorder="little"))
    mask = pa.BooleanArray.from_buffers(pa.bool_(), len(keep), [None, bits])
    writer.write_parquet(task.relpath, table.filter(mask))
    return int(keep.sum())


def _kept_rows(task: IndexTask):
    """(part, its kept rows, the new document number of the first of them) for each part."""
    number = task.corpus.earlier.num_docs if task.corpus.earlier is not None else 0
    for p, part in enumerate(task.corpus.parts):
        rows = np.setdiff1d(np.arange(part.rows, dtype=np.int64), task.dropped[p], assume_unique=True)
        yield p, part, rows, number
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
        kept = list(_kept_rows(task))
        total = (earlier.num_docs if earlier else 0) + sum(len(rows) for _, _, rows, _ in kept)
        with writer.open(name) as handle:
            np.lib.format.write_array_header_1_0(handle, {
                "descr": np.lib.format.dtype_to_descr(SIGNATURE_DTYPE), "fortran_order": False,
                "shape": (total, corpus.config.num_hashes)})
            if earlier is not None:
                old = earlier.signatures()
                for start in range(0, len(old), 1 << 16):
                    handle.write(old[np.arange(start, min(start + (1 << 16), len(old)))].tobytes())
            for _, part, rows, _ in kept:
                if len(rows):
                    handle.write(corpus.rows("sig", part)[rows].tobytes())
        return
    if task.part == "exact":
        new = concat([load_npy(writer, work("exact", part.name))[rows] for _, part, rows, _ in _kept_rows(task)],
                     np.zeros(0, U64))
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
    for p, part, rows, first in _kept_rows(task):
        full = np.ones(part.rows, dtype=bool)
        full[task.empty[p]] = False
        full = full[rows]
        h_parts.append(corpus.rows("bands", part).row(b)[rows][full])
        d_parts.append(first + np.flatnonzero(full))
    h, d = concat(h_parts, np.zeros(0, U64)), concat(d_parts)
    order = np.argsort(h, kind="stable")  # two sorted runs; keeps document order in buckets
    save_npy(writer, f"index/band_{b:03d}.hashes.npy", h[order].astype(U64))
    save_npy(writer, name, d[order].astype(np.uint32))  # last: the unit is done
