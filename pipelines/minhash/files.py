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
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": (self.rows, self.ncols)},
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


class NpyRows:
    """Rows of a `.npy` file read on demand through fsspec, local or remote: the header once, then
    only the rows asked for (`rows[ids]`, ids ascending or not), or one row of a 2-D array
    (`row(b)`: a band of a band-major file). A local file is memory-mapped; from an object store,
    runs of wanted rows less than `GAP_ROWS` apart are one ranged read. Nothing is pickled."""

    GAP_ROWS = 64

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self._mapped = None
        if _is_local(fs):
            self._mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, fortran, dtype = self._mapped.shape, False, self._mapped.dtype  # a mapping reads either order
            self.offset = int(self._mapped.offset)
        else:
            with fs.open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = reader(handle)
                self.offset = handle.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, index: int) -> np.ndarray:
        if self._mapped is not None:
            return np.array(self._mapped[index])
        return self[np.array([index])][0]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self._mapped is not None:
            return self._mapped[ids]
        out = np.empty((len(ids), *self.shape[1:]), dtype=self.dtype)
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")
        wanted = ids[order]
        # runs of nearby rows are one read each
        starts = np.concatenate([[0], np.flatnonzero(np.diff(wanted) > self.GAP_ROWS) + 1, [len(wanted)]])
        with self.fs.open(self.path, "rb") as handle:
            for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
                first, count = int(wanted[a]), int(wanted[b - 1] - wanted[a] + 1)
                handle.seek(self.offset + first * self.row_bytes)
                block = np.frombuffer(handle.read(count * self.row_bytes), dtype=self.dtype)
                out[order[a:b]] = block.reshape(count, *self.shape[1:])[wanted[a:b] - first]
        return out


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol
