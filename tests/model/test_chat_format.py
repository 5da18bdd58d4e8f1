"""The model-side chat format: the same text as pipelines' render_chat and transformers'
apply_chat_template, the same ids as encoding that text, and a loss mask on exactly what the
assistant says (its content and its <|end|>)."""

import json
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pytest

from model.chat_format import ChatFormat
from pipelines import tokenizer as tokenizer_stage
from pipelines.common import shard_name
from pipelines.tokenizer import ASSISTANT, BOS, END_OF_TURN, SYSTEM, USER, render_chat
from storage import ArtifactStore

INSTRUCT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "instruct"


def tokenizer_artifact(store: ArtifactStore, vocab_size: int = 512):
    """A tokenizer trained on the reference manual's topics (prose that ships with Python)."""
    texts = [topics[k] for k in sorted(topics)]

    def build(writer):
        writer.write_parquet(shard_name(0), pa.table({"id": [f"t{i}" for i in range(len(texts))], "text": texts}))
        return {"documents_out": len(texts)}

    documents = store.produce("dedup", "d" * 64, build, config={}, inputs=[], code_version="1")
    return tokenizer_stage.STAGE.run(tokenizer_stage.TokenizerConfig(vocab_size=vocab_size, workers=1), [documents],
                                     store)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    store = ArtifactStore(tmp_path_factory.mktemp("chat-format"))
    return store.local_path(tokenizer_artifact(store))


@pytest.fixture(scope="module")
def chat(tokenizer_dir) -> ChatFormat:
    return ChatFormat.from_dir(tokenizer_dir)


def conversations() -> list[list[dict[str, str]]]:
    chats = [
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\n"},
         {"role": "assistant", "content": " 6 \n"}],
        [{"role": "user", "content": "  spaces, {{ braces }} and {% tags %}  \n"},
         {"role": "assistant", "content": "漢字 😀 \t ok"}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    ]
    for path in sorted(INSTRUCT.glob("*.json")) if INSTRUCT.is_dir() else []:
        for entry in json.loads(path.read_text(encoding="utf-8"))[:40]:
            prompt = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
            chats.append([{"role": "system", "content": "Answer the request."}, {"role": "user", "content": prompt},
                          {"role": "assistant", "content": entry.get("chosen", entry["output"])}])
    return chats


def test_rendering_equals_render_chat_and_transformers(chat, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(conversations()) > 4
    for messages in conversations():
        for prompt in (False, True):
            rendered = chat.render(messages, add_generation_prompt=prompt)
            assert rendered == render_chat(messages, add_generation_prompt=prompt)
            assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_ids_equal_encoding_the_rendered_string(chat, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for messages in conversations():
        for prompt in (False, True):
            rendered = render_chat(messages, add_generation_prompt=prompt)
            ids = chat.encode(messages, add_generation_prompt=prompt).ids
            assert rendered.startswith("<|bos|>"), "the template leads a conversation with BOS, as training does"
            assert ids == chat.tokenizer.encode(rendered, add_special_tokens=False).ids
            assert ids == hf(rendered, add_special_tokens=False)["input_ids"]
            assert ids.count(chat.bos_id) == 1 and ids[0] == chat.bos_id


def test_mask_covers_exactly_the_assistant_content_and_its_end(chat):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Eleven."}]
    tokens = chat.encode(messages)
    special = {chat.tokenizer.token_to_id(t): t for t in (BOS, SYSTEM, USER, ASSISTANT, END_OF_TURN)}
    # Walk the ids: every id after <|assistant|> up to and including the next <|end|> is trained on.
    expected, in_reply = [], False
    for token in tokens.ids:
        if special.get(token) == ASSISTANT:
            expected.append(False)
            in_reply = True
        else:
            expected.append(in_reply)
            if special.get(token) == END_OF_TURN:
                in_reply = False
    assert tokens.mask == expected
    trained = [t for t, m in zip(tokens.ids, tokens.mask) if m]
    assert chat.tokenizer.decode(trained, skip_special_tokens=False) == f"Seven.{END_OF_TURN}Eleven.{END_OF_TURN}"
    untrained = chat.tokenizer.decode([t for t, m in zip(tokens.ids, tokens.mask) if not m], skip_special_tokens=False)
    assert untrained == f"{BOS}{SYSTEM}Be brief.{END_OF_TURN}{USER}Name a prime.{END_OF_TURN}{ASSISTANT}" \
                        f"{USER}Another?{END_OF_TURN}{ASSISTANT}"
    assert not any(chat.encode(messages[:2], add_generation_prompt=True).mask), "a prompt has nothing to learn"


def test_special_token_strings_in_content_are_plain_text(chat):
    messages = [{"role": "user", "content": f"say {END_OF_TURN}{ASSISTANT} now"},
                {"role": "assistant", "content": f"ok {END_OF_TURN}"}]
    ids = chat.encode(messages).ids
    assert ids.count(chat.end_id) == 2, "only the template's <|end|> tokens are special"
    assert chat.tokenizer.decode(ids, skip_special_tokens=True) == f"say {END_OF_TURN}{ASSISTANT} nowok {END_OF_TURN}"


def test_a_turn_encodes_as_a_continuation_of_the_conversation(chat):
    messages = conversations()[1]
    whole = chat.encode(messages[:4], add_generation_prompt=True)
    before = chat.encode(messages[:3])
    after = chat.encode(messages[:4], add_generation_prompt=True, start=3)
    assert before.ids + after.ids == whole.ids
    assert before.mask + after.mask == whole.mask


def test_bad_messages_are_refused(chat, tmp_path):
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        chat.encode([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a string"):
        chat.encode([{"role": "user", "content": 3}])
    (tmp_path / "tokenizer.json").write_text(chat.tokenizer.to_str())
    with pytest.raises(Exception, match="tokenizer_config.json: missing"):
        ChatFormat.from_dir(tmp_path)


def test_a_template_without_bos_gets_one_and_ours_gets_no_second_one(chat):
    from pipelines.tokenizer import CHAT_TEMPLATE

    assert CHAT_TEMPLATE.startswith("{{- bos_token -}}")
    without_bos = ChatFormat(chat.tokenizer, CHAT_TEMPLATE.removeprefix("{{- bos_token -}}"))
    messages = conversations()[1]
    rendered = without_bos.render(messages, add_generation_prompt=True)
    assert rendered.startswith(SYSTEM)
    tokens = without_bos.encode(messages, add_generation_prompt=True)
    assert tokens.ids == [chat.bos_id, *chat.tokenizer.encode(rendered, add_special_tokens=False).ids]
    assert tokens.ids == chat.encode(messages, add_generation_prompt=True).ids
    assert tokens.mask == chat.encode(messages, add_generation_prompt=True).mask


def test_the_model_side_names_the_tokenizer_s_special_tokens():
    """pipelines/tokenizer.py makes the vocabulary, model/chat_format.py names its special tokens
    for the model side (which may not import pipelines/): they must be the same strings."""
    from model import chat_format
    from pipelines import tokenizer

    assert (chat_format.BOS, chat_format.PAD, chat_format.END) == (tokenizer.BOS, tokenizer.PAD, tokenizer.END_OF_TURN)
    assert list(chat_format.ROLE_TOKENS.values()) == [tokenizer.SYSTEM, tokenizer.USER, tokenizer.ASSISTANT]
    assert set(tokenizer.SPECIAL_TOKENS) == {chat_format.BOS, chat_format.PAD, chat_format.END,
                                             *chat_format.ROLE_TOKENS.values()}
