"""Count the blocks of a synthetic token stream: blocks per second and peak resident memory.

    python benchmarks/count_scale.py --blocks 100000000 [--record-tokens 1024] [--shared 0.05]

Records of random token ids (no tokenizer) are hashed exactly as ``analyze`` and ``build`` hash them
(``prefixgen.format.block_keys``) and counted by ``BlockCounter``. Every record starts with one of a few
shared prefixes (``--shared`` of its tokens), the rest is unique, so almost every block is distinct.
Prints one JSON line: blocks, distinct blocks, seconds, blocks/s (hash + count, and count alone), the
counter's CPU seconds (a fairer comparison than wall time on a shared machine), peak RSS
(of the whole process, torch included, as ``analyze`` runs); with ``--rank`` also the time and peak RSS of
ranking every block (``BlockCounts.select()``, the worst case: no --min-records filter).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefixgen.analysis.count import BlockCounter  # noqa: E402
from prefixgen.format import block_keys, root_key  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10_000_000, help="blocks to count (with repeats)")
    ap.add_argument("--record-tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--shared", type=float, default=0.05, help="share of each record taken by a common prefix")
    ap.add_argument("--chunk", type=int, default=1 << 22, help="BlockCounter chunk (blocks buffered per merge)")
    ap.add_argument("--rank", action="store_true", help="then rank every block (counts.select(), as analyze does)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bs, n_tok = args.block_size, args.record_tokens
    shared_tok = int(args.shared * n_tok) // bs * bs
    prefixes = [rng.integers(0, 32000, shared_tok, dtype=np.uint32) for _ in range(8)]
    root = root_key("00" * 32)
    counter = BlockCounter(chunk=args.chunk)
    start_rss = rss_mib()
    t0 = time.perf_counter()
    count_seconds = 0.0
    count_cpu = 0.0  # CPU seconds of this process in the counter: less skewed than wall time on a shared machine
    per_record = n_tok // bs
    records = -(-args.blocks // per_record)
    for i in range(records):
        body = rng.integers(0, 32000, n_tok - shared_tok, dtype=np.uint32)
        ids = np.concatenate([prefixes[i % len(prefixes)], body])
        keys = block_keys(ids, bs, root)
        t, c = time.perf_counter(), time.process_time()
        counter.add(keys)
        count_seconds += time.perf_counter() - t
        count_cpu += time.process_time() - c
        if i % 20000 == 0 and i:
            done = i * per_record
            print(
                f"{done:,} blocks, {done / (time.perf_counter() - t0):,.0f} blocks/s, peak {rss_mib():,.0f} MiB", file=sys.stderr
            )
    t, c = time.perf_counter(), time.process_time()
    counts = counter.result()
    count_seconds += time.perf_counter() - t
    count_cpu += time.process_time() - c
    seconds = time.perf_counter() - t0
    row = {
        "blocks": counter.blocks,
        "distinct_blocks": len(counts),
        "records": counter.records,
        "seconds": round(seconds, 1),
        "blocks_per_s": round(counter.blocks / seconds),
        "count_only_blocks_per_s": round(counter.blocks / count_seconds),
        "count_cpu_seconds": round(count_cpu, 1),
        "table_mib": round(counts.nbytes / 2**20),
        "peak_rss_mib": round(rss_mib()),
        "rss_before_counting_mib": round(start_rss),
    }
    if args.rank:
        count_peak = rss_mib()
        t = time.perf_counter()
        order = counts.select()
        row["rank_seconds"] = round(time.perf_counter() - t, 1)
        row["rank_peak_rss_mib"] = round(rss_mib())
        row["peak_rss_mib"] = round(count_peak)
        del order
    print(json.dumps(row))


if __name__ == "__main__":
    main()
