"""Distributed builds: many processes (GPUs, nodes) fill one store, and no block is computed twice.

Launch with ``torchrun --nproc-per-node N -m prefixgen build ...`` (RANK, WORLD_SIZE and LOCAL_RANK
from the environment; ``torch.distributed`` only to agree on the store and the run at start) or with
``--rank R --world-size N`` (Slurm arrays, any scheduler: ranks never talk, they coordinate through
the store). One process is rank 0 of 1: it streams the dataset straight into the pipeline.

:class:`Ranks` is the one place the pipeline meets ranks: it prepares the store, plans, hands the
pipeline this rank's records, and merges. For N > 1 ranks, one plan, then shares:

1. **Count, in shares.** Share ``s`` is about 1/N of the records, a pure function of the dataset,
   N and ``--limit`` (``data.source.read_share``: a byte range of local .jsonl/.txt files, a row
   range of .parquet files, a run of files of a dataset of N or more ``datasets`` shards, else the
   records with ``index % N == s``). Each rank reads and tokenizes only its share, and reads
   nothing outside it but the line across each end (with ``--limit``, line ends are also scanned
   up to where the limit's records end): records of line files and file runs are numbered within
   their share (row r of share s; this pass's warnings name them so), and their indices in the
   dataset are made with the plan, from every share's record count. It counts the
   records holding each block (``analysis.count.BlockCounter``) and spills its share's token ids
   and block keys into ``builds/<id>.plan/<run>/`` (6 bytes per token: 4 for the id, 32 per
   16-token block for keys). Every record is read and tokenized once over all ranks. Under
   ``--rank/--world-size`` shares are claimed (a lone rank counts them all).
2. **Plan.** The share counts are summed; the shared *heads* are the blocks in two or more records
   (prefix-closed, a trie). A record's work is its blocks beyond its leading heads and beyond what
   the store already holds (``--resume``: work left, not work done). Head segments (branch-free runs
   of the trie) are dealt level by level, largest first, to the least loaded rank; then records,
   largest work first, likewise. The plan (heads, and each record's rank) is one file, made once
   by one rank (torchrun: rank 0; ``--rank``: the rank that claims it, a lease like any claim)
   while the others wait. Shares and plan are fsynced before they are renamed in (unless
   ``--no-fsync``): after a node crash no rank reads a half-written one. Under ``--rank`` each
   ``--resume`` of the ranks after one died is a new *attempt* with a plan of its own, by the work
   left (the shares are kept): the first rank relaunched starts it, the others join it. With
   ``--min-records``/``--max-bytes`` the planner chooses the blocks to store from the summed counts
   (``builder.selection``, the rule of one process): heads and work are chosen blocks only, and
   each rank cuts its records to the choice (:attr:`Ranks.selection`).
3. **Heads.** Under torchrun each rank prefills the head segments the plan gives it, then waits
   (through the store, without a timeout) until the level is stored. Under ``--rank`` ranks claim
   *ranges* of a level's segments (at most one per rank, :func:`head_ranges`); a claim is a lease
   the claimer renews, judged stale by the file system's clock (or at once when its holder's writer
   lock is free: that process is dead), and taken over by exactly one rank (owner-checked), which
   computes only the range's segments not stored yet. A waiting rank's metadata operations per
   round are bounded (one listing, one clock probe, CLAIMS_PER_ROUND claims) and its rounds back
   off to one a second (README: the operations per second at 1,000 ranks).
4. **Build.** Each rank builds its records, reading their token ids back from the spill: it
   tokenizes nothing more. Waiting for slower ranks is never bounded by ``--dist-timeout`` (that
   bounds the start-up collectives only): a dead torchrun rank is torch elastic's to detect, a dead
   ``--rank`` rank's claims are taken over once its writer lock is free (at once on a local file
   system; NFS frees a dead client's locks after its lease) or its lease goes stale.
"""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import heapq
import io
import json
import os
import secrets
import shutil
import socket
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefixgen.analysis.count import BlockCounter, BlockCounts
from prefixgen.builder.plan import PrefillTask, chunk_task
from prefixgen.builder.selection import Selection
from prefixgen.config import BuildConfig
from prefixgen.data.records import RecordTokenizer, TokenizedRecord
from prefixgen.data.source import Record, ShareRead, dataset_fingerprint
from prefixgen.errors import ConfigError, CorruptStoreError, DatasetError, StoreError
from prefixgen.format import (
    BUILDS_DIR,
    CLAIMS_DIR,
    COUNTS_DIR,
    INDEX_DIR,
    MANIFEST_FILE,
    PLAN_SUFFIX,
    RANK_PARTS_SUFFIX,
    BlockHash,
    BuildRecord,
    Manifest,
    Segment,
    atomic_write,
    block_keys,
    create_once,
    fsync_dir,
    temp_path,
)
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import PrefixStore, read_builds
from prefixgen.store.writer import ID_PATTERN, new_id, prepare_store, remove_temp_files, utc_now, writer_is_live

CLAIM_STALE_SECONDS = 120.0  # a claim whose lease was not renewed for this long (file system clock) is taken over
LEASE_SECONDS = CLAIM_STALE_SECONDS / 8  # how often a claimer renews its claims
POLL_SECONDS = 0.05  # the first pause of a waiting rank; it doubles while nothing changes, up to:
MAX_POLL_SECONDS = 1.0
HEAD_RANGE_TOKENS = 1 << 20  # the most tokens of head runs one claim covers (its holder's work until it renews)
CLAIMS_PER_ROUND = 16  # claims of others a waiting rank looks at per round (in turn): its metadata ops stay bounded  # (1,000 waiting ranks then make ~1,000 rounds/s of metadata reads between them)
# Options that may differ between the ranks (or between a run and its --resume) of one build: they
# change how the work runs, not the bytes stored.
_RUN_OPTIONS = (
    "rank", "world_size", "resume", "append", "overwrite", "device", "dist_timeout", "quiet", "out",
    "batch_tokens", "write_threads", "sort_window", "prefix_cache_bytes", "fsync", "shard_bytes",
)  # fmt: skip
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


# ---------------------------------------------------------------------------- shares and the plan


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
    rows, local = 0, False  # records of the share (skipped ones too); numbered within it (Record.share)

    def tally(records: Iterator[Record]) -> Iterator[Record]:
        nonlocal rows, local
        for rec in records:
            rows += 1
            local |= rec.share is not None
            yield rec

    names = [folder / f"share-{share}.{ext}" for ext in ("tokens", "keys")]
    tmps = [temp_path(p, owner) for p in names]
    with open(tmps[0], "wb") as tokens_file, open(tmps[1], "wb") as keys_file:
        for rec in counting(tally(records)):
            ids = np.asarray(rec.ids, dtype="<u4")
            keys = block_keys(rec.ids, block_size, root)
            tokens_file.write(ids.tobytes())
            keys_file.write(b"".join(keys))
            counter.add(keys)
            index.append(rec.index)
            lengths.append(len(ids))
        for f in (tokens_file, keys_file) if fsync else ():
            f.flush()
            os.fsync(f.fileno())
    for tmp, name in zip(tmps, names):
        os.replace(tmp, name)
    if fsync:
        fsync_dir(folder)  # the renames, before the .npz that marks the share done
    counts = counter.result()
    meta = {"index": np.asarray(index, np.int64), "lengths": np.asarray(lengths, np.int64)}
    meta |= {"rows": np.asarray(rows, np.int64), "local": np.asarray(local)}
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
    bs = block_size
    shares = [load_npz(folder / f"share-{s}.npz", skip="counts_") for s in range(world)]
    _index_in_dataset(shares)
    if select is not None:
        counts = _merged_counts(folder, world)
        selection = select(counts)
        shared = counts.subset(np.flatnonzero(counts.records >= 2))
        del counts
    else:
        selection, shared = None, _merged_counts(folder, world, keep=lambda part: np.flatnonzero(part.records >= 2))
    seen = np.zeros(len(shared), bool)  # shared blocks already taken as heads (from an earlier record or share)
    rec_share, rec_row, rec_index, rec_work = [], [], [], []
    head_keys, head_parents, head_depth, head_tokens = [], [], [], []
    for s, meta in enumerate(shares):
        lengths = meta["lengths"]
        full = lengths // bs
        work = np.zeros(len(lengths), np.int64)
        first_of = np.cumsum(full) - full  # each record's first block in share-S.keys
        token_of = np.cumsum(lengths) - lengths  # and its first token in share-S.tokens
        ids = np.memmap(folder / f"share-{s}.tokens", dtype="<u4", mode="r") if full.sum() else None
        r = 0
        while r < len(full):  # whole records, about PLAN_CHUNK_BLOCKS blocks at a time
            end = max(r + 1, int(np.searchsorted(first_of, first_of[r] + PLAN_CHUNK_BLOCKS, side="right")))
            end = min(end, len(full))
            n = int(full[r:end].sum())
            if not n:
                r = end
                continue
            keys = _read_keys(folder / f"share-{s}.keys", int(first_of[r]), n)
            owner_of = np.repeat(np.arange(end - r), full[r:end])  # record (row within the chunk) of each block
            first_block = np.repeat(first_of[r:end] - first_of[r], full[r:end])
            chosen = selection.chosen.find(keys) >= 0 if selection is not None else np.ones(n, bool)
            row = shared.find(keys) if len(shared) else np.full(n, -1, np.int64)
            is_head = (row >= 0) & chosen
            lead = np.bincount(owner_of, weights=is_head, minlength=end - r).astype(np.int64)  # heads are prefix-closed
            rest = np.flatnonzero(~is_head & chosen)
            held = ~chosen  # a block not chosen is no work (the choice is prefix-closed too)
            for part in np.array_split(rest, -(-len(rest) // (1 << 20))) if len(rest) else ():  # bounded lists of keys
                held[part] = stored([keys[i].tobytes() for i in part])
            done = np.bincount(owner_of, weights=held, minlength=end - r).astype(np.int64)
            work[r:end] = (full[r:end] - lead - done) * bs
            at = np.flatnonzero(is_head)
            at = at[~seen[row[at]]]  # each head block once: its first occurrence
            if len(at):
                _, first = np.unique(row[at], return_index=True)
                at = at[np.sort(first)]
                seen[row[at]] = True
                parents = np.where((at > first_block[at])[:, None], keys[np.maximum(at - 1, 0)], np.frombuffer(root, np.uint8))
                token_at = token_of[r + owner_of[at]] + (at - first_block[at]) * bs
                head_keys.append(keys[at])
                head_parents.append(parents)
                head_depth.append(at - first_block[at])
                head_tokens.append(np.asarray(ids[token_at[:, None] + np.arange(bs)]))
            r = end
        rec_work.append(work)
        rec_share.append(np.full(len(lengths), s, np.int32))
        rec_row.append(np.arange(len(lengths), dtype=np.int64))
        rec_index.append(meta["index"])
    del shared, seen
    if head_keys:
        heads = Heads.build(*(np.concatenate(c) for c in (head_keys, head_parents, head_depth, head_tokens)))
    else:
        heads = _empty_heads(bs)
    index, share, row, work = (np.concatenate(a) for a in (rec_index, rec_share, rec_row, rec_work))
    order = np.argsort(index, kind="stable")
    index, share, row, work = index[order], share[order], row[order], work[order]
    loads = [0] * world
    head_owner = np.full(len(heads), -1, np.int32)
    for level in heads.segments():  # largest first, to the least loaded rank
        for run in sorted(level, key=lambda r: (-len(r), heads.keys[r[0]].tobytes())):
            rank = min(range(world), key=loads.__getitem__)
            head_owner[run] = rank
            loads[rank] += len(run) * bs
    owner = (index % world).astype(np.int32)  # records with no work left: only counted
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    for i in np.lexsort((index, -work)):
        if work[i] <= 0:
            break
        load, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (load + int(work[i]), rank))
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


class Ranks:
    """This process's place in a build: rank, world size, how the ranks coordinate, and the plan.

    A single process is rank 0 of 1: it prepares the store, streams every record and merges
    nothing. The pipeline calls the same methods either way.

    Example:
        >>> ranks = Ranks.from_config(BuildConfig(dataset="d", model="m", out="s", rank=1, world_size=4))
        >>> ranks.rank, ranks.world_size, ranks.collective
        (1, 4, False)
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, collective: bool = False, timeout: float = 600):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.collective = collective  # launched by torchrun: torch.distributed is there
        self.timeout = timeout  # start-up collectives only: waiting for other ranks' work has no timeout
        self.run = f"w{world_size}"  # this run's folder under builds/<id>.plan/ (torchrun: rank 0 names it)
        self.attempt = 0  # --rank: which plan of the run this rank builds by (one more per --resume of the ranks)
        self.plan: dict[str, np.ndarray] = {}
        self.heads = _empty_heads(1)

    @classmethod
    def from_config(cls, cfg: BuildConfig) -> Ranks:
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if env_world > 1 and cfg.world_size is not None:
            raise ConfigError("--rank/--world-size are for launchers without torchrun; under torchrun leave them out")
        if env_world > 1:
            return cls(int(os.environ["RANK"]), env_world, int(os.environ.get("LOCAL_RANK", "0")), True, cfg.dist_timeout)
        if cfg.world_size is not None and cfg.world_size > 1:
            return cls(cfg.rank, cfg.world_size, 0, False, cfg.dist_timeout)
        return cls(timeout=cfg.dist_timeout)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def part(self) -> str:
        """This rank's name in the store's per-rank files."""
        return f"w{self.world_size}-r{self.rank}"

    def device(self, requested: str) -> str:
        """``cuda:LOCAL_RANK`` for torchrun ranks asking for auto or cuda; else ``requested``."""
        import torch

        if self.collective and requested.startswith("cuda:"):
            raise ConfigError(f"under torchrun each rank uses cuda:LOCAL_RANK: pass --device cuda (or auto), not {requested}")
        if self.collective and requested in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return requested

    # ------------------------------------------------------------------ collectives (start-up only)

    def _init(self, device: str) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            return
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=self.timeout))
        atexit.register(dist.destroy_process_group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (torchrun only), within ``--dist-timeout``: used at start-up only."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ the store

    def prepare_store(self, out: Path, manifest: Manifest, cfg: BuildConfig, device: str) -> tuple[Manifest, str | None]:
        """``writer.prepare_store`` for this rank; returns the store's manifest and, for a
        distributed build, the build id every rank uses. Every rank fails with the same message
        if one of them cannot use the store (not a hang)."""
        if not self.distributed:
            manifest = prepare_store(out, manifest, cfg.write_mode)
            if cfg.resume:
                remove_temp_files(out)
            return manifest, None
        if self.collective:
            return self._prepare_together(out, manifest, cfg, device)
        if cfg.overwrite:
            raise ConfigError(
                "--overwrite with --rank/--world-size would let one rank erase another's work: remove the store first"
            )
        return self._join(out, manifest, cfg), self._build_id(out, cfg)

    def _join(self, out: Path, manifest: Manifest, cfg: BuildConfig) -> Manifest:
        """A rank without collectives: create the store, or join it when it holds this build only."""
        for attempt in range(2):
            mode = cfg.write_mode
            if mode == "new" and (out / MANIFEST_FILE).exists():
                others = [p for p in (out / BUILDS_DIR).glob("*.json") if p.stem != _options_id(cfg)]
                mode = "new" if others else "append"  # only this build's ranks were here: join them
            try:
                return prepare_store(out, manifest, mode)
            except (StoreError, OSError):
                if attempt or mode != "new" or not (out / MANIFEST_FILE).exists():
                    raise
                time.sleep(0.5)  # another rank made the store between our look and our write: look again
        raise AssertionError("unreachable")

    def _prepare_together(self, out: Path, manifest: Manifest, cfg: BuildConfig, device: str) -> tuple[Manifest, str | None]:
        self._init(device)
        host = socket.gethostname()
        answer: dict[str, Any] = {"error": None}
        if self.rank == 0:
            try:
                answer["manifest"] = prepare_store(out, manifest, cfg.write_mode).to_json()
                # A run is its own build (ids identify runs); --resume continues the unfinished one.
                answer["build_id"] = self._build_id(out, cfg) if cfg.resume else f"dist-{new_id()}"
                if cfg.resume:  # no other writer is live: a killed run's leftovers go, its plan too
                    refuse_live_ranks(out, answer["build_id"], None)
                    remove_temp_files(out)
                    shutil.rmtree(out / CLAIMS_DIR, ignore_errors=True)
                    shutil.rmtree(out / BUILDS_DIR / f"{answer['build_id']}{PLAN_SUFFIX}", ignore_errors=True)
                answer["run"] = f"t{secrets.token_hex(6)}"
                answer["check"] = f"check-{secrets.token_hex(8)}"
                (out / CLAIMS_DIR).mkdir(exist_ok=True)
                (out / CLAIMS_DIR / answer["check"]).write_text(host)
            except Exception as exc:  # told to every rank below, then raised on each
                answer["error"] = f"rank 0 on {host} cannot use the store {out}: {exc}"
        first = self.gather(answer if self.rank == 0 else None)[0]
        if first["error"]:
            raise StoreError(first["error"])
        error = None
        if self.rank != 0:
            try:
                if not (out / CLAIMS_DIR / first["check"]).is_file():
                    raise StoreError(
                        f"it does not see the store rank 0 prepared at {out.resolve()}: every rank must reach one store "
                        "at the same path (a filesystem shared by all nodes)"
                    )
                prepare_store(out, manifest, "append")  # same model and layout as rank 0's
            except Exception as exc:
                error = f"rank {self.rank} on {host} cannot use the store {out}: {exc}"
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise StoreError("; ".join(errors))
        self.run = first["run"]
        if self.rank == 0:
            (out / CLAIMS_DIR / first["check"]).unlink(missing_ok=True)  # every rank has looked
        return Manifest.from_json(first["manifest"], out / MANIFEST_FILE), first["build_id"]

    def _build_id(self, out: Path, cfg: BuildConfig) -> str:
        """The same id on every rank without talking: the unfinished build of this dataset for
        --resume, else one derived from the options that change the stored bytes."""
        current = _options_id(cfg)
        if cfg.resume:
            for old in reversed(read_builds(out)):
                if old.dataset == cfg.dataset and old.status != "complete":
                    fingerprint = old.options.get("dataset_fingerprint")
                    if fingerprint is not None and fingerprint != dataset_fingerprint(cfg.dataset):
                        raise DatasetError(
                            f"{cfg.dataset} changed since build {old.build_id} of it started (its files' sizes or times "
                            "differ): its saved counts and plan are of the old content. Rerun without --resume to "
                            "build the dataset as it is now (blocks already stored are not computed again)"
                        )
                    return old.build_id
        return current

    def finished(self, store: PrefixStore, build_id: str, cfg: BuildConfig, started_at: str) -> BuildRecord | None:
        """The record of a run that has nothing to do, or None: ``--resume`` with no unfinished
        build of the dataset, or a ``--rank`` rank whose build is already complete (rerunning the
        command of a finished build is a no-op: its ranks' parts are not rewritten)."""
        builds = {b.build_id: b for b in store.builds()}
        done = builds.get(build_id)
        if done is not None and done.status == "complete" and (self.distributed or cfg.resume):
            return done
        if cfg.resume and build_id not in builds:
            same = [b for b in builds.values() if b.dataset == cfg.dataset]
            if same:  # this run's record: it computed and wrote nothing
                return BuildRecord(same[-1].build_id, cfg.dataset, "complete", started_at, utc_now(), options=cfg.options())
        return None

    def attach(self, out: Path, record: BuildRecord, writer: Any, resume: bool) -> None:
        """Make ``writer`` write this rank's part of the build record (and write the build's base
        record). On ``--resume``, first remove what an earlier run of the build launched another way
        left: a single-process run's counts (or, resumed as one process, a distributed run's rank
        parts and plan), so that records are counted once and the status can complete."""
        if resume:
            self._drop_other_launches(out, record.build_id, record.writers[0])
        if not self.distributed:
            return
        record.world_size, record.rank = self.world_size, self.rank
        writer.part = self.part
        try:
            # Parts of another number of ranks are replaced below: never while one of those ranks runs.
            refuse_live_ranks(out, record.build_id, record.writers[0], other_world=self.world_size)
        except StoreError:
            writer.release()
            raise
        for p in (out / COUNTS_DIR).glob(f"{record.build_id}.w*-r*.*safetensors"):
            if not p.name.startswith(f"{record.build_id}.w{self.world_size}-"):
                p.unlink(missing_ok=True)  # an earlier attempt with another world size: replaced by this one
        parts = out / BUILDS_DIR / f"{record.build_id}{RANK_PARTS_SUFFIX}"
        for p in parts.glob("*.json"):
            if not p.name.startswith(f"w{self.world_size}-"):
                p.unlink(missing_ok=True)
        if not self.collective:
            try:
                self.attempt = record.attempt = self._attempt(out, parts, resume)
            except StoreError:
                writer.release()  # as drop_old_counts does: a refused rank leaves no live lock behind
                raise
        base = BuildRecord(record.build_id, record.dataset, started_at=record.started_at, options=record.options)
        base.world_size = self.world_size
        base.options = {k: v for k, v in record.options.items() if k not in ("rank", "world_size")}
        base.options["dataset_fingerprint"] = dataset_fingerprint(record.dataset)
        text = json.dumps(base.to_dict(), indent=2, sort_keys=True) + "\n"
        create_once(out / BUILDS_DIR / f"{record.build_id}.json", [text.encode()], writer.fsync, owner=writer.writer_id)

    def _attempt(self, out: Path, parts: Path, resume: bool) -> int:
        """The attempt this ``--rank`` rank joins: the latest of its build's rank parts, or, on
        ``--resume`` by a rank that already ran in the latest, a new one, planned anew by the work
        left (so the work of a rank that died is spread over every rank; every rank must then run
        in it, and each rank relaunched with ``--resume`` joins it). Refuses while a rank of the
        latest attempt still runs: its work would be planned twice."""
        ran = {}
        for p in parts.glob(f"w{self.world_size}-r*.json"):
            try:
                ran[p.stem] = BuildRecord.from_dict(json.loads(p.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise CorruptStoreError(f"{p} is damaged ({exc}): remove it and rerun this rank with --resume") from None
        latest = max((b.attempt for b in ran.values()), default=0)
        mine = ran.get(self.part)
        if not resume or mine is None or mine.attempt < latest:
            return latest
        for b in ran.values():
            live = [w for w in b.writers if writer_is_live(out, w)] if b.attempt == latest else []
            if live:
                raise StoreError(
                    f"rank {b.rank} of build {b.build_id} is still running (writer {live[0]}): --resume is for ranks "
                    "that stopped; wait for it to finish (or stop it), then relaunch every rank with --resume"
                )
        return latest + 1

    def _drop_other_launches(self, out: Path, build_id: str, me: str) -> None:
        if self.distributed:  # counts of a single-process run: counts/<id>.<writer>.<n>.safetensors
            prefix = f"{build_id}."
            for p in (out / COUNTS_DIR).glob(f"{prefix}*safetensors"):
                owner = p.name[len(prefix) :].split(".")[0]
                if not owner.startswith("w") or "-r" not in owner:
                    if owner != me and writer_is_live(out, owner):
                        raise StoreError(f"build {build_id} is still running (writer {owner} is live): wait for it to finish")
                    p.unlink(missing_ok=True)
            return
        # Resumed as one process: the rank parts would keep the build "running" forever, and the
        # plan is no longer needed. (Rank parts' counts go with the build's own, in drop_old_counts.)
        refuse_live_ranks(out, build_id, me)
        shutil.rmtree(out / BUILDS_DIR / f"{build_id}{RANK_PARTS_SUFFIX}", ignore_errors=True)
        shutil.rmtree(out / BUILDS_DIR / f"{build_id}{PLAN_SUFFIX}", ignore_errors=True)
        shutil.rmtree(out / CLAIMS_DIR / build_id, ignore_errors=True)

    # ------------------------------------------------------------------ plan and heads

    def prepare_work(
        self,
        out: Path,
        manifest: Manifest,
        records: Callable[[], Iterator[Record]],
        tokenize: RecordTokenizer,
        run: Callable[[list[PrefillTask], PrefixStore], None],
        writer: Any,
        record: BuildRecord,
        batch_tokens: int,
        timer: Callable[[str], Any],
        select: Callable[[BlockCounts], Selection] | None = None,
    ) -> PrefixStore | None:
        """Count this rank's shares, make (or read) the plan, and prefill the heads this rank is
        given or claims, level by level, until every head is stored. Returns the store reopened (it
        holds every head), or None for a single process (nothing to do before its pipeline).

        ``records(share, read)`` reads count share ``share`` of this run's ``world_size`` (adding what
        it read to ``read``, a ``data.source.ShareRead``); ``run(tasks, store)`` prefills and queues
        tasks as the pipeline does, loading pasts from ``store``; ``writer.flush()`` publishes them.
        ``timer(name)`` times the count pass (``dist_count``, its wait for the other shares and the
        plan included) and the head phase (``dist_heads``, waits for other ranks included).
        ``select`` (``--min-records``/``--max-bytes``): the planner's choice of blocks to store from
        the summed counts (see :func:`make_plan`); this rank's :attr:`selection` after."""
        if not self.distributed:
            return None
        folder = out / BUILDS_DIR / f"{record.build_id}{PLAN_SUFFIX}" / self.run
        folder.mkdir(parents=True, exist_ok=True)
        with timer("dist_count"):
            self._count(folder, records, tokenize, manifest, writer, record)
            self._read_plan(folder, out, manifest, writer, record, select)
        meta = load_npz(folder / f"share-{self.rank}.npz")  # share R's skipped records are rank R's to report
        record.skipped_records, record.truncated_records = (int(n) for n in meta["stats"][:2])
        with timer("dist_heads"):
            self._prefill_heads(out, manifest, run, writer, record, batch_tokens)
        return _open_store(out)

    def _count(
        self, folder: Path, records: Callable, tokenize: RecordTokenizer, manifest: Manifest, writer: Any, record: BuildRecord
    ) -> None:
        owner = writer.writer_id

        def count(share: int) -> None:
            read = ShareRead()
            stats = count_share(
                records(share, read), tokenize, folder, share, manifest.root_key, manifest.block_size, owner,
                fsync=writer.fsync,
            )  # fmt: skip
            record.read_records += read.records
            record.read_bytes += read.bytes
            record.scanned_bytes += read.scanned_bytes
            record.tokenized_tokens += stats.dataset_tokens

        def done(share: int) -> bool:
            return (folder / f"share-{share}.npz").exists()

        claims = folder / "claims"
        claims.mkdir(exist_ok=True)
        shares = [(self.rank + i) % self.world_size for i in range(self.world_size)]  # own share first
        if self.collective:  # every rank counts its own share
            count(self.rank)
        wait, looked = _Backoff(), 0
        while True:
            saved = {n for n in os.listdir(folder) if n.startswith("share-") and n.endswith(".npz")}  # one listing a round
            left = [s for s in shares if f"share-{s}.npz" not in saved]
            if not left:
                break
            if self.collective:
                wait()  # a rank that dies stops the whole run (torch elastic)
                continue
            holders, clock = _Holders(writer.path), _Clock(claims, owner)  # one look at each per round
            # Own share first, then at most CLAIMS_PER_ROUND others, in turn: at 1,000 ranks a waiting
            # rank does not stat and read 1,000 claims a round (a lone rank still counts them all).
            if left[0] != self.rank:
                start = looked % len(left)
                left = (left[start:] + left[:start])[:CLAIMS_PER_ROUND]
                looked += CLAIMS_PER_ROUND
            for s in left:
                if not done(s) and _claim(claims / f"share-{s}", owner, now=clock, holders=holders):
                    with _Lease([claims / f"share-{s}"]):
                        count(s)
                    wait.reset()
            wait()

    def _read_plan(
        self, folder: Path, out: Path, manifest: Manifest, writer: Any, record: BuildRecord, select: Callable | None = None
    ) -> None:
        """Make the plan on one rank (torchrun: rank 0; ``--rank``: the one that claims it, taken
        over if it dies while planning) and read it; the others wait for it without a timeout."""
        path = folder / f"plan-{self.attempt}.npz"
        claim = folder / "claims" / f"plan-{self.attempt}"
        wait = _Backoff()
        while not path.exists():
            if self.collective and self.rank != 0:
                wait()  # rank 0 plans; a rank that dies stops the whole run (torch elastic)
            elif self.collective or _claim(
                claim, writer.writer_id, now=_Clock(claim.parent, writer.writer_id), holders=_Holders(out)
            ):
                with _Lease([] if self.collective else [claim]):
                    if not path.exists():  # a planner that died after writing it: nothing to redo
                        self._make_plan(folder, out, manifest, writer, record, select)
            else:
                wait()  # another rank plans (its claim goes stale if it dies)
        self.plan = load_npz(path)
        self.heads = Heads(*(self.plan[f"head_{k}"] for k in ("keys", "parent", "depth", "tokens")))

    def _make_plan(
        self, folder: Path, out: Path, manifest: Manifest, writer: Any, record: BuildRecord, select: Callable | None
    ) -> None:
        index = StoreIndex.open(out)
        plan = make_plan(folder, self.world_size, manifest.root_key, manifest.block_size, index.contains, select)
        record.plans_made += 1
        plan["planner"] = np.asarray(writer.writer_id)  # who made it: one rank per run
        buf = io.BytesIO()
        np.savez(buf, **plan)
        # fsync (unless --no-fsync) before it is linked in: after a crash no rank may read half a plan.
        create_once(folder / f"plan-{self.attempt}.npz", [buf.getvalue()], fsync=writer.fsync, owner=writer.writer_id)

    def _prefill_heads(
        self, out: Path, manifest: Manifest, run: Callable, writer: Any, record: BuildRecord, batch_tokens: int
    ) -> None:
        bs = manifest.block_size
        levels = self.heads.segments()
        if not levels:
            return
        # One claim per *range* of a level's runs (about a rank's fair share of its tokens, see
        # head_ranges), in a folder of this attempt's: at 1,000 ranks a level of 100,000 runs is
        # about 1,000 claims, not 100,000 files in one folder. The ranges are a function of the plan
        # and the world size only (not of --batch-tokens, which may differ between ranks).
        claims = out / CLAIMS_DIR / record.build_id / f"{self.run}-a{self.attempt}"
        if not self.collective:
            claims.mkdir(parents=True, exist_ok=True)
        # The index is opened once for the whole phase; each round then reads only new segments.
        watch = _IndexWatch(out, [self.heads.keys[r[-1]].tobytes() for level in levels for r in level])
        wait, first = _Backoff(), 0
        for number, level in enumerate(levels):
            rows = range(first, first + len(level))  # this level's runs in the watch
            first += len(level)
            if self.collective:  # the plan's deterministic assignment: no claims
                held = watch.held(rows)
                mine = [i for i in range(len(level)) if not held[i] and self.plan["head_owner"][level[i][0]] == self.rank]
                self._compute_runs(out, level, mine, run, writer, record, bs, batch_tokens)
                while not all(watch.held(rows)):
                    wait()  # others compute the rest (a rank that dies stops the run: torch elastic)
                wait.reset()
                continue
            ranges = head_ranges(np.asarray([len(r) for r in level]), self.world_size, bs)
            start = self.rank * len(ranges) // self.world_size  # ranks start apart: few races for one claim
            order = list(range(start, len(ranges))) + list(range(start))
            done: set[int] = set()  # ranges this rank computed (published at once)
            turn = 0
            while True:
                held = watch.held(rows)
                pending = [j for j in order if j not in done and not all(held[i] for i in ranges[j])]
                if not pending:
                    break
                # One look at the clock and at each holder per round; at most CLAIMS_PER_ROUND claims, in turn.
                now, holders = _Clock(claims, writer.writer_id), _Holders(out)
                at = turn % len(pending)
                look = (pending[at:] + pending[:at])[:CLAIMS_PER_ROUND]
                path = next(
                    (claims / f"l{number}-r{j}" for j in look
                     if _claim(claims / f"l{number}-r{j}", writer.writer_id, now=now, holders=holders)),
                    None,
                )  # fmt: skip
                if path is None:
                    turn += CLAIMS_PER_ROUND
                    wait()  # others compute the rest: no timeout (their claims go stale if they die)
                    continue
                wait.reset()
                j = int(path.name.rsplit("-r", 1)[1])
                with _Lease([path]):  # runs of the range a dead holder stored are skipped: only the rest
                    self._compute_runs(out, level, [i for i in ranges[j] if not held[i]], run, writer, record, bs, batch_tokens)
                done.add(j)

    def _compute_runs(
        self, out: Path, level: list[np.ndarray], runs: list[int], run: Callable, writer: Any, record: BuildRecord,
        bs: int, batch_tokens: int,
    ) -> None:  # fmt: skip
        """Prefill head runs ``runs`` of ``level`` (what the store holds of each is skipped), published
        (``writer.flush()``) every ``batch_tokens`` new tokens or so: a rank that takes over this
        work from one that died recomputes at most the group that was not published."""
        if not runs:
            return
        store = _open_store(out)  # holds every earlier level: the parents of this level's runs
        group: list[PrefillTask] = []
        new = 0
        for n, i in enumerate(runs):
            keys, tokens = self.heads.chain(int(level[i][-1]))
            cached = len(store.index.find_prefix(keys)) * bs
            group += chunk_task(-1, tokens, cached, keys, bs, batch_tokens)
            new = sum(t.new_tokens for t in group)
            if n == len(runs) - 1 or new >= batch_tokens:
                run(group, store)
                record.head_tokens += new
                record.stored_tokens += new
                writer.flush()  # publish: shard and index segment on disk for the other ranks
                group = []

    @property
    def selection(self) -> Selection | None:
        """The blocks to store that the plan chose (``--min-records``/``--max-bytes``), or None."""
        if "chosen_of" not in self.plan:
            return None
        chosen = BlockCounts(*(self.plan[f"chosen_{k}"] for k in ("key64", "check64", "records", "depth")))
        min_records, max_bytes, candidates, micros = (int(n) for n in self.plan["chosen_of"])
        return Selection(
            chosen, None if min_records < 0 else min_records, None if max_bytes < 0 else max_bytes, candidates, micros / 1e6
        )

    # ------------------------------------------------------------------ routing and merging

    def tokenized(
        self, tokenize: RecordTokenizer, records: Iterator[Record], record: BuildRecord, out: Path
    ) -> Iterator[TokenizedRecord]:
        """This rank's records, tokenized: one process tokenizes the stream; a rank of many reads
        its records' token ids back from the count shares (tokenizing nothing more)."""
        if not self.distributed:
            for rec in tokenize(records):
                record.tokenized_tokens += len(rec.ids)
                yield rec
            return
        folder = out / BUILDS_DIR / f"{record.build_id}{PLAN_SUFFIX}" / self.run
        plan = self.plan
        mine = np.flatnonzero(plan["owner"] == self.rank)
        spills: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for s in np.unique(plan["share"][mine]).tolist():
            lengths = load_npz(folder / f"share-{s}.npz")["lengths"]
            spills[s] = (*_share_tokens(folder, s, lengths), lengths)
        for i in mine.tolist():
            ids, starts, lengths = spills[int(plan["share"][i])]
            row = int(plan["row"][i])
            tokens = ids[starts[row] : starts[row] + lengths[row]].tolist()
            record.records += 1
            record.dataset_tokens += len(tokens)
            yield TokenizedRecord(int(plan["index"][i]), tokens)

    def finish(self, out: Path, record: BuildRecord) -> BuildRecord:
        """The merged record of the build. Under torchrun, rank 0 waits (through the store, without a
        timeout: a rank that dies ends the run under torch elastic) for every rank to finish; the
        rank that sees the build complete removes its plan."""
        if not self.distributed:
            return record
        merged = record
        while True:
            merged = next((b for b in read_builds(out) if b.build_id == record.build_id), record)
            if not self.collective or self.rank != 0 or merged.status != "running":
                break
            time.sleep(0.5)
        if merged.status == "complete":
            shutil.rmtree(out / BUILDS_DIR / f"{record.build_id}{PLAN_SUFFIX}", ignore_errors=True)
            shutil.rmtree(out / CLAIMS_DIR / record.build_id, ignore_errors=True)
        return merged if self.collective else record


def refuse_live_ranks(out: Path, build_id: str, me: str | None, other_world: int | None = None) -> None:
    """Raise if a rank of build ``build_id`` other than ``me`` still runs (its writer is live), of
    any number of ranks (only of a number other than ``other_world`` when given): a resume or a
    launch with another world size replaces the parts, counts and plan that rank still uses (its
    records would be counted twice and the build never complete)."""
    parts = out / BUILDS_DIR / f"{build_id}{RANK_PARTS_SUFFIX}"
    for p in sorted(parts.glob("w*-r*.json")):
        if other_world is not None and p.name.startswith(f"w{other_world}-"):
            continue
        try:
            part = BuildRecord.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # a damaged part names no writer we could wait for; _attempt reports it
        live = [w for w in part.writers if w != me and writer_is_live(out, w)]
        if live:
            raise StoreError(
                f"rank {part.rank} of {part.world_size} of build {build_id} is still running (writer {live[0]}): "
                "wait for every rank to finish (or stop them), then relaunch with --resume"
            )


class _IndexWatch:
    """Which of some keys the store holds, polled: each poll reads only the index segments that
    appeared since the last (a compaction's result is a new segment, read once too)."""

    def __init__(self, out: Path, keys: list[bytes]):
        self.folder = out / INDEX_DIR
        self.keys = keys
        self.seen = self._names()
        index = StoreIndex.open(out)  # everything there now, once
        self.found = {k for k, held in zip(keys, index.contains(keys)) if held}

    def _names(self) -> set[str]:
        return {n for n in os.listdir(self.folder) if n.endswith(".safetensors")} if self.folder.is_dir() else set()

    def held(self, rows: range | None = None) -> list[bool]:
        """For each key (of ``rows``, or all), whether the store holds it now."""
        for name in sorted(self._names() - self.seen):
            try:
                segment = StoreIndex([Segment(self.folder / name)], self.folder.parent)
            except FileNotFoundError:
                continue  # merged away by a compaction: its result is a new segment
            self.seen.add(name)
            wanted = [k for k in self.keys if k not in self.found]
            self.found.update(k for k, held in zip(wanted, segment.contains(wanted)) if held)
        return [self.keys[i] in self.found for i in (range(len(self.keys)) if rows is None else rows)]


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


def _open_store(out: Path, tries: int = 20) -> PrefixStore:
    """The store, reopened while other ranks may be compacting their segments at the end of their
    build: a listing that keeps changing under the index is tried again a little later."""
    for attempt in range(tries):
        try:
            return PrefixStore.open(out)
        except CorruptStoreError:
            if attempt == tries - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _options_id(cfg: BuildConfig) -> str:
    options = {k: v for k, v in cfg.options().items() if k not in _RUN_OPTIONS}
    # The dataset's content too: saved count shares of a dataset that grew since would be reused.
    options["dataset_fingerprint"] = dataset_fingerprint(cfg.dataset)
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    return f"dist-{digest}"


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
    with os.fdopen(fd, "wb") as f:
        f.write(line)
    return True
