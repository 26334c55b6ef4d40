"""BlockCache: eviction order (a chain's end goes first) and the bytes its tensors keep alive."""

from __future__ import annotations

import random

import torch

from prefixgen import BuildConfig, build
from prefixgen.format import BlockHash
from prefixgen.integrations.serve import Engine, ServeConfig
from prefixgen.store.blockcache import BlockCache
from prefixgen.store.reader import PrefixStore

from .conftest import write_jsonl

BLOCK = (16, 2, 2, 1, 8)  # [B, L, 2, H, D]
BLOCK_BYTES = 16 * 2 * 2 * 1 * 8 * 4  # float32


def _key(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(32, "little"))


def _kept_alive(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``: what they really keep in memory."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_least_recently_used_blocks_are_evicted_and_a_budget_of_zero_keeps_nothing():
    cache = BlockCache(budget=3 * BLOCK_BYTES)
    for i in range(3):
        cache.put(_key(i), torch.full(BLOCK, float(i)))
    assert cache.get(_key(0)) is not None  # 0 is now the most recent; 1 the least
    cache.put(_key(3), torch.full(BLOCK, 3.0))
    assert _key(1) not in cache and [k in cache for k in map(_key, (0, 2, 3))] == [True] * 3
    assert cache.bytes == 3 * BLOCK_BYTES and len(cache) == 3
    assert torch.equal(cache.get(_key(2)), torch.full(BLOCK, 2.0))
    empty = BlockCache(budget=0)
    empty.put(_key(0), torch.zeros(BLOCK))
    empty.put_run([_key(1), _key(2)], torch.zeros(32, *BLOCK[1:]))
    assert len(empty) == 0 and empty.bytes == 0


def test_a_chain_is_evicted_from_its_end():
    n = 6
    cache = BlockCache(budget=int(1.5 * n) * BLOCK_BYTES)
    a, b = [_key(i) for i in range(n)], [_key(100 + i) for i in range(n)]
    cache.put_run(a, torch.randn(n * 16, *BLOCK[1:]))
    cache.put_run(b, torch.randn(n * 16, *BLOCK[1:]))
    # b is whole; of a, the first blocks are left (a prefix is useless without its first block).
    assert all(k in cache for k in b)
    assert [k in cache for k in a] == [True] * 3 + [False] * 3
    # a comes back: its first blocks are touched with it, so b loses its end, not its start.
    cache.put_run(a[3:], torch.randn(3 * 16, *BLOCK[1:]), prefix=a[:3])
    assert all(k in cache for k in a)
    assert [k in cache for k in b] == [True] * 3 + [False] * 3


def test_bytes_kept_alive_stay_under_the_budget():
    rng = random.Random(0)
    budget = 10 * BLOCK_BYTES + BLOCK_BYTES // 2
    cache = BlockCache(budget)
    keys = [_key(i) for i in range(40)]
    for _ in range(300):
        n = rng.randint(1, 8)
        start = rng.randint(0, len(keys) - n)
        run = torch.randn(n * 16, *BLOCK[1:])  # one tensor: its blocks must not keep it whole
        cache.put_run(keys[start : start + n], run)
        del run
        held = [cache.peek(k) for k in keys if k in cache]
        assert _kept_alive(held) == cache.bytes <= budget
    cache.put(_key(99), torch.randn(4 * 16, *BLOCK[1:])[16:32])  # a view of a larger tensor
    assert _kept_alive([cache.peek(k) for k in [*keys, _key(99)] if k in cache]) <= budget


def test_alternating_prefixes_keep_their_first_blocks_on_the_device(tmp_path, stories):
    """With room for 1.5 prefixes, two long prefixes asked in turn: each request finds the first
    half of its prefix on the device and reads only the rest from disk."""
    words = "Once upon a time there was a little girl who liked to play in the big green park with her dog. "
    rows = [{"text": f"{name} said: {words * 4}"} for name in ("Lily", "Tom")]
    out = tmp_path / "store"
    build(
        BuildConfig(
            dataset=str(write_jsonl(tmp_path / "two.jsonl", rows)),
            model=str(stories),
            out=str(out),
            device="cpu",
            dtype="float32",
            quiet=True,
        )
    )
    store = PrefixStore.open(out)
    engine = Engine(ServeConfig(store=str(out), model=str(stories), device="cpu", dtype="float32", gpu_cache_bytes=0))
    prompts = [engine.tokenize_text(r["text"]) for r in rows]
    blocks = [store.match(ids[:-1]) // store.block_size for ids in prompts]
    assert min(blocks) >= 8
    block_bytes = store.read_blocks(store.keys(prompts[0])[:1]).nbytes
    engine.hot = BlockCache(int(1.5 * max(blocks)) * block_bytes)
    reads = []
    for turn in range(6):
        ids = prompts[turn % 2]
        before = engine.metrics.disk_tokens
        gen = engine.generate(ids, {"max_tokens": 1, "temperature": 0})
        assert gen.cached_tokens == blocks[turn % 2] * store.block_size
        reads.append((engine.metrics.disk_tokens - before) // store.block_size)
        assert store.keys(ids)[0] in engine.hot  # the prefix's first block stays on the device
    assert reads[:2] == blocks  # cold: all from disk
    for turn, n in enumerate(reads[2:], start=2):
        whole = blocks[turn % 2]
        room = int(1.5 * max(blocks)) - blocks[1 - turn % 2]  # what the other prefix leaves of the budget
        assert n == whole - min(room, whole), reads  # only the part that did not fit is read again
        assert n < whole
