"""``manifest.json``: the format versions, the model a store was built with (:class:`ModelFingerprint`), the
shape and storage of its KV (:class:`KVLayout`) and the :class:`Manifest` that holds them, parsed and checked."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixgen.cache_spec import LayerGroup
from prefixgen.checksum import BLOCK_CHECKSUMS, CRC32, CRC32C
from prefixgen.errors import CorruptStoreError, NewerFormatError
from prefixgen.format.files import MANIFEST_FILE
from prefixgen.format.keys import HASH_ALGORITHM, BlockHash
from prefixgen.format.tensors import DTYPE_SIZES

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

# Token-major (versions 1 to 4): consecutive blocks of one sequence are one contiguous byte range.
KV_LAYOUT = "tokens,layers,kv,kv_heads,head_dim"
# fp8 scales: one float32 per block, layer, K/V and head.
SCALE_LAYOUT = "blocks,layers,kv,kv_heads"
# Head-major (version 5): a block is its heads one after the other, each [B, layers, kv, head_dim], so one
# tensor-parallel rank's heads of a block are one contiguous byte range; the scales likewise per head.
KV_LAYOUT_HEADS = "blocks,kv_heads,block_tokens,layers,kv,head_dim"
SCALE_LAYOUT_HEADS = "blocks,kv_heads,layers,kv"
KV_ORDERS = ("heads", "tokens")  # KVLayout.order: how a store lays out a block's bytes


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

    def head_crc_bytes(self) -> int:
        """Bytes of one block's ``head_crc`` row (format 5: a uint32 per head; 0 token-major)."""
        return 4 * self.num_kv_heads if self.heads_first else 0


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
