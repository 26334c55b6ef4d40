"""What the build's progress bar shows: what happened, not what was read ahead.

* records: those whose blocks are all computed (a record is done when its last block is, since
  every block is computed after its parent), out of the dataset's record count when it is known;
* dedup: the share of the done records' tokens that were not prefilled (their blocks were stored
  before, or computed for another record).

The planner (input thread) reports each record's last block; the main thread reports the blocks it
computed. Only the main thread reads or changes the counts.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

from tqdm import tqdm

from prefixgen.format import BlockHash


class Progress:
    """Counts done records and their tokens for ``bar``.

    Example:
        >>> progress = Progress(tqdm(disable=True), computed=lambda key: False)
        >>> progress.planned(None, tokens=40, new_tokens=0)  # every block of it was stored before
        >>> progress.update(); progress.records, progress.dedup
        (1, 1.0)
    """

    def __init__(self, bar: tqdm, computed: Callable[[BlockHash], bool], total: Callable[[], int | None] | None = None):
        self.bar = bar
        self.is_computed = computed  # was this block computed by this run (so far)?
        self.records = self.tokens = self.new_tokens = 0
        self._planned: queue.SimpleQueue = queue.SimpleQueue()  # (last key, tokens, new tokens), from the planner
        self._waiting: dict[BlockHash, list[int]] = {}  # last key -> [records, tokens, new tokens]
        self._total: int | None = None
        if total is not None:  # counting a large file's records takes a while: off the critical path
            threading.Thread(target=self._count, args=(total,), name="prefixgen-count", daemon=True).start()

    def _count(self, total: Callable[[], int | None]) -> None:
        try:
            self._total = total()
        except OSError:
            pass

    def planned(self, last_key: BlockHash | None, tokens: int, new_tokens: int) -> None:
        """A record was planned (any thread): ``last_key`` is its last block when this run computes
        it (None when the store already had it, or the record has no full block); ``new_tokens``
        are the tokens this record has prefilled."""
        self._planned.put((last_key, tokens, new_tokens))

    def computed(self, keys: Iterable[BlockHash]) -> None:
        """These blocks were computed (main thread): the records ending in them are done."""
        if not self._waiting:
            return
        for key in keys:
            done = self._waiting.pop(key, None)
            if done is not None:
                self._done(*done)

    def _done(self, records: int, tokens: int, new_tokens: int) -> None:
        self.records += records
        self.tokens += tokens
        self.new_tokens += new_tokens

    @property
    def dedup(self) -> float:
        return 1 - self.new_tokens / self.tokens if self.tokens else 0.0

    def update(self, skipped: int = 0, **postfix: str) -> None:
        """Take in what the planner reported and redraw the bar (main thread)."""
        while True:
            try:
                key, tokens, new = self._planned.get_nowait()
            except queue.Empty:
                break
            if key is None or self.is_computed(key):
                self._done(1, tokens, new)
            else:
                entry = self._waiting.setdefault(key, [0, 0, 0])
                entry[0] += 1
                entry[1] += tokens
                entry[2] += new
        if self._total is not None and self.bar.total != self._total:
            self.bar.total = self._total
        self.bar.n = self.records + skipped
        self.bar.set_postfix({**postfix, "dedup": f"{self.dedup:.0%}"}, refresh=False)
        self.bar.refresh()
