"""The connector's live check (integrations/vllm/check.py): the per-layer error it measures on correct and wrong
configurations, and what it costs. Run in the vLLM venv:

    python benchmarks/live_check.py                 # all cases
    python benchmarks/live_check.py --cases f32 bf16

A tiny random Qwen2 (2 layers, 2 KV heads of head_dim 64, initializer_range 0.2: logits of real size) is saved
with the stories tokenizer; a store is built from PROMPTS' records in each dtype. Each case starts one vLLM engine
with the connector and ``check_rate`` 1 (every request with a stored prefix is computed by vLLM and compared) and
prints, per check, the worst relative RMS error per layer (K, V), the verdict, the tokens computed instead of
loaded and the workers' check time. Wrong configurations the start-time identity refuses (hf_overrides, RoPE) are
started with that refusal switched off in this process, so that the live check alone is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the connector is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefixgen import BuildConfig, build  # noqa: E402

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 4
RECORDS = [
    SYSTEM + f"Story {i}: once upon a time, {n} found a {t} in the park."
    for i, (n, t) in enumerate(
        [("Lily", "ball"), ("Tom", "cat"), ("Mia", "tree"), ("Ben", "boat"), ("Sam", "kite"), ("Ann", "frog")]
    )
]
PROMPTS = [r + " Then" for r in RECORDS]

# name -> (store dtype, store kv_dtype, engine dtype, extra connector config, engine args, weight change, identity off)
CASES = {
    "f32": ("float32", "auto", "float32", {}, {}, None, False),
    "bf16": ("bfloat16", "auto", "bfloat16", {}, {}, None, False),
    # identity off: the weights digest of a float32 checkpoint loaded in float16 differs from the checkpoint's
    # (BENCHMARKS.md), so the start-time check refuses this store; the live check alone is measured.
    "fp16": ("float16", "auto", "float16", {}, {}, None, True),
    "fp8": ("float32", "fp8", "float32", {}, {}, None, False),
    "fp8-bf16": ("bfloat16", "fp8", "bfloat16", {}, {}, None, False),
    "f32-in-bf16-cast": ("float32", "auto", "bfloat16", {"cast_kv_dtype": True}, {}, None, False),
    "rms_norm_eps": ("float32", "auto", "float32", {}, {"hf_overrides": {"rms_norm_eps": 0.5}}, None, True),
    "rope_theta": (
        "float32",
        "auto",
        "float32",
        {},
        {"hf_overrides": {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}},
        None,
        True,
    ),
    "layer1-norm-x1.1": ("float32", "auto", "float32", {}, {}, ("model.layers.1.input_layernorm.weight", 1.1), False),
    "embedding-x1.01": ("float32", "auto", "float32", {}, {}, ("model.embed_tokens.weight", 1.01), False),
    "bf16-layer1-norm-x1.1": ("bfloat16", "auto", "bfloat16", {}, {}, ("model.layers.1.input_layernorm.weight", 1.1), False),
}


def tiny(path: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_model

    if not (path / "config.json").exists():
        make_model(
            path,
            "qwen2",
            hidden_size=256,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            initializer_range=0.2,
        )
    return path


def store_for(work: Path, model: Path, dtype: str, kv_dtype: str) -> Path:
    out = work / f"store-{dtype}-{kv_dtype}"
    if not out.exists():
        data = work / "records.jsonl"
        data.write_text("".join(json.dumps({"text": r}) + "\n" for r in RECORDS))
        build(
            BuildConfig(
                dataset=str(data), model=str(model), out=str(out), device="cpu", dtype=dtype, kv_dtype=kv_dtype, quiet=True
            )
        )
    return out


def run_case(name: str, work: Path, model: Path) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    import prefixgen.integrations.vllm as connector_module

    store_dtype, kv_dtype, engine_dtype, extra, engine_args, change, identity_off = CASES[name]
    store = store_for(work, model, store_dtype, kv_dtype)
    saved = connector_module.PrefixgenConnector._check_model
    if identity_off:  # measure the live check alone on a configuration the start-time identity refuses
        connector_module.PrefixgenConnector._check_model = lambda self, *a: None
    kv = KVTransferConfig(
        kv_connector="PrefixgenConnector",
        kv_connector_module_path="prefixgen.integrations.vllm",
        kv_role="kv_consumer",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"store": str(store), "check_rate": 1.0, **extra},
    )
    llm = LLM(
        str(model),
        dtype=engine_dtype,
        enable_prefix_caching=False,
        max_model_len=2048,
        seed=0,
        enforce_eager=True,
        kv_transfer_config=kv,
        **engine_args,
    )
    try:
        connector_module.PrefixgenConnector._check_model = saved
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler.connector
        worker = get_kv_transfer_group()
        if change is not None:
            param, factor = change

            def scale(self, param=param, factor=factor):
                dict(self.model_runner.model.named_parameters())[param].data.mul_(factor)

            llm.collective_rpc(scale)
        params = SamplingParams(max_tokens=1, temperature=0)
        t0 = time.perf_counter()
        for prompt in PROMPTS:
            llm.generate(prompt, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        checks = list(scheduler.connector_scheduler._gate.history)
        return {
            "case": name,
            "checks": len(checks),
            "failed": sum(not ok for _, ok, _ in checks),
            "worst": {
                layer: [max(w[layer][0] for _, _, w in checks), max(w[layer][1] for _, _, w in checks)] for layer in checks[0][2]
            }
            if checks
            else {},
            "limit": worker.connector_worker._checks.limit,
            "check_tokens": scheduler.claim_stats.check_tokens,
            "check_seconds": worker.stats.check_seconds,
            "wall_seconds": wall,
        }
    finally:
        connector_module.PrefixgenConnector._check_model = saved
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

        ensure_kv_transfer_shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--work", default="/tmp/prefixgen-live-check")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny(work / "model")
    print(f"load average {open('/proc/loadavg').read().split()[:3]}", flush=True)
    for name in args.cases:
        print(json.dumps(run_case(name, work, model)), flush=True)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}", flush=True)


if __name__ == "__main__":
    main()
