"""The vLLM scheduler's prefix search: ``stored_prefix`` (hash and look up in growing runs, stop at the
first miss) against hashing every block of the prompt and then searching (what the connector did before).

    PYTHONPATH=$PWD .venv-vllm/bin/python benchmarks/prefix_search.py

Builds a small store with the repository's stories260K model, then times (best of --repeats) both searches
for a cold prompt (nothing stored) and for a prompt whose stored prefix is hit, at each --tokens length.
Runs in the vLLM venv: ``prefixgen.integrations.vllm`` imports vLLM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, card, write_jsonl

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.integrations.vllm import stored_prefix
from prefixgen.model import load_tokenizer

MODEL = ROOT / "models" / "stories260K"


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 131072])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prefix-search-"))
    text = "Once upon a time, a little girl named Lily went to the park with her dog and her ball. " * 400
    data = write_jsonl(tmp / "d.jsonl", [text])
    build(BuildConfig(dataset=str(data), model=str(MODEL), out=str(tmp / "store"), device="cpu", quiet=True))
    store = PrefixStore.open(tmp / "store")
    stored = load_tokenizer(str(MODEL))(text).input_ids
    for tokens in args.tokens:
        prompts = {
            "cold": ([7, 3, 9, 1] * tokens)[:tokens],  # no block stored
            "hit": (stored * (tokens // len(stored) + 1))[:tokens],  # its stored prefix, then a miss
        }
        for kind, ids in prompts.items():
            every = best_ms(lambda ids=ids: store.find_prefix(store.keys(ids)), args.repeats)
            runs = best_ms(lambda ids=ids: stored_prefix(store, ids), args.repeats)
            locations, hashed = stored_prefix(store, ids)
            row = {
                "bench": "prefix_search",
                "date": dt.date.today().isoformat(),
                "card": card("cpu"),
                "tokens": tokens,
                "prompt": kind,
                "blocks": len(ids) // store.block_size,
                "stored_blocks": len(locations),
                "hashed_blocks": hashed,
                "every_block_ms": round(every, 3),
                "stored_prefix_ms": round(runs, 3),
            }
            print(json.dumps(row))


if __name__ == "__main__":
    main()
