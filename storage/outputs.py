"""Writing to a path a user gave (`kiln export -o`, a benchmark's `--out`): Kiln replaces only what
Kiln made there.

Inside the data root every directory is Kiln's, and `storage/atomic.py` replaces an older one
whole. A path a user names is theirs: it may hold their notes, their other models, or be the
directory they are standing in. So a directory output is written as a new directory, into an
empty one, or over an earlier output of the same kind that Kiln recognizes by its marker file
(and then only with `overwrite`, and only while it holds nothing but the files the marker
lists); anything else is refused in one line before a byte is written. A file output is
replaced only when `is_ours` recognizes it (a GGUF with Kiln's metadata key, a benchmark's
JSON) and `overwrite` allows it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from storage.atomic import atomic_path, swap_into_place, temp_name
from storage.stage import InputError

MARKER = ".kiln-export.json"
# Without a umask Kiln could read, the files a library writes through a private temporary file
# (safetensors does) would keep mode 0600 while their neighbours have 0644.
_UMASK = os.umask(0)
os.umask(_UMASK)


def public_mode(path: Path) -> None:
    """Give a finished file the mode a plain `open()` would have (0666 less the umask)."""
    os.chmod(path, 0o666 & ~_UMASK)


def read_marker(directory: Path) -> dict | None:
    """The marker of an earlier Kiln output in `directory`, or None when it has none."""
    try:
        value = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("files"), list) else None


def _check_dir(final: Path, overwrite: bool, kind: str) -> str:
    """What is at `final`: "new", "empty" or "ours" (replaceable); anything else is refused."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise InputError(f"{final}: exists and is not a directory; Kiln writes the {kind} as a new directory "
                         "and replaces only one it made")
    if not final.exists():
        return "new"
    entries = sorted(p.name for p in final.iterdir())
    if not entries:
        return "empty"
    marker = read_marker(final)
    if marker is None or marker.get("kind") != kind:
        raise InputError(f"{final}: a directory Kiln did not make ({len(entries)} entries, no {MARKER}); "
                         f"name a new or empty directory for the {kind}")
    if not overwrite:
        raise InputError(f"{final}: holds an earlier Kiln {kind}; pass --overwrite to replace it")
    foreign = [name for name in entries if name not in {*marker["files"], MARKER}]
    if foreign:
        raise InputError(f"{final}: holds {foreign[0]!r}, which Kiln did not write there; not replacing the "
                         f"directory (move it out, or name another one)")
    if Path.cwd().resolve().is_relative_to(final.resolve()):
        raise InputError(f"{final}: the current directory (or one above it) cannot be replaced; run from outside it")
    return "ours"


def write_output_dir(final: str | os.PathLike, fill: Callable[[Path], None], *, kind: str,
                     overwrite: bool = False, about: dict | None = None) -> Path:
    """Call fill(temp_dir), then put what it wrote at `final` with a marker naming its files.
    `final` is a new path, an empty directory (filled in place, marker last), or, with
    `overwrite`, an earlier Kiln output of this kind holding only its own files (replaced
    whole: readers see the old one or the new one)."""
    final = Path(os.path.abspath(final))
    state = _check_dir(final, overwrite, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(temp_name(final.with_name(f".{final.name}")))
    temp.mkdir()
    try:
        fill(temp)
        files = sorted(p.relative_to(temp).as_posix() for p in temp.iterdir())
        marker = {"kind": kind, "files": files, "created": datetime.now(UTC).isoformat(), **(about or {})}
        (temp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in temp.rglob("*"):
            if path.is_file():
                public_mode(path)
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if state == "empty":  # the user's own directory stays (its inode, its mode): files move in
            for name in [*files, MARKER]:
                os.rename(temp / name, final / name)
        else:
            os.chmod(temp, 0o777 & ~_UMASK)
            swap_into_place(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return final


def write_output_file(final: str | os.PathLike, write: Callable[[str], None], *, what: str,
                      is_ours: Callable[[Path], bool], overwrite: bool = False) -> Path:
    """Call write(temp_path), then rename it to `final`. An existing `final` is replaced only
    when `is_ours(final)` says Kiln wrote it and `overwrite` allows it."""
    final = Path(os.path.abspath(final))
    if final.is_dir():
        raise InputError(f"{final}: is a directory; name the {what} file to write")
    if final.exists() or final.is_symlink():
        if final.is_symlink() or not is_ours(final):
            raise InputError(f"{final}: exists and is not a {what} Kiln wrote; name a new file")
        if not overwrite:
            raise InputError(f"{final}: holds an earlier Kiln {what}; pass --overwrite to replace it")
    with atomic_path(final) as temp:
        write(temp)
        public_mode(Path(temp))
    return final
