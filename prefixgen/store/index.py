"""The read side's index: the union of every writer's index segments, memory-mapped.

Opening reads only segment headers; a lookup binary-searches each segment's sorted ``key64``
column and compares whole keys, so a store of 10 million blocks opens and matches a prompt
in well under a second without loading the index into memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixgen.errors import CorruptStoreError
from prefixgen.format import INDEX_DIR, Segment


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

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    @classmethod
    def open(cls, path: Path) -> StoreIndex:
        folder = path / INDEX_DIR
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors")) if folder.is_dir() else []
        segments = []
        for name in names:
            try:
                segments.append(Segment(folder / name))
            except OSError as exc:
                raise CorruptStoreError(f"cannot read index segment {folder / name}: {exc}") from None
        return cls(segments)

    @property
    def entries(self) -> int:
        """Index entries (a block written by two concurrent writers counts twice)."""
        return sum(s.n for s in self.segments)

    def find_rows(self, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """(segment number, row) of each key, or None where no segment has it."""
        found: list[tuple[int, int] | None] = [None] * len(keys)
        if not keys:
            return found
        q = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")
        for si, seg in enumerate(self.segments):
            if seg.n == 0:
                continue
            col = seg.cols["key64"]
            pos = np.searchsorted(col, q)
            hit = pos < seg.n
            hit[hit] &= col[pos[hit]] == q[hit]
            for qi in np.flatnonzero(hit):
                if found[qi] is not None:
                    continue
                row = int(pos[qi])
                while row < seg.n and col[row] == q[qi]:
                    if seg.cols["key"][row].tobytes() == keys[qi]:
                        found[qi] = (si, row)
                        break
                    row += 1
        return found

    def find(self, keys: Sequence[bytes]) -> list[BlockLocation | None]:
        """Location of each key's block, or None where the store lacks it."""
        return [None if r is None else self.location(*r) for r in self.find_rows(keys)]

    def location(self, segment: int, row: int) -> BlockLocation:
        seg = self.segments[segment]
        return BlockLocation(
            shard=seg.shard, slot=int(seg.cols["slot"][row]), crc=int(seg.cols["crc"][row]), depth=int(seg.cols["depth"][row])
        )

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the store holds (stops at the first missing block)."""
        for i, row in enumerate(self.find_rows(keys)):
            if row is None:
                return i
        return len(keys)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [r is not None for r in self.find_rows(keys)]
