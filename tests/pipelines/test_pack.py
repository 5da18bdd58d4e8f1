"""The pack stage on real text: every token kept, BOS-aligned rows, disjoint splits, readable shards."""

import functools
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.common import InputError, shard_name
from pipelines.pack import STAGE, PackConfig, is_validation
from pipelines.tokenizer import BOS, SPECIAL_TOKENS, load_tokenizer, new_tokenizer, new_trainer
from storage import ArtifactStore, Manifest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")


# ------------------------------------------------------------------ real documents


def shakespeare_scenes(median_chars: int = 3000, seed: int = 0) -> list[str]:
    """Consecutive speeches grouped into documents of web-page-like lengths (log-normal: median
    3,000 characters, one in ten over 10,000)."""
    speeches = (DATA / "text" / "tinyshakespeare_input.txt").read_text().split("\n\n")
    rng, docs, i = random.Random(seed), [], 0
    while i < len(speeches):
        target, j, size = rng.lognormvariate(0, 1.0) * median_chars, i, 0
        while j < len(speeches) and size < target:
            size, j = size + len(speeches[j]), j + 1
        docs.append("\n\n".join(speeches[i:j]))
        i = j
    return docs


def articles() -> list[str]:
    truth = json.loads((DATA / "html_extraction" / "scrapinghub_aeb" / "ground-truth.json").read_text())
    return [truth[key]["articleBody"] for key in sorted(truth)]


@functools.cache
def real_documents() -> tuple[tuple[str, str], ...]:
    """(id, text): Shakespeare scenes, news articles, and Python's reference-manual topics."""
    texts = shakespeare_scenes() + articles() + [topics[k] for k in sorted(topics)]
    return tuple((f"doc-{i:05d}", text) for i, text in enumerate(texts))


@functools.cache
def tokenizer_json(vocab_size: int = 4096) -> str:
    """The tokenizer stage's byte-level BPE (BOS id 0, PAD id 1), trained on the real documents."""
    tokenizer = new_tokenizer()
    tokenizer.train_from_iterator([text for _, text in real_documents()], new_trainer(vocab_size, 2))
    return tokenizer.to_str()


def tokenizer_artifact(store: ArtifactStore, text: str | None = None) -> Manifest:
    text = text or tokenizer_json()

    def build(writer):
        writer.write_bytes("tokenizer.json", text.encode())
        return {}

    return store.produce("tokenizer", hashlib.sha256(text.encode()).hexdigest(), build,
                         config={}, inputs=[], code_version="test")


def document_artifact(store: ArtifactStore, shards: list[list[tuple[str, str]]], tag: str) -> Manifest:
    def build(writer):
        for i, docs in enumerate(shards):
            ids = [doc_id for doc_id, _ in docs]
            writer.write_parquet(shard_name(i), pa.table({"id": ids, "url": [f"https://example.org/{d}" for d in ids],
                                                          "text": [text for _, text in docs]}))
        return {}

    return store.produce("dedup", tag.ljust(64, "0"), build, config={}, inputs=[], code_version="test")


def in_shards(docs, count: int) -> list[list]:
    return [list(docs[i::count]) for i in range(count)]


@functools.cache
def encoded(text_json: str | None = None) -> dict[str, list[int]]:
    """What the stage should put in rows for each document: BOS, then its tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(text_json or tokenizer_json())
    tokenizer.encode_special_tokens = True
    ids, texts = zip(*real_documents())
    tokens = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    bos = tokenizer.token_to_id(BOS)
    return {doc_id: [bos] + e.ids for doc_id, e in zip(ids, tokens)}


def rows_of(store: ArtifactStore, manifest: Manifest, split: str) -> np.ndarray:
    paths = sorted(f.path for f in manifest.files_under(split))
    tables = [pq.read_table(store.local_path(manifest, p)) for p in paths]
    if not tables:
        return np.zeros((0, manifest.stats["row_tokens"]), np.int64)
    return np.concatenate([t.column("tokens").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
                           for t in tables]).astype(np.int64)


def segments(rows: np.ndarray, bos: int, pad: int) -> list[tuple[int, ...]]:
    """The pieces of documents in best-fit rows: each starts at a BOS; padding only ends a row."""
    found = []
    for row in rows:
        real = row[row != pad]
        assert (row[len(real):] == pad).all(), "padding sits at the end of a row"
        starts = np.flatnonzero(real == bos).tolist() + [len(real)]
        found += [tuple(real[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    return found


def expected_pieces(doc: list[int], row_len: int, bos: int) -> list[tuple[int, ...]]:
    """How the spec splits a document longer than a row: a full row, then rows led by a new BOS."""
    if len(doc) <= row_len:
        return [tuple(doc)]
    pieces, rest = [tuple(doc[:row_len])], doc[row_len:]
    while rest:
        pieces.append((bos, *rest[:row_len - 1]))
        rest = rest[row_len - 1:]
    return pieces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    store = ArtifactStore(tmp_path_factory.mktemp("pack"))
    docs = real_documents()
    return {
        "store": store,
        "tokenizer": tokenizer_artifact(store),
        "small": document_artifact(store, in_shards(docs[:: 4], 3), "small"),   # ~120 documents
        "all": document_artifact(store, in_shards(docs, 4), "all"),
    }


def run(corpus, which: str = "small", **settings) -> Manifest:
    settings.setdefault("workers", 1)
    return STAGE.run(PackConfig(**settings), [corpus[which], corpus["tokenizer"]], corpus["store"])


# ------------------------------------------------------------------ tests


@needs_data
def test_concat_keeps_every_token_in_order(corpus):
    manifest = run(corpus, policy="concat", seq_len=63, val_fraction=0.2)
    stats, expected = manifest.stats, encoded()
    ids = [doc_id for doc_id, _ in real_documents()[:: 4]]
    order = [doc_id for shard in in_shards(ids, 3) for doc_id in shard]  # corpus order: shard by shard
    for split in ("train", "val"):
        docs = [d for d in order if is_validation(d, 0.2) == (split == "val")]
        stream = [t for d in docs for t in expected[d]]
        rows = rows_of(corpus["store"], manifest, split)
        packed = rows.reshape(-1)[: len(stream)]
        assert packed.tolist() == stream, f"{split}: the rows are the document stream, cut"
        assert (rows.reshape(-1)[len(stream):] == stats["pad_id"]).all(), "only the last row is padded"
        assert stats["documents"][split] == len(docs) and stats["tokens"][split] == len(stream)
    assert stats["tokens_cropped_fraction"] == 0.0
    assert stats["padding_tokens"] < 2 * 64, "at most the last row of each split is padded"


@needs_data
def test_best_fit_rows_start_at_a_document_and_lose_nothing(corpus):
    manifest = run(corpus, policy="best_fit", seq_len=127, val_fraction=0.2, best_fit_buffer_rows=16)
    stats, expected = manifest.stats, encoded()
    bos, pad = stats["bos_id"], stats["pad_id"]
    for split in ("train", "val"):
        rows = rows_of(corpus["store"], manifest, split)
        assert (rows[:, 0] == bos).all(), "every row starts with BOS"
        docs = [d for d, _ in real_documents()[:: 4] if is_validation(d, 0.2) == (split == "val")]
        want = Counter(p for d in docs for p in expected_pieces(expected[d], 128, bos))
        assert Counter(segments(rows, bos, pad)) == want, f"{split}: every document, whole or in row-sized pieces"
    assert stats["tokens_cropped"] == 0 and stats["bos_inserted"] > 0
    assert stats["documents_out"] == stats["documents_in"] == len(real_documents()[:: 4])


@needs_data
@pytest.mark.parametrize("seq_len", [2048, 256])
def test_best_fit_keeps_95_percent_of_real_tokens(corpus, seq_len):
    manifest = run(corpus, "all", seq_len=seq_len)
    stats, expected = manifest.stats, encoded()
    rows = np.concatenate([rows_of(corpus["store"], manifest, s) for s in ("train", "val")])
    content = int(np.count_nonzero((rows != stats["pad_id"]) & (rows != stats["bos_id"])))
    total = sum(len(doc) - 1 for doc in expected.values())
    kept = content / total  # measured from the rows, not taken from the stats
    print(f"best_fit seq_len {seq_len}: {len(expected)} documents, {total} tokens, kept {kept:.4%}, "
          f"padding {stats['padding_fraction']:.4%}, cropped {stats['tokens_cropped_fraction']:.4%}")
    assert kept >= 0.95
    assert kept == 1.0 and stats["tokens_cropped_fraction"] == 0.0
    assert stats["padding_fraction"] < 0.02
    assert (rows[:, 0] == stats["bos_id"]).all()


@needs_data
def test_no_document_is_in_both_splits(corpus):
    manifest = run(corpus, seq_len=2048, val_fraction=0.2)
    stats = manifest.stats
    by_split = {s: set(segments(rows_of(corpus["store"], manifest, s), stats["bos_id"], stats["pad_id"]))
                for s in ("train", "val")}
    assert not by_split["train"] & by_split["val"]
    expected = encoded()
    for doc_id, _ in real_documents()[:: 4]:
        doc = tuple(expected[doc_id])
        if len(doc) <= 2049:
            split = "val" if is_validation(doc_id, 0.2) else "train"
            assert doc in by_split[split], f"{doc_id} is whole in {split}"
    assert 0.1 < stats["documents"]["val"] / stats["documents_out"] < 0.3


@needs_data
def test_shards_read_with_pyarrow_duckdb_and_datasets(corpus, tmp_path):
    import datasets
    import duckdb

    manifest = run(corpus, seq_len=64, shard_target_bytes=40_000)
    root = corpus["store"].local_path(manifest)
    train = sorted(f.path for f in manifest.files_under("train"))
    assert len(train) > 2 and train[0] == "train/00000-0000.parquet"
    shards = [f for f in manifest.files if f.path.endswith(".parquet")]
    assert all(f.rows == manifest.stats["shards"][f.path]["rows"] for f in shards)
    schema = pq.read_schema(root / train[0])
    assert schema.field("tokens").type == pa.list_(pa.uint16(), 65)
    assert pq.ParquetFile(root / train[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    rows = manifest.stats["rows_per_split"]["train"]
    assert duckdb.sql(f"select count(*) from '{root}/train/*.parquet'").fetchall()[0][0] == rows
    assert duckdb.sql(f"select len(tokens) from '{root}/val/*.parquet' limit 1").fetchall()[0][0] == 65
    loaded = datasets.load_dataset("parquet", data_files=str(root / "train" / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == rows
    assert loaded[0]["tokens"] == rows_of(corpus["store"], manifest, "train")[0].tolist()


@needs_data
def test_token_dtype_follows_the_vocabulary(corpus):
    """uint16 while ids fit (the other tests), int32 past 65,536 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    vocab.update({f"unused{i}": len(vocab) + i for i in range(70_000)})
    big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.add_special_tokens(SPECIAL_TOKENS)
    store = corpus["store"]
    docs = document_artifact(store, [list(real_documents()[:5])], "five")
    manifest = STAGE.run(PackConfig(seq_len=64, workers=1), [docs, tokenizer_artifact(store, big.to_str())], store)
    assert manifest.stats["dtype"] == "int32" and manifest.stats["vocab_size"] > 70_000
    path = store.local_path(manifest, manifest.files_under("train")[0].path)
    assert pq.read_schema(path).field("tokens").type == pa.list_(pa.int32(), 65)
    assert manifest.stats["bos_id"] == big.token_to_id(BOS) > 65_536
    assert run(corpus, seq_len=64).stats["dtype"] == "uint16"


@needs_data
def test_output_does_not_depend_on_the_number_of_workers(corpus, tmp_path):
    one = run(corpus, seq_len=64, shard_target_bytes=40_000)
    store = ArtifactStore(tmp_path)  # a second store, or the cache would answer
    inputs = [document_artifact(store, in_shards(real_documents()[:: 4], 3), "small"), tokenizer_artifact(store)]
    two = STAGE.run(PackConfig(seq_len=64, shard_target_bytes=40_000, workers=4), inputs, store)  # 2 parts a shard
    assert two.fingerprint == one.fingerprint
    assert [(f.path, f.sha256) for f in two.files] == [(f.path, f.sha256) for f in one.files]
    assert two.stats["tokens"] == one.stats["tokens"]


@needs_data
def test_special_token_text_is_text(corpus):
    store = corpus["store"]
    texts = [("a", "Ends with <|bos|> and <|pad|> in prose."), ("b", ""), ("c", "x")]
    docs = document_artifact(store, [texts], "special")
    manifest = STAGE.run(PackConfig(policy="concat", seq_len=32, val_fraction=0, workers=1),
                         [docs, corpus["tokenizer"]], store)
    rows = rows_of(store, manifest, "train")
    assert np.count_nonzero(rows == manifest.stats["bos_id"]) == 2, "one BOS per (non-empty) document"
    assert manifest.stats["documents_empty"] == 1 and manifest.stats["documents_out"] == 2
    tokenizer = load_tokenizer(store, corpus["tokenizer"])
    assert tokenizer.decode(rows[0].tolist(), skip_special_tokens=True).startswith("Ends with <|bos|> and <|pad|>")


@needs_data
def test_bad_inputs_are_one_line_input_errors(corpus):
    store, tokenizer, docs = corpus["store"], corpus["tokenizer"], corpus["small"]
    with pytest.raises(InputError, match=r"tokenizer/\w+: not a document artifact \(no shards/\*\.parquet\)"):
        STAGE.run(PackConfig(workers=1), [tokenizer, tokenizer], store)
    with pytest.raises(InputError, match=r"dedup/\w+: not a tokenizer artifact \(no tokenizer.json\)"):
        STAGE.run(PackConfig(workers=1), [docs, docs], store)
    with pytest.raises(InputError, match="takes a document artifact and a tokenizer artifact"):
        STAGE.run(PackConfig(workers=1), [docs], store)

    broken = document_artifact(store, in_shards(real_documents()[:30], 3), "broken")
    path = store.local_path(broken, shard_name(1))
    path.write_bytes(b"\0" * path.stat().st_size)  # same size: only reading it finds out
    config = PackConfig(seq_len=16, workers=2, shard_target_bytes=1000)
    with pytest.raises(InputError) as err:
        STAGE.run(config, [broken, tokenizer], store)
    message = str(err.value)
    assert "\n" not in message and f"{broken.short}" in message and "shards/00001.parquet" in message
    assert "not a readable Parquet shard" in message
    fp = STAGE.fingerprint(config, [broken, tokenizer])
    assert store.get("pack", fp) is None and not Path(store.artifact_dir("pack", fp)).exists()
    staged = Path(store.stage_dir("pack"), f".staging-{fp}")
    assert not any(".tmp-" in p.name for p in staged.rglob("*")), "only whole files in the staging directory"

    no_text = store.produce("dedup", "notext".ljust(64, "0"),
                            lambda w: w.write_parquet(shard_name(0), pa.table({"id": ["x"], "html": ["<p>"]})) or {},
                            config={}, inputs=[], code_version="test")
    with pytest.raises(InputError, match=r"shards/00000.parquet: not a document shard \(no text column\)"):
        STAGE.run(PackConfig(workers=1), [no_text, tokenizer], store)
    bad_json = tokenizer_artifact(store, "{not json")
    with pytest.raises(InputError, match=r"tokenizer.json: not a tokenizers file"):
        STAGE.run(PackConfig(workers=1), [docs, bad_json], store)


@needs_data
def test_a_split_column_decides_the_split(corpus):
    """A fixed validation set: "train"/"val" in a `split` column win over the id hash; null keeps the hash."""
    store, docs = corpus["store"], real_documents()[:: 4][:40]
    # against the hash: at val_fraction 0.2 most of these would be train, and the rest val
    wanted = {doc_id: ("train" if is_validation(doc_id, 0.2) else "val") if i % 4 else None
              for i, (doc_id, _) in enumerate(docs)}

    def build(writer):
        writer.write_parquet(shard_name(0), pa.table({"id": [d for d, _ in docs], "text": [t for _, t in docs],
                                                      "split": [wanted[d] for d, _ in docs]}))
        return {}

    with_split = store.produce("dedup", "split".ljust(64, "0"), build, config={}, inputs=[], code_version="test")
    manifest = STAGE.run(PackConfig(policy="best_fit", seq_len=2048, val_fraction=0.2, workers=1),
                         [with_split, corpus["tokenizer"]], store)
    stats, expected = manifest.stats, encoded()
    by_split = {s: Counter(segments(rows_of(store, manifest, s), stats["bos_id"], stats["pad_id"]))
                for s in ("train", "val")}
    for doc_id, _ in docs:
        split = wanted[doc_id] or ("val" if is_validation(doc_id, 0.2) else "train")
        pieces = expected_pieces(expected[doc_id], 2049, stats["bos_id"])
        assert all(by_split[split][p] for p in pieces), f"{doc_id} is in {split}"
    named_val = sum(s == "val" for s in wanted.values())
    hashed_val = sum(s is None and is_validation(d, 0.2) for d, s in wanted.items())
    assert stats["documents"]["val"] == named_val + hashed_val
    assert stats["documents"]["train"] == len(docs) - named_val - hashed_val

    def bad(writer):
        table = pa.table({"id": ["a", "b"], "text": ["x", "y"], "split": ["val", "test"]})
        writer.write_parquet(shard_name(0), table)
        return {}

    odd = store.produce("dedup", "badsplit".ljust(64, "0"), bad, config={}, inputs=[], code_version="test")
    with pytest.raises(InputError, match=r"00000.parquet: row 1 has split 'test'; expected 'train', 'val' or null"):
        STAGE.run(PackConfig(workers=1), [odd, corpus["tokenizer"]], store)
