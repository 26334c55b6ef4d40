"""``prefixgen serve``: an OpenAI-compatible HTTP server that answers from a prefix store.

For each request it tokenizes the prompt as the build did, takes the KV of the longest stored
prefix (from device memory if hot, else from the store), prefills only the rest and generates
with transformers. ``usage.prompt_tokens_details.cached_tokens`` reports the hit.

Requests are served one at a time, in order: generations run on one worker thread (and
``Engine.generate`` holds a lock), so ``/health`` and ``/metrics`` answer while a request
generates, and a streaming client that goes away stops its generation at the next token; the
next request starts only after that. ``/metrics`` shows the generations in flight (never more
than one).

Needs the ``serve`` extra: ``pip install 'prefixgen[serve]'`` (FastAPI and uvicorn).
"""

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from prefixgen.compat import cache_kwargs
from prefixgen.config import ServeConfig
from prefixgen.errors import ConfigError, StoreError
from prefixgen.kvcache import recurrent_layers
from prefixgen.model import load_model
from prefixgen.store.blockcache import BlockCache
from prefixgen.store.reader import PrefixMatch, PrefixStore, kv_to_cache

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestError(Exception):
    """An error answered to the client as OpenAI does: ``{"error": {...}}`` with a status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


@dataclass(slots=True)
class Generation:
    """One finished (or streamed) generation."""

    prompt_tokens: int
    cached_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    ttft: float = 0.0


@dataclass(slots=True)
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    disk_tokens: int = 0
    generated_tokens: int = 0
    load_errors: int = 0
    cancelled: int = 0
    in_flight: int = 0  # generations running now
    max_in_flight: int = 0  # the most ever running at once (1 unless serialization is broken)
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1

    def render(self, cache: BlockCache | None) -> str:
        """Prometheus text format."""
        lines = [
            "# HELP prefixgen_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE prefixgen_requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'prefixgen_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        for name, help_, value in (
            ("prompt_tokens_total", "Prompt tokens received.", self.prompt_tokens),
            ("prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix store.", self.cached_tokens),
            (
                "prefix_cache_disk_tokens_total",
                "Of those, tokens read from disk (the rest were hot on the device).",
                self.disk_tokens,
            ),
            ("generation_tokens_total", "Tokens generated.", self.generated_tokens),
            ("prefix_load_errors_total", "Stored prefixes that failed their checksum (served without them).", self.load_errors),
            ("generations_cancelled_total", "Streams whose client went away (generation stopped early).", self.cancelled),
        ):
            lines += [f"# HELP prefixgen_{name} {help_}", f"# TYPE prefixgen_{name} counter", f"prefixgen_{name} {value}"]
        for name, help_, value in (
            ("generations_in_flight", "Generations running now.", self.in_flight),
            ("generations_in_flight_max", "The most generations ever running at once (1: one at a time).", self.max_in_flight),
        ):
            lines += [f"# HELP prefixgen_{name} {help_}", f"# TYPE prefixgen_{name} gauge", f"prefixgen_{name} {value}"]
        lines += [
            "# HELP prefixgen_time_to_first_token_seconds Time from request to first generated token.",
            "# TYPE prefixgen_time_to_first_token_seconds histogram",
        ]
        for bound, n in zip(TTFT_BUCKETS, self.ttft_buckets):
            lines.append(f'prefixgen_time_to_first_token_seconds_bucket{{le="{bound}"}} {n}')
        lines.append(f'prefixgen_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}')
        lines.append(f"prefixgen_time_to_first_token_seconds_sum {self.ttft_sum}")
        lines.append(f"prefixgen_time_to_first_token_seconds_count {self.ttft_count}")
        lines += [
            "# HELP prefixgen_device_cache_bytes Bytes of hot prefix KV held on the device.",
            "# TYPE prefixgen_device_cache_bytes gauge",
            f"prefixgen_device_cache_bytes {cache.bytes if cache else 0}",
        ]
        return "\n".join(lines) + "\n"


class Engine:
    """Model, tokenizer, store and hot-prefix cache; turns token ids into generations.

    Example:
        >>> engine = Engine(ServeConfig(store="store", model="models/stories260K", device="cpu"))  # doctest: +SKIP
        >>> engine.generate(engine.tokenize_text("Once upon a time"), {"max_tokens": 8}).text  # doctest: +SKIP
    """

    def __init__(self, cfg: ServeConfig, model: torch.nn.Module | None = None, tokenizer: Any = None):
        self.cfg = cfg
        if model is None:
            model, tokenizer, device = load_model(
                cfg.model,
                device=cfg.device,
                dtype=cfg.dtype,
                trust_remote_code=cfg.trust_remote_code,
                chat_template=cfg.chat_template,
            )
        else:
            device = next(model.parameters()).device
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.name = cfg.served_model_name or cfg.model
        self.store: PrefixStore | None = None
        self.hot: BlockCache | None = None
        if not cfg.no_store:
            self.store = PrefixStore.open(cfg.store)
            self.store.check_compatible(self.model, self.tokenizer)
            self.hot = BlockCache(cfg.gpu_cache_bytes)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or 1 << 62
        self.metrics = Metrics()
        self.created = int(time.time())
        # One generation at a time: BlockCache is not thread-safe, and two generations would race for the device.
        self._one_at_a_time = threading.Lock()
        self._next_refresh = time.monotonic() + cfg.refresh_seconds  # when prefix_cache next looks for store changes

    # ------------------------------------------------------------------ tokenizing (as the build does)

    def tokenize_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, f"model {self.name} has no chat template; use /v1/completions")
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(rendered, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ the prefix

    def prefix_cache(self, ids: list[int]):
        """(DynamicCache or None, tokens covered): the longest stored prefix of ``ids[:-1]`` (one
        prompt token always stays uncached, since generate must prefill at least one)."""
        if self.store is None or self.hot is None:
            return None, 0
        if time.monotonic() >= self._next_refresh:  # the store may have changed: an append, a prune, a compaction
            self._next_refresh = time.monotonic() + self.cfg.refresh_seconds
            try:
                self.store.refresh()
            except (StoreError, OSError):
                self.metrics.load_errors += 1  # the index mid-change or damaged: go on with the one we have
        if recurrent_layers(self.store.manifest.kv):
            return self._hybrid_prefix(ids)
        keys = self.store.keys(ids[:-1])
        loaded = None
        try:
            # A shard gone since the index was read (a prune, compaction, gc): the index is reopened and read again.
            found, loaded = self.store.read_prefix(keys, hot=self.hot, device=self.device, dtype=self.model.dtype)
        except (StoreError, OSError):
            self.metrics.load_errors += 1  # serve correctly without the damaged part
            found = PrefixMatch(list(itertools.takewhile(self.hot.__contains__, keys)), [], [])
        if not found.keys:
            loaded = None
        parts = [self.hot.peek(key) for key in found.hot]  # each [B, L, 2, H, D]
        if loaded is not None:  # [n * B, L, 2, H, D]
            parts.append(loaded)
            self.metrics.disk_tokens += loaded.shape[0]
            self.hot.put_run(found.keys, loaded, prefix=found.hot)  # the chain's first blocks are evicted last
        else:
            self.hot.touch_chain(found.hot)
        if not parts:
            return None, 0
        kv = torch.cat(parts)  # [n, L, 2, H, D]
        return kv_to_cache(kv, self.store.manifest.kv), kv.shape[0]

    def _hybrid_prefix(self, ids: list[int]):
        """A hybrid model's prefix (``PrefixStore.load``): up to the last stored block with a recurrent
        state. The device cache is not used: it holds per-token KV, not states."""
        try:
            cache = self.store.load(ids[:-1], device=self.device, dtype=self.model.dtype)
        except (StoreError, OSError):
            self.metrics.load_errors += 1  # serve correctly without the damaged part
            return None, 0
        tokens = int(cache.get_seq_length())
        self.metrics.disk_tokens += tokens
        return (cache, tokens) if tokens else (None, 0)

    # ------------------------------------------------------------------ generating

    def detokenize(self, prompt: list[int], new: list[int]) -> str:
        """Text of ``new`` as it continues ``prompt``: decoded after a few prompt tokens, so a
        leading space that SentencePiece-style tokenizers drop at the start of a decode is kept."""
        context = prompt[-4:]
        base = self.tokenizer.decode(context, skip_special_tokens=True)
        full = self.tokenizer.decode(context + new, skip_special_tokens=True)
        return full[len(base) :] if full.startswith(base) else self.tokenizer.decode(new, skip_special_tokens=True)

    def generate(
        self,
        ids: list[int],
        params: dict[str, Any],
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Generate for prompt ``ids``. ``on_text`` gets each new piece of text as it is made; when
        ``cancel`` is set (the client went away) generation stops at the next token. Calls from
        several threads run one at a time.

        Example:
            >>> engine.generate(engine.tokenize_text("Once upon a time"), {"max_tokens": 8}).text  # doctest: +SKIP
            ' there was a little girl named Lily.'
        """
        with self._one_at_a_time:
            m = self.metrics
            m.in_flight += 1
            m.max_in_flight = max(m.max_in_flight, m.in_flight)
            try:
                gen = self._generate(ids, params, on_text, cancel)
            finally:
                m.in_flight -= 1
            if cancel is not None and cancel.is_set():
                m.cancelled += 1
            return gen

    @torch.inference_mode()
    def _generate(
        self, ids: list[int], params: dict[str, Any], on_text: Callable[[str], None] | None, cancel: threading.Event | None
    ) -> Generation:
        started = time.perf_counter()
        max_tokens = params.get("max_tokens") or self.cfg.default_max_tokens
        self._check_length(ids, max_tokens)
        cache, cached = self.prefix_cache(ids)
        gen = Generation(prompt_tokens=len(ids), cached_tokens=cached)
        collector = _Collector(self, gen, ids, params.get("stop") or [], on_text, started)
        sampling = _sampling_kwargs(params, max_tokens)
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=collector,
            stopping_criteria=StoppingCriteriaList([_StopOnString(collector, cancel)]),
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
            **sampling,
            **cache_kwargs(self.model, cache),
        )
        new = out[0, len(ids) :].tolist()
        self._finish(gen, ids, new, collector.sent, on_text)
        m = self.metrics
        m.prompt_tokens += len(ids)
        m.cached_tokens += cached
        m.generated_tokens += len(new)
        m.observe_ttft(gen.ttft or time.perf_counter() - started)
        return gen

    def _check_length(self, ids: list[int], max_tokens: int) -> None:
        """Refuse a prompt that leaves no room for ``max_tokens`` more in the model's context."""
        if len(ids) + max_tokens > self.max_positions:
            raise RequestError(
                400,
                f"This model's maximum context length is {self.max_positions} tokens; the prompt has {len(ids)} "
                f"and {max_tokens} more were asked for. Shorten the prompt or lower max_tokens.",
                code="context_length_exceeded",
            )

    def _finish(self, gen: Generation, ids: list[int], new: list[int], sent: int, on_text: Callable[[str], None] | None) -> None:
        """``gen`` once generate returned ``new``: its finish reason and, unless a stop string ended it, its text
        decoded whole (the rest of it streamed: ``sent`` characters were)."""
        if gen.finish_reason != "stop":
            eos = self.model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
            gen.finish_reason = "stop" if new and new[-1] in eos_ids else "length"
            gen.text = self.detokenize(ids, new)
            if on_text is not None and len(gen.text) > sent:
                on_text(gen.text[sent:])
        gen.tokens = new


class _Collector(BaseStreamer):
    """Receives token ids from generate: decodes, checks stop strings, streams text."""

    def __init__(
        self,
        engine: Engine,
        gen: Generation,
        ids: list[int],
        stops: list[str],
        on_text: Callable[[str], None] | None,
        started: float,
    ):
        self.engine, self.gen, self.ids, self.stops, self.on_text, self.started = engine, gen, ids, stops, on_text, started
        self.prompt_seen = False
        self.done = False
        self.sent = 0

    def put(self, value: torch.Tensor) -> None:
        gen = self.gen
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        if self.done:
            return
        if not gen.tokens:
            gen.ttft = time.perf_counter() - self.started
        gen.tokens.extend(value.reshape(-1).tolist())
        text = self.engine.detokenize(self.ids, gen.tokens)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.done, gen.finish_reason = text[:at], True, "stop"
        if text.endswith("\ufffd") and not self.done:
            return  # a multi-byte character is not complete yet
        if self.on_text is not None and len(text) > self.sent:
            self.on_text(text[self.sent :])
        self.sent = max(self.sent, len(text))
        gen.text = text

    def end(self) -> None:
        pass


class _StopOnString(StoppingCriteria):
    """Stops generate once the collector saw a stop string, or the client went away (``cancel``)."""

    def __init__(self, collector: _Collector, cancel: threading.Event | None):
        self.collector, self.cancel = collector, cancel

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self.collector.done or (self.cancel is not None and self.cancel.is_set())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _sampling_kwargs(params: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """generate's sampling arguments for a request (greedy at temperature 0); seeds torch when it asks."""
    sample = (params.get("temperature") if params.get("temperature") is not None else 1.0) > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_tokens}
    if sample:
        kwargs["temperature"] = params.get("temperature") or 1.0
        kwargs["top_p"] = params.get("top_p") if params.get("top_p") is not None else 1.0
        if params.get("seed") is not None:
            torch.manual_seed(int(params["seed"]))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


# ---------------------------------------------------------------------- request parsing


def _int(body: dict, name: str, default: int | None = None, low: int = 0) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RequestError(400, f"'{name}' must be an integer >= {low}, got {value!r}", code="invalid_value")
    return value


def _float(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"'{name}' must be a number from {low} to {high}, got {value!r}", code="invalid_value")
    return float(value)


def parse_params(body: dict, chat: bool) -> dict[str, Any]:
    """Sampling parameters of a request, validated."""
    if _int(body, "n", 1, 1) != 1:
        raise RequestError(400, "only n=1 is supported", code="invalid_value")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, "'stop' must be a string or a list of strings", code="invalid_value")
    max_tokens = _int(body, "max_completion_tokens", None, 1) if chat else None
    return {
        "max_tokens": max_tokens or _int(body, "max_tokens", None, 1),
        "temperature": _float(body, "temperature", 0.0, 2.0),
        "top_p": _float(body, "top_p", 0.0, 1.0),
        "seed": _int(body, "seed", None, 0),
        "stop": stop,
        "stream": bool(body.get("stream", False)),
        "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False)),
    }


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", code="invalid_value")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, "each message needs a 'role' and a 'content'", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(400, "message 'content' must be a string or a list of text parts", code="invalid_value")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt_ids(engine: Engine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.tokenize_text(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise RequestError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", code="invalid_value")
    if not ids:
        raise RequestError(400, "the prompt is empty", code="invalid_value")
    return ids


def _usage(gen: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": len(gen.tokens),
        "total_tokens": gen.prompt_tokens + len(gen.tokens),
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


# ---------------------------------------------------------------------- the app


def create_app(engine: Engine):
    """The FastAPI app serving ``engine``.

    Example:
        >>> app = create_app(Engine(ServeConfig(store="store", model="models/stories260K")))  # doctest: +SKIP
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI(title="prefixgen", docs_url=None, redoc_url=None)
    # One worker thread: generations run one at a time, in the order they came, and a request
    # waiting its turn holds no thread.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefixgen-generate")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(engine, worker, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(engine, worker, request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": engine.name, "object": "model", "created": engine.created, "owned_by": "prefixgen"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "store": None if engine.store is None else str(engine.store.path)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.hot), media_type="text/plain; version=0.0.4")

    return app


def _count(engine: Engine, endpoint: str, status: int) -> None:
    key = (endpoint, status)
    engine.metrics.requests[key] = engine.metrics.requests.get(key, 0) + 1


async def _body_of(engine: Engine, request: Any) -> dict:
    """The request's JSON object, for this server's model."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model != engine.name:
        raise RequestError(404, f"The model `{model}` does not exist; this server serves `{engine.name}`", code="model_not_found")
    return body


async def _handle(engine: Engine, worker: ThreadPoolExecutor, request: Any, chat: bool):
    """One completion or chat completion: parse, generate on the worker thread (or stream), answer."""
    from fastapi.responses import JSONResponse, StreamingResponse

    endpoint = request.url.path
    try:
        body = await _body_of(engine, request)
        params = parse_params(body, chat)
        ids = engine.tokenize_chat(_messages(body)) if chat else _prompt_ids(engine, body)
        if params["stream"]:
            return StreamingResponse(_stream(engine, worker, ids, params, chat, endpoint), media_type="text/event-stream")
        gen = await asyncio.wrap_future(worker.submit(engine.generate, ids, params))
    except RequestError as exc:
        _count(engine, endpoint, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)
    except Exception as exc:  # the server never dies from a request
        _count(engine, endpoint, 500)
        return JSONResponse(RequestError(500, f"generation failed: {exc}", "server_error").body(), status_code=500)
    _count(engine, endpoint, 200)
    return JSONResponse(_response(engine, gen, chat))


def _response(engine: Engine, gen: Generation, chat: bool) -> dict:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    base = {"id": rid, "created": int(time.time()), "model": engine.name, "usage": _usage(gen)}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": gen.finish_reason}
        return {**base, "object": "chat.completion", "choices": [choice]}
    choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason}
    return {**base, "object": "text_completion", "choices": [choice]}


@dataclass(slots=True)
class _Chunks:
    """The server-sent events of one streamed response."""

    engine: Engine
    chat: bool
    rid: str = ""

    def __post_init__(self) -> None:
        self.rid = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def __call__(self, text: str | None, finish: str | None, usage: dict | None = None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        data = {"id": self.rid, "object": obj, "created": int(time.time()), "model": self.engine.name, "choices": choices}
        if usage is not None:
            data = {**data, "choices": [], "usage": usage}
        return f"data: {json.dumps(data)}\n\n"


async def _stream(
    engine: Engine, worker: ThreadPoolExecutor, ids: list[int], params: dict, chat: bool, endpoint: str
) -> AsyncIterator[str]:
    """A streamed response: each piece of text as the worker thread makes it, then the finish (and usage)."""
    chunk = _Chunks(engine, chat)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    job = worker.submit(engine.generate, ids, params, lambda t: loop.call_soon_threadsafe(queue.put_nowait, t), cancel)
    job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    try:
        if chat:
            yield chunk(None, None, role=True)
        while (piece := await queue.get()) is not None:
            yield chunk(piece, None)
        gen = job.result()  # done: its end marker came last
    except RequestError as exc:
        _count(engine, endpoint, exc.status)
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    except Exception as exc:
        _count(engine, endpoint, 500)
        yield f"data: {json.dumps(RequestError(500, f'generation failed: {exc}', 'server_error').body())}\n\n"
        return
    finally:
        # The client went away (the stream was cancelled or closed): the worker stops at its
        # next token. The next request runs only after it, on the same worker thread.
        if not job.done():
            cancel.set()
    _count(engine, endpoint, 200)
    yield chunk(None, gen.finish_reason)
    if params["include_usage"]:
        yield chunk(None, None, usage=_usage(gen))
    yield "data: [DONE]\n\n"


def serve(cfg: ServeConfig) -> None:
    """Load everything (refusing a store built for another model), then serve until stopped."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("prefixgen serve needs FastAPI and uvicorn: pip install 'prefixgen[serve]'") from None
    engine = Engine(cfg.validate())
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {cfg.host}: anyone who can reach this address can use the server")
    uvicorn.run(create_app(engine), host=cfg.host, port=cfg.port, log_level="info")


__all__ = ["Engine", "RequestError", "ServeConfig", "create_app", "serve"]
