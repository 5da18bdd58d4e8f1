"""The artifact manifest and the fingerprint that names an artifact.

A manifest is the small JSON document that commits an artifact: it names the stage, the
config, the input fingerprints (lineage), and every file with its size and sha256. It is the
only thing a Prefect task returns, and the only thing read to decide whether work is done.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_NAME = "_manifest.json"


class StorageError(Exception):
    """A problem with the artifact store: a corrupt manifest, a failed verification, ..."""


def is_inner_path(path: str) -> bool:
    """Whether `path` names a file inside a directory: relative, normalized, no `..`, no `\\`."""
    return (bool(path) and not path.startswith("/") and "\\" not in path and "\0" not in path
            and posixpath.normpath(path) == path and path != "." and ".." not in path.split("/"))


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(stage: str, config: dict, inputs: list[str], code_version: str) -> str:
    """sha256 of everything that determines a stage's output."""
    payload = canonical_json(
        {"stage": stage, "config": config, "inputs": list(inputs), "code_version": code_version}
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    bytes: int
    sha256: str
    rows: int | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_artifact(cls, path: str) -> str:
        """A manifest is read from a store that may hold anything: a path that is absolute, not
        normalized or climbs out (`model/../../x`) would make a reader write, hash or load a file
        outside the artifact, so the whole manifest is refused as damaged."""
        if not is_inner_path(path):
            raise ValueError(f"file path {path!r} is not a relative path inside the artifact")
        return path


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    fingerprint: str
    config: dict[str, Any]
    inputs: list[str] = Field(default_factory=list)
    code_version: str
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    files: list[FileEntry] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    # Where the data came from when it came from outside the store (the crawl files of
    # ingest): [{"url": ..., "bytes": ..., "sha256": ...}]. Lineage ends here.
    sources: list[dict[str, Any]] = Field(default_factory=list)
    # Set by the store when the manifest is read or built; not part of the JSON.
    location: str | None = Field(default=None, exclude=True)
    built: bool = Field(default=False, exclude=True)

    @property
    def short(self) -> str:
        return self.fingerprint[:12]

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(f"{self.stage}/{self.short}: no file {path!r} in the manifest")

    def files_under(self, prefix: str) -> list[FileEntry]:
        prefix = prefix.rstrip("/") + "/"
        return [f for f in self.files if f.path.startswith(prefix)]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        try:
            return cls.model_validate(json.loads(text))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            reason = first["msg"].removeprefix("Value error, ")
            raise StorageError(f"{where}: not a valid manifest ({field}: {reason})") from None
        except ValueError as err:
            first_line = str(err).strip().splitlines()[0]
            raise StorageError(f"{where}: not a valid manifest ({first_line})") from None
