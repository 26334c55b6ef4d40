"""Single-flight loads, with no engine (vLLM's own layers, cache and requests, as test_block16.py builds them): loads
of one stored prefix handed to the worker in one step read its blocks once, and each request's cache is bitwise what
the layers' own cache-write op makes of the stored KV of its claimed tokens at its slots; a block that fails its
checksum stops every load that shares the read at that block (vLLM recomputes each from there). Each piece is read
into the worker's one kept staging buffer and goes to the cache's device as read (no host copy of it is made); a
head-major one's transpose to vLLM's rows is made there, once."""

from __future__ import annotations

import math
import shutil

import torch

from prefixgen import PrefixStore

from .conftest import claim, corrupt_block
from .test_block16 import NUM_BLOCKS, STORE_BLOCK, VLLM_BLOCK, connectors, setup  # noqa: F401 (setup: the fixture)

COMPUTED = {"a": 0, "b": 16, "c": 48}  # vLLM's own hit of each request: loads start 0, 16 and 48 tokens in


def load_together(scheduler, worker, ids: list[int], prompts: dict[str, list[int]] | None = None, computed=COMPUTED):
    """One request per ``computed`` entry (vLLM's own hit; the token ids ``prompts[req_id]``, default ``ids``), each with blocks of its own,
    claimed and allocated, then loaded in one step (one connector metadata) as vLLM's model runner does; the tokens
    each claimed, their block tables, the load errors."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    per_request = max(-(-len(p) // VLLM_BLOCK) for p in [ids, *(prompts or {}).values()])
    claimed, tables = {}, {}
    for n, (req_id, hit) in enumerate(computed.items()):
        request = Request(req_id, (prompts or {}).get(req_id, ids), SamplingParams(max_tokens=1), None)
        claimed[req_id], load_async = claim(scheduler, request, hit)
        assert load_async
        order = [(7 * j + 3) % NUM_BLOCKS for j in range(NUM_BLOCKS)]  # every block once, scattered
        tables[req_id] = order[n * per_request : (n + 1) * per_request]  # disjoint
        blocks = KVCacheBlocks(([KVCacheBlock(b) for b in tables[req_id]],))
        scheduler.update_state_after_alloc(request, blocks, claimed[req_id])
    worker.bind_connector_metadata(scheduler.build_connector_meta(SchedulerOutput.make_empty()))
    worker.start_load_kv(None)
    finished: set[str] = set()
    while finished != set(computed):
        finished |= worker.get_finished(set())[1] or set()
    return claimed, tables, worker.get_block_ids_with_load_errors()


def expected_cache(layer, cache, stored, index: int, computed: int, end: int, table: list[int]) -> torch.Tensor:
    """What the layer's own cache-write op makes of ``cache`` given the stored KV of tokens [computed, end) at their slots
    of ``table`` (slots computed here, not with the connector's slot_mapping)."""
    pos = torch.arange(computed, end)
    slots = torch.as_tensor(table)[pos // VLLM_BLOCK] * VLLM_BLOCK + pos % VLLM_BLOCK
    keys, values = (
        t[0, :, computed:end].transpose(0, 1).contiguous() for t in (stored.layers[index].keys, stored.layers[index].values)
    )
    layer.impl.do_kv_cache_update(layer, keys, values, cache, slots)
    return cache


def test_loads_of_one_prefix_in_one_step_read_it_once(setup, monkeypatch):  # noqa: F811
    model, store, ids = setup
    opened = PrefixStore.open(store)
    kv = opened.manifest.kv
    staging_blocks = 2
    scheduler, worker, caches = connectors(
        model, store, monkeypatch, staging_bytes=staging_blocks * kv.bytes_per_token * STORE_BLOCK
    )
    try:
        end = opened.match(ids[:-1])
        blocks = end // STORE_BLOCK
        claimed, tables, errors = load_together(scheduler, worker, ids)
        assert claimed == {r: end - c for r, c in COMPUTED.items()} and errors == set()
        stored = opened.load(ids[:-1])
        for i, (layer, cache) in enumerate(caches):
            expected = torch.full_like(cache, float("nan"))
            for req_id, computed in COMPUTED.items():
                expected_cache(layer, expected, stored, i, computed, end, tables[req_id])
            torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
        stats = worker.stats
        assert stats.pieces == math.ceil(blocks / staging_blocks)  # each piece read once, not once per request
        assert stats.read_bytes == blocks * STORE_BLOCK * kv.bytes_per_token  # the prefix's bytes, once
        assert stats.shared_loads == 2 and stats.requests == 3
        assert stats.tokens == sum(claimed.values())
        # Every piece was read into the one kept buffer and goes to the cache's device as read: no host copy of it is
        # made, whatever the store's order. A head-major one's (format 5, the default) is transposed to vLLM's
        # token-major rows once, after that upload (on CPU the device is the host), for all the loads sharing it.
        head_major = kv.heads_first
        assert stats.converted_bytes == 0 and worker.connector_worker._loader.staging.made == 1
        assert stats.device_converted_bytes == (stats.read_bytes if head_major else 0)
        staging = worker.connector_worker._loader.staging.acquire()
        piece, good = worker.connector_worker._loader.read(
            opened.find_prefix(opened.keys(ids[:-1])).locations[:staging_blocks], staging
        )
        in_buffer = piece.kv.untyped_storage().data_ptr() == staging.tensor.untyped_storage().data_ptr()
        assert good == staging_blocks and in_buffer
    finally:
        worker.shutdown()


def test_a_block_failing_its_checksum_stops_every_load_sharing_the_read(setup, monkeypatch, tmp_path):  # noqa: F811
    model, store, ids = setup
    store = shutil.copytree(store, tmp_path / "store")
    corrupt_block(store, ids[:-1], 3)  # tokens 72-95
    opened = PrefixStore.open(store)
    kv = opened.manifest.kv
    scheduler, worker, caches = connectors(model, store, monkeypatch, staging_bytes=2 * kv.bytes_per_token * STORE_BLOCK)
    try:
        claimed, tables, errors = load_together(scheduler, worker, ids)
        first_bad = 3 * STORE_BLOCK
        # Each request is recomputed from the vLLM block holding the corrupt block's first token.
        assert errors == {tables[r][first_bad // VLLM_BLOCK] for r in COMPUTED}
        assert worker.stats.corrupt_blocks == 1 and worker.stats.failed_loads == 3  # read (and found bad) once
        stored = opened.load(ids[:-1], verify=False)  # the tokens before the bad block are written, bitwise; none after
        for i, (layer, cache) in enumerate(caches):
            expected = torch.full_like(cache, float("nan"))
            for req_id, computed in COMPUTED.items():
                expected_cache(layer, expected, stored, i, computed, first_bad, tables[req_id])
            torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
    finally:
        worker.shutdown()


def test_prompts_sharing_their_first_blocks_read_those_once(tmp_path, monkeypatch):
    """Two records after one system prompt, their prompts loaded in one step: the shared blocks are read once (the
    second load is written from the first's reads, then reads its own blocks after them), each request's cache is
    bitwise its own stored KV. Before: each load read every block of its prompt."""
    from prefixgen import BuildConfig, build
    from prefixgen.model import load_tokenizer

    from .conftest import tiny_model, write_jsonl
    from .test_block16 import SYSTEM

    model = tiny_model(tmp_path / "qwen2")
    records = [  # 7 blocks of system prompt, then 2 of the first story, 3 of the second
        SYSTEM + "Story: Lily found a red ball in the park and she ran after it with her dog all day long.",
        SYSTEM
        + "Story: Tom lost his red kite in the tall green trees by the lake, and he looked for it until the sun went down.",
    ]
    store = tmp_path / "store"
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": r} for r in records])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), device="cpu", quiet=True, block_size=STORE_BLOCK))
    tokenizer = load_tokenizer(str(model))
    prompts = {"a": tokenizer(records[0] + " Then she").input_ids, "c": tokenizer(records[1] + " Then he").input_ids}
    opened = PrefixStore.open(store)
    locs = {r: opened.find_prefix(opened.keys(p[:-1])).locations for r, p in prompts.items()}
    shared = next(j for j, (x, y) in enumerate(zip(locs["a"], locs["c"])) if (x.shard, x.slot) != (y.shard, y.slot))
    assert shared == 7 and len(locs["a"]) - shared >= 1 and len(locs["c"]) - shared >= 2
    kv = opened.manifest.kv
    scheduler, worker, caches = connectors(model, store, monkeypatch, staging_bytes=2 * kv.bytes_per_token * STORE_BLOCK)
    try:
        claimed, tables, errors = load_together(scheduler, worker, prompts["a"], prompts, {"a": 0, "c": 0})
        ends = {r: opened.match(p[:-1]) for r, p in prompts.items()}
        assert claimed == ends and errors == set()
        for i, (layer, cache) in enumerate(caches):
            expected = torch.full_like(cache, float("nan"))
            for req_id, p in prompts.items():
                expected_cache(layer, expected, opened.load(p[:-1]), i, 0, ends[req_id], tables[req_id])
            torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
        # 2 blocks a piece: a's pieces, then c's own after the shared run (before: c read all of its blocks too)
        assert worker.stats.pieces == math.ceil(len(locs["a"]) / 2) + math.ceil((len(locs["c"]) - shared) / 2)
        blocks = len(locs["a"]) + len(locs["c"]) - shared  # every stored block of the two prompts, once
        assert worker.stats.read_bytes == blocks * STORE_BLOCK * kv.bytes_per_token
        assert worker.stats.shared_loads == 1 and worker.stats.requests == 2
    finally:
        worker.shutdown()
