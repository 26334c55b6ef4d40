"""Scatter writes: a file's bytes written straight from strided views of the read KV, with ``writev``.

An export file is the unit's KV reordered (heads, K/V and tokens moved as whole runs). Building it
in memory and then writing it copies every byte twice; described as an ``iovec`` per run, the kernel
copies each run once, from where the store's read left it, into the page cache. The ``iovec`` arrays
are built with numpy (no Python object per run) and ``writev`` is called through ctypes (the GIL is
released while the kernel copies).

Measured on this machine (2 MiB files of 256-byte runs, the vLLM target's worst case): 0.34 CPU s/GB
against 0.44 for reorder then write, and 0.26 for writing contiguous bytes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

IOV_MAX = 1024  # Linux's limit of iovecs per writev call
_libc = ctypes.CDLL(None, use_errno=True)
_writev = _libc.writev
_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_writev.restype = ctypes.c_ssize_t

Piece = bytes | memoryview | np.ndarray


def nbytes(pieces: Sequence[Piece]) -> int:
    """Bytes ``pieces`` make."""
    return sum(p.nbytes if isinstance(p, np.ndarray) else memoryview(p).nbytes for p in pieces)


def write_pieces(fd: int, pieces: Sequence[Piece]) -> int:
    """Write ``pieces`` in order to ``fd`` (each ndarray's elements in C order, whatever its strides); the
    bytes written."""
    iovs, keep = [], []
    for piece in pieces:
        if isinstance(piece, np.ndarray) and not piece.flags.c_contiguous:
            offsets, run = _runs(piece.shape, piece.strides, piece.itemsize)
            iov = np.empty((len(offsets), 2), np.uint64)
            iov[:, 0] = offsets + piece.ctypes.data  # [n] run addresses
            iov[:, 1] = run
        else:
            buf = np.frombuffer(piece if not isinstance(piece, np.ndarray) else piece.reshape(-1).view(np.uint8), np.uint8)
            if not buf.size:
                continue
            iov = np.asarray([[buf.ctypes.data, buf.size]], np.uint64)
            keep.append(buf)
        iovs.append(iov)
    if not iovs:
        return 0
    iov = np.concatenate(iovs) if len(iovs) > 1 else iovs[0]
    total = 0
    for i in range(0, len(iov), IOV_MAX):
        chunk = iov[i : i + IOV_MAX]
        want = int(chunk[:, 1].sum())
        got = _writev(fd, chunk.ctypes.data, len(chunk))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if got < want:  # a short write (a full disk, a signal): write the rest run by run, as os.write does
            _finish(fd, chunk, got)
        total += want
    return total


def _finish(fd: int, chunk: np.ndarray, done: int) -> None:
    """Write what a short ``writev`` of ``chunk`` left after its first ``done`` bytes."""
    for addr, length in chunk.tolist():
        if done >= length:
            done -= length
            continue
        view = (ctypes.c_char * (length - done)).from_address(addr + done)
        data = memoryview(view).cast("B")
        while len(data):
            data = data[os.write(fd, data) :]
        done = 0


@lru_cache(maxsize=64)
def _runs(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[np.ndarray, int]:
    """(byte offsets of the contiguous runs of an array of this shape and strides, in C order; run bytes).
    Trailing axes that are contiguous with the item are folded into the run."""
    run = itemsize
    shape, strides = list(shape), list(strides)
    while shape and strides[-1] == run:
        run *= shape.pop()
        strides.pop()
    offsets = np.zeros(1, np.int64)
    for n, s in zip(shape, strides):
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * s).reshape(-1)
    offsets.setflags(write=False)
    return offsets, run
