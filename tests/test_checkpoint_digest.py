"""The weights digest computed from checkpoint files (what the vLLM connector checks) equals the one
`prefixgen build` computes from the loaded transformers model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixgen import PrefixStore
from prefixgen.errors import ModelError
from prefixgen.model import checkpoint_weights_digest, weights_digest

from .conftest import make_model


@pytest.mark.parametrize(
    ("arch", "tied", "saved_dtype"),
    [
        ("qwen2", False, torch.float32),
        ("llama", True, torch.float32),
        ("qwen2", True, torch.bfloat16),
        ("gemma", True, torch.float32),
    ],
)
def test_checkpoint_digest_is_the_loaded_models_digest(tmp_path, arch, tied, saved_dtype):
    folder = make_model(tmp_path / arch, arch, seed=3, tie_word_embeddings=tied, dtype=saved_dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # loaded in another dtype than saved
    assert model.config.tie_word_embeddings is tied
    names = {n for n, _ in model.named_parameters()}
    assert ("lm_head.weight" in names) is not tied  # a tied head is the embedding: not a parameter of its own
    assert checkpoint_weights_digest(folder, tied) == weights_digest(model)


@pytest.mark.parametrize(
    ("saved_dtype", "dtype"), [(torch.float32, "float16"), (torch.bfloat16, "float16"), (torch.float32, "bfloat16")]
)
def test_a_checkpoint_built_in_another_dtype_has_the_digest_of_its_files_loaded_in_that_dtype(tmp_path, cli, saved_dtype, dtype):
    """`build --dtype float16` of a float32 checkpoint digests the weights rounded to float16: the connector, which
    digests the files, must round them the same way or it refuses the store (a float16 round trip is not bfloat16's)."""
    folder = make_model(tmp_path / "m", "qwen2", seed=3, dtype=saved_dtype)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "Once upon a time there was a little cat who liked to play in the sun all day long."}\n')
    result = cli("build", data, "--model", folder, "--out", tmp_path / "s", "--device", "cpu", "--dtype", dtype, "--quiet")
    assert result.exit_code == 0, result.output
    stored = PrefixStore.open(tmp_path / "s").manifest.model.weights_digest
    assert checkpoint_weights_digest(folder, dtype=getattr(torch, dtype)) == stored
    if (saved_dtype, dtype) == (torch.float32, "float16"):  # rounding twice differs: the case the connector refused
        assert checkpoint_weights_digest(folder) != stored


def test_stories260k_digest(stories):
    model = AutoModelForCausalLM.from_pretrained(stories)
    assert checkpoint_weights_digest(stories, model.config.tie_word_embeddings) == weights_digest(model)


def test_other_weights_other_digest(tmp_path):
    a = make_model(tmp_path / "a", "qwen2", seed=0)
    b = make_model(tmp_path / "b", "qwen2", seed=1)
    assert checkpoint_weights_digest(a) != checkpoint_weights_digest(b)


def test_folder_without_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no .safetensors files"):
        checkpoint_weights_digest(tmp_path)
