"""PrefixgenConnector under serving conditions, in one long-lived engine: asynchronous loads beside running
decodes, several loads in one step, chunked prefill, preemption, and store faults (shards deleted or truncated
while the engine runs, a corrupt block, a damaged index segment) that must be cache misses: outputs equal plain
vLLM's and the engine keeps serving.

One plain engine gives the reference tokens (each prompt alone), one engine with the connector serves every
test in this file (module-scoped: an engine start costs half a minute). The fault tests damage records of
their own, so their order does not matter.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest

from prefixgen import PrefixStore
from prefixgen.format import SHARDS_DIR, read_safetensors_header

from .conftest import build_store, corrupt_block, greedy, start_engine, stop_engine, tiny_model, warm_up_check

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
NAMES = ["Lily", "Tom", "Mia", "Ben", "Zoe", "Max", "Ava", "Sam", "Eva", "Leo"]
LONG = 8  # the record with a long new tail after it: chunked prefill
INDEX_RECORD = 9  # the one record of the second build (its own index segment)


def record(k: int) -> str:
    """Record ``k``: its first block differs from every other record's, so a fault in one is in no other."""
    return f"Book {k} of {NAMES[k]}. " + SYSTEM + f"Once upon a time, {NAMES[k]} found a ball in the park."


def prompt(k: int) -> str:
    tail = " And then the little dog ran after the red ball across the green grass." * (6 if k == LONG else 0)
    return record(k) + tail + " Then she"


PROMPTS = [prompt(k) for k in range(len(NAMES))]
PARAMS = dict(max_tokens=16, temperature=0)
BLOCKS = 11  # vLLM blocks of 128 tokens (10 usable): three ~320-token requests fill 9; growing ones preempt
PREEMPT_LEN = 376  # prompt tokens of the preemption test: 3 blocks at admission, a 4th after 8 new tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("serving-model") / "qwen2")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    """Every record but one in a first build, small shards (a fault hits a few blocks); the last in a second."""
    out = tmp_path_factory.mktemp("serving-store") / "store"
    build_store(out, model, [record(k) for k in range(len(NAMES)) if k != INDEX_RECORD], shard_bytes=64 << 10)
    return build_store(out, model, [record(INDEX_RECORD)], append=True, shard_bytes=64 << 10)


def preempt_prompts(tokenizer) -> list[list[int]]:
    """Token ids of records 0-3 padded with a tail to PREEMPT_LEN tokens."""
    filler = tokenizer(" and the dog ran", add_special_tokens=False).input_ids
    out = []
    for k in range(4):
        ids = tokenizer(record(k)).input_ids
        out.append((ids + filler * PREEMPT_LEN)[:PREEMPT_LEN])
    return out


@pytest.fixture(scope="module")
def baseline(model):
    """Plain vLLM's greedy tokens for each prompt alone, and for the preemption prompts (by token ids)."""
    llm = start_engine(model)
    try:
        texts = greedy(llm, PROMPTS, PARAMS["max_tokens"])
        ids = preempt_prompts(llm.get_tokenizer())
        padded = greedy(llm, [{"prompt_token_ids": p} for p in ids], 24)
        return {"text": texts, "padded": padded, "padded_ids": ids}
    finally:
        stop_engine(llm)


@pytest.fixture(scope="module")
def engine(model, store, baseline):
    """The engine with the connector: 64-token steps (prefills are chunked), BLOCKS KV blocks (requests preempt);
    its stats on, so vLLM collects and logs the connector's counters too."""
    llm = start_engine(
        model,
        store,
        dict(staging_bytes=96 << 10),  # 3 blocks a piece
        max_num_batched_tokens=64,
        max_num_seqs=8,
        num_gpu_blocks_override=BLOCKS,
        disable_log_stats=False,
    )
    warm_up_check(llm, PROMPTS[:1])  # the live check passes: loads are allowed from here on
    yield llm
    stop_engine(llm)


@pytest.fixture(autouse=True)
def drained(engine):
    """Each test leaves the engine idle (a failed one may leave requests behind)."""
    yield
    for _ in range(1000):
        if not engine.llm_engine.has_unfinished_requests():
            break
        engine.llm_engine.step()


def worker(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def generate(llm, indices, max_tokens=16):
    """Greedy tokens and vLLM's cached-token counts of PROMPTS[i] for each i, all in one batch."""
    from vllm import SamplingParams

    outs = llm.generate([PROMPTS[i] for i in indices], SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens or 0 for o in outs]


def stored(store, llm, i: int) -> int:
    """Tokens of PROMPTS[i] the store can serve: its longest stored prefix of all but the last token."""
    ids = llm.get_tokenizer()(PROMPTS[i]).input_ids
    return PrefixStore.open(store).match(ids[:-1])


def segment_of(opened: PrefixStore, llm, i: int) -> int:
    """Number of the index segment holding the first block of PROMPTS[i] in the store ``opened``."""
    ids = llm.get_tokenizer()(PROMPTS[i]).input_ids
    return opened.index.find_rows(opened.keys(ids)[:1])[0][0]


def locations(store, llm, i: int):
    ids = llm.get_tokenizer()(PROMPTS[i]).input_ids
    s = PrefixStore.open(store)
    return s.find_prefix(s.keys(ids[:-1])).locations


# ---------------------------------------------------------------------------------------------- loading


def test_several_loads_in_one_step_wait_while_loading(engine, store, baseline):
    """Three stored prompts added together: each is looked up in the background, then waits for its load holding
    its blocks, and the outputs are plain vLLM's."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    eng, sched = engine.llm_engine, scheduler(engine)
    before = worker(engine).stats.requests
    ids = [eng.add_request(f"several-{i}", PROMPTS[i], SamplingParams(**PARAMS)) for i in range(3)]
    outputs, waited = {}, set()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = (list(out.outputs[0].token_ids), out.num_cached_tokens)
        # Each request, once its lookup (in the background) answered, waits for its KV holding its blocks.
        waited |= {r for r in ids if r in sched.requests and sched.requests[r].status == RequestStatus.WAITING_FOR_REMOTE_KVS}
    assert waited == set(ids)
    for i in range(3):
        tokens, cached = outputs[f"several-{i}"]
        assert tokens == baseline["text"][i]
        assert cached >= stored(store, engine, i) > 0
    assert worker(engine).stats.requests == before + 3


def test_requests_sharing_a_stored_prefix_share_one_read(engine, store, baseline):
    """Three requests for one stored prefix, scheduled together: its blocks are read from the shards once (single-flight;
    before: once per request, three times the bytes), each request is written from that read, and every output is
    plain vLLM's."""
    from vllm import SamplingParams

    eng, sched = engine.llm_engine, scheduler(engine)
    stats = worker(engine).stats
    before = dataclasses.replace(stats)
    side = sched.connector.connector_scheduler
    side._gate.credit = 0.0  # no sampled live check among them: each request loads
    config = side.config  # the first step must not wait for a lookup: all three are answered on the next
    side.config = dataclasses.replace(config, yield_seconds=0)
    k, n = 7, 3  # three ~310-token requests fill 9 of the 10 usable blocks
    for i in range(n):
        eng.add_request(f"shared-{i}", PROMPTS[k], SamplingParams(**PARAMS))
    eng.step()  # their lookups run in the background; they end before the next step, which then loads all three
    assert len(side._lookups) == n
    assert all(lookup.result(timeout=30) is not None for lookup, _ in list(side._lookups.values()))
    side.config = config
    outputs = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = (list(out.outputs[0].token_ids), out.num_cached_tokens)
    blocks = len(locations(store, engine, k))
    assert blocks == 19
    for i in range(n):
        assert outputs[f"shared-{i}"][0] == baseline["text"][k]
        assert outputs[f"shared-{i}"][1] >= stored(store, engine, k) == blocks * 16
    assert stats.requests - before.requests == n and stats.tokens - before.tokens == n * blocks * 16
    assert stats.pieces - before.pieces == math.ceil(blocks / 3)  # 3 blocks a piece, each read once
    kv = PrefixStore.open(store).manifest.kv
    assert stats.read_bytes - before.read_bytes == blocks * 16 * kv.bytes_per_token  # one prefix, not n
    assert stats.shared_loads - before.shared_loads == n - 1
    # Read straight into the staging buffer and uploaded from there as read (no host copy): a token-major piece is
    # written into vLLM's cache as it is, a head-major one (format 5) transposed once to vLLM's token-major rows on the
    # cache's device (here the host), for all the loads sharing it.
    permuted = stats.read_bytes - before.read_bytes if kv.heads_first else 0
    assert stats.converted_bytes - before.converted_bytes == 0
    assert stats.device_converted_bytes - before.device_converted_bytes == permuted


def test_decodes_keep_running_while_a_prefix_loads(engine, store, baseline):
    """A request already decoding gets a token in every step while a stored prefix is looked up and loaded (neither
    runs in front of the batch); both outputs are plain vLLM's."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    eng, sched = engine.llm_engine, scheduler(engine)
    eng.add_request("decoding", PROMPTS[3], SamplingParams(max_tokens=40, temperature=0))
    produced = 0
    while produced < 2:  # its prefix loaded, its prompt computed: decoding now
        produced = max([len(o.outputs[0].token_ids) for o in eng.step() if o.request_id == "decoding"] + [produced])
    loading = eng.add_request("loading", PROMPTS[LONG], SamplingParams(**PARAMS))
    steps_while_loading, grew, results, loaded = 0, 0, {}, False
    while eng.has_unfinished_requests():
        outs = {o.request_id: o for o in eng.step()}
        status = sched.requests[loading].status if loading in sched.requests else None
        waiting = status == RequestStatus.WAITING_FOR_REMOTE_KVS
        looking_up = status == RequestStatus.WAITING and not loaded  # its lookup runs in the background
        if waiting or looking_up:
            loaded |= waiting
            steps_while_loading += 1
            n = len(outs["decoding"].outputs[0].token_ids)
            grew += n > produced
            produced = n
        for rid, o in outs.items():
            if o.finished:
                results[rid] = list(o.outputs[0].token_ids)
    assert loaded, "the loading request was never seen waiting for its load: the load ran in front of the batch"
    assert grew == steps_while_loading  # a new token in every step of the lookup and the load
    assert results["loading"] == baseline["text"][LONG]
    assert results["decoding"][:16] == baseline["text"][3]


def test_engine_waits_for_loads_only_on_steps_that_run_nothing(engine):
    """yield_seconds: on a step that schedules no token the engine thread waits for a load in flight (an in-process
    engine would otherwise spin holding the GIL); a step that runs a batch returns at once. The load here is held on
    an event released 2 s later, far inside a 60 s yield_seconds."""
    from prefixgen.integrations.vllm import LoadSpec, PrefixgenConnectorMetadata
    from prefixgen.integrations.vllm.worker import Loading

    conn = worker(engine)
    side = conn.connector_worker
    config, release = side.config, threading.Event()
    side.config = dataclasses.replace(config, yield_seconds=60.0)
    side._inflight["held"] = Loading(LoadSpec("held", 0, 0, 0, [], []), math.inf, 0, future=side._pool.submit(release.wait))
    timer = threading.Timer(2.0, release.set)
    try:
        conn.bind_connector_metadata(PrefixgenConnectorMetadata(idle=False))
        timer.start()
        assert conn.get_finished(set()) == (None, None)  # a busy step: not held up by the load
        conn.bind_connector_metadata(PrefixgenConnectorMetadata(idle=True))
        assert conn.get_finished(set()) == (None, {"held"})  # an idle step: waited until the load was done
    finally:
        release.set()
        timer.cancel()
        side._inflight.pop("held", None)
        conn.clear_connector_metadata()
        side.config = config


def test_chunked_prefill_after_a_load(engine, store, baseline):
    """A long prompt in 64-token steps: the stored prefix is loaded, the rest computed in chunks."""
    outputs, cached = generate(engine, [LONG])
    assert len(engine.get_tokenizer()(PROMPTS[LONG]).input_ids) - stored(store, engine, LONG) > 3 * 64
    assert outputs == [baseline["text"][LONG]]
    assert cached[0] >= stored(store, engine, LONG) > 0


def test_preempted_requests_reload(engine, store, baseline):
    """Four requests on ten free blocks: growing ones are preempted, their blocks freed, and on resuming their
    stored prefix is loaded again; every output is plain vLLM's."""
    from vllm import SamplingParams

    stats = worker(engine).stats
    before = stats.requests
    params = SamplingParams(max_tokens=24, temperature=0)
    outs = engine.generate([{"prompt_token_ids": p} for p in baseline["padded_ids"]], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == baseline["padded"]
    assert stats.requests - before > 4  # some request was loaded twice: it had been preempted


def test_loads_are_streamed_in_staging_pieces(engine, store):
    """staging_bytes = 96 KiB: three 32 KiB blocks a piece, however long the prefix (19 blocks here)."""
    stats = worker(engine).stats
    pieces, loads = stats.pieces, stats.requests
    assert generate(engine, [7])[1][0] >= stored(store, engine, 7) == 19 * 16
    kv = PrefixStore.open(store).manifest.kv
    assert kv.bytes_per_token * 16 == 32 << 10
    assert stats.requests == loads + 1 and stats.pieces - pieces == 7  # ceil(19 / 3)
    assert 0 < stats.max_piece_bytes <= 96 << 10


def test_counters_reach_vllms_prometheus_metrics(engine, store):
    """vLLM's Prometheus logger (on with the engine's stats) gets the connector's counters through its
    build_prom_metrics: each ``vllm:prefixgen_*_total`` equals the connector's own count since the engine started
    (scheduler and worker summed), skipped requests labelled by reason."""
    from prometheus_client import REGISTRY
    from vllm import SamplingParams

    assert generate(engine, [7])[1][0] >= stored(store, engine, 7) > 0
    salted = engine.generate({"prompt": PROMPTS[0], "cache_salt": "user-42"}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert salted[0].num_cached_tokens == 0
    labels = {"model_name": engine.llm_engine.vllm_config.model_config.served_model_name, "engine": "0"}

    def prom(name: str, **extra: str) -> float | None:
        return REGISTRY.get_sample_value(f"vllm:prefixgen_{name}_total", {**labels, **extra})

    load, claims = worker(engine).stats, scheduler(engine).connector.claim_stats
    assert prom("loads") == load.requests > 0
    assert prom("loaded_tokens") == load.tokens > 0
    assert prom("loaded_bytes") == load.bytes > 0
    assert prom("load_pieces") == load.pieces > 0
    assert prom("load_seconds") == pytest.approx(load.seconds) and load.seconds > 0
    for name in ("corrupt_blocks", "failed_loads", "failed_shards"):
        assert prom(name) == getattr(load, name)
    assert prom("lookups") == claims.lookups > 0
    assert prom("lookup_errors") == claims.lookup_errors
    assert prom("skipped_bad_blocks") == claims.skipped_bad_blocks
    assert prom("skipped_requests", reason="cache_salt") == claims.skipped_cache_salt >= 1
    for reason in ("lora", "multimodal", "prompt_embeds"):
        assert prom("skipped_requests", reason=reason) == getattr(claims, f"skipped_{reason}")


# ---------------------------------------------------------------------------------------------- faults


def test_shards_deleted_while_serving_are_misses(engine, store, baseline):
    """A prompt is served (its shards' headers are now cached); then every other shard it uses is deleted
    (what `prefixgen prune` or a lost disk does): the next request computes what it cannot load, same tokens,
    and the engine keeps serving; the scheduler no longer claims past the first missing shard."""
    k = 4
    assert generate(engine, [k])[0] == [baseline["text"][k]]
    shards = list(dict.fromkeys(loc.shard for loc in locations(store, engine, k)))
    assert len(shards) >= 4
    for name in shards[1::2]:
        (store / SHARDS_DIR / name).unlink()
    stats = worker(engine).stats
    before = dataclasses.replace(stats)
    outputs, cached = generate(engine, [k, 0])  # a damaged prompt and a sound one, in one batch
    assert outputs == [baseline["text"][k], baseline["text"][0]]
    assert stats.failed_shards > before.failed_shards
    assert cached[1] >= stored(store, engine, 0)  # the engine still loads what is there
    first_missing = next(i for i, loc in enumerate(locations(store, engine, k)) if loc.shard == shards[1])
    outputs, cached = generate(engine, [k])
    assert outputs == [baseline["text"][k]]
    assert cached[0] == first_missing * 16  # claimed up to the first missing shard, no further
    assert stats.failed_shards == before.failed_shards + 1  # found (and logged) once, not on every request


def test_truncated_shard_is_a_miss(engine, store, baseline):
    k = 5
    loc = locations(store, engine, k)[6]
    path = store / SHARDS_DIR / loc.shard
    with open(path, "rb") as f:
        data_start = read_safetensors_header(f, path).data_start
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(data_start + (size - data_start) // 3)  # into the KV of the shard's blocks
    stats = worker(engine).stats
    before = dataclasses.replace(stats)
    outputs, cached = generate(engine, [k, 1])
    assert outputs == [baseline["text"][k], baseline["text"][1]]
    assert stats.failed_loads > before.failed_loads
    assert cached[1] >= stored(store, engine, 1)


def test_corrupt_block_is_not_claimed_again(engine, store, baseline):
    """A block failing its checksum is recomputed, and the next request for it is not offered it again
    (before: re-read and rolled back on every request)."""
    k = 6
    ids = engine.get_tokenizer()(PROMPTS[k]).input_ids
    corrupt_block(store, ids, 10)  # tokens 160-175
    stats = worker(engine).stats
    corrupt = stats.corrupt_blocks
    outputs, _ = generate(engine, [k])
    assert outputs == [baseline["text"][k]]
    assert stats.corrupt_blocks == corrupt + 1
    outputs, cached = generate(engine, [k])
    assert outputs == [baseline["text"][k]]
    assert stats.corrupt_blocks == corrupt + 1  # not read again
    assert cached[0] == 10 * 16  # claimed up to the corrupt block


def test_damaged_index_segment_is_a_miss(engine, store, baseline):
    """The second build's index segment damaged while the engine runs: its prompt is computed (the scheduler's
    lookup fails, once logged and counted), same tokens, and prompts indexed elsewhere still load.

    The segment is found by the key it holds, not by its name: both builds' segments are named
    ``compacted-<UTC second>-<pid>-<random hex>``, so two builds in the same second of one process sort at random
    (damaging the first build's segment instead, whose columns the scheduler had already read and kept, was no
    miss at all: lookup_errors stayed 0)."""
    k = INDEX_RECORD
    opened = PrefixStore.open(store)
    segments = opened.index.segments
    assert len(segments) == 2
    seg_of = [segment_of(opened, engine, i) for i in range(len(PROMPTS))]
    seg = segments[seg_of[k]].path
    assert seg_of.count(seg_of[k]) == 1  # it holds no other prompt's blocks
    with open(seg, "rb") as f:
        header = read_safetensors_header(f, seg)
    a, b = header.tensors["slot"]["data_offsets"]
    with open(seg, "r+b") as f:
        f.seek(header.data_start + a)
        raw = f.read(b - a)
        f.seek(header.data_start + a)
        f.write(bytes(x ^ 0xFF for x in raw))
    outputs, cached = generate(engine, [k, 2])
    assert outputs == [baseline["text"][k], baseline["text"][2]]
    assert scheduler(engine).connector.claim_stats.lookup_errors == 1  # no other test damages the index
    assert cached[0] == 0 and cached[1] >= stored(store, engine, 2) > 0
