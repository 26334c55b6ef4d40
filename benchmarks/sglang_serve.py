"""SGLang serving a `prefixgen export`: the stored prefix read from the export (HiCache file backend)
vs computed, measured with the real SGLang server (GPU machine with sglang==0.5.23 installed).

    python benchmarks/sglang_serve.py --model configs/models/llama-3.1-8b.json --prefix 4096

Saves a checkpoint of the model shape (random weights, stories tokenizer), builds a bfloat16 store
of one P-token prefix, exports it (``--to sglang``), then starts ``sglang.launch_server`` twice:
without storage (every prefix computed) and with ``--enable-hierarchical-cache
--hicache-storage-backend file`` on the export. Each server gets prompts of the prefix plus a new
question (``max_tokens=1``); printed per server: TTFT (median of --repeats, the device and host caches
flushed before each request) and the tokens SGLang reports from storage
(``sglext.cached_tokens_details.storage``). One JSON line per prefix length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch
from common import ROOT
from serving import exported_prefix, post, start_server, stop
from vllm_ttft import save_checkpoint

from prefixgen.config import ExportConfig

PORT = 30123
NAME = "bench/model"


def start(model: Path, storage: Path | None, log: Path):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--served-model-name", NAME]
    cmd += ["--port", str(PORT), "--page-size", "16", "--dtype", "bfloat16", "--enable-cache-report"]
    env = dict(os.environ)
    if storage is not None:
        cmd += ["--enable-hierarchical-cache", "--hicache-storage-backend", "file", "--hicache-mem-layout", "page_first"]
        env["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(storage)
    return start_server(cmd, PORT, log, minutes=10, env=env)


def ask(prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, tokens SGLang read from storage) of one request, after emptying the
    server's device and host caches (``/flush_cache``; it leaves the storage folder alone)."""
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{PORT}/flush_cache", method="POST"), timeout=60).read()
    t = time.perf_counter()
    body = {"model": NAME, "prompt": prompt, "max_tokens": 1, "return_cached_tokens_details": True}
    r = post(PORT, "/v1/completions", body)
    details = ((r["choices"][0].get("sglext") or {}).get("cached_tokens_details")) or {}
    return time.perf_counter() - t, int(details.get("storage") or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/llama-3.1-8b.json")
    ap.add_argument("--prefix", type=int, nargs="+", default=[4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "sglang-serve")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model = save_checkpoint(args.model, args.out / "model", torch.bfloat16, max(args.prefix) + 256)
    tok = AutoTokenizer.from_pretrained(model)
    cases = []
    for p in args.prefix:
        hicache = args.out / f"hicache-{p}"
        export = ExportConfig(to="sglang", out=str(hicache), model_name=NAME, kv_dtype="bfloat16", quiet=True)
        cases.append((exported_prefix(tok, model, p, args.out, export, 2 * args.repeats + 2), hicache))
    results = {prefix.tokens: prefix.row() for prefix, _ in cases}
    for label in ("computed", "from_export"):
        for prefix, hicache in cases:
            p = prefix.tokens
            proc = start(model, hicache if label == "from_export" else None, args.out / f"sglang-{label}-{p}.log")
            try:
                ask(prefix.prompts[0])  # warm-up (a first request compiles and allocates)
                runs = [ask(prefix.prompts[1 + i]) for i in range(args.repeats)]
            finally:
                stop(proc, 60)
            results[p][f"ttft_{label}_s"] = round(statistics.median(r[0] for r in runs), 4)
            results[p][f"storage_tokens_{label}"] = [r[1] for r in runs]
    for row in results.values():
        print(json.dumps({"bench": "sglang_serve", "model": args.model, "card": torch.cuda.get_device_name(), **row}))


if __name__ == "__main__":
    main()
