"""The training loop, run under `accelerate launch` (`python -m model.train RUN_JSON`).

One flat loop, nanoGPT-style: config, data, model, optimizer, then steps. What varies between
pretraining and the alignment stages is the `Objective` (which batches, which loss); the
loop, the schedule, evaluation, logging and checkpoints are shared.

Everything a resumed run needs is in the latest checkpoint directory, none of it pickled:
weights and optimizer tensors as safetensors, the schedule position, the loader positions
and the RNG states as JSON. A run restarted after a kill continues from there and logs the
same per-step losses as a run that was never interrupted (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from model.checkpoint import TOKENIZER_FILES, save_checkpoint, write_atomically
from model.model import ModelConfig, Transformer, parameter_groups

CHECKPOINTS = "checkpoints"
FINAL = "model"
METRICS = "metrics.jsonl"
STEP_DIR = re.compile(r"^step-(\d{8})$")


class TrainConfig(BaseModel):
    """The optimization settings (the `pretrain.train` / `sft.train` / `dpo.train` sections)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch, per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="The cosine decays to lr * this.")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="On matrices only: never norms, biases, embeddings.")
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = Field(1.0, description="Max global gradient norm; None: no clipping.")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="Training-state checkpoints kept (the last K).")
    log_every: int = Field(10, ge=1)
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it, else fp32.")
    compile: bool = Field(False, description="torch.compile the model.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ what is trained


class Objective(Protocol):
    """What a training run optimizes: pretraining, SFT and DPO each provide one."""

    def train_batches(self, rank: int, world_size: int) -> Any: ...  # iterable, with state_dict()
    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model, rank: int, world_size: int, batches: int) -> dict[str, float]: ...
    def tokens_in(self, batch) -> int: ...


class NextTokenObjective:
    """The part pretraining and SFT share: batches of (inputs, targets) and the model's own
    cross-entropy, where targets of -100 (padding, or SFT's masked prompt tokens) count for nothing."""

    device: torch.device

    def tokens_in(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = (t.to(self.device) for t in batch)
        _, loss = model(inputs, targets)
        return loss, {}


# ------------------------------------------------------------------ checkpoints of training state


def _tensor_state(prefix: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            name = f"{prefix}.{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(p for p in (out_dir / CHECKPOINTS).glob("step-*") if STEP_DIR.match(p.name))
    return steps[-1] if steps else None


# ------------------------------------------------------------------ the run


class Run:
    """One training run: its output directory, accelerator, model, optimizer and logs."""

    def __init__(self, spec: dict, objective_factory):
        from accelerate import Accelerator

        self.spec = spec
        self.out = Path(spec["out_dir"])
        self.config = TrainConfig(**spec["train"])
        self.model_config = ModelConfig(**spec["model"])
        self.tokenizer_dir = Path(spec["tokenizer_dir"]) if spec.get("tokenizer_dir") else None
        precision = _mixed_precision(self.config.precision)
        self.accelerator = Accelerator(mixed_precision=precision, log_with="tensorboard",
                                       project_dir=str(self.out), step_scheduler_with_optimizer=False)
        self._check_world_size(spec.get("expected_world_size"))
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        _seed_everything(self.config.seed)
        self.objective = objective_factory(spec, self)
        self.model = self._build_model(spec.get("init_from"))
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, self.config.weight_decay), lr=self.config.lr,
            betas=(self.config.beta1, self.config.beta2), fused=False,
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.loader = self.objective.train_batches(self.rank, self.world)
        self.batches = iter(self.loader)
        self.step = 0

    def _check_world_size(self, expected: int | None) -> None:
        # `accelerate launch --cpu --num_processes 2` silently runs one process: refuse it.
        if expected and self.accelerator.num_processes != expected:
            raise SystemExit(f"kiln: asked for {expected} processes, accelerate started "
                             f"{self.accelerator.num_processes}; check the launch flags")

    def _build_model(self, init_from: str | None) -> torch.nn.Module:
        model = Transformer(self.model_config)
        if init_from:  # SFT from a pretrained model, DPO from an SFT model
            state = load_file(str(Path(init_from) / "model.safetensors"))
            model.load_state_dict(state, strict=not self.model_config.tie_embeddings)
        model.activation_checkpointing = self.config.activation_checkpointing
        if self.config.compile:
            model = torch.compile(model)
        return model

    @property
    def raw_model(self) -> Transformer:
        model = self.accelerator.unwrap_model(self.model)
        return getattr(model, "_orig_mod", model)

    # -------------------------------------------------------------- resume and save

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            return
        state = json.loads((checkpoint / "training_state.json").read_text())
        self.raw_model.load_state_dict(load_file(str(checkpoint / "model.safetensors")),
                                       strict=not self.model_config.tie_embeddings)
        optimizer_tensors = load_file(str(checkpoint / "optimizer.safetensors"))
        self.optimizer.load_state_dict(_restore_optimizer_state(optimizer_tensors, state["optimizer"]))
        rank_rng = load_file(str(checkpoint / f"rng-rank{self.rank}.safetensors"))
        _set_rng_state(rank_rng, state["rng"][str(self.rank)])
        self.loader.load_state_dict(state["loaders"][str(self.rank)])
        self.batches = iter(self.loader)
        self.step = state["step"]
        self._truncate_metrics(self.step)
        self.log(f"resumed from {checkpoint.name} (step {self.step})")

    def save(self) -> None:
        """Training state every rank contributes to (loader positions, RNG), written by rank 0."""
        loaders = self.accelerator.gather_for_metrics([json.dumps(self.loader.state_dict())], use_gather_object=True)
        rng_tensors, rng_meta = _rng_state()
        rngs = self.accelerator.gather_for_metrics([json.dumps(rng_meta)], use_gather_object=True)
        rank_dir = self.out / CHECKPOINTS / f".rng-step-{self.step:08d}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        save_file(rng_tensors, str(rank_dir / f"rng-rank{self.rank}.safetensors"))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._write_checkpoint(
                {str(i): json.loads(s) for i, s in enumerate(loaders)},
                {str(i): json.loads(s) for i, s in enumerate(rngs)}, rank_dir,
            )
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, loaders: dict, rngs: dict, rank_dir: Path) -> None:
        optimizer_tensors, optimizer_meta = _tensor_state("state", self.optimizer.state_dict())
        target = self.out / CHECKPOINTS / f"step-{self.step:08d}"

        def fill(temp: Path) -> None:
            save_checkpoint(temp / "weights", self.raw_model, self.model_config, self.tokenizer_dir)
            for path in (temp / "weights").iterdir():
                path.rename(temp / path.name)
            (temp / "weights").rmdir()
            save_file(optimizer_tensors, str(temp / "optimizer.safetensors"))
            for path in rank_dir.iterdir():
                shutil.copyfile(path, temp / path.name)
            (temp / "training_state.json").write_text(json.dumps(
                {"step": self.step, "optimizer": optimizer_meta, "loaders": loaders, "rng": rngs}))

        write_atomically(target, fill)
        shutil.rmtree(rank_dir, ignore_errors=True)
        for old in sorted(p for p in (self.out / CHECKPOINTS).glob("step-*") if STEP_DIR.match(p.name))[
                : -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.out / FINAL, self.raw_model, self.model_config, self.tokenizer_dir,
                            extra={"step": self.step, "stage": self.spec.get("stage")})
        self.accelerator.wait_for_everyone()

    # -------------------------------------------------------------- logs

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[{self.spec.get('stage', 'train')}] {message}", flush=True)

    def record(self, values: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / METRICS, "a") as handle:
            handle.write(json.dumps(values) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"},
                             step=values["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Forget what a killed run logged after its last checkpoint: those steps are redone."""
        path = self.out / METRICS
        if not self.accelerator.is_main_process or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # -------------------------------------------------------------- the loop

    def train(self) -> dict[str, float]:
        self.log(f"world_size={self.world} device={self.accelerator.device} "
                 f"precision={self.accelerator.mixed_precision} params={self.raw_model.num_params(False):,}")
        self.resume()
        self.accelerator.init_trackers(self.spec.get("stage", "train"), config={"lr": self.config.lr})
        flops_per_token = self.raw_model.flops_per_token()
        peak = (_peak_flops(self.accelerator.device) or 0.0) * self.world
        last_eval: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.config.max_steps:
            loss, extra, tokens = self._optimizer_step()
            self.step += 1
            window_tokens += tokens
            row = {"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, self.config), **extra}
            if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
                elapsed = time.perf_counter() - window_start
                row["tokens_per_s"] = round(window_tokens / elapsed, 1)
                if peak:
                    row["mfu"] = round(flops_per_token * window_tokens / elapsed / peak, 4)
                self.log(_format_row(row))
                window_tokens, window_start = 0, time.perf_counter()
            if self.step % self.config.eval_every == 0 or self.step == self.config.max_steps:
                last_eval = self.evaluate()
                row.update(last_eval)
                self.log(_format_row({"step": self.step, **last_eval}))
            self.record(row)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.max_steps:
                self.save()
        self.save_final()
        self.accelerator.end_training()
        return last_eval

    def _optimizer_step(self) -> tuple[float, dict[str, float], int]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        self.model.train()
        total, extras, tokens = 0.0, {}, 0
        accum = self.config.grad_accum
        for micro in range(accum):
            batch = next(self.batches)
            tokens += self.objective.tokens_in(batch) * self.world
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)):
                with self.accelerator.autocast():
                    loss, extra = self.objective.loss(self.model, batch)
                self.accelerator.backward(loss / accum)
            total += loss.detach().float().item() / accum
            for key, value in extra.items():
                extras[key] = extras.get(key, 0.0) + value / accum
        if self.config.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = self.accelerator.reduce(torch.tensor([total, *extras.values()], device=self.accelerator.device), "mean")
        values = mean.tolist()
        return values[0], dict(zip(extras, values[1:])), tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with self.accelerator.autocast():
            metrics = self.objective.evaluate(self.model, self.rank, self.world, self.config.eval_batches)
        keys = sorted(metrics)
        reduced = self.accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=self.accelerator.device), "mean")
        return dict(zip(keys, (round(v, 6) for v in reduced.tolist())))


def _format_row(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Dense bf16 peak per GPU, for MFU; CPUs report none.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(argv[0]).read_text())
    objective = _objective_factory(spec["objective"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    Run(spec, objective).train()


def _objective_factory(name: str):
    import importlib

    module_name, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


if __name__ == "__main__":
    main()
