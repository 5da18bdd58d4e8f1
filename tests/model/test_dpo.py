"""DPO: the loss against its formula, preference data and its malformed lines (HH-RLHF's gzip'd
transcripts among them), long pairs cropped from the left, response log-probabilities, and the
stage with a reference model held in memory or precomputed, on HH-format data too."""

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import dpo, objectives
from model.chat_format import ChatFormat, crop_prompt
from model.instruction_data import data_files, read_entries
from model.run_spec import DPOData, RunSpec, TrainConfig
from pipelines.tokenizer import ASSISTANT, USER
from storage import ArtifactStore, InputError
from tests.model.test_chat_format import tokenizer_artifact
from tests.model.test_pretrain import copy_inputs
from tests.model.test_sft import (
    hh_records,
    human_turn,
    model_artifact,
    preference_entries,
    write_hh,
    write_lines,
)

INSTRUCT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "instruct"


# ------------------------------------------------------------------ the loss


def logps():
    """Hand-made log-probabilities of 4 pairs: (policy chosen, policy rejected, ref chosen, ref rejected)."""
    return (torch.tensor([-10.0, -20.0, -5.5, -31.0]), torch.tensor([-12.0, -18.0, -7.0, -30.0]),
            torch.tensor([-11.0, -19.0, -6.0, -30.5]), torch.tensor([-11.5, -19.5, -6.5, -29.0]))


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_difference():
    pc, pr, rc, rr = logps()
    losses, chosen, rejected = objectives.dpo_loss(pc, pr, rc, rr, beta=0.1, kind="sigmoid")
    for i in range(4):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * h))), rel=1e-6)
        assert chosen[i].item() == pytest.approx(0.1 * (pc[i].item() - rc[i].item()), abs=1e-6)
        assert rejected[i].item() == pytest.approx(0.1 * (pr[i].item() - rr[i].item()), abs=1e-6)
    # pair 0: h = 1 - (-0.5) = 1.5 by hand
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)


def test_the_loss_is_log_2_when_the_policy_is_the_reference():
    pc, pr, _, _ = logps()
    for beta in (0.1, 0.5, 2.0):
        losses, chosen, rejected = objectives.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, kind="sigmoid")
        assert torch.allclose(losses, torch.full((4,), math.log(2)))
        assert (chosen == 0).all() and (rejected == 0).all()


def test_ipo_loss_is_the_squared_distance_of_the_log_ratio_difference_to_half_over_beta():
    pc, pr, rc, rr = logps()
    losses, _, _ = objectives.dpo_loss(pc, pr, rc, rr, beta=0.25, kind="ipo")
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(losses, (h - 2.0) ** 2)
    assert losses[0].item() == pytest.approx((1.5 - 2.0) ** 2)
    same, _, _ = objectives.dpo_loss(pc, pr, pc, pr, beta=0.25, kind="ipo")
    assert torch.allclose(same, torch.full((4,), 4.0))


def test_gradients_raise_the_chosen_and_lower_the_rejected():
    pc, pr, rc, rr = (t.clone().requires_grad_(i < 2) for i, t in enumerate(logps()))
    losses, _, _ = objectives.dpo_loss(pc, pr, rc, rr, beta=0.1, kind="sigmoid")
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    with pytest.raises(ValueError, match="unknown DPO loss"):
        objectives.dpo_loss(pc, pr, rc, rr, beta=0.1, kind="hinge")


# ------------------------------------------------------------------ data


def test_preference_entries_in_both_shapes(tmp_path):
    lines = [
        json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}),
        json.dumps({"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}],
                    "chosen": "4", "rejected": "5"}),
        json.dumps({"instruction": "Rewrite politely.", "input": "Give me that.", "output": "x",
                    "chosen": "Could you pass that, please?", "rejected": "Hand it over."}),
        json.dumps({"prompt": "no rejected", "chosen": "x"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "chosen": "x", "rejected": "y"}),
        json.dumps({"prompt": "q", "chosen": ["x"], "rejected": "y"}),
        "{not json",
    ]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    pairs, bad = read_entries([path], dpo.preference_pair, "skip")
    assert pairs[0] == ([{"role": "user", "content": "Capital of France?"}], "Paris.", "Rome.")
    assert pairs[1][0][0] == {"role": "system", "content": "Be exact."}
    assert pairs[2] == ([{"role": "user", "content": "Rewrite politely.\n\nGive me that."}],
                        "Could you pass that, please?", "Hand it over.")
    assert bad == [f"{path}:4: missing field 'rejected'", f"{path}:5: field 'prompt' must end with a user message",
                   f"{path}:6: field 'chosen' must be a string, got list",
                   f"{path}:7: not valid JSON (Expecting property name enclosed in double quotes, column 2)"]
    with pytest.raises(InputError, match=re.escape(f"{path}:4: missing field 'rejected'")):
        read_entries([path], dpo.preference_pair, "error")


def test_real_preference_file_reads_whole():
    path = INSTRUCT / "rasbt_ch07_instruction-data-with-preference.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    pairs, bad = read_entries([path], dpo.preference_pair, "error")
    assert len(pairs) == 1100 and bad == []


def test_hh_pairs_split_into_the_shared_turns_and_two_responses(tmp_path):
    entries = preference_entries()
    records = hh_records(entries)
    first, second, own = entries[2 + 14], entries[2 + 7], entries[2]  # entry 2 has two earlier exchanges
    prompt, chosen, rejected = dpo.preference_pair(records[2])
    assert prompt == [{"role": "user", "content": human_turn(first)}, {"role": "assistant", "content": first["output"]},
                      {"role": "user", "content": human_turn(second)},
                      {"role": "assistant", "content": second["output"]}, {"role": "user", "content": human_turn(own)}]
    assert (chosen, rejected) == (own["chosen"], own["rejected"])
    assert dpo.preference_pair(records[0]) == ([{"role": "user", "content": human_turn(entries[0])}],
                                               entries[0]["chosen"], entries[0]["rejected"])

    transcript = records[4]["chosen"]
    other = records[5]["rejected"]
    malformed = [
        {"chosen": "Paris.", "rejected": "Rome."},                                   # no turns at all
        {"chosen": transcript, "rejected": other},                                   # different conversations
        {"chosen": transcript, "rejected": transcript + "\n\nHuman: and then?"},     # ends with a human turn
        {"chosen": transcript, "rejected": transcript.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:  "},
    ]
    path = write_hh(tmp_path / "bad.jsonl.gz", records[:2] + malformed)
    pairs, bad = read_entries([path], dpo.preference_pair, "skip")
    assert len(pairs) == 2
    assert bad == [f"{path}:3: field 'chosen' is not an HH-RLHF transcript: no '\\n\\nAssistant:' turn",
                   f"{path}:4: fields 'chosen' and 'rejected' do not share a prompt (they differ at turn 1)",
                   f"{path}:5: field 'rejected': the transcript does not end with an assistant turn",
                   f"{path}:6: the final assistant turn of 'chosen' or 'rejected' is empty"]
    with pytest.raises(InputError, match=re.escape(f"{path}:3: field 'chosen' is not an HH-RLHF transcript")):
        read_entries([path], dpo.preference_pair, "error")


def test_a_gzipped_jsonl_file_is_read_as_it_streams(tmp_path):
    records = hh_records(preference_entries())
    (tmp_path / "hh").mkdir()
    path = write_hh(tmp_path / "hh" / "train.jsonl.gz", records)
    plain = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in records])
    assert data_files(str(tmp_path / "hh")) == [path], "a directory's .jsonl.gz files are data files"
    pairs, bad = read_entries([path], dpo.preference_pair, "error")
    assert len(pairs) == len(records) == 1100 and bad == []
    assert pairs == read_entries([plain], dpo.preference_pair, "error")[0]
    as_list = tmp_path / "list.json.gz"
    as_list.write_bytes(gzip.compress(json.dumps(records[:3], indent=2).encode()))
    assert read_entries([as_list], dpo.preference_pair, "error")[0] == pairs[:3]

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=re.escape(f"{cut}: not readable (Compressed file ended")):
        read_entries([cut], dpo.preference_pair, "skip")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("dpo"))
    tok = tokenizer_artifact(store)
    return store, model_artifact(store, "sft", tok, seed=1), tok


def test_sequence_logps_sum_the_response_tokens_only(inputs):
    from model.checkpoint import load_checkpoint

    store, trained, tok = inputs
    model, _ = load_checkpoint(store.local_path(trained, "model"))
    chat = ChatFormat.from_dir(store.local_path(tok))
    prompt = [{"role": "user", "content": "Which module provides `dumps`?"}]
    chosen, rejected, _, _ = dpo.encode_pair(chat, prompt, "The `json` module.", "No idea", 64)
    inputs_, targets, mask = objectives.collate([(chosen.ids, chosen.mask), (rejected.ids, rejected.mask)], chat.pad_id)
    with torch.no_grad():
        got = objectives.sequence_logps(model, inputs_, targets, mask)
        for row, tokens in enumerate((chosen, rejected)):
            logits, _ = model(torch.tensor([tokens.ids[:-1]]))
            logp = F.log_softmax(logits[0].float(), -1)
            response = [i for i in range(1, len(tokens.ids)) if tokens.mask[i]]
            expected = sum(logp[i - 1, tokens.ids[i]].item() for i in response)
            assert got[row].item() == pytest.approx(expected, rel=1e-5)
            assert tokens.ids[response[-1]] == chat.end_id and len(response) < len(tokens.ids) - 5


def test_a_long_pair_is_cropped_from_the_left_so_that_its_responses_survive(inputs):
    store, _, tok = inputs
    chat = ChatFormat.from_dir(store.local_path(tok))
    pairs = [dpo.preference_pair(r) for r in hh_records(preference_entries())]
    user, assistant = chat.tokenizer.token_to_id(USER), chat.tokenizer.token_to_id(ASSISTANT)

    def reply(text: str) -> list[int]:
        return [assistant, *chat.text_tokenizer.encode(text, add_special_tokens=False).ids, chat.end_id]

    # What a right cut to 129 tokens did to this data: a third of the pairs token-identical.
    def right_cut(prompt, response):
        return chat.encode([*prompt, {"role": "assistant", "content": response}]).ids[:129]

    assert sum(right_cut(p, c) == right_cut(p, r) for p, c, r in pairs) > len(pairs) / 3
    for max_len in (129, 65):
        reasons, modes = [], {"whole turns": 0, "start of the question": 0}
        for prompt, chosen, rejected in pairs:
            encoded = dpo.encode_pair(chat, prompt, chosen, rejected, max_len)
            reasons.append(dpo.skip_reason(encoded, chosen, rejected))
            assert encoded is not None
            for response, tokens in ((chosen, encoded.chosen), (rejected, encoded.rejected)):
                assert len(tokens) <= max_len and tokens.ids[:2] == [chat.bos_id, user]
                if encoded.responses_cut:
                    continue
                assert tokens.ids[-len(reply(response)):] == reply(response), "the response whole, at the end"
                assert sum(tokens.mask) == len(reply(response)) - 1, "and the loss on it alone, past its role token"
            if encoded.prompt_cropped and not encoded.responses_cut:
                room = max_len - max(len(reply(chosen)), len(reply(rejected)))
                kept = crop_prompt(chat, prompt, room)
                if len(kept) > 1 or kept[0] == prompt[-1]:
                    assert kept == prompt[-len(kept):] and kept[0]["role"] == "user"
                    modes["whole turns"] += 1
                else:
                    assert prompt[-1]["content"].endswith(kept[0]["content"]) and kept[0]["role"] == "user"
                    modes["start of the question"] += 1
        same = sum(c == r for _, c, r in pairs)
        if max_len == 129:
            assert reasons.count(None) == len(pairs) - same, "only the pairs the data itself makes equal are left out"
        assert reasons.count("identical") == same == 6
        assert modes["whole turns"] > 100 and (max_len == 129 or modes["start of the question"] > 50), modes

    # Responses alone longer than the row: cut at their end, and, if nothing that differs is left, skipped.
    prompt = [{"role": "user", "content": "Describe the module."}]
    shared = "The json module encodes and decodes JSON documents, " * 4
    encoded = dpo.encode_pair(chat, prompt, shared + "politely.", shared + "rudely.", 40)
    assert encoded.responses_cut and len(encoded.chosen) == len(encoded.rejected) == 40
    assert dpo.skip_reason(encoded, shared + "politely.", shared + "rudely.") == "identical_after_crop"


# ------------------------------------------------------------------ the stage


def config(**overrides) -> dpo.DPOConfig:
    train = TrainConfig(batch_size=8, max_steps=12, warmup_steps=0, lr=3e-3, eval_every=12, eval_batches=2,
                        checkpoint_every=12, log_every=1)
    return dpo.DPOConfig(train=train, seq_len=48, **overrides)


def metrics(store: ArtifactStore, manifest) -> list[dict]:
    return [json.loads(line) for line in store.local_path(manifest, "metrics.jsonl").read_text().splitlines()]


def pair_files(chat: ChatFormat, directory: Path, count: int = 20) -> dict[str, str]:
    """Encoded pairs of both splits, as the stage writes them."""
    from model.instruction_data import write_table

    paths = {}
    for split in ("train", "val"):
        columns = {"chosen": [], "chosen_mask": [], "rejected": [], "rejected_mask": []}
        for i in range(count):
            prompt = [{"role": "user", "content": f"What is {i} + {i}? ({split})"}]
            chosen, rejected, _, _ = dpo.encode_pair(chat, prompt, f"It is {2 * i}.", f"Maybe {i}, who knows", 64)
            for name, tokens in (("chosen", chosen), ("rejected", rejected)):
                columns[name].append(tokens.ids)
                columns[f"{name}_mask"].append(tokens.mask)
        paths[split] = str(directory / f"{split}.parquet")
        write_table(Path(paths[split]), columns)
    return paths


def test_a_precomputed_reference_gives_the_losses_of_the_reference_model(inputs, tmp_path):
    from model.checkpoint import load_checkpoint, read_config
    from model.model import ModelConfig
    from model.parallel import Distributed

    store, trained, tok = inputs
    chat = ChatFormat.from_dir(store.local_path(tok))
    model_dir = store.local_path(trained, "model")
    pairs = pair_files(chat, tmp_path)

    def spec(reference: str) -> RunSpec:
        return RunSpec(stage="dpo", out_dir=tmp_path, model=ModelConfig(**read_config(model_dir)["model"]),
                       train=TrainConfig(batch_size=4), init_from=model_dir,
                       data=DPOData(pairs=pairs, beta=0.1, loss="sigmoid", reference=reference, pad_id=chat.pad_id))

    run = Distributed.from_env("fp32")
    held = objectives.DPOObjective(spec("model"), run)
    precomputed = objectives.DPOObjective(spec("precomputed"), run)
    assert held.reference_model is not None and precomputed.reference_model is None
    assert (tmp_path / objectives.REFERENCE_FILE).exists()

    policy, _ = load_checkpoint(model_dir)
    batch = next(iter(held.train_batches(0, 1)))
    loss, extras = precomputed.loss(policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and extras["reward_margin"] == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.02 * torch.randn_like(param))
    moved, moved_extras = precomputed.loss(policy, batch)
    assert moved.item() != pytest.approx(math.log(2), abs=1e-4)
    assert moved.item() == pytest.approx(held.loss(policy, batch)[0].item(), rel=1e-6)
    with torch.no_grad():
        assert precomputed.evaluate(policy, 0, 1, 2) == pytest.approx(held.evaluate(policy, 0, 1, 2), rel=1e-6)
    again = objectives.DPOObjective(spec("precomputed"), run)
    assert again.reference_model is None, "computed once: a resumed run reads the file back"


@pytest.mark.slow
def test_dpo_stage_moves_the_policy_towards_the_chosen_responses(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny matrices: one thread each on a shared machine
    store, trained, tok = inputs
    target = copy_inputs(store, tmp_path, [trained, tok])
    manifest = dpo.STAGE.run(config(), [trained, tok], target)
    assert any(f.path == objectives.REFERENCE_FILE for f in manifest.files), "the default reference is precomputed"
    rows = metrics(target, manifest)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5), "policy = reference at the first step"
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    later = rows[len(rows) // 2:]
    assert sum(r["loss"] for r in later) / len(later) < math.log(2) - 0.02, "the policy prefers the chosen more"
    stats = manifest.stats
    for key in ("val_loss", "val_reward_accuracy", "val_reward_margin", "val_chosen_reward", "val_rejected_reward"):
        assert math.isfinite(stats[key])
    assert stats["pairs"]["val"] > 50 and stats["data"].startswith("stdlib docs")
    assert stats["val_reward_margin"] == pytest.approx(stats["val_chosen_reward"] - stats["val_rejected_reward"],
                                                       abs=1e-4)
    assert json.loads(target.local_path(manifest, "model/config.json").read_text())["stage"] == "dpo"


@pytest.mark.slow
def test_dpo_on_hh_rlhf_data_learns_the_preference_and_accounts_for_every_entry(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    records = hh_records(preference_entries())
    path = write_hh(tmp_path / "hh-rlhf.jsonl.gz", records, (
        json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}),
        json.dumps({"chosen": records[0]["chosen"], "rejected": records[1]["rejected"]})))
    store, trained, tok = inputs
    target = copy_inputs(store, tmp_path / "store", [trained, tok])
    train = TrainConfig(batch_size=16, max_steps=40, warmup_steps=0, lr=3e-3, eval_every=40, eval_batches=8,
                        checkpoint_every=40, log_every=5)
    manifest = dpo.STAGE.run(dpo.DPOConfig(data=str(path), seq_len=64, train=train), [trained, tok], target)
    stats = manifest.stats
    skipped = {key: stats[key] for key in stats if key.startswith("skipped_")}
    print(f"HH-format DPO: held-out reward accuracy {stats['val_reward_accuracy']:.3f} on {stats['pairs']['val']} "
          f"pairs; {stats['entries_read']} read, {stats['pairs']}, {skipped}, "
          f"{stats['prompts_cropped']} prompts cropped, {stats['responses_cut']} responses cut")
    assert stats["entries_read"] == len(records) + 2 == sum(stats["pairs"].values()) + sum(skipped.values())
    assert skipped["skipped_malformed"] == stats["bad_lines"] == 2
    assert skipped["skipped_identical"] == 6 and skipped["skipped_identical_after_crop"] >= 1
    assert stats["prompts_cropped"] > len(records) / 2
    assert stats["pairs"]["val"] > 90 and stats["val_reward_accuracy"] > 0.6
    assert stats["val_reward_margin"] > 0


def test_dpo_needs_a_model_and_a_tokenizer(inputs):
    store, trained, tok = inputs
    with pytest.raises(InputError, match=r"dpo: needs a model artifact and a tokenizer"):
        dpo.STAGE.run(config(), [tok], store)
