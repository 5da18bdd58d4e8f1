"""The tokenizer stage on real text: lossless round trips, GPT-4 splitting, transformers parity,
the chat template, determinism, stats and bad inputs."""

import json
import random
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pytest
from pydantic import ValidationError
from tokenizers import decoders, pre_tokenizers

from pipelines.common import ConfigError, InputError, shard_name
from pipelines.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END_OF_TURN,
    PAD,
    SPECIAL_TOKENS,
    STAGE,
    SYSTEM,
    TOKENIZER_FILE,
    USER,
    TokenizerConfig,
    encode_documents,
    load_tokenizer,
    new_tokenizer,
    render_chat,
    special_token_ids,
)
from storage import ArtifactStore

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHAKESPEARE = DATA / "text" / "tinyshakespeare_input.txt"
INSTRUCT = sorted((DATA / "instruct").glob("*.json")) if (DATA / "instruct").is_dir() else []
ARTICLES = DATA / "html_extraction" / "scrapinghub_aeb" / "ground-truth.json"


# ------------------------------------------------------------------ real text


def shakespeare_chunks(size: int = 2000) -> list[str]:
    if not SHAKESPEARE.is_file():
        return []
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [text[i:i + size] for i in range(0, len(text), size)]


def instruct_fields() -> list[str]:
    """Every string field of every instruction and preference entry."""
    return [value for path in INSTRUCT for entry in json.loads(path.read_text(encoding="utf-8"))
            for value in entry.values() if isinstance(value, str)]


def article_bodies() -> list[str]:
    if not ARTICLES.is_file():
        return []
    return [page["articleBody"] for page in json.loads(ARTICLES.read_text(encoding="utf-8")).values()]


def topic_texts() -> list[str]:
    return [topics[key] for key in sorted(topics)]


def real_documents() -> list[str]:
    return shakespeare_chunks() + instruct_fields() + article_bodies() + topic_texts()


HAND_WRITTEN = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "漢字とかなカナ混じりの日本語。中文句子，还有标点！한국어 문장도 있습니다.",
    "emoji 😀🎉 flags 🇫🇷🇯🇵 skin tones 👍🏽 ZWJ families 👨‍👩‍👧‍👦 👩🏻‍💻 🏳️‍🌈",
    "control \x00 nul, \x1b[31mANSI escape\x1b[0m, \x07 bell, \x7f del",
    "windows\r\nline\r\nendings\r\n\r\n\ttabs\tand\x0bvertical\x0cfeed\rlone CR",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0307\u0336\u035f",
    "noncharacters \ufffe\uffff and replacement \ufffd, BOM \ufeff, private use \ue000, astral \U0010fffd",
    "zero-width \u200b\u200c\u200d joiners and bidi \u202eoverride\u202c",
    "\u0301starts with a combining mark, \u200dlone ZWJ, lone \ufe0f selector, half a flag \U0001f1eb, "
    "escaped surrogates \\ud83d\\ude00 as text, tag chars \U000e0067\U000e007f",
    "digits " + "1234567890" * 50,
    "٣١٤١٥٩ Arabic-Indic digits, ０１２３ fullwidth, ½ ² Ⅻ",
    "I'm sure you'll see they've said it's theirs, we'd DON'T WE'LL",
    "literal specials in text: <|bos|> <|end|> <|user|> <|pad|>",
    "   \n\n   \t  \n",
    "a" * 5000,
    "mixed:" + "".join(chr(c) for c in range(32, 0x250)),
]


def documents_artifact(store: ArtifactStore, shards: list[list[str]], tag: str, stage: str = "dedup",
                       columns: dict | None = None):
    def build(writer):
        for i, texts in enumerate(shards):
            ids = [f"{tag}-{i}-{j}" for j in range(len(texts))]
            table = pa.table(columns if columns is not None else {"id": ids, "url": ids, "text": texts})
            writer.write_parquet(shard_name(i), table)
        return {}

    return store.produce(stage, tag.ljust(64, "0"), build, config={}, inputs=[], code_version="1")


def split_in(parts: int, docs: list[str]) -> list[list[str]]:
    step = -(-len(docs) // parts)
    return [docs[i:i + step] for i in range(0, len(docs), step)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tokenizer at the default vocabulary, trained on every real corpus at hand."""
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    docs = real_documents()
    random.Random(0).shuffle(docs)
    corpus = documents_artifact(store, split_in(3, docs), "a")
    manifest = STAGE.run(TokenizerConfig(), [corpus], store)
    return store, manifest, load_tokenizer(store, manifest), docs


# ------------------------------------------------------------------ round trips and splitting


def test_every_real_document_round_trips(trained):
    _, _, tokenizer, docs = trained
    assert len(docs) > 70
    for text, encoding in zip(docs, tokenizer.encode_batch(docs, add_special_tokens=False)):
        assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    for text, ids in zip(docs, encode_documents(tokenizer, docs)):
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", HAND_WRITTEN)
def test_hand_written_strings_round_trip(trained, text):
    _, _, tokenizer, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    [plain] = encode_documents(tokenizer, [text])
    assert tokenizer.decode(plain) == text
    assert not set(plain) & set(special_token_ids(tokenizer).values()), "documents never contain special ids"


def test_every_byte_is_in_the_vocabulary(trained):
    _, _, tokenizer, _ = trained
    assert all(tokenizer.token_to_id(symbol) is not None for symbol in pre_tokenizers.ByteLevel.alphabet())
    every_byte = bytes(range(256)).decode("latin-1") + "\U0001f9d1\u200d\U0001f52c"
    assert tokenizer.decode(tokenizer.encode(every_byte, add_special_tokens=False).ids) == every_byte


def pieces(text: str) -> list[str]:
    """GPT-4's split of `text`, as strings (the pre-tokenizer gives byte-level symbols)."""
    return [decoders.ByteLevel().decode([piece]) for piece, _ in new_tokenizer().pre_tokenizer.pre_tokenize_str(text)]


def test_gpt4_pre_tokenization():
    assert pieces("1234567 and 89") == ["123", "456", "7", " and", " ", "89"]
    assert pieces("3.14159") == ["3", ".", "141", "59"]
    assert pieces("I'm sure they'll say DON'T") == ["I", "'m", " sure", " they", "'ll", " say", " DON", "'T"]
    assert pieces("Hello, world!!! (ok)") == ["Hello", ",", " world", "!!!", " (", "ok", ")"]
    assert pieces("x  \n\n  y") == ["x", "  \n\n", " ", " y"]
    assert pieces("def f(x):\n    return x") == ["def", " f", "(x", "):\n", "   ", " return", " x"]


# ------------------------------------------------------------------ the vocabulary


def test_special_tokens_come_first(trained):
    _, _, tokenizer, _ = trained
    assert special_token_ids(tokenizer) == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert SPECIAL_TOKENS == [BOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]
    for token, i in special_token_ids(tokenizer).items():
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False).ids[1] == i


def test_vocab_size_is_respected(trained, tmp_path):
    _, manifest, tokenizer, _ = trained
    assert tokenizer.get_vocab_size() == manifest.stats["vocab_size"]
    if SHAKESPEARE.is_file():
        assert manifest.stats["vocab_size"] == 8192
    else:  # the Python manual alone has fewer than 8192 - 262 pairs seen twice
        assert manifest.stats["vocab_size"] <= 8192
    store = ArtifactStore(tmp_path)
    corpus = documents_artifact(store, [topic_texts()], "b")
    small = STAGE.run(TokenizerConfig(vocab_size=600), [corpus], store)
    assert load_tokenizer(store, small).get_vocab_size() == small.stats["vocab_size"] == 600


RERUN_IN_A_NEW_PROCESS = """
import sys
from pipelines.tokenizer import STAGE, TokenizerConfig
from storage import ArtifactStore

store = ArtifactStore(sys.argv[1])
config = TokenizerConfig(vocab_size=2000, workers=1, batch_size=7)
print(STAGE.run(config, [store.find(sys.argv[2])], store, force=True).fingerprint)
"""


def test_training_is_deterministic_whatever_the_process_and_threads(tmp_path):
    store = ArtifactStore(tmp_path)
    docs = topic_texts() + shakespeare_chunks()[:150]
    corpus = documents_artifact(store, split_in(2, docs), "c")
    first = STAGE.run(TokenizerConfig(vocab_size=2000, workers=2), [corpus], store)
    text = store.local_path(first, TOKENIZER_FILE).read_bytes()
    rerun = subprocess.run([sys.executable, "-c", RERUN_IN_A_NEW_PROCESS, str(tmp_path), corpus.fingerprint],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert rerun.stdout.strip() == first.fingerprint, "workers and batch_size are runtime settings"
    again = store.get("tokenizer", first.fingerprint)
    assert again.created != first.created, "rebuilt, not found"
    assert store.local_path(again, TOKENIZER_FILE).read_bytes() == text


# ------------------------------------------------------------------ stats


def test_stats_and_held_out_documents(trained):
    _, manifest, _, docs = trained
    stats = manifest.stats
    assert stats["documents_in"] == len(docs)
    assert stats["train_documents"] + stats["held_out_documents"] == len(docs)
    assert stats["held_out_documents"] >= 8
    assert stats["train_bytes"] + stats["held_out_bytes"] == sum(len(d.encode()) for d in docs)
    assert 2.5 < stats["bytes_per_token"] < 6
    assert stats["seconds"] > 0
    assert "documents_out" not in stats


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent")
def test_bytes_per_token_is_plausible_on_english(tmp_path):
    store = ArtifactStore(tmp_path)
    corpus = documents_artifact(store, [shakespeare_chunks(1000)], "e")
    manifest = STAGE.run(TokenizerConfig(held_out_fraction=0.05), [corpus], store)
    stats = manifest.stats
    assert stats["held_out_documents"] >= 0.03 * stats["documents_in"]
    assert 3 <= stats["bytes_per_token"] <= 5, stats


def test_null_and_empty_texts_count_as_empty_documents(tmp_path):
    store = ArtifactStore(tmp_path)
    texts = topic_texts()[:40] + [None, "", None]
    ids = [f"n-{i}" for i in range(len(texts))]
    corpus = documents_artifact(store, [[]], "n", columns={"id": ids, "url": ids, "text": texts})
    stats = STAGE.run(TokenizerConfig(vocab_size=400), [corpus], store).stats
    assert stats["documents_in"] == 43
    assert stats["train_bytes"] + stats["held_out_bytes"] == sum(len(t.encode()) for t in texts if t)


def test_caps_stop_reading(tmp_path):
    store = ArtifactStore(tmp_path)
    docs = topic_texts()
    corpus = documents_artifact(store, split_in(4, docs), "f")
    by_docs = STAGE.run(TokenizerConfig(vocab_size=500, max_train_documents=20), [corpus], store).stats
    assert by_docs["train_documents"] == 20
    assert by_docs["documents_in"] < len(docs)
    by_bytes = STAGE.run(TokenizerConfig(vocab_size=500, max_train_bytes=100_000), [corpus], store).stats
    assert 50_000 < by_bytes["train_bytes"] <= 100_000


# ------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def hf_tokenizer(trained):
    transformers = pytest.importorskip("transformers")
    store, manifest, _, _ = trained
    return transformers.AutoTokenizer.from_pretrained(str(store.local_path(manifest)))


def test_transformers_loads_the_artifact_and_encodes_identically(trained, hf_tokenizer):
    from transformers import PreTrainedTokenizerFast

    store, manifest, tokenizer, docs = trained
    from_file = PreTrainedTokenizerFast(tokenizer_file=str(store.local_path(manifest, TOKENIZER_FILE)))
    sample = (docs * 2)[:1000] + HAND_WRITTEN
    expected = [e.ids for e in tokenizer.encode_batch(sample, add_special_tokens=False)]
    for hf in (hf_tokenizer, from_file):
        assert hf(sample, add_special_tokens=False)["input_ids"] == expected
        assert [hf.decode(ids) for ids in expected[:200]] == sample[:200]
    for token, i in special_token_ids(tokenizer).items():
        assert hf_tokenizer.encode(token, add_special_tokens=False) == [i]
        assert hf_tokenizer.convert_ids_to_tokens(i) == token
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (BOS, BOS, PAD)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 0, 1)
    assert hf_tokenizer.all_special_tokens == SPECIAL_TOKENS
    chat_ids = hf_tokenizer.encode(f"{USER}hi{END_OF_TURN}", add_special_tokens=False)
    assert chat_ids[0] == 3 and chat_ids[-1] == 5 and hf_tokenizer.decode(chat_ids, skip_special_tokens=True) == "hi"
    assert hf_tokenizer("plain text")["input_ids"] == tokenizer.encode("plain text").ids, "nothing added by default"


def conversations() -> list[list[dict[str, str]]]:
    chats = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\n"}],
        [{"role": "user", "content": "  spaces, {{ braces }} and {% tags %}  \n"},
         {"role": "assistant", "content": "漢字 😀 \t ok"}],
    ]
    for path in INSTRUCT:
        for entry in json.loads(path.read_text(encoding="utf-8"))[:50]:
            prompt = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
            chats.append([{"role": "system", "content": "Answer the request."}, {"role": "user", "content": prompt},
                          {"role": "assistant", "content": entry.get("chosen", entry["output"])}])
    return chats


def test_chat_template_matches_render_chat(hf_tokenizer):
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    for chat in conversations():
        for prompt in (False, True):
            rendered = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert rendered == render_chat(chat, add_generation_prompt=prompt)
    assert render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}], add_generation_prompt=True) == \
        "<|bos|><|system|>s<|end|><|user|>u<|end|><|assistant|>a<|end|><|assistant|>"


def test_unknown_chat_role_is_refused(hf_tokenizer):
    with pytest.raises(ValueError, match="tool"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(Exception, match="unknown chat role"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ------------------------------------------------------------------ bad inputs


def test_vocab_size_too_small():
    with pytest.raises(ValidationError, match="at least 263"):
        TokenizerConfig(vocab_size=262)
    config = TokenizerConfig.model_construct(**{**TokenizerConfig().model_dump(), "vocab_size": 100})
    with pytest.raises(ConfigError, match="vocab_size"):
        STAGE.build(config, [], None, None)


def test_bad_inputs_name_the_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    config = TokenizerConfig(vocab_size=300)
    html_only = documents_artifact(store, [[]], "g", stage="ingest", columns={"id": ["x"], "html": ["<p>hi</p>"]})
    with pytest.raises(InputError, match=rf"ingest/{html_only.short}: shards/00000.parquet has no 'text' column"):
        STAGE.run(config, [html_only], store)

    no_shards = store.produce("dedup", "h" * 64, lambda w: w.write_json("other.json", {}) or {},
                              config={}, inputs=[], code_version="1")
    with pytest.raises(InputError, match=rf"dedup/{no_shards.short}: not a document artifact"):
        STAGE.run(config, [no_shards], store)

    empty = documents_artifact(store, [[], []], "i")
    with pytest.raises(InputError, match=rf"dedup/{empty.short}: the corpus is empty"):
        STAGE.run(config, [empty], store)

    blank = documents_artifact(store, [["", "", ""]], "j")
    with pytest.raises(InputError, match=rf"dedup/{blank.short}: no text to train on"):
        STAGE.run(config, [blank], store)

    all_null = documents_artifact(store, [[]], "l", columns={"id": ["x", "y"], "text": pa.nulls(2)})
    with pytest.raises(InputError, match=rf"dedup/{all_null.short}: no text to train on"):
        STAGE.run(config, [all_null], store)

    not_parquet = store.produce("dedup", "k" * 64, lambda w: w.write_bytes(shard_name(0), b"not parquet") or {},
                                config={}, inputs=[], code_version="1")
    with pytest.raises(InputError, match=rf"dedup/{not_parquet.short}: shards/00000.parquet: not readable"):
        STAGE.run(config, [not_parquet], store)

    with pytest.raises(InputError, match="one document artifact"):
        STAGE.run(config, [], store)
    with pytest.raises(InputError, match=rf"dedup/{empty.short}: not a tokenizer artifact"):
        load_tokenizer(store, empty)
