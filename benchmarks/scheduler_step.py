"""What one prompt's store lookup adds to a vLLM scheduler step: the connector's own
``get_num_new_matched_tokens`` (the lookup in the background, "not yet" until it is done) against the inline
lookup the connector ran inside ``schedule()`` before (``stored_prefix``: hash, search the index, build locations).

    PYTHONPATH=$PWD .venv-vllm/bin/python benchmarks/scheduler_step.py

Builds a tiny random Qwen2 (tests_vllm's), a store of it whose one chain is --tokens long (random KV: only the
lookup is timed), and the real scheduler-side connector from vLLM's engine config. For a stored prompt (the chain
and one more token) and a cold one (nothing stored) of --tokens tokens it reports, over --repeats requests: the
longest single call (what a step pays), how many calls (steps) a request took until answered, and the inline
lookup's time. Between calls it sleeps --step-ms, as a scheduler process waits for its workers' forward.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, card

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.format import block_keys
from prefixgen.integrations.vllm import stored_prefix
from prefixgen.store.writer import StoreWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import sys

    sys.path.insert(0, str(ROOT))
    from tests_vllm.conftest import tiny_model, write_jsonl
    from tests_vllm.test_refusals import connector, engine_config, request

    tmp = Path(tempfile.mkdtemp(prefix="scheduler-step-"))
    model = tiny_model(tmp / "qwen2")
    out = tmp / "store"
    build(
        BuildConfig(
            dataset=str(write_jsonl(tmp / "d.jsonl", [{"text": "Once upon a time"}])),
            model=str(model),
            out=str(out),
            device="cpu",
            quiet=True,
        )
    )
    manifest = PrefixStore.open(out).manifest
    bs, kv = manifest.block_size, manifest.kv
    rng = np.random.default_rng(0)
    chain = rng.integers(10, 500, args.tokens).tolist()
    keys = block_keys(chain, bs, manifest.root_key)
    with StoreWriter(out, manifest, "bench", fsync=False) as w:
        step = 1024
        for a in range(0, len(keys), step):
            part = keys[a : a + step]
            parents = [keys[a - 1] if a else manifest.root_key] + part[:-1]
            tokens = np.asarray(chain[a * bs : (a + len(part)) * bs], np.uint32).reshape(-1, bs)
            w.add(
                part,
                parents,
                list(range(a, a + len(part))),
                tokens,
                torch.zeros(len(part) * bs, kv.num_layers, 2, kv.num_kv_heads, kv.head_dim),
            )
    sched = connector(engine_config(model, out))
    sched.connector_scheduler._idle = False  # a busy engine: the scheduler never waits for a lookup
    prompts = {"stored": chain + [7], "cold": ([3, 9] * args.tokens)[: args.tokens]}
    store = sched.store
    for kind, ids in prompts.items():
        durations, calls_list, answered = [], [], []
        for r in range(args.repeats):
            req = request(f"{kind}-{r}", ids)
            calls, t_start = 0, time.perf_counter()
            while True:
                t0 = time.perf_counter()
                tokens, _ = sched.get_num_new_matched_tokens(req, 0)
                durations.append(time.perf_counter() - t0)
                calls += 1
                if tokens is not None:
                    break
                time.sleep(args.step_ms / 1e3)
            answered.append(time.perf_counter() - t_start)
            calls_list.append(calls)
            sched.request_finished(req, [])
        inline = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            stored_prefix(store, ids[:-1])
            inline.append(time.perf_counter() - t0)
        row = {
            "bench": "scheduler_step",
            "date": dt.date.today().isoformat(),
            "card": card("cpu"),
            "tokens": args.tokens,
            "prompt": kind,
            "claimed_tokens": int(tokens),
            "call_ms_p50": round(float(np.percentile(durations, 50)) * 1e3, 3),
            "call_ms_p99": round(float(np.percentile(durations, 99)) * 1e3, 3),
            "worst_call_ms": round(max(durations) * 1e3, 3),
            "max_calls": max(calls_list),
            "answered_ms_max": round(max(answered) * 1e3, 1),
            "inline_lookup_ms_max": round(max(inline) * 1e3, 3),
            "loadavg": open("/proc/loadavg").read().split()[0],
        }
        print(json.dumps(row), flush=True)
    sched.shutdown()


if __name__ == "__main__":
    main()
