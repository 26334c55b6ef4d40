"""Error of continuation logits with an fp8 store against a store in the model's dtype.

    python benchmarks/fp8_error.py --model configs/models/qwen2.5-0.5b.json --device cuda

Builds the same records into a native store and an `--kv-dtype fp8` store, then for each
record loads its longest stored prefix (all but the last block) from each store and runs the
remaining tokens. Reports the max and mean |logit difference| against a full forward pass with
no cache (the reference), the top-1 agreement, and the mean KL divergence, for both stores, and
the bytes per token of each store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
from common import ROOT, card, load_model, make_texts, write_jsonl

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.compat import cache_kwargs


@torch.inference_mode()
def errors(model, store: PrefixStore, prompts: list[list[int]], device) -> dict:
    max_abs, sum_abs, n_logits, agree, n_pos, kl = 0.0, 0.0, 0, 0, 0, 0.0
    bs = store.block_size
    for ids in prompts:
        n = max(0, (len(ids) - 1) // bs - 1) * bs  # leave the last block(s) to the model
        cache = store.load(ids[:n], device=device, dtype=model.dtype)
        ref = model(torch.tensor([ids], device=device)).logits[0, n:].float()
        got = model(torch.tensor([ids[n:]], device=device), **cache_kwargs(model, cache)).logits[0].float()
        diff = (got - ref).abs()
        max_abs = max(max_abs, diff.max().item())
        sum_abs += diff.sum().item()
        n_logits += diff.numel()
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        n_pos += got.shape[0]
        kl += torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
    return {
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": sum_abs / n_logits,
        "top1_agreement": agree / n_pos,
        "mean_kl": kl / n_pos,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/stories260K/config.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "fp8")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer, name = load_model(args.model, device, dtype)
    texts = make_texts(args.records, 60, 200)
    data = write_jsonl(args.out / "data.jsonl", texts)
    prompts = [tokenizer(t).input_ids for t in texts]
    result = {
        "date": dt.date.today().isoformat(),
        "card": card(device),
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
    }
    for kv_dtype in ("auto", "fp8"):
        out = args.out / f"store-{kv_dtype}"
        rec = build(
            BuildConfig(
                dataset=str(data), model=name, out=str(out), overwrite=True, quiet=True, device=str(device), kv_dtype=kv_dtype
            ),
            model=model,
            tokenizer=tokenizer,
        )
        label = "native" if kv_dtype == "auto" else "fp8"
        result[label] = {
            **{k: round(v, 6) for k, v in errors(model, PrefixStore.open(out), prompts, device).items()},
            "kv_bytes_per_token": round(rec.bytes_written / rec.stored_tokens, 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
