"""What a training run optimizes: pretraining, SFT and DPO each provide an Objective (which
batches, which loss, which held-out metrics); model/train.py's loop runs any of them.
`OBJECTIVES` picks one by the kind of data in the run's spec. These classes run inside the
training process; the stages that launch them are model/pretrain.py, sft.py and dpo.py.
"""

from __future__ import annotations

import gc
import itertools
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from model.checkpoint import load_checkpoint
from model.data import IndexLoader, TokenShardLoader
from model.evaluate import heldout_metrics, token_byte_lengths
from model.instruction_data import read_rows, read_table_columns, row_batch
from model.parallel import Distributed
from model.run_spec import DPOData, PretrainData, RunSpec, SFTData
from storage import ArtifactStore, atomic_file

REFERENCE_FILE = "reference_logps.safetensors"


class Objective(Protocol):
    """What a training run optimizes: pretraining, SFT and DPO each provide one."""

    def train_batches(self, rank: int, world_size: int) -> Any: ...  # iterable, with state_dict()
    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model, rank: int, world_size: int, batches: int) -> dict[str, float]: ...
    def tokens_in(self, batch) -> int: ...


def eval_indices(count: int, rank: int, world_size: int, limit: int) -> list[int]:
    """The held-out examples a rank evaluates: the same ones at every evaluation, and as many on
    every rank (no rank waits at a collective while another still runs)."""
    per_rank = max(1, min(limit, count // world_size))
    return [(rank + k * world_size) % count for k in range(per_rank)]


# ------------------------------------------------------------------ next token: pretraining, SFT


class NextTokenObjective:
    """The part pretraining and SFT share: batches of (inputs, targets) and the model's own
    cross-entropy, where targets of IGNORE_INDEX (padding, or SFT's masked prompt tokens) count for nothing."""

    device: torch.device

    def tokens_in(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = (t.to(self.device) for t in batch)
        _, loss = model(inputs, targets)
        return loss, {}


class PretrainObjective(NextTokenObjective):
    """Next-token cross-entropy on packed rows; validation loss, perplexity and bits per byte."""

    def __init__(self, spec: RunSpec, dist: Distributed):
        from tokenizers import Tokenizer

        data = spec.data
        assert isinstance(data, PretrainData) and spec.tokenizer_dir is not None, "a pretraining run's spec"
        self.loader_cls = TokenShardLoader
        self.store = ArtifactStore(data.store)
        self.pack = self.store.find(data.pack)
        self.config = spec.train
        self.device = dist.device
        tokenizer = Tokenizer.from_file(str(spec.tokenizer_dir / "tokenizer.json"))
        self.token_bytes = token_byte_lengths(tokenizer)

    def train_batches(self, rank: int, world_size: int):
        return self.loader_cls(self.store, self.pack, split="train", batch_size=self.config.batch_size,
                               seed=self.config.seed, rank=rank, world_size=world_size)

    def evaluate(self, model, rank: int, world_size: int, batches: int) -> dict[str, float]:
        """On the first `batches` validation batches: the same ones every time, so evaluations
        along the run are comparable."""
        loader = self.loader_cls(self.store, self.pack, split="val", batch_size=self.config.batch_size,
                                 seed=0, rank=rank, world_size=world_size)
        return heldout_metrics(model, itertools.islice(loader, batches), self.token_bytes, self.device)


@torch.no_grad()
def response_loss_sums(model, tokens: np.ndarray, mask: np.ndarray, batch_size: int, device) -> tuple[float, int]:
    """(nats, tokens) of the trained-on tokens of rows."""
    nats, counted = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        inputs, targets = (t.to(device) for t in row_batch(tokens[start:start + batch_size],
                                                          mask[start:start + batch_size]))
        logits, _ = model(inputs)
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=-100, reduction="sum")
        nats += losses.item()
        counted += int((targets != -100).sum())
    return nats, counted


class SFTObjective(NextTokenObjective):
    """Cross-entropy on the assistant's tokens of packed conversation rows."""

    def __init__(self, spec: RunSpec, dist: Distributed):
        data = spec.data
        assert isinstance(data, SFTData), "an SFT run's spec"
        self.config = spec.train
        self.device = dist.device
        self.train_tokens, self.train_mask = read_rows(data.rows["train"])
        self.val_tokens, self.val_mask = read_rows(data.rows["val"])

    def train_batches(self, rank: int, world_size: int) -> _RowBatches:
        return _RowBatches(self, IndexLoader(len(self.train_tokens), self.config.batch_size, self.config.seed,
                                             rank, world_size))

    def evaluate(self, model, rank: int, world_size: int, batches: int) -> dict[str, float]:
        keep = eval_indices(len(self.val_tokens), rank, world_size, batches * self.config.batch_size)
        nats, counted = response_loss_sums(model, self.val_tokens[keep], self.val_mask[keep],
                                           self.config.batch_size, self.device)
        return {"val_response_loss": nats / max(counted, 1)}


class _RowBatches:
    """An IndexLoader's batches as (inputs, targets) tensors of rows; its state is the loader's."""

    def __init__(self, objective: SFTObjective, loader: IndexLoader):
        self.objective, self.loader = objective, loader

    def __iter__(self):
        for indices in self.loader:
            yield row_batch(self.objective.train_tokens[indices], self.objective.train_mask[indices])

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


# ------------------------------------------------------------------ preferences: DPO


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


def collate(sequences: list[tuple[list[int], list[bool]]],
            pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class DPOObjective:
    """The DPO (or IPO) loss on preference pairs, against a frozen reference."""

    def __init__(self, spec: RunSpec, dist: Distributed):
        self.config = spec.train
        settings = spec.data
        assert isinstance(settings, DPOData) and spec.init_from is not None, "a DPO run's spec: it starts from a model"
        self.beta, self.kind, self.pad_id = settings.beta, settings.loss, settings.pad_id
        self.dist = dist
        self.device = dist.device
        self.data = {split: PairData(read_table_columns(path)) for split, path in settings.pairs.items()}
        self.reference_model = None
        self.reference_logps: dict[str, torch.Tensor] | None = None
        if settings.reference == "model":
            self.reference_model = self._load_reference(spec.init_from)
        else:
            path = spec.out_dir / REFERENCE_FILE
            if not path.exists():
                self.reference_model = self._load_reference(spec.init_from)
                self._precompute(path)
                self.reference_model = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.reference_logps = {name: t.to(self.device) for name, t in load_file(str(path)).items()}

    def _load_reference(self, model_dir: Path):
        model, _ = load_checkpoint(Path(model_dir), self.device)
        return model.requires_grad_(False).eval()

    @torch.no_grad()
    def _precompute(self, path: Path) -> None:
        """Log-probabilities of the reference on every pair, computed once (the ranks share the
        work) and kept beside the checkpoints, so a resumed run reads them back."""
        rank, world = self.dist.rank, self.dist.world
        found = []
        for split, data in self.data.items():
            mine = list(range(rank, len(data), world))
            for start in range(0, len(mine), self.config.batch_size):
                indices = mine[start:start + self.config.batch_size]
                logps = self._reference_logps(data, indices).cpu().tolist()
                found += [(split, i, c, r) for i, c, r in zip(indices, logps[:len(indices)], logps[len(indices):])]
        found = [item for part in self.dist.gather_json(found) for item in part]
        if self.dist.is_main:
            tensors = {f"{split}.{side}": torch.zeros(len(data), dtype=torch.float32)
                       for split, data in self.data.items() for side in ("chosen", "rejected")}
            for split, i, c, r in found:
                tensors[f"{split}.chosen"][i], tensors[f"{split}.rejected"][i] = c, r
            with atomic_file(path) as handle:
                handle.write(save(tensors))
        self.dist.barrier()

    def _reference_logps(self, data: PairData, indices) -> torch.Tensor:
        inputs, targets, mask = (t.to(self.device) for t in data.batch(indices, self.pad_id))
        with torch.no_grad(), self.dist.autocast():
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


OBJECTIVES: dict[str, type] = {"pretrain": PretrainObjective, "sft": SFTObjective, "dpo": DPOObjective}
