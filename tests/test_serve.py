"""`prefixgen serve` through the official openai client, on a free loopback port."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from prefixgen import BuildConfig, IncompatibleStoreError, PrefixStore, build
from prefixgen.format import SHARDS_DIR, read_safetensors_header
from prefixgen.integrations.serve import Engine, ServeConfig, create_app

from .conftest import CHAT_TEMPLATE, REPO, SYSTEM, write_jsonl

LONG_SYSTEM = SYSTEM * 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cfg: ServeConfig):
        self.engine = Engine(cfg)
        self.port = _free_port()
        config = uvicorn.Config(create_app(self.engine), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def raw(self, path: str, data: bytes | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories_chat):
    tmp = tmp_path_factory.mktemp("serve")
    rows = [{"messages": [{"role": "user", "content": f"Tell me a story about a {w}."}]} for w in ("cat", "dog", "bird")]
    rows += [{"text": LONG_SYSTEM + "Once upon a time"}]
    data = write_jsonl(tmp / "chats.jsonl", rows[:3])
    out = tmp / "store"
    build(
        BuildConfig(
            dataset=str(data),
            model=str(stories_chat),
            out=str(out),
            messages_field="messages",
            system_prompt=LONG_SYSTEM,
            device="cpu",
            dtype="float32",
            quiet=True,
        )
    )
    texts = write_jsonl(tmp / "texts.jsonl", rows[3:])
    build(
        BuildConfig(
            dataset=str(texts), model=str(stories_chat), out=str(out), append=True, device="cpu", dtype="float32", quiet=True
        )
    )
    return out


@pytest.fixture(scope="module")
def servers(store, stories_chat):
    cfg = dict(store=str(store), model=str(stories_chat), device="cpu", dtype="float32", served_model_name="stories")
    with_store, without = Server(ServeConfig(**cfg)), Server(ServeConfig(**cfg, no_store=True))
    yield with_store, without
    with_store.stop()
    without.stop()


def _messages(content: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": content}]


def _chat(server, content: str, **kw):
    kw = {"temperature": 0, "max_tokens": 24, **kw}
    return server.client.chat.completions.create(model="stories", messages=_messages(content), **kw)


def _metric(server, name: str) -> float:
    status, text = server.raw("/metrics")
    assert status == 200
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"prefixgen_{name} ")))


def _stored_prefix(engine: Engine, ids: list[int]) -> int:
    """Tokens of ``ids[:-1]`` the store must hit, from the tokenizer alone: the longest common
    prefix with a stored chat (every block-aligned prefix of each is stored), in whole blocks."""
    stored = [engine.tokenize_chat(_messages(f"Tell me a story about a {w}.")) for w in ("cat", "dog", "bird")]
    common = max(next((i for i, (x, y) in enumerate(zip(ids[:-1], s)) if x != y), min(len(ids) - 1, len(s))) for s in stored)
    return common // 16 * 16


def test_greedy_answers_are_the_same_with_and_without_the_store(servers):
    hit, plain = servers
    for content in ("Tell me a story about a cat.", "Tell me a story about a frog."):
        a, b = _chat(hit, content), _chat(plain, content)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.completion_tokens == b.usage.completion_tokens > 0
        expected = _stored_prefix(hit.engine, hit.engine.tokenize_chat(_messages(content)))
        assert a.usage.prompt_tokens_details.cached_tokens == expected >= 48  # the system prompt at least
        assert b.usage.prompt_tokens_details.cached_tokens == 0
    a = hit.client.completions.create(model="stories", prompt=LONG_SYSTEM + "Once upon a time", temperature=0, max_tokens=20)
    b = plain.client.completions.create(model="stories", prompt=LONG_SYSTEM + "Once upon a time", temperature=0, max_tokens=20)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.usage.prompt_tokens_details.cached_tokens > 0
    assert a.usage.prompt_tokens_details.cached_tokens < a.usage.prompt_tokens  # one token stays uncached


def test_streaming_gives_the_same_text(servers):
    hit, _ = servers
    whole = _chat(hit, "Tell me a story about a dog.").choices[0].message.content
    chunks = list(_chat(hit, "Tell me a story about a dog.", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    streamed = list(
        hit.client.completions.create(model="stories", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    )
    plain = hit.client.completions.create(model="stories", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_hot_prefixes_are_read_from_disk_once(servers):
    hit, _ = servers
    before = hit.engine.metrics.disk_tokens
    _chat(hit, "Tell me a story about a bird.")
    first = hit.engine.metrics.disk_tokens - before
    _chat(hit, "Tell me a story about a bird.")
    assert hit.engine.metrics.disk_tokens - before == first  # the second request found it on the device
    status, text = hit.raw("/metrics")
    assert status == 200
    assert "prefixgen_prefix_cache_hit_tokens_total" in text and "prefixgen_time_to_first_token_seconds_count" in text
    assert 'prefixgen_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_models_and_health(servers):
    hit, _ = servers
    assert [m.id for m in hit.client.models.list()] == ["stories"]
    status, body = hit.raw("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_bad_requests_get_http_errors_and_the_server_lives_on(servers):
    hit, _ = servers
    status, body = hit.raw("/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        hit.client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        hit.client.completions.create(model="stories", prompt="Once upon a time " * 200, max_tokens=16)
    with pytest.raises(openai.BadRequestError):
        hit.client.completions.create(model="stories", prompt="hi", max_tokens=2, temperature=7)
    assert hit.client.completions.create(model="stories", prompt="Once", max_tokens=3, temperature=0).choices[0].text


def test_concurrent_requests_wait_their_turn(servers):
    hit, _ = servers
    results, errors = [], []

    def ask(word):
        try:
            results.append(_chat(hit, f"Tell me a story about a {word}.").choices[0].message.content)
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(w,)) for w in ("cat", "dog", "cat", "owl")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 4
    assert results.count(_chat(hit, "Tell me a story about a cat.").choices[0].message.content) == 2


def test_refuses_a_store_of_another_model(store, qwen2):
    with pytest.raises(IncompatibleStoreError):
        Engine(ServeConfig(store=str(store), model=str(qwen2), device="cpu"))


def test_a_client_that_goes_away_never_makes_two_generations_run_at_once(servers):
    """A stream closed after two chunks, then other requests at once: each answer is the
    --no-store answer and the metrics never show two generations in flight."""
    hit, plain = servers
    cancelled = _metric(hit, "generations_cancelled_total")
    stream = _chat(hit, "Tell me a story about a cat.", stream=True, max_tokens=240)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()  # the client goes away; generation has up to 238 tokens to go
    asks = [
        lambda s: _chat(s, "Tell me a story about a dog.").choices[0].message.content,
        lambda s: _chat(s, "Tell me a story about a frog.").choices[0].message.content,
        lambda s: "".join(c.choices[0].delta.content or "" for c in _chat(s, "Tell me a story about a cat.", stream=True)),
        lambda s: (
            s.client.completions.create(model="stories", prompt=LONG_SYSTEM + "Once upon a time", temperature=0, max_tokens=20)
            .choices[0]
            .text
        ),
    ]
    answers, errors = {}, []

    def ask(i):
        try:
            answers[i] = asks[i](hit)
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert [answers[i] for i in range(len(asks))] == [a(plain) for a in asks]
    assert _metric(hit, "generations_in_flight_max") == 1
    assert _metric(hit, "generations_in_flight") == 0
    assert _metric(hit, "generations_cancelled_total") == cancelled + 1  # it stopped early, at its next token


def test_a_block_that_fails_its_checksum_is_skipped_and_counted(servers, store, stories_chat, tmp_path):
    _, plain = servers
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    server = Server(
        ServeConfig(store=str(damaged), model=str(stories_chat), device="cpu", dtype="float32", served_model_name="stories")
    )
    try:
        st = server.engine.store
        ids = server.engine.tokenize_chat(_messages("Tell me a story about a frog."))
        loc = st.find_prefix(st.keys(ids[:-1])).locations[1]  # the second block of the system prompt
        path = damaged / SHARDS_DIR / loc.shard
        with open(path, "rb") as f:
            at = read_safetensors_header(f, path).offset("kv") + loc.slot * st.manifest.kv.bytes_per_token * st.block_size
        data = bytearray(path.read_bytes())
        data[at + 100] ^= 0x10  # one bit of the block's KV
        path.write_bytes(bytes(data))
        a, b = _chat(server, "Tell me a story about a frog."), _chat(plain, "Tell me a story about a frog.")
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.prompt_tokens_details.cached_tokens == 0  # served without the damaged prefix
        assert _metric(server, "prefix_load_errors_total") == 1
    finally:
        server.stop()


def test_fp8_store_is_served_with_hits(tmp_path, stories_chat):
    rows = [{"text": LONG_SYSTEM + f"Once upon a time there was a {w}."} for w in ("cat", "dog")]
    out = tmp_path / "fp8"
    build(
        BuildConfig(
            dataset=str(write_jsonl(tmp_path / "t.jsonl", rows)),
            model=str(stories_chat),
            out=str(out),
            kv_dtype="fp8",
            device="cpu",
            dtype="float32",
            quiet=True,
        )
    )
    assert PrefixStore.open(out).manifest.kv.storage == "fp8"
    engine = Engine(ServeConfig(store=str(out), model=str(stories_chat), device="cpu", dtype="float32"))
    ids = engine.tokenize_text(LONG_SYSTEM + "Once upon a time there was a frog.")
    shared = next(i for i, (x, y) in enumerate(zip(ids, engine.tokenize_text(rows[0]["text"]))) if x != y)
    for _ in range(2):  # from disk, then from the device cache
        gen = engine.generate(ids, {"max_tokens": 12, "temperature": 0})
        # fp8 KV is not exact, so the text may differ from --no-store's; generation must run, with the hit.
        assert gen.cached_tokens == shared // 16 * 16 > 0
        assert len(gen.tokens) > 0 and gen.text
    assert engine.metrics.disk_tokens == shared // 16 * 16


def test_a_store_built_with_a_chat_template_file_is_served_through_the_cli(tmp_path, cli, stories):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    data = write_jsonl(
        tmp_path / "chats.jsonl", [{"messages": _messages(f"Tell me a story about a {w}.")} for w in ("cat", "dog")]
    )
    out = tmp_path / "store"
    flags = ["--messages-field", "messages", "--chat-template", template, "--device", "cpu", "--quiet"]
    built = cli("build", data, "--model", stories, "--out", out, *flags)
    assert built.exit_code == 0, built.output
    with pytest.raises(IncompatibleStoreError, match="tokenizer"):  # without the template it is another tokenizer
        Engine(ServeConfig(store=str(out), model=str(stories), device="cpu"))
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    command = [sys.executable, "-m", "prefixgen", "serve", str(out), "--model", str(stories), "--chat-template", str(template)]
    command += ["--gpu-cache-bytes", "64KiB", "--port", str(port), "--device", "cpu", "--served-model-name", "stories"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(
            model="stories", messages=_messages("Tell me a story about a dog."), temperature=0, max_tokens=8
        )
        prompt = answer.usage.prompt_tokens
        assert answer.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16 > 0  # the whole chat is stored
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            held = next(
                int(x.split()[1]) for x in r.read().decode().splitlines() if x.startswith("prefixgen_device_cache_bytes ")
            )
        assert 0 < held <= 64 << 10  # --gpu-cache-bytes 64KiB
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_every_serve_option_is_a_flag_whose_default_lives_only_in_ServeConfig():
    from prefixgen import cli

    params = inspect.signature(cli.serve).parameters
    assert set(params) == {f.name for f in dataclasses.fields(ServeConfig)}
    assert all(p.default is None for p in params.values())  # unset: ServeConfig fills it in
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Serve a store") :]
    section = section[: section.index("\n## ", 1)]
    for name in params:
        if name != "store":
            assert f"`--{name.replace('_', '-')}" in section, name


def test_a_prune_while_serving_keeps_the_hits_and_never_answers_500(servers, store, stories_chat, tmp_path):
    """A prune keeping every block moves them to new shards and removes the old ones: the server reopens the index
    and keeps serving the same hits (before: the shard it had read from was gone, and the request got HTTP 500)."""
    from prefixgen.maintain.prune import prune_store
    from prefixgen.store.blockcache import BlockCache

    _, plain = servers
    live = tmp_path / "live"
    shutil.copytree(store, live)
    server = Server(
        ServeConfig(store=str(live), model=str(stories_chat), device="cpu", dtype="float32", served_model_name="stories")
    )
    try:
        first = _chat(server, "Tell me a story about a cat.")
        server.engine.hot = BlockCache(
            server.engine.cfg.gpu_cache_bytes
        )  # the next request reads the store, not the device cache
        prune_store(live, min_records=1)
        again, want = _chat(server, "Tell me a story about a cat."), _chat(plain, "Tell me a story about a cat.")
        assert again.choices[0].message.content == want.choices[0].message.content
        hit = first.usage.prompt_tokens_details.cached_tokens
        assert hit > 0 and again.usage.prompt_tokens_details.cached_tokens == hit
        assert _metric(server, "prefix_load_errors_total") == 0
    finally:
        server.stop()
