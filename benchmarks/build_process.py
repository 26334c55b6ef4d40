"""Whole processes on a RAG-like dataset: `prefixgen build` against a bare forward loop.

    python benchmarks/build_process.py --records 150 --tokens 11500 --max-tokens 1024 --layers 4 \\
        [--code PATH ...] [--repeats 2]

The dataset is made here: ``--records`` records of about ``--tokens`` tokens each (random words),
far longer than ``--max-tokens``, as RAG documents are. Each timed run is a fresh process, so
interpreter start, imports, model load, reading and tokenizing count:

(a) bare: load the model, read the records' ids (tokenized and cut by this script beforehand),
    forward only (``logits_to_keep=1``, no cache kept) in batches of ``--batch-tokens``;
(b) prefixgen: ``python -m prefixgen build DATA --max-tokens N ...`` into a fresh store, once per
    ``--code`` folder (a checkout of prefixgen to time; default: this one), so before and after
    run side by side on the same machine state.

Prints one JSON object: seconds of each run, seconds per 1,000 prefilled tokens, the ratio of
prefixgen's to bare's (goal: at most 1.3), and the build's own stage seconds.

``--input-only``: no model, no forward; time the build's input steps alone (read, tokenize, plan,
batch: what runs before the first prefill and beside the later ones) in a fresh process per
``--code``: seconds until the first batch is ready, until the last, and CPU seconds (all threads).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, TOKENIZER, WORDS, card


def make_model(folder: Path, config_path: Path, layers: int) -> Path:
    """The shape in ``config_path`` with ``layers`` layers, random weights, saved with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "model.safetensors").exists():
        return folder
    data = json.loads(config_path.read_text())
    data.pop("_comment", None)
    data["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def make_dataset(path: Path, records: int, tokens: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """Write ``records`` documents of about ``tokens`` tokens; return their ids cut to ``max_tokens``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rng = random.Random(seed)
    sample = " ".join(rng.choice(WORDS) for _ in range(4000))
    words = int(tokens * 4000 / len(tok(sample).input_ids))
    texts = [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(records)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [ids[:max_tokens] for ids in tok(texts).input_ids]


def bare_worker(model_dir: str, ids_file: str, batch_tokens: int) -> None:
    """The bare loop, run as its own process."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = sorted(json.loads(Path(ids_file).read_text()), key=len, reverse=True)
    with torch.inference_mode():
        i = 0
        while i < len(ids):
            rows = max(1, batch_tokens // len(ids[i]))
            batch = ids[i : i + rows]
            x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
            for r, row in enumerate(batch):
                x[r, : len(row)] = torch.tensor(row)
            model(input_ids=x, use_cache=False, logits_to_keep=1)
            i += rows


INPUT_ONLY = """
import json, sys, time
from transformers import AutoTokenizer
from prefixgen.builder.plan import Planner, batch_tasks
from prefixgen.data.records import RecordTokenizer
from prefixgen.data.source import read_records
from prefixgen.format import BuildRecord, root_key
data, model, max_tokens, batch_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
stats = BuildRecord("", "")
t, cpu = time.perf_counter(), time.process_time()
tokenized = RecordTokenizer(tok, stats, max_tokens)(read_records(data, "text"))
planner = Planner(root_key("00" * 32), 16, batch_tokens, lambda keys: [False] * len(keys), stats)
batches = batch_tasks(planner(tokenized), batch_tokens, 32)
next(batches)
first = time.perf_counter() - t
n = 1 + sum(1 for _ in batches)
print(json.dumps({"first_batch_s": round(first, 3), "all_batches_s": round(time.perf_counter() - t, 3),
                  "cpu_s": round(time.process_time() - cpu, 3), "batches": n, "dataset_tokens": stats.dataset_tokens}))
"""


def input_only(code: Path, data: Path, model: Path, max_tokens: int, batch_tokens: int) -> dict:
    """The build's input steps alone, in a fresh process running prefixgen from ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code.resolve())}
    cmd = [sys.executable, "-c", INPUT_ONLY, str(data), str(model), str(max_tokens), str(batch_tokens)]
    out = subprocess.run(cmd, check=True, env=env, cwd=code, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])  # after the tokenizer's warnings


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    """Wall seconds of ``cmd``. Python puts the working folder first on the import path, so each
    prefixgen run starts in the checkout it times."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "configs" / "models" / "small-llama.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--records", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=11500, help="tokens per record, about")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--code", type=Path, nargs="*", default=[ROOT], help="prefixgen checkouts to time")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "process")
    ap.add_argument("--input-only", action="store_true", help="time the input steps alone (no model)")
    ap.add_argument("--bare-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_worker:
        bare_worker(args.bare_worker[0], args.bare_worker[1], int(args.bare_worker[2]))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    model = make_model(args.out / f"model-{args.model.stem}-{args.layers}l", args.model, args.layers)
    data = args.out / "rag.jsonl"
    ids = make_dataset(data, args.records, args.tokens, args.max_tokens)
    (args.out / "ids.json").write_text(json.dumps(ids))
    prefilled = sum(len(r) // 16 * 16 for r in ids)  # what the build prefills: full blocks
    if args.input_only:
        runs = {
            str(c): [input_only(c, data, model, args.max_tokens, args.batch_tokens) for _ in range(args.repeats)]
            for c in args.code
        }
        print(json.dumps({"card": card("cpu"), "records": args.records, "tokens_per_record": args.tokens, "runs": runs}))
        return
    bare_cmd = [sys.executable, __file__, "--bare-worker", str(model), str(args.out / "ids.json"), str(args.batch_tokens)]
    runs: dict[str, list[float]] = {"bare": []}
    stages: dict[str, dict] = {}
    for _ in range(args.repeats):
        runs["bare"].append(timed(bare_cmd))
        for code in args.code:
            store = args.out / "store"
            cmd = [sys.executable, "-m", "prefixgen", "build", str(data), "--model", str(model), "--out", str(store)]
            cmd += ["--overwrite", "--quiet", "--no-fsync", "--device", "cpu", "--dtype", "float32"]
            cmd += ["--max-tokens", str(args.max_tokens), "--batch-tokens", str(args.batch_tokens)]
            env = {**os.environ, "PYTHONPATH": str(code.resolve())}
            runs.setdefault(str(code), []).append(timed(cmd, env, code))
            (record,) = [json.loads(p.read_text()) for p in (store / "builds").glob("*.json")]
            assert record["prefilled_tokens"] == prefilled, (record["prefilled_tokens"], prefilled)
            stages[str(code)] = {"seconds": record["seconds"], **record["stage_seconds"]}
    best = {name: min(times) for name, times in runs.items()}
    print(
        json.dumps(
            {
                "card": card("cpu"),
                "records": args.records,
                "dataset_tokens_per_record": args.tokens,
                "prefilled_tokens": prefilled,
                "seconds": runs,
                "ms_per_1k_prefilled_tokens": {k: round(1e6 * v / prefilled, 1) for k, v in best.items()},
                "over_bare": {k: round(v / best["bare"], 3) for k, v in best.items() if k != "bare"},
                "stage_seconds_of_last_run": stages,
            }
        )
    )


if __name__ == "__main__":
    main()
