"""The SFT stage: supervised fine-tuning of a pretrained model on conversations, under accelerate.

Inputs: a trained model artifact (pretrain: its `model/` directory) and the tokenizer artifact.
Data: a local file or directory of instruction data in the common formats, or, by default, Q&A
built offline from the standard library's documentation (model/stdlib_qa.py):

    Alpaca-style   {"instruction": ..., "input": ..., "output": ...}   as a JSON list or JSONL
    messages       {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   JSONL
    HH-RLHF        {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}   JSONL; the
                   `chosen` transcript as messages (Human -> user, Assistant -> assistant)

any of them gzip'd (`.jsonl.gz`, read as it streams).

Each conversation is rendered with the tokenizer's chat template (model/chat_format.py), the
loss mask covering what the assistant says; a stable hash of the prompt holds out
`holdout_fraction` of them. Short conversations are packed into rows of `seq_len + 1` tokens,
each led by BOS as documents are in pretraining, the mask carried along. A conversation longer
than a row is cropped from the left as DPO crops a prompt (`fit_conversation`, `crop_prompt` in
model/chat_format.py), so that its final assistant turn, the answer learned from, survives whole;
one whose final answer does not fit even after the least of a prompt is skipped. The manifest
accounts for every entry read: `entries_read` = the conversations used + `skipped_malformed` +
`skipped_too_long`, with `conversations_cropped` (among those used) beside them. The rows go to
`data/{train,val}.parquet` in the artifact, and the
shared training loop (model/train.py) starts from the pretrained weights with `SFTObjective`:
cross-entropy on the assistant's tokens only (model/objectives.py). Checkpoints and resume work
as in pretraining. Reading the data files: model/instruction_data.py.

The held-out metric is `val_response_loss` (nats per assistant token); the pretrained model's
value on the same rows is measured once before training (`baseline.json`) and recorded as
`pretrained_val_response_loss` beside the SFT model's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from model.chat_format import ChatFormat, ChatTokens, check_messages, crop_prompt
from model.checkpoint import load_checkpoint
from model.instruction_data import (
    BadEntry,
    alpaca_prompt,
    describe_data,
    hh_transcript,
    read_rows,
    split_holdout,
    string_field,
    write_rows,
)
from model.objectives import eval_indices, response_loss_sums
from model.run_spec import RunSpec, SFTData, TrainConfig
from model.training_stage import TUNING_STEPS, TuningConfig, prepare_tuning, run_training, training_stats
from storage import ArtifactStore, ArtifactWriter, ConfigError, InputError, Manifest, Stage, atomic_write_bytes


class SFTConfig(TuningConfig):
    train_defaults: ClassVar[dict[str, Any]] = {**TUNING_STEPS, "lr": 3e-4, "warmup_steps": 20}
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**SFTConfig.train_defaults))


def sft_conversation(entry: Any) -> list[dict[str, str]]:
    """An entry of instruction data as chat messages."""
    if not isinstance(entry, dict):
        raise BadEntry(f"expected a JSON object, got {type(entry).__name__}")
    if "messages" in entry:
        try:
            messages = check_messages(entry["messages"])
        except ValueError as err:
            raise BadEntry(str(err)) from None
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise BadEntry("no assistant message to learn from")
        return messages
    if "instruction" not in entry and "chosen" in entry:
        messages = hh_transcript(string_field(entry, "chosen"), "chosen")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise BadEntry("field 'chosen': no assistant turn to learn from")
        return messages
    if "instruction" not in entry:
        raise BadEntry("expected 'messages', 'instruction' and 'output', or an HH-RLHF 'chosen' transcript")
    output = string_field(entry, "output")
    if not output.strip():
        raise BadEntry("field 'output' is empty")
    return [*alpaca_prompt(entry), {"role": "assistant", "content": output}]


def fit_conversation(chat: ChatFormat, messages: list[dict[str, str]],
                     row_len: int) -> tuple[ChatTokens | None, bool]:
    """The conversation's ids and loss mask in at most row_len tokens, and whether it was cropped.

    One that fits is encoded whole. A longer one keeps its final assistant turn (the last one
    with content: the answer learned from) whole, and what came before it cropped from the left
    (`crop_prompt`): the earliest whole turns, then the start of the final user turn; turns after
    that answer, which teach nothing, go too. None when even the answer after the least of a
    prompt (an empty user turn's markup) is longer than a row."""
    encoded = chat.encode(messages)
    if len(encoded) <= row_len:
        return encoded, False
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"])
    room = row_len - len(chat.encode(messages[:last + 1], start=last))
    kept = crop_prompt(chat, messages[:last], room)
    encoded = chat.encode([*kept, messages[last]])
    return (encoded if len(encoded) <= row_len else None), True


def pack_conversations(encoded: list[ChatTokens], row_len: int, pad_id: int,
                       window: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Conversations (each led by BOS, none longer than row_len) packed into rows of row_len:
    (tokens, mask) [rows, row_len]. First fit among the last `window` rows still open."""
    rows: list[ChatTokens] = []
    for conversation in encoded:
        if len(conversation) > row_len:
            raise ValueError(f"a conversation of {len(conversation)} tokens does not fit in a row of {row_len}")
        for row in rows[-window:]:
            if len(row) + len(conversation) <= row_len:
                row.ids += conversation.ids
                row.mask += conversation.mask
                break
        else:
            rows.append(ChatTokens(list(conversation.ids), list(conversation.mask)))
    tokens = np.full((len(rows), row_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), row_len), dtype=bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row.ids
        mask[i, :len(row)] = row.mask
    return tokens, mask


def conversation_rows(chat: ChatFormat, conversations: list[list[dict[str, str]]],
                      row_len: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The conversations fitted to rows (`fit_conversation`) and packed: (tokens, mask, counts),
    counts saying how many were used (`cropped` among them) and skipped as too long."""
    encoded, counts = [], {"used": 0, "cropped": 0, "skipped_too_long": 0}
    for messages in conversations:
        tokens, cropped = fit_conversation(chat, messages, row_len)
        if tokens is None:
            counts["skipped_too_long"] += 1
            continue
        counts["used"] += 1
        counts["cropped"] += cropped
        encoded.append(tokens)
    return (*pack_conversations(encoded, row_len, chat.pad_id), counts)


def build_sft(config: SFTConfig, inputs: list[Manifest], store: ArtifactStore,
              writer: ArtifactWriter) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kiln-sft-") as scratch_dir:
        tuning = prepare_tuning("sft", config, inputs, store, writer, Path(scratch_dir), sft_conversation)
        conversations, out_dir, seq_len = tuning.entries, tuning.out_dir, tuning.model.seq_len
        prompts = [c[:max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
        train, val = split_holdout(list(zip(conversations, prompts)), prompts, config.holdout_fraction)
        if not val:
            raise ConfigError(f"sft: nothing held out of {len(conversations)} conversations; raise holdout_fraction")
        chat = ChatFormat.from_dir(tuning.tokenizer_dir)
        # Every entry read is a conversation used or skipped by reason:
        # entries_read = sum(conversations) + skipped_malformed + skipped_too_long.
        stats: dict[str, Any] = {**tuning.stats(), "entries_read": len(conversations) + len(tuning.bad),
                                 "conversations": {}, "skipped_malformed": len(tuning.bad), "skipped_too_long": 0,
                                 "conversations_cropped": 0, "rows": {}, "trainable_tokens": {}}
        for split, items in (("train", train), ("val", val)):
            tokens, mask, counts = conversation_rows(chat, [c for c, _ in items], seq_len + 1)
            if len(tokens) == 0:
                raise InputError(f"sft: no {split} conversation of {len(items)} fits in seq_len {seq_len} "
                                 f"(even its final assistant turn is longer)")
            write_rows(out_dir / "data" / f"{split}.parquet", tokens, mask)
            stats["conversations"][split] = counts["used"]
            stats["skipped_too_long"] += counts["skipped_too_long"]
            stats["conversations_cropped"] += counts["cropped"]
            stats["rows"][split] = len(tokens)
            stats["trainable_tokens"][split] = int(mask[:, 1:].sum())
        baseline = pretrained_response_loss(tuning.model_dir, out_dir, config.train)
        spec = RunSpec(
            stage="sft", out_dir=out_dir, model=tuning.model, train=config.train,
            data=SFTData(rows={split: out_dir / "data" / f"{split}.parquet" for split in ("train", "val")}),
            tokenizer_dir=tuning.tokenizer_dir, init_from=tuning.model_dir,
        )
        run_training(spec, config.launch, store, writer)
        return {**training_stats(out_dir, "val_response_loss"), "pretrained_val_response_loss": baseline, **stats}


def pretrained_response_loss(model_dir: Path, out_dir: Path, train: TrainConfig) -> float:
    """The starting model's held-out response loss, on the rows a single process evaluates;
    measured once and kept in baseline.json (a resumed build reads it back)."""
    path = out_dir / "baseline.json"
    if path.exists():
        return json.loads(path.read_text())["val_response_loss"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint(model_dir, device)
    tokens, mask = read_rows(out_dir / "data" / "val.parquet")
    keep = eval_indices(len(tokens), 0, 1, train.eval_batches * train.batch_size)
    nats, counted = response_loss_sums(model, tokens[keep], mask[keep], train.batch_size, device)
    del model
    loss = round(nats / max(counted, 1), 6)
    atomic_write_bytes(path, json.dumps({"val_response_loss": loss, "tokens": counted}).encode())
    return loss


STAGE = Stage("sft", SFTConfig, build_sft, code_version="2", describe_sources=lambda c: describe_data(c.data))
