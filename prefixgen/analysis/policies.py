"""Eviction policies of a dynamic prefix-cache tier, each a small class behind one interface.

Blocks are dense integer ids (``simulate`` maps keys and hash ids to ints once). A policy holds
``resident`` (a dict whose keys are the blocks in the tier: ``x in policy.resident`` is the lookup)
and ``update(blocks)``: touch ``blocks`` in the given order (inserting those not resident), then
evict until at most ``capacity`` blocks remain. ``simulate`` passes a request's blocks from its last
to its first, so a chain's first block is its most recently touched. ``capacity=None`` is unbounded.

Example:
    >>> lru = LRU(2)
    >>> lru.update([11, 10])  # a request with blocks 10, 11: touched last to first
    >>> lru.update([20])      # a third block: the least recently used one (11, a chain's end) goes
    >>> sorted(lru.resident)
    [10, 20]
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass(slots=True)
class Future:
    """What the offline ``belady`` knows: for each block ``update`` will be given, in order, a
    priority (larger is evicted first) with the block in its low digits: ``priority % n_ids``."""

    priorities: list[int]
    n_ids: int
    never: int  # priorities from this one up are of touches whose block is never used again


class Policy:
    """The interface: ``resident`` (keys are the blocks in the tier) and ``update``.

    ``future`` is only for the offline ``belady`` (see ``Future``); the others ignore it.
    """

    name: ClassVar[str]
    needs_future: ClassVar[bool] = False

    def __init__(self, capacity: int | None, future: Future | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1 block, got {capacity}")
        self.capacity = capacity
        self.resident: dict[int, object] = {}

    def update(self, blocks: Sequence[int]) -> None:
        """Touch ``blocks`` in order, inserting the absent ones, then evict down to ``capacity``."""
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: evicts the block touched longest ago."""

    name = "lru"

    def __init__(self, capacity: int | None, future: Future | None = None):
        super().__init__(capacity, future)
        self.resident = OrderedDict()  # oldest first

    def update(self, blocks: Sequence[int]) -> None:
        od = self.resident
        move = od.move_to_end
        for x in blocks:
            if x in od:
                move(x)
            else:
                od[x] = None
        if self.capacity is not None and len(od) > self.capacity:
            pop = od.popitem
            for _ in range(len(od) - self.capacity):
                pop(last=False)


class LFU(Policy):
    """Least frequently used, counting touches since the block entered the tier; among equal
    counts the least recently touched goes first."""

    name = "lfu"

    def __init__(self, capacity: int | None, future: Future | None = None):
        super().__init__(capacity, future)
        self.resident: dict[int, int] = {}  # block -> touches
        # touches -> blocks with that count, least recently touched first: every touch moves a
        # block to the next bucket's end, so a bucket's order is the order of last touch.
        self.buckets: dict[int, OrderedDict] = {}
        self.low = 1  # at most the smallest count in the tier

    def update(self, blocks: Sequence[int]) -> None:
        count, buckets = self.resident, self.buckets
        ones = buckets.get(1)
        for x in blocks:
            f = count.get(x)
            if f is None:  # new: count 1
                if ones is None:
                    ones = buckets[1] = OrderedDict()
                ones[x] = None
                count[x] = 1
                continue
            b = buckets[f]
            del b[x]
            if not b:
                del buckets[f]
                if f == 1:
                    ones = None
            f += 1
            count[x] = f
            b = buckets.get(f)
            if b is None:
                b = buckets[f] = OrderedDict()
            b[x] = None
        if ones is not None:
            self.low = 1
        if self.capacity is None:
            return
        excess = len(count) - self.capacity
        low = self.low
        while excess > 0:
            b = buckets.get(low)
            if b is None:
                low = min(buckets)
                b = buckets[low]
            pop = b.popitem
            while excess > 0 and b:
                del count[pop(last=False)[0]]
                excess -= 1
            if not b:
                del buckets[low]
        self.low = low


class ARC(Policy):
    """Adaptive replacement cache (Megiddo and Modha, FAST'03): T1 holds blocks touched once, T2
    blocks touched again; ghosts B1/B2 remember recent evictions from each and move the target
    size ``p`` of T1. Evicting after each request instead of on each miss: while over capacity,
    take T1's oldest if T1 holds more than ``p`` blocks (or T2 is empty), else T2's oldest; then
    trim B1 to ``capacity - |T1|`` and all four lists to ``2 * capacity``."""

    name = "arc"

    def __init__(self, capacity: int | None, future: Future | None = None):
        super().__init__(capacity, future)
        self.resident: dict[int, int] = {}  # block -> 1 (in T1) or 2 (in T2)
        self.t1: OrderedDict = OrderedDict()
        self.t2: OrderedDict = OrderedDict()
        self.b1: OrderedDict = OrderedDict()
        self.b2: OrderedDict = OrderedDict()
        self.p = 0.0

    def update(self, blocks: Sequence[int]) -> None:
        where, t1, t2, b1, b2 = self.resident, self.t1, self.t2, self.b1, self.b2
        c = self.capacity
        for x in blocks:
            w = where.get(x)
            if w is None:
                if x in b1:
                    self.p = min(c, self.p + max(len(b2) / len(b1), 1.0))
                    del b1[x]
                elif x in b2:
                    self.p = max(0.0, self.p - max(len(b1) / len(b2), 1.0))
                    del b2[x]
                else:
                    t1[x] = None
                    where[x] = 1
                    continue
            elif w == 2:
                t2.move_to_end(x)
                continue
            else:
                del t1[x]
            t2[x] = None
            where[x] = 2
        if c is None or len(where) <= c:
            return
        p = self.p
        for _ in range(len(where) - c):
            if t1 and (len(t1) > p or not t2):
                y = t1.popitem(last=False)[0]
                b1[y] = None
            else:
                y = t2.popitem(last=False)[0]
                b2[y] = None
            del where[y]
        for _ in range(len(t1) + len(b1) - c):
            b1.popitem(last=False)
        for _ in range(len(where) + len(b1) + len(b2) - 2 * c):
            b2.popitem(last=False)


class S3FIFO(Policy):
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO (10% of the capacity) admits new blocks; one
    touched again while there moves to the main FIFO, else it leaves and its id enters a ghost FIFO
    (as many ids as the main FIFO's share). A block found in the ghost enters main directly. Main
    is a FIFO with reinsertion: a block with a touch count above 0 (capped at 3) goes back in with
    one less. While over capacity, evict from small if it holds at least 10% (or main is empty),
    else from main."""

    name = "s3fifo"

    def __init__(self, capacity: int | None, future: Future | None = None):
        super().__init__(capacity, future)
        self.resident: dict[int, int] = {}  # block -> touch count, 0..3
        self.small: OrderedDict = OrderedDict()
        self.main: OrderedDict = OrderedDict()
        self.ghost: OrderedDict = OrderedDict()
        self.small_target = 0.1 * capacity if capacity is not None else 0.0
        self.ghost_size = capacity - int(self.small_target) if capacity is not None else 0

    def update(self, blocks: Sequence[int]) -> None:
        freq, small, main, ghost = self.resident, self.small, self.main, self.ghost
        for x in blocks:
            f = freq.get(x)
            if f is None:
                freq[x] = 0
                if x in ghost:
                    del ghost[x]
                    main[x] = None
                else:
                    small[x] = None
            elif f < 3:
                freq[x] = f + 1
        c = self.capacity
        if c is None:
            return
        small_target, main_share, ghost_size = self.small_target, c - self.small_target, self.ghost_size
        excess = len(freq) - c
        while excess > 0:
            if small and (len(small) >= small_target or not main):
                # Small's oldest: to main if touched again, else out (its id to the ghost).
                while small:
                    y = small.popitem(last=False)[0]
                    if freq[y]:
                        freq[y] = 0
                        main[y] = None
                        if len(main) > main_share:
                            break  # main is over its share: evict from it next
                    else:
                        del freq[y]
                        excess -= 1
                        ghost[y] = None
                        if len(ghost) > ghost_size:
                            ghost.popitem(last=False)
                        break
            else:
                # Main's oldest: back in with one touch less, until one with none goes.
                while main:
                    y = main.popitem(last=False)[0]
                    f = freq[y]
                    if f:
                        freq[y] = f - 1
                        main[y] = None
                    else:
                        del freq[y]
                        excess -= 1
                        break


class Belady(Policy):
    """Belady's MIN: evicts the block whose next use is furthest in the future (those never used
    again first, in any order); among equal next uses, the deepest block, so the blocks that will
    be looked up stay prefix-closed and every one of them that is resident is hit. With the whole future known it is the most hit blocks any policy can get:
    the upper bound the others are measured against.

    ``simulate`` encodes the priority of each touch as ``(next_use * depths + depth) * n_ids + block``.
    """

    name = "belady"
    needs_future = True

    def __init__(self, capacity: int | None, future: Future | None = None):
        super().__init__(capacity, future)
        if future is None:
            raise ValueError("belady needs the trace's future (next uses)")
        self.priorities, self.n_ids = future.priorities, future.n_ids
        self.cursor = 0
        self.resident: dict[int, int] = {}  # block -> its current priority
        self.heap: list[int] = []  # negated priorities, some stale (lazy deletion)
        self.dead: list[int] = []  # priorities of resident blocks that are never used again
        self.never = future.never

    def update(self, blocks: Sequence[int]) -> None:
        resident, heap, dead = self.resident, self.heap, self.dead
        i = self.cursor
        self.cursor = i + len(blocks)
        prios = self.priorities[i : self.cursor]
        if self.capacity is None:
            for x, prio in zip(blocks, prios):
                resident[x] = prio
            return
        push, never = heapq.heappush, self.never
        for x, prio in zip(blocks, prios):
            resident[x] = prio
            if prio >= never:
                dead.append(prio)
            else:
                push(heap, -prio)
        excess = len(resident) - self.capacity
        if excess <= 0:
            return
        # Blocks no request uses again go first, in any order: none of them can be hit again, so
        # which of them go changes no hit; a stack saves them the heap.
        if dead:
            while excess > 0 and dead:
                del resident[dead.pop() % self.n_ids]
                excess -= 1
        pop, n = heapq.heappop, self.n_ids
        while excess > 0:
            prio = -pop(heap)
            x = prio % n
            if resident.get(x) == prio:
                del resident[x]
                excess -= 1
        if len(heap) > 4 * len(resident) + 4096:  # drop the stale entries
            self.heap = [-p for p in resident.values() if p < never]
            heapq.heapify(self.heap)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, ARC, S3FIFO, Belady)}
