"""`prefixgen export --to lmcache` read back by LMCache 0.5.6's own code, byte for byte.

For every stored record, each TP rank's ``LMCacheEngine`` (see conftest) computes the record's chunk
keys (``ChunkedTokenDatabase``, vLLM's ``sha256_cbor`` and ``init_none_hash``), looks the record up
(``lookup``: the tokens LMCache reports as hits), names the files (``FSConnector``), and reads each
chunk through its storage manager and fs remote backend (``RemoteMetadata`` header, naive serde): the
KV it returns must be the bytes ``PrefixStore.load`` gives for that chunk and rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.protocol import RemoteMetadata

from prefixgen.export.lmcache import LMCACHE_VERSION, VLLM_VERSION
from prefixgen.store.reader import PrefixStore

from .conftest import MODEL_NAME, build_store, chunk_keys, cli_result, export, fs_connector, lmcache_engine, make_model


def test_checked_against_the_pinned_versions():
    """The hash, names and layout are pinned to what these tests check them against."""
    import lmcache
    import vllm

    assert (lmcache.__version__, vllm.__version__) == (LMCACHE_VERSION, VLLM_VERSION)


def stored_kv(store: PrefixStore, ids: list[int]) -> torch.Tensor:
    """``PrefixStore.load`` of ``ids`` as ``[2, layers, tokens, kv_heads, head_dim]``."""
    cache = store.load(ids)
    k = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, T, D]
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return torch.stack([k, v]).transpose(2, 3)


def vllm_heads(total: int, tp: int, rank: int) -> slice:
    """The KV heads vLLM's QKVParallelLinear gives ``rank``: ``total / tp`` each, or one head shared
    by ``tp / total`` consecutive ranks."""
    per_rank, replicas = max(1, total // tp), max(1, tp // total)
    first = rank // replicas * per_rank
    return slice(first, first + per_rank)


def data_files(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.data")}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(
    ("kind", "chunk", "tp"),
    [
        ("float32", 64, 1),
        ("float32", 64, 2),
        ("float32", 256, 1),  # LMCache's default chunk size
        ("bfloat16", 64, 8),  # more ranks than the 4 KV heads: each head on 2 ranks
        ("float16", 64, 4),
        ("fp8", 64, 1),  # exported dequantized, as PrefixStore.load (and prefixgen's vLLM connector) gives it
    ],
)
def test_lmcache_finds_and_reads_every_exported_chunk(stores, token_ids, tmp_path, kind, chunk, tp):
    store = PrefixStore.open(stores[kind])
    out = export(stores[kind], tmp_path / "lmcache", "--chunk-size", chunk, "--tp-size", tp)
    found = set()
    for rank in range(tp):
        with lmcache_engine(out, store=store, chunk_size=chunk, seed=0, tp_size=tp, rank=rank) as engine:
            fs = fs_connector(engine)
            heads = vllm_heads(store.manifest.kv.num_kv_heads, tp, rank)
            for ids in token_ids:
                stored = store.match(ids)
                assert stored == len(ids) // store.block_size * store.block_size  # the build stored the record
                hit = stored // chunk * chunk  # every full chunk of a stored prefix is exported
                assert engine.lookup(tokens=ids) == hit
                kv = stored_kv(store, ids[:hit])
                for start, end, key in chunk_keys(engine, ids):
                    path = out / fs._get_file_name(key)
                    if end > hit:  # a chunk that is not whole in the store
                        assert not path.exists()
                        continue
                    found.add(path.name)
                    want = kv[:, :, start:end, heads].flatten(3)  # KV_2LTD: [2, L, chunk, heads * D]
                    header = RemoteMetadata.deserialize(path.read_bytes()[: fs.remote_metadata_bytes])
                    assert header == RemoteMetadata(
                        want.numel() * want.element_size(), [want.shape], [want.dtype], MemoryFormat.KV_2LTD
                    )
                    obj = engine.storage_manager.get(key)
                    assert obj is not None and obj.tensor.shape == want.shape and obj.tensor.dtype == want.dtype
                    assert torch.equal(as_bytes(obj.tensor), as_bytes(want))
                    obj.ref_count_down()
    assert any(len(ids) >= chunk for ids in token_ids)
    assert data_files(out) == found  # nothing else, nothing missing


def test_lmcache_misses_under_another_seed_or_hash(stores, token_ids, tmp_path):
    """The first chunk hash depends on the server's PYTHONHASHSEED and hash algorithm: an export for
    other ones is never found (a miss, never wrong KV)."""
    store = PrefixStore.open(stores["float32"])
    out = export(stores["float32"], tmp_path / "lmcache", "--chunk-size", 64, "--hash", "sha256", seed=123)
    ids = token_ids[0]
    whole = store.match(ids) // 64 * 64
    assert whole > 0
    for seed, algorithm, hit in [(123, "sha256", whole), (124, "sha256", 0), (None, "sha256", 0), (123, "sha256_cbor", 0)]:
        with lmcache_engine(out, store=store, chunk_size=64, seed=seed, algorithm=algorithm) as engine:
            assert engine.lookup(tokens=ids) == hit, (seed, algorithm)


def test_hash_seed_unset_matches_a_server_without_pythonhashseed(stores, token_ids, tmp_path):
    """``--hash-seed unset``: the export for a server started without PYTHONHASHSEED (vLLM then seeds its first hash
    with a fixed string) is found by exactly that server."""
    store = PrefixStore.open(stores["float32"])
    out = export(stores["float32"], tmp_path / "lmcache", "--chunk-size", 64, seed="unset")
    ids = token_ids[0]
    whole = store.match(ids) // 64 * 64
    for seed, hit in [(None, whole), (0, 0)]:
        with lmcache_engine(out, store=store, chunk_size=64, seed=seed) as engine:
            assert engine.lookup(tokens=ids) == hit, seed


def test_names_differ_exactly_where_the_kv_may_differ(stores, token_ids, tmp_path):
    """A store of another dtype or model, or an export for another chunk size or TP size, cannot take
    the names of the right one; a store of another block size takes the same names with the same KV."""
    reference = data_files(export(stores["float32"], tmp_path / "f32", "--chunk-size", 64))
    assert reference
    assert not reference & data_files(export(stores["bfloat16"], tmp_path / "bf16", "--chunk-size", 64))
    assert not reference & data_files(export(stores["float32"], tmp_path / "c128", "--chunk-size", 128))
    assert not reference & data_files(export(stores["float32"], tmp_path / "tp2", "--chunk-size", 64, "--tp-size", 2))
    other_model = make_model(
        tmp_path / "other-model", "llama", seed=1, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512
    )
    other = build_store(tmp_path / "other", model=other_model)
    assert not reference & data_files(export(other, tmp_path / "other-export", "--chunk-size", 64, model_name="org/other"))
    # A bfloat16 server does not read the float32 files, and a server of another model does not read ours.
    store = PrefixStore.open(stores["float32"])
    for model_name, dtype in [(MODEL_NAME, torch.bfloat16), ("org/other", torch.float32)]:
        with lmcache_engine(tmp_path / "f32", store=store, chunk_size=64, seed=0, model_name=model_name, dtype=dtype) as engine:
            assert engine.lookup(tokens=token_ids[0]) == 0
    # Block size 32: the same chunks, so the same names, holding the same KV (prefilled in other batches).
    block32 = export(stores["block32"], tmp_path / "b32", "--chunk-size", 64)
    assert data_files(block32) == reference
    for name in reference:
        a, b = (
            torch.frombuffer(bytearray((d / name).read_bytes()[28:]), dtype=torch.float32) for d in (tmp_path / "f32", block32)
        )
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chunk-size", "40"], "block size (16)"),
        (["--tp-size", "3"], "do not split over tensor parallel size 3"),
        (["--hash", "xxhash"], "hash 'xxhash' is not supported"),
        (["--hash-seed", "4294967296"], "is not a PYTHONHASHSEED"),
        (["--model-name", "m" * 250], "over the 255 a file system allows"),
    ],
)
def test_export_refuses_what_lmcache_cannot_read(stores, tmp_path, args, message):
    out = tmp_path / "lmcache"
    base = {"--model-name": MODEL_NAME, "--hash-seed": "0", "--chunk-size": "64"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = cli_result(
        "export", stores["float32"], "--to", "lmcache", "--out", out, "--quiet", *[x for kv in base.items() for x in kv]
    )
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not data_files(out)
