"""Each tensor-parallel rank loads the KV heads vLLM's own ``QKVParallelLinear`` gives it: the layer is built
for every (KV heads, TP size, rank), real k_proj weights whose rows name their head are loaded with its own
``weight_loader``, and the heads in the rank's shard must be ``kv_head_range``'s. Only the two functions that ask
the (not started) distributed group for the TP size and rank are replaced, in the modules that call them."""

from __future__ import annotations

import pytest
import torch

from prefixgen.integrations.vllm import kv_head_range

HEAD = 4  # head size
HIDDEN = 16


@pytest.mark.parametrize(("total", "tp"), [(8, 1), (8, 2), (8, 4), (8, 8), (2, 4), (1, 2), (4, 8)])
def test_kv_head_range_is_qkv_parallel_linears_partition(monkeypatch, total, tp):
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    k_proj = torch.arange(total).repeat_interleave(HEAD).float()[:, None].expand(total * HEAD, HIDDEN).contiguous()
    for rank in range(tp):
        for module in (linear, parameter):
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: tp)
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        layer = linear.QKVParallelLinear(HIDDEN, HEAD, 2 * max(total, tp), total, bias=False, params_dtype=torch.float32)
        layer.weight_loader(layer.weight, k_proj, "k")
        q_rows = layer.num_heads * HEAD
        shard = layer.weight[q_rows : q_rows + layer.num_kv_heads * HEAD, 0].view(-1, HEAD)[:, 0]  # [rank's KV heads]
        assert shard.long().tolist() == list(kv_head_range(total, tp, rank))
