"""`prefixgen build` of a hybrid model (Gated DeltaNet beside attention) on this machine: prefill tokens/s
of one checkout against another, on the same dataset and model.

    python benchmarks/hybrid_build.py --code /tmp/old-checkout --code . --records 64 --min-words 40 --max-words 400
    python benchmarks/hybrid_build.py --prefill-only --records 32 --min-words 150 --max-words 170 --hidden 64

``--prefill-only``: in this process, with this checkout, the prefill step alone (``RecurrentPrefiller``) on
the same tasks (``--records`` records from the start, the states a build asks where each ends) run as one batch
(this checkout's lockstep) and one task per batch (what the build did before: task by task), ``--repeat``
times in turn, on ``--threads`` threads; tokens/s of each.

Each ``--code`` runs ``python -m prefixgen build`` in a process of its own (PYTHONPATH=that checkout) into a
fresh store, one after the other, ``--repeat`` times in turn; the model is a random-weight Qwen3-Next of the
shape below (``--hidden``), saved once with the stories260K tokenizer. Prints one JSON object: per checkout,
the build's prefilled tokens, the prefill stage's seconds (build record ``stage_seconds.prefill``) and
tokens/s (best of the repeats), and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, TOKENIZER, make_texts, write_jsonl


def save_model(path: Path, hidden: int, layers: int) -> Path:
    """A random-weight Qwen3-Next (3 Gated DeltaNet layers to each full-attention layer), float32, with the stories tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, linear_num_key_heads=4,
        linear_num_value_heads=8, linear_key_head_dim=hidden // 8, linear_value_head_dim=hidden // 8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden // 2,
        max_position_embeddings=8192,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(TOKENIZER / name, path / name)
    return path


def run_build(code: Path, data: Path, model: Path, out: Path, batch_tokens: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "prefixgen", "build", str(data), "-m", str(model), "--out", str(out), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--quiet", "--no-fsync", "--batch-tokens", str(batch_tokens)]
    subprocess.run(cmd, env=env, cwd=code, check=True, capture_output=True)
    (record,) = [json.loads(p.read_text()) for p in (out / "builds").glob("*.json")]
    prefill = record["stage_seconds"]["prefill"]
    return {"prefilled_tokens": record["prefilled_tokens"], "prefill_s": prefill, "tok_s": record["prefilled_tokens"] / prefill}


def prefill_only(args) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixgen.builder.plan import Batch, PrefillTask
    from prefixgen.builder.recurrent import RecurrentPrefiller
    from prefixgen.format import block_keys
    from prefixgen.model import probe_kv_layout

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="hybrid-prefill-"))
    try:
        path = save_model(work / "model", args.hidden, args.layers)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        layout, bs = probe_kv_layout(model), 16
        tasks = []
        for i, text in enumerate(sorted(make_texts(args.records, args.min_words, args.max_words), key=len)):
            ids = tok(text).input_ids
            n = len(ids) // bs * bs
            states = tuple(sorted({(len(ids) - 1) // bs, n // bs} - {0}))
            tasks.append(PrefillTask(i, ids[:n], 0, block_keys(ids[:n], bs, b"\0" * 32), bs, None, states))
        tokens = sum(len(t.tokens) for t in tasks)
        rates: dict[str, list[float]] = {"batched": [], "one_task_per_batch": []}
        for rep in range(args.repeat):
            for name, batches in (("batched", [Batch(tasks)]), ("one_task_per_batch", [Batch([t]) for t in tasks])):
                store = work / f"{name}-{rep}"
                store.mkdir()
                prefiller = RecurrentPrefiller(model, torch.device("cpu"), None, layout, store, bs, fsync=False)
                start = time.perf_counter()
                with torch.inference_mode():
                    for batch in batches:
                        prefiller.run(batch)
                rates[name].append(tokens / (time.perf_counter() - start))
        return {"tokens": tokens, "tok_s": {k: [round(x) for x in v] for k, v in rates.items()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, action="append", default=[], help="A prefixgen checkout (repeat the flag).")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--min-words", type=int, default=40)
    ap.add_argument("--max-words", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prefill-only", action="store_true", help="The prefill step alone, batched and task by task.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (--prefill-only)")
    args = ap.parse_args()
    if args.prefill_only:
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        result = prefill_only(args)
        loads = {"loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}
        print(json.dumps({"records": args.records, "hidden": args.hidden, "threads": args.threads, **result, **loads}))
        return
    work = Path(tempfile.mkdtemp(prefix="hybrid-build-"))
    try:
        data = write_jsonl(work / "d.jsonl", make_texts(args.records, args.min_words, args.max_words))
        model = save_model(work / "model", args.hidden, args.layers)
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        runs: dict[str, list[dict]] = {str(c): [] for c in args.code}
        for _ in range(args.repeat):
            for code in args.code:
                runs[str(code)].append(run_build(code.resolve(), data, model, work / "store", args.batch_tokens))
        result = {
            "records": args.records, "words": [args.min_words, args.max_words], "hidden": args.hidden,
            "layers": args.layers, "batch_tokens": args.batch_tokens, "loadavg_before": load_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "runs": {code: max(r, key=lambda x: x["tok_s"]) | {"all_tok_s": [round(x["tok_s"]) for x in r]} for code, r in runs.items()},
        }  # fmt: skip
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
