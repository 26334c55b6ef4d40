"""Open a store of N index entries and match a 4,096-token prompt: time and memory; then compact
it, and append a dataset to it.

    python benchmarks/index_scale.py --blocks 10000000 [--dir bench-out/index10m]
    python benchmarks/index_scale.py --blocks 10000000 --per-segment 128 --compact --cold --append-records 10000

Writes N-256 random keys plus the 256 blocks of one 4,096-token prompt as index segments of
``--per-segment`` entries (100,000: the first rows of BENCHMARKS.md; 128: one 256 MiB shard of
Llama-3.1-8B bf16 KV per segment, as a real build writes them). Only the prompt's blocks have KV:
the index is what is measured. Then, each in a fresh process: PrefixStore.open + match + load
(peak memory too), ``prefixgen ls``, ``prefixgen compact`` and the same measures again, and
``prefixgen build --append`` of a dataset into it and into an empty store of the same model.
``--cold`` drops the page cache before each measure (needs root).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefixgen.format import (  # noqa: E402
    COUNT_COLUMNS,
    COUNTS_DIR,
    INDEX_DIR,
    MANIFEST_FILE,
    KVLayout,
    Manifest,
    ModelFingerprint,
    TensorSpec,
    atomic_write,
    block_keys,
    encode_safetensors_header,
    encode_segment,
    root_key,
)
from prefixgen.store.writer import StoreWriter, prepare_store  # noqa: E402

PROMPT = 4096
MODEL = ROOT / "models" / "stories260K"
WORDS = "the a cat dog sun tree big small happy sad ran jumped played saw red blue girl boy ball park home friend".split()


def make_store(path: Path, blocks: int, per_segment: int, model: bool) -> list[int]:
    """Fill ``path`` with ``blocks`` index entries; with ``model``, under the real stories260K
    manifest (made by a one-record build) so that ``build --append`` can use the store."""
    if model:
        data = path.parent / "one.jsonl"
        data.write_text(json.dumps({"text": "Once upon a time there was a cat."}) + "\n")
        _cli("build", data, "--model", MODEL, "--out", path, "--overwrite", "--device", "cpu", "--quiet")
        manifest = Manifest.from_json((path / MANIFEST_FILE).read_text())
    else:
        layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="bfloat16")
        fp = ModelFingerprint("synthetic", "X", "x", 2, 1, 4, "00" * 32, "00" * 32)
        manifest = prepare_store(path, Manifest(16, fp, layout, root_key(fp.weights_digest).hex()), "overwrite")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 500, PROMPT).tolist()
    keys = block_keys(prompt, 16, manifest.root_key)
    kv_shape = (PROMPT, manifest.kv.num_layers, 2, manifest.kv.num_kv_heads, manifest.kv.head_dim)
    with StoreWriter(path, manifest, "bench", fsync=False) as w:
        kv = torch.randn(kv_shape).to(getattr(torch, manifest.kv.dtype))
        w.add(keys, [manifest.root_key] + keys[:-1], list(range(256)), np.asarray(prompt, np.uint32).reshape(-1, 16), kv)
    left = blocks - len(keys)
    all_keys = [np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32)]
    for i in range(0, left, per_segment):
        n = min(per_segment, left - i)
        cols = {
            "key": rng.integers(0, 256, (n, 32), dtype=np.uint8),
            "parent": rng.integers(0, 256, (n, 32), dtype=np.uint8),
            "slot": np.arange(n, dtype=np.uint32),
            "depth": np.zeros(n, np.uint32),
            "crc": np.zeros(n, np.uint32),
        }
        name = f"synthetic-{i // per_segment:07d}.safetensors"
        meta = {"shard": name, "blocks": str(n), "shard_bytes": "0", "shard_crc32": "0", "format_version": "2"}
        atomic_write(path / INDEX_DIR / name, encode_segment(cols, meta), fsync=False)
        all_keys.append(cols["key"])
    # Record counts as a build leaves them: 5 records share the prompt, every other block is in one.
    keys_all = np.concatenate(all_keys)
    counts = np.ones(len(keys_all), "<u8")
    counts[: len(keys)] = 5
    n = len(keys_all)
    specs = [TensorSpec(name, dt, (n, w) if w > 1 else (n,)) for name, (dt, w) in COUNT_COLUMNS.items()]
    header = encode_safetensors_header(specs, {"build": "synthetic", "format_version": "2"})
    atomic_write(path / COUNTS_DIR / "synthetic.safetensors", [header, keys_all.tobytes(), counts.tobytes()], fsync=False)
    return prompt


def measure(path: Path, prompt: list[int]) -> dict:
    from prefixgen import PrefixStore

    rss0 = _peak_rss_kib()
    t0 = time.perf_counter()
    store = PrefixStore.open(path)
    t1 = time.perf_counter()
    n = store.match(prompt + [1, 2, 3])
    t2 = time.perf_counter()
    cache = store.load(prompt)
    t3 = time.perf_counter()
    miss = store.match(list(range(PROMPT)))
    t4 = time.perf_counter()
    # What --append asks the index per record (Planner's `stored` check): 10,000 records of 8 blocks.
    rng = np.random.default_rng(2)
    records = [store.keys(rng.integers(0, 500, 128).tolist()) for _ in range(10_000)]
    t5 = time.perf_counter()
    stored = sum(sum(store.index.contains(keys)) for keys in records)
    t6 = time.perf_counter()
    rss1 = _peak_rss_kib()
    # What the vLLM connector pays per request on a warm store: keys, then the lookup (best of repeats).
    keys = store.keys(prompt)
    keys_ms = min(timeit.repeat(lambda: store.keys(prompt), number=100, repeat=7)) / 100 * 1e3
    lookup_ms = min(timeit.repeat(lambda: store.find_prefix(keys), number=100, repeat=7)) / 100 * 1e3
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
        "stored_check_10k_records_s": round(t6 - t5, 3),
        "stored_found": stored,
        "warm_keys_ms": round(keys_ms, 3),
        "warm_find_prefix_ms": round(lookup_ms, 3),
        "peak_rss_mib": round(rss1 / 1024, 1),
        "rss_added_mib": round((rss1 - rss0) / 1024, 1),
    }


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cli(*args, capture: bool = True) -> tuple[float, str]:
    """Run ``python -m prefixgen ARGS`` in a fresh process: (seconds, stdout)."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "prefixgen", *map(str, args)], capture_output=capture, text=True, check=True, cwd=ROOT
    )
    return time.perf_counter() - t, out.stdout or ""


def drop_caches(cold: bool) -> str:
    if not cold:
        return "warm"
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold"
    except OSError as exc:
        return f"warm (could not drop caches: {exc})"


def run_measure(path: Path, label: str, cold: bool) -> None:
    for run in ("first", "second"):
        cache = drop_caches(cold and run == "first")
        out = subprocess.run(
            [sys.executable, __file__, "--dir", str(path), "--measure-only"], capture_output=True, text=True, check=True
        )
        print(json.dumps({"stage": label, "cache": cache, **json.loads(out.stdout)}), flush=True)
    cache = drop_caches(cold)
    seconds, _ = _cli("ls", path, "--json")
    print(json.dumps({"stage": label, "cache": cache, "ls_s": round(seconds, 2)}), flush=True)


def append_data(path: Path, records: int) -> Path:
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for i in range(records):
            f.write(json.dumps({"text": f"Story {i}: " + " ".join(rng.choice(WORDS, 40))}) + "\n")
    return path


def run_append(path: Path, data: Path, label: str) -> None:
    seconds, _ = _cli("build", data, "--model", MODEL, "--out", path, "--append", "--device", "cpu", "--quiet")
    builds = sorted((path / "builds").glob("*.json"), key=lambda p: p.stat().st_mtime)
    rec = json.loads(builds[-1].read_text())
    stages = {k: round(v, 2) for k, v in rec["stage_seconds"].items()}
    print(
        json.dumps({"stage": label, "append_process_s": round(seconds, 1), "build_s": rec["seconds"], "stage_seconds": stages}),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10_000_000)
    ap.add_argument("--per-segment", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "index")
    ap.add_argument("--compact", action="store_true", help="then compact the store and measure again")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each first measure (root)")
    ap.add_argument("--append-records", type=int, default=0, help="then time build --append of N records")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prompt_file = args.dir.parent / f"{args.dir.name}-prompt.json"
    if args.measure_only:
        print(json.dumps(measure(args.dir, json.loads(prompt_file.read_text()))))
        return
    t = time.perf_counter()
    args.dir.parent.mkdir(parents=True, exist_ok=True)
    prompt = make_store(args.dir, args.blocks, args.per_segment, model=args.append_records > 0)
    prompt_file.write_text(json.dumps(prompt))
    print(
        f"made a store of {args.blocks:,} blocks in segments of {args.per_segment:,} in {time.perf_counter() - t:.1f} s at {args.dir}"
    )
    on_disk = sum(p.stat().st_size for p in (args.dir / INDEX_DIR).iterdir())
    print(f"index on disk: {on_disk / 2**20:,.0f} MiB", flush=True)
    data = append_data(args.dir.parent / "append.jsonl", args.append_records) if args.append_records else None
    if data is not None:
        empty = args.dir.parent / f"{args.dir.name}-empty"
        make_store(empty, 256, args.per_segment, model=True)
        run_append(empty, data, "append into a store of 256 blocks")
    run_measure(args.dir, "as written", args.cold)
    if args.compact:
        seconds, out = _cli("compact", args.dir, "--quiet")
        print(json.dumps({"stage": "compact", "seconds": round(seconds, 1), "output": out.strip()}), flush=True)
        run_measure(args.dir, "compacted", args.cold)
    if data is not None:
        run_append(args.dir, data, f"append into the {'compacted ' if args.compact else ''}{args.blocks:,}-block store")


if __name__ == "__main__":
    main()
