"""Safetensors files, as both shards and index segments are: the dtypes a store uses, the tensors of a file
(:class:`TensorSpec`) and its header, encoded and read."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixgen.errors import CorruptStoreError

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
# safetensors dtype names, for our dtypes and for index columns.
ST_DTYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float8_e4m3fn": "F8_E4M3",
    "uint8": "U8",
    "uint32": "U32",
    "uint64": "U64",
}


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    dtype: str  # key of ST_DTYPES
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = DTYPE_SIZES.get(self.dtype) or np.dtype(self.dtype).itemsize
        return size * int(np.prod(self.shape, dtype=np.int64))


def encode_safetensors_header(tensors: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The first bytes of a safetensors file holding ``tensors`` back to back, in order.

    Returns the 8-byte little-endian header length followed by the JSON header, padded with
    spaces to a multiple of 8 bytes so that every tensor is 8-byte aligned in a memory map.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in tensors:
        header[spec.name] = {
            "dtype": ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(slots=True, frozen=True)
class SafetensorsHeader:
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int  # file offset of the data section

    def offset(self, name: str) -> int:
        return self.data_start + self.tensors[name]["data_offsets"][0]


def read_safetensors_header(f, where: Path | str) -> SafetensorsHeader:
    """Parse the header of an open safetensors file; a malformed one is a CorruptStoreError."""
    f.seek(0)
    head = f.read(8)
    if len(head) != 8:
        raise CorruptStoreError(f"{where} is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise CorruptStoreError(f"{where}: safetensors header length {n} is implausible")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptStoreError(f"{where}: safetensors header is not valid JSON") from None
    metadata = header.pop("__metadata__", {}) or {}
    return SafetensorsHeader(tensors=header, metadata=metadata, data_start=8 + n)
