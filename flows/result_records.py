"""Where Prefect keeps the stage tasks' results, reading back nothing but plain JSON.

A stage task's result (its manifest, see flows/tasks.py) is written as a JSON result record
under `$PREFECT_HOME/storage/<cache key>`. Prefect reads a record back with whatever serializer
the record itself names, so a record rewritten to name `pickle`, or a JSON serializer with
another object decoder, would run code on the next cache lookup. Before each stage task the
flow checks the record under its cache key (`safe_to_read`); a refused one is never handed to
Prefect: the task runs with its cache refreshed (the committed artifact makes that cheap) and
writes a clean record in its place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect.serializers import JSONSerializer

log = logging.getLogger("kiln")

SERIALIZER = JSONSerializer()


class RecordRefused(ValueError):
    """A result record that is not plain JSON written by the JSON serializer."""


def check_record(content: bytes, where: str) -> bytes:
    """The record, when it is a record of Prefect's default JSON serializer holding plain JSON;
    otherwise RecordRefused (and a warning naming the file)."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
        result = record["result"]
    except (ValueError, KeyError, TypeError):
        return _refuse(where, "not a JSON result record")
    if serializer != SERIALIZER.model_dump(mode="json"):
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        return _refuse(where, f"it names the serializer {named!r} (or other decoding hooks)")
    try:
        value = json.loads(result) if isinstance(result, str) else result
    except ValueError:
        return _refuse(where, "its result is not JSON")
    if _names_a_class(value):
        return _refuse(where, "its result names a Python class to build")
    return content


def _refuse(where: str, why: str):
    log.warning("%s: a cached result that Kiln does not read back (%s); the stage runs instead", where, why)
    raise RecordRefused(f"{where}: refused: {why}")


def _names_a_class(value: Any) -> bool:
    if isinstance(value, dict):
        return "__class__" in value or any(_names_a_class(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_a_class(v) for v in value)
    return False


def safe_to_read(key: str) -> bool:
    """Whether the result record cached under `key` (if any) may be handed to Prefect: a
    missing record is safe (nothing is read), a refused one is not."""
    from prefect.settings import get_current_settings

    path = Path(get_current_settings().results.local_storage_path) / key
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return True
    except OSError as err:
        log.warning("%s: the cached result cannot be read (%s); the stage runs instead", path, err.strerror or err)
        return False
    try:
        check_record(content, str(path))
    except RecordRefused:
        return False
    return True
