"""PrefixStore reads from several threads at once give each thread its own prefix's KV."""

from __future__ import annotations

import threading

import pytest
import torch

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import write_jsonl


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned staging ring is used for CUDA reads only")
def test_concurrent_cuda_reads_do_not_share_a_staging_buffer(tmp_path, stories):
    rows = [
        {"text": f"Story {i}: once upon a time a {w} went to the park number {i} and played all day long."}
        for i, w in enumerate(["cat", "dog", "owl", "fox"] * 4)
    ]
    out = tmp_path / "store"
    build(
        BuildConfig(
            dataset=str(write_jsonl(tmp_path / "s.jsonl", rows)),
            model=str(stories),
            out=str(out),
            device="cpu",
            dtype="float32",
            quiet=True,
        )
    )
    store = PrefixStore.open(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories)
    prompts = [tok(r["text"]).input_ids for r in rows]
    expected = [store.read_locations(store.find_prefix(store.keys(ids)).locations) for ids in prompts]  # CPU: no ring
    errors = []

    def reader(start: int) -> None:
        for it in range(50):
            i = (start + it) % len(prompts)
            got = store.read_locations(store.find_prefix(store.keys(prompts[i])).locations, device="cuda")
            if not torch.equal(got.cpu(), expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
