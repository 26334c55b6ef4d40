"""The connector serves only KV the engine itself computes (issue 25).

At start, the store's identity against vLLM's engine: KV dtype, weights as run (quantization, load format), every
field of the effective text config (hf_overrides included); refusals are checked on the real ``VllmConfig``
without starting an engine. Live, in real engines: nothing is loaded before vLLM computed a stored prefix and its
own paged KV matched the store's; weights changed in place (``collective_rpc``), with and without
``reset_prefix_cache(reset_connector=True)``, give plain vLLM's tokens with the same change; a bfloat16 store in a
bfloat16 engine loads with no false alarm.
"""

from __future__ import annotations

import json

import pytest

from prefixgen import PrefixStore
from prefixgen.errors import IncompatibleStoreError
from prefixgen.format import MANIFEST_FILE

from .conftest import build_store, copy_store, greedy, start_engine, stop_engine, tiny_model
from .test_refusals import connector, engine_config

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
RECORDS = [
    SYSTEM + f"Story {i}: once upon a time, {name} found a {thing} in the park."
    for i, (name, thing) in enumerate([("Lily", "ball"), ("Tom", "cat"), ("Mia", "tree"), ("Ben", "boat"), ("Sam", "kite")])
]
PROMPTS = [r + " Then" for r in RECORDS]
NORM = "model.layers.1.input_layernorm.weight"  # used as is by vLLM's CPU RMSNorm (linear weights are packed copies)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Qwen2 whose logits are of real size (initializer_range 0.2): a changed layer changes greedy tokens."""
    return tiny_model(tmp_path_factory.mktemp("models") / "qwen2", initializer_range=0.2)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    return build_store(tmp_path_factory.mktemp("store") / "store", model, RECORDS)


# ---------------------------------------------------------------------------------------------- start-time identity


def test_kv_dtype_is_compared_and_cast_only_when_named(model, store):
    """A float32 store in a bfloat16 engine is refused, naming the cast option; with it, the engine starts."""
    with pytest.raises(IncompatibleStoreError, match="KV dtype: the store holds float32 KV, vLLM computes bfloat16") as info:
        connector(engine_config(model, store, dtype="bfloat16"))
    assert "cast_kv_dtype" in str(info.value)
    config = engine_config(model, store, dtype="bfloat16")
    config.kv_transfer_config.kv_connector_extra_config["cast_kv_dtype"] = True
    connector(config)


def test_a_float32_checkpoint_built_in_float16_is_served_by_a_float16_engine(model, tmp_path):
    """The build digests the weights rounded to float16; the connector digests the checkpoint's float32 files as vLLM
    loads them (in float16), not rounded to bfloat16 once, or it refuses the store ("weights_digest")."""
    build_store(tmp_path / "s", model, RECORDS[:1], dtype="float16")
    connector(engine_config(model, tmp_path / "s", dtype="float16"))
    with pytest.raises(IncompatibleStoreError, match="weights_digest"):  # still refused in float32: other weights
        connector(engine_config(model, tmp_path / "s", dtype="float32"))


def test_hf_overrides_of_any_config_field_are_refused(model, store):
    """hf_overrides of a field no list named before (rms_norm_eps) changes KV: refused, naming the field."""
    with pytest.raises(IncompatibleStoreError, match=r"text_config\.rms_norm_eps: store has 1e-06, model has 0\.5"):
        connector(engine_config(model, store, hf_overrides={"rms_norm_eps": 0.5}))


def test_weights_not_run_as_stored_are_refused(model, store):
    """Weights vLLM does not read from the checkpoint's safetensors as they are: a dummy load format."""
    with pytest.raises(IncompatibleStoreError, match="load format 'dummy'"):
        connector(engine_config(model, store, load_format="dummy"))


def test_quantized_weights_are_refused(model, store):
    """Online weight quantization (weights the store was not built with): refused, naming it. Made on the config
    vLLM makes without quantization, set afterwards: vLLM's CPU platform refuses fp8 itself at config time."""
    config = engine_config(model, store)
    config.model_config.quantization = "fp8"
    with pytest.raises(IncompatibleStoreError, match="weights quantization 'fp8'"):
        connector(config)


def test_store_without_text_config_is_refused_naming_the_fix(tmp_path, model, store):
    """A store built before the text config was recorded cannot be checked against hf_overrides: refused."""
    old = copy_store(store, tmp_path / "old")
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    del manifest["model"]["text_config"]
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert PrefixStore.open(old).manifest.model.text_config == {}  # still readable
    with pytest.raises(IncompatibleStoreError, match="build it again with this prefixgen"):
        connector(engine_config(model, old))


# ---------------------------------------------------------------------------------------------- live check


def _llm(model, store=None, dtype="float32", **extra):
    """An engine of 2,048 tokens in ``dtype``, with the connector on ``store`` (``extra``: its options)."""
    return start_engine(model, store, extra, dtype=dtype, max_model_len=2048)


def _scale(factor: float):
    """A function for ``collective_rpc``: scales NORM of the worker's model in place (as an RL weight update)."""

    def scale(worker):
        dict(worker.model_runner.model.named_parameters())[NORM].data.mul_(factor)

    return scale


def _connectors(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return llm.llm_engine.engine_core.engine_core.scheduler.connector, get_kv_transfer_group()


@pytest.fixture(scope="module")
def plain(model):
    """Plain vLLM's tokens for PROMPTS, with the model as saved and with NORM doubled."""
    llm = _llm(model)
    try:
        same = greedy(llm, PROMPTS)
        llm.collective_rpc(_scale(2.0))
        changed = greedy(llm, PROMPTS)
    finally:
        stop_engine(llm)
    assert changed != same  # the change changes greedy tokens: the test below can fail
    return same, changed


def test_weights_changed_in_place_give_plain_vllms_tokens(model, store, plain):
    """Nothing is loaded before the check passed; weights changed with no signal stop the loads at once; after
    reset_prefix_cache(reset_connector=True) on the original weights loads resume; changed again and reset, the
    check fails and nothing more is loaded. Every token equals plain vLLM's with the same weights."""
    same, changed = plain
    llm = _llm(model, store)
    try:
        scheduler, worker = _connectors(llm)
        assert greedy(llm, PROMPTS[:1]) == same[:1]
        assert worker.stats.tokens == 0 and scheduler.claim_stats.checks_passed == 1  # computed and compared, not loaded
        assert greedy(llm, PROMPTS[1:3]) == same[1:3]
        loaded = worker.stats.tokens
        assert loaded >= 2 * 256  # the check passed: both stored prefixes loaded

        llm.collective_rpc(_scale(2.0))  # no signal
        assert greedy(llm, PROMPTS) == changed
        assert scheduler.claim_stats.weights_changed == 1  # the load was refused; then a check on the new weights failed
        assert scheduler.claim_stats.checks_failed == 1

        llm.collective_rpc(_scale(0.5))  # back to the weights the store was built with
        assert llm.reset_prefix_cache(reset_connector=True) is True
        assert greedy(llm, PROMPTS) == same
        assert worker.stats.tokens > loaded  # checked again, loading again

        llm.collective_rpc(_scale(2.0))
        assert llm.reset_prefix_cache(reset_connector=True) is True
        loaded = worker.stats.tokens
        assert greedy(llm, PROMPTS) == changed
        assert worker.stats.tokens == loaded and scheduler.claim_stats.checks_failed == 2
        gate = scheduler.connector_scheduler._gate
        assert gate.state == "failed" and "a changed layer: layer 1's" in gate.last_failure
    finally:
        stop_engine(llm)


def test_bf16_store_in_bf16_engine_loads_without_false_alarm(tmp_path, model):
    """vLLM's bfloat16 KV and the build's bfloat16 KV differ by rounding only: every check passes (one request in
    two is checked here), the others load."""
    out = build_store(tmp_path / "bf16", model, RECORDS, dtype="bfloat16")
    llm = _llm(model, out, dtype="bfloat16", check_rate=0.5)
    try:
        scheduler, worker = _connectors(llm)
        greedy(llm, PROMPTS)
        greedy(llm, PROMPTS[::-1])
        claims = scheduler.claim_stats
        assert claims.checks_failed == 0 and claims.checks_passed >= 4 and scheduler.connector_scheduler._gate.state == "passed"
        assert worker.stats.requests >= 4 and worker.stats.tokens >= 4 * 256
    finally:
        stop_engine(llm)
