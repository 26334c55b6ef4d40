"""Step 3 of the build: decide what to prefill, and in which batches.

The planner hashes each record's full blocks and skips every block already stored or already
scheduled in this run: a shared system prompt is prefilled once, and each later record is
prefilled only from its first new block, with the shared prefix's KV as past. Long records are
cut into chunks of at most ``batch_tokens`` (chunked prefill), each depending on the one before.

The batcher sorts a window of tasks by length so padding stays small, and never puts a task in a
batch before the batch that computes its past.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prefixgen.data.records import TokenizedRecord
from prefixgen.format import BlockHash, BuildRecord, block_keys


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


class Planner:
    """Turns tokenized records into PrefillTasks for the blocks nobody has computed yet.

    ``stored(keys)`` says which keys the store already holds (before this run). Counts how many
    records contain each block into ``counts``.

    Example:
        >>> planner = Planner(root, 16, 8192, stored=lambda keys: [False] * len(keys), stats=stats)  # doctest: +SKIP
        >>> tasks = list(planner(tokenized_records))  # doctest: +SKIP
    """

    def __init__(
        self,
        root: BlockHash,
        block_size: int,
        max_chunk: int,
        stored: Callable[[Sequence[BlockHash]], list[bool]],
        stats: BuildRecord,
        on_record: Callable[[BlockHash | None, int, int], None] | None = None,
    ):
        self.root = root
        # Told of each record: (its last block if this run computes it, tokens, tokens it prefills).
        self.on_record = on_record or (lambda last_key, tokens, new_tokens: None)
        self.block_size = block_size
        self.max_chunk = max(block_size, max_chunk // block_size * block_size)
        self.stored = stored
        self.stats = stats
        self.scheduled: set[BlockHash] = set()  # computed (or to be computed) in this run
        self.counts: dict[BlockHash, int] = {}

    def __call__(self, records: Iterator[TokenizedRecord]) -> Iterator[PrefillTask]:
        bs = self.block_size
        for record in records:
            keys = block_keys(record.ids, bs, self.root)
            for key in keys:
                self.counts[key] = self.counts.get(key, 0) + 1
            if not keys:
                self.on_record(None, len(record.ids), 0)
                continue
            # First block that is neither scheduled in this run nor in the store.
            first = 0
            while first < len(keys) and keys[first] in self.scheduled:
                first += 1
            if first < len(keys):
                in_store = self.stored(keys[first:])
                while first < len(keys) and in_store[first - (len(keys) - len(in_store))]:
                    first += 1
            if first == len(keys):
                self.on_record(keys[-1] if keys[-1] in self.scheduled else None, len(record.ids), 0)
                continue
            self.on_record(keys[-1], len(record.ids), (len(keys) - first) * bs)
            self.scheduled.update(keys[first:])
            self.stats.stored_tokens += (len(keys) - first) * bs
            end = len(keys) * bs
            tokens = record.ids[:end]
            depends = keys[first - 1] if first and keys[first - 1] in self.scheduled else None
            for start in range(first * bs, end, self.max_chunk):
                stop = min(end, start + self.max_chunk)
                yield PrefillTask(record.index, tokens[:stop], start, keys[: stop // bs], bs, depends)
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
    first = PrefillTask(t.record, t.tokens[:mid], t.cached, t.keys[: mid // bs], bs, t.depends)
    second = PrefillTask(t.record, t.tokens, mid, t.keys, bs, t.keys[mid // bs - 1])
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
