"""Distributed builds: many processes (GPUs, nodes) fill one store, and no block is computed twice.

Launch with ``torchrun --nproc-per-node N -m prefixgen build ...`` (RANK, WORLD_SIZE and LOCAL_RANK
from the environment; ``torch.distributed`` only to agree on the store and the run at start) or with
``--rank R --world-size N`` (Slurm arrays, any scheduler: ranks never talk, they coordinate through
the store). One process is rank 0 of 1: it streams the dataset straight into the pipeline.

:meth:`Ranks.build` wraps the pipeline's chain (``builder.steps``): a rank prepares the store with
the others, counts in shares, plans, prefills the shared prefixes, runs the same chain as one process
on the records the plan gives it, and merges. ``pipeline.build`` enters this module twice only (to
learn whether the build is distributed, and to hand it over). For N > 1 ranks, one plan, then shares:

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

This module is the rank lifecycle (:class:`Ranks`: join the store, count, plan, heads, route,
merge); the share and plan files are ``builder.shares``'s, claims and leases ``builder.claims``'s,
what a ``--resume`` removes of another launch's run ``builder.resume``'s.
"""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prefixgen.analysis.count import BlockCounts
from prefixgen.builder.claims import (
    CLAIMS_PER_ROUND,
    _Backoff,
    _claim,
    _Clock,
    _Holders,
    _Lease,
    head_ranges,
)
from prefixgen.builder.plan import PrefillTask, chunk_task
from prefixgen.builder.resume import drop_other_launches, refuse_live_ranks
from prefixgen.builder.selection import Selection, select_counts
from prefixgen.builder.shares import Heads, _empty_heads, _share_tokens, count_share, load_npz, make_plan
from prefixgen.builder.steps import (
    Job,
    Run,
    build_record,
    chain,
    compact_run,
    finished,
    open_job,
    open_writer,
    prefill_batches,
    recorded,
    released_on_error,
    start_run,
)
from prefixgen.config import BuildConfig
from prefixgen.data.records import TokenizedRecord
from prefixgen.data.source import ShareRead, dataset_fingerprint, read_share
from prefixgen.errors import ConfigError, CorruptStoreError, DatasetError, StoreError
from prefixgen.format import (
    BUILDS_DIR,
    CLAIMS_DIR,
    COUNTS_DIR,
    INDEX_DIR,
    MANIFEST_FILE,
    PLAN_SUFFIX,
    RANK_PARTS_SUFFIX,
    BuildRecord,
    Manifest,
    Segment,
    create_once,
)
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import PrefixStore, read_builds
from prefixgen.store.writer import new_id, prepare_store, record_rooms, remove_temp_files, writer_is_live

# Options that may differ between the ranks (or between a run and its --resume) of one build: they
# change how the work runs, not the bytes stored.
_RUN_OPTIONS = (
    "rank", "world_size", "resume", "append", "overwrite", "device", "dist_timeout", "quiet", "out",
    "batch_tokens", "write_threads", "sort_window", "prefix_cache_bytes", "fsync", "shard_bytes",
)  # fmt: skip


def launched(cfg: BuildConfig) -> Ranks | None:
    """This process's rank when the build is distributed (torchrun, or ``--rank``/``--world-size``
    with N > 1), else None: one process runs the pipeline with no rank at all."""
    ranks = Ranks.from_config(cfg)
    return ranks if ranks.distributed else None


class Ranks:
    """This process's place in a distributed build: rank, world size, how the ranks coordinate,
    and the plan. :meth:`build` runs the pipeline's steps for this rank.

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

    def build(self, cfg: BuildConfig, model: Any = None, tokenizer: Any = None) -> BuildRecord:
        """This rank's part of the build: the store joined with the other ranks, then count in
        shares -> plan -> shared prefixes -> the pipeline's chain on this rank's records -> merge.
        Returns the merged record (torchrun: rank 0 waits for every rank) or this rank's."""
        out = Path(cfg.out)
        job = open_job(cfg, model, tokenizer, self.device(cfg.device) if model is None else cfg.device)
        job.manifest, build_id = self.prepare_store(out, job.manifest, cfg, str(job.device))
        store = PrefixStore.open(out)
        record = build_record(store, cfg, build_id)
        done = finished(store, record, cfg, rerun=True)  # scripts may rerun a rank's command: a no-op
        if done is not None:
            return done
        writer = open_writer(job, record, self.part)  # live, and seen by other launches, from here
        with released_on_error(writer):  # until the run's record takes over
            done = self.attach(out, record, writer, cfg.resume)
            if done is not None:  # completed while this rank started: its plan may be going (finish)
                writer.release()
                return done
            writer.drop_old_counts()  # a rank counts the records of its plan, which may not be those it counted before
            quiet = cfg.quiet or (self.collective and self.rank > 0)  # torchrun: one bar, rank 0's
            run = start_run(job, store, record, writer, quiet, total=None)  # a rank's records are known from its plan only
        with recorded(run):
            selection = self._prepare(job, run)
            # The same chain as one process's; this rank's records come tokenized from the count shares.
            prefill_batches(run, chain(run, iter(()), lambda _: self.tokenized(record, out), selection))
        compact_run(run)
        return self.finish(out, record)

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
        """``writer.prepare_store`` for this rank; returns the store's manifest and the build id
        every rank uses. Every rank fails with the same message if one of them cannot use the
        store (not a hang)."""
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

    def attach(self, out: Path, record: BuildRecord, writer: Any, resume: bool) -> BuildRecord | None:
        """Make ``writer`` write this rank's part of the build record (and write the build's base
        record). On ``--resume``, once the build is seen not complete, remove what an earlier single-process
        run of it left (its counts), so that records are counted once and the status can complete. Returns
        the build's record, doing nothing, if it is complete by now."""
        record.world_size, record.rank = self.world_size, self.rank
        writer.part = self.part
        try:
            # Parts of another number of ranks are replaced below: never while one of those ranks runs
            # (or only holds its lock: it is seen by the room it keeps for its record, as this rank is).
            refuse_live_ranks(out, record.build_id, record.writers[0], other_world=self.world_size)
        except StoreError:
            writer.release()
            raise
        # Looked at once more now that this rank is seen: a rank finishing the build either saw this
        # rank's room and kept the plan, or completed the build before this look (and removes the plan).
        done = next((b for b in read_builds(out) if b.build_id == record.build_id), None)
        if done is not None and done.status == "complete":
            return done
        if resume:  # after that look: a complete build's counts are never dropped
            try:
                drop_other_launches(out, record.build_id, record.writers[0], distributed=True)
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

    # ------------------------------------------------------------------ plan and heads

    def _prepare(self, job: Job, run: Run) -> Selection | None:
        """Count this rank's shares, make (or read) the plan, and prefill the heads this rank is
        given or claims, level by level, until every head is stored; then point the run at the store
        reopened (it holds every head). Returns the plan's choice of blocks to store
        (``--min-records``/``--max-bytes``), or None. ``dist_count`` times the count pass (its wait
        for the other shares and the plan included), ``dist_heads`` the head phase (waits included)."""
        out, record, writer, timer = job.out, run.record, run.writer, run.timer
        folder = out / BUILDS_DIR / f"{record.build_id}{PLAN_SUFFIX}" / self.run
        folder.mkdir(parents=True, exist_ok=True)
        select = _selector(job) if job.cfg.selects else None
        with timer("dist_count"):
            self._count(folder, job, writer, record)
            self._read_plan(folder, out, job.manifest, writer, record, select)
        meta = load_npz(folder / f"share-{self.rank}.npz")  # share R's skipped records are rank R's to report
        record.skipped_records, record.truncated_records = (int(n) for n in meta["stats"][:2])
        with timer("dist_heads"):
            self._prefill_heads(out, job.manifest, run.prefill_tasks, writer, record, run.budget.tokens)
        store = run.source.store = _open_store(out)
        run.planner.stored = store.index.contains
        selection = self.selection
        record.selection = selection.record() if selection else None
        return selection

    def _count(self, folder: Path, job: Job, writer: Any, record: BuildRecord) -> None:
        """Count this rank's share (torchrun) or claim shares until every share is counted (``--rank``)."""
        owner, cfg, manifest = writer.writer_id, job.cfg, job.manifest

        def count(share: int) -> None:
            read = ShareRead()
            # Numbered within the share: no rank reads the bytes before its share (the plan numbers them in the dataset).
            records = read_share(
                cfg.dataset, cfg.record_field, share, self.world_size, cfg.split, cfg.subset, cfg.limit, read, local_index=True
            )
            stats = count_share(
                records, job.tokenize, folder, share, manifest.root_key, manifest.block_size, owner, fsync=writer.fsync
            )
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

    def tokenized(self, record: BuildRecord, out: Path) -> Iterator[TokenizedRecord]:
        """The records the plan gives this rank, tokenized: their token ids read back from the count
        shares (tokenizing nothing more)."""
        folder = out / BUILDS_DIR / f"{record.build_id}{PLAN_SUFFIX}" / self.run
        plan = self.plan
        mine = np.flatnonzero(plan["owner"] == self.rank)
        spills: dict[int, tuple] = {}
        for s in np.unique(plan["share"][mine]).tolist():
            meta = load_npz(folder / f"share-{s}.npz")
            spills[s] = (*_share_tokens(folder, s, meta["lengths"]), meta["lengths"], *_turn_ends(meta))
        for i in mine.tolist():
            ids, starts, lengths, ends, first_end = spills[int(plan["share"][i])]
            row = int(plan["row"][i])
            tokens = ids[starts[row] : starts[row] + lengths[row]].tolist()
            record.records += 1
            record.dataset_tokens += len(tokens)
            # The chat turns' ends, as one process's tokenizer gives them: a hybrid keeps its states there too.
            yield TokenizedRecord(int(plan["index"][i]), tokens, tuple(ends[first_end[row] : first_end[row + 1]].tolist()))

    def finish(self, out: Path, record: BuildRecord) -> BuildRecord:
        """The merged record of the build. Under torchrun, rank 0 waits (through the store, without a
        timeout: a rank that dies ends the run under torch elastic) for every rank to finish; the
        rank that sees the build complete removes its plan (leaving it to gc while a writer of the
        build that has written no last record yet, a rank relaunched meanwhile, still runs)."""
        merged = record
        while True:
            merged = next((b for b in read_builds(out) if b.build_id == record.build_id), record)
            if not self.collective or self.rank != 0 or merged.status != "running":
                break
            time.sleep(0.5)
        # Not while a writer of the build that has not written its last record runs (a rank relaunched
        # with --resume as the others completed): it may be counting into the plan's folder.
        if merged.status == "complete" and not any(
            w not in record.writers and _maybe_live(out, w) for w in record_rooms(out, record.build_id)
        ):
            shutil.rmtree(out / BUILDS_DIR / f"{record.build_id}{PLAN_SUFFIX}", ignore_errors=True)
            shutil.rmtree(out / CLAIMS_DIR / record.build_id, ignore_errors=True)
        return merged if self.collective else record


def _maybe_live(out: Path, writer: str) -> bool:
    """Whether ``writer`` may still run: live, or its lock cannot be probed (then its files are left to gc)."""
    try:
        return writer_is_live(out, writer)
    except StoreError:
        return True


def _turn_ends(meta: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ends, first): the chat turns' ends of a count share's records, record ``r``'s at
    ``ends[first[r]:first[r + 1]]`` (none in a share spilled before they were kept)."""
    counts = meta.get("end_counts", np.zeros(len(meta["lengths"]), np.int64))
    return meta.get("ends", np.zeros(0, np.int64)), np.concatenate([[0], np.cumsum(counts)])


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


def _selector(job: Job) -> Callable[[BlockCounts], Selection]:
    """The planner's choice of blocks to store from the summed count shares, by one process's rule."""
    return lambda counts: select_counts(counts, job.cfg, job.manifest.kv, time.perf_counter())
