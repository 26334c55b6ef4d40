"""The one place that knows how transformers versions differ.

transformers 5.24 renamed the ``past_key_values`` keyword of ``forward``/``generate`` and the
output field to ``cache``; 5.17 (the GPU image) still uses ``past_key_values``.

Hybrid models' recurrent layers keep their state in ``DynamicCache``'s ``LinearAttentionLayer`` in
5.17 and 5.25 alike (both checked: tests/test_recurrent.py passes under each); 5.25's layer also
counts the tokens it has seen (``cumulative_length_linear``), 5.17's does not.
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


RECURRENT_MIN_VERSION = "5.17"  # the oldest transformers seen to continue a stored state (the GPU image's)


def supports_recurrent_cache() -> bool:
    """Whether this transformers keeps linear-attention / state-space state in ``DynamicCache`` layers
    (``LinearAttentionLayer``: 5.17 has it, and later versions) that a forward of several tokens continues.
    Versions without it keep the state in per-model cache classes, which prefixgen does not fill."""
    from transformers import cache_utils

    return hasattr(cache_utils, "LinearAttentionLayer")


def model_cache(config: Any) -> DynamicCache:
    """The empty cache a forward of this hybrid model makes for itself (``DynamicCache(config=...)``):
    ``DynamicLayer`` for full attention, ``LinearAttentionLayer`` for recurrent layers."""
    return DynamicCache(config=config)


def recurrent_state(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv ``[batch, channels, kernel]``, ssm ``[batch, heads, a, b]``) of a ``LinearAttentionLayer``:
    the convolution's last ``kernel`` inputs and the SSM / delta-rule state, as the layer holds them."""
    return layer.conv_states[0], layer.recurrent_states[0]


def hybrid_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor] | None], states: dict[int, tuple[torch.Tensor, torch.Tensor]], tokens: int
) -> DynamicCache:
    """A cache that continues a hybrid model after ``tokens`` tokens: ``layers[i]`` the (keys, values)
    of attention layer ``i``, ``states[i]`` (conv ``[batch, channels, kernel]``, ssm) of recurrent layer ``i``
    (its entry in ``layers`` None), as :func:`recurrent_state` returns them."""
    from transformers.cache_utils import LinearAttentionLayer

    cache = DynamicCache(ddp_cache_data=[kv if kv is not None else (None, None) for kv in layers])
    for i, state in states.items():
        layer = cache.layers[i] = LinearAttentionLayer()
        if state is None:
            continue
        conv, ssm = state
        layer.lazy_initialization(conv_states=conv, recurrent_states=ssm, conv_kernel_size=conv.shape[-1])
        layer.conv_states[0].copy_(conv)
        layer.recurrent_states[0].copy_(ssm)
        layer.has_previous_state[0] = True  # the next forward prepends this conv state instead of zeros
        if hasattr(layer, "cumulative_length_linear"):  # 5.25 counts the tokens seen; 5.17 and 5.19 do not
            layer.cumulative_length_linear.fill_(tokens)
    return cache


def keep_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only the batch rows ``rows`` (indices, in order) of every layer of ``cache``: attention layers'
    keys and values, recurrent layers' conv and SSM states (the rows of a batch still to run)."""
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            for states in (layer.conv_states, layer.recurrent_states):
                for k, v in states.items():
                    if v is not None:
                        states[k] = v[rows]
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
