"""`prefixgen build` end to end through the real CLI, on CPU, with real tiny models."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import PrefixStore
from prefixgen.format import INDEX_DIR, block_keys
from prefixgen.maintain.verify import verify_store

from .conftest import MT_BENCH, SYSTEM, make_model, write_jsonl

CPU = ["--device", "cpu", "--dtype", "float32", "--quiet"]


def ls_json(cli, store) -> dict:
    result = cli("ls", store, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def stored_keys(store_path) -> set[bytes]:
    store = PrefixStore.open(store_path)
    return {seg.cols["key"][i].tobytes() for seg in store.index.segments for i in range(seg.n)}


def expected_keys(records: list[str], model_dir, store_path) -> set[bytes]:
    """Every full block of every record, hashed independently of the build."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    manifest = PrefixStore.open(store_path).manifest
    return {k for text in records for k in block_keys(tok(text).input_ids, manifest.block_size, manifest.root_key)}


def test_text_build_stores_every_block_once_and_saves_the_shared_prefix(tmp_path, cli, stories, text_dataset):
    out = tmp_path / "store"
    result = cli("build", text_dataset, "--model", stories, "--out", out, *CPU)
    assert result.exit_code == 0, result.output
    summary = ls_json(cli, out)
    for key in ("format_version", "model", "block_size", "blocks", "stored_tokens", "bytes", "shards", "builds"):
        assert key in summary
    (b,) = summary["builds"]
    for key in ("records", "skipped_records", "dataset_tokens", "stored_tokens", "prefilled_tokens", "padding_tokens", "seconds"):
        assert key in b
    records = [json.loads(line)["text"] for line in text_dataset.read_text().splitlines()]
    assert b["records"] == 60 and b["status"] == "complete"
    assert stored_keys(out) == expected_keys(records, stories, out)
    assert summary["blocks"] * 16 == summary["stored_tokens"] == b["stored_tokens"]
    # The shared instruction is prefilled once: prefilled tokens are the unique tokens.
    assert b["prefilled_tokens"] == b["stored_tokens"]
    assert b["prefilled_tokens"] < 0.6 * b["dataset_tokens"]
    assert b["padding_tokens"] < 0.1 * (b["prefilled_tokens"] + b["padding_tokens"])
    top = summary["top_prefixes"][0]
    assert top["records"] >= 40 and "helpful storyteller" in top["preview"]
    assert cli("verify", out).exit_code == 0
    text = cli("ls", out).stdout
    assert "most-shared prefixes" in text and "bytes per token" in text


@torch.inference_mode()
def test_kv_built_in_a_padded_batch_equals_kv_built_alone(tmp_path, cli, stories, text_dataset):
    out = tmp_path / "store"
    assert cli("build", text_dataset, "--model", stories, "--out", out, "--batch-tokens", "4096", *CPU).exit_code == 0
    build_stats = ls_json(cli, out)["builds"][0]
    assert build_stats["padding_tokens"] > 0  # rows of different lengths shared batches
    store = PrefixStore.open(out)
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories)
    for line in text_dataset.read_text().splitlines()[:20]:
        ids = tok(json.loads(line)["text"]).input_ids
        n = store.match(ids)
        assert n == len(ids) // 16 * 16
        loaded = store.load(ids)
        alone = model(torch.tensor([ids[:n]]), use_cache=True)
        alone_cache = alone["cache"] if "cache" in alone else alone["past_key_values"]
        for got, want in zip(loaded.layers, alone_cache.layers):
            assert (got.keys - want.keys).abs().max() < 1e-5
            assert (got.values - want.values).abs().max() < 1e-5


def test_chat_build_of_mt_bench_shares_the_system_prompt(tmp_path, cli, stories_chat):
    out = tmp_path / "store"
    result = cli(
        "build", MT_BENCH, "--model", stories_chat, "--out", out, "--messages-field", "turns", "--system-prompt", SYSTEM * 3, *CPU
    )
    assert result.exit_code == 0, result.output
    (b,) = ls_json(cli, out)["builds"]
    assert b["records"] == 80 and b["skipped_records"] == 0
    tok = AutoTokenizer.from_pretrained(stories_chat)
    system = tok.apply_chat_template([{"role": "system", "content": SYSTEM * 3}], tokenize=False)
    system_tokens = len(tok(system, add_special_tokens=False).input_ids)  # tokens, not characters
    assert system_tokens > 64
    # 79 of the 80 records reuse the system prompt's full blocks (all but the block where the
    # user's turn begins) instead of prefilling them again.
    shared = (system_tokens - 1) // 16 * 16
    assert b["dataset_tokens"] - b["prefilled_tokens"] >= 79 * shared
    assert b["prefilled_tokens"] == b["stored_tokens"]
    # A server renders the same request, with the generation prompt, and hits the store.
    store = PrefixStore.open(out)
    row = json.loads(MT_BENCH.read_text().splitlines()[5])
    messages = [{"role": "system", "content": SYSTEM * 3}, {"role": "user", "content": row["turns"][0]}]
    request = tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    ).input_ids
    assert store.match(request) == len(request) // 16 * 16


def _random_records(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a cat dog sun tree big small happy sad ran jumped played saw red blue girl boy ball park home friend".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) for _ in range(n)]


def _cli_process(*args, **popen_kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefixgen.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kw,
    )


def _wait_for_segments(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folder = out / INDEX_DIR
        if folder.is_dir() and len([p for p in folder.iterdir() if p.suffix == ".safetensors"]) >= count:
            return
        assert proc.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no shards appeared")


@pytest.mark.slow
def test_resume_after_kill_9_stores_the_same_blocks(tmp_path, cli, stories):
    records = _random_records(500)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r} for r in records])
    out = tmp_path / "store"
    args = ["build", data, "--model", stories, "--out", out, "--shard-bytes", "30000", "--batch-tokens", "512", *CPU]
    proc = _cli_process(*args)
    _wait_for_segments(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert verify_store(out).ok  # a killed writer leaves a store that opens and verifies
    killed = stored_keys(out)
    want = expected_keys(records, stories, out)
    assert 0 < len(killed) < len(want)
    refused = cli(*args)
    assert refused.exit_code != 0 and "--resume" in refused.stderr
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert stored_keys(out) == want
    report = verify_store(out)
    assert report.ok, report.faults
    builds = ls_json(cli, out)["builds"]
    assert len(builds) == 1 and builds[0]["status"] == "complete" and builds[0]["records"] == 500
    # The resumed run prefilled only the blocks the killed one had not stored.
    assert builds[0]["prefilled_tokens"] == builds[0]["stored_tokens"] == (len(want) - len(killed)) * 16
    # Resuming a finished build does nothing: nothing prefilled, not a byte of the store changed.
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = cli(*[a for a in args if a != "--quiet"], "--resume")
    assert again.exit_code == 0, again.output
    assert re.search(r"prefilled tokens  0 ", again.stdout) and re.search(r"records  0 ", again.stdout)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_ctrl_c_stops_cleanly_and_keeps_what_was_stored(tmp_path, stories):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r} for r in _random_records(500, seed=1)])
    out = tmp_path / "store"
    proc = _cli_process("build", data, "--model", stories, "--out", out, "--shard-bytes", "30000", "--batch-tokens", "512", *CPU)
    _wait_for_segments(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert verify_store(out).ok
    (b,) = PrefixStore.open(out).builds()
    assert b.status == "interrupted" and b.stored_tokens > 0


def test_full_disk_is_a_clear_error_and_the_store_stays_valid(tmp_path, stories):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r} for r in _random_records(200, seed=2)])
    out = tmp_path / "store"

    def small_disk():  # files may not grow past 200 kB: writes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = _cli_process("build", data, "--model", stories, "--out", out, "--shard-bytes", "300000", *CPU, preexec_fn=small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert "disk" in err and "--resume" in err and "Traceback" not in err
    assert verify_store(out).ok


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_dataset", "does not exist"),
        ("missing_field", "its fields are: id, text"),
        ("missing_model", "cannot load"),
        ("not_causal", "not a causal language model"),
        ("recurrent_only", "prefixgen stores recurrent states beside the KV of attention layers"),
        ("dynamic_rope", "rope_type 'dynamic'"),
        ("longrope", "rope_type 'longrope'"),
        ("bad_dtype", "--dtype"),
        ("exclusive_flags", "exclude each other"),
        ("bad_config", "unknown option"),
        ("no_chat_template", "--chat-template"),
    ],
)
def test_bad_input_gets_one_clear_message(tmp_path, cli, stories, text_dataset, case, expect):
    out = tmp_path / "store"
    model, extra = stories, []
    data = text_dataset
    if case == "missing_dataset":
        data = tmp_path / "nope.jsonl"
    elif case == "missing_field":
        extra = ["--text-field", "body"]
    elif case == "missing_model":
        model = tmp_path / "no-model"
    elif case == "not_causal":
        model = make_model(tmp_path / "vit", "qwen2")
        (model / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    elif case == "recurrent_only":  # hybrids are stored (tests/test_recurrent.py), a model of Mamba2 layers only not
        model = make_model(
            tmp_path / "mamba", "granitemoehybrid", layer_types=["mamba"] * 2, mamba_n_heads=4, mamba_d_head=32,
            mamba_d_state=8, num_local_experts=0, shared_intermediate_size=128,
        )  # fmt: skip
    elif case == "dynamic_rope":
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        model = make_model(tmp_path / "dynamic", "llama", rope_parameters=rope)
    elif case == "longrope":
        rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0}
        model = make_model(tmp_path / "longrope", "llama", rope_parameters={**rope, "rope_theta": 10000.0})
    elif case == "bad_dtype":
        extra = ["--dtype", "int4"]
    elif case == "exclusive_flags":
        extra = ["--append", "--overwrite"]
    elif case == "bad_config":
        cfg = tmp_path / "c.toml"
        cfg.write_text('colour = "blue"\n')
        extra = ["--config", cfg]
    elif case == "no_chat_template":
        extra = ["--messages-field", "text"]
    result = cli("build", data, "--model", model, "--out", out, *extra, "--device", "cpu", "--quiet")
    assert result.exit_code not in (0, 1), result.output
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before any store was made


def test_skipped_and_truncated_records_are_counted(tmp_path, cli, stories):
    long_text = "Once upon a time there was a very long story. " * 120  # > 512 positions
    rows = [{"text": "Hello there, little friend. " * 4}, {"text": ""}, {"text": None}, {"text": 42}, {"text": long_text}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = cli("build", data, "--model", stories, "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "skipping" in result.output and "truncating" in result.output
    (b,) = ls_json(cli, tmp_path / "s")["builds"]
    assert (b["records"], b["skipped_records"], b["truncated_records"]) == (2, 3, 1)
    assert b["stored_tokens"] <= 512 + 32


def test_append_refuses_another_model_and_non_empty_store_is_protected(tmp_path, cli, stories, qwen2, text_dataset):
    out = tmp_path / "store"
    assert cli("build", text_dataset, "--model", stories, "--out", out, *CPU).exit_code == 0
    before = stored_keys(out)
    again = cli("build", text_dataset, "--model", stories, "--out", out, *CPU)
    assert again.exit_code == 5 and "--append" in again.stderr
    other = cli("build", text_dataset, "--model", qwen2, "--out", out, "--append", *CPU)
    assert other.exit_code == 5 and "weights_digest" in other.stderr
    assert stored_keys(out) == before and verify_store(out).ok
    # Appending a dataset that shares the instruction reuses its KV from the store.
    extra = write_jsonl(tmp_path / "more.jsonl", [{"text": SYSTEM + f"A new story about a fox number {i}."} for i in range(5)])
    assert cli("build", extra, "--model", stories, "--out", out, "--append", *CPU).exit_code == 0
    builds = ls_json(cli, out)["builds"]
    assert len(builds) == 2
    assert builds[1]["prefilled_tokens"] < builds[1]["dataset_tokens"] / 2
    assert verify_store(out).ok
    assert cli("build", text_dataset, "--model", qwen2, "--out", out, "--overwrite", *CPU).exit_code == 0
    assert PrefixStore.open(out).manifest.model.name == str(qwen2)


def test_config_file_sets_options_and_flags_win(tmp_path, cli, stories, text_dataset):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{stories}"\nblock-size = 8\nlimit = 10\ndevice = "cpu"\n')
    out = tmp_path / "s"
    assert cli("build", text_dataset, "--config", cfg, "--out", out, "--limit", "5", "--quiet").exit_code == 0
    summary = ls_json(cli, out)
    assert summary["block_size"] == 8 and summary["builds"][0]["records"] == 5
    # Every option is a flag too; sizes take units.
    flags = ["--prefix-cache-bytes", "64MiB", "--sort-window", "2"]
    assert cli("build", text_dataset, "--config", cfg, "--out", out, "--overwrite", "--quiet", *flags).exit_code == 0
    (b,) = PrefixStore.open(out).builds()
    assert (b.options["prefix_cache_bytes"], b.options["sort_window"]) == (64 << 20, 2)


@pytest.mark.slow
def test_multiple_writers_fill_one_store(tmp_path, stories):
    """Two build processes write into one store at once; readers see the union."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": r} for r in _random_records(40, seed=5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": r} for r in _random_records(40, seed=6)])
    out = tmp_path / "store"
    first = _cli_process("build", a, "--model", stories, "--out", out, "--append", *CPU)
    second = _cli_process("build", b, "--model", stories, "--out", out, "--append", *CPU)
    assert first.wait(120) == 0 and second.wait(120) == 0, second.stderr.read()
    want = expected_keys(_random_records(40, seed=5) + _random_records(40, seed=6), stories, out)
    assert stored_keys(out) == want
    assert verify_store(out).ok
    segments = PrefixStore.open(out).index.segments
    assert len({ref.writer for seg in segments for ref in seg.shards}) == 2
    assert len(segments) == 2 and all(seg.compacted or len(seg.shards) == 1 for seg in segments)  # each build compacted its own


def test_records_are_read_as_a_stream(tmp_path, stories):
    """A dataset is never loaded whole: the tokenized stream is consumed lazily."""
    from prefixgen.data.source import read_records

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"record {i}"} for i in range(10_000)])
    stream = read_records(str(data), "text")
    first = [next(stream) for _ in range(3)]
    assert [r.value for r in first] == ["record 0", "record 1", "record 2"]
    assert np.all([r.index for r in first] == np.arange(3))
    assert os.path.getsize(data) > 100_000


@torch.inference_mode()
def test_a_split_batch_computes_the_same_kv(stories):
    """The out-of-memory path: halves of a batch, and a task cut in two, give the batch's KV."""
    from prefixgen.builder.plan import Batch, Planner, split_batch
    from prefixgen.builder.prefill import Prefiller
    from prefixgen.data.records import TokenizedRecord
    from prefixgen.format import BuildRecord, root_key

    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories)
    records = [TokenizedRecord(i, tok(t).input_ids) for i, t in enumerate(_random_records(3, seed=9))]
    planner = Planner(root_key("00" * 32), 16, 4096, lambda keys: [False] * len(keys), BuildRecord("b", "d"))
    batch = Batch(list(planner(iter(records))))
    known: dict[bytes, torch.Tensor] = {}

    def past(keys):
        return torch.cat([known[k] for k in keys])

    prefiller = Prefiller(model, torch.device("cpu"), past)
    whole = prefiller.run(batch)
    halves = split_batch(batch)
    assert [len(b.tasks) for b in halves] == [1, 2]
    parts = [kv for half in halves for kv in prefiller.run(half)]
    for a, b in zip(whole, parts):
        assert (a - b).abs().max() < 1e-5
    first, second = split_batch(Batch([batch.tasks[0]]))
    kv1 = prefiller.run(first)[0]
    for i, key in enumerate(first.tasks[0].new_keys):
        known[key] = kv1[i * 16 : (i + 1) * 16]
    kv2 = prefiller.run(second)[0]
    assert second.tasks[0].cached > 0
    assert (torch.cat([kv1, kv2]) - whole[0]).abs().max() < 1e-5
