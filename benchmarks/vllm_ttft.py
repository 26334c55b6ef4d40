"""vLLM time to first token with PrefixgenConnector loading a stored prefix vs vLLM computing it.

    python benchmarks/vllm_ttft.py --model configs/models/small-llama.json --prefix 1024 4096             # CPU (vLLM venv)
    python benchmarks/vllm_ttft.py --model configs/models/llama-3.1-8b.json --prefix 1024 4096 16384      # GPU

Saves a checkpoint of the model shape (random weights, stories tokenizer; positions raised to fit
the longest prompt) for vLLM to load, and for each prefix length P builds a store holding a P-token
prefix. Then, in one vLLM engine with the connector and one without (vLLM's own prefix caching off
in both, so every request either loads or computes the prefix): TTFT = wall time of
``LLM.generate(prompt, max_tokens=1)`` for prompts made of the prefix plus a new question (median
of --repeats, after one warm-up), the connector's load bandwidth (store read + CRC + cache write, per
the worker's LoadStats) next to ``PrefixStore.load`` of the same prefix in this process, and the scheduler-side match time of the whole prompt (``PrefixStore.find_prefix``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the connector's stats are readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from common import ROOT, TOKENIZER, card, make_texts, write_jsonl  # noqa: E402

from prefixgen import BuildConfig, PrefixStore, build  # noqa: E402
from prefixgen.config import ConnectorConfig  # noqa: E402


def save_checkpoint(config_path: str, out: Path, dtype: torch.dtype, positions: int) -> Path:
    """A checkpoint folder vLLM can load: the config's shape with random weights and the stories tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path) if Path(config_path).exists() else ROOT / config_path
    data = json.loads(path.read_text())
    data.pop("_comment", None)
    data["max_position_embeddings"] = max(data.get("max_position_embeddings", 0), positions)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(TOKENIZER / name, out / name)
    return out


def engine(model: Path, dtype: str, max_len: int, store: Path | None, eager: bool, options: dict | None = None):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = None
    if store is not None:
        kv = KVTransferConfig(
            kv_connector="PrefixgenConnector",
            kv_connector_module_path="prefixgen.integrations.vllm",
            kv_role="kv_consumer",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"store": str(store)} | (options or {}),
        )
    return LLM(
        str(model),
        dtype=dtype,
        enable_prefix_caching=False,
        max_model_len=max_len,
        kv_transfer_config=kv,
        seed=0,
        enforce_eager=eager,
    )


def ttft(llm, prompt_ids: list[int]) -> tuple[float, int]:
    from vllm import SamplingParams, TokensPrompt

    t = time.perf_counter()
    out = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return time.perf_counter() - t, out[0].num_cached_tokens or 0


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def _timed(load, ids: list[int], dtype: torch.dtype) -> float:
    t = time.perf_counter()
    load(ids, dtype=dtype)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/small-llama.json")
    ap.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (vLLM's enforce_eager): starts in seconds")
    ap.add_argument("--staging-bytes", default=None, help="the connector's staging_bytes (default: its own, 64MiB)")
    ap.add_argument("--yield-seconds", type=float, default=None, help="the connector's yield_seconds (default: its own)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "vllm-ttft")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    max_len = max(args.prefix) + 128
    model = save_checkpoint(args.model, args.out / "model", dtype, max_len)
    tokenizer = AutoTokenizer.from_pretrained(model)
    questions = [
        f" Question {i}: what happened to the little {w} next?" for i, w in enumerate(["cat", "dog", "bird", "fox", "owl"])
    ]
    options = {"staging_bytes": args.staging_bytes, "yield_seconds": args.yield_seconds}
    options = {k: v for k, v in options.items() if v is not None}
    cases = []
    for p in args.prefix:
        prefix_text = tokenizer.decode(tokenizer(make_texts(1, p, p, seed=p)[0]).input_ids[:p], skip_special_tokens=True)
        store = args.out / f"store-{p}"
        data = write_jsonl(args.out / f"prefix-{p}.jsonl", [prefix_text])
        build(BuildConfig(dataset=str(data), model=str(model), out=str(store), overwrite=True, quiet=True, device=device))
        prompts = [tokenizer(prefix_text + q).input_ids for q in questions]
        cases.append((p, store, prompts))
    # Without the connector: vLLM computes every prefix.
    plain = engine(model, str(dtype).removeprefix("torch."), max_len, None, args.eager)
    no_store = {}
    for p, _, prompts in cases:
        ttft(plain, prompts[0])
        no_store[p] = statistics.median(ttft(plain, prompts[1 + i % 4])[0] for i in range(args.repeats))
    shutdown(plain)
    del plain
    for p, store_dir, prompts in cases:
        llm = engine(model, str(dtype).removeprefix("torch."), max_len, store_dir, args.eager, options)
        ttft(llm, prompts[0])
        stats = get_kv_transfer_group().stats
        bytes0, seconds0 = stats.bytes, stats.seconds
        runs = [ttft(llm, prompts[1 + i % 4]) for i in range(args.repeats)]
        load_rate = (stats.bytes - bytes0) / (stats.seconds - seconds0) / 1e9
        shutdown(llm)
        del llm
        store = PrefixStore.open(store_dir)
        ids = prompts[1][:-1]
        store.find_prefix(store.keys(ids))
        t = time.perf_counter()
        for _ in range(100):
            store.find_prefix(store.keys(ids))
        match_ms = (time.perf_counter() - t) / 100 * 1e3
        # The same prefix through PrefixStore.load in this process: the rate the connector is measured against.
        loaded = store.match(ids) * store.manifest.kv.bytes_per_token
        store.load(ids, dtype=dtype)
        load_s = statistics.median(_timed(store.load, ids, dtype) for _ in range(args.repeats))
        with_store = statistics.median(r[0] for r in runs)
        print(
            json.dumps(
                {
                    "date": dt.date.today().isoformat(),
                    "card": card(device),
                    "model": Path(args.model).stem,
                    "dtype": str(dtype).removeprefix("torch."),
                    "prefix_tokens": p,
                    "prompt_tokens": len(prompts[1]),
                    "cached_tokens": runs[0][1],
                    "ttft_no_store_s": round(no_store[p], 4),
                    "ttft_store_s": round(with_store, 4),
                    "speedup": round(no_store[p] / with_store, 2),
                    "load_GB_s": round(load_rate, 2),
                    "store_load_GB_s": round(loaded / load_s / 1e9, 2),
                    "staging_bytes": args.staging_bytes or "64MiB",
                    "yield_seconds": ConnectorConfig.from_extra({"store": "-"} | options).yield_seconds,
                    "match_ms": round(match_ms, 3),
                    "vllm": __import__("vllm").__version__,
                    "eager": args.eager,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
