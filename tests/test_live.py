"""Maintenance beside live work, and stores on shared file systems: every process that writes a
store holds a writer lock, gc and prune never take a live writer's files, a build keeps reading its
own blocks while compactions run, lock probes never crash, and concurrent starters make one store."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixgen import PrefixStore, StoreError
from prefixgen.format import INDEX_DIR, LOCKS_DIR, MANIFEST_FILE, SHARDS_DIR, shard_name, temp_path
from prefixgen.maintain.compact import compact_store
from prefixgen.maintain.gc import collect_garbage
from prefixgen.maintain.prune import prune_store
from prefixgen.maintain.verify import verify_store
from prefixgen.store.writer import ID_PATTERN, StoreWriter, check_file_system, maintenance_lock, prepare_store, writer_is_live

from .conftest import write_jsonl
from .test_build import CPU, _cli_process, _random_records, expected_keys, stored_keys
from .test_maintain import BLOCK_BYTES, BS, _block_kv, _kept, _manifest, _run_and_kill, _sequences, _tiny_store, _with_counts


@pytest.mark.slow
def test_a_build_reads_its_own_pasts_back_while_compactions_merge_its_segments(tmp_path, stories):
    """Every record starts with the same 6-block head, computed first; with no device cache and one
    write buffer in flight, every later batch reads the head back from the build's own committed
    shard, whose segment a compaction loop keeps merging away."""
    head = " ".join(["once upon a time a little cat found a red ball in the park"] * 4)
    records = [f"{head} {r}" for r in _random_records(120, seed=3)]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r} for r in records])
    out = tmp_path / "store"
    args = ["--shard-bytes", "30000", "--batch-tokens", "256", "--write-threads", "1", "--prefix-cache-bytes", "0"]
    build = _cli_process("build", data, "--model", stories, "--out", out, *args, "--no-fsync", *CPU)
    merged = 0
    while build.poll() is None:
        if (out / MANIFEST_FILE).exists() and (out / INDEX_DIR).is_dir():
            merged += compact_store(out).segments_merged
    _, err = build.communicate()
    assert build.returncode == 0, err
    assert merged >= 20  # the loop did merge the build's segments while it ran
    assert expected_keys(records, stories, out) <= stored_keys(out)
    assert verify_store(out).ok


def _prune_in_child(path: Path, min_records: int) -> int:
    """Fork a child that prunes ``path`` to the blocks in ``min_records`` or more records, one block
    per new shard (so copying takes long enough for many gc runs)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            prune_store(path, min_records=min_records, shard_bytes=BLOCK_BYTES)
            code = 0
        finally:
            os._exit(code)
    return pid


@pytest.mark.slow
def test_gc_in_a_loop_beside_a_prune_loses_nothing_kept(tmp_path):
    seqs = _sequences(300, seed=4)
    manifest = _tiny_store(tmp_path / "s", seqs)
    counts = _with_counts(tmp_path / "s", seqs, manifest)
    want = {k for k in _kept(tmp_path / "s") if counts[k] >= 1}  # every block: the longest copy
    pid = _prune_in_child(tmp_path / "s", min_records=1)
    runs, status = 0, None
    while status is None:
        collect_garbage(tmp_path / "s")
        runs += 1
        done, st = os.waitpid(pid, os.WNOHANG)
        status = st if done else None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert runs >= 3
    assert _kept(tmp_path / "s") == want
    report = verify_store(tmp_path / "s")
    assert report.ok, report.faults
    store = PrefixStore.open(tmp_path / "s")
    for s in seqs:
        keys = store.keys(s)[: store.match(s) // BS]
        assert torch.equal(
            store.read_blocks(keys).reshape(-1), torch.cat([_block_kv(k) for k in keys] or [torch.empty(0)]).reshape(-1)
        )


def test_prune_refuses_beside_a_live_writer_and_writers_refuse_beside_a_prune(tmp_path):
    seqs = _sequences(24)
    manifest = _tiny_store(tmp_path / "s", seqs)
    _with_counts(tmp_path / "s", seqs, manifest)
    before = sorted(os.listdir(tmp_path / "s" / INDEX_DIR)) + sorted(os.listdir(tmp_path / "s" / SHARDS_DIR))
    writer = StoreWriter(tmp_path / "s", manifest, "b", fsync=False)
    try:
        with pytest.raises(StoreError, match=f"being written by 1 running process.*build {writer.writer_id}"):
            prune_store(tmp_path / "s", min_records=2)
    finally:
        writer.close()
        writer.release()
    assert sorted(os.listdir(tmp_path / "s" / INDEX_DIR)) + sorted(os.listdir(tmp_path / "s" / SHARDS_DIR)) == before
    with maintenance_lock(tmp_path / "s", "prune") as pruner:
        with pytest.raises(StoreError, match=f"being pruned \\(prune {pruner}"):
            StoreWriter(tmp_path / "s", manifest, "c")
        with pytest.raises(StoreError, match="being pruned"):
            compact_store(tmp_path / "s")
        with maintenance_lock(tmp_path / "s", "gc"):  # gc runs beside anything
            pass
    assert os.listdir(tmp_path / "s" / LOCKS_DIR) == []  # every refused one gave its lock back
    assert prune_store(tmp_path / "s", min_records=2).blocks_kept > 0


def test_a_lock_probe_that_cannot_tell_says_so_and_removes_nothing(tmp_path, cli):
    """The lock "file" of a writer is a folder: opening it read-write fails (EISDIR), as opening a
    lock file read-write fails on a store another user owns. gc must say it cannot tell whether the
    writer runs, keep its files, and print no traceback."""
    _tiny_store(tmp_path / "s", _sequences(6))
    owner = "20261127T093251-4242-abcdef"
    (tmp_path / "s" / LOCKS_DIR / f"{owner}.lock").mkdir()
    tmp = temp_path(tmp_path / "s" / SHARDS_DIR / shard_name(owner, 0), owner)
    tmp.write_bytes(b"half a shard")
    result = cli("gc", tmp_path / "s")
    assert result.exit_code == 5, result.output
    assert f"cannot tell whether writer {owner}" in result.stderr and "Traceback" not in result.output
    assert tmp.exists()


def test_file_systems_where_flock_is_not_shared_are_refused_at_start():
    mounts = (
        "/dev/sda1 / ext4 rw,relatime 0 0\n"
        "srv:/export /shared nfs4 rw,vers=4.2,local_lock=none,addr=10.0.0.1 0 0\n"
        "srv:/scratch /scratch nfs rw,vers=3,nolock 0 0\n"
        "mgs@tcp:/fs /lustre lustre rw,flock 0 0\n"
        "mgs@tcp:/fs2 /lustre/local lustre rw,localflock 0 0\n"
        "mgs@tcp:/fs3 /lustre3 lustre rw 0 0\n"
    )
    for ok in ("/home/me/store", "/shared/store", "/lustre/store", "/lustre/localx/s"):
        check_file_system(Path(ok), mounts)
    for bad, why in (
        ("/scratch/store", "nfs mounted with nolock"),
        ("/lustre/local/store", "lustre mounted with localflock"),
        ("/lustre3/store", "lustre mounted with no flock option"),
    ):
        with pytest.raises(StoreError, match=why):
            check_file_system(Path(bad), mounts)
    with pytest.raises(StoreError, match="local_lock=flock"):
        check_file_system(Path("/shared/s"), mounts.replace("local_lock=none", "local_lock=flock"))


def _start_store(path: Path, mode: str, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(prepare_store(path, _manifest(), mode).to_json())
    except Exception as exc:  # reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["append", "new"])
def test_many_processes_starting_one_store_at_once_make_exactly_one(tmp_path, mode):
    """--append (as ranks joining a build do): every starter gets the one store. new: exactly one
    starter makes it, the others are told another process did."""
    ctx = multiprocessing.get_context("fork")
    procs = 8
    for round_ in range(12):
        path = tmp_path / f"s{round_}"
        barrier, results = ctx.Barrier(procs), ctx.Queue()
        children = [ctx.Process(target=_start_store, args=(path, mode, barrier, results)) for _ in range(procs)]
        for c in children:
            c.start()
        got = [results.get(timeout=60) for _ in children]
        for c in children:
            c.join(60)
        made = [g for g in got if g.startswith("{")]
        if mode == "append":
            assert len(set(got)) == 1 and made, got
        else:
            assert len(made) == 1, got
            assert all(re.search("another process created a store|already holds a store", g) for g in got if g not in made), got
        assert PrefixStore.open(path).manifest.to_json() == made[0]
        assert sorted(p.name for p in path.iterdir() if p.is_file()) == [MANIFEST_FILE]  # no temporary files left


@pytest.mark.slow
def test_no_fsync_compaction_makes_its_segment_durable_before_unlinking_the_merged_ones(tmp_path):
    """Traced system calls (strace -y names each descriptor's file): under fsync=False, the merged
    segment's file and the index folder are fsynced before the first merged segment is unlinked."""
    if subprocess.run(["strace", "-V"], capture_output=True).returncode:
        pytest.skip("strace is not installed")
    _tiny_store(tmp_path / "s", _sequences(12))
    merged = set(os.listdir(tmp_path / "s" / INDEX_DIR))
    code = f"from prefixgen.maintain.compact import compact_store; compact_store({str(tmp_path / 's')!r}, fsync=False)"
    trace = tmp_path / "trace"
    calls = "fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run(
        ["strace", "-f", "-y", "-qq", "-o", trace, "-e", f"trace={calls}", sys.executable, "-c", code], check=True, env=env
    )
    lines = [line for line in trace.read_text().splitlines() if "/s/" in line]
    unlinks = [i for i, line in enumerate(lines) if re.search(r"unlink(at)?\(", line) and any(n in line for n in merged)]
    assert len(unlinks) == len(merged), lines
    before = lines[: unlinks[0]]
    assert any(re.search(r"fsync\(\d+</.*/index/compacted-[^>]*\.tmp>", line) for line in before), lines
    assert any(re.search(r"fsync\(\d+</.*/s/index>", line) for line in before), lines
    assert any(re.search(r"rename.*compacted-.*\.tmp", line) for line in before), lines


def test_prune_max_bytes_counts_kv_as_build_does_and_shard_bytes_sizes_its_shards(tmp_path, cli):
    seqs = _sequences(24)
    manifest = _tiny_store(tmp_path / "s", seqs)
    _with_counts(tmp_path / "s", seqs, manifest)
    kv_bytes = manifest.kv.block_bytes(manifest.block_size)  # what build --max-bytes counts per block
    result = cli("prune", tmp_path / "s", "--max-bytes", str(20 * kv_bytes), "--shard-bytes", str(3 * BLOCK_BYTES))
    assert result.exit_code == 0, result.output
    assert len(_kept(tmp_path / "s")) == 20
    blocks = [ref.blocks for seg in PrefixStore.open(tmp_path / "s").index.segments for ref in seg.shards]
    assert blocks == [3] * 6 + [2]
    assert verify_store(tmp_path / "s").ok
    small = cli("prune", tmp_path / "s", "--max-bytes", str(kv_bytes - 1))
    assert small.exit_code == 2 and "smaller than one block" in small.stderr, small.output


@pytest.mark.slow
def test_the_base_record_of_a_distributed_build_and_the_manifest_are_fsynced_before_they_appear(tmp_path, stories):
    """Traced system calls: each file made by a hard link (created once among concurrent ranks) is
    fsynced under its temporary name before the link."""
    if subprocess.run(["strace", "-V"], capture_output=True).returncode:
        pytest.skip("strace is not installed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r} for r in _random_records(6, seed=2)])
    out, trace = tmp_path / "store", tmp_path / "trace"
    args = ["build", data, "--model", stories, "--out", out, "--rank", "0", "--world-size", "2", *CPU]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    strace = ["strace", "-f", "-y", "-qq", "--seccomp-bpf", "-o", trace, "-e", "trace=fsync,link,linkat"]
    subprocess.run([*strace, sys.executable, "-m", "prefixgen.cli", *map(str, args)], check=True, env=env, capture_output=True)
    lines = [line for line in trace.read_text().splitlines() if str(out) in line]
    (build_id,) = [p.stem for p in (out / "builds").glob("*.json")]
    for final in (out / MANIFEST_FILE, out / "builds" / f"{build_id}.json"):
        link = next(i for i, line in enumerate(lines) if "link" in line and f'"{final}"' in line)
        tmp = re.findall(r'"([^"]+)"', lines[link])[0]  # link(tmp, final) or linkat(dirfd, tmp, dirfd, final, 0)
        assert tmp.endswith(".tmp") and any(
            line.startswith(tuple("0123456789")) and "fsync(" in line and f"<{tmp}>" in line for line in lines[:link]
        ), lines


@pytest.mark.slow
def test_a_prune_killed_with_kill_9_blocks_nothing_and_gc_clears_what_it_left(tmp_path):
    """A prune killed mid-copy leaves its lock file (held by no one), new shards no segment names
    and maybe a temporary file: builds and compactions start all the same, gc removes all of it,
    and the next prune finishes the job."""
    seqs = _sequences(300, seed=6)
    manifest = _tiny_store(tmp_path / "s", seqs)
    counts = _with_counts(tmp_path / "s", seqs, manifest)
    compact_store(tmp_path / "s")  # so the prune soon gets to copying
    old = _kept(tmp_path / "s")
    shards = set(os.listdir(tmp_path / "s" / SHARDS_DIR))
    for delay in (0.5, 1, 2, 4, 8):
        if _run_and_kill(lambda: prune_store(tmp_path / "s", min_records=1, shard_bytes=BLOCK_BYTES), delay):
            if set(os.listdir(tmp_path / "s" / SHARDS_DIR)) - shards:
                break  # killed while copying: new shards, no segment for them yet
    else:
        pytest.fail("no kill landed in the copy phase")
    (pruner,) = {ID_PATTERN.match(n).group(0) for n in set(os.listdir(tmp_path / "s" / SHARDS_DIR)) - shards}  # its id names them
    assert (tmp_path / "s" / LOCKS_DIR / f"{pruner}.lock").exists() and not writer_is_live(tmp_path / "s", pruner)
    assert _kept(tmp_path / "s") == old and verify_store(tmp_path / "s").ok
    writer = StoreWriter(tmp_path / "s", manifest, "after", fsync=False)  # not refused by a dead prune
    writer.close()
    writer.release()
    removed = collect_garbage(tmp_path / "s").removed
    assert f"{LOCKS_DIR}/{pruner}.lock" in removed and any(r.startswith(f"{SHARDS_DIR}/{pruner}") for r in removed)
    assert set(os.listdir(tmp_path / "s" / SHARDS_DIR)) == shards and os.listdir(tmp_path / "s" / LOCKS_DIR) == []
    assert not verify_store(tmp_path / "s").notes
    prune_store(tmp_path / "s", min_records=2)
    assert _kept(tmp_path / "s") == {k for k in old if counts[k] >= 2}
