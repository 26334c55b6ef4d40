"""Distributed builds: many processes (GPUs, nodes) fill one store, and no block is computed twice.

Launch with ``torchrun --nproc-per-node N -m prefixgen build ...`` (RANK, WORLD_SIZE and LOCAL_RANK
from the environment; ``torch.distributed`` with NCCL on GPU, gloo on CPU, for a few small
collectives, each with a timeout) or with ``--rank R --world-size N`` (Slurm arrays, any scheduler:
ranks never talk, they coordinate through the dataset's order and the store). One process is the
plain build: none of this runs.

How the work is split, on every rank alike:

1. **Count pass.** Every rank reads and tokenizes the whole dataset and counts the records holding
   each block with ``analysis.count.BlockCounter`` (24 bytes per distinct block). The shared
   *heads* are the blocks in two or more records (``BlockCounts.select(min_records=2)``); they are
   prefix-closed, a trie. A short second pass picks up their tokens (it stops once it has them all).
2. **Head phase.** The heads' trie is cut into segments (runs of blocks without a branch) and
   computed level by level. A rank takes a segment by creating ``claims/<build>/<key>`` with
   O_EXCL in the store (about a fair share per rank at a time; ranks that come first take more),
   prefills it with its parent segment's KV from the store as past, and publishes it (shard +
   index segment) before the next level. A system prompt or a RAG document shared by many records
   is thus prefilled once, early, and every rank loads it as past.
3. **Routing.** Each record goes to one rank by its first block that is not a head: that block is
   in no other record, so whoever takes it computes blocks nobody else needs. Records are dealt,
   in dataset order, to the rank with the fewest tokens so far (starting from the head tokens each
   rank did, which the ranks exchange under torchrun). The same deterministic rule runs on every
   rank over the same stream, so they agree without talking.

Reading the dataset: every rank reads and tokenizes all of it twice (count pass and build pass,
plus the short heads pass) and hashes it once (SHA-256 runs at tens of millions of tokens/s), but
plans and prefills only its share.
Fast tokenizers turn about 1M tokens/s per core, far above one GPU's prefill (about 10-50k tokens/s
for 8B models, less for 70B); at 64 ranks of an 8B model the aggregate prefill (0.6-3M tokens/s)
reaches what each rank's input thread can tokenize twice over, so beyond a few dozen ranks the
input, not the GPU, becomes the limit. Reading only a share would need the ranks to exchange token
ids (an all-to-all), which ``--rank/--world-size`` ranks cannot do.
"""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefixgen.analysis.count import BlockCounter, key_columns
from prefixgen.builder.plan import PrefillTask
from prefixgen.config import BuildConfig
from prefixgen.data.records import TokenizedRecord
from prefixgen.errors import ConfigError, StoreError
from prefixgen.format import (
    BUILDS_DIR,
    CLAIMS_DIR,
    COUNTS_DIR,
    MANIFEST_FILE,
    BlockHash,
    BuildRecord,
    Manifest,
    block_keys,
    create_once,
    hash_block,
)
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import PrefixStore
from prefixgen.store.writer import prepare_store, remove_temp_files, utc_now

CLAIM_STALE_SECONDS = 120.0  # a claim whose segment is still missing after this long is taken over
POLL_SECONDS = 0.05
# Options that may differ between the ranks (or between a run and its --resume) of one build.
_RUN_OPTIONS = ("rank", "world_size", "resume", "append", "overwrite", "device", "dist_timeout", "quiet", "out")


@dataclass(slots=True)
class Heads:
    """The blocks two or more records hold: key -> (parent, depth, tokens), prefix-closed.

    ``tokens`` are the block's own token ids; a chain's tokens are its ancestors' joined.
    """

    blocks: dict[BlockHash, tuple[BlockHash, int, tuple[int, ...]]] = field(default_factory=dict)

    def chain(self, key: BlockHash) -> tuple[list[BlockHash], list[int]]:
        """Keys and tokens from the first block down to ``key``."""
        keys, parts = [], []
        while key in self.blocks:
            parent, _, tokens = self.blocks[key]
            keys.append(key)
            parts.append(tokens)
            key = parent
        keys.reverse()
        parts.reverse()
        return keys, [t for part in parts for t in part]

    def segments(self) -> list[list[list[BlockHash]]]:
        """The trie cut into branch-free runs, grouped by level (a run's parent run is one level up).

        Example:
            >>> heads.segments()  # doctest: +SKIP
            [[[system0, system1, system2]], [[docA0, docA1], [docB0]]]
        """
        blocks = self.blocks
        children: dict[BlockHash, list[BlockHash]] = {}
        for key, (parent, _, _) in blocks.items():
            children.setdefault(parent, []).append(key)
        starts = [k for k, (p, _, _) in blocks.items() if p not in blocks or len(children[p]) > 1]
        levels: list[list[list[BlockHash]]] = []
        level_of: dict[BlockHash, int] = {}  # level of the run that ends at a key
        for start in sorted(starts, key=lambda k: (blocks[k][1], k)):  # shallower first: parent runs are placed
            run = [start]
            while len(children.get(run[-1], ())) == 1:
                run.append(children[run[-1]][0])
            parent = blocks[start][0]
            level = level_of[parent] + 1 if parent in level_of else 0
            level_of[run[-1]] = level
            while len(levels) <= level:
                levels.append([])
            levels[level].append(run)
        return levels


def count_heads(passes: Callable[[], Iterator[TokenizedRecord]], root: BlockHash, block_size: int) -> Heads:
    """Every block that two or more records hold, with its parent and tokens.

    ``passes()`` starts a fresh pass over the tokenized dataset. The first pass counts records per
    block with ``analysis.count.BlockCounter`` (24 bytes per distinct block); the heads are its
    ``select(min_records=2)``, prefix-closed. A second pass collects their tokens and stops as soon
    as it has them all (after the first record, for a system prompt).

    Example:
        >>> heads = count_heads(lambda: tokenize(read_records("data.jsonl", "text")), root, 16)  # doctest: +SKIP
        >>> len(heads.blocks)  # doctest: +SKIP
        12
    """
    counter = BlockCounter()
    for record in passes():
        counter.add(block_keys(record.ids, block_size, root))
    counts = counter.result()
    shared = counts.subset(counts.select(min_records=2))
    heads = Heads()
    if not len(shared):
        return heads
    for record in passes():
        keys = block_keys(record.ids, block_size, root)
        held = int(np.argmin(np.r_[shared.find(key_columns(keys)) >= 0, False])) if keys else 0  # leading shared run
        for i in range(held):
            if keys[i] not in heads.blocks:
                heads.blocks[keys[i]] = (keys[i - 1] if i else root, i, tuple(record.ids[i * block_size : (i + 1) * block_size]))
        if len(heads.blocks) == len(shared):
            break
    return heads


class Ranks:
    """This process's place in a build: rank, world size, and how the ranks coordinate.

    Example:
        >>> ranks = Ranks.from_config(BuildConfig(dataset="d", model="m", out="s", rank=1, world_size=4))
        >>> ranks.rank, ranks.world_size, ranks.collective
        (1, 4, False)
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, collective: bool = False, timeout: float = 600):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.collective = collective  # launched by torchrun: torch.distributed is there
        self.timeout = timeout
        self.loads = [0] * world_size  # head tokens per rank: routing starts from them
        self.heads = Heads()
        self.scratch = BuildRecord("", "")  # tokenizer counts of records this rank only reads

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

    # ------------------------------------------------------------------ collectives

    def _init(self, device: str) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            return
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=self.timeout))
        atexit.register(dist.destroy_process_group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (torchrun only), within the timeout given at init."""
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
                if cfg.resume:  # no other writer is live: a killed run's leftovers go
                    remove_temp_files(out)
                    shutil.rmtree(out / CLAIMS_DIR, ignore_errors=True)
                answer["build_id"] = self._build_id(out, cfg)
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
        return Manifest.from_json(first["manifest"], out / MANIFEST_FILE), first["build_id"]

    def _build_id(self, out: Path, cfg: BuildConfig) -> str:
        """The same id on every rank without talking: the unfinished build of this dataset for
        --resume, else one derived from the options."""
        if cfg.resume:
            for old in reversed(PrefixStore.open(out).builds()):
                if old.dataset == cfg.dataset and old.status != "complete":
                    return old.build_id
        return _options_id(cfg)

    def attach(self, out: Path, record: BuildRecord, writer: Any) -> None:
        """Make ``writer`` write this rank's part of the build record, and the build's base record."""
        record.world_size, record.rank = self.world_size, self.rank
        writer.part = self.part
        for p in (out / COUNTS_DIR).glob(f"{record.build_id}.w*-r*.*safetensors"):
            if not p.name.startswith(f"{record.build_id}.w{self.world_size}-"):
                p.unlink(missing_ok=True)  # an earlier attempt with another world size: replaced by this one
        parts = out / BUILDS_DIR / f"{record.build_id}.ranks"
        for p in parts.glob("*.json"):
            if not p.name.startswith(f"w{self.world_size}-"):
                p.unlink(missing_ok=True)
        base = BuildRecord(record.build_id, record.dataset, started_at=record.started_at, options=record.options)
        base.world_size = self.world_size
        base.options = {k: v for k, v in record.options.items() if k not in ("rank", "world_size")}
        text = json.dumps(base.to_dict(), indent=2, sort_keys=True) + "\n"
        create_once(out / BUILDS_DIR / f"{record.build_id}.json", [text.encode()], writer.fsync, owner=writer.writer_id)

    # ------------------------------------------------------------------ head phase

    def prefill_heads(
        self,
        out: Path,
        manifest: Manifest,
        tokenized: Callable[[], Iterator[TokenizedRecord]],
        run: Callable[[list[PrefillTask], PrefixStore], None],
        writer: Any,
        record: BuildRecord,
        batch_tokens: int,
        timer: Callable[[str], Any],
    ) -> PrefixStore:
        """Count the shared heads, prefill the segments this rank claims, level by level, and wait
        until every head is in the store. Returns the store reopened (it now holds every head).

        ``run(tasks, store)`` prefills and queues tasks as the build's own pipeline does, loading
        pasts from ``store``; ``writer.flush()`` publishes them. ``timer(name)`` times the count
        pass (``dist_count``) and the head phase (``dist_heads``, waits for other ranks included).
        """
        with timer("dist_count"):
            self.heads = count_heads(tokenized, manifest.root_key, manifest.block_size)
        with timer("dist_heads"):
            return self._prefill_heads(out, manifest, run, writer, record, batch_tokens)

    def _prefill_heads(
        self, out: Path, manifest: Manifest, run: Callable, writer: Any, record: BuildRecord, batch_tokens: int
    ) -> PrefixStore:
        claims = out / CLAIMS_DIR / record.build_id
        claims.mkdir(parents=True, exist_ok=True)
        bs = manifest.block_size
        for level in self.heads.segments():
            pending = level
            deadline = time.monotonic() + self.timeout
            # Claim about a fair share at a time, so that every rank takes part in a big level.
            share = max(bs, min(batch_tokens, sum(len(r) for r in level) * bs // self.world_size))
            while True:
                index = StoreIndex.open(out)
                still = [run_ for run_, held in zip(pending, index.contains([r[-1] for r in pending])) if not held]
                if len(still) < len(pending):
                    deadline = time.monotonic() + self.timeout  # progress: someone published
                pending = still
                if not pending:
                    break
                tasks, taken = [], 0
                for segment in pending:
                    if taken >= share or not _claim(claims / segment[0].hex(), writer.writer_id):
                        continue
                    keys, tokens = self.heads.chain(segment[-1])
                    cached = len(index.find_prefix(keys)) * bs
                    if cached < len(tokens):
                        tasks.append(PrefillTask(-1, tokens, cached, keys, bs))
                        taken += len(tokens) - cached
                if tasks:
                    run(tasks, PrefixStore.open(out))
                    new = sum(t.new_tokens for t in tasks)
                    record.head_tokens += new
                    record.stored_tokens += new
                    writer.flush()  # publish: shard and index segment on disk for the other ranks
                    continue
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"rank {self.rank}: {len(pending)} shared prefixes claimed by other ranks were not stored within "
                        f"{self.timeout:.0f} s (a rank died or cannot write the store); rerun the same command with --resume"
                    )
                time.sleep(POLL_SECONDS)
        if self.collective:  # after this every head is stored; routing starts from each rank's head tokens
            self.loads = [int(n) for n in self.gather(record.head_tokens)]
        return PrefixStore.open(out)

    # ------------------------------------------------------------------ routing

    def route(
        self, tokenized: Iterator[TokenizedRecord], record: BuildRecord, root: BlockHash, block_size: int
    ) -> Iterator[TokenizedRecord]:
        """This rank's records, counted into ``record``; the rest of the stream is dropped. Every
        rank runs the same rule over the same stream, so each record goes to exactly one rank."""
        if not self.distributed:
            yield from tokenized
            return
        heads, loads, world = self.heads.blocks, self.loads, self.world_size
        skipped, truncated = self.scratch.skipped_records, self.scratch.truncated_records  # counted by earlier passes
        for rec in tokenized:
            full = len(rec.ids) // block_size
            shared = 0  # leading blocks that are heads, hashed one at a time: most records stop early
            parent = root
            while shared < full:
                key = hash_block(parent, rec.ids[shared * block_size : (shared + 1) * block_size])
                if key not in heads:
                    break
                shared, parent = shared + 1, key
            # Its first unshared block is in no other record: any rank may take it. Deal it to the
            # least loaded (all heads: no work left, spread by position).
            owner = rec.index % world if shared == full else min(range(world), key=loads.__getitem__)
            loads[owner] += (full - shared) * block_size
            if owner == self.rank:
                record.records += 1
                record.dataset_tokens += len(rec.ids)
                yield rec
        if self.rank == 0:  # records every rank skipped or truncated: counted once, by rank 0
            record.skipped_records += self.scratch.skipped_records - skipped
            record.truncated_records += self.scratch.truncated_records - truncated

    def finish(self, out: Path, record: BuildRecord) -> BuildRecord:
        """Under torchrun, wait for every rank and return the merged record of the build."""
        if not self.collective:
            return record
        self.gather(record.status)
        if self.rank == 0:
            for p in (out / CLAIMS_DIR).glob("check-*"):
                p.unlink(missing_ok=True)
        return next((b for b in PrefixStore.open(out).builds() if b.build_id == record.build_id), record)


def _options_id(cfg: BuildConfig) -> str:
    options = {k: v for k, v in cfg.options().items() if k not in _RUN_OPTIONS}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    return f"dist-{digest}"


def _claim(path: Path, owner: str) -> bool:
    """Take ``path`` (O_EXCL): True if this rank now holds it. A claim older than
    CLAIM_STALE_SECONDS whose segment is still missing belongs to a dead rank: taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                age = time.time() - path.stat().st_mtime
                if age < CLAIM_STALE_SECONDS:
                    return False
                os.rename(path, path.with_name(f"{path.name}.stale-{owner}"))  # one taker wins the rename
            except FileNotFoundError:
                return False
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{owner} {utc_now()}\n")
        return True
    return False
