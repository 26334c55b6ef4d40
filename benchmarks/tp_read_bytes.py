"""Bytes each tensor-parallel rank reads from shard files, head-major store (format 5) against token-major (3).

    VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=$PWD .venv-vllm/bin/python benchmarks/tp_read_bytes.py [--ranks 2]

Builds tests_vllm's tiny random Qwen2 (2 KV heads) and one store of test_tp_engine's records per ``--kv-order``,
serves test_tp_engine's prompts on vLLM with the connector at ``tensor_parallel_size=--ranks`` (each engine in a fresh
interpreter, as that test runs it) and prints one JSON row per store: each rank's ``read_bytes`` (the connector's
LoadStats: KV, fp8 scales and head checksums read from shard files, after the live check's warm-up), the stored
blocks' bytes it loaded (all heads), and their ratio. Bytes, not time: the numbers do not depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prefixgen import BuildConfig, PrefixStore, build

ROOT = Path(__file__).resolve().parent.parent


def serve(model: str, store: str, out: str, ranks: int) -> None:
    """One served run of test_tp_engine's prompts at TP ``ranks``; writes each rank's LoadStats and the stored tokens."""
    from tests_vllm.conftest import run_vllm
    from tests_vllm.test_tp_engine import PROMPTS

    run = run_vllm(Path(model), PROMPTS, store=Path(store), tensor_parallel_size=ranks)
    Path(out).write_text(json.dumps({"rank_stats": run.rank_stats, "loaded": run.loaded}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--orders", default="tokens,heads")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tests_vllm.conftest import tiny_model, write_jsonl
    from tests_vllm.test_tp_engine import RECORDS, omp_binding

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "qwen2")
        data = write_jsonl(tmp / "text.jsonl", [{"text": r} for r in RECORDS])
        for order in args.orders.split(","):
            path = tmp / f"store-{order}"
            build(BuildConfig(dataset=str(data), model=str(model), out=str(path), device="cpu", quiet=True, kv_order=order))
            out = tmp / f"{order}.json"
            code = f"from benchmarks.tp_read_bytes import serve; serve({str(model)!r}, {str(path)!r}, {str(out)!r}, {args.ranks})"
            env = dict(
                os.environ,
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                VLLM_CPU_OMP_THREADS_BIND=omp_binding(),
                VLLM_ALLOW_INSECURE_SERIALIZATION="1",
            )
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-4000:])
            result = json.loads(out.read_text())
            store = PrefixStore.open(path)
            kv, bs = store.manifest.kv, store.block_size
            total = sum(result["loaded"]) // bs * kv.block_bytes(bs)  # the loaded blocks, every head
            ranks = [r["read_bytes"] for r in result["rank_stats"]]
            row = {
                "date": dt.date.today().isoformat(),
                "kv_order": order,
                "format_version": store.manifest.format_version,
                "tp": args.ranks,
                "kv_heads": kv.num_kv_heads,
                "loaded_tokens": sum(result["loaded"]),
                "blocks_bytes": total,
                "read_bytes_per_rank": ranks,
                "per_rank_over_total": [round(r / total, 4) for r in ranks],
                "loadavg": open("/proc/loadavg").read().split()[:3],
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
