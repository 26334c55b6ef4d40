"""Shard files: the tensors of a shard (KV, fp8 scales, tokens), their bytes and checksums (one per block and
one per shard), reading blocks back, shard names, and the fp8 quantization of stored KV."""

from __future__ import annotations

import os
import zlib
from typing import Any

import numpy as np
import torch

from prefixgen import checksum
from prefixgen.checksum import CRC32C, checksum_function, crc32c_rows
from prefixgen.format.manifest import KVLayout
from prefixgen.format.tensors import SafetensorsHeader, TensorSpec, encode_safetensors_header


def block_crcs(data: Any, block_bytes: int, scales: Any = None, scale_bytes: int = 0, algorithm: str = CRC32C) -> np.ndarray:
    """Checksum (``algorithm``: the manifest's ``block_checksum``) of each ``block_bytes`` run of
    ``data``, continued over the block's ``scale_bytes`` run of ``scales`` when given (fp8).
    ``[blocks]`` uint32.

    Example:
        >>> block_crcs(bytes(8), 4).tolist(), block_crcs(bytes(8), 4, algorithm="crc32").tolist()
        ([1214729159, 1214729159], [558161692, 558161692])
    """
    view = memoryview(data).cast("B")
    n = len(view) // block_bytes
    extra = memoryview(scales).cast("B") if scales is not None else None
    if algorithm == CRC32C and not checksum.HARDWARE:
        # No crc32c package: every block at once with numpy (a block's scales follow its KV bytes).
        rows = np.frombuffer(view, np.uint8, n * block_bytes).reshape(n, block_bytes)
        if extra is not None:
            rows = np.concatenate([rows, np.frombuffer(extra, np.uint8, n * scale_bytes).reshape(n, scale_bytes)], axis=1)
        step = max(1, (16 << 20) // max(1, rows.shape[1]))  # bounded temporaries: a shard can be GBs
        return np.concatenate([crc32c_rows(rows[i : i + step]) for i in range(0, n, step)] or [np.zeros(0, np.uint32)])
    crc = checksum_function(algorithm)
    crcs = (crc(view[i * block_bytes : (i + 1) * block_bytes], 0) for i in range(n))
    if extra is not None:
        crcs = (crc(extra[i * scale_bytes : (i + 1) * scale_bytes], c) for i, c in enumerate(crcs))
    return np.fromiter(crcs, dtype=np.uint32, count=n)


def shard_checksum(header: bytes, crcs: np.ndarray) -> int:
    """A shard's checksum: CRC-32 (zlib, whatever the block checksum) of its header bytes followed
    by its block checksums (little-endian uint32). It covers every byte of the file while costing
    one pass over the KV."""
    return zlib.crc32(crcs.astype("<u4").tobytes(), zlib.crc32(header))


def shard_tensors(layout: KVLayout, block_size: int, blocks: int) -> list[TensorSpec]:
    """Tensors of a shard holding ``blocks`` blocks, in file order.

    Token-major (versions 1 to 4): ``kv`` [tokens, layers, 2, kv_heads, head_dim]; ``kv_scale`` [blocks, layers, 2,
    kv_heads] (fp8 only); ``tokens`` [blocks, block_size] uint32. Head-major (version 5): ``kv`` [blocks, kv_heads,
    block_size, layers, 2, head_dim]; ``kv_scale`` [blocks, kv_heads, layers, 2] (fp8 only); ``head_crc`` [blocks,
    kv_heads] uint32; ``tokens``.
    """
    if layout.heads_first:
        specs = [TensorSpec("kv", layout.stored_dtype, (blocks, *layout.block_shape(block_size)))]
    else:
        specs = [TensorSpec("kv", layout.stored_dtype, (blocks * block_size, *layout.token_shape))]
    if layout.storage == "fp8":
        specs.append(TensorSpec("kv_scale", "float32", (blocks, *layout.scale_shape)))
    if layout.heads_first:
        specs.append(TensorSpec("head_crc", "uint32", (blocks, layout.num_kv_heads)))
    specs.append(TensorSpec("tokens", "uint32", (blocks, block_size)))
    return specs


def block_checksums(
    kv: Any, scales: Any, layout: KVLayout, block_size: int, algorithm: str = CRC32C
) -> tuple[np.ndarray, np.ndarray | None]:
    """The checksums of stored blocks (their ``kv`` bytes, and ``scales`` bytes for fp8, as the shard holds them):
    (the index's ``crc`` [blocks] uint32, the shard's ``head_crc`` [blocks, kv_heads] uint32 or None).

    Token-major: a block's ``crc`` covers its KV bytes, then its scales. Head-major: each head's ``head_crc``
    covers the head's KV bytes, then its scales, and the block's ``crc`` covers its ``head_crc`` row (little-endian):
    one pass over the KV either way; a reader of some heads checks them against the row, and the row against the
    index.

    Example:
        >>> crcs, heads = block_checksums(bytes(128), None, KVLayout(1, 2, 2, "float32", order="heads"), 2)
        >>> heads.shape, crcs.tolist() == head_row_crcs(heads).tolist()
        ((2, 2), True)
    """
    if not layout.heads_first:
        crcs = block_crcs(kv, layout.bytes_per_token * block_size, scales, layout.scale_bytes_per_block(), algorithm)
        return crcs, None
    heads = block_crcs(kv, layout.head_bytes(block_size), scales, layout.head_scale_bytes(), algorithm)
    heads = heads.reshape(-1, layout.num_kv_heads)  # [blocks, H]
    return head_row_crcs(heads, algorithm), heads


def head_row_crcs(head_crcs: np.ndarray, algorithm: str = CRC32C) -> np.ndarray:
    """Each block's ``crc`` from its ``head_crc`` row ([blocks, kv_heads] uint32): the checksum of the row's bytes
    (little-endian uint32). [blocks] uint32."""
    rows = np.ascontiguousarray(head_crcs, dtype="<u4")
    return block_crcs(rows.reshape(-1).view(np.uint8), rows.shape[1] * 4, algorithm=algorithm)


def read_shard_blocks(
    fd: int, header: SafetensorsHeader, layout: KVLayout, block_size: int, first_slot: int, kv: Any, scales: Any = None
) -> bool:
    """Read consecutive blocks from slot ``first_slot`` of an open shard: their ``kv`` bytes into
    the writable buffer ``kv`` (its size says how many blocks) and, for fp8, their scale bytes into
    ``scales``. One ``preadv`` each. Returns False if the file ended first (truncated). The bytes are
    as stored: head-major blocks in a version-5 store (:func:`token_major` views them token-major)."""
    block_bytes = layout.bytes_per_token * block_size
    kv = memoryview(kv).cast("B")
    ok = os.preadv(fd, [kv], header.offset("kv") + first_slot * block_bytes) == kv.nbytes
    if scales is not None:
        scales = memoryview(scales).cast("B")
        offset = header.offset("kv_scale") + first_slot * layout.scale_bytes_per_block()
        ok = ok and os.preadv(fd, [scales], offset) == scales.nbytes
    return ok


def read_shard_heads(
    fd: int,
    header: SafetensorsHeader,
    layout: KVLayout,
    block_size: int,
    first_slot: int,
    heads: range,
    kv: Any,
    scales: Any,
    head_crcs: np.ndarray,
) -> int:
    """Read heads ``heads`` of ``len(head_crcs)`` consecutive blocks from slot ``first_slot`` of an open head-major
    shard: per block one ``pread`` of those heads' KV bytes into ``kv`` ([blocks, len(heads), B, L, parts, D] as
    bytes) and, for fp8, one of their scales into ``scales`` ([blocks, len(heads), L, parts]); and the blocks' whole
    ``head_crc`` rows into ``head_crcs`` ([blocks, kv_heads] uint32, one ``pread``). Returns the bytes read, or -1
    if the file ended first (truncated)."""
    n, H = len(head_crcs), layout.num_kv_heads
    per_head, per_scale = layout.head_bytes(block_size), layout.head_scale_bytes()
    rows = memoryview(head_crcs).cast("B")
    if os.preadv(fd, [rows], header.offset("head_crc") + first_slot * H * 4) != rows.nbytes:
        return -1
    total = rows.nbytes
    pieces = [(memoryview(kv).cast("B"), header.offset("kv"), per_head)]
    if scales is not None:
        pieces.append((memoryview(scales).cast("B"), header.offset("kv_scale"), per_scale))
    for dest, start, unit in pieces:
        size = len(heads) * unit  # this rank's heads of one block: one contiguous range
        at = start + (first_slot * H + heads.start) * unit
        for b in range(n):
            if os.preadv(fd, [dest[b * size : (b + 1) * size]], at + b * H * unit) != size:
                return -1
        total += n * size
    return total


def token_major(kv: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head-major blocks viewed token-major: ``kv`` [n, H, B, L, parts, D] -> [n, B, L, parts, H, D] and ``scales``
    [n, H, L, parts] -> [n, L, parts, H]. Permuted views: ``.reshape(n * B, L, parts, H, D)`` copies.

    Example:
        >>> token_major(torch.zeros(3, 2, 4, 5, 2, 8))[0].shape
        torch.Size([3, 4, 5, 2, 2, 8])
    """
    return kv.permute(0, 2, 3, 4, 1, 5), None if scales is None else scales.permute(0, 2, 3, 1)


def encode_shard(
    layout: KVLayout,
    block_size: int,
    kv: Any,
    scales: Any,
    tokens: np.ndarray,
    metadata: dict[str, str],
    algorithm: str = CRC32C,
) -> tuple[list, np.ndarray, int]:
    """A shard's bytes from its stored KV bytes (``kv``, and ``scales`` for fp8, in the layout's order) and ``tokens``
    [blocks, B]: (file parts, block checksums (``algorithm``) [blocks] uint32, shard checksum). A head-major shard
    gets its ``head_crc`` tensor.

    Example:
        >>> parts, crcs, checksum = encode_shard(layout, 16, kv_bytes, None, tokens, {})  # doctest: +SKIP
    """
    blocks = len(tokens)
    header = encode_safetensors_header(shard_tensors(layout, block_size, blocks), metadata)
    crcs, heads = block_checksums(kv, scales, layout, block_size, algorithm)
    data = [memoryview(kv).cast("B")] + ([memoryview(scales).cast("B")] if scales is not None else [])
    if heads is not None:
        data.append(np.ascontiguousarray(heads, dtype="<u4").tobytes())
    parts = [header, *data, np.ascontiguousarray(tokens, dtype="<u4").tobytes()]
    return parts, crcs, shard_checksum(header, crcs)


class ShardStream:
    """A shard of ``blocks`` blocks written a piece at a time into the open file ``fd``: its header is known up front
    (the block count is), so each piece goes straight to its place in each tensor and memory holds one piece, not
    the shard. The file's bytes are :func:`encode_shard`'s for the same blocks.

    Example:
        >>> with atomic_file(path, owner=writer) as f:  # doctest: +SKIP
        ...     shard = ShardStream(f.fileno(), layout, 16, blocks=2, metadata={})
        ...     shard.write(kv_bytes, None, tokens)  # tokens [2, 16]; any number of pieces
        ...     crcs, checksum = shard.finish()
    """

    def __init__(
        self, fd: int, layout: KVLayout, block_size: int, blocks: int, metadata: dict[str, str], algorithm: str = CRC32C
    ):
        self.fd, self.layout, self.block_size, self.blocks, self.algorithm = fd, layout, block_size, blocks, algorithm
        specs = shard_tensors(layout, block_size, blocks)
        self.header = encode_safetensors_header(specs, metadata)
        self.start: dict[str, int] = {}  # tensor -> file offset of its first byte
        self.size = len(self.header)
        for spec in specs:
            self.start[spec.name], self.size = self.size, self.size + spec.nbytes
        _pwrite_all(fd, self.header, 0)
        self.crcs = np.zeros(blocks, np.uint32)
        self.filled = 0

    def write(self, kv: Any, scales: Any, tokens: Any) -> None:
        """Append ``len(tokens)`` blocks: their stored ``kv`` bytes, fp8 ``scales`` bytes (or None) and ``tokens``
        [n, B] uint32 (or their bytes)."""
        tokens = np.frombuffer(memoryview(tokens).cast("B"), "<u4")
        n, at, layout = len(tokens) // self.block_size, self.filled, self.layout
        if at + n > self.blocks:
            raise ValueError(f"shard of {self.blocks} blocks: {at} written, {n} more do not fit")
        crcs, heads = block_checksums(kv, scales, layout, self.block_size, self.algorithm)
        _pwrite_all(self.fd, kv, self.start["kv"] + at * layout.bytes_per_token * self.block_size)
        if scales is not None:
            _pwrite_all(self.fd, scales, self.start["kv_scale"] + at * layout.scale_bytes_per_block())
        if heads is not None:
            _pwrite_all(self.fd, np.ascontiguousarray(heads, "<u4"), self.start["head_crc"] + at * layout.num_kv_heads * 4)
        _pwrite_all(self.fd, tokens, self.start["tokens"] + at * self.block_size * 4)
        self.crcs[at : at + n] = crcs
        self.filled += n

    def finish(self) -> tuple[np.ndarray, int]:
        """(block checksums [blocks] uint32, shard checksum), once every block is written."""
        if self.filled != self.blocks:
            raise ValueError(f"shard of {self.blocks} blocks: only {self.filled} written")
        return self.crcs, shard_checksum(self.header, self.crcs)


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is written (a write may be short)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def shard_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:06d}.safetensors"


FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_fp8(kv: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv`` [blocks*B, L, 2, H, D] (float) -> (float8 e4m3 of the same shape, scales [blocks, L, 2, H]).

    One float32 scale per block, layer, K/V and head: amax over the block's tokens and head_dim / 448.
    """
    n, layers, two, heads, dim = kv.shape
    x = kv.float().view(n // block_size, block_size, layers, two, heads, dim)
    scale = x.abs().amax(dim=(1, 5)).clamp_min(1e-12) / FP8_MAX  # [blocks, L, 2, H]
    q = (x / scale[:, None, :, :, :, None]).to(torch.float8_e4m3fn)
    return q.view(n, layers, two, heads, dim), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: [blocks*B, L, 2, H, D] float8 + scales -> ``dtype``."""
    n, layers, two, heads, dim = q.shape
    x = q.view(n // block_size, block_size, layers, two, heads, dim).float() * scale[:, None, :, :, :, None]
    return x.view(n, layers, two, heads, dim).to(dtype)
