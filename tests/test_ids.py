"""--ids-field: records of token ids are used as they are. A store built from the ids of texts is the
store built from those texts, byte for byte, whatever file holds them; bad ids are skipped, counted and
named; a field of text is refused with the fix; analyze and simulate read ids as build does; ls and the
build record say a store was built from ids; a vLLM request log becomes a dataset of ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from prefixgen.format import SHARDS_DIR

from .conftest import DATA, REPO, write_jsonl
from .test_build import ls_json

CPU = ["--device", "cpu", "--dtype", "float32", "--quiet", "--no-fsync"]
STORIES = REPO / "examples" / "stories.jsonl"


def _texts(n: int = 40) -> list[str]:
    return [json.loads(line)["text"] for line in STORIES.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _texts()


@pytest.fixture(scope="module")
def ids(stories, texts) -> list[list[int]]:
    """The texts as the build tokenizes them (BOS included): what a server logs for these prompts."""
    return AutoTokenizer.from_pretrained(stories)(texts).input_ids


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, stories, texts) -> Path:
    from typer.testing import CliRunner

    from prefixgen.cli import app

    tmp = tmp_path_factory.mktemp("text-store")
    data = write_jsonl(tmp / "texts.jsonl", [{"text": t} for t in texts])
    result = CliRunner().invoke(app, list(map(str, ["build", data, "--model", stories, "--out", tmp / "store", *CPU])))
    assert result.exit_code == 0, result.output
    return tmp / "store"


def _store_bytes(store: Path) -> dict[str, tuple[dict, bytes]]:
    """Every shard, index segment and counts file of a store by kind and number: its safetensors
    header (writer and build ids and the CRC of the shard file, whose header names them, left out) and
    every byte of its tensors."""
    build = store_builds(store)
    out = {}
    for folder in (SHARDS_DIR, "index", "counts"):
        for n, path in enumerate(sorted((store / folder).iterdir())):
            data = path.read_bytes()
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + size])
            meta = {
                k: v for k, v in header.get("__metadata__", {}).items() if k not in ("writer", "build", "shard", "shard_crc32")
            }
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            out[f"{folder}/{n}"] = ({"meta": meta, "tensors": tensors}, data[8 + size :])
    assert build  # one build each
    return out


def store_builds(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "builds").glob("*.json"))]


def _write(path: Path, rows: list[dict], kind: str) -> Path:
    """``rows`` as the dataset kind ``kind``: one .jsonl, one .json (a list), one .parquet (a list
    column), a folder of parquet files laid out as a Hub dataset repository, or a folder of three .json
    files (both read through datasets, as a Hub dataset's files are)."""
    if kind == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows))
        return path
    if kind == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
        return path
    if kind == "hub-parquet":  # a dataset repository as the Hub serves one: data/train-0000k-of-0000n.parquet
        (path / "data").mkdir(parents=True)
        half = len(rows) // 2
        for k, part in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.Table.from_pylist(part), path / "data" / f"train-{k:05d}-of-00002.parquet")
        return path
    path.mkdir()
    third = -(-len(rows) // 3)
    for i in range(3):
        (path / f"part-{i}.json").write_text(json.dumps(rows[i * third : (i + 1) * third]))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "hub-parquet", "json-folder"])
def test_a_store_built_from_ids_is_the_store_built_from_their_text_byte_for_byte(tmp_path, cli, stories, ids, text_store, kind):
    data = _write(tmp_path / "ids", [{"id": i, "prompt_token_ids": r} for i, r in enumerate(ids)], kind)
    out = tmp_path / "store"
    result = cli("build", data, "--ids-field", "prompt_token_ids", "--model", stories, "--out", out, *CPU)
    assert result.exit_code == 0, result.output
    assert _store_bytes(out) == _store_bytes(text_store)
    (a,), (b,) = store_builds(out), store_builds(text_store)
    for key in ("records", "skipped_records", "truncated_records", "dataset_tokens", "stored_tokens", "prefilled_tokens"):
        assert a[key] == b[key], key
    assert a["input"] == "ids" and a["options"]["ids_field"] == "prompt_token_ids"
    assert b["input"] == "text" and "ids_field" not in b["options"]  # text builds record the options they always did


def test_max_tokens_cuts_ids_as_it_cuts_the_text(tmp_path, cli, stories, texts, ids):
    stores = {}
    for name, args in (
        ("text", [write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])]),
        ("ids", [write_jsonl(tmp_path / "i.jsonl", [{"ids": r} for r in ids]), "--ids-field", "ids"]),
    ):
        stores[name] = tmp_path / name
        result = cli("build", *args, "--model", stories, "--out", stores[name], "--max-tokens", "40", *CPU)
        assert result.exit_code == 0, result.output
    assert _store_bytes(stores["ids"]) == _store_bytes(stores["text"])
    (build,) = store_builds(stores["ids"])
    assert build["truncated_records"] == sum(len(r) > 40 for r in ids) > 0


# (value, why it is skipped, whether its record is named: the first of each kind of fault is)
BAD = [
    ([1, 2, 512], "holds token id 512, outside the vocabulary of 512 ids (0 to 511)", True),
    ([1, -3, 5], "holds token id -3, outside the vocabulary of 512 ids (0 to 511)", False),
    ([1, 2.0, 5], "holds 2.0 (float), not an integer token id", True),
    ([1, True, 5], "holds True (bool), not an integer token id", False),
    ([1, "403", 5], "holds '403' (str), not an integer token id", False),
    ([], "holds an empty list of token ids", True),
    (None, "holds NoneType, not a list of token ids", True),
    ({"ids": [1, 2]}, "holds dict, not a list of token ids", False),
    ("Once upon a time", "holds text, not a list of token ids", True),  # after the first record: one odd record
]


def test_bad_ids_are_skipped_counted_and_named(tmp_path, cli, stories, ids):
    good = ids[:6]
    rows = [{"ids": good[0]}]
    for i, (value, _, _) in enumerate(BAD):
        rows += [{"ids": value}, {"ids": good[1 + i % 5]}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "store"
    result = cli("build", data, "--ids-field", "ids", "--model", stories, "--out", out, *CPU[:-2], "--no-fsync")
    assert result.exit_code == 0, result.output
    # Each kind of fault is named once, at its first record, with that record's number, as a build names
    # odd records; the others are skipped and counted without a line each.
    for i, (_, reason, named) in enumerate(BAD):
        line = f"warning: record {1 + 2 * i} {reason}; skipping such records (counted)"
        assert (line in result.output) == named, line
    assert result.output.count("warning:") == sum(named for _, _, named in BAD)
    (build,) = store_builds(out)
    assert build["skipped_records"] == len(BAD) and build["records"] == len(BAD) + 1
    # The good records' blocks are stored, exactly as a build of them alone stores them.
    alone = tmp_path / "alone"
    good_rows = [r for r in rows if r["ids"] in good]
    assert (
        cli(
            "build", write_jsonl(tmp_path / "g.jsonl", good_rows), "--ids-field", "ids", "--model", stories, "--out", alone, *CPU
        ).exit_code
        == 0
    )
    assert _store_bytes(out) == _store_bytes(alone)
    # analyze and simulate skip and count the same records.
    report = _json(cli, "analyze", data, "--ids-field", "ids", "--model", stories, "--holdout", "0", "--json", "--quiet")
    assert report["records"] == len(BAD) + 1
    sim = _json(cli, "simulate", data, "--ids-field", "ids", "--model", stories, "--capacity", "inf", "--json", "--quiet")
    assert sim["requests"] == len(BAD) + 1


def _json(cli, *args) -> dict:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


@pytest.mark.parametrize("command", ["build", "analyze", "simulate"])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_field_of_text_read_as_ids_is_refused_with_the_fix(tmp_path, cli, stories, texts, command, kind):
    data = _write(tmp_path / "texts", [{"text": t} for t in texts[:5]], kind)
    out = tmp_path / "store"
    args = ["--out", out, *CPU] if command == "build" else ["--quiet"]
    result = cli(command, data, "--ids-field", "text", "--model", stories, *args)
    assert result.exit_code == 3, result.output  # a dataset error
    assert result.output.startswith(f"error: --ids-field text: record 0 of {data} holds text ('Once upon a time")
    assert result.output.rstrip().endswith("not a list of token ids: pass --text-field text to tokenize it")
    assert not out.exists()  # refused before the store was made


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text-field", "text"], "--ids-field and --text-field exclude each other"),
        (["--messages-field", "turns"], "--ids-field and --messages-field exclude each other"),
        (["--system-prompt", "Be brief. "], "--system-prompt needs a tokenizer"),
    ],
)
@pytest.mark.parametrize("command", ["build", "analyze", "simulate"])
def test_ids_field_with_a_text_option_is_refused(tmp_path, cli, stories, ids, command, flags, message):
    data = write_jsonl(tmp_path / "ids.jsonl", [{"ids": r, "text": "x", "turns": ["x"]} for r in ids[:3]])
    out = tmp_path / "store"
    args = ["--out", out, *CPU] if command == "build" else ["--quiet"]
    result = cli(command, data, "--ids-field", "ids", *flags, "--model", stories, *args)
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output
    assert not out.exists()


def test_a_config_file_may_not_name_a_field_of_ids_and_one_of_text(tmp_path, cli, stories, ids):
    data = write_jsonl(tmp_path / "ids.jsonl", [{"ids": r} for r in ids[:3]])
    both = tmp_path / "both.toml"
    both.write_text('ids_field = "ids"\nmessages_field = "turns"\n')
    result = cli("build", data, "--config", both, "--model", stories, "--out", tmp_path / "a", *CPU)
    assert result.exit_code == 2 and "--ids-field and --messages-field exclude each other" in result.output
    # A file's text field (configs/demo.toml has one) gives way to --ids-field on the command line.
    text = tmp_path / "text.toml"
    text.write_text('text_field = "text"\n')
    result = cli("build", data, "--config", text, "--ids-field", "ids", "--model", stories, "--out", tmp_path / "b", *CPU)
    assert result.exit_code == 0, result.output


def test_analyze_and_simulate_read_ids_as_they_read_the_text(tmp_path, cli, stories, texts, ids, text_store):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    table = pa.Table.from_pylist([{"prompt_token_ids": r} for r in ids])
    pq.write_table(table, tmp_path / "i.parquet")
    as_ids = [tmp_path / "i.parquet", "--ids-field", "prompt_token_ids"]
    model = ["--model", stories, "--json", "--quiet"]
    by_ids, by_text = _json(cli, "analyze", *as_ids, *model), _json(cli, "analyze", text, *model)
    assert by_ids.pop("dataset") != by_text.pop("dataset")
    assert by_ids == by_text and by_ids["records"] + by_ids["holdout_records"] == len(texts)
    sim = ["--capacity", "4,16,inf", "--store", text_store]
    by_ids, by_text = _json(cli, "simulate", *as_ids, *model, *sim), _json(cli, "simulate", text, *model, *sim)
    assert by_ids.pop("source") != by_text.pop("source")
    for result in (*by_ids["results"], *by_text["results"]):  # the replay's own speed
        del result["seconds"], result["lookups_per_second"]
    assert by_ids == by_text and by_ids["requests"] == len(texts)
    stored = sum(len(r) // 16 * 16 for r in ids)  # the store holds every full block of these requests
    assert by_ids["static_token_hit_rate"] == pytest.approx(stored / sum(map(len, ids)), rel=1e-12)


def test_ls_says_which_builds_read_ids(tmp_path, cli, stories, texts, ids):
    out = tmp_path / "store"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts[:10]])
    assert cli("build", text, "--model", stories, "--out", out, *CPU).exit_code == 0
    summary = ls_json(cli, out)
    assert summary["inputs"] == ["text"] and "token ids" not in cli("ls", out).output
    data = write_jsonl(tmp_path / "i.jsonl", [{"ids": r} for r in ids[10:20]])
    assert cli("build", data, "--ids-field", "ids", "--model", stories, "--out", out, "--append", *CPU).exit_code == 0
    summary = ls_json(cli, out)
    assert summary["inputs"] == ["text", "ids"] and [b["input"] for b in summary["builds"]] == ["text", "ids"]
    human = cli("ls", out).output
    assert "input        text, token ids (--ids-field)" in human
    assert "not that a server tokenizes prompts into them" in human
    # A build record written before `input` was recorded says what it read by its options.
    for path in (out / "builds").glob("*.json"):
        record = json.loads(path.read_text())
        del record["input"]
        path.write_text(json.dumps(record))
    assert [b["input"] for b in ls_json(cli, out)["builds"]] == ["text", "ids"]


def test_a_vllm_request_log_becomes_a_store_of_the_prompts_it_served(tmp_path, cli, stories):
    """tests/data/vllm_request_log.txt: lines vLLM 0.32.0 logged (its own logger and tokenizer) for
    the prompts in vllm_request_prompts.json; the example script turns them into records of ids, and
    their store is the store of those prompts' text."""
    log = DATA / "vllm_request_log.txt"
    prompts = json.loads((DATA / "vllm_request_prompts.json").read_text())
    converted = subprocess.run(
        [sys.executable, str(REPO / "examples" / "vllm_request_log.py"), str(log)], capture_output=True, text=True, check=True
    ).stdout
    rows = [json.loads(line) for line in converted.splitlines()]
    assert len(rows) == len(prompts) and len({r["request_id"] for r in rows}) == len(rows)
    data = tmp_path / "requests.jsonl"
    data.write_text(converted)
    by_ids, by_text = tmp_path / "ids", tmp_path / "text"
    assert cli("build", data, "--ids-field", "prompt_token_ids", "--model", stories, "--out", by_ids, *CPU).exit_code == 0
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": p} for p in prompts])
    assert cli("build", text, "--model", stories, "--out", by_text, *CPU).exit_code == 0
    assert _store_bytes(by_ids) == _store_bytes(by_text)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_ranks_share_records_of_ids_and_build_what_one_process_builds(tmp_path, cli, stories, kind):
    """--rank ranks at once on line shares of a .jsonl and torchrun ranks on row shares of a .parquet,
    with a record of bad ids among them: the store of one process's build of the text."""
    from .test_distributed import assert_one_distributed_build, assert_same_kv, finish, groups_dataset, rank_process, torchrun

    rows = [json.loads(line) for line in groups_dataset(tmp_path / "d.jsonl", n=90, groups=6).read_text().splitlines()]
    texts = [r["text"] for r in rows if r["text"]]
    token_ids = AutoTokenizer.from_pretrained(stories)(texts).input_ids
    token_ids.insert(50, [1, 2, 9999])  # skipped, and counted once, by the rank whose share holds it
    data = _write(tmp_path / "ids", [{"ids": r} for r in token_ids], kind)
    one, many = tmp_path / "one", tmp_path / "many"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    assert cli("build", text, "--model", stories, "--out", one, *CPU).exit_code == 0
    (single,) = ls_json(cli, one)["builds"]
    args = ["build", data, "--ids-field", "ids", "--model", stories, "--out", many, *CPU]
    if kind == "jsonl":
        for p in [rank_process(r, 2, *args) for r in range(2)]:
            finish(p)
    else:
        finish(torchrun(2, *args))
    single["skipped_records"] = 1
    b = assert_one_distributed_build(cli, many, 2, single, balanced=False)
    assert b["input"] == "ids" and all(r["records"] > 0 for r in b["ranks"])
    assert_same_kv(one, many)
