"""``PrefixgenConnector``, the class vLLM builds: its start-up checks, then each call handed to the side of its role,
:class:`~prefixgen.integrations.vllm.scheduler.PrefixgenScheduler` or
:class:`~prefixgen.integrations.vllm.worker.PrefixgenWorker` (as vLLM's own v1 connectors split them)."""

from __future__ import annotations

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
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from prefixgen.config import ConnectorConfig
from prefixgen.errors import ConfigError, IncompatibleStoreError
from prefixgen.integrations.vllm.check import engine_identity_problems
from prefixgen.integrations.vllm.faults import logger
from prefixgen.integrations.vllm.groups import vllm_groups
from prefixgen.integrations.vllm.metadata import PrefixgenConnectorMetadata
from prefixgen.integrations.vllm.metrics import PrefixgenConnectorStats, PrefixgenPromMetrics
from prefixgen.integrations.vllm.refusals import engine_fingerprint, state_problems, unsupported_features
from prefixgen.integrations.vllm.scheduler import PrefixgenScheduler
from prefixgen.integrations.vllm.states import StateLoads
from prefixgen.integrations.vllm.worker import PrefixgenWorker
from prefixgen.store.reader import PrefixStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PrefixgenConnector(KVConnectorBase_V1, SupportsHMA):
    """A vLLM v1 KV connector that loads stored prompt prefixes from a prefixgen store (read only).

    ``kv_connector_extra_config`` options:

    * ``store`` (required): path of the store.
    * ``chat_template``: the Jinja file given to ``prefixgen build --chat-template`` (and to
      ``vllm serve --chat-template``), when the tokenizer has no template of its own; it is part
      of the tokenizer identity the store is checked against.
    * ``staging_bytes``, ``staging_buffers``, ``load_threads``, ``yield_seconds``, ``cast_kv_dtype``, ``check_rate``,
      ``check_tolerance``: see :class:`~prefixgen.config.ConnectorConfig`.

    Its side: ``connector_scheduler`` (:class:`PrefixgenScheduler`, with its counters as ``claim_stats``) in vLLM's
    scheduler, ``connector_worker`` (:class:`PrefixgenWorker`, counters ``stats``) in each worker; the other is None.

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
        states = StateLoads.for_engine(self.store, self._groups, kv_cache_config)  # a hybrid's recurrent state, or None
        problems = state_problems(vllm_config) if states else []
        if problems:
            raise ConfigError("PrefixgenConnector cannot serve this engine:\n  " + "\n  ".join(problems))
        self.connector_scheduler: PrefixgenScheduler | None = None
        self.connector_worker: PrefixgenWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._check_model(vllm_config, self.config.chat_template)
            self.connector_scheduler = PrefixgenScheduler(self.config, self.store, self._groups, states)
            self.claim_stats = self.connector_scheduler.claim_stats  # the scheduler's counters (tests, benchmarks)
        else:
            self.connector_worker = PrefixgenWorker(
                vllm_config, self.config, self.store, self._groups, kv_cache_config.num_blocks, states
            )
            self.stats = self.connector_worker.stats  # this rank's counters (tests, benchmarks)
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

    # ------------------------------------------------------------------ scheduler side (PrefixgenScheduler)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored tokens of the prompt beyond ``num_computed_tokens`` (vLLM's own hits come first), loaded
        asynchronously; None while the store is looked up (:meth:`PrefixgenScheduler.get_num_new_matched_tokens`)."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """No group's blocks for a load are left unzeroed: vLLM zeroes a new block of a hybrid model (its pages are
        shared with the Mamba groups' float32 states) before the step's loads start (``_update_states`` comes before
        ``start_load_kv``), and a load that ends inside a block writes only its head; the tail left as another group
        wrote it read as bf16 is NaN, and vLLM's CPU attention multiplies it by the mask's 0 (states.py)."""
        return ()

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta(scheduler_output, self._kv_cache_manager)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hybrid KV cache manager (``SupportsHMA``) calls this instead of :meth:`request_finished`: the
        connector holds no blocks of a finished request, whatever the groups."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def reset_cache(self) -> bool:
        """vLLM's reset for weight updates (``reset_prefix_cache(reset_connector=True)``): nothing is loaded until
        the live check passes again, against the engine as it is now."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.reset_cache()

    # ------------------------------------------------------------------ worker side (PrefixgenWorker)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Map vLLM's attention layers to the store's layers and check each can take the store's KV."""
        assert self.connector_worker is not None
        self.connector_worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Hand each load of this step to a load thread; :meth:`get_finished` reports it when done."""
        assert self.connector_worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PrefixgenConnectorMetadata)
        self.connector_worker.start_load_kv(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose load is done (written, or stopped at a fault already reported as load errors)."""
        assert self.connector_worker is not None
        return self.connector_worker.get_finished(self._idle_step())

    def _idle_step(self) -> bool:
        """Whether this step (whose metadata vLLM bound before the forward) schedules no token."""
        meta = self._connector_metadata if self.has_connector_metadata() else None
        return isinstance(meta, PrefixgenConnectorMetadata) and meta.idle

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """:meth:`get_finished`'s loads, with those cut short as failed receives when the model has several KV cache
        groups (:meth:`PrefixgenWorker.get_transfer_results`)."""
        assert self.connector_worker is not None
        return self.connector_worker.get_transfer_results(self._idle_step())

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.connector_worker is not None
        return self.connector_worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self.connector_worker is not None
        meta = self._connector_metadata if self.has_connector_metadata() else None
        return self.connector_worker.build_connector_worker_meta(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM schedules a request only after get_finished reported its load

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # kv_consumer: nothing is saved

    def wait_for_save(self) -> None:
        return

    # ------------------------------------------------------------------ both sides

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This side's counters since the last call (vLLM asks every step and logs them)."""
        side = self.connector_scheduler or self.connector_worker
        assert side is not None
        return side.get_kv_connector_stats()

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
        side = self.connector_scheduler or self.connector_worker
        assert side is not None
        side.shutdown()
