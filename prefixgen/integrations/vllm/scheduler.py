"""The scheduler side of the connector: which stored tokens vLLM may take for each request (looked up on a thread of
its own, so that ``schedule()`` never hashes a prompt or reads the index), the loads handed to the workers each
step, the index reopened when the store changes, and the verdicts of the live check (:class:`CheckGate`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefixgen.config import ConnectorConfig
from prefixgen.format import block_keys
from prefixgen.integrations.vllm.check import CheckGate
from prefixgen.integrations.vllm.faults import STORE_FAULTS, logger, warn_once
from prefixgen.integrations.vllm.groups import VllmGroup, block_tables, recurrent_skip_message
from prefixgen.integrations.vllm.metadata import LoadSpec, PrefixgenConnectorMetadata, PrefixgenWorkerMetadata
from prefixgen.integrations.vllm.metrics import ClaimStats, PrefixgenConnectorStats, counters_since
from prefixgen.integrations.vllm.refusals import skip_reason
from prefixgen.integrations.vllm.states import StateLoads
from prefixgen.integrations.vllm.threads import Threads
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# The scheduler's lookups hash and search at most this many blocks at a time, letting the GIL go between:
# the scheduler thread waits for one such run at most (a fraction of a ms) while a long prompt is looked up.
LOOKUP_RUN = 128


@dataclass(slots=True)
class _Match:
    end: int  # tokens of the longest stored prefix of the prompt (but its last token)
    locations: list[BlockLocation]
    state: bytes | None = None  # a hybrid model: the key of the last block, after which the state is stored (states.py)


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


class PrefixgenScheduler:
    """The connector in vLLM's scheduler process: claims stored prefixes and hands their loads to the workers."""

    def __init__(self, config: ConnectorConfig, store: PrefixStore, groups: list[VllmGroup], states: StateLoads | None = None):
        self.config = config
        self.store = store
        self._groups = groups
        self._gate = CheckGate(rate=self.config.check_rate)  # nothing is loaded until the live check passed
        self._matches: dict[str, _Match] = {}
        self._pending: list[LoadSpec] = []
        self._bad = PrefixgenWorkerMetadata()  # what the workers reported: not claimed until the index reopens
        self._logged: set[str] = set()
        self.claim_stats = ClaimStats()
        self._reported: dict[str, int | float] = {}
        # Lookups run on a thread of their own: schedule() never hashes a prompt or reads the index itself.
        self._lookup_threads = Threads(1, "prefixgen-lookup")
        self._states = states  # a hybrid model's recurrent state: claims end on a stored one (states.py)
        self._recurrent = None if states else recurrent_skip_message(self._groups)  # why nothing is loaded, or None
        if self._recurrent:
            logger.warning("PrefixgenConnector: %s", self._recurrent)
        self._lookups: dict[str, tuple[Future, float]] = {}  # request id -> its lookup and when it was asked for
        self._lookup_thread: int | None = None  # ident of the thread running the current lookup
        self._idle = False  # the last step scheduled no token: waiting for a lookup then costs no running request
        self._reopens = 0  # store reopens seen by the scheduler thread (the refresh thread counts them in claim_stats)
        self._stop = threading.Event()
        if self.config.refresh_seconds > 0:
            threading.Thread(target=self._refresh_loop, name="prefixgen-refresh", daemon=True).start()

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
            match = self._match(request, num_computed_tokens)
            if match is None:
                self.claim_stats.lookups_deferred += 1
                return None, False  # vLLM keeps the request waiting and asks again next step
            self._matches[request.request_id] = match
        tokens = max(0, match.end - num_computed_tokens)
        return tokens, tokens > 0

    def _match(self, request: Request, num_computed_tokens: int) -> _Match | None:
        """The stored prefix ``request`` may claim: nothing if the store cannot serve it or the live check wants it
        computed, None while its lookup runs (on the lookup thread, started here on the first call)."""
        if self._reopens != self.claim_stats.store_reopens:  # the store changed: what failed may be fixed or moved
            self._reopens = self.claim_stats.store_reopens
            self._bad = PrefixgenWorkerMetadata()
        lookup, since = self._lookups.get(request.request_id, (None, 0.0))
        if lookup is None:
            reason = "recurrent" if self._recurrent else skip_reason(request)
            if reason is not None:
                self._skip(reason)
                return _Match(0, [])
            lookup = self._lookup_threads.submit(self._lookup, list(request.prompt_token_ids or []))
            since = time.monotonic()
            self._lookups[request.request_id] = (lookup, since)
        locations = self._lookup_result(request.request_id, lookup, since)
        if locations is None:
            return None
        state = None
        if self._states and locations:  # a hybrid: up to the last block whose recurrent state vLLM can resume from
            locations, state = self._states.cut(lookup.result(), locations, self._bad.bad_states)
        if locations and not self._gate.allows(request, num_computed_tokens, locations, self.store.block_size, self.claim_stats):
            return _Match(0, [])  # vLLM computes it (a live check, or no check has passed)
        return _Match(len(locations) * self.store.block_size, locations, state)

    def _lookup_result(self, req_id: str, lookup: Future, since: float) -> list[BlockLocation] | None:
        """The usable locations ``lookup`` (asked for at ``since``) found, or None while it runs. On a step that runs
        nothing it is waited for up to ``yield_seconds``; past ``load_timeout_seconds`` it is given up (a miss)."""
        if not lookup.done() and self._idle and self.config.yield_seconds > 0:
            wait([lookup], timeout=self.config.yield_seconds)  # nothing runs this step: waiting delays nobody
        timeout = self.config.load_timeout_seconds
        if not lookup.done() and not (timeout > 0 and time.monotonic() - since > timeout):
            return None
        del self._lookups[req_id]
        if lookup.done():
            return self._usable(lookup.result())  # a bug in the lookup is raised here, not made a miss
        self._give_up_lookup(lookup)  # an index read that never returns: a miss, another thread takes the lookups after it
        return []

    def _refresh_loop(self) -> None:
        """Every ``refresh_seconds``: reopen the index if the store changed (off the scheduler thread)."""
        while not self._stop.wait(self.config.refresh_seconds):
            try:
                if self.store.refresh():
                    self.claim_stats.store_reopens += 1
                    logger.info("PrefixgenConnector: the store changed; its index was reopened")
            except STORE_FAULTS as exc:  # mid-change or damaged: keep the index we have, try again later
                warn_once(
                    self._logged, str(exc), "PrefixgenConnector: cannot reopen the store's index (%s); keeping the last one", exc
                )

    def _give_up_lookup(self, lookup: Future) -> None:
        """A lookup past ``load_timeout_seconds``: if it has not started, it never will; the thread of the lookup
        running (stuck in an index read) is replaced, so the lookups queued after it go on."""
        self.claim_stats.lookup_errors += 1
        lookup.cancel()
        if self._lookup_thread is not None:  # the lookup running now (this one, or one it was queued behind) is stuck
            self._lookup_threads.replace(self._lookup_thread)
        warn_once(
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
            if self._states:  # each matched block with a state vLLM can resume from (states.py)
                return self._states.lookup(self.store.keys(ids[: len(found) * self.store.block_size]), found)
            return found
        except STORE_FAULTS as exc:
            self.claim_stats.lookup_errors += 1
            warn_once(self._logged, str(exc), "PrefixgenConnector: cannot search the store (%s); vLLM computes the prompt", exc)
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

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """vLLM allocated ``request``'s blocks for the ``num_external_tokens`` claimed: its load goes to the workers
        with this step's metadata."""
        match = self._matches.pop(request.request_id, None)
        if num_external_tokens <= 0 or match is None:
            return
        bs = self.store.block_size
        start = match.end - num_external_tokens
        first = start // bs
        load = LoadSpec(request.request_id, start, match.end, first, match.locations[first:], block_tables(blocks), match.state)
        self._pending.append(load)

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput, kv_cache_manager: KVCacheManager | None
    ) -> PrefixgenConnectorMetadata:
        """This step's loads and live checks for the workers (``kv_cache_manager``: vLLM's, for a checked request's
        block table)."""
        self._idle = scheduler_output.total_num_scheduled_tokens == 0
        meta = PrefixgenConnectorMetadata(self._pending, idle=self._idle)
        meta.checks = self._gate.due(
            scheduler_output.num_scheduled_tokens, lambda req_id: block_tables(kv_cache_manager.get_blocks(req_id))
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
            self._bad.bad_states |= reported.bad_states
            self._gate.take(reported.checks, reported.weights_changed, self.claim_stats, self.store.path)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget ``request`` (finished or aborted): the connector holds none of its blocks."""
        self._matches.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)  # aborted while looked up: the answer is dropped
        self._gate.finished(request.request_id)
        return False, None

    def reset_cache(self) -> bool:
        """vLLM's reset for weight updates (``reset_prefix_cache(reset_connector=True)``): nothing is loaded until
        the live check passes again, against the engine as it is now."""
        self._gate.reset()
        logger.info("PrefixgenConnector: cache reset; nothing is loaded until the live check passes again")
        return True

    def get_kv_connector_stats(self) -> PrefixgenConnectorStats | None:
        """The counters of :attr:`claim_stats` since the last call (vLLM asks every step and logs them)."""
        return counters_since(self.claim_stats, self._reported)

    def shutdown(self) -> None:
        """Stop the refresh thread and the lookup thread (after its current lookup; nothing waits for it)."""
        self._stop.set()
        self._lookup_threads.shutdown()
