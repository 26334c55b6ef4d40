"""``prefixgen compact``: merge index segments into one large sorted segment (an LSM-style merge).

A build writes one small segment per shard; a store of 10 million blocks in 256 MiB shards of an
8B model has ~78,000 of them. Compaction merges committed segments into one segment whose rows
name their shard (FORMAT.md, "Compacted segments"), dropping rows that two writers both wrote.

Crash and concurrency safety: the merged segment is written under a temporary name, fsynced and
renamed in before any merged segment is removed, so a reader (or a crash) at any moment sees every
block at least once. Only committed segments are merged and exactly those are removed: a live
writer's later segments, and segments that vanish while being read (merged by a concurrent
compaction, whose output holds their rows), are left alone. Shards are never touched.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prefixgen.format import (
    COMPACTED_FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST_FILE,
    SEGMENT_COLUMNS,
    Manifest,
    Segment,
    ShardRef,
    atomic_write,
    encode_segment,
    fsync_dir,
)
from prefixgen.store.writer import new_id

COMPACTED_PREFIX = "compacted-"


@dataclass(slots=True)
class CompactReport:
    """What a compaction did."""

    segments_merged: int = 0
    rows_in: int = 0
    rows_out: int = 0  # rows_in minus duplicate rows (a block two writers both wrote)
    segment: str = ""  # the new segment's file name ("" if nothing was merged)


def compact_store(
    path: str | os.PathLike, select: Callable[[str], bool] | None = None, progress: bool = False, fsync: bool = True
) -> CompactReport:
    """Merge the committed index segments of the store at ``path`` (those whose file name
    ``select`` accepts; all by default) into one. Fewer than two segments: nothing to do.

    Example:
        >>> compact_store("store").segments_merged  # doctest: +SKIP
        78125
        >>> compact_store("store", select=lambda name: name.startswith(writer_id + "-"))  # doctest: +SKIP
    """
    path = Path(path)
    folder = path / INDEX_DIR
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and (select is None or select(n)))
    report = CompactReport()
    if len(names) < 2:
        return report
    manifest = ensure_format_version(path, fsync)
    merged: list[Path] = []
    parts: list[dict[str, np.ndarray]] = []
    shards: dict[str, int] = {}
    refs: list[ShardRef] = []
    for name in tqdm(names, desc="compact", unit="seg", disable=not progress):
        try:
            seg = Segment(folder / name)
            cols = {k: np.array(v) for k, v in seg.cols.items()}  # own the data: the file goes away
        except FileNotFoundError:
            continue  # merged by a concurrent compaction: its rows are in that one's output
        ids = []
        for ref in seg.shards:
            if ref.name not in shards:
                shards[ref.name] = len(refs)
                refs.append(ref)
            ids.append(shards[ref.name])
        cols["shard"] = np.asarray(ids, dtype=np.uint32)[seg.shard_ids(cols)]
        parts.append(cols)
        merged.append(folder / name)
    if len(merged) < 2:
        return report
    cols = {name: np.concatenate([p[name] for p in parts]) for name in SEGMENT_COLUMNS}
    report.rows_in = len(cols["key64"])
    keep = _unique_rows(cols["key64"], cols["key"])
    cols = {name: c[keep] for name, c in cols.items() if name != "key64"}
    report.rows_out = int(len(keep))
    out = f"{COMPACTED_PREFIX}{new_id()}.safetensors"
    meta = {"format_version": str(manifest.format_version), "blocks": str(report.rows_out), "compacted_from": str(len(merged))}
    atomic_write(folder / out, encode_segment(cols, meta, refs), fsync)
    # Only now, with the merged segment durable, remove what it replaces.
    for p in merged:
        p.unlink(missing_ok=True)
    if fsync:
        fsync_dir(folder)
    report.segments_merged, report.segment = len(merged), out
    return report


def ensure_format_version(path: Path, fsync: bool = True) -> Manifest:
    """Mark a version-1 store as version 2 before it gets a compacted segment, so an older
    prefixgen refuses it instead of misreading the segment's rows; returns the store's manifest.
    (Not version 3: that is a store whose blocks have CRC32C checksums, which its blocks have not.)"""
    mpath = path / MANIFEST_FILE
    manifest = Manifest.from_json(mpath.read_text(), mpath)
    if manifest.format_version < COMPACTED_FORMAT_VERSION:
        manifest = dataclasses.replace(manifest, format_version=COMPACTED_FORMAT_VERSION)
        atomic_write(mpath, [manifest.to_json().encode()], fsync)
    return manifest


def _unique_rows(key64: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Indices of one row per distinct key, sorted by key64 (rows [n], keys [n, 32] uint8)."""
    order = np.argsort(key64, kind="stable")
    k = key[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (key64[order][1:] == key64[order][:-1]) & (k[1:] == k[:-1]).all(axis=1)
    return order[~same]
