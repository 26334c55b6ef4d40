"""The worker side of the connector: the loads of each step, run on load threads that read the stored blocks (this
rank's heads, in pieces, into reused read buffers), write them into vLLM's paged caches with each layer's own
cache-write op, share one read between loads of the same blocks, give a load up at its deadline, and report what
failed; and the workers' half of the live check (comparing vLLM's KV with the store's after a step's forward).

Every fault is a cache miss: vLLM recomputes a load from its first token not written."""

from __future__ import annotations

import inspect
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from prefixgen.config import ConnectorConfig
from prefixgen.errors import ConfigError, CorruptBlockError, IncompatibleStoreError
from prefixgen.integrations.vllm.check import (
    CheckResult,
    CheckSpec,
    WeightsWatch,
    compare_blocks,
    find_model,
    relative_errors,
    tolerance,
)
from prefixgen.integrations.vllm.faults import STORE_FAULTS, logger, warn_once
from prefixgen.integrations.vllm.groups import VllmGroup, group_span, is_mla, key_order, rope_key_order, write_layer
from prefixgen.integrations.vllm.metadata import LoadSpec, PrefixgenConnectorMetadata, PrefixgenWorkerMetadata
from prefixgen.integrations.vllm.metrics import LoadStats, PrefixgenConnectorStats, counters_since
from prefixgen.integrations.vllm.staging import Staging, StagingPool, upload
from prefixgen.integrations.vllm.states import StateLoads, store_row
from prefixgen.integrations.vllm.threads import Threads
from prefixgen.model import tp_kv_heads
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore, ReadCount, StoredKV

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


@dataclass(eq=False)
class Loading:
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
    # join only at or after it (guarded by the worker's lock; inf once the leader wrote its last piece).
    group: list[Loading] | None = None
    next_read: float = 0
    shared_end: float = math.inf  # a follower: its tokens before this are the leader's too (it reads the rest itself)


def _wait_copies(loading: Loading) -> None:
    """CUDA: wait until the last piece ``loading`` launched is written (nothing to wait for on CPU). Called holding its lock."""
    if loading.pending is not None:
        pending, loading.pending = loading.pending, None
        pending.synchronize()


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
        self._dtype = vllm_config.model_config.dtype
        self._layers: list[tuple[Any, int]] = []  # (vLLM attention layer, HF layer index)
        self._layer_groups: list[int] = []  # the KV cache group of each of self._layers
        self._key_order: torch.Tensor | None = None  # vLLM's order of a key's values, if not the store's
        self._failed_loads: set[str] = set()  # with several groups: loads cut short, reported as failed receives
        self._heads = range(self.store.manifest.kv.num_kv_heads)
        self._stage = range(self.store.manifest.kv.num_layers)  # this pipeline stage's layers (all without PP)
        self._pool = Threads(self.config.load_threads, "prefixgen-load")
        self._inflight: dict[str, Loading] = {}
        self._staging: StagingPool | None = None  # the read buffers (made in register_kv_caches)
        self._lock = threading.Lock()  # the load threads report through what it guards
        self._load_errors: set[int] = set()
        self._new_bad = PrefixgenWorkerMetadata()  # for the scheduler, since the last step
        self._logged: set[str] = set()
        self._stream = None  # CUDA: the side stream the loads write on
        self.stats = LoadStats()
        self._reported: dict[str, int | float] = {}
        self._num_blocks = num_blocks
        self._watch: WeightsWatch | None = None  # made in register_kv_caches
        self._weights_changed = False
        self._limit = self.config.check_tolerance or tolerance(
            self.store.manifest.kv.storage, self.store.manifest.kv.dtype, str(self._dtype).removeprefix("torch.")
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
                continue  # a recurrent layer: its state is written once a load's KV is (states.py)
            self._layers.append((layer, self._layer_index(name, layer)))
            self._layer_groups.append(group_of[name])
        # A pipeline stage holds consecutive layers: only theirs are converted and uploaded.
        indices = sorted(index for _, index in self._layers)
        if indices and indices == list(range(indices[0], indices[-1] + 1)):
            self._stage = range(indices[0], indices[-1] + 1)
        cuda = bool(self._layers) and self._layers[0][0].kv_cache.device.type == "cuda"
        piece = self._piece_blocks() * self._block_read_bytes()  # a piece as staged: at most staging_bytes
        self._staging = StagingPool(piece, self.config.staging_buffers, pinned=cuda)
        self._find_model()

    def _layer_index(self, name: str, layer: Any) -> int:
        """The store layer of vLLM's layer ``name``, once the layer is found able to take the store's KV (a key/value
        cache-write op, the store's head size and this rank's KV heads)."""
        from vllm.model_executor.models.utils import extract_layer_index

        kv = self.store.manifest.kv
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
        return index

    def _find_model(self) -> None:
        """vLLM's model holding the registered layers: the order of a key's values (RoPE) and the weights watch."""
        kv = self.store.manifest.kv
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

    def start_load_kv(self, meta: PrefixgenConnectorMetadata) -> None:
        """Hand each load of this step (``meta``: the scheduler's for this step) to a load thread; :meth:`get_finished`
        reports it when done.

        On CUDA the loads write on a side stream that first waits for the work queued so far on the
        engine's stream (nothing the engine queued for those blocks can land after the load)."""
        if not meta.loads:
            return
        if not self._layers:
            raise RuntimeError("PrefixgenConnector: vLLM did not register its KV caches with the connector")
        if not self._weights_match():
            with self._lock:  # nothing written: vLLM computes these requests whole
                for load in meta.loads:
                    self._report_unwritten(load, load.start)
            for load in meta.loads:  # reported finished by the next get_finished
                self._inflight[load.req_id] = Loading(load, math.inf, written=load.start, future=_done(), state="done")
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
        checks = self._run_checks(meta)  # after this step's forward: the KV it computed is in the cache
        with self._lock:
            bad = self._new_bad
            if not (bad.bad_blocks or bad.bad_shards or bad.bad_states or checks or self._weights_changed):
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

    def _run_checks(self, meta: PrefixgenConnectorMetadata | None) -> list[CheckResult]:
        """This step's live checks: vLLM's KV of each probe's stored blocks against the store's (this rank's heads)."""
        if not isinstance(meta, PrefixgenConnectorMetadata) or not meta.checks:
            return []
        t0 = time.perf_counter()
        results = [self._check(spec) for spec in meta.checks]
        if self._watch is not None and results and all(r.passed for r in results):
            self._watch.mark()
        with self._lock:
            self.stats.check_seconds += time.perf_counter() - t0
        return results

    def _check(self, spec: CheckSpec) -> CheckResult:
        """One probe: its stored blocks, read in staging pieces (a check's memory is a load's), against vLLM's KV of
        them; a failed read gives no verdict."""
        sums = None
        step = self._piece_blocks()
        bs = self.store.block_size
        for i in range(0, len(spec.locations), step):
            piece = spec.locations[i : i + step]
            staging = self._staging.acquire()
            try:
                read, good = self._read(piece, staging)
                if good < len(piece):
                    sums = None
                    break
                first = (spec.first_block + i) * bs
                tables = [(spec.block_ids[g], self._groups[g].block_size) for g in self._layer_groups]
                kv = read.rows(self._dtype)  # [good * bs, this stage's layers, 2, this rank's heads, D] on the host
                part = compare_blocks(
                    self._layers, self._stage.start, kv, first, min(spec.end, first + good * bs), tables,
                    self._num_blocks, self._key_order,
                )  # fmt: skip
            finally:
                self._staging.release(staging)
            sums = part if sums is None else sums + part
        if sums is None:
            return CheckResult(spec.req_id, 0, [], [], [], self._limit, failed_read=True)
        k_err, v_err = relative_errors(sums)
        layers = [index for _, index in self._layers]
        return CheckResult(spec.req_id, spec.end - spec.start, layers, k_err, v_err, self._limit)

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
                _wait_copies(loading)
        self._pool.shutdown()

    def _load_safely(self, loading: Loading) -> None:
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

    def _finish(self, member: Loading) -> None:
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
        """A hybrid's load whose KV is written: its recurrent state too (states.py); the tokens written (its start if
        the state is missing or damaged: vLLM recomputes the load whole, and the state is reported bad, so that later
        claims end on another state; its block's KV is fine and stays claimable)."""
        assert self._states is not None
        try:
            nbytes = self._states.write(load.state, load.end, load.block_ids)
        except STORE_FAULTS as exc:
            warn_once(self._logged, str(exc), "PrefixgenConnector: %s; vLLM computes the prompt", exc)
            with self._lock:
                self.stats.failed_states += 1
                self._new_bad.bad_states.add(bytes(load.state))
            return load.start
        with self._lock:
            self.stats.states += 1
            self.stats.state_bytes += nbytes
        return load.end

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

    def _load(self, loading: Loading) -> None:
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
                read, good = self._read(piece, staging)  # as stored: a view of the staging buffer
                with self._lock:  # the loads that joined while it was read are written too; later ones join after it
                    members = list(loading.group or [loading])
                    loading.next_read = i + len(piece)
                if good and cuda:
                    if last is not None:
                        last.synchronize()  # the previous piece is written: its device copy goes (one piece on the device)
                    with torch.cuda.stream(self._stream):
                        read = read.to(upload(read.kv, device))  # raw, straight from the pinned read buffer
                        last = torch.cuda.Event()
                        last.record(self._stream)  # the buffer is free after it (the writes below come later)
                        last.buffers = (read,)  # type: ignore[attr-defined]  # the device copy, alive until it is waited for
                kv = self._rows(read, device) if good else None  # [good * bs, layers, 2, heads, D] on the cache's device
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

    def _rows(self, read: StoredKV, device: torch.device) -> torch.Tensor:
        """vLLM's token-major rows of a piece ``read`` as stored, on the cache's device (where it was uploaded raw:
        on CPU, where the upload is the identity, the host), permuted and converted there: a head-major piece's
        transpose, a dtype conversion or fp8's dequantization is one pass on the device (on CUDA, on the load stream),
        none on the host; a token-major piece with nothing to convert stays a view."""
        if device.type == "cuda":
            with torch.cuda.stream(self._stream):
                kv = read.rows(self._dtype)
        else:
            kv = read.rows(self._dtype)
        if kv.untyped_storage().data_ptr() != read.kv.untyped_storage().data_ptr():
            with self._lock:
                self.stats.device_converted_bytes += kv.numel() * kv.element_size()
        return kv

    def _write_piece(self, member: Loading, kv: torch.Tensor, first: int, end: int, device: torch.device) -> Any:
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
        """Host bytes one store block takes in a read buffer: this rank's heads as stored (a token-major store's every
        head, side by side in each token), fp8 as its bytes and scales (dequantized on the cache's device, :meth:`_rows`)."""
        return self.store.staged_bytes(1, self._heads)

    def _spans(self, block_ids: list[list[int]], start: int, end: int) -> list[tuple[int, torch.Tensor]]:
        """Per KV cache group, the tokens of ``[start, end)`` it holds blocks for: the offset of the first from
        ``start`` and their slots (a sliding-window or chunked group: only its window's; groups.py)."""
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

    def _read(self, locations: list[BlockLocation], staging: Staging) -> tuple[StoredKV | None, int]:
        """This rank's KV heads and layers, as stored (:class:`StoredKV`: no transpose, no conversion), of the leading
        blocks of ``locations`` that read cleanly, and how many they are; each fault is logged once per shard and
        reported to the scheduler. Read (pread) into ``staging``: the result is a view of it, whatever the store's
        order and dtype; the host does no per-byte work beyond the read (:meth:`_rows` converts it on the device)."""
        count = ReadCount()  # a head-major store gives this rank only its heads from disk
        try:
            return self._read_counted(locations, staging, count)
        finally:
            with self._lock:
                self.stats.read_bytes += count.bytes

    def _read_counted(self, locations: list[BlockLocation], staging: Staging, count: ReadCount) -> tuple[StoredKV | None, int]:
        while locations:
            try:
                read = self.store.read_stored(  # in this thread: a read that hangs holds up this load only
                    locations,
                    "cpu",
                    heads=self._heads,
                    buffer=staging.tensor,
                    layers=self._stage,
                    threads=1,
                    count=count,
                )
                with self._lock:
                    self.stats.pieces += 1
                    self.stats.max_piece_bytes = max(self.stats.max_piece_bytes, len(locations) * self._block_read_bytes())
                    if read.kv.untyped_storage().data_ptr() != staging.tensor.untyped_storage().data_ptr():
                        self.stats.converted_bytes += read.kv.numel() * read.kv.element_size()
                return read, len(locations)
            except CorruptBlockError as exc:
                bad = locations[exc.block]
                with self._lock:
                    self.stats.corrupt_blocks += 1
                    self._new_bad.bad_blocks.add((bad.shard, bad.slot))
                warn_once(self._logged, bad.shard, "PrefixgenConnector: %s; vLLM recomputes it", exc)
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
                if warn_once(self._logged, shard, "PrefixgenConnector: %s; its blocks are not loaded, vLLM computes them", again):
                    with self._lock:
                        self.stats.failed_shards += 1
                return start
            start = end
        warn_once(self._logged, str(exc), "PrefixgenConnector: %s; vLLM computes the rest of the prefix", exc)
        return 0
