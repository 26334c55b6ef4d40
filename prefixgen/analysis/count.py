"""Block counts and the rule that chooses what to store from them.

A block's value is the number of records that contain it: each of them saves the block's prefill.
``select_blocks`` is the one selection rule, shared by ``build --min-records/--max-bytes``,
``analyze``, ``simulate --warmup``, ``prune`` and distributed routing.
"""

from __future__ import annotations

import numpy as np


def select_blocks(
    records: np.ndarray,
    depth: np.ndarray,
    *,
    min_records: int = 1,
    max_blocks: int | None = None,
    tiebreak: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the blocks to store, best first: those in at least ``min_records`` records, ranked by
    record count (more first), then depth (shallower first), then ``tiebreak`` (e.g. ``key64``, so the
    choice is deterministic), cut to ``max_blocks``.

    The choice is prefix-closed: a block is never in more records than its parent and is one deeper, so
    its parent ranks strictly before it, and every prefix of the ranking holds each chosen block's parent.

    Args:
        records: [n] records containing each block.
        depth: [n] position of each block in its chain (0 for a record's first block).
        tiebreak: [n] optional last sort key.

    Example:
        >>> select_blocks(np.array([3, 1, 3, 2]), np.array([1, 2, 0, 1]), min_records=2).tolist()
        [2, 0, 3]
        >>> select_blocks(np.array([3, 1, 3, 2]), np.array([1, 2, 0, 1]), max_blocks=1).tolist()
        [2]
    """
    records = np.asarray(records)
    depth = np.asarray(depth)
    if min_records < 1:
        raise ValueError(f"min_records must be at least 1, got {min_records}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be non-negative, got {max_blocks}")
    keys = (depth, -records.astype(np.int64)) if tiebreak is None else (tiebreak, depth, -records.astype(np.int64))
    order = np.lexsort(keys)  # the last key is the primary one
    order = order[records[order] >= min_records]
    return order if max_blocks is None else order[:max_blocks]
