"""The one place that knows how transformers versions differ.

transformers 5.24 renamed the ``past_key_values`` keyword of ``forward``/``generate`` and the
output field to ``cache``; 5.17 (the GPU image) still uses ``past_key_values``.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from transformers import DynamicCache


@cache
def _cache_keyword(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, kv_cache: DynamicCache | None) -> dict[str, Any]:
    """``{"cache": kv_cache}`` or ``{"past_key_values": kv_cache}``, whichever this model takes.

    Example:
        >>> out = model(ids, use_cache=True, **cache_kwargs(model, past))  # doctest: +SKIP
    """
    return {_cache_keyword(type(model)): kv_cache}


def output_cache(output: Any) -> DynamicCache:
    """The cache a forward returned, under either field name."""
    for name in ("cache", "past_key_values"):
        if name in output and output[name] is not None:
            return output[name]
    raise KeyError("the model returned no cache: was use_cache=True passed?")


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache from per-layer ``(keys, values)``, each ``[batch, kv_heads, tokens, head_dim]``."""
    return DynamicCache(ddp_cache_data=layers)
