"""Helpers shared by the tests of models whose cache is not plain full attention (tests/test_cache_kinds.py:
sliding window, chunked, MLA; tests/test_recurrent.py: linear-attention and state-space hybrids): tiny random
models of each kind from configs, a store built from text records by the real build, and ``prefixgen serve``'s
engine with and without that store."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import make_model, write_jsonl

# A tiny Qwen3-Next: 3 Gated DeltaNet layers and 1 full-attention layer.
QWEN3_NEXT = dict(
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    num_hidden_layers=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)

HYBRIDS = {
    "qwen3_next": QWEN3_NEXT,
    # Granite 4.0's Mamba2 hybrid, dense (no experts).
    "granitemoehybrid": dict(
        num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "attention"],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        num_local_experts=0,
        shared_intermediate_size=128,
    ),
}


def tiny_kind(request, tmp_path_factory, configs: dict[str, dict], **extra) -> tuple[str, Path]:
    """(arch, model folder) of the module fixture parametrized over ``configs``' archs. Weights 5x the
    default init scale: attention that depends on its keys, as in a trained model."""
    path = tmp_path_factory.mktemp("m") / request.param
    return request.param, make_model(path, request.param, seed=1, initializer_range=0.1, **configs[request.param], **extra)


def build_text_store(model_dir: Path, prompts: list[str], tmp: Path, **options) -> PrefixStore:
    """A float32 store of ``prompts`` (text records) built by the real build with ``model_dir``."""
    data = write_jsonl(tmp / "d.jsonl", [{"text": p} for p in prompts])
    cfg = BuildConfig(
        dataset=str(data), model=str(model_dir), out=str(tmp / "store"), device="cpu", dtype="float32", quiet=True, **options
    )
    build(cfg)
    return PrefixStore.open(tmp / "store")


def load_float32(model_dir: Path):
    """(model, tokenizer) of ``model_dir`` in float32, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


def serve_answers(model_dir: Path, store: PrefixStore, text: str, max_tokens: int):
    """``prefixgen serve``'s engine's greedy answers to ``text`` with ``store`` loaded and with --no-store."""
    from prefixgen.integrations.serve import Engine, ServeConfig

    cfg = dict(store=str(store.path), model=str(model_dir), device="cpu", dtype="float32")
    with_store, without = Engine(ServeConfig(**cfg)), Engine(ServeConfig(**cfg, no_store=True))
    ids = with_store.tokenize_text(text)
    params = {"max_tokens": max_tokens, "temperature": 0}
    return with_store.generate(ids, params), without.generate(ids, params)
