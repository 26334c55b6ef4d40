"""Run by hand: does a hybrid model in this transformers continue its own cache? For each tiny random
model, the logits of tokens 32..63 after a cached forward of tokens 0..31, against one forward of 0..63.

    PYTHONPATH=$PWD python tests/hybrid_continuation.py

transformers 5.25, float32: qwen3_next and granitemoehybrid differ by under 2e-6; bamba by 0.12 to 1.45
(README, "Which models").
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, initializer_range=0.1,
)  # fmt: skip
MAMBA = dict(
    num_hidden_layers=4, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
    mamba_expand=2,
)  # fmt: skip
CASES = [
    ("qwen3_next", dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                        linear_value_head_dim=8, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    ("granitemoehybrid", dict(MAMBA, layer_types=["linear_attention", "full_attention"] * 2, num_local_experts=0,
                              shared_intermediate_size=128)),
    ("bamba", dict(MAMBA, attn_layer_indices=[3], mamba_chunk_size=32)),
    ("bamba", dict(MAMBA, attn_layer_indices=[1, 3], mamba_chunk_size=32)),
    ("bamba", dict(MAMBA, attn_layer_indices=[0, 1, 2, 3], mamba_chunk_size=32)),
]  # fmt: skip


@torch.inference_mode()
def main() -> None:
    for arch, overrides in CASES:
        torch.manual_seed(0)
        config = AutoConfig.for_model(arch, **{**BASE, **overrides})
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(0, 512, (1, 64))
        full = model(ids).logits
        cache = DynamicCache(config=config)
        model(ids[:, :32], cache=cache, use_cache=True)
        rest = model(ids[:, 32:], cache=cache, use_cache=True).logits
        layers = overrides.get("attn_layer_indices", overrides.get("layer_types", ""))
        print(f"{arch} {layers}: max |difference| {(rest - full[:, 32:]).abs().max():.3g}, max |logit| {full.abs().max():.3g}")


if __name__ == "__main__":
    main()
