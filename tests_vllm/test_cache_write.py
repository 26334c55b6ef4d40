"""The connector writes each layer's K and V into vLLM's paged cache from views of the piece it read
(``kv[:, layer, 0]``: [tokens, heads, D] with the token stride of a whole stored row; with tensor parallelism
only this rank's heads of it), not from per-layer contiguous copies. vLLM's own CPU cache-write op
(``CPUAttentionBackendImpl.do_kv_cache_update``, on a cache of the backend's shape) must then fill the cache
exactly as from contiguous copies. No engine: the backend's impl is built directly."""

from __future__ import annotations

import types

import pytest
import torch

from prefixgen.integrations.vllm import slot_mapping

from .conftest import tiny_model

TOKENS, LAYERS, HEADS, HEAD_DIM, BLOCK = 70, 3, 4, 64, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("cache-write") / "qwen2")  # only its config is read


@pytest.mark.parametrize("heads", [range(0, 4), range(2, 4), range(1, 2)])
def test_cache_write_from_views_equals_from_copies(model, heads):
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    n = len(heads)
    with set_current_vllm_config(VllmConfig(model_config=ModelConfig(str(model), dtype="float32"))):  # the impl reads it
        impl = CPUAttentionBackendImpl(
            num_heads=n,
            head_size=HEAD_DIM,
            scale=1.0,
            num_kv_heads=n,
            alibi_slopes=None,
            sliding_window=None,
            kv_cache_dtype="auto",
        )
    layer = types.SimpleNamespace(
        isa=_get_attn_isa(torch.float32, BLOCK, HEAD_DIM, "auto"), _k_scale_float=1.0, _v_scale_float=1.0
    )  # the attributes of vLLM's Attention layer the op reads
    torch.manual_seed(0)
    stored = torch.randn(TOKENS, LAYERS, 2, HEADS, HEAD_DIM)  # as read_locations returns a piece: [T, L, 2, H, D]
    piece = stored[:, :, :, heads.start : heads.stop]  # read_locations(heads=...): a view
    slots = slot_mapping([5, 2, 7], BLOCK, 10, 10 + TOKENS)  # the load starts inside a vLLM block
    for index in range(LAYERS):
        from_views, from_copies = (torch.zeros(8, n, BLOCK, 2 * HEAD_DIM) for _ in range(2))  # the CPU backend's shape
        impl.do_kv_cache_update(layer, piece[:, index, 0], piece[:, index, 1], from_views, slots)
        impl.do_kv_cache_update(layer, piece[:, index, 0].contiguous(), piece[:, index, 1].contiguous(), from_copies, slots)
        assert from_copies.count_nonzero() == 2 * TOKENS * n * HEAD_DIM  # every K and V value landed somewhere
        assert torch.equal(from_views, from_copies)
