"""The DPO stage: Direct Preference Optimization from an SFT model, under accelerate.

Inputs: the SFT model artifact and the tokenizer artifact. Data: a local file or directory of
preference pairs, or by default pairs built offline from the standard library's documentation
(model/stdlib_qa.py), in any of these shapes (JSON list or JSONL):

    {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}
    {"instruction": ..., "input": ..., "chosen": "...", "rejected": "..."}      (Alpaca-style)
    {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}          (HH-RLHF transcripts)

also gzip'd (`.jsonl.gz`). An HH-RLHF pair is two whole transcripts that share all but the last
assistant turn: the shared turns are the prompt (Human -> user, Assistant -> assistant), the two
final turns the responses; transcripts that share no prompt are malformed entries.

A pair longer than a row is cropped from the left of its prompt (`crop_prompt` in
model/chat_format.py, as SFT crops a long conversation): the responses, where the two differ, are
what DPO learns from. A pair whose two conversations are the same tokens (the same response, or
the same once cut) carries no preference and is skipped: the manifest counts every entry read as
a pair used or skipped by reason.

For a prompt x and responses y_w (chosen), y_l (rejected), with the policy pi starting as the
SFT model and a frozen copy of it as the reference pi_ref:

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    sigmoid (DPO):  -log sigmoid(beta * h)          IPO:  (h - 1 / (2 beta))^2

log pi(y|x) sums the log-probabilities of the response tokens (the final assistant turn's content
and its `<|end|>`; earlier assistant turns of a multi-turn prompt are context). The reference is
either a copy of the model held by the objective (`reference: model`), or its log-probabilities
computed once before training (`precomputed`, kept in `reference_logps.safetensors` in the
artifact, reused on resume), so that no second model stays in memory. Metrics on train and
held-out pairs: loss, reward accuracy (chosen reward above rejected), reward margin, chosen and
rejected rewards, where a response's reward is beta * (log pi - log pi_ref). The loss and the
objective that runs in the training process are in model/objectives.py (`dpo_loss`,
`DPOObjective`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import pyarrow as pa
from pydantic import Field

from model.chat_format import ChatFormat, ChatTokens, check_messages, crop_prompt
from model.instruction_data import (
    BadEntry,
    alpaca_prompt,
    describe_data,
    hh_pair,
    split_holdout,
    string_field,
    write_table,
)
from model.run_spec import DPOData, RunSpec, TrainConfig
from model.training_stage import TUNING_STEPS, TuningConfig, prepare_tuning, run_training, training_stats
from storage import ArtifactStore, ArtifactWriter, ConfigError, InputError, Manifest, Stage


class DPOConfig(TuningConfig):
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (the KL weight).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's loss; ipo: the IPO loss.")
    reference: Literal["model", "precomputed"] = Field(
        "precomputed", description="model: a frozen copy of the starting model in memory; precomputed: its "
                                   "log-probabilities computed once before training.")
    train_defaults: ClassVar[dict[str, Any]] = {**TUNING_STEPS, "lr": 1e-4, "warmup_steps": 10}
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**DPOConfig.train_defaults))


def preference_pair(entry: Any) -> tuple[list[dict[str, str]], str, str]:
    """An entry of preference data as (prompt messages, chosen response, rejected response)."""
    if not isinstance(entry, dict):
        raise BadEntry(f"expected a JSON object, got {type(entry).__name__}")
    if "prompt" in entry:
        prompt = entry["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadEntry("field 'prompt' is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            try:
                messages = check_messages(prompt)
            except ValueError as err:
                raise BadEntry(f"field 'prompt': {err}") from None
            if messages[-1]["role"] != "user":
                raise BadEntry("field 'prompt' must end with a user message")
    elif "instruction" in entry:
        messages = alpaca_prompt(entry)
    elif "chosen" in entry:
        messages, chosen, rejected = hh_pair(entry)
        if not chosen or not rejected:
            raise BadEntry("the final assistant turn of 'chosen' or 'rejected' is empty")
        return messages, chosen, rejected
    else:
        raise BadEntry("expected 'prompt' (or 'instruction'), 'chosen' and 'rejected'")
    chosen, rejected = string_field(entry, "chosen"), string_field(entry, "rejected")
    if not chosen.strip() or not rejected.strip():
        raise BadEntry("field 'chosen' or 'rejected' is empty")
    return messages, chosen, rejected


class EncodedPair(NamedTuple):
    chosen: ChatTokens
    rejected: ChatTokens
    prompt_cropped: bool     # earlier turns, or the start of the prompt, left out
    responses_cut: bool      # a response longer than the row on its own, cut at its end


def encode_pair(chat: ChatFormat, prompt: list[dict[str, str]], chosen: str, rejected: str,
                max_len: int) -> EncodedPair | None:
    """Both conversations in at most max_len tokens each, with the same prompt: cropped from the
    left (`crop_prompt`) to leave room for the longer response whole. Only a response that does
    not fit even after the least of a prompt is cut, at its end. The mask is on the response
    alone (a prompt's earlier assistant turns are context, not y). None when either
    conversation has no response token left."""
    replies = [{"role": "assistant", "content": response} for response in (chosen, rejected)]
    longest = max(len(chat.encode([*prompt, reply], start=len(prompt))) for reply in replies)
    kept = crop_prompt(chat, prompt, max_len - longest)
    context = chat.encode(kept).ids
    pair = []
    for reply in replies:
        response = chat.encode([*kept, reply], start=len(kept))
        pair.append(ChatTokens(context + response.ids, [False] * len(context) + response.mask))
    cut = any(len(tokens) > max_len for tokens in pair)
    pair = [ChatTokens(tokens.ids[:max_len], tokens.mask[:max_len]) for tokens in pair]
    if not all(any(tokens.mask) for tokens in pair):
        return None
    return EncodedPair(pair[0], pair[1], kept != prompt, cut)


SKIP_REASONS = ("malformed", "identical", "identical_after_crop", "too_long")


def skip_reason(encoded: EncodedPair | None, chosen: str, rejected: str) -> str | None:
    """Why a pair is not trained on (None: it is). A pair of equal conversations has equal
    rewards whatever the policy: it teaches nothing and, counted, pulls the accuracy to chance."""
    if encoded is None:
        return "too_long"
    if encoded.chosen.ids == encoded.rejected.ids:
        return "identical" if chosen == rejected else "identical_after_crop"
    return None


def build_dpo(config: DPOConfig, inputs: list[Manifest], store: ArtifactStore,
              writer: ArtifactWriter) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kiln-dpo-") as scratch_dir:
        tuning = prepare_tuning("dpo", config, inputs, store, writer, Path(scratch_dir), preference_pair)
        pairs, out_dir, seq_len = tuning.entries, tuning.out_dir, tuning.model.seq_len
        train, val = split_holdout(pairs, [p[0] for p in pairs], config.holdout_fraction)
        if not val:
            raise ConfigError(f"dpo: nothing held out of {len(pairs)} pairs; raise holdout_fraction")
        chat = ChatFormat.from_dir(tuning.tokenizer_dir)
        # Every entry read is a pair used or skipped by reason: entries_read = sum(pairs) + sum(skipped_*).
        stats: dict[str, Any] = {**tuning.stats(), "entries_read": len(pairs) + len(tuning.bad), "pairs": {},
                                 **{f"skipped_{reason}": 0 for reason in SKIP_REASONS},
                                 "prompts_cropped": 0, "responses_cut": 0}
        stats["skipped_malformed"] = len(tuning.bad)
        for split, items in (("train", train), ("val", val)):
            columns: dict[str, list] = {"chosen": [], "chosen_mask": [], "rejected": [], "rejected_mask": []}
            for prompt, chosen, rejected in items:
                encoded = encode_pair(chat, prompt, chosen, rejected, seq_len + 1)
                reason = skip_reason(encoded, chosen, rejected)
                if reason is not None:
                    stats[f"skipped_{reason}"] += 1
                    continue
                assert encoded is not None  # else skip_reason says "too_long"
                stats["prompts_cropped"] += encoded.prompt_cropped
                stats["responses_cut"] += encoded.responses_cut
                for name, tokens in (("chosen", encoded.chosen), ("rejected", encoded.rejected)):
                    columns[name].append(tokens.ids)
                    columns[f"{name}_mask"].append(tokens.mask)
            if not columns["chosen"]:
                skipped = ", ".join(f"{reason} {stats['skipped_' + reason]}" for reason in SKIP_REASONS[1:])
                raise InputError(f"dpo: no usable {split} pair of {len(items)} in seq_len {seq_len} "
                                 f"(skipped so far: {skipped})")
            write_table(out_dir / "data" / f"{split}.parquet",
                        {k: pa.array(v, pa.list_(pa.bool_() if k.endswith("mask") else pa.int32()))
                         for k, v in columns.items()})
            stats["pairs"][split] = len(columns["chosen"])
        spec = RunSpec(
            stage="dpo", out_dir=out_dir, model=tuning.model, train=config.train,
            data=DPOData(pairs={split: out_dir / "data" / f"{split}.parquet" for split in ("train", "val")},
                         beta=config.beta, loss=config.loss, reference=config.reference, pad_id=chat.pad_id),
            tokenizer_dir=tuning.tokenizer_dir, init_from=tuning.model_dir,
        )
        run_training(spec, config.launch, store, writer)
        return {**training_stats(out_dir), **stats}


STAGE = Stage("dpo", DPOConfig, build_dpo, code_version="2", describe_sources=lambda c: describe_data(c.data))
