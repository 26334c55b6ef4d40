"""An LRU of per-block KV tensors in device memory, bounded in bytes.

Used by the build (recent blocks reused as past) and by the server (hot prefixes stay on the
GPU, so a shared system prompt is read from disk once, not per request).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from prefixgen.format import BlockHash


class BlockCache:
    """Least-recently-used block KV, ``[B, L, 2, H, D]`` per block, at most ``budget`` bytes.

    Every block owns its memory, so ``bytes`` is what the cache keeps alive. A prefix is only
    usable from its first block on, so a chain is evicted from its end: ``put_run`` and
    ``touch_chain`` make a block at least as recent as every block after it in its chain
    (vLLM frees a request's blocks in reverse order for the same reason). When a put goes over
    the budget, the least recently used blocks are dropped until it fits. A budget of 0 keeps
    nothing.

    Not thread-safe: one user at a time (the server runs one generation at a time).

    Example:
        >>> cache = BlockCache(budget=1 << 20)
        >>> cache.put(BlockHash(b"k" * 32), torch.zeros(16, 2, 2, 1, 8))
        >>> cache.get(BlockHash(b"k" * 32)).shape
        torch.Size([16, 2, 2, 1, 8])
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._blocks: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: BlockHash) -> bool:
        return key in self._blocks

    def get(self, key: BlockHash) -> torch.Tensor | None:
        """The block of ``key`` (made the most recent), or None."""
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def peek(self, key: BlockHash) -> torch.Tensor | None:
        """The block of ``key`` without touching its recency, or None."""
        return self._blocks.get(key)

    def put(self, key: BlockHash, block: torch.Tensor) -> None:
        """Keep ``block`` (copied if it is a view of a larger tensor) as the most recent, then evict."""
        self._insert(key, block)
        self._evict()

    def put_run(self, keys: Sequence[BlockHash], kv: torch.Tensor, prefix: Sequence[BlockHash] = ()) -> None:
        """Put consecutive blocks of one chain from ``kv`` [len(keys)*B, L, 2, H, D], each copied into
        its own memory (so ``kv`` can be freed and eviction frees what it says).

        ``prefix`` are the chain's blocks before ``keys`` that are already here: they are touched too.
        The chain ends up most recent with its first block the most recent of all, and eviction
        runs after that, so it takes other chains' ends, or this chain's end, first (until then the
        new blocks are held beside the old: the budget may be passed by one run for a moment).
        """
        if keys:
            blocks = kv.reshape(len(keys), -1, *kv.shape[1:])  # [n, B, L, 2, H, D]
            for key, block in zip(reversed(keys), reversed(blocks.unbind(0))):
                self._insert(key, block)
        self.touch_chain(prefix)
        self._evict()

    def touch_chain(self, keys: Sequence[BlockHash]) -> None:
        """Make the blocks of chain ``keys`` (those held) the most recent, the first block most of all."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _insert(self, key: BlockHash, block: torch.Tensor) -> None:
        if block.nbytes > self.budget:
            return
        if not block.is_contiguous() or block.untyped_storage().nbytes() != block.nbytes:
            block = block.clone(memory_format=torch.contiguous_format)  # own storage: a view would keep its base alive
        old = self._blocks.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._blocks[key] = block
        self.bytes += block.nbytes

    def _evict(self) -> None:
        while self.bytes > self.budget:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.nbytes
