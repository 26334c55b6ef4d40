"""``PrefixgenConnector``: vLLM loads prompt prefixes from a prefixgen store instead of computing them.

vLLM v1 imports a KV connector from any module named in ``kv_transfer_config``, so no vLLM patch
is needed::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PrefixgenConnector",
        "kv_connector_module_path": "prefixgen.integrations.vllm", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"store": "STORE"}}'

Written against the v1 connector API of vLLM 0.32.0 (the API is marked experimental; README
says which versions are tested). vLLM builds one connector per process and role:

* **scheduler** (:meth:`PrefixgenConnector.get_num_new_matched_tokens`): on a lookup thread (vLLM is
  told "not yet", None, and asks again next step: ``schedule()`` never hashes or reads the index), hashes
  the prompt with the store's chained block keys in growing runs (1, 2, 4, ... blocks, stopping at the
  first miss), finds the longest stored prefix of all but the last prompt token; then claims the stored
  tokens beyond vLLM's own prefix-cache hit. Another thread reopens the index every ``refresh_seconds``
  if the store changed (append, compaction, prune, gc). Requests with a LoRA adapter, multimodal inputs, prompt
  embeddings or a cache_salt are skipped (nothing loaded, counted): the store's keys hash the base
  model's token ids only. After vLLM allocated the request's blocks, the load (block locations in
  the store, vLLM block ids) goes to the workers in the step's :class:`PrefixgenConnectorMetadata`.
* **worker** (:meth:`PrefixgenConnector.start_load_kv`): hands each load to a pool of load threads;
  one reads the blocks (only their bytes, CRC-checked, through
  :class:`~prefixgen.store.reader.PrefixStore`, with ``pread``) in pieces of at most ``staging_bytes``
  into a reused read buffer (pinned on CUDA, where the device copies straight out of it): from a head-major
  store (format 5) only this rank's KV heads, one read per block, checked against their own checksums;
  from a token-major one every head, keeping this rank's in host memory. It writes each attention layer's
  share into vLLM's paged cache
  with the layer's own cache-write op (``impl.do_kv_cache_update``, i.e.
  ``cpu_attn_reshape_and_cache`` on CPU and ``reshape_and_cache_flash`` on FlashAttention; on
  CUDA on a side stream), so no backend's memory layout is hard-coded here. A finished load is
  reported through :meth:`get_finished`; vLLM then schedules the request. A load not done within
  ``load_timeout_seconds`` is given up there (it writes nothing more; vLLM recomputes) and its thread,
  stuck in a read, replaced: load threads are daemons, so neither shutdown nor exit waits for a hung read.
  Loads of the same stored blocks at the same moment share one read (single-flight): a load whose blocks a load
  in flight has still to read joins it, and that load's thread writes each piece into both (``shared_loads``).

Layer groups (:mod:`prefixgen.integrations.vllm_groups`): the connector declares ``SupportsHMA``; vLLM's hybrid
KV cache manager gives each kind of layer (full, sliding window, chunked, MLA, recurrent) a KV cache group with a
block table of its own, and each load writes a layer's tokens into its group's blocks only: a sliding-window or
chunked layer gets the window's (vLLM holds no block before it), an MLA layer the latent. A model with recurrent
state loads nothing (the store holds no state): said at start, counted per request (``skipped_recurrent``).

Store faults are cache misses: a block that fails its CRC, a missing, truncated or unreadable
shard, a damaged index segment are logged once (per shard), counted (:class:`LoadStats`,
:class:`ClaimStats`) and not loaded: the worker reports the vLLM block holding the first token it
could not write (:meth:`get_block_ids_with_load_errors`) and vLLM recomputes from there. The
worker also tells the scheduler which stored blocks and shards failed
(:class:`PrefixgenWorkerMetadata`), and the scheduler no longer claims them.

Both sides refuse, at engine start, what the store cannot serve (:func:`unsupported_features`:
context parallelism, speculative decoding, a KV cache group of a kind it does not load, a
``kv_load_failure_policy`` other than ``recompute``); the scheduler refuses a store built for another
model than vLLM's effective config (weights, architecture, KV shape, positions, tokenizer, every field of
the text config after ``hf_overrides``, the KV dtype, quantization, load format), naming each field that
differs.

Live (:mod:`prefixgen.integrations.vllm_check`): nothing is loaded until vLLM has computed a request whose
prefix is stored and its own paged KV for those blocks matched the store's (after start, each
:meth:`PrefixgenConnector.reset_cache` and weights found changed), and a ``check_rate`` sample of requests
is compared again; a mismatch stops loading.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from prefixgen.config import ConnectorConfig
from prefixgen.errors import ConfigError, CorruptBlockError, IncompatibleStoreError, PrefixgenError
from prefixgen.format import TORCH_DTYPES, ModelFingerprint, block_keys
from prefixgen.integrations.vllm_check import (
    CheckGate,
    CheckResult,
    CheckSpec,
    WeightsWatch,
    compare_blocks,
    engine_identity_problems,
    find_model,
    likely_cause,
    relative_errors,
    tolerance,
    worst_errors,
)
from prefixgen.integrations.vllm_groups import (
    block_tables,
    group_problems,
    group_span,
    is_mla,
    key_order,
    recurrent_skip_message,
    rope_key_order,
    vllm_groups,
    write_layer,
)
from prefixgen.integrations.vllm_states import StateLoads, store_row
from prefixgen.model import (
    checkpoint_weights_digest,
    config_fingerprint,
    config_kv_layout,
    load_tokenizer,
    tp_kv_heads,
)
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore, ReadCount

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

SUPPORTED_VLLM = "0.32.0"

# What reading a store can raise when the store is damaged, being pruned or on a failing disk (a
# missing or truncated shard, a deleted file, an I/O error, a damaged or truncated index column): a cache
# miss. Nothing else is: a ValueError, IndexError or KeyError is a bug, and is raised (a lookup) or logged
# with its traceback (a load).
STORE_FAULTS = (PrefixgenError, OSError)
# The scheduler's lookups hash and search at most this many blocks at a time, letting the GIL go between:
# the scheduler thread waits for one such run at most (a fraction of a ms) while a long prompt is looked up.
LOOKUP_RUN = 128


@dataclass(slots=True)
class LoadSpec:
    """One request's load, from the scheduler to every worker: write tokens ``[start, end)`` of
    its prompt from the store blocks at ``locations`` (store block ``first_block`` onwards)."""

    req_id: str
    start: int  # vLLM had computed the tokens before it (its own prefix-cache hit)
    end: int  # the stored prefix ends here
    first_block: int  # store block number of locations[0]
    locations: list[BlockLocation]
    block_ids: list[list[int]]  # the request's vLLM block table per KV cache group, null blocks -1 (vllm_groups.py)
    state: bytes | None = None  # a hybrid model: the key of the block after which the recurrent state is (vllm_states.py)


@dataclass
class PrefixgenConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers for one step: the loads to do before the forward."""

    loads: list[LoadSpec] = field(default_factory=list)
    checks: list[CheckSpec] = field(default_factory=list)  # live checks of this step's forward (vllm_check.py)
    idle: bool = False  # the step schedules no token: the engine has nothing to run but waits for loads


@dataclass
class PrefixgenWorkerMetadata(KVConnectorWorkerMetadata):
    """What the workers tell the scheduler after a step: stored blocks that failed to load, so that
    it stops claiming them (until the engine restarts)."""

    bad_blocks: set[tuple[str, int]] = field(default_factory=set)  # (shard, slot) failing its checksum
    bad_shards: set[str] = field(default_factory=set)  # shards missing, truncated or unreadable
    checks: list[CheckResult] = field(default_factory=list)  # live checks measured (each rank its heads and layers)
    weights_changed: bool = False  # the model's weights differ from when the check passed: loads refused

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PrefixgenWorkerMetadata)
        return PrefixgenWorkerMetadata(
            self.bad_blocks | other.bad_blocks,
            self.bad_shards | other.bad_shards,
            self.checks + other.checks,
            self.weights_changed or other.weights_changed,
        )


@dataclass(slots=True)
class LoadStats:
    """Worker-side totals, for benchmarks and logs: what was written into vLLM's cache and how long it took."""

    requests: int = 0
    tokens: int = 0
    bytes: int = 0  # KV bytes written (this rank's heads, vLLM's compute dtype)
    read_bytes: int = 0  # bytes read from shard files (head-major: this rank's heads and checksums; a shared piece once)
    seconds: float = 0.0  # summed over loads (they overlap each other and the engine's steps)
    corrupt_blocks: int = 0  # blocks that failed their checksum
    failed_loads: int = 0  # loads that stopped early on a store fault (vLLM recomputed the rest)
    failed_shards: int = 0  # shards found missing, truncated or unreadable
    pieces: int = 0  # staging pieces read and written
    max_piece_bytes: int = 0  # the largest piece read (all heads, as dequantized): at most staging_bytes
    timed_out_loads: int = 0  # loads given up at their deadline (load_timeout_seconds): vLLM recomputed the rest
    check_seconds: float = 0.0  # spent on live checks (reading the store's blocks, comparing them with vLLM's)
    shared_loads: int = 0  # loads written from another load's reads of the same stored blocks (single-flight), reading nothing
    converted_bytes: int = 0  # host bytes of pieces copied out of their read buffer (a dtype conversion, fp8); 0 when none
    # Sliding-window and chunked groups (summed over such groups): tokens of the loads written into their blocks
    # (those of the window), and tokens not written because vLLM holds no block for them (before the window).
    window_tokens: int = 0
    window_tokens_skipped: int = 0
    states: int = 0  # recurrent states written (a hybrid model: one per load, into every recurrent layer)
    state_bytes: int = 0
    failed_states: int = 0  # states missing or damaged: vLLM recomputed the load whole


@dataclass(slots=True)
class ClaimStats:
    """Scheduler-side totals, for logs and tests."""

    lookups: int = 0  # prompts looked up in the store
    lookup_errors: int = 0  # lookups the store could not answer (a damaged index): misses
    lookups_deferred: int = 0  # times vLLM was told "not yet" (None) while a lookup ran in the background
    store_reopens: int = 0  # the index reopened after the store changed (refresh_seconds)
    skipped_bad_blocks: int = 0  # lookups cut short at a block (or shard) a worker had reported bad
    # Requests loaded nothing for, by reason (see :func:`skip_reason`): vLLM computes them whole.
    skipped_lora: int = 0
    skipped_multimodal: int = 0
    skipped_prompt_embeds: int = 0
    skipped_cache_salt: int = 0
    skipped_unchecked: int = 0  # the live check has not passed (or failed): vLLM computes the request
    skipped_recurrent: int = 0  # the model has recurrent state, which the connector does not load (vllm_groups.py)
    # The live check (vllm_check.py).
    checks_passed: int = 0
    checks_failed: int = 0
    check_tokens: int = 0  # stored tokens vLLM computed for checks instead of loading them
    weights_changed: int = 0  # times the workers found the weights changed since the check passed


@dataclass
class PrefixgenConnectorStats(KVConnectorStats):
    """The counters of :class:`LoadStats` and :class:`ClaimStats` since the last report, summed over the
    scheduler and the workers: vLLM logs them with its stats ("KV Transfer metrics: ...")."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# The counters of LoadStats and ClaimStats on vLLM's Prometheus endpoint (/metrics): field -> (name without
# "vllm:prefixgen_" and "_total", help). A field not named here gets a counter of its own name; ClaimStats'
# skipped_<reason> fields are one counter, labelled by reason.
PROM_COUNTERS: dict[str, tuple[str, str]] = {
    "requests": ("loads", "Loads from the store done (written whole, or up to a store fault)"),
    "tokens": ("loaded_tokens", "Prompt tokens whose KV was loaded from the store instead of computed"),
    "bytes": ("loaded_bytes", "KV bytes written into vLLM's cache (each rank its heads, in vLLM's dtype)"),
    "read_bytes": (
        "read_bytes",
        "Bytes read from shard files (a head-major store: each rank its heads; a piece once for every load sharing it)",
    ),
    "seconds": ("load_seconds", "Seconds spent loading, summed over loads (they overlap each other and the steps)"),
    "pieces": ("load_pieces", "Staging pieces read and written by loads"),
    "corrupt_blocks": ("corrupt_blocks", "Stored blocks that failed their checksum: not loaded, vLLM computed them"),
    "failed_loads": ("failed_loads", "Loads cut short by a store fault: vLLM computed the rest"),
    "failed_shards": ("failed_shards", "Shards found missing, truncated or unreadable: their blocks are not loaded"),
    "lookups": ("lookups", "Prompts looked up in the store"),
    "lookup_errors": ("lookup_errors", "Lookups the store could not answer (a damaged index): cache misses"),
    "check_seconds": ("check_seconds", "Seconds the workers spent on live checks (reading the store, comparing with vLLM's KV)"),
    "skipped_bad_blocks": ("skipped_bad_blocks", "Lookups cut short at a block or shard a worker had reported bad"),
    "timed_out_loads": ("timed_out_loads", "Loads given up at their deadline (load_timeout_seconds): vLLM computed the rest"),
    "lookups_deferred": ("lookups_deferred", "Scheduler steps told 'not yet' while a lookup ran in the background"),
    "store_reopens": ("store_reopens", "Index reopened after the store changed (append, compaction, prune, gc)"),
    "checks_passed": ("checks_passed", "Live checks whose KV computed by vLLM matched the store's"),
    "checks_failed": ("checks_failed", "Live checks whose KV computed by vLLM differed from the store's: loading stopped"),
    "check_tokens": ("check_tokens", "Stored tokens vLLM computed for live checks instead of loading them"),
    "weights_changed": ("weights_changed", "Weights found changed since the live check passed: loads stop until it passes again"),
    "shared_loads": ("shared_loads", "Loads written from another load's read of the same stored blocks, reading nothing"),
    "converted_bytes": (
        "converted_bytes",
        "Host bytes of read pieces copied for a conversion (fp8, cast_kv_dtype, a head-major store's transpose)",
    ),
    "window_tokens": (
        "window_tokens",
        "Loaded tokens written into sliding-window or chunked layers' blocks (their window), per group",
    ),
    "window_tokens_skipped": (
        "window_tokens_skipped",
        "Loaded tokens not written into sliding-window or chunked layers (before their window: vLLM holds no block)",
    ),
}
SKIPPED = ("skipped_requests", "Requests loaded nothing for (vLLM computes them whole), by reason")


class PrefixgenPromMetrics(KVConnectorPromMetrics):
    """The connector's counters as Prometheus counters ``vllm:prefixgen_<name>_total`` (:data:`PROM_COUNTERS`) on
    vLLM's ``/metrics``, summed over the scheduler and the workers (tensor-parallel ranks add up). vLLM builds it
    with its Prometheus logger (stats on: not ``--disable-log-stats``) and feeds it each step's
    :class:`PrefixgenConnectorStats`.

    Example:
        >>> REGISTRY.get_sample_value("vllm:prefixgen_loaded_tokens_total", {"model_name": "m", "engine": "0"})  # doctest: +SKIP
        4096.0
    """

    def __init__(
        self, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}  # Prometheus name -> its counter
        self._children: dict[tuple[int, str], Any] = {}  # (engine, stats field) -> the labelled counter
        for name in _counter_names(LoadStats) + _counter_names(ClaimStats):  # every counter shows from the start, at 0
            for engine_idx in per_engine_labelvalues:
                self._child(name, engine_idx)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if value:
                self._child(name, engine_idx).inc(value)

    def _child(self, field_name: str, engine_idx: int) -> Any:
        child = self._children.get((engine_idx, field_name))
        if child is None:
            labels = list(self.per_engine_labelvalues[engine_idx])
            if field_name.startswith("skipped_") and field_name not in PROM_COUNTERS:
                (name, doc), extra = SKIPPED, ["reason"]
                labels.append(field_name.removeprefix("skipped_"))
            else:
                (name, doc), extra = PROM_COUNTERS.get(field_name, (field_name, field_name.replace("_", " "))), []
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._counter_cls(name=f"vllm:prefixgen_{name}", documentation=doc, labelnames=self._labelnames + extra)
                self._metrics[name] = metric
            child = self._children[(engine_idx, field_name)] = metric.labels(*labels)
        return child


def _counter_names(stats: type[LoadStats | ClaimStats]) -> list[str]:
    """The fields of ``stats`` that count (vLLM collects and sums them): all but ``max_piece_bytes``, a maximum."""
    return [f.name for f in dataclasses.fields(stats) if f.name != "max_piece_bytes"]


def _counters_since(stats: LoadStats | ClaimStats, last: dict[str, int | float]) -> PrefixgenConnectorStats | None:
    """What ``stats`` counted since ``last`` (which becomes now); None when nothing changed."""
    now = {name: getattr(stats, name) for name in _counter_names(type(stats))}
    delta = {name: value - last.get(name, 0) for name, value in now.items()}
    last.update(now)
    return PrefixgenConnectorStats(delta) if any(delta.values()) else None


@dataclass(slots=True)
class _Match:
    end: int  # tokens of the longest stored prefix of the prompt (but its last token)
    locations: list[BlockLocation]
    state: bytes | None = None  # a hybrid model: the key of the last block, after which the state is stored


class _Threads:
    """Daemon threads running submitted calls in order. A thread stuck in a call (a read that never returns)
    can be written off (:meth:`replace`): a new thread takes its place, and the stuck one exits if its call
    ever returns. Unlike ``ThreadPoolExecutor``, whose threads the interpreter joins at exit and whose
    ``shutdown(wait=True)`` joins them too, a hung read holds up neither shutdown nor the process's end."""

    def __init__(self, threads: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._lock = threading.Lock()
        self._retired: set[int] = set()  # idents of threads written off
        self._started = 0
        self._live = 0
        for _ in range(threads):
            self._start()

    def _start(self) -> None:
        self._started += 1
        self._live += 1
        threading.Thread(target=self._run, name=f"{self._name}-{self._started}", daemon=True).start()

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def replace(self, ident: int) -> None:
        """Write off thread ``ident`` (stuck in its call): start another in its place."""
        with self._lock:
            if ident not in self._retired:
                self._retired.add(ident)
                self._start()

    def shutdown(self) -> None:
        """Let the threads end after their current call; wait for none of them."""
        with self._lock:
            for _ in range(self._live):
                self._queue.put(None)

    def _run(self) -> None:
        me = threading.get_ident()
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever asks the future
                    future.set_exception(exc)
            with self._lock:
                if me in self._retired:  # replaced while stuck: the new thread does its work now
                    self._retired.discard(me)
                    self._live -= 1
                    return
        with self._lock:
            self._live -= 1


@dataclass(eq=False)
class _Loading:
    """One load on the worker, between its load thread and the engine thread (which gives it up at its deadline).

    Single-flight: a load whose first stored blocks are among those a load in flight has still to read joins it (a
    follower: no thread, no read of its own); the leader's thread writes each piece it reads into every member's
    slots, and a piece it cannot read stops them all (vLLM recomputes each from its first token not written). A
    follower whose blocks go on past the shared run (another prompt after a shared system prompt) is handed back to
    the load threads once the leader read that run, and reads the rest itself."""

    load: LoadSpec
    deadline: float  # time.monotonic() past which it is given up (inf: none)
    written: int  # tokens [load.start, written) are in vLLM's cache
    future: Future | None = None
    state: str = "queued"  # queued -> running -> done, or abandoned (given up: its thread writes nothing more)
    thread: int | None = None  # ident of the load thread running it
    pending: Any = None  # CUDA: the event of the last piece's write, still running on the side stream
    reading: frozenset[str] = frozenset()  # the shards of the piece being read (reported bad if the read never ends)
    lock: threading.Lock = field(default_factory=threading.Lock)
    after: Any = None  # CUDA: the event of the engine's work queued before the step that started it (writes wait for it)
    # A leader's members (itself first, then its followers), and the first of its locations not read yet: a load may
    # join only at or after it (guarded by the connector's lock; inf once the leader wrote its last piece).
    group: list[_Loading] | None = None
    next_read: float = 0
    shared_end: float = math.inf  # a follower: its tokens before this are the leader's too (it reads the rest itself)


@dataclass(eq=False)
class _Staging:
    """A host buffer pieces are read into, and (CUDA) the events of the device copies still reading out of it."""

    tensor: torch.Tensor  # [staging bytes] uint8, pinned on CUDA
    events: list = field(default_factory=list)


class _StagingPool:
    """Read buffers of ``nbytes``, reused: a new buffer's pages are mapped and zeroed on first touch, which costs more
    than the read itself (a 4,096-token piece of small-llama: ~50 ms of page faults against ~8 ms to copy into mapped
    pages), and pinning one costs more still. On CUDA they are pinned, so the device copies straight out of them
    (asynchronously, on the load stream): a piece is never copied into another host tensor. Up to ``keep`` free
    buffers are kept; when all are in use (a thread stuck in a read that hangs holds one) another is made, never
    waited for, so no load waits for another's read."""

    def __init__(self, nbytes: int, keep: int, pinned: bool):
        self.nbytes, self.keep, self.pinned = nbytes, keep, pinned
        self._free: list[_Staging] = []
        self._lock = threading.Lock()
        self.made = 0  # buffers allocated so far

    def acquire(self) -> _Staging:
        """A buffer no read and no device copy uses."""
        with self._lock:
            staging = self._free.pop() if self._free else None
            if staging is None:
                self.made += 1
        if staging is None:
            staging = _Staging(torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pinned))
        for event in staging.events:  # CUDA: the copies out of it launched by the last piece (done by now, mostly)
            event.synchronize()
        staging.events.clear()
        return staging

    def release(self, staging: _Staging, event: Any = None) -> None:
        """``staging`` is free once ``event`` (CUDA: the last device copy out of it), if any, has passed."""
        if event is not None:
            staging.events.append(event)
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(staging)


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds, as vLLM's
    ``QKVParallelLinear`` shards them: consecutive slices of ``total / tp`` heads, or, when there are
    fewer heads than ranks, one head replicated over ``tp / total`` consecutive ranks.

    Example:
        >>> kv_head_range(8, 2, 1), kv_head_range(2, 4, 3)
        (range(4, 8), range(1, 2))
    """
    heads = tp_kv_heads(total_kv_heads, tp_size, tp_rank)
    if heads is None:
        raise ConfigError(f"the {total_kv_heads} KV heads do not split over tensor parallel size {tp_size}")
    return heads


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """vLLM cache slots of tokens ``[start, end)`` of a request whose block table is ``block_ids``.

    Example:
        >>> slot_mapping([7, 3], 4, 2, 6).tolist()
        [30, 31, 12, 13]
    """
    pos = torch.arange(start, end)
    return torch.as_tensor(block_ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def model_folder(vllm_config: VllmConfig) -> Path:
    """The local folder of the checkpoint vLLM loads (a Hub id resolves to its snapshot in the HF cache)."""
    model = vllm_config.model_config.model
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model,
            revision=vllm_config.model_config.revision,
            cache_dir=vllm_config.load_config.download_dir,
            allow_patterns=["*.safetensors", "*.json"],
            local_files_only=True,
        )
    )


def engine_fingerprint(vllm_config: VllmConfig, chat_template: str | None = None) -> ModelFingerprint:
    """The prefixgen fingerprint of the model vLLM serves: what ``prefixgen build`` writes into the
    manifest for the same model. The config is vLLM's effective one (``model_config.hf_config``: the
    checkpoint's with ``hf_overrides`` applied, e.g. a YaRN ``rope_parameters``), the weights digest
    that of the checkpoint's files.

    Example:
        >>> store.manifest.model.differences(engine_fingerprint(vllm_config))  # doctest: +SKIP
        []
    """
    mc = vllm_config.model_config
    text = mc.hf_text_config
    tokenizer = load_tokenizer(mc.tokenizer, trust_remote_code=mc.trust_remote_code, chat_template=chat_template)
    layout = config_kv_layout(text, str(mc.dtype).removeprefix("torch."))
    weights = checkpoint_weights_digest(model_folder(vllm_config), bool(getattr(text, "tie_word_embeddings", False)))
    # The text config vLLM computes with (after hf_overrides; a composite model's language model), under the
    # architecture of the whole checkpoint (what a build records).
    architecture = str((getattr(mc.hf_config, "architectures", None) or [""])[0])
    return config_fingerprint(text, tokenizer, layout, weights, name=mc.model, architecture=architecture)


def unsupported_features(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[str]:
    """One line per engine feature the connector refuses at start, naming the feature and the setting
    (empty when it can serve this engine).

    Example:
        >>> unsupported_features(vllm_config, kv_cache_config)  # doctest: +SKIP
        ['speculative decoding (method eagle): ...']
    """
    problems = []
    pc = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, name, 1) > 1:
            problems.append(
                f"context parallelism ({name}={getattr(pc, name)}): vLLM then spreads each block's tokens over "
                "several ranks, which the connector does not write; run with context parallel size 1"
            )
    spec = vllm_config.speculative_config
    if spec is not None:
        problems.append(
            f"speculative decoding (method {spec.method}): its draft layers have KV caches the store does not hold; "
            "run without --speculative-config"
        )
    problems += group_problems(vllm_groups(kv_cache_config))  # each group loads into its own blocks (vllm_groups.py)
    policy = vllm_config.kv_transfer_config.kv_load_failure_policy
    if policy != "recompute":
        # vLLM's config keeps no record of which fields were set, so an explicit "fail" looks like the default:
        # the connector cannot tell them apart and does not override either.
        problems.append(
            f"kv_load_failure_policy {policy!r}: a stored block that cannot be read is a cache miss vLLM must "
            'recompute; add "kv_load_failure_policy": "recompute" to --kv-transfer-config (with "fail", vLLM fails '
            "the request instead)"
        )
    return problems


def skip_reason(request: Request) -> str | None:
    """Why the store cannot serve ``request`` (vLLM's own block hashes include these, the store's keys hash
    token ids of the base model only), or None. The reasons are the ``skipped_<reason>`` fields of :class:`ClaimStats`.

    Example:
        >>> skip_reason(request_with_lora)  # doctest: +SKIP
        'lora'
    """
    if request.lora_request is not None:
        return "lora"  # prefixgen builds with the base model's weights only: no store is built for an adapter
    if request.mm_features:
        return "multimodal"
    if request.prompt_embeds is not None or request.prompt_token_ids is None:
        return "prompt_embeds"
    if request.cache_salt:
        return "cache_salt"
    return None


def stored_prefix(store: PrefixStore, token_ids: Sequence[int], max_run: int | None = None) -> tuple[list[BlockLocation], int]:
    """Locations of the longest stored prefix of ``token_ids`` (whole store blocks), and how many blocks
    were hashed to find it.

    The blocks are hashed and looked up in growing runs (1, 2, 4, ... blocks), each chained on the last key
    of the run before: a prompt that misses early costs a few SHA-256s, not one per block of the prompt
    (a cold 128k-token prompt: 1 instead of 8k), and a hit of ``n`` blocks costs fewer than ``2n + 1``.

    ``max_run``: runs of at most this many blocks, the GIL let go between them (for a background thread:
    the thread that wants it, vLLM's scheduler, waits for at most one run instead of the interpreter's 5 ms
    switch interval).

    Example:
        >>> locations, hashed = stored_prefix(store, list(range(100)))  # doctest: +SKIP
    """
    bs = store.block_size
    total = len(token_ids) // bs
    locations: list[BlockLocation] = []
    parent = store.manifest.root_key
    run = hashed = 0
    while len(locations) < total:
        run = min(max(1, 2 * run), total - len(locations), max_run or total)
        start = len(locations) * bs
        keys = block_keys(token_ids[start : start + run * bs], bs, parent)
        hashed += run
        found = store.find_prefix(keys).locations
        locations += found
        if len(found) < run:
            break
        parent = keys[-1]
        if max_run:
            time.sleep(0)  # lets another thread waiting for the GIL run now
    return locations, hashed


class PrefixgenConnector(KVConnectorBase_V1, SupportsHMA):
    """A vLLM v1 KV connector that loads stored prompt prefixes from a prefixgen store (read only).

    ``kv_connector_extra_config`` options:

    * ``store`` (required): path of the store.
    * ``chat_template``: the Jinja file given to ``prefixgen build --chat-template`` (and to
      ``vllm serve --chat-template``), when the tokenizer has no template of its own; it is part
      of the tokenizer identity the store is checked against.
    * ``staging_bytes``, ``staging_buffers``, ``load_threads``, ``yield_seconds``, ``cast_kv_dtype``, ``check_rate``,
      ``check_tolerance``: see :class:`~prefixgen.config.ConnectorConfig`.

    Example:
        >>> from vllm import LLM  # doctest: +SKIP
        >>> from vllm.config import KVTransferConfig  # doctest: +SKIP
        >>> llm = LLM(model, kv_transfer_config=KVTransferConfig(kv_connector="PrefixgenConnector",
        ...     kv_connector_module_path="prefixgen.integrations.vllm", kv_role="kv_consumer",
        ...     kv_load_failure_policy="recompute", kv_connector_extra_config={"store": "store"}))  # doctest: +SKIP
    """

    _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        if ktc.kv_role != "kv_consumer":
            raise ConfigError(
                f"PrefixgenConnector only loads stored prefixes: set kv_role to kv_consumer (got {ktc.kv_role!r}); "
                "writing newly computed KV into a store is not supported"
            )
        self.config = ConnectorConfig.from_extra(dict(ktc.kv_connector_extra_config or {}))
        path = self.config.store
        self.store = PrefixStore.open(path)
        self.block_size = vllm_config.cache_config.block_size  # vLLM's block size, not the store's
        problems = unsupported_features(vllm_config, kv_cache_config)
        if problems:
            raise ConfigError("PrefixgenConnector cannot serve this engine:\n  " + "\n  ".join(problems))
        self._groups = vllm_groups(kv_cache_config)  # vLLM's KV cache groups: each request has a block table per group
        self._states = StateLoads.for_engine(self.store, self._groups, kv_cache_config)  # a hybrid's recurrent state
        if role == KVConnectorRole.SCHEDULER:
            self._check_model(vllm_config, self.config.chat_template)
            self._gate = CheckGate(rate=self.config.check_rate)  # nothing is loaded until the live check passed
            self._matches: dict[str, _Match] = {}
            self._pending: list[LoadSpec] = []
            self._bad = PrefixgenWorkerMetadata()  # what the workers reported: not claimed until the index reopens
            self._logged: set[str] = set()
            self.claim_stats = ClaimStats()
            self._reported: dict[str, int | float] = {}
            # Lookups run on a thread of their own: schedule() never hashes a prompt or reads the index itself.
            self._lookup_threads = _Threads(1, "prefixgen-lookup")
            self._recurrent = None if self._states else recurrent_skip_message(self._groups)  # why nothing is loaded
            if self._recurrent:
                logger.warning("PrefixgenConnector: %s", self._recurrent)
            self._lookups: dict[str, tuple[Future, float]] = {}  # request id -> its lookup and when it was asked for
            self._lookup_thread: int | None = None  # ident of the thread running the current lookup
            self._idle = False  # the last step scheduled no token: waiting for a lookup then costs no running request
            self._reopens = 0  # store reopens seen by the scheduler thread (the refresh thread counts them in claim_stats)
            self._stop = threading.Event()
            if self.config.refresh_seconds > 0:
                threading.Thread(target=self._refresh_loop, name="prefixgen-refresh", daemon=True).start()
        else:
            self._dtype = vllm_config.model_config.dtype
            self._layers: list[tuple[Any, int]] = []  # (vLLM attention layer, HF layer index)
            self._layer_groups: list[int] = []  # the KV cache group of each of self._layers
            self._key_order: torch.Tensor | None = None  # vLLM's order of a key's values, if not the store's
            self._failed_loads: set[str] = set()  # with several groups: loads cut short, reported as failed receives
            self._heads = range(self.store.manifest.kv.num_kv_heads)
            self._stage = range(self.store.manifest.kv.num_layers)  # this pipeline stage's layers (all without PP)
            self._pool = _Threads(self.config.load_threads, "prefixgen-load")
            self._inflight: dict[str, _Loading] = {}
            self._staging: _StagingPool | None = None  # the read buffers (made in register_kv_caches)
            self._lock = threading.Lock()  # the load threads report through what it guards
            self._load_errors: set[int] = set()
            self._new_bad = PrefixgenWorkerMetadata()  # for the scheduler, since the last step
            self._logged: set[str] = set()
            self._stream = None  # CUDA: the side stream the loads write on
            self.stats = LoadStats()
            self._reported = {}
            self._num_blocks = kv_cache_config.num_blocks
            self._watch: WeightsWatch | None = None  # made in register_kv_caches
            self._weights_changed = False
            self._limit = self.config.check_tolerance or tolerance(
                self.store.manifest.kv.storage, self.store.manifest.kv.dtype, str(self._dtype).removeprefix("torch.")
            )
        logger.info(
            "PrefixgenConnector (%s): store %s, %s; vLLM's KV cache groups: %s",
            role.name.lower(),
            path,
            self.store.manifest.model.name,
            ", ".join(f"{g.spec} x{len(g.layer_names)} (block {g.block_size})" for g in self._groups),
        )

    # ------------------------------------------------------------------ start-up checks

    def _check_model(self, vllm_config: VllmConfig, chat_template: str | None) -> None:
        theirs = engine_fingerprint(vllm_config, chat_template)
        problems = self.store.manifest.model.differences(theirs)
        problems += engine_identity_problems(vllm_config, self.store.manifest, self.config.cast_kv_dtype)
        if problems:
            raise IncompatibleStoreError(
                f"{self.store.path} was built for another model ({self.store.manifest.model.name}) than vLLM serves "
                f"({vllm_config.model_config.model}):\n  " + "\n  ".join(problems)
            )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Map vLLM's attention layers to the store's layers and check each can take the store's KV."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        kv = self.store.manifest.kv
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        self._heads = kv_head_range(kv.num_kv_heads, tp, get_tensor_model_parallel_rank())
        layers = self._vllm_config.compilation_config.static_forward_context
        group_of = {name: g.index for g in self._groups for name in g.layer_names}
        for name in kv_caches:
            layer = layers[name]
            if self._states and self._states.take(name, layer, extract_layer_index(name)):
                continue  # a recurrent layer: its state is written once a load's KV is (vllm_states.py)
            impl = getattr(layer, "impl", None)
            update = getattr(impl, "do_kv_cache_update", None)
            if update is None or ("key" not in inspect.signature(update).parameters and not is_mla(layer)):
                raise ConfigError(
                    f"PrefixgenConnector cannot write into layer {name}: its attention backend "
                    f"({type(impl).__name__}) has no key/value cache-write op; use a standard attention backend "
                    "(CPU_ATTN on CPU, FLASH_ATTN on CUDA)"
                )
            index = store_row(kv, extract_layer_index(name))  # a hybrid's rows hold its attention layers only
            if not 0 <= index < kv.num_layers or layer.head_size != kv.head_dim or layer.num_kv_heads != len(self._heads):
                raise IncompatibleStoreError(
                    f"{self.store.path}: vLLM layer {name} (KV heads {layer.num_kv_heads}, head size {layer.head_size}) "
                    f"does not match the store ({kv.num_layers} layers, {len(self._heads)} KV heads per rank, "
                    f"head_dim {kv.head_dim})"
                )
            self._layers.append((layer, index))
            self._layer_groups.append(group_of[name])
        # A pipeline stage holds consecutive layers: only theirs are converted and uploaded.
        indices = sorted(index for _, index in self._layers)
        if indices and indices == list(range(indices[0], indices[-1] + 1)):
            self._stage = range(indices[0], indices[-1] + 1)
        cuda = bool(self._layers) and self._layers[0][0].kv_cache.device.type == "cuda"
        piece = self._piece_blocks() * self.store.block_size * kv.bytes_per_token  # a piece's bytes as stored
        self._staging = _StagingPool(piece, self.config.staging_buffers, pinned=cuda)
        model = find_model(self._layers[0][0]) if self._layers else None
        if kv.kind == "mla":
            self._key_order = rope_key_order(self._vllm_config.model_config.hf_text_config, kv.head_dim - kv.latent_rank)
        else:
            self._key_order = key_order(model, kv.head_dim)
        if model is not None:
            self._watch = WeightsWatch(model)
        else:
            logger.warning(
                "PrefixgenConnector: cannot find vLLM's model: weights changed in place without reset_cache() are only "
                "found by the sampled live checks (check_rate)"
            )

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored tokens of the prompt beyond ``num_computed_tokens`` (vLLM's own hits come first),
        loaded asynchronously.

        The store covers the longest stored prefix of all but the last prompt token (vLLM needs one
        token to compute), in whole store blocks; the count may end inside a vLLM block. A request the
        store cannot serve (:func:`skip_reason`) gets 0, counted in :attr:`claim_stats`; a store that
        cannot be searched is a miss, and a claim stops at the first block a worker reported bad.
        """
        match = self._matches.get(request.request_id)
        if match is None:
            if self._reopens != self.claim_stats.store_reopens:  # the store changed: what failed may be fixed or moved
                self._reopens = self.claim_stats.store_reopens
                self._bad = PrefixgenWorkerMetadata()
            lookup, since = self._lookups.get(request.request_id, (None, 0.0))
            if lookup is None:
                reason = "recurrent" if self._recurrent else skip_reason(request)
                if reason is not None:
                    self._skip(reason)
                    match = _Match(0, [])
                else:
                    lookup = self._lookup_threads.submit(self._lookup, list(request.prompt_token_ids or []))
                    since = time.monotonic()
                    self._lookups[request.request_id] = (lookup, since)
            if match is None:
                if not lookup.done() and self._idle and self.config.yield_seconds > 0:
                    wait([lookup], timeout=self.config.yield_seconds)  # nothing runs this step: waiting delays nobody
                timeout = self.config.load_timeout_seconds
                if not lookup.done() and not (timeout > 0 and time.monotonic() - since > timeout):
                    self.claim_stats.lookups_deferred += 1
                    return None, False  # vLLM keeps the request waiting and asks again next step
                del self._lookups[request.request_id]
                state = None
                if lookup.done():
                    locations = self._usable(lookup.result())  # a bug in the lookup is raised here, not made a miss
                    if self._states:  # a hybrid: up to the last block whose recurrent state vLLM can resume from
                        locations, state = self._states.cut(lookup.result(), locations)
                else:  # an index read that never returns: a miss, and another thread takes the lookups after it
                    locations = []
                    self._give_up_lookup(lookup)
                match = _Match(len(locations) * self.store.block_size, locations, state)
                if locations and not self._gate_allows(request, num_computed_tokens, locations):
                    match = _Match(0, [])  # vLLM computes it (a live check, or no check has passed)
            self._matches[request.request_id] = match
        tokens = max(0, match.end - num_computed_tokens)
        return tokens, tokens > 0

    def _refresh_loop(self) -> None:
        """Every ``refresh_seconds``: reopen the index if the store changed (off the scheduler thread)."""
        while not self._stop.wait(self.config.refresh_seconds):
            try:
                if self.store.refresh():
                    self.claim_stats.store_reopens += 1
                    logger.info("PrefixgenConnector: the store changed; its index was reopened")
            except STORE_FAULTS as exc:  # mid-change or damaged: keep the index we have, try again later
                _warn_once(
                    self._logged, str(exc), "PrefixgenConnector: cannot reopen the store's index (%s); keeping the last one", exc
                )

    def _give_up_lookup(self, lookup: Future) -> None:
        """A lookup past ``load_timeout_seconds``: if it has not started, it never will; the thread of the lookup
        running (stuck in an index read) is replaced, so the lookups queued after it go on."""
        self.claim_stats.lookup_errors += 1
        lookup.cancel()
        if self._lookup_thread is not None:  # the lookup running now (this one, or one it was queued behind) is stuck
            self._lookup_threads.replace(self._lookup_thread)
        _warn_once(
            self._logged,
            "lookup timeout",
            "PrefixgenConnector: a store lookup took more than load_timeout_seconds=%s (an index read that hangs?); "
            "vLLM computes the prompt",
            self.config.load_timeout_seconds,
        )

    def _lookup(self, ids: list[int]) -> list[BlockLocation]:
        """Store locations of the longest stored prefix of ``ids[:-1]``; none when the index cannot be read."""
        self._lookup_thread = threading.get_ident()
        self.claim_stats.lookups += 1
        try:
            found = stored_prefix(self.store, ids[:-1], max_run=LOOKUP_RUN)[0]
            if self._states:
                return self._states.lookup(self.store.keys(ids[: len(found) * self.store.block_size]), found)
            return found
        except STORE_FAULTS as exc:
            self.claim_stats.lookup_errors += 1
            _warn_once(self._logged, str(exc), "PrefixgenConnector: cannot search the store (%s); vLLM computes the prompt", exc)
            return []

    def _usable(self, locations: list[BlockLocation]) -> list[BlockLocation]:
        """The leading ``locations`` before the first one a worker reported bad (later blocks need its KV)."""
        bad = self._bad
        for i, loc in enumerate(locations):
            if loc.shard in bad.bad_shards or (loc.shard, loc.slot) in bad.bad_blocks:
                self.claim_stats.skipped_bad_blocks += 1
                return locations[:i]
        return locations

    def _skip(self, reason: str) -> None:
        n = getattr(self.claim_stats, f"skipped_{reason}") + 1
        setattr(self.claim_stats, f"skipped_{reason}", n)
        if reason == "recurrent":  # said at start (and in the counter) for every request
            return
        if n == 1:  # a warning: INFO of this (non-vLLM) logger is not shown by default
            logger.warning(
                "PrefixgenConnector: loads nothing for requests with %s (the store's keys hash the base model's "
                "token ids only); vLLM computes them. Counted in the connector's stats as skipped_%s",
                reason.replace("_", " "),
                reason,
            )

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """No group's blocks for a load are left unzeroed: vLLM zeroes a new block of a hybrid model (its pages are
        shared with the Mamba groups' float32 states) before the step's loads start (``_update_states`` comes before
        ``start_load_kv``), and a load that ends inside a block writes only its head; the tail left as another group
        wrote it read as bf16 is NaN, and vLLM's CPU attention multiplies it by the mask's 0 (vllm_states.py)."""
        return ()

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        match = self._matches.pop(request.request_id, None)
        if num_external_tokens <= 0 or match is None:
            return
        bs = self.store.block_size
        start = match.end - num_external_tokens
        first = start // bs
        load = LoadSpec(request.request_id, start, match.end, first, match.locations[first:], block_tables(blocks), match.state)
        self._pending.append(load)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self._idle = scheduler_output.total_num_scheduled_tokens == 0
        meta = PrefixgenConnectorMetadata(self._pending, idle=self._idle)
        meta.checks = self._gate.due(
            scheduler_output.num_scheduled_tokens, lambda req_id: block_tables(self._kv_cache_manager.get_blocks(req_id))
        )
        self._pending = []
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Remember the stored blocks and shards the workers could not load: they are not claimed again; take in
        the live checks' results."""
        reported = connector_output.kv_connector_worker_meta
        if isinstance(reported, PrefixgenWorkerMetadata):
            self._bad.bad_blocks |= reported.bad_blocks
            self._bad.bad_shards |= reported.bad_shards
            self._take_checks(reported)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matches.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)  # aborted while looked up: the answer is dropped
        self._gate.finished(request.request_id)
        return False, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hybrid KV cache manager (``SupportsHMA``) calls this instead of :meth:`request_finished`: the
        connector holds no blocks of a finished request, whatever the groups."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def reset_cache(self) -> bool:
        """vLLM's reset for weight updates (``reset_prefix_cache(reset_connector=True)``): nothing is loaded until
        the live check passes again, against the engine as it is now."""
        self._gate.reset()
        logger.info("PrefixgenConnector: cache reset; nothing is loaded until the live check passes again")
        return True

    # ------------------------------------------------------------------ live check hooks (vllm_check.py)

    def _gate_allows(self, request: Request, computed: int, locations: list[BlockLocation]) -> bool:
        """Whether ``request``'s stored prefix may be loaded; if not, vLLM computes it (and it may be compared)."""
        gate = self._gate
        if gate.wants_probe() and gate.probe(request, computed, locations, self.store.block_size):
            self.claim_stats.check_tokens += len(locations) * self.store.block_size - computed
            self.claim_stats.skipped_unchecked += not gate.loads_allowed
            return False
        if gate.loads_allowed:
            return True
        self.claim_stats.skipped_unchecked += 1
        return False

    def _take_checks(self, reported: PrefixgenWorkerMetadata) -> None:
        gate = self._gate
        if reported.weights_changed and gate.state == "passed":
            self.claim_stats.weights_changed += 1
            logger.warning(
                "PrefixgenConnector: the model's weights changed since the live check passed; nothing is loaded until "
                "it passes again"
            )
            gate.reset()
        by_request: dict[str, list[CheckResult]] = {}
        for result in reported.checks:
            by_request.setdefault(result.req_id, []).append(result)
        for req_id, results in by_request.items():
            if req_id not in gate.sent:
                continue  # sent before a reset: it measured another engine state
            gate.sent.discard(req_id)
            if any(r.failed_read for r in results):
                continue  # no verdict: another request is compared
            gate.history.append((req_id, all(r.passed for r in results), worst_errors(results)))
            if all(r.passed for r in results):
                self.claim_stats.checks_passed += 1
                if gate.state == "checking":
                    gate.state = "passed"
                    logger.info("PrefixgenConnector: live check passed (%s): loading stored prefixes", _errors(results))
                continue
            self.claim_stats.checks_failed += 1
            gate.state = "failed"
            gate.last_failure = likely_cause(results)
            logger.error(
                "PrefixgenConnector: the KV vLLM computed for request %s differs from the store's by more than "
                "rounding explains (limit %.3g, relative RMS per layer: %s). Likely cause: %s. Nothing more is loaded "
                "from %s until reset_prefix_cache(reset_connector=True) and a passing check",
                req_id,
                results[0].limit,
                _errors(results),
                gate.last_failure,
                self.store.path,
            )

    # ------------------------------------------------------------------ worker side

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Hand each load of this step to a load thread; :meth:`get_finished` reports it when done.

        On CUDA the loads write on a side stream that first waits for the work queued so far on the
        engine's stream (nothing the engine queued for those blocks can land after the load)."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, PrefixgenConnectorMetadata)
        if not meta.loads:
            return
        if not self._layers:
            raise RuntimeError("PrefixgenConnector: vLLM did not register its KV caches with the connector")
        if not self._weights_match():
            with self._lock:  # nothing written: vLLM computes these requests whole
                for load in meta.loads:
                    self._report_unwritten(load, load.start)
            for load in meta.loads:  # reported finished by the next get_finished
                self._inflight[load.req_id] = _Loading(load, math.inf, written=load.start, future=_done(), state="done")
            return
        after = None
        device = self._layers[0][0].kv_cache.device
        if device.type == "cuda":
            if self._stream is None:  # made here, on the engine's thread: the load threads share one
                self._stream = torch.cuda.Stream(device)
            after = torch.cuda.Event()
            after.record()
        timeout = self.config.load_timeout_seconds
        deadline = time.monotonic() + timeout if timeout > 0 else math.inf
        leaders = []
        for load in meta.loads:  # all joined first, then started: a load of this step joins another of this step
            loading = _Loading(load, deadline, written=load.start, after=after)
            if not self._join(loading):  # a load of its own, on a load thread
                loading.group = [loading]
                leaders.append(loading)
            self._inflight[load.req_id] = loading
        for loading in leaders:
            loading.future = self._pool.submit(self._load_safely, loading)

    def _join(self, loading: _Loading) -> bool:
        """Single-flight: if a load in flight has still to read every stored block ``loading`` needs (the same (shard,
        slot) run, at the same place in the prompt), ``loading`` joins it and is written from its reads; False if none.
        Its blocks after the run it shares (if any) it reads itself, once the other read that run (:meth:`_detach`); a load
        whose first block the other has read already reads all of its own."""
        load = loading.load
        mine = [(loc.shard, loc.slot) for loc in load.locations]
        if not mine:
            return False
        for leader in self._inflight.values():
            at = load.first_block - leader.load.first_block  # where its blocks start in the leader's (the same depth)
            if leader.group is None or at < 0:
                continue
            theirs = leader.load.locations[at : at + len(mine)]
            common = next((j for j, loc in enumerate(theirs) if (loc.shard, loc.slot) != mine[j]), len(theirs))
            if common == 0:
                continue
            with self._lock:
                if leader.next_read > at:  # read past its first block already (or finished): not joined
                    continue
                loading.state, loading.future = "running", Future()  # set when it is written (_finish)
                loading.shared_end = (load.first_block + common) * self.store.block_size
                leader.group.append(loading)
                self.stats.shared_loads += 1
            return True
        return False

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose load is done (written, or stopped at a fault already reported as load errors).

        On a step that runs nothing (:attr:`PrefixgenConnectorMetadata.idle`) while loads run, the engine thread
        (which calls this every step) waits up to ``yield_seconds`` for one to finish: an in-process engine's step
        loop otherwise spins holding the GIL, and the load threads' Python between their GIL-free reads and copies
        would run only in the interpreter's 5 ms switch slices (a 4,096-token load on an idle CPU engine: 0.09 GB/s
        instead of 1.4-2.5). A step that runs a batch never waits: its forward releases the GIL on its own."""
        if self._inflight and self.config.yield_seconds > 0 and self._idle_step():
            futures = [loading.future for loading in self._inflight.values()]
            wait(futures, timeout=self.config.yield_seconds, return_when=FIRST_COMPLETED)
        now = time.monotonic()
        done = set()
        for req_id, loading in self._inflight.items():
            if loading.future.done():
                done.add(req_id)
            elif now >= loading.deadline:
                self._give_up(loading)
                done.add(req_id)
        for req_id in done:
            del self._inflight[req_id]
        return None, done or None

    def _give_up(self, loading: _Loading) -> None:
        """A load past its deadline: its thread writes nothing more (a write under way ends first), vLLM recomputes
        from the first token not written, and a thread stuck in a read is replaced so the loads after it run."""
        with loading.lock:
            if loading.state == "done":  # finished just now: it reported its own errors
                return
            queued = loading.state == "queued"
            loading.state = "abandoned"
            _wait_copies(loading)
            written = loading.written
            with self._lock:
                self._report_unwritten(loading.load, written)
                self.stats.timed_out_loads += 1
                if not queued:  # its shards are not claimed again until the store changes
                    self._new_bad.bad_shards |= loading.reading
        if queued:
            loading.future.cancel()  # never started (its thread, if it is just starting, sees the state and returns)
        elif loading.thread is not None:
            self._pool.replace(loading.thread)
        _warn_once(
            self._logged,
            "timeout",
            "PrefixgenConnector: a load took more than load_timeout_seconds=%s (a store read that hangs?); vLLM "
            "recomputes it, and the thread waiting on the read is replaced",
            self.config.load_timeout_seconds,
        )

    def _idle_step(self) -> bool:
        """Whether this step (whose metadata vLLM bound before the forward) schedules no token."""
        meta = self._connector_metadata if self.has_connector_metadata() else None
        return isinstance(meta, PrefixgenConnectorMetadata) and meta.idle

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """:meth:`get_finished`'s loads, with those cut short as failed receives when the model has several KV cache
        groups: vLLM's scheduler then recomputes such a request whole (``_handle_failed_recving``), since block ids
        reported by :meth:`get_block_ids_with_load_errors` are ambiguous across groups and refused there."""
        _, done = self.get_finished(finished_req_ids)
        done = done or set()
        with self._lock:
            failed = self._failed_loads & done
            self._failed_loads -= failed
        return KVConnectorTransferResults(finished_recving=set(done), failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        checks = self._run_checks()  # after this step's forward: the KV it computed is in the cache
        with self._lock:
            if not (self._new_bad.bad_blocks or self._new_bad.bad_shards or checks or self._weights_changed):
                return None
            reported, self._new_bad = self._new_bad, PrefixgenWorkerMetadata()
        reported.checks, reported.weights_changed, self._weights_changed = checks, self._weights_changed, False
        return reported

    def _weights_match(self) -> bool:
        """Whether the model's weights are those the last passing check saw (else they are reported changed)."""
        if self._watch is None or self._watch.unchanged():
            return True
        if self._watch.reference is not None:
            self._weights_changed = True
            self._watch.reference = None  # loads stay refused until a check passes on the new weights
        return False

    def _run_checks(self) -> list[CheckResult]:
        """This step's live checks: vLLM's KV of each probe's stored blocks against the store's (this rank's heads)."""
        meta = self._connector_metadata if self.has_connector_metadata() else None
        if not isinstance(meta, PrefixgenConnectorMetadata) or not meta.checks:
            return []
        t0 = time.perf_counter()
        results = []
        step = self._piece_blocks()  # read in staging pieces: a check's memory is a load's
        bs = self.store.block_size
        for spec in meta.checks:
            sums, failed = None, False
            for i in range(0, len(spec.locations), step):
                piece = spec.locations[i : i + step]
                staging = self._staging.acquire()
                try:
                    kv, good = self._read(piece, staging)  # [good * bs, this stage's layers, 2, this rank's heads, D]
                    if good < len(piece):
                        failed = True
                        break
                    first = (spec.first_block + i) * bs
                    tables = [(spec.block_ids[g], self._groups[g].block_size) for g in self._layer_groups]
                    part = compare_blocks(
                        self._layers, self._stage.start, kv, first, min(spec.end, first + good * bs), tables,
                        self._num_blocks, self._key_order,
                    )  # fmt: skip
                finally:
                    self._staging.release(staging)
                sums = part if sums is None else sums + part
            if failed or sums is None:
                results.append(CheckResult(spec.req_id, 0, [], [], [], self._limit, failed_read=True))
                continue
            k_err, v_err = relative_errors(sums)
            layers = [index for _, index in self._layers]
            results.append(CheckResult(spec.req_id, spec.end - spec.start, layers, k_err, v_err, self._limit))
        if self._watch is not None and results and all(r.passed for r in results):
            self._watch.mark()
        with self._lock:
            self.stats.check_seconds += time.perf_counter() - t0
        return results

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This side's counters since the last call (vLLM asks every step and logs them)."""
        if self.role == KVConnectorRole.SCHEDULER:
            return _counters_since(self.claim_stats, self._reported)
        with self._lock:
            return _counters_since(self.stats, self._reported)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PrefixgenConnectorStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        """The connector's counters on vLLM's Prometheus endpoint (:class:`PrefixgenPromMetrics`)."""
        return PrefixgenPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        """Return at once, even with reads hung: loads still running write nothing more (a write under way ends
        first); their threads are daemons, left to end with the process."""
        if self.role == KVConnectorRole.WORKER:
            for loading in self._inflight.values():
                with loading.lock:
                    loading.state = "abandoned"
                    _wait_copies(loading)
            self._pool.shutdown()
        else:
            self._stop.set()
            self._lookup_threads.shutdown()

    def _load_safely(self, loading: _Loading) -> None:
        """:meth:`_load` on a load thread, for ``loading`` and the loads that joined it: whatever goes wrong, the engine
        recomputes each from the first token not written. ``loading`` may be a follower whose shared run was read: it
        reads the rest of its blocks."""
        with loading.lock:
            if loading.state != "abandoned":  # given up (or shut down) before it started: run only for its followers
                loading.state, loading.thread = "running", threading.get_ident()
        try:
            self._load(loading)
        except Exception:  # a bug or a device error must not leave the requests waiting forever
            logger.exception("PrefixgenConnector: loading %s failed; vLLM recomputes it", loading.load.req_id)
        with self._lock:
            loading.next_read = math.inf  # nothing joins it any more
            members, loading.group = list(loading.group or [loading]), []
        for member in members:
            self._finish(member)
            if member is not loading:
                member.future.set_result(None)

    def _finish(self, member: _Loading) -> None:
        """``member``'s load is over (written whole, or up to a fault): vLLM recomputes from its first token not written."""
        with member.lock:
            if member.state == "abandoned":  # given up at its deadline: reported then
                return
            try:
                _wait_copies(member)  # CUDA: no write may land after vLLM recomputes these slots
            except Exception:
                logger.exception("PrefixgenConnector: loading %s failed on the device", member.load.req_id)
                member.written = member.load.start
            if member.load.state is not None and member.written == member.load.end:
                member.written = self._write_state(member.load)
            member.state = "done"
            with self._lock:
                self._report_unwritten(member.load, member.written)
                self.stats.requests += 1

    def _write_state(self, load: LoadSpec) -> int:
        """A hybrid's load whose KV is written: its recurrent state too (vllm_states.py); the tokens written (its
        start if the state is missing or damaged: vLLM recomputes the load whole)."""
        try:
            nbytes = self._states.write(load.state, load.end, load.block_ids)
        except STORE_FAULTS as exc:
            _warn_once(self._logged, str(exc), "PrefixgenConnector: %s; vLLM computes the prompt", exc)
            with self._lock:
                self.stats.failed_states += 1
                last = load.locations[-1]  # not claimed again: the scheduler stops before it, at an earlier state
                self._new_bad.bad_blocks.add((last.shard, last.slot))
            return load.start
        with self._lock:
            self.stats.states += 1
            self.stats.state_bytes += nbytes
        return load.end

    def _detach(self, loading: _Loading, read: int) -> None:
        """The followers of ``loading`` whose shared run ends within its first ``read`` locations (read and written) leave
        its group: done if that was all they need, else handed to a load thread to read the rest of their blocks."""
        bs = self.store.block_size
        end = (loading.load.first_block + read) * bs  # the tokens written so far end here
        with self._lock:
            leaving = [m for m in (loading.group or [])[1:] if m.shared_end <= end]
            if not leaving:
                return
            loading.group = [m for m in loading.group if m not in leaving]
        for member in leaving:
            if member.state != "abandoned" and member.written < member.load.end:
                with self._lock:  # a leader now: others may join it for the blocks it has still to read
                    member.group, member.next_read = [member], member.written // bs - member.load.first_block
                    member.shared_end = math.inf
                self._pool.submit(self._continue, member)
            else:
                self._finish(member)
                member.future.set_result(None)

    def _continue(self, member: _Loading) -> None:
        """A follower's own blocks after the run it shared, on a load thread; its future is set when they are written."""
        try:
            self._load_safely(member)
        finally:
            member.future.set_result(None)

    def _report_unwritten(self, load: LoadSpec, written: int) -> None:
        """vLLM recomputes ``load`` from the vLLM block holding token ``written`` (the first not written), if any
        is left. Called holding ``self._lock``."""
        if written < load.end:
            if len(self._groups) > 1:  # vLLM maps no block id back to a request with several groups: it recomputes all
                self._failed_loads.add(load.req_id)
            else:
                self._load_errors.add(load.block_ids[0][written // self.block_size])
            self.stats.failed_loads += 1

    def _load(self, loading: _Loading) -> None:
        """Write tokens ``[load.start, load.end)`` into vLLM's caches, a piece of at most ``staging_bytes`` at a time, and
        each piece into the slots of the loads that joined ``loading`` too (each piece is read once), recording in each
        one's ``written`` how far it got (its end unless a store fault cut it short). Each write is made holding the
        load's lock, and none once that load was given up."""
        t0 = time.perf_counter()
        load = loading.load
        bs = self.store.block_size
        device = self._layers[0][0].kv_cache.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)  # this thread's: the rank's device, for the kernels it launches
        step = self._piece_blocks()
        last = None  # CUDA: the event of the previous piece's writes
        begin = loading.written // bs - load.first_block  # a follower's rest starts after its shared run: 0 otherwise
        for i in range(begin, len(load.locations), step):
            with self._lock:
                members = list(loading.group or [loading])
            if all(m.state == "abandoned" for m in members):  # all given up: vLLM owns these slots again
                break
            piece = load.locations[i : i + step]
            loading.reading = frozenset(loc.shard for loc in piece)
            staging = self._staging.acquire()
            try:
                kv, good = self._read(piece, staging)  # [good * bs, this stage's layers, 2, this rank's heads, D] on the host
                with self._lock:  # the loads that joined while it was read are written too; later ones join after it
                    members = list(loading.group or [loading])
                    loading.next_read = i + len(piece)
                if good and cuda:
                    if last is not None:
                        last.synchronize()  # the previous piece is written: its device copy goes (one piece on the device)
                    with torch.cuda.stream(self._stream):
                        kv = _upload(kv, device)  # straight from the pinned read buffer
                        last = torch.cuda.Event()
                        last.record(self._stream)  # the buffer is free after it (the writes below come later)
                        last.buffers = (kv,)  # type: ignore[attr-defined]  # the device copy, alive until it is waited for
                first = (load.first_block + i) * bs  # the piece's first token
                for member in members if good else []:
                    last = self._write_piece(member, kv, first, first + good * bs, device) or last
            finally:
                self._staging.release(staging, last)  # reused once the copies out of it are done
            if good < len(piece):
                break
            self._detach(loading, i + len(piece))  # followers whose shared run is read go on by themselves
        with self._lock:
            self.stats.seconds += time.perf_counter() - t0

    def _write_piece(self, member: _Loading, kv: torch.Tensor, first: int, end: int, device: torch.device) -> Any:
        """Tokens ``[first, end)`` of a prompt (``kv``: [tokens, layers, 2, heads, D] on the host, or on the device on CUDA)
        into ``member``'s slots, from its first token not written (nothing if it was given up); CUDA: the event of the
        write, or None."""
        with member.lock:
            written = member.written
            end = min(member.load.end, end, member.shared_end)  # a follower: not past the run it shares with the leader
            if member.state == "abandoned" or written < first or end <= written:
                return None  # given up, or nothing of it in this piece (written < first: a piece it needs was not read)
            part = kv[written - first : end - first]  # [tokens, layers, parts, heads, D]: a view, no copy
            spans = self._spans(member.load.block_ids, written, end)  # per KV cache group: its window's slots
            done = None
            if device.type == "cuda":
                _wait_copies(member)
                with torch.cuda.stream(self._stream):
                    if member.after is not None:  # nothing the engine queued for its blocks lands after the write
                        self._stream.wait_event(member.after)
                        member.after = None
                    on_device = [(o, slots.pin_memory().to(device, non_blocking=True)) for o, slots in spans]
                    self._write(part, on_device)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                done.buffers = (kv, on_device)  # type: ignore[attr-defined]  # alive until the event is waited for
                member.pending = done
            else:
                self._write(part, spans)
            member.written = end
            with self._lock:
                self.stats.tokens += end - written
                self.stats.bytes += part.numel() * part.element_size()
                for g in self._groups:
                    if g.windowed:  # sliding-window and chunked groups: only the window's tokens have blocks
                        self.stats.window_tokens += len(spans[g.index][1])
                        self.stats.window_tokens_skipped += end - written - len(spans[g.index][1])
        return done

    def _piece_blocks(self) -> int:
        """Store blocks per piece: their KV as read fits in ``staging_bytes`` (one block at least)."""
        return max(1, self.config.staging_bytes // self._block_read_bytes())

    def _block_read_bytes(self) -> int:
        """Host bytes of one store block as read: every head (the store keeps them side by side), fp8 as the
        float32 it is dequantized in."""
        kv = self.store.manifest.kv
        item = 4 if kv.storage == "fp8" else TORCH_DTYPES[kv.stored_dtype].itemsize
        return self.store.block_size * kv.num_layers * kv.parts * kv.num_kv_heads * kv.head_dim * item

    def _spans(self, block_ids: list[list[int]], start: int, end: int) -> list[tuple[int, torch.Tensor]]:
        """Per KV cache group, the tokens of ``[start, end)`` it holds blocks for: the offset of the first from
        ``start`` and their slots (a sliding-window or chunked group: only its window's; vllm_groups.py)."""
        return [group_span(ids, g.block_size, start, end) for g, ids in zip(self._groups, block_ids)]

    def _write(self, kv: torch.Tensor, spans: list[tuple[int, torch.Tensor]]) -> None:
        """Each layer's K and V, or MLA latent (``kv``: [tokens, this stage's layers, parts, heads, D] on the cache's
        device, each token's heads side by side) into its cache, at its KV cache group's slots (``spans``,
        :meth:`_spans`).

        The op gets views ``kv[:, layer, 0]`` ([tokens, heads, D], a token stride of the whole row): the layout of the
        keys vLLM's own forward passes it (a slice of the fused QKV projection), so no per-layer copy is made."""
        first = self._stage.start
        for (layer, index), group in zip(self._layers, self._layer_groups):
            offset, slots = spans[group]
            if len(slots):
                write_layer(layer, kv[offset:, index - first], layer.kv_cache, slots, self._key_order)

    def _read(self, locations: list[BlockLocation], staging: _Staging) -> tuple[torch.Tensor | None, int]:
        """This rank's KV heads, in host memory, of the leading blocks of ``locations`` that read cleanly, and how many
        they are; each fault is logged once per shard and reported to the scheduler. Read (pread) into ``staging``:
        the result is a view of it unless vLLM's dtype differs from the store's, the store is fp8 or head-major (its
        heads are transposed to vLLM's token-major rows): a converted copy then."""
        count = ReadCount()  # a head-major store gives this rank only its heads from disk
        try:
            return self._read_counted(locations, staging, count)
        finally:
            with self._lock:
                self.stats.read_bytes += count.bytes

    def _read_counted(
        self, locations: list[BlockLocation], staging: _Staging, count: ReadCount
    ) -> tuple[torch.Tensor | None, int]:
        while locations:
            try:
                kv = self.store.read_locations(  # in this thread: a read that hangs holds up this load only
                    locations,
                    "cpu",
                    self._dtype,
                    heads=self._heads,
                    buffer=staging.tensor,
                    layers=self._stage,
                    threads=1,
                    count=count,
                )
                with self._lock:
                    self.stats.pieces += 1
                    self.stats.max_piece_bytes = max(self.stats.max_piece_bytes, len(locations) * self._block_read_bytes())
                    if kv.untyped_storage().data_ptr() != staging.tensor.untyped_storage().data_ptr():
                        self.stats.converted_bytes += kv.numel() * kv.element_size()
                return kv, len(locations)
            except CorruptBlockError as exc:
                bad = locations[exc.block]
                with self._lock:
                    self.stats.corrupt_blocks += 1
                    self._new_bad.bad_blocks.add((bad.shard, bad.slot))
                _warn_once(self._logged, bad.shard, "PrefixgenConnector: %s; vLLM recomputes it", exc)
                locations = locations[: exc.block]
            except STORE_FAULTS as exc:
                locations = locations[: self._first_unreadable(locations, exc, count)]
        return None, 0

    def _first_unreadable(self, locations: list[BlockLocation], exc: Exception, count: ReadCount) -> int:
        """Where in ``locations`` the shard that raised ``exc`` starts (read again one shard at a time, unchecked);
        that shard is reported bad. 0 when every shard reads now (a passing fault): the load stops here."""
        start = 0
        while start < len(locations):
            shard = locations[start].shard
            end = next((i for i in range(start, len(locations)) if locations[i].shard != shard), len(locations))
            try:
                self.store.read_locations(locations[start:end], verify=False, threads=1, count=count)
            except STORE_FAULTS as again:
                with self._lock:
                    self._new_bad.bad_shards.add(shard)
                if _warn_once(
                    self._logged, shard, "PrefixgenConnector: %s; its blocks are not loaded, vLLM computes them", again
                ):
                    with self._lock:
                        self.stats.failed_shards += 1
                return start
            start = end
        _warn_once(self._logged, str(exc), "PrefixgenConnector: %s; vLLM computes the rest of the prefix", exc)
        return 0

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM schedules a request only after get_finished reported its load

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # kv_consumer: nothing is saved

    def wait_for_save(self) -> None:
        return


def _wait_copies(loading: _Loading) -> None:
    """CUDA: wait until the last piece ``loading`` launched is written (nothing to wait for on CPU). Called holding its lock."""
    if loading.pending is not None:
        pending, loading.pending = loading.pending, None
        pending.synchronize()


def _upload(kv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``kv`` (a view of a host buffer: this rank's heads and layers of a piece, strided) on ``device`` with the same
    shape and strides, copied without blocking on the current stream: the one span of host memory the view covers is
    copied as it lies, straight from the (pinned) buffer, never gathered into another host tensor first (a strided
    source would be, synchronously, by ``Tensor.to``). The buffer must stay untouched until the copy is done."""
    if kv.is_contiguous():
        return kv.to(device, non_blocking=True)
    span = 1 + sum((n - 1) * stride for n, stride in zip(kv.shape, kv.stride()))  # elements from its first to its last
    flat = kv.as_strided((span,), (1,))  # [span] from kv's first element (the same storage offset)
    return flat.to(device, non_blocking=True).as_strided(kv.shape, kv.stride(), 0)


def _done() -> Future:
    """A future already done: a load refused before it started."""
    future: Future = Future()
    future.set_result(None)
    return future


def _errors(results: list[CheckResult]) -> str:
    """Per layer, the largest relative RMS error of K and V over the ranks: ``layer 0 K 1.2e-07 V 9.8e-08, ...``."""
    worst = worst_errors(results)
    return ", ".join(f"layer {layer} K {k:.2g} V {v:.2g}" for layer, (k, v) in sorted(worst.items()))


def _warn_once(logged: set[str], key: str, message: str, *args: Any) -> bool:
    """Log ``message`` the first time ``key`` (a shard, or an error's text) is seen (a fault would repeat on every
    request); True then. Called from several load threads: a rare race logs twice, never loses a count."""
    if key in logged:
        return False
    logged.add(key)
    logger.warning(message, *args)
    return True
