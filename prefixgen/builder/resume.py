"""What ``--resume`` removes of an earlier run of a build launched another way, and when it must
refuse: a rank of the build still running. One process and each rank of a distributed build both
resume through here, so a build may stop under one launch and resume under the other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefixgen.errors import StoreError
from prefixgen.format import BUILDS_DIR, CLAIMS_DIR, COUNTS_DIR, PLAN_SUFFIX, RANK_PARTS_SUFFIX, BuildRecord
from prefixgen.store.writer import record_rooms, writer_is_live


def refuse_live_ranks(out: Path, build_id: str, me: str | None, other_world: int | None = None) -> None:
    """Raise if a rank of build ``build_id`` other than ``me`` still runs (its writer is live), of
    any number of ranks (only of a number other than ``other_world`` when given; a rank passes it,
    and is then refused beside a live one-process run of the build too): a resume or a launch with
    another world size replaces the parts, counts and plan that rank still uses (its records would
    be counted twice and the build never complete). A writer counts from the moment it holds its
    lock and keeps the room for its record (``store.writer.record_rooms``), before any part of it
    exists; the caller keeps its own room before calling, so of two launches that start at once
    the one that looks second sees the other."""
    parts = out / BUILDS_DIR / f"{build_id}{RANK_PARTS_SUFFIX}"
    running: dict[str, str | None] = {}  # writer -> its rank part (None: one process)
    for p in sorted(parts.glob("w*-r*.json")):
        try:
            part = BuildRecord.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # a damaged part names no writer we could wait for; _attempt reports it
        running.update((w, p.stem) for w in part.writers)
    for w, part in record_rooms(out, build_id).items():
        if part or other_world is not None:
            running.setdefault(w, part)  # a writer its part names keeps that name (an older rank's room has no part)
    for writer, part in sorted(running.items(), key=lambda item: item[1] or ""):
        if writer == me or (other_world is not None and part is not None and part.startswith(f"w{other_world}-")):
            continue  # itself, or a rank of its own launch
        if writer_is_live(out, writer):
            raise StoreError(
                f"{_who(part)} of build {build_id} is still running (writer {writer}): "
                "wait for every rank to finish (or stop them), then relaunch with --resume"
            )


def _who(part: str | None) -> str:
    """``w2-r1`` -> "rank 1 of 2"; None -> "a one-process run"."""
    if part is None:
        return "a one-process run"
    world, _, rank = part[1:].partition("-r")
    return f"rank {rank} of {world}"


def drop_other_launches(out: Path, build_id: str, me: str, distributed: bool) -> None:
    """Before a ``--resume`` of build ``build_id`` by writer ``me``, remove what a run of it launched
    the other way left, so that records are counted once and the status can complete: for a rank
    (``distributed``), a single-process run's counts; for one process, a distributed run's rank
    parts (they would keep the build "running" forever), plan and claims."""
    if distributed:  # counts of a single-process run: counts/<id>.<writer>.<n>.safetensors
        prefix = f"{build_id}."
        for p in (out / COUNTS_DIR).glob(f"{prefix}*safetensors"):
            owner = p.name[len(prefix) :].split(".")[0]
            if not owner.startswith("w") or "-r" not in owner:
                if owner != me and writer_is_live(out, owner):
                    raise StoreError(f"build {build_id} is still running (writer {owner} is live): wait for it to finish")
                p.unlink(missing_ok=True)
        return
    # (Rank parts' counts go with the build's own, in drop_old_counts.)
    refuse_live_ranks(out, build_id, me)
    shutil.rmtree(out / BUILDS_DIR / f"{build_id}{RANK_PARTS_SUFFIX}", ignore_errors=True)
    shutil.rmtree(out / BUILDS_DIR / f"{build_id}{PLAN_SUFFIX}", ignore_errors=True)
    shutil.rmtree(out / CLAIMS_DIR / build_id, ignore_errors=True)
