"""``prefixgen gc``: remove what dead writers left behind, never touching a live writer's files.

Leftovers of a writer that was killed (or ran out of disk): temporary files (``*.tmp``), shards
whose index segment was never committed, and its lock file. A writer is live while a process holds
its lock (:func:`prefixgen.store.writer.writer_is_live`); everything of a live writer is kept.

Each removal is one ``unlink`` of a file no reader uses, so a gc killed at any point leaves a
store that verifies and answers the same.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefixgen.errors import CorruptStoreError, StoreError
from prefixgen.format import SHARDS_DIR
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import read_manifest
from prefixgen.store.writer import ID_PATTERN, live_writers, maintenance_lock, remove_temp_files, writer_is_live


@dataclass(slots=True)
class GcReport:
    """What ``gc`` removed (or would remove, with ``dry_run``), and what it kept and why."""

    removed: list[str] = field(default_factory=list)  # paths relative to the store
    bytes_freed: int = 0
    live_writers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def collect_garbage(path: str | os.PathLike, dry_run: bool = False) -> GcReport:
    """Remove the leftovers of dead writers in the store at ``path``.

    Example:
        >>> report = collect_garbage("store")  # doctest: +SKIP
        >>> report.removed  # doctest: +SKIP
        ['shards/20261127T093251-4242-abcdef-000007.safetensors']
    """
    path = Path(path)
    # A store, of a format this version knows. Only its manifest: the index is read once, below, and
    # opening all of it here would race a prune's or compaction's unlinks for nothing.
    read_manifest(path)
    with maintenance_lock(path, "gc") as me:  # like every process that changes the store
        return _collect(path, me, dry_run)


def _collect(path: Path, me: str, dry_run: bool) -> GcReport:
    report = GcReport(live_writers=[w for w in live_writers(path) if w != me])
    # Whose shards are they? Decide liveness before reading the index: a writer found dead commits
    # nothing more, so a shard of it that no segment names now will never be named.
    shards = sorted(p for p in (path / SHARDS_DIR).glob("*.safetensors"))
    owners = {name: m.group(0) for name, m in ((p.name, ID_PATTERN.match(p.name)) for p in shards) if m}
    dead = {o for o in set(owners.values()) if not writer_is_live(path, o)}
    referenced = _referenced_shards(path)
    orphans = []
    if referenced is None:
        report.notes.append("the index could not be read, so no shard was removed: run `prefixgen verify`")
    else:
        orphans = [p for p in shards if owners.get(p.name) in dead and p.name not in referenced]
    sizes = {p: _size(p) for p in remove_temp_files(path, dry_run=True) + orphans}
    removed = remove_temp_files(path, dry_run=dry_run)  # checks liveness again, file by file
    for p in orphans:
        try:
            if not dry_run:
                p.unlink(missing_ok=True)
            removed.append(p)
        except OSError as exc:
            report.notes.append(f"could not remove {p}: {exc}")
    report.removed = [str(p.relative_to(path)) for p in removed]
    report.bytes_freed = sum(sizes.get(p, 0) for p in removed)
    return report


def _referenced_shards(path: Path, tries: int = 3) -> set[str] | None:
    """Names of every shard an index segment names, or None if the index cannot be read (a
    compaction may remove a segment while we read: then read again)."""
    for attempt in range(tries):
        try:
            index = StoreIndex.open(path)
            names: set[str] = set()
            for seg in index.segments:
                names.update(r.name for r in seg.shards)  # one for a build's segment, many for a compacted one
            return names
        except (CorruptStoreError, StoreError, OSError):
            time.sleep(0.1 * (attempt + 1))
    return None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0
