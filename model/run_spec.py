"""What a training stage tells the training process: one `run.json`, written by the stage and
parsed once (`RunSpec.read`) by `model.train`, where every part is the same pydantic object the
stage had: the model (`ModelConfig`), the optimization settings (`TrainConfig`) and the
objective's data (`PretrainData`, `SFTData`, `DPOData`; model/objectives.py picks the
objective by its `kind`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.model import ModelConfig
from storage import atomic_write_bytes

RUN_FILE = "run.json"


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
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; None: no clipping.")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="Training-state checkpoints kept (the last K).")
    log_every: int = Field(10, ge=1)
    seed: int = Field(1337, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it, else fp32.")
    compile: bool = Field(False, description="torch.compile the model.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class PretrainData(BaseModel):
    """Next-token prediction on a pack artifact's token shards."""

    kind: Literal["pretrain"] = "pretrain"
    store: str    # the artifact store's URL
    pack: str     # the pack artifact's fingerprint


class SFTData(BaseModel):
    """Packed conversation rows with their loss masks (model/instruction_data.py)."""

    kind: Literal["sft"] = "sft"
    rows: dict[str, Path]   # split -> Parquet file


class DPOData(BaseModel):
    """Preference pairs, and how the DPO loss treats them (the dpo section's settings)."""

    kind: Literal["dpo"] = "dpo"
    pairs: dict[str, Path]  # split -> Parquet file
    beta: float
    loss: Literal["sigmoid", "ipo"]
    reference: Literal["model", "precomputed"]
    pad_id: int


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    out_dir: Path
    model: ModelConfig
    train: TrainConfig
    data: Annotated[PretrainData | SFTData | DPOData, Field(discriminator="kind")]
    tokenizer_dir: Path | None = None     # copied into every checkpoint
    init_from: Path | None = None         # a checkpoint to start from (SFT, DPO)
    # from the stage's launch settings (model/training_stage.py run_training)
    expected_world_size: int = 1
    parallelism: Literal["ddp", "fsdp"] = "ddp"

    def write(self) -> Path:
        path = self.out_dir / RUN_FILE
        atomic_write_bytes(path, self.model_dump_json(indent=2).encode())
        return path

    @classmethod
    def read(cls, path: str | Path) -> RunSpec:
        return cls.model_validate_json(Path(path).read_bytes())
