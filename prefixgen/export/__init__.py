"""``prefixgen export``: write a store's prefixes in the on-disk layout an engine's own cache reads,
so that the unmodified engine serves them (SGLang's HiCache file backend, LMCache's ``fs://``).

The framework is engine-agnostic: it walks every stored chain (bounded memory: the index, never
the KV at once), cuts it into units of ``target.unit_tokens`` tokens (full units only), computes
each unit's key in chain order with ``target.next_key``, reads the unit's KV through the store's
reader (CRCs checked) in batches in shard order, and writes the target's files under a temporary
name then a rename. A file that exists is skipped, so a killed export resumes where it stopped.

Example:
    >>> from prefixgen.export import export
    >>> from prefixgen.export.sglang import SGLangTarget
    >>> export("store", SGLangTarget(model_name="Qwen/Qwen3-8B"), "hicache").files  # doctest: +SKIP
    1234
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from prefixgen.analysis.count import max_blocks
from prefixgen.config import BuildConfig, ExportConfig
from prefixgen.errors import ExportError
from prefixgen.export.base import ExportSummary, ExportTarget, StoreInfo
from prefixgen.export.outdir import ExportDir, ExportRecord
from prefixgen.export.states import check_recurrent, write_states
from prefixgen.export.walk import Blocks, MappedShards, Units, plan_units, read_blocks, read_tokens, select, unit_keys
from prefixgen.store.reader import PrefixStore

__all__ = ["ExportError", "ExportSummary", "ExportTarget", "StoreInfo", "export", "export_store", "target_for"]

BATCH_BYTES = 64 << 20  # KV read at once (then cut into units): one large read per shard run
WRITE_THREADS = 4  # files written (and fsynced) at once while the next batch is read


def target_for(cfg: ExportConfig) -> ExportTarget:
    """The target ``cfg.to`` names, with ``cfg``'s parameters."""
    if cfg.to == "sglang":
        from prefixgen.export.sglang import SGLangTarget, sglang_kv_dtype

        kv_dtype = sglang_kv_dtype(cfg.kv_dtype, PrefixStore.open(cfg.store).manifest.model.name)
        return SGLangTarget(
            model_name=cfg.model_name, page_size=cfg.page_size, tp_size=cfg.tp_size, layout=cfg.layout, kv_dtype=kv_dtype
        )
    if cfg.to == "lmcache":
        try:
            from prefixgen.export.lmcache import LMCacheTarget
        except ModuleNotFoundError as exc:
            if exc.name != "prefixgen.export.lmcache":
                raise
            raise ExportError("--to lmcache is not available in this version of prefixgen") from None
        return LMCacheTarget(
            model_name=cfg.model_name,
            hash_seed=None if cfg.hash_seed == "unset" else cfg.hash_seed,
            chunk_size=cfg.chunk_size,
            hash_algorithm=cfg.hash_algorithm,
            tp_size=cfg.tp_size,
        )
    if cfg.to == "vllm":
        from prefixgen.export.vllm import VLLMTarget

        return VLLMTarget(
            model_name=cfg.model_name,
            block_size=cfg.block_size,
            blocks_per_file=cfg.blocks_per_file,
            dtype=cfg.dtype,
            tp_size=cfg.tp_size,
            hash_seed=None if cfg.hash_seed == "unset" else cfg.hash_seed,
            hash_algorithm=cfg.prefix_caching_hash_algo,
            kv_layout=cfg.kv_cache_layout,
            layer_names=cfg.layer_names,
        )
    raise ExportError(f"unknown export target {cfg.to!r}")


def export_store(cfg: ExportConfig) -> ExportSummary:
    """``prefixgen export``: validate ``cfg``, build its target and export (what the CLI calls)."""
    cfg.validate()
    return export(
        cfg.store,
        target_for(cfg),
        cfg.out,
        min_records=cfg.min_records,
        max_bytes=cfg.max_bytes,
        append=cfg.append,
        progress=not cfg.quiet,
        fsync=cfg.fsync,
    )


def export(
    store: str | Path,
    target: ExportTarget,
    out: str | Path,
    *,
    min_records: int | None = None,
    max_bytes: int | None = None,
    append: bool = False,
    progress: bool = True,
    fsync: bool = True,
) -> ExportSummary:
    """Write every full unit of every stored chain of ``store`` as ``target``'s files in ``out``.

    ``min_records``/``max_bytes`` export only the blocks ``build --min-records/--max-bytes`` would
    have stored (``select_blocks`` over the store's record counts; ``max_bytes`` counts KV bytes in
    the model's dtype). Files that exist are skipped (a resumed export); ``append`` adds this store
    to a folder that holds another store's export of the same model and target parameters.

    Raises ExportError when the target cannot represent the store, or ``out`` holds an export of
    another model or other target parameters.
    """
    start = time.perf_counter()
    pstore = PrefixStore.open(store)
    info = StoreInfo.from_manifest(pstore.manifest)
    check_recurrent(store, target, info)  # a hybrid's states: only for targets that write them
    if target.unit_tokens % info.block_size:
        raise ExportError(
            f"the store's block size ({info.block_size}) does not divide the target's {target.unit_tokens} tokens per file: "
            "rebuild the store with a --block-size that divides it"
        )
    target.check(info)
    k = target.unit_tokens // info.block_size
    # --max-bytes as build and prune count it (a budget under one block is refused before the folder is made).
    limit = max_blocks(BuildConfig(max_bytes=max_bytes, block_size=info.block_size), pstore.manifest.kv)
    outdir = ExportDir(Path(out), ExportRecord.of(pstore, target), append=append, fsync=fsync)  # refuses a wrong folder first
    try:
        for name, data in getattr(target, "extra_files", list)():  # the target's own metadata (vLLM's config.json)
            if not outdir.exists(name):
                outdir.write(name, data)
        blocks = read_blocks(pstore)
        if min_records is not None or max_bytes is not None:
            blocks = select(pstore, blocks, min_records, limit)
        units = plan_units(blocks, pstore.manifest.root_key, k)
        tokens = read_tokens(pstore, blocks, units.blocks.reshape(-1)).reshape(len(units), -1).astype(np.int64)  # [units, U]
        keys = unit_keys(units, tokens.__getitem__, target.first_key, target.next_key)
        summary = ExportSummary(units=len(units), blocks=len(units) * k)
        _write_units(pstore, blocks, units, keys, target, info, outdir, summary, progress)
        write_states(pstore, blocks, units, keys, target, outdir, summary)
    finally:
        outdir.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _not_written(
    batch: np.ndarray, names: Any, keys: list[Any], outdir: ExportDir, summary: ExportSummary, bar: Any, unit_bytes: int
) -> np.ndarray:
    """Resume: the units of ``batch`` whose files are not all there yet; those that are count as skipped and are
    not read."""
    done = np.asarray([all(outdir.exists(n) for n in names(keys[u])) for u in batch.tolist()], bool)
    summary.skipped_existing += sum(len(names(keys[u])) for u in batch[done].tolist())
    bar.update(int(done.sum()) * unit_bytes)
    return batch[~done]


def _write_units(
    store: PrefixStore,
    blocks: Blocks,
    units: Units,
    keys: list[Any],
    target: ExportTarget,
    info: StoreInfo,
    outdir: ExportDir,
    summary: ExportSummary,
    progress: bool,
) -> None:
    """Write the units' files on a few threads, in shard and slot order. A native store's units are written
    straight from their shards' mapped pages (``MappedShards``: no read copy); an fp8 store's are read in
    batches (long contiguous reads, dequantized) into two kept buffers, one read while the other is written."""
    unit_bytes = target.unit_tokens * info.bytes_per_token
    names = getattr(target, "names", None)
    first = units.blocks[:, 0]
    order = np.lexsort((blocks.slot[first], blocks.shard[first]))
    per_batch = max(1, BATCH_BYTES // unit_bytes)
    # fp8: two kept read buffers, used in turn: a batch is read into one while the other's files are written. A
    # new tensor per batch costs its pages' faults and zeroing, about a third of the read.
    # Views of mapped pages need token-major blocks: a head-major store's (format 5) are read and transposed.
    kv_layout = store.manifest.kv
    mapped = MappedShards(store, blocks) if kv_layout.storage == "native" and not kv_layout.heads_first else None
    batch_bytes = store.staged_bytes(min(per_batch, len(units)) * units.blocks.shape[1])  # as read: fp8 bytes and scales
    buffers = [] if mapped else [torch.empty(batch_bytes, dtype=torch.uint8) for _ in range(2)]
    reads = 0
    bar = tqdm(total=len(units) * unit_bytes, unit="B", unit_scale=True, desc="export", disable=not progress)
    with bar, ThreadPoolExecutor(WRITE_THREADS) as pool:
        pending: list = []
        older: list = []
        for batch in _batches(order, per_batch):
            todo = batch if names is None else _not_written(batch, names, keys, outdir, summary, bar, unit_bytes)
            if not len(todo):
                continue
            if mapped is not None:  # each unit written from its shard's pages, on the writer threads
                for f in older:  # at most two batches in flight: the threads never wait for the next
                    _count(summary, f.result())
                older = pending
                pending = [
                    pool.submit(_write_mapped, store, blocks, mapped, outdir, target, keys[u], units.blocks[u])
                    for u in todo.tolist()
                ]
                bar.update(len(todo) * unit_bytes)
                continue
            # The buffer's last files were written before the previous batch's were submitted (below).
            buffer = buffers[reads % 2]
            reads += 1
            kv = store.read_locations(blocks.locations(units.blocks[todo].reshape(-1)), buffer=buffer)  # [units * U, L, 2, H, D]
            kv = kv.view(len(todo), target.unit_tokens, *kv.shape[1:])
            for f in pending:  # at most one batch's files in flight: bounded memory
                _count(summary, f.result())
            pending = [pool.submit(_write_unit, outdir, target, keys[u], kv[i]) for i, u in enumerate(todo.tolist())]
            bar.update(len(todo) * unit_bytes)
        for f in older + pending:
            _count(summary, f.result())
    if mapped is not None:
        mapped.close()


def _write_mapped(
    store: PrefixStore, blocks: Blocks, mapped: MappedShards, outdir: ExportDir, target: ExportTarget, key: Any, rows: np.ndarray
) -> tuple[int, int, int]:
    """One unit written from its shard's mapped pages (checksums checked); read when its blocks are not
    consecutive in one shard."""
    kv = mapped.unit(rows)
    if kv is None:
        kv = store.read_locations(blocks.locations(rows))
    return _write_unit(outdir, target, key, kv)


def _batches(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(order), size):
        yield order[i : i + size]


def _write_unit(outdir: ExportDir, target: ExportTarget, key: Any, kv: torch.Tensor) -> tuple[int, int, int]:
    """(files written, bytes written, files skipped) of one unit."""
    files = written = skipped = 0
    for name, data in target.files(key, kv):
        if outdir.exists(name):
            skipped += 1
            continue
        written += outdir.write(name, data)
        files += 1
    return files, written, skipped


def _count(summary: ExportSummary, result: tuple[int, int, int]) -> None:
    files, written, skipped = result
    summary.files += files
    summary.bytes += written
    summary.skipped_existing += skipped
