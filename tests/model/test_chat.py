"""`kiln chat`: the KV cache carries the conversation (each turn feeds only its new tokens and
decodes as a model without cache would), generation stops at <|end|>, old turns are dropped
when the context fills, /reset, /exit and Ctrl-D; and the command driven through a real
terminal (pexpect)."""

import io
import sys
import textwrap
from pathlib import Path

import pytest

from model.chat import ChatSession, load_for_generation, run_chat
from model.chat_format import ChatFormat
from model.generate import SamplingConfig, greedy_without_cache
from pipelines.tokenizer import SPECIAL_TOKENS
from storage import ArtifactStore
from tests.model.test_chat_format import tokenizer_artifact
from tests.model.test_sft import model_artifact

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    store = ArtifactStore(tmp_path_factory.mktemp("chat"))
    tok = tokenizer_artifact(store)
    return store.local_path(model_artifact(store, "sft", tok, seed=2), "model")


class Recorder:
    """Counts what the model is fed, and steers its replies: never a special token, and
    <|end|> after `end_after` tokens (a random model would not say it by itself)."""

    def __init__(self, loaded, end_after: int | None = None):
        self.calls: list[tuple[int, int]] = []  # (tokens fed, cache length before)
        self.end_after, self.since_prefill = end_after, 0
        self.end_id = loaded.tokenizer.token_to_id("<|end|>")
        self.special = [loaded.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        loaded.model.register_forward_pre_hook(self.before, with_kwargs=True)
        loaded.model.head.register_forward_hook(self.steer)

    def before(self, module, args, kwargs):
        cache = kwargs.get("cache")
        fed = args[0].size(1)
        self.calls.append((fed, cache.length if cache is not None else -1))
        self.since_prefill = 0 if fed > 1 else self.since_prefill + 1

    def steer(self, module, args, output):
        output = output.clone()
        output[..., self.special] = -1e4
        if self.end_after is not None and self.since_prefill >= self.end_after:
            output[..., self.end_id] = 1e4
        return output

    def turns(self) -> list[list[tuple[int, int]]]:
        turns: list[list[tuple[int, int]]] = []
        for fed, start in self.calls:
            if fed > 1 or not turns:
                turns.append([])
            turns[-1].append((fed, start))
        return turns


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text):
        self.pieces.append(text)
        return super().write(text)


def scripted(lines):
    queue = list(lines)

    def read(prompt):
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def test_each_turn_feeds_only_its_new_tokens_and_decodes_as_without_cache(model_dir):
    loaded = load_for_generation(model_dir)
    recorder = Recorder(loaded, end_after=4)
    chat = ChatFormat.from_dir(model_dir)
    output = Writes()
    session = run_chat(loaded, scripted(["Hello there", "What does `json.dumps` do?", "Thanks!"]), output,
                       SamplingConfig(max_new_tokens=8, temperature=0))
    turns = recorder.turns()
    assert len(turns) == 3
    new_turn = [len(chat.encode([{"role": "user", "content": text}], add_generation_prompt=True)) - 1  # less BOS
                for text in ("Hello there", "What does `json.dumps` do?", "Thanks!")]
    assert turns[0][0] == (1 + new_turn[0], 0), "BOS and the first turn, from an empty cache"
    for k in (1, 2):
        cached = sum(fed for turn in turns[:k] for fed, _ in turn)
        assert turns[k][0] == (1 + new_turn[k], cached), "only the last reply's <|end|> and the new turn are fed"
    for turn in turns:
        assert [fed for fed, _ in turn[1:]] == [1, 1, 1, 1], "4 tokens, then <|end|> stops the reply"
    assert session.ids[-1] == chat.end_id and session.cache.length == len(session.ids) - 1
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    assert chat.tokenizer.decode(session.ids, skip_special_tokens=False) == chat.render(session.messages)

    # The cached decoding of the last turn equals decoding the whole conversation without a cache.
    prompt = session.ids[:-5]
    assert greedy_without_cache(loaded.model, prompt, 4) == session.ids[-5:-1]
    text = output.getvalue()
    assert "<|end|>" not in text and text.count("kiln> ") == 3
    assert len(output.pieces) > 3 * 4, "replies are written as they are generated"


def test_old_turns_are_dropped_and_the_rest_re_encoded_when_the_context_fills(model_dir):
    loaded = load_for_generation(model_dir)
    recorder = Recorder(loaded, end_after=6)
    chat = ChatFormat.from_dir(model_dir)
    session = ChatSession(loaded, SamplingConfig(max_new_tokens=8, temperature=0), system="Be brief.", context=48)
    for text in ("first question", "second question", "third question", "fourth question"):
        list(session.reply(text))
        assert len(session.ids) <= 48
    turns = recorder.turns()
    assert any(start == 0 for _, start in (turn[0] for turn in turns[1:])), "a later turn started over"
    assert session.messages[0] == {"role": "system", "content": "Be brief."}, "the system message stays"
    assert "first question" not in [m["content"] for m in session.messages]
    assert session.messages[-2]["content"] == "fourth question"
    assert turns[1][0][1] > 0, "the second turn still fit after the first"
    assert turns[-1][0] == (len(chat.encode(session.messages[:-1], add_generation_prompt=True)), 0), \
        "the last turn re-encoded what was kept, from an empty cache"


def test_reset_exit_and_a_message_too_long(model_dir):
    loaded = load_for_generation(model_dir)
    Recorder(loaded, end_after=2)
    output = Writes()
    session = run_chat(loaded, scripted(["hi", "/reset", "word " * 100, "/exit", "never read"]), output,
                       SamplingConfig(max_new_tokens=8, temperature=0))
    text = output.getvalue()
    assert "(conversation cleared)" in text and "(not sent: the message takes" in text
    assert session.messages == [] and session.ids == [] and session.cache.length == 0
    assert text.rstrip().endswith("model's context is 64, 8 of them kept for the reply)")


def test_kiln_chat_in_a_terminal(model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    fed = tmp_path / "fed.txt"
    script = tmp_path / "chat_script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from model.model import Transformer

        forward = Transformer.forward
        log = open({str(fed)!r}, "a")

        def counting(self, tokens, targets=None, cache=None):
            log.write(f"{{tokens.size(1)}} {{cache.length if cache is not None else -1}}\\n")
            log.flush()
            logits, loss = forward(self, tokens, targets, cache)
            logits[..., :6] = -1e4  # a random model's favourite is a special token: a reply of plain text
            return logits, loss

        Transformer.forward = counting
        from flows.chat_command import chat
        chat({str(model_dir)!r}, data_dir={str(tmp_path)!r}, temperature=0.0, top_k=None, top_p=None,
             max_tokens=6, seed=0)
    """))
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, [str(script)], cwd=str(tmp_path), env=env, encoding="utf-8", timeout=120)
    child.expect("Chatting with")
    child.expect("you> ")
    child.sendline("hello there")
    child.expect("kiln> ")
    child.expect("you> ")
    first_reply = child.before.strip()
    child.sendline("and again")
    child.expect("kiln> ")
    child.expect("you> ")
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.expect("you> ")
    child.sendline("hi")
    child.expect("kiln> ")
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert first_reply and "<|end|>" not in first_reply

    chat = ChatFormat.from_dir(model_dir)

    def new_turn(text):
        return len(chat.encode([{"role": "user", "content": text}], add_generation_prompt=True)) - 1  # less BOS

    calls = [tuple(map(int, line.split())) for line in fed.read_text().splitlines()]
    prefills = [(i, fed_, start) for i, (fed_, start) in enumerate(calls) if fed_ > 1]
    assert [(fed_, start) for _, fed_, start in prefills] == [
        (1 + new_turn("hello there"), 0),
        (1 + new_turn("and again"), 1 + new_turn("hello there") + 6),  # the cache kept turn 1 and its reply
        (1 + new_turn("hi"), 0),  # after /reset: BOS and the turn, from an empty cache
    ]
    assert all(fed_ == 1 for fed_, _ in calls if (fed_, _) not in [(f, s) for _, f, s in prefills])

    # Ctrl-D at the prompt leaves as /exit does.
    child = pexpect.spawn(sys.executable, [str(script)], cwd=str(tmp_path), env=env, encoding="utf-8", timeout=120)
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
