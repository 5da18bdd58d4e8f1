"""SFT: instruction data in its common shapes (HH-RLHF's gzip'd transcripts among them), malformed
lines reported by file and line, the held-out split, packed rows with the loss mask, the offline
default data, and the stage under accelerate (the response loss falls below the starting model's;
a killed run resumes)."""

import gzip
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from model import instruction_data, sft
from model.chat_format import ChatFormat
from model.checkpoint import save_checkpoint
from model.data import IndexLoader
from model.model import ModelConfig, Transformer
from model.run_spec import TrainConfig
from pipelines.tokenizer import ROLE_TOKENS
from storage import ArtifactStore, InputError
from tests.model.test_chat_format import tokenizer_artifact
from tests.model.test_pretrain import copy_inputs, losses, next_staging, step_logged

ROOT = Path(__file__).resolve().parents[2]
INSTRUCT = ROOT.parent / "shared" / "data" / "instruct"
PREFERENCES = INSTRUCT / "rasbt_ch07_instruction-data-with-preference.json"


def model_artifact(store: ArtifactStore, stage: str, tok, seed: int = 0, seq_len: int = 64):
    """A small randomly initialised model committed as a `stage` artifact (model/ + tokenizer)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tok.stats["vocab_size"], seq_len=seq_len, n_layer=2, n_head=4, n_kv_head=2,
                         d_model=64)
    model = Transformer(config)

    def build(writer):
        save_checkpoint(writer.local_path("model"), model, config, store.local_path(tok))
        return {"steps": 0}

    fp = f"{stage[0]}{seed:02d}".ljust(64, "0")
    return store.produce(stage, fp, build, config={}, inputs=[tok.fingerprint], code_version="1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("sft"))
    tok = tokenizer_artifact(store)
    return store, model_artifact(store, "pretrain", tok), tok


@pytest.fixture(scope="module")
def chat(inputs) -> ChatFormat:
    store, _, tok = inputs
    return ChatFormat.from_dir(store.local_path(tok))


# ------------------------------------------------------------------ reading data


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def preference_entries() -> list[dict]:
    if not PREFERENCES.is_file():
        pytest.skip(f"{PREFERENCES} is absent")
    return json.loads(PREFERENCES.read_text(encoding="utf-8"))


def human_turn(entry: dict) -> str:
    return entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")


def hh_records(entries: list[dict]) -> list[dict[str, str]]:
    """The real preference set as Anthropic's HH-RLHF has it: `chosen` and `rejected` as whole
    transcripts, the same up to their final assistant turn. Two entries in three start with one or
    two earlier real exchanges (other entries' question and answer), as HH's multi-turn ones do."""
    records = []
    for i, entry in enumerate(entries):
        earlier = [entries[(i + 7 * k) % len(entries)] for k in range(i % 3, 0, -1)]
        history = "".join(f"\n\nHuman: {human_turn(e)}\n\nAssistant: {e['output']}" for e in earlier)
        prompt = f"{history}\n\nHuman: {human_turn(entry)}\n\nAssistant:"
        records.append({"chosen": f"{prompt} {entry['chosen']}", "rejected": f"{prompt} {entry['rejected']}"})
    return records


def write_hh(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    """JSONL, gzip'd, as HH-RLHF ships."""
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
        handle.writelines(line + "\n" for line in extra_lines)
    return path


def test_alpaca_and_messages_entries_become_conversations(tmp_path):
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "Hi!"},
              {"instruction": "Say bye.", "output": "Bye."}]
    (tmp_path / "a.json").write_text(json.dumps(alpaca, indent=2))
    write_lines(tmp_path / "b.jsonl", [json.dumps(e) for e in alpaca[:1]] + [json.dumps({"messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello to you."}]})])
    entries, bad = instruction_data.read_entries(instruction_data.data_files(str(tmp_path)), sft.sft_conversation,
                                                 "error")
    assert bad == []
    assert entries[0] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                          {"role": "assistant", "content": "5"}]
    assert entries[1][0]["content"] == "Say hi." and entries[2][0]["content"] == "Say bye."
    assert entries[3] == entries[0], "the same entry as JSONL"
    assert [m["role"] for m in entries[4]] == ["system", "user", "assistant"]


def test_hh_transcripts_become_conversations(tmp_path):
    entries = preference_entries()
    path = write_hh(tmp_path / "hh.jsonl.gz", [{"chosen": r["chosen"]} for r in hh_records(entries)[:3]] + [
        {"chosen": "\n\nHuman: no answer yet"}, {"chosen": "Human: hi\n\nAssistant:"}])
    conversations, bad = instruction_data.read_entries([path], sft.sft_conversation, "skip")
    first, second = entries[:2]
    assert conversations[0] == [{"role": "user", "content": human_turn(first)},
                                {"role": "assistant", "content": first["chosen"]}]
    earlier = entries[1 + 7]
    assert conversations[1] == [{"role": "user", "content": human_turn(earlier)},
                                {"role": "assistant", "content": earlier["output"]},
                                {"role": "user", "content": human_turn(second)},
                                {"role": "assistant", "content": second["chosen"]}]
    assert [m["role"] for m in conversations[2]] == ["user", "assistant"] * 3
    assert bad == [f"{path}:4: field 'chosen' is not an HH-RLHF transcript: no '\\n\\nAssistant:' turn",
                   f"{path}:5: field 'chosen': no assistant turn to learn from"]


def test_real_instruction_file_reads_whole():
    path = INSTRUCT / "rasbt_ch07_instruction-data.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    entries, bad = instruction_data.read_entries([path], sft.sft_conversation, "error")
    assert len(entries) == 1100 and bad == []


MALFORMED = [
    json.dumps({"instruction": "ok", "output": "fine"}),
    '{"instruction": "broken", "output": ',
    json.dumps({"instruction": "no output"}),
    json.dumps({"instruction": 7, "output": "x"}),
    json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
    json.dumps(["not", "an", "object"]),
    "",
    json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    json.dumps({"instruction": "also ok", "input": None, "output": "fine"}),
]


def test_malformed_lines_are_reported_with_file_and_line_and_skipped(tmp_path, caplog):
    path = write_lines(tmp_path / "data.jsonl", MALFORMED)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        entries, bad = instruction_data.read_entries([path], sft.sft_conversation, "skip")
    assert len(entries) == 2
    assert bad == [f"{path}:2: not valid JSON (Expecting value, column 37)",
                   f"{path}:3: missing field 'output'",
                   f"{path}:4: field 'instruction' must be a string, got int",
                   f"{path}:5: message 0: unknown chat role 'tool' (expected one of system, user, assistant)",
                   f"{path}:6: expected a JSON object, got list",
                   f"{path}:8: no assistant message to learn from"]
    assert [r.getMessage() for r in caplog.records] == [f"skipped {line}" for line in bad]


def test_malformed_lines_are_errors_when_asked(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", MALFORMED)
    with pytest.raises(InputError, match=re.escape(f"{path}:2: not valid JSON")):
        instruction_data.read_entries([path], sft.sft_conversation, "error")


def test_entries_of_a_json_list_are_reported_at_their_own_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"},\n\n  {"output": 3,\n'
                    '   "instruction": "c"}\n]\n')
    entries, bad = instruction_data.read_entries([path], sft.sft_conversation, "skip")
    assert len(entries) == 1
    assert bad == [f"{path}:3: missing field 'output'", f"{path}:5: field 'output' must be a string, got int"]
    path.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]')
    with pytest.raises(InputError, match=re.escape(f"{path}:3: not valid JSON (expected ',' or ']'")):
        instruction_data.read_entries([path], sft.sft_conversation, "skip")


def test_the_held_out_split_is_a_stable_hash_of_the_prompt():
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(2000)]
    train, val = instruction_data.split_holdout(list(range(2000)), prompts, 0.1)
    assert 150 < len(val) < 250 and len(train) + len(val) == 2000
    order = np.random.default_rng(0).permutation(2000).tolist()
    _, val_shuffled = instruction_data.split_holdout(order, [prompts[i] for i in order], 0.1)
    assert sorted(val_shuffled) == val, "an entry's split does not depend on the others"
    assert instruction_data.split_holdout([1, 2], prompts[:2], 1e-9)[1] != [], "something is always held out"


# ------------------------------------------------------------------ rows


def test_conversations_are_packed_into_rows_with_their_mask(chat):
    conversations = [[{"role": "user", "content": f"Question number {i}?"},
                      {"role": "assistant", "content": "An answer " * (i % 5 + 1)}] for i in range(30)]
    encoded = [chat.encode(c) for c in conversations]
    tokens, mask = sft.pack_conversations(encoded, 65, chat.pad_id)
    assert tokens.shape[1] == 65
    assert len(tokens) < len(encoded), "short conversations share rows"
    assert (tokens[:, 0] == chat.bos_id).all(), "every row starts at a conversation"
    assert (tokens == chat.bos_id).sum() == len(encoded), "each conversation kept once, led by BOS"
    assert mask.sum() == sum(sum(e.mask) for e in encoded)
    assert not mask[tokens == chat.pad_id].any()
    inputs, targets = instruction_data.row_batch(tokens, mask)
    assert inputs.shape == targets.shape == (len(tokens), 64)
    trained = targets[targets != -100]
    assert trained.numel() == mask.sum() and (trained == chat.end_id).sum() == len(encoded)

    again, _, counts = sft.conversation_rows(chat, conversations, 65)
    assert counts == {"used": 30, "cropped": 0, "skipped_too_long": 0} and (again == tokens).all(), \
        "conversations that fit are packed as they are"
    long = chat.encode([{"role": "user", "content": "x " * 80}, {"role": "assistant", "content": "y"}])
    with pytest.raises(ValueError, match="does not fit in a row of 65"):
        sft.pack_conversations([long], 65, chat.pad_id)


def test_long_hh_conversations_are_cropped_from_the_left_so_that_the_final_answer_survives(chat, tmp_path):
    """The real preference set as HH transcripts in rows of 65 tokens: most conversations are longer
    than a row. Each keeps its final answer whole at its end, what came before cropped from the left;
    one whose answer alone does not fit is skipped, and counted."""
    entries = preference_entries()
    path = write_hh(tmp_path / "hh.jsonl.gz", hh_records(entries), (json.dumps({"chosen": "\n\nHuman: hi"}),))
    conversations, bad = instruction_data.read_entries([path], sft.sft_conversation, "skip")
    row_len = 65
    tokens, mask, counts = sft.conversation_rows(chat, conversations, row_len)

    def answer(conversation) -> tuple[int, ...]:  # <|assistant|>, the final answer's text, <|end|>
        return tuple(chat.encode(conversation, start=len(conversation) - 1).ids)

    least_prompt = len(chat.encode([{"role": "user", "content": ""}]))  # BOS, <|user|>, <|end|>
    whole = [len(chat.encode(c)) <= row_len for c in conversations]
    alone = [len(answer(c)) + least_prompt <= row_len for c in conversations]
    print(f"SFT rows of {row_len} on {len(conversations)} HH conversations: {counts}")
    assert len(conversations) + len(bad) == counts["used"] + counts["skipped_too_long"] + len(bad) == 1101
    assert counts["skipped_too_long"] == alone.count(False) > 0
    assert counts["cropped"] == sum(a and not w for a, w in zip(alone, whole)) > len(conversations) / 2
    assert counts["used"] == alone.count(True)

    # The rows' conversations (from one BOS to the next): each starts with a user turn and ends with
    # the final answer of a conversation used; those that fit, whole as they were.
    segments, positions = [], []
    for i, row in enumerate(tokens.tolist()):
        starts = [j for j, token in enumerate(row) if token == chat.bos_id]
        assert starts[0] == 0
        ends = [*starts[1:], len(row) - next(j for j, token in enumerate(reversed(row)) if token != chat.pad_id)]
        for start, end in zip(starts, ends):
            segments.append(tuple(row[start:end]))
            positions.append((i, start, end))
    assert not mask[tokens == chat.pad_id].any()
    assistant, user = (chat.tokenizer.token_to_id(ROLE_TOKENS[role]) for role in ("assistant", "user"))
    used = [c for c, a in zip(conversations, alone) if a]
    tails = Counter(segment[len(segment) - 1 - segment[::-1].index(assistant):] for segment in segments)
    assert tails == Counter(answer(c) for c in used), "every row's conversation ends with its final answer, whole"
    assert all(segment[1] == user and segment[-1] == chat.end_id for segment in segments)
    assert Counter(tuple(chat.encode(c).ids) for c, w in zip(conversations, whole) if w) <= Counter(segments)

    # The loss mask: every token of an assistant turn (its text and <|end|>), nothing else.
    roles = {chat.tokenizer.token_to_id(token): role for role, token in ROLE_TOKENS.items()}
    for (i, start, end), segment in zip(positions, segments):
        role = None
        for token, trained in zip(segment, mask[i, start:end].tolist()):
            if token in roles or token == chat.bos_id:
                assert not trained
                role = roles.get(token)
                continue
            assert trained == (role == "assistant"), f"a {role} token {'in' if trained else 'out of'} the mask"
            role = None if token == chat.end_id else role


def test_index_loader_resumes_at_the_next_batch_and_ranks_are_disjoint():
    loader = IndexLoader(10, batch_size=4, seed=3)
    stream = iter(loader)
    first = [next(stream).tolist() for _ in range(5)]
    assert sorted(sum(first[:2], []) + first[2][:2]) == list(range(10)), "an epoch covers every example once"
    resumed = IndexLoader(10, batch_size=4, seed=3)
    resumed.load_state_dict({"taken": 3})
    assert next(iter(resumed)).tolist() == first[3]
    ranks = [IndexLoader(10, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert sorted(ranks[0].batch(0).tolist() + ranks[1].batch(0).tolist()) == sorted(first[0])


def test_default_data_comes_from_the_standard_library_docs(tmp_path):
    import inspect

    instructions = instruction_data.default_data("sft", tmp_path / "sft.jsonl")
    entries, bad = instruction_data.read_entries([instructions], sft.sft_conversation, "error")
    assert len(entries) > 2000 and bad == []
    answers = {c[0]["content"]: c[1]["content"] for c in entries}
    question = next(q for q in answers if re.fullmatch(r".*`json\.loads`.*", q) and "signature" not in q
                    and "call" not in q)
    assert answers[question] == " ".join(inspect.getdoc(json.loads).split("\n\n")[0].split()).replace("``", "`")
    assert instruction_data.default_data("sft", tmp_path / "again.jsonl").read_bytes() == instructions.read_bytes()


# ------------------------------------------------------------------ the stage


def config(**train) -> sft.SFTConfig:
    settings = dict(batch_size=8, max_steps=16, warmup_steps=2, lr=3e-3, eval_every=8, eval_batches=4,
                    checkpoint_every=8, log_every=4)
    return sft.SFTConfig(train=TrainConfig(**{**settings, **train}))


@pytest.mark.slow
def test_sft_resumes_after_sigkill_and_learns_the_responses(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny matrices: one thread each on a shared machine
    store, pretrained, tok = inputs
    killed_store = copy_inputs(store, tmp_path, [pretrained, tok])
    script = textwrap.dedent(f"""
        from model import sft
        from storage import ArtifactStore
        from tests.model.test_sft import config
        store = ArtifactStore({str(tmp_path)!r})
        sft.STAGE.run(config(), [store.find({pretrained.fingerprint!r}), store.find({tok.fingerprint!r})], store)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = next_staging(tmp_path / "sft", victim)
    deadline = time.time() + 300
    while not (staging / "checkpoints" / "step-00000008").exists() or step_logged(staging) < 10:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # after the step-8 checkpoint; the next one is the last step's
    victim.wait()
    before_kill = [json.loads(line)["loss"] for line in (staging / "metrics.jsonl").read_text().splitlines()]

    resumed = sft.STAGE.run(config(), [pretrained, tok], killed_store)
    log = killed_store.local_path(resumed, "train.log").read_text()
    assert "resumed from step-00000008 (step 8)" in log, "resumed, not restarted"
    # Steps 9.. ran before the kill and again after the resume: bit-identical on CPU.
    assert losses(killed_store, resumed)[:len(before_kill)] == before_kill and len(before_kill) >= 10

    stats = resumed.stats
    assert stats["steps"] == 16 and stats["data"].startswith("stdlib docs") and stats["bad_lines"] == 0
    assert stats["conversations"]["val"] > 100 and stats["rows"]["train"] > 100
    assert stats["pretrained_val_response_loss"] == pytest.approx(math.log(tok.stats["vocab_size"]), abs=0.5)
    assert stats["val_response_loss"] < 0.9 * stats["pretrained_val_response_loss"]
    model_dir = killed_store.local_path(resumed, "model")
    assert json.loads((model_dir / "config.json").read_text())["stage"] == "sft"
    assert ChatFormat.from_dir(model_dir).render([{"role": "user", "content": "x"}]) == "<|bos|><|user|>x<|end|>"


@pytest.mark.slow
def test_sft_on_hh_chosen_transcripts_learns_the_assistant_turns_only(inputs, chat, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    entries = preference_entries()
    path = write_hh(tmp_path / "hh.jsonl.gz", hh_records(entries))  # chosen and rejected: SFT reads `chosen`
    store, pretrained, tok = inputs
    target = copy_inputs(store, tmp_path / "store", [pretrained, tok])
    train = TrainConfig(batch_size=8, max_steps=8, warmup_steps=0, lr=3e-3, eval_every=8, eval_batches=4,
                        checkpoint_every=8, log_every=4)
    manifest = sft.STAGE.run(sft.SFTConfig(data=str(path), seq_len=256, train=train), [pretrained, tok], target)
    stats = manifest.stats
    assert stats["bad_lines"] == 0 and stats["entries_read"] == len(entries)
    assert stats["entries_read"] == sum(stats["conversations"].values()) + stats["skipped_too_long"]
    assert stats["skipped_malformed"] == 0 and stats["conversations_cropped"] > 0
    assert stats["val_response_loss"] < 0.9 * stats["pretrained_val_response_loss"]

    # Walk the rows written for training by their role tokens: the mask is true on every token
    # of an assistant turn (its text and its <|end|>) and on nothing else.
    roles = {chat.tokenizer.token_to_id(token): role for role, token in ROLE_TOKENS.items()}
    answers = {e[key].strip() for e in entries for key in ("chosen", "output")}
    questions = {human_turn(e).strip() for e in entries}
    said: dict[str, list[str]] = {"user": [], "assistant": []}
    for split in ("train", "val"):
        tokens, mask = instruction_data.read_rows(target.local_path(manifest, f"data/{split}.parquet"))
        for row, row_mask in zip(tokens.tolist(), mask.tolist()):
            role, turn = None, []
            for token, trained in zip(row, row_mask):
                if token in roles or token in (chat.bos_id, chat.pad_id):
                    assert not trained
                    role, turn = roles.get(token), []
                    continue
                assert trained == (role == "assistant"), f"a {role} token {'in' if trained else 'out of'} the mask"
                if token == chat.end_id:
                    said[role].append(chat.text_tokenizer.decode(turn))
                    role, turn = None, []
                else:
                    turn.append(token)
    assert set(said["assistant"]) <= answers, "assistant turns whole"
    assert all(any(q.endswith(u.strip()) for q in questions) for u in set(said["user"]) - questions), \
        "user turns whole, or (a cropped conversation's) cut at their start"
    turns = sum(i % 3 + 1 for i in range(len(entries)))  # a cropped conversation loses at most 2 earlier ones
    assert turns >= len(said["assistant"]) >= turns - 2 * stats["conversations_cropped"] > 0.95 * turns, \
        "every assistant turn is learned from, the earlier ones as well as the last"


def test_bad_inputs_are_clear_errors(inputs, tmp_path):
    store, pretrained, tok = inputs
    with pytest.raises(InputError, match=r"needs a model artifact and a tokenizer artifact"):
        sft.STAGE.run(config(), [tok, pretrained], store)
    with pytest.raises(InputError, match=r"not a trained model artifact \(no model/model.safetensors\)"):
        sft.STAGE.run(config(), [tok, tok], store)
    with pytest.raises(InputError, match="no such file or directory"):
        sft.STAGE.run(sft.SFTConfig(data=str(tmp_path / "missing.jsonl")), [pretrained, tok], store)
    bad = write_lines(tmp_path / "bad.jsonl", MALFORMED[1:3])
    with pytest.raises(InputError, match=re.escape(f"{bad}:1: not valid JSON")):
        sft.STAGE.run(sft.SFTConfig(data=str(bad), on_bad_line="error"), [pretrained, tok], store)
    with pytest.raises(InputError, match=r"no usable entries \(2 malformed\)"):
        sft.STAGE.run(sft.SFTConfig(data=str(bad)), [pretrained, tok], store)


def test_a_partial_train_section_keeps_the_stage_s_schedule():
    """`--set sft.train.max_steps=50` (or a preset naming a few settings) once reset the rest of
    the schedule to pretraining's defaults (lr 1e-3, warmup 50): the stage's own stay."""
    from model.dpo import DPOConfig
    from model.run_spec import TrainConfig

    for stage in (sft.SFTConfig, DPOConfig):
        given = stage.model_validate({"train": {"max_steps": 50}})
        assert given.train.max_steps == 50
        assert {k: getattr(given.train, k) for k in stage.train_defaults if k != "max_steps"} == \
            {k: v for k, v in stage.train_defaults.items() if k != "max_steps"}
        assert stage().train == TrainConfig(**stage.train_defaults)
    assert sft.SFTConfig.train_defaults["lr"] != TrainConfig().lr, "the point: not pretraining's rate"
