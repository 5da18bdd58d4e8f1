"""The command-line arguments several `kiln` commands share, and what the MODEL argument means.

`flows/cli.py` and `flows/chat_command.py` both take them from here, so their help cannot drift
apart and neither module imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.stages import TABLE, model_stages
from storage import ArtifactStore, KilnError

DataDirOpt = Annotated[str | None, typer.Option(
    "--data-dir", help="Artifact store: a directory or fsspec URL (default ./data or $KILN_DATA).")]
ModelArg = Annotated[str | None, typer.Argument(
    help=f"A checkpoint directory, or a fingerprint of a {'/'.join(e.name for e in TABLE if e.makes_model)} "
         "artifact (default: the newest trained one).")]


def fingerprint_of(artifact: str) -> str:
    """Accept a fingerprint, or any path inside an artifact directory `<stage>/<fingerprint>/...`."""
    for part in reversed(Path(artifact).parts):
        if len(part) == 64 and all(c in "0123456789abcdef" for c in part):
            return part
    return artifact


def resolve_model_dir(store: ArtifactStore, spec: str | None) -> Path:
    """A checkpoint directory from a path, an artifact fingerprint, or the newest trained model."""
    from model.checkpoint import WEIGHTS  # a model command: torch is coming anyway

    if spec and Path(spec).is_dir():
        path = Path(spec)
        return path / "model" if (path / "model" / WEIGHTS).exists() else path
    if spec and ("/" in spec or spec.startswith(".")) and fingerprint_of(spec) == spec:
        raise KilnError(f"{spec}: no such checkpoint directory")
    if spec:
        manifest = store.find(fingerprint_of(spec))
    else:
        trained = [m for stage in model_stages() for m in store.list(stage)]
        if not trained:
            raise KilnError(f"{store.url}: no trained model yet; run `kiln pretrain` first or name a checkpoint")
        manifest = max(trained, key=lambda m: m.created)
    return store.local_path(manifest, "model")
