"""Inter-token latency of running requests while other requests load stored prefixes through PrefixgenConnector.

    python benchmarks/vllm_itl.py --prefix 4096 16384 --repeats 5     # CPU (vLLM venv), small-llama
    python benchmarks/vllm_itl.py --model configs/models/llama-3.1-8b.json --prefix 4096 16384   # GPU

One store holds a prefix of each --prefix length (random-weight checkpoint of --model, as vllm_ttft.py). One vLLM
engine with the connector (its prefix caching off: every loader loads its prefix) runs --decoders requests that
decode (short prompts, nothing stored); once they all decode, --loaders requests of a stored prefix plus a
question arrive together. Per condition, one JSON row: the decoders' inter-token latency (time between
consecutive tokens of a decoder) while the loaders are looked up, loaded and prefilled (``load``), against the
same decoders alone over 40 steps (``none``) and beside loaders of as long a prompt nothing of which is stored
(``compute``, --cold lengths: vLLM prefills it); and the loaders' TTFT (``load``: with the stored prefix,
``compute``: without).

A shared machine's load drifts: each condition runs --repeats times, the conditions interleaved in a rotating
order; a row gives the percentiles of all its runs' gaps pooled, the spread (min, max) of each run's p50 and p99,
and the load average (/proc/loadavg, 1 minute) seen around its runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, card, make_texts, write_jsonl
from vllm_ttft import engine, save_checkpoint, shutdown

from prefixgen import BuildConfig, build


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else float("nan")


def run(llm, decoders: list[list[int]], loaders: list[list[int]], tag: str) -> tuple[list[float], list[float], int]:
    """Start the decoders, wait until each has a token, then add the loaders (if any); step until every loader has
    its first token (or, with none, for ``steps`` steps). Returns the decoders' token gaps, the loaders' TTFTs,
    and the steps taken."""
    from vllm import SamplingParams, TokensPrompt

    eng = llm.llm_engine
    long = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
    for i, ids in enumerate(decoders):
        eng.add_request(f"{tag}-d{i}", TokensPrompt(prompt_token_ids=ids), long)
    last: dict[str, float] = {}
    while len(last) < len(decoders):
        for out in eng.step():
            last[out.request_id] = time.perf_counter()
    added = time.perf_counter()
    for i, ids in enumerate(loaders):
        eng.add_request(f"{tag}-l{i}", TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, temperature=0))
    gaps, ttfts, steps = [], [], 0
    pending = {f"{tag}-l{i}" for i in range(len(loaders))}
    while pending or (not loaders and steps < 40):
        outs = eng.step()
        now = time.perf_counter()
        steps += 1
        for out in outs:
            if out.request_id in pending:
                pending.discard(out.request_id)
                ttfts.append(now - added)
            elif out.request_id in last:
                gaps.append(now - last[out.request_id])
                last[out.request_id] = now
    eng.abort_request(list(last))
    while eng.has_unfinished_requests():
        eng.step()
    return gaps, ttfts, steps


def summary(runs: list[tuple[list[float], list[float], int, float]]) -> dict:
    """One condition over its repeats: the token gaps pooled over all (p50, p99, max) and each repeat's p50 and p99
    (their spread: min, max), the TTFTs' median and spread, the steps per run, the load average seen (min, max)."""
    gaps = [g for run in runs for g in run[0]]
    ttfts = [t for run in runs for t in run[1]]
    p50s = [percentile(run[0], 50) for run in runs]
    p99s = [percentile(run[0], 99) for run in runs]
    loads = [run[3] for run in runs]
    row = {
        "itl_ms_p50": percentile(gaps, 50),
        "itl_ms_p99": percentile(gaps, 99),
        "itl_ms_max": percentile(gaps, 100),
        "itl_ms_p50_spread": [min(p50s), max(p50s)],
        "itl_ms_p99_spread": [min(p99s), max(p99s)],
        "gaps": len(gaps),
        "steps": [run[2] for run in runs],
        "repeats": len(runs),
        "loadavg": [min(loads), max(loads)],
    }
    if ttfts:
        row |= {
            "ttft_s_median": round(statistics.median(ttfts), 3),
            "ttft_s_spread": [round(min(ttfts), 3), round(max(ttfts), 3)],
        }
    return row


def loadavg() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/small-llama.json")
    ap.add_argument("--prefix", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument(
        "--cold",
        type=int,
        nargs="*",
        default=[4096],
        help="prompt lengths also run with nothing stored (vLLM computes them): TTFT without a stored prefix, and the "
        "decoders' token gaps beside that prefill",
    )
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--loaders", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each condition, interleaved (the order rotates)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "vllm-itl")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    max_len = max(args.prefix + args.cold) + 4096 + 128
    model = save_checkpoint(args.model, args.out / "model", dtype, max_len)
    tokenizer = AutoTokenizer.from_pretrained(model)

    def text(tokens: int, seed: int) -> str:
        return tokenizer.decode(
            tokenizer(make_texts(1, tokens, tokens, seed=seed)[0]).input_ids[:tokens], skip_special_tokens=True
        )

    stored = {p: text(p, p) for p in args.prefix}
    cold = {p: text(p, 10**6 + p) for p in args.cold}  # other texts: nothing of them is stored
    store = args.out / "store"
    data = write_jsonl(args.out / "prefixes.jsonl", list(stored.values()))
    build(
        BuildConfig(
            dataset=str(data),
            model=str(model),
            out=str(store),
            overwrite=True,
            quiet=True,
            device=device,
            max_tokens=max(args.prefix),
        )
    )
    decoders = [tokenizer(f"Story {i}: once upon a time a little cat").input_ids for i in range(args.decoders)]

    def prompts(body: str) -> list[list[int]]:
        return [tokenizer(body + f" Question {i}: what happened next?").input_ids for i in range(args.loaders)]

    conditions = [("none", 0, [])]
    conditions += [("load", p, prompts(t)) for p, t in stored.items()]
    conditions += [("compute", p, prompts(t)) for p, t in cold.items()]
    runs: dict[tuple[str, int], list] = {(name, p): [] for name, p, _ in conditions}
    shard_bytes: dict[tuple[str, int], list[int]] = {(name, p): [] for name, p, _ in conditions}  # read per run
    # check_rate 0: after the first live check no request is computed to be compared (a run of its own would differ)
    llm = engine(model, str(dtype).removeprefix("torch."), max_len, store, eager=device == "cpu", options={"check_rate": 0})
    try:
        run(llm, decoders, prompts(stored[args.prefix[0]]), "warm")  # the live check passes here: loads allowed after
        for r in range(args.repeats):
            for k in range(len(conditions)):
                name, p, loaders = conditions[(k + r) % len(conditions)]  # rotated: drift in the load hits each alike
                before, read = loadavg(), get_kv_transfer_group().stats.read_bytes
                gaps, ttfts, steps = run(llm, decoders, loaders, f"r{r}-{name}{p}")
                runs[(name, p)].append((gaps, ttfts, steps, max(before, loadavg())))
                shard_bytes[(name, p)].append(get_kv_transfer_group().stats.read_bytes - read)
        for (name, p), done in runs.items():
            row = {
                "bench": "vllm_itl",
                "date": dt.date.today().isoformat(),
                "card": card(device),
                "condition": name,  # none: decoders alone; load: loaders of a stored prefix; compute: nothing stored
                "prefix_tokens": p,
                "decoders": args.decoders,
                "loaders": args.loaders if name != "none" else 0,
                **summary(done),
                # Bytes the connector read from shards per run: the loaders share one stored prefix (single-flight)
                "read_MB_per_run": round(statistics.median(shard_bytes[(name, p)]) / 1e6, 1),
            }
            print(json.dumps(row), flush=True)
    finally:
        shutdown(llm)


if __name__ == "__main__":
    main()
