"""Between a transformers cache and the store's token-major rows, for every layout kind.

A store row is one token: ``[L, parts, H, D]`` (``KVLayout.token_shape``). Per-head K/V layers (full
and sliding-window alike: transformers' cache keeps every token of a layer given a plain
``DynamicLayer``) map ``keys``/``values`` ``[batch, H, T, D]`` to parts 0 and 1. An MLA layer's cache
holds the latent as transformers 5.19 to 5.24 compute it in ``DeepseekV2Attention``/``DeepseekV3Attention``:
``keys`` = ``kv_a_layernorm(kv_nope)`` ``[batch, 1, T, kv_lora_rank]`` and ``values`` = the rope key after
RoPE ``[batch, 1, T, rope_dim]``; the row is their concatenation, vLLM's MLA cache entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from prefixgen.compat import make_cache
from prefixgen.format import KVLayout


def empty_cache() -> DynamicCache:
    """A cache with plain layers only: a model given none makes its own from its config, whose
    sliding-window layers keep only the last ``window`` tokens; the store needs every token of every layer."""
    return make_cache([])


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
