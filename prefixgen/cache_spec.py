"""One description of a model's cache: which layers keep what, derived from its transformers config.

A model's layers fall into groups by what their cache holds per token (or per sequence):

- ``full``: per-head K and V of every token (``[2, kv_heads, head_dim]``);
- ``sliding``: the same K and V, of which attention reads only the last ``window`` tokens (Gemma 2/3,
  GPT-OSS with attention ``sinks``, Mistral with a window);
- ``chunked``: the same K and V, read within chunks of ``chunk`` tokens (Llama 4's local layers);
- ``mla``: multi-head latent attention (DeepSeek V2/V3, Kimi K2): one latent per token,
  ``kv_lora_rank`` values of the normalized compressed KV then ``rope_dim`` values of the shared
  rope key after RoPE, as vLLM's MLA cache and transformers' cache hold it;
- ``recurrent``: a state per sequence, not per token (Gated DeltaNet in Qwen3-Next, Mamba2 in
  hybrids): ``conv`` values of the causal convolution's window and ``ssm`` values of the
  SSM / delta-rule state.

The build, the format (``KVLayout``) and analyze/simulate's byte arithmetic take a model's cache from
:func:`cache_spec`; a group this prefixgen cannot store is refused here, by name, in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prefixgen.errors import ModelError

FULL, SLIDING, CHUNKED, MLA, RECURRENT = "full", "sliding", "chunked", "mla", "recurrent"
# Groups a store holds (per-token KV, or recurrent states at block boundaries: prefixgen/store/states.py).
STORABLE = (FULL, SLIDING, CHUNKED, MLA, RECURRENT)
ATTENTION = (FULL, SLIDING, CHUNKED)

# transformers' layer_types / layers_block_type names -> our group kind
_LAYER_KINDS = {
    "full_attention": FULL,
    "attention": FULL,
    "sliding_attention": SLIDING,
    "chunked_attention": CHUNKED,
    "linear_attention": RECURRENT,
    "mamba": RECURRENT,
}

_DESCRIPTIONS = {
    FULL: "full attention",
    SLIDING: "sliding-window attention",
    CHUNKED: "chunked local attention",
    MLA: "multi-head latent attention (MLA)",
    RECURRENT: "recurrent state (linear attention / state space)",
}


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Layers whose cache has one shape and one rule for what attention reads.

    Per token (attention groups): ``2 * kv_heads * head_dim`` values, or for ``mla``
    ``kv_lora_rank + rope_dim``. Per sequence (``recurrent``): ``conv + ssm`` values.
    """

    kind: str
    layers: tuple[int, ...]
    kv_heads: int = 0
    head_dim: int = 0
    window: int = 0  # sliding: attention reads the last `window` tokens (the query's own included)
    sinks: bool = False  # sliding/full with learned attention sinks (GPT-OSS): a per-head parameter, nothing cached
    chunk: int = 0  # chunked: tokens per attention chunk
    kv_lora_rank: int = 0  # mla
    rope_dim: int = 0  # mla
    conv: int = 0  # recurrent: values of the convolution state per layer
    ssm: int = 0  # recurrent: values of the SSM / delta-rule state per layer
    state_stride: int = 0  # recurrent, in a store's manifest: tokens between two stored states (state_stride_tokens)

    @property
    def values_per_token(self) -> int:
        """Cached values per token over the group's layers (0 for a recurrent group)."""
        if self.kind == MLA:
            return len(self.layers) * (self.kv_lora_rank + self.rope_dim)
        if self.kind == RECURRENT:
            return 0
        return len(self.layers) * 2 * self.kv_heads * self.head_dim

    @property
    def values_per_state(self) -> int:
        """Values of one sequence's state over the group's layers (recurrent groups; 0 otherwise)."""
        return len(self.layers) * (self.conv + self.ssm) if self.kind == RECURRENT else 0

    def describe(self) -> str:
        what = _DESCRIPTIONS[self.kind]
        if self.kind == SLIDING:
            what += f" (window {self.window}{', with sinks' if self.sinks else ''})"
        elif self.kind == CHUNKED:
            what += f" (chunks of {self.chunk})"
        return f"{len(self.layers)} layers of {what}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's form: the kind, its layers and only the fields that apply to it."""
        out: dict[str, Any] = {"kind": self.kind, "layers": list(self.layers)}
        for name in (
            "kv_heads",
            "head_dim",
            "window",
            "sinks",
            "chunk",
            "kv_lora_rank",
            "rope_dim",
            "conv",
            "ssm",
            "state_stride",
        ):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerGroup:
        fields = {k: v for k, v in data.items() if k in cls.__slots__ and k != "layers"}  # type: ignore[attr-defined]
        return cls(layers=tuple(int(i) for i in data["layers"]), **fields)


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """A model's cache: its layer groups, in the order of their first layer.

    Example:
        >>> spec = cache_spec(transformers.Gemma3TextConfig(num_hidden_layers=2, sliding_window=64))  # doctest: +SKIP
        >>> [g.kind for g in spec.groups]  # doctest: +SKIP
        ['sliding', 'full']
    """

    groups: tuple[LayerGroup, ...]
    num_layers: int

    @property
    def plain(self) -> bool:
        """Every layer is full attention with one K/V shape: what prefixgen stored before groups."""
        return len(self.groups) == 1 and self.groups[0].kind == FULL and not self.groups[0].sinks

    @property
    def kinds(self) -> list[str]:
        return sorted({g.kind for g in self.groups})

    @property
    def recurrent(self) -> LayerGroup | None:
        """The recurrent group (linear-attention / state-space layers), if the model has one."""
        return next((g for g in self.groups if g.kind == RECURRENT), None)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a per-token cache, in layer order: the layers of a store's ``kv`` rows."""
        return tuple(sorted(i for g in self.groups if g.kind != RECURRENT for i in g.layers))

    def values_per_token(self) -> int:
        return sum(g.values_per_token for g in self.groups)

    def values_per_state(self) -> int:
        return sum(g.values_per_state for g in self.groups)

    def bytes_per_token(self, itemsize: int) -> int:
        """Bytes of cache per token in a ``itemsize``-byte dtype (attention and MLA groups)."""
        return self.values_per_token() * itemsize

    def bytes_per_boundary(self, itemsize: int) -> int:
        """Bytes of one sequence's recurrent state (a boundary where a prefix's state is kept)."""
        return self.values_per_state() * itemsize

    def describe(self) -> str:
        return "; ".join(g.describe() for g in self.groups)

    def check_storable(self) -> None:
        """Raise ModelError naming the first group kind a store cannot hold yet."""
        for g in self.groups:
            if g.kind not in STORABLE:
                raise ModelError(
                    f"this model's cache has {g.describe()} (layers {_ranges(g.layers)}): prefixgen stores full, "
                    f"sliding-window and chunked attention and MLA latents, not {_DESCRIPTIONS[g.kind]} yet"
                )
        if not self.attention_layers:
            raise ModelError(
                f"this model's cache has only {self.describe()}: prefixgen stores recurrent states beside the KV "
                "of attention layers (hybrids such as Qwen3-Next or Granite 4.0), not a model without attention"
            )
        shapes = {(g.kv_heads, g.head_dim) for g in self.groups if g.kind in ATTENTION}
        if len(shapes) > 1:
            raise ModelError(
                "this model's attention layers have KV of different shapes "
                f"({', '.join(f'{h} heads x {d}' for h, d in sorted(shapes))}): prefixgen needs one shape for all"
            )
        if any(g.kind == MLA for g in self.groups) and len(self.groups) > 1:
            raise ModelError(f"this model mixes MLA with other layers ({self.describe()}): prefixgen cannot store that")


def cache_spec(config: Any) -> CacheSpec:
    """The cache of the model ``config`` describes (its text config for a multimodal model).

    Raises ModelError for an encoder-decoder (its cross-attention KV depends on the encoder's input,
    not on a prefix of the decoder's tokens) and for a layer type it does not know.

    Example:
        >>> cache_spec(load_config("models/stories260K")).describe()  # doctest: +SKIP
        '5 layers of full attention'
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{getattr(config, 'model_type', 'this model')} is an encoder-decoder: its cross-attention KV depends on "
            "the encoder's input, not on a prefix of tokens, so prefixgen cannot store it; use a decoder-only causal LM"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(text.num_hidden_layers)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0))
    if getattr(text, "kv_lora_rank", None):
        group = LayerGroup(MLA, tuple(range(n)), kv_lora_rank=int(text.kv_lora_rank), rope_dim=int(text.qk_rope_head_dim))
        return CacheSpec((group,), n)
    types = _layer_types(text, n)
    window = int(getattr(text, "sliding_window", None) or 0)
    sinks = getattr(text, "model_type", "") == "gpt_oss"  # its attention adds a learned sink logit per head
    chunk = int(getattr(text, "attention_chunk_size", None) or 0)
    conv, ssm = _recurrent_sizes(text)
    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        if t not in _LAYER_KINDS:
            raise ModelError(f"layer {i} of this model is of type {t!r}, which prefixgen does not know how to cache")
        kind = _LAYER_KINDS[t]
        if kind == FULL and window and getattr(text, "layer_types", None) is None and not _windowless(text):
            kind = SLIDING  # Mistral-style: one window for every layer, no layer_types
        by_kind.setdefault(kind, []).append(i)
    groups = []
    for kind, layers in sorted(by_kind.items(), key=lambda kv: kv[1][0]):
        attn = kind != RECURRENT
        groups.append(
            LayerGroup(
                kind,
                tuple(layers),
                kv_heads=kv_heads if attn else 0,
                head_dim=head_dim if attn else 0,
                window=window if kind == SLIDING else 0,
                sinks=sinks and attn,
                chunk=chunk if kind == CHUNKED else 0,
                conv=conv if not attn else 0,
                ssm=ssm if not attn else 0,
            )
        )
    return CacheSpec(tuple(groups), n)


def _layer_types(text: Any, n: int) -> list[str]:
    types = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None)
    if types is None:
        return ["full_attention"] * n
    types = [str(t) for t in types]
    if len(types) != n:
        raise ModelError(f"the config names {len(types)} layer types for {n} layers")
    return types


def _windowless(text: Any) -> bool:
    """Configs that carry a ``sliding_window`` their attention does not use (Qwen2 with use_sliding_window off)."""
    return getattr(text, "use_sliding_window", True) is False


def _recurrent_sizes(text: Any) -> tuple[int, int]:
    """(conv, ssm) values per layer of the recurrent layers, from the config's published fields.

    Gated DeltaNet (Qwen3-Next): the convolution runs over q, k and v (``2 * key_heads * key_dim +
    value_heads * value_dim`` channels) and keeps ``kernel - 1`` past inputs (vLLM's and FLA's state;
    transformers keeps ``kernel``); the delta-rule state is ``value_heads x key_dim x value_dim``.
    Mamba2: the convolution runs over ``expand * hidden + 2 * groups * d_state`` channels, the SSM
    state is ``heads x head_dim x d_state``.
    """
    if getattr(text, "linear_num_value_heads", None):
        key_dim = text.linear_num_key_heads * text.linear_key_head_dim
        value_dim = text.linear_num_value_heads * text.linear_value_head_dim
        conv = (2 * key_dim + value_dim) * (text.linear_conv_kernel_dim - 1)
        ssm = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim
        return int(conv), int(ssm)
    if getattr(text, "mamba_n_heads", None):
        inner = text.mamba_expand * text.hidden_size
        conv = (inner + 2 * text.mamba_n_groups * text.mamba_d_state) * (text.mamba_d_conv - 1)
        return int(conv), int(text.mamba_n_heads * text.mamba_d_head * text.mamba_d_state)
    return 0, 0


def state_stride_tokens(spec: CacheSpec, itemsize: int, ssm_itemsize: int | None = None) -> int:
    """Tokens between two stored recurrent states so that the states cost no more than the KV
    of the tokens between them (a power of two): below it, states would outweigh the KV itself.
    ``ssm_itemsize``: bytes per SSM / delta-rule value where they differ from the KV's (transformers
    keeps Gated DeltaNet's state in float32 whatever the model's dtype).

    Example:
        >>> state_stride_tokens(cache_spec(qwen3_next_80b_config), 2)  # doctest: +SKIP
        2048
    """
    per_token = spec.bytes_per_token(itemsize)
    per_state = spec.bytes_per_boundary(itemsize)
    if ssm_itemsize is not None:
        per_state = sum(len(g.layers) * (g.conv * itemsize + g.ssm * ssm_itemsize) for g in spec.groups if g.kind == RECURRENT)
    if not per_state:
        return 0
    return 1 << max(0, math.ceil(math.log2(per_state / max(per_token, 1))))


def _ranges(layers: tuple[int, ...]) -> str:
    if len(layers) > 4:
        return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"
    return ", ".join(str(i) for i in layers)
