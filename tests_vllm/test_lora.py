"""LoRA on a running vLLM engine with the connector: a request with an adapter loads nothing from the store (its
KV is not the base model's the store holds) and gets plain vLLM's output with the same adapter; the same prompt
without the adapter is loaded and gets plain vLLM's output.

The adapter is made here: PEFT's file layout (``adapter_config.json`` and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A/lora_B.weight``, the names vLLM 0.32.0's ``parse_fine_tuned_lora_name`` reads)
with random nonzero A and B for every layer's q_proj and v_proj, so it changes both the output and the KV.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import run_vllm, tiny_model, write_jsonl

SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. " * 5
RECORD = SYSTEM + "Story 1: once upon a time, Tom found a cat in the park."
PROMPT = RECORD + " Then he"
RANK = 8


def write_adapter(path: Path, hidden: int = 256, kv_width: int = 128, layers: int = 2) -> Path:
    """A rank-RANK LoRA adapter for tiny_model's q_proj ([hidden, hidden]) and v_proj ([kv_width, hidden]) in PEFT's layout."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name, out in (("q_proj", hidden), ("v_proj", kv_width)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=g) * 0.5  # [r, in]
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.5  # [out, r]
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("lora-model") / "qwen2")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("lora-store")
    build(
        BuildConfig(
            dataset=str(write_jsonl(tmp / "text.jsonl", [{"text": RECORD}])),
            model=str(model),
            out=str(tmp / "store"),
            device="cpu",
            quiet=True,
        )
    )
    return tmp / "store"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model, store):
    """Plain vLLM and vLLM with the connector, both with LoRA and prefix caching on, each given the prompt without
    and then with the adapter (the adapter request comes after the base one has put the prefix in vLLM's own cache,
    which vLLM keys by adapter too)."""
    from vllm.lora.request import LoRARequest

    adapter = LoRARequest("story-adapter", 1, str(write_adapter(tmp_path_factory.mktemp("adapter") / "adapter")))
    engine = dict(prefix_caching=True, enable_lora=True, max_lora_rank=RANK, loras=[None, adapter])
    return run_vllm(model, [PROMPT, PROMPT], **engine), run_vllm(model, [PROMPT, PROMPT], store=store, **engine)


def test_lora_request_loads_nothing_and_matches_plain_vllm(runs, store):
    plain, served = runs
    assert plain.outputs[1] != plain.outputs[0]  # the adapter changes the output
    assert plain.cached == [0, 0]
    assert served.outputs == plain.outputs  # token for token, with and without the adapter
    stored = PrefixStore.open(store).match(served.prompt_ids[0][:-1])
    assert stored >= 256
    assert served.loaded == [stored, 0] and served.cached[0] >= stored  # the base request is loaded
    assert served.cached[1] == 0  # the adapter request: nothing from the store (nor from vLLM's cache)
    # The adapter request was not looked up: 2 lookups by the warm-up (the live check), 1 by the base request.
    assert served.claims.skipped_lora == 1 and served.claims.lookups == 3
