"""The connector's counters: the worker side's :class:`LoadStats`, the scheduler side's :class:`ClaimStats`, what
vLLM collects of them each step (:class:`PrefixgenConnectorStats`) and their Prometheus counters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig


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
    max_piece_bytes: int = 0  # the largest piece read, as staged on the host (fp8: its bytes and scales): at most staging_bytes
    timed_out_loads: int = 0  # loads given up at their deadline (load_timeout_seconds): vLLM recomputed the rest
    check_seconds: float = 0.0  # spent on live checks (reading the store's blocks, comparing them with vLLM's)
    shared_loads: int = 0  # loads written from another load's reads of the same stored blocks (single-flight), reading nothing
    converted_bytes: int = 0  # host bytes of pieces copied out of their read buffer before the upload: 0 (uploaded raw)
    # Bytes of token-major rows made from pieces after their raw upload (a head-major store's transpose, a dtype
    # conversion, fp8's dequantization), on the cache's device: on CPU, where the upload is the identity, the host.
    device_converted_bytes: int = 0
    # Sliding-window and chunked groups (summed over such groups): tokens of the loads written into their blocks
    # (those of the window), and tokens not written because vLLM holds no block for them (before the window).
    window_tokens: int = 0
    window_tokens_skipped: int = 0
    states: int = 0  # recurrent states written (a hybrid model: one per load, into every recurrent layer; states.py)
    state_bytes: int = 0
    failed_states: int = 0  # states missing or damaged: vLLM recomputed the load whole, the state is reported bad


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
    skipped_recurrent: int = 0  # the model has recurrent state, which the connector does not load (groups.py)
    # The live check (check.py).
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
        "Host bytes of read pieces copied before their upload (none: pieces are uploaded as read)",
    ),
    "device_converted_bytes": (
        "device_converted_bytes",
        "Bytes of rows made on the cache's device from raw pieces (a head-major store's transpose, fp8, cast_kv_dtype)",
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
        for name in counter_names(LoadStats) + counter_names(ClaimStats):  # every counter shows from the start, at 0
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


def counter_names(stats: type[LoadStats | ClaimStats]) -> list[str]:
    """The fields of ``stats`` that count (vLLM collects and sums them): all but ``max_piece_bytes``, a maximum."""
    return [f.name for f in dataclasses.fields(stats) if f.name != "max_piece_bytes"]


def counters_since(stats: LoadStats | ClaimStats, last: dict[str, int | float]) -> PrefixgenConnectorStats | None:
    """What ``stats`` counted since ``last`` (which becomes now); None when nothing changed."""
    now = {name: getattr(stats, name) for name in counter_names(type(stats))}
    delta = {name: value - last.get(name, 0) for name, value in now.items()}
    last.update(now)
    return PrefixgenConnectorStats(delta) if any(delta.values()) else None
