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

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.errors import IncompatibleStoreError
from prefixgen.format import MANIFEST_FILE

from .conftest import connector_config, copy_store, write_jsonl
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
    from tests.conftest import CHAT_TEMPLATE, make_model

    return make_model(
        tmp_path_factory.mktemp("models") / "qwen2",
        "qwen2",
        chat_template=CHAT_TEMPLATE,
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("store")
    data = write_jsonl(tmp / "text.jsonl", [{"text": r} for r in RECORDS])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(tmp / "store"), device="cpu", quiet=True))
    return tmp / "store"


# ---------------------------------------------------------------------------------------------- start-time identity


def test_kv_dtype_is_compared_and_cast_only_when_named(model, store):
    """A float32 store in a bfloat16 engine is refused, naming the cast option; with it, the engine starts."""
    with pytest.raises(IncompatibleStoreError, match="KV dtype: the store holds float32 KV, vLLM computes bfloat16") as info:
        connector(engine_config(model, store, dtype="bfloat16"))
    assert "cast_kv_dtype" in str(info.value)
    config = engine_config(model, store, dtype="bfloat16")
    config.kv_transfer_config.kv_connector_extra_config["cast_kv_dtype"] = True
    connector(config)


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
    from vllm import LLM

    kv = None if store is None else connector_config(store, **extra)
    return LLM(
        str(model),
        dtype=dtype,
        enable_prefix_caching=False,
        max_model_len=2048,
        seed=0,
        enforce_eager=True,
        kv_transfer_config=kv,
    )


def _shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _generate(llm, prompts) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0)
    return [list(llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]


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
        same = _generate(llm, PROMPTS)
        llm.collective_rpc(_scale(2.0))
        changed = _generate(llm, PROMPTS)
    finally:
        _shutdown(llm)
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
        assert _generate(llm, PROMPTS[:1]) == same[:1]
        assert worker.stats.tokens == 0 and scheduler.claim_stats.checks_passed == 1  # computed and compared, not loaded
        assert _generate(llm, PROMPTS[1:3]) == same[1:3]
        loaded = worker.stats.tokens
        assert loaded >= 2 * 256  # the check passed: both stored prefixes loaded

        llm.collective_rpc(_scale(2.0))  # no signal
        assert _generate(llm, PROMPTS) == changed
        assert scheduler.claim_stats.weights_changed == 1  # the load was refused; then a check on the new weights failed
        assert scheduler.claim_stats.checks_failed == 1

        llm.collective_rpc(_scale(0.5))  # back to the weights the store was built with
        assert llm.reset_prefix_cache(reset_connector=True) is True
        assert _generate(llm, PROMPTS) == same
        assert worker.stats.tokens > loaded  # checked again, loading again

        llm.collective_rpc(_scale(2.0))
        assert llm.reset_prefix_cache(reset_connector=True) is True
        loaded = worker.stats.tokens
        assert _generate(llm, PROMPTS) == changed
        assert worker.stats.tokens == loaded and scheduler.claim_stats.checks_failed == 2
        gate = scheduler.connector_scheduler._gate
        assert gate.state == "failed" and "a changed layer: layer 1's" in gate.last_failure
    finally:
        _shutdown(llm)


def test_bf16_store_in_bf16_engine_loads_without_false_alarm(tmp_path, model):
    """vLLM's bfloat16 KV and the build's bfloat16 KV differ by rounding only: every check passes (one request in
    two is checked here), the others load."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": r} for r in RECORDS])
    out = tmp_path / "bf16"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(out), device="cpu", dtype="bfloat16", quiet=True))
    llm = _llm(model, out, dtype="bfloat16", check_rate=0.5)
    try:
        scheduler, worker = _connectors(llm)
        _generate(llm, PROMPTS)
        _generate(llm, PROMPTS[::-1])
        claims = scheduler.claim_stats
        assert claims.checks_failed == 0 and claims.checks_passed >= 4 and scheduler.connector_scheduler._gate.state == "passed"
        assert worker.stats.requests >= 4 and worker.stats.tokens >= 4 * 256
    finally:
        _shutdown(llm)
