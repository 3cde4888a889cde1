"""Zarr storage of per-example arrays (compressed gradients, scores).

One Zarr v3 array per (experiment, compressor, r, seed, split): shape (n, out_dim) float32,
chunks of whole rows (`chunk_rows` rows each, recorded in the attributes). Rows are written by
`RowWriter`, which buffers so that every write covers whole chunks; a writer may own any
chunk-aligned row range, so several writers (shards) can fill one array without touching each
other's chunks.

Completion: an array is written under a temporary name and renamed into place when complete
(`write_array`), and its attributes carry `"complete": true`. A directory of arrays is complete
only when its `manifest.json` exists (written last, atomically).

Sharded arrays (`ensure_array`, `sharding.shard_plan`) are written in place: every shard (re)writes
the same metadata document and then only its own chunk-aligned rows; zarr's local store writes
each chunk file atomically, so a killed shard leaves whole old chunks or whole new ones, never a
torn one. Shard boundaries are also multiples of the batch size, so a shard computes exactly the
batches an unsharded run computes for those rows. The array becomes `"complete": true` only when
a finalize step has checked every shard's done marker.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .common import atomic_path, jsonable, read_json, write_json

MANIFEST = "manifest.json"
CHUNK_BYTES = 4 << 20


def chunk_rows_for(width: int, itemsize: int = 4, target_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so a chunk holds about `target_bytes` (at least 1 row, a power of two)."""
    rows = max(1, target_bytes // max(1, width * itemsize))
    return 1 << (rows.bit_length() - 1)


def create_array(path, n: int, width: int | None, attrs: dict, dtype="float32", chunk_rows: int | None = None):
    """A new (n, width) array (or (n,) when width is None) at `path`, overwriting anything there."""
    import zarr

    shape = (int(n),) if width is None else (int(n), int(width))
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(1 if width is None else width, np.dtype(dtype).itemsize)
    chunks = (min(int(chunk_rows), max(1, n)),) + (() if width is None else (max(1, int(width)),))
    attrs = {**jsonable(attrs), "chunk_rows": int(chunks[0]), "complete": False}
    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, attributes=attrs,
                             overwrite=True)


def open_array(path, mode: str = "r"):
    import zarr

    return zarr.open_array(store=str(path), mode=mode)


def mark_complete(arr, **extra) -> None:
    arr.attrs.update({**jsonable(extra), "complete": True})


class RowWriter:
    """Writes rows [start, stop) of `arr` in order, flushing whole chunks (the last may be partial
    only at `stop` = n). `sink(start_row, rows)` matches `dropinf.extract`'s `sink=` (start_row
    relative to this writer's range)."""

    def __init__(self, arr, start: int = 0, stop: int | None = None):
        self.arr = arr
        self.n = arr.shape[0]
        self.start = int(start)
        self.stop = self.n if stop is None else int(stop)
        self.chunk = int(arr.chunks[0])
        if self.start % self.chunk or (self.stop % self.chunk and self.stop != self.n):
            raise ValueError(f"row range [{self.start}, {self.stop}) is not aligned to chunks of {self.chunk} rows")
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._next = self.start  # first row not yet written to the array

    def __call__(self, start_row: int, rows) -> None:
        if hasattr(rows, "detach"):
            rows = rows.detach().to("cpu").numpy()
        rows = np.asarray(rows, dtype=self.arr.dtype)
        expected = self._next + self._buffered - self.start
        if int(start_row) != expected:
            raise ValueError(f"rows arrive out of order: got start {start_row}, expected {expected}")
        if self._next + self._buffered + rows.shape[0] > self.stop:
            raise ValueError(f"more rows than the range [{self.start}, {self.stop}) holds")
        self._buf.append(rows)
        self._buffered += rows.shape[0]
        full = (self._buffered // self.chunk) * self.chunk
        if full:
            self._flush(full)

    def _flush(self, count: int) -> None:
        block = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        self.arr[self._next:self._next + count] = block[:count]
        rest = block[count:]
        self._buf = [rest] if rest.shape[0] else []
        self._buffered = rest.shape[0]
        self._next += count

    def close(self) -> int:
        """Flush the remainder; returns the number of rows written. Raises if rows are missing."""
        if self._buffered:
            self._flush(self._buffered)
        if self._next != self.stop:
            raise ValueError(f"wrote rows [{self.start}, {self._next}) but the range is [{self.start}, {self.stop})")
        return self._next - self.start


@contextlib.contextmanager
def write_array(path, n: int, width: int | None, attrs: dict, dtype="float32", chunk_rows=None):
    """Create an array under a temporary name, yield it, mark it complete and rename it to `path`."""
    with atomic_path(path) as tmp:
        arr = create_array(tmp, n, width, attrs, dtype=dtype, chunk_rows=chunk_rows)
        yield arr
        mark_complete(arr)


def ensure_array(path, n: int, width: int | None, attrs: dict, dtype="float32", chunk_rows=None):
    """The (n, width) array at `path`, opened for writing rows in place; its metadata document is
    (re)written from the arguments, its chunks are never deleted. Shards of one extraction call this
    concurrently with identical arguments (an atomic replace of identical bytes); a stale array of
    another shape is overwritten chunk by chunk as the shards write their rows."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.meta-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        create_array(tmp, n, width, attrs, dtype=dtype, chunk_rows=chunk_rows)
        os.replace(tmp / "zarr.json", path / "zarr.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_array(path, mode="r+")


def save_array(path, data: np.ndarray, attrs: dict, chunk_rows=None) -> None:
    data = np.asarray(data, dtype=np.float32)
    width = None if data.ndim == 1 else data.shape[1]
    with write_array(path, data.shape[0], width, attrs, chunk_rows=chunk_rows) as arr:
        arr[...] = data


def is_complete(path) -> bool:
    p = Path(path)
    if not (p / "zarr.json").exists():
        return False
    try:
        return bool(open_array(p).attrs.get("complete", False))
    except Exception:
        return False


def write_manifest(directory, manifest: dict) -> None:
    write_json(Path(directory) / MANIFEST, manifest)


def read_manifest(directory_or_file) -> dict:
    p = Path(directory_or_file)
    return read_json(p if p.name == MANIFEST else p / MANIFEST)
