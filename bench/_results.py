"""Where a benchmark writes its figures (`--out`): a JSON file that Kiln replaces only when it is
an earlier benchmark result, never a file of the user's (storage/outputs.py says why)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.outputs import write_output_file  # noqa: E402

KEY = "kiln_bench"  # every result names the benchmark that wrote it: how a later run knows it


def is_result(path: Path) -> bool:
    """Whether `path` holds a benchmark result Kiln wrote (tagged, or in bench/results/, which is
    Kiln's own and held untagged results before the tag)."""
    if path.resolve().parent == ROOT / "bench" / "results":
        return True
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and KEY in value


def result_path(value: str) -> Path:
    """An argparse `type` for `--out`: refused before the run (exit 2, one line) when it names a
    directory or a file that is not an earlier benchmark result."""
    path = Path(value).absolute()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a directory; name the JSON file to write")
    if path.exists() and not is_result(path):
        raise argparse.ArgumentTypeError(f"{path}: exists and is not a Kiln benchmark result; name a new file")
    return path


def write_result(path: str | Path, result: dict) -> Path:
    """Write `result` as JSON at `path` (atomically), tagged with the benchmark's name."""
    tagged = {KEY: Path(sys.argv[0]).stem, **result}
    text = json.dumps(tagged, indent=2, default=str) + "\n"
    return write_output_file(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"),
                             what="benchmark result", is_ours=is_result, overwrite=True)
