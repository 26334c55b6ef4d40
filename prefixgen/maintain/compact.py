"""``prefixgen compact``: merge index segments into one large sorted segment (an LSM-style merge).

A build writes one small segment per shard; a store of 10 million blocks in 256 MiB shards of an
8B model has ~78,000 of them. Compaction merges committed segments into one segment whose rows
name their shard (FORMAT.md, "Compacted segments"), dropping rows that two writers both wrote.

The merge itself (``prefixgen.maintain.merge``) is an external merge sort: its memory grows with the
shards, not with the rows.

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

from prefixgen.errors import StoreError
from prefixgen.format import (
    COMPACTED_FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST_FILE,
    Manifest,
    atomic_write,
    fsync_dir,
)
from prefixgen.maintain.merge import MergedSegment
from prefixgen.store.writer import maintenance_lock, new_id, remove_temp_files

COMPACTED_PREFIX = "compacted-"
# Free space a compaction needs, in multiples of the segments it merges: the sorted runs spilled to
# temporary files (1x, plus merges of merges at very large sizes), the deduplicated result (up to 1x)
# and the new segment (up to 1x), all before the merged segments are removed.
SPACE_FACTOR = 3.0


@dataclass(slots=True)
class CompactReport:
    """What a compaction did."""

    segments_merged: int = 0
    rows_in: int = 0
    rows_out: int = 0  # rows_in minus duplicate rows (a block two writers both wrote)
    segment: str = ""  # the new segment's file name ("" if nothing was merged)


def compact_store(
    path: str | os.PathLike,
    select: Callable[[str], bool] | None = None,
    progress: bool = False,
    fsync: bool = True,
    owner: str | None = None,
) -> CompactReport:
    """Merge the committed index segments of the store at ``path`` (those whose file name
    ``select`` accepts; all by default) into one. Fewer than two segments: nothing to do.

    It runs under a writer lock of its own (refused while a prune runs), or under ``owner``'s, a
    lock the caller holds (prune). The merged segment is made durable (fsync of the file and the
    folder) before the segments it replaces are unlinked, whatever ``fsync`` says: ``fsync=False``
    only skips the final fsync of the unlinks, so a power loss can bring back merged segments
    (harmless duplicates), never lose the merged one.

    Example:
        >>> compact_store("store").segments_merged  # doctest: +SKIP
        78125
        >>> compact_store("store", select=lambda name: name.startswith(writer_id + "-"))  # doctest: +SKIP
    """
    path = Path(path)
    if owner is None:
        with maintenance_lock(path, "compact") as owner:
            return compact_store(path, select, progress, fsync, owner)
    folder = path / INDEX_DIR
    # A compaction killed mid-write left its partial segment: its writer is dead, so it goes.
    remove_temp_files(path, dirs=(INDEX_DIR,), locks=False)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and (select is None or select(n)))
    report = CompactReport()
    if len(names) < 2:
        return report
    check_free_space(folder, names)
    manifest = ensure_format_version(path, owner=owner)
    with MergedSegment([folder / name for name in names], progress) as merge:
        merged = merge.merged
        if len(merged) < 2:
            return report
        report.rows_in, report.rows_out = merge.rows_in, merge.rows_out
        out = f"{COMPACTED_PREFIX}{new_id()}.safetensors"
        meta = {
            "format_version": str(manifest.format_version),
            "blocks": str(report.rows_out),
            "compacted_from": str(len(merged)),
        }
        atomic_write(folder / out, merge.encode(meta), fsync=True, owner=owner)
    # Only now, with the merged segment durable (even under --no-fsync), remove what it replaces.
    for p in merged:
        p.unlink(missing_ok=True)
    if fsync:
        fsync_dir(folder)
    report.segments_merged, report.segment = len(merged), out
    return report


def check_free_space(folder: Path, names: list[str], factor: float | None = None) -> None:
    """Refuse to start a compaction of ``names`` (segments in ``folder``) that the disk cannot hold:
    the merge's spill files and the new segment take about ``factor`` times the segments' bytes
    before any of them is removed. Better one clear message now than a full disk half-way through
    (which fails every build writing beside it too)."""
    factor = SPACE_FACTOR if factor is None else factor
    size = 0
    for name in names:
        try:
            size += (folder / name).stat().st_size
        except FileNotFoundError:
            continue  # merged away by another compaction
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < factor * size:
        raise StoreError(
            f"compacting {len(names):,} index segments ({size / 1e6:,.1f} MB) needs about {factor * size / 1e6:,.1f} MB "
            f"free on the disk holding {folder}, which has {free / 1e6:,.1f} MB: free some space, then run "
            f"`prefixgen compact {folder.parent}` (the store is valid uncompacted)"
        )


def ensure_format_version(path: Path, fsync: bool = True, owner: str | None = None) -> Manifest:
    """Mark a version-1 store as version 2 before it gets a compacted segment, so an older
    prefixgen refuses it instead of misreading the segment's rows; returns the store's manifest.
    (Not version 3: that is a store whose blocks have CRC32C checksums, which its blocks have not.)
    ``owner``: the lock holder, whose name the temporary file carries."""
    mpath = path / MANIFEST_FILE
    manifest = Manifest.from_json(mpath.read_text(), mpath)
    if manifest.format_version < COMPACTED_FORMAT_VERSION:
        manifest = dataclasses.replace(manifest, format_version=COMPACTED_FORMAT_VERSION)
        atomic_write(mpath, [manifest.to_json().encode()], fsync, owner=owner)
    return manifest
