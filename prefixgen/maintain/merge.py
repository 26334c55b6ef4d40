"""Merge sorted index segments into one compacted segment in memory that grows with the shards, not the rows.

Compaction's engine (``prefixgen compact``, the end of every build, step 1 of ``prune``). Holding
every row at once (88 bytes a row, several copies while sorting) would take 25-30 GB at 100 million
rows, so this is an external merge sort:

1. small segments (one per shard, read whole) are gathered in input order into groups of up to
   ``RUN_ROWS`` rows, each sorted in memory and spilled to an unnamed temporary file in the index
   folder (a crash leaves nothing behind); a large segment (a compacted one) is already sorted and
   is read in place, a chunk at a time;
2. while there are more than ``FAN_IN`` sorted runs, consecutive ones are merged into longer runs;
3. the last merge drops duplicate rows and spills the result column by column;
4. :meth:`MergedSegment.encode` streams the header and the columns into the new segment.

The result is byte for byte what sorting all rows at once gave: rows ordered by ``key64``, ties in
input order (segment, then row), a row dropped when it repeats the row before it (same ``key``),
shards listed in the order the input segments name them.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

import numpy as np
from tqdm import tqdm

from prefixgen.errors import CorruptStoreError
from prefixgen.format import (
    SEGMENT_COLUMNS,
    Segment,
    ShardRef,
    key64_chunks_of,
    segment_header,
    segment_tensors,
)

COLUMNS = tuple(SEGMENT_COLUMNS)  # a compacted segment's columns, in file order
WIDTH = {name: np.dtype(dt).itemsize * w for name, (dt, w) in SEGMENT_COLUMNS.items()}  # bytes a row
ROW_BYTES = sum(WIDTH.values())  # 88
RUN_ROWS = 1 << 20  # rows of small segments sorted in memory at once (~90 MiB of columns)
FAN_IN = 64  # sorted runs merged at once
MERGE_BYTES = 128 << 20  # read-ahead of one merge, shared by its runs
MIN_CHUNK_ROWS = 1024  # rows a run reads at a time, at least
COPY_BYTES = 16 << 20  # piece size when streaming a spilled column into the segment

Columns = dict[str, np.ndarray]


class _Run(Protocol):
    """Rows sorted by key64 (ties in input order), every column of a compacted segment."""

    n: int

    def read(self, start: int, stop: int) -> Columns: ...


class _MemoryRun:
    """A sorted run held in memory (the last, partial group of small segments)."""

    def __init__(self, cols: Columns):
        self.cols, self.n = cols, len(cols["key64"])

    def read(self, start: int, stop: int) -> Columns:
        return {name: col[start:stop] for name, col in self.cols.items()}


class _FileRun:
    """A sorted run stored column after column in a file, read with ``pread`` a chunk at a time (no
    memory map: pages read stay out of this process's resident set). Either a spilled run, or a large
    input segment read in place: then its ``shard`` values are mapped to merged shard numbers
    (``shard_map``) and each column is checked against its CRC-32 once read to its end."""

    def __init__(
        self,
        f: IO[bytes],
        n: int,
        starts: dict[str, int],
        shard_map: np.ndarray | None = None,
        checksums: dict[str, int | None] | None = None,
        where: Path | None = None,
    ):
        self.f, self.n, self.starts, self.shard_map, self.where = f, n, starts, shard_map, where
        self.checksums = checksums or {}
        self._crcs = dict.fromkeys(COLUMNS, 0)
        self._pos = 0

    def read(self, start: int, stop: int) -> Columns:
        assert start == self._pos, "a run is read front to back"
        self._pos = stop
        out = {}
        for name in COLUMNS:
            dtype, width = SEGMENT_COLUMNS[name]
            if name not in self.starts:  # `shard` of a one-shard segment
                out[name] = np.full(stop - start, self.shard_map[0], np.uint32)
                continue
            size = (stop - start) * WIDTH[name]
            raw = os.pread(self.f.fileno(), size, self.starts[name] + start * WIDTH[name])
            if len(raw) != size:
                raise CorruptStoreError(f"{self.where or 'a compaction spill file'} ended early while being merged")
            if self.checksums.get(name) is not None:
                self._crcs[name] = zlib.crc32(raw, self._crcs[name])
                if stop == self.n and self._crcs[name] != self.checksums[name]:
                    raise CorruptStoreError(
                        f"{self.where}: index segment fails its checksum (column {name!r}); the store is damaged: "
                        f"run `prefixgen verify {self.where.parent.parent}`"
                    )
            col = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
            col = col.reshape(-1, width) if width > 1 else col
            out[name] = self.shard_map[col] if name == "shard" and self.shard_map is not None else col
        return out


class Spill:
    """Rows in an unnamed temporary file of up to ``capacity`` rows, column after column, filled in order."""

    def __init__(self, folder: Path, capacity: int):
        self.f = tempfile.TemporaryFile(dir=folder)  # unnamed (O_TMPFILE): nothing to clean up after a crash
        self.n = 0
        self.starts: dict[str, int] = {}
        offset = 0
        for name in COLUMNS:
            self.starts[name], offset = offset, offset + capacity * WIDTH[name]
        self.crcs = dict.fromkeys(COLUMNS, 0)

    def append(self, cols: Columns) -> None:
        for name in COLUMNS:
            raw = (
                np.ascontiguousarray(cols[name], np.dtype(SEGMENT_COLUMNS[name][0]).newbyteorder("<")).reshape(-1).view(np.uint8)
            )
            self.crcs[name] = zlib.crc32(raw, self.crcs[name])
            _pwrite_all(self.f.fileno(), raw, self.starts[name] + self.n * WIDTH[name])
        self.n += len(cols["key64"])

    def run(self) -> _FileRun:
        return _FileRun(self.f, self.n, self.starts)

    def column(self, name: str) -> Iterator[memoryview]:
        """The bytes of column ``name``, in pieces of at most COPY_BYTES."""
        start, end = self.starts[name], self.starts[name] + self.n * WIDTH[name]
        step = max(WIDTH[name], COPY_BYTES // WIDTH[name] * WIDTH[name])
        for at in range(start, end, step):
            raw = os.pread(self.f.fileno(), min(step, end - at), at)
            if len(raw) != min(step, end - at):
                raise CorruptStoreError("a compaction spill file ended early")
            yield memoryview(raw)


class MergedSegment:
    """The rows of index segments merged into one compacted segment, held in temporary files until
    :meth:`encode` writes it out. Use as a context manager (the temporary files are closed on exit).

    ``merged`` lists the segments read (one that vanished while being read, merged by a concurrent
    compaction, is skipped and not listed); ``refs`` the shards their rows name.

    Example:
        >>> with MergedSegment(paths) as m:  # doctest: +SKIP
        ...     atomic_write(folder / out, m.encode({"format_version": "2", "blocks": str(m.rows_out)}))
    """

    def __init__(self, paths: list[Path], progress: bool = False):
        self.merged: list[Path] = []
        self.refs: list[ShardRef] = []
        self.rows_in = 0
        self.rows_out = 0
        self._files: list[IO[bytes]] = []
        self._out: Spill | None = None
        self._shards: dict[str, int] = {}
        try:
            runs = self._sorted_runs(paths, progress)
            if len(self.merged) < 2:
                return
            folder = paths[0].parent
            while len(runs) > FAN_IN:  # bounded fan-in: merge consecutive runs (ties stay in input order)
                runs = [self._spill(folder, runs[i : i + FAN_IN], dedup=False) for i in range(0, len(runs), FAN_IN)]
            self._out = self._spill(folder, runs, dedup=True)
            self.rows_out = self._out.n
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MergedSegment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def encode(self, metadata: dict[str, str]) -> Iterator[bytes | memoryview]:
        """The new segment's bytes, a piece at a time: what ``encode_segment`` gives for the merged
        rows, with ``metadata``."""
        assert self._out is not None, "fewer than two segments were merged"
        return encode_spill(self._out, metadata, self.refs)

    # ------------------------------------------------------------------ steps

    def _sorted_runs(self, paths: list[Path], progress: bool) -> list[_Run]:
        """Step 1: sorted runs of the input rows, in input order. Runs are merged as they come, FAN_IN
        at a time, into runs of the next level (a counter in base FAN_IN), so that a billion rows do
        not keep a thousand temporary files (and file descriptors) open: levels[k] holds up to
        FAN_IN - 1 runs of FAN_IN**k, all after those of levels[k + 1] in input order."""
        levels: list[list[_Run]] = [[]]
        group: list[Columns] = []
        grouped = 0

        def add(run: _Run, folder: Path) -> None:
            levels[0].append(run)
            for k in range(len(levels)):
                if len(levels[k]) < FAN_IN:
                    break
                if k + 1 == len(levels):
                    levels.append([])
                levels[k + 1].append(self._spill(folder, levels[k], dedup=False))
                levels[k] = []

        def flush(folder: Path | None = None) -> None:
            """Sort the group into a run: spilled into ``folder``, or (the last one) kept in memory."""
            nonlocal group, grouped
            if group:
                cols = {name: np.concatenate([g[name] for g in group]) for name in COLUMNS}
                group, grouped = [], 0
                cols = _take(cols, np.argsort(cols["key64"], kind="stable"))
                if folder is None:
                    levels[0].append(_MemoryRun(cols))
                    return
                spill = Spill(folder, len(cols["key64"]))
                self._files.append(spill.f)
                spill.append(cols)
                add(spill.run(), folder)

        for path in tqdm(paths, desc="compact", unit="seg", disable=not progress):
            try:
                seg = Segment(path)
                f = open(path, "rb") if seg.mapped else None  # noqa: SIM115 (closed with the merge)
                cols = None if seg.mapped else dict(seg.cols)  # read whole and checked
            except FileNotFoundError:
                continue  # merged by a concurrent compaction: its rows are in that one's output
            ids = np.asarray([self._shard_number(ref) for ref in seg.shards], dtype=np.uint32)
            self.merged.append(path)
            self.rows_in += seg.n
            if f is not None:  # already sorted: read in place, after the runs before it
                self._files.append(f)
                flush(path.parent)
                starts = {name: span[0] for name in COLUMNS if (span := seg.column_span(name)) is not None}
                sums = {name: seg.column_checksum(name) for name in COLUMNS}
                add(_FileRun(f, seg.n, starts, ids, sums, path), path.parent)
                continue
            cols["shard"] = ids[seg.shard_ids(cols)]
            group.append(cols)
            grouped += seg.n
            if grouped >= RUN_ROWS:
                flush(path.parent)
        flush()
        return [run for level in reversed(levels) for run in level]

    def _shard_number(self, ref: ShardRef) -> int:
        if ref.name not in self._shards:
            self._shards[ref.name] = len(self.refs)
            self.refs.append(ref)
        return self._shards[ref.name]

    def _spill(self, folder: Path, runs: list[_Run], dedup: bool) -> Spill | _FileRun:
        """Merge ``runs`` into a temporary file (a run for the next merge, or with ``dedup`` the result)."""
        out = Spill(folder, sum(r.n for r in runs))
        self._files.append(out.f)
        for batch in _merge(runs, dedup):
            out.append(batch)
        for run in runs:  # merged: free their temporary space now (an input segment's file just closes)
            if isinstance(run, _FileRun):
                run.f.close()
        return out if dedup else out.run()


def _merge(runs: list[_Run], dedup: bool) -> Iterator[Columns]:
    """The rows of ``runs`` in sorted batches: by key64, ties in run order then row order (what a
    stable sort of all rows in input order gives). With ``dedup``, a row equal (same ``key``) to the
    row before it is dropped. Each batch holds whole groups of equal key64, so dropping within a
    batch drops exactly what a sort of all rows would.

    Memory: each run buffers one to two chunks of MERGE_BYTES / len(runs) bytes."""
    chunk = max(MIN_CHUNK_ROWS, MERGE_BYTES // (ROW_BYTES * max(1, len(runs))))
    pos = [0] * len(runs)  # next row to read of each run
    pend: list[Columns | None] = [None] * len(runs)  # read, not yet emitted

    def fill(i: int) -> None:
        stop = min(pos[i] + chunk, runs[i].n)
        new = runs[i].read(pos[i], stop)
        pos[i] = stop
        old = pend[i]
        pend[i] = new if old is None or not len(old["key64"]) else {c: np.concatenate([old[c], new[c]]) for c in COLUMNS}

    while True:
        for i, run in enumerate(runs):
            if pos[i] < run.n and (pend[i] is None or len(pend[i]["key64"]) < max(1, chunk // 2)):
                fill(i)
        more = [i for i, run in enumerate(runs) if pos[i] < run.n]
        # Rows below `bound` are all read (every run still being read has buffered past them).
        bound = min(pend[i]["key64"][-1] for i in more) if more else None
        takes = [
            0 if p is None else len(p["key64"]) if bound is None else int(np.searchsorted(p["key64"], bound, "left"))
            for p in pend
        ]
        if not any(takes):
            if bound is None:
                return
            for i in more:  # a run whose buffer is all ties at the bound: read further
                if pend[i]["key64"][-1] == bound:
                    fill(i)
            continue
        parts = []
        for i, t in enumerate(takes):
            if t:
                parts.append({c: v[:t] for c, v in pend[i].items()})
                pend[i] = {c: v[t:] for c, v in pend[i].items()}
        batch = parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}
        order = np.argsort(batch["key64"], kind="stable")
        if dedup:
            k64 = batch["key64"][order]
            tie = np.flatnonzero(k64[1:] == k64[:-1]) + 1  # rows whose key64 equals the row before's
            same = tie[(batch["key"][order[tie]] == batch["key"][order[tie - 1]]).all(axis=1)]
            order = np.delete(order, same)
        yield _take(batch, order)


def encode_spill(out: Spill, metadata: dict[str, str], refs: list[ShardRef]) -> Iterator[bytes | memoryview]:
    """The bytes of a compacted segment of the rows in ``out`` (sorted by key64) naming shards
    ``refs``, a piece at a time: what ``encode_segment`` gives for those rows, never all in memory."""
    key64 = (np.frombuffer(piece, "<u8") for piece in out.column("key64"))
    chunks = key64_chunks_of(key64)
    yield segment_header(out.n, metadata, out.crcs, chunks, refs)
    for spec in segment_tensors(out.n, compacted=True):
        yield from out.column(spec.name)


def _take(cols: Columns, order: np.ndarray) -> Columns:
    return {name: col[order] for name, col in cols.items()}


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
