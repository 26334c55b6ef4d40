"""``kv_head_range`` against vLLM's own tensor-parallel split: four CPU processes (gloo) form vLLM's tensor
parallel groups of sizes 1, 2 and 4, each builds vLLM's ``QKVParallelLinear`` and loads a K projection whose
rows say which KV head they belong to, and the heads each rank ends up holding are compared with
``kv_head_range(total, tp, rank)``.

The ranks are forked from a fresh interpreter (:func:`vllm_partition` run by ``python -c``), not from pytest's
process: an in-process engine run earlier (test_vllm_connector.py) leaves vLLM's world group set up there, and
forked children inheriting it fail to form their own groups."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from prefixgen.integrations.vllm import kv_head_range

WORLD = 4
HEAD_SIZE = 2
Q_HEADS = 8
ROOT = Path(__file__).resolve().parent.parent  # the repository: the helper interpreter imports tests_vllm from it


def _rank_heads(rank: int, port: int, results) -> None:
    """In one process: per (tp size, tp rank, total KV heads), the KV heads vLLM's QKVParallelLinear gives this rank."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        destroy_model_parallel,
        get_tensor_model_parallel_rank,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.layers.linear import QKVParallelLinear

    found = []
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(WORLD, rank, f"tcp://127.0.0.1:{port}", rank, backend="gloo")
        for tp in (1, 2, 4):
            initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=WORLD // tp)
            tp_rank = get_tensor_model_parallel_rank()
            for kv_heads in (1, 2, 4, 8):
                layer = QKVParallelLinear(8, HEAD_SIZE, Q_HEADS, kv_heads, bias=False, params_dtype=torch.float32)
                # the checkpoint's k_proj: [kv_heads * head_size, hidden], each row holding its head's number
                k_proj = torch.arange(kv_heads).repeat_interleave(HEAD_SIZE)[:, None].float().expand(-1, 8).contiguous()
                layer.weight.weight_loader(layer.weight, k_proj, "k")
                q_rows, k_rows = layer.num_heads * HEAD_SIZE, layer.num_kv_heads * HEAD_SIZE
                mine = layer.weight.data[q_rows : q_rows + k_rows, 0].view(-1, HEAD_SIZE)[:, 0]
                found.append([tp, tp_rank, kv_heads, mine.long().tolist()])
            destroy_model_parallel()
    results.put(found)


def vllm_partition(out: str) -> None:
    """Run the WORLD ranks (forked from this process, which must not have set up vLLM's distributed state) and
    write ``[[tp, tp_rank, kv_heads, heads], ...]`` as JSON to ``out``."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("fork").SimpleQueue()
    # fork: the ranks share this interpreter's imported vLLM (spawning four fresh interpreters takes a minute+)
    procs = mp.start_processes(_rank_heads, args=(port, results), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            raise TimeoutError("the tensor-parallel processes did not finish")
    Path(out).write_text(json.dumps([row for _ in range(WORLD) for row in results.get()]))


def test_kv_head_range_is_vllms_partition(tmp_path):
    out = tmp_path / "split.json"
    code = f"from tests_vllm.test_head_split import vllm_partition; vllm_partition({str(out)!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    vllm_split = {(tp, rank, kv_heads): heads for tp, rank, kv_heads, heads in json.loads(out.read_text())}
    assert len(vllm_split) == (1 + 2 + 4) * 4  # tp ranks of tp sizes 1, 2, 4, each with 4 KV head counts
    for (tp, rank, kv_heads), heads in sorted(vllm_split.items()):
        assert list(kv_head_range(kv_heads, tp, rank)) == heads, (tp, rank, kv_heads)
