"""A CUDA build stores the KV the model computes: the pinned shard buffers are filled by non-blocking
device-to-host copies while the next batches are queued, so a missing stream order or a device buffer
reused before its copy read it would store another batch's KV here. CUDA only (skipped elsewhere); it
passed on an H100 on 2026-12-05 (BENCHMARKS.md, GPU rows)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import PrefixStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA build: pinned buffers, non-blocking copies")


@pytest.mark.parametrize("order", ["heads", "tokens"])
def test_cuda_build_stores_the_kv_the_model_computes(tmp_path, cli, stories, text_dataset, order):
    """Every record's stored KV equals the model's forward over it alone, on the same device."""
    out = tmp_path / "store"
    # Small batches and 3-block shards: many batches in flight, host buffers reused many times over.
    args = ["--batch-tokens", "128", "--shard-bytes", "64KiB", "--write-threads", "2", "--kv-order", order]
    result = cli(
        "build", text_dataset, "--model", stories, "--out", out, "--device", "cuda", "--dtype", "float32", "--quiet", *args
    )
    assert result.exit_code == 0, result.output
    shards = json.loads(cli("ls", out, "--json").stdout)["shards"]
    assert len(shards) > 20  # the host buffers were reused many times over
    store = PrefixStore.open(out)
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).cuda().eval()
    tok = AutoTokenizer.from_pretrained(stories)
    for line in text_dataset.read_text().splitlines():
        ids = tok(json.loads(line)["text"]).input_ids
        n = len(ids) // 16 * 16
        assert store.match(ids) == n
        loaded = store.load(ids, device="cuda")
        with torch.inference_mode():
            alone = model(torch.tensor([ids[:n]], device="cuda"), use_cache=True)
        alone_cache = alone["cache"] if "cache" in alone else alone["past_key_values"]
        assert len(loaded.layers) == len(alone_cache.layers) == model.config.num_hidden_layers
        for got, want in zip(loaded.layers, alone_cache.layers):
            # fp32 on both sides; batched and alone differ by reassociation only (~1e-6), another batch's KV by ~1.
            assert (got.keys - want.keys).abs().max() < 1e-4
            assert (got.values - want.values).abs().max() < 1e-4
