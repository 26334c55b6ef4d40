"""The connector's view of vLLM's KV cache groups (its hybrid KV cache manager, "HMA").

vLLM 0.32.0 puts layers whose cache needs the same token slots into one **KV cache group**, with a block table
of its own per request (``KVCacheBlocks.blocks[g]``, ``KVCacheConfig.kv_cache_groups[g].layer_names``):

* full attention (``FullAttentionSpec``) and MLA (``MLAAttentionSpec``: one latent per token) hold a block for
  every token of the request;
* sliding window (``SlidingWindowSpec``) and chunked local attention (``ChunkedLocalAttentionSpec``) hold blocks
  only for the tokens attention still reads: ``SlidingWindowManager``/``ChunkedLocalAttentionManager``
  (``v1/core/single_type_kv_cache_manager.py``) pad the block table with the pool's ``null_block``
  (``is_null``, block id 0) for the ``get_num_skipped_tokens(num_computed)`` tokens before the window, also
  for tokens a connector loads (``add_local_computed_blocks`` then ``allocate_external_computed_blocks``);
* recurrent state (``MambaSpec``: Gated DeltaNet, Mamba) holds one state per block boundary.

The scheduler hands each load the request's block table per group with null blocks as ``-1``
(:func:`block_tables`); a worker writes a layer's tokens only into its own group's real blocks
(:func:`group_span`), so a sliding layer gets only the window's blocks. :func:`write_layer` writes a layer's
rows with the layer's own cache-write op, K/V or MLA latent; :func:`slot_mapping` gives the slots of a block table
without null blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prefixgen.cache_spec import CHUNKED, FULL, MLA, RECURRENT, SLIDING

NULL = -1  # a block the request does not hold in this group (vLLM's null_block): nothing is written there


@dataclass(frozen=True, slots=True)
class VllmGroup:
    """One of vLLM's KV cache groups, as the connector loads it."""

    index: int  # in KVCacheConfig.kv_cache_groups (and in each request's block tables)
    kind: str  # prefixgen.cache_spec's kinds: full, sliding, chunked, mla, recurrent
    spec: str  # vLLM's spec class name, for messages
    block_size: int
    layer_names: tuple[str, ...]
    window: int = 0  # sliding
    chunk: int = 0  # chunked

    @property
    def windowed(self) -> bool:
        """Whether the group holds only some of a request's blocks (sliding window, chunked local attention)."""
        return self.kind in (SLIDING, CHUNKED)


def vllm_groups(kv_cache_config: Any) -> list[VllmGroup]:
    """vLLM's KV cache groups, each with its kind (a spec this connector does not know is ``"unknown"``).

    Example:
        >>> [(g.kind, g.window) for g in vllm_groups(kv_cache_config)]  # doctest: +SKIP
        [('full', 0), ('sliding', 64)]
    """
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        CrossAttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
        UniformTypeKVCacheSpecs,
    )

    groups = []
    for i, group in enumerate(kv_cache_config.kv_cache_groups):
        s = group.kv_cache_spec
        first = next(iter(s.kv_cache_specs.values())) if isinstance(s, UniformTypeKVCacheSpecs) and s.kv_cache_specs else s
        window = chunk = 0
        if isinstance(first, MLAAttentionSpec):
            kind = MLA
        elif isinstance(first, MambaSpec):
            kind = RECURRENT
        elif isinstance(first, SlidingWindowSpec):
            kind, window = SLIDING, int(first.sliding_window)
        elif isinstance(first, ChunkedLocalAttentionSpec):
            kind, chunk = CHUNKED, int(first.attention_chunk_size)
        elif isinstance(first, FullAttentionSpec) and not isinstance(first, CrossAttentionSpec):
            # with the hybrid manager off, vLLM makes sliding layers full (unify_hybrid_kv_cache_specs): every block
            kind = FULL
        else:
            kind = "unknown"
        groups.append(VllmGroup(i, kind, type(first).__name__, int(s.block_size), tuple(group.layer_names), window, chunk))
    return groups


def group_problems(groups: Sequence[VllmGroup]) -> list[str]:
    """One line per KV cache group the connector cannot load into (refused at engine start)."""
    return [
        f"a KV cache group of {g.spec} ({len(g.layer_names)} layers, e.g. {g.layer_names[0]}): the connector loads "
        "full, sliding-window and chunked attention, MLA and (not yet stored) recurrent state only"
        for g in groups
        if g.kind == "unknown"
    ]


def recurrent_skip_message(groups: Sequence[VllmGroup]) -> str | None:
    """Why nothing is loaded for a model with recurrent state whose store keeps no states (None when it has none).

    A store that keeps them is loaded with its states (``states.py``: ``MambaManager`` allocates a state block for a
    connector's tokens, the worker writes the stored state there); a prefix's attention KV without the recurrent
    state at its end does not continue the sequence."""
    recurrent = [g for g in groups if g.kind == RECURRENT]
    if not recurrent:
        return None
    layers = sum(len(g.layer_names) for g in recurrent)
    return (
        f"this model has recurrent state ({recurrent[0].spec}, {layers} layers): a stored prefix continues only with "
        "the state at its end, which this store does not keep; nothing is loaded, vLLM computes every prompt "
        "(counted as skipped_recurrent)"
    )


def block_tables(blocks: Any) -> list[list[int]]:
    """A request's block table per KV cache group (``KVCacheBlocks``), its null blocks as :data:`NULL`.

    Example:
        >>> block_tables(kv_cache_manager.get_blocks(req_id))  # doctest: +SKIP
        [[5, 9, 12], [-1, 7, 13]]
    """
    return [[NULL if b.is_null else b.block_id for b in group] for group in blocks.blocks]


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """vLLM cache slots of tokens ``[start, end)`` of a request whose block table is ``block_ids``.

    Example:
        >>> slot_mapping([7, 3], 4, 2, 6).tolist()
        [30, 31, 12, 13]
    """
    pos = torch.arange(start, end)
    return torch.as_tensor(block_ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def group_span(block_ids: Sequence[int], block_size: int, start: int, end: int) -> tuple[int, torch.Tensor]:
    """The tokens of ``[start, end)`` a group holds blocks for, as the offset of the first from ``start`` and their
    cache slots. vLLM's managers null only the leading blocks (those before the window), so the tokens held are
    the range's tail; a null block after a real one is refused, it would be a layout this was not written for.

    Example:
        >>> offset, slots = group_span([-1, -1, 4, 6], 16, 8, 64)
        >>> offset, slots[:2].tolist()
        (24, [64, 65])
    """
    if start >= end:
        return 0, torch.zeros(0, dtype=torch.long)
    first_block, last_block = start // block_size, (end - 1) // block_size
    held = first_block
    while held <= last_block and block_ids[held] == NULL:
        held += 1
    if any(block_ids[b] == NULL for b in range(held, last_block + 1)):
        raise RuntimeError(f"PrefixgenConnector: a null block inside a request's block table {list(block_ids)}")
    first = min(end, max(start, held * block_size))  # end: the whole range lies before the window
    pos = torch.arange(first, end)
    ids = torch.as_tensor(list(block_ids[first_block : last_block + 1]), dtype=torch.long)
    return first - start, ids[pos // block_size - first_block] * block_size + pos % block_size


def write_layer(
    layer: Any, rows: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, key_order: torch.Tensor | None = None
) -> None:
    """Write one layer's rows (``[tokens, parts, heads, D]``: K and V, or one MLA latent) into ``cache`` at ``slots``
    with the layer's own cache-write op; ``key_order`` (:func:`key_order`): vLLM's order of a key's head_dim values.

    MLA (``MLAAttention``): the op takes the normalized latent ``[tokens, kv_lora_rank]`` and the rope key
    ``[tokens, 1, rope_dim]`` (``mla_attention.py``, ``update_kv_cache``), which the store keeps side by side."""
    if is_mla(layer):
        rank = int(layer.kv_lora_rank)
        latent = rows[:, 0, 0]  # [tokens, kv_lora_rank + rope_dim]
        rope = latent[:, None, rank:] if key_order is None else latent[:, None, rank:][..., key_order]  # [tokens, 1, R]
        layer.impl.do_kv_cache_update(latent[:, :rank], rope, cache, slots, layer.kv_cache_dtype, layer._k_scale)
    else:
        keys = rows[:, 0] if key_order is None else rows[:, 0][..., key_order]  # [tokens, heads, D]
        layer.impl.do_kv_cache_update(layer, keys, rows[:, 1], cache, slots)


def rope_key_order(text_config: Any, rope_dim: int) -> torch.Tensor | None:
    """vLLM's order of an MLA store's rope key values, when the store's differs, else None.

    For a config with ``rope_interleave`` (DeepSeek V3, Kimi K2) transformers caches the rope key with its rotated
    pairs de-interleaved (``[x0', x2', ..., x1', x3', ...]``, README "Which models"), where vLLM's MLA rope
    (``is_neox_style=False``) keeps ``[x0', x1', ...]``."""
    if not getattr(text_config, "rope_interleave", False):
        return None
    return torch.arange(rope_dim).view(2, rope_dim // 2).transpose(0, 1).reshape(-1)


def key_order(model: Any, head_dim: int) -> torch.Tensor | None:
    """vLLM's order of a key's ``head_dim`` values when it differs from transformers' (the store's), else None.

    vLLM's Llama 4 permutes the rows of q_proj and k_proj per head as it loads them
    (``Llama4ForCausalLM.permute_qk_weight_for_rotary``: ``view(heads, D // 2, 2, hidden).transpose(1, 2)``), to rotate
    with its neox-style RoPE what transformers rotates as interleaved pairs: attention is the same, but its cached key
    holds value ``2i + j`` of transformers' at ``j * D / 2 + i``. Found from the model class vLLM runs (``model``, None
    if unknown), not from a list of families.

    Example:
        >>> key_order(llama4_model, 4).tolist()  # doctest: +SKIP
        [0, 2, 1, 3]
    """
    if model is None or not hasattr(type(model), "permute_qk_weight_for_rotary"):
        return None
    return torch.arange(head_dim).view(head_dim // 2, 2).transpose(0, 1).reshape(-1)


def is_mla(layer: Any) -> bool:
    """Whether ``layer`` is vLLM's MLA attention layer (one latent per token, not K and V)."""
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    return isinstance(layer, MLAAttention)
