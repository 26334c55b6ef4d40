"""The worker side of the connector, vLLM-facing: the loads of each step handed to load threads (a pool a hung read
cannot hold up), loads of the same blocks sharing one read, a load given up at its deadline, what finished or
failed reported to vLLM and the scheduler. The pipeline that reads and writes a load is :mod:`.loader` (store reads
and their faults: :mod:`.reads`; recurrent states: :mod:`.states`); the live checks are :mod:`.probes`.

Every fault is a cache miss: vLLM recomputes a load from its first token not written."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from prefixgen.config import ConnectorConfig
from prefixgen.errors import ConfigError
from prefixgen.integrations.vllm.faults import logger, warn_once
from prefixgen.integrations.vllm.groups import VllmGroup
from prefixgen.integrations.vllm.loader import Loader
from prefixgen.integrations.vllm.loading import Loading, wait_copies
from prefixgen.integrations.vllm.metadata import LoadSpec, PrefixgenConnectorMetadata, PrefixgenWorkerMetadata
from prefixgen.integrations.vllm.metrics import PrefixgenConnectorStats, counters_since
from prefixgen.integrations.vllm.probes import LiveChecks
from prefixgen.integrations.vllm.reports import Reports
from prefixgen.integrations.vllm.states import StateLoads, write_state
from prefixgen.integrations.vllm.threads import Threads
from prefixgen.model import tp_kv_heads
from prefixgen.store.reader import PrefixStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig


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


def _done() -> Future:
    """A future already done: a load refused before it started."""
    future: Future = Future()
    future.set_result(None)
    return future


class PrefixgenWorker:
    """The connector in a worker process (one per rank): loads stored prefixes into vLLM's paged caches."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        config: ConnectorConfig,
        store: PrefixStore,
        groups: list[VllmGroup],
        num_blocks: int,
        states: StateLoads | None = None,
    ):
        self._vllm_config = vllm_config
        self.config = config
        self.store = store
        self.block_size = vllm_config.cache_config.block_size  # vLLM's block size, not the store's
        self._groups = groups
        self._states = states  # a hybrid model's recurrent layers: a load's state is written into them (states.py)
        self._reports = Reports()  # what the load threads report, guarded by its lock
        self._lock = self._reports.lock
        self.stats = self._reports.stats
        self._logged = self._reports.logged
        self._loader = Loader(vllm_config, config, store, groups, self._reports, states)
        self._checks = LiveChecks(self._loader, self._reports, num_blocks, config.check_tolerance)
        self._failed_loads: set[str] = set()  # with several groups: loads cut short, reported as failed receives
        self._pool = Threads(self.config.load_threads, "prefixgen-load")
        self._inflight: dict[str, Loading] = {}
        self._load_errors: set[int] = set()
        self._reported: dict[str, int | float] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Map vLLM's attention layers to the store's layers and check each can take the store's KV."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        kv = self.store.manifest.kv
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        heads = kv_head_range(kv.num_kv_heads, tp, get_tensor_model_parallel_rank())
        self._checks.watch(self._loader.register(kv_caches, heads))

    def start_load_kv(self, meta: PrefixgenConnectorMetadata) -> None:
        """Hand each load of this step (``meta``: the scheduler's for this step) to a load thread; :meth:`get_finished`
        reports it when done.

        On CUDA the loads write on a side stream that first waits for the work queued so far on the
        engine's stream (nothing the engine queued for those blocks can land after the load)."""
        if not meta.loads:
            return
        if not self._loader.layers:
            raise RuntimeError("PrefixgenConnector: vLLM did not register its KV caches with the connector")
        if not self._checks.weights_match():
            with self._lock:  # nothing written: vLLM computes these requests whole
                for load in meta.loads:
                    self._report_unwritten(load, load.start)
            for load in meta.loads:  # reported finished by the next get_finished
                self._inflight[load.req_id] = Loading(load, math.inf, written=load.start, future=_done(), state="done")
            return
        after = None
        device = self._loader.layers[0][0].kv_cache.device
        if device.type == "cuda":
            if self._loader.stream is None:  # made here, on the engine's thread: the load threads share one
                self._loader.stream = torch.cuda.Stream(device)
            after = torch.cuda.Event()
            after.record()
        timeout = self.config.load_timeout_seconds
        deadline = time.monotonic() + timeout if timeout > 0 else math.inf
        leaders = []
        for load in meta.loads:  # all joined first, then started: a load of this step joins another of this step
            loading = Loading(load, deadline, written=load.start, after=after)
            if not self._join(loading):  # a load of its own, on a load thread
                loading.group = [loading]
                leaders.append(loading)
            self._inflight[load.req_id] = loading
        for loading in leaders:
            loading.future = self._pool.submit(self._load_safely, loading)

    def _join(self, loading: Loading) -> bool:
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

    def get_finished(self, idle: bool) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose load is done (written, or stopped at a fault already reported as load errors).

        On a step that runs nothing (``idle``: :attr:`PrefixgenConnectorMetadata.idle`) while loads run, the engine thread
        (which calls this every step) waits up to ``yield_seconds`` for one to finish: an in-process engine's step
        loop otherwise spins holding the GIL, and the load threads' Python between their GIL-free reads and copies
        would run only in the interpreter's 5 ms switch slices (a 4,096-token load on an idle CPU engine: 0.09 GB/s
        instead of 1.4-2.5). A step that runs a batch never waits: its forward releases the GIL on its own."""
        if self._inflight and self.config.yield_seconds > 0 and idle:
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

    def _give_up(self, loading: Loading) -> None:
        """A load past its deadline: its thread writes nothing more (a write under way ends first), vLLM recomputes
        from the first token not written, and a thread stuck in a read is replaced so the loads after it run."""
        with loading.lock:
            if loading.state == "done":  # finished just now: it reported its own errors
                return
            queued = loading.state == "queued"
            loading.state = "abandoned"
            wait_copies(loading)
            written = loading.written
            with self._lock:
                self._report_unwritten(loading.load, written)
                self.stats.timed_out_loads += 1
                if not queued:  # its shards are not claimed again until the store changes
                    self._reports.bad.bad_shards |= loading.reading
        if queued:
            loading.future.cancel()  # never started (its thread, if it is just starting, sees the state and returns)
        elif loading.thread is not None:
            self._pool.replace(loading.thread)
        warn_once(
            self._logged,
            "timeout",
            "PrefixgenConnector: a load took more than load_timeout_seconds=%s (a store read that hangs?); vLLM "
            "recomputes it, and the thread waiting on the read is replaced",
            self.config.load_timeout_seconds,
        )

    def get_transfer_results(self, idle: bool) -> KVConnectorTransferResults:
        """:meth:`get_finished`'s loads, with those cut short as failed receives when the model has several KV cache
        groups: vLLM's scheduler then recomputes such a request whole (``_handle_failed_recving``), since block ids
        reported by :meth:`get_block_ids_with_load_errors` are ambiguous across groups and refused there."""
        _, done = self.get_finished(idle)
        done = done or set()
        with self._lock:
            failed = self._failed_loads & done
            self._failed_loads -= failed
        return KVConnectorTransferResults(finished_recving=set(done), failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self, meta: PrefixgenConnectorMetadata | None) -> PrefixgenWorkerMetadata | None:
        """What to tell the scheduler after this step (``meta``: the scheduler's for it, if bound): the stored blocks
        and shards found bad since the last step, the live checks of this step's forward, weights found changed."""
        checks = self._checks.run(meta)  # after this step's forward: the KV it computed is in the cache
        with self._lock:
            bad = self._reports.bad
            if not (bad.bad_blocks or bad.bad_shards or bad.bad_states or checks or self._checks.weights_changed):
                return None
            reported, self._reports.bad = self._reports.bad, PrefixgenWorkerMetadata()
        reported.checks, reported.weights_changed, self._checks.weights_changed = checks, self._checks.weights_changed, False
        return reported

    def get_kv_connector_stats(self) -> PrefixgenConnectorStats | None:
        """The counters of :attr:`stats` since the last call (vLLM asks every step and logs them)."""
        with self._lock:
            return counters_since(self.stats, self._reported)

    def shutdown(self) -> None:
        """Return at once, even with reads hung: loads still running write nothing more (a write under way ends
        first); their threads are daemons, left to end with the process."""
        for loading in self._inflight.values():
            with loading.lock:
                loading.state = "abandoned"
                wait_copies(loading)
        self._pool.shutdown()

    def _load_safely(self, loading: Loading) -> None:
        """:meth:`_load` on a load thread, for ``loading`` and the loads that joined it: whatever goes wrong, the engine
        recomputes each from the first token not written. ``loading`` may be a follower whose shared run was read: it
        reads the rest of its blocks."""
        with loading.lock:
            if loading.state != "abandoned":  # given up (or shut down) before it started: run only for its followers
                loading.state, loading.thread = "running", threading.get_ident()
        try:
            self._loader.load(loading, self._detach)
        except Exception:  # a bug or a device error must not leave the requests waiting forever
            logger.exception("PrefixgenConnector: loading %s failed; vLLM recomputes it", loading.load.req_id)
        with self._lock:
            loading.next_read = math.inf  # nothing joins it any more
            members, loading.group = list(loading.group or [loading]), []
        for member in members:
            self._finish(member)
            if member is not loading:
                member.future.set_result(None)

    def _finish(self, member: Loading) -> None:
        """``member``'s load is over (written whole, or up to a fault): vLLM recomputes from its first token not written."""
        with member.lock:
            if member.state == "abandoned":  # given up at its deadline: reported then
                return
            try:
                wait_copies(member)  # CUDA: no write may land after vLLM recomputes these slots
            except Exception:
                logger.exception("PrefixgenConnector: loading %s failed on the device", member.load.req_id)
                member.written = member.load.start
            if member.load.state is not None and member.written == member.load.end:
                assert self._states is not None
                member.written = write_state(self._states, member.load, self._reports)
            member.state = "done"
            with self._lock:
                self._report_unwritten(member.load, member.written)
                self.stats.requests += 1

    def _detach(self, loading: Loading, read: int) -> None:
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

    def _continue(self, member: Loading) -> None:
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
