"""The write side's last step: blocks of KV in, crash-safe shards and index segments out.

A :class:`StoreWriter` owns a unique writer id; every file it makes carries that id, so any number
of writers (one per GPU process) can fill one store at once without locks. Shards are filled in
reusable (pinned, on CUDA) host buffers by non-blocking device-to-host copies and written by
background threads, so the GPU never waits on the disk.

Commit protocol, per shard: write ``shards/<id>-<n>.safetensors`` (temporary name, fsync,
rename), then its index segment ``index/<id>-<n>.safetensors`` the same way. The segment is the
commit: readers only see blocks through segments, and a segment only names a complete shard.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import queue
import secrets
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefixgen.errors import IncompatibleStoreError, StoreError
from prefixgen.format import (
    BUILDS_DIR,
    COUNT_COLUMNS,
    COUNTS_DIR,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST_FILE,
    RANK_PARTS_SUFFIX,
    SHARDS_DIR,
    TMP_SUFFIX,
    TORCH_DTYPES,
    BlockHash,
    BuildRecord,
    Manifest,
    TensorSpec,
    atomic_write,
    block_crcs,
    dequantize_fp8,
    encode_safetensors_header,
    encode_segment,
    quantize_fp8,
    read_safetensors_header,
    read_shard_blocks,
    shard_checksum,
    shard_name,
    shard_tensors,
)

WRITE_MODES = ("new", "append", "resume", "overwrite")


def new_id() -> str:
    """A writer or build id: UTC time, pid and random bits, so concurrent writers never collide."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{os.getpid()}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def prepare_store(path: Path, manifest: Manifest, mode: str) -> Manifest:
    """Make ``path`` ready to take blocks for ``manifest``'s model; return the store's manifest.

    ``mode``: ``new`` (refuse a non-empty store), ``append``/``resume`` (the store must be of the
    same model, block size and KV layout), ``overwrite`` (empty the store first).

    Example:
        >>> prepare_store(Path("store"), manifest, "new")  # doctest: +SKIP
    """
    if mode not in WRITE_MODES:
        raise StoreError(f"unknown write mode {mode!r}; expected one of {', '.join(WRITE_MODES)}")
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a store folder; choose another --out")
    entries = sorted(p.name for p in path.iterdir()) if path.exists() else []
    has_manifest = MANIFEST_FILE in entries
    if entries and not has_manifest:
        raise StoreError(
            f"{path} is not empty and holds no {MANIFEST_FILE}: it is not a prefixgen store; "
            "choose an empty or new folder for --out"
        )
    if has_manifest and mode == "new":
        raise StoreError(
            f"{path} already holds a store; pass --append to add a dataset to it, --resume to finish "
            "an interrupted build, or --overwrite to replace it"
        )
    if has_manifest and mode == "overwrite":
        # Data first, manifest last: a crash part-way leaves a smaller store, never a broken one.
        for sub in (INDEX_DIR, COUNTS_DIR, BUILDS_DIR, SHARDS_DIR):
            shutil.rmtree(path / sub, ignore_errors=True)
        (path / MANIFEST_FILE).unlink()
        has_manifest = False
    for sub in (SHARDS_DIR, INDEX_DIR, BUILDS_DIR, COUNTS_DIR):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if not has_manifest:
        atomic_write(path / MANIFEST_FILE, [manifest.to_json().encode()])
        return manifest
    existing = Manifest.from_json((path / MANIFEST_FILE).read_text(), path / MANIFEST_FILE)
    problems = existing.model.differences(manifest.model)
    if existing.block_size != manifest.block_size:
        problems.append(f"block_size: store has {existing.block_size}, build asks for {manifest.block_size}")
    if existing.kv != manifest.kv:
        problems.append(f"kv: store has {existing.kv}, build makes {manifest.kv}")
    if problems:
        raise IncompatibleStoreError(
            f"{path} was built for another model or layout:\n  " + "\n  ".join(problems) + "\n"
            "use the same --model, --dtype, --kv-dtype and --block-size, or write to a new --out"
        )
    return existing


@dataclass(slots=True)
class _Shard:
    """A shard being filled: host buffers plus the index entries of the blocks in them."""

    seq: int
    kv: torch.Tensor  # [capacity_tokens, L, 2, H, D] in the stored dtype (pinned on CUDA)
    scale: torch.Tensor | None  # [capacity_blocks, L, 2, H] float32, fp8 only
    tokens: np.ndarray  # [capacity_blocks, B] uint32
    keys: list
    parents: list
    depths: list
    event: torch.cuda.Event | None = None

    @property
    def blocks(self) -> int:
        return len(self.keys)


class StoreWriter:
    """Appends blocks to a store as its own shards and index segments.

    Example:
        >>> with StoreWriter(path, manifest, build_id="b1") as w:  # doctest: +SKIP
        ...     w.add(keys, parents, depths, tokens, kv)
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        build_id: str,
        shard_bytes: int = 256 << 20,
        write_threads: int = 2,
        fsync: bool = True,
        device: torch.device | str = "cpu",
    ):
        self.path = Path(path)
        self.manifest = manifest
        self.build_id = build_id
        self.writer_id = new_id()
        self.part: str | None = None  # a rank of a distributed build: its own build and counts files
        self.fsync = fsync
        layout = manifest.kv
        self._bs = manifest.block_size
        self._block_bytes = layout.bytes_per_token * self._bs
        self._capacity = max(1, shard_bytes // (self._block_bytes + layout.scale_bytes_per_block()))
        self._pin = torch.device(device).type == "cuda"
        self._fp8 = layout.storage == "fp8"
        self._pool = ThreadPoolExecutor(max_workers=max(1, write_threads), thread_name_prefix="prefixgen-write")
        self._free: queue.Queue[_Shard] = queue.Queue()
        self._buffers = 0
        self._max_buffers = max(1, write_threads) + 1
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._current: _Shard | None = None
        self._live: dict[int, _Shard] = {}  # shards whose host buffers still hold their blocks
        self._where: dict[bytes, tuple[int, int]] = {}  # key -> (shard seq, slot), this writer's blocks
        self.bytes_written = 0
        self.shards_written = 0
        self.blocks_written = 0
        self.write_seconds = 0.0  # summed over the write threads
        self.wait_seconds = 0.0  # the caller blocked, waiting for a free shard buffer
        # Segments commit in shard order, so a block's parent is always committed before it.
        self._last_commit = threading.Event()
        self._last_commit.set()
        self._commit_failed = False

    # ------------------------------------------------------------------ adding blocks

    def add(
        self,
        keys: list[BlockHash],
        parents: list[BlockHash],
        depths: list[int],
        tokens: np.ndarray,
        kv: torch.Tensor,
    ) -> None:
        """Queue consecutive blocks of one sequence. ``tokens`` [n, B] uint32; ``kv`` [n*B, L, 2, H, D]
        on any device. Copies are non-blocking; the blocks are on disk after :meth:`close`."""
        n = len(keys)
        assert kv.shape[0] == n * self._bs and tokens.shape == (n, self._bs)
        scale = None
        if self._fp8:
            kv, scale = quantize_fp8(kv, self._bs)
        done = 0
        while done < n:
            shard = self._current or self._new_shard()
            take = min(n - done, self._capacity - shard.blocks)
            b0, t0 = shard.blocks, shard.blocks * self._bs
            shard.kv[t0 : t0 + take * self._bs].copy_(kv[done * self._bs : (done + take) * self._bs], non_blocking=True)
            if scale is not None:
                shard.scale[b0 : b0 + take].copy_(scale[done : done + take], non_blocking=True)
            shard.tokens[b0 : b0 + take] = tokens[done : done + take]
            for i in range(done, done + take):
                self._where[keys[i]] = (shard.seq, b0 + i - done)
            shard.keys.extend(keys[done : done + take])
            shard.parents.extend(parents[done : done + take])
            shard.depths.extend(depths[done : done + take])
            done += take
            if shard.blocks == self._capacity:
                self._submit(shard)

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def read_block(self, key: BlockHash) -> torch.Tensor:
        """KV of a block this writer holds, as stored: [B, L, 2, H, D] (dequantized for fp8)."""
        seq, slot = self._where[key]
        t0 = slot * self._bs
        shard = self._live.get(seq)
        if shard is not None:
            if shard.event is not None:
                shard.event.synchronize()
            elif self._pin:
                torch.cuda.current_stream().synchronize()  # its non-blocking copies may be in flight
            kv = shard.kv[t0 : t0 + self._bs]
            scale = shard.scale[slot : slot + 1] if shard.scale is not None else None
        else:
            kv, scale = self._read_from_file(seq, slot)
        if scale is not None:
            return dequantize_fp8(kv, scale, self._bs, TORCH_DTYPES[self.manifest.kv.dtype])
        return kv

    def _read_from_file(self, seq: int, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        layout = self.manifest.kv
        path = self.path / SHARDS_DIR / shard_name(self.writer_id, seq)
        kv = torch.empty(
            (self._bs, layout.num_layers, 2, layout.num_kv_heads, layout.head_dim), dtype=TORCH_DTYPES[layout.stored_dtype]
        )
        scale = torch.empty((1, layout.num_layers, 2, layout.num_kv_heads)) if self._fp8 else None
        with open(path, "rb", buffering=0) as f:
            header = read_safetensors_header(f, path)
            scale_bytes = scale.view(torch.uint8).numpy() if scale is not None else None
            if not read_shard_blocks(f.fileno(), header, layout, self._bs, slot, kv.view(torch.uint8).numpy(), scale_bytes):
                raise StoreError(f"{path} is truncated: another process changed this writer's shard")
        return kv, scale

    # ------------------------------------------------------------------ shards

    def _new_shard(self) -> _Shard:
        self._check_failures()
        if self._free.empty() and self._buffers < self._max_buffers:
            self._buffers += 1
            shard = self._allocate()
        else:
            t = time.perf_counter()
            shard = self._free.get()  # back-pressure: wait for a write to finish
            self.wait_seconds += time.perf_counter() - t
            self._check_failures()
        self._live = {s: v for s, v in self._live.items() if v is not shard}
        shard.seq, shard.event = self._seq, None
        shard.keys, shard.parents, shard.depths = [], [], []
        self._seq += 1
        self._live[shard.seq] = shard
        self._current = shard
        return shard

    def _allocate(self) -> _Shard:
        layout = self.manifest.kv
        shape = (self._capacity * self._bs, layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
        kv = torch.empty(shape, dtype=TORCH_DTYPES[layout.stored_dtype], pin_memory=self._pin)
        scale = None
        if self._fp8:
            scale = torch.empty((self._capacity, layout.num_layers, 2, layout.num_kv_heads), pin_memory=self._pin)
        tokens = np.zeros((self._capacity, self._bs), dtype=np.uint32)
        return _Shard(seq=-1, kv=kv, scale=scale, tokens=tokens, keys=[], parents=[], depths=[])

    def _submit(self, shard: _Shard) -> None:
        if self._pin:
            shard.event = torch.cuda.Event()
            shard.event.record()
        self._current = None
        previous, self._last_commit = self._last_commit, threading.Event()
        self._futures.append(self._pool.submit(self._write_shard, shard, previous, self._last_commit))

    def _write_shard(self, shard: _Shard, previous: threading.Event, committed: threading.Event) -> None:
        try:
            if shard.event is not None:
                shard.event.synchronize()
            t = time.perf_counter()
            self._write_files(shard, previous)
            with self._lock:
                self.write_seconds += time.perf_counter() - t
        except BaseException:
            self._commit_failed = True
            raise
        finally:
            committed.set()
            self._free.put(shard)

    def _write_files(self, shard: _Shard, previous: threading.Event) -> None:
        n, layout = shard.blocks, self.manifest.kv
        name = shard_name(self.writer_id, shard.seq)
        meta = {"format_version": str(FORMAT_VERSION), "writer": self.writer_id, "build": self.build_id}
        header = encode_safetensors_header(shard_tensors(layout, self._bs, n), meta)
        kv_bytes = shard.kv[: n * self._bs].view(torch.uint8).numpy().reshape(-1)
        parts: list = [header, kv_bytes.data]
        scale_bytes = None
        if shard.scale is not None:
            scale_bytes = shard.scale[:n].numpy().astype("<f4").tobytes()
            parts.append(scale_bytes)
        # An fp8 block's CRC covers its KV bytes, then its scales.
        crcs = block_crcs(kv_bytes, self._block_bytes, scale_bytes, self.manifest.kv.scale_bytes_per_block())
        parts.append(shard.tokens[:n].astype("<u4").tobytes())
        size = atomic_write(self.path / SHARDS_DIR / name, parts, self.fsync)
        columns = {
            "key": np.frombuffer(b"".join(shard.keys), dtype=np.uint8).reshape(n, 32),
            "parent": np.frombuffer(b"".join(shard.parents), dtype=np.uint8).reshape(n, 32),
            "slot": np.arange(n, dtype=np.uint32),
            "depth": np.asarray(shard.depths, dtype=np.uint32),
            "crc": crcs,
        }
        seg_meta = {
            "format_version": str(FORMAT_VERSION),
            "shard": name,
            "shard_bytes": str(size),
            "shard_crc32": str(shard_checksum(header, crcs)),
            "blocks": str(n),
            "writer": self.writer_id,
            "build": self.build_id,
        }
        seg = encode_segment(columns, seg_meta)
        previous.wait()
        if self._commit_failed:
            return  # an earlier shard failed: committing this one could orphan its blocks
        size += atomic_write(self.path / INDEX_DIR / name, seg, self.fsync)
        with self._lock:
            self.bytes_written += size
            self.shards_written += 1
            self.blocks_written += n

    def _check_failures(self) -> None:
        for fut in [f for f in self._futures if f.done()]:
            self._futures.remove(fut)
            exc = fut.exception()
            if exc is not None:
                raise _store_write_error(self.path, exc) from exc

    def flush(self) -> None:
        """Write the partly filled shard now and wait for every write to finish."""
        if self._current is not None and self._current.blocks:
            self._submit(self._current)
        for fut in self._futures:
            fut.exception()  # wait
        self._check_failures()

    def close(self) -> None:
        """Flush and stop the write threads. Safe to call twice."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ build records

    def write_build(self, record: BuildRecord) -> None:
        """Atomically (re)write ``builds/<build_id>.json`` (a rank's: ``builds/<build_id>.ranks/<part>.json``)."""
        data = json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"
        path = self.path / BUILDS_DIR / f"{record.build_id}.json"
        if self.part:
            path = path.with_name(record.build_id + RANK_PARTS_SUFFIX) / f"{self.part}.json"
            path.parent.mkdir(exist_ok=True)
        atomic_write(path, [data.encode()], self.fsync)

    def write_counts(self, counts: dict[bytes, int]) -> None:
        """Atomically (re)write ``counts/<build_id>.safetensors`` (a rank's: ``<build_id>.<part>.safetensors``):
        records per block for this build."""
        n = len(counts)
        keys = np.frombuffer(b"".join(counts.keys()), dtype=np.uint8).reshape(n, 32)
        values = np.fromiter(counts.values(), dtype="<u8", count=n)
        specs = [TensorSpec(name, dt_, (n, w) if w > 1 else (n,)) for name, (dt_, w) in COUNT_COLUMNS.items()]
        header = encode_safetensors_header(specs, {"build": self.build_id, "format_version": str(FORMAT_VERSION)})
        atomic_write(
            self.path / COUNTS_DIR / f"{self.build_id}{'.' + self.part if self.part else ''}.safetensors",
            [header, keys.tobytes(), values.tobytes()],
            self.fsync,
        )


def _store_write_error(path: Path, exc: BaseException) -> StoreError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreError(
            f"the disk holding {path} is full ({exc.strerror}): free some space, then rerun the same command with --resume "
            "(everything written so far is kept)"
        )
    return StoreError(f"writing to {path} failed: {exc}")


def remove_temp_files(path: Path) -> int:
    """Delete leftover ``*.tmp`` files of killed writers (run only when no other writer is live)."""
    removed = 0
    for sub in (SHARDS_DIR, INDEX_DIR, BUILDS_DIR, COUNTS_DIR):
        for p in (path / sub).glob(f"*{TMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
