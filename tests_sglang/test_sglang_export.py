"""`prefixgen export --to sglang` read back by SGLang 0.5.23's own code, byte for byte.

For every stored record: SGLang's ``get_hash_str`` names its pages, ``HiCacheFile`` (as the server
builds it, from ``SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR``, the served model name and its TP rank)
finds and reads them, and ``MHATokenToKVPoolHost`` (in the layout the server was started with)
takes them in as the hierarchical cache does; the K and V of every layer, token and head it then
holds for the rank must equal ``PrefixStore.load``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_hash_str
from transformers import AutoTokenizer

from prefixgen.store.reader import PrefixStore
from tests.conftest import STORIES, write_jsonl

PAGE = 16
MODEL_NAME = "org/stories-260K"  # the server's --served-model-name: "/" becomes "-" in file names
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her dog.",
    "Once upon a time, there was a little girl named Lily. One day she found a shiny red ball in the park.",
    "Tom and Mia went to the beach. They built a big sand castle and watched the waves come in and out all day.",
    "The cat sat on the mat. It was a sunny day and the cat was happy, so it purred and slept until dinner time.",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A bfloat16 store (SGLang's usual KV dtype) of stories260K: 5 layers, 4 KV heads of 8."""
    from typer.testing import CliRunner

    from prefixgen.cli import app

    tmp = tmp_path_factory.mktemp("sglang")
    data = write_jsonl(tmp / "data.jsonl", [{"text": t} for t in TEXTS])
    out = tmp / "store"
    args = ["build", str(data), "--model", str(STORIES), "--out", str(out), "--device", "cpu", "--dtype", "bfloat16", "-q"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def records() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(STORIES)
    return [tok(t).input_ids for t in TEXTS]


def export(store: Path, out: Path, *args: str) -> None:
    from typer.testing import CliRunner

    from prefixgen.cli import app

    if "--kv-dtype" not in args:  # a server started with --dtype bfloat16, the store's dtype
        args = ("--kv-dtype", "bfloat16", *args)
    cmd = ["export", str(store), "--to", "sglang", "--out", str(out), "--model-name", MODEL_NAME, "--quiet", *args]
    result = CliRunner().invoke(app, cmd, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def hicache_file(out: Path, rank: int, tp: int, monkeypatch, model_name: str = MODEL_NAME, mla: bool = False) -> HiCacheFile:
    """The file backend as rank ``rank`` of a TP-``tp`` server builds it (``mla``: of an MLA model)."""
    monkeypatch.setenv("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", str(out))
    config = HiCacheStorageConfig(
        tp_rank=rank,
        tp_size=tp,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name=model_name,
    )
    return HiCacheFile(config)


def host_pool(layout: str, layers: int, heads: int, head_dim: int, dtype: torch.dtype, pages: int) -> MHATokenToKVPoolHost:
    """SGLang's host KV pool for one rank, on the CPU, over a device pool of ``pages`` pages."""
    tokens = pages * PAGE
    k = tuple(torch.zeros(tokens, heads, head_dim, dtype=dtype) for _ in range(layers))
    v = tuple(torch.zeros(tokens, heads, head_dim, dtype=dtype) for _ in range(layers))

    def ptrs(ts):
        return torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)

    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs(k), v_data_ptrs=ptrs(v), layout=KVBufferLayout.NHD),
        page_size=PAGE,
        head_num=heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    return MHATokenToKVPoolHost(
        info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu", device_capacity_tokens=tokens, start_layer=0, end_layer=layers
    )


def pool_kv(pool: MHATokenToKVPoolHost, index: int) -> torch.Tensor:
    """[2, layers, PAGE, heads, dim]: K and V of the page at host ``index``, through the per-layer
    views SGLang's load kernels read (``k_data_refs``/``v_data_refs``)."""
    out = []
    for refs in (pool.k_data_refs, pool.v_data_refs):
        per_layer = []
        for ref in refs:
            if pool.layout == "page_first_direct":
                ref = ref.reshape(-1, *ref.shape[-2:])  # [pages, PAGE, H, D] -> [tokens, H, D]
            per_layer.append(ref[index : index + PAGE])
        out.append(torch.stack(per_layer))
    return torch.stack(out)


def rank_heads(heads: int, tp: int, rank: int) -> list[int]:
    """The model's KV heads rank ``rank`` holds in SGLang (heads split in order; replicated when tp > heads)."""
    if heads % tp == 0:
        n = heads // tp
        return list(range(rank * n, (rank + 1) * n))
    return [rank // (tp // heads)]


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct", "layer_first"])
@pytest.mark.parametrize("tp", [1, 2])
def test_sglang_reads_the_store_kv(store, records, tmp_path, monkeypatch, layout, tp):
    out = tmp_path / "hicache"
    export(store, out, "--layout", layout, "--tp-size", str(tp))
    pstore = PrefixStore.open(store)
    kv = pstore.manifest.kv
    dtype = getattr(torch, kv.dtype)
    checked = 0
    for rank in range(tp):
        backend = hicache_file(out, rank, tp, monkeypatch)
        heads = rank_heads(kv.num_kv_heads, tp, rank)
        for ids in records:
            n = len(ids) // PAGE * PAGE
            assert pstore.match(ids) >= n  # the build stored every full block of the record
            keys = get_hash_str(ids[:n], None, page_size=PAGE)  # SGLang's page hashes of the prompt
            assert backend.batch_exists(keys) == len(keys)
            cache = pstore.load(ids[:n])
            pool = host_pool(layout, kv.num_layers, len(heads), kv.head_dim, dtype, pages=len(keys) + 1)
            for i, key in enumerate(keys):
                page = backend.get(key, pool.get_dummy_flat_data_page())  # as the prefetch thread reads it
                assert page is not None
                index = (i + 1) * PAGE  # host slot of the page (slot 0 is SGLang's padding page)
                pool.set_from_flat_data_page(index, page)
                got = pool_kv(pool, index)  # [2, L, P, h, D]
                want = torch.stack(
                    [
                        torch.stack([layer.keys[0, heads, i * PAGE : (i + 1) * PAGE].transpose(0, 1) for layer in cache.layers]),
                        torch.stack(
                            [layer.values[0, heads, i * PAGE : (i + 1) * PAGE].transpose(0, 1) for layer in cache.layers]
                        ),
                    ]
                )
                assert got.dtype == want.dtype
                assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
                checked += 1
    assert checked == tp * sum(len(ids) // PAGE for ids in records)


def test_sglang_finds_nothing_beyond_the_store(store, records, tmp_path, monkeypatch):
    """A prompt that leaves the stored prefix mid-way hits up to there; another served name hits nothing."""
    out = tmp_path / "hicache"
    export(store, out)
    ids = records[0]
    n = len(ids) // PAGE * PAGE
    changed = ids[:PAGE] + [(t + 1) % 500 for t in ids[PAGE:n]]
    backend = hicache_file(out, 0, 1, monkeypatch)
    assert backend.batch_exists(get_hash_str(changed, None, page_size=PAGE)) == 1
    other = hicache_file(out, 0, 1, monkeypatch, model_name="org/other-model")
    assert other.batch_exists(get_hash_str(ids[:n], None, page_size=PAGE)) == 0


def test_sglang_tp_wider_than_the_heads(store, records, tmp_path, monkeypatch):
    """TP 8 over 4 KV heads: each head is on two ranks (SGLang replicates it); each rank's file holds its one head."""
    out = tmp_path / "hicache"
    export(store, out, "--tp-size", "8")
    pstore = PrefixStore.open(store)
    ids = records[2]
    key = get_hash_str(ids[:PAGE], None, page_size=PAGE)[0]
    cache = pstore.load(ids[:PAGE])
    kv = pstore.manifest.kv
    for rank in range(8):
        pool = host_pool("page_first", kv.num_layers, 1, kv.head_dim, getattr(torch, kv.dtype), pages=2)
        page = hicache_file(out, rank, 8, monkeypatch).get(key, pool.get_dummy_flat_data_page())
        pool.set_from_flat_data_page(PAGE, page)
        head = rank // 2
        want_k = torch.stack([layer.keys[0, [head], :PAGE].transpose(0, 1) for layer in cache.layers])
        assert torch.equal(pool_kv(pool, PAGE)[0], want_k)


def test_float32_store_is_exported_in_the_servers_kv_dtype(records, tmp_path, monkeypatch):
    """A float32 store (what build's --dtype auto makes on CPU) for a server of stories260K started with --dtype
    auto: SGLang keeps float16 KV (a float32 config is served as float16), and ``HiCacheFile.get`` would take a
    float32 file's first half as the page. The default export writes float16 pages: SGLang's float16 host pool then
    holds the store's KV rounded to float16, for every page of every record."""
    from typer.testing import CliRunner

    from prefixgen.cli import app

    data = write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in TEXTS])
    store = tmp_path / "f32"
    args = ["build", str(data), "--model", str(STORIES), "--out", str(store), "--device", "cpu", "--dtype", "float32", "-q"]
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    out = tmp_path / "hicache"
    export(store, out, "--kv-dtype", "auto")
    pstore = PrefixStore.open(store)
    kv = pstore.manifest.kv
    backend = hicache_file(out, 0, 1, monkeypatch)
    checked = 0
    for ids in records:
        n = len(ids) // PAGE * PAGE
        keys = get_hash_str(ids[:n], None, page_size=PAGE)
        cache = pstore.load(ids[:n])
        pool = host_pool("page_first", kv.num_layers, kv.num_kv_heads, kv.head_dim, torch.float16, pages=len(keys) + 1)
        for i, key in enumerate(keys):
            pool.set_from_flat_data_page((i + 1) * PAGE, backend.get(key, pool.get_dummy_flat_data_page()))
            window = slice(i * PAGE, (i + 1) * PAGE)
            want = torch.stack(
                [
                    torch.stack([layer.keys[0, :, window].transpose(0, 1) for layer in cache.layers]),
                    torch.stack([layer.values[0, :, window].transpose(0, 1) for layer in cache.layers]),
                ]
            ).to(torch.float16)
            assert torch.equal(pool_kv(pool, (i + 1) * PAGE), want)
            checked += 1
    assert checked == sum(len(ids) // PAGE for ids in records)
