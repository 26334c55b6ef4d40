"""What the benchmarks of an engine serving a `prefixgen export` share (sglang_serve.py, vllm_offload_serve.py):
one stored prefix built and exported, the prompts that share it, and an engine's HTTP server started, asked
and stopped."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import make_texts, write_jsonl

from prefixgen import BuildConfig, build
from prefixgen.config import ExportConfig
from prefixgen.export import ExportSummary, export_store


@dataclass
class Prefix:
    """One P-token prefix, its bfloat16 store exported, and prompts of the prefix plus a new question."""

    tokens: int
    text: str
    export: ExportSummary
    export_s: float
    prompts: list[list[int]]

    def row(self) -> dict:
        """The export's part of the benchmark's JSON line."""
        return {
            "prefix": self.tokens,
            "export_files": self.export.files,
            "export_GB": round(self.export.bytes / 1e9, 3),
            "export_s": round(self.export_s, 2),
        }


def exported_prefix(tok, model: Path, tokens: int, out: Path, export: ExportConfig, prompts: int) -> Prefix:
    """Build a bfloat16 store of one ``tokens``-token text in ``out``/store-P and export it as ``export`` says
    (``store`` is filled in); ``prompts`` prompts share the prefix."""
    text = tok.decode(tok(make_texts(1, tokens, tokens, seed=tokens)[0]).input_ids[:tokens], skip_special_tokens=True)
    store = out / f"store-{tokens}"
    data = write_jsonl(out / f"prefix-{tokens}.jsonl", [text])
    build(BuildConfig(dataset=str(data), model=str(model), out=str(store), overwrite=True, quiet=True, dtype="bfloat16"))
    t = time.perf_counter()
    summary = export_store(export.merged(store=str(store)))
    asks = [tok(text + f" Question {i}: what happened next to the {i}th friend?").input_ids for i in range(prompts)]
    return Prefix(tokens, text, summary, time.perf_counter() - t, asks)


def post(port: int, path: str, body: dict) -> dict:
    """A JSON POST to the local server on ``port``."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start_server(cmd: list[str], port: int, log: Path, minutes: int, env: dict | None = None) -> subprocess.Popen:
    """Start the server ``cmd`` (its output in ``log``) and wait until its /health answers."""
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(minutes * 60):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited: see {log}") from None
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start in {minutes} minutes: see {log}")


def stop(proc: subprocess.Popen, seconds: int) -> None:
    proc.terminate()
    proc.wait(seconds)
