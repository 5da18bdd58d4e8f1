"""The tokenizer stage: a byte-level BPE (Hugging Face `tokenizers`) trained on the deduplicated corpus.

Input: one document artifact (dedup, or clean: Parquet shards with a `text` column). Output:
`tokenizer.json` (the `tokenizers` format), `tokenizer_config.json` (special tokens and the chat
template) and `special_tokens_map.json`, so the directory loads with
`AutoTokenizer.from_pretrained` as well as with `tokenizers.Tokenizer.from_file`.

Text is split with GPT-4's (cl100k_base) pattern, then mapped to the 256 byte symbols of GPT-2's
byte-level alphabet, all of which are in the vocabulary: any string encodes, and decodes back to
itself. The special tokens (document boundary, padding, chat roles) take ids 0..5.

Two passes over the corpus, both streamed one record batch at a time: the document keys (ids),
to choose the held-out documents, then the text, fed to the trainer. Held-out documents are
never trained on; they are spilled to a scratch file and encoded afterwards for
`bytes_per_token`. Memory is one batch of text plus the trainer's word counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.common import ConfigError, InputError, Progress, Stage, StageConfig, document_shards
from pipelines.executor import default_workers
from storage import ArtifactStore, ArtifactWriter, Manifest

# ------------------------------------------------------------------ the vocabulary's fixed part

BOS = "<|bos|>"              # document boundary: prepended to every document when packing
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [BOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]  # ids 0..5, in this order
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) + 1  # at least one merge

# cl100k_base's split: contractions, letters (with one leading non-letter), numbers in groups of
# 1-3 digits, punctuation runs (with one leading space), newlines, other whitespace. This is the
# form without possessive quantifiers: tokenizers' regex engine (Oniguruma) reads tiktoken's
# `\p{N}{1,3}+` as "one or more groups of 1-3 digits", which would not split long numbers.
GPT4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# `<|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>`: a conversation is a
# document, led by BOS as in training; render_chat() is the same in Python. Written on one
# logical line so that no template whitespace reaches the output.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set role_tokens = {"
    + ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items())
    + "} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in role_tokens -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    f"{{{{- role_tokens[message['role']] + message['content'] + '{END_OF_TURN}' -}}}}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT}' -}}}}{{%- endif -%}}"
)


class TokenizerConfig(StageConfig):
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers", "batch_size"})

    vocab_size: int = Field(8192, description="Tokens in the vocabulary: 256 bytes + 6 special tokens + merges.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")
    held_out_fraction: float = Field(
        0.01, ge=0, lt=1, description="Documents kept out of training (by a hash of their id) to measure bytes/token.",
    )
    min_held_out_documents: int = Field(
        8, ge=0, description="Hold out at least this many documents (at most half the corpus), whatever the fraction.",
    )
    max_train_documents: int | None = Field(None, ge=1, description="Train on at most this many documents.")
    max_train_bytes: int | None = Field(None, ge=1, description="Train on at most this many bytes of UTF-8 text.")
    batch_size: int = Field(256, ge=1, description="Documents per record batch read from the shards (runtime only).")
    workers: int = Field(default_factory=default_workers, ge=1,
                         description="Trainer threads (runtime only; RAYON_NUM_THREADS if the pool has not started).")

    @field_validator("vocab_size")
    @classmethod
    def _room_for_merges(cls, value: int) -> int:
        if value < MIN_VOCAB_SIZE:
            raise ValueError(f"must be at least {MIN_VOCAB_SIZE} ({BYTE_ALPHABET_SIZE} bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens + 1 merge), got {value}")
        return value


# ------------------------------------------------------------------ the tokenizer itself


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with GPT-4's pre-tokenization (no normalizer: lossless)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def new_trainer(vocab_size: int, min_frequency: int) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """`{"<|bos|>": 0, ...}` for every special token; raises if the tokenizer lacks one."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise InputError(f"tokenizer: no special token {', '.join(missing)} in the vocabulary")
    return ids  # type: ignore[return-value]


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of documents as plain text: a document that contains the string `<|end|>`
    gets the tokens of those characters, never the special token (which only markup code
    such as the packer's BOS or the chat template may produce)."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = previous


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template in Python: `<|bos|><|user|>hi<|end|><|assistant|>hello<|end|>`."""
    parts = [BOS]
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role: {role!r} (expected one of {', '.join(ROLE_TOKENS)})")
        if not isinstance(content, str):
            raise ValueError(f"chat message content must be a string, got {type(content).__name__}")
        parts.append(ROLE_TOKENS[role] + content + END_OF_TURN)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def load_tokenizer(store: ArtifactStore, manifest: Manifest) -> Tokenizer:
    """The trained tokenizer of a tokenizer artifact."""
    if manifest.stage != "tokenizer" or not any(f.path == TOKENIZER_FILE for f in manifest.files):
        raise InputError(f"{manifest.stage}/{manifest.short}: not a tokenizer artifact (no {TOKENIZER_FILE})")
    with store.open(manifest, TOKENIZER_FILE) as handle:
        return Tokenizer.from_str(handle.read().decode())


def transformers_files() -> dict[str, dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json` beside `tokenizer.json`: what
    `AutoTokenizer.from_pretrained(dir)` reads (the long-standing keys, not only transformers 5's)."""
    special = {
        "bos_token": BOS,
        "eos_token": BOS,  # the document boundary ends a document as well as starting the next
        "pad_token": PAD,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN],
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,  # the packer and the chat code place BOS themselves
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the text as it was
        "chat_template": CHAT_TEMPLATE,
    }
    return {TOKENIZER_CONFIG_FILE: config, SPECIAL_TOKENS_MAP_FILE: special}


# ------------------------------------------------------------------ reading the corpus

_HASH_RANGE = 1 << 64


def _key_hashes(keys: list[Any]) -> np.ndarray:
    """A stable 64-bit hash per document key (blake2b: the same on every machine and run)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str("" if k is None else k).encode(), digest_size=8).digest(), "big")
         for k in keys),
        dtype=np.uint64, count=len(keys),
    )


@dataclass
class _Corpus:
    """The document shards of one artifact, read one record batch at a time."""

    store: ArtifactStore
    manifest: Manifest
    shards: list[str]
    batch_size: int
    key: str = "id"  # what the held-out choice hashes: the stable id, else the text

    @property
    def name(self) -> str:
        return f"{self.manifest.stage}/{self.manifest.short}"

    @property
    def rows(self) -> int | None:
        counts = [self.manifest.file(s).rows for s in self.shards]
        known = [c for c in counts if c is not None]
        return sum(known) if len(known) == len(counts) else None

    @contextlib.contextmanager
    def _open(self, shard: str) -> Iterator[pq.ParquetFile]:
        with self.store.open(self.manifest, shard) as handle:
            try:
                parquet = pq.ParquetFile(handle)
            except (pa.ArrowException, OSError) as err:
                raise InputError(f"{self.name}: {shard}: not readable as Parquet ({_first_line(err)})") from None
            yield parquet

    def check_schema(self) -> None:
        """Every shard has a string `text` column; `id` is the key when every shard has one."""
        keys = []
        for shard in self.shards:
            with self._open(shard) as parquet:
                schema = parquet.schema_arrow
            if "text" not in schema.names:
                raise InputError(f"{self.name}: {shard} has no 'text' column (columns: {', '.join(schema.names)})")
            kind = schema.field("text").type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
                raise InputError(f"{self.name}: {shard}: column 'text' is {kind}, not text")
            keys.append("id" in schema.names)
        self.key = "id" if all(keys) else "text"

    def batches(self, columns: list[str]) -> Iterator[tuple[str, pa.RecordBatch]]:
        for shard in self.shards:
            with self._open(shard) as parquet:
                try:
                    for batch in parquet.iter_batches(batch_size=self.batch_size, columns=columns):
                        yield shard, batch
                except pa.ArrowException as err:
                    raise InputError(f"{self.name}: {shard}: unreadable ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _held_out_cutoff(corpus: _Corpus, config: TokenizerConfig) -> tuple[int, int, int]:
    """(cutoff, documents, about how many are held out): held out means key hash <= cutoff.

    The fraction alone gives `fraction * n` documents on average; the cutoff is raised to the
    k-th smallest hash when that would be fewer than `min_held_out_documents`."""
    documents, below = 0, 0
    threshold = int(config.held_out_fraction * _HASH_RANGE)
    smallest = np.empty(0, dtype=np.uint64)
    with Progress("tokenizer: document keys", corpus.rows, "docs") as bar:
        for _, batch in corpus.batches([corpus.key]):
            hashes = _key_hashes(batch.column(0).to_pylist())
            documents += len(hashes)
            below += int(np.count_nonzero(hashes < np.uint64(threshold))) if threshold else 0
            if config.min_held_out_documents:
                smallest = np.sort(np.concatenate([smallest, hashes]))[:config.min_held_out_documents]
            bar.advance(len(hashes))
    cutoff = threshold - 1
    wanted = min(config.min_held_out_documents, documents // 2)
    if below < wanted:
        cutoff = max(cutoff, int(smallest[wanted - 1]))
    return cutoff, documents, max(below, wanted)


@dataclass
class _Counts:
    documents_in: int = 0
    train_documents: int = 0
    train_bytes: int = 0
    held_out_documents: int = 0
    held_out_bytes: int = 0


def _utf8_sizes(array: pa.Array) -> list[int]:
    """Bytes of UTF-8 in each string, read off the offsets buffer (no copy of the text)."""
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=width)[array.offset:array.offset + len(array) + 1]
    return np.diff(offsets).tolist()


def _training_texts(corpus: _Corpus, config: TokenizerConfig, cutoff: int, spill: BinaryIO,
                    counts: _Counts, bar: Progress) -> Iterator[str]:
    """The training documents; held-out ones go to `spill` (length-prefixed UTF-8) instead.

    One document at a time, not lists: the trainer reads 256 items ahead, so lists of
    documents would have it copy 256 lists (a whole small corpus) before counting."""
    columns = ["text"] if corpus.key == "text" else ["text", corpus.key]
    max_docs = config.max_train_documents or float("inf")
    max_bytes = config.max_train_bytes or float("inf")
    for _, batch in corpus.batches(columns):
        text_column = batch.column(0)
        if pa.types.is_null(text_column.type):  # a shard whose texts are all null (or that has no rows)
            text_column = text_column.cast(pa.string())
        texts = text_column.to_pylist()
        keys = texts if corpus.key == "text" else batch.column(1).to_pylist()
        held = (_key_hashes(keys) <= np.uint64(cutoff)).tolist() if cutoff >= 0 else [False] * len(texts)
        for read, (text, size, is_held) in enumerate(zip(texts, _utf8_sizes(text_column), held)):
            size = size if text is not None else 0
            if is_held:
                data = (text or "").encode()
                spill.write(struct.pack("<Q", len(data)) + data)
                counts.held_out_documents += 1
                counts.held_out_bytes += size
            elif counts.train_documents >= max_docs or counts.train_bytes + size > max_bytes:
                bar.advance(read)
                return  # a cap is reached: the rest of the corpus is not read
            else:
                counts.train_documents += 1
                counts.train_bytes += size
                yield text or ""
            counts.documents_in += 1
        bar.advance(len(texts))


def _spilled_texts(spill: BinaryIO, batch_size: int) -> Iterator[list[str]]:
    spill.seek(0)
    batch = []
    while header := spill.read(8):
        (size,) = struct.unpack("<Q", header)
        batch.append(spill.read(size).decode())
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _threads(workers: int) -> Iterator[None]:
    """Limit the trainer's threads. RAYON_NUM_THREADS only counts before the process first uses
    tokenizers' thread pool; TOKENIZERS_PARALLELISM is read at every call, so workers=1 is exact."""
    saved = {name: os.environ.get(name) for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    if saved["RAYON_NUM_THREADS"] is None:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    if workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _arrow_memory_pool() -> Iterator[None]:
    """Read Parquet through jemalloc rather than pyarrow's default mimalloc, where available.

    The trainer's threads pull documents, so record batches are decoded and freed on several
    threads, and mimalloc's per-thread heaps then keep tens of MB resident for the whole
    training (measured: ~45 MB more peak RSS on a 40 MB corpus, see bench/tokenizer.py).
    Buffers remember their pool, so restoring the default afterwards is safe."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


# ------------------------------------------------------------------ the stage


def build_tokenizer(config: TokenizerConfig, inputs: list[Manifest], store: ArtifactStore,
                    writer: ArtifactWriter) -> dict[str, Any]:
    if config.vocab_size < MIN_VOCAB_SIZE:  # a config made with model_construct() skips the validator
        raise ConfigError(f"tokenizer.vocab_size: must be at least {MIN_VOCAB_SIZE}, got {config.vocab_size}")
    if len(inputs) != 1:
        raise InputError(f"tokenizer: needs one document artifact as input, got {len(inputs)}")
    documents = inputs[0]
    shards = document_shards(documents)
    if not shards:
        raise InputError(f"{documents.stage}/{documents.short}: not a document artifact (no shards/*.parquet)")
    corpus = _Corpus(store, documents, shards, config.batch_size)
    tokenizer = new_tokenizer()
    counts = _Counts()
    with (_arrow_memory_pool(), _threads(config.workers),
          tempfile.TemporaryFile(prefix="kiln-tokenizer-held-out-") as spill):
        corpus.check_schema()
        cutoff, total, held_expected = _held_out_cutoff(corpus, config)
        if total == 0:
            raise InputError(f"{corpus.name}: the corpus is empty (0 documents in {len(shards)} shards)")
        with Progress("tokenizer: training", total, "docs") as bar:
            texts = _training_texts(corpus, config, cutoff, spill, counts, bar)
            expected = min(total - held_expected, config.max_train_documents or total)
            tokenizer.train_from_iterator(texts, new_trainer(config.vocab_size, config.min_frequency), length=expected)
        if counts.train_bytes == 0:
            raise InputError(f"{corpus.name}: no text to train on ({counts.train_documents} training documents, "
                             f"all empty, or max_train_bytes is below the first document's size)")
        held_out_tokens = sum(len(ids) for batch in _spilled_texts(spill, config.batch_size)
                              for ids in encode_documents(tokenizer, batch))

    writer.write_bytes(TOKENIZER_FILE, tokenizer.to_str(pretty=True).encode())
    for name, value in transformers_files().items():
        writer.write_json(name, value)
    return {
        "documents_in": counts.documents_in,
        "train_documents": counts.train_documents,
        "train_bytes": counts.train_bytes,
        "held_out_documents": counts.held_out_documents,
        "held_out_bytes": counts.held_out_bytes,
        "held_out_tokens": held_out_tokens,
        "bytes_per_token": round(counts.held_out_bytes / held_out_tokens, 4) if held_out_tokens else None,
        "vocab_size": tokenizer.get_vocab_size(),
    }


STAGE = Stage("tokenizer", TokenizerConfig, build_tokenizer, code_version="2")  # 2: BOS leads chats
