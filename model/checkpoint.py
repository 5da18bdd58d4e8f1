"""Checkpoints on disk, nothing pickled: a model is `model.safetensors` + `config.json` + the
tokenizer files; a training checkpoint (`checkpoints/step-NNNNNNNN/`) holds the model's and the
optimizer's state sharded as the ranks hold it (torch.distributed.checkpoint writing
safetensors, one file per rank; read back with resharding), every rank's RNG state and
`training_state.json` (step, loader positions).

A checkpoint directory is written under a temporary name and renamed into place
(storage.atomic_dir), so a reader never sees half of one. `load_checkpoint` turns every way a
checkpoint can be broken into one clear `CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.model import ModelConfig, Transformer, rope_tables
from storage import TEMP_MARK, InputError, atomic_dir, atomic_write_bytes, finish_dir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
log = logging.getLogger("kiln")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete or does not fit; the message is one line."""


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a plain (unsharded) model to save: contiguous, on the CPU."""
    return {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}


def save_checkpoint(directory: Path, model: torch.nn.Module | dict[str, torch.Tensor], config: ModelConfig,
                    tokenizer_dir: Path | None = None, extra: dict | None = None) -> None:
    """A model directory, written atomically, from a model or from its full state dict."""
    state = model if isinstance(model, dict) else model_state(model)
    atomic_dir(directory, lambda temp: write_model(temp, state, config, tokenizer_dir, extra))


def write_model(directory: Path, state: dict[str, torch.Tensor], config: ModelConfig,
                tokenizer_dir: Path | None = None, extra: dict | None = None) -> None:
    """The model's files into an existing directory (one being filled atomically); tied weights
    are stored once."""
    if config.tie_embeddings:
        state = {name: tensor for name, tensor in state.items() if name != "head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps({"model": config.to_dict(), **(extra or {})}, indent=2))
    for name in TOKENIZER_FILES:
        if tokenizer_dir is not None and (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, directory / name)


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {directory} is not a checkpoint") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """The model in eval mode and the checkpoint's config.json contents."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    meta = read_config(directory)
    try:
        config = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG}: not a Kiln model config ({err})") from None
    weights = directory / WEIGHTS
    try:
        state = load_file(str(weights), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or truncated ({err})") from None
    if "quantization" in meta:
        with torch.device("meta"):  # no full-precision weights allocated only to be replaced
            model = Transformer(config)
        return _load_quantized(model, state, meta, weights), meta
    model = Transformer(config).to(device)
    try:
        model.load_state_dict(state, strict=not config.tie_embeddings)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        reason = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{weights}: does not fit its config ({reason})") from None
    missing = set(model.state_dict()) - set(state) - ({"head.weight"} if config.tie_embeddings else set())
    if missing:
        raise CheckpointError(f"{weights}: missing tensors {sorted(missing)[:3]}")
    return model.eval(), meta


def _load_quantized(model: Transformer, state: dict[str, torch.Tensor], meta: dict, weights: Path) -> Transformer:
    """A quantize artifact's model (model/quantize.py): its int8/int4 layers in place."""
    from model.quantization import load_quantized

    spec = meta["quantization"]
    try:
        kernels = load_quantized(model, state, list(spec["layers"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights}: does not fit its quantization ({str(err).splitlines()[0]})") from None
    device = next(iter(state.values())).device
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(model.config.head_dim, model.config.seq_len,
                                                                          model.config.rope_theta))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{weights}: does not fit its quantization (no tensor for {left[0]})")
    log.info("%s: %s model; matmuls: %s", weights.parent, spec.get("method"),
             ", ".join(f"{count} by {kind}" for kind, count in sorted(kernels.items())))
    return model.eval()


# ------------------------------------------------------------------ training state

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINING_STATE = "training_state.json"
SHARDS = "state"  # the model's and the optimizer's tensors, one safetensors file per rank


def model_inputs(stage: str, model_stage: str, inputs: list) -> tuple:
    """(trained model, pack, tokenizer) manifests of a stage that reads a trained model with its
    data (quantize, evaluate), checked."""
    if [m.stage for m in inputs] != [model_stage, "pack", "tokenizer"]:
        raise InputError(f"{stage}: needs a {model_stage}, a pack and a tokenizer artifact, "
                         f"got {[m.stage for m in inputs]}")
    return tuple(inputs)


def check_holds_model(manifest) -> None:
    """The one test of "is this artifact a model?": its manifest lists `model/model.safetensors`."""
    if not any(f.path == f"model/{WEIGHTS}" for f in manifest.files):
        raise InputError(f"{manifest.stage}/{manifest.short}: not a trained model artifact (no model/{WEIGHTS})")


def artifact_checkpoint(store, manifest, scratch: Path | None = None) -> Path:
    """The checkpoint directory (`model/`) of a trained or quantized model artifact; with
    `scratch`, a local copy there when the store is remote."""
    check_holds_model(manifest)
    return store.local_dir(manifest, "model", scratch) if scratch is not None else store.local_path(manifest, "model")


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(p for p in (Path(out_dir) / CHECKPOINTS).glob("step-*") if STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch's (and CUDA's) as tensors, Python's and numpy's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)  # the default; numpy's stub types a bare call as legacy=False
    assert isinstance(numpy_state, tuple), "the legacy state: (kind, keys, pos, has_gauss, cached)"
    kind, keys, pos, has_gauss, cached = numpy_state
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _tensors_of(model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's and the optimizer's state as one flat dict of tensors (DTensor shards under
    FSDP2) for torch.distributed.checkpoint, and the optimizer's other values, JSON-able."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # creates Adam's moments if not there yet
    if model.config.tie_embeddings:
        model_state.pop("head.weight", None)  # the embedding's own tensor: stored once
    # torch types the values as any state a module may hold; a model's are tensors, an optimizer's
    # per-parameter state a dict per parameter
    tensors = {f"model.{name}": cast(torch.Tensor, tensor) for name, tensor in model_state.items()}
    scalars = {}
    for fqn, values in cast("dict[str, dict[str, Any]]", optimizer_state["state"]).items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{fqn}.{key}"] = value
            else:
                scalars[f"{fqn}.{key}"] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def save_training_checkpoint(out_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                             run, loaders: list, keep: int) -> Path:
    """`checkpoints/step-NNNNNNNN/`: every rank writes its shard of the model and optimizer state
    (torch.distributed.checkpoint, as safetensors: no pickle) and its RNG state; rank 0 adds
    `training_state.json` (step, optimizer settings, every rank's loader position and Python /
    numpy RNG) and puts the directory in place. The last `keep` checkpoints are kept.
    All ranks call this."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    checkpoints = Path(out_dir) / CHECKPOINTS
    target = checkpoints / f"step-{step:08d}"
    temp = checkpoints / f".step-{step:08d}{TEMP_MARK}ranks"  # one name all ranks agree on
    if run.is_main:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    run.barrier()
    tensors, optimizer_meta = _tensors_of(model, optimizer)
    save(tensors, storage_writer=HuggingFaceStorageWriter(str(temp / SHARDS), save_distributed=True))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(temp / rng_file(run.rank)))
    rngs = run.gather_json(rng_meta)
    run.barrier()
    if run.is_main:
        (temp / TRAINING_STATE).write_text(json.dumps({
            "step": step, "world_size": run.world, "optimizer": optimizer_meta,
            "loaders": {str(i): state for i, state in enumerate(loaders)},
            "rng": {str(i): state for i, state in enumerate(rngs)},
        }))
        finish_dir(temp, target)
        for old in sorted(p for p in checkpoints.glob("step-*") if STEP_DIR.match(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    run.barrier()
    return target


def load_training_checkpoint(checkpoint: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                             run) -> dict:
    """Restore the model's and the optimizer's state (each rank reads its shard) and this rank's
    RNG; returns {step, loader} for this rank. All ranks call this."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((checkpoint / TRAINING_STATE).read_text())
    if state.get("world_size", run.world) != run.world:
        raise CheckpointError(f"{checkpoint}: written by {state['world_size']} ranks; resume it with as many "
                              f"(this run has {run.world})")
    tensors, _ = _tensors_of(model, optimizer)
    load(tensors, storage_reader=HuggingFaceStorageReader(str(checkpoint / SHARDS)))
    model_state: dict[str, Any] = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_state: dict[str, Any] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            fqn, key = name.removeprefix("optim.").rsplit(".", 1)
            optimizer_state.setdefault(fqn, {})[key] = value
    for name, value in state["optimizer"]["scalars"].items():
        fqn, key = name.rsplit(".", 1)
        optimizer_state.setdefault(fqn, {})[key] = value
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": optimizer_state, "param_groups": state["optimizer"]["param_groups"]},
                   options=StateDictOptions(strict=not model.config.tie_embeddings))
    set_rng_state(load_file(str(checkpoint / rng_file(run.rank))), state["rng"][str(run.rank)])
    return {"step": state["step"], "loader": state["loaders"][str(run.rank)]}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (gathered from the shards under FSDP2; empty on
    the other ranks). All ranks call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast("dict[str, torch.Tensor]", state)  # a model's state: tensors (torch types any module state)


def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace a line-oriented log (metrics.jsonl) atomically."""
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
