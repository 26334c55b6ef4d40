"""The selection step of ``build --min-records K --max-bytes SIZE``: store only the blocks worth storing.

Two passes over the dataset. The count pass (CPU, :func:`choose_blocks`) counts how many records
contain each block, with the same counter and the same rule as ``analyze``
(:meth:`BlockCounts.select`). The build pass then cuts each tokenized record to its chosen blocks
(:func:`cut_to_selection`) before the planner sees it, so a record's unchosen tail is never hashed
into the plan, prefilled or written. The choice is prefix-closed (a block is never in more records
than its parent, and ranks after it), so the chosen blocks of a record are always a prefix of it.

    records -> tokenize -> cut_to_selection -> plan -> batch -> prefill -> write
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefixgen.analysis.count import BlockCounter, BlockCounts, key_columns, max_blocks
from prefixgen.config import BuildConfig
from prefixgen.data.records import TokenizedRecord
from prefixgen.format import BlockHash, KVLayout, block_keys


@dataclass(slots=True)
class Selection:
    """The blocks chosen to store (rows of the count table, in key order) and why."""

    chosen: BlockCounts
    min_records: int | None
    max_bytes: int | None
    candidate_blocks: int  # distinct blocks of the dataset
    count_seconds: float
    tokenized_tokens: int = 0  # tokens the count pass tokenized

    def record(self) -> dict[str, Any]:
        """The build record's ``selection``."""
        return {
            "min_records": self.min_records,
            "max_bytes": self.max_bytes,
            "selected_blocks": len(self.chosen),
            "candidate_blocks": self.candidate_blocks,
            "count_seconds": round(self.count_seconds, 3),
        }

    def chosen_prefix(self, keys: list[BlockHash]) -> int:
        """How many leading blocks of a record (its chained keys) are chosen.

        Example:
            >>> selection.chosen_prefix(block_keys(ids, 16, root))  # doctest: +SKIP
            6
        """
        if not keys:
            return 0
        missing = np.flatnonzero(self.chosen.find(key_columns(keys)) < 0)
        return int(missing[0]) if len(missing) else len(keys)


def choose_blocks(
    records: Iterable[TokenizedRecord],
    root: BlockHash,
    cfg: BuildConfig,
    layout: KVLayout,
    tick: Callable[[], None] = lambda: None,
) -> Selection:
    """The count pass: count every block of ``records`` (hashed under ``root``) and choose those to store.

    Example:
        >>> sel = choose_blocks(tokenize(read_records(...)), manifest.root_key, cfg, manifest.kv)  # doctest: +SKIP
        >>> sel.record()["selected_blocks"]  # doctest: +SKIP
        42
    """
    started = time.perf_counter()
    max_blocks(cfg, layout)  # refuse a budget under one block before the pass
    counter = BlockCounter()
    for record in records:
        counter.add(block_keys(record.ids, cfg.block_size, root))
        tick()
    return select_counts(counter.result(), cfg, layout, started)


def select_counts(counts: BlockCounts, cfg: BuildConfig, layout: KVLayout, started: float) -> Selection:
    """The blocks to store among ``counts`` (every block of the dataset, with its record count), by
    ``--min-records``/``--max-bytes``; ``started``: when counting began (``time.perf_counter``).
    A distributed build calls it on its count shares summed.

    Example:
        >>> select_counts(counts, cfg, manifest.kv, time.perf_counter()).record()["selected_blocks"]  # doctest: +SKIP
        42
    """
    rows = counts.select(min_records=cfg.min_records or 1, max_blocks=max_blocks(cfg, layout))
    return Selection(counts.subset(rows), cfg.min_records, cfg.max_bytes, len(counts), time.perf_counter() - started)


def cut_to_selection(
    records: Iterator[TokenizedRecord], selection: Selection, root: BlockHash, block_size: int
) -> Iterator[TokenizedRecord]:
    """Each record cut to its chosen blocks (possibly none): the build pass's view of the dataset.

    Example:
        >>> [len(r.ids) for r in cut_to_selection(iter(tokenized), selection, root, 16)]  # doctest: +SKIP
        [64, 64, 0]
    """
    for record in records:
        n = selection.chosen_prefix(block_keys(record.ids, block_size, root))
        yield TokenizedRecord(record.index, record.ids[: n * block_size], tuple(e for e in record.ends if e <= n * block_size))
