"""`prefixgen serve` through the official openai client, on a free loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from prefixgen import BuildConfig, IncompatibleStoreError, build
from prefixgen.integrations.serve import Engine, ServeConfig, create_app

from .conftest import SYSTEM, write_jsonl

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


def _chat(server, content: str, **kw):
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": content}]
    return server.client.chat.completions.create(model="stories", messages=messages, temperature=0, max_tokens=24, **kw)


def test_greedy_answers_are_the_same_with_and_without_the_store(servers):
    hit, plain = servers
    for content in ("Tell me a story about a cat.", "Tell me a story about a frog."):
        a, b = _chat(hit, content), _chat(plain, content)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.completion_tokens == b.usage.completion_tokens > 0
        assert a.usage.prompt_tokens_details.cached_tokens >= 48  # the system prompt at least
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
