"""`prefixgen export --to lmcache` of stores whose cache is not plain full attention, read back by LMCache
0.5.6's own code (see conftest), byte for byte:

* MLA (DeepSeek V2/V3, ``use_mla``): LMCache keys the chunk with world size 1 (``save_only_first_rank``) and
  every rank reads worker 0's file (``remote_enable_mla_worker_id_as0``); the chunk is ``KV_MLA_FMT``
  ``[1, layers, chunk, latent]``, the store's latent rows.
* Sliding window and chunked local attention (Gemma 3, GPT-OSS, Llama 4): LMCache's in-process vLLM connector
  runs with vLLM's hybrid KV cache manager off, so every layer keeps every token: ``KV_2LTD`` over all layers.

Tiny random models of tests/test_cache_kinds.py's configs, built in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.protocol import RemoteMetadata
from transformers import AutoConfig, AutoTokenizer

from prefixgen.store.reader import PrefixStore
from tests.test_cache_kinds import KINDS, interleaved_rope, mla_rope_inputs

from .conftest import TEXTS, build_store, chunk_keys, export, fs_connector, lmcache_engine, make_model
from .test_lmcache_export import as_bytes, data_files, vllm_heads

CHUNK = 64


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3", "gemma3_text", "gpt_oss", "llama4_text"])
def kind(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(arch, model folder, float32 store of TEXTS: 4 records of 90-370 tokens) of one tiny model."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    model = make_model(tmp / "model", arch, seed=1, initializer_range=0.1, max_position_embeddings=512, **KINDS[arch])
    return arch, model, build_store(tmp / "build", model=model)


@pytest.mark.parametrize("tp", [1, 2])
def test_lmcache_reads_every_kind(kind, tmp_path, tp):
    arch, model, path = kind
    store = PrefixStore.open(path)
    kv = store.manifest.kv
    mla = kv.kind == "mla"
    out = export(path, tmp_path / "lmcache", "--chunk-size", CHUNK, "--tp-size", tp)
    tok = AutoTokenizer.from_pretrained(model)
    config = AutoConfig.from_pretrained(model)
    found = set()
    for rank in range(1 if mla else tp):  # MLA: rank 0 saves, and reads, for every rank (save_only_first_rank)
        with lmcache_engine(out, store=store, chunk_size=CHUNK, seed=0, tp_size=tp, rank=rank) as engine:
            fs = fs_connector(engine)
            heads = slice(0, 1) if mla else vllm_heads(kv.num_kv_heads, tp, rank)
            for text in TEXTS:
                ids = tok(text).input_ids
                hit = store.match(ids) // CHUNK * CHUNK
                assert hit > 0 and engine.lookup(tokens=ids) == hit
                _, want_all = store.read_prefix(store.keys(ids[:hit]))  # [T, L, parts, H, D]
                if mla:  # the rope key's pairs in place, as vLLM's cache holds them (test_mla_rope_key_is_vllms)
                    want_all = interleaved_rope(want_all, kv.latent_rank, config)
                for start, end, key in chunk_keys(engine, ids):
                    path_ = out / fs._get_file_name(key)
                    if end > hit:
                        assert not path_.exists()
                        continue
                    found.add(path_.name)
                    chunk = want_all[start:end, :, :, heads]  # [chunk, L, parts, h, D]
                    if mla:  # KV_MLA_FMT: [1, L, chunk, latent]
                        want, fmt = chunk[:, :, 0, 0].transpose(0, 1).unsqueeze(0), MemoryFormat.KV_MLA_FMT
                    else:  # KV_2LTD: [2, L, chunk, h * D]
                        want, fmt = chunk.permute(2, 1, 0, 3, 4).flatten(3), MemoryFormat.KV_2LTD
                    header = RemoteMetadata.deserialize(path_.read_bytes()[: fs.remote_metadata_bytes])
                    assert header == RemoteMetadata(want.numel() * want.element_size(), [want.shape], [want.dtype], fmt)
                    obj = engine.storage_manager.get(key)
                    assert obj is not None and obj.tensor.shape == want.shape and obj.tensor.dtype == want.dtype
                    assert torch.equal(as_bytes(obj.tensor), as_bytes(want))
                    obj.ref_count_down()
    assert found and data_files(out) == found  # nothing else, nothing missing
    if mla:  # one file per chunk whatever the TP size: world size 1, worker 0
        assert all("@1@0@" in name for name in found)


@torch.inference_mode()
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mla_rope_key_is_vllms(arch, tmp_path):
    """The rope part of an exported MLA chunk is vLLM's own rotation of the model's rope key
    (``get_rope(..., is_neox_style=False)`` as ``deepseek_v2.py`` builds it for MLA): DeepSeek V3's
    transformers cache holds it de-interleaved (``rope_interleave``), which the export puts back. Shown
    against vLLM's RotaryEmbedding, to float32 rounding, and not equal in the store's order for V3."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    model = make_model(tmp_path / "model", arch, seed=1, initializer_range=0.1, max_position_embeddings=512, **KINDS[arch])
    path = build_store(tmp_path / "build", model=model)
    store = PrefixStore.open(path)
    kv = store.manifest.kv
    out = export(path, tmp_path / "lmcache", "--chunk-size", CHUNK)
    config = AutoConfig.from_pretrained(model)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            config.qk_rope_head_dim, max_position=512, rope_parameters=dict(config.rope_parameters), is_neox_style=False
        )
    ids = AutoTokenizer.from_pretrained(model)(TEXTS[0]).input_ids[:CHUNK]
    raw = mla_rope_inputs(model, ids)  # [L, T, rope] before RoPE
    positions = torch.arange(len(ids))
    want = torch.stack([rope.forward_native(positions, k.clone(), k.clone())[1] for k in raw])  # [L, T, rope]
    with lmcache_engine(out, store=store, chunk_size=CHUNK, seed=0) as engine:
        (_, _, key), *_ = chunk_keys(engine, ids)
        obj = engine.storage_manager.get(key)
        got = obj.tensor[0, :, :, kv.latent_rank :].clone()  # [L, T, rope]: KV_MLA_FMT's rope part
        obj.ref_count_down()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, rows = store.read_prefix(store.keys(ids))
    stored = rows[:, :, 0, 0, kv.latent_rank :].transpose(0, 1)  # [L, T, rope] as the store holds it
    assert torch.allclose(stored, want, rtol=1e-5, atol=1e-5) == (arch == "deepseek_v2")
