"""What every data stage shares: the stage protocol, its errors, parallel map and progress.

A stage is a pydantic config plus a build function `(config, inputs, store, writer) -> stats`.
`Stage.run` fingerprints (stage, config, input fingerprints, code version) and asks the store
for that artifact, building it only when it is missing. Nothing here knows about Prefect.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from storage import ArtifactStore, ArtifactWriter, Manifest, fingerprint

log = logging.getLogger("kiln")

T = TypeVar("T")
R = TypeVar("R")


class KilnError(Exception):
    """An error a user can act on; its message is one line naming the file and the reason."""

    retriable: ClassVar[bool] = False


class ConfigError(KilnError):
    """A setting is invalid. Retrying cannot help."""


class InputError(KilnError):
    """An input is missing, unreachable or not what it claims to be. Retrying cannot help."""


class TransientError(KilnError):
    """A failure that may pass (a network blip); the orchestrator retries these with backoff."""

    retriable = True


class StageConfig(BaseModel):
    """Base of every stage config. Fields in `runtime_fields` change how fast a stage runs,
    not what it produces, so they are left out of the fingerprint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers"})

    def fingerprint_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.runtime_fields))


BuildFn = Callable[[Any, list[Manifest], ArtifactStore, ArtifactWriter], dict[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One data stage: `name/<fingerprint>/` in the store is its output.

    `describe_sources(config)`, for stages that read from outside the store (ingest), returns
    what identifies those files now (paths with sizes and mtimes, ETags): it joins the
    fingerprint, so a changed crawl file or a glob that matches more files is a new artifact.
    """

    name: str
    config_cls: type[StageConfig]
    build: BuildFn
    code_version: str = "1"
    describe_sources: Callable[[Any], Any] | None = None

    def fingerprint(self, config: StageConfig, inputs: list[Manifest]) -> str:
        identity = config.fingerprint_dict()
        if self.describe_sources is not None:
            identity = {**identity, "external_sources": self.describe_sources(config)}
        return fingerprint(self.name, identity, [m.fingerprint for m in inputs], self.code_version)

    def run(self, config: StageConfig, inputs: list[Manifest], store: ArtifactStore, *, force: bool = False) -> Manifest:
        fp = self.fingerprint(config, inputs)
        started = time.perf_counter()

        def build(writer: ArtifactWriter) -> dict[str, Any]:
            stats = self.build(config, inputs, store, writer) or {}
            stats.setdefault("seconds", round(time.perf_counter() - started, 3))
            return stats

        return store.produce(
            self.name, fp, build,
            config=config.fingerprint_dict(), inputs=[m.fingerprint for m in inputs],
            code_version=self.code_version, force=force,
        )


# ------------------------------------------------------------------ parallel work


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` over worker processes, results in input order.

    Forkserver rather than fork: the caller may be a Prefect worker with threads running, and
    forking a threaded process can deadlock. `fn` must be a module-level function.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("forkserver")
    # Workers fork from a server that has already imported the stage's module (and pyarrow,
    # trafilatura, ... with it), instead of importing them again in every worker.
    context.set_forkserver_preload([fn.__module__])
    pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context)
    try:
        yield from pool.map(fn, items)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # fail fast: don't finish the other items first
        raise
    pool.shutdown(wait=True)


# ------------------------------------------------------------------ progress


class Progress:
    """A progress bar on a terminal (rich), periodic log lines elsewhere (Prefect workers, CI)."""

    def __init__(self, description: str, total: int | None, unit: str = "items"):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0
        self._bar = None
        self._last_log = 0.0
        self._started = time.perf_counter()

    def __enter__(self) -> "Progress":
        if sys.stderr.isatty() and not os.environ.get("KILN_NO_PROGRESS"):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(self.unit), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        if self._bar is not None:
            self._bar.advance(self._task, amount)
        elif time.perf_counter() - self._last_log > 10:
            self._last_log = time.perf_counter()
            of_total = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s %s", self.description, self.done, of_total, self.unit)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def progress(items: Iterable[T], description: str, total: int | None = None, unit: str = "items") -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit) as bar:
        for item in items:
            yield item
            bar.advance()


def merge_counts(total: dict[str, int], part: dict[str, int]) -> dict[str, int]:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
    return total


# ------------------------------------------------------------------ document shards

SHARD_DIR = "shards"


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.parquet"


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def document_shards(manifest: Manifest) -> list[str]:
    """The Parquet document shards of an ingest / clean / dedup artifact, in corpus order
    (numeric order, so shard 100000 follows 99999)."""
    return sorted((f.path for f in manifest.files_under(SHARD_DIR) if f.path.endswith(".parquet")), key=_natural_key)


def read_shard(store: ArtifactStore, manifest: Manifest, relpath: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    with store.open(manifest, relpath) as handle:
        return pq.read_table(handle, columns=columns)
