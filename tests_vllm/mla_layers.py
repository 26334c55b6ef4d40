"""By hand, not a test: a tiny deepseek_v2 (kv_lora_rank 512, rope 64, 16 heads, float32, no MoE layers) run by
transformers and by vLLM's CPU build (CPU_MLA backend), compared layer by layer and by first greedy token.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=$PWD .venv-vllm/bin/python tests_vllm/mla_layers.py OUT
    ... NATIVE_ROPE=1 ...   # vLLM's CPU rotary op replaced by its PyTorch version (RotaryEmbedding.forward_native)
    ... INIT=0.1 ...        # weights 5x the default init scale (attention that depends on its keys)

Prints each attention projection's max |difference| (input and output) and the first greedy token of six
gsm8k-style prompts. See README ("vLLM 0.32.0's CPU build computes DeepSeek (MLA) attention wrongly").
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

STORIES = Path(__file__).resolve().parent.parent / "models" / "stories260K"
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.",
    "Julie is reading a 120-page book. Yesterday, she was able to read 12 pages and today, she read twice as many pages as yesterday.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow.",
]
NAMES = ["kv_a_proj_with_mqa", "kv_a_layernorm", "q_proj", "o_proj"]


def make(out: Path) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v2", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=None,
        first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_group=1, topk_group=1,
        max_position_embeddings=2048, architectures=["DeepseekV2ForCausalLM"], tie_word_embeddings=False,
        initializer_range=float(os.environ.get("INIT", "0.02")),
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(STORIES / name, out / name)
    return model


def spy(layers, store: dict) -> list:
    """Forward hooks keeping each attention projection's first (input, output) per layer."""

    def hook(key):
        def f(module, args, out):
            o = out[0] if isinstance(out, tuple) else out
            store.setdefault(
                key, (args[0].detach().reshape(-1, args[0].shape[-1]).clone(), o.detach().reshape(-1, o.shape[-1]).clone())
            )

        return f

    return [getattr(layer.self_attn, n).register_forward_hook(hook((i, n))) for i, layer in enumerate(layers) for n in NAMES]


def main(out: Path) -> None:
    model = make(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    hf: dict = {}
    hooks = spy(model.model.layers, hf)
    with torch.no_grad():
        hf_first = []
        for i, p in enumerate(PROMPTS):
            hf_first.append(int(model(tok(p, return_tensors="pt").input_ids).logits[0, -1].argmax()))
            if i == 0:
                [h.remove() for h in hooks]
    from vllm import LLM, SamplingParams

    if os.environ.get("NATIVE_ROPE"):
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native
    llm = LLM(
        str(out),
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=2048,
        seed=0,
        attention_backend="CPU_MLA",
    )
    vl: dict = {}
    vhooks = llm.apply_model(lambda m: spy(m.model.layers, vl))[0]
    params = SamplingParams(max_tokens=1, temperature=0)
    v_first = []
    for i, p in enumerate(PROMPTS):
        if i == 0:
            vl.clear()  # the warm-up runs went through the hooks too
        v_first.append(llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids[0])
        if i == 0:
            [h.remove() for h in vhooks]
    for key in sorted(hf):
        (hi, ho), (vi, vo) = hf[key], vl[key]
        print(
            key,
            f"input {float((hi - vi).abs().max()):.2e}, output {float((ho - vo).abs().max()):.2e} (largest {float(ho.abs().max()):.2f})",
        )
    print("transformers first tokens", hf_first)
    print("vLLM first tokens        ", v_first, f"({sum(a == b for a, b in zip(hf_first, v_first))} of {len(PROMPTS)} equal)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
