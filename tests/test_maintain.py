"""The index at scale and store maintenance: many tiny segments, compaction, prune, index checksums,
kill -9 in the middle of each, and writers racing a compaction."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from prefixgen import CorruptStoreError, PrefixStore
from prefixgen.analysis.count import select_blocks
from prefixgen.format import (
    FORMAT_VERSION,
    INDEX_DIR,
    KEY64_CHUNK_ROWS,
    SEGMENT_COLUMNS,
    SHARDS_DIR,
    KVLayout,
    Manifest,
    ModelFingerprint,
    Segment,
    atomic_write,
    block_keys,
    encode_safetensors_header,
    encode_segment,
    read_safetensors_header,
    root_key,
    segment_tensors,
)
from prefixgen.maintain.compact import compact_store
from prefixgen.maintain.prune import block_cost, prune_store
from prefixgen.maintain.verify import verify_store
from prefixgen.store.index import StoreIndex
from prefixgen.store.writer import StoreWriter, prepare_store

REPO = Path(__file__).resolve().parent.parent
BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32")
BLOCK_BYTES = LAYOUT.bytes_per_token * BS  # 256: shard_bytes=BLOCK_BYTES gives one block per shard


def _manifest() -> Manifest:
    fp = ModelFingerprint("m", "A", "a", LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_dim, "22" * 32, "33" * 32)
    return Manifest(BS, fp, LAYOUT, root_key(fp.weights_digest).hex())


def _block_kv(key: bytes) -> torch.Tensor:
    """The KV of a block, a function of its key (so every writer of a block writes the same bytes)."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return torch.from_numpy(rng.standard_normal((BS, LAYOUT.num_layers, 2, 1, LAYOUT.head_dim)).astype(np.float32))


def _sequences(n: int = 48, seed: int = 0) -> list[list[int]]:
    """Sequences sharing prefixes of different lengths (a tree), 2..24 blocks each."""
    rng = np.random.default_rng(seed)
    trunk = rng.integers(0, 1000, 24 * BS).tolist()
    seqs = []
    for i in range(n):
        shared = (i % 6) * 2 * BS
        seqs.append(trunk[:shared] + rng.integers(0, 1000, (2 + i % 7) * BS).tolist())
    return seqs


def _write(path: Path, manifest: Manifest, seqs: list[list[int]], shard_bytes: int = BLOCK_BYTES) -> None:
    with StoreWriter(path, manifest, "b", shard_bytes=shard_bytes, fsync=False) as w:
        done: set[bytes] = set()
        for s in seqs:
            keys = block_keys(s, BS, manifest.root_key)
            first = next((i for i, k in enumerate(keys) if k not in done), len(keys))
            if first == len(keys):
                continue
            new = keys[first:]
            parents = [keys[first - 1] if first else manifest.root_key] + new[:-1]
            tokens = np.asarray(s[first * BS : len(keys) * BS], np.uint32).reshape(-1, BS)
            w.add(new, parents, list(range(first, len(keys))), tokens, torch.cat([_block_kv(k) for k in new]))
            done.update(new)


def _tiny_store(path: Path, seqs: list[list[int]]) -> Manifest:
    manifest = prepare_store(path, _manifest(), "new")
    _write(path, manifest, seqs)
    return manifest


def _answers(path: Path, seqs: list[list[int]]) -> list:
    """What a reader says about every stored prefix: match of each prefix, KV bytes of each sequence."""
    store = PrefixStore.open(path)
    out = []
    for s in seqs:
        out.append([store.match(s[: k * BS] + [7]) for k in range(len(s) // BS + 1)])
        out.append(store.read_blocks(store.keys(s)).numpy().tobytes())
    return out


def _expected(seqs: list[list[int]], manifest: Manifest) -> list:
    out = []
    for s in seqs:
        out.append([k * BS for k in range(len(s) // BS + 1)])
        out.append(torch.cat([_block_kv(k) for k in block_keys(s, BS, manifest.root_key)]).numpy().tobytes())
    return out


# Small segments are read (the default); or every segment is memory-mapped.
@pytest.mark.parametrize("map_bytes, records, segments", [(1 << 20, 420, 2000), (0, 48, 200)])
def test_thousands_of_tiny_segments_then_compaction_answer_the_same(tmp_path, monkeypatch, map_bytes, records, segments):
    monkeypatch.setattr("prefixgen.format.segments.MAP_BYTES", map_bytes)
    seqs = _sequences(records)
    manifest = _tiny_store(tmp_path / "s", seqs)
    store = PrefixStore.open(tmp_path / "s")
    assert len(store.index.segments) > segments  # one block per shard and segment
    expected = _expected(seqs, manifest)
    assert _answers(tmp_path / "s", seqs) == expected
    cache = store.load(seqs[5])
    assert torch.equal(
        cache.layers[1].values[0], torch.cat([_block_kv(k) for k in store.keys(seqs[5])])[:, 1, 1].permute(1, 0, 2)
    )
    # A second writer stores some blocks again: compaction keeps one row per block.
    _write(tmp_path / "s", manifest, seqs[:10], shard_bytes=10 * BLOCK_BYTES)
    entries = PrefixStore.open(tmp_path / "s").index.entries
    segments = len(os.listdir(tmp_path / "s" / INDEX_DIR))
    report = compact_store(tmp_path / "s")
    assert report.segments_merged == segments and report.rows_out < report.rows_in == entries
    after = PrefixStore.open(tmp_path / "s")
    assert len(after.index.segments) == 1 and after.index.segments[0].compacted
    assert after.manifest.format_version == FORMAT_VERSION  # a new store is already past 2
    assert _answers(tmp_path / "s", seqs) == expected
    assert verify_store(tmp_path / "s").ok
    assert verify_store(tmp_path / "s", quick=True).ok


def _sorted_all_at_once(folder: Path, names: list[str]) -> bytes:
    """The compacted segment as compaction wrote it before it streamed: every row of every segment in
    memory, one stable sort by key64, a row dropped when it repeats the row before it."""
    parts, refs, numbers = [], [], {}
    for name in names:
        seg = Segment(folder / name)
        cols = {k: np.array(v) for k, v in seg.cols.items()}
        ids = []
        for ref in seg.shards:
            if ref.name not in numbers:
                numbers[ref.name] = len(refs)
                refs.append(ref)
            ids.append(numbers[ref.name])
        cols["shard"] = np.asarray(ids, dtype=np.uint32)[seg.shard_ids(cols)]
        parts.append(cols)
    cols = {name: np.concatenate([p[name] for p in parts]) for name in SEGMENT_COLUMNS}
    order = np.argsort(cols["key64"], kind="stable")
    k64, key = cols["key64"][order], cols["key"][order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (k64[1:] == k64[:-1]) & (key[1:] == key[:-1]).all(axis=1)
    keep = order[~same]
    version = json.loads((folder.parent / "manifest.json").read_text())["format_version"]
    meta = {"format_version": str(version), "blocks": str(len(keep)), "compacted_from": str(len(names))}
    return b"".join(encode_segment({n: c[keep] for n, c in cols.items() if n != "key64"}, meta, refs))


# Tiny runs, fan-in and read chunks force spilled runs, merges of merges and refills mid-tie; the
# defaults hold everything in one in-memory run. Large segments are read in place (map_bytes 0).
@pytest.mark.parametrize(
    "run_rows, fan_in, chunk, map_bytes", [(5, 3, 2, 1 << 20), (5, 2, 1, 0), (64, 4, 3, 0), (1 << 20, 64, 1024, 1 << 20)]
)
def test_streaming_compaction_writes_what_sorting_all_rows_wrote(tmp_path, monkeypatch, run_rows, fan_in, chunk, map_bytes):
    monkeypatch.setattr("prefixgen.maintain.merge.RUN_ROWS", run_rows)
    monkeypatch.setattr("prefixgen.maintain.merge.FAN_IN", fan_in)
    monkeypatch.setattr("prefixgen.maintain.merge.MIN_CHUNK_ROWS", chunk)
    monkeypatch.setattr("prefixgen.maintain.merge.MERGE_BYTES", 0)
    monkeypatch.setattr("prefixgen.format.segments.MAP_BYTES", map_bytes)
    seqs = _sequences(40)
    manifest = _tiny_store(tmp_path / "s", seqs)  # one block per segment
    # A second writer stores blocks again, in larger shards; its segments are compacted first, so the
    # merge meets a compacted segment (with its own shard list) among one-shard ones.
    _write(tmp_path / "s", manifest, seqs[:12], shard_bytes=7 * BLOCK_BYTES)
    second = sorted(os.listdir(tmp_path / "s" / INDEX_DIR))[-1].rsplit("-", 1)[0]
    assert compact_store(tmp_path / "s", select=lambda n: n.startswith(second)).segments_merged > 1
    # Two keys with the same key64 (and one of them twice): ties are kept in input order.
    a = hashlib.sha256(b"a").digest()
    b = a[:8] + hashlib.sha256(b"b").digest()[8:]
    for keys in ([a, b], [b, a]):
        with StoreWriter(tmp_path / "s", manifest, "b", shard_bytes=2 * BLOCK_BYTES, fsync=False) as w:
            w.add(keys, [manifest.root_key] * 2, [0, 0], np.zeros((2, BS), np.uint32), torch.cat([_block_kv(k) for k in keys]))
    folder = tmp_path / "s" / INDEX_DIR
    names = sorted(os.listdir(folder))
    expected = _sorted_all_at_once(folder, names)
    report = compact_store(tmp_path / "s")
    assert report.segments_merged == len(names) and report.rows_out < report.rows_in
    assert (folder / report.segment).read_bytes() == expected
    assert Segment(folder / report.segment).verify_checksums() == []
    assert _answers(tmp_path / "s", seqs) == _expected(seqs, manifest)


def test_a_reader_opened_before_compaction_still_answers(tmp_path):
    seqs = _sequences(12)
    manifest = _tiny_store(tmp_path / "s", seqs)
    store = PrefixStore.open(tmp_path / "s")  # small segments: read lazily, then removed by compaction
    compact_store(tmp_path / "s")
    assert [store.match(s) for s in seqs] == [len(s) for s in seqs]
    assert store.read_blocks(store.keys(seqs[3])).numpy().tobytes() == _expected(seqs, manifest)[7]


@pytest.mark.parametrize("map_bytes", [1 << 20, 0])
def test_two_keys_with_the_same_key64_are_both_found(tmp_path, monkeypatch, map_bytes):
    monkeypatch.setattr("prefixgen.format.segments.MAP_BYTES", map_bytes)
    manifest = prepare_store(tmp_path / "s", _manifest(), "new")
    a = hashlib.sha256(b"a").digest()
    b = a[:8] + hashlib.sha256(b"b").digest()[8:]  # same key64, different key
    others = [hashlib.sha256(bytes([i])).digest() for i in range(20)]
    with StoreWriter(tmp_path / "s", manifest, "b", fsync=False) as w:
        for key in [*others[:10], a, b, *others[10:]]:
            w.add([key], [manifest.root_key], [0], np.zeros((1, BS), np.uint32), _block_kv(key))
    for _ in range(2):  # one segment as written; then compacted with a second copy of the index
        store = PrefixStore.open(tmp_path / "s")
        locs = store.index.find([a, b, a[:8] + bytes(24)])
        assert locs[0] is not None and locs[1] is not None and locs[2] is None
        assert locs[0].slot != locs[1].slot
        assert torch.equal(store.read_blocks([a]), _block_kv(a)) and torch.equal(store.read_blocks([b]), _block_kv(b))
        _write(tmp_path / "s", manifest, _sequences(3))
        compact_store(tmp_path / "s")


def _flip(path: Path, column: str, row: int = 0, byte: int = 0) -> None:
    """Flip one byte of ``column`` (row ``row``, byte ``byte`` of the row) in an index segment file."""
    with open(path, "rb") as f:
        header = read_safetensors_header(f, path)
    info = header.tensors[column]
    width = (info["data_offsets"][1] - info["data_offsets"][0]) // info["shape"][0]
    data = bytearray(path.read_bytes())
    data[header.data_start + info["data_offsets"][0] + row * width + byte] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_segment_with_a_flipped_byte_is_refused_and_verify_says_so(tmp_path):
    seqs = _sequences(12)
    _tiny_store(tmp_path / "s", seqs)
    compact_store(tmp_path / "s")
    seg_path = next((tmp_path / "s" / INDEX_DIR).iterdir())
    for column in ("key64", "slot"):
        original = seg_path.read_bytes()
        _flip(seg_path, column, row=3)
        with pytest.raises(CorruptStoreError, match="fails its checksum.*run `prefixgen verify"):
            store = PrefixStore.open(tmp_path / "s")
            store.read_blocks(store.keys(seqs[0]))  # key64 is checked on open, other columns when read
        report = verify_store(tmp_path / "s", quick=True)
        assert not report.ok and any(f"column {column!r}" in f or column in f for f in report.faults)
        seg_path.write_bytes(original)
    assert verify_store(tmp_path / "s").ok


def _large_segment(folder: Path, rows: int = 20_000) -> Path:
    """A memory-mapped (> 1 MiB) index segment of random keys, as compaction writes them."""
    rng = np.random.default_rng(5)
    cols = {
        "key": rng.integers(0, 256, (rows, 32), dtype=np.uint8),
        "parent": rng.integers(0, 256, (rows, 32), dtype=np.uint8),
        "slot": np.arange(rows, dtype=np.uint32),
        "depth": np.zeros(rows, np.uint32),
        "crc": np.zeros(rows, np.uint32),
    }
    meta = {"shard": "x.safetensors", "blocks": str(rows), "shard_bytes": "0", "shard_crc32": "0", "format_version": "2"}
    path = folder / INDEX_DIR / "x.safetensors"
    path.parent.mkdir(parents=True)
    atomic_write(path, encode_segment(cols, meta), fsync=False)
    return path


def test_a_large_segment_checks_only_the_key64_chunks_a_lookup_searches(tmp_path):
    path = _large_segment(tmp_path)
    seg = Segment(path)
    assert seg.mapped and json.loads(seg.metadata["key64_chunks"])["rows"] == KEY64_CHUNK_ROWS
    keys = [seg.cols["key"][r].tobytes() for r in range(seg.n)]
    bad_chunk = 5
    _flip(path, "key64", row=bad_chunk * KEY64_CHUNK_ROWS + 3, byte=7)
    index = StoreIndex.open(tmp_path)  # opening no longer reads the whole column
    good = [keys[r] for r in range(0, seg.n, 997) if r // KEY64_CHUNK_ROWS != bad_chunk]
    assert all(row is not None for row in index.find_rows(good))  # checks their chunks
    assert index.find_rows(good) == index.find_rows(good)  # again: the warm path, not misled by chunk 5
    assert all(row is not None for row in index.find_rows(good))
    with pytest.raises(CorruptStoreError, match=r"fails its checksum \(column 'key64', rows 5120-6143\).*run `prefixgen verify"):
        index.find_rows([keys[bad_chunk * KEY64_CHUNK_ROWS + 10]])
    assert Segment(path).verify_checksums() == ["key64", "key64_chunks"]  # what `verify` reports


def test_compaction_refuses_a_large_segment_with_a_flipped_byte_and_leaves_the_index_as_it_was(tmp_path):
    """A memory-mapped segment is read in place by the merge; each column is checked against its
    CRC-32 as it is read, so damage is refused instead of copied into the compacted segment."""
    _tiny_store(tmp_path / "s", _sequences(4))
    path = tmp_path / "s" / INDEX_DIR / "x.safetensors"
    os.replace(_large_segment(tmp_path / "big"), path)
    _flip(path, "parent", row=19_000)
    before = sorted(os.listdir(tmp_path / "s" / INDEX_DIR))
    with pytest.raises(CorruptStoreError, match=r"x.safetensors: index segment fails its checksum \(column 'parent'\)"):
        compact_store(tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s" / INDEX_DIR)) == before


def test_a_large_segment_without_chunk_checksums_is_checked_whole_on_open(tmp_path):
    path = _large_segment(tmp_path)
    seg = Segment(path)
    meta = {k: v for k, v in seg.metadata.items() if k != "key64_chunks"}  # as written before chunks
    specs = segment_tensors(seg.n, seg.compacted)
    parts = [encode_safetensors_header(specs, meta)] + [np.ascontiguousarray(seg.cols[s.name]).tobytes() for s in specs]
    del seg
    atomic_write(path, parts, fsync=False)
    key = Segment(path).cols["key"][7].tobytes()
    assert StoreIndex.open(tmp_path).find_rows([key]) == [(0, 7)]
    _flip(path, "key64", row=19_000)
    with pytest.raises(CorruptStoreError, match="fails its checksum.*run `prefixgen verify"):
        StoreIndex.open(tmp_path)


def _strip_checksums(path: Path) -> None:
    """Rewrite a segment as a store from before segment checksums would have it."""
    seg = Segment(path)
    cols = seg.cols
    meta = {k: v for k, v in seg.metadata.items() if k != "column_crc32"}
    specs = segment_tensors(seg.n, seg.compacted)
    parts = [encode_safetensors_header(specs, meta)] + [np.ascontiguousarray(cols[s.name]).tobytes() for s in specs]
    atomic_write(path, parts, fsync=False)


def test_verify_checks_key64_against_key_and_its_order_in_old_segments(tmp_path):
    seqs = _sequences(12)
    manifest = _tiny_store(tmp_path / "s", seqs)
    compact_store(tmp_path / "s")
    seg_path = next((tmp_path / "s" / INDEX_DIR).iterdir())
    _strip_checksums(seg_path)
    assert verify_store(tmp_path / "s").ok and _answers(tmp_path / "s", seqs) == _expected(seqs, manifest)  # still readable
    original = seg_path.read_bytes()
    _flip(seg_path, "key", row=5, byte=7)  # the key's 8th byte: key64 no longer matches it, order intact
    faults = verify_store(tmp_path / "s", quick=True).faults
    assert any("1 rows have a key64 that is not the first 8 bytes" in f for f in faults)
    assert not any("not sorted" in f for f in faults)
    seg_path.write_bytes(original)
    _flip(seg_path, "key64", row=0, byte=7)  # row 0's key64 becomes about the largest: out of order
    faults = verify_store(tmp_path / "s", quick=True).faults
    assert any("key64 is not sorted" in f for f in faults)
    assert any("1 rows have a key64 that is not the first 8 bytes" in f for f in faults)


def test_verify_finds_orphans_and_quick_skips_kv(tmp_path, cli):
    seqs = _sequences(12)
    _tiny_store(tmp_path / "s", seqs)
    shard = sorted((tmp_path / "s" / SHARDS_DIR).iterdir())[3]
    data = bytearray(shard.read_bytes())
    with open(shard, "rb") as f:
        data[read_safetensors_header(f, shard).offset("kv") + 10] ^= 0xFF  # KV bytes: only a full verify reads them
    shard.write_bytes(bytes(data))
    assert cli("verify", tmp_path / "s", "--quick").exit_code == 0
    full = cli("verify", tmp_path / "s")
    assert full.exit_code == 1 and "fail their CRC" in full.stderr
    seg = sorted((tmp_path / "s" / INDEX_DIR).iterdir())[0]  # a first block: its children lose their parent
    seg.unlink()
    quick = cli("verify", tmp_path / "s", "--quick")
    assert quick.exit_code == 1 and "parent that is not stored" in quick.stderr


def _run_and_kill(work, delay: float) -> bool:
    """Run ``work()`` in a forked child and SIGKILL it after ``delay`` s; True if it was killed
    before it finished. (Forked, so that each try does not pay for importing torch again.)"""
    pid = os.fork()
    if pid == 0:  # the child: do the work, never return into pytest
        # tqdm's lock is a multiprocessing semaphore shared with the parent: killed while holding it
        # (a progress bar is made even when disabled), the child would leave the parent's bars hung.
        tqdm.set_lock(threading.RLock())
        try:
            work()
        finally:
            os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def test_kill_9_during_compaction_leaves_a_store_that_answers_the_same(tmp_path):
    seqs = _sequences()
    manifest = _tiny_store(tmp_path / "s", seqs)
    expected = _expected(seqs, manifest)
    killed = 0
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
        killed += _run_and_kill(lambda: compact_store(tmp_path / "s"), delay)
        assert verify_store(tmp_path / "s").ok
        assert _answers(tmp_path / "s", seqs) == expected
    assert killed >= 1  # at least one kill landed mid-compaction
    compact_store(tmp_path / "s")
    assert len(os.listdir(tmp_path / "s" / INDEX_DIR)) == 1 and _answers(tmp_path / "s", seqs) == expected


def _with_counts(path: Path, seqs: list[list[int]], manifest: Manifest) -> dict[bytes, int]:
    """Write counts/ for ``seqs`` as a build would: records containing each block."""
    counts: dict[bytes, int] = {}
    for s in seqs:
        for k in block_keys(s, BS, manifest.root_key):
            counts[k] = counts.get(k, 0) + 1
    with StoreWriter(path, manifest, "b", fsync=False) as w:
        keys = np.frombuffer(b"".join(counts), dtype=np.uint8).reshape(len(counts), 32)
        w.write_counts(keys, np.fromiter(counts.values(), dtype=np.uint64, count=len(counts)))
    return counts


def _kept(path: Path) -> set[bytes]:
    store = PrefixStore.open(path)
    return {seg.cols["key"][i].tobytes() for seg in store.index.segments for i in range(seg.n)}


def test_prune_keeps_exactly_the_top_ranked_prefix_closed_set(tmp_path, cli):
    seqs = _sequences()
    manifest = _tiny_store(tmp_path / "s", seqs)
    counts = _with_counts(tmp_path / "s", seqs, manifest)
    store = PrefixStore.open(tmp_path / "s")
    rows = {
        seg.cols["key"][i].tobytes(): (int(seg.cols["depth"][i]), seg.cols["parent"][i].tobytes())
        for seg in store.index.segments
        for i in range(seg.n)
    }
    keys = list(rows)
    records = np.array([counts[k] for k in keys])
    k64 = np.array([int.from_bytes(k[:8], "little") for k in keys], dtype=np.uint64)
    budget = 37
    want = {keys[i] for i in select_blocks(records, np.array([rows[k][0] for k in keys]), max_blocks=budget, tiebreak=k64)}
    result = cli("prune", tmp_path / "s", "--max-bytes", str(budget * block_cost(manifest) + 5))
    assert result.exit_code == 0, result.output
    kept = _kept(tmp_path / "s")
    assert kept == want and len(kept) == budget
    assert all(rows[k][1] in kept or rows[k][1] == manifest.root_key for k in kept)  # prefix-closed
    assert min(counts[k] for k in kept) >= max(counts[k] for k in set(keys) - kept)
    assert verify_store(tmp_path / "s").ok
    after = PrefixStore.open(tmp_path / "s")
    for s in seqs:  # every kept prefix loads the KV it had
        n = after.match(s)
        assert n // BS == sum(k in kept for k in block_keys(s, BS, manifest.root_key))
        assert torch.equal(
            after.read_blocks(after.keys(s[:n])).reshape(-1),
            torch.cat([_block_kv(k) for k in after.keys(s[:n])] or [torch.empty(0)]).reshape(-1),
        )
    result = cli("prune", tmp_path / "s", "--min-records", "3")
    assert result.exit_code == 0, result.output
    assert _kept(tmp_path / "s") == {k for k in kept if counts[k] >= 3}
    assert cli("prune", tmp_path / "s").exit_code != 0  # neither option: a message, not a traceback


def test_prune_in_pieces_keeps_what_select_blocks_ranks_first(tmp_path, monkeypatch):
    """Prune ranks a piece of the segment at a time (SWEEP_ROWS rows; 5 here, so every cut falls
    across pieces and inside a group of blocks with equal records and depth, found by key64 bits):
    it keeps exactly what ``select_blocks`` over all rows at once keeps, for budgets on both sides of
    every group, in new shards of a few blocks."""
    import shutil

    import prefixgen.maintain.prune as prune

    monkeypatch.setattr(prune, "SWEEP_ROWS", 5)
    seqs = _sequences()
    manifest = _tiny_store(tmp_path / "s", seqs)
    counts = _with_counts(tmp_path / "s", seqs, manifest)
    rows = {
        seg.cols["key"][i].tobytes(): int(seg.cols["depth"][i])
        for seg in PrefixStore.open(tmp_path / "s").index.segments
        for i in range(seg.n)
    }
    keys = list(rows)
    records = np.array([counts[k] for k in keys])
    depth = np.array([rows[k] for k in keys])
    k64 = np.array([int.from_bytes(k[:8], "little") for k in keys], dtype=np.uint64)
    for budget, min_records in [(1, 1), (2, 1), (13, 1), (37, 2), (50, 1), (len(keys) - 3, 1), (len(keys) + 9, 1), (None, 3)]:
        want = {keys[i] for i in select_blocks(records, depth, min_records=min_records, max_blocks=budget, tiebreak=k64)}
        shutil.copytree(tmp_path / "s", tmp_path / "p")
        max_bytes = None if budget is None else budget * block_cost(manifest)
        report = prune_store(tmp_path / "p", max_bytes=max_bytes, min_records=min_records, shard_bytes=3 * block_cost(manifest))
        assert _kept(tmp_path / "p") == want and report.blocks_kept == len(want), (budget, min_records)
        assert verify_store(tmp_path / "p").ok
        shutil.rmtree(tmp_path / "p")


@pytest.mark.parametrize("storage", ["native", "fp8"])
def test_prune_reads_only_the_kept_blocks_of_each_shard(tmp_path, storage):
    # Blocks of 16 KiB (fp8: 4 KiB and scales) in shards of 30: the KV dwarfs the index and counts.
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32", storage=storage)
    fp = ModelFingerprint("m", "A", "a", 4, 2, 64, "22" * 32, "33" * 32)
    manifest = prepare_store(tmp_path / "s", Manifest(BS, fp, layout, root_key(fp.weights_digest).hex()), "new")
    seqs = _sequences(60)
    shape = (-1, layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    kv_of = {}
    with StoreWriter(tmp_path / "s", manifest, "b", shard_bytes=30 * layout.block_bytes(BS), fsync=False) as w:
        for s in seqs:
            keys = block_keys(s, BS, manifest.root_key)
            first = next((i for i, k in enumerate(keys) if k not in kv_of), len(keys))
            if first < len(keys):
                new = keys[first:]
                kv = torch.randn(len(new) * BS, *shape[1:])
                parents = [keys[first - 1] if first else manifest.root_key] + new[:-1]
                tokens = np.asarray(s[first * BS : len(keys) * BS], np.uint32).reshape(-1, BS)
                w.add(new, parents, list(range(first, len(keys))), tokens, kv)
                kv_of.update(zip(new, torch.split(kv, BS)))
    _with_counts(tmp_path / "s", seqs, manifest)
    compact_store(tmp_path / "s")
    store = PrefixStore.open(tmp_path / "s")
    stored = {k: store.read_blocks([k]) for k in kv_of}  # as stored (fp8: dequantized)
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "s" / SHARDS_DIR).iterdir())
    other_bytes = sum(p.stat().st_size for sub in (INDEX_DIR, "counts") for p in (tmp_path / "s" / sub).iterdir())
    budget = 12
    before = _bytes_read()
    report = prune_store(tmp_path / "s", max_bytes=budget * block_cost(manifest))
    read = _bytes_read() - before
    assert report.blocks_kept == budget and len(kv_of) > 200
    # The kept blocks, with a header and a page of slack per old shard, and the index and counts (read
    # a few times): not the whole shards.
    assert read <= budget * (layout.block_bytes(BS) + 4096) + 3 * other_bytes < shard_bytes // 4
    after = PrefixStore.open(tmp_path / "s")
    kept = _kept(tmp_path / "s")
    assert len(kept) == budget and all(torch.equal(after.read_blocks([k]), stored[k]) for k in kept)
    assert verify_store(tmp_path / "s").ok


def test_prune_writes_its_new_shard_a_piece_at_a_time_not_from_memory(tmp_path, monkeypatch):
    """Every block kept, into one new shard of ~24 MB: prune's Python allocations (tracemalloc: bytearrays and numpy
    arrays) stay near COPY_BYTES (1 MiB here), not the shard (the old prune built the whole shard in memory)."""
    import tracemalloc

    from prefixgen.maintain import prune

    monkeypatch.setattr(prune, "COPY_BYTES", 1 << 20, raising=False)
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32")  # 16 KiB blocks
    fp = ModelFingerprint("m", "A", "a", 4, 2, 64, "22" * 32, "33" * 32)
    manifest = prepare_store(tmp_path / "s", Manifest(BS, fp, layout, root_key(fp.weights_digest).hex()), "new")
    seqs = _sequences(400)
    shape = (layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    done: set[bytes] = set()
    with StoreWriter(tmp_path / "s", manifest, "b", shard_bytes=64 * layout.block_bytes(BS), fsync=False) as w:
        for s in seqs:
            keys = block_keys(s, BS, manifest.root_key)
            first = next((i for i, k in enumerate(keys) if k not in done), len(keys))
            if first < len(keys):
                parents = [keys[first - 1] if first else manifest.root_key] + keys[first:-1]
                tokens = np.asarray(s[first * BS : len(keys) * BS], np.uint32).reshape(-1, BS)
                w.add(keys[first:], parents, list(range(first, len(keys))), tokens, torch.randn(len(tokens) * BS, *shape))
                done.update(keys[first:])
    _with_counts(tmp_path / "s", seqs, manifest)
    compact_store(tmp_path / "s", fsync=False)
    answers = _answers(tmp_path / "s", seqs)
    tracemalloc.start()
    try:
        report = prune_store(tmp_path / "s", min_records=1, fsync=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.blocks_kept == len(done) and report.shards_written == 1 and report.bytes_after > 20 << 20
    assert peak < 8 << 20, f"prune held {peak / 2**20:.1f} MiB for a {report.bytes_after / 2**20:.1f} MiB shard"
    assert _answers(tmp_path / "s", seqs) == answers and verify_store(tmp_path / "s").ok


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux: /proc/self/io ``rchar``)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


# The calls at which a store changes or becomes durable: a kill just before each is a kill between two steps.
FS_STEPS = ("replace", "rename", "link", "unlink", "fsync")


def _run_and_kill_at(work, step: int | None) -> int | None:
    """Run ``work()`` in a forked child that SIGKILLs itself just before its ``step``-th file-system step
    (``FS_STEPS``), so where it dies does not depend on the machine's load. Returns None if it was killed,
    else the number of steps ``work`` took."""
    out, into = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: do the work, never return into pytest
        tqdm.set_lock(threading.RLock())  # as in _run_and_kill
        done = 0

        def counted(call):
            def step_call(*args, **kwargs):
                nonlocal done
                if done == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                done += 1
                return call(*args, **kwargs)

            return step_call

        for name in FS_STEPS:
            setattr(os, name, counted(getattr(os, name)))
        try:
            work()
            os.write(into, str(done).encode())
            os._exit(0)
        finally:
            os._exit(1)
    os.close(into)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(out, "rb") as f:
        written = f.read()
    if os.WIFSIGNALED(status):
        return None
    assert os.WEXITSTATUS(status) == 0, "the work failed in the child"
    return int(written)


def test_kill_9_during_prune_leaves_the_old_or_the_new_store(tmp_path):
    """A prune killed before each of a spread of its file-system steps (the same steps on any machine, under any
    load: killing after a delay found only the old store once a loaded machine made every prune outlast 0.8 s)."""
    seqs = _sequences()
    manifest = _tiny_store(tmp_path / "first", seqs)
    counts = _with_counts(tmp_path / "first", seqs, manifest)
    old = _kept(tmp_path / "first")
    new = {k for k in old if counts[k] >= 2}
    shutil.copytree(tmp_path / "first", tmp_path / "whole")
    steps = _run_and_kill_at(lambda: prune_store(tmp_path / "whole", min_records=2), None)
    assert steps > 20 and _kept(tmp_path / "whole") == new
    seen = set()
    for step in sorted({0, *range(0, steps, steps // 7), steps - 1}):
        shutil.rmtree(tmp_path / "s", ignore_errors=True)
        shutil.copytree(tmp_path / "first", tmp_path / "s")  # each prune starts from the same store
        assert _run_and_kill_at(lambda: prune_store(tmp_path / "s", min_records=2), step) is None
        assert verify_store(tmp_path / "s").ok
        kept = _kept(tmp_path / "s")
        assert kept in (old, new)
        seen.add(kept == new)
        store = PrefixStore.open(tmp_path / "s")
        for s in seqs[:8]:
            keys = store.keys(s)[: store.match(s) // BS]
            assert torch.equal(
                store.read_blocks(keys).reshape(-1), torch.cat([_block_kv(k) for k in keys] or [torch.empty(0)]).reshape(-1)
            )
    assert seen == {False, True}  # some kills left the old store, some the new one


def test_two_writers_and_a_compaction_at_once_lose_nothing(tmp_path):
    seqs = _sequences(60, seed=1)
    manifest = prepare_store(tmp_path / "s", _manifest(), "new")
    halves = [seqs[0::2], seqs[1::2]]
    threads = [threading.Thread(target=_write, args=(tmp_path / "s", manifest, h, 3 * BLOCK_BYTES)) for h in halves]
    for t in threads:
        t.start()
    compactions = 0
    while any(t.is_alive() for t in threads):
        compactions += bool(compact_store(tmp_path / "s").segment)
    for t in threads:
        t.join()
    assert compactions >= 1
    assert _answers(tmp_path / "s", seqs) == _expected(seqs, manifest)
    compact_store(tmp_path / "s")
    assert _answers(tmp_path / "s", seqs) == _expected(seqs, manifest)
    assert verify_store(tmp_path / "s").ok


def test_cli_compact_and_ls_after_it(tmp_path, cli):
    seqs = _sequences(12)
    _tiny_store(tmp_path / "s", seqs)
    result = cli("compact", tmp_path / "s", "--quiet")
    assert result.exit_code == 0 and "merged" in result.stdout
    assert "nothing to compact" in cli("compact", tmp_path / "s").stdout
    summary = json.loads(cli("ls", tmp_path / "s", "--json").stdout)
    assert summary["blocks"] == len(_kept(tmp_path / "s"))
    assert len(summary["shards"]) == len(os.listdir(tmp_path / "s" / SHARDS_DIR))
    assert sum(s["blocks"] for s in summary["shards"]) == summary["blocks"]
    assert cli("compact", tmp_path).exit_code != 0  # not a store


def test_encode_segment_records_a_checksum_per_column():
    cols = {
        "key": np.arange(64, dtype=np.uint8).reshape(2, 32),
        "parent": np.zeros((2, 32), np.uint8),
        "slot": np.arange(2, dtype=np.uint32),
        "depth": np.zeros(2, np.uint32),
        "crc": np.zeros(2, np.uint32),
    }
    header = encode_segment(cols, {"shard": "x"})[0]
    meta = json.loads(header[8:])["__metadata__"]
    assert set(json.loads(meta["column_crc32"])) == {"key64", "key", "parent", "slot", "depth", "crc"}
