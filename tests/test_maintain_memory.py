"""Maintenance in bounded memory: the real CLI's peak RSS on a 30k- and a 300k-block store.

Slow (two real stores of 30,000 and 300,000 blocks, made by benchmarks/maintain_memory.py with the
library's writers, and a child process per command): ``make test-slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["verify --quick", "verify", "prune --min-records 8", "prune --max-bytes half", "gc"]
GROWTH_MIB = 25


@pytest.mark.slow
def test_verify_prune_and_gc_memory_does_not_grow_with_the_store(tmp_path):
    """From 30k to 300k blocks (26 MiB of index more), each command's peak RSS grows by less than
    25 MiB: it reads the index, the counts and the shards a piece at a time."""
    args = [sys.executable, str(ROOT / "benchmarks" / "maintain_memory.py"), "--dir", str(tmp_path)]
    args += ["--blocks", "30000", "--blocks", "300000"] + [a for c in COMMANDS for a in ("--only", c)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    peak = {(r["blocks"], r["command"]): r for r in rows}
    assert len(peak) == 2 * len(COMMANDS), out.stdout + out.stderr
    assert all(r["rc"] == 0 for r in rows), rows
    growth = {c: peak[(300000, c)]["peak_rss_mib"] - peak[(30000, c)]["peak_rss_mib"] for c in COMMANDS}
    assert all(g < GROWTH_MIB for g in growth.values()), growth
