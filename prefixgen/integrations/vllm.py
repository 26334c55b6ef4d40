"""``PrefixgenConnector``: vLLM loads prompt prefixes from a prefixgen store instead of computing them.

vLLM v1 imports a KV connector from any module named in ``kv_transfer_config``, so no vLLM patch
is needed::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PrefixgenConnector",
        "kv_connector_module_path": "prefixgen.integrations.vllm", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"store": "STORE"}}'

Written against the v1 connector API of vLLM 0.32.0 (the API is marked experimental; README
says which versions are tested). vLLM builds one connector per process and role:

* **scheduler** (:meth:`PrefixgenConnector.get_num_new_matched_tokens`): hashes the prompt with
  the store's chained block keys in growing runs (1, 2, 4, ... blocks, stopping at the first miss),
  finds the longest stored prefix of all but the last prompt token, and claims the stored tokens
  beyond vLLM's own prefix-cache hit. Requests with a LoRA adapter, multimodal inputs, prompt
  embeddings or a cache_salt are skipped (nothing loaded, counted): the store's keys hash the base
  model's token ids only. After vLLM allocated the request's blocks, the load (block locations in
  the store, vLLM block ids) goes to the workers in the step's :class:`PrefixgenConnectorMetadata`.
* **worker** (:meth:`PrefixgenConnector.start_load_kv`): reads those blocks (only their bytes,
  CRC-checked, through :class:`~prefixgen.store.reader.PrefixStore`) and writes each attention
  layer's share of them into vLLM's paged cache with the layer's own cache-write op
  (``impl.do_kv_cache_update``, i.e. ``cpu_attn_reshape_and_cache`` on CPU and
  ``reshape_and_cache_flash`` on FlashAttention), so no backend's memory layout is hard-coded
  here. A block that fails its CRC is not written: its vLLM block is reported through
  :meth:`get_block_ids_with_load_errors` and vLLM recomputes it.

Both sides refuse, at engine start, what the store cannot serve (:func:`unsupported_features`:
context parallelism, speculative decoding, hybrid or sliding-window attention, a
``kv_load_failure_policy`` other than ``recompute``); the scheduler refuses a store built for another
model than vLLM's effective config (weights, architecture, KV shape, RoPE with ``hf_overrides``,
positions, tokenizer), naming each field that differs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from prefixgen.errors import ConfigError, CorruptBlockError, IncompatibleStoreError
from prefixgen.format import ModelFingerprint, block_keys
from prefixgen.model import checkpoint_weights_digest, config_fingerprint, config_kv_layout, load_tokenizer
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

SUPPORTED_VLLM = "0.32.0"


@dataclass(slots=True)
class LoadSpec:
    """One request's load, from the scheduler to every worker: write tokens ``[start, end)`` of
    its prompt from the store blocks at ``locations`` (store block ``first_block`` onwards)."""

    req_id: str
    start: int  # vLLM had computed the tokens before it (its own prefix-cache hit)
    end: int  # the stored prefix ends here
    first_block: int  # store block number of locations[0]
    locations: list[BlockLocation]
    block_ids: list[int]  # the request's vLLM block table (its one KV cache group)


@dataclass
class PrefixgenConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers for one step: the loads to do before the forward."""

    loads: list[LoadSpec] = field(default_factory=list)


@dataclass(slots=True)
class LoadStats:
    """Worker-side totals, for benchmarks and logs: what was written into vLLM's cache and how long it took."""

    requests: int = 0
    tokens: int = 0
    bytes: int = 0  # KV bytes written (this rank's heads, vLLM's compute dtype)
    seconds: float = 0.0
    corrupt_blocks: int = 0


@dataclass(slots=True)
class SkippedRequests:
    """Scheduler-side totals: requests the connector loaded nothing for, by reason (see :func:`skip_reason`).
    vLLM computes them whole, as without the connector."""

    lora: int = 0
    multimodal: int = 0
    prompt_embeds: int = 0
    cache_salt: int = 0


class PrefixgenStats(KVConnectorStats):
    """The connector's counters in vLLM's metrics (``data``: name -> count since the last report), summed
    over the scheduler and the workers; the log line of vLLM's stat logger shows them."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, n in other.data.items():
            self.data[name] = self.data.get(name, 0) + n
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


@dataclass(slots=True)
class _Match:
    end: int  # tokens of the longest stored prefix of the prompt (but its last token)
    locations: list[BlockLocation]


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds, as vLLM's
    ``QKVParallelLinear`` shards them: consecutive slices of ``total / tp`` heads, or, when there are
    fewer heads than ranks, one head replicated over ``tp / total`` consecutive ranks.

    Example:
        >>> kv_head_range(8, 2, 1), kv_head_range(2, 4, 3)
        (range(4, 8), range(1, 2))
    """
    if tp_size >= total_kv_heads:
        if tp_size % total_kv_heads:
            raise ConfigError(f"tensor parallel size {tp_size} is not a multiple of the {total_kv_heads} KV heads")
        head = tp_rank // (tp_size // total_kv_heads)
        return range(head, head + 1)
    if total_kv_heads % tp_size:
        raise ConfigError(f"{total_kv_heads} KV heads do not split evenly over tensor parallel size {tp_size}")
    per_rank = total_kv_heads // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)


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
    return config_fingerprint(mc.hf_config, tokenizer, layout, weights, name=mc.model)


def unsupported_features(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[str]:
    """One line per engine feature the connector refuses at start, naming the feature and the setting
    (empty when it can serve this engine).

    Example:
        >>> unsupported_features(vllm_config, kv_cache_config)  # doctest: +SKIP
        ['speculative decoding (method eagle): ...']
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec

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
    groups = kv_cache_config.kv_cache_groups
    if len(groups) > 1:
        problems.append(
            f"hybrid attention ({len(groups)} KV cache groups): the connector serves models with one kind of "
            "full-attention layer (one KV cache group), as prefixgen builds"
        )
    for group in groups:
        s = group.kv_cache_spec
        if not isinstance(s, FullAttentionSpec) or getattr(s, "sliding_window", None) or getattr(s, "attention_chunk_size", None):
            problems.append(
                f"sliding-window or chunked attention ({type(s).__name__}): its KV is not a full-attention prefix, "
                "which is all a store holds"
            )
            break
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
    token ids of the base model only), or None. The reasons are the fields of :class:`SkippedRequests`.

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


def stored_prefix(store: PrefixStore, token_ids: Sequence[int]) -> tuple[list[BlockLocation], int]:
    """Locations of the longest stored prefix of ``token_ids`` (whole store blocks), and how many blocks
    were hashed to find it.

    The blocks are hashed and looked up in growing runs (1, 2, 4, ... blocks), each chained on the last key
    of the run before: a prompt that misses early costs a few SHA-256s, not one per block of the prompt
    (a cold 128k-token prompt: 1 instead of 8k), and a hit of ``n`` blocks costs fewer than ``2n + 1``.

    Example:
        >>> locations, hashed = stored_prefix(store, list(range(100)))  # doctest: +SKIP
    """
    bs = store.block_size
    total = len(token_ids) // bs
    locations: list[BlockLocation] = []
    parent = store.manifest.root_key
    run = hashed = 0
    while len(locations) < total:
        run = min(max(1, 2 * run), total - len(locations))
        start = len(locations) * bs
        keys = block_keys(token_ids[start : start + run * bs], bs, parent)
        hashed += run
        found = store.find_prefix(keys).locations
        locations += found
        if len(found) < run:
            break
        parent = keys[-1]
    return locations, hashed


class PrefixgenConnector(KVConnectorBase_V1):
    """A vLLM v1 KV connector that loads stored prompt prefixes from a prefixgen store (read only).

    ``kv_connector_extra_config`` options:

    * ``store`` (required): path of the store.
    * ``chat_template``: the Jinja file given to ``prefixgen build --chat-template`` (and to
      ``vllm serve --chat-template``), when the tokenizer has no template of its own; it is part
      of the tokenizer identity the store is checked against.

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
        path = ktc.get_from_extra_config("store", None)
        if not path:
            raise ConfigError('PrefixgenConnector needs the store\'s path: kv_connector_extra_config = {"store": "PATH"}')
        self.store = PrefixStore.open(path)
        self.block_size = vllm_config.cache_config.block_size  # vLLM's block size, not the store's
        problems = unsupported_features(vllm_config, kv_cache_config)
        if problems:
            raise ConfigError("PrefixgenConnector cannot serve this engine:\n  " + "\n  ".join(problems))
        if role == KVConnectorRole.SCHEDULER:
            self._check_model(vllm_config, ktc.get_from_extra_config("chat_template", None))
            self._matches: dict[str, _Match] = {}
            self._pending: list[LoadSpec] = []
            self.skipped = SkippedRequests()
            self._reported = SkippedRequests()  # what get_kv_connector_stats has reported so far
        else:
            self._dtype = vllm_config.model_config.dtype
            self._layers: list[tuple[str, int]] = []  # (vLLM layer name, HF layer index)
            self._heads = range(self.store.manifest.kv.num_kv_heads)
            self._load_errors: set[int] = set()
            self._logged_corrupt: set[tuple[str, int]] = set()
            self.stats = LoadStats()
        logger.info("PrefixgenConnector (%s): store %s, %s", role.name.lower(), path, self.store.manifest.model.name)

    # ------------------------------------------------------------------ start-up checks

    def _check_model(self, vllm_config: VllmConfig, chat_template: str | None) -> None:
        theirs = engine_fingerprint(vllm_config, chat_template)
        problems = self.store.manifest.model.differences(theirs)
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
        for name in kv_caches:
            layer = layers[name]
            impl = getattr(layer, "impl", None)
            update = getattr(impl, "do_kv_cache_update", None)
            if update is None or "key" not in inspect.signature(update).parameters:
                raise ConfigError(
                    f"PrefixgenConnector cannot write into layer {name}: its attention backend "
                    f"({type(impl).__name__}) has no key/value cache-write op; use a standard attention backend "
                    "(CPU_ATTN on CPU, FLASH_ATTN on CUDA)"
                )
            index = extract_layer_index(name)
            if not 0 <= index < kv.num_layers or layer.head_size != kv.head_dim or layer.num_kv_heads != len(self._heads):
                raise IncompatibleStoreError(
                    f"{self.store.path}: vLLM layer {name} (KV heads {layer.num_kv_heads}, head size {layer.head_size}) "
                    f"does not match the store ({kv.num_layers} layers, {len(self._heads)} KV heads per rank, "
                    f"head_dim {kv.head_dim})"
                )
            self._layers.append((name, index))

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored tokens of the prompt beyond ``num_computed_tokens`` (vLLM's own hits come first).

        The store covers the longest stored prefix of all but the last prompt token (vLLM needs one
        token to compute), in whole store blocks; the count may end inside a vLLM block. A request the
        store cannot serve (:func:`skip_reason`) gets 0, counted in :attr:`skipped`.
        """
        match = self._matches.get(request.request_id)
        if match is None:
            reason = skip_reason(request)
            if reason is None:
                locations, _ = stored_prefix(self.store, (request.prompt_token_ids or [])[:-1])
            else:
                locations = []
                self._skip(reason)
            match = _Match(len(locations) * self.store.block_size, locations)
            self._matches[request.request_id] = match
        return max(0, match.end - num_computed_tokens), False

    def _skip(self, reason: str) -> None:
        n = getattr(self.skipped, reason) + 1
        setattr(self.skipped, reason, n)
        if n == 1:  # a warning: INFO of this (non-vLLM) logger is not shown by default
            logger.warning(
                "PrefixgenConnector: loads nothing for requests with %s (the store's keys hash the base model's "
                "token ids only); vLLM computes them. Counted in the connector's stats as skipped_%s",
                reason.replace("_", " "),
                reason,
            )

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        match = self._matches.pop(request.request_id, None)
        if num_external_tokens <= 0 or match is None:
            return
        bs = self.store.block_size
        start = match.end - num_external_tokens
        first = start // bs
        self._pending.append(
            LoadSpec(request.request_id, start, match.end, first, match.locations[first:], list(blocks.get_block_ids()[0]))
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PrefixgenConnectorMetadata(self._pending)
        self._pending = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matches.pop(request.request_id, None)
        return False, None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The scheduler's skipped requests since the last call (vLLM calls it each step), as ``skipped_<reason>``."""
        if self._role != KVConnectorRole.SCHEDULER:
            return None
        data = {}
        for name in (f.name for f in fields(SkippedRequests)):
            n = getattr(self.skipped, name) - getattr(self._reported, name)
            if n:
                data[f"skipped_{name}"] = n
                setattr(self._reported, name, getattr(self.skipped, name))
        return PrefixgenStats(data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PrefixgenStats(data or {})

    # ------------------------------------------------------------------ worker side

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Write every load of this step into the paged caches before the forward runs (synchronously)."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, PrefixgenConnectorMetadata)
        for load in meta.loads:
            self._load(load, forward_context)

    def _load(self, load: LoadSpec, forward_context: ForwardContext) -> None:
        t0 = time.perf_counter()
        bs = self.store.block_size
        if not self._layers:
            raise RuntimeError("PrefixgenConnector: vLLM did not register its KV caches with the connector")
        layers = [(forward_context.no_compile_layers[name], index) for name, index in self._layers]
        device = layers[0][0].kv_cache.device
        kv, good = self._read(load.locations, device)  # [good * bs, L, 2, H, D]
        end = min(load.end, (load.first_block + good) * bs)
        if end < load.end:  # a corrupt block: vLLM recomputes from the vLLM block holding its first token
            self._load_errors.add(load.block_ids[max(end, load.start) // self.block_size])
        if end <= load.start:
            return
        offset = load.start - load.first_block * bs
        # [L, 2, tokens, this rank's heads, D], each layer's K and V contiguous for the cache-write op
        per_layer = kv[offset : offset + end - load.start, :, :, self._heads.start : self._heads.stop].permute(1, 2, 0, 3, 4)
        per_layer = per_layer.contiguous()
        slots = slot_mapping(load.block_ids, self.block_size, load.start, end).to(device)
        for layer, index in layers:
            layer.impl.do_kv_cache_update(layer, per_layer[index, 0], per_layer[index, 1], layer.kv_cache, slots)
        self.stats.requests += 1
        self.stats.tokens += end - load.start
        self.stats.bytes += per_layer.numel() * per_layer.element_size()
        self.stats.seconds += time.perf_counter() - t0

    def _read(self, locations: list[BlockLocation], device: torch.device) -> tuple[torch.Tensor | None, int]:
        """KV of the leading blocks of ``locations`` that pass their CRC, and how many they are."""
        while locations:
            try:
                return self.store.read_locations(locations, device=device, dtype=self._dtype), len(locations)
            except CorruptBlockError as exc:
                bad = locations[exc.block]
                self.stats.corrupt_blocks += 1
                if (bad.shard, bad.slot) not in self._logged_corrupt:
                    self._logged_corrupt.add((bad.shard, bad.slot))
                    logger.warning("PrefixgenConnector: %s; vLLM recomputes it", exc)
                locations = locations[: exc.block]
        return None, 0

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done before the forward starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # kv_consumer: nothing is saved

    def wait_for_save(self) -> None:
        return
