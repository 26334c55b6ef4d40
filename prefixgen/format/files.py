"""A store's file and folder names, and how its files are written: atomically (temporary name, fsync,
rename; whole or a piece at a time), created at most once among concurrent creators, and renames made durable."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
BUILDS_DIR = "builds"
COUNTS_DIR = "counts"
CLAIMS_DIR = "claims"  # distributed builds: which rank computes which shared prefix (builder/distributed.py)
LOCKS_DIR = "locks"
TMP_SUFFIX = ".tmp"


def temp_path(path: Path, owner: str | None = None) -> Path:
    """The temporary name ``path`` is written under: ``<name>.<owner>.tmp``, so that a cleaner can
    tell whose it is (``<name>.tmp`` without an owner).

    Example:
        >>> temp_path(Path("builds/b.json"), "w1").name
        'b.json.w1.tmp'
    """
    return path.with_name(f"{path.name}.{owner}{TMP_SUFFIX}" if owner else path.name + TMP_SUFFIX)


@contextmanager
def atomic_file(path: Path, fsync: bool = True, owner: str | None = None, room: Path | None = None) -> Iterator[BinaryIO]:
    """A file opened for writing under :func:`temp_path` and renamed to ``path`` (after an fsync) when the block
    ends: readers see the whole file or none of it. If the block raises, the temporary file is removed.
    ``room``: write over that file (of :func:`keep_room`) instead, cut to what was written.

    Example:
        >>> with atomic_file(Path("store/shards/w-000000.safetensors"), owner="w") as f:  # doctest: +SKIP
        ...     os.pwrite(f.fileno(), b"...", 0)
    """
    tmp = room or temp_path(path, owner)
    try:
        with open(tmp, "r+b" if room else "wb") as f:
            yield f
            if room:
                f.truncate()
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk, an I/O error or an interrupt: nothing half-written stays behind.
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview], fsync: bool = True, owner: str | None = None) -> int:
    """Write ``chunks`` to ``path`` under a temporary name (:func:`temp_path`), fsync, then rename:
    readers see the whole file or none of it. Returns the bytes written."""
    written = 0
    with atomic_file(path, fsync, owner) as f:
        for chunk in chunks:
            f.write(chunk)
            written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
    return written


def create_once(path: Path, chunks: Iterable[bytes], fsync: bool = True, owner: str | None = None) -> bool:
    """Create ``path`` whole unless it exists, atomically among concurrent creators (NFS and Lustre
    included): each writes its own temporary file (:func:`temp_path` with ``owner``, or a random
    one) and hard-links it to ``path``; exactly one link succeeds. True if this call created it.

    Example:
        >>> create_once(Path("store/manifest.json"), [b"{}"])  # doctest: +SKIP
        True
    """
    tmp = temp_path(path, owner or secrets.token_hex(4))
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)
    return True


def keep_room(path: Path, size: int) -> None:
    """Allocate ``size`` bytes as the file ``path`` (a temporary name of its writer's): room that
    :func:`write_into_room` turns into a file later, however full the disk is by then. Raises
    OSError (ENOSPC) and leaves nothing if the disk cannot hold it now."""
    try:
        with open(path, "wb") as f:
            f.write(bytes(size))  # written, not truncated: a sparse file keeps no room
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_into_room(room: Path, path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` over the start of ``room`` (a file of :func:`keep_room`, at least ``len(data)``
    bytes), cut it to that length and rename it to ``path``: atomic like :func:`atomic_write`, but it
    overwrites pages already allocated instead of asking for new ones (freeing the room first would let
    another process take it before the write). ``room`` is gone afterwards, whatever happens."""
    with atomic_file(path, fsync, room=room) as f:
        f.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
