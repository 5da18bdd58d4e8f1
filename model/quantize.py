"""The quantize stage: a trained model (pretrain, sft or dpo) with its weights in int8 or int4.

Methods (the math in model/quantization.py, AWQ's search in model/awq.py):

* `int8`: every matrix int8, one scale per output channel;
* `int4-rtn`: the blocks' linear layers int4 by round-to-nearest in groups of `group_size` inputs;
* `int4-awq`: the same after AWQ's activation-aware rescaling, searched on calibration rows;

with the int4 methods, the embedding (and the head, tied or not) are int8 per row: they hold
most of a small model's weights and the head's errors go straight into every logit.

Calibration rows are the last `calibration_rows` rows of the pack's `val` split (evaluation
reads the split from its start). The artifact's `model/` is a checkpoint directory like any
other (config.json says how it is quantized), so `kiln generate`, `kiln chat` and the
evaluate stage load it with model.checkpoint.load_checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator

from model.checkpoint import WEIGHTS, artifact_checkpoint, load_checkpoint, model_inputs, write_model
from model.model import Transformer
from model.quantization import QuantizedWeight, linear_names, quantize_int4, quantize_int8
from storage import ArtifactStore, ArtifactWriter, InputError, Manifest, Stage, StageConfig

METHODS = ("int8", "int4-rtn", "int4-awq")


class QuantizeConfig(StageConfig):
    model: Literal["pretrain", "sft", "dpo"] = Field("dpo", description="Which trained model of the chain to quantize.")
    method: Literal["int8", "int4-rtn", "int4-awq"] = Field(
        "int4-awq", description="int8 per channel; int4 in groups by round-to-nearest, or after AWQ's scaling.")
    group_size: int = Field(128, ge=32, description="int4: inputs per scale and zero (a multiple of 32).")
    calibration_rows: int = Field(64, ge=1, description="int4-awq: rows of the val split the scales are searched on.")
    awq_grid: int = Field(20, ge=1, description="int4-awq: alphas tried per layer group (0, 1/grid, ...).")
    awq_clip: bool = Field(False, description="int4-awq: also clip each weight group's range (llm-awq's auto_clip); "
                                              "raised perplexity on the kiln run model, see model/awq.py.")

    @field_validator("group_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"{value} is not a multiple of 32")
        return value


def calibration_rows(store: ArtifactStore, pack: Manifest, rows: int) -> torch.Tensor:
    """The last `rows` rows of the val split as [rows, seq_len] input ids."""
    shards = sorted(f.path for f in pack.files_under("val") if f.path.endswith(".parquet"))
    taken: list[list[int]] = []
    for path in reversed(shards):
        with store.open(pack, path) as handle:
            tokens = pq.read_table(handle, columns=["tokens"]).column("tokens").to_pylist()
        taken = tokens[-(rows - len(taken)):] + taken
        if len(taken) >= rows:
            break
    if not taken:
        raise InputError(f"pack/{pack.short}: no val rows to calibrate on")
    return torch.tensor(taken, dtype=torch.long)[:, :-1]


def quantize_model(model: Transformer, method: str, group_size: int, calibration: torch.Tensor | None = None,
                   grid: int = 20, clip: bool = False) -> tuple[dict[str, QuantizedWeight], dict]:
    """The quantized weights of `model` by name (`embed`, `head`, `blocks.i....`); AWQ rescales
    the model in place first. Also returns what was chosen (AWQ's alphas)."""
    report: dict[str, Any] = {}
    if method == "int4-awq":
        from model.awq import awq_scale

        if calibration is None:
            raise ValueError("int4-awq needs calibration rows")
        report["awq"] = awq_scale(model, calibration, group_size, grid, clip=clip)
    weights: dict[str, QuantizedWeight] = {}
    for name in linear_names(model):
        weight = model.get_parameter(f"{name}.weight")
        weights[name] = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group_size)
    weights["embed"] = quantize_int8(model.embed.weight)  # per row: per token, and per output of a tied head
    weights["head"] = weights["embed"] if model.config.tie_embeddings else quantize_int8(model.head.weight)
    return weights, report


def quantized_state(model: torch.nn.Module, weights: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """What `model/model.safetensors` holds: the unquantized tensors (norms) and each quantized
    matrix's values, scales and zeros; a tied head is stored once, as `embed`."""
    quantized = {f"{name}.weight" for name in weights}
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if name not in quantized}
    for name, weight in weights.items():
        if not (name == "head" and weight is weights["embed"]):
            state.update(weight.tensors(f"{name}."))
    return state


def build_quantize(config: QuantizeConfig, inputs: list[Manifest], store: ArtifactStore,
                   writer: ArtifactWriter) -> dict[str, Any]:
    trained, pack, _tokenizer = model_inputs("quantize", config.model, inputs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as scratch:
        source = artifact_checkpoint(store, trained, Path(scratch))
        model, meta = load_checkpoint(source)
        if "quantization" in meta:
            raise InputError(f"{trained.stage}/{trained.short}: already quantized")
        calibration = calibration_rows(store, pack, config.calibration_rows) if config.method == "int4-awq" else None
        weights, report = quantize_model(model, config.method, config.group_size, calibration, config.awq_grid,
                                         config.awq_clip)
        spec = {"method": config.method, "bits": 8 if config.method == "int8" else 4,
                "group_size": None if config.method == "int8" else config.group_size,
                "layers": sorted(weights), "source": f"{trained.stage}/{trained.fingerprint}"}
        out = writer.local_path("model") if store.is_local else Path(scratch) / "out"
        out.mkdir(parents=True, exist_ok=True)
        kept = {k: v for k, v in meta.items() if k not in ("model", "quantization")}
        write_model(out, quantized_state(model, weights), model.config, source, extra={"quantization": spec, **kept})
        if not store.is_local:
            writer.write_tree(out, "model")
        source_bytes = (source / WEIGHTS).stat().st_size
        quantized_bytes = (out / WEIGHTS).stat().st_size
    stats: dict[str, Any] = {**spec, "bytes": quantized_bytes, "source_bytes": source_bytes,
             "size_ratio": round(quantized_bytes / source_bytes, 4), "seconds": round(time.perf_counter() - started, 2),
             "calibration_tokens": int(calibration.numel()) if calibration is not None else 0}
    if "awq" in report:
        groups = [v for v in report["awq"].values() if "alpha" in v]
        clips = [v["mean_ratio"] for v in report["awq"].values() if "mean_ratio" in v]
        stats["awq"] = {"groups": report["awq"], "mean_alpha": round(sum(g["alpha"] for g in groups) / len(groups), 3),
                        "mean_error_vs_rtn": round(sum(g["error_vs_rtn"] for g in groups) / len(groups), 4),
                        **({"mean_clip_ratio": round(sum(clips) / len(clips), 4)} if clips else {})}
    del stats["layers"]
    return stats


STAGE = Stage("quantize", QuantizeConfig, build_quantize, code_version="1")
