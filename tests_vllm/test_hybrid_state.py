"""A hybrid model's stored prefix served by vLLM: the attention layers' KV and the recurrent (Gated DeltaNet) state.

A tiny random ``qwen3_next`` (one Gated DeltaNet layer, one full-attention layer, MoE), bfloat16 (vLLM's CPU GDN
kernel takes nothing else), built into a store whose states are kept every 128 tokens and where records end. vLLM's
prefix caching is off, so ``mamba_cache_mode`` is "none": a request has one state block, and a load may end on any
stored state (``integrations/vllm/states.py``).

* Greedy outputs equal plain vLLM's for prompts whose stored prefix (256 or 320 tokens) is longer than the stride;
  each load ends on the last matched block with a stored state, and its state is written (``states``).
* A damaged state (checksum) is not loaded: vLLM recomputes the prompt, and the outputs are plain vLLM's; the
  block's KV stays claimable for prompts whose claim ends on a later state.

This model's greedy tokens hardly depend on the delta-rule state (its one head's decay keeps ~1e-8 of the state per
token): a model whose state decays slowly (:func:`slow_state_model`) is the negative control, where another record's
state moves the outputs. With vLLM's prefix caching on ("align"), loads end on vLLM's Mamba block size.

On the code before, the engine did not start with the connector for this model (the store's weights digest
differed: transformers fuses the checkpoint's per-expert tensors; and the Gated DeltaNet layers, registered as KV
caches, have no K/V cache-write op).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.store.states import last_state, state_path

from .conftest import Run, make_model, run_vllm, write_jsonl
from .test_hybrid import BASE
from .test_vllm_connector import PROMPTS, STORIES, SYSTEM  # a stored record + text, the system prompt only, ...

# The live check's limit: vLLM's and transformers' bf16 K/V of the attention layer after the GDN layer differ by up to
# 0.051 relative RMS (measured on these prompts), as transformers' own bf16 differs from its float32 (0.044-0.047):
# the GDN layer's bf16 rounding, in neither engine a bug (README). The default limit (0.05) refuses some of them.
CHECK = {"check_tolerance": 0.1}
STRIDE = 128  # the store's state stride for this model (cache_spec.state_stride_tokens): 1 state ~ 66 KiB ~ 66 tokens
QWEN3_NEXT = dict(
    BASE,  # test_hybrid's: vLLM's CPU attention head size, the chat template
    num_key_value_heads=4,
    linear_num_key_heads=1,
    linear_num_value_heads=1,
    linear_key_head_dim=128,  # vLLM's CPU GDN prefill kernel takes 128 ("Unexpected head dim size, 32")
    linear_value_head_dim=128,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_experts=4,  # vLLM's Qwen3-Next needs a MoE layer (set_moe_parameters)
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    initializer_range=0.1,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """The model, its store, and plain vLLM's and the connector's runs of PROMPTS."""
    tmp = tmp_path_factory.mktemp("qwen3_next")
    return stored_runs(make_model(tmp / "model", "qwen3_next", seed=1, **QWEN3_NEXT), "bfloat16", connector_extra=CHECK)


def stored_runs(model: Path, dtype: str, **run) -> tuple[Path, Path, Run, Run]:
    """``model``, its store of the stories (``SYSTEM`` + each, a record; next to the model) and plain vLLM's and the
    connector's runs of PROMPTS in ``dtype`` (``run``: more of :func:`run_vllm`'s arguments for both)."""
    data = write_jsonl(model.parent / "text.jsonl", [{"text": SYSTEM + s} for s in STORIES])
    store = model.parent / "store"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), device="cpu", dtype=dtype, quiet=True))
    extra = run.pop("connector_extra", None)
    baseline = run_vllm(model, PROMPTS, dtype=dtype, **run)
    return model, store, baseline, run_vllm(model, PROMPTS, store=store, dtype=dtype, connector_extra=extra, **run)


def stated_prefix(store: PrefixStore, ids: list[int]) -> int:
    """Tokens of the longest stored prefix of ``ids[:-1]`` whose last block has a stored state."""
    keys = store.keys(ids[:-1])
    return last_state(store.path, keys[: store.match(ids[:-1]) // store.block_size]) * store.block_size


def test_stored_state_loads_same_tokens(hybrid):
    _, store, baseline, with_store = hybrid
    opened = PrefixStore.open(store)
    assert opened.manifest.kv.groups[0].state_stride == STRIDE
    assert with_store.outputs == baseline.outputs  # token for token
    expected = [stated_prefix(opened, ids) for ids in baseline.prompt_ids]
    assert expected[:3] == [320, 256, 320] and expected[3] == 0  # past the stride; 256: a stride state (288 stored)
    assert with_store.loaded == expected
    assert [d["states"] for d in with_store.deltas] == [1, 1, 1, 0]  # one state per load, into the GDN layer
    assert all(d["failed_states"] == 0 for d in with_store.deltas)
    assert with_store.claims.checks_passed >= 1 and with_store.claims.checks_failed == 0
    assert with_store.claims.skipped_recurrent == 0


def test_damaged_state_is_not_loaded(hybrid, tmp_path):
    """Prompt 1's state at 256 damaged (its checksum fails): that load is a failed receive (``failed_states``), vLLM
    computes the prompt whole, and the state is reported bad: later claims of the prompt end at the state before it
    (128). The block's KV is not at fault (as after a gc or prune removed its state): prompts 0 and 2, which share it,
    still load 320 tokens, ending on their own state (on the code before, the block was reported bad and they loaded
    128). The outputs are plain vLLM's."""
    model, store, baseline, _ = hybrid
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    damaged = state_path(copy, PrefixStore.open(copy).keys(baseline.prompt_ids[1])[15])
    data = bytearray(damaged.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # the SSM state's last values
    damaged.write_bytes(bytes(data))
    run = run_vllm(model, PROMPTS, store=copy, dtype="bfloat16", connector_extra=CHECK)
    assert run.stats.failed_states == 1  # once (in the warm-up): the state is reported bad, not claimed again
    assert run.claims.skipped_bad_blocks == 0
    assert run.loaded == [320, STRIDE, 320, 0] and [d["states"] for d in run.deltas] == [1, 1, 1, 0]
    assert run.outputs == baseline.outputs


def test_align_mode_loads_end_on_mamba_blocks(hybrid):
    """vLLM's prefix caching on: ``mamba_cache_mode`` "align", where a resumed prefill reads the state of the Mamba
    block ending at its computed tokens, so every load ends on a multiple of the group's block size (vLLM's block
    size: the attention groups take the Mamba page's). The outputs equal plain vLLM's with its prefix caching on."""
    model, store, _, _ = hybrid
    baseline = run_vllm(model, PROMPTS, dtype="bfloat16", prefix_caching=True, mamba_cache_mode="align")
    run = run_vllm(
        model, PROMPTS, store=store, dtype="bfloat16", prefix_caching=True, mamba_cache_mode="align", connector_extra=CHECK
    )
    assert run.outputs == baseline.outputs
    block = run.block_size
    assert block > 1 and block % PrefixStore.open(store).block_size == 0
    assert sum(run.loaded) > 0 and run.loaded[0] > 0  # the first prompt: nothing in vLLM's own cache yet
    for loaded, cached, delta in zip(run.loaded, run.cached, run.deltas):
        assert cached % block == 0  # vLLM's own hit and the load after it end on Mamba blocks
        assert delta["states"] == (1 if loaded else 0)
    assert run.claims.checks_failed == 0 and run.claims.skipped_recurrent == 0
    assert all(d["failed_states"] == 0 for d in run.deltas)


def slow_state_model(path, **config):
    """The tiny Qwen3-Next with a Gated DeltaNet state that decays slowly, so that its greedy tokens depend on the
    state. transformers draws the decay ``exp(-A * softplus(a + dt_bias))`` per token with ``A`` in [0.01, 16] and
    ``dt_bias`` 1: seed 1's one head gets ``A`` 14.4, a state that keeps ~1e-8 of itself per token, so only the conv
    state (3 tokens) carries the prefix. ``A`` 0.01 and ``dt_bias`` -4 keep ~99.98% per token."""
    import torch
    from transformers import AutoModelForCausalLM

    make_model(path, "qwen3_next", seed=1, **config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for layer in model.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.A_log.data.fill_(math.log(0.01))
            layer.linear_attn.dt_bias.data.fill_(-4.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """The slow-state model, its store, and plain vLLM's and the connector's runs of PROMPTS."""
    model = slow_state_model(tmp_path_factory.mktemp("slow") / "model", **QWEN3_NEXT)
    return stored_runs(model, "bfloat16", connector_extra=CHECK, logprobs=20)


def gap(run: dict[int, float], plain: dict[int, float]) -> float:
    """The largest difference of a first token's log-probability between two runs, over the top tokens of both."""
    return max(abs(run[t] - p) for t, p in plain.items() if t in run)


def test_wrong_state_is_what_changes_outputs(slow, tmp_path):
    """A negative control, on a model whose tokens depend on its state: prompt 0's state at 320 replaced by another
    record's after as many tokens (prompt 2's, a valid file: its checksum and token count hold). Its attention KV is
    right, so the live check (attention layers only) passes and the wrong state is loaded: the first token's
    log-probabilities move 19 times as far from plain vLLM's as with the right state (0.64 against 0.034), and the
    greedy tokens part from plain vLLM's at the 2nd token instead of the 6th.

    With the right state this model's 12 greedy tokens do not all equal plain vLLM's: loading vLLM's own state after
    the same 320 tokens gives the same tokens as the stored one, so what differs is the attention layer's bf16 K/V
    (transformers' against vLLM's, up to 0.11 on a first-token log-probability), which flips near-ties (bf16 logits
    of this random model tie within 0.06)."""
    model, store, baseline, with_store = slow
    assert with_store.loaded == [320, 256, 320, 0] and [d["states"] for d in with_store.deltas] == [1, 1, 1, 0]
    assert all(d["state_bytes"] > 0 for d in with_store.deltas[:3])
    assert with_store.claims.checks_passed >= 1 and with_store.claims.checks_failed == 0
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    opened = PrefixStore.open(copy)
    assert [stated_prefix(opened, baseline.prompt_ids[i]) for i in (0, 2)] == [320, 320]
    ours, other = (state_path(copy, opened.keys(baseline.prompt_ids[i])[320 // opened.block_size - 1]) for i in (0, 2))
    shutil.copyfile(other, ours)
    run = run_vllm(model, PROMPTS, store=copy, dtype="bfloat16", connector_extra=CHECK, logprobs=20)
    assert run.loaded[0] == 320 and run.deltas[0]["states"] == 1 and run.deltas[0]["failed_states"] == 0
    assert run.claims.checks_failed == 0  # the live check compares attention layers: it cannot see the state
    right = gap(with_store.first_logprobs[0], baseline.first_logprobs[0])
    wrong = gap(run.first_logprobs[0], baseline.first_logprobs[0])
    assert wrong > 5 * right
    assert with_store.outputs[0][:5] == baseline.outputs[0][:5] and run.outputs[0][:2] != baseline.outputs[0][:2]
    assert run.outputs[1:] == with_store.outputs[1:]  # the other prompts' loads are as before
