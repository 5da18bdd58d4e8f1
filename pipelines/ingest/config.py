"""The ingest stage's settings."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from pipelines.executor import ParallelStageConfig


class IngestConfig(ParallelStageConfig):
    """What to read and what to keep. `workers`, `timeout_s` and `storage_options` change how
    the files are fetched, not what comes out, so they are not part of the fingerprint."""

    runtime_fields: ClassVar[frozenset[str]] = ParallelStageConfig.runtime_fields | {"timeout_s", "storage_options"}

    inputs: list[str] = Field(default_factory=list, description=(
        "Crawl files: paths, globs, directories, file:// https:// s3:// URLs, or *.paths(.gz) listings"))
    paths_base_url: str = Field("https://data.commoncrawl.org/",
                                description="Base that relative lines of a *.paths listing are joined to")
    limit_files: int | None = Field(None, ge=1, description="Take only the first N crawl files")
    max_page_bytes: int = Field(5_000_000, ge=1, description="Skip pages larger than this (bytes)")
    max_docs_per_shard: int = Field(10_000, ge=1)
    max_shard_bytes: int = Field(128 << 20, ge=1, description="Start a new shard past this many page bytes")
    timeout_s: float = Field(60.0, gt=0, description="Connect/read timeout for http(s) inputs")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec options for remote inputs (credentials, anon, ...)")
