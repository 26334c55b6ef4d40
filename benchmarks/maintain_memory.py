"""Peak resident memory of ``prefixgen verify [--quick]``, ``prune`` and ``gc`` on stores of N blocks.

    python benchmarks/maintain_memory.py --blocks 30000 --blocks 300000 [--dir bench-out/maint]
    python benchmarks/maintain_memory.py --blocks 10000000 --skip verify   # full verify hashes every block
    python benchmarks/maintain_memory.py --only gc --only "verify --quick"

Writes a real store of N blocks with the library's own writer functions and no model: chains of 8
blocks of random tokens (real keys: ``block_keys``), random KV bytes in shards of 4,096 blocks
(``encode_shard``; a tiny layout, 32 bytes a block, so that 10M blocks fit on a disk), one index
segment per shard (``encode_segment``), compacted into one segment as a finished build leaves it
(``compact_store``), and record counts in ``counts/`` (unsorted files of up to 1M rows, as a build
writes them; a second build counts every 3rd record again, so counts are summed over files).

Then runs each command as the real CLI in a child process (on a hard-linked copy for the ones that
change the store) and prints one JSON line per command: its peak RSS (``ru_maxrss`` of the child, from
``wait4``), seconds, and exit code. Peak RSS includes the interpreter and imports (numpy, torch: about
250 MiB): compare the growth between store sizes, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefixgen.format import (  # noqa: E402
    COUNT_COLUMNS,
    COUNTS_DIR,
    INDEX_DIR,
    MANIFEST_FILE,
    SHARDS_DIR,
    KVLayout,
    Manifest,
    ModelFingerprint,
    TensorSpec,
    atomic_write,
    encode_safetensors_header,
    encode_segment,
    encode_shard,
    root_key,
    shard_name,
)
from prefixgen.maintain.compact import compact_store  # noqa: E402
from prefixgen.store.writer import prepare_store  # noqa: E402

BS = 4  # tokens a block
DEPTH = 8  # blocks a record
SHARD_BLOCKS = 4096
COUNT_ROWS = 1 << 20
WRITER = "20260101T000000-1-bench00"


def make_store(path: Path, blocks: int) -> None:
    """A real store of ``blocks`` blocks (rounded up to whole records), compacted, with counts."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, dtype="bfloat16")
    fp = ModelFingerprint("synthetic", "X", "x", 1, 1, 2, "00" * 32, "00" * 32)
    manifest = prepare_store(path, Manifest(BS, fp, layout, root_key(fp.weights_digest).hex()), "overwrite")
    (path / COUNTS_DIR).mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    root = manifest.root_key
    block_bytes = layout.bytes_per_token * BS
    records = -(-blocks // DEPTH)
    counts_k: list[np.ndarray] = []
    counts_r: list[np.ndarray] = []
    extra_k: list[np.ndarray] = []
    n_counts = 0

    def write_counts(build: str, keys: list[np.ndarray], recs: list[np.ndarray]) -> None:
        nonlocal n_counts
        k, r = np.concatenate(keys), np.concatenate(recs).astype("<u8")
        order = rng.permutation(len(k))  # a build's counts are in no particular order
        specs = [TensorSpec(name, dt, (len(k), w) if w > 1 else (len(k),)) for name, (dt, w) in COUNT_COLUMNS.items()]
        meta = {"build": build, "writer": WRITER, "format_version": str(manifest.format_version)}
        data = [encode_safetensors_header(specs, meta), k[order].tobytes(), r[order].tobytes()]
        atomic_write(path / COUNTS_DIR / f"{build}.{WRITER}.{n_counts:06d}.safetensors", data, fsync=False)
        n_counts += 1

    done = 0
    seq = 0
    while done < records:
        n_rec = min(SHARD_BLOCKS // DEPTH, records - done)
        tokens = rng.integers(0, 32000, (n_rec * DEPTH, BS), dtype=np.uint32)
        keys = np.empty((n_rec * DEPTH, 32), np.uint8)
        parents = np.empty((n_rec * DEPTH, 32), np.uint8)
        for r in range(n_rec):
            parent = root
            for d in range(DEPTH):
                i = r * DEPTH + d
                key = hashlib.sha256(parent + tokens[i].astype("<u4").tobytes()).digest()
                parents[i] = np.frombuffer(parent, np.uint8)
                keys[i] = np.frombuffer(key, np.uint8)
                parent = key
        n = n_rec * DEPTH
        depth = np.tile(np.arange(DEPTH, dtype=np.uint32), n_rec)
        kv = rng.integers(0, 256, n * block_bytes, dtype=np.uint8).tobytes()
        name = shard_name(WRITER, seq)
        meta = {"format_version": str(manifest.format_version), "writer": WRITER, "build": "bench"}
        parts, crcs, checksum = encode_shard(layout, BS, kv, None, tokens, meta, manifest.block_checksum)
        size = atomic_write(path / SHARDS_DIR / name, parts, fsync=False)
        cols = {"key": keys, "parent": parents, "slot": np.arange(n, dtype=np.uint32), "depth": depth, "crc": crcs}
        smeta = {
            **{"shard": name, "blocks": str(n), "shard_bytes": str(size), "shard_crc32": str(checksum)},
            **{"writer": WRITER, "build": "bench", "format_version": str(manifest.format_version)},
        }
        atomic_write(path / INDEX_DIR / name, encode_segment(cols, smeta), fsync=False)
        # Prefix-closed counts: a block is in no more records than its parent.
        base = np.repeat(rng.integers(0, 4, n_rec), DEPTH)
        counts_k.append(keys)
        counts_r.append(base + (DEPTH - depth))
        extra_k.append(keys.reshape(n_rec, DEPTH, 32)[::3].reshape(-1, 32))
        if sum(map(len, counts_k)) >= COUNT_ROWS:
            write_counts("bench", counts_k, counts_r)
            counts_k, counts_r = [], []
        done += n_rec
        seq += 1
        if seq % 200 == 0:
            print(f"{done * DEPTH:,} blocks written", file=sys.stderr, flush=True)
    if counts_k:
        write_counts("bench", counts_k, counts_r)
    ek = np.concatenate(extra_k)
    for i in range(0, len(ek), COUNT_ROWS):
        write_counts("bench2", [ek[i : i + COUNT_ROWS]], [np.ones(min(COUNT_ROWS, len(ek) - i), np.uint64)])
    compact_store(path, fsync=False)


def linked_copy(store: Path, work: Path) -> None:
    """A copy of ``store`` whose files are hard links (maintenance never changes a file in place)."""
    if work.exists():
        shutil.rmtree(work)
    for dirpath, _, files in os.walk(store):
        rel = Path(dirpath).relative_to(store)
        (work / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(Path(dirpath) / f, work / rel / f)


# A forked child's ru_maxrss starts at its parent's RSS (Linux keeps the pre-exec high-water mark), so
# the CLI is started by a small launcher that imports nothing, not by this process (which made the store).
LAUNCHER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run([sys.executable, "-m", "prefixgen", *sys.argv[1:]], capture_output=True, text=True)
text = (p.stdout + p.stderr).strip().splitlines()
print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                  "seconds": round(time.perf_counter() - t, 1), "rc": p.returncode, "last": text[-1][:160] if text else ""}))
"""


def measure(args: list[str]) -> dict:
    """Run ``prefixgen ARGS`` in a child of a fresh launcher; the child's peak RSS (RUSAGE_CHILDREN)."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


COMMANDS = {
    "verify --quick": (["verify", "--quick", "-q"], False),
    "verify": (["verify", "-q"], False),
    "prune --min-records 8": (["prune", "--min-records", "8", "-q"], True),
    "prune --max-bytes half": (["prune", "--max-bytes", "{half}", "-q"], True),
    "prune --min-records 3 --max-bytes half": (["prune", "--min-records", "3", "--max-bytes", "{half}", "-q"], True),
    "gc": (["gc"], True),
}


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        make_store(Path(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, action="append", help="store size (repeatable); default 30000 and 300000")
    ap.add_argument("--dir", type=Path, default=Path("bench-out/maintain"))
    ap.add_argument("--skip", action="append", default=[], help="a command (as printed) not to run, or its first word")
    ap.add_argument("--only", action="append", default=[], help="run only this command (as printed; repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the generated stores for another run")
    args = ap.parse_args()
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env_path}" if env_path else str(ROOT)
    for blocks in args.blocks or [30_000, 300_000]:
        store = args.dir / f"store-{blocks}"
        if not (store / MANIFEST_FILE).exists():
            t = time.perf_counter()
            # In a child: this process stays small (see LAUNCHER).
            subprocess.run([sys.executable, __file__, "--make", str(store), str(blocks)], check=True)
            print(f"made {store} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        half = blocks // 2 * 32  # KV bytes of half the blocks
        for label, (cmd, changes) in COMMANDS.items():
            if label in args.skip or label.split()[0] in args.skip or (args.only and label not in args.only):
                continue
            target = store
            if changes:
                target = args.dir / "work"
                linked_copy(store, target)
            row = measure([c.format(half=half) for c in cmd] + [str(target)])
            if changes:
                shutil.rmtree(target)
            print(
                json.dumps({"blocks": blocks, "command": label, **row, "loadavg": open("/proc/loadavg").read().split()[0]}),
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(store)


if __name__ == "__main__":
    main()
