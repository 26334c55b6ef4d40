"""Compact a store of N index rows: time and peak resident memory of ``compact_store``, per code version.

    python benchmarks/compact_scale.py --blocks 10000000 --per-segment 128 --dir /tmp/cs10m
    python benchmarks/compact_scale.py --blocks 10000000 --dir /tmp/cs10m --code /tmp/main-checkout --code .

Writes N rows of random keys as one-shard index segments of ``--per-segment`` rows (128: one
256 MiB shard of Llama-3.1-8B bf16 KV, as a real build writes them), with the real format functions
(``encode_segment``, ``atomic_write``); every 100th segment repeats rows of the one before it (a block
two writers stored), so compaction drops duplicates. No shard files: compaction reads only the index.
Then, for each ``--code`` checkout (default: this one), compacts a hard-linked copy of the index in a
fresh process and prints one JSON line: seconds, peak RSS (whole process) and RSS before compacting
(imports: numpy, torch), rows in and out, and the SHA-256 of the compacted segment (equal across code
versions: the same bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefixgen.format import (  # noqa: E402
    INDEX_DIR,
    MANIFEST_FILE,
    KVLayout,
    Manifest,
    ModelFingerprint,
    atomic_write,
    encode_segment,
    root_key,
)
from prefixgen.store.writer import prepare_store  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from prefixgen.maintain.compact import compact_store
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = compact_store(sys.argv[2])
print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "rss_before_mib": round(rss0 / 1024), "segments": r.segments_merged, "rows_in": r.rows_in, "rows_out": r.rows_out,
                  "segment": r.segment}))
"""


def make_store(path: Path, blocks: int, per_segment: int) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="bfloat16")
    fp = ModelFingerprint("synthetic", "X", "x", 2, 1, 4, "00" * 32, "00" * 32)
    prepare_store(path, Manifest(16, fp, layout, root_key(fp.weights_digest).hex()), "overwrite")
    rng = np.random.default_rng(0)
    prev = None
    for s, i in enumerate(range(0, blocks, per_segment)):
        n = min(per_segment, blocks - i)
        cols = {
            "key": rng.integers(0, 256, (n, 32), dtype=np.uint8),
            "parent": rng.integers(0, 256, (n, 32), dtype=np.uint8),
            "slot": np.arange(n, dtype=np.uint32),
            "depth": rng.integers(0, 64, n, dtype=np.uint32),
            "crc": rng.integers(0, 2**32, n, dtype=np.uint32),
        }
        if s % 100 == 99 and prev is not None:  # a block another writer stored too
            m = min(n, len(prev["key"])) // 2
            for name in ("key", "parent", "depth", "crc"):
                cols[name][:m] = prev[name][:m]
        prev = cols
        name = f"synthetic-{s:07d}.safetensors"
        meta = {"shard": name, "blocks": str(n), "shard_bytes": "0", "shard_crc32": "0", "format_version": "2"}
        atomic_write(path / INDEX_DIR / name, encode_segment(cols, meta), fsync=False)
        if s % 10000 == 0:
            print(f"{i:,} rows written", file=sys.stderr)


def compact_copy(store: Path, work: Path, code: Path) -> dict:
    """Compact a hard-linked copy of ``store``'s index with the prefixgen of ``code``, in a fresh process."""
    if work.exists():
        shutil.rmtree(work)
    (work / INDEX_DIR).mkdir(parents=True)
    shutil.copy(store / MANIFEST_FILE, work / MANIFEST_FILE)
    for name in os.listdir(store / INDEX_DIR):  # compaction never changes a file in place
        os.link(store / INDEX_DIR / name, work / INDEX_DIR / name)
    out = subprocess.run([sys.executable, "-c", CHILD, str(code), str(work)], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256()
    with open(work / INDEX_DIR / row["segment"], "rb") as f:
        while piece := f.read(16 << 20):
            digest.update(piece)
    row["sha256"] = digest.hexdigest()[:16]
    row["code"] = str(code)
    shutil.rmtree(work)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10_000_000)
    ap.add_argument("--per-segment", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=Path("bench-out/compact"))
    ap.add_argument(
        "--code", type=Path, action="append", help="prefixgen checkout to compact with (repeatable; default: this one)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated store for another run")
    args = ap.parse_args()
    store = args.dir / "store"
    if not (store / MANIFEST_FILE).exists() or len(os.listdir(store / INDEX_DIR)) != -(-args.blocks // args.per_segment):
        make_store(store, args.blocks, args.per_segment)
    for code in args.code or [ROOT]:
        row = compact_copy(store, args.dir / "work", code.resolve())
        print(json.dumps({"blocks": args.blocks, "per_segment": args.per_segment, **row}), flush=True)
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
