"""Checkpoints on disk, nothing pickled: a model is `model.safetensors` + `config.json` + the
tokenizer files; a training checkpoint (`checkpoints/step-NNNNNNNN/`) adds the optimizer's
tensors, every rank's RNG state and `training_state.json` (step, loader positions).

A checkpoint directory is written under a temporary name and renamed into place
(storage.atomic_dir), so a reader never sees half of one. `load_checkpoint` turns every way a
checkpoint can be broken into one clear `CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.model import ModelConfig, Transformer
from storage import TEMP_MARK, InputError, atomic_dir, atomic_write_bytes

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete or does not fit; the message is one line."""


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: unwrapped, contiguous, tied weights stored once."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        state.pop("head.weight", None)
    return state


def save_checkpoint(directory: Path, model: torch.nn.Module, config: ModelConfig,
                    tokenizer_dir: Path | None = None, extra: dict | None = None) -> None:
    atomic_dir(directory, lambda temp: write_model(temp, model, config, tokenizer_dir, extra))


def write_model(directory: Path, model: torch.nn.Module, config: ModelConfig, tokenizer_dir: Path | None = None,
                extra: dict | None = None) -> None:
    """The model's files into an existing directory (one being filled atomically)."""
    save_file(model_state(model), str(directory / WEIGHTS), metadata={"format": "pt"})
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
    model = Transformer(config).to(device)
    try:
        model.load_state_dict(state, strict=not config.tie_embeddings)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{weights}: does not fit its config ({first[1].strip() if len(first) > 1 else first[0]})") from None
    missing = set(model.state_dict()) - set(state) - ({"head.weight"} if config.tie_embeddings else set())
    if missing:
        raise CheckpointError(f"{weights}: missing tensors {sorted(missing)[:3]}")
    return model.eval(), meta


# ------------------------------------------------------------------ training state

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINING_STATE = "training_state.json"
OPTIMIZER = "optimizer.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def rank_state_dir(out_dir: Path, step: int) -> Path:
    """Where every rank leaves its RNG tensors for the checkpoint of `step` (temporary: rank 0
    copies them into the checkpoint, then removes it; a kill leaves a leftover marked as such)."""
    return Path(out_dir) / CHECKPOINTS / f".rng-step-{step:08d}{TEMP_MARK}ranks"


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(p for p in (Path(out_dir) / CHECKPOINTS).glob("step-*") if STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            name = f"state.{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch's (and CUDA's) as tensors, Python's and numpy's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
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


def save_training_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, config: ModelConfig,
                             tokenizer_dir: Path | None, optimizer: dict, loaders: dict, rngs: dict,
                             keep: int) -> Path:
    """Write `checkpoints/step-NNNNNNNN/` (the model, the optimizer state, every rank's RNG state
    from `rank_state_dir`, the loader positions) and keep only the last `keep` of them."""
    tensors, meta = optimizer_tensors(optimizer)
    ranks = rank_state_dir(out_dir, step)
    target = Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"

    def fill(temp: Path) -> None:
        write_model(temp, model, config, tokenizer_dir)
        save_file(tensors, str(temp / OPTIMIZER))
        for path in ranks.iterdir():
            shutil.copyfile(path, temp / path.name)
        (temp / TRAINING_STATE).write_text(json.dumps({"step": step, "optimizer": meta, "loaders": loaders,
                                                       "rng": rngs}))

    atomic_dir(target, fill)
    shutil.rmtree(ranks, ignore_errors=True)
    for old in sorted(p for p in target.parent.glob("step-*") if STEP_DIR.match(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_training_checkpoint(checkpoint: Path, rank: int) -> dict:
    """What a rank resumes from: {step, model, optimizer, rng_tensors, rng, loader}."""
    state = json.loads((checkpoint / TRAINING_STATE).read_text())
    return {
        "step": state["step"],
        "model": load_file(str(checkpoint / WEIGHTS)),
        "optimizer": optimizer_state(load_file(str(checkpoint / OPTIMIZER)), state["optimizer"]),
        "rng_tensors": load_file(str(checkpoint / rng_file(rank))),
        "rng": state["rng"][str(rank)],
        "loader": state["loaders"][str(rank)],
    }


def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace a line-oriented log (metrics.jsonl) atomically."""
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
