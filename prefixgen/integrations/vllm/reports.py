"""What a worker's load threads report to its engine thread: the counters, the stored blocks, shards and states
found bad since the last step (for the scheduler), and the faults already logged; one lock guards them all."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prefixgen.integrations.vllm.metadata import PrefixgenWorkerMetadata
from prefixgen.integrations.vllm.metrics import LoadStats


@dataclass(eq=False)
class Reports:
    """Shared by the worker (:class:`~prefixgen.integrations.vllm.worker.PrefixgenWorker`), its load pipeline
    (:mod:`.loader`), store reads (:mod:`.reads`), state writes (:mod:`.states`) and live checks (:mod:`.probes`)."""

    stats: LoadStats = field(default_factory=LoadStats)
    bad: PrefixgenWorkerMetadata = field(default_factory=PrefixgenWorkerMetadata)  # for the scheduler, since the last step
    logged: set[str] = field(default_factory=set)  # what warn_once logged already
    lock: threading.Lock = field(default_factory=threading.Lock)  # the load threads report through what it guards
