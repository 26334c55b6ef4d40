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

    ``kv`` [tokens, layers, 2, kv_heads, head_dim]; ``kv_scale`` [blocks, layers, 2, kv_heads]
    (fp8 only); ``tokens`` [blocks, block_size] uint32.
    """
    tokens = blocks * block_size
    specs = [TensorSpec("kv", layout.stored_dtype, (tokens, *layout.token_shape))]
    if layout.storage == "fp8":
        specs.append(TensorSpec("kv_scale", "float32", (blocks, *layout.token_shape[:3])))
    specs.append(TensorSpec("tokens", "uint32", (blocks, block_size)))
    return specs


def read_shard_blocks(
    fd: int, header: SafetensorsHeader, layout: KVLayout, block_size: int, first_slot: int, kv: Any, scales: Any = None
) -> bool:
    """Read consecutive blocks from slot ``first_slot`` of an open shard: their ``kv`` bytes into
    the writable buffer ``kv`` (its size says how many blocks) and, for fp8, their scale bytes into
    ``scales``. One ``preadv`` each. Returns False if the file ended first (truncated)."""
    block_bytes = layout.bytes_per_token * block_size
    kv = memoryview(kv).cast("B")
    ok = os.preadv(fd, [kv], header.offset("kv") + first_slot * block_bytes) == kv.nbytes
    if scales is not None:
        scales = memoryview(scales).cast("B")
        offset = header.offset("kv_scale") + first_slot * layout.scale_bytes_per_block()
        ok = ok and os.preadv(fd, [scales], offset) == scales.nbytes
    return ok


def encode_shard(
    layout: KVLayout,
    block_size: int,
    kv: Any,
    scales: Any,
    tokens: np.ndarray,
    metadata: dict[str, str],
    algorithm: str = CRC32C,
) -> tuple[list, np.ndarray, int]:
    """A shard's bytes from its stored KV bytes (``kv``, and ``scales`` for fp8) and ``tokens``
    [blocks, B]: (file parts, block checksums (``algorithm``) [blocks] uint32, shard checksum).

    Example:
        >>> parts, crcs, checksum = encode_shard(layout, 16, kv_bytes, None, tokens, {})  # doctest: +SKIP
    """
    blocks = len(tokens)
    header = encode_safetensors_header(shard_tensors(layout, block_size, blocks), metadata)
    crcs = block_crcs(kv, layout.bytes_per_token * block_size, scales, layout.scale_bytes_per_block(), algorithm)
    data = [memoryview(kv).cast("B")] + ([memoryview(scales).cast("B")] if scales is not None else [])
    parts = [header, *data, np.ascontiguousarray(tokens, dtype="<u4").tobytes()]
    return parts, crcs, shard_checksum(header, crcs)


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
