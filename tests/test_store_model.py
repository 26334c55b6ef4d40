"""KV written by a real build, loaded back into real models: logits and generations must not change."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import BuildConfig, CorruptStoreError, IncompatibleStoreError, PrefixStore, build
from prefixgen.compat import cache_kwargs
from prefixgen.format import SHARDS_DIR
from prefixgen.maintain.verify import verify_store

from .conftest import make_model, write_jsonl

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends in the sun.",
    "Once upon a time, there was a little boy named Tom. He had a big red ball and a small dog called Max.",
]


def _store(tmp_path, model_dir, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": p} for p in PROMPTS])
    cfg = BuildConfig(
        dataset=str(data), model=str(model_dir), out=str(tmp_path / "store"), device="cpu", dtype="float32", quiet=True, **kw
    )
    build(cfg)
    return PrefixStore.open(tmp_path / "store")


def _load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt_neox", "gemma"])
def model_dir(request, tmp_path_factory, stories):
    if request.param == "llama":
        return stories  # the real trained Llama
    # Weights 5x the default init scale: attention that depends on its keys, as in a trained model
    # (at the default scale a random model's logits hardly move when a key does).
    return make_model(tmp_path_factory.mktemp("m") / request.param, request.param, seed=1, initializer_range=0.1)


@torch.inference_mode()
def test_loaded_kv_gives_the_logits_of_a_full_forward(tmp_path, model_dir):
    store = _store(tmp_path, model_dir)
    model, tok = _load(model_dir)
    store.check_compatible(model, tok)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids + tok(" And then they all went home happy.").input_ids
        n = store.match(ids)
        assert n >= 16 and n % store.block_size == 0
        cache = store.load(ids)
        assert cache.get_seq_length() == n
        full = model(torch.tensor([ids])).logits[0, n:]
        rest = model(torch.tensor([ids[n:]]), **cache_kwargs(model, cache)).logits[0]
        # float32 rounding grows with the logits' magnitude; 1e-5 of it is far above rounding
        # (about 1e-6 of it seen), far below a wrong key (below)
        bound = 1e-5 * full.abs().max().item()
        assert (rest - full).abs().max().item() < bound
        # The bound catches one stored key off by 0.1%: the key of the last stored token in layer 0.
        off = store.load(ids)
        off.layers[0].keys[0, :, n - 1] *= 1.001  # [batch, kv_heads, tokens, head_dim]
        wrong = model(torch.tensor([ids[n:]]), **cache_kwargs(model, off)).logits[0]
        assert (wrong - full).abs().max().item() > bound


@torch.inference_mode()
def test_generate_with_a_loaded_cache_gives_the_same_tokens(tmp_path, model_dir):
    store = _store(tmp_path, model_dir)
    model, tok = _load(model_dir)
    ids = tok(PROMPTS[0]).input_ids
    # The whole prompt may be stored: keep at least one prompt token out of the cache.
    n = store.match(ids[:-1])
    cache = store.load(ids[:n])
    input_ids = torch.tensor([ids])
    plain = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    cached = model.generate(input_ids, max_new_tokens=12, do_sample=False, **cache_kwargs(model, cache))
    assert plain.tolist() == cached.tolist()


def test_flipped_byte_is_found_by_verify_and_refused_by_load(tmp_path, stories):
    store = _store(tmp_path, stories)
    assert verify_store(store.path).ok
    shard = next((store.path / SHARDS_DIR).iterdir())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside the KV of some block
    shard.write_bytes(bytes(data))
    report = verify_store(store.path)
    assert not report.ok and any("checksum" in f or "CRC" in f for f in report.faults)
    tok = AutoTokenizer.from_pretrained(stories)
    store = PrefixStore.open(store.path)
    with pytest.raises(CorruptStoreError, match="fails its checksum"):
        for prompt in PROMPTS:
            store.load(tok(prompt).input_ids)


def test_store_for_other_weights_is_refused(tmp_path, stories):
    other = make_model(
        tmp_path / "other",
        "llama",
        seed=3,
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=512,
    )
    store = _store(tmp_path, stories)
    model, tok = _load(other)
    with pytest.raises(IncompatibleStoreError) as err:
        store.check_compatible(model, tok)
    assert "weights_digest" in str(err.value)
    # Same weights in bfloat16 are the same model.
    same = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.bfloat16)
    store.check_compatible(same)
