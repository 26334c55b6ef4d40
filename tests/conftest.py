"""Shared fixtures: real tiny models (no downloads), datasets in tmp_path, a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO / "models" / "stories260K"
DATA = REPO / "tests" / "data"  # files the tests read, with their sources in SOURCES.md
MT_BENCH = DATA / "mt_bench_question.jsonl"

# A ChatML-style template, as Qwen models use.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def stories() -> Path:
    """The real, trained stories260K Llama shipped in models/."""
    return STORIES


def _with_tokenizer(model_dir: Path, chat_template: str | None = None) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(STORIES / name, model_dir / name)
    if chat_template:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_model(path: Path, arch: str = "qwen2", seed: int = 0, chat_template: str | None = None, **overrides) -> Path:
    """Save a tiny random model of ``arch`` with the stories tokenizer (vocab 512) in ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "gpt_neox":
        base.pop("num_key_value_heads")
    base.update(overrides)
    config = AutoConfig.for_model(arch, **base)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _with_tokenizer(path, chat_template)
    return path


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "qwen2", "qwen2", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def stories_chat(tmp_path_factory) -> Path:
    """stories260K with a chat template added (the original has none)."""
    path = tmp_path_factory.mktemp("models") / "stories-chat"
    shutil.copytree(STORIES, path)
    _with_tokenizer(path, CHAT_TEMPLATE)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. "


@pytest.fixture
def text_dataset(tmp_path) -> Path:
    """60 records; 40 share a long instruction prefix."""
    names = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max"]
    rows = []
    for i in range(60):
        story = f"Once upon a time, {names[i % 6]} found a {['ball', 'cat', 'tree', 'boat'][i % 4]} number {i}." * (1 + i % 3)
        rows.append({"text": (SYSTEM if i % 3 else "") + story, "id": i})
    return write_jsonl(tmp_path / "stories.jsonl", rows)


@pytest.fixture
def cli():
    """Invoke the real CLI in-process; returns the click Result."""
    from prefixgen.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
