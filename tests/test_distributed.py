"""Distributed builds on CPU (gloo): torchrun ranks and --rank/--world-size ranks fill one store with
exactly the blocks of a one-process build, each computed once, the work balanced."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import prefixgen
from prefixgen import PrefixStore
from prefixgen.maintain.verify import verify_store

from .conftest import REPO, SYSTEM, write_jsonl
from .test_build import _cli_process, _wait_for_segments, ls_json, stored_keys

PACKAGE_DIR = Path(prefixgen.__file__).parent

CPU = ["--device", "cpu", "--dtype", "float32", "--quiet", "--no-fsync"]  # a killed process loses no page cache
WORDS = "the a cat dog sun tree big small happy sad ran jumped played saw red blue girl boy ball park home friend".split()
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def system_prompt_dataset(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Every record starts with the same system prompt (a universal prefix)."""
    rng = random.Random(seed)
    return write_jsonl(path, [{"text": SYSTEM + _words(rng, 20, 60)} for _ in range(n)])


def groups_dataset(path: Path, n: int = 160, groups: int = 8, seed: int = 1) -> Path:
    """A system prompt, then one of ``groups`` documents (RAG-style), then a question of its own."""
    rng = random.Random(seed)
    docs = [_words(rng, 40, 80) for _ in range(groups)]
    rows = [{"text": SYSTEM + docs[i % groups] + " Q: " + _words(rng, 10, 30)} for i in range(n)]
    return write_jsonl(path, [*rows, {"text": ""}])  # one empty record: skipped, and counted once


def torchrun(n: int, *args, **popen_kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "prefixgen"]
    return subprocess.Popen(
        [*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO, **popen_kw
    )


def rank_process(rank: int, world: int, *args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prefixgen", *map(str, args), "--rank", str(rank), "--world-size", str(world)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out + err


def index_entries(store_path: Path) -> int:
    return PrefixStore.open(store_path).index.entries


def assert_one_distributed_build(cli, out: Path, world: int, single: dict, balanced: bool = True) -> dict:
    """One complete build with every rank's writer; blocks computed once and balanced."""
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete" and b["world_size"] == world
    assert len(b["ranks"]) == world and len(b["writers"]) == world
    for key in ("records", "skipped_records", "truncated_records", "dataset_tokens"):
        assert b[key] == single[key], key
    # No block computed twice: the ranks prefilled exactly what is stored, as one process does.
    assert b["prefilled_tokens"] == b["stored_tokens"] == single["stored_tokens"]
    loads = [r["prefilled_tokens"] for r in b["ranks"]]
    assert not balanced or max(loads) <= 1.2 * sum(loads) / world, loads
    assert index_entries(out) * 16 == b["stored_tokens"]  # every block present once
    assert [r["plans_made"] for r in b["ranks"]].count(1) == 1 == b["plans_made"]  # one rank planned, once
    report = verify_store(out)
    assert report.ok, report.faults
    return b


@torch.inference_mode()
def assert_same_kv(a: Path, b: Path) -> None:
    """Same blocks, and the same KV within the batch-equivalence tolerance (float32)."""
    keys = sorted(stored_keys(a))
    assert set(keys) == stored_keys(b)
    kv_a, kv_b = PrefixStore.open(a).read_blocks(keys), PrefixStore.open(b).read_blocks(keys)
    assert (kv_a - kv_b).abs().max() <= 1e-5 * max(1.0, kv_a.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("world, make_dataset", [(2, system_prompt_dataset), (3, groups_dataset)], ids=["2-system", "3-groups"])
def test_torchrun_build_equals_one_process_build(tmp_path, cli, stories, world, make_dataset):
    data = make_dataset(tmp_path / "d.jsonl")
    one, many = tmp_path / "one", tmp_path / "many"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    output = finish(torchrun(world, "build", data, "--model", stories, "--out", many, "--batch-tokens", "1024", *CPU))
    b = assert_one_distributed_build(cli, many, world, single)
    assert_same_kv(one, many)
    # The shared prefix was prefilled once, in the head phase, and every rank used it as past.
    system_blocks = len(AutoTokenizer.from_pretrained(stories)(SYSTEM).input_ids) // 16
    assert system_blocks >= 1 and b["head_tokens"] >= system_blocks * 16
    assert all(r["records"] > 0 for r in b["ranks"])
    # One plan, then shares: every record is tokenized once over all ranks (not 2-3 times per rank).
    tokenized = [r["tokenized_tokens"] for r in ls_json(cli, many)["builds"][-1]["ranks"]]
    assert all(t > 0 for t in tokenized) and sum(tokenized) <= 2 * single["dataset_tokens"], tokenized
    # Each rank read about 1/N of the dataset's bytes (its share, and the line across its start),
    # not the whole of it: over the ranks, the dataset once. No rank read a byte before its share:
    # its records were numbered within it (row r of share s), and in the dataset when planned.
    size, longest = data.stat().st_size, max(map(len, data.read_bytes().splitlines(keepends=True)))
    read = [r["read_bytes"] for r in b["ranks"]]
    assert all(abs(n - size / world) <= longest + 2 for n in read), (read, size)
    assert size <= sum(read) <= size + (world - 1) * longest, (read, size)
    assert sum(r["read_records"] for r in b["ranks"]) == single["records"] + single["skipped_records"]
    assert [r["scanned_bytes"] for r in b["ranks"]] == [0] * world
    if single["skipped_records"]:  # the empty last record: named in its share by the count pass's warning
        assert re.search(rf"warning: record \d+ of share {world - 1} is empty", output), output


@pytest.mark.slow
def test_rank_flags_without_torchrun_one_after_another_and_at_once(tmp_path, cli, stories):
    data = groups_dataset(tmp_path / "d.jsonl", n=90, groups=6)
    one, seq, par = tmp_path / "one", tmp_path / "seq", tmp_path / "par"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    args = ["build", data, "--model", stories, "--out", seq, *CPU]
    assert cli(*args, "--rank", "1", "--world-size", "2").exit_code == 0  # any order
    (half,) = ls_json(cli, seq)["builds"]
    assert half["status"] == "running" and len(half["ranks"]) == 1  # rank 0 has not run yet
    assert cli(*args, "--rank", "0", "--world-size", "2").exit_code == 0
    # One after another, the rank that runs first computes every shared prefix: no balance asked.
    assert_one_distributed_build(cli, seq, 2, single, balanced=False)
    assert_same_kv(one, seq)
    # At the same time: the ranks race for the shared prefixes through claims in the store.
    procs = [rank_process(r, 2, "build", data, "--model", stories, "--out", par, *CPU) for r in range(2)]
    for p in procs:
        finish(p)
    assert_one_distributed_build(cli, par, 2, single)
    assert_same_kv(one, par)


@pytest.mark.slow
def test_ranks_with_a_limit_share_the_bytes_of_its_records(tmp_path, cli, stories):
    data = groups_dataset(tmp_path / "d.jsonl", n=90, groups=6)
    one, many = tmp_path / "one", tmp_path / "many"
    assert cli("build", data, "--model", stories, "--out", one, "--limit", 50, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    for rank in (0, 1):
        args = ["--limit", 50, "--rank", rank, "--world-size", 2]
        assert cli("build", data, "--model", stories, "--out", many, *args, *CPU).exit_code == 0
    b = assert_one_distributed_build(cli, many, 2, single, balanced=False)
    assert_same_kv(one, many)
    # Each share is about half of the first 50 records' bytes (not the whole file, not index % 2),
    # found by a scan of line ends up to their end: over the shares, those 50 records read once.
    # (Rank 0, run first and alone, claimed and counted both shares.)
    lines = data.read_bytes().splitlines(keepends=True)
    end = sum(map(len, lines[:50]))
    assert sum(r["read_records"] for r in b["ranks"]) == 50
    assert sum(r["scanned_bytes"] for r in b["ranks"]) == 2 * end  # one scan per share
    assert end <= sum(r["read_bytes"] for r in b["ranks"]) <= end + max(map(len, lines)), b["ranks"]


@pytest.mark.slow
def test_ranks_share_a_folder_of_json_files_by_files(tmp_path, cli, stories):
    rows = [json.loads(line) for line in groups_dataset(tmp_path / "d.jsonl", n=90, groups=6).read_text().splitlines()]
    folder = tmp_path / "json"  # three uneven .json files (one JSON list each): datasets reads them, 3 shards
    folder.mkdir()
    for i, part in enumerate((rows[:20], rows[20:60], rows[60:])):  # the empty record last: skipped by rank 1
        (folder / f"part-{i}.json").write_text(json.dumps(part))
    sizes = [p.stat().st_size for p in sorted(folder.iterdir())]
    one, many = tmp_path / "one", tmp_path / "many"
    assert cli("build", folder, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    finish(torchrun(2, "build", folder, "--model", stories, "--out", many, *CPU))  # each rank counts its own share
    b = assert_one_distributed_build(cli, many, 2, single, balanced=False)  # 1 of 3 files: uneven shares
    assert_same_kv(one, many)
    assert summed_counts(many) == summed_counts(one)
    # Share 0 is files 0-1, share 1 file 2 (IterableDataset.shard, contiguous): each rank read its files only.
    assert [r["read_bytes"] for r in b["ranks"]] == [sizes[0] + sizes[1], sizes[2]]
    assert [r["read_records"] for r in b["ranks"]] == [60, len(rows) - 60]
    assert [r["scanned_bytes"] for r in b["ranks"]] == [0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("select", [["--min-records", 2], ["--max-bytes", "2MB"]], ids=["min-records", "max-bytes"])
def test_selection_in_a_distributed_build_stores_what_one_process_stores(tmp_path, cli, stories, select):
    data = groups_dataset(tmp_path / "d.jsonl", n=90, groups=6)
    one, many = tmp_path / "one", tmp_path / "many"
    assert cli("build", data, "--model", stories, "--out", one, *select, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    args = ["build", data, "--model", stories, "--out", many, *select, *CPU]
    for p in [rank_process(r, 2, *args) for r in range(2)]:
        finish(p)
    # The shared blocks are heads, claimed by whichever rank comes first: no balance asked. (2MB: the 60
    # shared blocks and about 40 of records' own, which the plan deals out like any work.)
    b = assert_one_distributed_build(cli, many, 2, single, balanced=False)
    assert stored_keys(many) == stored_keys(one)  # exactly the chosen blocks
    assert summed_counts(many) == summed_counts(one)  # each with its record count in the whole dataset
    picked = ("min_records", "max_bytes", "selected_blocks", "candidate_blocks")
    assert {k: b["selection"][k] for k in picked} == {k: single["selection"][k] for k in picked}
    assert 0 < single["selection"]["selected_blocks"] < single["selection"]["candidate_blocks"]
    assert b["stored_tokens"] == 16 * single["selection"]["selected_blocks"]
    assert_same_kv(one, many)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_pid(agent: int, rank: int) -> int:
    for pid in _children(agent):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_kill_9_of_a_rank_then_resume_on_another_number_of_ranks(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=300, seed=3)
    one, out = tmp_path / "one", tmp_path / "store"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    # Small shards and batches, so that the kill lands mid-build.
    args = ["build", data, "--model", stories, "--out", out, "--shard-bytes", "100000", "--batch-tokens", "256", *CPU]
    proc = torchrun(2, *args)
    _wait_for_segments(out, 6, proc, timeout=180)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert verify_store(out).ok  # the killed rank left a store that opens and verifies
    assert 0 < index_entries(out) * 16 < single["stored_tokens"]
    # Resume on three ranks, launched without torchrun, at the same time.
    procs = [rank_process(r, 3, *args, "--resume") for r in range(3)]
    for p in procs:
        finish(p)
    assert stored_keys(out) == stored_keys(one)
    assert index_entries(out) * 16 == single["stored_tokens"]  # every block present once
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete" and b["world_size"] == 3 and len(b["ranks"]) == 3
    assert summed_counts(out) == summed_counts(one)  # torchrun resumed under --rank: every record counted once
    report = verify_store(out)
    assert report.ok, report.faults
    assert_same_kv(one, out)


def summed_counts(store: Path) -> dict[bytes, int]:
    """Records per block over every file in counts/ (what prune and ls rank blocks by)."""
    total: dict[bytes, int] = {}
    for keys, records in PrefixStore.open(store).count_arrays():
        for key, n in zip(keys, records.tolist()):
            total[key.tobytes()] = total.get(key.tobytes(), 0) + n
    return total


@pytest.mark.slow
def test_one_process_build_stopped_then_resumed_under_torchrun(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=300, seed=4)
    one = tmp_path / "one"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    want = summed_counts(one)
    small = ["--shard-bytes", "100000", "--batch-tokens", "256"]
    # One process, stopped (Ctrl-C: it records its counts so far); resumed under torchrun: the stopped
    # run's counts must not stay beside the ranks'.
    a = tmp_path / "a"
    args = ["build", data, "--model", stories, "--out", a, *small, *CPU]
    proc = _cli_process(*args)
    _wait_for_segments(a, 4, proc, timeout=180)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert list((a / "counts").glob("*.safetensors"))  # the stopped run's counts are there
    finish(torchrun(2, *args, "--resume"))
    (b,) = ls_json(cli, a)["builds"]
    assert b["status"] == "complete" and b["world_size"] == 2 and b["records"] == single["records"]
    assert summed_counts(a) == want
    assert stored_keys(a) == stored_keys(one)


@pytest.mark.slow
def test_torchrun_build_killed_then_resumed_as_one_process(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=300, seed=4)
    one = tmp_path / "one"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    small = ["--shard-bytes", "100000", "--batch-tokens", "256"]
    # torchrun, killed; resumed as one process: the rank parts must not keep the build "running".
    c = tmp_path / "c"
    args = ["build", data, "--model", stories, "--out", c, *small, *CPU]
    proc = torchrun(2, *args)
    deadline = time.monotonic() + 180
    while len(list(c.glob("builds/*.ranks/*.json"))) < 2:  # both ranks have their part: kill in the build proper
        assert time.monotonic() < deadline and proc.poll() is None, "the ranks never wrote their parts"
        time.sleep(0.05)
    _wait_for_segments(c, len(list((c / "index").glob("*.safetensors"))) + 2, proc, timeout=180)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert [r["status"] for r in ls_json(cli, c)["builds"][0]["ranks"]] != ["complete"] * 2
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    (b,) = ls_json(cli, c)["builds"]
    assert b["status"] == "complete" and b["world_size"] == 1 and not b["ranks"] and b["records"] == single["records"]
    assert summed_counts(c) == summed_counts(one)
    assert stored_keys(c) == stored_keys(one)
    assert verify_store(c).ok


@pytest.mark.slow
def test_resume_after_a_rank_is_killed_rebalances_the_work_left(tmp_path, cli, stories):
    data = groups_dataset(tmp_path / "d.jsonl", n=160, groups=8)
    one, out = tmp_path / "one", tmp_path / "store"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    killed = rank_process(1, 2, *args)
    killed.kill()  # rank 1 dies before it does anything; rank 0 alone does its share and exits
    killed.wait()
    finish(rank_process(0, 2, *args))
    before = index_entries(out) * 16
    assert 0 < before < single["stored_tokens"]
    # Resumed on two ranks: the work left (rank 1's share) is split between both, not redone by rank 1 alone.
    finish(torchrun(2, *args, "--resume"))
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete" and index_entries(out) * 16 == single["stored_tokens"]
    loads = [r["prefilled_tokens"] for r in b["ranks"]]
    assert sum(loads) == single["stored_tokens"] - before  # nothing computed twice
    assert max(loads) <= 1.3 * sum(loads) / 2, loads
    assert_same_kv(one, out)


@pytest.mark.slow
def test_rank_killed_mid_build_then_every_rank_resumed_spreads_the_work_left(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=300, seed=3)
    one, out = tmp_path / "one", tmp_path / "store"
    assert cli("build", data, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    args = ["build", data, "--model", stories, "--out", out, "--shard-bytes", "100000", "--batch-tokens", "256", *CPU]
    procs = [rank_process(r, 2, *args) for r in range(2)]
    deadline = time.monotonic() + 180
    while True:  # rank 1 has published segments of its own: kill it mid-build
        part = list(out.glob("builds/*.ranks/w2-r1.json"))
        writer = json.loads(part[0].read_text())["writers"][0] if part else "-"
        if len(list((out / "index").glob(f"{writer}-*.safetensors"))) >= 4:
            break
        assert time.monotonic() < deadline and procs[1].poll() is None, "rank 1 ended before it could be killed"
        time.sleep(0.05)
    procs[1].kill()
    procs[1].wait()
    finish(procs[0])
    before = index_entries(out) * 16
    assert 0 < before < single["stored_tokens"]
    assert ls_json(cli, out)["builds"][0]["status"] == "running"  # rank 1's part: running, its writer dead
    # Every rank relaunched with --resume, at the same time: the work left is planned anew over both.
    for p in [rank_process(r, 2, *args, "--resume") for r in range(2)]:
        finish(p)
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete"
    loads = [r["prefilled_tokens"] for r in b["ranks"]]
    assert sum(loads) == sum(r["stored_tokens"] for r in b["ranks"]) == single["stored_tokens"] - before
    assert min(loads) > 0 and max(loads) <= 1.3 * sum(loads) / 2, loads
    assert [r["attempt"] for r in b["ranks"]] == [1, 1] and b["plans_made"] == 1
    for key in ("records", "skipped_records", "truncated_records", "dataset_tokens"):
        assert b[key] == single[key], key
    assert stored_keys(out) == stored_keys(one) and index_entries(out) * 16 == single["stored_tokens"]
    assert summed_counts(out) == summed_counts(one)  # every record counted once, by the rank of the new plan
    assert verify_store(out).ok
    assert_same_kv(one, out)


SLOW_RANK = """
import os, sys, time
from prefixgen.builder import prefill
from prefixgen.cli import main
if os.environ["RANK"] == "1":  # forced skew: rank 1 takes ~1 s more per forward pass
    run = prefill.Prefiller.run
    prefill.Prefiller.run = lambda self, batch: (time.sleep(1.0), run(self, batch))[1]
sys.argv = ["prefixgen", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_rank_that_finishes_long_before_the_others_does_not_time_out(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=60)
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    args = ["build", str(data), "--model", str(stories), "--out", str(out), "--batch-tokens", "256", "--dist-timeout", "5", *CPU]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete"
    slow, fast = b["ranks"][1], b["ranks"][0]
    assert slow["stage_seconds"]["prefill"] > fast["stage_seconds"]["prefill"] + 5  # the skew was longer than the timeout


HANGING_RANK_1 = """
import sys, threading
from prefixgen.builder import distributed
from prefixgen.cli import main
count_share = distributed.count_share
def hang_on_share_1(records, tokenize, folder, share, *args, **kwargs):
    if share == 1:  # a slow live rank: it holds share 1's claim (its lease renewed) and never finishes
        threading.Event().wait()
    return count_share(records, tokenize, folder, share, *args, **kwargs)
distributed.count_share = hang_on_share_1
sys.argv = ["prefixgen", *sys.argv[1:]]
main()
"""


def patched_rank_1(tmp_path: Path, source: str, args: list) -> subprocess.Popen:
    """Rank 1 of 2 run by ``source`` (prefixgen's CLI with a function patched), started."""
    script = tmp_path / "patched_rank_1.py"
    script.write_text(source)
    cmd = [sys.executable, str(script), *map(str, args), "--rank", "1", "--world-size", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


@contextlib.contextmanager
def rank_0_waiting_for_a_live_rank_1(tmp_path: Path, args: list) -> Iterator[tuple[subprocess.Popen, subprocess.Popen]]:
    """Rank 1 of 2 claims its count share and hangs counting it, alive; yields rank 0 (and rank 1) once rank 0 has
    counted its own share and waits for rank 1's. Both are killed on the way out if still running."""
    out = Path(args[args.index("--out") + 1])
    other, me = patched_rank_1(tmp_path, HANGING_RANK_1, args), None
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("builds/*.plan/w2/claims/share-1")):  # rank 1 holds its count share
            assert time.monotonic() < deadline and other.poll() is None, "rank 1 never claimed its share"
            time.sleep(0.05)
        me = rank_process(0, 2, *args)
        while not list(out.glob("builds/*.plan/w2/share-0.npz")):  # rank 0 counted its share, now waits
            assert time.monotonic() < deadline and me.poll() is None, "rank 0 never counted its share"
            time.sleep(0.05)
        yield me, other
    finally:
        for proc in (me, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_a_killed_ranks_claim_is_taken_over_without_waiting_out_its_lease(tmp_path, cli, stories):
    from prefixgen.builder.claims import CLAIM_STALE_SECONDS

    data = system_prompt_dataset(tmp_path / "d.jsonl", n=400, seed=6)
    out = tmp_path / "store"
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    with rank_0_waiting_for_a_live_rank_1(tmp_path, args) as (me, other):
        time.sleep(1)
        assert me.poll() is None  # a live rank's claim (its lease fresh) is left to it
        other.kill()  # kill -9 while it holds share 1: its writer lock is freed, its lease is still fresh
        other.wait()
        finish(me, timeout=CLAIM_STALE_SECONDS / 2)  # rank 0 counted share 1 itself at once, then built its records
    (b,) = ls_json(cli, out)["builds"]
    rank_0 = b["ranks"][0]
    (claim,) = out.glob("builds/*.plan/w2/claims/share-1")
    assert claim.read_text().split()[0] == rank_0["writers"][0]
    assert rank_0["read_records"] == 400 and rank_0["status"] == "complete" and b["status"] == "running"


HANGING_IN_A_HEAD_RANGE = """
import sys, threading
from pathlib import Path
from prefixgen.builder import distributed
from prefixgen.cli import main
compute_runs = distributed.Ranks._compute_runs
def publish_one_run_then_hang(self, out, level, runs, *args):
    if len(runs) > 1:  # a range of several runs: publish the first (stored for all), then hang holding the claim
        compute_runs(self, out, level, runs[:1], *args)
        (Path(out) / "hung").write_text(str(len(level[runs[0]])))
        threading.Event().wait()
    compute_runs(self, out, level, runs, *args)
distributed.Ranks._compute_runs = publish_one_run_then_hang
sys.argv = ["prefixgen", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_head_range_of_a_killed_rank_is_taken_over_and_only_its_unstored_runs_computed(tmp_path, cli, stories):
    """Head runs are claimed by ranges (one claim per rank's share of a level, not one per run). Rank 1
    publishes one run of its range and hangs, alive: rank 0 leaves the range to it. kill -9 of rank 1:
    rank 0 takes the range over at once (a dead holder) and computes only the runs not stored yet;
    every rank resumed, the store holds what one process stores."""
    from prefixgen.builder.shares import Heads, load_npz

    data = groups_dataset(tmp_path / "d.jsonl", n=96, groups=24, seed=3)
    out, single = tmp_path / "store", tmp_path / "single"
    assert cli("build", data, "--model", stories, "--out", single, *CPU).exit_code == 0
    args = ["build", data, "--model", stories, "--out", out, *CPU, "--batch-tokens", "64"]
    other, me = patched_rank_1(tmp_path, HANGING_IN_A_HEAD_RANGE, args), None
    try:
        deadline = time.monotonic() + 180
        while not (out / "hung").exists():  # rank 1 alone: counted both shares, planned, holds a range of level 1
            assert time.monotonic() < deadline and other.poll() is None, "rank 1 never hung in a head range"
            time.sleep(0.05)
        me = rank_process(0, 2, *args)
        (folder,) = out.glob("claims/*/w2-a0")
        ranges = sorted(p.name for p in folder.iterdir() if re.fullmatch(r"l\d+-r\d+", p.name))
        time.sleep(3)
        assert me.poll() is None  # a live holder's range (its lease fresh) is left to it
        held = [p for p in folder.iterdir() if re.fullmatch(r"l1-r\d+", p.name) and p.read_text().startswith(_writer(out, 1))]
        assert len(held) == 1
        other.kill()  # kill -9 in the range: its writer lock is freed, its lease is still fresh
        other.wait()
        finish(me, timeout=90)  # well within the 120 s lease: taken over at once
    finally:
        for proc in (me, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    plan = load_npz(next(out.glob("builds/*.plan/w2/plan-0.npz")))
    heads = Heads(*(plan[f"head_{k}"] for k in ("keys", "parent", "depth", "tokens")))
    levels = heads.segments()
    assert len(levels[1]) >= 20 and len([n for n in ranges if n.startswith("l1-")]) <= 2  # ranges, not runs
    assert held[0].read_text().split()[0] == _writer(out, 0)  # rank 0 holds the dead rank's range now
    rank_0 = next(r for r in ls_json(cli, out)["builds"][0]["ranks"] if r["rank"] == 0)
    first_run = int((out / "hung").read_text())
    assert rank_0["head_tokens"] == (len(heads) - sum(len(r) for r in levels[0]) - first_run) * 16  # nothing twice
    procs = [rank_process(r, 2, *args, "--resume") for r in (0, 1)]
    for p in procs:
        finish(p)
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete"
    assert stored_keys(out) == stored_keys(single) and verify_store(out).ok


def _writer(out: Path, rank: int) -> str:
    """The writer id of rank ``rank``'s part of the (one) distributed build in ``out``."""
    (part,) = out.glob(f"builds/*.ranks/w2-r{rank}.json")
    return json.loads(part.read_text())["writers"][0]


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_another_rank_leaves_the_build_interrupted(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=400, seed=6)
    out = tmp_path / "store"
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    with rank_0_waiting_for_a_live_rank_1(tmp_path, args) as (me, _):
        time.sleep(1)
        assert me.poll() is None  # still waiting (no timeout)
        me.send_signal(signal.SIGINT)
        _, err = me.communicate(timeout=60)
    assert me.returncode == 130 and "Traceback" not in err, err
    (b,) = ls_json(cli, out)["builds"]
    assert b["ranks"][0]["status"] == "interrupted" and b["status"] == "interrupted"  # not "running" forever


@pytest.mark.slow
def test_gc_removes_the_plan_of_a_killed_distributed_build_and_keeps_a_live_ones(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=400, seed=6)
    out = tmp_path / "store"
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    with rank_0_waiting_for_a_live_rank_1(tmp_path, args) as (me, _):
        (plan,) = out.glob("builds/*.plan")
        result = cli("gc", out)
        assert result.exit_code == 0 and ".plan" not in result.stdout, result.output
        assert (plan / "w2" / "share-0.npz").is_file() and me.poll() is None  # a live build's plan is kept
        # Rank 0 relaunched with --resume while it still runs: refused (its work would be planned twice).
        again = rank_process(0, 2, *args, "--resume")
        said, err = again.communicate(timeout=120)
        assert again.returncode != 0 and "rank 0 of build" in err and "still running" in err, said + err
        assert "Traceback" not in err, err
        me.kill()
        me.wait()
    # Every rank is dead and none completed: a resume would count and plan again; the plan is garbage.
    result = cli("gc", out, "--dry-run")
    assert result.exit_code == 0 and f"would remove builds/{plan.name}/ (plan of a dead distributed build)" in result.stdout
    assert plan.is_dir()
    result = cli("gc", out)
    assert result.exit_code == 0 and f"removed builds/{plan.name}/" in result.stdout, result.output
    assert not plan.exists() and not list((out / "builds").glob(".gc-*"))
    assert verify_store(out).ok
    # Resumed, the ranks count and plan again, and the build completes.
    for p in [rank_process(r, 2, *args, "--resume") for r in range(2)]:
        finish(p)
    (b,) = ls_json(cli, out)["builds"]
    assert b["status"] == "complete" and b["records"] == 400 and b["plans_made"] == 1
    assert verify_store(out).ok


HELD_AFTER_ITS_LOCK = """
import sys, time
from pathlib import Path
from prefixgen.builder import distributed
from prefixgen.cli import main
attach = distributed.Ranks.attach
def held(self, *args, **kwargs):  # its writer lock taken, its record room kept; no part, no claim of it yet
    Path({held!r}).touch()
    while not Path({go!r}).exists():
        time.sleep(0.05)
    return attach(self, *args, **kwargs)
distributed.Ranks.attach = held
sys.argv = ["prefixgen", *sys.argv[1:]]
main()
"""


def _files(out: Path) -> dict[str, int]:
    """Every file of the store's build records, count shares, plans, claims and counts, with its size."""
    return {
        str(p.relative_to(out)): p.stat().st_size
        for d in ("builds", "counts", "claims")
        for p in (out / d).rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3], ids=["one-process", "3-ranks"])
def test_a_resume_on_another_world_size_is_refused_while_a_rank_holds_only_its_lock(tmp_path, cli, stories, world):
    """A rank that holds its writer lock but has written no part yet is live: a --resume with another
    number of ranks (or as one process) is refused, and removes nothing the rank will use."""
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=120, seed=7)
    out = tmp_path / "store"
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    finish(rank_process(0, 2, *args))  # rank 0 of 2 alone: counts every share, plans, builds its records
    held, go = tmp_path / "held", tmp_path / "go"
    rank_1 = patched_rank_1(tmp_path, HELD_AFTER_ITS_LOCK.format(held=str(held), go=str(go)), args)
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert time.monotonic() < deadline and rank_1.poll() is None, "rank 1 never took its lock"
            time.sleep(0.05)
        before = _files(out)
        assert any(".w2-r1.json.reserve." in name for name in before), before  # rank 1's room: all there is of it
        ranks = ["--rank", "0", "--world-size", str(world)] if world > 1 else []
        other = subprocess.run(
            [sys.executable, "-m", "prefixgen", *map(str, args), "--resume", *ranks],
            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert other.returncode != 0 and "rank 1 of 2 of build" in other.stderr and "still running" in other.stderr, (
            other.stdout + other.stderr
        )
        assert "Traceback" not in other.stderr, other.stderr
        assert _files(out) == before  # nothing of the live launch removed (nor anything of the refused one left)
        go.touch()
        finish(rank_1)
    finally:
        if rank_1.poll() is None:
            rank_1.kill()
            rank_1.wait()
    (b,) = ls_json(cli, out)["builds"]  # rank 1 built by the plan it was given: the build of 2 ranks completes
    assert b["status"] == "complete" and b["world_size"] == 2 and b["records"] == 120, b
    assert not list(out.glob("builds/*.plan")) and verify_store(out).ok


@pytest.mark.slow
def test_gc_keeps_the_plan_of_a_dead_build_while_a_rank_resuming_it_holds_only_its_lock(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=400, seed=6)
    out = tmp_path / "store"
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    with rank_0_waiting_for_a_live_rank_1(tmp_path, args) as (me, other):
        for proc in (me, other):
            proc.kill()
            proc.wait()
    (plan,) = out.glob("builds/*.plan")  # every rank dead, none complete: garbage, until a rank resumes it
    held, go = tmp_path / "held", tmp_path / "go"
    rank_1 = patched_rank_1(tmp_path, HELD_AFTER_ITS_LOCK.format(held=str(held), go=str(go)), [*args, "--resume"])
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert time.monotonic() < deadline and rank_1.poll() is None, "rank 1 never took its lock"
            time.sleep(0.05)
        result = cli("gc", out)  # (the killed ranks' temporary files go)
        assert result.exit_code == 0 and "(plan of a dead distributed build)" not in result.stdout, result.output
        assert (plan / "w2" / "share-0.npz").is_file()  # the resuming rank's plan is kept
    finally:
        rank_1.kill()
        rank_1.wait()


WRAPPER = """
import os, sys
from prefixgen.cli import main
sys.argv = ["prefixgen", *sys.argv[1:]]
rank = os.environ["RANK"]
sys.argv = [a.replace("RANK", rank) for a in sys.argv]
main()
"""


@pytest.mark.slow
def test_store_not_shared_by_every_rank_fails_fast_on_every_rank(tmp_path, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=10)
    script = tmp_path / "per_rank_out.py"
    script.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    start = time.monotonic()
    # Each rank gets its own --out (as when the path is on a node-local disk): none may go on.
    proc = subprocess.run(
        [*cmd, "build", str(data), "--model", str(stories), "--out", str(tmp_path / "store-RANK"), *CPU],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("does not see the store rank 0 prepared") >= 2, proc.stderr  # said by every rank
    # No traceback from the ranks: no frame of prefixgen's own code (torchrun prints its own summary, whose
    # frames are torch's; the check must not depend on the name of the folder the repository is in).
    assert f'File "{PACKAGE_DIR}' not in proc.stderr, proc.stderr
    # A store no rank can write: every rank fails with rank 0's message.
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    proc = subprocess.run(
        [*cmd, "build", str(data), "--model", str(stories), "--out", str(blocked), *CPU],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0 and proc.stderr.count("rank 0 on") >= 2, proc.stderr
    assert time.monotonic() - start < 110


def test_rank_flags_are_checked(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=4)
    out = tmp_path / "s"
    for flags, message in [(["--rank", "0"], "go together"), (["--rank", "2", "--world-size", "2"], "must be in 0..1")]:
        result = cli("build", data, "--model", stories, "--out", out, *CPU, *flags)
        assert result.exit_code != 0 and message in result.stderr
    assert cli("build", data, "--model", stories, "--out", out, *CPU).exit_code == 0
    # A rank joins a store only when it holds nothing but its own build, and never erases it.
    other = system_prompt_dataset(tmp_path / "other.jsonl", n=4, seed=5)
    for flags, message in [([], "already holds a store"), (["--overwrite"], "remove the store first")]:
        result = cli("build", other, "--model", stories, "--out", out, *CPU, "--rank", "0", "--world-size", "2", *flags)
        assert result.exit_code != 0 and message in result.stderr, result.output


def test_rerunning_a_finished_rank_is_a_no_op_whatever_its_tuning_flags(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=6)
    out = tmp_path / "s"
    args = ["build", data, "--model", stories, "--out", out, *CPU]
    for rank in (1, 0):
        assert cli(*args, "--rank", rank, "--world-size", "2", "--batch-tokens", 512).exit_code == 0
    (done,) = ls_json(cli, out)["builds"]
    assert done["status"] == "complete"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # The same command again, or with other per-GPU tuning flags: the same build, already complete.
    for flags in ([], ["--batch-tokens", "1024", "--write-threads", "1", "--sort-window", "4", "--prefix-cache-bytes", "1MB"]):
        result = cli(*args, "--rank", "1", "--world-size", "2", *flags)
        assert result.exit_code == 0, result.output
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert ls_json(cli, out)["builds"] == [done]


def test_gc_keeps_the_plan_of_a_build_whose_other_ranks_are_still_to_run(tmp_path, cli, stories):
    data = system_prompt_dataset(tmp_path / "d.jsonl", n=6)
    out = tmp_path / "s"
    args = ["build", data, "--model", stories, "--out", out, *CPU, "--world-size", 2]
    assert cli(*args, "--rank", 1).exit_code == 0  # no writer is live, but rank 0 has yet to build by this plan
    (plan,) = out.glob("builds/*.plan")
    result = cli("gc", out)
    assert result.exit_code == 0 and ".plan" not in result.stdout and (plan / "w2" / "plan-0.npz").is_file()
    assert cli(*args, "--rank", 0).exit_code == 0
    assert ls_json(cli, out)["builds"][0]["status"] == "complete" and not plan.exists()


@dataclass
class _Writer:
    """What the plan step uses of a rank's writer: its id and whether it fsyncs."""

    writer_id: str
    fsync: bool = False


def test_ranks_reaching_the_plan_together_make_it_once(tmp_path, cli, stories):
    from prefixgen.builder.distributed import Ranks
    from prefixgen.format import PLAN_SUFFIX, BuildRecord
    from prefixgen.store.reader import read_manifest

    data = groups_dataset(tmp_path / "d.jsonl", n=60, groups=4)
    out = tmp_path / "s"
    # Rank 1 alone: it counts both shares and plans; the build waits for rank 0, its plan folder stays.
    assert cli("build", data, "--model", stories, "--out", out, *CPU, "--rank", 1, "--world-size", 2).exit_code == 0
    (folder,) = out.glob(f"builds/*{PLAN_SUFFIX}/w2")
    (part,) = out.glob("builds/*.ranks/w2-r1.json")
    assert json.loads(part.read_text())["plans_made"] == 1
    (folder / "plan-0.npz").unlink()
    (folder / "claims" / "plan-0").unlink(missing_ok=True)
    # Four ranks reach the plan step at the same moment: one makes the plan, the others read it.
    manifest, start = read_manifest(out), threading.Barrier(4)
    records = [BuildRecord("b", "d") for _ in range(4)]
    plans: list[dict] = [{}] * 4

    def rank(i: int) -> None:
        ranks = Ranks(i % 2, 2)
        start.wait()
        ranks._read_plan(folder, out, manifest, _Writer(f"w-{i}"), records[i])
        plans[i] = ranks.plan

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.plans_made for r in records) == [0, 0, 0, 1]
    maker = [f"w-{i}" for i, r in enumerate(records) if r.plans_made]
    assert all(str(p["planner"]) == maker[0] for p in plans)  # every rank read the one plan


def test_a_claim_is_taken_over_once_and_only_when_its_lease_is_stale(tmp_path):
    from prefixgen.builder.claims import _claim

    claim = tmp_path / "segment"
    assert _claim(claim, "a") and _claim(claim, "a")  # taken; its holder holds it still
    assert not _claim(claim, "b")  # a fresh lease is not taken over
    old = claim.stat().st_mtime - 1000
    os.utime(claim, (old, old))  # "a" stopped renewing its lease
    assert _claim(claim, "b")  # taken over...
    assert not _claim(claim, "c")  # ...by one rank only: "b" holds a fresh lease now
    assert claim.read_text().split()[0] == "b"
    os.utime(claim, (old, old))
    assert (claim.parent / "segment.takeover-a").exists()
    assert _claim(claim, "c") and not _claim(claim, "b")  # "b" died in turn: one takeover of "b"


def test_a_dead_holders_claim_is_taken_over_at_once(tmp_path):
    """A claim whose holder's writer lock is free (its process died) is taken over without waiting
    out its lease; a live holder's fresh claim is not."""
    from prefixgen.builder.claims import _claim, _Holders
    from prefixgen.store.writer import WriterLock, new_id

    live, dead, me, other = ids = [new_id() for _ in range(4)]  # writer ids, as ranks claim with
    locks = {i: WriterLock(tmp_path, i) for i in ids}
    claims = tmp_path / "claims"
    claims.mkdir()
    assert _claim(claims / "a", live) and _claim(claims / "b", dead)
    os.close(locks[dead]._fd)  # what the kernel does when "dead" is killed: the lock is free, its file stays
    locks[dead]._fd = None
    holders = _Holders(tmp_path)
    assert not _claim(claims / "a", me, holders=holders)  # a live holder's fresh lease
    assert _claim(claims / "b", me, holders=holders)  # a dead holder's fresh lease: at once
    assert not _claim(claims / "b", other, holders=_Holders(tmp_path))  # "me" holds it now, alive
    assert not _claim(claims / "b", other)  # and by the lease alone, as before
    # A claim just created, its holder's id not written yet, or part of an id: no lock to ask, the lease decides.
    for text in ("", live[:12]):
        (claims / "c").write_text(text)
        assert not _claim(claims / "c", me, holders=_Holders(tmp_path))
    for lock in locks.values():
        lock.release()


def test_a_levels_head_runs_are_claimed_as_at_most_world_ranges():
    import numpy as np

    from prefixgen.builder.claims import HEAD_RANGE_TOKENS, head_ranges

    rng = np.random.default_rng(0)
    for runs, world in [(100_000, 1000), (10, 3), (7, 64), (1, 2), (5000, 8)]:
        blocks = rng.integers(1, 40, runs)
        ranges = head_ranges(blocks, world)
        assert np.array_equal(np.concatenate(ranges), np.arange(runs))  # every run once, in order
        assert len(ranges) <= world  # claims per level: at most one per rank, however many runs
        assert [r.tolist() for r in head_ranges(blocks, world)] == [r.tolist() for r in ranges]  # the same on every rank
    # A level too large for a rank's share to be one claim is cut at HEAD_RANGE_TOKENS (a long run stays whole).
    blocks = np.full(10_000, 64)
    ranges = head_ranges(blocks, 2)
    assert len(ranges) == -(-10_000 * 64 * 16 // HEAD_RANGE_TOKENS)  # 10 ranges of 1 Mi tokens, the last shorter
    assert [len(r) for r in head_ranges(np.array([1, 10_000_000, 1]), 2)] == [2, 1]


def test_heads_are_cut_into_branch_free_runs_by_level():
    import numpy as np

    from prefixgen.builder.shares import Heads
    from prefixgen.format import hash_block

    root = bytes(32)
    keys, rows = {}, []

    def add(name, parent_name, depth):
        parent = keys[parent_name] if parent_name else root
        keys[name] = hash_block(parent, [depth, len(keys)])
        rows.append((keys[name], parent, [depth, len(keys)]))

    # system prompt s0-s1, then documents a (a0-a1, then a branch into a2x / a2y) and b (b0)
    for name, parent, depth in [("s0", None, 0), ("s1", "s0", 1), ("a0", "s1", 2), ("a1", "a0", 3), ("b0", "s1", 2)]:
        add(name, parent, depth)
    add("a2x", "a1", 4)
    add("a2y", "a1", 4)
    rows += rows[:3]  # the same blocks seen again (in another record or share): one row each

    def column(i):
        return np.array([np.frombuffer(r[i], np.uint8) for r in rows])

    heads = Heads.build(column(0), column(1), np.array([r[2][0] for r in rows]), np.array([r[2] for r in rows], np.uint32))
    assert len(heads) == 7
    name_of = {k: n for n, k in keys.items()}
    named = [sorted(tuple(name_of[heads.keys[r].tobytes()] for r in run) for run in level) for level in heads.segments()]
    assert named == [[("s0", "s1")], [("a0", "a1"), ("b0",)], [("a2x",), ("a2y",)]]
    row = int(np.flatnonzero((heads.keys == np.frombuffer(keys["a2y"], np.uint8)).all(axis=1))[0])
    chain_keys, tokens = heads.chain(row)
    assert chain_keys == [keys[n] for n in ("s0", "s1", "a0", "a1", "a2y")] and len(tokens) == 10


def test_rank_parts_merge_into_one_build():
    from prefixgen.format import BuildRecord, merge_rank_parts

    base = BuildRecord("b", "d", world_size=3)
    parts = [BuildRecord("b", "d", status="complete", world_size=3, rank=r, records=r + 1, writers=[f"w{r}"]) for r in (2, 0)]
    half = merge_rank_parts(base, parts)
    assert half.status == "running" and half.records == 4 and half.writers == ["w0", "w2"]  # rank 1 has not finished
    parts.append(BuildRecord("b", "d", status="complete", world_size=3, rank=1, records=2, writers=["w1"]))
    done = merge_rank_parts(base, parts)
    assert done.status == "complete" and done.records == 6 and [r["rank"] for r in done.ranks] == [0, 1, 2]
    parts[0].status = "failed"
    assert merge_rank_parts(base, parts).status == "failed"
    parts[0].status, parts[1].attempt = "complete", 1  # rank 0 completed a newer attempt: ranks 1, 2 have its work to do
    assert merge_rank_parts(base, parts).status == "running"
    assert [r["attempt"] for r in merge_rank_parts(base, parts).ranks] == [1, 0, 0]


def test_a_plan_from_shares_numbered_within_them_equals_one_from_dataset_indices(tmp_path, stories):
    """Ranks number a .jsonl share's records within it (reading nothing before it); the plan gives
    them the indices in the dataset, as if each rank had counted the records before its share."""
    import numpy as np

    from prefixgen.builder.shares import count_share, make_plan
    from prefixgen.data.records import RecordTokenizer
    from prefixgen.data.source import read_share
    from prefixgen.format import BlockHash, BuildRecord

    data = groups_dataset(tmp_path / "d.jsonl", n=60, groups=4)  # 61 records: the last one empty (skipped)
    tokenizer, root = AutoTokenizer.from_pretrained(stories), BlockHash(bytes(32))
    plans, warnings = {}, []
    for local in (True, False):
        folder = tmp_path / f"local-{local}"
        folder.mkdir()
        for share in range(3):
            tokenize = RecordTokenizer(tokenizer, BuildRecord("", ""), 1024, warn=warnings.append)
            records = read_share(str(data), "text", share, 3, local_index=local)
            count_share(records, tokenize, folder, share, root, 16, "w0", fsync=False)
        plans[local] = make_plan(folder, 3, root, 16, lambda keys: [False] * len(keys))
    assert plans[True]["index"].tolist() == list(range(60))
    for key in ("index", "share", "row", "work", "owner", "head_keys", "head_owner"):
        assert np.array_equal(plans[True][key], plans[False][key]), key
    # The empty record (the last of share 2) is named by its row in share 2 when numbered locally.
    row = int((plans[True]["share"] == 2).sum())
    assert [w.split(" is ")[0] for w in warnings] == [f"warning: record {row} of share 2", "warning: record 60"]
    # Shares spilled before share-local numbering (no "rows", no "local") hold indices in the dataset.
    for share in range(3):
        path = tmp_path / "local-False" / f"share-{share}.npz"
        with np.load(path) as meta:
            old = {k: meta[k] for k in meta.files if k not in ("rows", "local")}
        np.savez(path, **old)
    assert np.array_equal(
        make_plan(tmp_path / "local-False", 3, root, 16, lambda keys: [False] * len(keys))["index"], plans[True]["index"]
    )


@pytest.mark.parametrize("select", [False, True], ids=["all", "min-records"])
def test_a_plan_made_in_bounded_slices_equals_one_made_at_once(tmp_path, stories, monkeypatch, select):
    """The planner sums the shares' counts a key64 slice at a time and reads their blocks a chunk of
    records at a time (memory bounded whatever the dataset's size): the plan is the same with
    slices of one row and chunks of one record as with everything at once."""
    import numpy as np

    from prefixgen.builder import shares
    from prefixgen.builder.selection import Selection
    from prefixgen.data.records import RecordTokenizer
    from prefixgen.data.source import read_share
    from prefixgen.format import BlockHash, BuildRecord

    data = groups_dataset(tmp_path / "d.jsonl", n=90, groups=6)
    tokenizer, root = AutoTokenizer.from_pretrained(stories), BlockHash(bytes(32))
    for share in range(3):
        tokenize = RecordTokenizer(tokenizer, BuildRecord("", ""), 1024)
        records = read_share(str(data), "text", share, 3, local_index=True)
        shares.count_share(records, tokenize, tmp_path, share, root, 16, "w0", fsync=False)

    def chosen(counts):  # blocks in 2 or more records, at most 40 (a prefix-closed choice, as --max-bytes makes)
        return Selection(counts.subset(counts.select(min_records=2, max_blocks=40)), 2, None, len(counts), 0.0)

    def stored(keys):  # a third of the blocks already stored: no work
        return [k[0] % 3 == 0 for k in keys]

    whole = shares.make_plan(tmp_path, 3, root, 16, stored, chosen if select else None)
    assert len(whole["head_keys"]) > 20 and (whole["work"] > 0).any() != select
    monkeypatch.setattr(shares, "PLAN_BUCKET_ROWS", 1)
    monkeypatch.setattr(shares, "PLAN_CHUNK_BLOCKS", 1)
    sliced = shares.make_plan(tmp_path, 3, root, 16, stored, chosen if select else None)
    assert whole.keys() == sliced.keys()
    for key in whole:
        assert np.array_equal(whole[key], sliced[key]), key
