"""The training loop, run under `accelerate launch` (`python -m model.train RUN_JSON`), which only
starts the processes: ranks, devices, precision and DDP / FSDP2 are model/parallel.py's.

One flat loop, nanoGPT-style: config, data, model, optimizer, then steps. What varies between
pretraining and the alignment stages is the `Objective` (model/objectives.py: which batches,
which loss); the loop, the schedule, evaluation, logging and checkpoints (model/checkpoint.py)
are shared. The run's settings come in one `RunSpec` (model/run_spec.py), parsed once in `main`.

Everything a resumed run needs is in the latest checkpoint directory, none of it pickled:
weights and optimizer tensors as safetensors, the schedule position, the loader positions
and the RNG states as JSON. A run restarted after a kill continues from there and logs the
same per-step losses as a run that was never interrupted (bit-identical on CPU).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from safetensors.torch import load_file

from model.checkpoint import (
    WEIGHTS,
    full_model_state,
    latest_checkpoint,
    load_training_checkpoint,
    rewrite_lines,
    save_checkpoint,
    save_training_checkpoint,
)
from model.launch import exit_with_driver
from model.model import Transformer, parameter_groups
from model.objectives import OBJECTIVES
from model.parallel import Distributed, no_gradient_sync, parallelize, unwrap
from model.run_spec import RunSpec, TrainConfig

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

FINAL = "model"
METRICS = "metrics.jsonl"


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ the run


class Run:
    """One training run: its ranks (model/parallel.py), model, optimizer, objective and logs."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.out = spec.out_dir
        self.config: TrainConfig = spec.train
        self.model_config = spec.model
        self.tokenizer_dir = spec.tokenizer_dir
        self.dist = Distributed.from_env(self.config.precision)
        self.rank, self.world = self.dist.rank, self.dist.world
        self._check_world_size(spec.expected_world_size)
        _seed_everything(self.config.seed)
        self.objective = OBJECTIVES[spec.data.kind](spec, self.dist)
        self.parallelism = spec.parallelism
        self.model = self._build_model(spec.init_from)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.raw_model, self.config.weight_decay), lr=self.config.lr,
            betas=(self.config.beta1, self.config.beta2), fused=False,
        )
        self.scaler = torch.amp.GradScaler(self.dist.device.type) if self.dist.precision == "fp16" else None
        self.loader = self.objective.train_batches(self.rank, self.world)
        self.batches = iter(self.loader)
        self.step = 0
        self.tensorboard: SummaryWriter | None = None  # made by the first _log on rank 0

    def _check_world_size(self, expected: int | None) -> None:
        # `accelerate launch --cpu --num_processes 2` silently runs one process: refuse it.
        if expected and self.world != expected:
            raise SystemExit(f"kiln: asked for {expected} processes, accelerate started {self.world}; "
                             "check the launch flags")

    def _build_model(self, init_from: Path | None) -> torch.nn.Module:
        transformer = Transformer(self.model_config)
        if init_from:  # SFT from a pretrained model, DPO from an SFT model
            state = load_file(str(Path(init_from) / WEIGHTS))
            transformer.load_state_dict(state, strict=not self.model_config.tie_embeddings)
        transformer.activation_checkpointing = self.config.activation_checkpointing
        model = parallelize(transformer, self.parallelism, self.dist)
        if self.config.compile:
            model = cast(torch.nn.Module, torch.compile(model))  # a module in, an OptimizedModule out
        return model

    @property
    def raw_model(self) -> Transformer:
        return unwrap(self.model)

    # -------------------------------------------------------------- resume and save

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            return
        state = load_training_checkpoint(checkpoint, self.raw_model, self.optimizer, self.dist)
        self.loader.load_state_dict(state["loader"])
        self.batches = iter(self.loader)
        self.step = state["step"]
        self._truncate_metrics(self.step)
        self.log(f"resumed from {checkpoint.name} (step {self.step})")

    def save(self) -> None:
        save_training_checkpoint(self.out, self.step, self.raw_model, self.optimizer, self.dist,
                                 loaders=self.dist.gather_json(self.loader.state_dict()),
                                 keep=self.config.keep_checkpoints)

    def save_final(self) -> None:
        state = full_model_state(self.raw_model)  # every rank takes part in gathering the shards
        if self.dist.is_main:
            save_checkpoint(self.out / FINAL, state, self.model_config, self.tokenizer_dir,
                            extra={"step": self.step, "stage": self.spec.stage})
        self.dist.barrier()

    # -------------------------------------------------------------- logs

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(f"[{self.spec.stage}] {message}", flush=True)

    def record(self, values: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / METRICS, "a") as handle:
            handle.write(json.dumps(values) + "\n")
        if self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.out / self.spec.stage))
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tensorboard.add_scalar(key, value, values["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Forget what a killed run logged after its last checkpoint: those steps are redone."""
        path = self.out / METRICS
        if not self.dist.is_main or not path.exists():
            return
        rewrite_lines(path, [line for line in path.read_text().splitlines() if _step_of(line) <= step])

    # -------------------------------------------------------------- the loop

    def train(self) -> dict[str, float]:
        self.log(f"world_size={self.world} parallelism={self.parallelism if self.world > 1 else 'none'} "
                 f"device={self.dist.device} precision={self.dist.precision} "
                 f"params={self.raw_model.num_params(False):,}")
        self.resume()
        flops_per_token = self.raw_model.flops_per_token()
        peak = (_peak_flops(self.dist.device) or 0.0) * self.world
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
        if self.tensorboard is not None:
            self.tensorboard.close()
        return last_eval

    def _optimizer_step(self) -> tuple[float, dict[str, float], int]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        self.model.train()
        total, tokens = 0.0, 0
        extras: dict[str, float] = {}
        accum = self.config.grad_accum
        for micro in range(accum):
            batch = next(self.batches)
            tokens += self.objective.tokens_in(batch) * self.world
            with no_gradient_sync(self.model, self.parallelism, skip=micro < accum - 1):
                with self.dist.autocast():
                    loss, extra = self.objective.loss(self.model, batch)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach().float().item() / accum
            for key, value in extra.items():
                extras[key] = extras.get(key, 0.0) + value / accum
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = self.dist.mean([total, *extras.values()])
        return values[0], dict(zip(extras, values[1:])), tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with self.dist.autocast():
            metrics = self.objective.evaluate(self.model, self.rank, self.world, self.config.eval_batches)
        keys = sorted(metrics)
        return dict(zip(keys, (round(v, 6) for v in self.dist.mean([metrics[k] for k in keys]))))


def _format_row(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


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


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    exit_with_driver()  # killed with the `kiln` run that launched it, never orphaned
    spec = RunSpec.read(argv[0])  # parsed here, once; every part is a pydantic object from now on
    torch.use_deterministic_algorithms(True, warn_only=True)
    run = Run(spec)
    try:
        run.train()
    finally:
        run.dist.close()


if __name__ == "__main__":
    main()
