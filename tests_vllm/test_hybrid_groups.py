"""The connector's KV cache groups without an engine: vLLM's own ``Attention`` layers (CPU_ATTN, block size 16), its
``KVCacheConfig`` with one group per kind, its ``KVCacheBlocks`` with the pool's null blocks where vLLM's
SlidingWindowManager puts them, and a real store (test_block16's model and store).

* A sliding-window group's layer gets exactly the stored tokens of its window's blocks, bitwise what its own
  cache-write op makes of them, and nothing in any other slot; the full group's layer gets every claimed token.
* A model with a recurrent (Mamba/GDN) group loads nothing: each request is counted as ``skipped_recurrent``.
* A group of a kind the connector does not know is refused at start, by name.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prefixgen import PrefixStore
from prefixgen.errors import ConfigError

from .conftest import claim, connector_config, copy_store, corrupt_block
from .test_block16 import NUM_BLOCKS, STORE_BLOCK, VLLM_BLOCK, setup  # noqa: F401 (a fixture)

WINDOW = 32


def connectors(model, store, monkeypatch, kinds: list[str]):
    """A scheduler and a worker connector for two layers, layer i in a KV cache group of ``kinds[i]`` ("full",
    "sliding", "mamba" or "cross": the last two as specs only, their layer a full-attention one), registered on
    NaN-filled caches."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MambaSpec

    from prefixgen.integrations.vllm import PrefixgenConnector

    config = VllmConfig(
        model_config=ModelConfig(str(model), dtype="float32", max_model_len=1024),
        cache_config=CacheConfig(block_size=VLLM_BLOCK),
        kv_transfer_config=connector_config(store),
    )
    with set_current_vllm_config(config):
        layers = [
            Attention(
                4, 64, 0.125, 2, cache_config=config.cache_config, prefix=f"model.layers.{i}.self_attn.attn",
                per_layer_sliding_window=WINDOW if kind == "sliding" else None,
            )
            for i, kind in enumerate(kinds)
        ]  # fmt: skip
        groups = []
        for layer, kind in zip(layers, kinds):
            spec = dataclasses.replace(layer.get_kv_cache_spec(config), block_size=VLLM_BLOCK)  # one for all groups, as in vLLM
            if kind == "mamba":
                spec = MambaSpec(VLLM_BLOCK, ((3, 64), (4, 16, 16)), (torch.float32, torch.float32))
            elif kind == "cross":
                spec = CrossAttentionSpec(block_size=VLLM_BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
            groups.append(KVCacheGroupSpec([layer.layer_name], spec))
        names = [layer.layer_name for layer in layers]
        layers[0].attn_backend.get_builder_cls()(groups[0].kv_cache_spec, names, config, torch.device("cpu"))  # kernel ISA
        kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)
        scheduler = PrefixgenConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config)
        scheduler.connector_scheduler._gate.state = "passed"  # no engine computes KV here: the live check is test_live_check's
        worker = PrefixgenConnector(config, KVConnectorRole.WORKER, kv_cache_config)
        caches = {layer.layer_name: torch.full((NUM_BLOCKS, 2, VLLM_BLOCK, 2 * 64), float("nan")) for layer in layers}
        for layer in layers:
            layer.kv_cache = caches[layer.layer_name]
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
        worker.register_kv_caches(caches)
    return scheduler, worker, [(layer, caches[layer.layer_name]) for layer in layers]


def test_sliding_group_gets_only_its_window_blocks(setup, monkeypatch):  # noqa: F811
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    model, store, ids = setup
    opened = PrefixStore.open(store)
    end = opened.match(ids[:-1])
    assert end % STORE_BLOCK == 0 and end > 4 * WINDOW
    scheduler, worker, caches = connectors(model, store, monkeypatch, ["full", "sliding"])
    try:
        n_blocks = -(-len(ids) // VLLM_BLOCK)
        full_ids = [(7 * i + 3) % NUM_BLOCKS for i in range(n_blocks)]
        # SlidingWindowManager.get_num_skipped_tokens(end): the blocks of the first end - WINDOW + 1 tokens are null
        skipped = (end - WINDOW + 1) // VLLM_BLOCK
        sliding_ids = [(5 * i + 1) % NUM_BLOCKS for i in range(n_blocks)]
        null = KVCacheBlock(0)
        null.is_null = True
        blocks = KVCacheBlocks(
            ([KVCacheBlock(b) for b in full_ids], [null] * skipped + [KVCacheBlock(b) for b in sliding_ids[skipped:]])
        )
        request = Request("req", ids, SamplingParams(max_tokens=1), None)
        claimed, load_async = claim(scheduler, request, 0)
        assert claimed == end and load_async
        scheduler.update_state_after_alloc(request, blocks, claimed)
        worker.bind_connector_metadata(scheduler.build_connector_meta(SchedulerOutput.make_empty()))
        worker.start_load_kv(None)
        finished = None
        while not finished:
            _, finished = worker.get_finished(set())

        stored = opened.load(ids[:-1])
        for i, ((layer, cache), table, first) in enumerate(zip(caches, (full_ids, sliding_ids), (0, skipped * VLLM_BLOCK))):
            pos = torch.arange(first, end)
            slots = torch.as_tensor(table)[pos // VLLM_BLOCK] * VLLM_BLOCK + pos % VLLM_BLOCK
            keys, values = (
                t[0, :, first:end].transpose(0, 1).contiguous() for t in (stored.layers[i].keys, stored.layers[i].values)
            )
            expected = torch.full_like(cache, float("nan"))
            layer.impl.do_kv_cache_update(layer, keys, values, expected, slots)
            torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)  # nothing else written
        assert worker.stats.tokens == end
        assert worker.stats.window_tokens == end - skipped * VLLM_BLOCK < 2 * WINDOW
        assert worker.stats.window_tokens_skipped == skipped * VLLM_BLOCK
    finally:
        worker.shutdown()
        scheduler.shutdown()


def test_recurrent_model_loads_nothing_counted(setup, monkeypatch):  # noqa: F811
    from vllm import SamplingParams
    from vllm.v1.request import Request

    model, store, ids = setup
    scheduler, worker, _ = connectors(model, store, monkeypatch, ["full", "mamba"])
    try:
        assert "recurrent state (MambaSpec, 1 layers)" in scheduler.connector_scheduler._recurrent
        for i in range(3):
            assert claim(scheduler, Request(f"r{i}", ids, SamplingParams(max_tokens=1), None), 0) == (0, False)
        assert scheduler.claim_stats.skipped_recurrent == 3 and scheduler.claim_stats.lookups == 0
    finally:
        worker.shutdown()
        scheduler.shutdown()


def test_unknown_group_refused_at_start(setup, monkeypatch):  # noqa: F811
    model, store, _ = setup
    with pytest.raises(ConfigError, match="a KV cache group of CrossAttentionSpec"):
        connectors(model, store, monkeypatch, ["full", "cross"])


def test_failed_load_with_groups_is_a_failed_receive(setup, monkeypatch, tmp_path):  # noqa: F811
    """With several KV cache groups vLLM refuses block-level load errors (``_handle_invalid_blocks``: block ids are
    per group): a load cut short by a corrupt block is reported as a failed receive, and vLLM recomputes it whole."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    model, store, ids = setup
    store = copy_store(store, tmp_path / "store")
    corrupt_block(store, ids[:-1], 3)
    scheduler, worker, _ = connectors(model, store, monkeypatch, ["full", "sliding"])
    try:
        request = Request("req", ids, SamplingParams(max_tokens=1), None)
        claimed, _ = claim(scheduler, request, 0)
        table = [KVCacheBlock(b) for b in range(1, -(-len(ids) // VLLM_BLOCK) + 1)]
        scheduler.update_state_after_alloc(request, KVCacheBlocks((table, table)), claimed)
        worker.bind_connector_metadata(scheduler.build_connector_meta(SchedulerOutput.make_empty()))
        worker.start_load_kv(None)
        results = None
        while not (results and results.finished_recving):
            results = worker.get_transfer_results(set())
        assert results.finished_recving == {"req"} and results.failed_recving == {"req"}
        assert worker.get_block_ids_with_load_errors() == set()
        assert worker.stats.corrupt_blocks == 1 and worker.stats.failed_loads == 1
    finally:
        worker.shutdown()
        scheduler.shutdown()
