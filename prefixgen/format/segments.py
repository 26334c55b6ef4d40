"""Index segments: the sorted key64/key/parent/slot/depth/crc columns of a store's index, encoded
(:func:`encode_segment`, :func:`segment_header`) and read (:class:`Segment`, :class:`FileColumn`) with their
column and key64-chunk checksums, and the shards a segment's rows live in (:class:`ShardRef`)."""

from __future__ import annotations

import base64
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefixgen.errors import CorruptStoreError
from prefixgen.format.manifest import _fields_dict
from prefixgen.format.tensors import ST_DTYPES, SafetensorsHeader, TensorSpec, encode_safetensors_header, read_safetensors_header

# Column name -> (dtype, values per entry). Entries are sorted by key64.
SEGMENT_COLUMNS: dict[str, tuple[str, int]] = {
    "key64": ("uint64", 1),
    "key": ("uint8", 32),
    "parent": ("uint8", 32),
    "slot": ("uint32", 1),  # block position in its shard: its tokens are [slot*B, (slot+1)*B)
    "depth": ("uint32", 1),  # block number in its sequence: the prefix ends at (depth+1)*B tokens
    "crc": ("uint32", 1),  # checksum (manifest `block_checksum`) of the block's `kv` bytes, then `kv_scale` (fp8)
    "shard": ("uint32", 1),  # compacted segments only: the row's shard, an index into metadata `shards`
}
OPTIONAL_COLUMNS = frozenset({"shard"})
# Segments at least this large are searched in place, their rows read with pread as lookups need them
# (FileColumn; kept open); smaller ones are read whole when needed, so a store of 100,000 small segments
# keeps no 100,000 files open. No segment is memory-mapped (a mapped file truncated in place: SIGBUS).
MAP_BYTES = 1 << 20
SWEEP_ROWS = 1 << 16  # rows a sweep over a whole segment (verify, prune) reads at a time: ~5.5 MiB
# key64 is also checksummed in chunks of this many rows (8 KiB), so a lookup in a large segment
# checks only the chunks it searches instead of the whole column (80 MiB for 10 million rows).
KEY64_CHUNK_ROWS = 1024
_ROW_BYTES = {name: np.dtype(dt).itemsize * width for name, (dt, width) in SEGMENT_COLUMNS.items()}


@dataclass(slots=True, frozen=True)
class ShardRef:
    """A shard as an index segment records it: the blocks, size and checksum it was written with."""

    name: str
    blocks: int
    bytes: int
    crc32: int
    writer: str = ""
    build: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


def segment_tensors(n: int, compacted: bool = False) -> list[TensorSpec]:
    return [
        TensorSpec(name, dt, (n, w) if w > 1 else (n,))
        for name, (dt, w) in SEGMENT_COLUMNS.items()
        if compacted or name not in OPTIONAL_COLUMNS
    ]


def encode_segment(columns: dict[str, np.ndarray], metadata: dict[str, str], shards: Sequence[ShardRef] = ()) -> list[bytes]:
    """Bytes of an index segment: entries sorted by key64, columns in SEGMENT_COLUMNS order, and a
    CRC-32 of each column in the metadata (``column_crc32``).

    A segment of one shard names it in ``metadata`` (``shard``, ``blocks``, ``shard_bytes``,
    ``shard_crc32``); a compacted segment gives ``shards`` and a ``shard`` column indexing them.
    """
    keys = np.ascontiguousarray(columns["key"], dtype=np.uint8)
    k64 = keys[:, :8].copy().view("<u8").reshape(-1)
    # Readers binary-search key64 and compare whole keys among equal key64s (a tie is ~2**-64 likely).
    order = np.argsort(k64, kind="stable")
    cols = {**columns, "key64": k64}
    n = len(keys)
    compacted = "shard" in columns
    data, crcs = [], {}
    for spec in segment_tensors(n, compacted):
        raw = np.ascontiguousarray(np.asarray(cols[spec.name])[order], dtype=np.dtype(spec.dtype).newbyteorder("<")).tobytes()
        crcs[spec.name] = zlib.crc32(raw)
        data.append(raw)
    return [segment_header(n, metadata, crcs, key64_chunks(k64[order]), shards if compacted else None), *data]


def segment_header(
    n: int, metadata: dict[str, str], crcs: dict[str, int], chunks: dict[str, Any], shards: Sequence[ShardRef] | None = None
) -> bytes:
    """The header of an index segment of ``n`` rows (compacted if ``shards`` is given), its columns
    following in SEGMENT_COLUMNS order: ``metadata`` plus ``column_crc32`` (``crcs``, the CRC-32 of
    each column's bytes), ``key64_chunks`` (``chunks``, from :func:`key64_chunks`) and ``shards``.
    For writers that produce the columns piece by piece (a streaming compaction)."""
    meta = {
        **metadata,
        "column_crc32": json.dumps({s.name: crcs[s.name] for s in segment_tensors(n, shards is not None)}, separators=(",", ":")),
    }
    meta["key64_chunks"] = json.dumps(chunks, separators=(",", ":"))
    if shards is not None:
        table = {name: [getattr(s, name) for s in shards] for name in SHARD_FIELDS}
        meta["shards"] = json.dumps(table, separators=(",", ":"))
    return encode_safetensors_header(segment_tensors(n, shards is not None), meta)


class Segment:
    """An index segment. Opening reads its header and, for a small segment, its ``key64`` column
    (checked against its CRC); ``cols`` gives every column: for a large segment (``mapped``, at
    least ``MAP_BYTES``) columns read from the file with ``pread`` as rows are asked
    (:class:`FileColumn`), for a small one the whole file read on each access (and checked).

    No store file is memory-mapped: a serving process reads an index another process may truncate
    or rewrite in place (a ``cp`` over a live store, an I/O error, NFS), and a mapped page past a
    truncated file's end kills the reader with SIGBUS. A read now ends short instead, and that is a
    :class:`CorruptStoreError`: a store fault the caller can turn into a miss.

    ``shards`` lists the shards its rows live in; ``shard_ids()`` gives each row's index into it.
    """

    __slots__ = (
        "path",
        "metadata",
        "n",
        "key64",
        "mapped",
        "_spans",
        "_checksums",
        "_chunks",
        "_file",
        "_cols",
        "_shard_table",
        "_shards",
        "opened_stat",
        "_whole",
    )

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self._cols: dict[str, FileColumn] | None = None
        self._whole: dict[str, np.ndarray] | None = None  # a large segment's columns, once read whole (cols)
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (kept open by a large segment, closed below otherwise)
        try:
            header = read_safetensors_header(f, path)
            st = os.fstat(f.fileno())
            size = st.st_size
            self.opened_stat = (st.st_ino, size, st.st_mtime_ns)  # the file as read: a reader can tell it changed
            self.metadata = header.metadata
            self._spans = _segment_spans(header, size, path)
            self.n = _column_rows(self._spans, path)
            self._checksums = _column_checksums(header.metadata, path)
            self._shard_table = _shard_table(header.metadata, "shard" in self._spans, path)
            self._shards: list[ShardRef] | None = None
            self.mapped = size >= MAP_BYTES
            self._chunks = _Key64Chunks.parse(header.metadata, self.n, path) if self.mapped else None
            start, end = self._spans["key64"]
            if self.mapped:
                self._file = f
                self._cols = {name: FileColumn(self, name) for name in self._spans}
                if self._chunks is None:
                    # An older segment: read and check the whole column now, in one sequential read.
                    self.key64 = np.frombuffer(self._pread(start, end - start), dtype="<u8")
                    self._check("key64", self.key64)
                else:
                    # Filled chunk by chunk as lookups check them (_check_chunks); zero pages until then.
                    self.key64 = np.zeros(self.n, dtype="<u8")
            else:
                self.key64 = np.frombuffer(self._pread(start, end - start, f), dtype="<u8")
                self._check("key64", self.key64)
        finally:
            if self._file is None:
                f.close()

    def _pread(self, offset: int, length: int, f: Any = None) -> bytes:
        """``length`` bytes of the file at ``offset``; a short read (the file was truncated since it
        was opened) is a CorruptStoreError."""
        fd = (f or self._file).fileno()
        data = os.pread(fd, length, offset)
        while len(data) < length:  # pread may return less than asked without reaching the end
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                store = self.path.parent.parent
                raise CorruptStoreError(
                    f"{self.path}: index segment is truncated (it changed while open); run `prefixgen verify {store}`"
                )
            data += more
        return data

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """[len(q)] (lo, hi) and ``first``: the rows ``lo[i] .. hi[i]-1`` are those whose key64
        equals ``q[i]``; ``first`` is True when the search read key64 chunks for the first time
        (their rows' other columns are then likely not in memory either: see ``prefetch``).

        In a segment with ``key64_chunks``, each query can only be in the chunks its key64 falls in
        (found from the chunks' first keys); those chunks are checked against their CRC-32 the first
        time, and the answer is accepted only if it is consistent with the checked chunks: damage
        anywhere else cannot hide a row, damage in them is refused.

        Example:
            >>> lo, hi, _ = segment.search(np.asarray([k64], "<u8"))  # doctest: +SKIP
        """
        col, ch = self.key64, self._chunks
        if ch is None or self.n == 0:
            return np.searchsorted(col, q, "left"), np.searchsorted(col, q, "right"), False
        if ch.checked[np.maximum(np.searchsorted(ch.first, q, "right") - 1, 0)].all():
            # Warm: search the whole column in C, then accept the answer only if it is consistent
            # with checked chunks (the rows around it are in them and bound it): else search again.
            lo, hi = np.searchsorted(col, q, "left"), np.searchsorted(col, q, "right")
            below, above = np.maximum(lo - 1, 0), np.minimum(hi, self.n - 1)
            c_a, c_b = below // ch.rows, above // ch.rows
            ok = ch.checked[c_a] & ch.checked[c_b] & (c_b - c_a <= 1) & (lo <= hi)
            ok &= ((lo == 0) | (col[below] < q)) & ((hi == self.n) | (col[above] > q))
            if ok.all():
                return lo, hi, False
        # Rows equal to q lie in chunks c_lo .. c_hi-1: every earlier chunk ends at or below a first
        # key64 < q, every later one starts above q. Check them, then search inside them only.
        c_hi = np.searchsorted(ch.first, q, "right")
        c_lo = np.minimum(np.maximum(np.searchsorted(ch.first, q, "left") - 1, 0), c_hi)
        first = self._check_chunks(c_lo, c_hi)
        end = np.minimum(c_hi * ch.rows, self.n)
        lo = _search_range(col, q, c_lo * ch.rows, end)
        hi = lo.copy()
        while True:  # rows equal to q from lo on: one, or (a key64 tie, ~2**-64 likely) a few
            eq = hi < end
            eq[eq] = col[hi[eq]] == q[eq]
            if not eq.any():
                return lo, hi, first
            hi += eq

    def _check_chunks(self, c_lo: np.ndarray, c_hi: np.ndarray) -> bool:
        """Read and check every chunk c_lo[i] .. c_hi[i]-1 not checked yet; True if there was one."""
        ch = self._chunks
        counts = c_hi - c_lo
        need = np.repeat(c_lo, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        fresh = np.unique(need[~ch.checked[need]]).tolist()
        base = self._spans["key64"][0]
        for c in fresh:  # ask for every read first: the kernel then fetches the chunks in parallel
            self._prefetch(base + c * ch.rows * 8, ch.rows * 8)
        for c in fresh:
            a, b = c * ch.rows, min((c + 1) * ch.rows, self.n)
            raw = self._pread(base + a * 8, (b - a) * 8)
            if zlib.crc32(raw) != int(ch.crcs[c]):
                self._refuse(f"column 'key64', rows {a}-{b - 1}")
            self.key64[a:b] = np.frombuffer(raw, dtype="<u8")
            ch.checked[c] = True
        return bool(fresh)

    def prefetch(self, rows: np.ndarray, columns: Iterable[str]) -> None:
        """Ask the kernel to read ``rows`` of ``columns`` of a large segment, all at once (cold
        cache: parallel reads instead of one read waiting for the next)."""
        if self._file is None:
            return
        for name in columns:
            if name not in self._spans:
                continue  # `shard` in a one-shard segment
            start, _ = self._spans[name]
            width = _ROW_BYTES[name]
            for r in np.unique(rows).tolist():
                self._prefetch(start + r * width, width)

    def _prefetch(self, offset: int, length: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), offset, length, os.POSIX_FADV_WILLNEED)

    def read_cols(self) -> dict[str, np.ndarray]:
        """Every column in memory, read whole and checked against its CRC (for a sweep over all rows:
        ``verify``, reports), whatever the segment's size."""
        with open(self.path, "rb") as f:
            data = f.read()
        spans = _segment_spans(read_safetensors_header(io.BytesIO(data), self.path), len(data), self.path)
        if spans != self._spans:
            raise CorruptStoreError(f"{self.path}: index segment changed while open; run `prefixgen verify`")
        cols = self._columns(memoryview(data))
        for name, col in cols.items():
            self._check(name, col)
        return cols

    @property
    def shard(self) -> str:
        """The shard of a one-shard segment ("" for a compacted segment)."""
        return self.metadata.get("shard", "")

    @property
    def shards(self) -> list[ShardRef]:
        """The shards this segment's rows live in (one for a segment written by a build)."""
        if self._shards is None:
            t = self._shard_table
            self._shards = [
                ShardRef(str(name), _number(blocks), _number(size), _number(crc), str(writer), str(build))
                for name, blocks, size, crc, writer, build in zip(*(t[f] for f in SHARD_FIELDS))
            ]
        return self._shards

    def shard_name(self, i: int) -> str:
        """File name of shard number ``i`` of this segment (a row naming a shard beyond the list: a
        damaged or rewritten segment, a CorruptStoreError)."""
        names = self._shard_table["name"]
        if not 0 <= i < len(names):
            self._refuse(f"a row names shard {i} of {len(names)}")
        return str(names[i])

    @property
    def compacted(self) -> bool:
        return "shard" in self._spans

    def column_span(self, name: str) -> tuple[int, int] | None:
        """File byte range of column ``name`` (None for ``shard`` in a one-shard segment)."""
        return self._spans.get(name)

    def column_checksum(self, name: str) -> int | None:
        """The CRC-32 recorded for column ``name`` (None if the segment records none)."""
        return None if self._checksums is None else self._checksums.get(name)

    @property
    def cols(self) -> dict[str, np.ndarray]:
        """Every column by name (``shard`` only in a compacted segment), in memory: a small segment is read
        again on each access (keep the dict while you use it), a large one read whole once and kept. A
        lookup reads only the rows it needs instead: :attr:`rows`."""
        if self._file is None:
            return self.read_cols()
        if self._whole is None:
            self._whole = self.read_cols()
        return self._whole

    @property
    def rows(self) -> dict[str, Any]:
        """Every column by name, for reading a few rows: a large segment's columns are :class:`FileColumn` s,
        read with ``pread`` as they are indexed (a lookup touches a few rows of a column of millions); a
        small segment's are :attr:`cols`."""
        return self._cols if self._cols is not None else self.cols

    def shard_ids(self, cols: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[n] each row's index into ``shards`` (all 0 for a one-shard segment)."""
        cols = self.cols if cols is None else cols
        return cols["shard"] if "shard" in cols else np.zeros(self.n, np.uint32)

    def _columns(self, data: memoryview) -> dict[str, np.ndarray]:
        buf = np.frombuffer(data, dtype=np.uint8)
        cols = {}
        for name, (start, end) in self._spans.items():
            dtype, width = SEGMENT_COLUMNS[name]
            col = buf[start:end].view(np.dtype(dtype).newbyteorder("<"))
            cols[name] = col.reshape(-1, width) if width > 1 else col
        return cols

    def _check(self, name: str, col: np.ndarray) -> None:
        if self._checksums is None or name not in self._checksums:
            return  # written before segments had checksums
        if zlib.crc32(np.ascontiguousarray(col).view(np.uint8)) != self._checksums[name]:
            self._refuse(f"column {name!r}")

    def _refuse(self, what: str) -> None:
        store = self.path.parent.parent
        raise CorruptStoreError(
            f"{self.path}: index segment fails its checksum ({what}); the store is damaged: run `prefixgen verify {store}`"
        )

    def chunks(self, rows: int = SWEEP_ROWS) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(first row, columns)`` for consecutive pieces of ``rows`` rows (the last may be short), in
        order: every column as :attr:`cols` gives it, but never the whole of a large segment at once
        (each piece read with ``pread``) and not checked (a sweep over all rows checks the CRCs
        itself: :meth:`verify_checksums`, ``verify``)."""
        if self._file is None:  # small: the whole file is a piece anyway
            with open(self.path, "rb") as f:
                cols = self._columns(memoryview(f.read()))
            for a in range(0, self.n, rows):
                yield a, {name: col[a : a + rows] for name, col in cols.items()}
            return
        for a in range(0, self.n, rows):
            b = min(a + rows, self.n)
            yield a, {name: col._range(a, b) for name, col in self._cols.items()}

    def verify_checksums(self) -> list[str]:
        """Names of the columns whose CRC-32 does not match the metadata (empty if none is recorded),
        and ``key64_chunks`` if that table does not match ``key64``. Reads the segment a piece at a time."""
        if self._checksums is None:
            return []
        text = self.metadata.get("key64_chunks")
        try:
            chunk_rows = int(json.loads(text)["rows"]) if text is not None else None
        except (ValueError, TypeError, KeyError, AttributeError):
            chunk_rows = 0
        step = chunk_rows * max(1, SWEEP_ROWS // chunk_rows) if chunk_rows and chunk_rows > 0 else SWEEP_ROWS
        crcs = dict.fromkeys(self._spans, 0)

        def key64_pieces() -> Iterator[np.ndarray]:
            for _, cols in self.chunks(step):
                for name, col in cols.items():
                    crcs[name] = zlib.crc32(np.ascontiguousarray(col).view(np.uint8), crcs[name])
                yield cols["key64"]

        pieces = key64_pieces()
        ok = True
        if text is not None:
            try:
                ok = bool(chunk_rows and chunk_rows > 0) and json.loads(text) == key64_chunks_of(pieces, chunk_rows)
            except (ValueError, TypeError, KeyError, AttributeError):
                ok = False
        for _ in pieces:  # the rest of the rows, for the column CRCs
            pass
        bad = [name for name in self._spans if name in self._checksums and crcs[name] != self._checksums[name]]
        if not ok:
            bad.append("key64_chunks")
        return bad


class FileColumn:
    """One column of a large segment, read from its file with ``pread`` as it is indexed: ``col[rows]``
    (an int, a slice, an integer array, or a tuple whose first item is one of those) reads only the
    rows asked, nearby rows with one request; ``np.asarray(col)`` reads the whole column. A file
    truncated since the segment was opened is a CorruptStoreError, never a fault of the process."""

    __slots__ = ("_seg", "_start", "_dtype", "_width", "_row_bytes")

    GAP_BYTES = 4096  # rows closer than this are read with one request

    def __init__(self, seg: Segment, name: str):
        dtype, width = SEGMENT_COLUMNS[name]
        self._seg = seg
        self._start = seg._spans[name][0]
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._width = width
        self._row_bytes = _ROW_BYTES[name]

    def __len__(self) -> int:
        return self._seg.n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._seg.n, self._width) if self._width > 1 else (self._seg.n,)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _range(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)``: [b - a] or [b - a, width]."""
        raw = self._seg._pread(self._start + a * self._row_bytes, (b - a) * self._row_bytes) if b > a else b""
        col = np.frombuffer(raw, dtype=self._dtype)
        return col.reshape(-1, self._width) if self._width > 1 else col

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        col = self._range(0, self._seg.n)
        return col if dtype is None else col.astype(dtype)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple):
            rows = self[index[0]]
            one = not isinstance(index[0], slice) and np.ndim(index[0]) == 0  # one row: no row axis left
            return rows[index[1:]] if one else rows[(slice(None), *index[1:])]
        n = self._seg.n
        if isinstance(index, slice):
            a, b, step = index.indices(n)
            return self._range(a, max(a, b))[::step] if step > 0 else np.asarray(self)[index]
        at = np.asarray(index)
        if at.dtype == bool:
            at = np.flatnonzero(at)
        if at.ndim == 0:
            i = int(at) + (n if int(at) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(at)} of a column of {n} rows")
            return self._range(i, i + 1)[0]
        at = np.where(at < 0, at + n, at).astype(np.int64)
        if len(at) and (at.min() < 0 or at.max() >= n):
            raise IndexError(f"rows beyond a column of {n} rows")
        rows, inverse = np.unique(at, return_inverse=True)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self._dtype)
        # Runs of rows closer than GAP_BYTES: one read each (a lookup's rows are scattered; a sweep's are dense).
        cut = np.flatnonzero(np.diff(rows) * self._row_bytes > self.GAP_BYTES) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(rows)]):
            first, last = int(rows[a]), int(rows[b - 1])
            out[a:b] = self._range(first, last + 1)[rows[a:b] - first]
        return out[inverse.reshape(at.shape)]


def _segment_spans(header: SafetensorsHeader, size: int, path: Path) -> dict[str, tuple[int, int]]:
    """File byte range of each column, checked against the file's size and the column's dtype."""
    spans = {}
    for name, (dtype, _) in SEGMENT_COLUMNS.items():
        info = header.tensors.get(name)
        if info is None:
            if name in OPTIONAL_COLUMNS:
                continue
            raise CorruptStoreError(f"{path}: index segment has no column {name!r}")
        start, end = (header.data_start + o for o in info["data_offsets"])
        if end > size or end < start or info["dtype"] != ST_DTYPES[dtype]:
            raise CorruptStoreError(f"{path}: index segment column {name!r} is truncated or mistyped")
        spans[name] = (start, end)
    return spans


def _column_rows(spans: dict[str, tuple[int, int]], path: Path) -> int:
    rows = {(end - start) // _ROW_BYTES[name] for name, (start, end) in spans.items()}
    if len(rows) != 1:
        raise CorruptStoreError(f"{path}: index segment columns have different lengths")
    return rows.pop()


def key64_chunks(k64: np.ndarray, rows: int = KEY64_CHUNK_ROWS) -> dict[str, Any]:
    """The ``key64_chunks`` metadata of a sorted key64 column: chunk size, each chunk's first key64
    and CRC-32 (both base64 of little-endian arrays), and a CRC-32 of those two arrays.

    Example:
        >>> key64_chunks(np.arange(3, dtype="<u8"), rows=2)["rows"]
        2
    """
    return key64_chunks_of([k64], rows)


def key64_chunks_of(pieces: Iterable[np.ndarray], rows: int = KEY64_CHUNK_ROWS) -> dict[str, Any]:
    """:func:`key64_chunks` of the column made of ``pieces`` back to back, read one at a time (each
    piece but the last a multiple of ``rows`` long): for a column too large to hold."""
    firsts, crc_list = [], []
    for piece in pieces:
        raw = np.ascontiguousarray(piece, dtype="<u8")
        firsts.append(raw[::rows].tobytes())
        crc_list += [zlib.crc32(raw[i : i + rows]) for i in range(0, len(raw), rows)]
    first = b"".join(firsts)
    crcs = np.asarray(crc_list, "<u4").tobytes()
    return {
        "rows": rows,
        "first": base64.b64encode(first).decode(),
        "crc32": base64.b64encode(crcs).decode(),
        "check": zlib.crc32(crcs, zlib.crc32(first)),
    }


@dataclass(slots=True)
class _Key64Chunks:
    """A large segment's key64 column checked chunk by chunk as lookups touch it."""

    rows: int
    first: np.ndarray  # [chunks] uint64 first key64 of each chunk
    crcs: np.ndarray  # [chunks] uint32
    checked: np.ndarray  # [chunks] bool: chunk already found intact

    @classmethod
    def parse(cls, metadata: dict[str, str], n: int, path: Path) -> _Key64Chunks | None:
        text = metadata.get("key64_chunks")
        if text is None:
            return None  # written before chunked checksums: the whole column is checked at open
        try:
            d = json.loads(text)
            rows = int(d["rows"])
            first_raw, crc_raw = base64.b64decode(d["first"], validate=True), base64.b64decode(d["crc32"], validate=True)
            ok = rows > 0 and zlib.crc32(crc_raw, zlib.crc32(first_raw)) == int(d["check"])
            first, crcs = np.frombuffer(first_raw, "<u8"), np.frombuffer(crc_raw, "<u4")
            ok = ok and len(first) == len(crcs) == -(-n // rows)
        except (ValueError, TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise CorruptStoreError(
                f"{path}: index segment metadata key64_chunks is damaged; the store is damaged: "
                f"run `prefixgen verify {path.parent.parent}`"
            )
        return cls(rows, first, crcs, np.zeros(len(first), bool))


def _search_range(col: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each query the first position in ``col[lo:hi]`` whose value is >= it (``hi`` if none):
    a vectorized binary search that reads only positions inside each query's range."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        less = active & (col[np.where(active, mid, 0)] < q)
        lo = np.where(less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)


def _column_checksums(metadata: dict[str, str], path: Path) -> dict[str, int] | None:
    text = metadata.get("column_crc32")
    if text is None:
        return None
    try:
        return {str(k): int(v) for k, v in json.loads(text).items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise CorruptStoreError(f"{path}: index segment metadata column_crc32 is damaged; run `prefixgen verify`") from None


SHARD_FIELDS = ("name", "blocks", "bytes", "crc32", "writer", "build")


def _shard_table(metadata: dict[str, str], compacted: bool, path: Path) -> dict[str, list]:
    """The shards a segment's rows live in, as columns (``SHARD_FIELDS``): parsed quickly even for
    the ~78,000 shards of a compacted 10-million-block index."""
    if not compacted:
        m = metadata
        one = (
            m.get("shard", ""),
            m.get("blocks"),
            m.get("shard_bytes"),
            m.get("shard_crc32"),
            m.get("writer", ""),
            m.get("build", ""),
        )
        return {name: [value] for name, value in zip(SHARD_FIELDS, one)}
    try:
        table = json.loads(metadata["shards"])
        if len({len(table[name]) for name in SHARD_FIELDS}) != 1:
            raise ValueError("columns of different lengths")
        return table
    except (KeyError, json.JSONDecodeError, TypeError, AttributeError, ValueError):
        raise CorruptStoreError(f"{path}: compacted index segment has no readable shard list; run `prefixgen verify`") from None


def _number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # reported by verify; readers need only the name
