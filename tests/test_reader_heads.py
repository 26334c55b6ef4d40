"""PrefixStore.read_locations(heads=..., layers=...): one tensor-parallel rank's KV heads and one pipeline stage's
layers, equal to the same heads and layers of a full read (native and fp8 stores, head-major and token-major). A
head-major store (format 5) reads only the rank's heads from disk and checks them against their own checksums."""

from __future__ import annotations

import pytest
import torch

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.errors import CorruptBlockError
from prefixgen.format import SHARDS_DIR, read_safetensors_header
from prefixgen.maintain.verify import verify_store
from prefixgen.store.reader import ReadCount

from .conftest import write_jsonl

ROWS = [
    {"text": f"Story {i}: once upon a time a {w} went to the park and played all day long."} for i, w in enumerate(["cat", "dog"])
]


def _store(tmp_path, stories, kv_dtype: str, kv_order: str):
    out = tmp_path / "store"
    data = str(write_jsonl(tmp_path / "s.jsonl", ROWS))
    cfg = BuildConfig(
        dataset=data,
        model=str(stories),
        out=str(out),
        device="cpu",
        dtype="float32",
        quiet=True,
        kv_dtype=kv_dtype,
        kv_order=kv_order,
    )
    build(cfg)
    store = PrefixStore.open(out)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(stories)(ROWS[0]["text"]).input_ids
    return store, store.find_prefix(store.keys(ids)).locations


@pytest.mark.parametrize("kv_order", ["heads", "tokens"])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_head_range_equals_slice_of_full_read(tmp_path, stories, kv_dtype, kv_order):
    store, locations = _store(tmp_path, stories, kv_dtype, kv_order)
    assert store.manifest.format_version == (5 if kv_order == "heads" else 3)
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


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_a_rank_reads_and_checks_only_its_heads(tmp_path, stories, kv_dtype):
    """Head-major: the bytes a rank reads are its heads' share of the blocks (plus each block's head checksums); a
    damaged head of another rank is not read and fails nothing, a damaged own head or head_crc row fails the block."""
    store, locations = _store(tmp_path, stories, kv_dtype, "heads")
    kv, bs, n = store.manifest.kv, store.block_size, len(locations)
    whole = n * kv.block_bytes(bs)
    full = store.read_locations(locations)
    counts = {}
    for heads in (range(0, 2), range(2, 4), range(0, 4)):
        counts[heads] = ReadCount()
        store.read_locations(locations, heads=heads, count=counts[heads], threads=1)
    assert counts[range(0, 4)].bytes == whole  # all heads: whole blocks, one read per run
    for heads in (range(0, 2), range(2, 4)):
        assert counts[heads].bytes == whole // 2 + n * kv.num_kv_heads * 4

    # Damage one byte of head 3 of the first block: ranks holding heads 0-1 still read it, 2-3 do not.
    loc = locations[0]
    shard = store.path / SHARDS_DIR / loc.shard
    with open(shard, "rb") as f:
        header = read_safetensors_header(f, shard)
    raw = bytearray(shard.read_bytes())
    at = header.offset("kv") + (loc.slot * kv.num_kv_heads + 3) * kv.head_bytes(bs) + 7
    raw[at] ^= 0x40
    shard.write_bytes(bytes(raw))
    store = PrefixStore.open(store.path)
    part = store.read_locations(locations, heads=range(0, 2))
    assert torch.equal(part, full[:, :, :, 0:2])
    with pytest.raises(CorruptBlockError) as exc:
        store.read_locations(locations, heads=range(2, 4))
    assert exc.value.block == 0
    with pytest.raises(CorruptBlockError):
        store.read_locations(locations)
    report = verify_store(store.path)
    assert not report.ok and any("head_crc" in f for f in report.faults)
    raw[at] ^= 0x40  # mended; now damage the block's head_crc row (head 1's checksum): every partial read refuses it
    raw[header.offset("head_crc") + loc.slot * kv.num_kv_heads * 4 + 4] ^= 0x01
    shard.write_bytes(bytes(raw))
    store = PrefixStore.open(store.path)
    for heads in (range(0, 2), range(2, 4)):
        with pytest.raises(CorruptBlockError):
            store.read_locations(locations, heads=heads)
    assert torch.equal(store.read_locations(locations), full)  # a whole-block read recomputes the row from the KV
