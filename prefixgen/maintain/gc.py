"""``prefixgen gc``: remove what dead writers left behind, never touching a live writer's files.

Leftovers of a writer that was killed (or ran out of disk): temporary files (``*.tmp``), shards
whose index segment was never committed, and its lock file. A writer is live while a process holds
its lock (:func:`prefixgen.store.writer.writer_is_live`); everything of a live writer is kept.

Leftovers of distributed builds no rank can use any more: the plan folder ``builds/<id>.plan/``
and the claims ``claims/<id>/`` of a build none of whose writers is live and which is complete,
has no record, or whose every rank part is dead (failed, interrupted, or "running" with its writer
gone: killed; a resume counts and plans again), and a plan run ``w<M>`` of another number of ranks
than the build's parts (superseded by a resume on another number of ranks). A build with a
complete rank part and a missing or dead one keeps its plan: the ranks still to run need the plan
the others built by.

Recurrent states (``states/<key>.safetensors``, hybrid models) of blocks the index does not hold:
those of a build killed before its shard was committed, or of blocks a prune dropped. No reader
looks them up (a state is read only for a block the index holds), but a build that starts may reuse
one (a state is written once per key), so :func:`remove_orphan_states` takes only files older than
its own start, only while no writer but a gc is live, and moves each out of the way
(``states/.gc-<gc id>-<name>``) before it looks at the writers and the index once more: a file a
writer may have seen, or whose block came into the index meanwhile, is moved back.

Each removal is one ``unlink`` of a file no reader uses, or the ``rename`` of a plan or claims
folder out of the way (to ``.gc-<gc id>-<name>``) before it is deleted, so a gc killed at any
point leaves a store that verifies and answers the same, and no half-deleted plan.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefixgen.errors import CorruptStoreError, StoreError
from prefixgen.format import BUILDS_DIR, CLAIMS_DIR, INDEX_DIR, LOCKS_DIR, PLAN_SUFFIX, SHARDS_DIR, BuildRecord, Segment
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import read_builds, read_manifest
from prefixgen.store.states import STATE_SUFFIX, STATES_DIR
from prefixgen.store.writer import (
    ID_PATTERN,
    live_writers,
    lock_role,
    maintenance_lock,
    record_rooms,
    remove_temp_files,
    writer_is_live,
)


@dataclass(slots=True)
class GcReport:
    """What ``gc`` removed (or would remove, with ``dry_run``), and what it kept and why."""

    removed: list[str] = field(default_factory=list)  # paths relative to the store
    plans: list[str] = field(default_factory=list)  # folders of dead distributed builds (plans, claims), also in removed
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
    _remove_plans(path, me, dry_run, report)
    states, freed, notes = remove_orphan_states(path, me, dry_run)
    report.removed += states
    report.bytes_freed += freed
    report.notes += notes
    return report


def remove_orphan_states(path: Path, me: str, dry_run: bool = False) -> tuple[list[str], int, list[str]]:
    """Remove the recurrent states whose block the index does not hold (see the module docstring), as
    maintenance job ``me`` (its lock held): (paths removed, relative to the store; bytes freed; notes).
    Also finishes the work of a gc or prune killed while doing this (its ``.gc-`` files in ``states/``).

    Example:
        >>> with maintenance_lock(Path("store"), "gc") as me:  # doctest: +SKIP
        ...     remove_orphan_states(Path("store"), me)
        (['states/0a1b...safetensors'], 4096, [])
    """
    folder = path / STATES_DIR
    if not folder.is_dir():
        return [], 0, []
    others = [o for o in live_writers(path) if o != me and lock_role(path, o) != "gc"]
    if others:
        return [], 0, [f"recurrent states without a block were kept: {lock_role(path, others[0])} {others[0]} is running"]
    started = (path / LOCKS_DIR / f"{me}.lock").stat().st_mtime  # the file system's clock when this job began
    index = StoreIndex.open(path)
    names = sorted(os.listdir(folder))
    trash = [n for n in names if n.startswith(".gc-") and _is_state(n[-(64 + len(STATE_SUFFIX)) :]) and _dead_trash(path, n)]
    found = [n for n in names if _is_state(n)]
    found = [n for n, held in zip(found, index.contains([_state_key(n) for n in found])) if not held]
    found = [n for n in found if _mtime(folder / n) < started]
    sizes = {n: _size(folder / n) for n in found}
    if dry_run:
        return [f"{STATES_DIR}/{n}" for n in found], sum(sizes.values()), []
    moved = dict(_trash_name(n) for n in trash)  # a killed job's: back under their names or removed, as below
    for n in found:
        # The index once more right before each move: a block stored since the first look keeps its state. This
        # narrows, not closes, the window in which a gc killed after a move leaves a stored block without its
        # state (a build that kept the file commits its block between the move and the look below; README).
        if index.changed():
            index = index.reopened()
        if index.contains([_state_key(n)])[0]:
            del sizes[n]
            continue
        aside = f".gc-{me}-{n}"
        with contextlib.suppress(FileNotFoundError):  # another gc took it first
            os.rename(folder / n, folder / aside)
            moved[aside] = n
    # Out of every writer's sight now. A writer that started before they moved may have found one (it
    # would have kept it rather than write its own), and a block may have come into the index: put those back.
    live = [o for o in live_writers(path) if o != me and lock_role(path, o) != "gc"]
    index = StoreIndex.open(path)
    back = index.contains([_state_key(n) for n in moved.values()])
    removed, notes = [], []
    for (aside, n), held in zip(moved.items(), back):
        try:
            if live or held:
                if not (folder / n).exists():
                    os.rename(folder / aside, folder / n)
                    continue
            (folder / aside).unlink(missing_ok=True)
            if not (live or held) and n in sizes:
                removed.append(f"{STATES_DIR}/{n}")
        except OSError as exc:
            notes.append(f"could not remove {folder / aside}: {exc}")
    if live:
        notes.append(f"recurrent states without a block were kept: {lock_role(path, live[0])} {live[0]} started")
    return removed, sum(sizes[n[len(STATES_DIR) + 1 :]] for n in removed), notes


def _is_state(name: str) -> bool:
    """Whether ``name`` is a state file's (the hex of a 32-byte key), not a temporary file or a gc's."""
    stem = name[: -len(STATE_SUFFIX)]
    return name.endswith(STATE_SUFFIX) and len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)


def _state_key(name: str) -> bytes:
    return bytes.fromhex(name[: -len(STATE_SUFFIX)])


def _trash_name(name: str) -> tuple[str, str]:
    """(``.gc-<owner>-<state file>``, ``<state file>``)."""
    return name, name[-(64 + len(STATE_SUFFIX)) :]


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return float("inf")  # gone: nothing to remove


def _remove_plans(path: Path, me: str, dry_run: bool, report: GcReport) -> None:
    """Remove the plan and claims folders of distributed builds no rank can use any more, and the
    folders an earlier gc was killed while deleting."""
    try:
        folders = abandoned_plans(path)
    except (CorruptStoreError, StoreError, OSError) as exc:
        report.notes.append(f"the build records could not be read, so no plan folder was removed: {exc}")
        return
    for folder in folders:
        size = sum(_size(p) for p in folder.rglob("*") if p.is_file())
        try:
            if not dry_run:
                trash = folder.with_name(f".gc-{me}-{folder.name}")
                folder.rename(trash)  # out of every rank's way at once: no rank reads half a plan
                shutil.rmtree(trash)
        except OSError as exc:
            report.notes.append(f"could not remove {folder}: {exc}")
            continue
        name = str(folder.relative_to(path)) + "/"
        report.removed.append(name)
        report.plans.append(name)
        report.bytes_freed += size


def abandoned_plans(path: Path) -> list[Path]:
    """The plan folders (``builds/<id>.plan/`` or one superseded run ``builds/<id>.plan/w<M>/``),
    claims folders (``claims/<id>/``) and trash of killed gcs (``.gc-<owner>-*``) that no live
    process uses or will use: see the module docstring for the rules.

    Example:
        >>> [p.name for p in abandoned_plans(Path("store"))]  # doctest: +SKIP
        ['dist-3f2a9c0d1e2b4a5f.plan', 'dist-3f2a9c0d1e2b4a5f']
    """
    plans = {p.name[: -len(PLAN_SUFFIX)]: p for p in _dirs(path / BUILDS_DIR) if p.name.endswith(PLAN_SUFFIX)}
    claims = {p.name: p for p in _dirs(path / CLAIMS_DIR)}
    found = [p for sub in (BUILDS_DIR, CLAIMS_DIR) for p in _dirs(path / sub, trash=True) if _dead_trash(path, p.name)]
    builds = {b.build_id: b for b in read_builds(path)}
    for build_id in sorted(plans.keys() | claims.keys()):
        build = builds.get(build_id)
        writers = (build.writers if build is not None else []) + list(record_rooms(path, build_id))
        if any(writer_is_live(path, w) for w in writers):
            continue  # a live build's (a writer that holds its lock but wrote no record yet keeps a room of the build's)
        if _abandoned(build):
            found += [p for p in (plans.get(build_id), claims.get(build_id)) if p is not None]
        elif build_id in plans and build.ranks:  # runs of another number of ranks: superseded
            found += [p for p in _dirs(plans[build_id]) if p.name.startswith("w") and p.name != f"w{build.world_size}"]
    return found


def _abandoned(build: BuildRecord | None) -> bool:
    """Whether a distributed build none of whose writers is live can never use its plan again."""
    if build is None or build.status == "complete":
        return True
    statuses = [r["status"] for r in build.ranks]
    # Every part failed, was interrupted or killed ("running", its writer dead): a resume plans anew.
    # A complete part means the ranks still to run must build by its plan.
    return bool(statuses) and "complete" not in statuses


def _dead_trash(path: Path, name: str) -> bool:
    match = ID_PATTERN.match(name[len(".gc-") :])
    return match is not None and not writer_is_live(path, match.group(0))


def _dirs(folder: Path, trash: bool = False) -> list[Path]:
    """The folders in ``folder``: gc's trash (``.gc-*``) only, or everything else."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(".gc-") == trash)


def _referenced_shards(path: Path, tries: int = 3) -> set[str] | None:
    """Names of every shard an index segment names, or None if the index cannot be read. Segments
    are opened one at a time and only their shard lists kept (memory grows with the shards, not the
    rows); one that vanishes while we read (merged by a compaction, whose result is in the folder
    then) sends us back to list the folder again for names we have not read."""
    folder = path / INDEX_DIR
    for attempt in range(tries):
        try:
            names: set[str] = set()
            seen: set[str] = set()
            while todo := [
                n for n in (sorted(os.listdir(folder)) if folder.is_dir() else []) if n.endswith(".safetensors") and n not in seen
            ]:
                for name in todo:
                    seen.add(name)
                    try:
                        seg = Segment(folder / name)
                    except FileNotFoundError:
                        continue
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
