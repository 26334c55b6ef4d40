"""Prefill in batches gives every row the KV it has alone: pasts of different lengths, padding,
chunks, on every architecture the suite covers."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixgen.builder.plan import Batch, PrefillTask
from prefixgen.builder.prefill import Prefiller
from prefixgen.compat import output_cache
from prefixgen.format import block_keys, root_key

from .conftest import make_model

B = 16
# Architectures of the suite, and the RoPE variants prefixgen accepts besides the default one
# (their frequencies must not depend on the sequence length: these rows prove it).
ARCHS = {
    "llama": None,  # the real, trained stories260K
    "qwen2": {},
    "gpt_neox": {},
    "gemma": {},
    "llama_linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    "llama_yarn": {
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    },
    "llama_llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        }
    },
}


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request, tmp_path_factory, stories):
    overrides = ARCHS[request.param]
    if overrides is None:
        path = stories
    else:
        arch = request.param.split("_")[0] if request.param.startswith("llama") else request.param
        path = make_model(tmp_path_factory.mktemp("m") / request.param, arch, seed=2, initializer_range=0.1, **overrides)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def alone(model, ids: list[int]) -> torch.Tensor:
    """Single-sequence prefill of ``ids``: KV [T, L, 2, H, D]."""
    layers = output_cache(model(torch.tensor([ids]), use_cache=True)).layers
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # [L, 2, H, T, D]
    return kv.permute(3, 0, 1, 2, 4)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float32 rounding at the KV's scale (a wrong position or a leak from another row
    changes the KV by orders of magnitude more)."""
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@torch.inference_mode()
def test_one_batch_of_mixed_pasts_and_padding_gives_each_row_its_kv_alone(model):
    rng = random.Random(0)
    vocab = model.config.vocab_size
    # (past blocks, new blocks) per row: pasts of 0..4 blocks, new parts of 1..4 blocks.
    shapes = [(0, 4), (1, 2), (3, 1), (2, 3), (4, 2)]
    seqs = [[rng.randrange(3, min(vocab, 512)) for _ in range((p + n) * B)] for p, n in shapes]
    want = [alone(model, ids) for ids in seqs]
    root = root_key("00" * 32)
    known: dict[bytes, torch.Tensor] = {}  # the past: each block's KV as single-sequence prefill made it
    tasks = []
    for i, ((p, _), ids) in enumerate(zip(shapes, seqs)):
        keys = block_keys(ids, B, root)
        for j, key in enumerate(keys):
            known[key] = want[i][j * B : (j + 1) * B]
        tasks.append(PrefillTask(i, ids, p * B, keys, B))
    batch = Batch(tasks)
    assert len({t.cached for t in tasks}) > 1 and batch.padding_tokens > 0  # the case under test
    prefiller = Prefiller(model, torch.device("cpu"), lambda keys: torch.cat([known[k] for k in keys]))
    got = prefiller.run(batch)
    for task, kv, full in zip(tasks, got, want):
        assert kv.shape == full[task.cached :].shape
        assert close(kv, full[task.cached :]), f"row {task.record} (past {task.cached}) differs from its KV alone"
