"""PrefixgenConnector on vLLM's default serving path (the engine core and a multiprocess executor in processes of
their own, async scheduling on) while its store changes and fails under it: a several-MiB index truncated and
rewritten in place, shards replaced by named pipes whose open never returns (the deadline, an abort, shutdown),
prune, append and compaction while serving. The engine never dies or stalls, its outputs equal plain vLLM's, and
hits come back without a restart.

One engine serves the whole module (its tests run in order: later ones change the store further).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prefixgen import PrefixStore
from prefixgen.format import INDEX_DIR, MAP_BYTES, SHARDS_DIR
from prefixgen.maintain.compact import compact_store
from prefixgen.maintain.prune import block_cost, prune_store
from tests.test_store_changes import pad_index

from .conftest import build_store, greedy, start_engine, stop_engine, tiny_model, warm_up_check

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 4
NAMES = ["Lily", "Tom", "Mia", "Ben", "Zoe", "Max", "Ava", "Sam"]
APPENDED = 7  # the record of the append while serving
TIMEOUT = 4.0  # the engine's load_timeout_seconds
REFRESH = 0.5  # its refresh_seconds
REAL_BLOCKS: list[int] = []  # blocks the store holds, without the padding (set by the store fixture)
WAIT = 120.0  # what a test waits for the engine at most before calling it stalled (a loaded 2-core machine)


def record(k: int) -> str:
    """Record ``k``: its first block differs from every other record's, so a fault in one is in no other."""
    return f"Book {k} of {NAMES[k]}. " + SYSTEM + f"Once upon a time, {NAMES[k]} found a ball in the park."


PROMPTS = [record(k) + " Then she" for k in range(len(NAMES))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("live-model") / "qwen2")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    """Every record but APPENDED, in small shards; the index padded to one segment of several MiB (a big store's)."""
    out = tmp_path_factory.mktemp("live-store") / "store"
    build_store(out, model, [record(k) for k in range(len(NAMES)) if k != APPENDED], shard_bytes=64 << 10)
    REAL_BLOCKS.append(PrefixStore.open(out).index.entries)
    segment = pad_index(out, 60_000)
    assert segment.stat().st_size >= 5 * MAP_BYTES
    return out


@pytest.fixture(scope="module")
def baseline(model):
    """Plain vLLM's greedy tokens for each prompt alone (in this process: faster to start)."""
    llm = start_engine(model)
    try:
        return greedy(llm, PROMPTS)
    finally:
        stop_engine(llm)


@pytest.fixture(scope="module")
def engine(model, store, baseline):
    """vLLM's default serving path: the engine core in a process of its own, the multiprocess executor, async
    scheduling; two load threads, a deadline of TIMEOUT seconds, the index looked at every REFRESH seconds."""
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    try:
        llm = start_engine(
            model,
            store,
            dict(load_timeout_seconds=TIMEOUT, refresh_seconds=REFRESH, load_threads=2),
            async_scheduling=True,
            distributed_executor_backend="mp",
        )
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    warm_up_check(llm, PROMPTS)  # nothing is loaded before the connector's live check passed
    yield llm
    stop_engine(llm)


def stored(store: Path, llm, k: int) -> int:
    ids = llm.get_tokenizer()(PROMPTS[k]).input_ids
    return PrefixStore.open(store).match(ids[:-1])


def generate(llm, indices: list[int]) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens and vLLM's cached-token counts (here: tokens loaded from the store) of PROMPTS[k] for each k,
    in one batch, on a thread: a test fails (instead of hanging) if the engine stalls for WAIT seconds."""
    from vllm import SamplingParams

    result: list = []
    params = SamplingParams(max_tokens=12, temperature=0)
    thread = threading.Thread(
        target=lambda: result.append(llm.generate([PROMPTS[k] for k in indices], params, use_tqdm=False)), daemon=True
    )
    thread.start()
    thread.join(WAIT)
    assert result, f"the engine stalled: prompts {indices} not answered in {WAIT} s"
    outs = result[0]
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens or 0 for o in outs]


def step_for(llm, seconds: float) -> None:
    """Run the engine's steps for ``seconds``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        llm.llm_engine.step()
        time.sleep(0.01)


def until(check: Callable[[], bool], seconds: float = 30.0) -> float:
    """Ask ``check`` until it holds (failing after ``seconds``); how long that took."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < seconds, "not within the time allowed"
        time.sleep(0.2)
    return time.monotonic() - t0


def shard_of(store: Path, llm, k: int) -> Path:
    ids = llm.get_tokenizer()(PROMPTS[k]).input_ids
    s = PrefixStore.open(store)
    return store / SHARDS_DIR / s.find_prefix(s.keys(ids[:-1])).locations[0].shard


class NamedPipe:
    """Shard ``path`` replaced by a named pipe: opening it for reading blocks until a writer comes (a read that
    never returns, as on a dead NFS server). :meth:`restore` lets the blocked readers go and puts the shard back."""

    def __init__(self, path: Path):
        self.path, self.saved = path, path.with_name(path.name + ".saved")
        os.rename(path, self.saved)
        os.mkfifo(path)

    def restore(self) -> None:
        try:  # a writer lets each reader blocked in open() go on (it then reads an empty, truncated file)
            for _ in range(8):
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
                time.sleep(0.05)
        except OSError:
            pass  # no reader waiting
        os.unlink(self.path)
        os.rename(self.saved, self.path)


def test_hits_through_a_several_mib_index_on_the_default_path(engine, store, baseline):
    tokens, cached = generate(engine, list(range(APPENDED)))
    assert tokens == baseline[:APPENDED]
    assert cached == [stored(store, engine, k) for k in range(APPENDED)] and min(cached) >= 128


def test_index_truncated_and_rewritten_in_place_while_serving(engine, store, baseline):
    """Before: the scheduler read the index through a memory map, and the next lookup died of SIGBUS."""
    (segment,) = (store / INDEX_DIR).glob("*.safetensors")
    whole = segment.read_bytes()
    os.truncate(segment, len(whole) // 3)
    tokens, _ = generate(engine, [0, 1, 2])
    assert tokens == baseline[:3]  # served (from the store or computed), and the engine lives
    with open(segment, "r+b") as f:  # rewritten in place, whole again: hits come back without a restart
        f.write(whole)
    until(lambda: generate(engine, [0])[1] == [stored(store, engine, 0)])
    tokens, cached = generate(engine, [1, 2])
    assert tokens == baseline[1:3] and cached == [stored(store, engine, k) for k in (1, 2)]


def test_a_shard_whose_open_never_returns_is_recomputed_at_the_deadline(engine, store, baseline):
    """Record 2's shard is a named pipe: its load is given up after TIMEOUT seconds and recomputed, while record 3,
    in the same batch, loads. Before: the request waited for ever (no deadline)."""
    pipe = NamedPipe(shard_of(store, engine, 2))
    try:
        t0 = time.monotonic()
        tokens, cached = generate(engine, [2, 3])
        assert tokens == [baseline[2], baseline[3]]
        assert cached[1] == stored(store, engine, 3)
        assert time.monotonic() - t0 < WAIT
    finally:
        pipe.restore()


def test_requests_of_one_prefix_whose_read_hangs_are_recomputed_at_the_deadline(engine, store, baseline):
    """Two requests of record 0 (their loads share one read when scheduled together) and its shard a named pipe: both
    are given up at the deadline and recomputed, while record 1, in the same batch, loads."""
    pipe = NamedPipe(shard_of(store, engine, 0))
    try:
        tokens, cached = generate(engine, [0, 0, 1])
        assert tokens == [baseline[0], baseline[0], baseline[1]]
        assert cached[2] == stored(store, engine, 1)
    finally:
        pipe.restore()


def test_loads_aborted_while_their_reads_hang_hold_up_no_other_load(engine, store, baseline):
    """Two loads (as many as load threads) hang on named pipes and are aborted: the next request still loads and
    is answered. Before: both load threads stayed blocked and every later load waited behind them."""
    from vllm import SamplingParams

    pipes = [NamedPipe(shard_of(store, engine, k)) for k in (4, 5)]
    try:
        params = SamplingParams(max_tokens=12, temperature=0)
        for k in (4, 5):
            engine.llm_engine.add_request(f"abort-{k}", PROMPTS[k], params)
        step_for(engine, 2.0)  # looked up, their loads started (and blocked on the pipes)
        engine.llm_engine.abort_request(["abort-4", "abort-5"])
        tokens, cached = generate(engine, [1])
        assert tokens == [baseline[1]] and cached == [stored(store, engine, 1)]
    finally:
        for pipe in pipes:
            pipe.restore()


def test_prune_while_serving_keeps_the_kept_blocks_hitting(engine, store, baseline):
    """A prune keeping every stored block moves them into new shards and removes the old ones. Before: every
    request then hit 0 tokens (the old shards gone, marked bad, the index never reopened) until a restart."""
    manifest = PrefixStore.open(store).manifest
    report = prune_store(store, max_bytes=REAL_BLOCKS[0] * block_cost(manifest))  # every block of a record, no padding
    assert report.blocks_kept == REAL_BLOCKS[0]
    expected = [stored(store, engine, k) for k in range(APPENDED)]
    until(lambda: generate(engine, [0])[1] == expected[:1])
    tokens, cached = generate(engine, list(range(APPENDED)))
    assert tokens == baseline[:APPENDED] and cached == expected


def test_a_record_appended_while_serving_hits_within_seconds(engine, store, model, baseline, tmp_path):
    build_store(store, model, [record(APPENDED)], append=True)
    want = stored(store, engine, APPENDED)
    assert want >= 128
    took = until(lambda: generate(engine, [APPENDED])[1] == [want])
    assert took < 30
    assert generate(engine, [APPENDED])[0] == [baseline[APPENDED]]


def test_compaction_while_serving_keeps_the_hits(engine, store, baseline):
    assert compact_store(store).segments_merged >= 2
    expected = [stored(store, engine, k) for k in range(len(NAMES))]
    tokens, cached = generate(engine, list(range(len(NAMES))))
    assert tokens == baseline and cached == expected


def test_shutdown_returns_with_a_read_hung(engine, store):
    """Last (it stops the module's engine): a load hangs on a named pipe, and the engine shuts down promptly.
    Before: the worker's shutdown joined its load threads, one of them blocked for ever."""
    from vllm import SamplingParams

    pipe = NamedPipe(shard_of(store, engine, 6))
    try:
        engine.llm_engine.add_request("hung", PROMPTS[6], SamplingParams(max_tokens=4, temperature=0))
        step_for(engine, 2.0)
        done = threading.Event()
        threading.Thread(target=lambda: (stop_engine(engine), done.set()), daemon=True).start()
        assert done.wait(60), "shutdown did not return"
    finally:
        pipe.restore()
