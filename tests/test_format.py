"""The store format, byte for byte: hash vectors, safetensors headers, manifests, KV round trips."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from prefixgen import CorruptStoreError, NewerFormatError, PrefixStore, StoreError
from prefixgen.format import (
    INDEX_DIR,
    MANIFEST_FILE,
    BlockHash,
    KVLayout,
    Manifest,
    ModelFingerprint,
    Segment,
    ShardStream,
    TensorSpec,
    atomic_file,
    block_crcs,
    block_keys,
    encode_safetensors_header,
    encode_shard,
    hash_block,
    read_safetensors_header,
    root_key,
)
from prefixgen.maintain.verify import verify_store
from prefixgen.store.writer import StoreWriter, prepare_store

# The vectors in FORMAT.md.
ROOT_00 = "e1a67008bd76859838dff8215b0834be48415ac49091a2fdfbd3d4fefe23c2ab"
KEYS_0_TO_39 = [
    "75f75b8227d7c16d4e4ac6369b4d663689b62a2790434fbcd751cac19f267ae4",
    "f97c2e4e72a5d9add3f9ba57612aa59d7a615ce34831dcef798588ebe1fae5b2",
]


def test_hash_vectors_match_format_md():
    root = root_key("00" * 32)
    assert root.hex() == ROOT_00
    assert root == hashlib.sha256(b"prefixgen-root-v1\x00" + bytes(32)).digest()
    keys = block_keys(list(range(40)), 16, root)
    assert [k.hex() for k in keys] == KEYS_0_TO_39  # 40 tokens: 2 full blocks, the partial one has no key
    # Spelled out: SHA-256(parent || uint32 LE tokens).
    first = hashlib.sha256(root + struct.pack("<16I", *range(16))).digest()
    assert keys[0] == first
    assert keys[1] == hashlib.sha256(first + struct.pack("<16I", *range(16, 32))).digest()


def test_hash_chains_over_the_whole_prefix():
    root = root_key("ab" * 32)
    a = block_keys([1] * 16 + [2] * 16, 16, root)
    b = block_keys([3] * 16 + [2] * 16, 16, root)
    assert a[1] != b[1]  # same second block, different first block: different keys
    assert block_keys([1] * 16, 16, root)[0] == a[0]  # a prefix has the same keys
    assert root_key("cd" * 32) != root  # another model: other keys
    assert hash_block(BlockHash(bytes(32)), [1, 2, 3]).hex().startswith("3db346a4")


def test_safetensors_header_is_read_by_safetensors(tmp_path):
    specs = [TensorSpec("kv", "bfloat16", (4, 2, 2, 1, 3)), TensorSpec("tokens", "uint32", (1, 4))]
    header = encode_safetensors_header(specs, {"writer": "w"})
    assert len(header) % 8 == 0  # tensors 8-byte aligned for memory maps
    kv = torch.randn(4, 2, 2, 1, 3).to(torch.bfloat16)
    tokens = np.arange(4, dtype="<u4").reshape(1, 4)
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + kv.view(torch.uint8).numpy().tobytes() + tokens.tobytes())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"writer": "w"}
        assert torch.equal(f.get_tensor("kv"), kv)
        assert f.get_tensor("tokens").tolist() == [[0, 1, 2, 3]]


def test_safetensors_header_exact_bytes():
    header = encode_safetensors_header([TensorSpec("tokens", "uint32", (1, 2))], {"a": "b"})
    body = b'{"__metadata__":{"a":"b"},"tokens":{"dtype":"U32","shape":[1,2],"data_offsets":[0,8]}}'
    body += b" " * (-len(body) % 8)
    assert header == struct.pack("<Q", len(body)) + body


def _manifest(layout: KVLayout, digest: str = "11" * 32) -> Manifest:
    fp = ModelFingerprint(
        name="m",
        architecture="A",
        model_type="a",
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        weights_digest=digest,
        tokenizer_digest="22" * 32,
    )
    return Manifest(block_size=4, model=fp, kv=layout, root=root_key(digest).hex(), format_version=layout.format_version)


@pytest.mark.parametrize("order", ["heads", "tokens"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_random_kv_round_trip_is_byte_exact(tmp_path, dtype, order):
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=5, dtype=dtype, order=order)
    manifest = prepare_store(tmp_path / "s", _manifest(layout), "new")
    torch_dtype = getattr(torch, dtype)
    seqs = [list(range(100 + 17 * i, 100 + 17 * i + 4 * (i + 2))) for i in range(5)]
    kvs = [torch.randn(len(s), 3, 2, 2, 5).to(torch_dtype) for s in seqs]
    # Small shards: sequences straddle shard boundaries.
    with StoreWriter(tmp_path / "s", manifest, "b", shard_bytes=3 * 4 * layout.bytes_per_token, write_threads=2) as w:
        for s, kv in zip(seqs, kvs):
            keys = block_keys(s, 4, manifest.root_key)
            tokens = np.asarray(s, dtype=np.uint32).reshape(-1, 4)
            w.add(keys, [manifest.root_key] + keys[:-1], list(range(len(keys))), tokens, kv)
    store = PrefixStore.open(tmp_path / "s")
    assert len(store.index.segments) > 2
    for s, kv in zip(seqs, kvs):
        assert store.match(s + [1, 2, 3]) == len(s)
        got = store.read_blocks(store.keys(s))
        assert got.dtype == torch_dtype
        assert got.view(torch.uint8).numpy().tobytes() == kv.view(torch.uint8).numpy().tobytes()
        cache = store.load(s)
        assert cache.layers[1].keys.shape == (1, 2, len(s), 5)
        assert torch.equal(cache.layers[1].keys[0], kv[:, 1, 0].permute(1, 0, 2))
        assert torch.equal(cache.layers[2].values[0], kv[:, 2, 1].permute(1, 0, 2))
    assert store.match([999] * 8) == 0


@pytest.mark.parametrize("order", ["heads", "tokens"])
def test_fp8_round_trip_error_is_small(tmp_path, order):
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", storage="fp8", order=order)
    manifest = prepare_store(tmp_path / "s", _manifest(layout), "new")
    seq = list(range(16))
    kv = torch.randn(16, 2, 2, 2, 8)
    with StoreWriter(tmp_path / "s", manifest, "b") as w:
        keys = block_keys(seq, 4, manifest.root_key)
        w.add(keys, [manifest.root_key] + keys[:-1], [0, 1, 2, 3], np.asarray(seq, np.uint32).reshape(4, 4), kv)
    store = PrefixStore.open(tmp_path / "s")
    got = store.read_blocks(store.keys(seq))
    assert got.dtype == torch.float32
    rel = (got - kv).abs().max() / kv.abs().max()
    assert 0 < rel < 0.07  # e4m3 has a 3-bit mantissa
    shard = next((tmp_path / "s" / "shards").iterdir())
    assert shard.stat().st_size < 16 * layout.values_per_token + 2000  # one byte a value, plus scales
    assert verify_store(tmp_path / "s").ok
    data = bytearray(shard.read_bytes())
    with open(shard, "rb") as f:
        scale_at = read_safetensors_header(f, shard).offset("kv_scale")
    data[scale_at + 5] ^= 0x10  # a byte of the scales
    shard.write_bytes(bytes(data))
    assert not verify_store(tmp_path / "s").ok
    with pytest.raises(CorruptStoreError):
        PrefixStore.open(tmp_path / "s").read_blocks(store.keys(seq))


def test_missing_truncated_garbage_and_newer_manifests(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        PrefixStore.open(tmp_path / "nothing")
    layout = KVLayout(1, 1, 2, "float32")
    prepare_store(tmp_path / "s", _manifest(layout), "new")
    mpath = tmp_path / "s" / MANIFEST_FILE
    good = mpath.read_text()
    mpath.write_text(good[: len(good) // 2])
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        PrefixStore.open(tmp_path / "s")
    mpath.write_bytes(b"\x00\xff garbage")
    with pytest.raises(CorruptStoreError):
        PrefixStore.open(tmp_path / "s")
    mpath.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CorruptStoreError, match="not a prefixgen manifest"):
        PrefixStore.open(tmp_path / "s")
    data = json.loads(good)
    data["format_version"] = 99
    mpath.write_text(json.dumps(data))
    with pytest.raises(NewerFormatError, match="upgrade prefixgen"):
        PrefixStore.open(tmp_path / "s")
    del data["kv"]
    data["format_version"] = 1
    mpath.write_text(json.dumps(data))
    with pytest.raises(CorruptStoreError, match="missing or has a bad field"):
        PrefixStore.open(tmp_path / "s")


def test_manifest_round_trip():
    m = _manifest(KVLayout(2, 2, 4, "bfloat16", "fp8"))
    assert Manifest.from_json(m.to_json()) == m


def test_block_checksum_vector_and_manifest_version_3(tmp_path):
    """FORMAT.md's block checksum vector: one block (B = 4) of float32 KV 0.0, 1.0, ..., 15.0 has
    CRC32C 0x2b0cc36f in a version-3 store (zlib CRC-32, versions 1 and 2: 0x21c0b223)."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32")
    manifest = prepare_store(tmp_path / "s", _manifest(layout), "new")
    text = (tmp_path / "s" / MANIFEST_FILE).read_text()
    assert '"block_checksum": "crc32c"' in text and '"format_version": 3' in text
    kv = torch.arange(16, dtype=torch.float32).reshape(4, 1, 2, 1, 2)
    assert kv.numpy().tobytes() == struct.pack("<16f", *range(16))
    keys = block_keys([1, 2, 3, 4], 4, manifest.root_key)
    with StoreWriter(tmp_path / "s", manifest, "b") as w:
        w.add(keys, [manifest.root_key], [0], np.asarray([[1, 2, 3, 4]], np.uint32), kv)
    seg = Segment(next((tmp_path / "s" / INDEX_DIR).iterdir()))
    assert seg.cols["crc"].tolist() == [0x2B0CC36F]
    assert block_crcs(kv.numpy(), 64, algorithm="crc32").tolist() == [0x21C0B223]
    assert verify_store(tmp_path / "s").ok
    data = json.loads(text)
    del data["block_checksum"]  # version 3 must name its checksum
    (tmp_path / "s" / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CorruptStoreError, match="missing or has a bad field"):
        PrefixStore.open(tmp_path / "s")
    data["format_version"] = 2  # versions 1 and 2 have none: zlib CRC-32
    assert Manifest.from_json(json.dumps(data)).block_checksum == "crc32"
    data["block_checksum"] = "md5"
    with pytest.raises(CorruptStoreError, match="unknown block checksum 'md5'"):
        Manifest.from_json(json.dumps(data))


def test_head_major_block_vector_and_manifest_version_5(tmp_path):
    """FORMAT.md's head-major vector: one block (B = 4, 1 layer, 2 KV heads, head_dim 2) of float32 KV whose
    token-major values ([B, L, 2, H, D]) are 0.0, 1.0, ..., 31.0 is stored head by head ([H, B, L, 2, D]: head 0 is
    0, 1, 4, 5, 8, 9, ...), with head_crc [0x90FEA9B0, 0x3A038EA6] (CRC32C of each head's 64 bytes) and crc
    0x2CAE5CFC (CRC32C of those two uint32, little-endian)."""
    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=2, dtype="float32", order="heads")
    manifest = prepare_store(tmp_path / "s", _manifest(layout), "new")
    data = json.loads((tmp_path / "s" / MANIFEST_FILE).read_text())
    assert data["format_version"] == 5
    assert data["kv"]["layout"] == "blocks,kv_heads,block_tokens,layers,kv,head_dim"
    assert data["kv"]["scale_layout"] == "blocks,kv_heads,layers,kv"
    kv = torch.arange(32, dtype=torch.float32).reshape(4, 1, 2, 2, 2)
    keys = block_keys([1, 2, 3, 4], 4, manifest.root_key)
    with StoreWriter(tmp_path / "s", manifest, "b") as w:
        w.add(keys, [manifest.root_key], [0], np.asarray([[1, 2, 3, 4]], np.uint32), kv)
    shard = next((tmp_path / "s" / "shards").iterdir())
    with open(shard, "rb") as f:
        header = read_safetensors_header(f, shard)
    assert list(header.tensors) == ["kv", "head_crc", "tokens"]
    assert header.tensors["kv"]["shape"] == [1, 2, 4, 1, 2, 2] and header.tensors["head_crc"]["shape"] == [1, 2]
    raw = shard.read_bytes()
    a, b = header.tensors["kv"]["data_offsets"]
    head0 = [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]
    assert raw[header.data_start + a : header.data_start + b] == struct.pack("<32f", *head0, *(v + 2 for v in head0))
    a, b = header.tensors["head_crc"]["data_offsets"]
    assert raw[header.data_start + a : header.data_start + b] == struct.pack("<2I", 0x90FEA9B0, 0x3A038EA6)
    seg = Segment(next((tmp_path / "s" / INDEX_DIR).iterdir()))
    assert seg.cols["crc"].tolist() == [0x2CAE5CFC]
    assert verify_store(tmp_path / "s").ok
    store = PrefixStore.open(tmp_path / "s")
    assert torch.equal(store.read_blocks(keys), kv)
    assert torch.equal(store.read_locations(store.index.find(keys), heads=range(1, 2)), kv[:, :, :, 1:2])
    # The layout and the version go together: a reader must not take head-major bytes for token-major ones.
    for version, name in ((4, data["kv"]["layout"]), (5, "tokens,layers,kv,kv_heads,head_dim")):
        bad = {**data, "format_version": version, "kv": {**data["kv"], "layout": name}}
        with pytest.raises(CorruptStoreError, match="kv layout"):
            Manifest.from_json(json.dumps(bad))
    with pytest.raises(NewerFormatError):
        Manifest.from_json(json.dumps({**data, "format_version": 6}))


def test_append_keeps_a_token_major_store_token_major(tmp_path):
    """A build appending to a version-3 store (token-major) writes token-major blocks: the store's order wins."""
    old = _manifest(KVLayout(1, 2, 2, "float32"))
    prepare_store(tmp_path / "s", old, "new")
    again = prepare_store(tmp_path / "s", _manifest(KVLayout(1, 2, 2, "float32", order="heads")), "append")
    assert again.format_version == 3 and not again.kv.heads_first


@pytest.mark.parametrize(
    "layout",
    [
        KVLayout(2, 3, 4, "bfloat16"),
        KVLayout(2, 3, 4, "float32", order="heads"),
        KVLayout(2, 3, 8, "float32", storage="fp8"),
        KVLayout(2, 3, 8, "float32", storage="fp8", order="heads"),
    ],
    ids=["tokens", "heads", "fp8-tokens", "fp8-heads"],
)
def test_a_shard_written_in_pieces_is_the_shard_encode_shard_makes(tmp_path, layout):
    """prune streams its new shards (ShardStream): pieces of 1, 2 and 4 blocks land where encode_shard puts
    them, with the same block checksums, head_crc rows and shard checksum."""
    bs, blocks = 4, 7
    rng = np.random.default_rng(1)
    kv = rng.integers(0, 256, blocks * layout.bytes_per_token * bs, dtype=np.uint8).tobytes()
    scale_bytes = layout.scale_bytes_per_block()
    scales = rng.integers(0, 256, blocks * scale_bytes, dtype=np.uint8).tobytes() if scale_bytes else None
    tokens = rng.integers(0, 32000, (blocks, bs), dtype=np.uint32)
    meta = {"writer": "w", "build": "prune"}
    parts, crcs, checksum = encode_shard(layout, bs, kv, scales, tokens, meta)
    block_bytes = layout.bytes_per_token * bs
    with atomic_file(tmp_path / "s.safetensors", owner="w") as f:
        shard = ShardStream(f.fileno(), layout, bs, blocks, meta)
        for a, b in ((0, 1), (1, 3), (3, 7)):
            piece_scales = scales[a * scale_bytes : b * scale_bytes] if scales else None
            shard.write(kv[a * block_bytes : b * block_bytes], piece_scales, tokens[a:b].tobytes())
        streamed_crcs, streamed_checksum = shard.finish()
    assert (tmp_path / "s.safetensors").read_bytes() == b"".join(bytes(p) for p in parts)
    assert streamed_crcs.tolist() == crcs.tolist() and streamed_checksum == checksum
    assert shard.size == (tmp_path / "s.safetensors").stat().st_size


def test_a_shard_stream_refuses_too_many_or_too_few_blocks_and_leaves_no_file(tmp_path):
    layout, bs = KVLayout(1, 1, 2, "float32"), 2
    block = bytes(layout.bytes_per_token * bs)
    with pytest.raises(ValueError, match="only 1 written"):
        with atomic_file(tmp_path / "s.safetensors", owner="w") as f:
            shard = ShardStream(f.fileno(), layout, bs, 2, {})
            shard.write(block, None, bytes(bs * 4))
            with pytest.raises(ValueError, match="do not fit"):
                shard.write(block * 2, None, bytes(2 * bs * 4))
            shard.finish()
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file
