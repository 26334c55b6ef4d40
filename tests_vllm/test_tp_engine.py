"""Tensor and pipeline parallelism 2 end to end on CPU: vLLM with the connector and ``tensor_parallel_size=2``
or ``pipeline_parallel_size=2`` (two worker processes, gloo) gives plain vLLM's tokens in the same layout for
stored prompts, and each rank writes only its own part of the KV: its KV head (TP), its stage's layer (PP), so
its LoadStats bytes are half the prefix's KV. The store is head-major (format 5): a TP rank also reads from disk
only its own head (LoadStats read_bytes at most 1.25 x the blocks' bytes / 2).

vLLM's CPU workers bind their OpenMP threads: the default ``VLLM_CPU_OMP_THREADS_BIND=auto`` gives each rank a
NUMA node of its own and refuses two ranks on a one-node machine ("Not enough allowed NUMA nodes to bind threads
of 2 local CPUWorkers", ``vllm/utils/ompmultiprocessing.py``), so the engines run with the allowed CPUs split in
two ranges. Both engines run in a fresh interpreter (:func:`serve` run by ``python -c``), not pytest's process: an
in-process engine run earlier leaves vLLM's distributed state there, and the worker processes fork from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import run_vllm, tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parent.parent  # the repository: the helper interpreter imports tests_vllm from it
SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
RECORDS = [SYSTEM + "Story 1: once upon a time, Tom found a cat in the park."]
PROMPTS = [
    RECORDS[0] + " Then he",  # the stored record, then new text
    SYSTEM + "Story 9: a new story about a dog.",  # only the system prompt is stored
    "The sun was hot.",  # nothing stored
]
RANKS = 2
# PP on CPU needs the compiled model: with enforce_eager vLLM 0.32.0's CPU worker skips its warm-up run
# (CPUModelRunner.warming_up_model returns at CompilationMode.NONE), where a later stage makes its
# intermediate tensors, and that stage's first step fails (`assert self.intermediate_tensors is not None`).
LAYOUTS = {
    "tp2": {"tensor_parallel_size": RANKS},
    "pp2": {"pipeline_parallel_size": RANKS, "enforce_eager": False},
}


def omp_binding() -> str:
    """VLLM_CPU_OMP_THREADS_BIND for RANKS ranks on one NUMA node: the allowed CPUs in RANKS consecutive ranges
    (``nobind`` with fewer CPUs than ranks)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < RANKS:
        return "nobind"
    n = len(cpus) // RANKS
    return "|".join(",".join(map(str, cpus[i * n : (i + 1) * n])) for i in range(RANKS))


def serve(model: str, store: str, out: str, layout: str) -> None:
    """Run PROMPTS on plain vLLM and on vLLM with the connector on ``store``, both in ``layout`` (a key of LAYOUTS),
    and write what each returned (``[plain, served]``, :class:`~tests_vllm.conftest.Run` as dicts, less the live
    stats) to ``out``."""
    runs = [run_vllm(Path(model), PROMPTS, **LAYOUTS[layout])]
    runs.append(run_vllm(Path(model), PROMPTS, store=Path(store), **LAYOUTS[layout]))
    rows = [{f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("stats", "claims")} for r in runs]
    Path(out).write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tp-model") / "qwen2")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("tp-store")
    data = write_jsonl(tmp / "text.jsonl", [{"text": r} for r in RECORDS])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(tmp / "store"), device="cpu", quiet=True))
    return tmp / "store"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_serve_stored_prefixes_each_its_own_part(tmp_path, model, store, layout):
    out = tmp_path / "runs.json"
    args = ", ".join(map(repr, (str(model), str(store), str(out), layout)))
    code = f"from tests_vllm.test_tp_engine import serve; serve({args})"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        VLLM_CPU_OMP_THREADS_BIND=omp_binding(),
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # run_vllm reads each rank's LoadStats by LLM.collective_rpc(a function)
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    plain, served = json.loads(out.read_text())

    assert served["prompt_ids"] == plain["prompt_ids"]
    assert served["outputs"] == plain["outputs"]  # token for token
    opened = PrefixStore.open(store)
    stored = [opened.match(ids[:-1]) for ids in plain["prompt_ids"]]
    assert stored[0] >= 256 and stored[1] >= 256 and stored[2] == 0
    assert served["loaded"] == stored
    assert all(cached >= n for cached, n in zip(served["cached"], stored)) and plain["cached"] == [0, 0, 0]
    # TP: one of the two KV heads; PP: one of the two layers (same dtype).
    per_rank = sum(stored) * opened.manifest.kv.bytes_per_token // RANKS
    assert len(served["rank_stats"]) == RANKS
    # Bytes read from shard files: the store is head-major (format 5), so a TP rank reads its own KV head of each
    # block (and the block's head checksums), at most 1.25 x the blocks' bytes / 2; a PP stage reads whole blocks.
    kv, bs = opened.manifest.kv, opened.block_size
    total = sum(stored) // bs * kv.block_bytes(bs)
    assert opened.manifest.format_version == 5 and kv.heads_first
    for rank in served["rank_stats"]:
        assert rank["tokens"] == sum(stored) and rank["bytes"] == per_rank
        assert rank["failed_loads"] == rank["corrupt_blocks"] == 0
        if layout == "tp2":
            assert 0 < rank["read_bytes"] <= 1.25 * total / RANKS, (rank["read_bytes"], total)
        else:
            assert rank["read_bytes"] == total
