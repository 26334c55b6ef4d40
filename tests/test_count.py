"""The block counter and the selection rule: exact counts in bounded memory, prefix-closed choices."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prefixgen.analysis.count import BlockCounter, count_records, key_columns, select_blocks
from prefixgen.format import block_keys, root_key

ROOT = root_key("00" * 32)


def _records(n: int, seed: int = 0) -> list[list[int]]:
    """Token records sharing prefixes of several lengths (a tree of templates), plus unique tails."""
    rng = random.Random(seed)
    heads = [[rng.randrange(512) for _ in range(rng.choice([16, 48, 80]))] for _ in range(5)]
    return [
        rng.choice(heads)[: rng.choice([16, 32, 48, 80])] + [rng.randrange(512) for _ in range(rng.randrange(0, 70))]
        for _ in range(n)
    ]


def _dict_counts(key_lists: list[list[bytes]]) -> dict[bytes, tuple[int, int]]:
    """The obvious count: a dict of full keys -> (records, depth)."""
    out: dict[bytes, tuple[int, int]] = {}
    for keys in key_lists:
        for depth, key in enumerate(keys):
            out[key] = (out.get(key, (0, depth))[0] + 1, depth)
    return out


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_counts_equal_a_dict_of_full_keys(chunk):
    key_lists = [block_keys(ids, 16, ROOT) for ids in _records(400)]
    want = _dict_counts(key_lists)
    counter = BlockCounter(chunk=chunk)  # chunk 7: dozens of merges into the table
    for keys in key_lists:
        counter.add(keys)
    counts = counter.result()
    assert counter.records == 400 and counter.blocks == sum(map(len, key_lists))
    assert len(counts) == len(want)
    assert np.all(np.diff(counts.key64.astype(np.float64)) >= 0)  # sorted by key64
    rows = counts.find(key_columns(list(want)))
    assert (rows >= 0).all() and len(set(rows.tolist())) == len(want)
    assert counts.records[rows].tolist() == [r for r, _ in want.values()]
    assert counts.depth[rows].tolist() == [d for _, d in want.values()]
    assert counts.find(key_columns([bytes(32)])).tolist() == [-1]


def test_counting_goes_on_after_a_result_across_runs_of_every_size():
    """Runs of many sizes are pending when result() is asked mid-way; counting then goes on."""
    key_lists = [block_keys(ids, 16, ROOT) for ids in _records(400, seed=3)]
    counter = BlockCounter(chunk=5)
    for i, keys in enumerate(key_lists):
        counter.add(keys)
        if i in (0, 57, 250):
            mid = counter.result()
            want = _dict_counts(key_lists[: i + 1])
            assert len(mid) == len(want) and mid.records[mid.find(key_columns(list(want)))].tolist() == [
                r for r, _ in want.values()
            ]
    counts, want = counter.result(), _dict_counts(key_lists)
    assert len(counts) == len(want) and counts.records[counts.find(key_columns(list(want)))].tolist() == [
        r for r, _ in want.values()
    ]
    assert counts.depth[counts.find(key_columns(list(want)))].tolist() == [d for _, d in want.values()]


def test_keys_with_equal_key64_are_told_apart():
    """Different keys whose first 8 bytes agree are counted apart, across merges, in either order."""
    same = bytes(range(8))
    a, b, c = same + b"\x01" * 24, same + b"\x02" * 24, same + b"\x00" * 24
    counts = count_records([[b], [a], [b], [c], [a], [b]], chunk=1)
    rows = counts.find(key_columns([a, b, c]))
    assert counts.records[rows].tolist() == [2, 3, 1]
    assert len(counts) == 3 and np.all(np.diff(counts.check64[counts.key64 == counts.key64[0]].astype(np.float64)) > 0)


def test_selection_is_prefix_closed_and_ranked_by_count_then_depth():
    key_lists = [block_keys(ids, 16, ROOT) for ids in _records(300, seed=1)]
    counts = count_records(key_lists, chunk=50)
    parent = {}
    for keys in key_lists:
        for prev, key in zip([None] + keys[:-1], keys):
            parent[key] = prev
    row_of = dict(zip(parent, counts.find(key_columns(list(parent))).tolist()))
    key_of = {r: k for k, r in row_of.items()}
    for n in (1, 5, 17, 60, len(counts)):
        chosen = counts.select(max_blocks=n)
        assert len(chosen) == min(n, len(counts))
        chosen_set = set(chosen.tolist())
        for r in chosen_set:  # prefix-closed: every stored block's parent is stored
            p = parent[key_of[r]]
            assert p is None or row_of[p] in chosen_set
        ranks = list(zip(-counts.records[chosen].astype(int), counts.depth[chosen], counts.key64[chosen]))
        assert ranks == sorted(ranks)  # count desc, then depth, then key64
        left = np.setdiff1d(np.arange(len(counts)), chosen)
        if len(left):  # nothing left out outranks what was chosen
            assert counts.records[left].max() <= counts.records[chosen].min()
    shared = counts.select(min_records=2)
    assert set(shared.tolist()) == set(np.flatnonzero(counts.records >= 2).tolist())


def test_select_blocks_refuses_bad_arguments():
    with pytest.raises(ValueError, match="min_records"):
        select_blocks(np.array([1]), np.array([0]), min_records=0)
    with pytest.raises(ValueError, match="max_blocks"):
        select_blocks(np.array([1]), np.array([0]), max_blocks=-1)
