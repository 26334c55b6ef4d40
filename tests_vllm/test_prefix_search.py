"""The scheduler's prefix search (``stored_prefix``): the same longest stored prefix as hashing every block,
found by hashing in growing runs that stop at the first miss (a cold prompt costs one SHA-256, not one per block)."""

from __future__ import annotations

import pytest

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.integrations.vllm import stored_prefix
from prefixgen.model import load_tokenizer

from .conftest import tiny_model, write_jsonl

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
RECORDS = [SYSTEM + f"Story {i}: once upon a time, a {thing} sat in the park." for i, thing in enumerate(["cat", "dog"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    model = tiny_model(tmp / "qwen2")
    data = write_jsonl(tmp / "text.jsonl", [{"text": r} for r in RECORDS])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(tmp / "store"), device="cpu", quiet=True))
    return PrefixStore.open(tmp / "store"), load_tokenizer(str(model))


def test_same_prefix_as_hashing_every_block(setup):
    store, tokenizer = setup
    ids = tokenizer(RECORDS[1] + " Then the dog ran home to its mother and slept.").input_ids
    # every cut: a miss at each position of the growing runs (blocks 1, 2-3, 4-7, 8-15, 16-...)
    for end in range(0, len(ids) + 1, 5):
        locations, hashed = stored_prefix(store, ids[:end])
        assert locations == store.find_prefix(store.keys(ids[:end])).locations
        assert hashed <= 2 * len(locations) + 1
    assert len(stored_prefix(store, ids)[0]) == len(tokenizer(RECORDS[1]).input_ids) // store.block_size >= 17


def test_cold_long_prompt_hashes_one_block(setup):
    store, _ = setup
    ids = [7, 3, 9, 1] * 32 * 1024  # 128k tokens, 8k blocks, none stored
    assert stored_prefix(store, ids) == ([], 1)
    assert stored_prefix(store, []) == ([], 0)
