"""Inter-token latency of running requests while other requests load stored prefixes through PrefixgenConnector.

    python benchmarks/vllm_itl.py --prefix 4096 16384            # CPU (vLLM venv), small-llama
    python benchmarks/vllm_itl.py --model configs/models/llama-3.1-8b.json --prefix 4096 16384   # GPU

One store holds a prefix of each --prefix length (random-weight checkpoint of --model, as vllm_ttft.py). One vLLM
engine with the connector (its prefix caching off: every loader loads its prefix) runs --decoders requests that
decode (short prompts, nothing stored); once they all decode, --loaders requests of a stored prefix plus a
question arrive together. Reported per prefix length: the decoders' inter-token latency (time between
consecutive tokens of a decoder, p50/p99/max) while the loaders are looked up, loaded and prefilled, against the
same decoders' over as many steps with no loader; and the loaders' TTFT (median, max).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/small-llama.json")
    ap.add_argument("--prefix", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--loaders", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "vllm-itl")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    max_len = max(args.prefix) + 4096 + 128
    model = save_checkpoint(args.model, args.out / "model", dtype, max_len)
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = {
        p: tokenizer.decode(tokenizer(make_texts(1, p, p, seed=p)[0]).input_ids[:p], skip_special_tokens=True)
        for p in args.prefix
    }
    store = args.out / "store"
    data = write_jsonl(args.out / "prefixes.jsonl", list(texts.values()))
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
    llm = engine(model, str(dtype).removeprefix("torch."), max_len, store, eager=device == "cpu")
    try:
        run(llm, decoders, [], "warm")
        base_gaps, _, _ = run(llm, decoders, [], "base")
        for p, text in texts.items():
            loaders = [tokenizer(text + f" Question {i}: what happened next?").input_ids for i in range(args.loaders)]
            gaps, ttfts, steps = run(llm, decoders, loaders, f"p{p}")
            row = {
                "bench": "vllm_itl",
                "date": dt.date.today().isoformat(),
                "card": card(device),
                "prefix_tokens": p,
                "decoders": args.decoders,
                "loaders": args.loaders,
                "itl_ms_p50": percentile(gaps, 50),
                "itl_ms_p99": percentile(gaps, 99),
                "itl_ms_max": percentile(gaps, 100),
                "no_load_itl_ms_p50": percentile(base_gaps, 50),
                "no_load_itl_ms_p99": percentile(base_gaps, 99),
                "ttft_s_median": round(statistics.median(ttfts), 3),
                "ttft_s_max": round(max(ttfts), 3),
                "steps": steps,
                "loadavg": open("/proc/loadavg").read().split()[0],
            }
            print(json.dumps(row), flush=True)
    finally:
        shutdown(llm)


if __name__ == "__main__":
    main()
