"""Between a transformers cache and the store's token-major rows, for every layout kind.

A store row is one token: ``[L, parts, H, D]`` (``KVLayout.token_shape``). Per-head K/V layers (full
and sliding-window alike: transformers' cache keeps every token of a layer given a plain
``DynamicLayer``) map ``keys``/``values`` ``[batch, H, T, D]`` to parts 0 and 1. An MLA layer's cache
holds the latent as transformers 5.19 to 5.24 compute it in ``DeepseekV2Attention``/``DeepseekV3Attention``:
``keys`` = ``kv_a_layernorm(kv_nope)`` ``[batch, 1, T, kv_lora_rank]`` and ``values`` = the rope key after
RoPE ``[batch, 1, T, rope_dim]``; the row is their concatenation, vLLM's MLA cache entry.

A hybrid model (``recurrent`` group: Gated DeltaNet, Mamba2) has rows for its attention layers only; its
recurrent layers' states (``LinearAttentionLayer``: conv ``[batch, channels, kernel]``, ssm) are kept
apart (``prefixgen.store.states``) as conv ``[R, channels, kernel - 1]`` and ssm ``[R, ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from prefixgen.cache_spec import RECURRENT, cache_spec
from prefixgen.compat import hybrid_cache, make_cache, model_cache, recurrent_state
from prefixgen.format import DTYPE_SIZES, KVLayout


def empty_cache() -> DynamicCache:
    """A cache with plain layers only: a model given none makes its own from its config, whose
    sliding-window layers keep only the last ``window`` tokens; the store needs every token of every layer."""
    return make_cache([])


def new_cache(config) -> DynamicCache:
    """The empty cache to give a forward of this model: plain layers (:func:`empty_cache`), or for a
    hybrid the model's own (recurrent layers need their state layers)."""
    return model_cache(config) if cache_spec(config).recurrent is not None else empty_cache()


def recurrent_layers(layout: KVLayout) -> tuple[int, ...]:
    """The model's recurrent layers (empty unless hybrid)."""
    return next((g.layers for g in layout.groups if g.kind == RECURRENT), ())


def attention_layers(layout: KVLayout) -> tuple[int, ...]:
    """The model's layers that a store row holds, in row order."""
    return tuple(sorted(i for g in layout.groups if g.kind != RECURRENT for i in g.layers)) or tuple(range(layout.num_layers))


def state_bytes_per_block(layout: KVLayout, block_size: int) -> int:
    """A hybrid's stored recurrent state bytes per block, at one state every ``state_stride`` tokens
    (rounded up to blocks): conv values in the KV's dtype, SSM values in float32 as transformers keeps
    them. 0 for a model without recurrent layers. Record ends add states beyond these.

    Example:
        >>> state_bytes_per_block(config_kv_layout(qwen3_next_80b_config, "bfloat16"), 16)  # doctest: +SKIP
        608256
    """
    g = next((x for x in layout.groups if x.kind == RECURRENT), None)
    if g is None:
        return 0
    per_state = len(g.layers) * (g.conv * DTYPE_SIZES[layout.dtype] + g.ssm * 4)
    blocks = max(1, -(-g.state_stride // block_size))
    return -(-per_state // blocks)


def kv_layers(cache: DynamicCache, layout: KVLayout) -> list:
    """The cache's layers that a row holds (all but a hybrid's recurrent layers)."""
    if not recurrent_layers(layout):
        return list(cache.layers)
    return [cache.layers[i] for i in attention_layers(layout)]


def states_from_cache(cache: DynamicCache, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv ``[batch, R, channels, kernel - 1]``, ssm ``[batch, R, ...]``) of a hybrid's recurrent layers, copied:
    the next token's convolution reads only the last ``kernel - 1`` inputs, so the oldest one is not kept."""
    convs, ssms = zip(*(recurrent_state(cache.layers[i]) for i in recurrent_layers(layout)))
    return torch.stack([c[..., 1:] for c in convs], 1), torch.stack(ssms, 1)


def hybrid_to_cache(
    kv: torch.Tensor | None, conv: torch.Tensor | None, ssm: torch.Tensor | None, layout: KVLayout, tokens: int
) -> DynamicCache:
    """A cache (batch 1) that continues a hybrid model after ``tokens`` tokens: rows ``[tokens, L, parts, H, D]``
    of its attention layers (None for none) and its recurrent state (conv ``[R, channels, kernel - 1]``, ssm ``[R, ...]``).
    The conv state gets back its oldest input as zero: no later output reads it."""
    one = [None if x is None else x.unsqueeze(0) for x in (kv, conv, ssm)]
    return hybrid_batch_to_cache(*one, layout, tokens)


def hybrid_batch_to_cache(
    kv: torch.Tensor | None, conv: torch.Tensor | None, ssm: torch.Tensor | None, layout: KVLayout, tokens: int
) -> DynamicCache:
    """:func:`hybrid_to_cache` of a batch: ``kv`` ``[batch, tokens, L, parts, H, D]``, conv ``[batch, R, channels,
    kernel - 1]``, ssm ``[batch, R, ...]``; every row after the same number of ``tokens``."""
    rec = recurrent_layers(layout)
    layers: list = [None] * (len(rec) + layout.num_layers)
    if kv is not None and tokens:
        for i, pair in zip(attention_layers(layout), layers_from_rows(kv, layout)):
            layers[i] = pair
    if not tokens:  # nothing stored: layers that a forward initializes, as the model's own empty cache
        return hybrid_cache(layers, dict.fromkeys(rec), 0)
    full = torch.nn.functional.pad(conv, (1, 0))  # [batch, R, channels, kernel]
    states = {i: (full[:, j], ssm[:, j]) for j, i in enumerate(rec)}
    return hybrid_cache(layers, states, tokens)


def rows_from_layers(layers: Sequence, layout: KVLayout, start: int) -> torch.Tensor:
    """Token-major rows ``[batch, T - start, L, parts, H, D]`` of a cache's layers, from position ``start``."""
    k0 = layers[0].keys  # [batch, H, T, D]
    batch, n = k0.shape[0], k0.shape[2] - start
    out = torch.empty(batch, n, *layout.token_shape, dtype=k0.dtype, device=k0.device)
    for i, layer in enumerate(layers):
        if layout.kind == "mla":
            r = layout.latent_rank
            out[:, :, i, 0, 0, :r] = layer.keys[:, 0, start:]
            out[:, :, i, 0, 0, r:] = layer.values[:, 0, start:]
        else:
            out[:, :, i, 0] = layer.keys[:, :, start:].transpose(1, 2)
            out[:, :, i, 1] = layer.values[:, :, start:].transpose(1, 2)
    return out


def layers_from_rows(kv: torch.Tensor, layout: KVLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[batch, H, T, D]`` (MLA: latent and rope key ``[batch, 1, T, *]``)
    from rows ``[batch, T, L, parts, H, D]``."""
    out = []
    for i in range(kv.shape[2]):
        if layout.kind == "mla":
            r = layout.latent_rank
            out.append((kv[:, :, i, 0, :, :r].transpose(1, 2).contiguous(), kv[:, :, i, 0, :, r:].transpose(1, 2).contiguous()))
        else:
            out.append((kv[:, :, i, 0].transpose(1, 2).contiguous(), kv[:, :, i, 1].transpose(1, 2).contiguous()))
    return out


def rows_to_cache(kv: torch.Tensor, layout: KVLayout) -> DynamicCache:
    """``[T, L, parts, H, D]`` rows of one sequence -> a DynamicCache (batch 1) that continues it."""
    return make_cache(layers_from_rows(kv.unsqueeze(0), layout))
