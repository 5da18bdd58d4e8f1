"""The pack stage: documents -> token rows of `seq_len + 1` ids, ready for training.

Inputs: a document artifact (dedup, clean: `shards/*.parquet` with `id`, `text`) and a tokenizer
artifact (`tokenizer.json`). Output: `train/NNNNN.parquet` and `val/NNNNN.parquet`, one row per
training sequence in a fixed-size list column `tokens` (uint16 when the vocabulary fits, else
int32). A row gives the inputs `row[:-1]` and the targets `row[1:]`.

Every document is tokenized with BOS in front, and goes to `val` when a stable hash of its `id`
falls under `val_fraction`: no document is in both splits, a refreshed corpus keeps its documents
in the same split, and the tokenizer stage's held-out documents (the same hash under its smaller
fraction) are validation documents here too. A document artifact may instead name the split
itself: where its shards have a `split` column, a document whose `split` is "train" or "val" goes
there, whatever its hash (a fixed validation set, such as the last 10% of a text in
bench/shakespeare.py); a null `split` falls back to the hash, any other value is an InputError.
Then, per split, one of two policies:

- `concat`: the token stream is cut into rows; a document may start anywhere in a row and run
  into the next. Keeps 100% of the tokens; only the last row of a split is padded.
- `best_fit` (the default): every row starts with BOS, so the model always sees a document from
  its start (nanochat's BOS-aligned packing). Rows are filled one at a time from a buffer of
  documents: the largest buffered document that still fits goes in next (best fit: it leaves
  the least room). A document longer than a row is split into row-sized pieces, each after the
  first led by a new BOS, and its tail joins the buffer. Nothing is cropped: what no document
  fits is padded (PAD, which the loader masks out of the loss). On real documents at seq_len
  2048 this pads under 1% of the row slots; nanochat's crop-to-fill loses a third of the tokens.

Tokenizing is the work: worker processes (`parallel_map`) each read a part of the input shards,
split and encode it with one thread; this process packs and writes, in corpus order, so the
output does not depend on the number of workers. Memory: a few input parts in flight, the
best-fit buffer, and one output shard per split.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.common import (InputError, Progress, Stage, StageConfig, default_workers, document_shards,
                              parallel_map)
from pipelines.tokenizer import BOS, PAD, TOKENIZER_FILE, load_tokenizer
from storage import ArtifactStore, ArtifactWriter, Manifest

SPLITS = ("train", "val")
ROW_GROUP_BYTES = 8 << 20   # uncompressed bytes per Parquet row group: the loader's unit of reading
TASK_BYTES = 8 << 20        # input Parquet bytes per tokenizing task at most (~20 MB of text)
MAX_PARTS = 8               # tokenizing tasks per input shard at most (each reads the whole shard)


class PackConfig(StageConfig):
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers", "encode_batch_size"})

    seq_len: int = Field(256, ge=1, description="Tokens a model sees per row; rows hold seq_len + 1 "
                                                "(the inputs and the targets, shifted by one).")
    policy: Literal["concat", "best_fit"] = Field(
        "best_fit", description="best_fit: every row starts at a document (BOS), padded, nothing cropped; "
                                "concat: one stream cut into rows, no padding but documents straddle rows.")
    val_fraction: float = Field(0.05, ge=0, lt=1,
                                description="Share of documents (by a hash of their id) held out for validation; "
                                            "a document's `split` column (\"train\"/\"val\"), where the shards "
                                            "have one, decides instead.")
    shard_target_bytes: int = Field(256 << 20, ge=1, description="Uncompressed bytes of tokens per output shard.")
    best_fit_buffer_rows: int = Field(1024, ge=1, description="best_fit: documents buffered, in rows' worth of tokens.")
    encode_batch_size: int = Field(512, ge=1, description="Documents per tokenizer call.")
    workers: int = Field(default_factory=default_workers, ge=1,
                         description="Tokenizing processes; with 1, the tokenizer's own threads (RAYON_NUM_THREADS).")


# ------------------------------------------------------------------ tokenizer


def read_tokenizer(store: ArtifactStore, manifest: Manifest):
    """The tokenizer of a tokenizer artifact, or an InputError naming what is wrong with it."""
    try:
        return load_tokenizer(store, manifest)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{store.uri(manifest, TOKENIZER_FILE)}: not a tokenizers file ({reason})") from None


def special_ids(tokenizer, where: str) -> tuple[int, int]:
    ids = tokenizer.token_to_id(BOS), tokenizer.token_to_id(PAD)
    if None in ids:
        raise InputError(f"{where}: the tokenizer lacks {BOS} or {PAD}")
    return ids


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


# ------------------------------------------------------------------ encoding (in worker processes)


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """A stable coin flip per document id: the same document is in the same split in every run
    (blake2b, as the tokenizer stage chooses its held-out documents)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2.0**64


@dataclass(frozen=True)
class _EncodeTask:
    store_url: str
    storage_options: dict
    documents: Manifest
    shard: str
    part: int           # this task takes rows [part/parts, (part+1)/parts) of the shard
    parts: int
    tokenizer: Manifest
    val_fraction: float
    batch_size: int
    one_thread: bool    # in a worker process: the processes are the parallelism


@dataclass
class _Encoded:
    tokens: np.ndarray      # uint32, every document with its BOS, in corpus order
    lengths: np.ndarray     # int64 tokens per document (BOS included)
    is_val: np.ndarray      # bool per document
    documents_in: int


_TOKENIZERS: dict[str, Any] = {}  # per worker process: a tokenizer is parsed once, not per task


def _tokenizer_for(manifest: Manifest, store: ArtifactStore):
    key = manifest.fingerprint
    if key not in _TOKENIZERS:
        tokenizer = read_tokenizer(store, manifest)
        # Text that happens to contain "<|bos|>" is text: only the packer puts special ids in rows.
        tokenizer.encode_special_tokens = True
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def _read_documents(store: ArtifactStore, task: _EncodeTask) -> tuple[list[str], list[str | None], list[str | None]]:
    """ids, texts and splits (the `split` column, or all None where the shard has none)."""
    import pyarrow.parquet as pq

    where = store.uri(task.documents, task.shard)
    try:
        with store.open(task.documents, task.shard) as handle:
            shard = pq.ParquetFile(handle)
            names = shard.schema_arrow.names
            missing = [c for c in ("id", "text") if c not in names]
            if missing:
                raise InputError(f"{where}: not a document shard (no {' or '.join(missing)} column)")
            table = shard.read(columns=["id", "text", *(["split"] if "split" in names else [])])
    except (pa.ArrowException, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{where}: not a readable Parquet shard ({reason})") from None
    start = table.num_rows * task.part // task.parts
    stop = table.num_rows * (task.part + 1) // task.parts
    table = table.slice(start, stop - start)
    ids = table.column("id").to_pylist()
    if None in ids:
        raise InputError(f"{where}: a document without an id (row {start + ids.index(None)})")
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(ids)
    bad = next((i for i, s in enumerate(splits) if s is not None and s not in SPLITS), None)
    if bad is not None:
        raise InputError(f"{where}: row {start + bad} has split {splits[bad]!r}; expected 'train', 'val' or null")
    return [str(i) for i in ids], table.column("text").to_pylist(), splits


def encode_part(task: _EncodeTask) -> _Encoded:
    if task.one_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at each call
    store = ArtifactStore(task.store_url, **task.storage_options)
    tokenizer = _tokenizer_for(task.tokenizer, store)
    bos, _ = special_ids(tokenizer, store.uri(task.tokenizer, TOKENIZER_FILE))
    ids, texts, splits = _read_documents(store, task)
    pieces, lengths, is_val = [], [], []
    for start in range(0, len(texts), task.batch_size):
        batch = [t or "" for t in texts[start:start + task.batch_size]]
        encoded = [e.ids for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
        keep = [i for i, doc in enumerate(encoded) if doc]  # an empty text is no document
        count = sum(len(encoded[i]) + 1 for i in keep)
        pieces.append(np.fromiter(itertools.chain.from_iterable(x for i in keep for x in ((bos,), encoded[i])),
                                  dtype=np.uint32, count=count))
        lengths.extend(len(encoded[i]) + 1 for i in keep)
        is_val.extend(splits[start + i] == "val" if splits[start + i] is not None
                      else is_validation(ids[start + i], task.val_fraction) for i in keep)
    return _Encoded(
        tokens=np.concatenate(pieces) if pieces else np.zeros(0, np.uint32),
        lengths=np.array(lengths, dtype=np.int64), is_val=np.array(is_val, dtype=bool), documents_in=len(texts),
    )


# ------------------------------------------------------------------ packing policies


class ConcatPacker:
    """One token stream cut into rows; the tail waits for the next documents (or the end)."""

    def __init__(self, row_len: int, pad: int):
        self.row_len, self.pad = row_len, pad
        self.carry = np.zeros(0, np.uint32)
        self.bos_inserted = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        stream = np.concatenate([self.carry, tokens])
        whole = len(stream) // self.row_len * self.row_len
        self.carry = stream[whole:]
        return stream[:whole].reshape(-1, self.row_len)

    def finish(self) -> np.ndarray:
        if not len(self.carry):
            return np.zeros((0, self.row_len), np.uint32)
        row = np.full((1, self.row_len), self.pad, np.uint32)
        row[0, :len(self.carry)] = self.carry
        self.carry = np.zeros(0, np.uint32)
        return row


class BestFitPacker:
    """BOS-aligned best fit: rows start at a document and are filled from a buffer of documents,
    largest fitting first. Long documents are split into row-sized pieces (never cropped).

    The buffer holds documents by length: `lengths` is the sorted list of lengths present,
    `by_length[n]` the documents of length n in arrival order (so the output is deterministic).
    """

    def __init__(self, row_len: int, bos: int, pad: int, buffer_rows: int):
        self.row_len, self.pad = row_len, pad
        self.buffer_tokens = buffer_rows * row_len
        self.lengths: list[int] = []
        self.by_length: dict[int, deque[np.ndarray]] = {}
        self.buffered = 0
        self.bos_inserted = 0
        self._bos = np.array([bos], np.uint32)

    def _push(self, doc: np.ndarray) -> None:
        n = len(doc)
        if n not in self.by_length:
            bisect.insort(self.lengths, n)
            self.by_length[n] = deque()
        self.by_length[n].append(doc.copy())  # a view would keep its whole input part alive
        self.buffered += n

    def _pop_largest_fitting(self, room: int) -> np.ndarray | None:
        i = bisect.bisect_right(self.lengths, room) - 1
        if i < 0:
            return None
        n = self.lengths[i]
        queue = self.by_length[n]
        doc = queue.popleft()
        if not queue:
            del self.by_length[n], self.lengths[i]
        self.buffered -= n
        return doc

    def _row(self) -> np.ndarray:
        row = np.full(self.row_len, self.pad, np.uint32)
        used = 0
        while (doc := self._pop_largest_fitting(self.row_len - used)) is not None:
            row[used:used + len(doc)] = doc
            used += len(doc)
        return row

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        rows = []
        row_len = self.row_len
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else ():
            if len(doc) > row_len:  # whole rows of it now, each piece after the first led by a BOS
                rows.append(doc[:row_len])
                rest = doc[row_len:]
                while len(rest) >= row_len:
                    rows.append(np.concatenate([self._bos, rest[:row_len - 1]]))
                    rest = rest[row_len - 1:]
                    self.bos_inserted += 1
                if not len(rest):
                    continue
                doc = np.concatenate([self._bos, rest])
                self.bos_inserted += 1
            self._push(doc)
            while self.buffered >= self.buffer_tokens:
                rows.append(self._row())
        return np.stack(rows) if rows else np.zeros((0, row_len), np.uint32)

    def finish(self) -> np.ndarray:
        rows = []
        while self.buffered:
            rows.append(self._row())
        return np.stack(rows) if rows else np.zeros((0, self.row_len), np.uint32)


# ------------------------------------------------------------------ output shards


class ShardSink:
    """Rows of one split, written as `split/NNNNN.parquet` shards of `rows_per_shard` rows."""

    def __init__(self, writer: ArtifactWriter, split: str, row_len: int, dtype: np.dtype, pad: int,
                 rows_per_shard: int):
        self.writer, self.split, self.row_len, self.dtype, self.pad = writer, split, row_len, dtype, pad
        self.rows_per_shard = rows_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: dict[str, dict[str, int]] = {}

    def add(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows.astype(self.dtype))
            self.pending_rows += len(rows)
        while self.pending_rows >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def finish(self) -> None:
        if self.pending_rows:
            self._write(self.pending_rows)

    def _write(self, count: int) -> None:
        rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        shard, rest = rows[:count], rows[count:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        relpath = f"{self.split}/{len(self.shards):05d}.parquet"
        self.shards[relpath] = {"rows": len(shard), "tokens": int(np.count_nonzero(shard != self.pad))}
        if self.writer.done(relpath):
            self.writer.record_rows(relpath, len(shard))
            return  # written by an earlier, interrupted run of this artifact (the output is deterministic)
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(shard.reshape(-1)), self.row_len)
        group_rows = max(1, ROW_GROUP_BYTES // (self.row_len * self.dtype.itemsize))
        # Token ids compress better without a dictionary, and min/max statistics serve nobody.
        self.writer.write_parquet(relpath, pa.table({"tokens": tokens}), row_group_size=group_rows,
                                  use_dictionary=False, write_statistics=False)


# ------------------------------------------------------------------ the stage


def _check_inputs(inputs: list[Manifest], store: ArtifactStore):
    if len(inputs) != 2:
        raise InputError(f"pack: takes a document artifact and a tokenizer artifact, got {len(inputs)} inputs")
    documents, tokenizer_manifest = inputs
    if not document_shards(documents):
        raise InputError(f"{documents.stage}/{documents.short}: not a document artifact (no shards/*.parquet)")
    tokenizer = _tokenizer_for(tokenizer_manifest, store)
    bos, pad = special_ids(tokenizer, store.uri(tokenizer_manifest, TOKENIZER_FILE))
    return documents, tokenizer_manifest, tokenizer.get_vocab_size(with_added_tokens=True), bos, pad


def _plan(config: PackConfig, documents: Manifest, tokenizer: Manifest, store: ArtifactStore) -> list[_EncodeTask]:
    """Parts of shards, so that the workers share the work evenly to the end: about four parts per
    worker on a small corpus, none over TASK_BYTES on a large one. A part reads its whole shard
    (~1% of the time it takes to tokenize it, hence at most MAX_PARTS parts a shard) and takes a
    slice of the rows; the parts come back in order, so how the work is cut never changes the output."""
    shards = document_shards(documents)
    sizes = [documents.file(s).bytes for s in shards]
    task_bytes = TASK_BYTES
    if config.workers > 1:
        task_bytes = max(1, min(TASK_BYTES, sum(sizes) // (4 * config.workers)))
    one_thread = config.workers > 1
    return [
        _EncodeTask(store.url, store.storage_options, documents, shard, part, parts, tokenizer,
                    config.val_fraction, config.encode_batch_size, one_thread)
        for shard, size in zip(shards, sizes)
        for parts in [min(MAX_PARTS, max(1, math.ceil(size / task_bytes)))]
        for part in range(parts)
    ]


def build_pack(config: PackConfig, inputs: list[Manifest], store: ArtifactStore,
               writer: ArtifactWriter) -> dict[str, Any]:
    started = time.perf_counter()
    documents, tokenizer, vocab_size, bos, pad = _check_inputs(inputs, store)
    row_len = config.seq_len + 1
    dtype = token_dtype(vocab_size)
    rows_per_shard = max(1, config.shard_target_bytes // (row_len * dtype.itemsize))

    def packer():
        if config.policy == "concat":
            return ConcatPacker(row_len, pad)
        return BestFitPacker(row_len, bos, pad, config.best_fit_buffer_rows)

    packers = {split: packer() for split in SPLITS}
    sinks = {split: ShardSink(writer, split, row_len, dtype, pad, rows_per_shard) for split in SPLITS}
    documents_in = 0
    docs = {split: 0 for split in SPLITS}
    tokens_in = {split: 0 for split in SPLITS}
    tasks = _plan(config, documents, tokenizer, store)
    rows_known = [documents.file(s).rows for s in document_shards(documents)]
    total = sum(rows_known) if None not in rows_known else None
    with Progress("pack", total, unit="docs") as bar:
        for part in parallel_map(encode_part, tasks, config.workers):
            documents_in += part.documents_in
            token_is_val = np.repeat(part.is_val, part.lengths)
            for split, in_split in (("train", ~part.is_val), ("val", part.is_val)):
                lengths = part.lengths[in_split]
                tokens = part.tokens[token_is_val == (split == "val")]
                docs[split] += len(lengths)
                tokens_in[split] += len(tokens)
                sinks[split].add(packers[split].add(tokens, lengths))
            bar.advance(part.documents_in)
    for split in SPLITS:
        sinks[split].add(packers[split].finish())
        sinks[split].finish()

    shards = {path: s for sink in sinks.values() for path, s in sink.shards.items()}
    rows = {split: sum(s["rows"] for s in sinks[split].shards.values()) for split in SPLITS}
    tokens = {split: sum(s["tokens"] for s in sinks[split].shards.values()) for split in SPLITS}
    bos_inserted = sum(p.bos_inserted for p in packers.values())
    slots = sum(rows.values()) * row_len
    padding = slots - sum(tokens.values())
    cropped = sum(tokens_in.values()) + bos_inserted - sum(tokens.values())  # 0 by construction; counted, not assumed
    seconds = time.perf_counter() - started
    total_in = sum(tokens_in.values())
    return {
        "policy": config.policy,
        "seq_len": config.seq_len,
        "row_tokens": row_len,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "bos_id": bos,
        "pad_id": pad,
        "documents_in": documents_in,
        "documents_out": sum(docs.values()),
        "documents_empty": documents_in - sum(docs.values()),
        "documents": docs,
        "tokens_in": total_in,
        "tokens": tokens,
        "rows": sum(rows.values()),
        "rows_per_split": rows,
        "shards": shards,
        "bos_inserted": bos_inserted,
        "tokens_cropped": cropped,
        "tokens_cropped_fraction": round(cropped / total_in, 6) if total_in else 0.0,
        "padding_tokens": padding,
        "padding_fraction": round(padding / slots, 6) if slots else 0.0,
        "tokens_per_second": round(total_in / seconds) if seconds > 0 else None,
    }


STAGE = Stage("pack", PackConfig, build_pack, code_version="2")  # 2: a `split` column decides the split
