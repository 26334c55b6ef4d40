"""The connector's block arithmetic at vLLM block size 16 (CUDA's default), which vLLM's CPU engine refuses
(``CPU_ATTN`` declares kernel block sizes ``MultipleOf(32)``): no engine is started. vLLM's own pieces are
built from its config instead: two real ``Attention`` layers (CPU_ATTN, whose metadata builder picks the
``vec16`` kernel for 16-token blocks), a paged cache in CPU_ATTN's layout, ``Request`` and ``KVCacheBlocks``.
The scheduler connector claims, the worker connector loads through the layers' own cache-write op, and each
cache must then be bitwise what that op makes of an empty cache given the stored KV of exactly the claimed tokens
at their slots (computed here from the block table, not with the connector's ``slot_mapping``): nothing else
written, nothing missing, nothing shifted.

The store's blocks are 24 tokens, not a multiple of 16: a load starting at vLLM's hit (a multiple of 16) starts
0, 8 or 16 tokens into a store block, and pieces of whole store blocks end inside vLLM blocks.
"""

from __future__ import annotations

import pytest
import torch

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.model import load_tokenizer

from .conftest import claim, connector_config, tiny_model, write_jsonl

VLLM_BLOCK = 16
STORE_BLOCK = 24
NUM_BLOCKS = 40  # vLLM blocks in the paged cache
SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 3
RECORD = SYSTEM + "Story: Lily found a ball."  # 182 tokens: 7 store blocks (168) are claimed, ending inside a vLLM block
PROMPT = RECORD + " Then she"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, its store (24-token blocks) and the prompt's token ids."""
    tmp = tmp_path_factory.mktemp("block16")
    model = tiny_model(tmp / "qwen2")
    data = write_jsonl(tmp / "text.jsonl", [{"text": RECORD}])
    store = tmp / "store"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), device="cpu", quiet=True, block_size=STORE_BLOCK))
    return model, store, load_tokenizer(str(model))(PROMPT).input_ids


def connectors(model, store, monkeypatch, **extra):
    """vLLM's config for block size 16, its two attention layers, and a scheduler and a worker connector
    (registered on NaN-filled caches). The worker asks vLLM's (not started) tensor-parallel group for its rank:
    that one function is replaced (rank 0 of 1)."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from prefixgen.integrations.vllm import PrefixgenConnector

    config = VllmConfig(
        model_config=ModelConfig(str(model), dtype="float32", max_model_len=1024),
        cache_config=CacheConfig(block_size=VLLM_BLOCK),
        kv_transfer_config=connector_config(store, **extra),
    )
    with set_current_vllm_config(config):
        layers = [
            Attention(4, 64, 0.125, 2, cache_config=config.cache_config, prefix=f"model.layers.{i}.self_attn.attn")
            for i in range(2)
        ]
        names = [layer.layer_name for layer in layers]
        spec = layers[0].get_kv_cache_spec(config)
        assert spec.block_size == VLLM_BLOCK
        layers[0].attn_backend.get_builder_cls()(spec, names, config, torch.device("cpu"))  # sets the layers' kernel ISA
        assert layers[0].isa == "vec16"
        kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)]
        )
        scheduler = PrefixgenConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config)
        scheduler.connector_scheduler._gate.state = "passed"  # no engine computes KV here: the live check is test_live_check's
        worker = PrefixgenConnector(config, KVConnectorRole.WORKER, kv_cache_config)
        # CPU_ATTN's paged cache: [blocks, KV heads, block size, K head_dim | V head_dim]
        caches = {name: torch.full((NUM_BLOCKS, 2, VLLM_BLOCK, 2 * 64), float("nan")) for name in names}
        for layer in layers:
            layer.kv_cache = caches[layer.layer_name]
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
        worker.register_kv_caches(caches)
    return scheduler, worker, [(layer, caches[layer.layer_name]) for layer in layers]


def load(scheduler, worker, ids: list[int], computed: int, block_ids: list[int]) -> int:
    """One request through the connectors, as vLLM's scheduler and model runner call them: claim the stored
    tokens after vLLM's hit of ``computed`` tokens, allocate ``block_ids``, load, wait; the tokens claimed."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    request = Request("req", ids, SamplingParams(max_tokens=1), None)
    claimed, load_async = claim(scheduler, request, computed)
    assert load_async
    scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],)), claimed)
    worker.bind_connector_metadata(scheduler.build_connector_meta(SchedulerOutput.make_empty()))  # waits for its load: no token
    worker.start_load_kv(None)
    finished = None
    while not finished:
        _, finished = worker.get_finished(set())
    assert finished == {"req"} and worker.get_block_ids_with_load_errors() == set()
    return claimed


@pytest.mark.parametrize("computed", [0, 16, 32, 48, 64])  # 0, 16, 8, 0 and 16 tokens into a store block
@pytest.mark.parametrize("staging_blocks", [1, 3])  # store blocks a piece: pieces end inside vLLM blocks
def test_load_writes_the_claimed_tokens_at_their_slots(setup, monkeypatch, computed, staging_blocks):
    model, store, ids = setup
    opened = PrefixStore.open(store)
    piece = staging_blocks * opened.manifest.kv.bytes_per_token * STORE_BLOCK
    scheduler, worker, caches = connectors(model, store, monkeypatch, staging_bytes=piece)
    try:
        end = opened.match(ids[:-1])
        assert end % STORE_BLOCK == 0 and end % VLLM_BLOCK != 0 and end > 64 + 2 * STORE_BLOCK
        block_ids = [(7 * i + 3) % NUM_BLOCKS for i in range(-(-len(ids) // VLLM_BLOCK))]  # scattered, not in order

        assert load(scheduler, worker, ids, computed, block_ids) == end - computed
        stored = opened.load(ids[:-1])  # per layer: [1, KV heads, end, head_dim] keys and values
        pos = torch.arange(computed, end)
        slots = torch.as_tensor(block_ids)[pos // VLLM_BLOCK] * VLLM_BLOCK + pos % VLLM_BLOCK
        for i, (layer, cache) in enumerate(caches):
            expected = torch.full_like(cache, float("nan"))
            keys, values = (
                t[0, :, computed:].transpose(0, 1).contiguous() for t in (stored.layers[i].keys, stored.layers[i].values)
            )
            layer.impl.do_kv_cache_update(layer, keys, values, expected, slots)  # [tokens, KV heads, head_dim] each
            assert not expected.isnan().all() and expected.isnan().any()
            torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
        assert worker.stats.tokens == end - computed
    finally:
        worker.shutdown()


def test_live_check_compares_the_claimed_tokens_at_their_slots(setup, monkeypatch):
    """The live check's comparison (``compare_blocks``) reads vLLM's paged cache through the layers' own cache-write
    op and the cache's block dimension only: after a load at vLLM block size 16 from 24-token store blocks, the
    cache equals the store's KV (error 0 on every layer), and one changed key of layer 1 shows in layer 1's K only."""
    from prefixgen.integrations.vllm.check import compare_blocks, relative_errors

    model, store, ids = setup
    opened = PrefixStore.open(store)
    scheduler, worker, caches = connectors(model, store, monkeypatch)
    try:
        end = opened.match(ids[:-1])
        block_ids = [(7 * i + 3) % NUM_BLOCKS for i in range(-(-len(ids) // VLLM_BLOCK))]
        load(scheduler, worker, ids, 16, block_ids)
        start = STORE_BLOCK  # the first store block boundary after vLLM's hit of 16 tokens
        locations = opened.find_prefix(opened.keys(ids[:-1])).locations
        read, good = worker.connector_worker._loader.read(locations[1:], worker.connector_worker._loader.staging.acquire())
        assert good == len(locations) - 1
        kv = read.rows(worker.connector_worker._loader.dtype)  # as the live check makes them
        k_err, v_err = relative_errors(
            compare_blocks(worker.connector_worker._loader.layers, 0, kv, start, end, [(block_ids, VLLM_BLOCK)] * 2, NUM_BLOCKS)
        )
        assert (
            [index for _, index in worker.connector_worker._loader.layers] == [0, 1]
            and k_err == [0.0, 0.0]
            and v_err == [0.0, 0.0]
        )

        layer, cache = caches[1]
        pos = start + 5  # one token's key in layer 1, written back changed through the layer's own op
        slot = torch.tensor([block_ids[pos // VLLM_BLOCK] * VLLM_BLOCK + pos % VLLM_BLOCK])
        token = opened.load(ids[:-1]).layers[1]
        key = token.keys[0, :, pos : pos + 1].transpose(0, 1).contiguous() + 1.0  # [1, KV heads, head_dim]
        value = token.values[0, :, pos : pos + 1].transpose(0, 1).contiguous()
        layer.impl.do_kv_cache_update(layer, key, value, cache, slot)
        k_err, v_err = relative_errors(
            compare_blocks(worker.connector_worker._loader.layers, 0, kv, start, end, [(block_ids, VLLM_BLOCK)] * 2, NUM_BLOCKS)
        )
        assert k_err[0] == 0.0 and v_err == [0.0, 0.0] and k_err[1] > 0.0
    finally:
        worker.shutdown()
