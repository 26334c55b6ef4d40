"""Step 3 of the build: decide what to prefill, and in which batches.

The planner hashes each record's full blocks and skips every block already stored or already
scheduled in this run: a shared system prompt is prefilled once, and each later record is
prefilled only from its first new block, with the shared prefix's KV as past. Long records are
cut into chunks of at most ``batch_tokens`` (chunked prefill), each depending on the one before.

The batcher sorts a window of tasks by length so padding stays small, and never puts a task in a
batch before the batch that computes its past.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefixgen.data.records import TokenizedRecord
from prefixgen.format import BlockHash, BuildRecord, block_keys
from prefixgen.store.keyset import KeySet, key_array


@dataclass(slots=True)
class PrefillTask:
    """Prefill ``tokens[cached:]`` with the KV of ``tokens[:cached]`` as past.

    ``keys[i]`` is the key of block i of ``tokens``; ``tokens`` ends at a block boundary, and
    ``cached`` is a multiple of the block size.
    """

    record: int
    tokens: list[int]
    cached: int
    keys: list[BlockHash]
    block_size: int
    depends: BlockHash | None = None  # last past block, when this run computes it
    # Hybrid models: blocks counts (of ``tokens``) after which the recurrent state is kept, besides the
    # stride and the task's end (builder/recurrent.py). A task with no new tokens computes only these.
    states: tuple[int, ...] = ()

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.cached

    @property
    def new_keys(self) -> list[BlockHash]:
        return self.keys[self.cached // self.block_size :]


@dataclass(slots=True)
class Batch:
    tasks: list[PrefillTask] = field(default_factory=list)

    @property
    def new_len(self) -> int:
        return max((t.new_tokens for t in self.tasks), default=0)

    @property
    def past_len(self) -> int:
        return max((t.cached for t in self.tasks), default=0)

    @property
    def real_tokens(self) -> int:
        return sum(t.new_tokens for t in self.tasks)

    @property
    def padding_tokens(self) -> int:
        return self.new_len * len(self.tasks) - self.real_tokens


class RecordCounts:
    """How many records contain each block, since the last :meth:`take`: the planner adds each
    record's keys (32 bytes a block, from the input thread); the build takes the counts out every
    checkpoint and appends them to the store as one ``counts/`` file, so host memory holds only the
    blocks seen since then, never a table of every block of the run.

    Example:
        >>> counts = RecordCounts()
        >>> counts.add([b"a" * 32, b"b" * 32]); counts.add([b"a" * 32])
        >>> keys, records = counts.take()
        >>> records.tolist(), counts.pending
        ([2, 1], 0)
    """

    def __init__(self, flush_blocks: int = 1 << 20):
        self.flush_blocks = flush_blocks
        self._parts: list[np.ndarray] = []  # [n, 32] uint8 keys of one record each
        self._pending = 0
        self._lock = threading.Lock()

    def add(self, keys: Sequence[BlockHash]) -> None:
        if not keys:
            return
        part = key_array(keys)
        with self._lock:
            self._parts.append(part)
            self._pending += len(part)

    @property
    def pending(self) -> int:
        """Block occurrences added since the last take."""
        return self._pending

    @property
    def full(self) -> bool:
        """Enough is pending that the build should take it out now, not at the next checkpoint."""
        return self._pending >= self.flush_blocks

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [n, 32] uint8, records [n] uint64) of the distinct blocks added since the last
        take, sorted by key; the counts start again from zero."""
        with self._lock:
            parts, self._parts, self._pending = self._parts, [], 0
        if not parts:
            return np.empty((0, 32), np.uint8), np.empty(0, np.uint64)
        keys = np.concatenate(parts)
        del parts
        # A record's keys are chained, so all different: each occurrence is one record.
        unique, records = np.unique(keys.view(np.dtype((np.void, 32))).reshape(-1), return_counts=True)
        return unique.view(np.uint8).reshape(-1, 32), records.astype(np.uint64)


class Planner:
    """Turns tokenized records into PrefillTasks for the blocks nobody has computed yet.

    ``stored(keys)`` says which keys the store already holds (before this run). Counts how many
    records contain each block into ``counts``. The blocks scheduled in this run are kept in a
    :class:`KeySet` (32 bytes each), so a run of 50 million blocks plans in ~1.6 GB.

    Example:
        >>> planner = Planner(root, 16, 8192, stored=lambda keys: [False] * len(keys), stats=stats)  # doctest: +SKIP
        >>> tasks = list(planner(tokenized_records))  # doctest: +SKIP
    """

    def __init__(
        self,
        root: BlockHash,
        block_size: int,
        max_chunk: int,
        stored: Callable[[Sequence[BlockHash]], Sequence[bool]],
        stats: BuildRecord,
        on_record: Callable[[BlockHash | None, int, int], None] | None = None,
        states: Any = None,
    ):
        self.root = root
        # Told of each record: (its last block if this run computes it, tokens, tokens it prefills).
        self.on_record = on_record or (lambda last_key, tokens, new_tokens: None)
        self.block_size = block_size
        self.max_chunk = max(block_size, max_chunk // block_size * block_size)
        self.stored = stored
        self.stats = stats
        self.scheduled = KeySet()  # computed (or to be computed) in this run
        self.counts = RecordCounts()
        # Hybrid models: where records want a recurrent state (builder/recurrent.py's StatePlan), else None.
        self.states = states

    def __call__(self, records: Iterator[TokenizedRecord]) -> Iterator[PrefillTask]:
        bs = self.block_size
        for record in records:
            keys = block_keys(record.ids, bs, self.root)
            self.counts.add(keys)
            if not keys:
                self.on_record(None, len(record.ids), 0)
                continue
            # First block that is neither scheduled in this run nor in the store. Both sets are
            # prefix-closed together, so the blocks before it are all known.
            scheduled = self.scheduled.contains(keys)
            known = scheduled.copy()
            first = int(np.argmin(known)) if not known.all() else len(keys)
            if first < len(keys):
                known[first:] |= np.asarray(self.stored(keys[first:]), dtype=bool)
                first += int(np.argmin(known[first:])) if not known[first:].all() else len(keys) - first
            wanted = self.states.wanted(record, len(keys)) if self.states is not None else ()
            if first == len(keys):
                self.on_record(keys[-1] if scheduled[-1] else None, len(record.ids), 0)
                yield from self._state_tasks(record, keys, wanted, len(keys), scheduled)
                continue
            self.on_record(keys[-1], len(record.ids), (len(keys) - first) * bs)
            self.scheduled.add(keys[first:])
            self.stats.stored_tokens += (len(keys) - first) * bs
            end = len(keys) * bs
            tokens = record.ids[:end]
            depends = keys[first - 1] if first and scheduled[first - 1] else None
            yield from self._state_tasks(record, keys, wanted, first, scheduled)
            later = tuple(b for b in wanted if b > first)
            yield from chunk_task(record.index, tokens, first * bs, keys, bs, self.max_chunk, depends, later)

    def _state_tasks(
        self, record: TokenizedRecord, keys: list, wanted: Sequence[int], known: int, scheduled
    ) -> Iterator[PrefillTask]:
        """Tasks with no new tokens that compute the recurrent state after a block already stored or
        scheduled (a record, or a chat turn, ending where an earlier record's blocks are)."""
        bs = self.block_size
        for b in wanted:
            if b <= known and self.states.missing(keys[b - 1]):
                depends = keys[b - 1] if scheduled[b - 1] else None
                yield PrefillTask(record.index, record.ids[: b * bs], b * bs, list(keys[:b]), bs, depends, (b,))


def chunk_task(
    index: int,
    tokens: Sequence[int],
    cached: int,
    keys: Sequence[BlockHash],
    block_size: int,
    max_chunk: int,
    depends: BlockHash | None = None,
    states: tuple[int, ...] = (),
) -> Iterator[PrefillTask]:
    """The tasks that prefill ``tokens[cached:]`` (block-aligned) in chunks of at most ``max_chunk``
    new tokens, each depending on the one before (chunked prefill).

    Example:
        >>> [t.new_tokens for t in chunk_task(0, list(range(48)), 16, keys, 16, 16)]  # doctest: +SKIP
        [16, 16]
    """
    bs = block_size
    step = max(bs, max_chunk // bs * bs)
    end = len(tokens) // bs * bs
    for start in range(cached, end, step):
        stop = min(end, start + step)
        mine = tuple(b for b in states if start < b * bs <= stop)
        yield PrefillTask(index, tokens[:stop], start, list(keys[: stop // bs]), bs, depends, mine)
        depends = keys[stop // bs - 1]


class Budget:
    """The token budget of one forward pass: mutable, so the build can lower it after running
    out of device memory and later batches follow."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: int):
        self.tokens = tokens


def split_batch(batch: Batch) -> list[Batch]:
    """Two smaller batches doing the same work: the tasks in halves, or one task cut at a block
    boundary into a first chunk and a second whose past is the first.

    Example:
        >>> [len(b.tasks) for b in split_batch(Batch(tasks=[t1, t2, t3]))]  # doctest: +SKIP
        [1, 2]
    """
    tasks = batch.tasks
    if len(tasks) > 1:
        return [Batch(tasks[: len(tasks) // 2]), Batch(tasks[len(tasks) // 2 :])]
    (t,) = tasks
    bs = t.block_size
    mid = t.cached + t.new_tokens // bs // 2 * bs
    early = tuple(b for b in t.states if b * bs <= mid)
    first = PrefillTask(t.record, t.tokens[:mid], t.cached, t.keys[: mid // bs], bs, t.depends, early)
    second = PrefillTask(t.record, t.tokens, mid, t.keys, bs, t.keys[mid // bs - 1], t.states[len(early) :])
    return [Batch([first]), Batch([second])]


def batch_tasks(tasks: Iterator[PrefillTask], budget: Budget | int, window: int) -> Iterator[Batch]:
    """Group tasks into batches of at most ``budget`` padded new tokens, sorting a window of
    ``window * budget`` tokens by (new, past) length so that padding stays small. The window starts
    at one batch and doubles each round up to ``window``: the first batch is ready as soon as one
    batch's worth of tasks is, and the window fills while the device works.

    A task is batched only after the batch holding its ``depends`` block was yielded: the caller
    runs each batch before asking for the next, so the past is computed by then.

    Example:
        >>> [len(b.tasks) for b in batch_tasks(iter(tasks), 4096, 8)]  # doctest: +SKIP
        [12, 7]
    """
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    pending: list[PrefillTask] = []
    pending_tokens = 0
    waiting: set[BlockHash] = set()  # blocks of tasks not yet yielded
    exhausted = False
    fill = 1  # batches' worth of tasks to gather this round: 1, 2, 4, ... window
    while True:
        batch_tokens = budget.tokens
        while not exhausted and pending_tokens < fill * batch_tokens:
            task = next(tasks, None)
            if task is None:
                exhausted = True
                break
            pending.append(task)
            pending_tokens += task.new_tokens
            waiting.update(task.new_keys)
        if not pending:
            return
        fill = min(window, fill * 2)
        ready = [t for t in pending if t.depends is None or t.depends not in waiting]
        ready.sort(key=lambda t: (t.new_tokens, t.cached), reverse=True)
        batches = _pack(ready, batch_tokens)
        # Keep a last, part-full batch back while more tasks may come to fill it.
        if not exhausted and len(batches) > 1 and batches[-1].new_len * len(batches[-1].tasks) < batch_tokens // 2:
            batches.pop()
        for batch in batches:
            for task in batch.tasks:
                waiting.difference_update(task.new_keys)
            yield batch
        done = {id(t) for b in batches for t in b.tasks}
        pending = [t for t in pending if id(t) not in done]
        pending_tokens = sum(t.new_tokens for t in pending)


def _pack(ready: list[PrefillTask], batch_tokens: int, max_padding: float = 0.1) -> list[Batch]:
    """Cut tasks sorted by decreasing new length into batches whose padded size fits the budget
    and whose padding stays under ``max_padding`` of the batch's slots. The past costs attention
    memory too, so past + new tokens are capped at 4x the budget."""
    batches: list[Batch] = []
    batch = Batch()
    real = new_max = past_max = 0  # of the batch being filled, kept as it grows
    for task in ready:
        rows = len(batch.tasks) + 1
        new_len = max(new_max, task.new_tokens)
        past_len = max(past_max, task.cached)
        slots = new_len * rows
        too_big = slots > batch_tokens or (past_len + new_len) * rows > 4 * batch_tokens
        if batch.tasks and (too_big or slots - real - task.new_tokens > max_padding * slots):
            batches.append(batch)
            batch, real, new_len, past_len = Batch(), 0, task.new_tokens, task.cached
        batch.tasks.append(task)
        real += task.new_tokens
        new_max, past_max = new_len, past_len
    if batch.tasks:
        batches.append(batch)
    return batches
