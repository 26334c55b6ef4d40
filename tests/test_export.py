"""`prefixgen export`: the framework (walk, selection, resume, append, refusals) through the real CLI on
real stores. SGLang's own code reading the files is in tests_sglang/ (`make test-sglang`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from prefixgen.export.outdir import EXPORT_MANIFEST
from prefixgen.store.reader import PrefixStore
from tests.conftest import STORIES, make_model, write_jsonl

TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her dog.",
    "Once upon a time, there was a little girl named Lily. One day she found a shiny red ball in the park.",
    "Once upon a time, there was a little girl named Lily. She had a cat that liked to sleep on her bed.",
    "Tom and Mia went to the beach. They built a big sand castle and watched the waves come in and out all day.",
]
OTHER = ["The cat sat on the mat. It was a sunny day and the cat was happy, so it purred and slept until dinner time."]


def build(cli, tmp: Path, name: str, *args: str, texts=TEXTS, model: Path = STORIES) -> Path:
    data = write_jsonl(tmp / f"{name}.jsonl", [{"text": t} for t in texts])
    out = tmp / name
    result = cli("build", data, "--model", model, "--out", out, "--device", "cpu", "-q", *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Stores of stories260K (float32, block 16), one of another dataset, and the same model at block 8."""
    from typer.testing import CliRunner

    from prefixgen.cli import app

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    tmp = tmp_path_factory.mktemp("export")
    return {
        "main": build(cli, tmp, "main"),
        "other_data": build(cli, tmp, "other_data", texts=OTHER),
        "block8": build(cli, tmp, "block8", "--block-size", "8"),
        "bf16": build(cli, tmp, "bf16", "--dtype", "bfloat16"),
        "qwen2": build(cli, tmp, "qwen2", model=make_model(tmp / "qwen2-model", "qwen2")),
        "fp8": build(cli, tmp, "fp8", "--kv-dtype", "fp8"),
    }


def sglang(cli, store: Path, out: Path, *args: str):
    """Export ``store`` for SGLang; unless ``args`` name one, for a server keeping the store's own KV dtype
    (``--kv-dtype auto``, the default, is test_sglang_kv_dtype_is_the_servers')."""
    if "--kv-dtype" not in args:
        args = ("--kv-dtype", PrefixStore.open(store).manifest.kv.dtype, *args)
    return cli("export", store, "--to", "sglang", "--out", out, "--model-name", "org/stories", *args)


def test_sglang_kv_dtype_is_the_servers(cli, stores, tmp_path):
    """SGLang reads one host page's bytes of its own KV dtype from each file (a longer file too): the export writes
    that dtype. ``auto`` follows SGLang's --dtype auto: stories260K's float32 config is served as float16, so a
    float32 store's pages are written as float16 (the store's values rounded), and the folder records it."""
    out = tmp_path / "auto"
    assert sglang(cli, stores["main"], out, "--kv-dtype", "auto").exit_code == 0
    assert json.loads((out / EXPORT_MANIFEST).read_text())["params"]["kv_dtype"] == "float16"
    as_stored = tmp_path / "f32"
    assert sglang(cli, stores["main"], as_stored).exit_code == 0
    f16, f32 = files(out), files(as_stored)
    assert f16.keys() == f32.keys() and f16
    for name, data in f32.items():
        want = torch.frombuffer(bytearray(data), dtype=torch.float32).to(torch.float16)
        assert f16[name] == want.numpy().tobytes()
    result = sglang(cli, stores["main"], out, "--kv-dtype", "bfloat16", "--append")
    assert result.exit_code == 6 and "params.kv_dtype" in result.output  # another dtype's pages: refused


def test_sglang_follows_an_fp8_kv_cache_config(cli, stores, tmp_path):
    """A checkpoint whose quantization config has kv_cache_quant_algo FP8 makes SGLang keep fp8 KV by itself: the
    export refuses (one scale per layer from the checkpoint), naming the way out."""
    import shutil

    model = tmp_path / "fp8-kv-model"
    shutil.copytree(STORIES, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    (model / "config.json").write_text(json.dumps(config))
    from prefixgen.errors import ExportError
    from prefixgen.export.sglang import sglang_kv_dtype

    with pytest.raises(ExportError, match="kv_cache_quant_algo FP8"):
        sglang_kv_dtype("auto", str(model))
    assert sglang_kv_dtype("bfloat16", str(model)) == "bfloat16"  # a server started with --kv-cache-dtype bf16


def page_keys(ids: list[int], page: int = 16) -> list[str]:
    """SGLang's page hashes (sha256 chained over little-endian uint32 token ids, first page unseeded)."""
    keys, prior = [], b""
    for i in range(0, len(ids) // page * page, page):
        prior = hashlib.sha256(prior + np.asarray(ids[i : i + page], "<u4").tobytes()).digest()
        keys.append(prior.hex())
    return keys


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name.endswith(".bin")}


def test_export_writes_each_page_of_each_record(cli, stores, tmp_path):
    out = tmp_path / "hicache"
    result = sglang(cli, stores["main"], out)
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(STORIES)
    store = PrefixStore.open(stores["main"])
    want = set()
    for text in TEXTS:
        ids = tok(text).input_ids
        keys = page_keys(ids)
        want |= {f"{k}_org-stories_0_1.bin" for k in keys}
        # The last page's file holds [K|V][token][layer][head][dim] of those tokens, as the store has them.
        cache = store.load(ids[: len(keys) * 16])
        k = torch.stack([layer.keys[0, :, -16:].transpose(0, 1) for layer in cache.layers], dim=1)  # [P, L, H, D]
        v = torch.stack([layer.values[0, :, -16:].transpose(0, 1) for layer in cache.layers], dim=1)
        assert (out / f"{keys[-1]}_org-stories_0_1.bin").read_bytes() == torch.stack([k, v]).contiguous().numpy().tobytes()
    assert set(files(out)) == want
    assert f"wrote {len(want)} files" in result.output.replace(",", "")


def test_export_resumes_after_a_kill(cli, stores, tmp_path):
    """Files that exist are kept; missing ones are written; a killed export's temporary files go."""
    out = tmp_path / "hicache"
    assert sglang(cli, stores["main"], out).exit_code == 0
    first = files(out)
    gone = sorted(first)[::3]
    for name in gone:
        (out / name).unlink()
    (out / f".{gone[0]}.prefixgen.tmp").write_bytes(b"half a file")
    result = sglang(cli, stores["main"], out)
    assert result.exit_code == 0, result.output
    assert f"wrote {len(gone)} files" in result.output
    assert files(out) == first
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_export_refuses_a_folder_of_another_model_block_size_or_dtype(cli, stores, tmp_path):
    """Same names, other KV: SGLang would serve the wrong bytes, so the export is refused and nothing is written."""
    out = tmp_path / "hicache"
    assert sglang(cli, stores["main"], out).exit_code == 0
    before = files(out)
    for name, what in (("qwen2", "model.weights_digest"), ("block8", "block_size"), ("bf16", "kv.dtype")):
        for args in ((), ("--append",)):
            result = sglang(cli, stores[name], out, *args)
            assert result.exit_code == 6, (name, result.output)
            assert what in result.output
    result = sglang(cli, stores["main"], out, "--layout", "layer_first")
    assert result.exit_code == 6 and "params.layout" in result.output
    assert files(out) == before


def test_export_appends_another_store_of_the_same_model(cli, stores, tmp_path):
    out = tmp_path / "hicache"
    assert sglang(cli, stores["main"], out).exit_code == 0
    before = files(out)
    result = sglang(cli, stores["other_data"], out)
    assert result.exit_code == 6 and "--append" in result.output
    result = sglang(cli, stores["other_data"], out, "--append")
    assert result.exit_code == 0, result.output
    ids = AutoTokenizer.from_pretrained(STORIES)(OTHER[0]).input_ids
    assert set(files(out)) == set(before) | {f"{k}_org-stories_0_1.bin" for k in page_keys(ids)}
    sources = json.loads((out / EXPORT_MANIFEST).read_text())["sources"]
    assert [Path(s["store"]).name for s in sources] == ["main", "other_data"]


def test_export_refuses_what_sglang_cannot_represent(cli, stores, tmp_path):
    result = sglang(cli, stores["main"], tmp_path / "a", "--page-size", "24")
    assert result.exit_code == 6 and "block size (16) does not divide" in result.output
    result = sglang(cli, stores["fp8"], tmp_path / "b")
    assert result.exit_code == 6 and "fp8" in result.output
    result = sglang(cli, stores["main"], tmp_path / "c", "--tp-size", "3")
    assert result.exit_code == 6 and "4 KV heads" in result.output
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    result = sglang(cli, stores["main"], tmp_path / "d")
    assert result.exit_code == 6 and "not empty" in result.output
    assert not any(p.name.endswith(".bin") for d in "abcd" if (tmp_path / d).exists() for p in (tmp_path / d).iterdir())


def test_export_page_of_several_blocks(cli, stores, tmp_path):
    """Block size 8, page 16: each page is two stored blocks; the files equal the block-16 store's."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert sglang(cli, stores["main"], a).exit_code == 0
    assert sglang(cli, stores["block8"], b).exit_code == 0
    assert files(a) == files(b)


def test_export_selection_is_builds(cli, stores, tmp_path):
    """--min-records 2 exports the pages whose blocks are in two records or more (the shared instruction)."""
    out = tmp_path / "hicache"
    result = sglang(cli, stores["main"], out, "--min-records", "2")
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(STORIES)
    store = PrefixStore.open(stores["main"])
    counts = {bytes(k): int(c) for keys, recs in store.count_arrays() for k, c in zip(keys, recs)}
    want = set()
    for text in TEXTS:
        ids = tok(text).input_ids
        shared = sum(counts[k] >= 2 for k in store.keys(ids))
        want |= {f"{k}_org-stories_0_1.bin" for k in page_keys(ids)[:shared]}
    assert want and set(files(out)) == want
    per_block = 16 * store.manifest.kv.bytes_per_token
    out2 = tmp_path / "hicache2"
    assert sglang(cli, stores["main"], out2, "--max-bytes", str(per_block)).exit_code == 0
    assert len(files(out2)) == 1 and set(files(out2)) <= want


def synthetic_store(path: Path, chains: int, blocks: int = 30) -> Path:
    """A store of random KV in stories260K's shape (5 layers, 4 KV heads of 8, float32), written by the real StoreWriter."""
    from prefixgen.format import KVLayout, Manifest, ModelFingerprint, block_keys, root_key
    from prefixgen.store.writer import StoreWriter, prepare_store

    layout = KVLayout(num_layers=5, num_kv_heads=4, head_dim=8, dtype="float32")
    fp = ModelFingerprint("synthetic", "LlamaForCausalLM", "llama", 5, 4, 8, "00" * 32, "00" * 32)
    manifest = prepare_store(path, Manifest(16, fp, layout, root_key(fp.weights_digest).hex()), "new")
    rng = np.random.default_rng(0)
    with StoreWriter(path, manifest, "test", fsync=False) as writer:
        for _ in range(chains):
            ids = rng.integers(0, 32000, blocks * 16)
            keys = block_keys(ids.tolist(), 16, manifest.root_key)
            kv = torch.randn(blocks * 16, 5, 2, 4, 8)
            writer.add(keys, [manifest.root_key, *keys[:-1]], list(range(blocks)), ids.astype(np.uint32).reshape(blocks, 16), kv)
    return path


@pytest.mark.slow
def test_export_killed_with_sigkill_leaves_whole_files_and_resumes(cli, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    store = synthetic_store(tmp_path / "store", chains=100)
    out, clean = tmp_path / "hicache", tmp_path / "clean"
    args = ["export", store, "--to", "sglang", "--out", out, "--model-name", "m", "--kv-dtype", "float32", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "prefixgen.cli", *map(str, args)])
    deadline = time.monotonic() + 300
    while not (out.is_dir() and sum(1 for _ in out.glob("*.bin")) >= 100):
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    page = 16 * 5 * 2 * 4 * 8 * 4
    killed = files(out)
    assert 100 <= len(killed) < 3000
    assert all(len(data) == page for data in killed.values())  # a file is there whole or not at all
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert (
        cli(
            "export", store, "--to", "sglang", "--out", clean, "--model-name", "m", "--kv-dtype", "float32", "--no-fsync", "-q"
        ).exit_code
        == 0
    )
    assert files(out) == files(clean) and len(files(clean)) == 3000
    assert not list(out.glob(".*.tmp"))
