"""Instruction and preference data for SFT and DPO: files read entry by entry (JSON lists or
JSONL, a malformed entry reported as file:line), a stable hold-out by prompt, the offline
default built from the standard library's docs, and the Parquet row tables the training
process reads.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage import InputError, atomic_file, atomic_write_bytes, local_sha256

log = logging.getLogger("kiln")

STDLIB_QA = Path(__file__).with_name("stdlib_qa.py")
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
GZIP_MAGIC = b"\x1f\x8b"
_HASH_RANGE = 1 << 64


class BadEntry(ValueError):
    """An entry that does not have the expected shape; the message is the reason."""


def data_files(path: str) -> list[Path]:
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if not files:
            raise InputError(f"{root}: no .json or .jsonl files (or .gz of them)")
        return files
    if not root.is_file():
        raise InputError(f"{root}: no such file or directory")
    return [root]


def describe_data(data: str | None) -> dict[str, Any]:
    """What identifies the data now (it joins the fingerprint): file contents, or the Python
    whose documentation the default data is made from."""
    if data is None:
        return {"default": "stdlib-docs", "python": sys.version, "script": local_sha256(STDLIB_QA)}
    return {"files": [{"path": str(p), "sha256": local_sha256(p)} for p in data_files(data)]}



def _is_gzip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _numbered_lines(path: Path, stream: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a binary stream, decoded as UTF-8 one line at a time,
    so that a file that is not UTF-8 is reported at its line."""
    for number, raw in enumerate(stream, start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") \
                from None


def _file_entries(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) for each entry of a JSON list or each line of a JSONL file, gzip'd or not
    (told by its first bytes, whatever its name). JSONL is read a line at a time, decompressed as
    it streams; a JSON list is read whole, as it must be parsed whole. A line that is not JSON
    comes as (line, BadEntry); a JSON list that does not parse is an InputError in either mode:
    there is no next entry to go on from."""
    try:
        with (gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")) as stream:
            lines = _numbered_lines(path, stream)
            first = next(((number, text) for number, text in lines if text.strip()), None)
            if first is None:
                return
            if first[1].lstrip().startswith("["):
                yield from _json_list(path, first[1] + "".join(text for _, text in lines), first[0])
                return
            for number, text in itertools.chain([first], lines):
                if not text.strip():
                    continue
                try:
                    yield number, json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    yield number, BadEntry(f"not valid JSON ({err.msg}, column {err.colno})")
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a cut-off stream, EOFError
        raise InputError(f"{path}: not readable ({err})") from None


def _json_list(path: Path, text: str, first_line: int) -> Iterator[tuple[int, Any]]:
    """The entries of a JSON list; `text` starts at line `first_line` of the file."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    position, line = start + 1, first_line + text.count("\n", 0, start)

    def skip_space() -> None:
        nonlocal position, line
        while position < len(text) and text[position] in " \t\r\n":
            line += text[position] == "\n"
            position += 1

    try:
        skip_space()
        if text.startswith("]", position):
            position += 1
        else:
            while True:
                skip_space()
                value, end = decoder.raw_decode(text, position)
                yield line, value
                line += text.count("\n", position, end)
                position = end
                skip_space()
                if text.startswith(",", position):
                    position += 1
                elif text.startswith("]", position):
                    position += 1
                    break
                else:
                    raise json.JSONDecodeError("expected ',' or ']' after an entry", text, position)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno + first_line - 1}: not valid JSON ({err.msg})") from None
    skip_space()
    if position < len(text):
        raise InputError(f"{path}:{line}: text after the end of the JSON list")


def read_entries(files: list[Path], parse: Callable[[Any], Any], on_bad_line: str) -> tuple[list[Any], list[str]]:
    """Parsed entries of every file in order, and the `file:line: reason` of each bad one."""
    entries, bad = [], []
    for path in files:
        for line, value in _file_entries(path):
            try:
                if isinstance(value, BadEntry):
                    raise value
                entries.append(parse(value))
            except BadEntry as err:
                where = f"{path}:{line}: {err}"
                if on_bad_line == "error":
                    raise InputError(where) from None
                log.warning("skipped %s", where)
                bad.append(where)
    return entries, bad


def string_field(entry: dict, key: str, required: bool = True) -> str:
    if key not in entry or entry[key] is None:
        if required:
            raise BadEntry(f"missing field {key!r}")
        return ""
    if not isinstance(entry[key], str):
        raise BadEntry(f"field {key!r} must be a string, got {type(entry[key]).__name__}")
    return entry[key]


def alpaca_prompt(entry: dict) -> list[dict[str, str]]:
    """The user turn of an Alpaca-style entry: the instruction, then its input after a blank line."""
    instruction, extra = string_field(entry, "instruction"), string_field(entry, "input", required=False)
    if not instruction.strip():
        raise BadEntry("field 'instruction' is empty")
    return [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")}]


# An HH-RLHF transcript: "\n\nHuman: ...\n\nAssistant: ...", turn after turn.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_transcript(text: str, key: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript (field `key` of the entry) as chat messages: Human -> user,
    Assistant -> assistant, each turn's text stripped; two turns of the same role in a row are
    one message (the chat template alternates)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if "Assistant" not in parts[1::2]:
        raise BadEntry(f"field {key!r} is not an HH-RLHF transcript: no '\\n\\nAssistant:' turn")
    if parts[0].strip():
        raise BadEntry(f"field {key!r}: text before the first '\\n\\nHuman:' turn")
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(c for c in (messages[-1]["content"], content) if c)
        else:
            messages.append({"role": role, "content": content})
    return messages


def hh_pair(entry: dict) -> tuple[list[dict[str, str]], str, str]:
    """An HH-RLHF entry, `chosen` and `rejected` as whole transcripts that share all but the last
    assistant turn, as (the shared turns, the chosen final turn, the rejected final turn)."""
    chosen = hh_transcript(string_field(entry, "chosen"), "chosen")
    rejected = hh_transcript(string_field(entry, "rejected"), "rejected")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise BadEntry(f"field {key!r}: the transcript does not end with an assistant turn")
        if len(messages) < 2:
            raise BadEntry(f"field {key!r}: no human turn before the final assistant turn")
    prompt, other = chosen[:-1], rejected[:-1]
    if prompt != other:
        turn = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise BadEntry(f"fields 'chosen' and 'rejected' do not share a prompt (they differ at turn {turn + 1})")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def holdout_key(prompt: list[dict[str, str]]) -> int:
    """A stable 64-bit hash of a prompt: the same prompt is held out in SFT and in DPO."""
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "big")


def split_holdout(items: list[Any], prompts: list[list[dict[str, str]]], fraction: float) -> tuple[list, list]:
    """(train, val) by the hash of each item's prompt; at least one item is held out when
    fraction > 0 and there are two or more."""
    keys = [holdout_key(p) for p in prompts]
    cutoff = int(fraction * _HASH_RANGE)
    held = [k < cutoff for k in keys]
    if fraction > 0 and not any(held) and len(items) > 1:
        held[min(range(len(keys)), key=keys.__getitem__)] = True
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def default_data(kind: Literal["sft", "dpo"], target: Path) -> Path:
    """Write the offline default data (model/stdlib_qa.py in a fresh interpreter) to target."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="kiln-stdlib-qa-") as empty_dir:
        result = subprocess.run([sys.executable, "-S", "-s", str(STDLIB_QA), kind], cwd=empty_dir, env=env,
                                capture_output=True, timeout=600)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise InputError(f"{STDLIB_QA}: failed to build the default data: {' / '.join(tail)}")
    atomic_write_bytes(target, result.stdout)
    return target


def load_data(config: Any, kind: Literal["sft", "dpo"], out_dir: Path,
              parse: Callable[[Any], Any]) -> tuple[list[Any], list[str], str]:
    """(entries, bad lines, a description of the source) of the configured data."""
    if config.data is None:
        files = [default_data(kind, out_dir / "data" / f"stdlib-{kind}.jsonl")]
        source = f"stdlib docs (Python {sys.version.split()[0]})"
    else:
        files = data_files(config.data)
        source = config.data
    entries, bad = read_entries(files, parse, config.on_bad_line)
    if not entries:
        raise InputError(f"{source}: no usable entries ({len(bad)} malformed)")
    return entries, bad, source


# ------------------------------------------------------------------ row tables


def write_table(path: Path, columns: dict[str, list]) -> None:
    """A Parquet file, written atomically."""
    with atomic_file(path) as handle:
        pq.write_table(pa.table(columns), handle, compression="zstd")


def write_rows(path: Path, tokens: np.ndarray, mask: np.ndarray) -> None:
    write_table(path, {"tokens": pa.array(list(tokens), pa.list_(pa.int32())),
                       "mask": pa.array(list(mask), pa.list_(pa.bool_()))})


def read_table_columns(path: str | Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def read_rows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    width = len(table.column("tokens")[0]) if table.num_rows else 0
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, width).astype(np.int64)
    mask = np.asarray(table.column("mask").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      dtype=bool).reshape(-1, width)
    return tokens, mask


def row_batch(tokens: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rows: targets are -100 wherever the next token is not trained on."""
    rows = torch.from_numpy(tokens)
    targets = rows[:, 1:].masked_fill(~torch.from_numpy(mask[:, 1:]), -100)
    return rows[:, :-1].contiguous(), targets.contiguous()
