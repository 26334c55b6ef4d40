"""Many writers, one store: liveness locks, --resume beside a live writer, commits when a later
shard fails, gc, and record counts appended as files."""

from __future__ import annotations

import signal
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from prefixgen import PrefixStore, StoreError
from prefixgen.builder.pipeline import PastSource
from prefixgen.builder.plan import Planner, RecordCounts
from prefixgen.data.records import TokenizedRecord
from prefixgen.format import (
    COUNTS_DIR,
    INDEX_DIR,
    SHARDS_DIR,
    BlockHash,
    BuildRecord,
    KVLayout,
    block_keys,
    shard_name,
    temp_path,
)
from prefixgen.maintain.gc import collect_garbage
from prefixgen.maintain.verify import verify_store
from prefixgen.report import store_summary
from prefixgen.store.keyset import KeySet
from prefixgen.store.writer import StoreWriter, prepare_store, writer_is_live

from .conftest import write_jsonl
from .test_build import CPU, _cli_process, _random_records, _wait_for_segments, stored_keys
from .test_build_kv import _bytes_read
from .test_format import _manifest


def _segment_writers(out) -> set[str]:
    return {seg.metadata["writer"] for seg in PrefixStore.open(out).index.segments}


def _counts(out) -> dict[bytes, int]:
    total: Counter = Counter()
    for keys, records in PrefixStore.open(out).count_arrays():
        for k, c in zip(keys, records):
            total[k.tobytes()] += int(c)
    return dict(total)


@pytest.mark.slow
def test_resume_beside_a_live_writer_removes_only_dead_writers_leftovers(tmp_path, cli, stories):
    out = tmp_path / "store"
    b_records = _random_records(150, seed=11)
    b_data = write_jsonl(tmp_path / "b.jsonl", [{"text": r} for r in b_records])
    b_args = ["build", b_data, "--model", stories, "--out", out, "--shard-bytes", "30000", "--batch-tokens", "512", *CPU]
    stopped = _cli_process(*b_args)
    _wait_for_segments(out, 2, stopped)
    stopped.send_signal(signal.SIGINT)  # a clean stop: it records its counts so far
    assert stopped.wait(60) == 130
    (dead,) = _segment_writers(out)
    assert not writer_is_live(out, dead)
    # A writer of another dataset runs beside it. Once it has written a shard it is stopped
    # (SIGSTOP): still live, holding its lock, but taking no CPU while the resume runs.
    a_data = write_jsonl(tmp_path / "a.jsonl", [{"text": r} for r in _random_records(3000, seed=12)])
    a_args = ["build", a_data, "--model", stories, "--out", out, "--shard-bytes", "30000", "--batch-tokens", "512", *CPU]
    live = _cli_process(*a_args, "--append")
    try:
        _wait_for_segments(out, len(PrefixStore.open(out).index.segments) + 1, live)
        live.send_signal(signal.SIGSTOP)
        (live_id,) = _segment_writers(out) - {dead}
        assert writer_is_live(out, live_id)
        # Temporary files as each writer leaves them mid-write: the dead one's is garbage, the live
        # one's is about to be renamed into place.
        dead_tmp = temp_path(out / SHARDS_DIR / shard_name(dead, 999), dead)
        live_tmp = temp_path(out / SHARDS_DIR / shard_name(live_id, 999), live_id)
        dead_tmp.write_bytes(b"half a shard")
        live_tmp.write_bytes(b"half a shard")

        refused = cli(*a_args, "--resume")  # the live writer's own build is not resumable
        assert refused.exit_code not in (0, 1) and "still running" in refused.stderr, refused.output
        resumed = cli(*b_args, "--resume")
        assert resumed.exit_code == 0, resumed.output
        assert live.poll() is None and writer_is_live(out, live_id)
        assert live_tmp.exists() and not dead_tmp.exists()
    finally:
        live.send_signal(signal.SIGCONT)
        live.send_signal(signal.SIGINT)
        _, err = live.communicate(timeout=120)
    assert live.returncode == 130, err
    assert not writer_is_live(out, live_id)
    report = verify_store(out)
    assert report.ok, report.faults
    # Every block of B is stored, and B's counts were replaced by the resume, not added twice.
    tok = AutoTokenizer.from_pretrained(stories)
    manifest = PrefixStore.open(out).manifest
    want = Counter(k for r in b_records for k in block_keys(tok(r).input_ids, 16, manifest.root_key))
    assert set(want) <= stored_keys(out)
    counted = {k: c for k, c in _counts(out).items() if k in want}
    assert counted == dict(want)


def test_a_whole_shard_commits_though_the_next_one_fails(tmp_path):
    """Shard 1 fails at once (its temporary name is taken by a folder) while shard 0, 32 MiB with
    fsync, is still being written: shard 0 must commit all the same."""
    layout = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype="float32")
    out = tmp_path / "s"
    manifest = prepare_store(out, _manifest(layout), "new")
    block_bytes = layout.bytes_per_token * manifest.block_size
    capacity = 1024
    tokens = list(range((capacity + 1) * manifest.block_size))
    keys = block_keys(tokens, manifest.block_size, manifest.root_key)
    kv = torch.randn(len(tokens), 4, 2, 4, 64)
    writer = StoreWriter(out, manifest, "b", shard_bytes=capacity * block_bytes, write_threads=2, fsync=True)
    temp_path(out / SHARDS_DIR / shard_name(writer.writer_id, 1), writer.writer_id).mkdir()
    with pytest.raises(StoreError, match="writing to"):
        with writer:
            parents = [manifest.root_key] + keys[:-1]
            ids = np.asarray(tokens, dtype=np.uint32).reshape(-1, manifest.block_size)
            writer.add(keys, parents, list(range(len(keys))), ids, kv)
    assert (out / INDEX_DIR / shard_name(writer.writer_id, 0)).exists()
    assert not (out / INDEX_DIR / shard_name(writer.writer_id, 1)).exists()
    store = PrefixStore.open(out)
    assert store.match(tokens) == capacity * manifest.block_size
    got = store.read_blocks(keys[:capacity])
    assert torch.equal(got, kv[: capacity * manifest.block_size])
    assert verify_store(out).ok


@pytest.mark.parametrize("storage", ["native", "fp8"])
def test_evicted_pasts_are_read_back_per_shard_not_per_block(tmp_path, storage):
    """A build's pasts no longer in device memory (budget 0) come back from the writer: each segment
    and shard read once for a key run, not once or twice per block, and the same KV as block by block."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", storage=storage)
    out = tmp_path / "s"
    manifest = prepare_store(out, _manifest(layout), "new")
    bs, capacity = manifest.block_size, 32
    tokens = list(range(8 * capacity * bs))
    keys = block_keys(tokens, bs, manifest.root_key)
    with StoreWriter(out, manifest, "b", shard_bytes=capacity * layout.block_bytes(bs), fsync=False) as writer:
        ids = np.asarray(tokens, dtype=np.uint32).reshape(-1, bs)
        writer.add(keys, [manifest.root_key] + keys[:-1], list(range(len(keys))), ids, torch.randn(len(tokens), 2, 2, 2, 32))
        writer.flush()
        source = PastSource(writer, PrefixStore.open(out), torch.device("cpu"), torch.float32, budget=0, fp8=storage == "fp8")
        asked = keys[5:200] + keys[:3]  # a run over six committed shards, then back to the first
        want = torch.cat([writer.read_block(k) for k in asked])
        before = _bytes_read()
        got = source.get(asked)
        read = _bytes_read() - before
    assert torch.equal(got, want)
    segment = max(p.stat().st_size for p in (out / INDEX_DIR).iterdir())
    committed = 6 * capacity - 5 + 3  # asked blocks in shards 0-5 (6 and 7 are still in host buffers)
    assert read <= committed * layout.block_bytes(bs) + 6 * (2 * segment + 8192)


def _write(writer: StoreWriter, manifest, tokens: list[int]) -> list[bytes]:
    bs = manifest.block_size
    keys = block_keys(tokens, bs, manifest.root_key)
    kv = torch.randn(len(keys) * bs, 1, 2, 1, 2)
    ids = np.asarray(tokens[: len(keys) * bs], dtype=np.uint32).reshape(-1, bs)
    writer.add(keys, [manifest.root_key] + keys[:-1], list(range(len(keys))), ids, kv)
    return keys


def test_gc_removes_dead_writers_leftovers_and_nothing_of_live_ones(tmp_path, cli):
    layout = KVLayout(1, 1, 2, "float32")
    out = tmp_path / "s"
    manifest = prepare_store(out, _manifest(layout), "new")
    seqs = [list(range(100 * i, 100 * i + 24)) for i in range(4)]  # 6 blocks of 4 tokens each
    one_shard = 6 * manifest.block_size * layout.bytes_per_token
    with StoreWriter(out, manifest, "b", shard_bytes=one_shard) as dead:
        for s in seqs:
            _write(dead, manifest, s)
    # As if it was killed (kill -9) between its last shard and that shard's segment:
    (out / INDEX_DIR / shard_name(dead.writer_id, 3)).unlink()
    (out / "locks" / f"{dead.writer_id}.lock").write_text("pid 1\n")  # left behind, held by no one
    orphan = out / SHARDS_DIR / shard_name(dead.writer_id, 3)
    dead_tmps = [temp_path(out / sub / shard_name(dead.writer_id, 4), dead.writer_id) for sub in (SHARDS_DIR, INDEX_DIR)]
    for p in dead_tmps:
        p.write_bytes(b"partial")
    live = StoreWriter(out, manifest, "c", shard_bytes=one_shard)
    try:
        # A live writer's shard whose segment is not written yet, and its temporary files.
        in_flight = out / SHARDS_DIR / shard_name(live.writer_id, 0)
        in_flight.write_bytes(orphan.read_bytes())
        live_tmps = [temp_path(out / sub / shard_name(live.writer_id, 1), live.writer_id) for sub in (SHARDS_DIR, INDEX_DIR)]
        for p in live_tmps:
            p.write_bytes(b"partial")
        before = [PrefixStore.open(out).match(s) for s in seqs]
        assert before == [24, 24, 24, 0]
        dry = cli("gc", out, "--dry-run")
        assert dry.exit_code == 0 and orphan.exists() and "would remove 4 file(s)" in dry.stdout, dry.output
        result = cli("gc", out)
        assert result.exit_code == 0, result.output
        assert "removed 4 file(s)" in result.stdout and "1 live writer" in result.stdout
        assert not orphan.exists() and not any(p.exists() for p in dead_tmps)
        assert not (out / "locks" / f"{dead.writer_id}.lock").exists()
        assert in_flight.exists() and all(p.exists() for p in live_tmps) and writer_is_live(out, live.writer_id)
        assert [PrefixStore.open(out).match(s) for s in seqs] == before
        assert verify_store(out).ok
        assert collect_garbage(out).removed == []  # nothing more to do
    finally:
        live.close()
        live.release()


def test_counts_are_appended_and_read_with_old_whole_files(tmp_path):
    layout = KVLayout(1, 1, 2, "float32")
    out = tmp_path / "s"
    manifest = prepare_store(out, _manifest(layout), "new")
    shared = list(range(8))
    seqs = [shared + [50 + i] * 4 for i in range(3)]
    counts = RecordCounts()
    with StoreWriter(out, manifest, "b") as w:
        for i, s in enumerate(seqs):
            counts.add(_write(w, manifest, s))
            if i == 1:
                w.write_counts(*counts.take())  # a checkpoint: the first two records
        w.write_counts(*counts.take())  # the last one
        files = sorted((out / COUNTS_DIR).glob("*.safetensors"))
    assert len(files) == 2
    total = _counts(out)
    keys = block_keys(seqs[0], 4, manifest.root_key)
    assert total[keys[0]] == total[keys[1]] == 3 and total[keys[2]] == 1
    # A store written before counts were appended holds one whole file per build: both are summed.
    old = out / COUNTS_DIR / "20261126T000000-1-aaaaaa.safetensors"
    old.write_bytes(files[0].read_bytes())
    assert _counts(out)[keys[0]] == 5
    top = store_summary(PrefixStore.open(out), top=1, decode=False)["top_prefixes"]
    assert top[0]["records"] == 5 and top[0]["tokens"] == 8


def test_keyset_is_exact_across_runs_and_key64_ties():
    rng = np.random.default_rng(0)
    exact = KeySet(delta_keys=7, max_run=50)
    where = KeySet(full_keys=False, value_dtype=np.uint64, delta_keys=5, max_run=40)
    added: dict[bytes, int] = {}
    for step in range(40):
        keys = [rng.bytes(32) for _ in range(int(rng.integers(1, 12)))]
        if added and step % 4 == 0:  # a key sharing key64 with a stored one
            keys.append(next(iter(added))[:8] + rng.bytes(24))
        values = rng.integers(0, 1 << 40, len(keys))
        exact.add(keys)
        where.add(keys, values)
        added.update(zip(keys, values.tolist()))
    assert len(exact._runs) > 3  # several runs, merged and not
    strangers = [rng.bytes(32) for _ in range(20)] + [k[:8] + rng.bytes(24) for k in list(added)[:20]]
    queries = list(added) + strangers
    assert exact.contains(queries).tolist() == [True] * len(added) + [False] * len(strangers)
    assert all(added[k] in where.candidates(k) for k in added)
    assert len(exact) == len(added) and exact.nbytes <= 32 * len(added)


def test_a_block_after_a_stored_one_is_scheduled_once():
    """A record whose first block is stored and second scheduled earlier in the run must not
    schedule the second again."""
    root = BlockHash(bytes(32))
    first, second = list(range(16)), list(range(100, 116))
    stored_key = block_keys(first, 16, root)[0]
    planner = Planner(root, 16, 4096, lambda keys: [k == stored_key for k in keys], BuildRecord("b", "d"))
    records = [TokenizedRecord(0, first + second), TokenizedRecord(1, first + second + list(range(200, 216)))]
    tasks = list(planner(iter(records)))
    new = [k for t in tasks for k in t.new_keys]
    assert len(new) == len(set(new)) == 2
    assert tasks[1].depends == tasks[0].new_keys[-1]
