"""What makes ``PrefixgenConnector`` serve only KV the engine itself computes.

Two lines of defence:

* **At start** (:func:`engine_identity_problems`): the store's identity against the engine's: the KV dtype (a
  cast only with ``"cast_kv_dtype": true``), weights the engine runs as they are on disk (no online
  quantization, a load format that reads the checkpoint's safetensors), and every field of vLLM's effective text
  config (after ``hf_overrides``) but :data:`~prefixgen.model.KV_NEUTRAL_CONFIG_FIELDS`.
* **Live** (:class:`CheckGate` on the scheduler, :func:`compare_blocks` and :class:`WeightsWatch` on the
  workers): after start and after every ``reset_cache()``, nothing is loaded until vLLM has computed a request
  whose prefix is stored and its own paged KV for those blocks matched the store's, per layer, in the engine's
  dtype. Then a sample of requests (``check_rate``) is computed and compared again. A mismatch stops loading.
  Before each step that loads, the workers compare a sample of the model's weights with the one taken when the
  check passed: weights changed in place without a reset also stop loading until a new check passes.

A difference is measured per layer and for K and V apart as the relative RMS error
``||engine - store|| / ||engine||`` over the compared tokens; :data:`TOLERANCE` (by the coarser of the store's
storage and the engine's dtype) says what rounding explains (BENCHMARKS.md has the measurements).
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prefixgen.format import Manifest
from prefixgen.integrations.vllm.faults import logger
from prefixgen.store.index import BlockLocation

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Load formats that read the checkpoint's *.safetensors (what the weights digest covers) unchanged.
SAFETENSORS_LOAD_FORMATS = ("auto", "safetensors", "fastsafetensors")

# Relative RMS error per layer (K and V apart) that rounding explains, by the coarser of the store's storage and
# the engine's dtype. Chosen from the measurements in BENCHMARKS.md ("Live check"): well above the largest error
# of a correct configuration, well below the smallest of a wrong one.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2, "fp8": 0.15}
_COARSENESS = ("float32", "float16", "bfloat16", "fp8")

CHECK_RATE = 0.01  # the default share of requests with a stored prefix computed by vLLM and compared after the first check
WEIGHT_SAMPLES = 64  # elements sampled per parameter for the weights watch


def engine_identity_problems(vllm_config: VllmConfig, manifest: Manifest, cast_kv_dtype: bool = False) -> list[str]:
    """One line per part of the engine's identity the store does not match, beyond the fingerprint's fields: the
    KV dtype, the weights as the engine runs them, and a store too old to record its text config.

    Example:
        >>> engine_identity_problems(vllm_config, store.manifest)  # doctest: +SKIP
        ['KV dtype: the store holds float32 KV, vLLM computes bfloat16: ...']
    """
    problems = []
    mc = vllm_config.model_config
    engine_dtype = str(mc.dtype).removeprefix("torch.")
    if manifest.kv.dtype != engine_dtype and not cast_kv_dtype:
        problems.append(
            f"KV dtype: the store holds {manifest.kv.dtype} KV, vLLM computes {engine_dtype}: serve with "
            f"--dtype {manifest.kv.dtype}, or build the store with --dtype {engine_dtype}; or cast on load with "
            'kv_connector_extra_config {"cast_kv_dtype": true} (the loaded KV then differs from what vLLM computes, '
            "and so may its outputs: README, 'KV dtype')"
        )
    if mc.quantization:
        problems.append(
            f"weights quantization {mc.quantization!r}: vLLM computes KV with quantized weights, the store was built "
            "with the checkpoint's; serve without --quantization"
        )
    load_format = str(vllm_config.load_config.load_format)
    if load_format not in SAFETENSORS_LOAD_FORMATS:
        problems.append(
            f"load format {load_format!r}: the store's weights are the checkpoint's safetensors, which vLLM only "
            f"reads with --load-format {' or '.join(SAFETENSORS_LOAD_FORMATS)}"
        )
    if not manifest.model.text_config:
        problems.append(
            "the store does not record its model's text config (it was built by an older prefixgen), so it cannot "
            "be checked against vLLM's (hf_overrides included): build it again with this prefixgen"
        )
    return problems


def tolerance(store_storage: str, store_dtype: str, engine_dtype: str) -> float:
    """The largest per-layer relative RMS error rounding explains for a store of ``store_storage`` ("native" or
    "fp8") in ``store_dtype`` loaded into an engine computing ``engine_dtype``.

    Example:
        >>> tolerance("native", "float32", "bfloat16"), tolerance("fp8", "float32", "float32")
        (0.05, 0.15)
    """
    names = [store_dtype, engine_dtype] + (["fp8"] if store_storage == "fp8" else [])
    return TOLERANCE[max(names, key=lambda n: _COARSENESS.index(n) if n in _COARSENESS else 0)]


@dataclass(slots=True)
class CheckSpec:
    """A check, from the scheduler to every worker: after this step's forward, vLLM's KV of tokens ``[start, end)``
    of request ``req_id`` (whose block table is ``block_ids``) against the store blocks at ``locations``."""

    req_id: str
    start: int  # a store block boundary: the tokens vLLM computed (not its own prefix-cache hits) start at or before it
    end: int
    first_block: int  # store block number of locations[0]
    locations: list[BlockLocation]
    block_ids: list[list[int]]  # per KV cache group, null blocks -1 (groups.block_tables)


@dataclass(slots=True)
class CheckResult:
    """What one worker measured for one :class:`CheckSpec`: per layer of its stage, the relative RMS error of K and V."""

    req_id: str
    tokens: int
    layers: list[int]
    k_error: list[float]
    v_error: list[float]
    limit: float
    failed_read: bool = False  # the store could not be read: no verdict

    @property
    def passed(self) -> bool:
        return not self.failed_read and all(e <= self.limit for e in self.k_error + self.v_error)


def likely_cause(results: Sequence[CheckResult]) -> str:
    """Which part of the identity a failed check most likely points at, from where the error starts.

    Layer 0's KV depends only on the embedding, one norm and the K/V projections; RoPE turns K, not V.

    Example:
        >>> likely_cause([CheckResult("r", 32, [0, 1], [0.9, 0.9], [0.0, 0.0], 0.01)])
        'RoPE (only K differs from layer 0 on): rope_parameters or hf_overrides'
    """
    worst = worst_errors(results)
    limit = min(r.limit for r in results)
    bad = [layer for layer in sorted(worst) if max(worst[layer]) > limit]
    if not bad:
        return "none"
    first = bad[0]
    k, v = worst[first]
    if first == min(worst) and k > limit and v <= limit:
        return "RoPE (only K differs from layer 0 on): rope_parameters or hf_overrides"
    if first == min(worst):
        return (
            f"weights or config from layer {first} on: the embedding, the input norm (rms_norm_eps) or the K/V projections "
            "(weights changed or quantized, hf_overrides, the KV dtype)"
        )
    return (
        f"a changed layer: layer {first}'s input norm or K/V projections, or layer {first - 1}'s output (its attention "
        f"or MLP); layers before {first} match"
    )


def worst_errors(results: Sequence[CheckResult]) -> dict[int, tuple[float, float]]:
    """Per layer, the largest relative RMS error of K and of V over ``results`` (one per rank).

    Example:
        >>> worst_errors([CheckResult("r", 16, [0], [0.1], [0.2], 1.0), CheckResult("r", 16, [0], [0.3], [0.0], 1.0)])
        {0: (0.3, 0.2)}
    """
    worst: dict[int, tuple[float, float]] = {}
    for r in results:
        for layer, k, v in zip(r.layers, r.k_error, r.v_error):
            a, b = worst.get(layer, (0.0, 0.0))
            worst[layer] = (max(a, k), max(b, v))
    return worst


def compare_blocks(
    layers: Sequence[tuple[Any, int]],
    stage_first: int,
    kv: torch.Tensor,
    start: int,
    end: int,
    tables: Sequence[tuple[Sequence[int], int]],
    num_blocks: int,
    key_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per layer, the squared error and the squared norm of K and of V (an MLA latent: as K) between vLLM's paged KV of
    tokens ``[start, end)`` of a request and the store's ``kv`` ([end - start, this stage's layers, parts, this rank's
    heads, D], host memory): ``[layers, 4]`` float64 rows (K error, K norm, V error, V norm), to be summed over pieces
    (:func:`relative_errors`). ``tables``: per layer, the request's block table in the layer's KV cache group (null
    blocks -1) and the group's block size; a sliding-window or chunked layer is compared on the tokens vLLM still
    holds blocks for (its window). ``key_order``: as a load writes keys (``groups.key_order``).

    The store's KV is written with each layer's own cache-write op (as a load writes it: the same cast and layout)
    into a scratch copy of the request's blocks, beside masks written the same way, so no backend's memory layout
    is assumed but where its block index is (the dimension of size ``num_blocks``).

    Example:
        >>> relative_errors(compare_blocks(self._layers, 0, kv, 0, 64, [([3, 7], 32)] * 2, 1024))  # doctest: +SKIP
        ([1.2e-07, 9.8e-08], [1.1e-07, 8.7e-08])
    """
    from prefixgen.integrations.vllm.groups import group_span, write_layer

    sums = torch.zeros(len(layers), 4, dtype=torch.float64)
    for row, ((layer, index), (block_ids, block_size)) in enumerate(zip(layers, tables)):
        offset, _ = group_span(block_ids, block_size, start, end)
        held = start + offset  # the first token whose block vLLM holds in this layer's group
        if held >= end:
            continue
        first, last = held // block_size, (end - 1) // block_size
        cache = layer.kv_cache
        device = cache.device
        ids = torch.as_tensor(list(block_ids[first : last + 1]), dtype=torch.long, device=device)
        engine = cache.index_select(_block_dim(cache, num_blocks), ids)
        pos = torch.arange(held, end)
        slots = ((pos // block_size - first) * block_size + pos % block_size).to(device)  # in the scratch copy
        rows = kv[offset : end - start, index - stage_first].to(device)  # [tokens, parts, heads, D]
        stored = torch.zeros_like(engine)
        write_layer(layer, rows, stored, slots, key_order)
        a, b = engine.double(), stored.double()
        for part in range(rows.shape[1]):
            ones = torch.zeros_like(rows)
            ones[:, part] = 1
            mask = torch.zeros_like(engine)
            write_layer(layer, ones, mask, slots, key_order)
            ref = a[mask != 0]
            sums[row, 2 * part] = float((ref - b[mask != 0]).square().sum())
            sums[row, 2 * part + 1] = float(ref.square().sum())
    return sums


def relative_errors(sums: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer, the relative RMS error of K and of V from :func:`compare_blocks`' summed rows."""
    err = (sums[:, [0, 2]] / sums[:, [1, 3]].clamp_min(1e-300)).sqrt()
    return err[:, 0].tolist(), err[:, 1].tolist()


def _block_dim(cache: torch.Tensor, num_blocks: int) -> int:
    """The dimension of a layer's paged cache that indexes its blocks: the first of size ``num_blocks``."""
    for dim, size in enumerate(cache.shape):
        if size == num_blocks:
            return dim
    raise RuntimeError(f"PrefixgenConnector: no dimension of the KV cache {tuple(cache.shape)} has {num_blocks} blocks")


class WeightsWatch:
    """A sample of every parameter of the worker's model (:data:`WEIGHT_SAMPLES` evenly strided elements each),
    taken when a check passes and compared before each step that loads: weights changed in place (an RL update
    through ``collective_rpc``) with no ``reset_cache()`` stop the loads until a new check passes.

    vLLM gives a connector its attention layers, not the model: :func:`find_model` finds it while vLLM registers the
    KV caches. Only weights vLLM computes with are seen: on CPU, vLLM packs most linear weights into its GEMM
    kernels' own copies (changing the parameter then changes nothing it computes). A change to fewer elements
    than the sample sees is left to the sampled re-checks.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]
        self.reference: torch.Tensor | None = None  # the sample when the last check passed; None: loads refused

    def _parameters(self) -> list[torch.Tensor]:
        return self._params

    def sample(self) -> torch.Tensor:
        """The current sample, one float32 vector on the parameters' device."""
        parts = []
        for p in self._parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // WEIGHT_SAMPLES)
            parts.append(flat[::step][:WEIGHT_SAMPLES].float())
        return torch.cat(parts) if parts else torch.zeros(0)

    def mark(self) -> None:
        """A check passed: these are the weights the store matches."""
        self.reference = self.sample()

    def unchanged(self) -> bool:
        """Whether the weights equal the sample taken when the last check passed (False if none passed)."""
        return self.reference is not None and torch.equal(self.sample(), self.reference)


def find_model(attention_layer: torch.nn.Module, depth: int = 30) -> torch.nn.Module | None:
    """The model holding ``attention_layer``, from the callers' frames (vLLM's model runner calls
    ``register_kv_caches``; it holds the model as ``self.model``). None if no caller holds it.

    Example:
        >>> find_model(self._layers[0][0])  # doctest: +SKIP
        Qwen2ForCausalLM(...)
    """
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            for value in list(frame.f_locals.values()):
                for candidate in (value, getattr(value, "model", None)):
                    if isinstance(candidate, torch.nn.Module) and any(m is attention_layer for m in candidate.modules()):
                        return candidate
        return None
    finally:
        del frame


@dataclass
class CheckGate:
    """The scheduler's side of the live check: whether loads are allowed, which requests vLLM computes to be
    compared, and what the workers found.

    States: ``checking`` (after start, a reset or a weights change: nothing is loaded; the next request whose
    stored prefix vLLM computes is compared), ``passed`` (loads allowed; a share ``rate`` of requests is still
    computed and compared), ``failed`` (nothing is loaded until ``reset_cache()``).
    """

    rate: float = CHECK_RATE
    state: str = "checking"
    probes: dict[str, tuple[Any, int, int, list[BlockLocation]]] = field(
        default_factory=dict
    )  # req_id -> (request, start, end, locations)
    sent: set[str] = field(default_factory=set)  # checks handed to the workers, verdict not yet back
    credit: float = 0.0
    last_failure: str = ""
    # The last checks' verdicts and worst error per layer (layer -> (K, V)), for logs, tests and benchmarks.
    history: deque = field(default_factory=lambda: deque(maxlen=256))

    @property
    def loads_allowed(self) -> bool:
        return self.state == "passed"

    def reset(self) -> None:
        """Start the check again (``reset_cache()``, a weights change)."""
        if self.state != "checking":
            self.state = "checking"
        self.probes.clear()
        self.sent.clear()

    def wants_probe(self) -> bool:
        """Whether the next request with a stored prefix vLLM can compute is to be compared instead of loaded."""
        if self.state == "failed":
            return False
        if self.state == "checking":
            return not self.probes and not self.sent  # one at a time: each costs vLLM the compute of a prefix
        self.credit += self.rate
        if self.credit >= 1.0:
            self.credit -= 1.0
            return True
        return False

    def probe(self, request: Any, computed: int, locations: list[BlockLocation], block_size: int) -> bool:
        """Compare ``request``'s stored blocks after vLLM computed them; False if vLLM's own cache covers them all."""
        start = math.ceil(computed / block_size) * block_size
        end = len(locations) * block_size
        if end <= start:
            return False
        self.probes[request.request_id] = (request, start, end, locations)
        return True

    def due(self, scheduled: dict[str, int], block_ids: Any) -> list[CheckSpec]:
        """The probes whose stored prefix this step's forward completes, as checks for the workers
        (``block_ids(req_id)``: the request's vLLM block table)."""
        specs = []
        for req_id, (request, start, end, locations) in list(self.probes.items()):
            n = scheduled.get(req_id)
            if n is None or request.num_computed_tokens + n < end:
                continue
            del self.probes[req_id]
            self.sent.add(req_id)
            bs = end // len(locations)
            specs.append(CheckSpec(req_id, start, end, start // bs, locations[start // bs :], list(block_ids(req_id))))
        return specs

    def finished(self, req_id: str) -> None:
        """A request finished (or was aborted) before its prefix was computed: another is probed."""
        self.probes.pop(req_id, None)

    def allows(self, request: Any, computed: int, locations: list[BlockLocation], block_size: int, stats: Any) -> bool:
        """Whether ``request``'s stored prefix may be loaded; if not, vLLM computes it (and it may be compared).
        ``stats``: the scheduler's ``ClaimStats``, counting the stored tokens computed for checks and the requests
        not loaded for want of a passed check."""
        if self.wants_probe() and self.probe(request, computed, locations, block_size):
            stats.check_tokens += len(locations) * block_size - computed
            stats.skipped_unchecked += not self.loads_allowed
            return False
        if self.loads_allowed:
            return True
        stats.skipped_unchecked += 1
        return False

    def take(self, checks: list[CheckResult], weights_changed: bool, stats: Any, store: Any) -> None:
        """What the workers reported after a step: the weights found changed (the check starts again) and the live
        checks measured (each rank its heads and layers), counted in ``stats`` (the scheduler's ``ClaimStats``)."""
        if weights_changed and self.state == "passed":
            stats.weights_changed += 1
            logger.warning(
                "PrefixgenConnector: the model's weights changed since the live check passed; nothing is loaded until "
                "it passes again"
            )
            self.reset()
        by_request: dict[str, list[CheckResult]] = {}
        for result in checks:
            by_request.setdefault(result.req_id, []).append(result)
        for req_id, results in by_request.items():
            if req_id not in self.sent:
                continue  # sent before a reset: it measured another engine state
            self.sent.discard(req_id)
            if any(r.failed_read for r in results):
                continue  # no verdict: another request is compared
            self._verdict(req_id, results, stats, store)

    def _verdict(self, req_id: str, results: list[CheckResult], stats: Any, store: Any) -> None:
        """One request's checks, from every rank: passed (loads allowed) or failed (loading stops)."""
        self.history.append((req_id, all(r.passed for r in results), worst_errors(results)))
        if all(r.passed for r in results):
            stats.checks_passed += 1
            if self.state == "checking":
                self.state = "passed"
                logger.info("PrefixgenConnector: live check passed (%s): loading stored prefixes", errors_text(results))
            return
        stats.checks_failed += 1
        self.state = "failed"
        self.last_failure = likely_cause(results)
        logger.error(
            "PrefixgenConnector: the KV vLLM computed for request %s differs from the store's by more than "
            "rounding explains (limit %.3g, relative RMS per layer: %s). Likely cause: %s. Nothing more is loaded "
            "from %s until reset_prefix_cache(reset_connector=True) and a passing check",
            req_id,
            results[0].limit,
            errors_text(results),
            self.last_failure,
            store,
        )


def errors_text(results: list[CheckResult]) -> str:
    """Per layer, the largest relative RMS error of K and V over the ranks: ``layer 0 K 1.2e-07 V 9.8e-08, ...``."""
    worst = worst_errors(results)
    return ", ".join(f"layer {layer} K {k:.2g} V {v:.2g}" for layer, (k, v) in sorted(worst.items()))
