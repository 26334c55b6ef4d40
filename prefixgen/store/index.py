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

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixgen.errors import CorruptStoreError
from prefixgen.format import INDEX_DIR, Segment, ShardRef

CACHE_BYTES = 64 << 20  # columns of recently used small segments kept in memory
OPEN_RETRIES = 5  # a segment may vanish while we list the folder (compaction removes merged ones)


@dataclass(slots=True, frozen=True)
class BlockLocation:
    """Where one block's KV lives: shard file, slot (block position in the shard), and its CRC."""

    shard: str
    slot: int
    crc: int
    depth: int


class StoreIndex:
    """All index segments of a store.

    Example:
        >>> index = StoreIndex.open(Path("store"))  # doctest: +SKIP
        >>> index.find([key])  # doctest: +SKIP
        [BlockLocation(shard='...', slot=0, crc=..., depth=0)]
    """

    def __init__(self, segments: list[Segment], path: Path | None = None):
        self.path = path
        self.segments = segments
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_bytes = 0
        self._mapped = [i for i, s in enumerate(segments) if s.mapped]
        small = [i for i, s in enumerate(segments) if not s.mapped]
        self._small = np.asarray(small, dtype=np.int64)
        self._starts = np.zeros(len(small) + 1, dtype=np.int64)  # global row number of each small segment's row 0
        np.cumsum([segments[i].n for i in small], out=self._starts[1:])
        total = int(self._starts[-1])
        self._bits = max(1, total.bit_length())  # low bits of a table entry: its global row number
        self._mask = np.uint64((1 << self._bits) - 1)
        if small:
            k64 = np.concatenate([segments[i].key64 for i in small])
            for i in small:
                segments[i].key64 = None  # merged into the table; the segment's copy is not needed
            table = (k64 & ~self._mask) | np.arange(total, dtype=np.uint64)
            table.sort()
            self._table = table  # [total] uint64: key64's high bits | global row, sorted
        else:
            self._table = np.empty(0, np.uint64)

    @classmethod
    def open(cls, path: Path) -> StoreIndex:
        """Open every committed segment in ``path/index``. A segment that vanishes while the folder
        is read (merged by a compaction, whose result is then in the folder) restarts the listing."""
        folder = path / INDEX_DIR
        for _ in range(OPEN_RETRIES):
            names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors")) if folder.is_dir() else []
            try:
                return cls([_open_segment(folder / name) for name in names], path)
            except FileNotFoundError:
                continue
        raise CorruptStoreError(f"{folder}: index segments keep vanishing while being opened; try again")

    @property
    def entries(self) -> int:
        """Index entries (a block written by two concurrent writers counts twice)."""
        return sum(s.n for s in self.segments)

    def columns(self, segment: int) -> dict[str, np.ndarray]:
        """Every column of segment number ``segment`` (small segments are read and kept in a small LRU)."""
        seg = self.segments[segment]
        if seg.mapped:
            return seg.cols
        with self._lock:
            cols = self._cache.get(segment)
            if cols is not None:
                self._cache.move_to_end(segment)
                return cols
        cols = seg.cols
        size = sum(c.nbytes for c in cols.values())
        with self._lock:
            self._cache[segment] = cols
            self._cache_bytes += size
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= sum(c.nbytes for c in old.values())
        return cols

    def find_rows(self, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """(segment number, row) of each key, or None where no segment has it."""
        try:
            return self._find_rows(keys)
        except FileNotFoundError:
            if self.path is None:
                raise
            # A compaction merged a small segment we had not read yet: its rows are in the new segment.
            self._reopen()
            return self._find_rows(keys)

    def _find_rows(self, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        found: list[tuple[int, int] | None] = [None] * len(keys)
        if not keys:
            return found
        q = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")
        for qi, seg, row in self._candidates(q):
            if found[qi] is None and self.columns(seg)["key"][row].tobytes() == keys[qi]:
                found[qi] = (seg, row)
        return found

    def _candidates(self, q: np.ndarray) -> list[tuple[int, int, int]]:
        """(query, segment, row) of every row whose key64 may equal a query's: vectorized over
        queries, one search of the small-segment table and one per mapped segment."""
        parts = []
        if len(self._table):
            high = q & ~self._mask
            lo = np.searchsorted(self._table, high, "left")
            hi = np.searchsorted(self._table, high | self._mask, "right")
            qi, pos = _expand(lo, hi)
            g = (self._table[pos] & self._mask).astype(np.int64)  # global rows
            local = np.searchsorted(self._starts, g, "right") - 1
            parts.append((qi, self._small[local], g - self._starts[local]))
        for si in self._mapped:
            col = self.segments[si].key64
            qi, pos = _expand(np.searchsorted(col, q, "left"), np.searchsorted(col, q, "right"))
            parts.append((qi, np.full(len(qi), si), pos))
        return [(int(a), int(b), int(c)) for qi, seg, row in parts for a, b, c in zip(qi, seg, row)]

    def _reopen(self) -> None:
        fresh = StoreIndex.open(self.path)
        with self._lock:
            self.segments, self._mapped, self._small = fresh.segments, fresh._mapped, fresh._small
            self._starts, self._bits, self._mask, self._table = fresh._starts, fresh._bits, fresh._mask, fresh._table
            self._cache.clear()
            self._cache_bytes = 0

    def find(self, keys: Sequence[bytes]) -> list[BlockLocation | None]:
        """Location of each key's block, or None where the store lacks it."""
        return [None if r is None else self.location(*r) for r in self.find_rows(keys)]

    def location(self, segment: int, row: int) -> BlockLocation:
        seg = self.segments[segment]
        cols = self.columns(segment)
        shard = seg.shards[int(cols["shard"][row])] if "shard" in cols else seg.shards[0]
        return BlockLocation(
            shard=shard.name, slot=int(cols["slot"][row]), crc=int(cols["crc"][row]), depth=int(cols["depth"][row])
        )

    def parent(self, segment: int, row: int) -> bytes:
        """The parent key of a row."""
        return self.columns(segment)["parent"][row].tobytes()

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the store holds (stops at the first missing block)."""
        for i, row in enumerate(self.find_rows(keys)):
            if row is None:
                return i
        return len(keys)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [r is not None for r in self.find_rows(keys)]

    def key_and_parent64(self) -> tuple[np.ndarray, np.ndarray]:
        """[entries] uint64 key64 of every row and of its parent, over all segments (one pass; small
        segments are read from their files): for whole-store scans such as ``ls``."""
        keys, parents = [], []
        for seg in self.segments:
            cols = seg.cols
            keys.append(cols["key64"])
            parents.append(np.ascontiguousarray(cols["parent"][:, :8]).view("<u8").reshape(-1))
        if not keys:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        return np.concatenate(keys), np.concatenate(parents)

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
