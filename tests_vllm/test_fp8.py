"""An fp8 store (``--kv-dtype fp8``) in a real engine gives what vLLM gives on the dequantized KV.

The reference is a float32 store of the same records whose KV is replaced, block for block (by key), with the
fp8 store's KV dequantized here from the shard's raw ``kv`` and ``kv_scale`` tensors (FORMAT.md: ``x =
float(kv) * kv_scale[block, layer, kv, head]``), not by prefixgen's reader. vLLM loads float32 blocks
unchanged (test_vllm_connector checks them against vLLM's own compute), so the two engines see the same cache
if the connector dequantizes right: the same greedy tokens, the same tokens loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.format import SHARDS_DIR
from prefixgen.integrations.vllm.check import TOLERANCE

from .conftest import copy_store, rewrite_kv, run_vllm, tiny_model, write_jsonl

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
RECORDS = [
    SYSTEM + f"Story {i}: once upon a time, {name} found a {thing} in the park."
    for i, (name, thing) in enumerate([("Lily", "ball"), ("Tom", "cat")])
]
PROMPTS = [RECORDS[1] + " Then she", SYSTEM + "Story 9: a new story about a dog."]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    model = tiny_model(tmp / "qwen2")
    data = write_jsonl(tmp / "text.jsonl", [{"text": r} for r in RECORDS])
    for name, kv_dtype in (("fp8", "fp8"), ("native", "auto")):
        build(BuildConfig(dataset=str(data), model=str(model), out=str(tmp / name), device="cpu", quiet=True, kv_dtype=kv_dtype))
    dequantized = copy_store(tmp / "native", tmp / "dequantized")
    rewrite_kv(dequantized, lambda kv: dequantized_like(tmp / "fp8", tmp / "native").reshape(kv.shape))
    return model, tmp / "fp8", dequantized


def dequantized_like(fp8: Path, native: Path) -> np.ndarray:
    """The fp8 store's KV, dequantized, in the slot order of the native store's one shard, in the stores' layout:
    [slots, B, L, 2, H, D] token-major, [slots, H, B, L, 2, D] head-major (format 5)."""
    f, n = PrefixStore.open(fp8), PrefixStore.open(native)
    assert len(f.index.segments) == len(n.index.segments) == 1
    with safe_open(str(fp8 / SHARDS_DIR / f.index.segments[0].shard), framework="pt") as shard:
        q, scale = shard.get_tensor("kv"), shard.get_tensor("kv_scale")
    assert q.dtype == torch.float8_e4m3fn
    if f.manifest.kv.heads_first:  # q [blocks, H, B, L, 2, D], scale [blocks, H, L, 2]
        x = q.float() * scale[:, :, None, :, :, None]
    else:  # q [blocks * B, L, 2, H, D], scale [blocks, L, 2, H]
        x = q.float().view(-1, f.block_size, *q.shape[1:]) * scale[:, None, :, :, :, None]
    cols = n.index.columns(0)
    keys = [bytes(k) for k in cols["key"][np.argsort(cols["slot"])]]  # the native shard's blocks, in slot order
    fp8_slots = [loc.slot for loc in f.index.find(keys)]
    return x[fp8_slots].numpy()


def test_fp8_store_equals_vllm_on_its_dequantized_kv(stores):
    model, fp8, dequantized = stores
    assert PrefixStore.open(fp8).manifest.kv.storage == "fp8"
    quantized = run_vllm(model, PROMPTS, store=fp8)
    # The reference holds fp8-rounded KV as float32: the live check accepts it only with fp8's tolerance.
    reference = run_vllm(model, PROMPTS, store=dequantized, connector_extra={"check_tolerance": TOLERANCE["fp8"]})
    assert quantized.loaded == reference.loaded and all(n >= 256 for n in quantized.loaded)
    assert quantized.cached == reference.cached
    assert quantized.outputs == reference.outputs
