"""One load on a worker: the record its load thread and the engine thread share (the engine gives it up at its
deadline), and the wait for its last piece's device write."""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from prefixgen.integrations.vllm.metadata import LoadSpec


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


def wait_copies(loading: Loading) -> None:
    """CUDA: wait until the last piece ``loading`` launched is written (nothing to wait for on CPU). Called holding its lock."""
    if loading.pending is not None:
        pending, loading.pending = loading.pending, None
        pending.synchronize()
