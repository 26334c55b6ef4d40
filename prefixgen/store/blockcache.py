"""An LRU of per-block KV tensors in device memory, bounded in bytes.

Used by the build (recent blocks reused as past) and by the server (hot prefixes stay on the
GPU, so a shared system prompt is read from disk once, not per request).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from prefixgen.format import BlockHash


class BlockCache:
    """Least-recently-used block KV, ``[B, L, 2, H, D]`` per block, at most ``budget`` bytes.

    Eviction: when a put goes over the budget, the least recently used blocks (by get or put)
    are dropped until it fits. A budget of 0 keeps nothing.

    Example:
        >>> cache = BlockCache(budget=1 << 20)
        >>> cache.put(BlockHash(b"k" * 32), torch.zeros(16, 2, 2, 1, 8))
        >>> cache.get(BlockHash(b"k" * 32)).shape
        torch.Size([16, 2, 2, 1, 8])
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._blocks: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: BlockHash) -> bool:
        return key in self._blocks

    def get(self, key: BlockHash) -> torch.Tensor | None:
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def put(self, key: BlockHash, block: torch.Tensor) -> None:
        if block.nbytes > self.budget:
            return
        old = self._blocks.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._blocks[key] = block
        self.bytes += block.nbytes
        while self.bytes > self.budget:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.nbytes

    def put_run(self, keys: list[BlockHash], kv: torch.Tensor) -> None:
        """Put consecutive blocks from ``kv`` [len(keys)*B, L, 2, H, D], each copied into its own
        memory so the (larger) tensor they came from can be freed."""
        if not keys:
            return
        blocks = kv.reshape(len(keys), -1, *kv.shape[1:]).clone()
        for key, block in zip(keys, blocks.unbind(0)):
            self.put(key, block)
