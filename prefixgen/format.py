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

import base64
import dataclasses
import hashlib
import io
import json
import os
import secrets
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

import numpy as np
import torch

from prefixgen import checksum
from prefixgen.cache_spec import LayerGroup
from prefixgen.checksum import BLOCK_CHECKSUMS, CRC32, CRC32C, checksum_function, crc32c_rows
from prefixgen.errors import CorruptStoreError, NewerFormatError

# 2: compacted index segments (rows of many shards); 3: CRC32C block checksums (manifest
# `block_checksum`). Readers read 1 to 3; versions 1 and 2 have zlib CRC-32 block checksums.
FORMAT_VERSION = 3
# 4: a `kv` layout of kind "mla" (one latent per token and layer) or with layer groups (manifest `kv.kind`,
# `kv.latent_rank`, `kv.groups`). Only such stores are written as 4: a reader before it would take their
# blocks for per-head K/V. A plain full-attention store is still written as 3, byte for byte as before.
GROUPS_FORMAT_VERSION = 4
# 5: head-major blocks (manifest `kv.layout` KV_LAYOUT_HEADS): each block's KV is [kv_heads, B, layers, parts,
# head_dim], with one checksum per (block, head) in the shard's `head_crc`, so a tensor-parallel rank reads and
# checks only its own heads. New stores are written as 5 (plain and layer-group layouts alike); a reader before it
# would take the head-major bytes for token-major ones, so it must refuse them.
HEADS_FORMAT_VERSION = 5
LATEST_FORMAT_VERSION = HEADS_FORMAT_VERSION
COMPACTED_FORMAT_VERSION = 2  # the version a store needs at least to hold a compacted segment
HASH_ALGORITHM = "sha256-chain-v1"
ROOT_DOMAIN = b"prefixgen-root-v1\x00"

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
BUILDS_DIR = "builds"
COUNTS_DIR = "counts"
CLAIMS_DIR = "claims"  # distributed builds: which rank computes which shared prefix (builder/distributed.py)
LOCKS_DIR = "locks"
TMP_SUFFIX = ".tmp"

# Token-major (versions 1 to 4): consecutive blocks of one sequence are one contiguous byte range.
KV_LAYOUT = "tokens,layers,kv,kv_heads,head_dim"
# fp8 scales: one float32 per block, layer, K/V and head.
SCALE_LAYOUT = "blocks,layers,kv,kv_heads"
# Head-major (version 5): a block is its heads one after the other, each [B, layers, kv, head_dim], so one
# tensor-parallel rank's heads of a block are one contiguous byte range; the scales likewise per head.
KV_LAYOUT_HEADS = "blocks,kv_heads,block_tokens,layers,kv,head_dim"
SCALE_LAYOUT_HEADS = "blocks,kv_heads,layers,kv"
KV_ORDERS = ("heads", "tokens")  # KVLayout.order: how a store lays out a block's bytes

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
    # The effective text config (model.config_identity: every field but a short allow-list of fields shown not
    # to change KV). Empty in stores written before it was recorded: such a store is compared without it here,
    # and the vLLM connector refuses it (it cannot know the store's config).
    text_config: dict[str, Any] = field(default_factory=dict)

    IDENTITY_FIELDS = (
        "architecture",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "rope",
        "max_positions",
        "weights_digest",
        "tokenizer_digest",
        "text_config",
    )

    def differences(self, other: ModelFingerprint, check_tokenizer: bool = True) -> list[str]:
        """Lines ``field: store has X, model has Y`` for each identity field that differs (``text_config``
        field by field, as ``text_config.rms_norm_eps``; skipped when either side has none recorded).

        Example:
            >>> a = ModelFingerprint("m", "A", "llama", 2, 2, 64, "w", "t", text_config={"rms_norm_eps": 1e-5})
            >>> a.differences(dataclasses.replace(a, text_config={"rms_norm_eps": 0.5}))
            ['text_config.rms_norm_eps: store has 1e-05, model has 0.5']
        """
        out = []
        for name in self.IDENTITY_FIELDS:
            if name == "tokenizer_digest" and not check_tokenizer:
                continue
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "text_config":
                if mine and theirs:
                    missing = "(not set)"
                    for key in sorted(set(mine) | set(theirs)):
                        a, b = mine.get(key, missing), theirs.get(key, missing)
                        if a != b:
                            out.append(f"text_config.{key}: store has {a!r}, model has {b!r}")
            elif mine != theirs:
                out.append(f"{name}: store has {mine!r}, model has {theirs!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        return cls(**_known_fields(cls, data))


@dataclass(slots=True, frozen=True)
class KVLayout:
    """Shape and storage of the KV of one token: ``[layers, parts, kv_heads, head_dim]``.

    ``kind`` "kv" (per-head K and V, ``parts`` 2: full and sliding-window layers alike) or "mla"
    (``parts`` 1, ``kv_heads`` 1, ``head_dim`` = ``latent_rank`` + rope dims: the normalized compressed
    KV then the rope key after RoPE, as vLLM's MLA cache holds it). ``groups``: which layers are of
    which kind (``prefixgen.cache_spec``); empty for a plain full-attention model.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # the model's KV dtype: "float32", "bfloat16" or "float16"
    storage: str = "native"  # "native" (stored in `dtype`) or "fp8" (float8 e4m3 with scales)
    kind: str = "kv"
    latent_rank: int = 0  # mla: kv_lora_rank, the latent's first values
    groups: tuple[LayerGroup, ...] = ()
    # How a store lays out a block: "tokens" ([B, layers, parts, kv_heads, head_dim], versions 1 to 4) or
    # "heads" ([kv_heads, B, layers, parts, head_dim], version 5). KV in memory is always token-major.
    order: str = "tokens"

    @property
    def parts(self) -> int:
        """Tensors per layer and token: K and V (2), or one MLA latent (1)."""
        return 1 if self.kind == "mla" else 2

    @property
    def token_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.parts, self.num_kv_heads, self.head_dim)

    @property
    def plain(self) -> bool:
        """Per-head K/V of full-attention layers only: the layout of every store before format 4."""
        return self.kind == "kv" and not self.groups

    @property
    def format_version(self) -> int:
        """The format version a store of this layout is written as."""
        if self.order == "heads":
            return HEADS_FORMAT_VERSION
        return FORMAT_VERSION if self.plain else GROUPS_FORMAT_VERSION

    @property
    def heads_first(self) -> bool:
        """Whether blocks are stored head-major (format 5), each head's bytes contiguous."""
        return self.order == "heads"

    def block_shape(self, block_size: int) -> tuple[int, ...]:
        """The shape of one stored block: ``[H, B, L, parts, D]`` head-major, ``[B, L, parts, H, D]`` token-major."""
        L, P, H, D = self.token_shape
        return (H, block_size, L, P, D) if self.heads_first else (block_size, L, P, H, D)

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        """The shape of one stored block's fp8 scales: ``[H, L, parts]`` head-major, ``[L, parts, H]`` token-major."""
        L, P, H, _ = self.token_shape
        return (H, L, P) if self.heads_first else (L, P, H)

    def head_bytes(self, block_size: int) -> int:
        """Stored KV bytes of one head of one block (head-major: a contiguous run)."""
        return block_size * self.num_layers * self.parts * self.head_dim * DTYPE_SIZES[self.stored_dtype]

    def head_scale_bytes(self) -> int:
        """fp8 scale bytes of one head of one block (0 for native storage)."""
        return self.num_layers * self.parts * 4 if self.storage == "fp8" else 0

    @property
    def values_per_token(self) -> int:
        return self.num_layers * self.parts * self.num_kv_heads * self.head_dim

    @property
    def stored_dtype(self) -> str:
        return "float8_e4m3fn" if self.storage == "fp8" else self.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV per token on disk (fp8 scales excluded)."""
        return self.values_per_token * DTYPE_SIZES[self.stored_dtype]

    def scale_bytes_per_block(self) -> int:
        return self.num_layers * self.parts * self.num_kv_heads * 4 if self.storage == "fp8" else 0

    def with_storage(self, storage: str) -> KVLayout:
        return dataclasses.replace(self, storage=storage)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``kv`` fields; those of format 4 only where they differ from a plain layout."""
        out: dict[str, Any] = {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "storage": self.storage,
        }
        if not self.plain:
            out.update(kind=self.kind, latent_rank=self.latent_rank, groups=[g.to_dict() for g in self.groups])
        return out

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
    block_checksum: str = CRC32C  # of every block's bytes: "crc32c" (version 3) or "crc32" (1, 2)

    @property
    def root_key(self) -> BlockHash:
        return BlockHash(bytes.fromhex(self.root))

    def to_json(self) -> str:
        data = {
            "format_version": self.format_version,
            "block_size": self.block_size,
            "hash": {"algorithm": self.hash_algorithm, "root": self.root},
            "block_checksum": self.block_checksum,
            "kv": {**self.kv.to_dict(), **_layout_names(self.kv)},
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
        if version > LATEST_FORMAT_VERSION:
            raise NewerFormatError(
                f"{where} has format version {version}, this prefixgen reads up to {LATEST_FORMAT_VERSION}: "
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
                    kind=str(kv.get("kind", "kv")),
                    latent_rank=int(kv.get("latent_rank", 0)),
                    groups=tuple(LayerGroup.from_dict(g) for g in kv.get("groups", ())),
                    order="heads" if kv.get("layout") == KV_LAYOUT_HEADS else "tokens",
                ),
                root=str(data["hash"]["root"]),
                format_version=version,
                hash_algorithm=str(data["hash"]["algorithm"]),
                created_at=str(data.get("created_at", "")),
                # Versions 1 and 2 had no field: their blocks have zlib CRC-32s.
                block_checksum=str(data["block_checksum"] if version >= 3 else data.get("block_checksum", CRC32)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{where} is missing or has a bad field ({exc!r}); the store is damaged") from None
        if manifest.hash_algorithm != HASH_ALGORITHM:
            raise CorruptStoreError(f"{where}: unknown hash algorithm {manifest.hash_algorithm!r}")
        if manifest.block_checksum not in BLOCK_CHECKSUMS:
            raise CorruptStoreError(f"{where}: unknown block checksum {manifest.block_checksum!r}")
        if manifest.kv.kind not in ("kv", "mla") or (not manifest.kv.plain and version < GROUPS_FORMAT_VERSION):
            raise CorruptStoreError(f"{where}: kv kind {manifest.kv.kind!r} or layer groups in a format {version} store")
        if manifest.kv.heads_first != (version >= HEADS_FORMAT_VERSION):
            raise CorruptStoreError(f"{where}: kv layout {kv.get('layout')!r} in a format {version} store")
        if manifest.kv.stored_dtype not in DTYPE_SIZES or manifest.block_size <= 0:
            raise CorruptStoreError(f"{where}: bad kv dtype {manifest.kv.dtype!r} or block size")
        return manifest


def _layout_names(kv: KVLayout) -> dict[str, str]:
    """The manifest's ``kv.layout`` and ``kv.scale_layout``: how the store's blocks are laid out."""
    if kv.heads_first:
        return {"layout": KV_LAYOUT_HEADS, "scale_layout": SCALE_LAYOUT_HEADS}
    return {"layout": KV_LAYOUT, "scale_layout": SCALE_LAYOUT}


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
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk, an I/O error or an interrupt: nothing half-written stays behind.
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return written


def create_once(path: Path, chunks: Iterable[bytes], fsync: bool = True, owner: str | None = None) -> bool:
    """Create ``path`` whole unless it exists, atomically among concurrent creators (NFS and Lustre
    included): each writes its own temporary file (:func:`temp_path` with ``owner``, or a random
    one) and hard-links it to ``path``; exactly one link succeeds. True if this call created it.

    Example:
        >>> create_once(Path("store/manifest.json"), [b"{}"])  # doctest: +SKIP
        True
    """
    tmp = temp_path(path, owner or secrets.token_hex(4))
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)
    return True


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# --------------------------------------------------------------------------- shards


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


def shard_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:06d}.safetensors"


# --------------------------------------------------------------------------- index segments

# Column name -> (dtype, values per entry). Entries are sorted by key64.
SEGMENT_COLUMNS: dict[str, tuple[str, int]] = {
    "key64": ("uint64", 1),
    "key": ("uint8", 32),
    "parent": ("uint8", 32),
    "slot": ("uint32", 1),  # block position in its shard: its tokens are [slot*B, (slot+1)*B)
    "depth": ("uint32", 1),  # block number in its sequence: the prefix ends at (depth+1)*B tokens
    "crc": ("uint32", 1),  # checksum (manifest `block_checksum`) of the block's `kv` bytes, then `kv_scale` (fp8)
    "shard": ("uint32", 1),  # compacted segments only: the row's shard, an index into metadata `shards`
}
OPTIONAL_COLUMNS = frozenset({"shard"})
# Segments at least this large are searched in place, their rows read with pread as lookups need them
# (FileColumn; kept open); smaller ones are read whole when needed, so a store of 100,000 small segments
# keeps no 100,000 files open. No segment is memory-mapped (a mapped file truncated in place: SIGBUS).
MAP_BYTES = 1 << 20
# key64 is also checksummed in chunks of this many rows (8 KiB), so a lookup in a large segment
# checks only the chunks it searches instead of the whole column (80 MiB for 10 million rows).
KEY64_CHUNK_ROWS = 1024
_ROW_BYTES = {name: np.dtype(dt).itemsize * width for name, (dt, width) in SEGMENT_COLUMNS.items()}


@dataclass(slots=True, frozen=True)
class ShardRef:
    """A shard as an index segment records it: the blocks, size and checksum it was written with."""

    name: str
    blocks: int
    bytes: int
    crc32: int
    writer: str = ""
    build: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


def segment_tensors(n: int, compacted: bool = False) -> list[TensorSpec]:
    return [
        TensorSpec(name, dt, (n, w) if w > 1 else (n,))
        for name, (dt, w) in SEGMENT_COLUMNS.items()
        if compacted or name not in OPTIONAL_COLUMNS
    ]


def encode_segment(columns: dict[str, np.ndarray], metadata: dict[str, str], shards: Sequence[ShardRef] = ()) -> list[bytes]:
    """Bytes of an index segment: entries sorted by key64, columns in SEGMENT_COLUMNS order, and a
    CRC-32 of each column in the metadata (``column_crc32``).

    A segment of one shard names it in ``metadata`` (``shard``, ``blocks``, ``shard_bytes``,
    ``shard_crc32``); a compacted segment gives ``shards`` and a ``shard`` column indexing them.
    """
    keys = np.ascontiguousarray(columns["key"], dtype=np.uint8)
    k64 = keys[:, :8].copy().view("<u8").reshape(-1)
    # Readers binary-search key64 and compare whole keys among equal key64s (a tie is ~2**-64 likely).
    order = np.argsort(k64, kind="stable")
    cols = {**columns, "key64": k64}
    n = len(keys)
    compacted = "shard" in columns
    data, crcs = [], {}
    for spec in segment_tensors(n, compacted):
        raw = np.ascontiguousarray(np.asarray(cols[spec.name])[order], dtype=np.dtype(spec.dtype).newbyteorder("<")).tobytes()
        crcs[spec.name] = zlib.crc32(raw)
        data.append(raw)
    return [segment_header(n, metadata, crcs, key64_chunks(k64[order]), shards if compacted else None), *data]


def segment_header(
    n: int, metadata: dict[str, str], crcs: dict[str, int], chunks: dict[str, Any], shards: Sequence[ShardRef] | None = None
) -> bytes:
    """The header of an index segment of ``n`` rows (compacted if ``shards`` is given), its columns
    following in SEGMENT_COLUMNS order: ``metadata`` plus ``column_crc32`` (``crcs``, the CRC-32 of
    each column's bytes), ``key64_chunks`` (``chunks``, from :func:`key64_chunks`) and ``shards``.
    For writers that produce the columns piece by piece (a streaming compaction)."""
    meta = {
        **metadata,
        "column_crc32": json.dumps({s.name: crcs[s.name] for s in segment_tensors(n, shards is not None)}, separators=(",", ":")),
    }
    meta["key64_chunks"] = json.dumps(chunks, separators=(",", ":"))
    if shards is not None:
        table = {name: [getattr(s, name) for s in shards] for name in SHARD_FIELDS}
        meta["shards"] = json.dumps(table, separators=(",", ":"))
    return encode_safetensors_header(segment_tensors(n, shards is not None), meta)


class Segment:
    """An index segment. Opening reads its header and, for a small segment, its ``key64`` column
    (checked against its CRC); ``cols`` gives every column: for a large segment (``mapped``, at
    least ``MAP_BYTES``) columns read from the file with ``pread`` as rows are asked
    (:class:`FileColumn`), for a small one the whole file read on each access (and checked).

    No store file is memory-mapped: a serving process reads an index another process may truncate
    or rewrite in place (a ``cp`` over a live store, an I/O error, NFS), and a mapped page past a
    truncated file's end kills the reader with SIGBUS. A read now ends short instead, and that is a
    :class:`CorruptStoreError`: a store fault the caller can turn into a miss.

    ``shards`` lists the shards its rows live in; ``shard_ids()`` gives each row's index into it.
    """

    __slots__ = (
        "path",
        "metadata",
        "n",
        "key64",
        "mapped",
        "_spans",
        "_checksums",
        "_chunks",
        "_file",
        "_cols",
        "_shard_table",
        "_shards",
        "opened_stat",
        "_whole",
    )

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self._cols: dict[str, FileColumn] | None = None
        self._whole: dict[str, np.ndarray] | None = None  # a large segment's columns, once read whole (cols)
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (kept open by a large segment, closed below otherwise)
        try:
            header = read_safetensors_header(f, path)
            st = os.fstat(f.fileno())
            size = st.st_size
            self.opened_stat = (st.st_ino, size, st.st_mtime_ns)  # the file as read: a reader can tell it changed
            self.metadata = header.metadata
            self._spans = _segment_spans(header, size, path)
            self.n = _column_rows(self._spans, path)
            self._checksums = _column_checksums(header.metadata, path)
            self._shard_table = _shard_table(header.metadata, "shard" in self._spans, path)
            self._shards: list[ShardRef] | None = None
            self.mapped = size >= MAP_BYTES
            self._chunks = _Key64Chunks.parse(header.metadata, self.n, path) if self.mapped else None
            start, end = self._spans["key64"]
            if self.mapped:
                self._file = f
                self._cols = {name: FileColumn(self, name) for name in self._spans}
                if self._chunks is None:
                    # An older segment: read and check the whole column now, in one sequential read.
                    self.key64 = np.frombuffer(self._pread(start, end - start), dtype="<u8")
                    self._check("key64", self.key64)
                else:
                    # Filled chunk by chunk as lookups check them (_check_chunks); zero pages until then.
                    self.key64 = np.zeros(self.n, dtype="<u8")
            else:
                self.key64 = np.frombuffer(self._pread(start, end - start, f), dtype="<u8")
                self._check("key64", self.key64)
        finally:
            if self._file is None:
                f.close()

    def _pread(self, offset: int, length: int, f: Any = None) -> bytes:
        """``length`` bytes of the file at ``offset``; a short read (the file was truncated since it
        was opened) is a CorruptStoreError."""
        fd = (f or self._file).fileno()
        data = os.pread(fd, length, offset)
        while len(data) < length:  # pread may return less than asked without reaching the end
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                store = self.path.parent.parent
                raise CorruptStoreError(
                    f"{self.path}: index segment is truncated (it changed while open); run `prefixgen verify {store}`"
                )
            data += more
        return data

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """[len(q)] (lo, hi) and ``first``: the rows ``lo[i] .. hi[i]-1`` are those whose key64
        equals ``q[i]``; ``first`` is True when the search read key64 chunks for the first time
        (their rows' other columns are then likely not in memory either: see ``prefetch``).

        In a segment with ``key64_chunks``, each query can only be in the chunks its key64 falls in
        (found from the chunks' first keys); those chunks are checked against their CRC-32 the first
        time, and the answer is accepted only if it is consistent with the checked chunks: damage
        anywhere else cannot hide a row, damage in them is refused.

        Example:
            >>> lo, hi, _ = segment.search(np.asarray([k64], "<u8"))  # doctest: +SKIP
        """
        col, ch = self.key64, self._chunks
        if ch is None or self.n == 0:
            return np.searchsorted(col, q, "left"), np.searchsorted(col, q, "right"), False
        if ch.checked[np.maximum(np.searchsorted(ch.first, q, "right") - 1, 0)].all():
            # Warm: search the whole column in C, then accept the answer only if it is consistent
            # with checked chunks (the rows around it are in them and bound it): else search again.
            lo, hi = np.searchsorted(col, q, "left"), np.searchsorted(col, q, "right")
            below, above = np.maximum(lo - 1, 0), np.minimum(hi, self.n - 1)
            c_a, c_b = below // ch.rows, above // ch.rows
            ok = ch.checked[c_a] & ch.checked[c_b] & (c_b - c_a <= 1) & (lo <= hi)
            ok &= ((lo == 0) | (col[below] < q)) & ((hi == self.n) | (col[above] > q))
            if ok.all():
                return lo, hi, False
        # Rows equal to q lie in chunks c_lo .. c_hi-1: every earlier chunk ends at or below a first
        # key64 < q, every later one starts above q. Check them, then search inside them only.
        c_hi = np.searchsorted(ch.first, q, "right")
        c_lo = np.minimum(np.maximum(np.searchsorted(ch.first, q, "left") - 1, 0), c_hi)
        first = self._check_chunks(c_lo, c_hi)
        end = np.minimum(c_hi * ch.rows, self.n)
        lo = _search_range(col, q, c_lo * ch.rows, end)
        hi = lo.copy()
        while True:  # rows equal to q from lo on: one, or (a key64 tie, ~2**-64 likely) a few
            eq = hi < end
            eq[eq] = col[hi[eq]] == q[eq]
            if not eq.any():
                return lo, hi, first
            hi += eq

    def _check_chunks(self, c_lo: np.ndarray, c_hi: np.ndarray) -> bool:
        """Read and check every chunk c_lo[i] .. c_hi[i]-1 not checked yet; True if there was one."""
        ch = self._chunks
        counts = c_hi - c_lo
        need = np.repeat(c_lo, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        fresh = np.unique(need[~ch.checked[need]]).tolist()
        base = self._spans["key64"][0]
        for c in fresh:  # ask for every read first: the kernel then fetches the chunks in parallel
            self._prefetch(base + c * ch.rows * 8, ch.rows * 8)
        for c in fresh:
            a, b = c * ch.rows, min((c + 1) * ch.rows, self.n)
            raw = self._pread(base + a * 8, (b - a) * 8)
            if zlib.crc32(raw) != int(ch.crcs[c]):
                self._refuse(f"column 'key64', rows {a}-{b - 1}")
            self.key64[a:b] = np.frombuffer(raw, dtype="<u8")
            ch.checked[c] = True
        return bool(fresh)

    def prefetch(self, rows: np.ndarray, columns: Iterable[str]) -> None:
        """Ask the kernel to read ``rows`` of ``columns`` of a large segment, all at once (cold
        cache: parallel reads instead of one read waiting for the next)."""
        if self._file is None:
            return
        for name in columns:
            if name not in self._spans:
                continue  # `shard` in a one-shard segment
            start, _ = self._spans[name]
            width = _ROW_BYTES[name]
            for r in np.unique(rows).tolist():
                self._prefetch(start + r * width, width)

    def _prefetch(self, offset: int, length: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), offset, length, os.POSIX_FADV_WILLNEED)

    def read_cols(self) -> dict[str, np.ndarray]:
        """Every column in memory, read whole and checked against its CRC (for a sweep over all rows:
        ``verify``, reports), whatever the segment's size."""
        with open(self.path, "rb") as f:
            data = f.read()
        spans = _segment_spans(read_safetensors_header(io.BytesIO(data), self.path), len(data), self.path)
        if spans != self._spans:
            raise CorruptStoreError(f"{self.path}: index segment changed while open; run `prefixgen verify`")
        cols = self._columns(memoryview(data))
        for name, col in cols.items():
            self._check(name, col)
        return cols

    @property
    def shard(self) -> str:
        """The shard of a one-shard segment ("" for a compacted segment)."""
        return self.metadata.get("shard", "")

    @property
    def shards(self) -> list[ShardRef]:
        """The shards this segment's rows live in (one for a segment written by a build)."""
        if self._shards is None:
            t = self._shard_table
            self._shards = [
                ShardRef(str(name), _number(blocks), _number(size), _number(crc), str(writer), str(build))
                for name, blocks, size, crc, writer, build in zip(*(t[f] for f in SHARD_FIELDS))
            ]
        return self._shards

    def shard_name(self, i: int) -> str:
        """File name of shard number ``i`` of this segment (a row naming a shard beyond the list: a
        damaged or rewritten segment, a CorruptStoreError)."""
        names = self._shard_table["name"]
        if not 0 <= i < len(names):
            self._refuse(f"a row names shard {i} of {len(names)}")
        return str(names[i])

    @property
    def compacted(self) -> bool:
        return "shard" in self._spans

    def column_span(self, name: str) -> tuple[int, int] | None:
        """File byte range of column ``name`` (None for ``shard`` in a one-shard segment)."""
        return self._spans.get(name)

    def column_checksum(self, name: str) -> int | None:
        """The CRC-32 recorded for column ``name`` (None if the segment records none)."""
        return None if self._checksums is None else self._checksums.get(name)

    @property
    def cols(self) -> dict[str, np.ndarray]:
        """Every column by name (``shard`` only in a compacted segment), in memory: a small segment is read
        again on each access (keep the dict while you use it), a large one read whole once and kept. A
        lookup reads only the rows it needs instead: :attr:`rows`."""
        if self._file is None:
            return self.read_cols()
        if self._whole is None:
            self._whole = self.read_cols()
        return self._whole

    @property
    def rows(self) -> dict[str, Any]:
        """Every column by name, for reading a few rows: a large segment's columns are :class:`FileColumn` s,
        read with ``pread`` as they are indexed (a lookup touches a few rows of a column of millions); a
        small segment's are :attr:`cols`."""
        return self._cols if self._cols is not None else self.cols

    def shard_ids(self, cols: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[n] each row's index into ``shards`` (all 0 for a one-shard segment)."""
        cols = self.cols if cols is None else cols
        return cols["shard"] if "shard" in cols else np.zeros(self.n, np.uint32)

    def _columns(self, data: memoryview) -> dict[str, np.ndarray]:
        buf = np.frombuffer(data, dtype=np.uint8)
        cols = {}
        for name, (start, end) in self._spans.items():
            dtype, width = SEGMENT_COLUMNS[name]
            col = buf[start:end].view(np.dtype(dtype).newbyteorder("<"))
            cols[name] = col.reshape(-1, width) if width > 1 else col
        return cols

    def _check(self, name: str, col: np.ndarray) -> None:
        if self._checksums is None or name not in self._checksums:
            return  # written before segments had checksums
        if zlib.crc32(np.ascontiguousarray(col).view(np.uint8)) != self._checksums[name]:
            self._refuse(f"column {name!r}")

    def _refuse(self, what: str) -> None:
        store = self.path.parent.parent
        raise CorruptStoreError(
            f"{self.path}: index segment fails its checksum ({what}); the store is damaged: run `prefixgen verify {store}`"
        )

    def verify_checksums(self) -> list[str]:
        """Names of the columns whose CRC-32 does not match the metadata (empty if none is recorded)."""
        if self._checksums is None:
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        cols = self._columns(memoryview(data))
        bad = [
            name
            for name, col in cols.items()
            if name in self._checksums and zlib.crc32(np.ascontiguousarray(col).view(np.uint8)) != self._checksums[name]
        ]
        text = self.metadata.get("key64_chunks")
        if text is not None:
            try:
                ok = json.loads(text) == key64_chunks(cols["key64"], int(json.loads(text)["rows"]))
            except (ValueError, TypeError, KeyError, AttributeError):
                ok = False
            if not ok:
                bad.append("key64_chunks")
        return bad


class FileColumn:
    """One column of a large segment, read from its file with ``pread`` as it is indexed: ``col[rows]``
    (an int, a slice, an integer array, or a tuple whose first item is one of those) reads only the
    rows asked, nearby rows with one request; ``np.asarray(col)`` reads the whole column. A file
    truncated since the segment was opened is a CorruptStoreError, never a fault of the process."""

    __slots__ = ("_seg", "_start", "_dtype", "_width", "_row_bytes")

    GAP_BYTES = 4096  # rows closer than this are read with one request

    def __init__(self, seg: Segment, name: str):
        dtype, width = SEGMENT_COLUMNS[name]
        self._seg = seg
        self._start = seg._spans[name][0]
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._width = width
        self._row_bytes = _ROW_BYTES[name]

    def __len__(self) -> int:
        return self._seg.n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._seg.n, self._width) if self._width > 1 else (self._seg.n,)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _range(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)``: [b - a] or [b - a, width]."""
        raw = self._seg._pread(self._start + a * self._row_bytes, (b - a) * self._row_bytes) if b > a else b""
        col = np.frombuffer(raw, dtype=self._dtype)
        return col.reshape(-1, self._width) if self._width > 1 else col

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        col = self._range(0, self._seg.n)
        return col if dtype is None else col.astype(dtype)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple):
            rows = self[index[0]]
            one = not isinstance(index[0], slice) and np.ndim(index[0]) == 0  # one row: no row axis left
            return rows[index[1:]] if one else rows[(slice(None), *index[1:])]
        n = self._seg.n
        if isinstance(index, slice):
            a, b, step = index.indices(n)
            return self._range(a, max(a, b))[::step] if step > 0 else np.asarray(self)[index]
        at = np.asarray(index)
        if at.dtype == bool:
            at = np.flatnonzero(at)
        if at.ndim == 0:
            i = int(at) + (n if int(at) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(at)} of a column of {n} rows")
            return self._range(i, i + 1)[0]
        at = np.where(at < 0, at + n, at).astype(np.int64)
        if len(at) and (at.min() < 0 or at.max() >= n):
            raise IndexError(f"rows beyond a column of {n} rows")
        rows, inverse = np.unique(at, return_inverse=True)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self._dtype)
        # Runs of rows closer than GAP_BYTES: one read each (a lookup's rows are scattered; a sweep's are dense).
        cut = np.flatnonzero(np.diff(rows) * self._row_bytes > self.GAP_BYTES) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(rows)]):
            first, last = int(rows[a]), int(rows[b - 1])
            out[a:b] = self._range(first, last + 1)[rows[a:b] - first]
        return out[inverse.reshape(at.shape)]


def _segment_spans(header: SafetensorsHeader, size: int, path: Path) -> dict[str, tuple[int, int]]:
    """File byte range of each column, checked against the file's size and the column's dtype."""
    spans = {}
    for name, (dtype, _) in SEGMENT_COLUMNS.items():
        info = header.tensors.get(name)
        if info is None:
            if name in OPTIONAL_COLUMNS:
                continue
            raise CorruptStoreError(f"{path}: index segment has no column {name!r}")
        start, end = (header.data_start + o for o in info["data_offsets"])
        if end > size or end < start or info["dtype"] != ST_DTYPES[dtype]:
            raise CorruptStoreError(f"{path}: index segment column {name!r} is truncated or mistyped")
        spans[name] = (start, end)
    return spans


def _column_rows(spans: dict[str, tuple[int, int]], path: Path) -> int:
    rows = {(end - start) // _ROW_BYTES[name] for name, (start, end) in spans.items()}
    if len(rows) != 1:
        raise CorruptStoreError(f"{path}: index segment columns have different lengths")
    return rows.pop()


def key64_chunks(k64: np.ndarray, rows: int = KEY64_CHUNK_ROWS) -> dict[str, Any]:
    """The ``key64_chunks`` metadata of a sorted key64 column: chunk size, each chunk's first key64
    and CRC-32 (both base64 of little-endian arrays), and a CRC-32 of those two arrays.

    Example:
        >>> key64_chunks(np.arange(3, dtype="<u8"), rows=2)["rows"]
        2
    """
    return key64_chunks_of([k64], rows)


def key64_chunks_of(pieces: Iterable[np.ndarray], rows: int = KEY64_CHUNK_ROWS) -> dict[str, Any]:
    """:func:`key64_chunks` of the column made of ``pieces`` back to back, read one at a time (each
    piece but the last a multiple of ``rows`` long): for a column too large to hold."""
    firsts, crc_list = [], []
    for piece in pieces:
        raw = np.ascontiguousarray(piece, dtype="<u8")
        firsts.append(raw[::rows].tobytes())
        crc_list += [zlib.crc32(raw[i : i + rows]) for i in range(0, len(raw), rows)]
    first = b"".join(firsts)
    crcs = np.asarray(crc_list, "<u4").tobytes()
    return {
        "rows": rows,
        "first": base64.b64encode(first).decode(),
        "crc32": base64.b64encode(crcs).decode(),
        "check": zlib.crc32(crcs, zlib.crc32(first)),
    }


@dataclass(slots=True)
class _Key64Chunks:
    """A large segment's key64 column checked chunk by chunk as lookups touch it."""

    rows: int
    first: np.ndarray  # [chunks] uint64 first key64 of each chunk
    crcs: np.ndarray  # [chunks] uint32
    checked: np.ndarray  # [chunks] bool: chunk already found intact

    @classmethod
    def parse(cls, metadata: dict[str, str], n: int, path: Path) -> _Key64Chunks | None:
        text = metadata.get("key64_chunks")
        if text is None:
            return None  # written before chunked checksums: the whole column is checked at open
        try:
            d = json.loads(text)
            rows = int(d["rows"])
            first_raw, crc_raw = base64.b64decode(d["first"], validate=True), base64.b64decode(d["crc32"], validate=True)
            ok = rows > 0 and zlib.crc32(crc_raw, zlib.crc32(first_raw)) == int(d["check"])
            first, crcs = np.frombuffer(first_raw, "<u8"), np.frombuffer(crc_raw, "<u4")
            ok = ok and len(first) == len(crcs) == -(-n // rows)
        except (ValueError, TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise CorruptStoreError(
                f"{path}: index segment metadata key64_chunks is damaged; the store is damaged: "
                f"run `prefixgen verify {path.parent.parent}`"
            )
        return cls(rows, first, crcs, np.zeros(len(first), bool))


def _search_range(col: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each query the first position in ``col[lo:hi]`` whose value is >= it (``hi`` if none):
    a vectorized binary search that reads only positions inside each query's range."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        less = active & (col[np.where(active, mid, 0)] < q)
        lo = np.where(less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)


def _column_checksums(metadata: dict[str, str], path: Path) -> dict[str, int] | None:
    text = metadata.get("column_crc32")
    if text is None:
        return None
    try:
        return {str(k): int(v) for k, v in json.loads(text).items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise CorruptStoreError(f"{path}: index segment metadata column_crc32 is damaged; run `prefixgen verify`") from None


SHARD_FIELDS = ("name", "blocks", "bytes", "crc32", "writer", "build")


def _shard_table(metadata: dict[str, str], compacted: bool, path: Path) -> dict[str, list]:
    """The shards a segment's rows live in, as columns (``SHARD_FIELDS``): parsed quickly even for
    the ~78,000 shards of a compacted 10-million-block index."""
    if not compacted:
        m = metadata
        one = (
            m.get("shard", ""),
            m.get("blocks"),
            m.get("shard_bytes"),
            m.get("shard_crc32"),
            m.get("writer", ""),
            m.get("build", ""),
        )
        return {name: [value] for name, value in zip(SHARD_FIELDS, one)}
    try:
        table = json.loads(metadata["shards"])
        if len({len(table[name]) for name in SHARD_FIELDS}) != 1:
            raise ValueError("columns of different lengths")
        return table
    except (KeyError, json.JSONDecodeError, TypeError, AttributeError, ValueError):
        raise CorruptStoreError(f"{path}: compacted index segment has no readable shard list; run `prefixgen verify`") from None


def _number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # reported by verify; readers need only the name


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
    # Distributed builds: ranks of the run; a rank's own part (``builds/<id>.ranks/``) has ``rank``
    # and ``head_tokens`` (shared-prefix tokens it prefilled first); the merged record has ``ranks``.
    world_size: int = 1
    rank: int = 0
    head_tokens: int = 0
    ranks: list[dict[str, Any]] = field(default_factory=list)
    # Tokens this run's tokenizer produced over all its passes (a rank of a distributed build: its
    # count shares; one process: the dataset, plus the count pass of --min-records/--max-bytes).
    tokenized_tokens: int = 0
    # A rank of a distributed build, in its count pass: the records it parsed and the bytes of the
    # dataset it read for them, and the bytes outside its share it read to number its records
    # (data.source.read_share): 0 now that ranks number records within their share (the plan makes
    # their indices in the dataset); kept, as earlier builds recorded a scan there. 0 for one process.
    read_records: int = 0
    read_bytes: int = 0
    scanned_bytes: int = 0
    # Distributed builds: plans this rank made (the ranks of a run make one between them), and the
    # attempt this rank ran in (``--rank``: each --resume of the ranks after one died plans the work
    # left anew, as attempt k+1; the build is complete when every rank completed the same attempt).
    plans_made: int = 0
    attempt: int = 0
    # What the records held: "text", "chat" (--messages-field) or "ids" (--ids-field: token ids used as
    # they are, not tokenized by prefixgen). Derived from ``options`` when not given (records written
    # before it was recorded).
    input: str = ""

    def __post_init__(self) -> None:
        if not self.input:
            self.input = record_input(self.options)

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        return cls(**_known_fields(cls, data))


def record_input(options: dict[str, Any]) -> str:
    """What a build's records held, from its options: ``ids``, ``chat`` or ``text``.

    Example:
        >>> record_input({"ids_field": "prompt_token_ids"}), record_input({"messages_field": "m"}), record_input({})
        ('ids', 'chat', 'text')
    """
    return "ids" if options.get("ids_field") else "chat" if options.get("messages_field") else "text"


RANK_PARTS_SUFFIX = ".ranks"  # builds/<build_id>.ranks/w<N>-r<R>.json: one rank's part of a distributed build
PLAN_SUFFIX = ".plan"  # builds/<build_id>.plan/<run>/: count shares and the plan of a distributed run
_SUMMED = (*BUILD_STAT_FIELDS, "head_tokens", "tokenized_tokens", "read_records", "read_bytes", "scanned_bytes", "plans_made")
_PER_RANK = ("rank", "status", "attempt", "writers", *_SUMMED, "seconds", "stage_seconds")


def merge_rank_parts(base: BuildRecord, parts: Sequence[BuildRecord]) -> BuildRecord:
    """One record for a distributed build: ``base`` (``builds/<id>.json``) with its ranks' parts
    summed, every writer id, per-rank statistics in ``ranks``, and a status that is ``complete``
    only when every rank of the run is, in the same attempt (a rank of an earlier attempt has the
    work of the latest plan still to do).

    Example:
        >>> parts = [BuildRecord("b", "d", status="complete", world_size=2, rank=r, records=3) for r in (0, 1)]
        >>> m = merge_rank_parts(BuildRecord("b", "d", world_size=2), parts)
        >>> m.status, m.records, len(m.ranks)
        ('complete', 6, 2)
    """
    merged = BuildRecord.from_dict(base.to_dict())
    parts = sorted(parts, key=lambda p: p.rank)
    for name in _SUMMED:
        setattr(merged, name, sum(getattr(p, name) for p in parts))
    merged.writers = [w for p in parts for w in p.writers]
    merged.seconds = max((p.seconds for p in parts), default=0.0)
    merged.finished_at = max((p.finished_at for p in parts), default="")
    merged.ranks = [{k: getattr(p, k) for k in _PER_RANK} for p in parts]
    merged.selection = next((p.selection for p in parts if p.selection), merged.selection)  # the plan's, one for all
    statuses = {p.status for p in parts}
    world = parts[0].world_size if parts else merged.world_size
    merged.world_size = world
    if "failed" in statuses:
        merged.status = "failed"
    elif "interrupted" in statuses:
        merged.status = "interrupted"
    elif statuses == {"complete"} and {p.rank for p in parts} == set(range(world)) and len({p.attempt for p in parts}) == 1:
        merged.status = "complete"
    else:
        merged.status = "running"
    return merged


# counts/<build_id>.safetensors: how many of that build's records contained each block.
COUNT_COLUMNS: dict[str, tuple[str, int]] = {"key": ("uint8", 32), "records": ("uint64", 1)}
