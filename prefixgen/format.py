"""The on-disk format of a prefix store: the only module both the write and the read side import.

Everything a reader in another language needs is specified here and in FORMAT.md:

* the chained block hash (:func:`root_key`, :func:`hash_block`, :func:`block_keys`);
* the manifest (:class:`Manifest`, :class:`ModelFingerprint`, :class:`KVLayout`);
* shards and index segments, both plain safetensors files (:func:`encode_safetensors_header`,
  :func:`read_safetensors_header`, :class:`Segment`);
* atomic, fsynced file writes (:func:`atomic_write`) and block checksums (:func:`block_crcs`).

Example:
    >>> root = root_key("00" * 32)
    >>> keys = block_keys(list(range(32)), block_size=16, root=root)
    >>> len(keys), len(keys[0])
    (2, 32)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

import numpy as np
import torch

from prefixgen.errors import CorruptStoreError, NewerFormatError

FORMAT_VERSION = 1
HASH_ALGORITHM = "sha256-chain-v1"
ROOT_DOMAIN = b"prefixgen-root-v1\x00"

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
BUILDS_DIR = "builds"
COUNTS_DIR = "counts"
LOCKS_DIR = "locks"
TMP_SUFFIX = ".tmp"

# Token-major so that consecutive blocks of one sequence are one contiguous byte range.
KV_LAYOUT = "tokens,layers,kv,kv_heads,head_dim"
# fp8 scales: one float32 per block, layer, K/V and head.
SCALE_LAYOUT = "blocks,layers,kv,kv_heads"

BlockHash = NewType("BlockHash", bytes)
"""32 raw bytes of SHA-256: the key of one block, chained over every block before it."""


# --------------------------------------------------------------------------- block hash


def root_key(weights_digest: str) -> BlockHash:
    """The parent of block 0: derived from the model's weights digest, so stores of different
    models never share a key.

    Example:
        >>> root_key("ab" * 32).hex()[:8]
        'a6380d81'
    """
    return BlockHash(hashlib.sha256(ROOT_DOMAIN + bytes.fromhex(weights_digest)).digest())


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """SHA-256 over the parent's 32 bytes followed by the block's token ids as little-endian uint32.

    Example:
        >>> hash_block(BlockHash(bytes(32)), [1, 2, 3]).hex()[:8]
        '3db346a4'
    """
    data = np.asarray(tokens, dtype="<u4").tobytes()
    return BlockHash(hashlib.sha256(parent + data).digest())


def block_keys(tokens: Sequence[int], block_size: int, root: BlockHash) -> list[BlockHash]:
    """Keys of every full block of ``tokens`` (a trailing partial block has none).

    Example:
        >>> len(block_keys(list(range(40)), 16, root_key("00" * 32)))
        2
    """
    data = np.asarray(
        tokens, dtype="<u4"
    ).tobytes()  # slicing bytes is cheaper than slicing the array: a server hashes per request
    step = block_size * 4
    keys: list[BlockHash] = []
    parent = root
    for start in range(0, len(data) - step + 1, step):
        parent = BlockHash(hashlib.sha256(parent + data[start : start + step]).digest())
        keys.append(parent)
    return keys


def key64(key: bytes) -> int:
    """The first 8 bytes of a key as a little-endian uint64: the sort key of index segments."""
    return int.from_bytes(key[:8], "little")


# --------------------------------------------------------------------------- manifest


def _fields_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``: newer writers may add fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(slots=True, frozen=True)
class ModelFingerprint:
    """What identifies the model a store was built with. ``IDENTITY_FIELDS`` must match for a
    store to be used with a model; the rest is recorded for people."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weights_digest: str
    tokenizer_digest: str
    rope: dict[str, Any] = field(default_factory=dict)
    max_positions: int = 0
    revision: str | None = None
    transformers_version: str = ""
    torch_version: str = ""

    IDENTITY_FIELDS = (
        "architecture",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "rope",
        "max_positions",
        "weights_digest",
        "tokenizer_digest",
    )

    def differences(self, other: ModelFingerprint, check_tokenizer: bool = True) -> list[str]:
        """Lines ``field: store has X, model has Y`` for each identity field that differs."""
        out = []
        for name in self.IDENTITY_FIELDS:
            if name == "tokenizer_digest" and not check_tokenizer:
                continue
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: store has {mine!r}, model has {theirs!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        return cls(**_known_fields(cls, data))


@dataclass(slots=True, frozen=True)
class KVLayout:
    """Shape and storage of the KV of one token: ``[layers, 2, kv_heads, head_dim]``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # the model's KV dtype: "float32", "bfloat16" or "float16"
    storage: str = "native"  # "native" (stored in `dtype`) or "fp8" (float8 e4m3 with scales)

    @property
    def values_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def stored_dtype(self) -> str:
        return "float8_e4m3fn" if self.storage == "fp8" else self.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV per token on disk (fp8 scales excluded)."""
        return self.values_per_token * DTYPE_SIZES[self.stored_dtype]

    def scale_bytes_per_block(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * 4 if self.storage == "fp8" else 0

    def block_bytes(self, block_size: int) -> int:
        """Bytes of KV of one stored block: its ``kv`` rows plus, for fp8, its ``kv_scale`` row.

        Example:
            >>> KVLayout(5, 4, 8, "float32").block_bytes(16), KVLayout(5, 4, 8, "float32", "fp8").block_bytes(16)
            (20480, 5280)
        """
        return self.bytes_per_token * block_size + self.scale_bytes_per_block()


@dataclass(slots=True, frozen=True)
class Manifest:
    """``manifest.json``: written once, when a store is created, and never changed."""

    block_size: int
    model: ModelFingerprint
    kv: KVLayout
    root: str  # hex of root_key(model.weights_digest)
    format_version: int = FORMAT_VERSION
    hash_algorithm: str = HASH_ALGORITHM
    created_at: str = ""

    @property
    def root_key(self) -> BlockHash:
        return BlockHash(bytes.fromhex(self.root))

    def to_json(self) -> str:
        data = {
            "format_version": self.format_version,
            "block_size": self.block_size,
            "hash": {"algorithm": self.hash_algorithm, "root": self.root},
            "kv": {**dataclasses.asdict(self.kv), "layout": KV_LAYOUT, "scale_layout": SCALE_LAYOUT},
            "model": self.model.to_dict(),
            "created_at": self.created_at,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path | str = MANIFEST_FILE) -> Manifest:
        """Parse and validate; every problem is a :class:`CorruptStoreError` naming ``where``."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"{where} is not valid JSON ({exc}); the store is damaged") from None
        if not isinstance(data, dict) or "format_version" not in data:
            raise CorruptStoreError(f"{where} has no format_version: it is not a prefixgen manifest")
        version = data["format_version"]
        if not isinstance(version, int):
            raise CorruptStoreError(f"{where}: format_version {version!r} is not an integer")
        if version > FORMAT_VERSION:
            raise NewerFormatError(
                f"{where} has format version {version}, this prefixgen reads up to {FORMAT_VERSION}: "
                "upgrade prefixgen (pip install -U prefixgen)"
            )
        try:
            kv = data["kv"]
            manifest = cls(
                block_size=int(data["block_size"]),
                model=ModelFingerprint.from_dict(data["model"]),
                kv=KVLayout(
                    num_layers=int(kv["num_layers"]),
                    num_kv_heads=int(kv["num_kv_heads"]),
                    head_dim=int(kv["head_dim"]),
                    dtype=str(kv["dtype"]),
                    storage=str(kv.get("storage", "native")),
                ),
                root=str(data["hash"]["root"]),
                format_version=version,
                hash_algorithm=str(data["hash"]["algorithm"]),
                created_at=str(data.get("created_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{where} is missing or has a bad field ({exc!r}); the store is damaged") from None
        if manifest.hash_algorithm != HASH_ALGORITHM:
            raise CorruptStoreError(f"{where}: unknown hash algorithm {manifest.hash_algorithm!r}")
        if manifest.kv.stored_dtype not in DTYPE_SIZES or manifest.block_size <= 0:
            raise CorruptStoreError(f"{where}: bad kv dtype {manifest.kv.dtype!r} or block size")
        return manifest


# --------------------------------------------------------------------------- safetensors

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


# --------------------------------------------------------------------------- files


def temp_path(path: Path, owner: str | None = None) -> Path:
    """The temporary name ``path`` is written under: ``<name>.<owner>.tmp``, so that a cleaner can
    tell whose it is (``<name>.tmp`` without an owner).

    Example:
        >>> temp_path(Path("builds/b.json"), "w1").name
        'b.json.w1.tmp'
    """
    return path.with_name(f"{path.name}.{owner}{TMP_SUFFIX}" if owner else path.name + TMP_SUFFIX)


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview], fsync: bool = True, owner: str | None = None) -> int:
    """Write ``chunks`` to ``path`` under a temporary name (:func:`temp_path`), fsync, then rename:
    readers see the whole file or none of it. Returns the bytes written."""
    tmp = temp_path(path, owner)
    written = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
    return written


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def block_crcs(data: Any, block_bytes: int, scales: Any = None, scale_bytes: int = 0) -> np.ndarray:
    """CRC-32 (zlib) of each ``block_bytes`` run of ``data``, continued over the block's
    ``scale_bytes`` run of ``scales`` when given (fp8). ``[blocks]`` uint32.

    Example:
        >>> block_crcs(bytes(8), 4).tolist()
        [558161692, 558161692]
    """
    view = memoryview(data).cast("B")
    n = len(view) // block_bytes
    crcs = (zlib.crc32(view[i * block_bytes : (i + 1) * block_bytes]) for i in range(n))
    if scales is not None:
        extra = memoryview(scales).cast("B")
        crcs = (zlib.crc32(extra[i * scale_bytes : (i + 1) * scale_bytes], c) for i, c in enumerate(crcs))
    return np.fromiter(crcs, dtype=np.uint32, count=n)


def shard_checksum(header: bytes, crcs: np.ndarray) -> int:
    """A shard's checksum: CRC-32 of its header bytes followed by its block CRCs (little-endian
    uint32). It covers every byte of the file while costing one pass over the KV."""
    return zlib.crc32(crcs.astype("<u4").tobytes(), zlib.crc32(header))


# --------------------------------------------------------------------------- shards


def shard_tensors(layout: KVLayout, block_size: int, blocks: int) -> list[TensorSpec]:
    """Tensors of a shard holding ``blocks`` blocks, in file order.

    ``kv`` [tokens, layers, 2, kv_heads, head_dim]; ``kv_scale`` [blocks, layers, 2, kv_heads]
    (fp8 only); ``tokens`` [blocks, block_size] uint32.
    """
    tokens = blocks * block_size
    specs = [TensorSpec("kv", layout.stored_dtype, (tokens, layout.num_layers, 2, layout.num_kv_heads, layout.head_dim))]
    if layout.storage == "fp8":
        specs.append(TensorSpec("kv_scale", "float32", (blocks, layout.num_layers, 2, layout.num_kv_heads)))
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


def shard_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:06d}.safetensors"


# --------------------------------------------------------------------------- index segments

# Column name -> (dtype, values per entry). Entries are sorted by key64.
SEGMENT_COLUMNS: dict[str, tuple[str, int]] = {
    "key64": ("uint64", 1),
    "key": ("uint8", 32),
    "parent": ("uint8", 32),
    "slot": ("uint32", 1),  # block position in the shard: its tokens are [slot*B, (slot+1)*B)
    "depth": ("uint32", 1),  # block number in its sequence: the prefix ends at (depth+1)*B tokens
    "crc": ("uint32", 1),  # CRC-32 of the block's bytes in `kv` (then `kv_scale` for fp8)
}


def segment_tensors(n: int) -> list[TensorSpec]:
    return [TensorSpec(name, dt, (n, w) if w > 1 else (n,)) for name, (dt, w) in SEGMENT_COLUMNS.items()]


def encode_segment(columns: dict[str, np.ndarray], metadata: dict[str, str]) -> list[bytes]:
    """Bytes of an index segment: entries sorted by key64, columns in SEGMENT_COLUMNS order."""
    keys = np.ascontiguousarray(columns["key"], dtype=np.uint8)
    k64 = keys[:, :8].copy().view("<u8").reshape(-1)
    # Readers binary-search key64 and compare whole keys among equal key64s (a tie is ~2**-64 likely).
    order = np.argsort(k64, kind="stable")
    cols = {"key64": k64, **columns}
    n = len(keys)
    parts = [encode_safetensors_header(segment_tensors(n), metadata)]
    for name, (dtype, _) in SEGMENT_COLUMNS.items():
        parts.append(np.ascontiguousarray(np.asarray(cols[name])[order], dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    return parts


class Segment:
    """A memory-mapped index segment: nothing is read until a column is touched."""

    __slots__ = ("path", "metadata", "n", "cols", "_mm")

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            header = read_safetensors_header(f, path)
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.metadata = header.metadata
        self.cols: dict[str, np.ndarray] = {}
        buf = np.frombuffer(self._mm, dtype=np.uint8) if self._mm is not None else np.empty(0, np.uint8)
        n = None
        for name, (dtype, width) in SEGMENT_COLUMNS.items():
            info = header.tensors.get(name)
            if info is None:
                raise CorruptStoreError(f"{path}: index segment has no column {name!r}")
            start, end = (header.data_start + o for o in info["data_offsets"])
            if end > size or info["dtype"] != ST_DTYPES[dtype]:
                raise CorruptStoreError(f"{path}: index segment column {name!r} is truncated or mistyped")
            if name == "key64" and self._mm is not None and end > start:
                # Every lookup binary-searches this column: ask the kernel to read it ahead in one
                # sequential sweep instead of faulting its pages in one by one (cold cache: 10x).
                page = mmap.ALLOCATIONGRANULARITY
                self._mm.madvise(mmap.MADV_WILLNEED, start // page * page, end - start // page * page)
            col = buf[start:end].view(np.dtype(dtype).newbyteorder("<"))
            self.cols[name] = col.reshape(-1, width) if width > 1 else col
            n = len(self.cols[name]) if n is None else n
            if len(self.cols[name]) != n:
                raise CorruptStoreError(f"{path}: index segment columns have different lengths")
        self.n = n or 0

    @property
    def shard(self) -> str:
        return self.metadata.get("shard", "")


# --------------------------------------------------------------------------- fp8 storage

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


# --------------------------------------------------------------------------- build records

BUILD_STAT_FIELDS = (
    "records",
    "skipped_records",
    "truncated_records",
    "dataset_tokens",
    "stored_tokens",
    "prefilled_tokens",
    "padding_tokens",
    "bytes_written",
)


@dataclass(slots=True)
class BuildRecord:
    """``builds/<build_id>.json``: one build run's options and statistics (rewritten atomically
    as the run goes; ``status`` is ``running`` until it ends)."""

    build_id: str
    dataset: str
    status: str = "running"  # running | complete | interrupted | failed
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    writers: list[str] = field(default_factory=list)
    records: int = 0
    skipped_records: int = 0
    truncated_records: int = 0
    dataset_tokens: int = 0
    stored_tokens: int = 0
    prefilled_tokens: int = 0
    padding_tokens: int = 0
    bytes_written: int = 0
    # Where the time went: read, tokenize, plan (hash + dedup), batch, prefill, copy (device to
    # host), write (background threads, summed) and write_wait (the pipeline waiting on the disk).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # With --min-records/--max-bytes: min_records, max_bytes, selected_blocks (chosen to store) and
    # candidate_blocks (distinct blocks of the dataset); None when every block is stored.
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        return cls(**_known_fields(cls, data))


# counts/<build_id>.safetensors: how many of that build's records contained each block.
COUNT_COLUMNS: dict[str, tuple[str, int]] = {"key": ("uint8", 32), "records": ("uint64", 1)}
