"""Loads that do not line up with vLLM's blocks, in real engines with vLLM block sizes 32 and 128 (vLLM's CPU
attention takes multiples of 32 only: CUDA's default of 16 cannot run here; 32 is the smallest it runs).

The store's blocks are 48 tokens, a multiple of neither: with vLLM's own prefix caching on, a request that
shares the start of an earlier one gets vLLM's block-aligned hit first, and the connector loads from there,
which lies inside a store block (16 tokens into it). A prompt whose length is a multiple of every
block size and is stored whole still gets its last block computed by vLLM. A request with a cache_salt loads
nothing. Each output equals plain vLLM's (no connector, no prefix caching), token for token.
"""

from __future__ import annotations

import pytest

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.model import load_tokenizer

from .conftest import run_vllm, tiny_model, write_jsonl

STORE_BLOCK = 48
SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
STORIES = [
    SYSTEM + f"Story {i}: once upon a time, {name} found a {thing} in the park."
    for i, (name, thing) in enumerate([("Lily", "ball"), ("Tom", "cat"), ("Mia", "tree")])
]
LONG = SYSTEM * 2 + "Story 3: once upon a time, Ben found a boat in the park."
WHOLE = 384  # tokens of the whole-stored prompt: 8 store blocks, 12 vLLM blocks of 32, 3 of 128


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models") / "qwen2")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("store48")
    data = write_jsonl(tmp / "text.jsonl", [{"text": t} for t in [*STORIES, LONG]])
    out = tmp / "store"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(out), device="cpu", quiet=True, block_size=STORE_BLOCK))
    return out


@pytest.fixture(scope="module")
def prompts(model):
    """A: a stored record and new text; B: another record, sharing A's start up to the story; P: 384 tokens of a
    record, stored whole (as token ids); C: A again with a cache_salt."""
    whole = load_tokenizer(str(model))(LONG).input_ids[:WHOLE]
    a = STORIES[1] + " Then she"
    return [a, STORIES[2] + " Then he", {"prompt_token_ids": whole}, {"prompt": a, "cache_salt": "user-42"}]


@pytest.fixture(scope="module")
def baseline(model, prompts):
    return run_vllm(model, prompts[:3])


@pytest.fixture(scope="module", params=[32, 128])
def with_store(request, model, store, prompts):
    return request.param, run_vllm(model, prompts, store=store, prefix_caching=True, block_size=request.param)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_outputs_equal_plain_vllm(baseline, with_store):
    _, run = with_store
    assert run.prompt_ids[:3] == baseline.prompt_ids
    assert run.outputs[:3] == baseline.outputs
    assert run.outputs[3] == baseline.outputs[0]  # the salted request: same prompt, computed by vLLM


def test_load_starting_inside_a_store_block(baseline, with_store, store):
    """B's load starts at vLLM's hit on A's blocks, which is not a multiple of the store's 48-token blocks."""
    vllm_block, run = with_store
    a, b = baseline.prompt_ids[:2]
    stored = PrefixStore.open(store).match(b[:-1])
    hit = common_prefix(a, b) // vllm_block * vllm_block  # vLLM's own hit: A's whole blocks that B shares
    assert hit % STORE_BLOCK != 0 and hit < stored  # the case under test: the load starts inside a store block
    assert run.loaded[1] == stored - hit
    assert run.cached[1] == stored


def test_whole_stored_prompt_leaves_its_last_block_to_vllm(baseline, with_store, store):
    vllm_block, run = with_store
    ids = baseline.prompt_ids[2]
    assert len(ids) == WHOLE and WHOLE % STORE_BLOCK == 0 and WHOLE % vllm_block == 0
    assert PrefixStore.open(store).match(ids) == WHOLE  # stored whole
    assert run.cached[2] == WHOLE - STORE_BLOCK  # all but the last store block: vLLM computes the last token
    hit = common_prefix(baseline.prompt_ids[0], ids) // vllm_block * vllm_block
    assert run.loaded[2] == WHOLE - STORE_BLOCK - hit


def test_cache_salt_request_loads_nothing(with_store):
    _, run = with_store
    assert run.loaded[0] > 0 and run.cached[0] > 0  # the same prompt without a salt is loaded
    assert run.loaded[3] == 0 and run.cached[3] == 0
