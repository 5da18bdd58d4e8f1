"""The DPO stage: Direct Preference Optimization from an SFT model, under accelerate.

Inputs: the SFT model artifact and the tokenizer artifact. Data: a local file or directory of
preference pairs, or by default pairs built offline from the standard library's documentation
(model/stdlib_qa.py), in either of these shapes (JSON list or JSONL):

    {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}
    {"instruction": ..., "input": ..., "chosen": "...", "rejected": "..."}      (Alpaca-style)

For a prompt x and responses y_w (chosen), y_l (rejected), with the policy pi starting as the
SFT model and a frozen copy of it as the reference pi_ref:

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    sigmoid (DPO):  -log sigmoid(beta * h)          IPO:  (h - 1 / (2 beta))^2

log pi(y|x) sums the log-probabilities of the response tokens (the assistant's content and its
`<|end|>`, the SFT loss mask). The reference is either a copy of the model held by the
objective (`reference: model`), or its log-probabilities computed once before training
(`precomputed`, kept in `reference_logps.safetensors` in the artifact, reused on resume), so
that no second model stays in memory. Metrics on train and held-out pairs: loss, reward
accuracy (chosen reward above rejected), reward margin, chosen and rejected rewards, where a
response's reward is beta * (log pi - log pi_ref).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file

from model.chat_format import ChatFormat, ChatTokens, check_messages
from model.checkpoint import TOKENIZER_FILES, load_checkpoint
from model.launch import LaunchConfig
from model.pretrain import local_copy, train_in_staging, training_stats
from model.sft import (BadEntry, IndexLoader, alpaca_prompt, artifact_dir, check_model_inputs, describe_data,
                       eval_indices, load_data, model_settings, output_dir, read_table_columns, split_holdout,
                       string_field, write_table)
from model.train import TrainConfig
from storage import ArtifactStore, ArtifactWriter, ConfigError, InputError, Manifest, Stage, StageConfig

REFERENCE_FILE = "reference_logps.safetensors"


def dpo_train_defaults() -> TrainConfig:
    return TrainConfig(batch_size=16, max_steps=200, lr=1e-4, warmup_steps=10, eval_every=50, eval_batches=20,
                       checkpoint_every=100, log_every=10)


class DPOConfig(StageConfig):
    data: str | None = Field(None, description="Local preference data: a .json (list) or .jsonl file, or a directory "
                                               "of them. None: pairs built from the Python standard library's "
                                               "documentation (offline).")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs held out, by a stable hash of "
                                                                 "the prompt (the same prompts as in SFT).")
    on_bad_line: Literal["skip", "error"] = Field("skip", description="A malformed entry: skip it (logged and "
                                                                      "counted) or stop with an error.")
    seq_len: int | None = Field(None, ge=8, description="Most tokens of prompt + response; default: the model's.")
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (the KL weight).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's loss; ipo: the IPO loss.")
    reference: Literal["model", "precomputed"] = Field(
        "precomputed", description="model: a frozen copy of the starting model in memory; precomputed: its "
                                   "log-probabilities computed once before training.")
    train: TrainConfig = Field(default_factory=dpo_train_defaults)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (the rewards detached)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r} (expected sigmoid or ipo)")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


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
    else:
        raise BadEntry("expected 'prompt' (or 'instruction'), 'chosen' and 'rejected'")
    chosen, rejected = string_field(entry, "chosen"), string_field(entry, "rejected")
    if not chosen.strip() or not rejected.strip():
        raise BadEntry("field 'chosen' or 'rejected' is empty")
    return messages, chosen, rejected


def encode_pair(chat: ChatFormat, prompt: list[dict[str, str]], chosen: str, rejected: str,
                max_len: int) -> tuple[ChatTokens, ChatTokens] | None:
    """Both conversations, each cut to max_len tokens; None when either has no response left."""
    pair = []
    for response in (chosen, rejected):
        tokens = chat.encode([*prompt, {"role": "assistant", "content": response}])
        tokens = ChatTokens(tokens.ids[:max_len], tokens.mask[:max_len])
        if not any(tokens.mask):
            return None
        pair.append(tokens)
    return pair[0], pair[1]


def collate(sequences: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, target mask) [N, T], padded to the longest sequence."""
    width = max(len(ids) for ids, _ in sequences) - 1
    inputs = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (ids, trained) in enumerate(sequences):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        targets[i, :n] = torch.tensor(ids[1:])
        mask[i, :n] = torch.tensor(trained[1:])
    return inputs, targets, mask


def sequence_logps(model, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(token) over each sequence's masked targets: [N]."""
    logits, _ = model(inputs)
    logps = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


class PairData:
    """Encoded pairs of one split: chosen and rejected ids with their masks."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["chosen"])

    def batch(self, indices, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen sequences first, then rejected: [2B, T]."""
        c = self.columns
        sequences = [(c["chosen"][i], c["chosen_mask"][i]) for i in indices]
        sequences += [(c["rejected"][i], c["rejected_mask"][i]) for i in indices]
        return collate(sequences, pad_id)


def build_dpo(config: DPOConfig, inputs: list[Manifest], store: ArtifactStore, writer: ArtifactWriter) -> dict[str, Any]:
    start, tokenizer = check_model_inputs("dpo", inputs, ("sft", "dpo", "pretrain"))
    with tempfile.TemporaryDirectory(prefix="kiln-dpo-") as scratch_dir:
        scratch = Path(scratch_dir)
        model_dir = artifact_dir(store, start, "model", scratch)
        tokenizer_path = local_copy(store, tokenizer, TOKENIZER_FILES, scratch)
        model = model_settings(model_dir, tokenizer, config.seq_len)
        out_dir = output_dir(store, writer, scratch)
        pairs, bad, source = load_data(config, "dpo", out_dir, preference_pair)
        train, val = split_holdout(pairs, [p[0] for p in pairs], config.holdout_fraction)
        if not val:
            raise ConfigError(f"dpo: nothing held out of {len(pairs)} pairs; raise holdout_fraction")
        chat = ChatFormat.from_dir(tokenizer_path)
        stats: dict[str, Any] = {"data": source, "bad_lines": len(bad), "bad_line_examples": bad[:10],
                                 "seq_len": model["seq_len"], "pairs": {}, "dropped_too_long": 0}
        for split, items in (("train", train), ("val", val)):
            columns: dict[str, list] = {"chosen": [], "chosen_mask": [], "rejected": [], "rejected_mask": []}
            for prompt, chosen, rejected in items:
                encoded = encode_pair(chat, prompt, chosen, rejected, model["seq_len"] + 1)
                if encoded is None:
                    stats["dropped_too_long"] += 1
                    continue
                for name, tokens in zip(("chosen", "rejected"), encoded):
                    columns[name].append(tokens.ids)
                    columns[f"{name}_mask"].append(tokens.mask)
            if not columns["chosen"]:
                raise InputError(f"dpo: no {split} pair fits in seq_len {model['seq_len']}")
            write_table(out_dir / "data" / f"{split}.parquet",
                        {k: pa.array(v, pa.list_(pa.bool_() if k.endswith("mask") else pa.int32()))
                         for k, v in columns.items()})
            stats["pairs"][split] = len(columns["chosen"])
        spec = {
            "objective": "model.dpo:DPOObjective",
            "model": model,
            "train": config.train.model_dump(),
            "init_from": str(model_dir),
            "tokenizer_dir": str(tokenizer_path),
            "pairs": {split: str(out_dir / "data" / f"{split}.parquet") for split in ("train", "val")},
            "dpo": {"beta": config.beta, "loss": config.loss, "reference": config.reference,
                    "pad_id": chat.pad_id},
            "expected_world_size": config.launch.num_processes * config.launch.num_machines,
        }
        out_dir = train_in_staging("dpo", spec, config.launch, store, writer, scratch)
        return {**training_stats(out_dir), **stats, "init_from": f"{start.stage}/{start.fingerprint}"}


class DPOObjective:
    """The DPO (or IPO) loss on preference pairs, against a frozen reference."""

    def __init__(self, spec: dict, run):
        self.config = TrainConfig(**spec["train"])
        settings = spec["dpo"]
        self.beta, self.kind, self.pad_id = settings["beta"], settings["loss"], settings["pad_id"]
        self.accelerator = run.accelerator
        self.device = run.accelerator.device
        self.data = {split: PairData(read_table_columns(path)) for split, path in spec["pairs"].items()}
        self.reference_model = None
        self.reference_logps: dict[str, torch.Tensor] | None = None
        if settings["reference"] == "model":
            self.reference_model = self._load_reference(spec["init_from"])
        else:
            path = Path(spec["out_dir"]) / REFERENCE_FILE
            if not path.exists():
                self.reference_model = self._load_reference(spec["init_from"])
                self._precompute(path)
                self.reference_model = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.reference_logps = {name: t.to(self.device) for name, t in load_file(str(path)).items()}

    def _load_reference(self, model_dir: str):
        model, _ = load_checkpoint(Path(model_dir), self.device)
        return model.requires_grad_(False).eval()

    @torch.no_grad()
    def _precompute(self, path: Path) -> None:
        """Log-probabilities of the reference on every pair, computed once (the ranks share the
        work) and kept beside the checkpoints, so a resumed run reads them back."""
        from accelerate.utils import gather_object

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        found = []
        for split, data in self.data.items():
            mine = list(range(rank, len(data), world))
            for start in range(0, len(mine), self.config.batch_size):
                indices = mine[start:start + self.config.batch_size]
                logps = self._reference_logps(data, indices).cpu().tolist()
                found += [(split, i, c, r) for i, c, r in zip(indices, logps[:len(indices)], logps[len(indices):])]
        found = gather_object(found)
        if self.accelerator.is_main_process:
            tensors = {f"{split}.{side}": torch.zeros(len(data), dtype=torch.float32)
                       for split, data in self.data.items() for side in ("chosen", "rejected")}
            for split, i, c, r in found:
                tensors[f"{split}.chosen"][i], tensors[f"{split}.rejected"][i] = c, r
            temp = path.with_name(f".{path.name}.tmp")
            save_file(tensors, str(temp))
            temp.rename(path)
        self.accelerator.wait_for_everyone()

    def _reference_logps(self, data: PairData, indices) -> torch.Tensor:
        inputs, targets, mask = (t.to(self.device) for t in data.batch(indices, self.pad_id))
        with torch.no_grad(), self.accelerator.autocast():
            return sequence_logps(self.reference_model, inputs, targets, mask)

    def _reference(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_logps is not None:
            index = torch.as_tensor(np.asarray(indices), device=self.device)
            return (self.reference_logps[f"{split}.chosen"][index], self.reference_logps[f"{split}.rejected"][index])
        logps = self._reference_logps(self.data[split], indices)
        return logps[:len(indices)], logps[len(indices):]

    def train_batches(self, rank: int, world_size: int) -> IndexLoader:
        return IndexLoader(len(self.data["train"]), self.config.batch_size, self.config.seed, rank, world_size)

    def tokens_in(self, batch) -> int:
        return sum(len(self.data["train"].columns[side][i]) for side in ("chosen", "rejected") for i in batch)

    def _pair_metrics(self, model, split: str, indices) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, mask = (t.to(self.device) for t in self.data[split].batch(indices, self.pad_id))
        logps = sequence_logps(model, inputs, targets, mask)
        ref_chosen, ref_rejected = self._reference(split, indices)
        losses, chosen, rejected = dpo_loss(logps[:len(indices)], logps[len(indices):], ref_chosen, ref_rejected,
                                            self.beta, self.kind)
        return losses, {"reward_accuracy": (chosen > rejected).float(), "reward_margin": chosen - rejected,
                        "chosen_reward": chosen, "rejected_reward": rejected}

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses, metrics = self._pair_metrics(model, "train", batch.tolist())
        return losses.mean(), {k: v.mean().item() for k, v in metrics.items()}

    def evaluate(self, model, rank: int, world_size: int, batches: int) -> dict[str, float]:
        keep = eval_indices(len(self.data["val"]), rank, world_size, batches * self.config.batch_size)
        sums: dict[str, float] = {}
        for start in range(0, len(keep), self.config.batch_size):
            indices = keep[start:start + self.config.batch_size]
            losses, metrics = self._pair_metrics(model, "val", indices)
            for key, values in {"loss": losses, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + values.float().sum().item()
        return {f"val_{key}": total / len(keep) for key, total in sums.items()}


STAGE = Stage("dpo", DPOConfig, build_dpo, code_version="1", describe_sources=lambda c: describe_data(c.data))
