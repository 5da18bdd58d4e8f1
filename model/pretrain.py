"""The pretrain stage: next-token prediction on the packed token shards, under accelerate.

Inputs: a pack artifact and the tokenizer artifact it was packed with. The stage hands
`model.train` a RunSpec (model/run_spec.py) and launches it with `accelerate launch`
(model/training_stage.py); the training process writes its checkpoints, metrics and
TensorBoard logs straight into the artifact's staging directory, so running the stage again
after a kill resumes from the last checkpoint. The artifact: `model/` (weights, config,
tokenizer), `checkpoints/` (the last K training states), `metrics.jsonl`, `train.log`, the
TensorBoard run. The objective itself is `PretrainObjective` (model/objectives.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from model.launch import LaunchConfig
from model.model import ModelConfig, ModelShape
from model.run_spec import PretrainData, RunSpec, TrainConfig
from model.training_stage import check_batches, output_dir, run_training, training_stats
from storage import ArtifactStore, ArtifactWriter, InputError, Manifest, Stage, StageConfig


class PretrainConfig(StageConfig):
    model: ModelShape = Field(default_factory=ModelShape)
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    sample_prompt: str = Field("The", description="Continued by the trained model; the continuation is in the stats.")
    sample_tokens: int = Field(60, ge=1, description="Tokens of that sample.")


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


def build_pretrain(config: PretrainConfig, inputs: list[Manifest], store: ArtifactStore,
                   writer: ArtifactWriter) -> dict[str, Any]:
    pack, tokenizer = check_inputs(inputs)
    processes = config.launch.world_size
    check_batches(pack.stats.get("rows_per_split", {}), f"pack/{pack.short}", config.train, processes)
    with tempfile.TemporaryDirectory(prefix="kiln-pretrain-") as scratch_dir:
        scratch = Path(scratch_dir)
        spec = RunSpec(
            stage="pretrain", out_dir=output_dir(store, writer, scratch),
            model=ModelConfig(**config.model.model_dump(), vocab_size=pack.stats["vocab_size"],
                              seq_len=pack.stats["seq_len"]),
            train=config.train,
            data=PretrainData(store=store.url, pack=pack.fingerprint),
            tokenizer_dir=store.local_dir(tokenizer, "", scratch),
        )
        out_dir = run_training(spec, config.launch, store, writer)
        return {**training_stats(out_dir), "documents_in": pack.stats.get("documents_out"),
                "sample": sample(out_dir, config.sample_prompt, config.sample_tokens)}


def sample(out_dir: Path, prompt: str, tokens: int) -> str:
    """The trained model's continuation of `prompt`, as nanoGPT prints one after training: the
    summary shows it (a chat-tuned model is shown answering a chat instead, see evaluate)."""
    from model.chat import load_for_generation, sample_document
    from model.train import FINAL

    return sample_document(load_for_generation(out_dir / FINAL), prompt, tokens)


STAGE = Stage("pretrain", PretrainConfig, build_pretrain, code_version="2")  # 2: the sample
