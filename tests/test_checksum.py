"""Block checksums: CRC32C (format version 3) from the crc32c package and from the numpy fallback,
and stores of versions 1 and 2 (zlib CRC-32), written by the code before version 3, still read and
verified."""

from __future__ import annotations

import shutil
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixgen import CorruptStoreError, PrefixStore
from prefixgen.checksum import CRC32, CRC32C, crc32c, crc32c_rows
from prefixgen.errors import CorruptBlockError
from prefixgen.format import FORMAT_VERSION, INDEX_DIR, SHARDS_DIR, Segment, block_crcs, block_keys, read_safetensors_header
from prefixgen.maintain.compact import compact_store
from prefixgen.maintain.prune import prune_store
from prefixgen.maintain.verify import verify_store
from prefixgen.store.writer import StoreWriter, prepare_store
from tests.data.make_crc32_stores import BS, SEQUENCES, block_kv

REPO = Path(__file__).resolve().parent.parent
OLD_STORES = REPO / "tests" / "data" / "crc32-stores"

# RFC 3720, appendix B.4 (iSCSI CRC32C examples), and the usual check value.
RFC3720 = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
]


@pytest.fixture(params=["package", "numpy"])
def impl(request, monkeypatch):
    """Run a test with the crc32c package and again with the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr("prefixgen.checksum.HARDWARE", False)
    else:
        pytest.importorskip("crc32c")
    return request.param


def test_crc32c_matches_rfc3720(impl):
    for data, want in RFC3720:
        assert crc32c(data) == want
        assert crc32c(data[5:], crc32c(data[:5])) == want  # continued like zlib.crc32
    assert crc32c(b"") == 0 and crc32c(b"", 0x1234) == 0x1234


def test_numpy_fallback_equals_the_package_on_real_data():
    """Row lengths around the fallback's lane sizes, with start values, over a real model file."""
    hw = pytest.importorskip("crc32c")
    data = np.frombuffer((REPO / "models" / "stories260K" / "model.safetensors").read_bytes(), np.uint8)
    rng = np.random.default_rng(0)
    for length in [1, 3, 4, 5, 255, 256, 257, 1024, 20480, 20481, 300_000]:
        n = min(6, len(data) // length)
        rows = data[: n * length].reshape(n, length)
        start = rng.integers(0, 2**32, n, dtype=np.uint32)
        want = [hw.crc32c(r.tobytes(), int(s)) for r, s in zip(rows, start)]
        assert crc32c_rows(rows, start).tolist() == want


def test_block_crcs_both_ways_and_both_algorithms(monkeypatch):
    """block_crcs: per block, continued over the block's fp8 scales; the fallback gives the same."""
    kv = np.frombuffer((REPO / "models" / "stories260K" / "model.safetensors").read_bytes()[: 7 * 640], np.uint8)
    scales = np.arange(7 * 24, dtype=np.uint8)
    hw = block_crcs(kv, 640, scales, 24)
    want = [crc32c(scales[i * 24 : (i + 1) * 24], crc32c(kv[i * 640 : (i + 1) * 640])) for i in range(7)]
    assert hw.tolist() == want
    zl = block_crcs(kv, 640, scales, 24, algorithm=CRC32)
    assert zl.tolist() == [zlib.crc32(scales[i * 24 : (i + 1) * 24], zlib.crc32(kv[i * 640 : (i + 1) * 640])) for i in range(7)]
    monkeypatch.setattr("prefixgen.checksum.HARDWARE", False)
    assert block_crcs(kv, 640, scales, 24).tolist() == want
    assert block_crcs(kv, 640).tolist() == [crc32c(kv[i * 640 : (i + 1) * 640]) for i in range(7)]


def _old_store(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(OLD_STORES / name, tmp_path / name))


def _check_reads(path: Path) -> PrefixStore:
    store = PrefixStore.open(path)
    for s in SEQUENCES:
        assert store.match(s + [7]) == len(s)
        got = store.read_blocks(store.keys(s))
        want = torch.cat([block_kv(k, store.manifest.kv) for k in store.keys(s)])
        if store.manifest.kv.storage == "fp8":
            assert (got - want).abs().max() <= 0.07 * want.abs().max()  # e4m3: 3 mantissa bits
        else:
            assert torch.equal(got, want)
    return store


def _flip_kv_byte(path: Path, tokens: list[int]) -> None:
    store = PrefixStore.open(path)
    loc = store.find_prefix(store.keys(tokens)).locations[-1]
    shard = path / SHARDS_DIR / loc.shard
    with open(shard, "rb") as f:
        header = read_safetensors_header(f, shard)
    data = bytearray(shard.read_bytes())
    data[header.offset("kv") + loc.slot * store.manifest.kv.bytes_per_token * BS + 3] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("name, version", [("native", 2), ("fp8", 1)])
def test_crc32_stores_of_versions_1_and_2_read_and_verify(tmp_path, impl, name, version):
    """Stores written before version 3 (tests/data/make_crc32_stores.py) keep their zlib CRC-32s:
    read, verified, and a damaged block is still caught by the reader and by verify."""
    path = _old_store(tmp_path, name)
    store = _check_reads(path)
    assert (store.manifest.format_version, store.manifest.block_checksum) == (version, CRC32)
    assert verify_store(path).ok
    _flip_kv_byte(path, SEQUENCES[2])
    with pytest.raises(CorruptBlockError) as info:
        PrefixStore.open(path).read_blocks(store.keys(SEQUENCES[2]))
    assert info.value.block == len(SEQUENCES[2]) // BS - 1
    report = verify_store(path)
    assert any("1 blocks fail their CRC" in f for f in report.faults), report.faults


def test_crc32_store_stays_crc32_through_append_compact_and_prune(tmp_path):
    """New code appending to, compacting and pruning an old store keeps its block checksum: every
    block of a store has the one algorithm its manifest names."""
    path = _old_store(tmp_path, "native")
    extra = list(range(500, 512))
    m = prepare_store(path, PrefixStore.open(path).manifest, "append")
    assert m.block_checksum == CRC32
    with StoreWriter(path, m, "b2", fsync=False) as w:
        keys = block_keys(extra, BS, m.root_key)
        kv = torch.cat([block_kv(k, m.kv) for k in keys])
        w.add(keys, [m.root_key] + keys[:-1], [0, 1, 2], np.asarray(extra, np.uint32).reshape(-1, BS), kv)
        counts = {k: 1 for s in [*SEQUENCES, extra] for k in block_keys(s, BS, m.root_key)}
        w.write_counts(np.frombuffer(b"".join(counts), np.uint8).reshape(-1, 32), np.ones(len(counts), np.uint64))
    assert compact_store(path, fsync=False).segments_merged == 3
    assert (PrefixStore.open(path).manifest.format_version, PrefixStore.open(path).manifest.block_checksum) == (2, CRC32)
    _check_reads(path)
    assert verify_store(path).ok
    fp8 = _old_store(tmp_path, "fp8")
    assert compact_store(fp8, fsync=False).segments_merged == 3
    assert (PrefixStore.open(fp8).manifest.format_version, PrefixStore.open(fp8).manifest.block_checksum) == (2, CRC32)
    assert verify_store(fp8).ok
    report = prune_store(path, min_records=1, shard_bytes=3 * m.kv.block_bytes(BS), fsync=False)
    assert report.shards_written > 1 and report.blocks_kept == len(counts)
    store = _check_reads(path)
    assert store.manifest.block_checksum == CRC32 and verify_store(path).ok
    assert torch.equal(store.read_blocks(block_keys(extra, BS, m.root_key)), kv)


def test_new_store_is_crc32c_and_the_fallback_reads_it(tmp_path, monkeypatch):
    """A new store is version 3 with CRC32C; without the crc32c package it still reads, verifies
    and catches a damaged block."""
    old = PrefixStore.open(OLD_STORES / "native").manifest
    path = tmp_path / "s"
    m = prepare_store(path, replace(old, format_version=FORMAT_VERSION, block_checksum=CRC32C), "new")
    assert PrefixStore.open(path).manifest.block_checksum == CRC32C
    with StoreWriter(path, m, "b", shard_bytes=3 * m.kv.block_bytes(BS), fsync=False) as w:
        for s in SEQUENCES:
            keys = block_keys(s, BS, m.root_key)
            kv = torch.cat([block_kv(k, m.kv) for k in keys])
            w.add(keys, [m.root_key] + keys[:-1], list(range(len(keys))), np.asarray(s, np.uint32).reshape(-1, BS), kv)
    seg = Segment(next((path / INDEX_DIR).iterdir()))
    cols = seg.cols
    shard = path / SHARDS_DIR / seg.shard
    with open(shard, "rb") as f:
        header = read_safetensors_header(f, shard)
    raw = shard.read_bytes()[header.offset("kv") :]
    block = m.kv.bytes_per_token * BS
    assert [crc32c(raw[s * block : (s + 1) * block]) for s in cols["slot"].tolist()] == cols["crc"].tolist()
    monkeypatch.setattr("prefixgen.checksum.HARDWARE", False)
    _check_reads(path)
    assert verify_store(path).ok
    _flip_kv_byte(path, SEQUENCES[1])
    with pytest.raises(CorruptStoreError):
        PrefixStore.open(path).read_blocks(PrefixStore.open(path).keys(SEQUENCES[1]))
    assert not verify_store(path).ok
