"""``prefixgen build``: the whole pipeline, written in one place.

    records -> tokenize [-> select] -> plan (dedup) -> batch (by length) -> prefill -> write

With --min-records/--max-bytes a count pass reads the dataset first and chooses the blocks to store
(builder/selection.py; the ranks of a distributed build choose in their plan, from their count
shares); the select step then cuts each record to its chosen blocks.

Each step is an iterator over the one before, so records stream through in bounded memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from prefixgen.builder.distributed import Ranks
from prefixgen.builder.plan import Batch, Budget, Planner, PrefillTask, batch_tasks, split_batch
from prefixgen.builder.prefill import Prefiller, fit_batch_tokens
from prefixgen.builder.progress import Progress
from prefixgen.builder.recurrent import RecurrentPrefiller, StatePlan
from prefixgen.builder.selection import Selection, choose_blocks, cut_to_selection, max_blocks, select_counts
from prefixgen.cache_spec import cache_spec
from prefixgen.config import BuildConfig
from prefixgen.data.records import RecordTokenizer, open_records
from prefixgen.data.source import ShareRead, count_records, read_share
from prefixgen.errors import PrefixgenError, StoreError
from prefixgen.format import BlockHash, BuildRecord, Manifest, dequantize_fp8, quantize_fp8, root_key
from prefixgen.kvcache import recurrent_layers
from prefixgen.maintain.compact import compact_store
from prefixgen.model import fingerprint, load_model, probe_kv_layout
from prefixgen.store.blockcache import BlockCache
from prefixgen.store.index import StoreIndex
from prefixgen.store.reader import PrefixStore
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


def _manifest(cfg: BuildConfig, model: torch.nn.Module, tokenizer) -> Manifest:
    layout = probe_kv_layout(model)
    if cfg.kv_dtype == "fp8":
        layout = layout.with_storage("fp8")
    layout = dataclasses.replace(layout, order=cfg.kv_order)
    fp = fingerprint(model, tokenizer, layout, name=cfg.model)
    root = root_key(fp.weights_digest).hex()
    return Manifest(cfg.block_size, fp, layout, root, format_version=layout.format_version, created_at=utc_now())


def _count_pass(cfg: BuildConfig, tokenize: RecordTokenizer, manifest: Manifest) -> Selection:
    """Read and tokenize the dataset once more, as the build will, and choose the blocks to store."""
    counting = tokenize.copy(BuildRecord("", ""))  # its own statistics; warnings come in the build pass
    records = open_records(cfg)
    with tqdm(total=cfg.limit, unit="rec", disable=cfg.quiet, dynamic_ncols=True, desc="count") as bar:
        selection = choose_blocks(counting(records), manifest.root_key, cfg, manifest.kv, tick=bar.update)
    selection.tokenized_tokens = counting.stats.dataset_tokens
    return selection


def _build_record(store: PrefixStore, cfg: BuildConfig, build_id: str | None = None) -> BuildRecord:
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


def build(cfg: BuildConfig, model: torch.nn.Module | None = None, tokenizer: Any = None) -> BuildRecord:
    """Fill the store ``cfg.out`` with the KV of every block-aligned prefix of ``cfg.dataset``.

    ``model`` and ``tokenizer`` may be given already loaded (on their device); else they are
    loaded from ``cfg.model``. Returns the build record (also written to the store). Raises a
    PrefixgenError subclass with a message for the user on bad input; on Ctrl-C,
    BuildInterrupted after storing what was done.

    Example:
        >>> rec = build(BuildConfig(dataset="data.jsonl", model="models/tiny", out="store"))  # doctest: +SKIP
        >>> rec.status, rec.stored_tokens  # doctest: +SKIP
        ('complete', 4096)
    """
    cfg.validate()
    out = Path(cfg.out)
    ranks = Ranks.from_config(cfg)  # one process: rank 0 of 1, and nothing distributed runs
    if model is None:
        model, tokenizer, device = load_model(
            cfg.model,
            device=ranks.device(cfg.device),
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            chat_template=cfg.chat_template,
        )
    else:
        device = next(model.parameters()).device
    # Check the dataset and the chat template first: bad input must not leave a new, empty store behind.
    tokenize = RecordTokenizer.for_options(tokenizer, model.config, cfg, BuildRecord("", ""))
    tokenize.turn_ends = cache_spec(model.config).recurrent is not None  # a hybrid keeps its state where turns end
    records = open_records(cfg)
    manifest = _manifest(cfg, model, tokenizer)
    # --min-records/--max-bytes: the count pass, before anything is written (ranks of a distributed
    # build choose from their count shares summed, in the plan).
    if cfg.selects:
        max_blocks(cfg, manifest.kv)  # refuse a budget under one block before the pass
    selection = _count_pass(cfg, tokenize, manifest) if cfg.selects and not ranks.distributed else None
    manifest, build_id = ranks.prepare_store(out, manifest, cfg, str(device))
    store = PrefixStore.open(out)
    record = _build_record(store, cfg, build_id)
    record.selection = selection.record() if selection else None
    # Nothing to do (a no-op, so scripts can always pass --resume and rerun a rank's command).
    done = ranks.finished(store, record.build_id, cfg, record.started_at)
    if done is not None:
        return done
    writer = StoreWriter(out, manifest, record.build_id, cfg.shard_bytes, cfg.write_threads, cfg.fsync, device=device)
    record.writers.append(writer.writer_id)
    if selection is not None:
        record.tokenized_tokens += selection.tokenized_tokens
    ranks.attach(out, record, writer, cfg.resume)
    if cfg.resume or ranks.distributed:
        # The resumed build counts its records again from the start; a rank of a distributed build
        # counts the records of its plan, which may not be those it counted before.
        writer.drop_old_counts()
    quiet = cfg.quiet or (ranks.collective and ranks.rank > 0)  # torchrun: one bar, rank 0's
    bar = tqdm(total=cfg.limit, unit="rec", disable=quiet, dynamic_ncols=True, desc="build")
    # The bar's total: the dataset's records for one process; a rank's share is known from its plan only.
    total = None if quiet or ranks.distributed else lambda: count_records(cfg.dataset, cfg.limit)
    progress = Progress(bar, writer.__contains__, total)
    tokenize.stats, tokenize.warn = record, bar.write
    budget = Budget(fit_batch_tokens(model, manifest.kv.values_per_token * model.dtype.itemsize, cfg.batch_tokens, device))
    if budget.tokens < cfg.batch_tokens:
        bar.write(f"device memory allows {budget.tokens} tokens per batch (asked for {cfg.batch_tokens})")
    source = PastSource(writer, store, device, model.dtype, cfg.prefix_cache_bytes, fp8=manifest.kv.storage == "fp8")
    if recurrent_layers(manifest.kv):  # a hybrid: task by task, keeping the recurrent states at boundaries
        prefiller: Any = RecurrentPrefiller(model, device, source.get, manifest.kv, out, manifest.block_size, cfg.fsync)
    else:
        prefiller = Prefiller(model, device, source.get, manifest.kv)
    timer = StageTimer()

    def store_task(task: PrefillTask, kv: torch.Tensor) -> None:
        with timer("copy"):
            _store_task(writer, source, manifest, task, kv)
        progress.computed(task.new_keys)

    def run_tasks(tasks: list[PrefillTask], past_store: PrefixStore) -> None:
        source.store = past_store
        for batch in batch_tasks(iter(tasks), budget, cfg.sort_window):
            _prefill(prefiller, batch, budget, timer, bar, store_task)
            record.prefilled_tokens += batch.real_tokens
            record.padding_tokens += batch.padding_tokens

    def read_count_share(share: int, read: ShareRead) -> Iterator:
        field = cfg.record_field
        # Numbered within the share: no rank reads the bytes before its share (the plan numbers them in the dataset).
        return read_share(cfg.dataset, field, share, ranks.world_size, cfg.split, cfg.subset, cfg.limit, read, local_index=True)

    def select(counts: Any) -> Selection:  # a distributed build's choice, from its count shares summed
        return select_counts(counts, cfg, manifest.kv, time.perf_counter())

    states = StatePlan(out, manifest.block_size) if recurrent_layers(manifest.kv) else None
    planner = Planner(
        manifest.root_key, manifest.block_size, budget.tokens, store.index.contains, record, progress.planned, states
    )
    started = last_checkpoint = time.perf_counter()
    batches: Any = iter(())
    try:
        writer.write_build(record)  # inside: a disk that fails here still leaves the record failed, not running
        # Ranks of a distributed build: count in shares, plan, and prefill the shared prefixes first.
        prepared = ranks.prepare_work(
            out, manifest, read_count_share, tokenize, run_tasks, writer, record, budget.tokens, timer,
            select if cfg.selects else None,
        )  # fmt: skip
        if prepared is not None:
            store = source.store = prepared
            planner.stored = store.index.contains
            selection = ranks.selection
            record.selection = selection.record() if selection else None
        # The pipeline: each step pulls from the one before.
        records = timer.wrap("read", records)
        tokenized = timer.wrap("tokenize", ranks.tokenized(tokenize, records, record, out))
        if selection is not None:
            tokenized = timer.wrap("select", cut_to_selection(tokenized, selection, manifest.root_key, manifest.block_size))
        tasks = timer.wrap("plan", planner(tokenized))
        batches = timer.wrap("batch", batch_tasks(tasks, budget, cfg.sort_window))
        # Reading, tokenizing, hashing and batching run on a thread of their own, ahead of the
        # prefill; batches still run in order, so each one's past was computed by an earlier one.
        batches = prefetch(batches, PREFETCH_BATCHES, timer)
        for batch in batches:
            _prefill(prefiller, batch, budget, timer, bar, store_task)
            record.prefilled_tokens += batch.real_tokens
            record.padding_tokens += batch.padding_tokens
            now = time.perf_counter()
            _progress(progress, record, writer, now - started)
            if now - last_checkpoint > CHECKPOINT_SECONDS or planner.counts.full:
                last_checkpoint = now
                _checkpoint(writer, record, planner, now - started, timer)
        writer.close()
        record.status = "complete"
    except KeyboardInterrupt:
        _close(batches)  # stop the input thread before recording what it counted
        record.status = "interrupted"
        _finish(writer, record, planner, started, bar, timer)
        raise BuildInterrupted(
            f"interrupted: {writer.blocks_written * manifest.block_size:,} tokens of KV stored so far are usable; "
            "rerun the same command with --resume to finish"
        ) from None
    except BaseException:
        _close(batches)
        record.status = "failed"
        _finish(writer, record, planner, started, bar, timer)
        raise
    _finish(writer, record, planner, started, bar, timer)
    # One segment for the whole build instead of one per shard: lookups stay fast as stores grow.
    mine = writer.writer_id + "-"
    try:
        compact_store(out, select=lambda name: name.startswith(mine), fsync=cfg.fsync)
    except (OSError, StoreError):
        pass  # e.g. a full disk, or a prune began: the store is valid uncompacted, `prefixgen compact` can do it later
    return ranks.finish(out, record)


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
            # the disk is too full for the counts (the failed write's temporary file is gone by now).
            with contextlib.suppress(OSError, StoreError):
                writer.write_build(record)
        _checkpoint(writer, record, planner, time.perf_counter() - started, timer)
    except (OSError, StoreError):
        if record.status == "complete":
            raise
    finally:
        writer.release()
