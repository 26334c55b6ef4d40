"""Helpers shared by the benchmarks: models from config files (random weights, no download),
synthetic datasets, timing."""

from __future__ import annotations

import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "models" / "stories260K"  # every shape uses this tokenizer: ids < 512 fit any vocab
WORDS = (
    "the a cat dog sun tree big small happy sad ran jumped played saw red blue girl boy ball park home friend "
    "once upon time there was little named loved to play with her his toys and friends in one day went"
).split()


def load_model(config_path: str | Path, device: str, dtype: torch.dtype, seed: int = 0):
    """A model of the shape in ``config_path``: the trained weights if the file sits in a model
    folder with weights (models/stories260K/config.json), else random weights made on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_path = Path(config_path)
    if not config_path.exists() and (ROOT / config_path).exists():
        config_path = ROOT / config_path  # paths may be given from the repo root
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token  # the plain loop pads batches
    if (config_path.parent / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(config_path.parent, dtype=dtype).to(device)
        return model.eval(), tokenizer, str(config_path.parent)
    data = json.loads(config_path.read_text())
    data.pop("_comment", None)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer, config_path.stem


def make_texts(n: int, min_words: int, max_words: int, shared_words: int = 0, seed: int = 0) -> list[str]:
    """``n`` random-word texts of mixed lengths; the first ``shared_words`` words are the same in all."""
    rng = random.Random(seed)
    shared = " ".join(rng.choice(WORDS) for _ in range(shared_words))
    texts = []
    for _ in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        texts.append(f"{shared} {body}" if shared else body)
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t


def card(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
