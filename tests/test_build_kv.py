"""What a build stores is exact and does not depend on how it was scheduled: fp8 pasts, chunked
prefill, resumed builds; and a reader reads only the bytes it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.compat import output_cache
from prefixgen.format import INDEX_DIR, SHARDS_DIR, read_safetensors_header

from .conftest import SYSTEM, write_jsonl


def _build(tmp_path: Path, data: Path, model: Path, name: str, **kw) -> Path:
    out = tmp_path / name
    cfg = BuildConfig(dataset=str(data), model=str(model), out=str(out), device="cpu", dtype="float32", quiet=True, **kw)
    build(cfg)
    return out


def _shard_data(store: Path) -> list[bytes]:
    """Each shard's bytes after its header (the header names the writer, which differs per run)."""
    parts = []
    for path in sorted((store / SHARDS_DIR).glob("*.safetensors")):  # one writer: sorted by sequence number
        with open(path, "rb") as f:
            header = read_safetensors_header(f, path)
            f.seek(header.data_start)
            parts.append(f.read())
    return parts


@pytest.mark.parametrize("kv_dtype", ["fp8", "auto"])
def test_fp8_suffixes_are_computed_on_the_dequantized_past_whatever_the_cache(tmp_path, stories, text_dataset, kv_dtype):
    """The past a suffix is computed on is the fp8 KV a server will load, whether the build finds it
    in its recent-blocks cache or reads it back (batched, a key run at a time): builds with and without
    that cache store the same bytes (native KV too)."""
    kw = dict(kv_dtype=kv_dtype, batch_tokens=256, shard_bytes=40_000)
    cached = _build(tmp_path, text_dataset, stories, "cached", **kw)  # recent blocks from device memory
    uncached = _build(tmp_path, text_dataset, stories, "uncached", prefix_cache_bytes=0, **kw)  # from the writer
    (b,) = PrefixStore.open(cached).builds()
    assert b.prefilled_tokens < 0.6 * b.dataset_tokens  # suffixes were computed on a stored past
    a, c = _shard_data(cached), _shard_data(uncached)
    assert len(a) == len(c) > 1
    assert [i for i, (x, y) in enumerate(zip(a, c)) if x != y] == []  # shards that differ


@torch.inference_mode()
def test_records_longer_than_batch_tokens_are_prefilled_in_chunks_exactly(tmp_path, stories):
    """Chunked prefill: each chunk's past is the chunk before; the KV equals single-sequence prefill."""
    tok = AutoTokenizer.from_pretrained(stories)
    texts = [f"{name} said: " + SYSTEM * (3 + i) for i, name in enumerate(["Lily", "Tom", "Mia", "Ben"])]
    lengths = [len(tok(t).input_ids) for t in texts]
    assert min(lengths) > 2 * 64 and max(lengths) < 512  # 3 to 6 chunks each, within the model's positions
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": t} for t in texts])
    out = _build(tmp_path, data, stories, "store", batch_tokens=64)
    store = PrefixStore.open(out)
    (b,) = store.builds()
    assert b.prefilled_tokens == b.stored_tokens
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    for text in texts:
        ids = tok(text).input_ids
        n = store.match(ids)
        assert n == len(ids) // 16 * 16
        loaded = store.load(ids)
        alone = output_cache(model(torch.tensor([ids[:n]]), use_cache=True))
        for got, want in zip(loaded.layers, alone.layers):
            for g, w in ((got.keys, want.keys), (got.values, want.values)):
                assert (g - w).abs().max().item() <= 1e-5 * w.abs().max().item()


def test_loading_reads_only_the_blocks_it_returns(tmp_path, stories, text_dataset):
    """Every byte of the shard that the prompt's blocks do not live in is garbage: the load still
    returns exactly the stored KV, so it read nothing else."""
    out = _build(tmp_path, text_dataset, stories, "store")
    store = PrefixStore.open(out)
    tok = AutoTokenizer.from_pretrained(stories)
    ids = tok(json.loads(text_dataset.read_text().splitlines()[1])["text"]).input_ids
    want = store.read_locations(store.index.find(store.keys(ids)))
    (shard,) = {loc.shard for loc in store.index.find(store.keys(ids))}
    locations = store.index.find(store.keys(ids))
    path = out / SHARDS_DIR / shard
    with open(path, "rb") as f:
        header = read_safetensors_header(f, path)
    data = bytearray(path.read_bytes())
    block_bytes = store.manifest.kv.bytes_per_token * store.block_size
    keep = bytearray(data)
    garbage = torch.randint(0, 256, (len(data) - header.data_start,), generator=torch.Generator().manual_seed(0))
    data[header.data_start :] = bytes(garbage.to(torch.uint8).tolist())
    kv0 = header.offset("kv")
    for loc in locations:  # the prompt's blocks keep their bytes
        a = kv0 + loc.slot * block_bytes
        data[a : a + block_bytes] = keep[a : a + block_bytes]
    path.write_bytes(bytes(data))
    store = PrefixStore.open(out)
    before = _bytes_read()
    got = store.load(ids)
    # What it read: the shard's header and the prompt's blocks (plus a page of slack), not the shard;
    # and the index segment's columns (a small segment is read, not memory-mapped).
    index_bytes = sum(p.stat().st_size for p in (out / INDEX_DIR).iterdir())
    assert _bytes_read() - before <= header.data_start + len(locations) * block_bytes + index_bytes + 4096 < len(data) // 10
    assert got.get_seq_length() == len(locations) * store.block_size
    assert torch.equal(torch.stack([layer.keys[0] for layer in got.layers]).permute(2, 0, 1, 3), want[:, :, 0])


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux: /proc/self/io ``rchar``)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])
