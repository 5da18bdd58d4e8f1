"""Checkpoints on disk: `model.safetensors` + `config.json` + the tokenizer files, nothing pickled.

A checkpoint directory is written under a temporary name and renamed into place, so a reader
never sees half of one. `load_checkpoint` turns every way a checkpoint can be broken into one
clear `CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.model import ModelConfig, Transformer
from storage import InputError, swap_into_place

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


def write_atomically(target: Path, fill) -> None:
    """Call fill(temp_dir), then rename temp_dir to target (replacing an older one)."""
    target = Path(target)
    temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    temp.mkdir(parents=True)
    try:
        fill(temp)
        for path in temp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        swap_into_place(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def save_checkpoint(directory: Path, model: torch.nn.Module, config: ModelConfig,
                    tokenizer_dir: Path | None = None, extra: dict | None = None) -> None:
    def fill(temp: Path) -> None:
        save_file(model_state(model), str(temp / WEIGHTS), metadata={"format": "pt"})
        (temp / CONFIG).write_text(json.dumps({"model": config.to_dict(), **(extra or {})}, indent=2))
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, temp / name)

    write_atomically(Path(directory), fill)


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
