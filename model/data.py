"""Training batches: from a pack artifact's token shards (`TokenShardLoader`: `(inputs, targets)`
LongTensors of `[batch, seq_len]`), and of example indices (`IndexLoader`, for SFT and DPO).

A pack artifact holds `train/*.parquet` and `val/*.parquet`, one row of `seq_len + 1` token ids
per sequence (see pipelines/pack.py). The loader never holds a split in memory: it reads a
window of Parquet row groups at a time.

One epoch, for a given (seed, epoch):
  row groups of the split in a shuffled order -> consecutive windows of `window` row groups ->
  the rows of each window shuffled -> one stream of rows -> global batch g = rows [g*B, (g+1)*B).
Rank r takes global batches r, r + W, r + 2W, ... so ranks see disjoint rows and together cover
the epoch, but for the last `rows mod (B*W)` rows of the shuffled stream: every rank takes the
same number of batches (none waits at a collective), and the next epoch's shuffle leaves out others.
State = (epoch, batches this rank has taken in it): the stream is a pure function of the seed and
the epoch, so a resumed loader starts exactly at the next batch without reading what it skips.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from model.model import IGNORE_INDEX
from storage import ArtifactStore, Manifest


class TokenShardLoader:
    def __init__(self, store: ArtifactStore, pack: Manifest, split: str = "train", batch_size: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, window: int = 8):
        if pack.stage != "pack" or "seq_len" not in pack.stats:
            raise ValueError(f"{pack.stage}/{pack.short}: not a pack artifact")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.store, self.pack, self.split = store, pack, split
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.window = shuffle, max(1, window)
        self.seq_len = int(pack.stats["seq_len"])
        self.pad_id = int(pack.stats["pad_id"])
        shards = sorted(f.path for f in pack.files_under(split) if f.path.endswith(".parquet"))
        # (shard, row group, rows): the unit of reading and of shuffling
        self.units = [(path, group, rows) for path in shards for group, rows in enumerate(self._row_groups(path))]
        self.rows_per_epoch = sum(rows for _, _, rows in self.units)
        self.batches_per_epoch = self.rows_per_epoch // (batch_size * world_size)  # per rank
        if self.batches_per_epoch == 0:
            raise ValueError(f"pack/{pack.short}/{split}: {self.rows_per_epoch} rows, fewer than one batch "
                             f"of {batch_size} for each of {world_size} ranks")
        self.epoch, self.position = 0, 0
        self._windows: dict[tuple[int, int], np.ndarray] = {}  # (epoch, window) -> rows: the last two read
        self._planned: tuple[int, Any] = (-1, None)

    def _row_groups(self, path: str) -> list[int]:
        with self.store.open(self.pack, path) as handle:
            meta = pq.ParquetFile(handle).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    # ---------------------------------------------------------------- the epoch's row stream

    def _plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The windows of an epoch (unit indices) and the row where each one starts in the stream."""
        if self._planned[0] == epoch:
            return self._planned[1]
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        windows = [order[i:i + self.window].tolist() for i in range(0, len(order), self.window)]
        starts = np.cumsum([0] + [sum(self.units[u][2] for u in w) for w in windows]).tolist()
        self._planned = (epoch, (windows, starts))
        return windows, starts

    def _read_window(self, epoch: int, index: int, units: list[int]) -> np.ndarray:
        key = (epoch, index)
        if key not in self._windows:
            parts = []
            for u in units:
                path, group, _ = self.units[u]
                with self.store.open(self.pack, path) as handle:
                    column = pq.ParquetFile(handle).read_row_group(group, columns=["tokens"]).column("tokens")
                parts.append(column.combine_chunks().flatten().to_numpy().reshape(-1, self.seq_len + 1))
            rows = np.concatenate(parts)
            if self.shuffle:
                rows = rows[np.random.default_rng([self.seed, epoch, index]).permutation(len(rows))]
            if len(self._windows) >= 2:
                del self._windows[min(self._windows)]
            self._windows[key] = rows
        return self._windows[key]

    def _rows(self, epoch: int, start: int, count: int) -> np.ndarray:
        windows, starts = self._plan(epoch)
        parts, row = [], start
        while row < start + count:
            w = bisect.bisect_right(starts, row) - 1
            rows = self._read_window(epoch, w, windows[w])
            take = rows[row - starts[w]: start + count - starts[w]]
            parts.append(take)
            row += len(take)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    # ---------------------------------------------------------------- batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.position * self.world_size + self.rank
        rows = self._rows(self.epoch, batch * self.batch_size, self.batch_size).astype(np.int64)
        self.position += 1
        inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        targets[targets == self.pad_id] = IGNORE_INDEX  # padding costs no loss
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "split": self.split,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split", "batch_size", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the saved loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class IndexLoader:
    """Batches of example indices, endless: epochs of a seeded permutation one after another.

    Global batch g is positions [g*B*W, (g+1)*B*W) of the stream of epochs; rank r takes its
    B-slice r of each. A batch may span two epochs, so any number of examples serves any batch
    size. State = batches this rank has taken: the stream is a pure function of (seed, n)."""

    def __init__(self, count: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if count < 1:
            raise ValueError("no examples to make batches of")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.taken = 0
        self._epoch: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))  # (epoch, its order)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
        return self._epoch[1]

    def batch(self, g: int) -> np.ndarray:
        start = (g * self.world_size + self.rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return np.array([self._order(p // self.count)[p % self.count] for p in positions])

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            indices = self.batch(self.taken)
            self.taken += 1
            yield indices

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.taken = int(state["taken"])
