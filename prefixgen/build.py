"""``prefixgen build``: the whole pipeline, written in one place.

    records -> tokenize -> plan (dedup) -> batch (by length) -> prefill -> write

Each step is an iterator over the one before, so records stream through in bounded memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prefixgen.config import BuildConfig
from prefixgen.errors import PrefixgenError, StoreError
from prefixgen.fingerprint import fingerprint, probe_kv_layout
from prefixgen.format import BlockHash, BuildRecord, KVLayout, Manifest, root_key
from prefixgen.plan import Planner, batch_tasks
from prefixgen.prefill import Prefiller, load_model
from prefixgen.source import read_records
from prefixgen.store import PrefixStore
from prefixgen.tokenize import RecordTokenizer
from prefixgen.writer import StoreWriter, new_id, prepare_store, remove_temp_files, utc_now

CHECKPOINT_SECONDS = 30.0


class BuildInterrupted(PrefixgenError):
    """Ctrl-C: the build stopped cleanly; what was computed is stored."""

    exit_code = 130


class PastSource:
    """KV of blocks to use as past: recent blocks from device memory (LRU, ``budget`` bytes),
    else from this run's writer, else from the store as it was when the run began.

    Example:
        >>> source = PastSource(writer, store, device, budget=1 << 30)  # doctest: +SKIP
        >>> source.get(keys).shape  # doctest: +SKIP
        torch.Size([32, 5, 2, 4, 8])
    """

    def __init__(self, writer: StoreWriter, store: PrefixStore, device: torch.device, dtype: torch.dtype, budget: int):
        self.writer, self.store, self.device, self.dtype = writer, store, device, dtype
        self.budget = budget
        self._lru: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def put(self, keys: Sequence[BlockHash], kv: torch.Tensor) -> None:
        """Remember the KV [len(keys)*B, L, 2, H, D] of freshly computed blocks."""
        if not keys:
            return
        blocks = kv.view(len(keys), -1, *kv.shape[1:]).clone()  # own memory: the batch output can go
        for key, block in zip(keys, blocks.unbind(0)):
            self._lru[key] = block
            self._bytes += block.nbytes
        while self._bytes > self.budget and self._lru:
            _, old = self._lru.popitem(last=False)
            self._bytes -= old.nbytes

    def get(self, keys: Sequence[BlockHash]) -> torch.Tensor:
        parts, missing = [], []
        for key in keys:
            block = self._lru.get(key)
            if block is not None:
                self._lru.move_to_end(key)
            elif key in self.writer:
                block = self.writer.read_block(key).to(self.device, self.dtype)
            else:
                missing.append(len(parts))
            parts.append(block)
        if missing:
            loaded = self.store.read_blocks([keys[i] for i in missing], device=self.device, dtype=self.dtype)
            for j, i in enumerate(missing):
                parts[i] = loaded[j * self.store.block_size : (j + 1) * self.store.block_size]
        return torch.cat(parts)


def _manifest(cfg: BuildConfig, model: torch.nn.Module, tokenizer) -> Manifest:
    layout = probe_kv_layout(model)
    if cfg.kv_dtype == "fp8":
        layout = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype, storage="fp8")
    fp = fingerprint(model, tokenizer, layout, name=cfg.model)
    return Manifest(block_size=cfg.block_size, model=fp, kv=layout, root=root_key(fp.weights_digest).hex(), created_at=utc_now())


def _build_record(store: PrefixStore, cfg: BuildConfig) -> BuildRecord:
    """A new build record, or for --resume the unfinished one of the same dataset (reused, so
    its counts are replaced rather than counted twice)."""
    if cfg.resume:
        for old in reversed(store.builds()):
            if old.dataset == cfg.dataset and old.status != "complete":
                return BuildRecord(build_id=old.build_id, dataset=cfg.dataset, started_at=utc_now(), options=cfg.options())
    return BuildRecord(build_id=new_id(), dataset=cfg.dataset, started_at=utc_now(), options=cfg.options())


def build(cfg: BuildConfig) -> BuildRecord:
    """Fill the store ``cfg.out`` with the KV of every block-aligned prefix of ``cfg.dataset``.

    Returns the build record (also written to the store). Raises a PrefixgenError subclass with
    a message for the user on bad input; on Ctrl-C, BuildInterrupted after storing what was done.

    Example:
        >>> rec = build(BuildConfig(dataset="data.jsonl", model="models/tiny", out="store"))  # doctest: +SKIP
        >>> rec.status, rec.stored_tokens  # doctest: +SKIP
        ('complete', 4096)
    """
    cfg.validate()
    out = Path(cfg.out)
    model, tokenizer, device = load_model(cfg)
    manifest = prepare_store(out, _manifest(cfg, model, tokenizer), cfg.write_mode)
    remove_temp_files(out) if cfg.resume else None
    store = PrefixStore.open(out)
    record = _build_record(store, cfg)
    if cfg.resume and record.build_id not in {b.build_id for b in store.builds()}:
        # Nothing unfinished: resuming a finished build is a no-op (so scripts can always pass --resume).
        done = [b for b in store.builds() if b.dataset == cfg.dataset]
        if done:
            return done[-1]
    writer = StoreWriter(out, manifest, record.build_id, cfg.shard_bytes, cfg.write_threads, cfg.fsync, device=device)
    record.writers.append(writer.writer_id)
    max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 62
    max_tokens = min(cfg.max_tokens or max_positions, max_positions)
    bar = tqdm(total=cfg.limit, unit="rec", disable=cfg.quiet, dynamic_ncols=True, desc="build")
    tokenizer_step = RecordTokenizer(
        tokenizer, record, max_tokens, chat=cfg.messages_field is not None, system_prompt=cfg.system_prompt, warn=bar.write
    )
    planner = Planner(manifest.root_key, manifest.block_size, cfg.batch_tokens, store.index.contains, record)
    source = PastSource(writer, store, device, model.dtype, cfg.prefix_cache_bytes)
    prefiller = Prefiller(model, device, source.get)

    field = cfg.messages_field or cfg.text_field
    records = read_records(cfg.dataset, field, cfg.split, cfg.subset, cfg.limit)
    batches = batch_tasks(planner(tokenizer_step(records)), cfg.batch_tokens, cfg.sort_window)

    started = time.perf_counter()
    last_checkpoint = started
    writer.write_build(record)
    try:
        for batch in batches:
            for task, kv in zip(batch.tasks, prefiller.run(batch)):
                keys = task.new_keys
                bs = manifest.block_size
                tokens = np.asarray(task.tokens[task.cached :], dtype=np.uint32).reshape(-1, bs)
                first = task.cached // bs
                parents = [task.keys[first - 1] if first else manifest.root_key] + keys[:-1]
                writer.add(keys, parents, list(range(first, first + len(keys))), tokens, kv)
                source.put(keys, kv)
            record.prefilled_tokens += batch.real_tokens
            record.padding_tokens += batch.padding_tokens
            now = time.perf_counter()
            _progress(bar, record, writer, now - started)
            if now - last_checkpoint > CHECKPOINT_SECONDS:
                last_checkpoint = now
                _checkpoint(writer, record, planner, now - started)
        writer.close()
        record.status = "complete"
    except KeyboardInterrupt:
        record.status = "interrupted"
        _finish(writer, record, planner, started, bar)
        raise BuildInterrupted(
            f"interrupted: {record.stored_tokens:,} tokens of KV stored so far are usable; "
            "rerun the same command with --resume to finish"
        ) from None
    except BaseException:
        record.status = "failed"
        _finish(writer, record, planner, started, bar)
        raise
    _finish(writer, record, planner, started, bar)
    return record


def _progress(bar: tqdm, record: BuildRecord, writer: StoreWriter, seconds: float) -> None:
    bar.n = record.records + record.skipped_records
    dedup = 1 - record.prefilled_tokens / record.dataset_tokens if record.dataset_tokens else 0.0
    bar.set_postfix(
        {
            "tok/s": f"{record.prefilled_tokens / max(seconds, 1e-9):,.0f}",
            "dedup": f"{dedup:.0%}",
            "written": _mb(writer.bytes_written),
        },
        refresh=False,
    )
    bar.refresh()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _checkpoint(writer: StoreWriter, record: BuildRecord, planner: Planner, seconds: float) -> None:
    record.seconds = round(seconds, 3)
    record.bytes_written = writer.bytes_written
    writer.write_counts(planner.counts)
    writer.write_build(record)


def _finish(writer: StoreWriter, record: BuildRecord, planner: Planner, started: float, bar: tqdm) -> None:
    """Flush what was computed and record the run; after a failure, do what the disk still allows."""
    try:
        writer.close()
    except StoreError:
        if record.status == "complete":
            raise
    finally:
        bar.n = record.records + record.skipped_records
        bar.close()
    record.finished_at = utc_now()
    # Only blocks on disk count as stored after an interruption: recount from the writer.
    if record.status != "complete":
        record.stored_tokens = writer.blocks_written * writer.manifest.block_size
    try:
        _checkpoint(writer, record, planner, time.perf_counter() - started)
    except OSError:
        if record.status == "complete":
            raise
