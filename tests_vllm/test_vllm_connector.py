"""PrefixgenConnector in a real vLLM engine: same greedy tokens as without it, stored tokens counted as
cached, the stored KV really used (negative control), other weights refused, corrupt blocks recomputed,
chat requests hitting their stored conversation."""

from __future__ import annotations

import numpy as np
import pytest

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.integrations.vllm import kv_head_range, slot_mapping

from .conftest import copy_store, corrupt_block, rewrite_kv, run_vllm, tiny_model, write_jsonl

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
STORIES = [
    f"Story {i}: once upon a time, {name} found a {thing} in the park."
    for i, (name, thing) in enumerate([("Lily", "ball"), ("Tom", "cat"), ("Mia", "tree"), ("Ben", "boat")])
]
PROMPTS = [
    SYSTEM + STORIES[1] + " Then she",  # the stored record, then new text
    SYSTEM + "Story 9: a new story about a dog.",  # only the shared system prompt is stored
    SYSTEM + STORIES[2],  # a stored record verbatim: all but its last token can come from the store
    "The sun was hot.",  # nothing stored
]
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Tell me a story about a cat."},
    {"role": "assistant", "content": "Once upon a time, a cat sat on a mat. The cat was happy."},
    {"role": "user", "content": "And then what happened?"},
]
CHATS = [CHAT, CHAT[:2]]  # the stored conversation, and its first turn (a stored prefix of it)


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models") / "qwen2")


@pytest.fixture(scope="session")
def store(tmp_path_factory, model):
    """Text records sharing a long system prompt, then (appended) one chat, as `prefixgen build` writes them."""
    tmp = tmp_path_factory.mktemp("store")
    text = write_jsonl(tmp / "text.jsonl", [{"text": SYSTEM + s} for s in STORIES])
    chats = write_jsonl(tmp / "chats.jsonl", [{"messages": CHAT}])
    out = tmp / "store"
    build(BuildConfig(dataset=str(text), model=str(model), out=str(out), device="cpu", quiet=True))
    build(
        BuildConfig(
            dataset=str(chats), model=str(model), out=str(out), device="cpu", quiet=True, messages_field="messages", append=True
        )
    )
    return out


@pytest.fixture(scope="session")
def baseline(model):
    return run_vllm(model, PROMPTS, CHATS)


@pytest.fixture(scope="session")
def with_store(model, store):
    return run_vllm(model, PROMPTS, CHATS, store=store)


def stored_prefix(store, ids) -> int:
    return PrefixStore.open(store).match(ids[:-1])


def test_same_tokens_and_stored_prefix_cached(baseline, with_store, store):
    assert with_store.prompt_ids == baseline.prompt_ids
    assert with_store.outputs == baseline.outputs  # token for token
    stored = [stored_prefix(store, ids) for ids in baseline.prompt_ids]
    assert all(n >= 256 for n in stored[:3]) and stored[3] == 0  # the shared system prompt: 17 blocks
    for n, cached in zip(stored, with_store.cached):
        assert cached >= n
    assert baseline.cached == [0] * len(baseline.cached)  # vLLM's own prefix caching is off
    assert sum(with_store.loaded[: len(stored)]) == sum(stored)  # each prompt's call (the warm-up computed its own)


def test_whole_stored_record_leaves_one_token(baseline, store):
    ids = baseline.prompt_ids[2]
    assert PrefixStore.open(store).match(ids) == len(ids) // 16 * 16
    assert stored_prefix(store, ids) == (len(ids) - 1) // 16 * 16


def test_chat_hits_its_stored_conversation(baseline, with_store, store):
    """vLLM's chat rendering gives the ids prefixgen stored for the conversation, so every block hits."""
    whole, first_turn = len(PROMPTS), len(PROMPTS) + 1
    ids = baseline.prompt_ids[whole]
    assert stored_prefix(store, ids) == (len(ids) - 1) // 16 * 16  # the stored conversation, all of it
    assert stored_prefix(store, baseline.prompt_ids[first_turn]) >= 256  # its first turn: a stored prefix
    for i in (whole, first_turn):
        assert with_store.cached[i] >= stored_prefix(store, baseline.prompt_ids[i])


def test_vllm_prefix_cache_hits_come_first(model, store, baseline):
    """With vLLM's own prefix caching on, a repeated prompt is served from vLLM's cache first and the connector
    loads only the stored tokens beyond vLLM's block-aligned hit (128-token blocks on CPU); same tokens."""
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    run = run_vllm(model, prompts, store=store, prefix_caching=True)
    assert run.outputs == [baseline.outputs[0], baseline.outputs[0], baseline.outputs[2]]
    first, again, other = (stored_prefix(store, ids) for ids in run.prompt_ids)
    assert run.cached[0] >= first and run.cached[1] >= first and run.cached[2] >= other
    assert run.stats.tokens <= first + (again - again // 128 * 128) + other < first + again + other


def negate_blocks(store, ids, first: int) -> None:
    """Negate the stored KV of blocks ``first`` onwards of the prefix of ``ids`` (checksums rewritten: valid)."""
    s = PrefixStore.open(store)
    slots = [loc.slot for loc in s.find_prefix(s.keys(ids)).locations[first:]]
    row = s.block_size * s.manifest.kv.values_per_token

    def change(kv):
        blocks = kv.reshape(-1, row).copy()
        blocks[slots] = -blocks[slots]
        return blocks.reshape(kv.shape)

    rewrite_kv(store, change)


def test_kv_is_used_not_recomputed(tmp_path, model, store, baseline):
    """Negative control: the same keys holding other KV (checksums valid) change the output. Only the blocks of
    PROMPTS[0]'s own record are changed: the live check, made on PROMPTS[1] (the shared system prompt), passes."""
    other = copy_store(store, tmp_path / "other")
    shared = stored_prefix(store, baseline.prompt_ids[1]) // 16
    negate_blocks(other, baseline.prompt_ids[0], shared)
    run = run_vllm(model, [PROMPTS[1], PROMPTS[0]], store=other)
    assert run.claims.checks_passed == 1 and run.claims.checks_failed == 0
    assert run.cached[1] >= stored_prefix(store, baseline.prompt_ids[0]) > shared * 16
    assert run.outputs[1] != baseline.outputs[0]


def test_store_of_other_kv_is_never_loaded(tmp_path, model, store, baseline):
    """The live check: a store whose KV is not what vLLM computes (here negated, checksums valid, so no
    start-time check can see it) fails the first check; nothing is loaded, vLLM's own tokens come out."""
    other = copy_store(store, tmp_path / "other")
    rewrite_kv(other, lambda kv: -kv)
    run = run_vllm(model, PROMPTS[:3], store=other)
    assert run.outputs == baseline.outputs[:3]
    assert run.loaded == [0, 0, 0] and run.stats.tokens == 0
    assert run.claims.checks_failed == 1 and run.claims.checks_passed == 0


def test_fp8_store_is_dequantized_into_the_cache(tmp_path, model, baseline):
    """An fp8 store (`--kv-dtype fp8`) loads: its KV goes into vLLM's float32 cache, scaled back."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": SYSTEM + s} for s in STORIES])
    out = tmp_path / "fp8"
    build(BuildConfig(dataset=str(data), model=str(model), out=str(out), device="cpu", quiet=True, kv_dtype="fp8"))
    assert PrefixStore.open(out).manifest.kv.storage == "fp8"
    run = run_vllm(model, PROMPTS[:1], store=out)
    stored = stored_prefix(out, baseline.prompt_ids[0])
    assert run.cached[0] >= stored > 0 and run.stats.tokens == stored
    kv = PrefixStore.open(out).manifest.kv
    assert run.stats.bytes == stored * kv.num_layers * 2 * kv.num_kv_heads * kv.head_dim * 4  # float32 written


def test_corrupt_block_is_recomputed(tmp_path, model, store, baseline, caplog):
    bad = copy_store(store, tmp_path / "bad")
    ids = baseline.prompt_ids[0]
    corrupt_block(bad, ids, 10)  # tokens 160-175: in vLLM's second 128-token block
    corrupt_block(bad, ids, 17)  # tokens 272-287: in its third
    run = run_vllm(model, PROMPTS[:2], store=bad)
    assert run.outputs == baseline.outputs[:2]
    assert run.stats.corrupt_blocks >= 1
    # what was written stops before the first bad block; vLLM recomputed the rest
    assert run.stats.tokens <= 10 * 16 + stored_prefix(store, baseline.prompt_ids[1])


def test_store_of_other_weights_is_refused(tmp_path, store):
    other_model = tiny_model(tmp_path / "other-model", seed=1)
    with pytest.raises(Exception, match="weights_digest") as info:
        run_vllm(other_model, PROMPTS[:1], store=store)
    assert "tokenizer_digest" not in str(info.value)  # only what differs is named


def test_kv_head_range_splits_like_vllm():
    """Each rank's KV heads, as QKVParallelLinear shards them (TP>1 is not run end to end here)."""
    assert [kv_head_range(8, 1, 0)] == [range(0, 8)]
    assert [kv_head_range(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    for total in (1, 2, 4, 8):
        for tp in (1, 2, 4, 8):
            if max(total, tp) % min(total, tp):
                continue
            heads = [h for r in range(tp) for h in kv_head_range(total, tp, r)]
            assert sorted(set(heads)) == list(range(total))  # every head on some rank
            assert len(heads) == max(total, tp)  # replicated only when there are fewer heads than ranks


def test_slot_mapping_crosses_blocks():
    slots = slot_mapping([5, 2, 9], 4, 3, 9)
    assert slots.tolist() == [23, 8, 9, 10, 11, 36]
    assert np.all(np.diff(slots.numpy()[1:5]) == 1)
