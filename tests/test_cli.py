"""`prefixgen ls` and `prefixgen verify` through the real CLI."""

from __future__ import annotations

import json

from prefixgen.format import HEADS_FORMAT_VERSION, SHARDS_DIR, read_safetensors_header


def _build(cli, stories, text_dataset, out):
    result = cli("build", text_dataset, "--model", stories, "--out", out, "--device", "cpu", "--shard-bytes", "60000", "--quiet")
    assert result.exit_code == 0, result.output


def test_verify_reports_damage_and_exits_1_without_changing_the_store(tmp_path, cli, stories, text_dataset):
    out = tmp_path / "store"
    _build(cli, stories, text_dataset, out)
    ok = cli("verify", out)
    assert ok.exit_code == 0 and "ok" in ok.stdout
    shards = sorted((out / SHARDS_DIR).iterdir())  # one writer: in the order written
    shard = shards[1]
    with open(shard, "rb") as f:
        tokens_at = read_safetensors_header(f, shard).offset("tokens")  # [blocks, B] uint32
    data = bytearray(shard.read_bytes())
    data[tokens_at] ^= 0x01  # the first token id of slot 0: its KV and CRC are intact, its key is not
    shard.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = cli("verify", out)
    assert bad.exit_code == 1
    assert f"{shard.name}: 1 blocks have a key that is not the hash of parent and tokens" in bad.stderr
    assert "CRC" not in bad.stderr and "checksum" not in bad.stderr  # found by recomputing the key alone
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # verify never writes
    data[tokens_at] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli("verify", out).exit_code == 0
    # A lost segment (orphaned blocks) is tested in test_maintain.py on per-shard segments: a finished
    # build compacts its segments into one, so here losing it would lose every block.
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
    assert summary["format_version"] == HEADS_FORMAT_VERSION and summary["block_size"] == 16
    assert summary["block_checksum"] == "crc32c"
    assert summary["model"]["architecture"] == "LlamaForCausalLM"
    assert len(summary["shards"]) > 1 and sum(s["blocks"] for s in summary["shards"]) == summary["blocks"]
    assert summary["bytes"] > sum(s["bytes"] for s in summary["shards"]) > 0
    table = cli("ls", out).stdout
    for word in ("blocks", "shards", "builds", "most-shared prefixes", "LlamaForCausalLM"):
        assert word in table
