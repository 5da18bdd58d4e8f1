"""What the training stages (pretrain, sft, dpo) share on the launcher side: their common
settings, their inputs checked, the run handed to `model.train` (a RunSpec, run under
`accelerate launch`) with the artifact's staging directory as its output, and the stats read back.

The staging directory survives a kill, so running the stage again resumes from the last
checkpoint; only a finished run is committed. On an object store the run writes to scratch
space and its files are uploaded when it finishes (no resume across kills there).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from model.checkpoint import check_holds_model, read_config
from model.instruction_data import load_data
from model.launch import LaunchConfig, run_accelerate
from model.model import ModelConfig
from model.run_spec import RunSpec, TrainConfig
from model.train import METRICS
from storage import ArtifactStore, ArtifactWriter, ConfigError, InputError, Manifest, StageConfig

# Fine-tuning: a lower peak rate and far fewer steps than pretraining (sft and dpo set lr, warmup).
TUNING_STEPS = dict(batch_size=16, max_steps=200, eval_every=50, eval_batches=20, checkpoint_every=100, log_every=10)


class TuningConfig(StageConfig):
    """The settings SFT and DPO share: their data, its hold-out, the row length and the launch.

    Each stage's `train_defaults` is its schedule, the one place it is written: a `train` section
    that names some settings (`--set sft.train.max_steps=50`, a preset's YAML) keeps the stage's
    defaults for the rest, not TrainConfig's pretraining ones."""

    train_defaults: ClassVar[dict[str, Any]] = {}

    data: str | None = Field(None, description="Local data: a .json (list) or .jsonl file, or a directory of them. "
                                               "None: built from the Python standard library's documentation "
                                               "(offline).")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share held out for validation, by a stable hash "
                                                                 "of the prompt (the same prompts in SFT and DPO).")
    on_bad_line: Literal["skip", "error"] = Field(
        "skip", description="A malformed entry: skip it (logged as file:line: reason, and counted) or stop "
                            "with an error naming file and line.")
    seq_len: int | None = Field(None, ge=8, description="Tokens per row (prompt + response); default: the "
                                                        "starting model's.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="before")
    @classmethod
    def _train_over_the_stage_s_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("train", {}), dict):
            return {**data, "train": {**cls.train_defaults, **data.get("train", {})}}
        return data


def check_model_inputs(stage: str, inputs: list[Manifest]) -> tuple[Manifest, Manifest]:
    """(model, tokenizer): a model is any artifact that holds one (which stages make them is the
    stage table's to say), checked by `check_holds_model`."""
    names = [m.stage for m in inputs]
    if len(inputs) != 2 or names[1] != "tokenizer":
        raise InputError(f"{stage}: needs a model artifact and a tokenizer artifact, got {names}")
    trained, tokenizer = inputs
    check_holds_model(trained)
    return trained, tokenizer


@dataclass
class Tuning:
    """What an SFT or DPO build starts from: the model, its tokenizer, the data, where to write."""

    start: Manifest          # the model artifact tuned
    model_dir: Path
    tokenizer_dir: Path
    model: ModelConfig       # its architecture, with this stage's row length
    out_dir: Path
    entries: list[Any]       # the data, parsed
    bad: list[str]           # `file:line: reason` of each malformed entry skipped
    source: str

    def stats(self) -> dict[str, Any]:
        return {"data": self.source, "bad_lines": len(self.bad), "bad_line_examples": self.bad[:10],
                "seq_len": self.model.seq_len, "init_from": f"{self.start.stage}/{self.start.fingerprint}"}


def prepare_tuning(kind: Literal["sft", "dpo"], config: TuningConfig, inputs: list[Manifest], store: ArtifactStore,
                   writer: ArtifactWriter, scratch: Path, parse: Callable[[Any], Any]) -> Tuning:
    start, tokenizer = check_model_inputs(kind, inputs)
    model_dir = store.local_dir(start, "model", scratch)
    out_dir = output_dir(store, writer, scratch)
    entries, bad, source = load_data(config, kind, out_dir, parse)
    model = model_config_of(model_dir, tokenizer, config.seq_len)
    return Tuning(start, model_dir, store.local_dir(tokenizer, "", scratch), model, out_dir, entries, bad, source)


def model_config_of(model_dir: Path, tokenizer: Manifest, seq_len: int | None) -> ModelConfig:
    """The trained model's architecture, with the row length of this stage."""
    settings = dict(read_config(model_dir)["model"])
    if tokenizer.stats.get("vocab_size") not in (None, settings["vocab_size"]):
        raise InputError(f"{model_dir}: the model has a vocabulary of {settings['vocab_size']}, the tokenizer "
                         f"tokenizer/{tokenizer.short} has {tokenizer.stats['vocab_size']}")
    return ModelConfig(**{**settings, "seq_len": seq_len or settings["seq_len"]})


def check_batches(rows_per_split: dict[str, int], where: str, train: TrainConfig, processes: int) -> None:
    """Each split must give every rank at least one batch (the loader cannot make one up)."""
    for split, rows in rows_per_split.items():
        if rows < train.batch_size * processes:
            raise ConfigError(f"{where}: the {split} split has {rows} rows, fewer than one batch of "
                              f"{train.batch_size} for each of {processes} processes; lower train.batch_size "
                              f"or the row length, or hold out more")


def output_dir(store: ArtifactStore, writer: ArtifactWriter, scratch: Path) -> Path:
    """Where the training process writes: the artifact's staging directory on local stores (it
    survives a kill: a rerun resumes), scratch space otherwise (uploaded by `run_training`)."""
    path = writer.local_path("") if store.is_local else scratch / "out"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_training(spec: RunSpec, launch: LaunchConfig, store: ArtifactStore, writer: ArtifactWriter) -> Path:
    """Write the spec, completed with the launch settings, into its output directory and run
    `model.train` on it under accelerate."""
    spec = spec.model_copy(update={"expected_world_size": launch.world_size,
                                   "parallelism": launch.parallelism})
    run_accelerate("model.train", spec.write(), launch, spec.out_dir / "train.log", lock_fd=writer.lock_fd)
    if not store.is_local:
        writer.write_tree(spec.out_dir)
    return spec.out_dir


def training_stats(out_dir: Path, eval_key: str = "val_loss") -> dict[str, Any]:
    """Steps, final loss, throughput, the loss curve and the last evaluation's `val_*` metrics."""
    rows = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines()]
    evals = [r for r in rows if eval_key in r]
    throughput = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    stats = {"steps": rows[-1]["step"], "final_train_loss": rows[-1]["loss"],
             "tokens_per_s": round(sum(throughput) / len(throughput), 1) if throughput else None,
             "loss_curve": [[r["step"], round(r["loss"], 5)] for r in rows]}
    if evals:
        stats.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
    return stats
