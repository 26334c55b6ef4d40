"""PrefixStore.read_locations(buffer=...): a caller's host buffer read into instead of a new tensor (the vLLM
connector reuses one per load thread), with the same KV as a plain read, and a clear error for a buffer that
cannot hold the blocks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import write_jsonl

ROWS = [
    {"text": f"Story {i}: once upon a time a {w} went to the park and played all day long."} for i, w in enumerate(["cat", "dog"])
]


@pytest.fixture(scope="module")
def store_and_ids(tmp_path_factory, stories):
    tmp = tmp_path_factory.mktemp("buffer-store")
    out = tmp / "store"
    data = str(write_jsonl(tmp / "s.jsonl", ROWS))
    # Token-major (format 3): its reads are views of the buffer (a head-major store's are transposed into new tensors).
    cfg = BuildConfig(
        dataset=data, model=str(stories), out=str(out), device="cpu", dtype="float32", quiet=True, kv_order="tokens"
    )
    build(cfg)
    tok = AutoTokenizer.from_pretrained(stories)
    return PrefixStore.open(out), [tok(row["text"]).input_ids for row in ROWS]


def test_read_into_buffer_equals_plain_read_and_reuses_it(store_and_ids):
    store, ids = store_and_ids
    first, second = (store.find_prefix(store.keys(i)).locations for i in ids)
    assert len(first) >= 2 and len(second) >= 2
    buffer = torch.empty(len(first) * store.block_size * store.manifest.kv.bytes_per_token + 64, dtype=torch.uint8)
    a = store.read_locations(first, buffer=buffer)  # [T, L, 2, H, D]
    assert torch.equal(a, store.read_locations(first))
    assert a.data_ptr() == buffer.data_ptr()  # a view of the buffer: nothing allocated for the KV
    b = store.read_locations(second[:2], heads=range(1, 3), buffer=buffer)  # the next piece, into the same buffer
    assert torch.equal(b, store.read_locations(second[:2])[:, :, :, 1:3])
    assert b.data_ptr() == buffer.data_ptr() + 1 * store.manifest.kv.head_dim * 4  # head 1 of the first token
    converted = store.read_locations(first, dtype=torch.bfloat16, buffer=buffer)  # a conversion: a new tensor
    assert torch.equal(converted, store.read_locations(first).to(torch.bfloat16))


def test_buffer_too_small_or_strided_is_refused(store_and_ids):
    store, ids = store_and_ids
    locations = store.find_prefix(store.keys(ids[0])).locations
    need = len(locations) * store.block_size * store.manifest.kv.bytes_per_token
    for bad in (torch.empty(need - 1, dtype=torch.uint8), torch.empty(need, 2, dtype=torch.uint8)[:, 0]):
        with pytest.raises(ValueError, match=f"aligned host tensor of at least {need} bytes"):
            store.read_locations(locations, buffer=bad)


@pytest.mark.parametrize("kv_order", ["heads", "tokens"])
def test_fp8_read_stages_its_bytes_and_scales_in_the_buffer(tmp_path, stories, kv_order):
    """An fp8 store's blocks land in the buffer as stored, a byte a value, and their float32 scales with them (the
    vLLM connector pins one buffer per piece and dequantizes on the device): ``staged_bytes`` is exactly what a read
    needs, a byte less is refused, and the rows made from the buffer equal a plain read's."""
    out = tmp_path / "fp8"
    data = str(write_jsonl(tmp_path / "s.jsonl", ROWS))
    build(
        BuildConfig(dataset=data, model=str(stories), out=str(out), device="cpu", quiet=True, kv_dtype="fp8", kv_order=kv_order)
    )
    store = PrefixStore.open(out)
    kv, bs = store.manifest.kv, store.block_size
    locations = store.find_prefix(store.keys(AutoTokenizer.from_pretrained(stories)(ROWS[0]["text"]).input_ids)).locations
    n = len(locations)
    assert n >= 2 and kv.storage == "fp8"
    need = n * (bs * kv.values_per_token + 4 * kv.num_layers * kv.parts * kv.num_kv_heads)  # fp8 bytes + scales
    assert store.staged_bytes(n) == need == n * kv.block_bytes(bs)
    buffer = torch.empty(need, dtype=torch.uint8)
    stored = store.read_stored(locations, buffer=buffer)
    for part in (stored.kv, stored.scales):  # both views of the buffer: nothing else allocated on the host
        assert part.untyped_storage().data_ptr() == buffer.data_ptr()
    assert stored.kv.dtype == torch.float8_e4m3fn and stored.scales.dtype == torch.float32
    assert torch.equal(stored.rows(torch.float32), store.read_locations(locations, dtype=torch.float32))
    if kv.heads_first:  # a head-major store stages only the heads asked for, and their scales
        h = range(1, 2)
        assert store.staged_bytes(n, h) == need // kv.num_kv_heads
        part = store.read_stored(locations, heads=h, buffer=torch.empty(need // kv.num_kv_heads, dtype=torch.uint8))
        assert torch.equal(part.rows(torch.float32), store.read_locations(locations, dtype=torch.float32)[:, :, :, 1:2])
    with pytest.raises(ValueError, match=f"aligned host tensor of at least {need} bytes"):
        store.read_stored(locations, buffer=torch.empty(need - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4-byte aligned"):  # the scales come first, viewed as float32
        store.read_stored(locations, buffer=torch.empty(need + 4, dtype=torch.uint8)[1 : need + 1])
