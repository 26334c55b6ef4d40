"""`prefixgen build` against the plain loop and a bare forward, on the same token stream.

    python benchmarks/build_throughput.py --model configs/models/qwen2.5-1.5b.json --device cuda \\
        --records 2000 --min-words 100 --max-words 1500 [--fsync] [--shared-words 0]

(a) plain: the loop a user would write: tokenize 16 records, forward with use_cache=True, copy
    each record's KV to the CPU, safetensors.save_file;
(b) bare: forward only (logits_to_keep=1, no cache kept) over the same records sorted by length
    and right-padded (run before and after (c), averaged), and "bare_dense" over the same tokens
    packed densely into rows of --seq: no copies, no writes, no hashing;
(c) prefixgen: the whole build (tokenize, hash, plan, prefill, copy, write) into a fresh store.

Prints one JSON object: tokens/s of each, the ratios, bytes written per second, and where
prefixgen's time went.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import ROOT, Timer, card, load_model, make_texts, sync, write_jsonl
from safetensors.torch import save_file

from prefixgen import BuildConfig, build
from prefixgen.compat import output_cache


@torch.inference_mode()
def bare_dense(model, ids: list[list[int]], batch_tokens: int, seq: int, device) -> float:
    """Forward only over the token stream packed densely into rows of ``seq``: the hardware's rate."""
    stream = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    rows = max(1, batch_tokens // seq)
    n = stream.numel() // seq * seq
    chunks = stream[:n].view(-1, seq).to(device)  # on the device up front: the loop is forward passes only
    with Timer(device) as t:
        for i in range(0, len(chunks), rows):
            model(input_ids=chunks[i : i + rows], use_cache=False, logits_to_keep=1)
    return n / t.seconds


@torch.inference_mode()
def bare_records(model, ids: list[list[int]], batch_tokens: int, device) -> float:
    """Forward only over the same records, sorted by length and right-padded into batches of at
    most ``batch_tokens`` slots: the least work that prefills these sequences. Real tokens/s."""
    order = sorted(ids, key=len, reverse=True)
    batches, batch = [], []
    for row in order:
        if batch and len(batch[0]) * (len(batch) + 1) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(row[:batch_tokens])
    batches.append(batch)
    tensors = []
    for b in batches:
        t = torch.zeros(len(b), len(b[0]), dtype=torch.long)
        for i, row in enumerate(b):
            t[i, : len(row)] = torch.tensor(row)
        tensors.append(t.to(device))
    with Timer(device) as timer:
        for t in tensors:
            model(input_ids=t, use_cache=False, logits_to_keep=1)
    return sum(min(len(r), batch_tokens) for r in ids) / timer.seconds


@torch.inference_mode()
def plain_loop(model, tokenizer, texts: list[str], out: Path, device, rows: int = 16) -> tuple[float, int, int]:
    """Returns (dataset tokens/s, tokens, bytes written)."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = written = 0
    with Timer(device) as t:
        for b in range(0, len(texts), rows):
            enc = tokenizer(texts[b : b + rows], padding=True, return_tensors="pt")
            lengths = enc["attention_mask"].sum(1).tolist()
            result = model(**{k: v.to(device) for k, v in enc.items()}, use_cache=True, logits_to_keep=1)
            cache = output_cache(result)
            tensors = {}
            for i, n in enumerate(lengths):
                for li, layer in enumerate(cache.layers):
                    tensors[f"r{i}.l{li}.k"] = layer.keys[i, :, :n].contiguous().cpu()
                    tensors[f"r{i}.l{li}.v"] = layer.values[i, :, :n].contiguous().cpu()
                tokens += n
            path = out / f"batch{b // rows:06d}.safetensors"
            save_file(tensors, str(path))
            written += path.stat().st_size
    return tokens / t.seconds, tokens, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/small-llama.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--min-words", type=int, default=20)
    ap.add_argument("--max-words", type=int, default=300)
    ap.add_argument("--shared-words", type=int, default=0, help="a prefix of this many words shared by every record")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: 32768 on CUDA, 4096 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="row length of the bare forward (default: 2048 on CUDA, 512 on CPU)")
    ap.add_argument("--fsync", action="store_true", help="durable shard writes (default: page cache)")
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--kv-order", default="heads", help="heads (format 5, the default) or tokens (format 3/4)")
    ap.add_argument("--write-threads", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "build")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler over the prefixgen build: the ops that took its time, GPU busy share",
    )
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch_tokens = args.batch_tokens or (32768 if device.type == "cuda" else 4096)
    model, tokenizer, name = load_model(args.model, device, dtype)
    texts = make_texts(args.records, args.min_words, args.max_words, args.shared_words)
    data = write_jsonl(args.out / "data.jsonl", texts)
    ids = tokenizer(texts)["input_ids"]
    dataset_tokens = sum(map(len, ids))
    seq = args.seq or (2048 if device.type == "cuda" else 512)

    # Warm up kernels and allocator.
    bare_records(model, ids[:8], batch_tokens, device)
    dense = bare_dense(model, ids, batch_tokens, seq, device)
    bare_before = bare_records(model, ids, batch_tokens, device)
    plain = plain_tokens = plain_bytes = None
    if not args.skip_plain:
        shutil.rmtree(args.out / "plain", ignore_errors=True)
        plain, plain_tokens, plain_bytes = plain_loop(model, tokenizer, texts, args.out / "plain", device)
        shutil.rmtree(args.out / "plain", ignore_errors=True)

    store = args.out / "store"
    cfg = BuildConfig(
        dataset=str(data),
        model=name,
        out=str(store),
        batch_tokens=batch_tokens,
        overwrite=True,
        quiet=True,
        fsync=args.fsync,
        kv_dtype=args.kv_dtype,
        kv_order=args.kv_order,
        write_threads=args.write_threads,
        device=str(device),
    )
    sync(device)
    t = time.perf_counter()
    with profiled(args.profile, device) as prof:
        record = build(cfg, model=model, tokenizer=tokenizer)
    wall = time.perf_counter() - t
    prefixgen = record.prefilled_tokens / record.seconds
    bare = (bare_before + bare_records(model, ids, batch_tokens, device)) / 2  # before and after: machine drift
    kv_bytes_per_token = record.bytes_written / max(record.stored_tokens, 1)
    result = {
        "date": dt.date.today().isoformat(),
        "card": card(device),
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_dtype": args.kv_dtype,
        "kv_order": args.kv_order,
        "fsync": args.fsync,
        "records": args.records,
        "dataset_tokens": dataset_tokens,
        "batch_tokens": batch_tokens,
        "bare_tok_s": round(bare),
        "bare_dense_tok_s": round(dense),
        "prefixgen_over_bare_dense": round(prefixgen / dense, 3),
        "plain_tok_s": round(plain) if plain else None,
        "prefixgen_prefilled_tok_s": round(prefixgen),
        "prefixgen_dataset_tok_s": round(record.dataset_tokens / record.seconds),
        "prefixgen_over_bare": round(prefixgen / bare, 3),
        "bare_over_prefixgen": round(bare / prefixgen, 3),
        "prefixgen_over_plain": round(prefixgen / plain, 3) if plain else None,
        "prefilled_over_stored": round(record.prefilled_tokens / max(record.stored_tokens, 1), 3),
        "padding_share": round(record.padding_tokens / max(record.prefilled_tokens + record.padding_tokens, 1), 4),
        "prefixgen_seconds": record.seconds,
        "prefixgen_wall_seconds_with_setup": round(wall, 3),
        "write_GB_s": round(record.bytes_written / record.seconds / 1e9, 3),
        "plain_write_GB_s": round(plain_bytes / (plain_tokens / plain) / 1e9, 3) if plain else None,
        "kv_bytes_per_token": round(kv_bytes_per_token, 1),
        "stage_seconds": record.stage_seconds,
    }
    if prof is not None:
        result["profile"] = profile_summary(prof, wall)
    print(json.dumps(result))


@contextlib.contextmanager
def profiled(on: bool, device: torch.device) -> Iterator[torch.profiler.profile | None]:
    """torch.profiler over the block (CPU ops of every thread, and CUDA kernels and copies on CUDA), or nothing."""
    if not on:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield prof


def profile_summary(prof: torch.profiler.profile, wall: float, top: int = 15) -> dict:
    """Where the build's time went: the ops with the most self CPU time (all threads), the kernels and copies
    with the most device time, and the share of the wall time the device was busy (kernels and copies summed:
    an upper bound when they overlap)."""
    events = prof.key_averages()
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    device_us = sum(e.self_device_time_total for e in events)
    return {
        "device_busy_share": round(device_us / 1e6 / wall, 3),
        "self_cpu_s": {e.key[:80]: [round(e.self_cpu_time_total / 1e6, 3), e.count] for e in by_cpu},
        "self_device_s": {
            e.key[:80]: [round(e.self_device_time_total / 1e6, 3), e.count] for e in by_device if e.self_device_time_total
        },
    }


if __name__ == "__main__":
    main()
