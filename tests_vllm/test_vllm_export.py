"""`prefixgen export --to vllm` read back by vLLM 0.32.0's own offloading code, on the CPU.

vLLM's GPU<->CPU transfer asserts CUDA, so no engine serves here (benchmarks/gpu.sh has that run). Everything up to
it is vLLM's own code: the run config is built from a ``VllmConfig`` with the ``OffloadingConnector`` configuration
a user would pass (``build_offloading_config``); ``TieringOffloadingSpec.get_manager`` makes the CPU primary tier
(its shared mmap rows) and the ``fs`` tier, whose ``FileMapper`` names files; each record's block hashes come from
vLLM's request hasher (``init_none_hash``, ``get_request_block_hasher``); the ``fs`` tier's ``submit_load`` reads
the files into CPU-tier rows; vLLM's canonical mapping (``derive_canonical_mappings`` over caches laid out by
``create_kv_cache_views``, unrolled by ``_build_copy_plan``) places each canonical page into the GPU page of the
resolved layout; that page, read as vLLM's attention reads it (K then V of each head and token), must equal
``PrefixStore.load`` of the record byte for byte.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixgen.export.vllm import VLLM_VERSION
from prefixgen.model import tp_kv_heads
from prefixgen.store.reader import PrefixStore
from tests.conftest import write_jsonl

from .conftest import tiny_model

TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her dog. "
    "Every morning they ran to the park and played with a red ball until it was time for lunch.",
    "Once upon a time, there was a little girl named Lily. One day she found a shiny red ball in the park, "
    "and she took it home to show her mother, who smiled and said it was the best ball in town.",
    "Tom and Mia went to the beach. They built a big sand castle and watched the waves come in and out all day.",
]
NUM_BLOCKS = 64  # blocks of the (simulated) GPU cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny Qwen2 (2 layers, 2 KV heads of 64, float32), its store (16-token blocks) and the records' ids."""
    from prefixgen import BuildConfig, build
    from prefixgen.model import load_tokenizer

    tmp = tmp_path_factory.mktemp("vllm_export")
    model = tiny_model(tmp / "qwen2")
    data = write_jsonl(tmp / "text.jsonl", [{"text": t} for t in TEXTS])
    store = tmp / "store"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), device="cpu", quiet=True))
    tok = load_tokenizer(str(model))
    return model, store, [tok(t).input_ids for t in TEXTS]


def test_checked_against_the_pinned_version():
    import vllm

    assert vllm.__version__ == VLLM_VERSION


@pytest.fixture
def cli():
    """The real CLI, in-process."""
    from typer.testing import CliRunner

    from prefixgen.cli import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def export(cli, store: Path, out: Path, model: Path, *args) -> None:
    r = cli("export", store, "--to", "vllm", "--out", out, "--model-name", model, "--dtype", "float32", "-q", *args)
    assert r.exit_code == 0, r.output


class VLLMSide:
    """vLLM's scheduler-side offloading stack for a server started with ``extra`` as the connector's config."""

    def __init__(self, model: Path, root: Path, layout: str, tp: int, block_size: int, extra: dict, spec=None, layers: int = 2):
        from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import build_offloading_config
        from vllm.v1.attention.backends.utils import record_kv_cache_layout
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
        from vllm.v1.kv_offload.factory import OffloadingSpecFactory

        self.config = VllmConfig(
            model_config=ModelConfig(str(model), dtype="float32", max_model_len=1024),
            cache_config=CacheConfig(block_size=block_size),
            parallel_config=ParallelConfig(tensor_parallel_size=tp),
            kv_transfer_config=KVTransferConfig(
                kv_connector="OffloadingConnector",
                kv_role="kv_both",
                kv_connector_extra_config={
                    "spec_name": "TieringOffloadingSpec",
                    "cpu_bytes_to_use": 64 << 20,
                    "canonical_layout": True,
                    "secondary_tiers": [{"type": "fs", "root_dir": str(root)}],
                    **extra,
                },
            ),
        )
        self.config.parallel_config.rank = 0
        record_kv_cache_layout(self.config.cache_config, layout)
        self.layout = layout
        # The spec one rank's attention layers report (FlashAttention and CPU attention alike): this rank's heads.
        self.spec = spec or FullAttentionSpec(
            block_size=block_size, num_kv_heads=max(1, 2 // tp), head_size=64, dtype=torch.float32
        )
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        page = self.spec.page_size_bytes
        self.tensor = KVCacheTensor(
            size=page * NUM_BLOCKS * layers, layers=self.names, layer_stride=page * NUM_BLOCKS, block_stride=page
        )
        self.kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS, kv_cache_tensors=[self.tensor], kv_cache_groups=[KVCacheGroupSpec(self.names, self.spec)]
        )
        self.kv_cache_config.kv_cache_layout = layout
        self.offloading = build_offloading_config(self.config, self.kv_cache_config)
        self.offload_spec = OffloadingSpecFactory.create_spec(self.offloading)
        self.manager = self.offload_spec.get_manager()
        (self.fs,) = self.manager.secondary_tiers

    def block_hashes(self, ids: list[int], algo: str = "sha256") -> list[bytes]:
        """``Request.block_hashes`` as the engine computes them (its hash function and NONE_HASH)."""
        from vllm import SamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        fn = get_hash_fn_by_name(algo)
        init_none_hash(fn)
        hasher = get_request_block_hasher(self.spec.block_size, fn)
        return list(Request("r", ids, SamplingParams(max_tokens=1), None, block_hasher=hasher).block_hashes)

    def load(self, keys: list[bytes]) -> np.ndarray:
        """The fs tier's load of ``keys`` into CPU-tier rows 0..n-1; those rows, ``[n, row bytes]`` uint8."""
        return fs_load(self.fs, keys)

    def to_gpu_pages(self, rows: np.ndarray, blocks_per_chunk: int, rank: int) -> list[torch.Tensor]:
        """The CPU rows copied into GPU blocks 0.. as TP rank ``rank``'s worker would (its canonical mapping and
        copy plans); each layer's cache as the attention backend sees it, ``[blocks, rank heads, tokens, K|V]``."""
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.canonical_mapping import derive_canonical_mappings
        from vllm.v1.kv_cache_interface import KVCacheLayout, create_kv_cache_views
        from vllm.v1.kv_offload.base import CanonicalKVCacheRef
        from vllm.v1.kv_offload.cpu.gpu_worker import _build_copy_plan

        raw = torch.zeros(self.tensor.size, dtype=torch.int8)
        views = create_kv_cache_views(raw, self.spec, NUM_BLOCKS, KVCacheLayout[self.layout], self.tensor)
        self.config.parallel_config.rank = rank
        try:
            mappings = derive_canonical_mappings(self.config, self.kv_cache_config, dict(zip(self.names, views)))
        finally:
            self.config.parallel_config.rank = 0
        flat = raw.numpy().view(np.uint8)
        canonical_offset = 0  # SharedOffloadRegion.create_next_canonical_view: tensor areas carved in layer order
        for layer, name in enumerate(self.names):
            mapping = mappings[name]
            plan = _build_copy_plan(CanonicalKVCacheRef(layer, self.spec.page_size_bytes, mapping), gpu_to_cpu=False)
            cpage = mapping.canonical_page_size_bytes
            for chunk in range(len(rows)):
                for j in range(blocks_per_chunk):
                    block = chunk * blocks_per_chunk + j
                    src = rows[chunk, canonical_offset + j * cpage :]
                    dst = flat[layer * self.tensor.layer_stride + block * self.tensor.block_stride :]
                    for s, d, n in zip(plan.frag_offsets_src.tolist(), plan.frag_offsets_dst.tolist(), plan.frag_sizes.tolist()):
                        dst[d : d + n] = src[s : s + n]
            canonical_offset += cpage * blocks_per_chunk
        return views

    def close(self) -> None:
        self.manager.shutdown()


def fs_load(fs, keys: list[bytes]) -> np.ndarray:
    """The fs tier ``fs``'s load of ``keys`` into CPU-tier rows 0..n-1; those rows, ``[n, row bytes]`` uint8."""
    from vllm.v1.kv_offload.base import ReqContext
    from vllm.v1.kv_offload.tiering.base import TransferJob

    fs.submit_load(TransferJob(1, keys, np.arange(len(keys)), True, ReqContext("r")))
    deadline = time.monotonic() + 60
    while True:
        done = list(fs.get_finished_jobs())
        if done:
            assert [(r.job_id, r.success) for r in done] == [(1, True)]
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return np.asarray(fs._primary_kv_view)[: len(keys)].view(np.uint8)


def stored_kv(store: PrefixStore, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``PrefixStore.load`` of ``ids``: K and V as ``[layers, heads, tokens, head_dim]``."""
    cache = store.load(ids)
    return (
        torch.stack([layer.keys[0] for layer in cache.layers]),
        torch.stack([layer.values[0] for layer in cache.layers]),
    )


@pytest.mark.parametrize(
    ("layout", "blocks_per_chunk", "tp", "seed", "algo"),
    [
        ("LBNHC", 1, 1, None, "sha256"),  # FlashAttention's layout, one block a file: the default server
        ("LBNHC", 2, 2, None, "sha256"),  # 32-token files, TP 2: the canonical page holds both ranks' heads
        ("LBHNC", 2, 1, "7", "sha256_cbor"),  # head-major pages; PYTHONHASHSEED=7 and the CBOR hash
        ("LBHNC", 1, 4, None, "sha256"),  # TP 4 over 2 KV heads: each head on 2 ranks (rows twice as long)
    ],
)
def test_vllm_reads_the_export_as_the_stores_kv(cli, setup, tmp_path, monkeypatch, layout, blocks_per_chunk, tp, seed, algo):
    model, store, records = setup
    root = tmp_path / "offload"
    args = ["--kv-cache-layout", layout, "--blocks-per-file", blocks_per_chunk, "--tp-size", tp]
    args += ["--prefix-caching-hash-algo", algo] + (["--hash-seed", seed] if seed else [])
    export(cli, store, root, model, *args)
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    extra = {"blocks_per_chunk": blocks_per_chunk} if blocks_per_chunk > 1 else {}
    vllm_side = VLLMSide(model, root, layout, tp, 16, extra)
    try:
        mapper = vllm_side.fs.file_mapper
        # config.json: what the fs tier would have written (it keeps the one there), where it looks for it.
        config_path = Path(mapper.get_config_file_path())
        assert config_path.read_text() == json.dumps(mapper.get_run_config(), indent=2, sort_keys=True)
        pstore = PrefixStore.open(store)
        from vllm.v1.kv_offload.base import make_offload_key

        expected: set[Path] = set()
        for ids in records:
            hashes = vllm_side.block_hashes(ids, algo)
            keys = [make_offload_key(h, 0) for h in hashes[blocks_per_chunk - 1 :: blocks_per_chunk]]
            names = [Path(mapper.get_file_name(k)) for k in keys]
            assert names and all(n.stat().st_size == vllm_side.fs._block_size for n in names)  # one CPU-tier row each
            expected |= set(names)
            rows = vllm_side.load(keys)
            assert rows.shape[1] == vllm_side.offload_spec.kv_bytes_per_chunk
            tokens = len(keys) * blocks_per_chunk * 16
            k, v = stored_kv(pstore, ids[:tokens])  # [L, H, T, D]
            for rank in range(tp):
                heads = tp_kv_heads(2, tp, rank)
                for layer, page in enumerate(vllm_side.to_gpu_pages(rows, blocks_per_chunk, rank)):
                    got = page[: tokens // 16].permute(1, 0, 2, 3).reshape(len(heads), tokens, 128)  # [H, T, K|V]
                    want_k, want_v = k[layer, heads.start : heads.stop], v[layer, heads.start : heads.stop]
                    assert torch.equal(got[..., :64].view(torch.int32), want_k.view(torch.int32))
                    assert torch.equal(got[..., 64:].view(torch.int32), want_v.view(torch.int32))
        # Every exported file is one of the records' chunks: nothing else sits in vLLM's folder.
        assert {p for p in root.rglob("*.bin")} == expected
    finally:
        vllm_side.close()


def test_a_file_vllm_does_not_hash_to_is_a_miss(cli, setup, tmp_path, monkeypatch):
    """The negative control: a server with another seed, block size or dtype looks in another folder or under
    other names, and finds nothing (vLLM's lookup is a file's existence)."""
    model, store, records = setup
    root = tmp_path / "offload"
    export(cli, store, root, model)
    monkeypatch.setenv("PYTHONHASHSEED", "1")
    vllm_side = VLLMSide(model, root, "LBNHC", 1, 16, {})
    try:
        names = [Path(vllm_side.fs.file_mapper.get_file_name(h + bytes(4))) for h in vllm_side.block_hashes(records[0])]
        assert names and not any(n.exists() for n in names)
    finally:
        vllm_side.close()


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_vllm_reads_an_mla_export_as_the_stores_latent(cli, tmp_path, monkeypatch, arch):
    """An MLA store (one KV cache group of ``MLAAttentionSpec``) exported for a TP-1 server: vLLM's own offloading
    config finds it parallelism-agnostic (``spec_certifiable``), its fs tier reads each file into a CPU-tier row,
    and its canonical mapping places each layer's latent page in the GPU cache: the store's latent rows, the rope
    key's pairs in vLLM's order for DeepSeek V3 (``rope_interleave``)."""
    from transformers import AutoConfig
    from vllm.v1.kv_cache_interface import MLAAttentionSpec
    from vllm.v1.kv_offload.base import make_offload_key

    from prefixgen import BuildConfig, build
    from prefixgen.model import load_tokenizer
    from tests.conftest import make_model
    from tests.test_cache_kinds import KINDS, interleaved_rope

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    model = make_model(tmp_path / arch, arch, seed=1, initializer_range=0.1, **{**KINDS[arch], "max_position_embeddings": 1024})
    store = tmp_path / "store"
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), device="cpu", dtype="float32", quiet=True))
    pstore = PrefixStore.open(store)
    kv = pstore.manifest.kv
    assert kv.kind == "mla" and kv.num_kv_heads == 1
    root = tmp_path / "offload"
    export(cli, store, root, model)
    spec = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=kv.head_dim, dtype=torch.float32)
    vllm_side = VLLMSide(model, root, "LBNHC", 1, 16, {}, spec=spec, layers=kv.num_layers)
    try:
        # vLLM's own decision: one topology-free folder, one latent copy for every rank (replicated_layout, TP 1 too).
        assert vllm_side.offloading.parallel.is_parallelism_agnostic and vllm_side.offloading.replicated_layout
        mapper = vllm_side.fs.file_mapper
        assert Path(mapper.get_config_file_path()).read_text() == json.dumps(mapper.get_run_config(), indent=2, sort_keys=True)
        tok = load_tokenizer(str(model))
        config = AutoConfig.from_pretrained(model)
        expected: set[Path] = set()
        for text in TEXTS:
            ids = tok(text).input_ids
            keys = [make_offload_key(h, 0) for h in vllm_side.block_hashes(ids)]
            names = [Path(mapper.get_file_name(k)) for k in keys]
            assert names and all(n.stat().st_size == vllm_side.fs._block_size for n in names)
            expected |= set(names)
            rows = vllm_side.load(keys)
            tokens = len(keys) * 16
            _, latent = pstore.read_prefix(pstore.keys(ids[:tokens]))  # [T, L, 1, 1, D]
            want = interleaved_rope(latent[:, :, 0, 0], kv.latent_rank, config)  # [T, L, D], vLLM's rope order
            for layer, page in enumerate(vllm_side.to_gpu_pages(rows, 1, 0)):
                got = page[: tokens // 16].reshape(tokens, kv.head_dim)  # [blocks, 16, D]: MLA's GPU page
                assert torch.equal(got.view(torch.int32), want[:, layer].contiguous().view(torch.int32)), (text, layer)
        assert {p for p in root.rglob("*.bin")} == expected
    finally:
        vllm_side.close()


# The attention layers' names in vLLM's model classes, and the layer spec each reports (its own attention type).
HYBRID_NAMES = {"gemma3_text": "model.layers.{i}.self_attn.attn", "gpt_oss": "model.layers.{i}.attn.attn"}
HYBRID_NAMES["mistral"] = HYBRID_NAMES["gemma3_text"]


def _layer_specs(config, names: str, heads: int, head_dim: int) -> dict:
    """What vLLM's attention layers of ``config`` report (``get_kv_cache_spec``): full, sliding window or chunked."""
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec, SlidingWindowSpec

    kw = dict(block_size=16, num_kv_heads=heads, head_size=head_dim, dtype=torch.float32)
    specs = {}
    # Mistral: one window for every layer, no layer_types
    every = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    for i, kind in enumerate(getattr(config, "layer_types", None) or [every] * config.num_hidden_layers):
        if kind == "sliding_attention":
            spec = SlidingWindowSpec(sliding_window=config.sliding_window, **kw)
        elif kind == "chunked_attention":
            spec = ChunkedLocalAttentionSpec(attention_chunk_size=config.attention_chunk_size, **kw)
        else:
            spec = FullAttentionSpec(**kw)
        specs[names.format(i=i)] = spec
    return specs


# Gemma 3 with 5 sliding and 2 full layers: vLLM pads its last sliding group (groups of 2 layers, that one of 1).
PADDED = dict(
    num_hidden_layers=7,
    layer_types=["sliding_attention"] * 2
    + ["full_attention"]
    + ["sliding_attention"] * 2
    + ["full_attention", "sliding_attention"],
)


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss", "gemma3_text-padded", "mistral"])
def test_vllm_reads_a_sliding_window_export_group_by_group(cli, tmp_path, monkeypatch, arch):
    """A sliding-window store (Gemma 3; GPT-OSS with sinks) exported for vLLM's offloading: vLLM's own code groups
    the layers (``get_kv_cache_configs``, with the hybrid manager on, as the ``SupportsHMA``
    ``OffloadingConnector`` keeps it), its fs tier reads each group's file (``_g<i>``) into a CPU-tier row, and its worker's
    canonical caches (``OffloadingConnectorWorker.register_kv_caches``, the layers of the groups sharing one
    allocation) place the pages in each group's GPU blocks: each layer's K and V must be the store's."""
    from transformers import AutoConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading import worker as offload_worker
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.kv_cache_interface import KVCacheLayout, create_kv_cache_views
    from vllm.v1.kv_offload.base import make_offload_key
    from vllm.v1.kv_offload.cpu.gpu_worker import _build_copy_plan, _canonical_block_sizes

    from prefixgen import BuildConfig, build
    from prefixgen.model import load_tokenizer
    from tests.conftest import make_model
    from tests.test_cache_kinds import KINDS

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    arch, _, padded = arch.partition("-")
    kw = {**KINDS[arch], "max_position_embeddings": 1024, **(PADDED if padded else {})}
    model = make_model(tmp_path / arch, arch, seed=1, initializer_range=0.1, **kw)
    store = tmp_path / "store"
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), device="cpu", dtype="float32", quiet=True))
    pstore = PrefixStore.open(store)
    kv = pstore.manifest.kv
    root = tmp_path / "offload"
    export(cli, store, root, model, "--layer-names", HYBRID_NAMES[arch])
    config = AutoConfig.from_pretrained(model)
    vllm_side = VLLMSide(model, root, "LBNHC", 1, 16, {}, layers=kv.num_layers)
    vllm_side.close()  # its own offloading stack (one full-attention group) is not this model's; its config is
    vconfig = vllm_side.config
    specs = _layer_specs(config, HYBRID_NAMES[arch], kv.num_kv_heads, kv.head_dim)
    page = next(iter(specs.values())).page_size_bytes
    (kv_cache_config,) = get_kv_cache_configs(vconfig, [specs], [page * 4 * NUM_BLOCKS * len(specs)])
    groups = kv_cache_config.kv_cache_groups
    assert len(groups) == (1 if arch == "mistral" else 2 + 2 * bool(padded)), groups  # vLLM's own grouping, HMA on
    assert (min(len(g.layer_names) for g in groups) < max(len(g.layer_names) for g in groups)) == bool(padded)
    # vLLM's offloading stack over that config, as the server builds it.
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import build_offloading_config
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    offloading = build_offloading_config(vconfig, kv_cache_config)
    assert offloading.parallel.is_parallelism_agnostic and not offloading.replicated_layout
    spec = OffloadingSpecFactory.create_spec(offloading)
    manager = spec.get_manager()
    try:
        (fs,) = manager.secondary_tiers
        mapper = fs.file_mapper
        assert Path(mapper.get_config_file_path()).read_text() == json.dumps(mapper.get_run_config(), indent=2, sort_keys=True)
        # The worker's canonical caches over a simulated GPU allocation laid out as vLLM lays it out.
        num_blocks = kv_cache_config.num_blocks
        raw = torch.zeros(kv_cache_config.kv_cache_tensors[0].size, dtype=torch.int8)
        layout = KVCacheLayout["LBNHC"]
        kv_caches = {}
        for tensor, group in zip(kv_cache_config.kv_cache_tensors, groups):
            kv_caches.update(zip(tensor.layers, create_kv_cache_views(raw, group.kv_cache_spec, num_blocks, layout, tensor)))
        captured = []
        monkeypatch.setattr(offload_worker.OffloadingConnectorWorker, "_init_worker", lambda self, c: captured.append(c))
        offload_worker.OffloadingConnectorWorker(spec, vconfig, kv_cache_config).register_kv_caches(kv_caches)
        (caches,) = captured
        areas = np.cumsum([0] + _canonical_block_sizes(caches.group_data_refs, len(caches.tensors)))
        tok = load_tokenizer(str(model))
        expected: set[Path] = set()
        for text in TEXTS:
            ids = tok(text).input_ids
            hashes = vllm_side.block_hashes(ids)
            tokens = len(hashes) * 16
            _, want = pstore.read_prefix(pstore.keys(ids[:tokens]))  # [T, L, 2, H, D]
            for g, group in enumerate(groups):
                keys = [make_offload_key(h, g) for h in hashes]
                names = [Path(mapper.get_file_name(k)) for k in keys]
                assert all(n.stat().st_size == fs._block_size for n in names), g
                expected |= set(names)
                rows = fs_load(fs, keys)
                raw.zero_()
                for ref in caches.group_data_refs[g]:  # each layer of the group: its area of the row -> its GPU page
                    plan = _build_copy_plan(ref, gpu_to_cpu=False)
                    gpu = caches.tensors[ref.tensor_idx].tensor
                    for block in range(len(keys)):
                        src = rows[block, areas[ref.tensor_idx] :]
                        dst = gpu[block].numpy().view(np.uint8)
                        for s, d, n in zip(
                            plan.frag_offsets_src.tolist(), plan.frag_offsets_dst.tolist(), plan.frag_sizes.tolist()
                        ):
                            dst[d : d + n] = src[s : s + n]
                for name in group.layer_names:
                    layer = int(name.split(".")[2])
                    got = kv_caches[name][: len(keys)].permute(1, 0, 2, 3).reshape(kv.num_kv_heads, tokens, -1)
                    got = got.view(torch.float32)  # [H, T, K|V]
                    assert torch.equal(got[..., : kv.head_dim], want[:, layer, 0].transpose(0, 1)), (g, name)
                    assert torch.equal(got[..., kv.head_dim :], want[:, layer, 1].transpose(0, 1)), (g, name)
        assert {p for p in root.rglob("*.bin")} == expected
    finally:
        manager.shutdown()


def test_chunked_local_attention_has_no_canonical_page_in_vllm(tmp_path):
    """Why `export --to vllm` refuses a chunked store (Llama 4's local layers): vLLM 0.32.0 groups them apart (its
    hybrid manager stays on: VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE defaults to 1) and its offloading
    then finds the model not parallelism-agnostic, so no canonical, topology-free page exists for it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import build_offloading_config
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    from tests.conftest import make_model
    from tests.test_cache_kinds import KINDS

    model = make_model(tmp_path / "l4", "llama4_text", seed=1, **{**KINDS["llama4_text"], "max_position_embeddings": 1024})
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    vllm_side = VLLMSide(model, tmp_path / "offload", "LBNHC", 1, 16, {}, layers=config.num_hidden_layers)
    try:
        specs = _layer_specs(config, "model.layers.{i}.self_attn.attn", config.num_key_value_heads, config.head_dim)
        page = next(iter(specs.values())).page_size_bytes
        (kv_cache_config,) = get_kv_cache_configs(vllm_side.config, [specs], [page * 4 * NUM_BLOCKS * len(specs)])
        assert len(kv_cache_config.kv_cache_groups) > 1
        assert not build_offloading_config(vllm_side.config, kv_cache_config).parallel.is_parallelism_agnostic
    finally:
        vllm_side.close()
