"""The scratch files of a dedup run: a ``.npy`` written block by block, per-band spill files.

Nothing is pickled; every ``.npy`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

_BAND_RECORD = np.dtype([("h", "<u8"), ("d", "<u4")])  # band hash, document number


_NPY_HEADER_BYTES = 128


class NpyAppender:
    """Writes a 2-D ``.npy`` file row block by row block (the header is fixed up on close)."""

    def __init__(self, path: Path, dtype: np.dtype, ncols: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.ncols = ncols
        self.rows = 0
        self._f = open(self.path, "wb")
        self._f.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.ncols:
            raise ValueError(f"expected rows of width {self.ncols}, got shape {rows.shape}")
        self._f.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self._f.closed:
            return
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.rows, self.ncols)},
        )
        raw = header.getvalue()
        if len(raw) != _NPY_HEADER_BYTES:  # pragma: no cover - only for absurd row counts
            raise RuntimeError(f"unexpected .npy header size {len(raw)}")
        self._f.seek(0)
        self._f.write(raw)
        self._f.close()


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


class BandSpill:
    """Per-band files of (band hash, document number) records, appended batch by batch."""

    def __init__(self, directory: Path, num_bands: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths = [self.directory / f"band_{b:03d}.bin" for b in range(num_bands)]
        self._files = [open(p, "wb") for p in self.paths]

    def append(self, bands: np.ndarray, docs: np.ndarray) -> None:
        rec = np.empty(len(docs), dtype=_BAND_RECORD)
        rec["d"] = docs
        for b, f in enumerate(self._files):
            rec["h"] = bands[:, b]
            f.write(rec.tobytes())

    def close(self) -> None:
        for f in self._files:
            f.close()

    def read(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        rec = np.fromfile(self.paths[b], dtype=_BAND_RECORD)
        return rec["h"].copy(), rec["d"].astype(np.int64)
