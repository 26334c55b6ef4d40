"""An fp8 store's pieces, with no engine (vLLM's own layers, cache and requests, as test_block16.py builds them): a
piece holds as many store blocks as their staged bytes (a byte a value plus the float32 scales, dequantized only on
the cache's device) fit in ``staging_bytes``, the read buffer holds the whole piece (its scales too) and is no larger
than ``staging_bytes``, and each cache is bitwise what the layers' own cache-write op makes of the store's dequantized
KV. Before: a block was counted as the float32 it is dequantized in, so a piece held a quarter of the blocks the
budget allows."""

from __future__ import annotations

import math

import pytest
import torch

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.model import load_tokenizer

from .conftest import tiny_model, write_jsonl
from .test_block16 import NUM_BLOCKS, PROMPT, RECORD, STORE_BLOCK, VLLM_BLOCK, connectors, load

PIECE_BLOCKS = 3  # store blocks a piece's staging_bytes are sized for


@pytest.fixture(scope="module", params=["heads", "tokens"])
def fp8_setup(request, tmp_path_factory):
    """The model, an fp8 store of ``RECORD`` (24-token blocks, in the order of the param) and the prompt's token ids."""
    tmp = tmp_path_factory.mktemp(f"fp8-staging-{request.param}")
    model = tiny_model(tmp / "qwen2")
    data = write_jsonl(tmp / "text.jsonl", [{"text": RECORD}])
    store = tmp / "store"
    cfg = BuildConfig(
        dataset=str(data),
        model=str(model),
        out=str(store),
        device="cpu",
        quiet=True,
        block_size=STORE_BLOCK,
        kv_dtype="fp8",
        kv_order=request.param,
    )
    build(cfg)
    return model, store, load_tokenizer(str(model))(PROMPT).input_ids


def test_fp8_pieces_hold_the_blocks_their_staged_bytes_fit(fp8_setup, monkeypatch):
    model, store, ids = fp8_setup
    opened = PrefixStore.open(store)
    kv = opened.manifest.kv
    assert kv.storage == "fp8" and kv.heads_first == (kv.order == "heads")
    # One block as staged on the host: its fp8 bytes (one a value, every head: one rank) and its float32 scales.
    block = STORE_BLOCK * kv.values_per_token + 4 * kv.num_layers * kv.parts * kv.num_kv_heads
    assert block == kv.block_bytes(STORE_BLOCK)
    staging_bytes = PIECE_BLOCKS * block + block // 2  # room for 3.5 blocks: a piece holds 3
    scheduler, worker, caches = connectors(model, store, monkeypatch, staging_bytes=staging_bytes)
    try:
        end = opened.match(ids[:-1])
        blocks = end // STORE_BLOCK
        assert blocks > 2 * PIECE_BLOCKS
        block_ids = [(7 * i + 3) % NUM_BLOCKS for i in range(-(-len(ids) // VLLM_BLOCK))]
        assert load(scheduler, worker, ids, 0, block_ids) == end
        stats = worker.stats
        assert stats.pieces == math.ceil(blocks / PIECE_BLOCKS)
        assert stats.max_piece_bytes == PIECE_BLOCKS * block <= staging_bytes
        pool = worker.connector_worker._loader.staging
        assert pool.made == 1 and pool.nbytes == PIECE_BLOCKS * block  # the whole piece, scales and all, in one buffer
        assert stats.converted_bytes == 0  # read into the buffer as stored: dequantized only on the cache's device
        assert stats.device_converted_bytes == end * kv.values_per_token * 4  # the float32 rows made from it
        # The cache holds the store's KV, dequantized (as a plain read makes it), at the request's slots.
        stored = opened.load(ids[:-1], dtype=torch.float32)
        pos = torch.arange(0, end)
        slots = torch.as_tensor(block_ids)[pos // VLLM_BLOCK] * VLLM_BLOCK + pos % VLLM_BLOCK
        for i, (layer, cache) in enumerate(caches):
            expected = torch.full_like(cache, float("nan"))
            keys, values = (t[0].transpose(0, 1).contiguous() for t in (stored.layers[i].keys, stored.layers[i].values))
            layer.impl.do_kv_cache_update(layer, keys, values, expected, slots)
            torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
    finally:
        worker.shutdown()
