"""Models whose layers are not all full attention, served by vLLM with the connector (``SupportsHMA``): vLLM's
hybrid KV cache manager gives each kind of layer a KV cache group of its own, and the connector loads each group
into its own blocks.

* Sliding window (``gemma3_text`` with alternating ``layer_types``; ``gpt_oss`` with attention sinks and MoE), window
  64, float32: greedy outputs equal plain vLLM's for prompts whose stored prefix (256+ tokens) is longer than the
  window, and the sliding layers got only the window's blocks (``window_tokens``: vLLM holds no block before it).
* MLA (``deepseek_v2``, latent 512 + 64, CPU_MLA): vLLM 0.32.0's CPU build rotates a 3-D query wrongly
  (test_mla_rope_cpu.py), so from layer 1 on its latent differs from what transformers (the build) computes: the
  live check refuses to load and vLLM computes every prompt. With vLLM's rotary op replaced by its own PyTorch
  version (``forward_native``, right) in both engines, the check passes, the latent is loaded into vLLM's MLA cache,
  and the outputs equal plain vLLM's.
"""

from __future__ import annotations

import os

import pytest

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import CHAT_TEMPLATE, make_model, run_vllm, write_jsonl
from .test_vllm_connector import PROMPTS, STORIES, SYSTEM  # a stored record + text, the system prompt only, ...

WINDOW = 64
CHUNK = 64
CHUNKED_HMA = "VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE"
BLOCK = 32  # vLLM's block size: CPU_ATTN takes multiples of 32; with a window of 64 a 256-token hit skips blocks
BASE = dict(
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # vLLM's CPU attention kernels take head sizes 32, 64, 80, ...
    max_position_embeddings=2048,
    chat_template=CHAT_TEMPLATE,
)
SLIDING = {
    "gemma3_text": dict(
        BASE,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=WINDOW,
        tie_word_embeddings=False,
        initializer_range=0.15,
    ),
    "gpt_oss": dict(
        BASE,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        num_local_experts=4,
        num_experts_per_tok=2,
        initializer_range=0.15,
    ),
    # chunked local attention on 3 of every 4 layers (the 4th: full, no RoPE), chunks of 64
    "llama4_text": dict(
        BASE,
        num_hidden_layers=4,
        attention_chunk_size=CHUNK,
        num_local_experts=2,
        intermediate_size_mlp=256,
        # vLLM sets it from max_model_len (> 32768: on; model_executor/models/llama4.py), and the connector refuses a
        # store whose text config differs from vLLM's effective one
        attn_temperature_tuning=False,
        initializer_range=0.15,
    ),
}

# vLLM's sliding-window or chunked KV cache groups per model: its groups hold equally many layers (as many as the
# smallest kind has), so Llama 4's 3 chunked layers beside 1 full one are 3 groups
WINDOWED_GROUPS = {"gemma3_text": 1, "gpt_oss": 1, "llama4_text": 3}


def _store(tmp, model):
    data = write_jsonl(tmp / "text.jsonl", [{"text": SYSTEM + s} for s in STORIES])
    out = tmp / "store"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(out), device="cpu", quiet=True))
    return out


@pytest.fixture(scope="module", params=sorted(SLIDING))
def sliding(request, tmp_path_factory):
    """A tiny model of each sliding-window kind, its store, and plain vLLM's and the connector's runs."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = make_model(tmp / "model", request.param, **SLIDING[request.param])
    store = _store(tmp, model)
    # vLLM turns its hybrid manager off for chunked local attention unless asked (config/vllm.py: a latency
    # regression on GPUs); on, the chunked layers get a group of their own
    env = os.environ.get(CHUNKED_HMA)
    os.environ[CHUNKED_HMA] = "1"
    try:
        baseline = run_vllm(model, PROMPTS, block_size=BLOCK)
        with_store = run_vllm(model, PROMPTS, store=store, block_size=BLOCK)
    finally:
        if env is None:
            del os.environ[CHUNKED_HMA]
        else:
            os.environ[CHUNKED_HMA] = env
    return request.param, store, baseline, with_store


def window_blocks_tokens(kind: str, end: int) -> int:
    """Tokens of a load of ``[0, end)`` that vLLM holds blocks for in a sliding-window or chunked group: it nulls
    the blocks of the tokens the next token no longer reads (``get_num_skipped_tokens``): ``end - WINDOW + 1`` for a
    window (SlidingWindowManager), the chunks before the next token's (ChunkedLocalAttentionManager)."""
    skipped = end // CHUNK * CHUNK if kind == "llama4_text" else max(0, end - WINDOW + 1)
    return end - skipped // BLOCK * BLOCK


def test_sliding_window_same_tokens_window_blocks_only(sliding):
    kind, store, baseline, with_store = sliding
    assert with_store.outputs == baseline.outputs  # token for token
    opened = PrefixStore.open(store)
    stored = [opened.match(ids[:-1]) for ids in baseline.prompt_ids]
    assert all(n >= 4 * WINDOW for n in stored[:3]) and stored[3] == 0  # longer than the window
    assert with_store.loaded == stored  # each loaded whole, from token 0 (vLLM's own prefix caching is off)
    assert with_store.claims.checks_passed >= 1 and with_store.claims.checks_failed == 0
    groups = WINDOWED_GROUPS[kind]
    for n, delta in zip(stored, with_store.deltas):
        # of each load, only the window's blocks were written into each sliding-window or chunked group's layers
        assert delta["window_tokens"] == groups * window_blocks_tokens(kind, n)
        assert delta["window_tokens_skipped"] == groups * (n - window_blocks_tokens(kind, n))
    assert sum(d["window_tokens_skipped"] for d in with_store.deltas) > 0


MLA_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=16,
    kv_lora_rank=512,  # CPU_MLA takes a latent of 576 only: 512 + the rope key's 64
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    q_lora_rank=None,
    first_k_dense_replace=2,  # no MoE layer
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    n_group=1,
    topk_group=1,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    chat_template=CHAT_TEMPLATE,
)


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def mla(request, tmp_path_factory):
    """deepseek_v2, and deepseek_v3 (``rope_interleave``: the store's rope key is in transformers' order)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = make_model(tmp / "model", request.param, **MLA_CONFIG)
    return model, _store(tmp, model)


def test_mla_live_check_refuses_vllm_cpu_rope(mla):
    """vLLM 0.32.0's CPU MLA computes another latent than the build from layer 1 on (its queries' RoPE): the live
    check fails, nothing is loaded, vLLM computes every prompt (its own outputs, unchanged)."""
    model, store = mla
    baseline = run_vllm(model, PROMPTS, attention_backend="CPU_MLA")
    with_store = run_vllm(model, PROMPTS, store=store, attention_backend="CPU_MLA")
    assert with_store.outputs == baseline.outputs
    claims = with_store.claims
    assert claims.checks_failed == 1 and claims.checks_passed == 0
    assert sum(with_store.loaded) == 0 and with_store.stats.tokens == 0
    assert claims.skipped_unchecked >= 3  # the stored prompts after the failed check: computed, not loaded


def test_mla_latent_loads_with_vllm_rope_fixed(mla, monkeypatch):
    """With vLLM's CPU rotary op replaced by its own PyTorch version (``RotaryEmbedding.forward_native``) in both
    engines, vLLM computes the build's latent: the check passes, each stored latent is loaded into vLLM's MLA
    cache (one 576-value entry per token and layer) and the outputs equal plain vLLM's."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    monkeypatch.setattr(RotaryEmbedding, "forward_cpu", RotaryEmbedding.forward_native)
    model, store = mla
    baseline = run_vllm(model, PROMPTS, attention_backend="CPU_MLA")
    with_store = run_vllm(model, PROMPTS, store=store, attention_backend="CPU_MLA")
    opened = PrefixStore.open(store)
    stored = [opened.match(ids[:-1]) for ids in baseline.prompt_ids]
    assert with_store.claims.checks_passed >= 1 and with_store.claims.checks_failed == 0
    assert with_store.loaded == stored and all(n >= 256 for n in stored[:3])
    assert with_store.outputs == baseline.outputs
    assert with_store.stats.bytes == with_store.stats.tokens * 2 * 576 * 4  # the latent: 2 layers x 576 float32
