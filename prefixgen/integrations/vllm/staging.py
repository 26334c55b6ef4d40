"""The worker side's read buffers: host buffers pieces of stored blocks are read into, reused (pinned on CUDA, where
the device copies straight out of them), and the copy of a piece to the device."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class Staging:
    """A host buffer pieces are read into, and (CUDA) the events of the device copies still reading out of it."""

    tensor: torch.Tensor  # [staging bytes] uint8, pinned on CUDA
    events: list = field(default_factory=list)


class StagingPool:
    """Read buffers of ``nbytes``, reused: a new buffer's pages are mapped and zeroed on first touch, which costs more
    than the read itself (a 4,096-token piece of small-llama: ~50 ms of page faults against ~8 ms to copy into mapped
    pages), and pinning one costs more still. On CUDA they are pinned, so the device copies straight out of them
    (asynchronously, on the load stream): a piece is never copied into another host tensor. Up to ``keep`` free
    buffers are kept; when all are in use (a thread stuck in a read that hangs holds one) another is made, never
    waited for, so no load waits for another's read."""

    def __init__(self, nbytes: int, keep: int, pinned: bool):
        self.nbytes, self.keep, self.pinned = nbytes, keep, pinned
        self._free: list[Staging] = []
        self._lock = threading.Lock()
        self.made = 0  # buffers allocated so far

    def acquire(self) -> Staging:
        """A buffer no read and no device copy uses."""
        with self._lock:
            staging = self._free.pop() if self._free else None
            if staging is None:
                self.made += 1
        if staging is None:
            staging = Staging(torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pinned))
        for event in staging.events:  # CUDA: the copies out of it launched by the last piece (done by now, mostly)
            event.synchronize()
        staging.events.clear()
        return staging

    def release(self, staging: Staging, event: Any = None) -> None:
        """``staging`` is free once ``event`` (CUDA: the last device copy out of it), if any, has passed."""
        if event is not None:
            staging.events.append(event)
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(staging)


def upload(kv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``kv`` (a view of a host buffer: this rank's heads and layers of a piece, strided) on ``device`` with the same
    shape and strides, copied without blocking on the current stream: the one span of host memory the view covers is
    copied as it lies, straight from the (pinned) buffer, never gathered into another host tensor first (a strided
    source would be, synchronously, by ``Tensor.to``). The buffer must stay untouched until the copy is done."""
    if kv.is_contiguous():
        return kv.to(device, non_blocking=True)
    span = 1 + sum((n - 1) * stride for n, stride in zip(kv.shape, kv.stride()))  # elements from its first to its last
    flat = kv.as_strided((span,), (1,))  # [span] from kv's first element (the same storage offset)
    return flat.to(device, non_blocking=True).as_strided(kv.shape, kv.stride(), 0)
