"""Readers of a store that changes under them: no store change can kill the reading process (no index
file is memory-mapped: a truncated one is a store fault, not SIGBUS), and a reader keeps hitting after
a prune, compaction or append without being reopened by hand (PrefixStore.refresh, read_prefix)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from prefixgen import PrefixStore
from prefixgen.format import INDEX_DIR, MAP_BYTES, Segment, ShardRef, atomic_write, encode_segment
from prefixgen.maintain.compact import compact_store
from prefixgen.maintain.prune import prune_store
from prefixgen.store.index import StoreIndex

from .test_maintain import BS, _sequences, _tiny_store, _with_counts, _write


def pad_index(store: Path, rows: int, seed: int = 7) -> Path:
    """Replace the index of ``store`` by one compacted segment holding its rows plus ``rows`` rows of random keys
    (in a shard that does not exist: no lookup can reach them), so the index is as large as a big store's.
    Returns the segment's path."""
    folder = store / INDEX_DIR
    old = sorted(folder.glob("*.safetensors"))
    cols: dict[str, list[np.ndarray]] = {name: [] for name in ("key", "parent", "slot", "depth", "crc", "shard")}
    shards: list[ShardRef] = []
    for path in old:
        seg = Segment(path)
        c = {name: np.asarray(col) for name, col in seg.cols.items()}
        for name in ("key", "parent", "slot", "depth", "crc"):
            cols[name].append(np.asarray(c[name]))
        cols["shard"].append(seg.shard_ids(c).astype(np.uint32) + len(shards))
        shards += seg.shards
    rng = np.random.default_rng(seed)
    cols["key"].append(rng.integers(0, 256, (rows, 32), dtype=np.uint8))
    cols["parent"].append(rng.integers(0, 256, (rows, 32), dtype=np.uint8))
    for name in ("slot", "depth", "crc"):
        cols[name].append(np.zeros(rows, np.uint32))
    cols["shard"].append(np.full(rows, len(shards), np.uint32))
    shards.append(ShardRef("padding.safetensors", rows, 0, 0))
    joined = {name: np.concatenate(parts) for name, parts in cols.items()}
    out = folder / "compacted-padded.safetensors"
    meta = {"format_version": "3", "blocks": str(len(joined["key"])), "compacted_from": str(len(old))}
    atomic_write(out, encode_segment(joined, meta, shards), fsync=False)
    for path in old:
        path.unlink()
    return out


READ_AFTER_TRUNCATION = textwrap.dedent(
    """
    import os, sys
    from prefixgen import PrefixStore
    from prefixgen.errors import StoreError
    store = PrefixStore.open(sys.argv[1])
    seqs = [list(map(int, line.split())) for line in open(sys.argv[2])]
    before = [store.match(s) for s in seqs]  # every column read (the pages in memory, were they mapped)
    assert all(before), before
    segment = sys.argv[3]
    size = os.path.getsize(segment)
    os.truncate(segment, size // 3)  # in place, as `cp` over a live store or an I/O error leaves it
    faults = 0
    for s in seqs:
        try:
            store.match(s)
        except StoreError:
            faults += 1
    with open(segment, "r+b") as f:  # overwritten in place: same size, other bytes
        f.truncate(size)
        f.write(os.urandom(size))
    for s in seqs:
        try:
            store.match(s)
        except StoreError:
            faults += 1
    print("survived", faults)
    """
)


def test_an_index_truncated_and_overwritten_in_place_is_a_store_fault_not_a_crash(tmp_path):
    """A several-MiB index segment truncated in place under an open reader: its lookups fail with a store error
    (the caller's miss), and the process lives. When index segments were memory-mapped this was SIGBUS (exit -7)."""
    seqs = _sequences(12)
    _tiny_store(tmp_path / "s", seqs)
    segment = pad_index(tmp_path / "s", 40_000)
    assert segment.stat().st_size >= 3 * MAP_BYTES and Segment(segment).mapped
    listing = tmp_path / "seqs.txt"
    listing.write_text("\n".join(" ".join(map(str, s)) for s in seqs))
    run = subprocess.run(
        [sys.executable, "-c", READ_AFTER_TRUNCATION, str(tmp_path / "s"), str(listing), str(segment)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.startswith("survived") and int(run.stdout.split()[1]) > 0


def test_a_large_segment_is_read_without_a_memory_map(tmp_path):
    seqs = _sequences(12)
    _tiny_store(tmp_path / "s", seqs)
    expected = [PrefixStore.open(tmp_path / "s").read_blocks(PrefixStore.open(tmp_path / "s").keys(s)) for s in seqs]
    segment = pad_index(tmp_path / "s", 20_000)
    store = PrefixStore.open(tmp_path / "s")
    assert [s.mapped for s in store.index.segments] == [True]
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert str(segment) not in maps
    for s, kv in zip(seqs, expected):
        assert store.match(s) == len(s) // BS * BS
        assert store.read_blocks(store.keys(s)).equal(kv)


def test_a_reader_keeps_loading_after_a_prune_moved_its_blocks(tmp_path):
    """A prune that keeps every block copies them into new shards and removes the old ones: a reader opened
    before it finds a shard gone, reopens the index and loads the same KV (before: CorruptStoreError)."""
    seqs = _sequences(24)
    manifest = _tiny_store(tmp_path / "s", seqs)
    _with_counts(tmp_path / "s", seqs, manifest)
    store = PrefixStore.open(tmp_path / "s")
    before = [store.load(s + [1]) for s in seqs]
    prune_store(tmp_path / "s", min_records=1)
    for s, cache in zip(seqs, before):
        again = store.load(s + [1])
        assert all(a.equal(b) for a, b in zip(_layers(again), _layers(cache)))


def test_refresh_finds_blocks_appended_and_compacted_since_the_store_was_opened(tmp_path):
    seqs = _sequences(24)
    manifest = _tiny_store(tmp_path / "s", seqs[:12])
    store = PrefixStore.open(tmp_path / "s")
    assert not store.refresh()  # nothing changed
    new = [s for s in seqs[12:] if store.match(s) < len(s) // BS * BS]
    assert new
    _write(tmp_path / "s", manifest, new)  # an append, beside the open reader
    assert store.refresh()
    assert [store.match(s) for s in new] == [len(s) // BS * BS for s in new]
    compact_store(tmp_path / "s")
    assert store.refresh() and len(store.index.segments) == 1
    assert [store.match(s) for s in seqs] == [len(s) // BS * BS for s in seqs]


def test_an_index_rewritten_in_place_is_seen_as_a_change(tmp_path):
    _tiny_store(tmp_path / "s", _sequences(12))
    segment = pad_index(tmp_path / "s", 20_000)
    index = StoreIndex.open(tmp_path / "s")
    assert not index.changed()
    os.truncate(segment, segment.stat().st_size // 2)
    assert index.changed()


def _layers(cache) -> list:
    return [t for layer in range(len(cache.layers)) for t in (cache.layers[layer].keys, cache.layers[layer].values)]
