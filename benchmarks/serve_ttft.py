"""Time to first token with and without the store, and how fast a stored prefix loads.

    python benchmarks/serve_ttft.py --model configs/models/llama-3.1-8b.json --device cuda --prefix 1024 4096 16384

For each prefix length P: builds a store holding a P-token shared prefix, then times the
server's engine (prefixgen.integrations.serve.Engine, no HTTP) on prompts made of that prefix plus a new
question: TTFT without the store (full prefill), with the store read from disk (page cache
warm and, where the OS allows dropping it, cold), and with the prefix hot on the device.
Also times PrefixStore.read_locations of the whole prefix to the device (GB/s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch
from common import ROOT, Timer, card, load_model, make_texts, sync, write_jsonl

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.integrations.serve import Engine, ServeConfig


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ttft(engine: Engine, ids: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(engine.device)
        gen = engine.generate(ids, {"max_tokens": 1, "temperature": 0})
        times.append(gen.ttft)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/small-llama.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "ttft")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer, name = load_model(args.model, device, dtype)
    max_pos = model.config.max_position_embeddings
    for p in args.prefix:
        if p + 64 > max_pos:
            print(json.dumps({"prefix_tokens": p, "skipped": f"the model has {max_pos} positions"}))
            continue
        # A prefix of exactly p tokens: random words, tokenized and cut.
        words = make_texts(1, p, p, seed=p)[0]
        prefix_ids = tokenizer(words).input_ids[:p]
        prefix_text = tokenizer.decode(prefix_ids)
        store_dir = args.out / f"store-{p}"
        data = write_jsonl(args.out / f"prefix-{p}.jsonl", [prefix_text])
        build(
            BuildConfig(dataset=str(data), model=name, out=str(store_dir), overwrite=True, quiet=True, device=str(device)),
            model=model,
            tokenizer=tokenizer,
        )
        questions = [f" Question {i}: what happened to the little {w} next?" for i, w in enumerate(["cat", "dog", "bird", "fox"])]
        prompts = [tokenizer(prefix_text + q).input_ids for q in questions]
        base = dict(store=str(store_dir), model=name, served_model_name=name)
        plain = Engine(ServeConfig(**base, no_store=True), model=model, tokenizer=tokenizer)
        ttft(plain, prompts[0], 1)  # warm up
        no_store = ttft(plain, prompts[0], args.repeats)
        # Warm page cache, cold device: a fresh engine each time.
        warm_disk = statistics.median(
            ttft(Engine(ServeConfig(**base), model=model, tokenizer=tokenizer), prompts[i % 4], 1) for i in range(args.repeats)
        )
        cold_disk = None
        if drop_page_cache():
            cold_disk = ttft(Engine(ServeConfig(**base), model=model, tokenizer=tokenizer), prompts[1], 1)
        hot_engine = Engine(ServeConfig(**base), model=model, tokenizer=tokenizer)
        ttft(hot_engine, prompts[2], 1)
        hot = ttft(hot_engine, prompts[3], args.repeats)
        cached = hot_engine.generate(prompts[3], {"max_tokens": 1, "temperature": 0}).cached_tokens
        # Load bandwidth of the whole stored prefix onto the device.
        store = PrefixStore.open(store_dir)
        locations = store.index.find(store.keys(prefix_ids))
        nbytes = len(locations) * store.block_size * store.manifest.kv.bytes_per_token
        store.read_locations(locations, device=device)  # warm the page cache and the staging ring
        with Timer(device) as t:
            store.read_locations(locations, device=device)
        warm_rate = nbytes / t.seconds / 1e9
        with Timer(device) as t:
            store.read_locations(locations, device=device, verify=False)
        warm_rate_noverify = nbytes / t.seconds / 1e9
        cold_rate = None
        if drop_page_cache():
            fresh = PrefixStore.open(store_dir)
            with Timer(device) as t:
                fresh.read_locations(locations, device=device)
            cold_rate = nbytes / t.seconds / 1e9
        print(
            json.dumps(
                {
                    "date": dt.date.today().isoformat(),
                    "card": card(device),
                    "model": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "prefix_tokens": p,
                    "prompt_tokens": len(prompts[3]),
                    "cached_tokens": cached,
                    "ttft_no_store_s": round(no_store, 4),
                    "ttft_store_warm_disk_s": round(warm_disk, 4),
                    "ttft_store_cold_disk_s": round(cold_disk, 4) if cold_disk else None,
                    "ttft_store_hot_s": round(hot, 4),
                    "speedup_hot": round(no_store / hot, 2),
                    "speedup_warm_disk": round(no_store / warm_disk, 2),
                    "prefix_kv_MB": round(nbytes / 1e6, 1),
                    "load_warm_GB_s": round(warm_rate, 2),
                    "load_warm_GB_s_no_crc": round(warm_rate_noverify, 2),
                    "load_cold_GB_s": round(cold_rate, 2) if cold_rate else None,
                    "cpu_threads": os.cpu_count(),
                }
            )
        )


if __name__ == "__main__":
    main()
