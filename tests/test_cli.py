"""`prefixgen ls` and `prefixgen verify` through the real CLI."""

from __future__ import annotations

import json

from prefixgen.format import FORMAT_VERSION, SHARDS_DIR


def _build(cli, stories, text_dataset, out):
    result = cli("build", text_dataset, "--model", stories, "--out", out, "--device", "cpu", "--shard-bytes", "60000", "--quiet")
    assert result.exit_code == 0, result.output


def test_verify_reports_damage_and_exits_1_without_changing_the_store(tmp_path, cli, stories, text_dataset):
    out = tmp_path / "store"
    _build(cli, stories, text_dataset, out)
    ok = cli("verify", out)
    assert ok.exit_code == 0 and "ok" in ok.stdout
    shard = sorted((out / SHARDS_DIR).iterdir())[1]
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF  # a token id: its block's key no longer matches
    shard.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = cli("verify", out)
    assert bad.exit_code == 1
    assert "FAULT" in bad.stderr and shard.name in bad.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # verify never writes
    shard.write_bytes(bytes(data[:100]))  # a truncated shard
    worse = cli("verify", out)
    assert worse.exit_code == 1 and "bytes, the index recorded" in worse.stderr


def test_ls_and_verify_on_something_that_is_not_a_store(tmp_path, cli):
    for command in ("ls", "verify"):
        result = cli(command, tmp_path)
        assert result.exit_code != 0
        assert "not a prefixgen store" in result.output and "Traceback" not in result.output
    (tmp_path / "manifest.json").write_text("{ truncated")
    result = cli("ls", tmp_path)
    assert result.exit_code == 5 and "not valid JSON" in result.stderr


def test_ls_json_and_table(tmp_path, cli, stories, text_dataset):
    out = tmp_path / "store"
    _build(cli, stories, text_dataset, out)
    summary = json.loads(cli("ls", out, "--json").stdout)
    assert summary["format_version"] == FORMAT_VERSION and summary["block_size"] == 16
    assert summary["model"]["architecture"] == "LlamaForCausalLM"
    assert len(summary["shards"]) > 1 and sum(s["blocks"] for s in summary["shards"]) == summary["blocks"]
    assert summary["bytes"] > sum(s["bytes"] for s in summary["shards"]) > 0
    table = cli("ls", out).stdout
    for word in ("blocks", "shards", "builds", "most-shared prefixes", "LlamaForCausalLM"):
        assert word in table
