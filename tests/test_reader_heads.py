"""PrefixStore.read_locations(heads=..., layers=...): one tensor-parallel rank's KV heads and one pipeline stage's
layers, dropped in host memory before any conversion, equal to the same heads and layers of a full read (native
and fp8 stores)."""

from __future__ import annotations

import pytest
import torch

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import write_jsonl


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_head_range_equals_slice_of_full_read(tmp_path, stories, kv_dtype):
    rows = [
        {"text": f"Story {i}: once upon a time a {w} went to the park and played all day long."}
        for i, w in enumerate(["cat", "dog"])
    ]
    out = tmp_path / "store"
    data = str(write_jsonl(tmp_path / "s.jsonl", rows))
    build(
        BuildConfig(dataset=data, model=str(stories), out=str(out), device="cpu", dtype="float32", quiet=True, kv_dtype=kv_dtype)
    )
    store = PrefixStore.open(out)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(stories)(rows[0]["text"]).input_ids
    locations = store.find_prefix(store.keys(ids)).locations
    assert len(locations) >= 1 and store.manifest.kv.num_kv_heads == 4
    full = store.read_locations(locations)  # [T, L, 2, 4, D]
    for heads in (range(0, 2), range(2, 4), range(3, 4)):
        part = store.read_locations(locations, dtype=torch.bfloat16, heads=heads)
        assert part.shape == (*full.shape[:3], len(heads), full.shape[4])
        assert torch.equal(part, full[:, :, :, heads.start : heads.stop].to(torch.bfloat16))
    # A pipeline stage's layers (stories260K has 5), with a rank's heads or all of them.
    assert store.manifest.kv.num_layers == 5
    for layers, heads in ((range(0, 3), None), (range(3, 5), None), (range(4, 5), range(1, 3))):
        part = store.read_locations(locations, dtype=torch.bfloat16, heads=heads, layers=layers)
        h = heads or range(4)
        assert torch.equal(part, full[:, layers.start : layers.stop, :, h.start : h.stop].to(torch.bfloat16))
