"""What PrefixgenConnector refuses at engine start and the requests it loads nothing for (skipped and counted).

The connector is built as vLLM builds it (``KVConnectorFactory.create_connector``) from the real ``VllmConfig``
that ``EngineArgs`` makes for each setting, so every refusal is checked without starting an engine; the
skipped requests are real vLLM ``Request`` objects asked of the real scheduler-side connector.
"""

from __future__ import annotations

import pytest
import torch

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.errors import ConfigError, IncompatibleStoreError
from prefixgen.model import load_tokenizer

from .conftest import CONNECTOR, MODULE, claim, tiny_model, write_jsonl

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
RECORD = SYSTEM + "Story 1: once upon a time, Tom found a cat in the park."
YARN = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 10000.0}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models") / "qwen2")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("store")
    data = write_jsonl(tmp / "text.jsonl", [{"text": RECORD}])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(tmp / "store"), device="cpu", quiet=True))
    return tmp / "store"


def engine_config(model, store, policy: str = "recompute", **engine_args):
    """The VllmConfig ``LLM(model, **engine_args)`` would run with the connector on ``store``."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    kv = KVTransferConfig(
        kv_connector=CONNECTOR,
        kv_connector_module_path=MODULE,
        kv_role="kv_consumer",
        kv_load_failure_policy=policy,
        kv_connector_extra_config={"store": str(store)},
    )
    args = EngineArgs(
        model=str(model), max_model_len=2048, enforce_eager=True, kv_transfer_config=kv, **{"dtype": "float32", **engine_args}
    )
    return args.create_engine_config()


def kv_cache_config(spec=None, groups: int = 1):
    """The KV cache layout vLLM hands a connector: ``groups`` groups of the tiny model's 2 layers (full attention by default)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = spec or FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    names = [[f"model.layers.{2 * g + i}.self_attn.attn" for i in range(2)] for g in range(groups)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(n, spec) for n in names])


def connector(config, kv=None, role: str = "SCHEDULER"):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    return KVConnectorFactory.create_connector(config, KVConnectorRole[role], kv or kv_cache_config())


def request(req_id: str, ids, **kw):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(req_id, ids, SamplingParams(max_tokens=1), None, **kw)


def test_hf_overrides_rope_is_refused_naming_the_field(model, store):
    """vLLM's effective config counts: a YaRN override changes every key's RoPE, so the store built without it is refused."""
    connector(engine_config(model, store))  # the same engine without the override is served
    with pytest.raises(IncompatibleStoreError, match="rope: store has .*'default'.*, model has .*'yarn'") as info:
        connector(engine_config(model, store, hf_overrides=YARN))
    assert "weights_digest" not in str(info.value) and "tokenizer_digest" not in str(info.value)  # only what differs


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_context_parallelism_is_refused(model, store, role):
    config = engine_config(model, store, tensor_parallel_size=4, decode_context_parallel_size=2)
    with pytest.raises(ConfigError, match=r"context parallelism \(decode_context_parallel_size=2\)"):
        connector(config, role=role)
    config = engine_config(model, store)
    config.parallel_config.prefill_context_parallel_size = 2  # vLLM's V1 runner refuses PCP itself on CPU
    with pytest.raises(ConfigError, match=r"context parallelism \(prefill_context_parallel_size=2\)"):
        connector(config, role=role)


def test_speculative_decoding_is_refused(model, store):
    config = engine_config(
        model, store, speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    )
    with pytest.raises(ConfigError, match=r"speculative decoding \(method ngram\)"):
        connector(config)


def test_layer_groups_are_served_and_an_unknown_kind_refused(model, store):
    """The connector declares SupportsHMA: sliding-window (also as vLLM's full spec with a window, its hybrid manager
    off), several groups, MLA (a FullAttentionSpec too) and recurrent state (a MambaSpec: nothing is loaded, said at
    start) start; a group of a kind it does not load (cross-attention) is refused, naming its spec."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma
    from vllm.v1.kv_cache_interface import (
        CrossAttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
    )

    config = engine_config(model, store)
    shape = dict(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    window = SlidingWindowSpec(**shape, sliding_window=64)
    windowed = FullAttentionSpec(**shape, sliding_window=64)
    mla = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.float32)
    mamba = MambaSpec(block_size=16, shapes=((3, 64), (4, 8, 8)), dtypes=(torch.float32, torch.float32))
    served = [connector(config, kv) for kv in (kv_cache_config(window), kv_cache_config(windowed), kv_cache_config(groups=2))]
    served += [connector(config, kv_cache_config(mla)), connector(config, kv_cache_config(mamba))]
    assert all(supports_hma(c) for c in served)
    assert [g.kind for c in served for g in c._groups] == ["sliding", "full", "full", "full", "mla", "recurrent"]
    assert served[-1].connector_scheduler._recurrent and not any(c.connector_scheduler._recurrent for c in served[:-1])
    for c in served:
        c.shutdown()
    with pytest.raises(ConfigError, match=r"a KV cache group of CrossAttentionSpec \(2 layers"):
        connector(config, kv_cache_config(CrossAttentionSpec(**shape)))


def test_failure_policy_is_respected_not_overridden(model, store):
    """vLLM's default "fail" cannot be told from an explicit one: the connector refuses it, naming the setting,
    rather than changing a user's choice; "recompute" is kept as given."""
    config = engine_config(model, store, policy="fail")
    with pytest.raises(ConfigError, match='kv_load_failure_policy \'fail\'.*"kv_load_failure_policy": "recompute"'):
        connector(config)
    assert config.kv_transfer_config.kv_load_failure_policy == "fail"
    config = engine_config(model, store)
    connector(config)
    assert config.kv_transfer_config.kv_load_failure_policy == "recompute"


def test_requests_the_store_cannot_serve_load_nothing_and_are_counted(model, store, caplog):
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    sched = connector(engine_config(model, store))
    sched.connector_scheduler._gate.state = "passed"  # no engine computes KV here (the live check is test_live_check's)
    ids = load_tokenizer(str(model))(RECORD + " Then he").input_ids
    stored = PrefixStore.open(store).match(ids[:-1])
    assert stored >= 256
    assert claim(sched, request("plain", ids), 0) == (stored, True)  # loaded asynchronously
    image = MultiModalFeatureSpec(data=None, modality="image", identifier="img", mm_position=PlaceholderRange(offset=0, length=4))
    skipped = [
        request("lora", ids, lora_request=LoRARequest("adapter", 1, "/no/such/adapter")),
        request("salt", ids, cache_salt="user-42"),
        request("image", ids, mm_features=[image]),
        request("embeds", None, prompt_embeds=torch.zeros(len(ids), 256)),
        request("salt-2", ids, cache_salt="user-43"),
    ]
    for req in skipped:
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False), req.request_id
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # asked again: counted once
    counts = {"lora": 1, "multimodal": 1, "prompt_embeds": 1, "cache_salt": 2}
    said = [r.getMessage() for r in caplog.records if "loads nothing" in r.getMessage()]
    assert len(said) == 4 and sum("cache salt" in m for m in said) == 1  # once per kind
    stats = sched.get_kv_connector_stats().reduce()  # what vLLM's stat loggers get (the counts since the last call)
    assert {name: stats.get(f"skipped_{name}") for name in counts} == counts
    assert sched.get_kv_connector_stats() is None  # nothing new since


def test_a_lookup_whose_index_read_never_returns_is_a_miss_at_the_deadline(model, store, tmp_path):
    """A small index segment replaced by a named pipe: a lookup opening it blocks for ever. vLLM is told "not yet"
    until load_timeout_seconds, then the prompt is a miss, and a later lookup (of a store without the pipe) runs on
    a new thread. Before: the lookup ran inside schedule() and the engine's scheduler blocked for ever."""
    import os
    import shutil
    import threading
    import time

    from prefixgen.format import INDEX_DIR

    live = tmp_path / "store"
    shutil.copytree(store, live)
    config = engine_config(model, live)
    config.kv_transfer_config.kv_connector_extra_config.update(load_timeout_seconds=2.0, refresh_seconds=0)
    sched = connector(config)
    sched.connector_scheduler._gate.state = "passed"  # no engine computes KV here (the live check is test_live_check's)
    ids = load_tokenizer(str(model))(RECORD + " Then he").input_ids
    (segment,) = (live / INDEX_DIR).glob("*.safetensors")
    saved = segment.with_name("saved")
    os.rename(segment, saved)
    os.mkfifo(segment)
    answers: list = []
    try:
        worker = threading.Thread(target=lambda: answers.append(claim(sched, request("hung", ids), 0, timeout=60)), daemon=True)
        t0 = time.monotonic()
        worker.start()
        worker.join(60)
        assert answers == [(0, False)], "the scheduler blocked on the hung index read"
        assert 2.0 <= time.monotonic() - t0 < 30
    finally:
        try:  # let the blocked open go (it then reads an empty file), and put the segment back
            os.close(os.open(segment, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        os.unlink(segment)
        os.rename(saved, segment)
    assert claim(sched, request("after", ids), 0) == (PrefixStore.open(live).match(ids[:-1]), True)
    sched.shutdown()


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_recurrent_state_at_tensor_parallelism_is_refused(tmp_path, role):
    """A hybrid store's states hold each recurrent layer whole; vLLM at tensor parallelism 2 gives each rank half
    of a Gated DeltaNet layer's conv channels and heads: refused at start, naming the setting and the fix (on the
    code before, the connector started, and a load's ``copy_`` of a whole state into a rank's half is a RuntimeError,
    not a store fault). The same engine at tensor parallelism 1 is served."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MambaSpec

    from .conftest import make_model
    from .test_hybrid_state import QWEN3_NEXT

    model = make_model(tmp_path / "model", "qwen3_next", seed=1, **QWEN3_NEXT)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": RECORD}])
    build(
        BuildConfig(dataset=str(data), model=str(model), out=str(tmp_path / "store"), device="cpu", dtype="bfloat16", quiet=True)
    )
    attention = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=QWEN3_NEXT["head_dim"], dtype=torch.bfloat16)
    state = MambaSpec(16, ((3, 384), (1, 128, 128)), (torch.bfloat16, torch.float32))
    kv = KVCacheConfig(
        num_blocks=64,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["model.layers.1.self_attn.attn"], attention),
            KVCacheGroupSpec(["model.layers.0.linear_attn"], state),
        ],
    )
    with pytest.raises(
        ConfigError, match=r"recurrent state with tensor parallelism \(tensor_parallel_size=2\).*tensor_parallel_size 1"
    ):
        connector(engine_config(model, tmp_path / "store", dtype="bfloat16", tensor_parallel_size=2), kv, role)
    connector(engine_config(model, tmp_path / "store", dtype="bfloat16"), kv, role)
