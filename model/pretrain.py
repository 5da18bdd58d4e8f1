"""The pretrain stage: next-token prediction on the packed token shards, under accelerate.

Inputs: a pack artifact and the tokenizer artifact it was packed with. The stage writes a run
spec and launches `model.train` with `accelerate launch`; the training process writes its
checkpoints, metrics and TensorBoard logs straight into the artifact's staging directory.
That directory survives a kill, so running the stage again resumes from the last checkpoint;
only a finished run is committed. The artifact: `model/` (weights, config, tokenizer),
`checkpoints/` (the last K training states), `metrics.jsonl`, `train.log`, the TensorBoard
run.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from model.evaluate import heldout_metrics, token_byte_lengths
from model.launch import LaunchConfig, run_accelerate
from model.train import FINAL, METRICS, NextTokenObjective, TrainConfig
from storage import ArtifactStore, ArtifactWriter, ConfigError, InputError, Manifest, Stage, StageConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ModelSettings(BaseModel):
    """The architecture (`pretrain.model`); vocab size and context length come from the inputs."""

    model_config = ConfigDict(extra="forbid")

    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int = Field(4, ge=1, description="Fewer than n_head: grouped-query attention.")
    d_model: int = Field(256, ge=8)
    ffn_hidden: int | None = Field(None, description="SwiGLU width; default ~8/3 d_model.")
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = 0.02


class PretrainConfig(StageConfig):
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


def local_copy(store: ArtifactStore, manifest: Manifest, names: tuple[str, ...], scratch: Path) -> Path:
    """A local directory holding the named files of an artifact (downloaded if the store is remote)."""
    if store.is_local:
        return store.local_path(manifest)
    target = scratch / f"{manifest.stage}-{manifest.short}"
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if any(f.path == name for f in manifest.files):
            with store.open(manifest, name) as src, open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def check_inputs(inputs: list[Manifest]) -> tuple[Manifest, Manifest]:
    stages = [m.stage for m in inputs]
    if stages != ["pack", "tokenizer"]:
        raise InputError(f"pretrain: needs a pack and a tokenizer artifact, got {stages}")
    pack, tokenizer = inputs
    if not pack.stats.get("rows_per_split", {}).get("val"):
        raise InputError(f"pack/{pack.short}: no validation rows; raise pack.val_fraction")
    pack_vocab, tokenizer_vocab = pack.stats.get("vocab_size"), tokenizer.stats.get("vocab_size")
    if pack_vocab != tokenizer_vocab:
        raise InputError(f"pack/{pack.short}: shards were made with vocab size {pack_vocab}, "
                         f"the tokenizer tokenizer/{tokenizer.short} has {tokenizer_vocab}")
    return pack, tokenizer


def model_dict(settings: ModelSettings, vocab_size: int, seq_len: int) -> dict[str, Any]:
    return {**settings.model_dump(), "vocab_size": vocab_size, "seq_len": seq_len}


def train_in_staging(stage: str, spec: dict, launch: LaunchConfig, store: ArtifactStore, writer: ArtifactWriter,
                     scratch: Path) -> Path:
    """Run `model.train` with its output in the artifact's staging directory (local stores), or in
    scratch space copied in afterwards (object stores: no resume across kills there)."""
    out_dir = writer.local_path("") if store.is_local else scratch / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "stage": stage, "out_dir": str(out_dir), "store": store.url}
    run_json = out_dir / "run.json"
    run_json.write_text(json.dumps(spec, indent=2))
    run_accelerate("model.train", run_json, launch, out_dir / "train.log")
    if not store.is_local:
        for path in sorted(out_dir.rglob("*")):
            if path.is_file():
                with writer.open(path.relative_to(out_dir).as_posix()) as handle:
                    handle.write(path.read_bytes())
    return out_dir


def training_stats(out_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    throughput = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    stats = {"steps": rows[-1]["step"], "final_train_loss": rows[-1]["loss"],
             "tokens_per_s": round(sum(throughput) / len(throughput), 1) if throughput else None,
             "loss_curve": [[r["step"], round(r["loss"], 5)] for r in rows]}
    if evals:
        stats.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
    return stats


def check_batches(pack: Manifest, train: TrainConfig, processes: int) -> None:
    """Each split must give every rank at least one batch (the loader cannot make one up)."""
    for split, rows in pack.stats.get("rows_per_split", {}).items():
        if rows < train.batch_size * processes:
            raise ConfigError(f"pack/{pack.short}: the {split} split has {rows} rows, fewer than one batch of "
                              f"{train.batch_size} for each of {processes} processes; lower train.batch_size "
                              f"or pack.seq_len, or raise pack.val_fraction")


def build_pretrain(config: PretrainConfig, inputs: list[Manifest], store: ArtifactStore,
                   writer: ArtifactWriter) -> dict[str, Any]:
    pack, tokenizer = check_inputs(inputs)
    check_batches(pack, config.train, config.launch.num_processes * config.launch.num_machines)
    with tempfile.TemporaryDirectory(prefix="kiln-pretrain-") as scratch_dir:
        scratch = Path(scratch_dir)
        spec = {
            "objective": "model.pretrain:PretrainObjective",
            "model": model_dict(config.model, pack.stats["vocab_size"], pack.stats["seq_len"]),
            "train": config.train.model_dump(),
            "pack": pack.fingerprint,
            "tokenizer_dir": str(local_copy(store, tokenizer, TOKENIZER_FILES, scratch)),
            "expected_world_size": config.launch.num_processes * config.launch.num_machines,
        }
        out_dir = train_in_staging("pretrain", spec, config.launch, store, writer, scratch)
        return {**training_stats(out_dir), "documents_in": pack.stats.get("documents_out")}


class PretrainObjective(NextTokenObjective):
    """Next-token cross-entropy on packed rows; validation loss, perplexity and bits per byte."""

    def __init__(self, spec: dict, run):
        from tokenizers import Tokenizer

        from model.data import TokenShardLoader

        self.loader_cls = TokenShardLoader
        self.store = ArtifactStore(spec["store"])
        self.pack = self.store.find(spec["pack"])
        self.config = TrainConfig(**spec["train"])
        self.device = run.accelerator.device
        tokenizer = Tokenizer.from_file(str(Path(spec["tokenizer_dir"]) / "tokenizer.json"))
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


STAGE = Stage("pretrain", PretrainConfig, build_pretrain, code_version="1")
