"""The distributed planner's peak memory (``builder.distributed.make_plan``) on synthetic count shares.

    python benchmarks/plan_memory.py --blocks 8000000 [--world 2] [--code DIR] [--folder DIR]

Writes (once, into ``--folder``) ``--world`` count shares as ranks spill them (``share-S.tokens``,
``.keys``, ``.npz`` with the share's block counts): records of ``--record-blocks`` blocks whose first
``--shared-blocks`` are one of 4 system prompts (shared heads, seen once per record), the rest
distinct. Then plans them in a fresh process running the prefixgen of ``--code`` (e.g. an older
checkout) and prints one JSON line: blocks, distinct blocks, seconds, and the planner's peak RSS
above the process's before it (``VmHWM``: numpy and prefixgen imported, nothing read).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

PLAN = r"""
import json, sys, time
from pathlib import Path
import numpy as np
try:
    from prefixgen.builder.shares import make_plan
except ImportError:  # a checkout from before builder/distributed.py was split
    from prefixgen.builder.distributed import make_plan
folder, world = Path(sys.argv[1]), int(sys.argv[2])
def hwm():  # this process's peak RSS (VmHWM; ru_maxrss would carry the launcher's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
before = hwm()
start = time.perf_counter()
plan = make_plan(folder, world, bytes(32), 16, lambda keys: [False] * len(keys))
seconds = time.perf_counter() - start
peak = hwm()
print(json.dumps({"heads": len(plan["head_keys"]), "records": len(plan["index"]), "seconds": round(seconds, 1),
                  "rss_before_mib": round(before, 1), "peak_added_mib": round(peak - before, 1)}))
"""


def write_shares(folder: Path, blocks: int, world: int, record_blocks: int, shared_blocks: int, bs: int = 16) -> int:
    """The shares' spill files; returns the distinct blocks."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 256, (4, shared_blocks, 32), dtype=np.uint8)
    records = blocks // record_blocks
    for s in range(world):
        n = records // world + (s < records % world)
        keys = rng.integers(0, 256, (n, record_blocks, 32), dtype=np.uint8)
        keys[:, :shared_blocks] = prompts[np.arange(n) % 4]
        keys = keys.reshape(-1, 32)
        keys.tofile(folder / f"share-{s}.keys")
        np.zeros(n * record_blocks * bs, "<u4").tofile(folder / f"share-{s}.tokens")
        pair = np.ascontiguousarray(keys[:, :16]).view("<u8").reshape(-1, 2)
        depth = np.tile(np.arange(record_blocks, dtype=np.uint32), n)
        order = np.lexsort((pair[:, 1], pair[:, 0]))
        k64, c64, depth = pair[order, 0], pair[order, 1], depth[order]
        starts = np.flatnonzero(np.r_[True, (k64[1:] != k64[:-1]) | (c64[1:] != c64[:-1])])
        meta = {
            "index": np.arange(s, records, world, dtype=np.int64)[:n], "lengths": np.full(n, record_blocks * bs, np.int64),
            "rows": np.asarray(n, np.int64), "local": np.asarray(False),
            "counts_key64": k64[starts], "counts_check64": c64[starts],
            "counts_records": np.diff(np.r_[starts, len(k64)]).astype(np.uint32), "counts_depth": depth[starts],
            "stats": np.zeros(3, np.int64),
        }  # fmt: skip
        np.savez(folder / f"share-{s}.npz", **meta)
    return records * (record_blocks - shared_blocks) + 4 * shared_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=8_000_000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--record-blocks", type=int, default=32)
    ap.add_argument("--shared-blocks", type=int, default=16)
    ap.add_argument("--code", type=Path, default=ROOT, help="the prefixgen checkout that plans")
    ap.add_argument("--folder", type=Path, required=True, help="where the shares are written (kept for reuse)")
    args = ap.parse_args()
    folder = args.folder / f"b{args.blocks}-w{args.world}"
    distinct = None
    if not (folder / f"share-{args.world - 1}.npz").exists():
        folder.mkdir(parents=True, exist_ok=True)
        distinct = write_shares(folder, args.blocks, args.world, args.record_blocks, args.shared_blocks)
    env = {"PYTHONPATH": str(args.code), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    # cwd: `python -c` puts it first on sys.path, before PYTHONPATH.
    cmd = [sys.executable, "-c", PLAN, str(folder.resolve()), str(args.world)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.code)
    if out.returncode:
        raise SystemExit(out.stderr)
    result = {"code": str(args.code), "blocks": args.blocks, "world": args.world, "distinct": distinct}
    print(json.dumps(result | json.loads(out.stdout)))


if __name__ == "__main__":
    main()
