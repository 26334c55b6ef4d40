"""Host memory of a long build: the real planner and store writer fed synthetic records.

    python benchmarks/build_memory.py --blocks 50000000 [--dir bench-out/buildmem]

Records are random token streams; a third of them start with one of 200 shared "system prompts"
(4 blocks), so the planner deduplicates and tasks have pasts. Each record goes through the real
``Planner`` (hashing, dedup against the store and the run, chunking) and ``batch_tasks``; the
prefill is a stub that returns zero KV of the right shape ([tokens, layers, 2, kv_heads, head_dim],
here 1 x 1 x 1 float16, so the disk is not the bottleneck); the real ``StoreWriter`` writes shards,
index segments and (every ``--count-every`` blocks) a counts file, and for every task with a past it
is asked for the past's last block as the build's past source does (a confirmed lookup).

``--keys-only`` measures the two key sets alone at full scale (50 million blocks in minutes, where
the whole path above needs hours on a 2-core machine): the planner's ``scheduled`` set and the
writer's key -> slot map, fed random keys 64 at a time, with the planner's lookup before each add.

Reports peak RSS, RSS per stored block above the start (after buffers are allocated), the bytes
held by the planner's and writer's key sets, and blocks/s. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefixgen.builder.plan import Planner, batch_tasks  # noqa: E402
from prefixgen.data.records import TokenizedRecord  # noqa: E402
from prefixgen.format import BuildRecord, KVLayout, Manifest, ModelFingerprint, root_key  # noqa: E402
from prefixgen.store.reader import PrefixStore  # noqa: E402
from prefixgen.store.writer import StoreWriter, prepare_store  # noqa: E402

BS = 16
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float16")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def records(n_blocks: int, seed: int = 0):
    """Token streams of 8..120 blocks; a third start with one of 200 shared 4-block prompts."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, 32000, (200, 4 * BS), dtype=np.int64)
    made = i = 0
    while made < n_blocks:
        length = int(rng.integers(8, 121)) * BS
        ids = rng.integers(0, 32000, length, dtype=np.int64)
        if i % 3 == 0:
            ids[: 4 * BS] = prompts[int(rng.integers(0, 200))]
        made += length // BS
        yield TokenizedRecord(index=i, ids=ids.tolist())
        i += 1


def run(out: Path, blocks: int, shard_blocks: int, count_every: int, sort_window: int) -> dict:
    fp = ModelFingerprint("synthetic", "X", "x", 1, 1, 1, "00" * 32, "00" * 32)
    manifest = prepare_store(out, Manifest(BS, fp, LAYOUT, root_key(fp.weights_digest).hex()), "overwrite")
    store = PrefixStore.open(out)
    stats = BuildRecord("bench", "synthetic")
    shard_bytes = shard_blocks * BS * LAYOUT.bytes_per_token
    writer = StoreWriter(out, manifest, "bench", shard_bytes=shard_bytes, write_threads=2, fsync=False)
    planner = Planner(manifest.root_key, BS, 8192, store.index.contains, stats)
    kv_cache: dict[int, torch.Tensor] = {}
    start_rss = rss_mib()
    t0 = time.perf_counter()
    samples = []
    stored = lookups = next_sample = 0
    for batch in batch_tasks(planner(records(blocks)), 8192, sort_window):
        for task in batch.tasks:  # the stub prefill: zero KV of the right shape
            n = task.new_tokens
            kv = kv_cache.get(n)
            if kv is None:
                kv = kv_cache[n] = torch.zeros(n, LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.head_dim, dtype=torch.float16)
            if task.cached:  # the past source asks the writer for blocks not in its device cache
                lookups += 1
                assert task.keys[task.cached // BS - 1] in writer
            keys, first = task.new_keys, task.cached // BS
            tokens = np.asarray(task.tokens[task.cached :], dtype=np.uint32).reshape(-1, BS)
            parents = [task.keys[first - 1] if first else manifest.root_key] + keys[:-1]
            writer.add(keys, parents, list(range(first, first + len(keys))), tokens, kv)
            stored += len(keys)
        if hasattr(planner.counts, "take") and planner.counts.pending >= count_every:
            writer.write_counts(*planner.counts.take())
        if stored >= next_sample:
            samples.append({"blocks": stored, "rss_mib": round(rss_mib(), 1), "seconds": round(time.perf_counter() - t0, 1)})
            next_sample += max(blocks // 10, 1)
    # (Run against the code before compact key sets, the counts are a dict, written whole.)
    writer.write_counts(*planner.counts.take()) if hasattr(planner.counts, "take") else writer.write_counts(planner.counts)
    end_rss = rss_mib()
    planner_bytes = getattr(planner.scheduled, "nbytes", 0)
    writer_bytes = getattr(writer._where, "nbytes", 0)
    writer.close()
    getattr(writer, "release", lambda: None)()
    seconds = time.perf_counter() - t0
    samples.append({"blocks": stored, "rss_mib": round(end_rss, 1), "seconds": round(seconds, 1)})
    return {
        "blocks": stored,
        "seconds": round(seconds, 1),
        "blocks_per_s": round(stored / seconds),
        "start_rss_mib": round(start_rss, 1),
        "end_rss_mib": round(end_rss, 1),
        "peak_rss_mib": round(peak_mib(), 1),
        "rss_bytes_per_block": round((end_rss - start_rss) * 2**20 / max(stored, 1), 1),
        # The growth from the first tenth to the end: what each further block costs, without the
        # fixed costs (delta dicts, allocator arenas) that dominate a small run.
        "slope_bytes_per_block": _slope(samples),
        "peak_bytes_per_block": round((peak_mib() - start_rss) * 2**20 / max(stored, 1), 1),
        "planner_keyset_bytes_per_block": round(planner_bytes / max(stored, 1), 1),
        "writer_keyset_bytes_per_block": round(writer_bytes / max(stored, 1), 1),
        "past_lookups": lookups,
        "shards": writer.shards_written,
        "samples": samples,
    }


def run_keys_only(blocks: int) -> dict:
    """The planner's and writer's KeySets alone, as the build uses them, for ``blocks`` keys."""
    from prefixgen.store.keyset import KeySet

    scheduled, where = KeySet(), KeySet(full_keys=False, value_dtype=np.uint64)
    rng = np.random.default_rng(0)
    start_rss = rss_mib()
    t0 = time.perf_counter()
    samples = []
    for done in range(0, blocks, 64 * 4096):
        chunk = rng.integers(0, 256, (min(64 * 4096, blocks - done), 32), dtype=np.uint8)
        for i in range(0, len(chunk), 64):
            keys = [k.tobytes() for k in chunk[i : i + 64]]
            assert not scheduled.contains(keys).any()
            scheduled.add(keys)
            where.add(keys, np.arange(done + i, done + i + len(keys)))
        if (done // (64 * 4096)) % 20 == 0:
            samples.append(
                {"blocks": done + len(chunk), "rss_mib": round(rss_mib(), 1), "seconds": round(time.perf_counter() - t0, 1)}
            )
    end_rss, seconds = rss_mib(), time.perf_counter() - t0
    samples.append({"blocks": blocks, "rss_mib": round(end_rss, 1), "seconds": round(seconds, 1)})
    return {
        "mode": "keys-only",
        "blocks": blocks,
        "seconds": round(seconds, 1),
        "blocks_per_s": round(blocks / seconds),
        "start_rss_mib": round(start_rss, 1),
        "end_rss_mib": round(end_rss, 1),
        "peak_rss_mib": round(peak_mib(), 1),
        "rss_bytes_per_block": round((end_rss - start_rss) * 2**20 / blocks, 1),
        "peak_bytes_per_block": round((peak_mib() - start_rss) * 2**20 / blocks, 1),
        "slope_bytes_per_block": _slope(samples),
        "planner_keyset_bytes_per_block": round(scheduled.nbytes / blocks, 1),
        "writer_keyset_bytes_per_block": round(where.nbytes / blocks, 1),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="blocks to store")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "buildmem")
    ap.add_argument("--shard-blocks", type=int, default=8192)
    ap.add_argument(
        "--count-every", type=int, default=1 << 20, help="write a counts file every N block occurrences (as the build does)"
    )
    ap.add_argument("--sort-window", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--keys-only", action="store_true", help="only the planner's and writer's key sets")
    args = ap.parse_args()
    if args.keys_only:
        result = run_keys_only(args.blocks)
        print(json.dumps({"benchmark": "build_memory", **result, "extrapolated_50m_gib": _extrapolate(result)}))
        return
    try:
        result = run(args.dir, args.blocks, args.shard_blocks, args.count_every, args.sort_window)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps({"benchmark": "build_memory", **result, "extrapolated_50m_gib": _extrapolate(result)}))


def _slope(samples: list[dict]) -> float:
    a, b = samples[1] if len(samples) > 2 else samples[0], samples[-1]
    return round((b["rss_mib"] - a["rss_mib"]) * 2**20 / max(b["blocks"] - a["blocks"], 1), 1)


def _extrapolate(r: dict) -> float:
    """Host memory above the start for 50 million blocks: what the run used, plus the measured
    slope for the blocks it did not store, plus the peak's excess over the end (a merge's scratch)."""
    rest = max(50e6 - r["blocks"], 0) * r["slope_bytes_per_block"]
    used = (r["end_rss_mib"] - r["start_rss_mib"]) * 2**20 + max(r["peak_rss_mib"] - r["end_rss_mib"], 0) * 2**20
    return round((used + rest) / 2**30, 2)


if __name__ == "__main__":
    main()
