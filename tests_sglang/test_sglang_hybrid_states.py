"""`prefixgen export --to sglang` of hybrid stores (Qwen3-Next's Gated DeltaNet, Granite 4.0's Mamba2), read
back by SGLang 0.5.23's own code:

* SGLang's own model config (``Qwen3NextConfig`` / ``GraniteMoeHybridConfig``, ``mamba2_cache_params``) says
  which layers keep state, the state's shapes and dtypes; its ``full_attention_layer_ids`` which layers the KV
  pool holds (the store's rows);
* ``HiCacheFile.batch_exists_v2`` with the Mamba pool's ``TRAILING_PAGES`` says how far each record is
  restorable: exactly to the pages that end on a state the store keeps;
* ``HiCacheFile._read_page`` fills a real ``MambaPoolHost`` (built on SGLang's ``MambaStateBufferInfo``) and
  ``MHATokenToKVPoolHost``; their pages must be the store's state (SSM in float32, Gated DeltaNet's with its
  key and value axes swapped as SGLang's kernels index it, ``fused_recurrent.py``: ``h0 + i_nh * V * K +
  o_v * K + o_k``; conv in bfloat16) and the store's KV.

The Gated DeltaNet model has key dim 8 and value dim 16, so a state not transposed has the wrong shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sglang.srt.configs.granitemoehybrid import GraniteMoeHybridConfig
from sglang.srt.configs.qwen3_next import Qwen3NextConfig
from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolTransfer
from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost
from sglang.srt.mem_cache.utils import get_hash_str
from sglang.srt.runtime_context import get_parallel
from transformers import AutoTokenizer

from prefixgen.cache_spec import RECURRENT
from prefixgen.store.reader import PrefixStore
from prefixgen.store.states import read_state, state_path
from tests.conftest import make_model
from tests.kinds import QWEN3_NEXT, build_text_store
from tests.test_recurrent import HYBRIDS, PROMPTS

from .test_sglang_cache_kinds import export
from .test_sglang_export import PAGE, hicache_file, host_pool, pool_kv

MODEL_NAME = "org/tiny"
CONFIGS = {
    "qwen3_next": (dict(QWEN3_NEXT, linear_value_head_dim=16), Qwen3NextConfig),
    "granitemoehybrid": (HYBRIDS["granitemoehybrid"], GraniteMoeHybridConfig),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hybrid(request, tmp_path_factory) -> tuple[Path, PrefixStore]:
    """(model folder, float32 store of PROMPTS) of one tiny hybrid."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = make_model(tmp / "model", request.param, seed=1, initializer_range=0.1, **CONFIGS[request.param][0])
    return model, build_text_store(model, PROMPTS, tmp)


def sglang_config(model: Path):
    """SGLang's own config of the model (its config class, as its model loader picks it), and its state params."""
    data = json.loads((model / "config.json").read_text())
    config_class = next(cls for arch, (_, cls) in CONFIGS.items() if arch == data["model_type"])
    if config_class is Qwen3NextConfig:
        data.setdefault("full_attention_interval", 4)  # transformers' default pattern: every 4th layer full
    config = config_class(**data)
    with get_parallel().override(attn_tp_size=1, tp_size=1, enable_cp_tp_group_sharing=False):
        return config, config.mamba2_cache_params


def mamba_host_pool(params, layout: str, slots: int) -> MambaPoolHost:
    """SGLang's Mamba host pool on the CPU, over a device state pool of ``slots`` slots."""
    layers = len(params.layers)
    temporal = torch.zeros(layers, slots, *params.shape.temporal, dtype=params.dtype.temporal)
    conv = tuple(torch.zeros(layers, slots, *shape, dtype=params.dtype.conv) for shape in params.shape.conv)
    info = MambaStateBufferInfo(temporal=temporal, conv=conv)
    return MambaPoolHost(info, 2.0, 0, device_capacity=slots, pin_memory=False, device="cpu", layout=layout)


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_sglang_reads_a_hybrids_kv_and_states(hybrid, tmp_path, monkeypatch, layout):
    model, pstore = hybrid
    out = tmp_path / "hicache"
    export(pstore.path, out, "--layout", layout)
    config, params = sglang_config(model)
    (rec,) = [g for g in pstore.manifest.kv.groups if g.kind == RECURRENT]
    # SGLang's own split of the layers is the store's: state for the recurrent ones, KV rows for the others.
    assert list(params.layers) == list(rec.layers)
    assert (params.dtype.conv, params.dtype.temporal) == (torch.bfloat16, torch.float32)
    kv = pstore.manifest.kv
    assert list(config.full_attention_layer_ids) == [i for i in range(config.num_hidden_layers) if i not in rec.layers]
    assert kv.num_layers == len(config.full_attention_layer_ids)
    backend = hicache_file(out, 0, 1, monkeypatch, model_name=MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(model)
    states = stateless = 0
    for text in PROMPTS:
        ids = tok(text).input_ids
        n = len(ids) // PAGE * PAGE
        keys = get_hash_str(ids[:n], None, page_size=PAGE)
        store_keys = pstore.keys(ids[:n])
        with_state = [p for p in range(1, len(keys) + 1) if state_path(pstore.path, store_keys[p - 1]).exists()]
        assert with_state  # the stride's, the record's end
        stateless += len(keys) - len(with_state)
        # What SGLang's prefetch asks: every KV page, and the Mamba state of the last page.
        mamba = PoolTransfer(name="mamba", keys=keys[-1:], hit_policy=PoolHitPolicy.TRAILING_PAGES)
        result = backend.batch_exists_v2(keys, [mamba])
        assert result.kv_hit_pages == with_state[-1] and result.restorable_prefix_pages == with_state
        _, want_kv = pstore.read_prefix(store_keys)  # [T, L, 2, H, D]
        pool = host_pool(layout, kv.num_layers, kv.num_kv_heads, kv.head_dim, torch.float32, pages=len(keys) + 1)
        for i, key in enumerate(keys):
            assert backend._read_page("kv", key, pool, (i + 1) * PAGE)
            assert torch.equal(pool_kv(pool, (i + 1) * PAGE), want_kv[i * PAGE : (i + 1) * PAGE].permute(2, 1, 0, 3, 4))
        states_pool = mamba_host_pool(params, layout, len(keys) + 1)
        for p in range(1, len(keys) + 1):
            read = backend._read_page("mamba", keys[p - 1], states_pool, p)  # as the prefetch thread reads a state
            assert read == (p in with_state)
            if not read:
                continue
            conv, ssm = read_state(pstore.path, store_keys[p - 1], p * PAGE)  # [R, channels, kernel-1], [R, heads, a, b]
            if config_is_gated_delta_net(config):
                ssm = ssm.transpose(-1, -2)  # transformers' [heads, key, value] -> SGLang's [heads, value, key]
            got_ssm = states_pool.temporal_buffer[p, :, 0]  # page-first: [slots, R, 1, *temporal]
            assert got_ssm.shape == (len(rec.layers), *params.shape.temporal) and torch.equal(got_ssm, ssm)
            got_conv = states_pool.conv_buffer[0][p, :, 0]
            assert got_conv.shape == (len(rec.layers), *params.shape.conv[0])
            assert torch.equal(got_conv, conv.to(torch.bfloat16))
            states += 1
    assert states == len(list(out.glob("*.mamba_org-tiny_0_1.bin"))) > 0 and stateless > 0  # pages without a state too


def config_is_gated_delta_net(config) -> bool:
    return isinstance(config, Qwen3NextConfig)
