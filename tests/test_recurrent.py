"""Hybrid models with recurrent layers (Gated DeltaNet in Qwen3-Next, Mamba2 in Granite 4.0) built into a
store by the real build: the attention layers' KV per block, the recurrent states at stride boundaries and
where tasks end, each exactly what a forward of that prefix computes; loaded back, the model's own cache
continues as a full recompute, through ``PrefixStore.load`` and ``prefixgen serve``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.builder.recurrent import stride_blocks
from prefixgen.cache_spec import RECURRENT, cache_spec
from prefixgen.compat import cache_kwargs, model_cache, output_cache
from prefixgen.kvcache import states_from_cache
from prefixgen.maintain.verify import verify_store
from prefixgen.model import config_kv_layout
from prefixgen.store.states import STATES_DIR, read_state, state_path

from .conftest import CHAT_TEMPLATE, make_model, write_jsonl
from .test_cache_kinds import QWEN3_NEXT, _load, build_text_store

# Each longer than two state strides (32 tokens, 2 blocks of 16, for both configs below).
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends in the sun. "
    "One day she found a shiny stone by the river and showed it to her mother.",
    "Once upon a time, there was a little boy named Tom. He had a big red ball and a small dog called Max. "
    "They played in the park every morning until the sun went down.",
]
SUFFIX = " And then they all went home happy, singing a song."

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


@pytest.fixture(scope="module", params=list(HYBRIDS))
def hybrid(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / request.param
    return request.param, make_model(path, request.param, seed=1, initializer_range=0.1, **HYBRIDS[request.param])


@pytest.fixture(scope="module")
def hybrid_store(hybrid, tmp_path_factory):
    arch, model_dir = hybrid
    return build_text_store(model_dir, PROMPTS, tmp_path_factory.mktemp(f"store-{arch}"))


def test_stride_and_layout(hybrid, hybrid_store):
    arch, model_dir = hybrid
    manifest = json.loads((hybrid_store.path / "manifest.json").read_text())
    spec = cache_spec(AutoConfig_of(model_dir))
    (rec,) = [g for g in manifest["kv"]["groups"] if g["kind"] == RECURRENT]
    assert rec["state_stride"] == 32 and stride_blocks(hybrid_store.manifest.kv, 16) == 2
    assert manifest["kv"]["num_layers"] == len(spec.attention_layers) < spec.num_layers
    # the block order is the build's choice (head-major by default), not the config's
    assert dataclasses.replace(config_kv_layout(AutoConfig_of(model_dir), "float32"), order="heads") == hybrid_store.manifest.kv
    assert verify_store(hybrid_store.path).ok


def AutoConfig_of(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


@torch.inference_mode()
def test_stored_states_are_the_forward_of_the_prefix(hybrid, hybrid_store):
    """At every stride boundary and at each record's last block, the stored state is what a forward of
    that prefix alone computes: bitwise at the first boundary (the build's first segment is that very
    forward), within float32 rounding later (the build continues its cache, as chunked prefill does)."""
    arch, model_dir = hybrid
    model, tok = _load(model_dir)
    bs = hybrid_store.block_size
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        keys = hybrid_store.keys(ids)
        # The stride (2 blocks), and where the record ends as a prompt ((n - 1) // B) and as a prefix (n // B).
        want = sorted({b for b in range(1, len(keys) + 1) if b % 2 == 0} | {len(keys), (len(ids) - 1) // bs})
        held = [b for b in range(1, len(keys) + 1) if state_path(hybrid_store.path, keys[b - 1]).exists()]
        assert held == want, (held, want)
        for b in want:
            cache = output_cache(
                model(torch.tensor([ids[: b * bs]]), use_cache=True, **cache_kwargs(model, model_cache(model.config)))
            )
            conv, ssm = states_from_cache(cache, hybrid_store.manifest.kv)
            s_conv, s_ssm = read_state(hybrid_store.path, keys[b - 1], b * bs)
            if b == want[0]:
                assert torch.equal(s_conv, conv[0]) and torch.equal(s_ssm, ssm[0])
            bound = 1e-5  # float32 rounding of values of order 1 (the states here are below 1)
            assert (s_conv - conv[0]).abs().max().item() < bound and (s_ssm - ssm[0]).abs().max().item() < bound


@torch.inference_mode()
def test_loaded_cache_continues_as_a_full_recompute(hybrid, hybrid_store):
    arch, model_dir = hybrid
    model, tok = _load(model_dir)
    hybrid_store.check_compatible(model, tok)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids + tok(SUFFIX).input_ids
        cache = hybrid_store.load(ids)
        n = int(cache.get_seq_length())
        assert n > 32 and n % hybrid_store.block_size == 0  # past one stride
        full = model(torch.tensor([ids])).logits[0, n:]
        rest = model(torch.tensor([ids[n:]]), **cache_kwargs(model, cache)).logits[0]
        bound = 1e-4 * full.abs().max().item()  # float32 rounding through the chunked scans
        assert (rest - full).abs().max().item() < bound, arch
    # Greedy generation from the loaded cache equals generation from the whole prompt.
    plain = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    cached = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, **cache_kwargs(model, hybrid_store.load(ids)))
    assert plain.tolist() == cached.tolist(), arch


def test_prefixgen_serve_answers_as_without_the_store(hybrid, hybrid_store):
    """``prefixgen serve``'s engine: greedy answers with the stored prefix and state loaded equal those of --no-store."""
    from prefixgen.integrations.serve import Engine, ServeConfig

    _, model_dir = hybrid
    cfg = dict(store=str(hybrid_store.path), model=str(model_dir), device="cpu", dtype="float32")
    with_store, without = Engine(ServeConfig(**cfg)), Engine(ServeConfig(**cfg, no_store=True))
    ids = with_store.tokenize_text(PROMPTS[1] + SUFFIX)
    a = with_store.generate(ids, {"max_tokens": 8, "temperature": 0})
    b = without.generate(ids, {"max_tokens": 8, "temperature": 0})
    assert a.cached_tokens > 32 and b.cached_tokens == 0
    assert a.tokens == b.tokens


def test_a_damaged_state_is_refused(hybrid, hybrid_store, tmp_path):
    """A state file whose bytes changed fails its checksum: the load says which file, serve goes on without it."""
    import shutil

    from prefixgen.errors import CorruptStoreError

    _, model_dir = hybrid
    copy = tmp_path / "store"
    shutil.copytree(hybrid_store.path, copy)
    store = PrefixStore.open(copy)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPTS[0]).input_ids + tok(SUFFIX).input_ids
    n = int(store.load(ids).get_seq_length())
    path = state_path(copy, store.keys(ids)[n // store.block_size - 1])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="checksum"):
        store.load(ids)
    report = verify_store(copy)  # `prefixgen verify` reads every state file too
    assert not report.ok and any(str(path) in f and "recurrent state" in f for f in report.faults), report.faults
    assert (copy / STATES_DIR).is_dir()


# Why each target without recurrent state refuses a hybrid, from the engines' code (prefixgen/export/*.py).
RECURRENT_REFUSALS = {
    "lmcache": "LMCache's in-process connector (LMCacheConnectorV1) is not SupportsHMA",
    "vllm": "a MambaSpec is not an AttentionSpec",
}


def test_exports_refuse_a_hybrid_store_with_the_reason(hybrid_store, cli, tmp_path):
    """LMCache's and vLLM's exports cannot hold recurrent state: one message naming the kind, the target and
    the engine's reason, and no export folder. SGLang's can (tests_sglang/test_sglang_cache_kinds.py), but only
    in the layouts and TP size its Mamba host pool takes: a clear message for the others."""
    for target, reason in RECURRENT_REFUSALS.items():
        out = tmp_path / target
        result = cli("export", hybrid_store.path, "--to", target, "--out", out, "--model-name", "m", "--hash-seed", "0")
        assert result.exit_code not in (0, 1), result.output
        assert "layers of recurrent state" in result.stderr and f"--to {target} cannot write recurrent state" in result.stderr
        assert reason in result.stderr, result.stderr
        assert "Traceback" not in result.output and not out.exists()
    sglang = {
        ("--layout", "layer_first"): "only with --hicache-mem-layout page_first or page_first_direct",
        ("--tp-size", "2"): "--tp-size above 1 is not supported for a hybrid model's recurrent state",
    }
    for (flag, value), message in sglang.items():
        out = tmp_path / f"sglang{value}"
        cmd = ["export", hybrid_store.path, "--to", "sglang", "--out", out, "--model-name", "m", "--kv-dtype", "float32"]
        result = cli(*cmd, flag, value)
        assert result.exit_code not in (0, 1) and message in result.stderr, result.output
        assert "Traceback" not in result.output and not out.exists()
    listing = cli("ls", hybrid_store.path)
    assert listing.exit_code == 0 and "layers of recurrent state" in listing.output, listing.output


def test_sglang_export_writes_a_state_where_a_page_ends_on_one(hybrid_store, cli, tmp_path):
    """Every page's KV file, and a ``.mamba`` state file for exactly the pages that end on a stored state (the
    stride and the records' ends), named as SGLang's HiCacheFile names them (tests_sglang reads them back)."""
    out = tmp_path / "sglang"
    result = cli("export", hybrid_store.path, "--to", "sglang", "--out", out, "--model-name", "org/m", "--kv-dtype", "float32")
    assert result.exit_code == 0, result.output
    kv = sorted(p.name for p in out.glob("*_org-m_0_1.bin") if ".mamba_" not in p.name)
    states = sorted(p.name for p in out.glob("*.mamba_org-m_0_1.bin"))
    stored = len(list((hybrid_store.path / STATES_DIR).glob("*.safetensors")))
    assert kv and states and len(states) == stored  # page size 16 = block size: every stored state ends a page
    assert {n.split(".")[0] for n in states} <= {n.split("_")[0] for n in kv}


def _continues(store, model, ids, n):
    """``load`` of ``ids[:-1]`` covers ``n`` tokens and continues as a full forward."""
    cache = store.load(ids[:-1])
    assert int(cache.get_seq_length()) == n
    full = model(torch.tensor([ids])).logits[0, n:]
    rest = model(torch.tensor([ids[n:]]), **cache_kwargs(model, cache)).logits[0]
    assert (rest - full).abs().max().item() < 1e-4 * full.abs().max().item()


@torch.inference_mode()
def test_a_state_where_each_turn_ends(tmp_path):
    """A chat's earlier turns end as a server's prompt inside the record (blocks 5 and 11 here, off the
    stride of 2 blocks): ``load`` of those prompts covers every block before their last token."""
    model_dir = make_model(
        tmp_path / "m", "qwen3_next", seed=1, initializer_range=0.1, chat_template=CHAT_TEMPLATE, **HYBRIDS["qwen3_next"]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    first = PROMPTS[0].split(" by the river")[0]
    turns = [first, "What did she find by the river?", "She found a shiny stone by the river, and it was very pretty.", "Thanks!"]
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": turns}])
    cfg = BuildConfig(
        dataset=str(data), model=str(model_dir), out=str(tmp_path / "s"), device="cpu", dtype="float32",
        messages_field="messages", quiet=True,
    )  # fmt: skip
    build(cfg)
    store = PrefixStore.open(tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bs = store.block_size
    for k in (1, 3):  # the prompts before the first and the second assistant turn
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(turns[:k])]
        ids = tok(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        ).input_ids
        n = (len(ids) - 1) // bs * bs
        assert n % 32, "the turn's end must not fall on the stride, or this test shows nothing"
        _continues(store, model, ids, n)


@torch.inference_mode()
def test_a_state_where_a_record_built_after_a_longer_one_ends(hybrid, tmp_path):
    """The second record is a prefix of the first: all its blocks are stored before it is planned, and
    its end (block 3, off the stride) still gets a state."""
    arch, model_dir = hybrid
    model, tok = _load(model_dir)
    short = PROMPTS[0].split(" She loved")[0] + " She loved to play"
    ids = tok(short).input_ids
    bs = 16
    assert tok(PROMPTS[0]).input_ids[: len(ids)] == ids and ((len(ids) - 1) // bs) % 2, len(ids)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": PROMPTS[0]}, {"text": short}])
    build(
        BuildConfig(dataset=str(data), model=str(model_dir), out=str(tmp_path / "s"), device="cpu", dtype="float32", quiet=True)
    )
    _continues(PrefixStore.open(tmp_path / "s"), model, ids, (len(ids) - 1) // bs * bs)
