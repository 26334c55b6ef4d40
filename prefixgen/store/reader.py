"""The read side's public API: open a store, match a prompt, load its KV as a transformers cache.

Example:
    >>> from prefixgen import PrefixStore
    >>> store = PrefixStore.open("store")  # doctest: +SKIP
    >>> n = store.match(prompt_ids)  # doctest: +SKIP
    >>> cache = store.load(prompt_ids[: n - 1 if n == len(prompt_ids) else n])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from prefixgen.errors import CorruptBlockError, CorruptStoreError, IncompatibleStoreError, MissingShardError, StoreError
from prefixgen.format import (
    BUILDS_DIR,
    COUNT_COLUMNS,
    COUNTS_DIR,
    MANIFEST_FILE,
    RANK_PARTS_SUFFIX,
    SHARDS_DIR,
    ST_DTYPES,
    TORCH_DTYPES,
    BlockHash,
    BuildRecord,
    KVLayout,
    Manifest,
    SafetensorsHeader,
    block_checksums,
    block_crcs,
    block_keys,
    dequantize_fp8,
    head_row_crcs,
    merge_rank_parts,
    read_safetensors_header,
    read_shard_blocks,
    read_shard_heads,
    token_major,
)
from prefixgen.kvcache import hybrid_to_cache, recurrent_layers, rows_to_cache
from prefixgen.model import fingerprint, probe_kv_layout
from prefixgen.store.blockcache import BlockCache
from prefixgen.store.index import BlockLocation, StoreIndex
from prefixgen.store.states import last_state, read_state

PIECE_BYTES = 16 << 20  # one read request (and one staging slot)
# A shard missing under a changed index: wait this long before each new try (the index is reopened first).
REOPEN_BACKOFF = (0.0, 0.05, 0.25)
STAGING_SLOTS = 4
READ_THREADS = 4


class ReadCount:
    """Bytes a caller's reads took from shard files (KV, fp8 scales, head checksums), added up across its threads."""

    def __init__(self) -> None:
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


@dataclass(slots=True)
class _Run:
    """Consecutive slots of one shard: read with one request."""

    shard: str
    first_slot: int
    blocks: int
    out_block: int  # where the run goes in the result, in blocks
    crcs: list[int]


@dataclass(slots=True)
class PrefixMatch:
    """The longest held prefix of a chain of block keys: its first ``len(hot)`` blocks are in a
    device cache, the next ``len(keys)`` in the store at ``locations``."""

    hot: list[BlockHash]
    keys: list[BlockHash]
    locations: list[BlockLocation]

    @property
    def blocks(self) -> int:
        return len(self.hot) + len(self.keys)


class PrefixStore:
    """A prefix store opened for reading. Cheap to open: large index segments are searched in place.

    A store may change while it is read (an append, a compaction, a prune, gc): :meth:`refresh` reopens
    the index when its folder changed, and a read that finds a shard gone (:class:`MissingShardError`)
    reopens the index and tries again (:meth:`read_prefix`, :meth:`load`).

    Safe to read from several threads: CUDA reads take turns on the one ring of pinned staging
    buffers (a lock); CPU reads share no buffers.

    Example:
        >>> store = PrefixStore.open("store")  # doctest: +SKIP
        >>> store.block_size
        16
    """

    def __init__(self, path: Path, manifest: Manifest, index: StoreIndex):
        self.path = path
        self.manifest = manifest
        self.index = index
        self._headers: dict[str, SafetensorsHeader] = {}
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event]] | None = None  # pinned ring, CUDA only
        self._staging_lock = threading.Lock()  # one read at a time uses the ring
        self._reopen_lock = threading.Lock()  # one reopen at a time

    @classmethod
    def open(cls, path: str | os.PathLike) -> PrefixStore:
        """Open the store at ``path``; a missing, corrupt or newer-format manifest is a clear error.

        Example:
            >>> PrefixStore.open("no/such/store")
            Traceback (most recent call last):
            prefixgen.errors.StoreError: no/such/store is not a prefixgen store: it has no manifest.json (build one with `prefixgen build`)
        """
        path = Path(path)
        return cls(path, read_manifest(path), StoreIndex.open(path))

    def refresh(self) -> bool:
        """Reopen the index if its folder changed since it was read (:meth:`StoreIndex.changed`): blocks
        appended since are found, blocks pruned or compacted elsewhere are found where they are now.
        True if it was reopened. Lookups running meanwhile finish on the old index.

        Example:
            >>> store.refresh()  # after `prefixgen build --append` elsewhere  # doctest: +SKIP
            True
        """
        with self._reopen_lock:
            if not self.index.changed():
                return False
            self.index = self.index.reopened()
            self._headers = {}
            return True

    # ------------------------------------------------------------------ matching

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.manifest.block_size

    def keys(self, token_ids: Sequence[int]) -> list[BlockHash]:
        """Block keys of ``token_ids`` under this store's model (full blocks only)."""
        return block_keys(_as_list(token_ids), self.block_size, self.manifest.root_key)

    def match(self, token_ids: Sequence[int]) -> int:
        """Tokens covered by the longest stored prefix of ``token_ids`` (a multiple of
        ``block_size``; 0 if none).

        Example:
            >>> store.match(tokenizer("You are a helpful assistant. Hi!").input_ids)  # doctest: +SKIP
            16
        """
        return self.find_prefix(self.keys(token_ids)).blocks * self.block_size

    def find_prefix(self, keys: Sequence[BlockHash], hot: BlockCache | None = None) -> PrefixMatch:
        """The longest prefix of the chained block ``keys`` that is held: first the leading blocks in
        ``hot`` (a device cache; their recency is not touched), then the blocks after them that the
        store holds. The walk stops at the first block missing from both, since a block's KV is
        only valid after all of its parents'. The one longest-prefix walk of the read side.

        Example:
            >>> m = store.find_prefix(store.keys(ids), hot=device_cache)  # doctest: +SKIP
            >>> m.blocks * store.block_size  # tokens covered  # doctest: +SKIP
            48
        """
        n_hot = 0 if hot is None else next((i for i, key in enumerate(keys) if key not in hot), len(keys))
        rest = list(keys[n_hot:])
        found = self.index.find_prefix(rest)
        return PrefixMatch(list(keys[:n_hot]), rest[: len(found)], found)

    # ------------------------------------------------------------------ loading

    def load(
        self,
        token_ids: Sequence[int],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        verify: bool = True,
    ) -> DynamicCache:
        """A DynamicCache (batch 1) holding the KV of the longest stored prefix of ``token_ids``.

        Reads only the bytes of the returned blocks, checks each block's CRC (``verify``), and
        returns keys and values as ``[1, kv_heads, n, head_dim]`` per layer in the model's dtype
        (or ``dtype``); for an MLA store the latent ``[1, 1, n, kv_lora_rank]`` and the rope key
        ``[1, 1, n, rope_dim]``, as transformers' DeepSeek cache holds them. Sliding-window and chunked
        layers get every token: the model masks what lies outside their window. An empty cache if
        nothing matches.

        ``generate`` needs at least one prompt token that is not in the cache: when the whole
        prompt is stored, load ``token_ids[:-1]`` rounded down to a block (see README).

        Example:
            >>> ids = tokenizer(prompt).input_ids  # doctest: +SKIP
            >>> cache = store.load(ids[:-1], device="cuda")  # doctest: +SKIP
            >>> model.generate(torch.tensor([ids]), cache=cache)  # doctest: +SKIP
        """
        keys = self.keys(token_ids)
        if recurrent_layers(self.manifest.kv):
            return self._load_hybrid(keys, device, dtype, verify)
        _, kv = self.read_prefix(keys, device=device, dtype=dtype, verify=verify)  # [T, L, parts, H, D]
        return kv_to_cache(kv, self.manifest.kv)

    def _load_hybrid(
        self, keys: list[BlockHash], device: str | torch.device, dtype: torch.dtype | None, verify: bool
    ) -> DynamicCache:
        """A hybrid model's cache: up to the last matched block whose recurrent state is stored
        (``prefixgen.store.states``), the attention layers' KV of its blocks and that state."""
        n = last_state(self.path, keys[: self.find_prefix(keys).blocks])
        match, kv = self.read_prefix(keys[:n], device=device, dtype=dtype, verify=verify) if n else (None, None)
        if match is not None and match.blocks < n:  # the store changed meanwhile: a shorter prefix still has a state
            n = last_state(self.path, keys[: match.blocks])
            kv = kv[: n * self.block_size]
        if not n:
            return hybrid_to_cache(None, None, None, self.manifest.kv, 0)
        tokens = n * self.block_size
        conv, ssm = read_state(self.path, keys[n - 1], tokens)
        # The states keep the dtypes the model computed them in (Gated DeltaNet's SSM state is float32 in a bf16 model).
        return hybrid_to_cache(kv, conv.to(device), ssm.to(device), self.manifest.kv, tokens)

    def read_prefix(
        self,
        keys: Sequence[BlockHash],
        hot: BlockCache | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        verify: bool = True,
    ) -> tuple[PrefixMatch, torch.Tensor]:
        """:meth:`find_prefix` of ``keys`` and the KV of its stored blocks (:meth:`read_locations`:
        ``[len(match.keys) * B, L, parts, H, D]``). A shard found missing means the store changed since its
        index was read (a prune, compaction or gc removed it): the index is reopened and the prefix
        looked up again, after a short wait (``REOPEN_BACKOFF``), while the index keeps changing; a
        shard missing from an unchanged index is a :class:`MissingShardError` (the store is damaged).

        Example:
            >>> match, kv = store.read_prefix(store.keys(ids))  # doctest: +SKIP
        """
        for delay in (*REOPEN_BACKOFF, None):
            found = self.find_prefix(keys, hot=hot)
            try:
                return found, self.read_locations(found.locations, device=device, dtype=dtype, verify=verify)
            except MissingShardError:
                if delay is None:
                    raise
                time.sleep(delay)
                if not self.refresh():
                    raise
        raise AssertionError("unreachable")

    def read_blocks(
        self, keys: Sequence[BlockHash], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """KV of the given blocks, back to back: ``[len(keys) * B, L, 2, H, D]``. Every key must be stored."""
        locations = self.index.find(keys)
        if any(loc is None for loc in locations):
            raise StoreError(f"{self.path}: {sum(loc is None for loc in locations)} of the asked blocks are not stored")
        return self.read_locations(locations, device=device, dtype=dtype)  # type: ignore[arg-type]

    def read_locations(
        self,
        locations: Sequence[BlockLocation],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        verify: bool = True,
        heads: range | None = None,
        buffer: torch.Tensor | None = None,
        layers: range | None = None,
        threads: int = READ_THREADS,
        count: ReadCount | None = None,
    ) -> torch.Tensor:
        """:meth:`read_stored`'s blocks as token-major KV rows ``[blocks * B, L, 2, H, D]`` in ``dtype`` (the
        store's model dtype if None) on ``device``: see :meth:`read_stored` for the arguments. Without a conversion
        (same dtype, not fp8) a token-major store's rows read into ``buffer`` are a view of it; a head-major store's
        are a new tensor (transposed)."""
        stored = self.read_stored(locations, device, verify, heads, buffer, layers, threads, count)
        return stored.rows(dtype or TORCH_DTYPES[self.manifest.kv.dtype])

    def read_stored(
        self,
        locations: Sequence[BlockLocation],
        device: str | torch.device = "cpu",
        verify: bool = True,
        heads: range | None = None,
        buffer: torch.Tensor | None = None,
        layers: range | None = None,
        threads: int = READ_THREADS,
        count: ReadCount | None = None,
    ) -> StoredKV:
        """KV at ``locations``, back to back, as stored (:class:`StoredKV`: no transpose, no dtype
        conversion; :meth:`StoredKV.rows` makes vLLM's token-major rows of it, on whatever device it was
        moved to): on ``device``; only the KV heads in ``heads`` if given (e.g. one tensor-parallel
        rank's), only the layers in ``layers`` if given (e.g. one pipeline stage's).

        ``buffer`` (CPU only): a contiguous, 4-byte aligned host tensor of at least :meth:`staged_bytes`
        (the blocks' stored bytes, and an fp8 store's scales) to read into instead of new tensors, for a caller that reads piece after piece: a new tensor's pages
        are mapped (and zeroed by the kernel) on first touch, which costs more than reading a warm
        page cache into them. The result's ``kv`` (and fp8 ``scale``) is then a view of ``buffer`` (any order,
        any dtype), valid until the next read into it: a caller uploads it raw and converts it on the device.

        A block that fails its CRC (``verify``) raises :class:`CorruptBlockError` saying which.
        A head-major store (format 5) reads only the heads in ``heads`` of each block (one read per
        block) and checks them against the block's ``head_crc`` row, the row against the index: a
        damaged head outside ``heads`` fails nothing. A token-major store keeps a token's heads side by
        side, so every one is read and checked; on CPU the others are dropped in host memory before any
        conversion (on CUDA, after the upload). ``count`` adds up the bytes read from shard files.

        Whole blocks: consecutive slots of a shard are read with one request, cut into pieces of at most
        ``PIECE_BYTES`` read (and CRC-checked) by threads. On CUDA the pieces land in a ring of
        pinned staging buffers and go up with non-blocking copies while the next pieces are read.

        ``threads`` (CPU): how many threads read the pieces; 1 reads them in the calling thread (a
        caller with read threads of its own, which must not wait on a pool's threads: a read that
        hangs on a dead disk would keep such a pool, and the process exiting, waiting forever).
        """
        layout, bs = self.manifest.kv, self.block_size
        device = torch.device(device)
        n, H = len(locations), layout.num_kv_heads
        stored = TORCH_DTYPES[layout.stored_dtype]
        # A head-major store gives a rank its own heads straight from disk; a token-major one has them side by side
        # in every token, so it reads every head and drops the others in memory.
        part = heads if layout.heads_first and heads is not None and len(heads) < H else None
        raw_shape, scale_shape = _read_shapes(layout, bs, n, len(part) if part is not None else H)
        block_bytes = layout.bytes_per_token * bs * (len(part) if part is not None else H) // H  # bytes read per block
        pieces = _pieces(_runs(locations), max(1, PIECE_BYTES // (layout.bytes_per_token * bs)))
        if device.type == "cuda":
            result = torch.empty(raw_shape, dtype=stored, device=device)
            scales = None if scale_shape is None else torch.empty(scale_shape)
            with self._staging_lock:  # another thread's read would overwrite a slot between its CRC check and its copy
                self._read_to_device(pieces, result, scales, verify, part, block_bytes, count)
        else:
            result, scales = _host_result(buffer, raw_shape, stored, scale_shape, self.staged_bytes(n, heads))
            self._read_to_host(pieces, result, scales, verify, part, block_bytes, count, threads)
        if layout.heads_first:  # heads and layers are picked out as it is transposed (StoredKV.rows)
            return StoredKV(result, scales, True, bs, heads if part is None else None, layers)
        return StoredKV(*_token_major_views(result, scales, heads, layers), False, bs)

    def staged_bytes(self, blocks: int, heads: range | None = None) -> int:
        """Host bytes :meth:`read_stored` puts in a caller's ``buffer`` for ``blocks`` blocks of the KV heads in
        ``heads`` (all if None): their KV as stored (fp8: a byte a value; a head-major store: only those heads, a
        token-major one every head, side by side in each token) and, for fp8, their scales.

        Example:
            >>> store.staged_bytes(4)  # an fp8 store: 4 blocks' fp8 bytes and float32 scales  # doctest: +SKIP
            21120
        """
        layout, H = self.manifest.kv, self.manifest.kv.num_kv_heads
        h = len(heads) if layout.heads_first and heads is not None and len(heads) < H else H
        return blocks * h * (layout.head_bytes(self.block_size) + layout.head_scale_bytes())

    def _read_to_host(
        self,
        pieces: list[_Run],
        result: torch.Tensor,
        scales: torch.Tensor | None,
        verify: bool,
        part: range | None,
        block_bytes: int,
        count: ReadCount | None,
        threads: int,
    ) -> None:
        """Read ``pieces`` into the host tensor ``result`` (each at its ``out_block``, ``block_bytes`` a block) and
        their fp8 scales into ``scales``, on up to ``threads`` threads (1: in this one)."""
        flat = result.view(torch.uint8).view(-1).numpy()

        def read(piece: _Run) -> None:
            a = piece.out_block * block_bytes
            self._read_run(piece, flat[a : a + piece.blocks * block_bytes], scales, verify, part, count)

        if threads <= 1 or len(pieces) <= 1:
            for piece in pieces:
                read(piece)
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(pieces))) as pool:
                list(pool.map(read, pieces))

    def _read_to_device(
        self,
        pieces: list[_Run],
        result: torch.Tensor,
        scales: torch.Tensor | None,
        verify: bool,
        heads: range | None,
        block_bytes: int,
        count: ReadCount | None,
    ) -> None:
        if self._staging is None:
            self._staging = [
                (torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=True), torch.cuda.Event()) for _ in range(STAGING_SLOTS)
            ]
        ring = self._staging
        flat = result.view(torch.uint8).view(-1)

        def read(j: int) -> _Run:
            buf, event = ring[j % len(ring)]
            event.synchronize()  # the copy out of this slot (piece j - slots) is done
            piece = pieces[j]
            self._read_run(piece, buf[: piece.blocks * block_bytes].numpy(), scales, verify, heads, count)
            return piece

        with ThreadPoolExecutor(max_workers=len(ring)) as pool:
            futures = deque(pool.submit(read, j) for j in range(min(len(ring), len(pieces))))
            for j in range(len(pieces)):
                piece = futures.popleft().result()
                buf, event = ring[j % len(ring)]
                a, size = piece.out_block * block_bytes, piece.blocks * block_bytes
                flat[a : a + size].copy_(buf[:size], non_blocking=True)
                event.record()
                if j + len(ring) < len(pieces):
                    futures.append(pool.submit(read, j + len(ring)))
        torch.cuda.current_stream().synchronize()

    def _header(self, shard: str) -> SafetensorsHeader:
        header = self._headers.get(shard)
        if header is None:
            path = self.path / SHARDS_DIR / shard
            try:
                with open(path, "rb") as f:
                    header = read_safetensors_header(f, path)
            except FileNotFoundError:
                raise MissingShardError(f"{path} is missing but the index refers to it; run `prefixgen verify`") from None
            self._headers[shard] = header
        return header

    def _read_run(
        self,
        run: _Run,
        dest: np.ndarray,
        scales: torch.Tensor | None,
        verify: bool,
        heads: range | None = None,
        count: ReadCount | None = None,
    ) -> None:
        """Read ``run``'s KV bytes into ``dest`` (and its fp8 scales into ``scales``), checking CRCs: whole blocks, or
        (``heads``, a head-major store) only those heads of each block, checked against the block's ``head_crc`` row,
        the row against the index. A damaged head outside ``heads`` is not read, so it fails nothing here."""
        layout, bs = self.manifest.kv, self.block_size
        header = self._header(run.shard)
        path = self.path / SHARDS_DIR / run.shard
        scale_dest = None
        if scales is not None:
            scale_dest = scales[run.out_block : run.out_block + run.blocks].view(torch.uint8).numpy().reshape(-1)
        rows = np.empty((run.blocks, layout.num_kv_heads), np.uint32) if heads is not None else None
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            self._headers.pop(run.shard, None)
            raise MissingShardError(f"{path} is missing but the index refers to it; run `prefixgen verify`") from None
        with f:
            if rows is None:
                ok = read_shard_blocks(f.fileno(), header, layout, bs, run.first_slot, dest, scale_dest)
                got = dest.nbytes + (scale_dest.nbytes if scale_dest is not None else 0)
            else:
                got = read_shard_heads(f.fileno(), header, layout, bs, run.first_slot, heads, dest, scale_dest, rows)
                ok = got >= 0
        if count is not None and ok:
            count.add(got)
        if not ok:
            raise CorruptStoreError(f"{path} is truncated; run `prefixgen verify`")
        if not verify:
            return
        algorithm = self.manifest.block_checksum
        if rows is None:
            crcs, _ = block_checksums(dest, scale_dest, layout, bs, algorithm)
            bad = np.flatnonzero(crcs != np.asarray(run.crcs, dtype=np.uint32))
        else:
            mine = block_crcs(dest, layout.head_bytes(bs), scale_dest, layout.head_scale_bytes(), algorithm)
            wrong = (mine.reshape(run.blocks, -1) != rows[:, heads.start : heads.stop]).any(axis=1)
            bad = np.flatnonzero(wrong | (head_row_crcs(rows, algorithm) != np.asarray(run.crcs, dtype=np.uint32)))
        if len(bad):
            raise CorruptBlockError(
                f"{path}: block at slot {run.first_slot + int(bad[0])} fails its checksum; the store is damaged "
                "(run `prefixgen verify`, then rebuild the damaged part with `prefixgen build --resume`)",
                block=run.out_block + int(bad[0]),
            )

    # ------------------------------------------------------------------ compatibility

    def check_compatible(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        """Raise IncompatibleStoreError naming each identity field (weights digest, architecture,
        KV shape, RoPE, positions, and the tokenizer if given) that differs from ``model``.

        Example:
            >>> store.check_compatible(model, tokenizer)  # doctest: +SKIP
        """
        theirs = fingerprint(model, tokenizer, probe_kv_layout(model))
        problems = self.manifest.model.differences(theirs, check_tokenizer=tokenizer is not None)
        if problems:
            raise IncompatibleStoreError(
                f"{self.path} was built for another model ({self.manifest.model.name}):\n  " + "\n  ".join(problems)
            )

    # ------------------------------------------------------------------ inspection

    def builds(self) -> list[BuildRecord]:
        """Every build run recorded in the store, oldest first."""
        return read_builds(self.path)

    def count_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per build: (keys [n, 32] uint8, records [n] uint64), as stored in ``counts/``."""
        out = []
        for p, spans in self.count_files():
            with open(p, "rb") as f:
                cols = {}
                for name, (dt, _) in COUNT_COLUMNS.items():
                    a, b = spans[name]
                    f.seek(a)
                    cols[name] = np.frombuffer(f.read(b - a), dtype=np.dtype(dt).newbyteorder("<"))
            out.append((cols["key"].reshape(-1, 32), cols["records"]))
        return out

    def count_files(self) -> list[tuple[Path, dict[str, tuple[int, int]]]]:
        """Per file of ``counts/``: its path and the file byte range of each column (``key`` [n, 32]
        uint8, ``records`` [n] uint64), checked against the header and the file's size without reading
        the columns (a reader of millions of rows reads them a piece at a time)."""
        out = []
        for p in sorted((self.path / COUNTS_DIR).glob("*.safetensors")):
            with open(p, "rb") as f:
                header = read_safetensors_header(f, p)
                size = os.fstat(f.fileno()).st_size
            spans, rows = {}, {}
            for name, (dt, width) in COUNT_COLUMNS.items():
                info = header.tensors.get(name)
                if info is None or info["dtype"] != ST_DTYPES[dt]:
                    raise CorruptStoreError(f"{p}: missing or mistyped column {name!r}")
                a, b = (header.data_start + int(x) for x in info["data_offsets"])
                row = np.dtype(dt).itemsize * width
                if not header.data_start <= a <= b <= size or (b - a) % row:
                    raise CorruptStoreError(f"{p}: column {name!r} is truncated or misaligned")
                spans[name], rows[name] = (a, b), (b - a) // row
            if rows["key"] != rows["records"]:
                raise CorruptStoreError(f"{p}: columns have different lengths")
            out.append((p, spans))
        return out

    def count_pieces(self, rows: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every row of ``counts/``, up to ``rows`` at a time: (keys [m, 32] uint8, records [m] uint64)."""
        for p, spans in self.count_files():
            n = (spans["records"][1] - spans["records"][0]) // 8
            with open(p, "rb") as f:
                for a in range(0, n, rows):
                    m = min(rows, n - a)
                    keys = _pread_exact(f, spans["key"][0] + a * 32, m * 32, p)
                    records = _pread_exact(f, spans["records"][0] + a * 8, m * 8, p)
                    yield np.frombuffer(keys, np.uint8).reshape(m, 32), np.frombuffer(records, "<u8")

    def check_counts(self) -> None:
        """Raise CorruptStoreError if a file of ``counts/`` is damaged (its header, column types and lengths)."""
        self.count_files()


def _pread_exact(f, offset: int, size: int, where: Path) -> bytes:
    data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise CorruptStoreError(f"{where}: file ended early (it changed while being read)")
    return data


def read_builds(path: Path) -> list[BuildRecord]:
    """Every build run recorded in the store at ``path``, oldest first, without opening its index
    (for a rank polling its build while other ranks compact theirs)."""
    records = []
    for p in sorted((path / BUILDS_DIR).glob("*.json")):
        record = _read_build(p)
        parts_dir = p.with_name(p.stem + RANK_PARTS_SUFFIX)
        if parts_dir.is_dir():  # a distributed build: one record, its ranks' parts merged
            record = merge_rank_parts(record, [_read_build(q) for q in sorted(parts_dir.glob("*.json"))])
        records.append(record)
    return sorted(records, key=lambda r: r.started_at)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the store at ``path``, without opening its index; a missing, corrupt or
    newer-format manifest is a clear error."""
    path = Path(path)
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise StoreError(f"{path} is not a prefixgen store: it has no {MANIFEST_FILE} (build one with `prefixgen build`)")
    try:
        text = mpath.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptStoreError(f"cannot read {mpath}: {exc}") from None
    return Manifest.from_json(text, mpath)


def _read_build(p: Path) -> BuildRecord:
    try:
        return BuildRecord.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, OSError) as exc:
        raise CorruptStoreError(f"{p} is damaged ({exc})") from None


def kv_to_cache(kv: torch.Tensor, layout: KVLayout | None = None) -> DynamicCache:
    """[T, L, parts, H, D] token-major KV -> DynamicCache with per-layer [1, H, T, D] keys and values
    (for an MLA ``layout``, the latent and rope key: ``prefixgen.kvcache``). Every layer keeps every
    token: a sliding-window layer's attention masks what lies beyond its window."""
    if layout is None:
        layout = KVLayout(kv.shape[1], kv.shape[3], kv.shape[4], str(kv.dtype).removeprefix("torch."))
    return rows_to_cache(kv, layout)


def _read_shapes(layout: KVLayout, block_size: int, n: int, h: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The shape ``n`` blocks of ``h`` heads are read in, as stored (head-major [n, h, B, L, P, D], token-major
    [n * B, L, P, H, D]), and that of their fp8 scales (None unless fp8)."""
    L, P, _, D = layout.token_shape
    fp8 = layout.storage == "fp8"
    if layout.heads_first:
        return (n, h, block_size, L, P, D), (n, h, L, P) if fp8 else None
    return (n * block_size, *layout.token_shape), (n, *layout.token_shape[:3]) if fp8 else None


def _host_result(
    buffer: torch.Tensor | None,
    shape: tuple[int, ...],
    stored: torch.dtype,
    scale_shape: tuple[int, ...] | None,
    need: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where a CPU read lands: new tensors of ``shape`` (and ``scale_shape``, fp8's float32 scales), or the blocks as
    stored (this rank's heads of a head-major store) in the caller's ``buffer`` (``need`` bytes of it: the scales
    first, 4-byte aligned, then the KV), so that one buffer holds everything a piece stages on the host."""
    if buffer is None:
        return torch.empty(shape, dtype=stored), None if scale_shape is None else torch.empty(scale_shape)
    if buffer.device.type != "cpu" or not buffer.is_contiguous() or buffer.nbytes < need or buffer.data_ptr() % 4:
        raise ValueError(f"read_locations: buffer must be a contiguous, 4-byte aligned host tensor of at least {need} bytes")
    flat = buffer.view(-1).view(torch.uint8)
    scales = None
    at = 0
    if scale_shape is not None:
        at = 4 * math.prod(scale_shape)
        scales = flat[:at].view(torch.float32).view(scale_shape)
    return flat[at:need].view(stored).view(shape), scales


def _token_major_views(
    result: torch.Tensor, scales: torch.Tensor | None, heads: range | None, layers: range | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-major blocks as read (``result`` [T, L, 2, H, D], fp8 ``scales`` [blocks, L, 2, H]) -> views of the
    ``heads`` and ``layers`` asked for."""
    if heads is not None:  # [T, L, 2, len(heads), D]
        result = result[:, :, :, heads.start : heads.stop]
        scales = None if scales is None else scales[..., heads.start : heads.stop]
    if layers is not None:  # [T, len(layers), 2, H, D]
        result = result[:, layers.start : layers.stop]
        scales = None if scales is None else scales[:, layers.start : layers.stop]
    return result, scales


@dataclass
class StoredKV:
    """Blocks as read, before any transpose or dtype conversion (:meth:`PrefixStore.read_stored`): what a caller
    uploads raw, so that the permute to token-major rows and the conversion run on the device (:meth:`rows`)."""

    kv: torch.Tensor  # head-major [n, h, B, L, parts, D]; token-major [n * B, L, parts, H, D] (heads, layers picked: a view)
    scales: torch.Tensor | None  # fp8: head-major [n, h, L, parts]; token-major [n, L, parts, H]
    heads_first: bool
    block_size: int
    heads: range | None = None  # head-major: of kv's heads, those to keep (all when None)
    layers: range | None = None  # head-major: of kv's layers, those to keep (all when None)

    def to(self, kv: torch.Tensor) -> StoredKV:
        """The same blocks with ``kv`` (a copy of :attr:`kv` on another device, same shape and strides) and the
        scales moved there too."""
        scales = None if self.scales is None else self.scales.to(kv.device, non_blocking=True)
        return StoredKV(kv, scales, self.heads_first, self.block_size, self.heads, self.layers)

    def rows(self, dtype: torch.dtype) -> torch.Tensor:
        """Token-major KV ``[n * B, L, parts, H, D]`` in ``dtype``, on :attr:`kv`'s device: a head-major store's
        transposed and converted (dequantized) in one pass into a new tensor; a token-major store's a view of
        :attr:`kv` when there is nothing to convert."""
        if self.heads_first:
            return _from_head_major(self.kv, self.scales, self.heads, self.layers, dtype, self.kv.device)
        if self.scales is not None:
            return dequantize_fp8(self.kv, self.scales.to(self.kv.device), self.block_size, dtype)
        return self.kv.to(dtype)


def _from_head_major(
    raw: torch.Tensor,
    scales: torch.Tensor | None,
    heads: range | None,
    layers: range | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Head-major blocks as read (``raw`` [n, h, B, L, parts, D], fp8 ``scales`` [n, h, L, parts]) as token-major KV
    ``[n * B, L, parts, h, D]`` in ``dtype``: only ``heads`` and ``layers`` of them if given, transposed, converted
    (and dequantized) in one pass into a new tensor."""
    kv, scales = token_major(raw, scales)  # [n, B, L, parts, h, D], [n, L, parts, h]
    if heads is not None:
        kv = kv[..., heads.start : heads.stop, :]
        scales = None if scales is None else scales[..., heads.start : heads.stop]
    if layers is not None:
        kv = kv[:, :, layers.start : layers.stop]
        scales = None if scales is None else scales[:, layers.start : layers.stop]
    n, bs = kv.shape[:2]
    if scales is not None:
        out = torch.empty(kv.shape, dtype=dtype, device=device)
        out.copy_(kv.float() * scales.to(device)[:, None, :, :, :, None])
    else:
        out = torch.empty(kv.shape, dtype=dtype, device=device)
        out.copy_(kv)
    return out.view(n * bs, *kv.shape[2:])


def _runs(locations: Sequence[BlockLocation]) -> list[_Run]:
    runs: list[_Run] = []
    for i, loc in enumerate(locations):
        last = runs[-1] if runs else None
        if last is not None and last.shard == loc.shard and last.first_slot + last.blocks == loc.slot:
            last.blocks += 1
            last.crcs.append(loc.crc)
        else:
            runs.append(_Run(loc.shard, loc.slot, 1, i, [loc.crc]))
    return runs


def _pieces(runs: list[_Run], max_blocks: int) -> list[_Run]:
    """Runs cut into pieces of at most ``max_blocks``, so threads share a long run's reading."""
    out = []
    for run in runs:
        for i in range(0, run.blocks, max_blocks):
            k = min(max_blocks, run.blocks - i)
            out.append(_Run(run.shard, run.first_slot + i, k, run.out_block + i, run.crcs[i : i + k]))
    return out


def _as_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.reshape(-1).tolist()
    return list(token_ids)
