"""Models whose cache is not plain full attention: sliding-window (Gemma 3, GPT-OSS with sinks,
Mistral) and MLA (DeepSeek V2/V3) built into a store by the real build and loaded back into the real
model: the loaded cache continues exactly as a full recompute; kinds prefixgen cannot store are refused
by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prefixgen import BuildConfig, build
from prefixgen.cache_spec import CHUNKED, MLA, RECURRENT, SLIDING, cache_spec, state_stride_tokens
from prefixgen.compat import cache_kwargs
from prefixgen.format import SHARDS_DIR, read_safetensors_header
from prefixgen.kvcache import state_bytes_per_block
from prefixgen.maintain.verify import verify_store
from prefixgen.model import config_kv_layout

from .conftest import make_model, write_jsonl
from .kinds import build_text_store, load_float32, serve_answers, tiny_kind

# Longer than the window (8) and than two blocks (16): the cut falls past the window of every sliding layer.
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends in the sun.",
    "Once upon a time, there was a little boy named Tom. He had a big red ball and a small dog called Max.",
]
WINDOW = 8

# Tiny configs of each kind: the arch and its overrides of make_model's base config.
KINDS = {
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_hidden_layers=4,
        tie_word_embeddings=False,
    ),
    "gpt_oss": dict(
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "mistral": dict(sliding_window=WINDOW),
    # chunks of 12: the stored prefixes (multiples of 16) end inside a chunk
    "llama4_text": dict(
        head_dim=16,
        attention_chunk_size=12,
        num_hidden_layers=4,
        num_local_experts=2,
        intermediate_size_mlp=64,
    ),
    "deepseek_v2": dict(
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=32,
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=32,
    ),
}


def interleaved_rope(rows: torch.Tensor, latent_rank: int, config) -> torch.Tensor:
    """MLA rows ``[..., latent]`` with the rope part's pairs back in place where transformers writes them
    de-interleaved (``rope_interleave``, DeepSeek V3): the engines' cache entry. The exports' tests compare with
    this; ``tests_lmcache`` shows it is vLLM's own rotation of the rope key."""
    if not getattr(config, "rope_interleave", False):
        return rows
    rope = rows[..., latent_rank:].unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
    return torch.cat([rows[..., :latent_rank], rope], dim=-1)


@torch.inference_mode()
def mla_rope_inputs(model_dir, ids: list[int]) -> torch.Tensor:
    """``[layers, T, rope]``: each MLA layer's shared rope key **before** RoPE (the last ``qk_rope_head_dim``
    outputs of ``kv_a_proj_with_mqa``) over ``ids``, from the model's own forward: what an engine rotates into
    its MLA cache (an export's rope part is checked against the engine's own rotation of it)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rope = model.config.qk_rope_head_dim
    seen: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(lambda m, i, out: seen.append(out[0, :, -rope:]))
        for layer in model.model.layers
    ]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(seen)


@pytest.fixture(scope="module", params=list(KINDS))
def kind_model(request, tmp_path_factory):
    return tiny_kind(request, tmp_path_factory, KINDS)


@pytest.fixture(scope="module")
def kind_store(kind_model, tmp_path_factory):
    arch, model_dir = kind_model
    return build_text_store(model_dir, PROMPTS, tmp_path_factory.mktemp(f"store-{arch}"))


@torch.inference_mode()
def test_loaded_cache_continues_as_a_full_recompute(kind_model, kind_store):
    arch, model_dir = kind_model
    model, tok = load_float32(model_dir)
    kind_store.check_compatible(model, tok)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids + tok(" And then they all went home happy.").input_ids
        n = kind_store.match(ids)
        assert n >= 2 * WINDOW and n % kind_store.block_size == 0
        cache = kind_store.load(ids)
        assert cache.get_seq_length() == n
        full = model(torch.tensor([ids])).logits[0, n:]
        rest = model(torch.tensor([ids[n:]]), **cache_kwargs(model, cache)).logits[0]
        bound = 1e-5 * full.abs().max().item()  # float32 rounding, as tests/test_store_model.py
        assert (rest - full).abs().max().item() < bound, arch
        # Greedy continuation from the loaded cache equals generation from the whole prompt.
        plain = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        cached = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, **cache_kwargs(model, kind_store.load(ids))
        )
        assert plain.tolist() == cached.tolist(), arch


@torch.inference_mode()
def test_a_wrong_stored_value_is_seen(kind_model, kind_store):
    """The bound above fails when the last stored token's cache in layer 0 is off by 1%."""
    _, model_dir = kind_model
    model, tok = load_float32(model_dir)
    ids = tok(PROMPTS[0]).input_ids + tok(" And then they all went home happy.").input_ids
    n = kind_store.match(ids)
    full = model(torch.tensor([ids])).logits[0, n:]
    off = kind_store.load(ids)
    off.layers[0].keys[0, :, n - 1] *= 1.01  # [batch, heads (1 for MLA), tokens, dim]
    wrong = model(torch.tensor([ids[n:]]), **cache_kwargs(model, off)).logits[0]
    assert (wrong - full).abs().max().item() > 1e-5 * full.abs().max().item()


def test_the_manifest_describes_the_groups_and_mla_stores_the_latent(kind_model, kind_store):
    arch, model_dir = kind_model
    manifest = json.loads((kind_store.path / "manifest.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    spec = cache_spec(config)
    assert manifest["format_version"] == 5  # format 4's groups, in format 5's head-major blocks (the default)
    assert [g["kind"] for g in manifest["kv"]["groups"]] == [g.kind for g in spec.groups]
    shard = next((kind_store.path / SHARDS_DIR).glob("*.safetensors"))
    with open(shard, "rb") as f:
        header = read_safetensors_header(f, shard)
    kv = header.tensors["kv"]
    tokens = int(np.prod(header.tensors["tokens"]["shape"]))  # blocks x B (format 5's kv is [blocks, heads, B, ...])
    a, b = kv["data_offsets"]
    if spec.groups[0].kind == MLA:
        g = spec.groups[0]
        # The latent's size: layers x (kv_lora_rank + rope dims) float32 values per token, not per-head K/V.
        latent = config.num_hidden_layers * (g.kv_lora_rank + g.rope_dim) * 4
        per_head = (
            config.num_hidden_layers
            * config.num_attention_heads
            * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
            * 4
        )
        assert b - a == tokens * latent and latent < per_head
        assert manifest["kv"]["kind"] == "mla" and manifest["kv"]["latent_rank"] == config.kv_lora_rank
    else:
        assert {SLIDING, CHUNKED} & {g.kind for g in spec.groups}
        assert b - a == tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    # analyze's arithmetic from the config alone (the block order is the build's choice, not the config's)
    assert dataclasses.replace(config_kv_layout(config, "float32"), order="heads") == kind_store.manifest.kv
    assert verify_store(kind_store.path).ok  # every block's checksum over the new row shapes


def test_a_plain_store_keeps_format_3(tmp_path, stories):
    """A token-major build (--kv-order tokens) of a plain model is format 3, for readers before format 5."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": p} for p in PROMPTS])
    out = str(tmp_path / "s")
    build(
        BuildConfig(dataset=str(data), model=str(stories), out=out, device="cpu", dtype="float32", quiet=True, kv_order="tokens")
    )
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    assert sorted(manifest["kv"]) == ["dtype", "head_dim", "layout", "num_kv_heads", "num_layers", "scale_layout", "storage"]


@pytest.mark.parametrize(
    "arch, overrides, expect",
    [
        (
            "granitemoehybrid",
            dict(
                layer_types=["mamba"] * 2,
                mamba_n_heads=4,
                mamba_d_head=32,
                mamba_d_state=8,
                num_local_experts=0,
                shared_intermediate_size=128,
            ),
            "only 2 layers of recurrent state (linear attention / state space): prefixgen stores recurrent states beside",
        ),
    ],
)
def test_unsupported_kinds_are_refused_by_name(tmp_path, cli, text_dataset, arch, overrides, expect):
    model = make_model(tmp_path / arch, arch, **overrides)
    out = tmp_path / "store"
    result = cli("build", text_dataset, "--model", model, "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code not in (0, 1), result.output
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_qwen3_next_80b_state_arithmetic():
    """Qwen3-Next-80B-A3B's published config (transformers' Qwen3NextConfig defaults are that model):
    12 full-attention layers of 2 KV heads x 256, 36 Gated DeltaNet layers of 16 key / 32 value heads
    of 128, convolution kernel 4."""
    from transformers import Qwen3NextConfig

    spec = cache_spec(Qwen3NextConfig())
    (lin,) = [g for g in spec.groups if g.kind == RECURRENT]
    assert len(lin.layers) == 36 and (lin.conv, lin.ssm) == ((2 * 16 * 128 + 32 * 128) * 3, 32 * 128 * 128)
    assert spec.bytes_per_token(2) == 12 * 2 * 2 * 256 * 2 == 24_576
    assert spec.bytes_per_boundary(2) == 36 * (24_576 + 524_288) * 2 == 39_518_208
    assert state_stride_tokens(spec, 2) == 2048  # 39.5 MB of state is the KV of 1,608 tokens
    # As transformers keeps it (and a store holds it): the delta-rule state in float32.
    assert state_stride_tokens(spec, 2, ssm_itemsize=4) == 4096  # 77.3 MB, the KV of 3,144 tokens
    layout = config_kv_layout(Qwen3NextConfig(), "bfloat16")
    assert layout.num_layers == 12 and [g.state_stride for g in layout.groups if g.kind == RECURRENT] == [4096]
    assert state_bytes_per_block(layout, 16) == 36 * (24_576 * 2 + 524_288 * 4) // 256 == 301_824


def test_prefixgen_serve_answers_as_without_the_store(kind_model, kind_store):
    """``prefixgen serve``'s engine: greedy answers with the stored prefix loaded equal those of --no-store."""
    _, model_dir = kind_model
    a, b = serve_answers(model_dir, kind_store, PROMPTS[1] + " And then they all went home happy.", 12)
    assert a.cached_tokens >= 2 * WINDOW and b.cached_tokens == 0
    assert a.tokens == b.tokens


def test_vllm_export_writes_the_kinds_vllm_offloads_canonically(kind_model, kind_store, cli, tmp_path):
    """vLLM's offloading files of each kind (tests_vllm/test_vllm_export.py reads them with vLLM's code): a
    sliding-window store gets one file per KV cache group and chunk; an MLA store one per chunk, and a TP size
    other than 1 is refused; a chunked store (no canonical page in vLLM) is refused naming the reason. A refusal
    is one message and no export folder."""
    arch, _ = kind_model
    out = tmp_path / "vllm"
    args = ["export", kind_store.path, "--to", "vllm", "--out", out, "--model-name", "m", "--hash-seed", "0", "--quiet"]
    if arch == "llama4_text":
        result = cli(*args)
        assert result.exit_code not in (0, 1), result.output
        assert "chunked local attention" in result.stderr and "a ChunkedLocalAttentionSpec is neither" in result.stderr
        assert "Traceback" not in result.output and not out.exists()
        return
    if arch.startswith("deepseek"):
        result = cli(*args, "--tp-size", "2")
        assert result.exit_code not in (0, 1) and "--tp-size 2 with an MLA latent" in result.stderr, result.output
        assert "Traceback" not in result.output and not out.exists()
    result = cli(*args)
    assert result.exit_code == 0, result.output
    groups = {p.parent.name.split("_")[1] for p in out.rglob("*.bin")}
    one_group = arch.startswith("deepseek") or arch == "mistral"  # every layer MLA, or every layer one window
    assert groups == ({"g0"} if one_group else {"g0", "g1"}), groups


def test_ls_names_the_layer_groups(kind_model, kind_store, cli):
    arch, _ = kind_model
    result = cli("ls", kind_store.path)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("cache"))
    if arch.startswith("deepseek"):
        assert "layers of multi-head latent attention (MLA)" in line
    elif arch == "llama4_text":
        assert "3 layers of chunked local attention (chunks of 12); 1 layers of full attention" in line
    else:
        assert f"layers of sliding-window attention (window {WINDOW}{', with sinks' if arch == 'gpt_oss' else ''})" in line
