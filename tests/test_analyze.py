"""`prefixgen analyze` and `build --min-records/--max-bytes`, through the real CLI, with real tiny models."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import PrefixStore
from prefixgen.analysis.analyze import is_held_out
from prefixgen.format import SHARDS_DIR, block_keys, key64, read_safetensors_header
from prefixgen.model import config_kv_layout, load_config, probe_kv_layout

from .conftest import make_model, write_jsonl

CPU = ["--device", "cpu", "--dtype", "float32", "--quiet"]
FEW_SHOT = (
    "Solve each problem. Question: Tom has three apples and gets two more. How many apples? Answer: five. "
    "Question: A cat sees four birds and one flies away. How many birds are left? Answer: three. "
    "Question: Lily had ten balls and gave half to Ben. How many balls does Lily have? Answer: five. "
)
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam"]
THINGS = ["apples", "balls", "boats", "cats", "trees", "stars", "cakes"]


def _question(i: int) -> str:
    rng = random.Random(i)
    return (
        f"Question: {rng.choice(NAMES)} has {rng.randint(2, 90)} {rng.choice(THINGS)} and {rng.choice(NAMES)} "
        f"brings {rng.randint(2, 90)} {rng.choice(THINGS)} more on day {i}. How many are there now? Answer:"
    )


@pytest.fixture
def few_shot(tmp_path) -> Path:
    """Like GSM8K 8-shot: every record is one long few-shot prefix followed by a unique question."""
    return write_jsonl(tmp_path / "fewshot.jsonl", [{"text": FEW_SHOT + _question(i)} for i in range(24)])


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Prefixes shared by many, some or two records, and unique tails: many record counts and depths."""
    rows = []
    for i in range(90):
        head = ["Once upon a time, in a small town by the sea, there lived a girl who loved the water. " * 2, FEW_SHOT][i % 2]
        middle = f"Chapter {i % 7}: the day {NAMES[i % 5]} found the {THINGS[i % 3]} near the old house. " * (1 + i % 3)
        rows.append({"text": head + middle + _question(i)})
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _ids(model_dir, texts: list[str]) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t).input_ids for t in texts]


def _record_counts(ids: list[list[int]], root: bytes, bs: int = 16) -> dict[bytes, tuple[int, int]]:
    """Independent count: key -> (records containing it, depth), from a dict of full keys."""
    out: dict[bytes, tuple[int, int]] = {}
    for record in ids:
        for depth, key in enumerate(block_keys(record, bs, root)):
            out[key] = (out.get(key, (0, 0))[0] + 1, depth)
    return out


def _store_blocks(path) -> dict[bytes, bytes]:
    """Stored key -> parent key, read from the index."""
    store = PrefixStore.open(path)
    return {seg.cols["key"][i].tobytes(): seg.cols["parent"][i].tobytes() for seg in store.index.segments for i in range(seg.n)}


def _kv_bytes(path) -> int:
    """Bytes --max-bytes counts on disk: every shard's `kv`, `kv_scale` and (format 5) `head_crc` tensors,
    from the safetensors headers."""
    total = 0
    for shard in sorted((Path(path) / SHARDS_DIR).glob("*.safetensors")):
        with open(shard, "rb") as f:
            header = read_safetensors_header(f, shard)
        total += sum(
            end - start
            for name, (start, end) in ((n, t["data_offsets"]) for n, t in header.tensors.items())
            if name in ("kv", "kv_scale", "head_crc")
        )
    return total


def _block_cost(model, kv_dtype: str) -> int:
    """What one block of a default (format 5) build costs on disk: KV, fp8 scales and its `head_crc` row."""
    layout = config_kv_layout(load_config(str(model)), "float32", kv_dtype)
    return layout.block_bytes(16) + 4 * layout.num_kv_heads


def _build(cli, data, model, out, *extra) -> dict:
    result = cli("build", data, "--model", model, "--out", out, *CPU, *extra)
    assert result.exit_code == 0, result.output
    ls = cli("ls", out, "--json")
    return json.loads(ls.stdout)


def _analyze(cli, data, model, *extra) -> dict:
    result = cli("analyze", data, "--model", model, "--dtype", "float32", "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_min_records_2_stores_exactly_the_shared_few_shot_blocks(tmp_path, cli, stories, few_shot):
    out = tmp_path / "store"
    summary = _build(cli, few_shot, stories, out, "--min-records", "2")
    ids = _ids(stories, _texts(few_shot))
    root = PrefixStore.open(out).manifest.root_key
    counts = _record_counts(ids, root)
    shared = {k for k, (n, _) in counts.items() if n >= 2}
    assert len(shared) >= 6 and len(shared) < len(counts) / 3  # the few-shot blocks, not the questions
    assert set(_store_blocks(out)) == shared
    (b,) = summary["builds"]
    assert b["prefilled_tokens"] == b["stored_tokens"] == 16 * len(shared)  # the unique tails were not prefilled
    assert b["records"] == 24 and b["dataset_tokens"] == sum(map(len, ids))
    assert b["selection"] == {
        "min_records": 2,
        "max_bytes": None,
        "selected_blocks": len(shared),
        "candidate_blocks": len(counts),
        "count_seconds": b["selection"]["count_seconds"],
    }
    # counts/ holds the record count of every stored block.
    (keys, records), *_ = PrefixStore.open(out).count_arrays()
    assert {k.tobytes(): int(r) for k, r in zip(keys, records)} == {k: counts[k][0] for k in shared}
    # A server hits every shared block of every record.
    store = PrefixStore.open(out)
    for record in ids:
        expect = sum(1 for k in block_keys(record[:-1], 16, root) if k in shared) * 16
        assert store.match(record[:-1]) == expect >= 6 * 16
    text = cli("ls", out).stdout
    assert f"selection: --min-records 2: stored {len(shared)} of {len(counts)} blocks" in text


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_max_bytes_stores_the_top_ranked_blocks_within_the_budget(tmp_path, cli, stories, mixed, kv_dtype):
    block = _block_cost(stories, kv_dtype)
    budget = 37 * block + block // 2
    out = tmp_path / "store"
    summary = _build(cli, mixed, stories, out, "--max-bytes", str(budget), "--kv-dtype", kv_dtype)
    stored = _store_blocks(out)
    assert _kv_bytes(out) == 37 * block <= budget
    root = PrefixStore.open(out).manifest.root_key
    assert all(parent == root or parent in stored for parent in stored.values())  # prefix-closed
    counts = _record_counts(_ids(stories, _texts(mixed)), root)
    ranking = sorted(counts, key=lambda k: (-counts[k][0], counts[k][1], key64(k)))
    assert set(stored) == set(ranking[:37])
    # The cut falls inside a run of equal counts here, so the depth and key tiebreaks decided part of it.
    assert counts[ranking[36]][0] == counts[ranking[37]][0]
    assert summary["builds"][0]["selection"]["selected_blocks"] == 37
    assert summary["bytes_per_token"] > 0


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_max_bytes_counts_head_checksums_so_build_and_prune_stay_within_the_budget(tmp_path, cli, stories, mixed, kv_dtype):
    """A budget one byte short of 37 blocks with their head_crc rows holds 36 (37 blocks' KV alone would fit)."""
    block = _block_cost(stories, kv_dtype)
    budget = 37 * block - 1
    built, pruned = tmp_path / "built", tmp_path / "pruned"
    _build(cli, mixed, stories, built, "--max-bytes", str(budget), "--kv-dtype", kv_dtype)
    _build(cli, mixed, stories, pruned, "--kv-dtype", kv_dtype)
    result = cli("prune", pruned, "--max-bytes", str(budget))
    assert result.exit_code == 0, result.output
    for out in (built, pruned):
        assert _kv_bytes(out) == 36 * block <= budget
    assert set(_store_blocks(built)) == set(_store_blocks(pruned))


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("order_flag", [[], ["--kv-order", "tokens"]])
def test_max_bytes_of_an_append_to_a_token_major_store_counts_no_head_checksums(
    tmp_path, cli, stories, mixed, kv_dtype, order_flag
):
    """An append keeps a token-major store's order (no head_crc rows), with or without --kv-order tokens: the count
    pass charges each block exactly what the build writes, so a budget of exactly 37 such blocks holds 37. Before: an
    append without --kv-order was counted as head-major (4 B per KV head too many), and held 36."""
    block = _block_cost(stories, kv_dtype) - 4 * load_config(str(stories)).num_key_value_heads  # no head_crc row
    out = tmp_path / "store"
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "Hi."}])  # under one block: a token-major store, empty
    _build(cli, short, stories, out, "--kv-order", "tokens", "--kv-dtype", kv_dtype)
    summary = _build(cli, mixed, stories, out, "--append", "--max-bytes", str(37 * block), "--kv-dtype", kv_dtype, *order_flag)
    assert PrefixStore.open(out).manifest.kv.order == "tokens"
    selected = summary["builds"][-1]["selection"]["selected_blocks"]
    assert selected * block == _kv_bytes(out) == 37 * block  # predicted == written == the budget


def test_analyze_figures_equal_the_builds_they_describe(tmp_path, cli, stories, mixed):
    report = _analyze(cli, mixed, stories, "--holdout", "0")
    ids = _ids(stories, _texts(mixed))
    counts = _record_counts(ids, bytes(32))
    assert report["records"] == 90 and report["dataset_tokens"] == sum(map(len, ids))
    assert report["unique_blocks"] == len(counts) and report["unique_tokens"] == 16 * len(counts)
    assert sum(row["blocks"] for row in report["sharing"]) == len(counts)
    for row in report["sharing"]:
        assert row["blocks"] == sum(1 for n, _ in counts.values() if row["min_records"] <= n <= row["max_records"])
    assert all(c["holdout_hit_rate"] is None for c in report["choices"])
    by_k = {c["min_records"]: c for c in report["choices"] if c["max_bytes"] is None}
    budget = next(c for c in report["choices"] if c["max_bytes"] is not None and c["stored_blocks"] > 20)
    for name, flags, choice in (
        ("all", [], by_k[1]),
        ("k4", ["--min-records", "4"], by_k[4]),
        ("budget", ["--max-bytes", str(budget["max_bytes"])], budget),
    ):
        summary = _build(cli, mixed, stories, tmp_path / name, *flags)
        assert choice["stored_tokens"] == summary["stored_tokens"] == summary["builds"][0]["stored_tokens"]
        assert choice["prefill_tokens"] == summary["builds"][0]["prefilled_tokens"]
        assert choice["bytes"] == _kv_bytes(tmp_path / name)
    assert report["kv_bytes_per_token"] == PrefixStore.open(tmp_path / "all").manifest.kv.bytes_per_token


def test_holdout_hit_rate_is_what_the_store_of_the_other_records_serves(tmp_path, cli, stories, mixed):
    report = _analyze(cli, mixed, stories, "--holdout", "0.3")
    texts = _texts(mixed)
    ids = _ids(stories, texts)
    held = [is_held_out(r, 0.3) for r in ids]
    assert report["holdout_records"] == sum(held) and 10 <= sum(held) <= 45
    assert report["records"] == 90 - sum(held)
    rest = write_jsonl(tmp_path / "rest.jsonl", [{"text": t} for t, h in zip(texts, held) if not h])
    by_k = {c["min_records"]: c for c in report["choices"] if c["max_bytes"] is None}
    budget = next(
        c for c in report["choices"] if c["max_bytes"] is not None and 0 < c["holdout_hit_rate"] < by_k[1]["holdout_hit_rate"]
    )
    for name, flags, choice in (
        ("all", [], by_k[1]),
        ("k2", ["--min-records", "2"], by_k[2]),
        ("budget", ["--max-bytes", str(budget["max_bytes"])], budget),
    ):
        _build(cli, rest, stories, tmp_path / name, *flags)
        store = PrefixStore.open(tmp_path / name)
        hit = sum(store.match(r[:-1]) for r, h in zip(ids, held) if h)
        prompt = sum(len(r) for r, h in zip(ids, held) if h)
        assert report["holdout_tokens"] == prompt
        assert choice["holdout_hit_rate"] == hit / prompt, name
        assert choice["stored_tokens"] == PrefixStore.open(tmp_path / name).index.entries * 16
    assert by_k[1]["holdout_hit_rate"] > 0.3  # the shared heads are served


@pytest.mark.parametrize("arch", ["stories", "qwen2", "gpt_neox"])
def test_kv_bytes_from_the_config_equal_the_models_cache(tmp_path, stories, arch):
    path = stories if arch == "stories" else make_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert config_kv_layout(load_config(str(path)), "float32") == probe_kv_layout(model)
    assert config_kv_layout(load_config(str(path)), "bfloat16").bytes_per_token * 2 == probe_kv_layout(model).bytes_per_token


def test_plot_writes_a_png(tmp_path, cli, stories, mixed):
    png = tmp_path / "docs" / "sizes.png"
    result = cli("analyze", mixed, "--model", stories, "--plot", png, "--quiet")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "choices" in result.stdout and "held-out hit" in result.stdout


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, cli, stories, mixed, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = cli("analyze", mixed, "--model", stories, "--plot", tmp_path / "p.png", "--quiet")
    assert result.exit_code == 2 and "pip install 'prefixgen[plot]'" in result.stderr
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--max-bytes", "1000"], "smaller than one block"),
        (["--min-records", "0"], "--min-records must be at least 1"),
        (["--max-bytes", "12XB"], "not a size"),
        (["--max-bytes", "0"], "--max-bytes must be positive"),
    ],
)
def test_bad_selection_input_gets_a_clear_error_and_writes_nothing(tmp_path, cli, stories, few_shot, flags, expect):
    out = tmp_path / "store"
    result = cli("build", few_shot, "--model", stories, "--out", out, *CPU, *flags)
    assert result.exit_code not in (0, 1), result.output
    assert expect in result.stderr and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, expect",
    [(["--holdout", "1.5"], "--holdout must be a fraction"), (["--holdout", "0", "--plot", "x.png"], "--holdout above 0")],
)
def test_bad_analyze_input_gets_a_clear_error(tmp_path, cli, stories, few_shot, flags, expect):
    result = cli("analyze", few_shot, "--model", stories, "--quiet", *flags)
    assert result.exit_code not in (0, 1) and expect in result.stderr, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()
