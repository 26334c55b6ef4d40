"""``prefixgen prune``: keep the most valuable blocks of a store and drop the rest.

A block's value is the number of records that contained it (``counts/``, summed over builds);
``prefixgen.analysis.count.select_blocks`` ranks them (more records first, then shallower, then
key64) and the kept set is prefix-closed. The survivors are copied byte for byte into new shards
with one compacted index segment, then the old files are removed.

Crash safety, step by step (the store is valid after each):
1. compact the old index into one segment (see compact.py);
2. write the new shards (readers ignore shards without an index entry);
3. write the new segment: the index now holds the old and the new blocks (the old store, with copies);
4. remove the old segment, one unlink: the index is now exactly the new store;
5. remove the old shards that the new index does not use (leftovers are harmless notes in verify).
It holds a writer lock (its new shards and temporary files carry its id, so gc keeps them) and
refuses to start beside any other live writer but gc; builds and compactions refuse while it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prefixgen.analysis.count import max_blocks, select_blocks
from prefixgen.config import BuildConfig
from prefixgen.errors import ConfigError, CorruptStoreError, StoreError
from prefixgen.format import (
    INDEX_DIR,
    SHARDS_DIR,
    Manifest,
    Segment,
    ShardRef,
    atomic_write,
    encode_segment,
    encode_shard,
    fsync_dir,
    read_safetensors_header,
    read_shard_blocks,
    shard_name,
)
from prefixgen.maintain.compact import COMPACTED_PREFIX, compact_store, ensure_format_version
from prefixgen.store.reader import PrefixStore
from prefixgen.store.writer import live_writers, lock_role, maintenance_lock, new_id


@dataclass(slots=True)
class PruneReport:
    """What a prune kept and removed."""

    blocks_before: int = 0
    blocks_kept: int = 0
    bytes_before: int = 0  # shard bytes
    bytes_after: int = 0
    shards_written: int = 0
    shards_removed: int = 0
    notes: list[str] = field(default_factory=list)  # what was left for later, and why


def block_cost(manifest: Manifest) -> int:
    """Bytes one kept block costs against ``--max-bytes``: its KV (fp8 scales included), as in
    ``build --max-bytes`` and ``analyze`` (tokens and index rows, 4 and 84 bytes a block, are not counted)."""
    return manifest.kv.block_bytes(manifest.block_size)


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
    manifest = ensure_format_version(path, fsync, owner=owner)
    compact_store(path, progress=progress, fsync=fsync, owner=owner)  # step 1: the whole old index in one segment
    names = [n for n in os.listdir(path / INDEX_DIR) if n.endswith(".safetensors")]
    report = PruneReport()
    if not names:
        return report
    if len(names) != 1:
        raise StoreError(f"{path}: index segments appeared while pruning; stop every build on this store and retry")
    old_path = path / INDEX_DIR / names[0]
    old = Segment(old_path)
    cols = old.cols
    ids = old.shard_ids(cols)
    records = record_counts(store, cols["key64"])
    if not records.any():
        raise StoreError(f"{path} has no record counts (counts/ is empty): nothing to rank blocks by")
    keep = select_blocks(records, cols["depth"], min_records=min_records or 1, max_blocks=max_blocks, tiebreak=cols["key64"])
    report.blocks_before, report.blocks_kept = old.n, len(keep)
    report.bytes_before = sum(max(r.bytes, 0) for r in old.shards)
    # Step 2: copy the survivors in their old shard and slot order, so chains stay contiguous.
    keep = keep[np.lexsort((cols["slot"][keep], ids[keep]))]
    refs, new_cols = _write_survivors(path, manifest, old, cols, keep, shard_bytes, report, progress, fsync, owner)
    # Step 3, then 4: the new segment goes in before the old one goes out. Last look first: a writer
    # that started (or segments that appeared) since would lose blocks; our new shards then go.
    try:
        _refuse_writers(path, owner)
        if sorted(n for n in os.listdir(path / INDEX_DIR) if n.endswith(".safetensors")) != [old_path.name]:
            raise StoreError(f"{path}: index segments appeared while pruning; stop every build on this store and retry")
    except StoreError:
        for ref in refs:
            (path / SHARDS_DIR / ref.name).unlink(missing_ok=True)
        raise
    name = f"{COMPACTED_PREFIX}{new_id()}.safetensors"
    meta = {"format_version": str(manifest.format_version), "blocks": str(len(keep)), "pruned_from": str(old.n)}
    atomic_write(path / INDEX_DIR / name, encode_segment(new_cols, meta, refs), fsync, owner=owner)
    old_path.unlink()
    if fsync:
        fsync_dir(path / INDEX_DIR)
    # Step 5. The old shards are unreferenced now; a writer that started anyway (seen late) may still
    # read them as parents: leave them to `prefixgen gc`, which removes them once it has ended.
    try:
        _refuse_writers(path, owner)
    except StoreError as exc:
        report.notes.append(f"old shards kept for now ({exc}); run `prefixgen gc` once it has finished")
        return report
    used = {r.name for r in refs}
    for ref in old.shards:
        if ref.name not in used:
            (path / SHARDS_DIR / ref.name).unlink(missing_ok=True)
            report.shards_removed += 1
    if fsync:
        fsync_dir(path / SHARDS_DIR)
    return report


def record_counts(store: PrefixStore, key64: np.ndarray) -> np.ndarray:
    """[n] records containing each index row's block, summed over builds (0 if never counted)."""
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


def _write_survivors(
    path: Path,
    manifest: Manifest,
    old: Segment,
    cols: dict[str, np.ndarray],
    keep: np.ndarray,
    shard_bytes: int,
    report: PruneReport,
    progress: bool,
    fsync: bool,
    writer: str,
) -> tuple[list[ShardRef], dict[str, np.ndarray]]:
    """Copy the kept rows' blocks (stored bytes, fp8 scales, tokens) into new shards of at most
    ``shard_bytes``, named for ``writer`` (the prune's lock); returns their refs and the new index columns."""
    layout, bs = manifest.kv, manifest.block_size
    block_bytes, scale_bytes = layout.bytes_per_token * bs, layout.scale_bytes_per_block()
    capacity = max(1, shard_bytes // (block_bytes + scale_bytes))
    ids = old.shard_ids(cols)
    refs: list[ShardRef] = []
    new_slot = np.zeros(len(keep), np.uint32)
    new_shard = np.zeros(len(keep), np.uint32)
    new_crc = np.zeros(len(keep), np.uint32)
    kv_buf, scale_buf, tok_buf = bytearray(), bytearray(), []
    filled = 0  # rows of `keep` already in written shards

    def flush(upto: int) -> None:
        nonlocal kv_buf, scale_buf, tok_buf, filled
        n = upto - filled
        if n == 0:
            return
        name = shard_name(writer, len(refs))
        meta = {"format_version": str(manifest.format_version), "writer": writer, "build": "prune"}
        scales = scale_buf if scale_bytes else None
        # The store's own block checksum: the copies must match the index rows they replace.
        parts, crcs, checksum = encode_shard(layout, bs, kv_buf, scales, np.stack(tok_buf), meta, manifest.block_checksum)
        rows = keep[filled:upto]
        if np.any(crcs != cols["crc"][rows]):
            raise CorruptStoreError(f"{path}: a kept block fails its CRC while being copied; run `prefixgen verify`")
        size = atomic_write(path / SHARDS_DIR / name, parts, fsync, owner=writer)
        new_shard[filled:upto], new_slot[filled:upto], new_crc[filled:upto] = len(refs), np.arange(n), crcs
        refs.append(ShardRef(name, n, size, checksum, writer, "prune"))
        report.bytes_after += size
        report.shards_written += 1
        kv_buf, scale_buf, tok_buf, filled = bytearray(), bytearray(), [], upto

    # One old shard at a time (`keep` is sorted by (old shard, slot)), reading only the kept blocks:
    # one read per run of consecutive kept slots, never the whole shard (pruning 100 TB to 1 TB reads 1 TB).
    slots = cols["slot"][keep].astype(np.int64)
    bounds = np.flatnonzero(np.r_[True, ids[keep][1:] != ids[keep][:-1], True]) if len(keep) else np.array([0])
    for a, b in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="prune", unit="shard", disable=not progress):
        ref = old.shards[int(ids[keep[a]])]
        shard = path / SHARDS_DIR / ref.name
        with open(shard, "rb", buffering=0) as f:
            header = read_safetensors_header(f, ref.name)
            runs = np.flatnonzero(np.r_[True, slots[a + 1 : b] != slots[a : b - 1] + 1, True]) + a
            for r0, r1 in zip(runs[:-1].tolist(), runs[1:].tolist()):
                first, m = int(slots[r0]), r1 - r0
                kv, scales = bytearray(m * block_bytes), bytearray(m * scale_bytes) if scale_bytes else None
                ok = read_shard_blocks(f.fileno(), header, layout, bs, first, kv, scales)
                tokens = os.pread(f.fileno(), m * bs * 4, header.offset("tokens") + first * bs * 4)
                if not ok or len(tokens) != m * bs * 4:
                    raise CorruptStoreError(f"{shard} is truncated: a kept block is missing; run `prefixgen verify`")
                for j in range(m):
                    kv_buf += memoryview(kv)[j * block_bytes : (j + 1) * block_bytes]
                    if scale_bytes:
                        scale_buf += memoryview(scales)[j * scale_bytes : (j + 1) * scale_bytes]
                    tok_buf.append(np.frombuffer(tokens, dtype="<u4", count=bs, offset=j * bs * 4))
                    if r0 + j + 1 - filled == capacity:
                        flush(r0 + j + 1)
    flush(len(keep))
    new_cols = {
        "key": cols["key"][keep],
        "parent": cols["parent"][keep],
        "slot": new_slot,
        "depth": cols["depth"][keep],
        "crc": new_crc,
        "shard": new_shard,
    }
    return refs, new_cols
