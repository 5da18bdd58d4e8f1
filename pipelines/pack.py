"""The pack stage: documents -> token rows of `seq_len + 1` ids, ready for training.

Inputs: a document artifact (dedup, clean: `shards/*.parquet` with `id`, `text`) and a tokenizer
artifact (`tokenizer.json`). Output: `train/*.parquet` and `val/*.parquet`, one row per
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

The work is cut into units of consecutive input shards (about `unit_bytes` of Parquet each);
a unit encodes its shards in order, packs them with its own packer per split and writes its
own output shards, `train/UUUUU-NNNN.parquet` (unit, shard). Units run in parallel on the
stage's executor (a process pool, or Ray tasks on a cluster, see pipelines/executor.py); the
cut depends on the corpus and the settings alone, so the rows are the same whichever executor
and however many workers packed them. A unit's record (`units/UUUUU.json`, written last) marks
it done: a killed build resumes from the units it finished. A unit's last row per split is
padded, as the corpus's last row was. Memory per unit: one input shard, the best-fit buffer,
and one output shard per split.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.common import InputError, Progress, Stage, document_shards
from pipelines.executor import ParallelStageConfig, executor_for
from pipelines.tokenizer import BOS, PAD, TOKENIZER_FILE, load_tokenizer
from storage import ArtifactStore, ArtifactWriter, Manifest

SPLITS = ("train", "val")
ROW_GROUP_BYTES = 8 << 20   # uncompressed bytes per Parquet row group: the loader's unit of reading
UNITS_DIR = "units"         # `units/NNNNN.json`: a finished unit's shards and counts, written last


class PackConfig(ParallelStageConfig):
    runtime_fields: ClassVar[frozenset[str]] = ParallelStageConfig.runtime_fields | {"encode_batch_size"}

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
    unit_bytes: int = Field(512 << 20, ge=1, description="Input Parquet bytes per unit of work: consecutive input "
                                                         "shards are packed together up to this size.")
    best_fit_buffer_rows: int = Field(1024, ge=1, description="best_fit: documents buffered, in rows' worth of tokens.")
    encode_batch_size: int = Field(512, ge=1, description="Documents per tokenizer call.")


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
class _PackTask:
    """One unit: consecutive input shards, packed into this unit's own output shards."""

    index: int
    shards: tuple[str, ...]
    documents: Manifest
    tokenizer: Manifest
    config: PackConfig
    writer: ArtifactWriter
    one_thread: bool    # several units at once on this machine: the processes are the parallelism


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


def _read_documents(store: ArtifactStore, documents: Manifest,
                    relpath: str) -> tuple[list[str], list[str | None], list[str | None]]:
    """ids, texts and splits (the `split` column, or all None where the shard has none)."""
    import pyarrow.parquet as pq

    where = store.uri(documents, relpath)
    try:
        with store.open(documents, relpath) as handle:
            shard = pq.ParquetFile(handle)
            names = shard.schema_arrow.names
            missing = [c for c in ("id", "text") if c not in names]
            if missing:
                raise InputError(f"{where}: not a document shard (no {' or '.join(missing)} column)")
            table = shard.read(columns=["id", "text", *(["split"] if "split" in names else [])])
    except (pa.ArrowException, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{where}: not a readable Parquet shard ({reason})") from None
    ids = table.column("id").to_pylist()
    if None in ids:
        raise InputError(f"{where}: a document without an id (row {ids.index(None)})")
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(ids)
    bad = next((i for i, s in enumerate(splits) if s is not None and s not in SPLITS), None)
    if bad is not None:
        raise InputError(f"{where}: row {bad} has split {splits[bad]!r}; expected 'train', 'val' or null")
    return [str(i) for i in ids], table.column("text").to_pylist(), splits


def encode_shard(store: ArtifactStore, task: _PackTask, relpath: str, tokenizer, bos: int) -> _Encoded:
    """One input shard's documents as token ids, each led by BOS, with its split."""
    ids, texts, splits = _read_documents(store, task.documents, relpath)
    batch_size = task.config.encode_batch_size
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    is_val: list[bool] = []
    for start in range(0, len(texts), batch_size):
        batch = [t or "" for t in texts[start:start + batch_size]]
        encoded = [e.ids for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
        keep = [i for i, doc in enumerate(encoded) if doc]  # an empty text is no document
        count = sum(len(encoded[i]) + 1 for i in keep)
        pieces.append(np.fromiter(itertools.chain.from_iterable(x for i in keep for x in ((bos,), encoded[i])),
                                  dtype=np.uint32, count=count))
        lengths.extend(len(encoded[i]) + 1 for i in keep)
        is_val.extend(splits[start + i] == "val" if splits[start + i] is not None
                      else is_validation(ids[start + i], task.config.val_fraction) for i in keep)
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
    """Rows of one split from one unit, written as `split/UUUUU-NNNN.parquet` shards of
    `rows_per_shard` rows (UUUUU: the unit, NNNN: its shard)."""

    def __init__(self, writer: ArtifactWriter, split: str, unit: int, row_len: int, dtype: np.dtype, pad: int,
                 rows_per_shard: int):
        self.writer, self.split, self.unit = writer, split, unit
        self.row_len, self.dtype, self.pad = row_len, dtype, pad
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
        relpath = f"{self.split}/{self.unit:05d}-{len(self.shards):04d}.parquet"
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


def _plan(config: PackConfig, documents: Manifest, tokenizer: Manifest, writer: ArtifactWriter) -> list[_PackTask]:
    """Units of consecutive input shards, about `unit_bytes` of Parquet each. The cut depends on
    the corpus and the settings alone, never on the executor or the number of workers, so the
    rows are the same wherever they were packed."""
    shards = document_shards(documents)
    groups: list[list[str]] = [[]]
    size = 0
    for shard in shards:
        if groups[-1] and size >= config.unit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(shard)
        size += documents.file(shard).bytes
    one_thread = config.executor == "ray" or (config.workers > 1 and len(groups) > 1)
    return [_PackTask(i, tuple(group), documents, tokenizer, config, writer, one_thread)
            for i, group in enumerate(groups)]


def _unit_name(index: int) -> str:
    return f"{UNITS_DIR}/{index:05d}.json"


def pack_unit(task: _PackTask) -> dict[str, Any]:
    """Encode and pack one unit's shards into its own output shards; its record, written last,
    marks it done (a resumed build skips it)."""
    writer, config = task.writer, task.config
    if writer.done(_unit_name(task.index)):
        with writer.fs.open(writer.path(_unit_name(task.index)), "rb") as handle:
            done = json.loads(handle.read())
        if all(writer.done(path) for path in done["shards"]):
            return {**done, "resumed": True}
    if task.one_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at each call
    store = writer.store
    tokenizer = _tokenizer_for(task.tokenizer, store)
    bos, pad = special_ids(tokenizer, store.uri(task.tokenizer, TOKENIZER_FILE))
    row_len = config.seq_len + 1
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    rows_per_shard = max(1, config.shard_target_bytes // (row_len * dtype.itemsize))
    packers = {split: ConcatPacker(row_len, pad) if config.policy == "concat"
               else BestFitPacker(row_len, bos, pad, config.best_fit_buffer_rows) for split in SPLITS}
    sinks = {split: ShardSink(writer, split, task.index, row_len, dtype, pad, rows_per_shard) for split in SPLITS}
    documents_in, docs, tokens_in = 0, dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    for relpath in task.shards:
        part = encode_shard(store, task, relpath, tokenizer, bos)
        documents_in += part.documents_in
        token_is_val = np.repeat(part.is_val, part.lengths)
        for split, in_split in (("train", ~part.is_val), ("val", part.is_val)):
            lengths = part.lengths[in_split]
            tokens = part.tokens[token_is_val == (split == "val")]
            docs[split] += len(lengths)
            tokens_in[split] += len(tokens)
            sinks[split].add(packers[split].add(tokens, lengths))
    for split in SPLITS:
        sinks[split].add(packers[split].finish())
        sinks[split].finish()
    done = {"documents_in": documents_in, "documents": docs, "tokens_in": tokens_in,
            "bos_inserted": sum(p.bos_inserted for p in packers.values()),
            "shards": {path: info for sink in sinks.values() for path, info in sink.shards.items()}}
    writer.write_json(_unit_name(task.index), done)
    return {**done, "resumed": False}


def build_pack(config: PackConfig, inputs: list[Manifest], store: ArtifactStore,
               writer: ArtifactWriter) -> dict[str, Any]:
    started = time.perf_counter()
    documents, tokenizer, vocab_size, bos, pad = _check_inputs(inputs, store)
    row_len = config.seq_len + 1
    dtype = token_dtype(vocab_size)
    tasks = _plan(config, documents, tokenizer, writer)
    rows_known = [documents.file(s).rows for s in document_shards(documents)]
    total = sum(rows_known) if None not in rows_known else None
    units = []
    with executor_for(config, store) as executor, Progress("pack", total, unit="docs", units=len(tasks)) as bar:
        for task, (unit, node) in zip(tasks, executor.map(pack_unit, tasks)):
            units.append(unit)
            for path, info in unit["shards"].items():
                writer.record_rows(path, info["rows"])
            bar.unit_done(node, unit["documents_in"], f"unit {task.index} ({len(task.shards)} shards)")

    shards = {path: info for unit in units for path, info in sorted(unit["shards"].items())}
    rows = {split: sum(i["rows"] for p, i in shards.items() if p.startswith(f"{split}/")) for split in SPLITS}
    tokens = {split: sum(i["tokens"] for p, i in shards.items() if p.startswith(f"{split}/")) for split in SPLITS}
    docs = {split: sum(u["documents"][split] for u in units) for split in SPLITS}
    tokens_in = {split: sum(u["tokens_in"][split] for u in units) for split in SPLITS}
    documents_in = sum(u["documents_in"] for u in units)
    bos_inserted = sum(u["bos_inserted"] for u in units)
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
        "units": len(tasks),
        "units_resumed": sum(u["resumed"] for u in units),
        "bos_inserted": bos_inserted,
        "tokens_cropped": cropped,
        "tokens_cropped_fraction": round(cropped / total_in, 6) if total_in else 0.0,
        "padding_tokens": padding,
        "padding_fraction": round(padding / slots, 6) if slots else 0.0,
        "tokens_per_second": round(total_in / seconds) if seconds > 0 else None,
        **executor.stats(),
    }


# 3: packed in units of consecutive shards (`unit_bytes`), `split/UUUUU-NNNN.parquet`
STAGE = Stage("pack", PackConfig, build_pack, code_version="3")
