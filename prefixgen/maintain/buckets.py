"""Rows keyed by a uint64 partitioned by the key's top bits into unnamed temporary files.

A question over every key of a store (is every parent stored? how many records hold each index
row's block?) is then answered one bucket at a time, in memory that grows with one bucket (about
1/64 of the keys: 2.5 MiB of 16-byte rows at 10 million keys) instead of with the store. Keys are
SHA-256 bytes, so the buckets are even, and a key's matches are in its own bucket.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO

import numpy as np

BUCKET_BITS = 6  # 64 buckets: a temporary file each, per table
MEMORY_BYTES = 1 << 20  # rows held in memory before the first spill (a small store makes no file)


class KeyBuckets:
    """Rows of ``dtype`` (a structured dtype whose first field is the uint64 key, or plain ``<u8``)
    spilled by bucket into unnamed temporary files in ``folder`` (the system's default if None)
    once more than ``MEMORY_BYTES`` (1 MiB) were added, and read back one bucket at a time. Use as a
    context manager.

    Example:
        >>> with KeyBuckets("<u8") as b:
        ...     b.add(np.asarray([1, 2**63], "<u8"))
        ...     b.bucket(0).tolist(), b.bucket(32).tolist()
        ([1], [9223372036854775808])
    """

    def __init__(self, dtype, folder: Path | None = None, bits: int = BUCKET_BITS):
        self.dtype = np.dtype(dtype)
        self.bits = bits
        self.count = 1 << bits
        self._folder = folder
        self._files: list[IO[bytes] | None] = [None] * self.count
        self._held: list[list[np.ndarray]] | None = [[] for _ in range(self.count)]  # None once spilled
        self._held_bytes = 0

    def __enter__(self) -> KeyBuckets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            if f is not None:
                f.close()
        self._files = [None] * self.count
        self._held, self._held_bytes = [[] for _ in range(self.count)], 0

    def number(self, keys: np.ndarray) -> np.ndarray:
        """[n] the bucket of each key."""
        return (np.asarray(keys, np.uint64) >> np.uint64(64 - self.bits)).astype(np.intp)

    def add(self, rows: np.ndarray) -> None:
        """Append ``rows`` ([n] of ``dtype``) to their buckets (rows keep their order within a bucket)."""
        rows = np.asarray(rows, self.dtype)
        keys = rows[self.dtype.names[0]] if self.dtype.names else rows
        which = self.number(keys)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(self.count + 1))
        rows = rows[order]
        if self._held is not None:
            for b in np.flatnonzero(np.diff(bounds)).tolist():
                self._held[b].append(rows[bounds[b] : bounds[b + 1]])
            self._held_bytes += rows.nbytes
            if self._held_bytes > MEMORY_BYTES:
                held, self._held = self._held, None
                for b, parts in enumerate(held):
                    for part in parts:
                        self._write(b, part)
            return
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            self._write(b, rows[bounds[b] : bounds[b + 1]])

    def _write(self, b: int, rows: np.ndarray) -> None:
        if self._files[b] is None:
            self._files[b] = tempfile.TemporaryFile(dir=self._folder)  # unnamed: nothing left after a crash
        self._files[b].write(rows.tobytes())

    def bucket(self, b: int) -> np.ndarray:
        """Every row added to bucket ``b``, in the order added."""
        if self._held is not None:
            parts = self._held[b]
            return np.concatenate(parts) if parts else np.empty(0, self.dtype)
        f = self._files[b]
        if f is None:
            return np.empty(0, self.dtype)
        f.seek(0)
        data = f.read()
        f.seek(0, 2)
        return np.frombuffer(data, self.dtype)
