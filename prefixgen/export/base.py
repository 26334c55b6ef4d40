"""What an export target is: the engine-specific half of ``prefixgen export``.

The framework (``prefixgen.export.export``) walks the store and hands each target a unit of KV
(``unit_tokens`` tokens of one chain) with the unit's key; the target says what the engine calls
that unit (its file names) and which bytes it expects in them. A target is a dataclass whose
fields are its parameters (they are recorded in the export's manifest, and an export into a folder
whose manifest records other parameters is refused).

Example (a target writing each 16-token unit's KV as-is, named by a running SHA-256):
    >>> @dataclass
    ... class Flat:
    ...     unit_tokens: int = 16
    ...     def check(self, info): pass
    ...     def first_key(self): return ""
    ...     def next_key(self, parent, tokens):
    ...         return hashlib.sha256(bytes.fromhex(parent) + tokens.astype("<u4").tobytes()).hexdigest()
    ...     def files(self, key, kv): yield f"{key}.bin", kv.contiguous().view(torch.uint8).numpy()
    >>> export("store", Flat(), "out")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from prefixgen.cache_spec import FULL, LayerGroup
from prefixgen.format import DTYPE_SIZES, Manifest


@dataclass(slots=True, frozen=True)
class StoreInfo:
    """What a target may need to know of the store it exports (from its manifest).

    Example:
        >>> info = StoreInfo.from_manifest(store.manifest)  # doctest: +SKIP
        >>> info.kv_dtype, info.storage
        ('bfloat16', 'native')
    """

    block_size: int  # tokens per stored block
    num_layers: int
    num_kv_heads: int  # all of the model's KV heads (a target splits them across TP ranks)
    head_dim: int
    kv_dtype: str  # torch dtype name of the model's KV ("bfloat16", "float16", "float32"): the dtype of ``kv``
    storage: str  # "native" or "fp8" (the store's own encoding; ``kv`` is dequantized to kv_dtype)
    model_name: str  # the name the store's model was loaded under at build time
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"
    weights_digest: str  # hex: identifies the weights (see FORMAT.md)
    tokenizer_digest: str  # hex: identifies the tokenizer and chat template
    # The model's cache (format 4): "kv" (per-head K/V, ``parts`` 2) or "mla" (one latent per token and layer:
    # ``num_kv_heads`` 1, ``head_dim`` = ``latent_rank`` + rope dims, ``parts`` 1); ``groups`` which layers are of
    # which kind (``prefixgen.cache_spec``; empty for a plain full-attention store).
    kind: str = "kv"
    latent_rank: int = 0
    groups: tuple[LayerGroup, ...] = ()
    # MLA: the config's ``rope_interleave`` (DeepSeek V3, Kimi K2, GLM-4 MoE Lite): see ``engine_mla_rows``.
    rope_interleave: bool = False

    @classmethod
    def from_manifest(cls, m: Manifest) -> StoreInfo:
        return cls(
            block_size=m.block_size,
            num_layers=m.kv.num_layers,
            num_kv_heads=m.kv.num_kv_heads,
            head_dim=m.kv.head_dim,
            kv_dtype=m.kv.dtype,
            storage=m.kv.storage,
            model_name=m.model.name,
            architecture=m.model.architecture,
            model_type=m.model.model_type,
            weights_digest=m.model.weights_digest,
            tokenizer_digest=m.model.tokenizer_digest,
            kind=m.kv.kind,
            latent_rank=m.kv.latent_rank,
            groups=tuple(m.kv.groups),
            rope_interleave=bool(m.model.text_config.get("rope_interleave", False)),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.kv_dtype)

    @property
    def parts(self) -> int:
        """Tensors per token and layer in ``kv``: K and V (2), or one MLA latent (1)."""
        return 1 if self.kind == "mla" else 2

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token in ``kv_dtype``, all layers and heads."""
        return self.num_layers * self.parts * self.num_kv_heads * self.head_dim * DTYPE_SIZES[self.kv_dtype]

    def group_kinds(self) -> set[str]:
        """The kinds of the model's layer groups (``{"full"}`` for a plain store)."""
        return {g.kind for g in self.groups} or {FULL}

    def layers_of(self, *kinds: str) -> list[int]:
        """The layers of the groups of ``kinds``, in order (every layer of a plain store is ``full``)."""
        if not self.groups:
            return list(range(self.num_layers)) if FULL in kinds else []
        return sorted(i for g in self.groups if g.kind in kinds for i in g.layers)

    def engine_mla_rows(self, kv: torch.Tensor) -> torch.Tensor:
        """An MLA store's rows ``[T, L, 1, 1, latent]`` as the engines' MLA caches hold them (``kv`` itself when
        they are the same).

        The store holds what transformers caches. With ``rope_interleave`` (DeepSeek V3's config default)
        transformers rotates the rope key's interleaved pairs ``(x0, x1), (x2, x3), ...`` but writes the result
        de-interleaved, ``[x0', x2', ..., x1', x3', ...]`` (``apply_rotary_pos_emb_interleave``: same dot
        products, as its query is permuted alike), while vLLM (``get_rope(..., is_neox_style=False)`` in
        ``deepseek_v2.py``) and SGLang (``is_neox_style = not rope_interleave``) keep the pairs in place. So
        the rope part is interleaved back here: ``[T, L, 1, 1, rope]`` ``[2, rope / 2]`` -> ``[rope / 2, 2]``.
        """
        if self.kind != "mla" or not self.rope_interleave:
            return kv
        r = self.latent_rank
        rope = kv[..., r:]
        out = torch.empty(kv.shape, dtype=kv.dtype)
        out[..., :r] = kv[..., :r]
        out[..., r:] = rope.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)  # [.., 2, rope/2] -> [.., rope/2, 2]
        return out

    def describe(self) -> str:
        """The model's cache in words, e.g. "2 layers of sliding-window attention (window 64); 2 layers of ..."."""
        return "; ".join(g.describe() for g in self.groups) or f"{self.num_layers} layers of full attention"


@runtime_checkable
class ExportTarget(Protocol):
    """An engine's on-disk layout of prefix KV.

    Attributes and methods the framework calls:

    * ``unit_tokens``: tokens per unit (SGLang's page, LMCache's chunk); a multiple of the store's
      block size (``check`` refuses others). Only full units are exported.
    * ``check(info)``: raise :class:`prefixgen.errors.ExportError` saying what of the store the target
      cannot represent (block size, dtype, fp8 storage, head count and TP size, ...). The framework
      always hands ``kv`` dequantized to ``info.kv_dtype``; a target that cannot take an fp8 store's
      dequantized values refuses ``info.storage == "fp8"`` here.
    * ``first_key()``: the key before a chain's first unit (a seed, or None).
    * ``next_key(parent, tokens)``: the key of the unit of ``tokens`` (int64 ``[unit_tokens]``) that
      follows the unit whose key is ``parent``. Called in chain order, parents first.
    * ``files(key, kv)``: the unit's files as (name relative to the export folder, data); ``kv`` is
      ``[unit_tokens, num_layers, info.parts, num_kv_heads, head_dim]`` (an MLA store: parts 1, one head of the
      latent) in ``info.kv_dtype``, on the CPU. Data is
      bytes, an array written in C order whatever its strides (a reordering view of ``kv``: the kernel
      copies each contiguous run once, see ``prefixgen.export.iov``), or a list of them. ``kv`` stays
      valid until the unit's files are written.

    Optional, used when present:

    * ``name``: the target's name in the export manifest (default: the class name).
    * ``names(key) -> list[str]``: the names ``files(key, kv)`` would give, so that a resumed export
      skips a unit whose files all exist without reading its KV.
    * ``extra_files() -> list[(name, bytes)]``: files the engine expects beside the units' (vLLM's
      ``config.json``), written before them when missing.
    """

    unit_tokens: int

    def check(self, info: StoreInfo) -> None: ...

    def first_key(self) -> Any: ...

    def next_key(self, parent: Any, tokens: np.ndarray) -> Any: ...

    def files(self, key: Any, kv: torch.Tensor) -> Iterable[tuple[str, Any]]: ...


@dataclass(slots=True)
class ExportSummary:
    """What an export wrote.

    Example:
        >>> s = export("store", SGLangTarget(model_name="m"), "out")  # doctest: +SKIP
        >>> s.files, s.bytes, s.skipped_existing
        (120, 3932160, 0)
    """

    files: int = 0  # files written by this run
    bytes: int = 0  # bytes written by this run
    skipped_existing: int = 0  # files already there (a resumed or appended export)
    seconds: float = 0.0
    units: int = 0  # units (pages, chunks) exported or found already exported
    blocks: int = 0  # store blocks the units cover
    states: int = 0  # recurrent state files written by this run (a hybrid model's; prefixgen.export.states)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
