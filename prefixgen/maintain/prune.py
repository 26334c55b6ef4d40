"""``prefixgen prune``: keep the most valuable blocks of a store and drop the rest.

A block's value is the number of records that contained it (``counts/``, summed over builds);
``prefixgen.analysis.count.select_blocks`` ranks them (more records first, then shallower, then
key64) and the kept set is prefix-closed. The survivors are copied byte for byte into new shards
with one compacted index segment, then the old files are removed.

Crash safety, step by step (the store is valid after each):
1. compact the old index into one segment (see compact.py);
2. write the new shards, each in place a piece at a time under a temporary name, renamed when whole (readers
   ignore shards without an index entry);
3. write the new segment: the index now holds the old and the new blocks (the old store, with copies);
4. remove the old segment, one unlink: the index is now exactly the new store;
5. remove the old shards that the new index does not use (leftovers are harmless notes in verify).
It holds a writer lock (its new shards and temporary files carry its id, so gc keeps them) and
refuses to start beside any other live writer but gc; builds and compactions refuse while it runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prefixgen.analysis.count import block_cost as count_block_cost
from prefixgen.analysis.count import max_blocks
from prefixgen.config import BuildConfig
from prefixgen.errors import ConfigError, CorruptStoreError, StoreError
from prefixgen.format import (
    INDEX_DIR,
    SHARDS_DIR,
    SWEEP_ROWS,
    Manifest,
    Segment,
    ShardRef,
    ShardStream,
    atomic_file,
    atomic_write,
    fsync_dir,
    read_safetensors_header,
    read_shard_blocks,
    shard_name,
)
from prefixgen.maintain.buckets import KeyBuckets
from prefixgen.maintain.compact import COMPACTED_PREFIX, compact_store, ensure_format_version
from prefixgen.maintain.gc import remove_orphan_states
from prefixgen.maintain.merge import Spill, encode_spill
from prefixgen.store.reader import PrefixStore
from prefixgen.store.writer import live_writers, lock_role, maintenance_lock, new_id

COPY_BYTES = 8 << 20  # blocks read and written at once while copying the survivors (KV, scales and tokens)


@dataclass(slots=True)
class PruneReport:
    """What a prune kept and removed."""

    blocks_before: int = 0
    blocks_kept: int = 0
    bytes_before: int = 0  # shard bytes
    bytes_after: int = 0
    shards_written: int = 0
    shards_removed: int = 0
    states_removed: int = 0  # recurrent states of dropped blocks (hybrid models)
    notes: list[str] = field(default_factory=list)  # what was left for later, and why


def block_cost(manifest: Manifest) -> int:
    """Bytes one kept block costs against ``--max-bytes``: as in ``build --max-bytes`` and ``analyze``
    (:func:`prefixgen.analysis.count.block_cost`)."""
    return count_block_cost(manifest.kv, manifest.block_size)


def prune_store(
    path: str | os.PathLike,
    max_bytes: int | None = None,
    min_records: int | None = None,
    shard_bytes: int | None = None,
    progress: bool = False,
    fsync: bool = True,
) -> PruneReport:
    """Keep the blocks ``select_blocks`` ranks first: those in at least ``min_records`` records,
    at most ``max_bytes`` of KV (:func:`block_cost`). New shards hold at most ``shard_bytes``
    (default: ``BuildConfig.shard_bytes``, as build).

    It holds a writer lock while it runs (so ``gc`` keeps its new shards and temporary files) and
    refuses to start while any other writer but a ``gc`` is live: a build could give its blocks
    parents that the prune drops, or commit segments the prune would not see; a compaction could
    merge segments the prune replaces. Builds and compactions in turn refuse while a prune runs.

    Example:
        >>> prune_store("store", max_bytes=8 << 30).blocks_kept  # doctest: +SKIP
        4096
    """
    if max_bytes is None and min_records is None:
        raise ConfigError("prune needs --max-bytes SIZE or --min-records K (or both)")
    if min_records is not None and min_records < 1:
        raise ConfigError(f"--min-records must be at least 1, got {min_records}")
    if shard_bytes is not None and shard_bytes <= 0:
        raise ConfigError(f"--shard-bytes must be positive, e.g. 256MiB, got {shard_bytes}")
    path = Path(path)
    shard_bytes = shard_bytes or BuildConfig().shard_bytes
    store = PrefixStore.open(path)
    manifest = store.manifest
    # Refuses a budget under one block, as build does.
    limit = max_blocks(BuildConfig(max_bytes=max_bytes, block_size=manifest.block_size), manifest.kv)
    with maintenance_lock(path, "prune") as owner:
        _refuse_writers(path, owner)
        return _prune(path, store, owner, limit, min_records, shard_bytes, progress, fsync)


def _refuse_writers(path: Path, owner: str) -> None:
    """Raise if a process other than a gc writes the store (checked at the start and again before
    each step that cannot be undone: on NFS a writer's lock can become visible late)."""
    others = [o for o in live_writers(path) if o != owner and lock_role(path, o) != "gc"]
    if others:
        raise StoreError(
            f"{path} is being written by {len(others)} running process(es) ({lock_role(path, others[0])} {others[0]}): "
            "prune would drop blocks they use as parents and miss what they commit; wait for them to finish, then retry"
        )


def _prune(
    path: Path,
    store: PrefixStore,
    owner: str,
    max_blocks: int | None,
    min_records: int | None,
    shard_bytes: int,
    progress: bool,
    fsync: bool,
) -> PruneReport:
    """The steps of the module docstring, under the prune's lock ``owner``."""
    manifest = ensure_format_version(path, fsync, owner=owner)
    compact_store(path, progress=progress, fsync=fsync, owner=owner)  # step 1: the whole old index in one segment
    report = PruneReport()
    old_path = _only_segment(path)
    if old_path is None:
        return report
    old = Segment(old_path)
    report.bytes_before = sum(max(r.bytes, 0) for r in old.shards)
    with _RankedRows(store, old, path / INDEX_DIR) as ranked:
        keep = ranked.selection(min_records or 1, max_blocks)
        kept, base = _kept_blocks(path, old, ranked, keep)
        report.blocks_before, report.blocks_kept = old.n, int(np.count_nonzero(kept))
        # Step 2: copy the survivors in their old shard and slot order, so chains stay contiguous.
        copy = _SurvivorShards(path, manifest, shard_bytes, report, fsync, owner)
        with copy:
            _copy_survivors(path, manifest, old, kept, base, copy, progress)
        # A kept block's place in the copy: the number of kept blocks before it in (shard, slot) order.
        place = np.cumsum(kept, dtype=np.uint32 if len(kept) < 2**32 else np.int64)  # [old blocks] 1 + place of a kept one
        del kept
        new = _new_rows(path, ranked, keep, place, base, np.concatenate(copy.crcs or [np.zeros(0, np.uint32)]), copy.capacity)
        del place
    _swap_segments(path, manifest, old_path, old.n, new, copy.refs, report, fsync, owner)  # steps 3 and 4
    _remove_old_shards(path, old, copy.refs, report, fsync, owner)  # step 5
    _remove_dropped_states(path, owner, report)
    return report


def _only_segment(path: Path) -> Path | None:
    """The one index segment a compacted store has (None if its index is empty)."""
    names = [n for n in os.listdir(path / INDEX_DIR) if n.endswith(".safetensors")]
    if len(names) > 1:
        raise StoreError(f"{path}: index segments appeared while pruning; stop every build on this store and retry")
    return path / INDEX_DIR / names[0] if names else None


def _kept_blocks(path: Path, old: Segment, ranked: _RankedRows, keep) -> tuple[np.ndarray, np.ndarray]:
    """Which blocks of each old shard survive: ([old blocks] bool by ``base[shard] + slot``, ``base`` [shards + 1],
    the first flag of each old shard); one byte per old block."""
    base = np.zeros(len(old.shards) + 1, np.int64)
    np.cumsum([max(r.blocks, 0) for r in old.shards], out=base[1:])
    kept = np.zeros(int(base[-1]), bool)
    for first, cols, records in ranked.sweep():
        m = keep(first, cols, records)
        ids = _shard_ids(cols)[m].astype(np.int64)
        slots = cols["slot"][m].astype(np.int64)
        if len(ids) and (int(ids.max()) >= len(old.shards) or bool(np.any(slots >= base[ids + 1] - base[ids]))):
            raise CorruptStoreError(f"{old.path}: a row points past its shard; run `prefixgen verify {path}`")
        kept[base[ids] + slots] = True
    return kept, base


def _new_rows(
    path: Path, ranked: _RankedRows, keep, place: np.ndarray, base: np.ndarray, crcs: np.ndarray, capacity: int
) -> Spill:
    """The new segment's rows, in the old one's (key64) order, spilled to a file in ``index/``: each kept row with
    its copy's shard and slot (``place`` [old blocks]: 1 + a kept block's place in the copy), checked against the
    copy's checksum (``crcs`` [kept blocks])."""
    new = Spill(path / INDEX_DIR, len(crcs))
    for first, cols, records in ranked.sweep():
        m = keep(first, cols, records)
        at = place[base[_shard_ids(cols)[m].astype(np.int64)] + cols["slot"][m].astype(np.int64)].astype(np.int64) - 1
        if np.any(crcs[at] != cols["crc"][m]):
            raise CorruptStoreError(f"{path}: a kept block fails its CRC while being copied; run `prefixgen verify`")
        new.append(
            {
                **{c: cols[c][m] for c in ("key64", "key", "parent", "depth", "crc")},
                **{"slot": (at % capacity).astype(np.uint32), "shard": (at // capacity).astype(np.uint32)},
            }
        )
    return new


def _swap_segments(
    path: Path,
    manifest: Manifest,
    old_path: Path,
    old_blocks: int,
    new: Spill,
    refs: list[ShardRef],
    report: PruneReport,
    fsync: bool,
    owner: str,
) -> None:
    """Steps 3, then 4: the new segment goes in before the old one goes out. Last look first: a writer that started
    (or segments that appeared) since would lose blocks; the new shards (``refs``) then go."""
    try:
        _refuse_writers(path, owner)
        if _only_segment(path) != old_path:
            raise StoreError(f"{path}: index segments appeared while pruning; stop every build on this store and retry")
    except StoreError:
        for ref in refs:
            (path / SHARDS_DIR / ref.name).unlink(missing_ok=True)
        raise
    name = f"{COMPACTED_PREFIX}{new_id()}.safetensors"
    meta = {"format_version": str(manifest.format_version), "blocks": str(report.blocks_kept), "pruned_from": str(old_blocks)}
    with new.f:
        atomic_write(path / INDEX_DIR / name, encode_spill(new, meta, refs), fsync, owner=owner)
    old_path.unlink()
    if fsync:
        fsync_dir(path / INDEX_DIR)


def _remove_old_shards(path: Path, old: Segment, refs: list[ShardRef], report: PruneReport, fsync: bool, owner: str) -> None:
    """Step 5. The old shards are unreferenced now; a writer that started anyway (seen late) may still read them as
    parents: leave them to `prefixgen gc`, which removes them once it has ended."""
    try:
        _refuse_writers(path, owner)
    except StoreError as exc:
        report.notes.append(f"old shards kept for now ({exc}); run `prefixgen gc` once it has finished")
        return
    used = {r.name for r in refs}
    for ref in old.shards:
        if ref.name not in used:
            (path / SHARDS_DIR / ref.name).unlink(missing_ok=True)
            report.shards_removed += 1
    if fsync:
        fsync_dir(path / SHARDS_DIR)


def _remove_dropped_states(path: Path, owner: str, report: PruneReport) -> None:
    """A hybrid model's store: the recurrent states of the blocks dropped go too (gc's rules)."""
    removed, _, notes = remove_orphan_states(path, owner)
    report.states_removed = len(removed)
    report.notes += notes


def record_counts(store: PrefixStore, key64: np.ndarray) -> np.ndarray:
    """[n] records containing each index row's block, summed over builds (0 if never counted). In
    memory: ``export`` ranks the rows it exports with it; prune sums a key bucket at a time
    (:class:`_RankedRows`)."""
    tables = store.count_arrays()
    if not tables:
        return np.zeros(len(key64), dtype=np.int64)
    keys = np.concatenate([k for k, _ in tables])
    counts = np.concatenate([c for _, c in tables]).astype(np.int64)
    k64 = np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1)
    uniq, inverse = np.unique(k64, return_inverse=True)
    totals = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(uniq)).astype(np.int64)
    pos = np.minimum(np.searchsorted(uniq, key64), max(len(uniq) - 1, 0))
    return np.where(uniq[pos] == key64, totals[pos], 0)


def _shard_ids(cols: dict[str, np.ndarray]) -> np.ndarray:
    """[rows] each row's index into its segment's shard list (0 in a one-shard segment)."""
    return cols["shard"] if "shard" in cols else np.zeros(len(cols["key64"]), np.uint32)


def _capacity(manifest: Manifest, shard_bytes: int) -> int:
    """Blocks a new shard of at most ``shard_bytes`` holds."""
    return max(1, shard_bytes // (manifest.kv.bytes_per_token * manifest.block_size + manifest.kv.scale_bytes_per_block()))


class _RankedRows:
    """The rows of the old segment with their record counts (``counts/``, summed over files by
    key64), a piece at a time, and the rule :func:`select_blocks` applies to all of them at once,
    found in a few passes instead. Memory grows with a piece and a key bucket, not with the store:
    the counts are summed a key bucket at a time (``KeyBuckets``, files in ``folder``) and kept there,
    sorted, for each pass to join with the segment (sorted by key64, so a bucket is read once a pass).

    Example:
        >>> with _RankedRows(store, segment, folder) as ranked:  # doctest: +SKIP
        ...     keep = ranked.selection(min_records=2, max_blocks=1000)
        ...     rows = [cols["key"][keep(a, cols, records)] for a, cols, records in ranked.sweep()]
    """

    def __init__(self, store: PrefixStore, seg: Segment, folder: Path):
        self.seg = seg
        self.totals = KeyBuckets([("k", "<u8"), ("r", "<i8")], folder)
        with KeyBuckets([("k", "<u8"), ("r", "<u8")], folder) as raw:
            piece = np.empty(0, raw.dtype)
            for keys, records in store.count_pieces(SWEEP_ROWS):
                piece = np.empty(len(keys), raw.dtype)
                piece["k"] = np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1)
                piece["r"] = records
                raw.add(piece)
            for b in range(raw.count):
                rows = raw.bucket(b)
                if not len(rows):
                    continue
                uniq, inverse = np.unique(rows["k"], return_inverse=True)
                # As record_counts summed them (float64 weights: exact below 2**53 records).
                totals = np.bincount(inverse.reshape(-1), weights=rows["r"].astype(np.int64), minlength=len(uniq))
                out = np.empty(len(uniq), self.totals.dtype)
                out["k"], out["r"] = uniq, totals.astype(np.int64)
                self.totals.add(out)

    def __enter__(self) -> _RankedRows:
        return self

    def __exit__(self, *exc) -> None:
        self.totals.close()

    def sweep(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """(first row, columns, records [rows] int64) for each piece of the segment, in order."""
        held, uniq, totals = -1, np.empty(0, np.uint64), np.empty(0, np.int64)
        for a, cols in self.seg.chunks(SWEEP_ROWS):
            k64 = cols["key64"]
            records = np.zeros(len(k64), np.int64)
            which = self.totals.number(k64)
            for b in np.unique(which).tolist():
                m = which == b
                if b != held:
                    t = self.totals.bucket(b)
                    held, uniq, totals = b, t["k"], t["r"]
                if len(uniq):
                    pos = np.minimum(np.searchsorted(uniq, k64[m]), len(uniq) - 1)
                    records[m] = np.where(uniq[pos] == k64[m], totals[pos], 0)
            yield a, cols, records

    def selection(self, min_records: int, max_blocks: int | None):
        """``keep(first, cols, records)`` -> [rows] bool: the rows ``select_blocks(records, depth,
        min_records=, max_blocks=, tiebreak=key64)`` chooses over the whole segment (ranked by records,
        more first, then depth, then key64, then row), for each piece of :meth:`sweep`. Raises if no
        row has a record count. Found from a histogram of (records, depth), then, in the group the cut
        falls in, key64 16 bits at a time (two more passes for random keys)."""
        hist = self._histogram(min_records)
        if max_blocks is None or sum(hist.values()) <= max_blocks:
            return lambda first, cols, records: self._candidates(records, min_records)
        before, ranked = 0, sorted(hist.items(), key=lambda item: (-item[0][0], item[0][1]))
        while before + ranked[0][1] < max_blocks:  # the group the cut falls in: ranked[0]
            before += ranked.pop(0)[1]
        (r_cut, d_cut), count = ranked[0]
        need = max_blocks - before  # rows to keep of the group (r_cut, d_cut), by key64 then row

        def ahead(cols: dict[str, np.ndarray], records: np.ndarray) -> np.ndarray:
            depth = cols["depth"].astype(np.int64)
            return self._candidates(records, min_records) & ((records > r_cut) | ((records == r_cut) & (depth < d_cut)))

        def group(cols: dict[str, np.ndarray], records: np.ndarray) -> np.ndarray:
            return self._candidates(records, min_records) & (records == r_cut) & (cols["depth"].astype(np.int64) == d_cut)

        bits, prefix, need, whole = self._key_cut(group, need, count)
        taken = [0]  # of the group's rows whose key64 == prefix (bits 64), those kept so far this sweep

        def keep(first: int, cols: dict[str, np.ndarray], records: np.ndarray) -> np.ndarray:
            if first == 0:
                taken[0] = 0
            mask = ahead(cols, records)
            if not need and not whole:
                return mask
            g = group(cols, records)
            if whole and bits == 0:
                return mask | g
            top = cols["key64"] >> np.uint64(64 - bits)
            mask |= g & (top < np.uint64(prefix))
            at = g & (top == np.uint64(prefix))
            if whole:
                return mask | at
            rows = np.flatnonzero(at)[: max(0, need - taken[0])]  # bits == 64: key64 ties, first rows first
            taken[0] += len(rows)
            mask[rows] = True
            return mask

        return keep

    def _histogram(self, min_records: int) -> dict[tuple[int, int], int]:
        """(records, depth) -> how many candidate rows have them, over one sweep. Raises if no row has a record
        count."""
        hist: dict[tuple[int, int], int] = {}
        counted = False
        for _, cols, records in self.sweep():
            counted |= bool(records.any())
            cand = self._candidates(records, min_records)
            pairs, n = np.unique(np.stack([records[cand], cols["depth"][cand].astype(np.int64)], 1), axis=0, return_counts=True)
            for (r, d), c in zip(pairs.tolist(), n.tolist()):
                hist[(r, d)] = hist.get((r, d), 0) + c
        if not counted:
            raise StoreError(f"{self.seg.path.parent.parent} has no record counts (counts/ is empty): nothing to rank blocks by")
        return hist

    def _key_cut(self, group, need: int, count: int) -> tuple[int, int, int, bool]:
        """Where the cut falls by key64 among the ``count`` rows ``group(cols, records)`` picks, ``need`` of which are
        kept: (bits, prefix, need, whole). Keep the rows whose top ``bits`` of key64 are below ``prefix``, and of
        those equal to it all (``whole``) or the first ``need`` (then ``bits`` is 64: key64 ties, by row). One sweep
        per 16 bits."""
        bits, prefix, whole = 0, 0, need == count
        while not whole and need and bits < 64:
            hist16 = np.zeros(1 << 16, np.int64)
            for _, cols, records in self.sweep():
                k64 = cols["key64"][group(cols, records)]
                if bits:
                    k64 = k64[(k64 >> np.uint64(64 - bits)) == np.uint64(prefix)]
                hist16 += np.bincount(((k64 >> np.uint64(48 - bits)) & np.uint64(0xFFFF)).astype(np.int64), minlength=1 << 16)
            cum = np.cumsum(hist16)
            b = int(np.searchsorted(cum, need, "left"))
            need -= int(cum[b] - hist16[b])
            prefix, bits = (prefix << 16) | b, bits + 16
            whole = need == int(hist16[b])  # every row of this bin: keep top bits <= prefix
        return bits, prefix, need, whole

    @staticmethod
    def _candidates(records: np.ndarray, min_records: int) -> np.ndarray:
        return records >= min_records if min_records > 1 else np.ones(len(records), bool)


class _SurvivorShards:
    """The new shards, filled in copy order and written in place ``COPY_BYTES`` at a time (:class:`ShardStream`):
    memory holds a piece, never a shard. Each holds ``capacity`` blocks (the last one fewer), is named for ``writer`` (the
    prune's lock, so gc keeps its temporary file) and appears whole when full (:func:`atomic_file`); leaving the
    ``with`` block on an error removes the one being written. ``refs`` and ``crcs`` (the copies' block checksums)
    grow shard by shard."""

    def __init__(self, path: Path, manifest: Manifest, shard_bytes: int, report: PruneReport, fsync: bool, writer: str):
        self.path, self.manifest, self.report, self.fsync, self.writer = path, manifest, report, fsync, writer
        self.capacity = _capacity(manifest, shard_bytes)
        self.refs: list[ShardRef] = []
        self.crcs: list[np.ndarray] = []
        self.copied = 0  # blocks added so far
        self.kv, self.scales, self.tokens = bytearray(), bytearray(), bytearray()  # added, not yet written
        self.pending = 0  # blocks in them
        self.open = ExitStack()  # the shard being written
        self.shard: ShardStream | None = None

    def __enter__(self) -> _SurvivorShards:
        return self

    def __exit__(self, *exc) -> None:
        self.open.__exit__(*exc)  # an error removes the temporary file (atomic_file)

    def room(self) -> int:
        """Blocks the shard being filled (or the next one) still takes."""
        if self.shard is None:
            return min(self.capacity, self.report.blocks_kept - self.copied)
        return self.shard.blocks - self.shard.filled - self.pending

    def add(self, kv: bytes | bytearray, scales: bytes | bytearray | None, tokens: bytes) -> None:
        """Append blocks (at most :meth:`room`): their stored KV bytes, fp8 scale bytes, token bytes. Gathered up to
        ``COPY_BYTES`` before they are written (a run of kept blocks can be one block)."""
        if self.shard is None:
            self._start()
        n = len(tokens) // (self.manifest.block_size * 4)
        self.kv += kv
        if scales is not None:
            self.scales += scales
        self.tokens += tokens
        self.pending, self.copied = self.pending + n, self.copied + n
        if not self.room() or len(self.kv) + len(self.scales) + len(self.tokens) >= COPY_BYTES:
            self.shard.write(self.kv, self.scales if self.scales else None, self.tokens)
            self.kv, self.scales, self.tokens, self.pending = bytearray(), bytearray(), bytearray(), 0
        if self.shard.filled == self.shard.blocks:
            self._finish()

    def _start(self) -> None:
        name = shard_name(self.writer, len(self.refs))
        meta = {"format_version": str(self.manifest.format_version), "writer": self.writer, "build": "prune"}
        f = self.open.enter_context(atomic_file(self.path / SHARDS_DIR / name, self.fsync, owner=self.writer))
        blocks = self.room()
        # The store's own block checksum: the copies must match the index rows they replace (checked when the new
        # segment is written).
        self.shard = ShardStream(
            f.fileno(), self.manifest.kv, self.manifest.block_size, blocks, meta, self.manifest.block_checksum
        )

    def _finish(self) -> None:
        crcs, checksum = self.shard.finish()
        self.open.close()  # fsync and rename
        name = shard_name(self.writer, len(self.refs))
        self.refs.append(ShardRef(name, self.shard.blocks, self.shard.size, checksum, self.writer, "prune"))
        self.crcs.append(crcs)
        self.report.bytes_after += self.shard.size
        self.report.shards_written += 1
        self.shard = None


def _copy_survivors(
    path: Path, manifest: Manifest, old: Segment, kept: np.ndarray, base: np.ndarray, copy: _SurvivorShards, progress: bool
) -> None:
    """Copy the kept blocks (``kept[base[shard] + slot]``; stored bytes, fp8 scales, tokens) in (old shard, slot)
    order into ``copy``: one old shard at a time, reading only the kept blocks, one read per piece of a run of
    consecutive kept slots (at most ``COPY_BYTES`` of KV, and never past a new shard's end), never the whole shard
    (pruning 100 TB to 1 TB reads 1 TB)."""
    layout, bs = manifest.kv, manifest.block_size
    block_bytes, scale_bytes = layout.bytes_per_token * bs, layout.scale_bytes_per_block()
    piece = max(1, COPY_BYTES // (block_bytes + scale_bytes + bs * 4))
    for i in tqdm(range(len(old.shards)), desc="prune", unit="shard", disable=not progress):
        slots = np.flatnonzero(kept[base[i] : base[i + 1]])
        if not len(slots):
            continue
        shard = path / SHARDS_DIR / old.shards[i].name
        with open(shard, "rb", buffering=0) as f:
            header = read_safetensors_header(f, old.shards[i].name)
            runs = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1] + 1, True])
            for r0, r1 in zip(runs[:-1].tolist(), runs[1:].tolist()):
                first, end = int(slots[r0]), int(slots[r0]) + r1 - r0
                while first < end:
                    m = min(end - first, piece, copy.room())
                    kv, scales = bytearray(m * block_bytes), bytearray(m * scale_bytes) if scale_bytes else None
                    ok = read_shard_blocks(f.fileno(), header, layout, bs, first, kv, scales)
                    tokens = os.pread(f.fileno(), m * bs * 4, header.offset("tokens") + first * bs * 4)
                    if not ok or len(tokens) != m * bs * 4:
                        raise CorruptStoreError(f"{shard} is truncated: a kept block is missing; run `prefixgen verify`")
                    copy.add(kv, scales, tokens)
                    first += m
