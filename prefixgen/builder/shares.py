"""Distributed builds, the count and the plan: each rank counts its share of the records and
spills it (:func:`count_share`), and one rank sums the shares into the plan (:func:`make_plan`):
the shared heads (:class:`Heads`, cut into branch-free runs by level) and each head run's and
record's rank. ``builder.distributed`` runs these steps; this module only reads and writes the
share and plan files (``builds/<id>.plan/<run>/``), in memory bounded by a slice of keys and a
chunk of records, not by the dataset.
"""

from __future__ import annotations

import heapq
import io
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixgen.analysis.count import BlockCounter, BlockCounts
from prefixgen.builder.selection import Selection
from prefixgen.data.records import RecordTokenizer
from prefixgen.data.source import Record
from prefixgen.errors import CorruptStoreError
from prefixgen.format import (
    PLAN_SUFFIX,
    BlockHash,
    BuildRecord,
    atomic_write,
    block_keys,
    fsync_dir,
    temp_path,
)

_KEY = np.dtype((np.void, 32))


@dataclass(slots=True)
class Heads:
    """The blocks two or more records hold, as arrays (no Python object per block, 140 bytes
    each at B=16): ``keys`` [h, 32] uint8 sorted, ``parent`` [h] row of each block's parent (-1:
    the root), ``depth`` [h] its number in its chain, ``tokens`` [h, B] uint32 (a block's own
    token ids; a chain's are its ancestors' joined)."""

    keys: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    tokens: np.ndarray

    @classmethod
    def build(cls, keys: np.ndarray, parents: np.ndarray, depth: np.ndarray, tokens: np.ndarray) -> Heads:
        """Heads from blocks (``keys`` and ``parents`` [n, 32], ``depth`` [n], ``tokens`` [n, B]),
        repeats allowed (the same block seen in several records or shares).

        Example:
            >>> heads = Heads.build(keys, parents, depth, tokens)  # doctest: +SKIP
            >>> [len(level) for level in heads.segments()]  # doctest: +SKIP
            [1, 12]
        """
        _, first = np.unique(np.ascontiguousarray(keys).view(_KEY).ravel(), return_index=True)
        keys, parents, depth, tokens = keys[first], parents[first], depth[first], tokens[first]  # by key, one row each
        row = np.searchsorted(keys.view(_KEY).ravel(), np.ascontiguousarray(parents).view(_KEY).ravel())
        row = np.minimum(row, max(len(keys) - 1, 0))
        found = (len(keys) > 0) & (keys[row] == parents).all(axis=1) if len(keys) else np.zeros(0, bool)
        return cls(keys, np.where(found, row, -1).astype(np.int64), depth.astype(np.int32), tokens)

    def __len__(self) -> int:
        return len(self.keys)

    def chain(self, row: int) -> tuple[list[BlockHash], list[int]]:
        """Keys and tokens from the first block down to block ``row``."""
        rows = []
        while row >= 0:
            rows.append(row)
            row = int(self.parent[row])
        rows.reverse()
        return [BlockHash(self.keys[r].tobytes()) for r in rows], self.tokens[rows].ravel().tolist()

    def segments(self) -> list[list[np.ndarray]]:
        """The trie cut into branch-free runs (arrays of rows), grouped by level (a run's parent
        run is one level up), each level's runs in key order of their first block."""
        n = len(self)
        has_parent = self.parent >= 0
        children = np.bincount(self.parent[has_parent], minlength=n)
        only_child = np.full(n, -1, np.int64)  # the one child of a block that has exactly one
        single = has_parent & (children[np.maximum(self.parent, 0)] == 1)
        only_child[self.parent[single]] = np.flatnonzero(single)
        starts = np.flatnonzero(~single)
        level_of_end = np.full(n, -1, np.int64)
        levels: list[list[np.ndarray]] = []
        for start in starts[np.lexsort((starts, self.depth[starts]))]:  # shallower first: parent runs are placed
            run = [int(start)]
            while only_child[run[-1]] >= 0:
                run.append(int(only_child[run[-1]]))
            parent = int(self.parent[start])
            level = int(level_of_end[parent]) + 1 if parent >= 0 else 0
            level_of_end[run[-1]] = level
            while len(levels) <= level:
                levels.append([])
            levels[level].append(np.asarray(run, np.int64))
        return levels


def _empty_heads(block_size: int) -> Heads:
    return Heads(np.zeros((0, 32), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, block_size), np.uint32))


def count_share(
    records: Iterator[Record], tokenize: RecordTokenizer, folder: Path, share: int, root: BlockHash, block_size: int,
    owner: str, fsync: bool = True,
) -> BuildRecord:  # fmt: skip
    """Tokenize and count share ``share``, the records ``records`` yields (``data.source.read_share``),
    and spill it to ``folder``: ``share-S.tokens`` (uint32 ids), ``share-S.keys`` ([blocks, 32]) and,
    last (it marks the share done), ``share-S.npz`` (record indices and lengths, the share's record
    count ``rows`` and whether its indices are rows within it, ``local``; its block counts and
    tokenizer statistics); each fsynced before it is renamed in (``fsync``: as the writer
    does for shards), so that after a node crash a share marked done is whole. Returns the tokenizer
    statistics (``dataset_tokens``: tokens tokenized)."""
    stats = BuildRecord("", "")
    counting = tokenize.copy(stats)
    counting.warn = tokenize.warn  # this is the only pass that tokenizes the share: it warns
    counter = BlockCounter()
    index, lengths = [], []
    ends, end_counts = [], []  # hybrid models: where each record's chat turns end (its states are kept there)
    rows, local = 0, False  # records of the share (skipped ones too); numbered within it (Record.share)

    def tally(records: Iterator[Record]) -> Iterator[Record]:
        nonlocal rows, local
        for rec in records:
            rows += 1
            local |= rec.share is not None
            yield rec

    names = [folder / f"share-{share}.{ext}" for ext in ("tokens", "keys")]
    tmps = [temp_path(p, owner) for p in names]
    try:
        with open(tmps[0], "wb") as tokens_file, open(tmps[1], "wb") as keys_file:
            for rec in counting(tally(records)):
                ids = np.asarray(rec.ids, dtype="<u4")
                keys = block_keys(rec.ids, block_size, root)
                tokens_file.write(ids.tobytes())
                keys_file.write(b"".join(keys))
                counter.add(keys)
                index.append(rec.index)
                lengths.append(len(ids))
                ends += rec.ends
                end_counts.append(len(rec.ends))
            for f in (tokens_file, keys_file) if fsync else ():
                f.flush()
                os.fsync(f.fileno())
        for tmp, name in zip(tmps, names):
            os.replace(tmp, name)
    except BaseException:
        for tmp in tmps:  # a spill that failed (a full disk, an I/O error, Ctrl-C) leaves no temporary file
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(folder)  # the renames, before the .npz that marks the share done
    counts = counter.result()
    meta = {"index": np.asarray(index, np.int64), "lengths": np.asarray(lengths, np.int64)}
    meta |= {"rows": np.asarray(rows, np.int64), "local": np.asarray(local)}
    meta |= {"ends": np.asarray(ends, np.int64), "end_counts": np.asarray(end_counts, np.int64)}
    meta |= {f"counts_{k}": getattr(counts, k) for k in ("key64", "check64", "records", "depth")}
    meta["stats"] = np.asarray([stats.skipped_records, stats.truncated_records, stats.dataset_tokens], np.int64)
    _save(folder / f"share-{share}.npz", meta, owner, fsync)
    return stats


def _save(path: Path, arrays: dict[str, np.ndarray], owner: str, fsync: bool) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, [buf.getvalue()], fsync=fsync, owner=owner)


def _index_in_dataset(shares: list[dict[str, np.ndarray]]) -> None:
    """Turn the share-local indices of ``local`` shares (row r of share s) into indices in the
    dataset: the records of the shares before s, plus r. Shares are consecutive runs of records
    there, so this needs only their record counts (``rows``): no rank read the bytes before its share."""
    before = 0
    for meta in shares:
        if bool(meta.get("local", False)):  # shares spilled before "local" existed hold dataset indices
            meta["index"] = meta["index"] + before
        before += int(meta["rows"]) if "rows" in meta else len(meta["index"]) + int(meta["stats"][0])  # kept + skipped


PLAN_BUCKET_ROWS = 1 << 20  # count rows (of all shares) the planner sums at once (about: ~60 MB of work)
PLAN_CHUNK_BLOCKS = 1 << 20  # blocks of a share the planner looks at at once (whole records)
_COUNT_COLUMNS = ("key64", "check64", "records", "depth")


class _NpzColumn:
    """One array of an uncompressed ``.npz`` (``np.savez``), read in slices by offset: no whole copy
    in memory, and no memory map (pages read do not stay in the process's resident set)."""

    def __init__(self, path: Path, name: str):
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                info = z.getinfo(f"{name}.npy")
                self._whole = z.read(info) if info.compress_type != zipfile.ZIP_STORED else None
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # the member's local header: its name and extra field come next
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
                f.seek(start)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, self.dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise _damaged(path, exc) from None
        self.rows = int(shape[0]) if shape else 1
        if self._whole is not None:  # compressed (not written by this module): read whole, once
            self._array = np.load(io.BytesIO(self._whole))

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``a`` to ``b``."""
        if self._whole is not None:
            return self._array[a:b]
        n = max(0, b - a)
        out = np.fromfile(self.path, dtype=self.dtype, count=n, offset=self.offset + a * self.dtype.itemsize)
        if len(out) != n:
            raise _damaged(self.path)
        return out

    def positions(self, values: np.ndarray) -> np.ndarray:
        """``np.searchsorted(column, values)`` for a sorted column, read in slices."""
        pos = np.zeros(len(values), np.int64)
        for a in range(0, self.rows, PLAN_BUCKET_ROWS):
            pos += np.searchsorted(self.read(a, min(a + PLAN_BUCKET_ROWS, self.rows)), values)
        return pos


def _merged_counts(folder: Path, world: int, keep: Callable[[BlockCounts], np.ndarray] | None = None) -> BlockCounts:
    """Every block of every share, with the records holding it over all shares (the share counts
    summed), in bounded memory: the shares' sorted count columns are read in slices of key64 (a
    key64 range holds about PLAN_BUCKET_ROWS rows of all shares, SHA-256 keys are uniform) and each
    slice summed on its own. Only the rows ``keep(part)`` of each summed slice are kept (all when
    None): memory beyond the result is one slice's work, whatever the dataset's size."""
    columns = [{k: _NpzColumn(folder / f"share-{s}.npz", f"counts_{k}") for k in _COUNT_COLUMNS} for s in range(world)]
    total = sum(c["key64"].rows for c in columns)
    buckets = total // PLAN_BUCKET_ROWS + 1
    edges = (np.arange(1, buckets, dtype=np.uint64) * np.uint64(((1 << 64) - 1) // buckets)).astype(np.uint64)
    bounds = [np.r_[0, c["key64"].positions(edges), c["key64"].rows] for c in columns]
    parts: list[BlockCounts] = []
    for b in range(buckets):
        cols = {
            k: np.concatenate([c[k].read(int(at[b]), int(at[b + 1])) for c, at in zip(columns, bounds)]) for k in _COUNT_COLUMNS
        }
        order = np.lexsort((cols["check64"], cols["key64"]))
        k64, c64 = cols["key64"][order], cols["check64"][order]
        starts = np.flatnonzero(np.r_[True, (k64[1:] != k64[:-1]) | (c64[1:] != c64[:-1])]) if len(k64) else np.zeros(0, np.int64)
        records = np.add.reduceat(cols["records"][order].astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
        part = BlockCounts(k64[starts], c64[starts], records.astype(np.uint32), cols["depth"][order][starts])
        del cols, order, k64, c64
        parts.append(part if keep is None else part.subset(keep(part)))
    if not parts:
        return BlockCounts(*(np.empty(0, np.uint64),) * 2, *(np.empty(0, np.uint32),) * 2)
    return BlockCounts(*(np.concatenate([getattr(p, k) for p in parts]) for k in _COUNT_COLUMNS))


def make_plan(
    folder: Path, world: int, root: BlockHash, block_size: int, stored: Callable[[list[bytes]], list[bool]],
    select: Callable[[BlockCounts], Selection] | None = None,
) -> dict:  # fmt: skip
    """The plan of a run from its ``world`` count shares: the heads, each head segment's and each
    record's rank. ``stored(keys)`` says which blocks the store already holds: they are no work.
    ``select(counts)`` (``--min-records``/``--max-bytes``) chooses the blocks to store from the
    summed counts: the others are no work and no head, and the plan holds the choice (``chosen_*``).

    Memory: the summed counts are made slice by slice (:func:`_merged_counts`) and only the shared
    blocks (in two or more records) kept, 24 bytes each (with ``select``, every block: the choice
    ranks them all, as one process's build does); the shares' blocks are read PLAN_CHUNK_BLOCKS at
    a time, and each head block is kept once, not once per record holding it."""
    shares = [load_npz(folder / f"share-{s}.npz", skip="counts_") for s in range(world)]
    _index_in_dataset(shares)
    selection, shared = _shared_counts(folder, world, select)
    found = _HeadBlocks(len(shared), root, block_size)
    records = [_share_work(folder, s, meta, shared, selection, stored, found) for s, meta in enumerate(shares)]
    del shared
    heads = found.heads()
    index, share, row, work = (np.concatenate(a) for a in zip(*records))
    order = np.argsort(index, kind="stable")
    index, share, row, work = index[order], share[order], row[order], work[order]
    head_owner, loads = _deal_heads(heads, world, block_size)
    owner = _deal_records(index, work, loads)
    plan = {
        "index": index, "share": share, "row": row, "work": work, "owner": owner,
        "head_keys": heads.keys, "head_parent": heads.parent, "head_depth": heads.depth, "head_tokens": heads.tokens, "head_owner": head_owner,
    }  # fmt: skip
    if selection is not None:
        plan |= {f"chosen_{k}": getattr(selection.chosen, k) for k in ("key64", "check64", "records", "depth")}
        plan["chosen_of"] = np.asarray(  # min_records, max_bytes (-1: not given), candidate blocks, microseconds
            [selection.min_records or -1, -1 if selection.max_bytes is None else selection.max_bytes,
             selection.candidate_blocks, round(selection.count_seconds * 1e6)], np.int64,
        )  # fmt: skip
    return plan


def _shared_counts(
    folder: Path, world: int, select: Callable[[BlockCounts], Selection] | None
) -> tuple[Selection | None, BlockCounts]:
    """The choice of blocks to store (with ``select``: made from every block's summed count), and
    the shared blocks (in two or more records) with their counts."""
    if select is None:
        return None, _merged_counts(folder, world, keep=lambda part: np.flatnonzero(part.records >= 2))
    counts = _merged_counts(folder, world)
    return select(counts), counts.subset(np.flatnonzero(counts.records >= 2))


class _HeadBlocks:
    """The head blocks the planner finds in the shares, each kept once (at its first occurrence):
    its key, parent, depth in its record and token ids, to make :class:`Heads` from."""

    def __init__(self, shared: int, root: BlockHash, block_size: int):
        self.root, self.bs = np.frombuffer(root, np.uint8), block_size
        self.seen = np.zeros(shared, bool)  # shared blocks already taken as heads (from an earlier record or share)
        self.parts: tuple[list[np.ndarray], ...] = ([], [], [], [])  # keys, parents, depth, tokens

    def add(
        self, keys: np.ndarray, row: np.ndarray, is_head: np.ndarray, first_block: np.ndarray, tokens_at: np.ndarray,
        owner_of: np.ndarray, ids: np.ndarray,
    ) -> None:  # fmt: skip
        """The heads among a chunk's blocks ``keys`` [n, 32] (``row``: each one's row in the shared
        counts, ``first_block``: its record's first block in the chunk, ``owner_of``: its record;
        ``tokens_at``: each record's first token in ``ids``, the share's token ids)."""
        bs = self.bs
        at = np.flatnonzero(is_head)
        at = at[~self.seen[row[at]]]  # each head block once: its first occurrence
        if not len(at):
            return
        _, first = np.unique(row[at], return_index=True)
        at = at[np.sort(first)]
        self.seen[row[at]] = True
        parents = np.where((at > first_block[at])[:, None], keys[np.maximum(at - 1, 0)], self.root)
        token_at = tokens_at[owner_of[at]] + (at - first_block[at]) * bs
        for part, value in zip(
            self.parts, (keys[at], parents, at - first_block[at], np.asarray(ids[token_at[:, None] + np.arange(bs)]))
        ):
            part.append(value)

    def heads(self) -> Heads:
        del self.seen
        if not self.parts[0]:
            return _empty_heads(self.bs)
        return Heads.build(*(np.concatenate(c) for c in self.parts))


def _share_work(
    folder: Path, s: int, meta: dict[str, np.ndarray], shared: BlockCounts, selection: Selection | None,
    stored: Callable[[list[bytes]], list[bool]], heads: _HeadBlocks,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Each record of share ``s``: its index, share, row in the share and work (tokens of its blocks
    beyond its leading heads, not stored yet, chosen); the share's head blocks go to ``heads``."""
    bs = heads.bs
    lengths = meta["lengths"]
    full = lengths // bs
    work = np.zeros(len(lengths), np.int64)
    first_of = np.cumsum(full) - full  # each record's first block in share-S.keys
    token_of = np.cumsum(lengths) - lengths  # and its first token in share-S.tokens
    ids = np.memmap(folder / f"share-{s}.tokens", dtype="<u4", mode="r") if full.sum() else None
    for r, end in _chunks(first_of, full):  # whole records, about PLAN_CHUNK_BLOCKS blocks at a time
        n = int(full[r:end].sum())
        keys = _read_keys(folder / f"share-{s}.keys", int(first_of[r]), n)
        owner_of = np.repeat(np.arange(end - r), full[r:end])  # record (row within the chunk) of each block
        first_block = np.repeat(first_of[r:end] - first_of[r], full[r:end])
        chosen = selection.chosen.find(keys) >= 0 if selection is not None else np.ones(n, bool)
        row = shared.find(keys) if len(shared) else np.full(n, -1, np.int64)
        is_head = (row >= 0) & chosen
        lead = np.bincount(owner_of, weights=is_head, minlength=end - r).astype(np.int64)  # heads are prefix-closed
        done = np.bincount(owner_of, weights=_held(keys, is_head, chosen, stored), minlength=end - r).astype(np.int64)
        work[r:end] = (full[r:end] - lead - done) * bs
        heads.add(keys, row, is_head, first_block, token_of[r:end], owner_of, ids)
    return meta["index"], np.full(len(lengths), s, np.int32), np.arange(len(lengths), dtype=np.int64), work


def _chunks(first_of: np.ndarray, full: np.ndarray) -> Iterator[tuple[int, int]]:
    """Runs ``r:end`` of whole records of about PLAN_CHUNK_BLOCKS blocks (a record longer is one),
    those with blocks only."""
    r = 0
    while r < len(full):
        end = min(max(r + 1, int(np.searchsorted(first_of, first_of[r] + PLAN_CHUNK_BLOCKS, side="right"))), len(full))
        if full[r:end].sum():
            yield r, end
        r = end


def _held(keys: np.ndarray, is_head: np.ndarray, chosen: np.ndarray, stored: Callable[[list[bytes]], list[bool]]) -> np.ndarray:
    """Which of a chunk's blocks are no work besides its heads: those not chosen (the choice is
    prefix-closed too) and those the store holds (asked in bounded lists of keys)."""
    rest = np.flatnonzero(~is_head & chosen)
    held = ~chosen
    for part in np.array_split(rest, -(-len(rest) // (1 << 20))) if len(rest) else ():
        held[part] = stored([keys[i].tobytes() for i in part])
    return held


def _deal_heads(heads: Heads, world: int, block_size: int) -> tuple[np.ndarray, list[int]]:
    """Each head run's rank: level by level, largest first, to the least loaded rank. Returns the
    rank of each head block and each rank's load (tokens)."""
    loads = [0] * world
    head_owner = np.full(len(heads), -1, np.int32)
    for level in heads.segments():
        for run in sorted(level, key=lambda r: (-len(r), heads.keys[r[0]].tobytes())):
            rank = min(range(world), key=loads.__getitem__)
            head_owner[run] = rank
            loads[rank] += len(run) * block_size
    return head_owner, loads


def _deal_records(index: np.ndarray, work: np.ndarray, loads: list[int]) -> np.ndarray:
    """Each record's rank: largest work first, to the least loaded rank (``loads``: after the heads);
    a record with no work left is only counted, by rank ``index % world``."""
    owner = (index % len(loads)).astype(np.int32)
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    for i in np.lexsort((index, -work)):
        if work[i] <= 0:
            break
        load, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (load + int(work[i]), rank))
    return owner


def _share_tokens(folder: Path, share: int, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    path = folder / f"share-{share}.tokens"
    total = int(lengths.sum())
    if total and (not path.exists() or path.stat().st_size < 4 * total):
        raise _damaged(path)
    ids = np.memmap(path, dtype="<u4", mode="r") if total else np.zeros(0, "<u4")
    return ids, np.cumsum(lengths) - lengths


def _read_keys(path: Path, first: int, n: int) -> np.ndarray:
    """Blocks ``first`` to ``first + n`` of a share's ``.keys`` spill: [n, 32] uint8."""
    keys = np.fromfile(path, dtype=np.uint8, count=32 * n, offset=32 * first)
    if len(keys) != 32 * n:
        raise _damaged(path)
    return keys.reshape(n, 32)


def load_npz(path: Path, skip: str | None = None) -> dict[str, np.ndarray]:
    """Every array of a count share or plan (``.npz``), read whole (but those whose names start
    with ``skip``: the planner reads the share counts in slices); a truncated or damaged file (a
    crash under --no-fsync can leave one: it was linked in before it reached the disk) is one
    clear CorruptStoreError saying what to do, not numpy's error."""
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files if skip is None or not k.startswith(skip)}
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: BaseException | None = None) -> CorruptStoreError:
    plan = next((p for p in path.parents if p.name.endswith(PLAN_SUFFIX)), path.parent)
    why = f" ({exc})" if exc is not None else ""
    return CorruptStoreError(
        f"{path} is truncated or damaged{why} (a crash under --no-fsync can leave it so): remove the folder {plan}, "
        "then relaunch every rank with --resume (the blocks already stored are kept)"
    )
