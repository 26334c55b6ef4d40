"""Block counts and the rule that chooses what to store from them.

A block's value is the number of records that contain it: each of them saves the block's prefill.
``select_blocks`` is the one selection rule, shared by ``build --min-records/--max-bytes``,
``analyze``, ``simulate --warmup``, ``prune`` and distributed routing; ``max_blocks`` turns a
``--max-bytes`` budget into blocks of a store's layout, for ``build`` and ``prune`` alike.

Counting (the API other modules use):

* ``BlockCounter().add(keys)`` once per record (its chained block keys, in order), then
  ``.result()`` -> :class:`BlockCounts`: sorted numpy columns ``key64``, ``check64``, ``records``,
  ``depth``, 24 bytes per distinct block, whatever the dataset's size.
* ``BlockCounts.find(key_columns(keys))`` -> rows (or -1); ``.select(min_records, max_blocks)`` ->
  rows to store, best first (``select_blocks`` with key64 as the tiebreak, so every caller chooses
  the same blocks); ``.subset(rows)`` -> a smaller table for membership tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from prefixgen.config import BuildConfig
from prefixgen.errors import ConfigError
from prefixgen.format import KVLayout
from prefixgen.kvcache import state_bytes_per_block


def select_blocks(
    records: np.ndarray,
    depth: np.ndarray,
    *,
    min_records: int = 1,
    max_blocks: int | None = None,
    tiebreak: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the blocks to store, best first: those in at least ``min_records`` records, ranked by
    record count (more first), then depth (shallower first), then ``tiebreak`` (e.g. ``key64``, so the
    choice is deterministic), cut to ``max_blocks``.

    The choice is prefix-closed: a block is never in more records than its parent and is one deeper, so
    its parent ranks strictly before it, and every prefix of the ranking holds each chosen block's parent.

    Args:
        records: [n] records containing each block.
        depth: [n] position of each block in its chain (0 for a record's first block).
        tiebreak: [n] optional last sort key.

    Example:
        >>> select_blocks(np.array([3, 1, 3, 2]), np.array([1, 2, 0, 1]), min_records=2).tolist()
        [2, 0, 3]
        >>> select_blocks(np.array([3, 1, 3, 2]), np.array([1, 2, 0, 1]), max_blocks=1).tolist()
        [2]
    """
    records = np.asarray(records)
    depth = np.asarray(depth)
    if min_records < 1:
        raise ValueError(f"min_records must be at least 1, got {min_records}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be non-negative, got {max_blocks}")
    # Filter first (most blocks of a real dataset are in one record), and negate counts in their own
    # unsigned dtype: sorting 100 million blocks must not take gigabytes on top of the counts.
    keep = np.flatnonzero(records >= min_records) if min_records > 1 else None
    if keep is not None:
        records, depth = records[keep], depth[keep]
        tiebreak = None if tiebreak is None else np.asarray(tiebreak)[keep]
    more_first = np.iinfo(records.dtype).max - records if records.dtype.kind == "u" else -records.astype(np.int64)
    order = np.lexsort((depth, more_first) if tiebreak is None else (tiebreak, depth, more_first))  # last key first
    del more_first
    if max_blocks is not None:
        order = order[:max_blocks]
    return order if keep is None else keep[order]


def block_cost(layout: KVLayout, block_size: int) -> int:
    """Bytes one stored block costs against ``--max-bytes`` (build, prune, export, analyze, simulate
    --warmup): its KV, fp8 scales, format 5's ``head_crc`` row and a hybrid's recurrent states (spread
    over the blocks). Its tokens and index row are not counted.

    Example:
        >>> block_cost(KVLayout(5, 4, 8, "float32"), 16), block_cost(KVLayout(5, 4, 8, "float32", order="heads"), 16)
        (20480, 20496)
    """
    return layout.block_bytes(block_size) + layout.head_crc_bytes() + state_bytes_per_block(layout, block_size)


def max_blocks(cfg: BuildConfig, layout: KVLayout) -> int | None:
    """``--max-bytes`` as a number of blocks of this store's layout (:func:`block_cost`); refuses a
    budget smaller than one block.

    Example:
        >>> max_blocks(BuildConfig(max_bytes=50_000), KVLayout(5, 4, 8, "float32"))
        2
    """
    if cfg.max_bytes is None:
        return None
    block = block_cost(layout, cfg.block_size)
    if cfg.max_bytes < block:
        raise ConfigError(
            f"--max-bytes {cfg.max_bytes:,} is smaller than one block: a block of {cfg.block_size} tokens holds "
            f"{block:,} bytes of KV for this model ({layout.stored_dtype}); give at least {block:,} bytes"
        )
    return cfg.max_bytes // block


# --------------------------------------------------------------------------- counting in bounded memory

# Counter rows are keyed on the first 16 bytes of the 32-byte SHA-256 key: ``key64`` (bytes 0..8, the
# sort key, as in index segments) and ``check64`` (bytes 8..16), which tells apart the rare keys whose
# key64 are equal. Two different blocks would have to share 128 bits of SHA-256 to be miscounted
# (odds about n**2 / 2**129: 1e-23 for a billion blocks), so the counts are exact for any real dataset
# at 24 bytes per distinct block (a dict of bytes would take ~150).
ROW_BYTES = 24  # key64 8 + check64 8 + records 4 + depth 4
MERGE_SLICE = 1 << 20  # rows of a run looked up at once while merging it into another


@dataclass(slots=True)
class BlockCounts:
    """How many records contain each distinct block: one row per block, sorted by (key64, check64).

    Example:
        >>> counts = count_records([[b"a" * 32, b"b" * 32], [b"a" * 32]])
        >>> counts.records.tolist(), counts.depth.tolist()
        ([2, 1], [0, 1])
    """

    key64: np.ndarray  # [n] uint64: key bytes 0..8, little-endian
    check64: np.ndarray  # [n] uint64: key bytes 8..16, little-endian
    records: np.ndarray  # [n] uint32: records containing the block
    depth: np.ndarray  # [n] uint32: the block's number in its chain (0 = a record's first block)

    def __len__(self) -> int:
        return len(self.key64)

    @property
    def nbytes(self) -> int:
        return self.key64.nbytes + self.check64.nbytes + self.records.nbytes + self.depth.nbytes

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key ([m, 32] or [m, 16] uint8), or -1 where it was not counted.

        Example:
            >>> count_records([[b"a" * 32]]).find(key_columns([b"a" * 32, b"z" * 32])).tolist()
            [0, -1]
        """
        k64, c64 = _split(keys)
        return _find(self.key64, self.check64, k64, c64)

    def select(self, min_records: int = 1, max_blocks: int | None = None) -> np.ndarray:
        """Rows to store, best first: :func:`select_blocks` with key64 as the last tiebreak, so that
        ``analyze`` and ``build`` choose the very same blocks."""
        return select_blocks(self.records, self.depth, min_records=min_records, max_blocks=max_blocks, tiebreak=self.key64)

    def subset(self, rows: np.ndarray) -> BlockCounts:
        """The given rows, back in key order (e.g. a selection, for fast membership tests)."""
        rows = np.sort(rows)
        return BlockCounts(self.key64[rows], self.check64[rows], self.records[rows], self.depth[rows])


def key_columns(keys: Sequence[bytes]) -> np.ndarray:
    """[n, 32] uint8 view of a list of 32-byte keys (one copy).

    Example:
        >>> key_columns([bytes(32), bytes(32)]).shape
        (2, 32)
    """
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)


def _split(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, >=16] uint8 keys -> (key64, check64), both [n] uint64."""
    head = np.ascontiguousarray(keys[:, :16])
    pair = head.view("<u8").reshape(-1, 2)
    return pair[:, 0].astype(np.uint64), pair[:, 1].astype(np.uint64)


def _find(k64: np.ndarray, c64: np.ndarray, q64: np.ndarray, qc: np.ndarray) -> np.ndarray:
    """Rows of (q64, qc) in the table sorted by (k64, c64), or -1."""
    if not len(k64):
        return np.full(len(q64), -1, dtype=np.int64)
    pos = np.searchsorted(k64, q64)
    at = np.minimum(pos, len(k64) - 1)
    hit = (pos < len(k64)) & (k64[at] == q64)
    out = np.where(hit & (c64[at] == qc), pos, -1).astype(np.int64)
    # A key64 shared by different keys (a 2**-64 event per pair): look along the run of equal key64.
    for i in np.flatnonzero(hit & (c64[at] != qc)):
        j = int(pos[i])
        while j < len(k64) and k64[j] == q64[i]:
            if c64[j] == qc[i]:
                out[i] = j
                break
            j += 1
    return out


class BlockCounter:
    """Counts how many records contain each block, in memory that grows with the distinct blocks
    (24 bytes each), not with the dataset.

    Keys arrive per record; they are buffered (32 bytes each) up to ``chunk`` blocks, then sorted and
    reduced into a sorted run (a :class:`BlockCounts`). Runs are merged log-structured: a new run is
    merged into the one before it while that one is less than twice its size, so runs halve in size
    from first to last, there are O(log n) of them, and each block is merged O(log n) times (merging
    every chunk into one whole table made counting quadratic near a billion blocks). A merge rebuilds
    one column at a time (briefly one extra column, 8 bytes per block). A record's keys are chained, so
    they are all different: each record adds one to each of its blocks.

    Example:
        >>> counter = BlockCounter()
        >>> counter.add([b"a" * 32, b"b" * 32]); counter.add([b"a" * 32])
        >>> counts = counter.result()
        >>> len(counts), counts.records.tolist()
        (2, [2, 1])
    """

    def __init__(self, chunk: int = 1 << 22):
        self.chunk = chunk
        self.records = 0  # records added
        self.blocks = 0  # blocks added (with repeats)
        self._buf = bytearray()
        self._lens: list[int] = []  # blocks per buffered record
        self._runs: list[BlockCounts] = []  # sorted runs, each one row per key, each < half the one before

    def add(self, keys: Sequence[bytes]) -> None:
        """Count one record whose blocks have these keys (in chain order, so key i is at depth i)."""
        self.records += 1
        if not keys:
            return
        self._buf += b"".join(keys)
        self._lens.append(len(keys))
        self.blocks += len(keys)
        if len(self._buf) >= 32 * self.chunk:
            self._flush()

    def result(self) -> BlockCounts:
        """The counts so far (merging what is buffered). The counter may go on counting afterwards."""
        self._flush()
        while len(self._runs) > 1:
            self._merge_last()
        return self._runs[0] if self._runs else _empty()

    @property
    def nbytes(self) -> int:
        """Host memory held: the runs and the buffer."""
        return sum(r.nbytes for r in self._runs) + len(self._buf) + 8 * len(self._lens)

    def _flush(self) -> None:
        if not self._lens:
            return
        lens = np.asarray(self._lens, dtype=np.int64)
        keys = np.frombuffer(self._buf, dtype=np.uint8).reshape(-1, 32)
        k64, c64 = _split(keys)
        # depth: 0, 1, ... within each record
        depth = (np.arange(len(k64), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)).astype(np.uint32)
        self._buf, self._lens = bytearray(), []
        del keys
        order = np.lexsort((c64, k64))
        k64, c64, depth = k64[order], c64[order], depth[order]
        del order
        starts = np.flatnonzero(np.r_[True, (k64[1:] != k64[:-1]) | (c64[1:] != c64[:-1])])
        records = np.diff(np.r_[starts, len(k64)]).astype(np.uint32)
        self._runs.append(BlockCounts(k64[starts], c64[starts], records, depth[starts]))
        while len(self._runs) > 1 and len(self._runs[-2]) < 2 * len(self._runs[-1]):
            self._merge_last()

    def _merge_last(self) -> None:
        self._runs[-2:] = [_merge(self._runs[-2], self._runs[-1])]


def _empty() -> BlockCounts:
    return BlockCounts(*(np.empty(0, np.uint64),) * 2, *(np.empty(0, np.uint32),) * 2)


def _merge(t: BlockCounts, new: BlockCounts) -> BlockCounts:
    """``new`` (sorted, one row per key) added into ``t`` (the same; its records updated in place).

    ``new`` is consumed (its columns are dropped as they are merged). Memory beyond the two runs: one
    merged column at a time (8 bytes a row), two masks (1 byte a row each) and slices of ``new``, so
    merging two halves of a table costs what inserting a small chunk into it did."""
    if not len(t):
        return new
    fresh = np.empty(len(new), dtype=bool)
    for a in range(0, len(new), MERGE_SLICE):
        b = min(a + MERGE_SLICE, len(new))
        rows = _find(t.key64, t.check64, new.key64[a:b], new.check64[a:b])
        seen = rows >= 0
        t.records[rows[seen]] += new.records[a:b][seen]
        fresh[a:b] = ~seen
    if not fresh.all():
        for name in ("key64", "check64", "records", "depth"):  # a column at a time: one copy at once
            setattr(new, name, getattr(new, name)[fresh])
    del fresh
    if not len(new):
        return t
    # from_t[i]: row i of the merged table comes from t (else from new). A new row goes before the
    # first row of t that sorts after it by (key64, check64).
    from_t = np.ones(len(t) + len(new), dtype=bool)
    for a in range(0, len(new), MERGE_SLICE):
        k64, c64 = new.key64[a : a + MERGE_SLICE], new.check64[a : a + MERGE_SLICE]
        at = np.searchsorted(t.key64, k64)
        for j in np.flatnonzero(t.key64[np.minimum(at, len(t) - 1)] == k64):  # equal key64: rare
            while at[j] < len(t) and t.key64[at[j]] == k64[j] and t.check64[at[j]] < c64[j]:
                at[j] += 1
        from_t[at + np.arange(a, a + len(at))] = False
    from_new = ~from_t
    for name in ("key64", "check64", "records", "depth"):
        old, add = getattr(t, name), getattr(new, name)
        col = np.empty(len(from_t), dtype=old.dtype)
        col[from_t], col[from_new] = old, add
        setattr(t, name, col)
        del old, add
        setattr(new, name, None)  # one column at a time: each run's copy goes as the merged one comes
    return t


def count_records(records: Iterable[Sequence[bytes]], chunk: int = 1 << 22) -> BlockCounts:
    """Count the blocks of records given as lists of chained keys (see :class:`BlockCounter`).

    Example:
        >>> len(count_records([[b"a" * 32], [b"a" * 32]]))
        1
    """
    counter = BlockCounter(chunk)
    for keys in records:
        counter.add(keys)
    return counter.result()
