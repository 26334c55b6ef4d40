"""The steps of ``prefixgen build``, each a short function, and the state they share: what one
process and each rank of a distributed build both run. It knows nothing of ranks.

    open_job -> [count_pass] -> (the store prepared) -> build_record -> open_writer -> start_run
    recorded(run):  chain (read -> tokenize -> select -> plan -> batch) -> prefill_batches (prefill -> write -> record)
    compact_run

``builder.pipeline.build`` chains them for one process (that is the pipeline to read first);
``builder.distributed.Ranks.build`` runs the same steps for a rank, its count shares, plan and
shared prefixes before the chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from prefixgen.builder.plan import Batch, Budget, Planner, PrefillTask, batch_tasks, split_batch
from prefixgen.builder.prefill import Prefiller, fit_batch_tokens
from prefixgen.builder.progress import Progress
from prefixgen.builder.recurrent import RecurrentPrefiller, StatePlan
from prefixgen.builder.selection import Selection, choose_blocks, cut_to_selection, max_blocks
from prefixgen.cache_spec import cache_spec
from prefixgen.config import BuildConfig
from prefixgen.data.records import RecordTokenizer, TokenizedRecord, open_records
from prefixgen.data.source import Record
from prefixgen.errors import PrefixgenError, StoreError
from prefixgen.format import BlockHash, BuildRecord, Manifest, dequantize_fp8, quantize_fp8, root_key
from prefixgen.kvcache import recurrent_layers
from prefixgen.maintain.compact import compact_store
from prefixgen.model import fingerprint, load_model, probe_kv_layout
from prefixgen.store.blockcache import BlockCache
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import PrefixStore, read_manifest
from prefixgen.store.writer import StoreWriter, new_id, utc_now, writer_is_live

CHECKPOINT_SECONDS = 30.0
PREFETCH_BATCHES = 4
T = TypeVar("T")


class StageTimer:
    """Wall time per pipeline stage. ``wrap`` times the ``next()`` calls of a chained iterator;
    since each stage pulls from the one before, a stage's own time is its total minus the
    total of the stage it wraps."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._chain: list[str] = []

    def wrap(self, name: str, iterator: Iterator[T]) -> Iterator[T]:
        self._chain.append(name)  # now, not when the generator starts: the outer stage starts first
        self.total[name] = 0.0
        return self._timed(name, iterator)

    def _timed(self, name: str, iterator: Iterator[T]) -> Iterator[T]:
        while True:
            t = time.perf_counter()
            item = next(iterator, _END)
            self.total[name] += time.perf_counter() - t
            if item is _END:
                return
            yield item

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        own = dict(self.total)
        for inner, outer in zip(self._chain, self._chain[1:]):
            own[outer] = self.total[outer] - self.total[inner]
        return {k: round(v, 3) for k, v in own.items()}


_END = object()


def prefetch(iterator: Iterator[T], depth: int, timer: StageTimer) -> Iterator[T]:
    """Run ``iterator`` on a background thread, up to ``depth`` items ahead. Its exceptions are
    raised here; closing this generator stops the thread. Time spent waiting for an item is
    counted as ``input_wait``."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((_END, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            items.put((_END, exc))

    thread = threading.Thread(target=produce, name="prefixgen-input", daemon=True)
    thread.start()
    try:
        while True:
            with timer("input_wait"):
                item, exc = items.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


class BuildInterrupted(PrefixgenError):
    """Ctrl-C: the build stopped cleanly; what was computed is stored."""

    exit_code = 130


class PastSource:
    """KV of blocks to use as past: recent blocks from device memory (LRU, ``budget`` bytes),
    else from this run's writer, else from the store as it was when the run began.

    For an fp8 store the past is always the dequantized fp8 KV, what a server will load: recent
    blocks are kept quantized and dequantized, so a suffix's KV does not depend on whether its
    past was still in device memory (FORMAT.md, "fp8 storage").

    Example:
        >>> source = PastSource(writer, store, device, torch.float32, budget=1 << 30)  # doctest: +SKIP
        >>> source.get(keys).shape  # doctest: +SKIP
        torch.Size([32, 5, 2, 4, 8])
    """

    def __init__(
        self, writer: StoreWriter, store: PrefixStore, device: torch.device, dtype: torch.dtype, budget: int, fp8: bool = False
    ):
        self.writer, self.store, self.device, self.dtype, self.fp8 = writer, store, device, dtype, fp8
        self.recent = BlockCache(budget)

    def put(self, keys: Sequence[BlockHash], kv: torch.Tensor) -> None:
        """Remember the KV [len(keys)*B, L, 2, H, D] of freshly computed blocks (as stored)."""
        if not keys or self.recent.budget < kv.nbytes // len(keys):
            return  # nothing would be kept: skip the fp8 round trip too
        if self.fp8:
            bs = kv.shape[0] // len(keys)
            kv = dequantize_fp8(*quantize_fp8(kv, bs), bs, kv.dtype)
        self.recent.put_run(list(keys), kv)

    def get(self, keys: Sequence[BlockHash]) -> torch.Tensor:
        """KV of ``keys`` back to back: [len(keys)*B, L, 2, H, D] on the device."""
        parts: list[torch.Tensor | None] = [self.recent.get(key) for key in keys]
        evicted = [i for i, block in enumerate(parts) if block is None]
        if evicted:  # this run's blocks no longer in device memory: read back together
            for i, block in zip(evicted, self.writer.read_blocks([keys[i] for i in evicted])):
                if block is not None:
                    parts[i] = block.to(self.device, self.dtype)
        missing = [i for i, block in enumerate(parts) if block is None]
        if missing:
            bs = self.store.block_size
            want = [keys[i] for i in missing]
            if not all(self.store.index.contains(want)):
                # Blocks of this run that a compaction merged into rows naming another writer's copy
                # (two builds computed them): the index opened at the start lacks them; look again.
                self.store.index = StoreIndex.open(self.store.path)
            loaded = self.store.read_blocks(want, device=self.device, dtype=self.dtype)
            for j, i in enumerate(missing):
                parts[i] = loaded[j * bs : (j + 1) * bs]
        return torch.cat(parts)


# ---------------------------------------------------------------------------------- before the store


@dataclass
class Job:
    """What a build works with before it touches the store: its options, the model on its device,
    the record tokenizer, the manifest it would write, and the dataset, opened (its first row read,
    so bad input fails before a new store is made)."""

    cfg: BuildConfig
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    tokenize: RecordTokenizer
    manifest: Manifest
    records: Iterator[Record]

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def open_job(cfg: BuildConfig, model: torch.nn.Module | None, tokenizer: Any, device: str) -> Job:
    """The model (``model`` and ``tokenizer`` as given, on their device, else loaded from
    ``cfg.model`` on ``device``), the tokenizer of records and the manifest; the dataset and the
    chat template are checked first: bad input must not leave a new, empty store behind."""
    if model is None:
        model, tokenizer, dev = load_model(
            cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template
        )
    else:
        dev = next(model.parameters()).device
    tokenize = RecordTokenizer.for_options(tokenizer, model.config, cfg, BuildRecord("", ""))
    tokenize.turn_ends = cache_spec(model.config).recurrent is not None  # a hybrid keeps its state where turns end
    records = open_records(cfg)
    manifest = _manifest(cfg, model, tokenizer)
    if cfg.selects:
        max_blocks(cfg, manifest.kv)  # refuse a budget under one block before any pass
    return Job(cfg, model, tokenizer, dev, tokenize, manifest, records)


def _manifest(cfg: BuildConfig, model: torch.nn.Module, tokenizer) -> Manifest:
    layout = probe_kv_layout(model)
    if cfg.kv_dtype == "fp8":
        layout = layout.with_storage("fp8")
    layout = dataclasses.replace(layout, order=_stored_order(cfg))
    fp = fingerprint(model, tokenizer, layout, name=cfg.model)
    root = root_key(fp.weights_digest).hex()
    return Manifest(cfg.block_size, fp, layout, root, format_version=layout.format_version, created_at=utc_now())


def _stored_order(cfg: BuildConfig) -> str:
    """The block order the build writes: an append or resume keeps the store's (``prepare_store``), so the count
    pass, which runs before it, charges each block what it will take (format 5's ``head_crc`` row or none)."""
    if cfg.write_mode in ("append", "resume"):
        with contextlib.suppress(PrefixgenError):  # no store yet, or a damaged one: prepare_store says what is wrong
            return read_manifest(cfg.out).kv.order
    return cfg.kv_order


def count_pass(job: Job) -> Selection:
    """--min-records/--max-bytes: read and tokenize the dataset once more, as the build will, and
    choose the blocks to store (before anything is written)."""
    cfg = job.cfg
    counting = job.tokenize.copy(BuildRecord("", ""))  # its own statistics; warnings come in the build pass
    records = open_records(cfg)
    with tqdm(total=cfg.limit, unit="rec", disable=cfg.quiet, dynamic_ncols=True, desc="count") as bar:
        selection = choose_blocks(counting(records), job.manifest.root_key, cfg, job.manifest.kv, tick=bar.update)
    selection.tokenized_tokens = counting.stats.dataset_tokens
    return selection


def build_record(store: PrefixStore, cfg: BuildConfig, build_id: str | None = None) -> BuildRecord:
    """A new build record, or for --resume the unfinished one of the same dataset (reused, so
    its counts are replaced rather than counted twice); ``build_id`` when the ranks of a
    distributed build chose it."""
    if build_id:
        return BuildRecord(build_id=build_id, dataset=cfg.dataset, started_at=utc_now(), options=cfg.options())
    if cfg.resume:
        for old in reversed(store.builds()):
            if old.dataset == cfg.dataset and old.status != "complete":
                live = [w for w in old.writers if writer_is_live(store.path, w)]
                if live:
                    raise StoreError(
                        f"the build of {cfg.dataset} in {store.path} is still running (writer {live[0]}): "
                        "wait for it to finish; --resume is for a build that stopped"
                    )
                return BuildRecord(build_id=old.build_id, dataset=cfg.dataset, started_at=utc_now(), options=cfg.options())
    return BuildRecord(build_id=new_id(), dataset=cfg.dataset, started_at=utc_now(), options=cfg.options())


def finished(store: PrefixStore, record: BuildRecord, cfg: BuildConfig, rerun: bool = False) -> BuildRecord | None:
    """The record of a run that has nothing to do, or None: ``--resume`` with no unfinished build
    of the dataset, or (``rerun``: a ``--rank`` rank) a build already complete (rerunning the
    command of a finished build is a no-op: its ranks' parts are not rewritten)."""
    builds = {b.build_id: b for b in store.builds()}
    done = builds.get(record.build_id)
    if done is not None and done.status == "complete" and (rerun or cfg.resume):
        return done
    if cfg.resume and record.build_id not in builds:
        same = [b for b in builds.values() if b.dataset == cfg.dataset]
        if same:  # this run's record: it computed and wrote nothing
            return BuildRecord(same[-1].build_id, cfg.dataset, "complete", record.started_at, utc_now(), options=cfg.options())
    return None


def open_writer(job: Job, record: BuildRecord, part: str | None = None) -> StoreWriter:
    """This run's writer (its lock taken: the run is live from here), named in ``record``; ``part``:
    a rank's name (its room is named for it: other launches of the build see the rank from here)."""
    cfg = job.cfg
    writer = StoreWriter(job.out, job.manifest, record.build_id, cfg.shard_bytes, cfg.write_threads, cfg.fsync, device=job.device)
    writer.part = part
    with released_on_error(writer):  # a disk too full for the room fails the run here, with no record "running"
        writer.keep_record_room()  # before any record of the run (a rank's base record too) exists
    record.writers.append(writer.writer_id)
    return writer


@contextmanager
def released_on_error(writer: StoreWriter) -> Iterator[None]:
    """Release ``writer`` (its lock and the room kept for its record) if the block raises: the steps
    between :func:`open_writer` and :func:`recorded`, which releases it however the run ends."""
    try:
        yield
    except BaseException:
        writer.release()
        raise


# ---------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One run of the chain: the job, the store as it was when the run began, its record and writer,
    and the state the steps share (progress bar, token budget, past KV, prefiller, planner, timer)."""

    job: Job
    store: PrefixStore
    record: BuildRecord
    writer: StoreWriter
    bar: tqdm
    progress: Progress
    budget: Budget
    source: PastSource
    prefiller: Prefiller | RecurrentPrefiller
    planner: Planner
    timer: StageTimer
    started: float

    def tokenize(self, records: Iterator[Record]) -> Iterator[TokenizedRecord]:
        """The tokenize step: records to token ids, as a server would tokenize them."""
        for rec in self.job.tokenize(records):
            self.record.tokenized_tokens += len(rec.ids)
            yield rec

    def prefill(self, batch: Batch) -> None:
        """The prefill and write steps of one batch: run it, queue its new blocks, count it."""
        _prefill(self.prefiller, batch, self.budget, self.timer, self.bar, self._store)
        self.record.prefilled_tokens += batch.real_tokens
        self.record.padding_tokens += batch.padding_tokens

    def prefill_tasks(self, tasks: list[PrefillTask], past: PrefixStore) -> None:
        """Prefill ``tasks`` (a rank's shared prefixes) in batches, loading their pasts from ``past``."""
        self.source.store = past
        for batch in batch_tasks(iter(tasks), self.budget, self.job.cfg.sort_window):
            self.prefill(batch)

    def _store(self, task: PrefillTask, kv: torch.Tensor) -> None:
        with self.timer("copy"):
            _store_task(self.writer, self.source, self.job.manifest, task, kv)
        self.progress.computed(task.new_keys)


def start_run(
    job: Job, store: PrefixStore, record: BuildRecord, writer: StoreWriter, quiet: bool, total: Callable[[], int | None] | None
) -> Run:
    """The run's progress bar (``total``: how to count its records, None when unknown), token
    budget (what device memory allows), past KV source, prefiller and planner."""
    cfg, model, kv = job.cfg, job.model, job.manifest.kv
    bar = tqdm(total=cfg.limit, unit="rec", disable=quiet, dynamic_ncols=True, desc="build")
    progress = Progress(bar, writer.__contains__, total)
    job.tokenize.stats, job.tokenize.warn = record, bar.write
    budget = Budget(fit_batch_tokens(model, kv.values_per_token * model.dtype.itemsize, cfg.batch_tokens, job.device))
    if budget.tokens < cfg.batch_tokens:
        bar.write(f"device memory allows {budget.tokens} tokens per batch (asked for {cfg.batch_tokens})")
    source = PastSource(writer, store, job.device, model.dtype, cfg.prefix_cache_bytes, fp8=kv.storage == "fp8")
    prefiller = _prefiller(job, source)
    timer = StageTimer()
    states = StatePlan(job.out, job.manifest.block_size) if recurrent_layers(kv) else None
    planner = Planner(
        job.manifest.root_key, job.manifest.block_size, budget.tokens, store.index.contains, record, progress.planned, states
    )
    return Run(job, store, record, writer, bar, progress, budget, source, prefiller, planner, timer, time.perf_counter())


def _prefiller(job: Job, source: PastSource) -> Prefiller | RecurrentPrefiller:
    kv = job.manifest.kv
    if recurrent_layers(kv):  # a hybrid: keeping the recurrent states at the boundaries a store keeps
        return RecurrentPrefiller(
            job.model, job.device, source.get, kv, job.out, job.manifest.block_size, job.cfg.fsync, source.writer.writer_id
        )
    return Prefiller(job.model, job.device, source.get, kv)


# ---------------------------------------------------------------------------------- the chain


def chain(
    run: Run,
    records: Iterator[Record],
    tokenize: Callable[[Iterator[Record]], Iterator[TokenizedRecord]],
    selection: Selection | None,
) -> Iterator[Batch]:
    """read -> tokenize [-> select] -> plan -> batch: each step an iterator over the one before, so
    records stream through in bounded memory. ``tokenize`` is :meth:`Run.tokenize` (a rank of a
    distributed build reads its records' ids back from its count shares instead). The chain runs
    on a thread of its own, ahead of the prefill; batches still come in order, so each one's past
    was computed by an earlier one."""
    timer, manifest = run.timer, run.job.manifest
    records = timer.wrap("read", records)
    tokenized = timer.wrap("tokenize", tokenize(records))
    if selection is not None:
        tokenized = timer.wrap("select", cut_to_selection(tokenized, selection, manifest.root_key, manifest.block_size))
    tasks = timer.wrap("plan", run.planner(tokenized))
    batches = timer.wrap("batch", batch_tasks(tasks, run.budget, run.job.cfg.sort_window))
    return prefetch(batches, PREFETCH_BATCHES, timer)


def prefill_batches(run: Run, batches: Iterator[Batch]) -> None:
    """prefill -> write -> record: each batch through the model, its blocks to the writer, and the
    build record checkpointed every CHECKPOINT_SECONDS (or when the record counts are due)."""
    last_checkpoint = run.started
    try:
        for batch in batches:
            run.prefill(batch)
            now = time.perf_counter()
            _progress(run.progress, run.record, run.writer, now - run.started)
            if now - last_checkpoint > CHECKPOINT_SECONDS or run.planner.counts.full:
                last_checkpoint = now
                _checkpoint(run.writer, run.record, run.planner, now - run.started, run.timer)
    finally:
        _close(batches)  # after a failure: stop the input thread before recording what it counted


@contextmanager
def recorded(run: Run) -> Iterator[None]:
    """The build record written as the run starts, and as it ends, however it ends: complete,
    interrupted (Ctrl-C: BuildInterrupted after storing what was done) or failed."""
    writer, record = run.writer, run.record
    try:
        writer.write_build(record)  # inside: a disk that fails here still leaves the record failed, not running
        yield
        writer.close()
        record.status = "complete"
    except KeyboardInterrupt:
        record.status = "interrupted"
        _finish(writer, record, run.planner, run.started, run.bar, run.timer)
        raise BuildInterrupted(
            f"interrupted: {writer.blocks_written * run.job.manifest.block_size:,} tokens of KV stored so far are usable; "
            "rerun the same command with --resume to finish"
        ) from None
    except BaseException:
        record.status = "failed"
        _finish(writer, record, run.planner, run.started, run.bar, run.timer)
        raise
    _finish(writer, record, run.planner, run.started, run.bar, run.timer)


def compact_run(run: Run) -> None:
    """One index segment for the whole run instead of one per shard: lookups stay fast as stores grow."""
    mine = run.writer.writer_id + "-"
    try:
        compact_store(run.job.out, select=lambda name: name.startswith(mine), fsync=run.job.cfg.fsync)
    except (OSError, StoreError):
        pass  # e.g. a full disk, or a prune began: the store is valid uncompacted, `prefixgen compact` can do it later


# ---------------------------------------------------------------------------------- helpers of the steps


def _close(batches: Any) -> None:
    if hasattr(batches, "close"):
        batches.close()


def _prefill(
    prefiller: Prefiller | RecurrentPrefiller, batch: Batch, budget: Budget, timer: StageTimer, bar: tqdm, done: Callable
) -> None:
    """Run ``batch`` and call ``done(task, kv)`` for each task. An out-of-memory batch is split in
    two and retried (each half stored before the next runs, since it may be the other's past),
    and later batches get a smaller budget."""
    try:
        with timer("prefill"):
            results = prefiller.run(batch)
    except torch.OutOfMemoryError:
        if len(batch.tasks) == 1 and batch.tasks[0].new_tokens <= batch.tasks[0].block_size:
            raise
        torch.cuda.empty_cache()
        budget.tokens = max(batch.tasks[0].block_size, min(budget.tokens, batch.new_len * len(batch.tasks)) // 2)
        bar.write(f"out of device memory: splitting the batch; the budget is now {budget.tokens} tokens")
        for half in split_batch(batch):
            _prefill(prefiller, half, budget, timer, bar, done)
        return
    for task, kv in zip(batch.tasks, results):
        done(task, kv)


def _store_task(writer: StoreWriter, source: PastSource, manifest: Manifest, task: PrefillTask, kv: torch.Tensor) -> None:
    """Queue a task's new blocks for writing and keep them as past for later tasks."""
    bs = manifest.block_size
    keys = task.new_keys
    if not keys:  # a hybrid's task that only computed a recurrent state
        return
    first = task.cached // bs
    tokens = np.asarray(task.tokens[task.cached :], dtype=np.uint32).reshape(-1, bs)
    parents = [task.keys[first - 1] if first else manifest.root_key] + keys[:-1]
    writer.add(keys, parents, list(range(first, first + len(keys))), tokens, kv)
    source.put(keys, kv)


def _progress(progress: Progress, record: BuildRecord, writer: StoreWriter, seconds: float) -> None:
    tok_s = f"{record.prefilled_tokens / max(seconds, 1e-9):,.0f}"
    progress.update(record.skipped_records, **{"tok/s": tok_s, "written": _mb(writer.bytes_written)})


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _checkpoint(writer: StoreWriter, record: BuildRecord, planner: Planner, seconds: float, timer: StageTimer) -> None:
    record.seconds = round(seconds, 3)
    record.bytes_written = writer.bytes_written
    record.stage_seconds = {
        **timer.seconds(),
        "write": round(writer.write_seconds, 3),
        "write_wait": round(writer.wait_seconds, 3),
    }
    writer.write_counts(*planner.counts.take())  # appends the counts since the last checkpoint
    writer.write_build(record)


def _finish(writer: StoreWriter, record: BuildRecord, planner: Planner, started: float, bar: tqdm, timer: StageTimer) -> None:
    """Flush what was computed and record the run; after a failure, do what the disk still allows."""
    try:
        writer.close()
    except StoreError:
        if record.status == "complete":
            raise
    finally:
        if record.status == "complete":
            bar.n = record.records + record.skipped_records
        bar.close()
    record.finished_at = utc_now()
    # Only blocks on disk count as stored after an interruption: recount from the writer.
    if record.status != "complete":
        record.stored_tokens = writer.blocks_written * writer.manifest.block_size
    try:
        if record.status != "complete":
            # The record first: it is small and tells a resume (and people) what happened, even when
            # the disk is too full for the counts (it goes into the room the writer kept for it).
            with contextlib.suppress(OSError, StoreError):
                writer.write_build(record)
        _checkpoint(writer, record, planner, time.perf_counter() - started, timer)
    except (OSError, StoreError):
        if record.status == "complete":
            # The last counts did not fit: the build is not complete (a resume counts again), and its
            # record must not stay "running".
            record.status = "failed"
            with contextlib.suppress(OSError, StoreError):
                writer.write_build(record)
            raise
    finally:
        writer.release()
