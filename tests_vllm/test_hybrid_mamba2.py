"""A Mamba2 hybrid's stored prefix served by vLLM: Granite 4.0 (``granitemoehybrid``), one Mamba2 layer and one
attention layer, float32 (vLLM 0.32.0's CPU build runs its Mamba2 layers with its PyTorch/C++ CPU ops:
``ops/cpu/mamba_ssm.py``, ``ops/cpu/causal_conv1d.py``, ``selective_state_update_cpu``). vLLM's prefix caching
off ("none"): a load may end on any stored state; the Mamba2 state is copied as the store keeps it
(``[heads, head_dim, d_state]``, ``integrations/vllm/states.py``)."""

from __future__ import annotations

import shutil

import pytest

from prefixgen import PrefixStore
from prefixgen.store.states import state_path

from .conftest import CHAT_TEMPLATE, make_model, run_vllm
from .test_hybrid_state import stored_runs
from .test_vllm_connector import PROMPTS

GRANITE = dict(
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,  # head_dim 64: vLLM's CPU attention kernels
    max_position_embeddings=2048,
    num_hidden_layers=2,
    layer_types=["mamba", "attention"],
    mamba_n_heads=8,
    mamba_d_head=64,
    mamba_n_groups=1,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    num_local_experts=0,
    shared_intermediate_size=256,
    initializer_range=0.1,
    chat_template=CHAT_TEMPLATE,
)


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    return stored_runs(make_model(tmp_path_factory.mktemp("granite") / "model", "granitemoehybrid", seed=1, **GRANITE), "float32")


def test_mamba2_state_loads_same_tokens(granite):
    _, _, baseline, with_store = granite
    assert with_store.outputs == baseline.outputs
    assert with_store.loaded[0] > 0 and with_store.deltas[0]["states"] == 1 and with_store.deltas[0]["state_bytes"] > 0
    assert all(d["failed_states"] == 0 for d in with_store.deltas)
    assert with_store.claims.checks_failed == 0 and with_store.claims.skipped_recurrent == 0


def test_wrong_mamba2_state_changes_outputs(granite, tmp_path):
    """Prompt 0's state at 320 replaced by prompt 2's after as many tokens (a valid file): the live check (attention
    layers) passes, the wrong state is loaded and prompt 0's greedy tokens part from plain vLLM's at the 3rd: the
    outputs equal plain vLLM's above because the state the connector writes is the one vLLM reads."""
    model, store, baseline, with_store = granite
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    opened = PrefixStore.open(copy)
    ours, other = (state_path(copy, opened.keys(baseline.prompt_ids[i])[320 // opened.block_size - 1]) for i in (0, 2))
    shutil.copyfile(other, ours)
    run = run_vllm(model, PROMPTS, store=copy)
    assert run.loaded[0] == 320 and run.deltas[0]["states"] == 1 and run.claims.checks_failed == 0
    assert run.outputs[0] != baseline.outputs[0]
    assert run.outputs[1:] == baseline.outputs[1:]
