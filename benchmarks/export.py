"""`prefixgen export` throughput against a plain copy of the same bytes on the same disk.

A synthetic store of a Llama-3-8B-shaped KV (32 layers, 8 KV heads of 128, bfloat16: 128 KiB a
token, 2 MiB a 16-token block) in chains of 32 blocks is written with the real StoreWriter; then
(1) its shard files are copied with ``shutil.copyfile`` (+ fsync per file when fsync is on), and
(2) it is exported with ``export`` to ``--target``'s layout (sglang: one 2 MiB file per page, TP 1; lmcache:
one 32 MiB file per 256-token chunk; vllm: one 2 MiB canonical CPU-tier row per 16-token block). Both read the
store from the page cache (it was just written) and write ``--gb`` of KV; the ratio is the export's
cost over moving the bytes at all (target: >= 0.7x). CPU seconds per GB (this process, all threads)
say what each costs whatever the machine's load.

    python benchmarks/export.py --gb 1 [--target sglang|lmcache|vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefixgen.export import export  # noqa: E402
from prefixgen.export.sglang import SGLangTarget  # noqa: E402
from prefixgen.format import SHARDS_DIR, KVLayout, Manifest, ModelFingerprint, block_keys, root_key  # noqa: E402
from prefixgen.store.writer import StoreWriter, prepare_store  # noqa: E402

BS = 16
LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
CHAIN = 32  # blocks per record


def make_store(path: Path, gb: float) -> int:
    """A store of random KV, ``gb`` GB of it; returns its blocks."""
    fp = ModelFingerprint("synthetic-8b", "LlamaForCausalLM", "llama", 32, 8, 128, "00" * 32, "00" * 32)
    manifest = prepare_store(path, Manifest(BS, fp, LAYOUT, root_key(fp.weights_digest).hex()), "overwrite")
    block_bytes = LAYOUT.bytes_per_token * BS
    chains = max(1, int(gb * 1e9 / block_bytes / CHAIN))
    rng = np.random.default_rng(0)
    kv = torch.randint(
        -(2**15), 2**15, (CHAIN * BS, LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.head_dim), dtype=torch.int16
    )
    kv = kv.view(torch.bfloat16)  # [T, L, 2, H, D]
    with StoreWriter(path, manifest, "bench", fsync=False) as writer:
        for _ in range(chains):
            ids = rng.integers(0, 32000, CHAIN * BS)
            keys = block_keys(ids.tolist(), BS, manifest.root_key)
            writer.add(keys, [manifest.root_key, *keys[:-1]], list(range(CHAIN)), ids.astype(np.uint32).reshape(CHAIN, BS), kv)
    return chains * CHAIN


def plain_copy(store: Path, out: Path, fsync: bool) -> int:
    """Copy every shard file (what a second copy of the store costs); returns the bytes copied."""
    out.mkdir(parents=True)
    total = 0
    for src in sorted((store / SHARDS_DIR).iterdir()):
        dst = out / src.name
        shutil.copyfile(src, dst)
        if fsync:
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
        total += dst.stat().st_size
    return total


def target(name: str):
    """The export target the benchmark writes (each engine's default parameters)."""
    if name == "lmcache":
        from prefixgen.export.lmcache import LMCacheTarget

        return LMCacheTarget(model_name="bench/synthetic-8b", hash_seed=0)
    if name == "vllm":
        from prefixgen.export.vllm import VLLMTarget

        return VLLMTarget(model_name="bench/synthetic-8b")
    return SGLangTarget(model_name="bench/synthetic-8b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="KV in the store, GB")
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each row")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder on this disk)")
    ap.add_argument("--target", default="sglang", choices=("sglang", "lmcache", "vllm"), help="the export's layout")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="prefixgen-export-bench-", dir=args.dir or os.getcwd()))
    try:
        store = base / "store"
        blocks = make_store(store, args.gb)
        print(
            f"store: {blocks} blocks of {LAYOUT.bytes_per_token * BS / 2**20:.0f} MiB; target {args.target}; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print("| fsync | plain copy GB/s | export GB/s | export / copy | copy CPU s/GB | export CPU s/GB |")
        print("|---|---|---|---|---|---|")
        for fsync in (True, False):
            for _ in range(args.repeat):
                t, c = time.perf_counter(), time.process_time()
                copied = plain_copy(store, base / "copy", fsync)
                copy_s, copy_cpu = time.perf_counter() - t, time.process_time() - c
                c = time.process_time()
                s = export(store, target(args.target), base / "export", progress=False, fsync=fsync)
                export_cpu = time.process_time() - c
                copy_gbs = copied / copy_s / 1e9
                row = {
                    "target": args.target,
                    "fsync": fsync,
                    "copy_GB_s": round(copy_gbs, 3),
                    "export_GB_s": round(s.gb_per_s, 3),
                    "ratio": round(s.gb_per_s / copy_gbs, 2),
                    "copy_cpu_s_per_GB": round(copy_cpu / (copied / 1e9), 2),
                    "export_cpu_s_per_GB": round(export_cpu / (s.bytes / 1e9), 2),
                    "load": round(os.getloadavg()[0], 2),
                }
                if args.json:
                    print(json.dumps({"bench": "export", "GB": round(s.bytes / 1e9, 2), **row}))
                else:
                    print(
                        f"| {'on' if fsync else 'off'} | {row['copy_GB_s']:.2f} | {row['export_GB_s']:.2f} | {row['ratio']:.2f}x "
                        f"| {row['copy_cpu_s_per_GB']:.2f} | {row['export_cpu_s_per_GB']:.2f} |"
                    )
                shutil.rmtree(base / "copy")
                shutil.rmtree(base / "export")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
