"""The store writer's throughput with head-major blocks (format 5: the batch permuted to [blocks, H, B, L, 2, D] on
its device before the copy to host memory) against token-major (format 3), on synthetic KV.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/writer_order.py

64 sequences of 16 blocks (B = 16) of bfloat16 KV shaped like an 8B model's (16 layers here, 8 KV heads, head_dim 64),
through StoreWriter.add (copy, fp8 off), CRCs and shard writes (no fsync), both orders interleaved 3 times; one JSON row
per run: seconds in all, seconds in add (the copies), MB/s, the load average.
"""

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prefixgen.format import KVLayout, Manifest, ModelFingerprint, block_keys, root_key
from prefixgen.store.writer import StoreWriter, prepare_store


def run(order: str, root: Path, n_seq: int = 64, blocks: int = 16) -> tuple[float, float, int]:
    """Write n_seq sequences of ``blocks`` blocks into a fresh store of ``order``: (seconds, seconds in add, bytes)."""
    L = KVLayout(num_layers=16, num_kv_heads=8, head_dim=64, dtype="bfloat16", order=order)
    fp = ModelFingerprint(
        name="m",
        architecture="A",
        model_type="a",
        num_layers=16,
        num_kv_heads=8,
        head_dim=64,
        weights_digest="11" * 32,
        tokenizer_digest="22" * 32,
    )
    m = Manifest(16, fp, L, root_key("11" * 32).hex(), format_version=L.format_version)
    out = root / order
    shutil.rmtree(out, ignore_errors=True)
    m = prepare_store(out, m, "new")
    kv = torch.randn(blocks * 16, 16, 2, 8, 64).to(torch.bfloat16)
    t = time.perf_counter()
    add = 0.0
    with StoreWriter(out, m, "b", fsync=False) as w:
        for i in range(n_seq):
            toks = list(range(i * 10000, i * 10000 + blocks * 16))
            keys = block_keys(toks, 16, m.root_key)
            a = time.perf_counter()
            w.add(keys, [m.root_key] + keys[:-1], list(range(blocks)), np.asarray(toks, np.uint32).reshape(-1, 16), kv)
            add += time.perf_counter() - a
    return time.perf_counter() - t, add, w.bytes_written


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            for order in ("tokens", "heads"):
                report(order, *run(order, Path(tmp)))


def report(order: str, total: float, add: float, b: int) -> None:
    print(
        json.dumps(
            {
                "order": order,
                "seconds": round(total, 3),
                "add_seconds": round(add, 3),
                "MB": round(b / 1e6, 1),
                "MB_s": round(b / 1e6 / total, 1),
                "loadavg": open("/proc/loadavg").read().split()[0],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
