"""Open a store of N index entries and match a 4,096-token prompt: time and memory.

    python benchmarks/index_scale.py --blocks 10000000 [--dir bench-out/index10m]

Writes N-256 random keys plus the 256 blocks of one 4,096-token prompt as index segments of
100,000 entries (the KV shards hold only the prompt's blocks: the index is what is measured),
then, in a fresh process, times PrefixStore.open + match + load and reports peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefixgen.format import (  # noqa: E402
    INDEX_DIR,
    KVLayout,
    Manifest,
    ModelFingerprint,
    atomic_write,
    block_keys,
    encode_segment,
    root_key,
)
from prefixgen.store.writer import StoreWriter, prepare_store  # noqa: E402

PER_SEGMENT = 100_000
PROMPT = 4096


def make_store(path: Path, blocks: int) -> list[int]:
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="bfloat16")
    fp = ModelFingerprint("synthetic", "X", "x", 2, 1, 4, "00" * 32, "00" * 32)
    manifest = prepare_store(path, Manifest(16, fp, layout, root_key(fp.weights_digest).hex()), "overwrite")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 32000, PROMPT).tolist()
    keys = block_keys(prompt, 16, manifest.root_key)
    with StoreWriter(path, manifest, "bench", fsync=False) as w:
        kv = torch.randn(PROMPT, 2, 2, 1, 4).to(torch.bfloat16)
        w.add(keys, [manifest.root_key] + keys[:-1], list(range(256)), np.asarray(prompt, np.uint32).reshape(-1, 16), kv)
    left = blocks - len(keys)
    for i in range(0, left, PER_SEGMENT):
        n = min(PER_SEGMENT, left - i)
        cols = {
            "key": rng.integers(0, 256, (n, 32), dtype=np.uint8),
            "parent": rng.integers(0, 256, (n, 32), dtype=np.uint8),
            "slot": np.zeros(n, np.uint32),
            "depth": np.zeros(n, np.uint32),
            "crc": np.zeros(n, np.uint32),
        }
        meta = {"shard": "synthetic.safetensors", "blocks": str(n), "shard_bytes": "0", "shard_crc32": "0", "format_version": "1"}
        atomic_write(path / INDEX_DIR / f"synthetic-{i // PER_SEGMENT:06d}.safetensors", encode_segment(cols, meta), fsync=False)
    return prompt


def measure(path: Path, prompt: list[int]) -> dict:
    from prefixgen import PrefixStore

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    store = PrefixStore.open(path)
    t1 = time.perf_counter()
    n = store.match(prompt + [1, 2, 3])
    t2 = time.perf_counter()
    cache = store.load(prompt)
    t3 = time.perf_counter()
    miss = store.match(list(range(PROMPT)))
    t4 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "entries": store.index.entries,
        "segments": len(store.index.segments),
        "matched_tokens": n,
        "loaded_tokens": cache.get_seq_length(),
        "miss_matched": miss,
        "open_s": round(t1 - t0, 4),
        "match_s": round(t2 - t1, 4),
        "open_plus_match_s": round(t2 - t0, 4),
        "load_s": round(t3 - t2, 4),
        "miss_match_s": round(t4 - t3, 4),
        "peak_rss_mib": round(rss1 / 1024, 1),
        "rss_added_mib": round((rss1 - rss0) / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10_000_000)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "index")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prompt_file = args.dir / "prompt.json"
    if args.measure_only:
        print(json.dumps(measure(args.dir, json.loads(prompt_file.read_text()))))
        return
    t = time.perf_counter()
    prompt = make_store(args.dir, args.blocks)
    prompt_file.write_text(json.dumps(prompt))
    print(f"made a store of {args.blocks:,} blocks in {time.perf_counter() - t:.1f} s at {args.dir}")
    on_disk = sum(p.stat().st_size for p in (args.dir / INDEX_DIR).iterdir())
    print(f"index on disk: {on_disk / 2**20:,.0f} MiB")
    for run in ("first (page cache warm from writing)", "second"):
        out = subprocess.run(
            [sys.executable, __file__, "--dir", str(args.dir), "--measure-only"], capture_output=True, text=True, check=True
        )
        print(run, out.stdout.strip())


if __name__ == "__main__":
    main()
