"""``kv_head_range`` against vLLM's own tensor-parallel split: four CPU processes (gloo) form vLLM's tensor
parallel groups of sizes 1, 2 and 4, each builds vLLM's ``QKVParallelLinear`` and loads a K projection whose
rows say which KV head they belong to, and the heads each rank ends up holding are compared with
``kv_head_range(total, tp, rank)``."""

from __future__ import annotations

import socket
import time

import torch

from prefixgen.integrations.vllm import kv_head_range

WORLD = 4
HEAD_SIZE = 2
Q_HEADS = 8


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

    found = {}
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
                found[(tp, tp_rank, kv_heads)] = mine.long().tolist()
            destroy_model_parallel()
    results.put(found)


def test_kv_head_range_is_vllms_partition():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("fork").SimpleQueue()
    # fork: the children share this process's imported vLLM (spawning four fresh interpreters takes a minute+)
    procs = mp.start_processes(_rank_heads, args=(port, results), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not procs.join(timeout=5):
        assert time.monotonic() < deadline, "the tensor-parallel processes did not finish"
    vllm_split = {}
    for _ in range(WORLD):
        vllm_split.update(results.get())
    assert len(vllm_split) == (1 + 2 + 4) * 4  # tp ranks of tp sizes 1, 2, 4, each with 4 KV head counts
    for (tp, rank, kv_heads), heads in sorted(vllm_split.items()):
        assert list(kv_head_range(kv_heads, tp, rank)) == heads, (tp, rank, kv_heads)
