"""The read side's index: the union of every index segment of a store.

A lookup costs O(log n) in the number of blocks and does not loop over segments in Python:

* large segments (compacted ones) are memory-mapped and binary-searched, one vectorized
  ``searchsorted`` per segment for all queries (compaction keeps them few);
* small segments (one per shard, written by builds) are not mapped (a store can hold more of
  them than the kernel allows memory maps): opening reads their ``key64`` columns into one sorted
  table of ``key64`` prefixes packed with a global row number, 8 bytes per block, searched once
  for all queries. Their other columns are read from the file when a row is needed.

Either way a candidate row is confirmed by comparing the whole 32-byte key.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from prefixgen.errors import CorruptStoreError
from prefixgen.format import INDEX_DIR, Segment, ShardRef

CACHE_BYTES = 64 << 20  # columns of recently used small segments kept in memory
OPEN_PATIENCE_SECONDS = 60.0  # how long a listing may keep changing under an opener (a compaction's unlinks)
LOCATION_COLUMNS = (
    "key",
    "shard",
    "slot",
    "crc",
    "depth",
)  # what a lookup reads of a row  # a segment may vanish while we list the folder (compaction removes merged ones)


class BlockLocation(NamedTuple):
    """Where one block's KV lives: shard file, slot (block position in the shard), and its CRC.
    (A named tuple: a request's lookup builds hundreds, and a tuple is built ~5x faster than a
    frozen dataclass.)"""

    shard: str
    slot: int
    crc: int
    depth: int


@dataclass(slots=True)
class _Tables:
    """The searchable form of one set of segments (replaced whole when the index reopens)."""

    segments: list[Segment]
    mapped: list[int]  # numbers of the memory-mapped segments
    small: np.ndarray  # [s] numbers of the small segments, in table order
    starts: np.ndarray  # [s + 1] global row number of each small segment's row 0
    mask: np.uint64  # low bits of a table entry: its global row number
    table: np.ndarray  # [rows of small segments] uint64: key64's high bits | global row, sorted

    @classmethod
    def build(cls, segments: list[Segment]) -> _Tables:
        mapped = [i for i, s in enumerate(segments) if s.mapped]
        small = [i for i, s in enumerate(segments) if not s.mapped]
        starts = np.zeros(len(small) + 1, dtype=np.int64)
        np.cumsum([segments[i].n for i in small], out=starts[1:])
        total = int(starts[-1])
        mask = np.uint64((1 << max(1, total.bit_length())) - 1)
        table = np.empty(0, np.uint64)
        if small:
            k64 = np.concatenate([segments[i].key64 for i in small])
            for i in small:
                segments[i].key64 = None  # merged into the table; the segment's copy is not needed
            table = (k64 & ~mask) | np.arange(total, dtype=np.uint64)
            table.sort()
        return cls(segments, mapped, np.asarray(small, dtype=np.int64), starts, mask, table)

    def candidates(self, q: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(segment, queries, rows) for each segment with rows whose key64 may equal a query's:
        vectorized over queries, one search of the small-segment table and one per mapped segment.
        Rows found in key64 chunks read for the first time are prefetched (all columns at once)."""
        parts = []
        if len(self.table):
            high = q & ~self.mask
            qi, pos = _expand(np.searchsorted(self.table, high, "left"), np.searchsorted(self.table, high | self.mask, "right"))
            g = (self.table[pos] & self.mask).astype(np.int64)  # global rows
            local = np.searchsorted(self.starts, g, "right") - 1
            segs = self.small[local]
            for si in np.unique(segs).tolist():
                m = segs == si
                parts.append((si, qi[m], (g - self.starts[local])[m]))
        for si in self.mapped:
            seg = self.segments[si]
            lo, hi, first = seg.search(q)
            qi, rows = _expand(lo, hi)
            if len(rows):
                if first:
                    seg.prefetch(rows, LOCATION_COLUMNS)
                parts.append((si, qi, rows))
        return parts


class StoreIndex:
    """All index segments of a store. Safe to use from several threads.

    Example:
        >>> index = StoreIndex.open(Path("store"))  # doctest: +SKIP
        >>> index.find([key])  # doctest: +SKIP
        [BlockLocation(shard='...', slot=0, crc=..., depth=0)]
    """

    def __init__(self, segments: list[Segment], path: Path | None = None, signature: tuple | None = None):
        self.path = path
        self._tables = _Tables.build(segments)
        self._signature = signature  # what the index folder looked like just before it was read (see changed())
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[Segment, dict[str, np.ndarray]]] = OrderedDict()  # id(segment) -> columns
        self._cache_bytes = 0

    @classmethod
    def open(cls, path: Path) -> StoreIndex:
        """Open every committed segment in ``path/index``. A segment that vanishes while the folder
        is read (merged by a compaction, whose result is then in the folder) restarts the listing."""
        segments = _open_segments(path)
        opened = tuple(sorted(s.path.name for s in segments))
        large = tuple(sorted((s.path.name, *s.opened_stat) for s in segments if s.mapped))
        return cls(segments, path, (opened, large))

    def changed(self) -> bool:
        """Whether the index folder differs from when this index was read: a segment added, removed or
        renamed (a build or append, a compaction, a prune, gc), or a large segment rewritten or
        truncated in place (its inode, size or mtime). A listing of the folder and a stat of each
        large segment: cheap enough to ask every second or two."""
        if self.path is None or self._signature is None:
            return False
        return _signature(self.path, self.segments) != self._signature

    def reopened(self) -> StoreIndex:
        """A new index of the same folder as it is now (the caller swaps it in; this one stays usable)."""
        assert self.path is not None
        return StoreIndex.open(self.path)

    @property
    def segments(self) -> list[Segment]:
        return self._tables.segments

    @property
    def entries(self) -> int:
        """Index entries (a block written by two concurrent writers counts twice)."""
        return sum(s.n for s in self.segments)

    def columns(self, segment: int) -> dict[str, np.ndarray]:
        """Every column of segment number ``segment`` (small segments are read and kept in a small LRU)."""
        return self._columns(self.segments[segment])

    def _columns(self, seg: Segment) -> dict[str, np.ndarray]:
        if seg.mapped:
            return seg.rows  # only the rows a lookup indexes are read
        with self._lock:
            hit = self._cache.get(id(seg))
            if hit is not None and hit[0] is seg:
                self._cache.move_to_end(id(seg))
                return hit[1]
        cols = seg.cols
        with self._lock:
            self._cache[id(seg)] = (seg, cols)
            self._cache_bytes += sum(c.nbytes for c in cols.values())
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                _, (_, old) = self._cache.popitem(last=False)
                self._cache_bytes -= sum(c.nbytes for c in old.values())
        return cols

    def find_rows(self, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """(segment number, row) of each key, or None where no segment has it. Prefer :meth:`find`,
        which cannot be split by a reopen between the lookup and the location."""
        return self._retry(lambda t: self._find_rows(t, keys))

    def find(self, keys: Sequence[bytes]) -> list[BlockLocation | None]:
        """Location of each key's block, or None where the store lacks it."""

        def run(t: _Tables) -> list[BlockLocation | None]:
            return self._locations(t, self._find_rows(t, keys))

        return self._retry(run)

    def find_prefix(self, keys: Sequence[bytes]) -> list[BlockLocation]:
        """Locations of the longest leading run of ``keys`` that the store holds (locations are
        built only for that run)."""

        def run(t: _Tables) -> list[BlockLocation]:
            rows = self._find_rows(t, keys)
            n = next((i for i, r in enumerate(rows) if r is None), len(rows))
            return self._locations(t, rows[:n])  # type: ignore[return-value]

        return self._retry(run)

    def _retry(self, run):
        # A compaction or prune replaced a small segment we had not read yet: its rows are in a segment of
        # the folder's next listing. Compactions and prunes may follow one another while we search, so the
        # index is reopened until a search runs on segments that are all still there (with a backing-off
        # pause; a folder that keeps changing for OPEN_PATIENCE_SECONDS is an error, as for an opener).
        pause, deadline = 0.002, time.monotonic() + OPEN_PATIENCE_SECONDS
        while True:
            tables = self._tables
            try:
                return run(tables)
            except FileNotFoundError:
                if self.path is None or time.monotonic() > deadline:
                    raise
            fresh = _Tables.build(_open_segments(self.path))
            with self._lock:
                if self._tables is tables:
                    self._tables = fresh
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _find_rows(self, tables: _Tables, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        found: list[tuple[int, int] | None] = [None] * len(keys)
        if not keys:
            return found
        joined = b"".join(keys)
        if len(joined) != 32 * len(keys):
            raise ValueError("block keys are 32 bytes")
        want = np.frombuffer(joined, np.uint8).reshape(-1, 32)  # [queries, 32]
        q = np.ascontiguousarray(want[:, :8]).view("<u8").reshape(-1)
        for si, qi, rows in tables.candidates(q):
            same = (self._columns(tables.segments[si])["key"][rows] == want[qi]).all(axis=1)
            for a, r in zip(qi[same].tolist(), rows[same].tolist()):
                if found[a] is None:
                    found[a] = (si, r)
        return found

    def _locations(self, tables: _Tables, rows: list[tuple[int, int] | None]) -> list[BlockLocation | None]:
        """The BlockLocation of each (segment, row): columns gathered per segment, not per row."""
        out: list[BlockLocation | None] = [None] * len(rows)
        by_seg: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r is not None:
                by_seg.setdefault(r[0], []).append(i)
        for si, idx in by_seg.items():
            seg = tables.segments[si]
            cols = self._columns(seg)
            at = np.asarray([rows[i][1] for i in idx])  # type: ignore[index]
            shard_ids = cols["shard"][at].tolist() if "shard" in cols else [0] * len(at)
            names = {s: seg.shard_name(s) for s in set(shard_ids)}
            found = map(
                BlockLocation,
                map(names.__getitem__, shard_ids),
                cols["slot"][at].tolist(),
                cols["crc"][at].tolist(),
                cols["depth"][at].tolist(),
            )
            for i, loc in zip(idx, found):
                out[i] = loc
        return out

    def location(self, segment: int, row: int) -> BlockLocation:
        return self._location(self.segments[segment], row)

    def _location(self, seg: Segment, row: int) -> BlockLocation:
        cols = self._columns(seg)
        shard = seg.shard_name(int(cols["shard"][row]) if "shard" in cols else 0)
        return BlockLocation(shard=shard, slot=int(cols["slot"][row]), crc=int(cols["crc"][row]), depth=int(cols["depth"][row]))

    def parent(self, segment: int, row: int) -> bytes:
        """The parent key of a row."""
        return self.columns(segment)["parent"][row].tobytes()

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [r is not None for r in self.find_rows(keys)]

    def shard_blocks(self) -> list[tuple[ShardRef, int]]:
        """Every shard the index names, with how many index rows point into it."""
        out: dict[str, tuple[ShardRef, int]] = {}
        for seg in self.segments:
            if seg.compacted:
                rows = np.bincount(seg.cols["shard"], minlength=len(seg.shards))
            else:
                rows = [seg.n]
            for ref, n in zip(seg.shards, rows):
                prev = out.get(ref.name)
                out[ref.name] = (ref, int(n) + (prev[1] if prev else 0))
        return list(out.values())


def _signature(path: Path, segments: list[Segment]) -> tuple:
    """The index folder's segment names, and (name, inode, size, mtime) of each of ``segments`` that is
    large (read in place as it is searched; a small one is read whole on each use)."""
    folder = path / INDEX_DIR
    try:
        names = tuple(sorted(p for p in os.listdir(folder) if p.endswith(".safetensors")))
    except FileNotFoundError:
        names = ()
    large = []
    for seg in segments:
        if seg.mapped:
            try:
                st = os.stat(seg.path)
                large.append((seg.path.name, st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                large.append((seg.path.name, None, None, None))
    return names, tuple(sorted(large))


def _open_segments(path: Path, patience: float = OPEN_PATIENCE_SECONDS) -> list[Segment]:
    """Every segment in ``path/index``, consistent with one listing of the folder.

    A compaction (or prune) renames its new segment in before it unlinks the ones it replaces, so a
    segment that vanishes while we read has its rows in a segment the next listing shows. We list
    again and open only the names not opened yet (what we opened stays valid: its rows are stored),
    until one listing is wholly opened; the pause between listings backs off, and only a folder
    that keeps changing for ``patience`` seconds is an error."""
    folder = path / INDEX_DIR
    opened: dict[str, Segment] = {}
    pause, deadline = 0.002, time.monotonic() + patience
    while True:
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors")) if folder.is_dir() else []
        vanished = False
        for name in names:
            if name not in opened:
                try:
                    opened[name] = _open_segment(folder / name)
                except FileNotFoundError:
                    vanished = True
        if not vanished:
            return [opened[name] for name in names]
        if time.monotonic() > deadline:
            raise CorruptStoreError(f"{folder}: index segments kept vanishing for {patience:.0f} s while being opened; try again")
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def _open_segment(path: Path) -> Segment:
    try:
        return Segment(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptStoreError(f"cannot read index segment {path}: {exc}") from None


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query i the positions lo[i] .. hi[i]-1, flattened: (query numbers, positions)."""
    counts = hi - lo
    qi = np.repeat(np.arange(len(lo)), counts)
    first = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    return qi, first + np.arange(len(qi))
