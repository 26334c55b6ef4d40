"""Why transformers and vLLM 0.32.0's CPU build disagree on DeepSeek V2/V3 (MLA) models with no store involved.

DeepSeek's MLA (vllm/model_executor/layers/mla.py, ``MultiHeadLatentAttentionWrapper.forward``) applies RoPE to
``q[..., qk_nope_head_dim:]`` of ``q.view(-1, heads, qk_head_dim)``: a 3-D query ``[tokens, heads, rope_dim]``,
with a 1-head 3-D key. vLLM's CPU op ``torch.ops._C.rotary_embedding`` (``RotaryEmbedding.forward_cpu``) rotates row
``t * heads + h`` of such a query by position ``positions[t * heads + h]``, not ``positions[t]``: every head but the
first of every token gets another token's angle (or, past the last token, whatever lies beyond ``positions``).
The key (one head) and a 2-D query ``[tokens, heads * rope_dim]`` are rotated right, and ``forward_native`` is right
for both. The latent prefixgen stores (normalized compressed KV and the rope key) is what both compute; vLLM's CPU
queries are wrong. Seen layer by layer on a tiny deepseek_v2 (kv_lora_rank 512, rope 64, 16 heads, float32): the
projections and the latent equal transformers' to the bit, the rope part of vLLM's prefill query does not.
"""

from __future__ import annotations

import pytest
import torch

T, HEADS, ROPE = 24, 16, 64


def _reference(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """GPT-J-style (interleaved pairs) RoPE, theta 10000: transformers' DeepseekV2 complex rotation. x [T, H, D]."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, ROPE, 2).float() / ROPE))
    ang = positions[:, None].float() * inv  # [T, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
    return out


@pytest.fixture(scope="module")
def rope():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        # as DeepseekV2MLAAttention makes it (vllm/model_executor/models/deepseek_v2.py): not neox style
        yield get_rope(
            ROPE, max_position=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, is_neox_style=False
        )


def test_vllm_cpu_rope_rotates_a_3d_query_by_the_wrong_positions(rope):
    torch.manual_seed(0)
    positions = torch.arange(T)
    q, k = torch.randn(T, HEADS, ROPE), torch.randn(T, 1, ROPE)
    want_q, want_k = _reference(q, positions), _reference(k, positions)
    native_q, native_k = rope.forward_native(positions, q.clone(), k.clone())
    assert torch.allclose(native_q, want_q, atol=1e-5) and torch.allclose(native_k, want_k, atol=1e-5)
    flat_q, _ = rope.forward_cpu(positions, q.clone().reshape(T, HEADS * ROPE), k.clone().reshape(T, ROPE))
    assert torch.allclose(flat_q.view(T, HEADS, ROPE), want_q, atol=1e-5)  # 2-D (Llama's call): right
    cpu_q, cpu_k = rope.forward_cpu(positions, q.clone(), k.clone())  # 3-D (DeepSeek MLA's call)
    assert torch.allclose(cpu_k, want_k, atol=1e-5)  # one head: right
    assert torch.allclose(cpu_q[:, 0][:1], want_q[:, 0][:1], atol=1e-5)  # row 0 only
    assert (cpu_q - want_q).abs().max() > 1.0  # the rest: rotated by other positions
    # Row t * HEADS + h of the query got position t * HEADS + h, where it exists.
    for t, h in [(0, 1), (0, 15), (1, 0), (1, 7)]:
        row = t * HEADS + h
        assert torch.allclose(cpu_q[t, h], _reference(q[t, h][None, None], torch.tensor([row]))[0, 0], atol=1e-4)
