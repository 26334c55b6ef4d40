"""Unmodified ``vllm serve`` with vLLM's own ``OffloadingConnector`` serving a `prefixgen export --to vllm`
(GPU machine with vllm==0.32.0; vLLM's GPU<->CPU offload transfer needs CUDA).

    python benchmarks/vllm_offload_serve.py --model configs/models/llama-3.1-8b.json --prefix 1024 4096

Saves a checkpoint of the model shape (random weights, stories tokenizer), builds a bfloat16 store of one
P-token prefix and exports it (``--to vllm``, canonical layout, the checkpoint's path as ``--model``). Then
starts ``vllm serve`` (prefix caching off, so every hit is the connector's) without a connector, and twice
(a cold restart: a new process, an empty CPU tier) with ``--kv-transfer-config`` naming the
``OffloadingConnector`` with a CPU tier and an ``fs`` tier on the export. Per server: the greedy
continuation of prompt 0 (16 tokens), the tokens it reports cached (``usage.prompt_tokens_details``), and
the median TTFT (``max_tokens=1``) of new prompts sharing the prefix (the first one of each server is
loaded from the files; later ones may come from the CPU tier). One JSON line per prefix length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ROOT
from serving import exported_prefix, post, start_server, stop
from vllm_ttft import save_checkpoint

from prefixgen.config import ExportConfig

PORT = 30124


def kv_transfer_config(root: Path) -> dict:
    """The connector configuration README's "Serve a store with vLLM's own offloading" gives."""
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": 4 << 30,
            "canonical_layout": True,
            "secondary_tiers": [{"type": "fs", "root_dir": str(root)}],
        },
    }


def start(model: Path, root: Path | None, log: Path, max_len: int):
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--port", str(PORT)]
    cmd += ["--block-size", "16", "--dtype", "bfloat16", "--max-model-len", str(max_len), "--no-enable-prefix-caching"]
    cmd += ["--enable-prompt-tokens-details", "--seed", "0"]
    if root is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(root))]
    return start_server(cmd, PORT, log, minutes=15)


def ask(model: Path, prompt: list[int], max_tokens: int) -> tuple[float, int, str]:
    """(seconds, cached prompt tokens, text) of one greedy completion."""
    t = time.perf_counter()
    r = post(PORT, "/v1/completions", {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    details = (r.get("usage") or {}).get("prompt_tokens_details") or {}
    return time.perf_counter() - t, int(details.get("cached_tokens") or 0), r["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/llama-3.1-8b.json")
    ap.add_argument("--prefix", type=int, nargs="+", default=[4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "vllm-offload")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    max_len = max(args.prefix) + 256
    model = save_checkpoint(args.model, args.out / "model", torch.bfloat16, max_len)
    tok = AutoTokenizer.from_pretrained(model)
    for p in args.prefix:
        root = args.out / f"offload-{p}"
        export = ExportConfig(to="vllm", out=str(root), model_name=str(model), quiet=True)
        prefix = exported_prefix(tok, model, p, args.out, export, args.repeats + 1)
        row = prefix.row()
        for label, folder in (("computed", None), ("from_export", root), ("from_export_restarted", root)):
            proc = start(model, folder, args.out / f"vllm-{label}-{p}.log", max_len)
            try:
                _, cached, text_out = ask(model, prefix.prompts[0], 16)
                runs = [ask(model, prefix.prompts[1 + i], 1) for i in range(args.repeats)]
            finally:
                stop(proc, 120)
            row[f"cached_tokens_{label}"] = [cached] + [r[1] for r in runs]
            row[f"ttft_{label}_s"] = round(statistics.median(r[0] for r in runs), 4)
            row[f"greedy_{label}"] = text_out
        row["greedy_equal"] = row["greedy_computed"] == row["greedy_from_export"] == row["greedy_from_export_restarted"]
        print(json.dumps({"bench": "vllm_offload_serve", "model": args.model, "card": torch.cuda.get_device_name(), **row}))


if __name__ == "__main__":
    main()
