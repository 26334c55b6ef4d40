"""The vLLM tests (`make test-vllm`, in the vLLM venv): real vLLM engines, in-process, on a tiny model.

vLLM's CPU attention needs head_dim in {32, 64, ...}: the model is a tiny random Qwen2 with head_dim 64
saved in tmp_path with the stories tokenizer (no downloads). Each engine runs once per configuration
(with and without the connector, on each store) and the tests assert on what it returned.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster to start

from prefixgen.format import (  # noqa: E402
    INDEX_DIR,
    SHARDS_DIR,
    Segment,
    atomic_write,
    block_checksums,
    encode_segment,
    read_safetensors_header,
    shard_checksum,
)
from prefixgen.store.reader import PrefixStore  # noqa: E402
from tests.conftest import CHAT_TEMPLATE, make_model, write_jsonl  # noqa: E402, F401

CONNECTOR = "PrefixgenConnector"
MODULE = "prefixgen.integrations.vllm"


@pytest.fixture(scope="module", autouse=True)
def _drop_worker_connector():
    """After each module (its engines gone): an engine whose start was refused leaves vLLM's process-wide worker
    connector set, and the next engine started in this process would reuse it (``ensure_kv_transfer_initialized``
    keeps an existing one): a plain engine then runs with a stale connector."""
    yield
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    ensure_kv_transfer_shutdown()


def tiny_model(path: Path, seed: int = 0, **overrides) -> Path:
    """A random Qwen2 vLLM's CPU backend runs: 2 layers, 4 heads, 2 KV heads of head_dim 64, float32.
    A large init range makes the next token depend on the context (a negative control can fail);
    ``overrides``: other config fields."""
    config = dict(
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.15,
    )
    return make_model(path, "qwen2", seed=seed, chat_template=CHAT_TEMPLATE, **{**config, **overrides})


def start_engine(model: Path, store: Path | None = None, connector_extra: dict | None = None, **engine_args):
    """A vLLM ``LLM`` on ``model`` as the engine tests run it: float32, seed 0, eager, vLLM's own prefix cache off
    (so a cached token is one the connector loaded), with the connector on ``store`` if given (``connector_extra``:
    more of its options); ``engine_args`` go to ``LLM`` and override these. Stop it with :func:`stop_engine`."""
    from vllm import LLM

    kv = None if store is None else connector_config(store, **(connector_extra or {}))
    args = dict(dtype="float32", enable_prefix_caching=False, max_model_len=1024, seed=0, enforce_eager=True)
    return LLM(str(model), kv_transfer_config=kv, **{**args, **engine_args})


def stop_engine(llm) -> None:
    """Shut ``llm``'s engine down (also drops the worker's connector, a process-wide global)."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def greedy(llm, prompts: Sequence[str | dict], max_tokens: int = 12) -> list[list[int]]:
    """``max_tokens`` greedy tokens of each prompt (text or a vLLM prompt dict), one call each: the reference
    a plain engine gives for a prompt alone."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [list(llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]


def build_store(out: Path, model: Path, texts: Sequence[str], **options) -> Path:
    """``prefixgen build`` of ``texts`` (a record each) with ``model`` on the CPU into ``out``; ``options``: more
    ``BuildConfig`` fields (``append``, ``dtype``, ``shard_bytes``, ...)."""
    from prefixgen import BuildConfig, build

    data = write_jsonl(
        out.parent / f"{out.name}.{len(list(out.parent.glob(f'{out.name}.*.jsonl')))}.jsonl", [{"text": t} for t in texts]
    )
    build(BuildConfig(dataset=str(data), model=str(model), out=str(out), device="cpu", quiet=True, **options))
    return out


@dataclass
class Run:
    """What one engine returned: per prompt, generated ids, prompt ids, vLLM's num_cached_tokens and the
    tokens the connector wrote for it."""

    outputs: list[list[int]]
    prompt_ids: list[list[int]]
    cached: list[int]
    stats: object | None  # the worker connector's LoadStats
    loaded: list[int]
    claims: object | None = None  # the scheduler connector's ClaimStats
    rank_stats: list[dict] | None = None  # with workers in processes of their own (tensor parallel): each rank's LoadStats
    deltas: list[dict] = dataclasses.field(default_factory=list)  # in-process: per call, what its LoadStats counted
    first_logprobs: list[dict[int, float]] = dataclasses.field(
        default_factory=list
    )  # per prompt (``logprobs``): its first token's top ones
    block_size: int = 0  # vLLM's block size as the engine ran (a hybrid in "align" mode: its Mamba groups' too)


def connector_config(store: Path, **extra: Any):
    """vLLM's KVTransferConfig for PrefixgenConnector on ``store`` (``extra``: more of its extra config)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector=CONNECTOR,
        kv_connector_module_path=MODULE,
        kv_role="kv_consumer",
        kv_load_failure_policy="recompute",  # the connector refuses vLLM's default "fail"
        kv_connector_extra_config={"store": str(store), **extra},
    )


def rank_load_stats(worker) -> dict[str, int | float]:
    """The LoadStats of the worker connector in this worker process, as a dict (``LLM.collective_rpc`` runs it
    on every rank: a callable, so the engine needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return dataclasses.asdict(get_kv_transfer_group().stats)


def _since(end: dict[str, int | float], start: dict[str, int | float]) -> dict[str, int | float]:
    """A rank's counters between two readings (a largest-so-far field such as ``max_piece_bytes`` is kept as read)."""
    return {k: v if k.startswith("max_") else v - start[k] for k, v in end.items()}


def run_vllm(
    model: Path,
    prompts: Sequence[str | dict],
    chats: Sequence[list[dict]] = (),
    store: Path | None = None,
    prefix_caching: bool = False,
    loras: Sequence[object | None] = (),
    warm_up: bool = True,
    connector_extra: dict | None = None,
    dtype: str = "float32",
    logprobs: int | None = None,
    **engine_args,
) -> Run:
    """Start an engine (with the connector on ``store`` if given; vLLM's own prefix caching off unless asked;
    ``engine_args`` such as ``block_size`` or ``enable_lora`` go to ``LLM``), greedy-generate 12 tokens for each
    prompt (text or a vLLM prompt dict; ``loras[i]``, a vLLM ``LoRARequest`` or None, goes with prompt ``i``) and
    then each chat, one call each, shut the engine down (``connector_extra``: more connector options; ``logprobs``: keep
    that many of each first token's top log-probabilities). With a store, the connector's live check first passes on
    the same prompts (``warm_up``, :func:`warm_up_check`): nothing is loaded before it."""
    from vllm import SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    llm = start_engine(
        model,
        store,
        connector_extra,
        **{"dtype": dtype, "enable_prefix_caching": prefix_caching, "max_model_len": 2048, **engine_args},
    )
    try:
        params = SamplingParams(max_tokens=12, temperature=0, logprobs=logprobs)
        if store is not None and warm_up:
            warm_up_check(llm, prompts, chats)
        stats = get_kv_transfer_group().stats if has_kv_transfer_group() else None
        remote = store is not None and stats is None  # the workers run in processes of their own (tensor parallel)
        # Each rank's counters after the warm-up: a prompt whose background lookup ended after the live check
        # passed is loaded during the warm-up already; what a test measures is what the calls below load.
        warm = llm.collective_rpc(rank_load_stats) if remote else None
        results, loaded = [], []
        lora = list(loras) + [None] * (len(prompts) - len(loras))
        calls = [(llm.generate, p, a) for p, a in zip(prompts, lora)] + [(llm.chat, m, None) for m in chats]
        deltas = []
        for call, prompt, adapter in calls:
            before = _tokens_loaded(llm, stats, remote)
            counters = dataclasses.asdict(stats) if stats is not None else {}
            results.append(call(prompt, params, use_tqdm=False, lora_request=adapter)[0])
            loaded.append(_tokens_loaded(llm, stats, remote) - before)
            if stats is not None:
                deltas.append(_since(dataclasses.asdict(stats), counters))
        return Run(
            outputs=[list(r.outputs[0].token_ids) for r in results],
            prompt_ids=[list(r.prompt_token_ids) for r in results],
            cached=[r.num_cached_tokens or 0 for r in results],
            stats=stats,
            loaded=loaded,
            claims=_claim_stats(llm),
            rank_stats=[_since(end, start) for end, start in zip(llm.collective_rpc(rank_load_stats), warm)] if remote else None,
            deltas=deltas,
            first_logprobs=[
                {t: p.logprob for t, p in r.outputs[0].logprobs[0].items()} for r in results if r.outputs[0].logprobs
            ],
            block_size=llm.llm_engine.vllm_config.cache_config.block_size,
        )
    finally:
        stop_engine(llm)


def warm_up_check(llm, prompts: Sequence[str | dict], chats: Sequence[list[dict]] = ()) -> None:
    """Let the connector's live check pass before what a test measures: vLLM computes ``prompts`` (and ``chats``)
    once, one token each, the first whose prefix is stored is compared with the store; then vLLM's own prefix cache
    is emptied so that the test's requests are not served from it. One call per prompt, in order: in one call the
    check would go to whichever prompt's background lookup ends first."""
    from vllm import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0)
    for prompt in prompts:
        llm.generate([prompt], one, use_tqdm=False)
    for chat in chats:
        llm.chat(chat, one, use_tqdm=False)
    assert llm.reset_prefix_cache()


def _tokens_loaded(llm, stats, remote: bool) -> int:
    """Tokens the connector wrote so far: its LoadStats here, or rank 0's (each rank writes the same tokens, its heads)."""
    if remote:
        return llm.collective_rpc(rank_load_stats)[0]["tokens"]
    return stats.tokens if stats else 0


def _claim_stats(llm):
    """The scheduler connector's ClaimStats when the engine core runs in this process and has the connector, else None."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    return getattr(core.scheduler.connector, "claim_stats", None) if core is not None else None


def claim(scheduler, request, computed: int, timeout: float = 30.0) -> tuple[int, bool]:
    """The scheduler connector's answer for ``request`` as vLLM gets it: asked again while its lookup runs in the
    background (the answer None: "not yet"), as vLLM's scheduler does on its next steps."""
    deadline = time.monotonic() + timeout
    while (answer := scheduler.get_num_new_matched_tokens(request, computed))[0] is None:
        assert time.monotonic() < deadline, "the lookup never finished"
        time.sleep(0.001)
    return answer


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_kv(store: Path, change) -> None:
    """Replace every stored KV value ``x`` with ``change(x)`` and rewrite the checksums, so the store is
    valid but holds other KV under the same keys."""
    opened = PrefixStore.open(store)
    assert opened.manifest.kv.stored_dtype == "float32"
    layout = opened.manifest.kv
    for seg_path in sorted((store / INDEX_DIR).glob("*.safetensors")):
        seg = Segment(seg_path)
        shard = store / SHARDS_DIR / seg.shard
        with open(shard, "rb") as f:
            header = read_safetensors_header(f, shard)
            raw = bytearray(f.read())
        a, b = header.tensors["kv"]["data_offsets"]  # into raw: the bytes after the header
        kv = np.frombuffer(raw, dtype=np.float32, count=(b - a) // 4, offset=a).copy()
        raw[a:b] = change(kv).astype(np.float32).tobytes()
        # in slot order; a head-major store (format 5) also has a checksum per head, in the shard
        crcs, heads = block_checksums(bytes(raw[a:b]), None, layout, opened.block_size, opened.manifest.block_checksum)
        if heads is not None:
            c, d = header.tensors["head_crc"]["data_offsets"]
            raw[c:d] = np.ascontiguousarray(heads, dtype="<u4").tobytes()
        head = _header_bytes(shard, header.data_start)
        shard.write_bytes(head + bytes(raw))
        cols = {name: np.array(seg.cols[name]) for name in ("key", "parent", "slot", "depth", "crc")}
        cols["crc"] = crcs[cols["slot"]]
        meta = dict(seg.metadata, shard_crc32=str(shard_checksum(head, crcs)))
        del seg
        atomic_write(seg_path, encode_segment(cols, meta))


def _header_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def corrupt_block(store: Path, token_ids: Sequence[int], block: int) -> None:
    """Flip bytes inside stored block ``block`` of the prefix of ``token_ids`` (its CRC no longer matches)."""
    s = PrefixStore.open(store)
    loc = s.find_prefix(s.keys(token_ids)).locations[block]
    shard = store / SHARDS_DIR / loc.shard
    with open(shard, "rb") as f:
        header = read_safetensors_header(f, shard)
    offset = header.offset("kv") + loc.slot * s.manifest.kv.bytes_per_token * s.block_size + 100
    with open(shard, "r+b") as f:
        f.seek(offset)
        data = f.read(8)
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in data))
