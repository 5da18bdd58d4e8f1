"""Atomic writes on local disk: a file or a directory appears whole under its final name, or not at all.

Every file Kiln writes on local disk goes through here (artifact files, checkpoints, the
signature index, training rows). Work in progress carries TEMP_MARK in its name, so anything
that lists a directory can tell a leftover of a killed writer from a finished file, and
`ArtifactWriter.commit` refuses a staging directory that still holds one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

TEMP_MARK = ".tmp-"


def temp_name(final: str | os.PathLike) -> str:
    """A unique name beside `final` for its work in progress: `<final>.tmp-<random>`."""
    return f"{os.fspath(final)}{TEMP_MARK}{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
    return TEMP_MARK in os.path.basename(name)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `final`, for a writer that opens the file itself (a library's);
    fsynced and renamed to `final` when the block succeeds, removed when it fails."""
    final = os.fspath(final)
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    temp = temp_name(final)
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write under a temporary name; flushed, fsynced and renamed to `final` when the block
    succeeds, removed when it fails."""
    with atomic_path(final) as temp, open(temp, mode) as handle:
        yield cast(BinaryIO, handle)  # `mode` is a binary one; open()'s type depends on its literal


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_file(final) as handle:
        handle.write(data)


def atomic_dir(final: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call fill(temp_dir), fsync what it wrote, then put temp_dir in place of `final`
    (replacing an older one): readers see the old directory or the new one, never a mix."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(temp_name(final.with_name(f".{final.name}")))
    temp.mkdir()
    try:
        fill(temp)
        finish_dir(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def finish_dir(temp: Path, final: Path) -> None:
    """Put a directory whose files are all written (by this process or others: the ranks of a
    training run) in place of `final`, its files fsynced first."""
    for path in Path(temp).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    swap_into_place(Path(temp), Path(final))


def swap_into_place(staging: Path, final: Path) -> None:
    """Rename a finished directory to its final name, replacing an older one."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}")
        os.rename(final, trash)
        os.rename(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, final)
