"""Scatter writes: a file's bytes written straight from strided views of the read KV, with ``writev``.

An export file is the unit's KV reordered (heads, K/V and tokens moved as whole runs). Building it
in memory and then writing it copies every byte twice; described as an ``iovec`` per run, the kernel
copies each run once, from where the store's read left it, into the page cache. The ``iovec`` arrays
are built with numpy (no Python object per run) and ``writev`` is called through ctypes (the GIL is
released while the kernel copies).

Runs of 1 KiB or more (SGLang's and LMCache's runs of a rank's heads, 2 KiB for 8 heads of 128 in bf16) go
out as iovecs; shorter runs (vLLM's pages interleave each head's K and V: 256-byte runs) are gathered into
a kept per-thread buffer and written as one.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

IOV_MAX = 1024  # Linux's limit of iovecs per writev call
# Runs shorter than this are gathered into a kept buffer first: an iovec costs the kernel ~60 ns, which for 256-byte
# runs (the vLLM target's) is more than copying them here (measured: 0.72-0.92 against 0.81-1.10 CPU s/GB, load 22-25).
SMALL_RUN = 1024
_scratch = threading.local()
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
    iovs, keep, slot = [], [], 0
    for piece in pieces:
        if isinstance(piece, np.ndarray) and not piece.flags.c_contiguous:
            offsets, run = _runs(piece.shape, piece.strides, piece.itemsize)
            if run < SMALL_RUN:  # an iovec a run would cost more than gathering the runs here
                buf = _gather(piece, slot)
                slot += 1
                iovs.append(np.asarray([[buf.ctypes.data, buf.size]], np.uint64))
                continue
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


def _gather(piece: np.ndarray, slot: int) -> np.ndarray:
    """``piece``'s bytes in C order, copied into this thread's kept buffer number ``slot`` (a new array per
    file would cost its pages' faults and zeroing); valid until this thread's next write."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < piece.nbytes:
        buf = bufs[slot] = np.empty(piece.nbytes, np.uint8)
    out = buf[: piece.nbytes]
    out.view(piece.dtype).reshape(piece.shape)[...] = piece
    return out


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
