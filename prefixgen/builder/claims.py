"""Distributed builds, claims and leases: how ``--rank`` ranks that never talk share work through
the store. A claim is a file made with ``O_EXCL`` (:func:`_claim`), held under a lease its holder
renews (:class:`_Lease`), judged stale by the file system's clock (:class:`_Clock`) or at once when
its holder's writer lock is free (:class:`_Holders`), and taken over by exactly one rank. Waiting
ranks back off (:class:`_Backoff`) and look at a bounded number of claims a round; a level's head
runs are claimed by ranges (:func:`head_ranges`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from prefixgen.errors import StoreError
from prefixgen.format import atomic_write
from prefixgen.store.writer import ID_PATTERN, utc_now, writer_is_live

CLAIM_STALE_SECONDS = 120.0  # a claim whose lease was not renewed for this long (file system clock) is taken over
LEASE_SECONDS = CLAIM_STALE_SECONDS / 8  # how often a claimer renews its claims
POLL_SECONDS = 0.05  # the first pause of a waiting rank; it doubles while nothing changes, up to:
MAX_POLL_SECONDS = 1.0
HEAD_RANGE_TOKENS = 1 << 20  # the most tokens of head runs one claim covers (its holder's work until it renews)
CLAIMS_PER_ROUND = 16  # claims of others a waiting rank looks at per round (in turn): its metadata ops stay bounded


def head_ranges(blocks: np.ndarray, world: int, block_size: int = 16) -> list[np.ndarray]:
    """A level's head runs (``blocks`` [n]: blocks of each, in the level's order) cut into ranges
    of consecutive runs, each claimed as one (``--rank``): about a fair share of the level's
    tokens each (the level over ``world``; at most HEAD_RANGE_TOKENS, a run longer than that is
    a range of its own), so a level is at most about ``world`` claims however many runs it has.
    A function of the plan and ``world`` only: every rank cuts the same ranges.

    Example:
        >>> [r.tolist() for r in head_ranges(np.array([1, 1, 1, 1, 4]), 2)]
        [[0, 1, 2, 3], [4]]
    """
    blocks = np.asarray(blocks, np.int64)
    total = int(blocks.sum())
    target = min(max(1, -(-total // max(world, 1))), max(1, HEAD_RANGE_TOKENS // block_size))  # in blocks
    before = np.cumsum(blocks) - blocks
    bucket = before // target  # runs starting in the same stretch of ``target`` blocks: one range
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    return np.split(np.arange(len(blocks)), cuts) if len(blocks) else []


class _Lease:
    """Renew claims (touch them) while their holder works, so that a slow live claimer is not taken over."""

    def __init__(self, paths: list[Path]):
        self.paths, self._stop = paths, threading.Event()
        self._thread = threading.Thread(target=self._renew, name="prefixgen-lease", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS):
            for p in self.paths:
                try:
                    os.utime(p)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> _Lease:
        if self.paths:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _fs_now(folder: Path, owner: str) -> float:
    """The file system's clock: the mtime of a file just touched here (nodes' own clocks may differ).
    The probe file is made once and touched after: two metadata operations a probe."""
    probe = folder / f".clock-{owner}"
    try:
        os.utime(probe)
    except FileNotFoundError:
        probe.write_bytes(b"")  # made now: its mtime is now
    return probe.stat().st_mtime


class _Clock:
    """The file system's clock for one round of claims: probed (:func:`_fs_now`) the first time a
    claim needs it, then reused: one probe file write per round, not one per claim."""

    def __init__(self, folder: Path, owner: str):
        self.folder, self.owner, self._now = folder, owner, None

    def __call__(self) -> float:
        if self._now is None:
            self._now = _fs_now(self.folder, self.owner)
        return self._now


class _Backoff:
    """Sleeps of a waiting rank: POLL_SECONDS at first, doubling while nothing changes, up to
    MAX_POLL_SECONDS; ``reset()`` after progress."""

    def __init__(self):
        self.pause = POLL_SECONDS

    def __call__(self) -> None:
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, MAX_POLL_SECONDS)

    def reset(self) -> None:
        self.pause = POLL_SECONDS


class _Holders:
    """Which claim holders are known dead: their writer's lock in the store is free (the kernel frees
    it when the process dies, ``kill -9`` too), so their claims need not wait out the lease. Each
    holder is asked once (make one per round of claims: a live holder may die later)."""

    def __init__(self, store: Path):
        self.store, self._dead = store, {}

    def dead(self, holder: str) -> bool:
        if holder not in self._dead:
            try:
                self._dead[holder] = not writer_is_live(self.store, holder)
            except StoreError:  # the lock cannot be read here: only the lease tells
                self._dead[holder] = False
        return self._dead[holder]


def _claim(
    path: Path,
    owner: str,
    stale: float = CLAIM_STALE_SECONDS,
    now: float | Callable[[], float] | None = None,
    holders: _Holders | None = None,
) -> bool:
    """Take ``path`` (O_EXCL): True if ``owner`` now holds it. A claim whose lease (its mtime, renewed
    by a live holder) is older than ``stale`` by the file system's clock, or whose holder is dead
    (``holders``), is taken over by exactly one rank: the one that creates
    ``<claim>.takeover-<holder>`` (O_EXCL), naming the holder it saw, so that two takers cannot both
    win, nor a taker displace the new holder. ``now``: the file system's time, if the caller has just
    read it, or a :class:`_Clock` that reads it once for many claims."""
    line = f"{owner} {utc_now()}\n".encode()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            mtime = path.stat().st_mtime
            holder = (path.read_text().split() or [""])[0]
        except FileNotFoundError:
            return False
        if holder == owner:
            return True
        clock = now() if callable(now) else now if now is not None else _fs_now(path.parent, owner)
        fresh = clock - mtime < stale
        # Only a whole writer id is asked for its lock: a claim just created is empty until its
        # holder writes its id (and a part of an id names no lock, which would read as dead).
        if fresh and not (holders is not None and ID_PATTERN.fullmatch(holder) and holders.dead(holder)):
            return False
        # The marker naming the holder we saw is a claim itself, with its own holder and lease: one
        # taker wins it, and a taker that dies (or meets a full disk) before it rewrote the claim is
        # taken over in turn, instead of blocking the claim forever.
        if not _claim(path.with_name(f"{path.name}.takeover-{holder}"), owner, stale, now, holders):
            return False  # another rank takes it over from this holder
        try:
            current = (path.read_text().split() or [""])[0]
        except FileNotFoundError:
            return False
        if current != holder:
            return current == owner  # a taker before us rewrote it (and may have died: its own marker next)
        atomic_write(path, [line], fsync=False, owner=owner)
        return True
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(line)
    except BaseException:
        # A full disk: an empty claim names no holder, so no one could tell it dead and every other
        # rank would wait out its whole lease. Nobody else writes a claim this fresh: remove it.
        path.unlink(missing_ok=True)
        raise
    return True
