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

from prefixgen.analysis.count import block_cost
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
    per_block = block_cost(store.manifest.kv, 16)  # as build and prune count it
    out2 = tmp_path / "hicache2"
    assert sglang(cli, stores["main"], out2, "--max-bytes", str(per_block)).exit_code == 0
    assert len(files(out2)) == 1 and set(files(out2)) <= want
    small = sglang(cli, stores["main"], tmp_path / "hicache3", "--max-bytes", str(per_block - 1))
    assert small.exit_code == 2 and "smaller than one block" in small.stderr and not (tmp_path / "hicache3").exists()


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


def vllm(cli, store: Path, out: Path, *args: str):
    return cli("export", store, "--to", "vllm", "--out", out, "--model-name", "org/stories", *args)


def bins(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.bin")}


def test_export_vllm_refuses_what_it_cannot_reproduce(cli, stores, tmp_path):
    """Each configuration vLLM's fs tier would read differently is refused with its reason, before any file.
    (vLLM's own code reading an export is tests_vllm/test_vllm_export.py.)"""
    cases = [
        (stores["main"], ("--block-size", "24"), "does not divide the target's 24 tokens"),
        (stores["fp8"], (), "fp8"),
        (stores["bf16"], ("--dtype", "float16"), "--dtype is float16"),
        (stores["main"], ("--tp-size", "3"), "does not split the model's 4 KV heads"),
        (stores["main"], ("--kv-cache-layout", "BLNHC"), "no canonical page format"),
        (stores["main"], ("--prefix-caching-hash-algo", "xxhash"), "cannot be reproduced outside the server"),
        (stores["main"], ("--layer-names", "model.layers.attn"), "has no {i}"),
    ]
    for i, (store, args, message) in enumerate(cases):
        result = vllm(cli, store, tmp_path / str(i), *args)
        assert result.exit_code == 6 and message in result.output, (args, result.output)
        assert not bins(tmp_path / str(i)) if (tmp_path / str(i)).exists() else True


def test_export_vllm_shares_the_frameworks_resume_append_and_refusals(cli, stores, tmp_path):
    """The vLLM target in the export framework: one folder and config.json per run config, files resumed,
    another store appended, a folder of other parameters refused."""
    out = tmp_path / "offload"
    result = vllm(cli, stores["main"], out)
    assert result.exit_code == 0, result.output
    first = bins(out)
    (folder,) = {Path(name).parts[0] for name in first}  # <model>_<hash>_r0: one run config
    assert folder.startswith("org_stories_") and folder.endswith("_r0")
    config = json.loads((out / folder.removesuffix("_r0") / "config.json").read_text())
    assert config["canonical_format"] == "v1-nhd" and config["dtype"] == "float32" and config["tokens_per_hash"] == 16
    assert len({len(data) for data in first.values()}) == 1  # every file one CPU-tier row
    gone = sorted(first)[::2]
    for name in gone:
        (out / name).unlink()
    kept = sorted(first)[1]  # not rewritten: its temporary name is not reused
    leftover = (out / kept).with_name(f".{Path(kept).name}.prefixgen.tmp")  # a killed export's half file
    leftover.write_bytes(b"half")
    result = vllm(cli, stores["main"], out)
    assert not leftover.exists()
    assert result.exit_code == 0 and f"wrote {len(gone)} files" in result.output, result.output
    assert bins(out) == first
    result = vllm(cli, stores["other_data"], out, "--append")
    assert result.exit_code == 0, result.output
    assert set(first) < set(bins(out))
    result = vllm(cli, stores["main"], out, "--blocks-per-file", "2")
    assert result.exit_code == 6 and "params.blocks_per_file" in result.output
    # Block size 8 stores make the same files (two stored blocks per vLLM block).
    assert vllm(cli, stores["block8"], tmp_path / "b8").exit_code == 0
    assert bins(tmp_path / "b8") == first
    # Canonical pages hold every head: a TP 2 server (2 of the 4 KV heads a rank) reads the same files.
    assert vllm(cli, stores["main"], tmp_path / "tp2", "--tp-size", "2").exit_code == 0
    assert bins(tmp_path / "tp2") == first


def test_scatter_writes_equal_the_arrays_bytes(tmp_path):
    """prefixgen.export.iov writes every piece in C order whatever its strides (the targets' reorderings of the read
    KV: transposes, reversed and sliced axes, void items), across writev's 1,024-iovec limit, and finishes a
    short writev run by run."""
    import os

    from prefixgen.export.iov import _finish, _runs, write_pieces

    rng = np.random.default_rng(0)
    cases = []
    for item in (24, 1024):  # runs gathered first (under SMALL_RUN) and runs written as iovecs
        base = rng.integers(0, 256, (8, 16, 2, 8, item), dtype=np.uint8)
        items = base.view(f"V{item}")[..., 0]  # [8, 16, 2, 8]
        cases += [
            [items.transpose(2, 0, 1, 3)],  # SGLang page_first: 2 * 8 * 16 runs of 8 items
            [b"header", items.transpose(1, 0, 3, 2)],  # 2,048 runs of one item: 2 writev calls
            [items[::-1, :, :, 2:6].transpose(2, 1, 0, 3), np.zeros(100, np.uint8)],  # reversed, sliced, then padding
            [items, b"", base[:3]],  # contiguous pieces and an empty one
            [items.transpose(1, 0, 3, 2), items.transpose(2, 0, 1, 3)],  # two gathered pieces in one file
        ]
    for i, pieces in enumerate(cases):
        want = b"".join(p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes() for p in pieces)
        fd = os.open(tmp_path / str(i), os.O_WRONLY | os.O_CREAT)
        try:
            assert write_pieces(fd, pieces) == len(want)
        finally:
            os.close(fd)
        assert (tmp_path / str(i)).read_bytes() == want
    part = items.transpose(1, 0, 3, 2)
    offsets, run = _runs(part.shape, part.strides, part.itemsize)
    iov = np.stack([offsets.astype(np.uint64) + np.uint64(part.ctypes.data), np.full(len(offsets), run, np.uint64)], 1)[:50]
    fd = os.open(tmp_path / "short", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, np.ascontiguousarray(part).tobytes()[:1000])  # what a short writev got out
        _finish(fd, iov, 1000)
    finally:
        os.close(fd)
    assert (tmp_path / "short").read_bytes() == np.ascontiguousarray(part).tobytes()[: 50 * run]


@pytest.mark.parametrize("to", ["sglang", "vllm"])
def test_export_refuses_a_damaged_block(cli, stores, tmp_path, to):
    """A stored block whose bytes fail their checksum is not exported (its file would be served as KV): the
    export stops naming the shard and slot, and no file holds the damaged bytes."""
    import shutil

    from prefixgen.format import SHARDS_DIR, read_safetensors_header

    store = tmp_path / "store"
    shutil.copytree(stores["main"], store)
    shard = sorted((store / SHARDS_DIR).iterdir())[0]
    with open(shard, "r+b") as f:
        at = read_safetensors_header(f, shard).offset("kv") + 100  # slot 0
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "out"
    result = cli("export", store, "--to", to, "--out", out, "--model-name", "org/stories", "-q")
    assert result.exit_code != 0 and "slot 0 fails its checksum" in result.output and shard.name in result.output
    clean = tmp_path / "clean"
    assert cli("export", stores["main"], "--to", to, "--out", clean, "--model-name", "org/stories", "-q").exit_code == 0
    written = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.bin")}
    assert all((clean / name).read_bytes() == data for name, data in written.items())  # only undamaged units
