"""The write side's last step: blocks of KV in, crash-safe shards and index segments out.

A :class:`StoreWriter` owns a unique writer id; every file it makes carries that id, so any number
of writers (one per GPU process) can fill one store at once without locks. Shards are filled in
reusable (pinned, on CUDA) host buffers by non-blocking device-to-host copies and written by
background threads, so the GPU never waits on the disk.

Commit protocol, per shard: write ``shards/<id>-<n>.safetensors`` (temporary name, fsync,
rename), then its index segment ``index/<id>-<n>.safetensors`` the same way. The segment is the
commit: readers only see blocks through segments, and a segment only names a complete shard.

Liveness: while a writer runs it holds ``locks/<id>.lock`` with ``flock`` (:class:`WriterLock`);
the kernel drops the lock when the process ends, ``kill -9`` included. :func:`writer_is_live` is
the one test of whether a writer may still create or rename files; ``--resume``, ``gc`` and
compaction remove only what belongs to writers for which it is False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import json
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefixgen.errors import CorruptStoreError, IncompatibleStoreError, NewerFormatError, StoreError
from prefixgen.format import (
    BUILDS_DIR,
    CLAIMS_DIR,
    COUNT_COLUMNS,
    COUNTS_DIR,
    INDEX_DIR,
    LOCKS_DIR,
    MANIFEST_FILE,
    RANK_PARTS_SUFFIX,
    SHARDS_DIR,
    TMP_SUFFIX,
    TORCH_DTYPES,
    BlockHash,
    BuildRecord,
    Manifest,
    SafetensorsHeader,
    Segment,
    TensorSpec,
    atomic_write,
    block_checksums,
    create_once,
    dequantize_fp8,
    encode_safetensors_header,
    encode_segment,
    keep_room,
    quantize_fp8,
    read_safetensors_header,
    read_shard_blocks,
    shard_checksum,
    shard_name,
    shard_tensors,
    temp_path,
    token_major,
    write_into_room,
)
from prefixgen.store.index import StoreIndex
from prefixgen.store.keyset import KeySet
from prefixgen.store.states import STATES_DIR

WRITE_MODES = ("new", "append", "resume", "overwrite")
RECORD_RESERVE_BYTES = 64 << 10  # kept free for a build's last record: a few KiB of JSON, with room to spare
ID_PATTERN = re.compile(r"\d{8}T\d{6}-\d+-[0-9a-f]{6}")  # what new_id makes


def new_id() -> str:
    """A writer or build id: UTC time, pid and random bits, so concurrent writers never collide."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{os.getpid()}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")  # builds started in one second still sort by start


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
    if entries and not has_manifest and not _being_created(entries):
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
        _empty_store(path)
        has_manifest = False
    for sub in (SHARDS_DIR, INDEX_DIR, BUILDS_DIR, COUNTS_DIR, LOCKS_DIR):
        (path / sub).mkdir(parents=True, exist_ok=True)
    # Exactly one of several processes starting on an empty folder at once creates the manifest
    # (each from its own temporary file); the others go on as if they had found the store.
    if not has_manifest and create_once(path / MANIFEST_FILE, [manifest.to_json().encode()]):
        return manifest
    if not has_manifest and mode == "new":
        raise StoreError(f"another process created a store in {path} at the same moment; pass --append to add to it")
    existing = Manifest.from_json((path / MANIFEST_FILE).read_text(), path / MANIFEST_FILE)
    _check_compatible(path, existing, manifest)
    return existing


def _empty_store(path: Path) -> None:
    """``--overwrite``: remove the store at ``path`` (data first, manifest last: a crash part-way leaves a smaller
    store, never a broken one), unless this prefixgen cannot read it or a writer is live."""
    try:  # a store this prefixgen cannot read is not ours to delete (a damaged one may go)
        Manifest.from_json((path / MANIFEST_FILE).read_text(), path / MANIFEST_FILE)
    except NewerFormatError as exc:
        raise StoreError(
            f"--overwrite refused: {exc}. A store of a newer format is deleted by hand (rm -r {path}), not by --overwrite"
        ) from None
    except CorruptStoreError:
        pass
    live = live_writers(path)
    if live:
        raise StoreError(
            f"{path} is being written by {len(live)} running process(es) (writer {live[0]}); "
            "wait for them to finish before --overwrite"
        )
    # states/ too: a build keeps a state file it finds (write_state creates one only where none is), so
    # the old run's states (another --dtype, other records) would outlive it.
    for sub in (INDEX_DIR, COUNTS_DIR, BUILDS_DIR, SHARDS_DIR, STATES_DIR):
        shutil.rmtree(path / sub, ignore_errors=True)
    (path / MANIFEST_FILE).unlink()


def _check_compatible(path: Path, existing: Manifest, manifest: Manifest) -> None:
    """Raise :class:`IncompatibleStoreError` unless the store's manifest (``existing``) takes a build's
    (``manifest``): the same model, block size and KV layout (the store's block order wins)."""
    problems = existing.model.differences(manifest.model)
    if existing.block_size != manifest.block_size:
        problems.append(f"block_size: store has {existing.block_size}, build asks for {manifest.block_size}")
    # The store's block order wins: a build appending to a token-major store (format 3 or 4) writes token-major.
    if existing.kv != dataclasses.replace(manifest.kv, order=existing.kv.order):
        problems.append(f"kv: store has {existing.kv}, build makes {manifest.kv}")
    if problems:
        raise IncompatibleStoreError(
            f"{path} was built for another model or layout:\n  " + "\n  ".join(problems) + "\n"
            "use the same --model, --dtype, --kv-dtype and --block-size, or write to a new --out"
        )


def _being_created(entries: list[str]) -> bool:
    """Whether a folder without a manifest holds only what another process starting the store at
    this moment makes before its manifest: the store's subfolders and manifest temporary files."""
    made = {SHARDS_DIR, INDEX_DIR, BUILDS_DIR, COUNTS_DIR, LOCKS_DIR, CLAIMS_DIR}
    return all(e in made or (e.startswith(MANIFEST_FILE + ".") and e.endswith(TMP_SUFFIX)) for e in entries)


@dataclass(slots=True)
class _Shard:
    """A shard being filled: host buffers plus the index entries of the blocks in them."""

    seq: int
    kv: torch.Tensor  # [capacity_blocks, *layout.block_shape(B)] in the stored dtype and order (pinned on CUDA)
    scale: torch.Tensor | None  # [capacity_blocks, *layout.scale_shape] float32, fp8 only
    tokens: np.ndarray  # [capacity_blocks, B] uint32
    keys: np.ndarray  # [capacity_blocks, 32] uint8
    parents: np.ndarray  # [capacity_blocks, 32] uint8
    depths: np.ndarray  # [capacity_blocks] uint32
    blocks: int = 0  # filled so far
    event: torch.cuda.Event | None = None


class _Commit:
    """Whether a shard's segment was committed; set once its write thread is done either way."""

    __slots__ = ("done", "ok")

    def __init__(self, ok: bool = False):
        self.done = threading.Event()
        self.ok = ok


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
        self._lock_file = WriterLock(self.path, self.writer_id)
        try:
            refuse_beside_prune(self.path, self.writer_id)
        except StoreError:
            self._lock_file.release()
            raise
        self._counts_seq = 0
        self._reserve: Path | None = None  # room kept for the last record (see write_build)
        self._reserved = False  # room was kept once: a later "running" record does not keep it again
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
        # This writer's blocks: key -> seq * capacity + slot, 16 bytes a block. It keeps only key64,
        # so a hit is confirmed on the whole key (from the shard buffer or our index segment).
        self._where = KeySet(full_keys=False, value_dtype=np.uint64)
        self._segment_cache: tuple[int, Segment] | None = None
        self._index: StoreIndex | None = None  # the store's index, once our own segments were merged away
        self.bytes_written = 0
        self.shards_written = 0
        self.blocks_written = 0
        self.write_seconds = 0.0  # summed over the write threads
        self.wait_seconds = 0.0  # the caller blocked, waiting for a free shard buffer
        # Segments commit in shard order, so a block's parent is always committed before it.
        self._last_commit = _Commit(ok=True)
        self._last_commit.done.set()

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
        kv = kv.view(n, self._bs, *kv.shape[1:])  # [n, B, L, 2, H, D]
        if self.manifest.kv.heads_first:
            # Head-major blocks ([n, H, B, L, 2, D]), permuted on kv's device: the copy below makes them contiguous
            # there (CUDA copies a strided source through a device temporary) before the one copy to host memory.
            kv = kv.permute(0, 4, 1, 2, 3, 5)
            scale = None if scale is None else scale.permute(0, 3, 1, 2)  # [n, H, L, 2]
        done = 0
        while done < n:
            shard = self._current or self._new_shard()
            take = min(n - done, self._capacity - shard.blocks)
            b0 = shard.blocks
            shard.kv[b0 : b0 + take].copy_(kv[done : done + take], non_blocking=True)
            if scale is not None:
                shard.scale[b0 : b0 + take].copy_(scale[done : done + take], non_blocking=True)
            shard.tokens[b0 : b0 + take] = tokens[done : done + take]
            shard.keys[b0 : b0 + take] = np.frombuffer(b"".join(keys[done : done + take]), np.uint8).reshape(take, 32)
            shard.parents[b0 : b0 + take] = np.frombuffer(b"".join(parents[done : done + take]), np.uint8).reshape(take, 32)
            shard.depths[b0 : b0 + take] = depths[done : done + take]
            self._where.add(keys[done : done + take], shard.seq * self._capacity + np.arange(b0, b0 + take))
            shard.blocks += take
            done += take
            if shard.blocks == self._capacity:
                self._submit(shard)

    def __contains__(self, key: bytes) -> bool:
        return self._locate(key) is not None

    def _locate(self, key: bytes) -> tuple[int, int] | None:
        """(shard seq, slot) of a block this writer holds, confirmed on the whole key."""
        for where in self._where.candidates(key):
            seq, slot = divmod(where, self._capacity)
            if self._holds(seq, slot, key):
                return seq, slot
        return None

    def _holds(self, seq: int, slot: int, key: bytes) -> bool:
        """Whether slot ``slot`` of shard ``seq`` holds the block ``key``."""
        shard = self._live.get(seq)
        if shard is not None:
            return slot < shard.blocks and shard.keys[slot].tobytes() == key
        # Committed: the key is in our segment, whose rows are sorted by key64.
        try:
            if self._segment_cache is None or self._segment_cache[0] != seq:
                self._segment_cache = (seq, Segment(self.path / INDEX_DIR / shard_name(self.writer_id, seq)))
            cols = self._segment_cache[1].cols
        except FileNotFoundError:
            # Never written (its write failed), or merged by a compaction (`prefixgen compact` beside
            # this build): the merged segment holds its rows, naming our shard, which stays.
            self._segment_cache = None
            return self._indexed_at(key, shard_name(self.writer_id, seq), slot)
        return _segment_holds(cols, slot, key)

    def _locate_many(self, keys: Sequence[BlockHash]) -> list[tuple[int, int] | None]:
        """:meth:`_locate` of each key, reading each committed segment once for all of them."""
        found: list[tuple[int, int] | None] = [None] * len(keys)
        committed: dict[int, list[tuple[int, int]]] = {}  # seq -> (key number, slot) to confirm in its segment
        for i, key in enumerate(keys):
            for where in self._where.candidates(key):
                seq, slot = divmod(where, self._capacity)
                if seq not in self._live:
                    committed.setdefault(seq, []).append((i, slot))
                elif self._holds(seq, slot, key):
                    found[i] = (seq, slot)
        for seq, asked in committed.items():
            try:
                cols = Segment(self.path / INDEX_DIR / shard_name(self.writer_id, seq)).cols
            except FileNotFoundError:
                cols = None  # not there: let _holds decide, key by key
            for i, slot in asked:
                if found[i] is None and (_segment_holds(cols, slot, keys[i]) if cols else self._holds(seq, slot, keys[i])):
                    found[i] = (seq, slot)
        return found

    def read_blocks(self, keys: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        """:meth:`read_block` of each key, or None where this writer does not hold it: one look-up in
        each segment and one open of each shard for all the keys, one read per run of consecutive
        slots (a build's pasts evicted from the device cache come back a key run at a time)."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        by_seq: dict[int, list[tuple[int, int]]] = {}
        for i, where in enumerate(self._locate_many(keys)):
            if where is not None:
                by_seq.setdefault(where[0], []).append((where[1], i))
        for seq, asked in by_seq.items():
            if seq in self._live:
                for _, i in asked:
                    out[i] = self.read_block(keys[i])  # from the host buffer: no file
                continue
            asked.sort()
            slots = np.asarray([slot for slot, _ in asked])
            runs = np.flatnonzero(np.r_[True, slots[1:] > slots[:-1] + 1, True])  # a slot asked twice stays in its run
            with self._open_shard(seq) as (fd, header):
                for a, b in zip(runs[:-1].tolist(), runs[1:].tolist()):
                    first = int(slots[a])
                    kv, scale = self._read_run(fd, header, seq, first, int(slots[b - 1]) - first + 1)
                    for slot, i in asked[a:b]:
                        j = slot - first
                        out[i] = self._as_past(kv[j : j + 1], None if scale is None else scale[j : j + 1])
        return out

    def _indexed_at(self, key: bytes, shard: str, slot: int) -> bool:
        """Whether the store's index has ``key`` at ``shard``/``slot``. The index is opened when first
        needed and again when it lacks the key (a later compaction may have merged it since)."""
        opened = self._index is None
        if self._index is None:
            self._index = StoreIndex.open(self.path)
        (loc,) = self._index.find([key])
        if loc is None and not opened:
            self._index = StoreIndex.open(self.path)
            (loc,) = self._index.find([key])
        return loc is not None and loc.shard == shard and loc.slot == slot

    def read_block(self, key: BlockHash) -> torch.Tensor:
        """KV of a block this writer holds, as stored: [B, L, 2, H, D] (dequantized for fp8)."""
        where = self._locate(key)
        if where is None:
            raise KeyError(f"block {key.hex()} is not one of this writer's")
        seq, slot = where
        shard = self._live.get(seq)
        if shard is not None:
            if shard.event is not None:
                shard.event.synchronize()
            elif self._pin:
                torch.cuda.current_stream().synchronize()  # its non-blocking copies may be in flight
            kv = shard.kv[slot : slot + 1]
            scale = shard.scale[slot : slot + 1] if shard.scale is not None else None
        else:
            with self._open_shard(seq) as (fd, header):
                kv, scale = self._read_run(fd, header, seq, slot, 1)
        return self._as_past(kv, scale)

    def _as_past(self, kv: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Stored blocks ([n, *block_shape], fp8 scales [n, *scale_shape]) as a past [n*B, L, 2, H, D]: token-major,
        dequantized for fp8."""
        if self.manifest.kv.heads_first:
            kv, scale = token_major(kv, scale)
            scale = None if scale is None else scale.contiguous()
        kv = kv.reshape(-1, *self.manifest.kv.token_shape)
        if scale is not None:
            return dequantize_fp8(kv, scale, self._bs, TORCH_DTYPES[self.manifest.kv.dtype])
        return kv

    @contextlib.contextmanager
    def _open_shard(self, seq: int) -> Iterator[tuple[int, SafetensorsHeader]]:
        """(file descriptor, header) of this writer's committed shard ``seq``."""
        path = self.path / SHARDS_DIR / shard_name(self.writer_id, seq)
        with open(path, "rb", buffering=0) as f:
            yield f.fileno(), read_safetensors_header(f, path)

    def _read_run(
        self, fd: int, header: SafetensorsHeader, seq: int, slot: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored blocks [n, *block_shape] (and fp8 scales [n, *scale_shape]) of slots ``slot`` .. ``slot+n-1``."""
        layout = self.manifest.kv
        kv = torch.empty((n, *layout.block_shape(self._bs)), dtype=TORCH_DTYPES[layout.stored_dtype])
        scale = torch.empty((n, *layout.scale_shape)) if self._fp8 else None
        scale_bytes = scale.view(torch.uint8).numpy() if scale is not None else None
        if not read_shard_blocks(fd, header, layout, self._bs, slot, kv.view(torch.uint8).numpy(), scale_bytes):
            raise StoreError(f"{shard_name(self.writer_id, seq)} is truncated: another process changed this writer's shard")
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
        shard.seq, shard.event, shard.blocks = self._seq, None, 0
        self._seq += 1
        self._live[shard.seq] = shard
        self._current = shard
        return shard

    def _allocate(self) -> _Shard:
        layout = self.manifest.kv
        shape = (self._capacity, *layout.block_shape(self._bs))
        kv = torch.empty(shape, dtype=TORCH_DTYPES[layout.stored_dtype], pin_memory=self._pin)
        scale = None
        if self._fp8:
            scale = torch.empty((self._capacity, *layout.scale_shape), pin_memory=self._pin)
        tokens = np.zeros((self._capacity, self._bs), dtype=np.uint32)
        keys = np.zeros((self._capacity, 32), dtype=np.uint8)
        parents = np.zeros((self._capacity, 32), dtype=np.uint8)
        depths = np.zeros(self._capacity, dtype=np.uint32)
        return _Shard(seq=-1, kv=kv, scale=scale, tokens=tokens, keys=keys, parents=parents, depths=depths)

    def _submit(self, shard: _Shard) -> None:
        if self._pin:
            shard.event = torch.cuda.Event()
            shard.event.record()
        self._current = None
        previous, self._last_commit = self._last_commit, _Commit()
        self._futures.append(self._pool.submit(self._write_shard, shard, previous, self._last_commit))

    def _write_shard(self, shard: _Shard, previous: _Commit, mine: _Commit) -> None:
        try:
            if shard.event is not None:
                shard.event.synchronize()
            t = time.perf_counter()
            self._write_files(shard, previous, mine)
            with self._lock:
                self.write_seconds += time.perf_counter() - t
        finally:
            mine.done.set()
            self._free.put(shard)

    def _write_files(self, shard: _Shard, previous: _Commit, mine: _Commit) -> None:
        n, layout = shard.blocks, self.manifest.kv
        name = shard_name(self.writer_id, shard.seq)
        meta = {"format_version": str(self.manifest.format_version), "writer": self.writer_id, "build": self.build_id}
        header = encode_safetensors_header(shard_tensors(layout, self._bs, n), meta)
        kv_bytes = shard.kv[:n].view(torch.uint8).numpy().reshape(-1)
        parts: list = [header, kv_bytes.data]
        scale_bytes = None
        if shard.scale is not None:
            scale_bytes = shard.scale[:n].numpy().astype("<f4").tobytes()
            parts.append(scale_bytes)
        # An fp8 block's CRC covers its KV bytes, then its scales (head-major: per head, the block's of its head CRCs).
        crcs, head_crcs = block_checksums(kv_bytes, scale_bytes, layout, self._bs, self.manifest.block_checksum)
        if head_crcs is not None:
            parts.append(head_crcs.astype("<u4").tobytes())
        parts.append(shard.tokens[:n].astype("<u4").tobytes())
        size = atomic_write(self.path / SHARDS_DIR / name, parts, self.fsync, owner=self.writer_id)
        columns = {
            "key": shard.keys[:n],
            "parent": shard.parents[:n],
            "slot": np.arange(n, dtype=np.uint32),
            "depth": shard.depths[:n],
            "crc": crcs,
        }
        seg_meta = {
            "format_version": str(self.manifest.format_version),
            "shard": name,
            "shard_bytes": str(size),
            "shard_crc32": str(shard_checksum(header, crcs)),
            "blocks": str(n),
            "writer": self.writer_id,
            "build": self.build_id,
        }
        seg = encode_segment(columns, seg_meta)
        # Commit in order: a block's parent may be in the shard before. A later shard's failure
        # does not matter here: this shard is whole, so it commits.
        previous.done.wait()
        if not previous.ok:
            return  # an earlier shard failed: committing this one could orphan its blocks
        size += atomic_write(self.path / INDEX_DIR / name, seg, self.fsync, owner=self.writer_id)
        mine.ok = True
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
        """Flush and stop the write threads. Safe to call twice. The writer stays live (it may still
        write its build record and counts) until :meth:`release`."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def release(self) -> None:
        """Give up the writer's lock: it writes nothing more. Safe to call twice."""
        self._drop_reserve()
        self._lock_file.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            self.release()

    # ------------------------------------------------------------------ build records

    def keep_record_room(self) -> None:
        """Keep RECORD_RESERVE_BYTES for the record that will say how this writer's run ended:
        ``builds/<build_id>.json.reserve.<writer>.tmp`` (a rank's ``builds/<build_id>.<part>.json.reserve.<writer>.tmp``:
        set :attr:`part` first), a temporary file of this writer's (gc
        removes it if the writer dies) that :meth:`write_build` turns into that record, however
        full the disk is by then (another process may take its last page meanwhile). Call it
        before any record of the run exists: a disk too full for it (OSError, ENOSPC) then fails
        the run with no record left "running". Once per writer."""
        if self._reserved:
            return
        room = temp_path(self.path / BUILDS_DIR / record_room_name(self.build_id, self.part), self.writer_id)
        room.parent.mkdir(exist_ok=True)
        keep_room(room, RECORD_RESERVE_BYTES)
        self._reserve, self._reserved = room, True

    def write_build(self, record: BuildRecord) -> None:
        """Atomically (re)write ``builds/<build_id>.json`` (a rank's: ``builds/<build_id>.ranks/<part>.json``).

        A "running" record must be followed by one that says how the run ended, even on a disk
        that is full by then: the first record that is not "running" goes into the room kept by
        :meth:`keep_record_room` (kept here, before the first "running" record, if the caller did
        not). A checkpoint ("running") that meets a full disk fails without touching that room."""
        data = (json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n").encode()
        path = self.path / BUILDS_DIR / f"{record.build_id}.json"
        if self.part:
            path = path.with_name(record.build_id + RANK_PARTS_SUFFIX) / f"{self.part}.json"
            path.parent.mkdir(exist_ok=True)
        if record.status == "running":
            self.keep_record_room()
            atomic_write(path, [data], self.fsync, owner=self.writer_id)
            return
        room, self._reserve = self._reserve, None
        if room is not None and len(data) <= RECORD_RESERVE_BYTES:
            write_into_room(room, path, data, self.fsync)
            return
        if room is not None:
            room.unlink(missing_ok=True)
        atomic_write(path, [data], self.fsync, owner=self.writer_id)

    def _drop_reserve(self) -> None:
        """Free the room kept for the last record (the writer writes no record any more)."""
        path, self._reserve = self._reserve, None
        if path is not None:
            path.unlink(missing_ok=True)

    def write_counts(self, keys: np.ndarray, records: np.ndarray) -> None:
        """Append the record counts of blocks counted since the last call, as a new file
        ``counts/<build>.[<rank part>.]<writer>.<n>.safetensors`` (``keys`` [n, 32] uint8, ``records`` [n]).
        A block's count is the sum over every file in ``counts/``, so nothing is ever rewritten."""
        n = len(keys)
        if not n:
            return
        specs = [TensorSpec(name, dt_, (n, w) if w > 1 else (n,)) for name, (dt_, w) in COUNT_COLUMNS.items()]
        meta = {"build": self.build_id, "writer": self.writer_id, "format_version": str(self.manifest.format_version)}
        name = f"{self._counts_prefix()}{self.writer_id}.{self._counts_seq:06d}.safetensors"
        data = [encode_safetensors_header(specs, meta), np.ascontiguousarray(keys, np.uint8).tobytes()]
        data.append(np.asarray(records, dtype="<u8").tobytes())
        atomic_write(self.path / COUNTS_DIR / name, data, self.fsync, owner=self.writer_id)
        self._counts_seq += 1

    def _counts_prefix(self) -> str:
        return f"{self.build_id}.{self.part + '.' if self.part else ''}"

    def drop_old_counts(self) -> None:
        """A resumed build counts its records again from the start: remove the counts of its
        earlier (dead) writers, or refuse if one of them still runs. A rank of a distributed build
        removes only its own rank's counts (the other ranks' writers may be running beside it)."""
        prefix = self._counts_prefix()
        for p in sorted((self.path / COUNTS_DIR).glob(f"{prefix}*safetensors")):
            owner = p.name[len(prefix) :].split(".")[0]
            if ID_PATTERN.fullmatch(owner) and owner != self.writer_id and writer_is_live(self.path, owner):
                self.release()
                raise StoreError(f"build {self.build_id} is still running (writer {owner} is live): wait for it to finish")
            p.unlink(missing_ok=True)


def record_room_name(build_id: str, part: str | None) -> str:
    """The name (before ``.<writer>.tmp``) of the room a writer of build ``build_id`` keeps for its
    last record (:meth:`StoreWriter.keep_record_room`): ``<build_id>[.<part>].json.reserve``."""
    return f"{build_id}.{part + '.' if part else ''}json.reserve"


def record_rooms(store: Path, build_id: str) -> dict[str, str | None]:
    """The writers of build ``build_id`` that keep a room for their last record, each with its rank
    part (None: one process). A writer keeps it from right after it takes its lock until its last
    record is written: with its record (a rank's part), this names every writer of the build that
    may still use the build's files, even one that has not written any record yet."""
    rooms: dict[str, str | None] = {}
    for p in (Path(store) / BUILDS_DIR).glob(f"{build_id}.*json.reserve.*{TMP_SUFFIX}"):
        owner = temp_owner(p.name)
        end = f"json.reserve.{owner}{TMP_SUFFIX}"
        if owner is not None and ID_PATTERN.fullmatch(owner) and p.name.endswith(end):
            middle = p.name[len(build_id) + 1 : -len(end)]  # "" (one process) or "<part>."
            rooms[owner] = middle[:-1] or None
    return rooms


def _segment_holds(cols: dict[str, np.ndarray], slot: int, key: bytes) -> bool:
    """Whether the segment columns ``cols`` (rows sorted by key64) hold ``key`` at ``slot``."""
    q = np.uint64(int.from_bytes(key[:8], "little"))
    rows = range(int(np.searchsorted(cols["key64"], q, "left")), int(np.searchsorted(cols["key64"], q, "right")))
    return any(int(cols["slot"][r]) == slot and cols["key"][r].tobytes() == key for r in rows)


def _store_write_error(path: Path, exc: BaseException) -> StoreError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreError(
            f"the disk holding {path} is full ({exc.strerror}): free some space, then rerun the same command with --resume "
            "(everything written so far is kept)"
        )
    return StoreError(f"writing to {path} failed: {exc}")


# --------------------------------------------------------------------------- liveness


LOCK_ROLES = ("build", "compact", "prune", "gc")  # what a lock's holder does, written in its lock file
_MOUNT_HINT = (
    "keep the store on a local disk, on NFS mounted without local_lock=flock/all and nolock, "
    "on Lustre mounted with -o flock, or on BeeGFS with tuneUseGlobalFileLocks = true (README.md, 'Shared file systems')"
)


class WriterLock:
    """``locks/<owner>.lock``, held with an exclusive ``flock`` while its process may still create
    files named for ``owner``. The kernel releases it when the process dies (``kill -9`` too); a
    clean end removes the file. The file says ``pid <pid> <role>`` (``role`` one of LOCK_ROLES),
    so that ``prune`` can tell builds from maintenance jobs.

    Example:
        >>> lock = WriterLock(Path("store"), new_id())  # doctest: +SKIP
        >>> writer_is_live(Path("store"), lock.owner)  # doctest: +SKIP
        True
    """

    def __init__(self, store: Path, owner: str, role: str = "build"):
        assert role in LOCK_ROLES
        check_file_system(Path(store))
        self.owner, self.role = owner, role
        folder = Path(store) / LOCKS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{owner}.lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                os.close(fd)
                raise StoreError(
                    f"cannot lock {self.path} ({exc.strerror}): this file system does not support flock; {_MOUNT_HINT}"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # a cleaner took the file for a dead one's between our open and flock: again
        # Written before the holder looks at other locks, so a prune and a build that start at once
        # cannot both miss each other (each locks, then reads the other's lock and role).
        # Whole (a write may be short) and fsynced: on NFS another node reads the server's copy, and
        # an empty role line reads as a build, which stops a prune on every node.
        line = memoryview(f"pid {os.getpid()} {role}\n".encode())
        try:
            while line:
                line = line[os.write(fd, line) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise _store_write_error(self.path, exc) from None
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


@contextmanager
def maintenance_lock(store: Path, role: str) -> Iterator[str]:
    """Hold a writer lock under a fresh id while a maintenance job (``compact``, ``prune``, ``gc``)
    runs, so that ``gc`` and ``--resume`` never take its files for a dead writer's; yields the id.
    A compaction refuses to start while a prune runs (:func:`refuse_beside_prune`).

    Example:
        >>> with maintenance_lock(Path("store"), "compact") as owner:  # doctest: +SKIP
        ...     atomic_write(path, data, owner=owner)
    """
    lock = WriterLock(Path(store), new_id(), role)
    try:
        if role == "compact":
            refuse_beside_prune(Path(store), lock.owner)
        yield lock.owner
    finally:
        lock.release()


def lock_role(store: Path, owner: str) -> str:
    """The role written in ``owner``'s lock file; ``build`` for files without one (older writers,
    or a holder that has not written it yet: the cautious answer)."""
    try:
        words = (Path(store) / LOCKS_DIR / f"{owner}.lock").read_text().split()
    except OSError:
        return "build"
    return words[2] if len(words) > 2 and words[2] in LOCK_ROLES else "build"


def refuse_beside_prune(store: Path, me: str) -> None:
    """Raise if a prune runs on ``store``: it deletes blocks a new writer could use as parents, and
    segments a compaction could merge. Called by a writer once it holds its own lock."""
    for owner in live_writers(store):
        if owner != me and lock_role(store, owner) == "prune":
            raise StoreError(f"{store} is being pruned (prune {owner} is running): wait for it to finish, then retry")


# FUSE file systems whose flock is not seen from other machines (object-store and ssh mounts).
FUSE_WITHOUT_SHARED_LOCKS = frozenset({"sshfs", "s3fs", "gcsfuse", "rclone", "goofys", "blobfuse", "blobfuse2", "mountpoint-s3"})
BEEGFS_CLIENT_CONF = Path("/etc/beegfs/beegfs-client.conf")


def _beegfs_global_locks(conf: Path | None) -> bool:
    """Whether the BeeGFS client shares flock locks between nodes (``tuneUseGlobalFileLocks = true``)."""
    try:
        text = (conf or BEEGFS_CLIENT_CONF).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "tuneUseGlobalFileLocks":
            return value.split("#")[0].strip().lower() == "true"
    return False


def check_file_system(store: Path, mounts: str | None = None, beegfs_conf: Path | None = None) -> None:
    """Refuse a store on a file system where ``flock`` would not tell running writers from dead
    ones across machines: NFS mounted with ``nolock`` or ``local_lock=flock|all``, Lustre without
    ``-o flock`` (``localflock`` locks per node, ``noflock`` not at all), BeeGFS without
    ``tuneUseGlobalFileLocks`` (in ``beegfs_conf``, the client's config), FUSE mounts of object stores
    or ssh (``FUSE_WITHOUT_SHARED_LOCKS``). ``mounts`` is the text of
    ``/proc/mounts`` (read when None; nothing is checked where it does not exist).

    Example:
        >>> check_file_system(Path("/shared/store"), "srv:/x /shared nfs4 rw,local_lock=flock 0 0\n")
        Traceback (most recent call last):
        prefixgen.errors.StoreError: /shared/store is on nfs4 mounted with local_lock=flock: ...
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return
    where = os.path.realpath(store)
    best = ("", "", set())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2], set(fields[3].split(",")))
    _, fstype, options = best
    bad = None
    if fstype.startswith("nfs"):
        bad = next((o for o in ("nolock", "local_lock=flock", "local_lock=all") if o in options), None)
    elif fstype == "lustre" and "flock" not in options:
        bad = "localflock" if "localflock" in options else "noflock" if "noflock" in options else "no flock option"
    elif fstype == "beegfs" and not _beegfs_global_locks(beegfs_conf):
        bad = "tuneUseGlobalFileLocks off (its default: flock is local to each node)"
    elif fstype.startswith("fuse.") and fstype[len("fuse.") :] in FUSE_WITHOUT_SHARED_LOCKS:
        bad = "FUSE (its flock is local to each node, or a no-op)"
    if bad:
        raise StoreError(
            f"{store} is on {fstype} mounted with {bad}: a writer's lock would not be seen from other machines, "
            f"so gc, --resume and prune could delete a running build's files; {_MOUNT_HINT}"
        )


def _probe(store: Path, owner: str, exclusive: bool = False) -> tuple[bool, int | None]:
    """(held by a process, fd) for ``owner``'s lock file; fd is the lock file, open and locked by us,
    when it is free (the caller closes it), None when held or missing ((False, None) when missing).

    Opened read-write: NFS emulates flock with POSIX locks, which refuse an exclusive lock on a
    read-only descriptor (EBADF). Any error other than "held" is "cannot tell", raised as a
    StoreError that says so: never a guess, never a traceback."""
    path = Path(store) / LOCKS_DIR / f"{owner}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False, None
    except OSError as exc:
        raise _cannot_tell(store, owner, path, "opening it read-write", exc) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True, None
    except OSError as exc:
        os.close(fd)
        raise _cannot_tell(store, owner, path, "locking it", exc) from None
    return False, fd


def _cannot_tell(store: Path, owner: str, path: Path, doing: str, exc: OSError) -> StoreError:
    return StoreError(
        f"cannot tell whether writer {owner} of {store} is still running: {doing} failed on its lock file {path} "
        f"({exc.strerror or exc}); nothing of it was removed. The file must be readable and writable by this user, "
        f"and the file system must support flock: {_MOUNT_HINT}"
    )


def writer_is_live(store: Path, owner: str) -> bool:
    """Whether the writer (or maintenance job) ``owner`` may still create or rename files in
    ``store``: its lock file exists and a process holds it. A writer that ended, was killed, or
    came from a prefixgen without locks is not live, and its leftovers may be removed. Raises
    StoreError when it cannot tell (see :func:`_probe`).

    Example:
        >>> writer_is_live(Path("store"), "20261127T093251-4242-abcdef")  # doctest: +SKIP
        False
    """
    held, fd = _probe(store, owner)
    if fd is not None:
        os.close(fd)
    return held


def live_writers(store: Path) -> list[str]:
    """Owners whose lock is held now."""
    folder = Path(store) / LOCKS_DIR
    owners = sorted(p.name[: -len(".lock")] for p in folder.glob("*.lock")) if folder.is_dir() else []
    return [o for o in owners if writer_is_live(store, o)]


def temp_owner(name: str) -> str | None:
    """The writer a temporary file belongs to: ``<name>.<owner>.tmp``, or for files of writers
    before owners were named, the writer id that starts a shard or segment name.

    Example:
        >>> temp_owner("b.json.20261127T093251-4242-abcdef.tmp")
        '20261127T093251-4242-abcdef'
    """
    if not name.endswith(TMP_SUFFIX):
        return None
    stem = name[: -len(TMP_SUFFIX)]
    last = stem.rpartition(".")[2]
    if ID_PATTERN.fullmatch(last):
        return last
    match = ID_PATTERN.match(stem)
    return match.group(0) if match else None


def remove_lock_if_dead(store: Path, owner: str) -> bool:
    """Remove ``owner``'s lock file if no process holds it; True if it was removed. Raises
    StoreError when it cannot tell (see :func:`_probe`)."""
    _, fd = _probe(store, owner, exclusive=True)
    if fd is None:
        return False
    path = Path(store) / LOCKS_DIR / f"{owner}.lock"
    try:
        # The path must still name the file we locked: another cleaner may have unlinked that one
        # (while we waited to lock it) and its owner, retrying, created and locked a new one there.
        # Nobody can swap the path while we hold the lock on the file it names.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            return False
        path.unlink()  # while holding it, so a starting owner sees it gone and retries
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot remove the lock file {path} of dead writer {owner}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return True


CLOCK_PREFIX = ".clock-"  # claims/<...>/.clock-<owner>: a rank's probe of the file system's clock
ANONYMOUS_TEMP_SECONDS = 600.0  # a temporary file named for no writer (a manifest's creator) older than this is left over
# Everything gc looks in: the store's folders and its own (temporary manifests).
REMOVE_DIRS = (SHARDS_DIR, INDEX_DIR, BUILDS_DIR, COUNTS_DIR, CLAIMS_DIR, STATES_DIR, MANIFEST_FILE)


def _age(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def remove_temp_files(path: Path, dry_run: bool = False, dirs: tuple[str, ...] = REMOVE_DIRS, locks: bool = True) -> list[Path]:
    """Delete the ``*.tmp`` files (in ``dirs``) of writers that are not live, and (``locks``) their lock
    files; never touch a live writer's. Returns what was (or, with ``dry_run``, would be) removed.

    Example:
        >>> remove_temp_files(Path("store"))  # doctest: +SKIP
        [PosixPath('store/shards/2026...-000003.safetensors.2026....tmp')]
    """
    removed: list[Path] = []
    live: dict[str, bool] = {}
    candidates: list[tuple[Path, str | None]] = []
    for sub in dirs:
        # builds/ and claims/ hold folders (a distributed build's rank parts, plan runs and claims):
        # their temporary files and clock probes are a writer's leftovers too.
        deep = sub in (BUILDS_DIR, CLAIMS_DIR)
        for p in sorted((path / sub).rglob("*") if deep else (path / sub).glob(f"*{TMP_SUFFIX}")):
            if p.name.endswith(TMP_SUFFIX):
                candidates.append((p, temp_owner(p.name)))
            elif deep and p.name.startswith(CLOCK_PREFIX) and ID_PATTERN.fullmatch(p.name[len(CLOCK_PREFIX) :]):
                candidates.append((p, p.name[len(CLOCK_PREFIX) :]))
    if MANIFEST_FILE in dirs:
        # The store's own folder: temporary manifests (a format upgrade's are named for its writer;
        # a creator's have a random name and live for milliseconds: only old ones are leftovers).
        for p in sorted(path.glob(f"{MANIFEST_FILE}.*{TMP_SUFFIX}")):
            owner = temp_owner(p.name)
            if owner is not None and ID_PATTERN.fullmatch(owner):
                candidates.append((p, owner))
            elif _age(p) > ANONYMOUS_TEMP_SECONDS:
                candidates.append((p, None))
    for p, owner in candidates:
        if owner is not None and live.setdefault(owner, writer_is_live(path, owner)):
            continue
        if not dry_run:
            p.unlink(missing_ok=True)
        removed.append(p)
    folder = path / LOCKS_DIR
    for p in sorted(folder.glob("*.lock")) if folder.is_dir() and locks else []:
        owner = p.name[: -len(".lock")]
        if dry_run:
            if not writer_is_live(path, owner):
                removed.append(p)
        elif remove_lock_if_dead(path, owner):
            removed.append(p)
    return removed
