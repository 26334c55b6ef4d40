"""`prefixgen export --to sglang` of stores whose cache is not plain full attention, read back by SGLang
0.5.23's own code, byte for byte:

* MLA (DeepSeek V2/V3): ``HiCacheFile`` of an MLA server (``is_mla_model``: one file per page for every
  rank) and ``MLATokenToKVPoolHost`` take each page in; its latent rows must be the store's, with the rope key's
  pairs in place for DeepSeek V3 (SGLang's ``is_neox_style = not rope_interleave``).
* Hybrid SWA (GPT-OSS, in SGLang's ``is_hybrid_swa_model``): the ``kv`` pool over the full-attention layers
  and the ``swa`` pool over the sliding ones (``get_hybrid_layer_ids``), read with ``HiCacheFile``'s own
  pool reads (``_read_page``) and hit counts (``batch_exists_v2`` with the SWA pool's ``TRAILING_PAGES``).
* Sliding window or chunked attention in an architecture SGLang serves from one pool (Gemma 3, Llama 4's text
  model): the plain layout over all layers.

The models are tiny random ones of tests/test_cache_kinds.py's configs, built in float32 and exported in
float32 (a server started with ``--dtype float32``), so the bytes compare exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sglang.srt.configs.model_config import get_hybrid_layer_ids, is_hybrid_swa_model
from sglang.srt.mem_cache.device_pool_info import MLABufferInfo
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolTransfer
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_hash_str
from transformers import AutoConfig, AutoTokenizer

from prefixgen.export.sglang import HYBRID_SWA_ARCHITECTURES
from prefixgen.store.reader import PrefixStore
from tests.conftest import make_model, write_jsonl
from tests.test_cache_kinds import KINDS, interleaved_rope

from .test_sglang_export import PAGE, hicache_file, host_pool, pool_kv, rank_heads

MODEL_NAME = "org/tiny"
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends in the sun. "
    "One day she found a shiny red ball in the park and took it home to show her mom.",
    "Once upon a time, there was a little boy named Tom. He had a big red ball and a small dog called Max, "
    "and every morning they ran to the river together.",
]


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3", "gpt_oss", "gemma3_text", "llama4_text"])
def kind(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(arch, model folder, float32 store of TEXTS) of one tiny model."""
    from typer.testing import CliRunner

    from prefixgen.cli import app

    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    model = make_model(tmp / "model", arch, seed=1, initializer_range=0.1, **KINDS[arch])
    data = write_jsonl(tmp / "data.jsonl", [{"text": t} for t in TEXTS])
    store = tmp / "store"
    args = ["build", str(data), "--model", str(model), "--out", str(store), "--device", "cpu", "--dtype", "float32", "-q"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return arch, model, store


def export(store: Path, out: Path, *args: str) -> None:
    from typer.testing import CliRunner

    from prefixgen.cli import app

    cmd = ["export", str(store), "--to", "sglang", "--out", str(out), "--model-name", MODEL_NAME, "--kv-dtype", "float32"]
    result = CliRunner().invoke(app, [*cmd, "--quiet", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def mla_host_pool(layout: str, layers: int, rank: int, rope: int, pages: int) -> MLATokenToKVPoolHost:
    """SGLang's MLA host pool on the CPU, over a float32 device pool of ``pages`` pages."""
    tokens = pages * PAGE
    buffers = tuple(torch.zeros(tokens, 1, rank + rope) for _ in range(layers))
    info = MLABufferInfo(
        buffers=buffers,
        data_ptrs=torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64),
        layer_indices=tuple(range(layers)),
        device_layer_num=layers,
        page_size=PAGE,
        kv_lora_rank=rank,
        qk_rope_head_dim=rope,
        kv_cache_dim=rank + rope,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    return MLATokenToKVPoolHost(
        info,
        2.0,
        0,
        PAGE,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=tokens,
        start_layer=0,
        end_layer=layers,
        target_layer_num=layers,
    )


def records(model: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model)
    return [tok(t).input_ids for t in TEXTS]


def stored(pstore: PrefixStore, ids: list[int]) -> torch.Tensor:
    """The store's KV of ``ids`` as its reader gives it: ``[T, layers, parts, heads, dim]``."""
    _, kv = pstore.read_prefix(pstore.keys(ids))
    return kv


@pytest.mark.parametrize("layout", ["page_first", "layer_first", "page_first_direct"])
@pytest.mark.parametrize("tp", [1, 2])
def test_sglang_reads_every_kind(kind, tmp_path, monkeypatch, layout, tp):
    arch, model, store = kind
    out = tmp_path / "hicache"
    export(store, out, "--layout", layout, "--tp-size", str(tp))
    pstore = PrefixStore.open(store)
    kv = pstore.manifest.kv
    config = AutoConfig.from_pretrained(model)
    architectures = config.architectures
    hybrid = is_hybrid_swa_model(architectures, config)  # SGLang's own decision: two pools or one
    assert hybrid == (arch == "gpt_oss") and hybrid == (architectures[0] in HYBRID_SWA_ARCHITECTURES)
    if hybrid:
        swa_layers, full_layers = get_hybrid_layer_ids(architectures, config)
        pools = [("kv", full_layers), ("swa", swa_layers)]
    else:
        pools = [("kv", list(range(kv.num_layers)))]
    checked = 0
    for rank in range(tp):
        backend = hicache_file(out, rank, tp, monkeypatch, model_name=MODEL_NAME, mla=kv.kind == "mla")
        for ids in records(model):
            n = len(ids) // PAGE * PAGE
            assert pstore.match(ids) >= n > 0
            keys = get_hash_str(ids[:n], None, page_size=PAGE)
            want_all = stored(pstore, ids[:n])  # [T, L, parts, H, D]
            # What the prefetch asks: every page in the KV pool, the window's last pages in the SWA pool.
            transfers = [PoolTransfer(name="swa", keys=keys[-2:], hit_policy=PoolHitPolicy.TRAILING_PAGES)] if hybrid else []
            result = backend.batch_exists_v2(keys, transfers)
            assert result.kv_hit_pages == len(keys) and result.restorable_prefix_pages == list(range(1, len(keys) + 1))
            if kv.kind == "mla":
                pool = mla_host_pool(layout, kv.num_layers, kv.latent_rank, kv.head_dim - kv.latent_rank, len(keys) + 1)
                for i, key in enumerate(keys):
                    assert backend._read_page("kv", key, pool, (i + 1) * PAGE)  # as the prefetch thread reads a page
                    got = _mla_page(pool, (i + 1) * PAGE)  # [L, P, 1, D]
                    # [L, P, 1, D], the rope key's pairs in place: SGLang's is_neox_style = not rope_interleave
                    want = interleaved_rope(want_all[i * PAGE : (i + 1) * PAGE, :, 0], kv.latent_rank, config).transpose(0, 1)
                    assert torch.equal(got, want)
                    checked += 1
                continue
            heads = rank_heads(kv.num_kv_heads, tp, rank)
            for name, layers in pools:
                pool = host_pool(layout, len(layers), len(heads), kv.head_dim, torch.float32, pages=len(keys) + 1)
                for i, key in enumerate(keys):
                    assert backend._read_page(name, key, pool, (i + 1) * PAGE)
                    got = pool_kv(pool, (i + 1) * PAGE)  # [2, l, P, h, D]
                    want = want_all[i * PAGE : (i + 1) * PAGE][:, layers][:, :, :, heads].permute(2, 1, 0, 3, 4)
                    assert torch.equal(got, want), (name, i)
                    checked += 1
    pages = sum(len(ids) // PAGE for ids in records(model))
    assert checked == tp * pages * (1 if kv.kind == "mla" else len(pools))
    files = sorted(p.name for p in out.glob("*.bin"))
    if kv.kind == "mla":  # one file per page, every rank's
        assert len(files) == len({n.split("_")[0] for n in files}) and all(n.endswith("_org-tiny.bin") for n in files)


def _mla_page(pool: MLATokenToKVPoolHost, index: int) -> torch.Tensor:
    """``[layers, PAGE, 1, D]``: the host pool's rows of the page at ``index``, in its layout (``init_kv_buffer``)."""
    buf = pool.kv_buffer
    if pool.layout == "layer_first":  # [L, tokens, 1, D]
        return buf[:, index : index + PAGE]
    if pool.layout == "page_first":  # [tokens, L, 1, D]
        return buf[index : index + PAGE].transpose(0, 1)
    return buf[index // PAGE]  # page_first_direct: [pages, L, PAGE, 1, D]


def test_hybrid_swa_architectures_are_sglangs():
    """The architectures the export splits into a kv and a swa pool are those SGLang's is_hybrid_swa_model names."""
    for arch in HYBRID_SWA_ARCHITECTURES:
        assert is_hybrid_swa_model([arch], None), arch
    for arch in ("Gemma3ForCausalLM", "Gemma2ForCausalLM", "MistralForCausalLM", "LlamaForCausalLM", "DeepseekV2ForCausalLM"):
        assert not is_hybrid_swa_model([arch], None), arch
