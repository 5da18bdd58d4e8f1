"""What every data stage shares: parallel map, progress, document shards.

The stage protocol itself (`Stage`, `StageConfig`, the errors) lives in `storage/stage.py`,
so that `model/` stages use it too; it is re-exported here. Nothing here knows about Prefect.
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
from typing import TypeVar

from storage import ArtifactStore, Manifest
from storage.stage import (  # noqa: F401 - re-exported: the stage protocol, for pipelines/
    ConfigError, InputError, KilnError, Stage, StageConfig, TransientError,
)

log = logging.getLogger("kiln")

T = TypeVar("T")
R = TypeVar("R")


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
