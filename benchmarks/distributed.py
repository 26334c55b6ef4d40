"""Distributed `prefixgen build`: tokens/s of 1, 2, 3, ... ranks on one dataset, and what the
distributed machinery costs each rank.

    python benchmarks/distributed.py --model models/stories260K/config.json --device cpu --ranks 1 2 3
    python benchmarks/distributed.py --model configs/models/qwen2.5-1.5b.json --device cuda --ranks 1 2 4 8

Each run is a fresh store; 1 rank is the plain `python -m prefixgen build`, N ranks are
`torchrun --standalone --nproc-per-node N -m prefixgen build`. The dataset has a system prompt
shared by every record and ``--groups`` documents each shared by a group of records (RAG-style),
then a question of each record's own.

Per run: wall seconds of the whole command (process start, imports and model load included) and
*build* seconds (the slowest rank, from its count pass to its last write); tokens/s of both over
the stored (= prefilled) tokens; per rank the prefilled tokens, the count pass (``dist_count``),
the head phase (``dist_heads``, waits for other ranks included), the input stages of the build
pass (read + tokenize), the tokens it tokenized over all passes (``tokenized_tokens``; absent
before the count was recorded: there every rank tokenized the whole dataset two to three times),
and the bytes and records of the dataset it read in its count pass (``read_bytes``,
``read_records``; absent before they were recorded: there every rank read the whole file,
``dataset_bytes``) and the bytes outside its share it read to number its records (``scanned_bytes``:
before share-local numbering, the bytes before its share whose line ends it counted; now 0). On CPU, each rank runs
``--threads`` threads (default 1, so that 1 and N ranks compare per process; ``split`` gives each
rank ``cores // N``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, WORDS, card, load_model, write_jsonl


def make_dataset(
    path: Path, records: int, system_words: int, groups: int, doc_words: int, min_words: int, max_words: int
) -> Path:
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    system = words(system_words)
    docs = [words(doc_words) for _ in range(groups)]
    texts = [f"{system} {docs[i % groups]} Q: {words(rng.randint(min_words, max_words))}" for i in range(records)]
    return write_jsonl(path, texts)


def model_dir(config: str, dtype: torch.dtype, work: Path) -> Path:
    """A model folder the CLI can load: the given one, or random weights of a config's shape."""
    path = Path(config)
    path = path if path.exists() else ROOT / path
    if (path.parent / "model.safetensors").exists():
        return path.parent
    model, tokenizer, _ = load_model(path, "cpu", dtype)
    out = work / path.stem
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(ranks: int, data: Path, model: Path, store: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // ranks) if args.threads == "split" else int(args.threads)
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable, "-m", "prefixgen"]
    if ranks > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "-m",
            "prefixgen",
        ]
    cmd = [*launcher, "build", str(data), "--model", str(model), "--out", str(store), "--quiet", "--no-fsync"]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--batch-tokens", str(args.batch_tokens)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    sys.path.insert(0, str(ROOT))
    from prefixgen import PrefixStore

    (b,) = PrefixStore.open(store).builds()
    parts = b.ranks or [b.to_dict() | {"rank": 0}]
    per_rank = []
    for r in parts:
        st = r["stage_seconds"]
        per_rank.append(
            {
                "rank": r["rank"],
                "prefilled_tokens": r["prefilled_tokens"],
                "head_tokens": r.get("head_tokens", 0),
                "tokenized_tokens": r.get("tokenized_tokens"),
                # Bytes and records of the dataset it read in its count pass (absent before they were
                # recorded: there every rank read and parsed the whole file, dataset_bytes).
                "read_bytes": r.get("read_bytes"),
                "read_records": r.get("read_records"),
                "scanned_bytes": r.get("scanned_bytes"),  # outside its share, line ends counted only (now 0)
                # A rank's seconds include its count pass and head phase since they run inside the
                # build's error handling (tokenized_tokens recorded); before, they came first.
                "build_s": round(
                    r["seconds"] + (0 if "tokenized_tokens" in r else st.get("dist_count", 0) + st.get("dist_heads", 0)), 2
                ),
                "dist_count_s": st.get("dist_count", 0.0),
                "dist_heads_s": st.get("dist_heads", 0.0),
                "input_s": round(st.get("read", 0) + st.get("tokenize", 0), 2),
                "prefill_s": st.get("prefill", 0.0),
            }
        )
    build_s = max(r["build_s"] for r in per_rank)
    loads = [r["prefilled_tokens"] for r in per_rank]
    return {
        "ranks": ranks,
        "status": b.status,
        "records": b.records,
        "stored_tokens": b.stored_tokens,
        "prefilled_tokens": b.prefilled_tokens,
        "wall_s": round(wall, 2),
        "wall_tok_s": round(b.stored_tokens / wall),
        "build_s": round(build_s, 2),
        "build_tok_s": round(b.stored_tokens / build_s),
        "max_over_mean_load": round(max(loads) / (sum(loads) / len(loads)), 3),
        "dataset_tokens": b.dataset_tokens,
        "dataset_bytes": data.stat().st_size,
        "tokenized_over_dataset": round(sum(r["tokenized_tokens"] or 0 for r in per_rank) / b.dataset_tokens, 2)
        if all(r["tokenized_tokens"] is not None for r in per_rank)
        else None,
        "per_rank": per_rank,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/stories260K/config.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--records", type=int, default=1200)
    p.add_argument("--system-words", type=int, default=60)
    p.add_argument("--groups", type=int, default=12)
    p.add_argument("--doc-words", type=int, default=120)
    p.add_argument("--min-words", type=int, default=40)
    p.add_argument("--max-words", type=int, default=400)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--threads", default="1", help="CPU threads per rank: a number, or 'split' (cores // ranks)")
    args = p.parse_args()
    if args.device.startswith("cuda") and max(args.ranks) > torch.cuda.device_count():
        print(
            json.dumps(
                {"skipped": f"--ranks up to {max(args.ranks)} needs that many GPUs; this machine has {torch.cuda.device_count()}"}
            )
        )
        return
    work = Path(tempfile.mkdtemp(prefix="prefixgen-dist-"))
    try:
        data = make_dataset(
            work / "data.jsonl", args.records, args.system_words, args.groups, args.doc_words, args.min_words, args.max_words
        )
        model = model_dir(args.model, getattr(torch, args.dtype), work)
        rows = [run(n, data, model, work / f"store-{n}", args) for n in args.ranks]
        base = rows[0]["build_tok_s"]
        for row in rows:
            row["speedup_build"] = round(row["build_tok_s"] / base, 2)
        print(
            json.dumps(
                {
                    "bench": "distributed",
                    "model": args.model,
                    "device": card(args.device),
                    "date": dt.date.today().isoformat(),
                    "records": args.records,
                    "threads_per_rank": args.threads if args.device == "cpu" else None,
                    "rows": rows,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
