"""What every data stage shares: progress, document shards (units run in pipelines/executor.py).

The stage protocol itself (`Stage`, `StageConfig`, the errors) lives in `storage/stage.py`,
so that `model/` stages use it too; it is re-exported here. Nothing here knows about Prefect.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from storage import ArtifactStore, Manifest
from storage.stage import (  # noqa: F401 - re-exported: the stage protocol, for pipelines/
    ConfigError,
    InputError,
    KilnError,
    Stage,
    StageConfig,
    TransientError,
)

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress  # imported when a bar is shown

log = logging.getLogger("kiln")

T = TypeVar("T")
R = TypeVar("R")
Number = TypeVar("Number", int, float)


# ------------------------------------------------------------------ progress


class Progress:
    """A progress bar on a terminal (rich), periodic log lines elsewhere (Prefect workers, CI).

    Stages that run units (pipelines/executor.py) report each finished unit with the node that
    ran it (`unit_done`): the bar and the log lines then say units finished / total, the rate,
    and which nodes ran what.
    """

    def __init__(self, description: str, total: int | None, unit: str = "items", units: int | None = None):
        self.description, self.total, self.unit = description, total, unit
        self.units, self.units_done = units, 0
        self.done = 0
        self.by_node: dict[str, int] = {}
        self._bar: RichProgress | None = None
        self._last_log = 0.0
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        if sys.stderr.isatty() and not os.environ.get("KILN_NO_PROGRESS"):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(self.unit), TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[units]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, rate="", units="")
        return self

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        if self._bar is not None:
            self._bar.update(self._task, advance=amount, rate=f"{self.rate():,.0f} {self.unit}/s")
        elif time.perf_counter() - self._last_log > 10:
            self._log()

    def unit_done(self, node: str, amount: int = 0, name: str = "") -> None:
        """A unit finished on `node`, with `amount` more of the bar's items."""
        self.units_done += 1
        self.by_node[node] = self.by_node.get(node, 0) + 1
        if self._bar is not None:
            self._bar.update(self._task, units=self._units_text())
            self.advance(amount)
            return
        self.done += amount
        if self.units is not None and self.units <= 100 or time.perf_counter() - self._last_log > 10:
            self._log(f"{name} on {node}" if name else "")

    def _units_text(self) -> str:
        of = f"/{self.units}" if self.units is not None else ""
        nodes = ", ".join(f"{node} x{count}" for node, count in sorted(self.by_node.items()))
        return f"{self.units_done}{of} units ({nodes})" if self.by_node else ""

    def _log(self, last: str = "") -> None:
        self._last_log = time.perf_counter()
        of_total = f"/{self.total}" if self.total else ""
        parts = [f"{self.done:,}{of_total} {self.unit}", f"{self.rate():,.1f} {self.unit}/s"]
        if self.units_done:
            parts.append(self._units_text())
        if last:
            parts.append(f"last: {last}")
        log.info("%s: %s", self.description, ", ".join(parts))

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


def merge_counts(total: dict[str, Number], part: dict[str, Number]) -> dict[str, Number]:
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
