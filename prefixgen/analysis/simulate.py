"""``prefixgen simulate``: replay a request trace against a static tier (a store) and a dynamic tier
under several eviction policies, and report what each choice would hit.

Requests come from a dataset, tokenized and hashed exactly as ``build`` does, or from a Mooncake
block-hash trace. Blocks become dense integer ids once; every policy then replays the same lists.

Semantics (the README states them; keep them exact):

* Requests are processed in order. A request's hit is the longest leading run of its blocks that are
  in the static or the dynamic tier: k blocks, ``min(k * block_tokens, input_length)`` hit tokens.
* Then every block of the request not in the static tier is touched in the dynamic tier, from its
  last block to its first (inserting the absent ones), and the policy evicts until the tier holds at
  most its capacity.

Example:
    >>> cfg = SimulateConfig(source="trace.jsonl", trace_format="mooncake", capacity="1000,inf")  # doctest: +SKIP
    >>> result = simulate(cfg)  # doctest: +SKIP
    >>> result.results[0].token_hit_rate  # doctest: +SKIP
    0.41
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefixgen.analysis.count import block_cost, select_blocks
from prefixgen.analysis.policies import POLICIES, Future
from prefixgen.config import BuildConfig, SimulateConfig, parse_size
from prefixgen.errors import ConfigError, DatasetError, IncompatibleStoreError
from prefixgen.format import KVLayout

MOONCAKE_FIELDS = ("input_length", "hash_ids")


@dataclass(slots=True)
class Trace:
    """Requests as dense block ids: request r's blocks, first to last, are ``ids[offsets[r]:offsets[r + 1]]``."""

    block_tokens: int
    input_lengths: np.ndarray  # [requests] tokens
    offsets: np.ndarray  # [requests + 1]
    ids: np.ndarray  # [blocks] dense ids in 0..n_ids-1
    depth: np.ndarray  # [n_ids] position of each block in its chain (the smallest seen)
    tiebreak: np.ndarray  # [n_ids] the selection's last sort key: hash id, or key64 of the block key
    static: np.ndarray | None = None  # [n_ids] bool: in the store given with --store

    @property
    def requests(self) -> int:
        return len(self.input_lengths)

    @property
    def n_ids(self) -> int:
        return len(self.depth)

    @classmethod
    def from_blocks(cls, block_tokens: int, lengths: list[int], blocks: list[list[int]], tiebreak: np.ndarray) -> Trace:
        """A trace from per-request dense ids (each ``< len(tiebreak)``)."""
        counts = np.fromiter((len(b) for b in blocks), dtype=np.int64, count=len(blocks))
        offsets = np.zeros(len(blocks) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        ids = np.fromiter((x for b in blocks for x in b), dtype=np.int64, count=int(offsets[-1]))
        position = np.arange(len(ids), dtype=np.int64) - np.repeat(offsets[:-1], counts)
        depth = np.full(len(tiebreak), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(depth, ids, position)
        return cls(block_tokens, np.asarray(lengths, dtype=np.int64), offsets, ids, depth, tiebreak)

    def split(self, first: int) -> tuple[Trace, Trace]:
        """The first ``first`` requests and the rest (same ids)."""
        cut = int(self.offsets[first])
        head = Trace(
            self.block_tokens,
            self.input_lengths[:first],
            self.offsets[: first + 1],
            self.ids[:cut],
            self.depth,
            self.tiebreak,
            self.static,
        )
        tail = Trace(
            self.block_tokens,
            self.input_lengths[first:],
            self.offsets[first:] - cut,
            self.ids[cut:],
            self.depth,
            self.tiebreak,
            self.static,
        )
        return head, tail


# --------------------------------------------------------------------------- reading traces


def read_mooncake(path: str | Path, block_tokens: int) -> Trace:
    """A Mooncake trace: JSON lines with ``input_length`` (tokens) and ``hash_ids`` (one integer id
    per block of ``block_tokens`` tokens, the last one possibly partial), in request order.

    Example:
        >>> read_mooncake("trace.jsonl", 512).requests  # doctest: +SKIP
        12031
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a text file of JSON lines (Mooncake's trace format)") from None
    lengths: list[int] = []
    blocks: list[list[int]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where} is not JSON ({exc.msg}); a Mooncake trace has one JSON object per line") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where} is not a JSON object; a Mooncake trace has one object per line")
        missing = [f for f in MOONCAKE_FIELDS if f not in row]
        if missing:
            raise DatasetError(f"{where} has no {' or '.join(missing)}; each request needs input_length and hash_ids")
        length, hashes = row["input_length"], row["hash_ids"]
        if type(length) is not int or length < 0:
            raise DatasetError(f"{where}: input_length must be a non-negative integer, got {length!r}")
        if not isinstance(hashes, list) or any(type(h) is not int for h in hashes):
            bad = hashes if not isinstance(hashes, list) else next(h for h in hashes if type(h) is not int)
            raise DatasetError(f"{where}: hash_ids must be a list of integers, got {bad!r}")
        if len(hashes) != -(-length // block_tokens):
            raise DatasetError(
                f"{where}: {len(hashes)} hash_ids for {length} tokens, but blocks of {block_tokens} tokens "
                f"make {-(-length // block_tokens)}; pass the trace's block size with --trace-block-tokens"
            )
        lengths.append(length)
        blocks.append(hashes)
    if not lengths:
        raise DatasetError(f"{path} holds no requests")
    flat = np.fromiter((h for b in blocks for h in b), dtype=object if _too_big(blocks) else np.int64)
    unique, dense = np.unique(flat, return_inverse=True)
    counts = [len(b) for b in blocks]
    dense_blocks = np.split(dense.astype(np.int64), np.cumsum(counts)[:-1]) if counts else []
    tiebreak = np.arange(len(unique), dtype=np.int64)  # ids are sorted: rank order is hash id order
    return Trace.from_blocks(block_tokens, lengths, [d.tolist() for d in dense_blocks], tiebreak)


def _too_big(blocks: list[list[int]]) -> bool:
    return any(h >= 1 << 63 or h < -(1 << 63) for b in blocks for h in b)


def read_dataset(data: BuildConfig, block_size: int, store=None, progress: bool = False) -> Trace:
    """Records of ``data.dataset`` tokenized and hashed exactly as ``build`` does; with ``store``,
    under the store's root key, and ``static`` marks the blocks the store holds.

    Example:
        >>> read_dataset(BuildConfig(dataset="data.jsonl", model="models/stories260K"), 16).requests  # doctest: +SKIP
        60
    """
    from tqdm import tqdm

    from prefixgen.data.records import RecordTokenizer, open_records
    from prefixgen.format import BuildRecord, block_keys, key64, root_key
    from prefixgen.model import load_config, load_tokenizer, tokenizer_digest

    if not data.model:
        raise ConfigError(
            "simulating a dataset needs its model's tokenizer and config (with --ids-field, for its vocabulary): "
            "pass --model (a local folder or a Hugging Face model id)"
        )
    data.validate_fields()
    tokenizer = load_tokenizer(data.model, trust_remote_code=data.trust_remote_code, chat_template=data.chat_template)
    if store is not None:
        theirs = tokenizer_digest(tokenizer)
        if store.manifest.model.tokenizer_digest and theirs != store.manifest.model.tokenizer_digest:
            raise IncompatibleStoreError(
                f"{store.path} was built with another tokenizer than {data.model}'s (or another chat template): "
                "pass the model the store was built with"
            )
    bar = tqdm(total=data.limit, unit="rec", disable=not progress, dynamic_ncols=True, desc="tokenize")
    config = load_config(data.model, data.trust_remote_code)
    tokenize = RecordTokenizer.for_options(tokenizer, config, data, BuildRecord("", ""), warn=bar.write)
    records = open_records(data)
    root = store.manifest.root_key if store is not None else root_key("00" * 32)
    dense: dict[bytes, int] = {}
    lengths, blocks = [], []
    for record in tokenize(records):
        keys = block_keys(record.ids, block_size, root)
        blocks.append([dense.setdefault(k, len(dense)) for k in keys])
        lengths.append(len(record.ids))
        bar.update()
    bar.close()
    if not lengths:
        raise DatasetError(f"dataset {data.dataset} has no records with {'token ids' if data.ids_field else 'text'} to simulate")
    keys = list(dense)
    trace = Trace.from_blocks(
        block_size, lengths, blocks, np.fromiter((key64(k) for k in keys), dtype=np.uint64, count=len(keys))
    )
    if store is not None:
        trace.static = np.asarray(store.index.contains(keys), dtype=bool).reshape(len(keys))
    return trace


# --------------------------------------------------------------------------- replay


@dataclass(slots=True)
class Replay:
    """What every policy replays, prepared once per trace: Python lists, since the loop is Python."""

    blocks: list[list[int]]  # per request, first to last
    touches: list[list[int]]  # per request, the blocks not in the static tier, last to first
    static_run: list[int]  # per request, the leading blocks in the static tier
    static: bytearray  # per id: 1 if in the static tier
    trace: Trace
    future: Future | None = None

    @classmethod
    def of(cls, trace: Trace, static: np.ndarray | None) -> Replay:
        static = static if static is not None else np.zeros(trace.n_ids, dtype=bool)
        flags = bytearray(static.astype(np.uint8).tobytes())
        ids = trace.ids.tolist()
        offsets = trace.offsets.tolist()
        blocks, touches, runs = [], [], []
        for a, b in zip(offsets, offsets[1:]):
            req = ids[a:b]
            k = 0
            while k < len(req) and flags[req[k]]:
                k += 1
            blocks.append(req)
            touches.append([x for x in reversed(req) if not flags[x]])
            runs.append(k)
        return cls(blocks, touches, runs, flags, trace)

    def belady_future(self) -> Future:
        """Each touch's eviction priority for ``belady``: ``(next_use * depths + depth) * n_ids + id``,
        where next_use is the index of the next request touching the block (``requests`` if none)."""
        if self.future is None:
            n, requests = self.trace.n_ids, len(self.touches)
            ids = np.fromiter((x for t in self.touches for x in t), dtype=np.int64)
            req = np.repeat(np.arange(requests, dtype=np.int64), [len(t) for t in self.touches])
            order = np.lexsort((np.arange(len(ids)), ids))  # by id, then by time
            nxt_sorted = np.full(len(ids), requests, dtype=np.int64)
            same = ids[order][1:] == ids[order][:-1]
            nxt_sorted[:-1][same] = req[order][1:][same]
            nxt = np.empty_like(nxt_sorted)
            nxt[order] = nxt_sorted
            depth = self.trace.depth[ids] if len(ids) else ids
            depths = int(self.trace.depth.max(initial=0)) + 1
            key = nxt * depths + depth  # fits: requests * depths is far below 2**63
            if (requests + 1) * depths * n < 1 << 62:
                prios = (key * n + ids).tolist()
            else:
                prios = [k * n + x for k, x in zip(key.tolist(), ids.tolist())]
            self.future = Future(prios, n, never=requests * depths * n)
        return self.future


def replay(rep: Replay, policy_name: str, capacity: int | None) -> np.ndarray:
    """Hit blocks of each request (the leading run in the static or the dynamic tier) under one
    policy at one capacity.

    Example:
        >>> replay(Replay.of(trace, None), "lru", 1000)[:4]  # doctest: +SKIP
        array([0, 3, 3, 0])
    """
    cls = POLICIES[policy_name]
    policy = cls(capacity, rep.belady_future() if cls.needs_future else None)
    resident, update, static = policy.resident, policy.update, rep.static
    hits = []
    append = hits.append
    for blocks, touches, k in zip(rep.blocks, rep.touches, rep.static_run):
        n = len(blocks)
        while k < n:
            x = blocks[k]
            if x in resident or static[x]:
                k += 1
            else:
                break
        append(k)
        update(touches)
        resident = policy.resident  # a policy may replace its container
    return np.asarray(hits, dtype=np.int64)


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class PolicyResult:
    """One policy at one capacity (``capacity_blocks`` None: unbounded)."""

    policy: str
    capacity_blocks: int | None
    token_hit_rate: float  # hit tokens / input tokens
    block_hit_rate: float  # mean over requests with blocks of hit blocks / blocks
    hit_tokens: int  # = prefill tokens saved
    hit_blocks: int
    dynamic_hit_blocks: int  # of hit_blocks, those after the leading run of static blocks
    static_hit_tokens: int  # of hit_tokens, those in the request's leading run of static blocks
    dynamic_hit_tokens: int  # the rest, served by the dynamic tier
    tier_bytes_read: int | None  # KV bytes of the blocks hit in the dynamic tier (None: no model known)
    store_bytes_read: int | None  # KV bytes of the blocks hit in the static tier
    dynamic_only_token_hit_rate: float | None  # this policy and capacity without the static tier
    seconds: float  # replay time
    lookups_per_second: float  # blocks of the scored requests / seconds


@dataclass(slots=True)
class SimulationResult:
    source: str
    trace_format: str
    requests: int  # scored requests
    input_tokens: int
    block_tokens: int
    blocks: int  # blocks of the scored requests
    distinct_blocks: int
    warmup_requests: int
    static_blocks: int  # blocks in the static tier (0: none)
    static_token_hit_rate: float | None  # the static tier alone
    kv_bytes_per_block: int | None
    results: list[PolicyResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _score(trace: Trace, hits: np.ndarray, static_run: np.ndarray) -> tuple[int, float, int, int]:
    """(hit tokens, block hit rate, hit blocks, static hit tokens)."""
    n = np.diff(trace.offsets)
    tokens = np.minimum(hits * trace.block_tokens, trace.input_lengths)
    static_tokens = np.minimum(static_run * trace.block_tokens, trace.input_lengths)
    some = n > 0
    block_rate = float(np.mean(hits[some] / n[some])) if some.any() else 0.0
    return int(tokens.sum()), block_rate, int(hits.sum()), int(static_tokens.sum())


def parse_capacities(text: str, kv_bytes_per_block: int | None, distinct_blocks: int) -> list[int | None]:
    """Capacities from ``1000,5000``, ``20GB`` (bytes, divided by the KV bytes of a block), ``10%``
    (of the distinct blocks of the scored requests) or ``inf`` (None), comma-separated.

    Example:
        >>> parse_capacities("1000,2MB,10%,inf", 4096, 50_000)
        [1000, 488, 5000, None]
    """
    out: list[int | None] = []
    for item in (s.strip() for s in text.split(",")):
        if item.lower() in ("inf", "unbounded"):
            out.append(None)
            continue
        if item.endswith("%"):
            try:
                share = float(item[:-1])
            except ValueError:
                raise ConfigError(f"--capacity {item!r} is not a percentage like 10%") from None
            blocks = math.floor(share / 100 * distinct_blocks)
        elif item.isdigit():
            blocks = int(item)
        else:
            size = parse_size(item)
            if kv_bytes_per_block is None:
                raise ConfigError(
                    f"--capacity {item} is in bytes, which needs the KV bytes of a block: pass --model (its config) or --store"
                )
            blocks = size // kv_bytes_per_block
            if blocks < 1:
                raise ConfigError(f"--capacity {item} is less than one block ({kv_bytes_per_block:,} bytes of KV)")
        if blocks < 1:
            raise ConfigError(f"--capacity {item} is below one block: give at least 1 block (or inf)")
        out.append(blocks)
    return out


def kv_layout(data: BuildConfig, store=None) -> KVLayout | None:
    """The KV layout of the blocks: the store's manifest, else the model's config as ``build`` would
    store it, else unknown."""
    if store is not None:
        return store.manifest.kv
    if not data.model:
        return None
    from prefixgen.model import kv_layout_from_config

    kv = kv_layout_from_config(data.model, data.kv_dtype, trust_remote_code=data.trust_remote_code)
    return dataclasses.replace(kv, order=data.kv_order)


def kv_bytes_per_block(data: BuildConfig, block_tokens: int, store=None) -> int | None:
    """KV bytes of one block (what an engine's cache holds): from the store's manifest, else the
    model's config, else unknown."""
    kv = kv_layout(data, store)
    return None if kv is None else kv.block_bytes(block_tokens)


def warmup_static(warm: Trace, cfg: SimulateConfig, bytes_per_block: int | None) -> np.ndarray:
    """The static tier ``build`` would store from the warm-up requests: ``select_blocks`` over the
    number of requests holding each block, with ``--min-records`` and ``--max-bytes``/``--max-blocks``;
    ``bytes_per_block``: what a stored block costs against ``--max-bytes`` (``count.block_cost``)."""
    max_blocks = cfg.max_blocks
    if cfg.max_bytes is not None:
        if bytes_per_block is None:
            raise ConfigError("--max-bytes needs the KV bytes of a block: pass --model (its config), or use --max-blocks")
        by_bytes = cfg.max_bytes // bytes_per_block
        if by_bytes < 1:
            raise ConfigError(f"--max-bytes {cfg.max_bytes:,} is less than one block ({bytes_per_block:,} bytes of KV)")
        max_blocks = by_bytes if max_blocks is None else min(max_blocks, by_bytes)
    n = np.diff(warm.offsets)
    request = np.repeat(np.arange(warm.requests, dtype=np.int64), n)
    pairs = np.unique(request * warm.n_ids + warm.ids)  # each block once per request
    records = np.bincount(pairs % warm.n_ids, minlength=warm.n_ids)
    chosen = select_blocks(records, warm.depth, min_records=cfg.min_records, max_blocks=max_blocks, tiebreak=warm.tiebreak)
    static = np.zeros(warm.n_ids, dtype=bool)
    static[chosen] = True
    return static


def simulate(cfg: SimulateConfig, data: BuildConfig | None = None, progress: bool = False) -> SimulationResult:
    """Replay ``cfg.source`` under every policy and capacity of ``cfg``; ``data`` holds the dataset
    and tokenization options (as ``build`` takes them).

    Example:
        >>> r = simulate(SimulateConfig(source="trace.jsonl", trace_format="mooncake", capacity="10%,inf"))  # doctest: +SKIP
        >>> [(x.policy, x.capacity_blocks, round(x.token_hit_rate, 3)) for x in r.results][:2]  # doctest: +SKIP
        [('lru', 3010, 0.52), ('lru', None, 0.75)]
    """
    cfg.validate()
    data = data or BuildConfig()
    data = data.merged(dataset=cfg.source)
    trace, store = _read_trace(cfg, data, progress)
    layout = kv_layout(data, store)
    bytes_per_block = None if layout is None else layout.block_bytes(trace.block_tokens)
    trace, static, warmup_requests = _warm_up(trace, cfg, None if layout is None else block_cost(layout, trace.block_tokens))

    distinct = int(len(np.unique(trace.ids)))
    capacities = parse_capacities(cfg.capacity, bytes_per_block, distinct)
    with_static = Replay.of(trace, static)
    without = Replay.of(trace, None) if static is not None else None
    static_run = np.asarray(with_static.static_run, dtype=np.int64)
    static_tokens = int(np.minimum(static_run * trace.block_tokens, trace.input_lengths).sum())
    input_tokens = int(trace.input_lengths.sum())
    result = SimulationResult(
        source=str(cfg.source),
        trace_format=cfg.trace_format,
        requests=trace.requests,
        input_tokens=input_tokens,
        block_tokens=trace.block_tokens,
        blocks=len(trace.ids),
        distinct_blocks=distinct,
        warmup_requests=warmup_requests,
        static_blocks=int(static.sum()) if static is not None else 0,
        static_token_hit_rate=static_tokens / max(input_tokens, 1) if static is not None else None,
        kv_bytes_per_block=bytes_per_block,
    )
    for policy, capacity in _runs(cfg, capacities, progress):
        result.results.append(_run_policy(trace, with_static, without, static_run, policy, capacity, bytes_per_block))
    return result


def _read_trace(cfg: SimulateConfig, data: BuildConfig, progress: bool) -> tuple[Trace, Any]:
    """The requests to replay (a Mooncake trace, or the dataset tokenized as build does) and the store
    given as the static tier (None without ``--store``)."""
    store = None
    if cfg.store:
        from prefixgen.store.reader import PrefixStore

        store = PrefixStore.open(cfg.store)
    if cfg.trace_format == "mooncake":
        if store is not None:
            raise ConfigError("--store needs a dataset (its blocks are hashes of tokens); a Mooncake trace can use --warmup")
        return read_mooncake(cfg.source, cfg.trace_block_tokens), store
    block_size = cfg.block_size or (store.block_size if store is not None else data.block_size)
    if store is not None and block_size != store.block_size:
        raise ConfigError(f"--block-size {block_size} differs from the store's block size {store.block_size}: leave it out")
    return read_dataset(data, block_size, store, progress), store


def _warm_up(trace: Trace, cfg: SimulateConfig, bytes_per_block: int | None) -> tuple[Trace, np.ndarray | None, int]:
    """With ``--warmup``: the scored requests, the static tier chosen from the warm-up requests before them
    (as build would choose it) and their number; else the trace, its own static tier and 0."""
    if cfg.warmup is None:
        return trace, trace.static, 0
    warmup_requests = int(cfg.warmup * trace.requests)
    if warmup_requests < 1 or warmup_requests >= trace.requests:
        raise ConfigError(
            f"--warmup {cfg.warmup} of {trace.requests} requests leaves no warm-up or no scored request: choose a fraction that leaves both"
        )
    warm, trace = trace.split(warmup_requests)
    return trace, warmup_static(warm, cfg, bytes_per_block), warmup_requests


def _run_policy(
    trace: Trace,
    with_static: Replay,
    without: Replay | None,
    static_run: np.ndarray,
    policy: str,
    capacity: int | None,
    bytes_per_block: int | None,
) -> PolicyResult:
    """Replay the trace under one policy and dynamic-tier capacity, and score it (also without the static
    tier, when there is one)."""
    input_tokens = int(trace.input_lengths.sum())
    t = time.perf_counter()
    hits = replay(with_static, policy, capacity)
    seconds = time.perf_counter() - t
    hit_tokens, block_rate, hit_blocks, static_hit = _score(trace, hits, static_run)
    alone = None
    if without is not None:
        alone = _score(trace, replay(without, policy, capacity), np.zeros_like(static_run))[0] / max(input_tokens, 1)
    static_blocks_hit = int(static_run.sum())
    return PolicyResult(
        policy=policy,
        capacity_blocks=capacity,
        token_hit_rate=hit_tokens / max(input_tokens, 1),
        block_hit_rate=block_rate,
        hit_tokens=hit_tokens,
        hit_blocks=hit_blocks,
        dynamic_hit_blocks=hit_blocks - static_blocks_hit,
        static_hit_tokens=static_hit,
        dynamic_hit_tokens=hit_tokens - static_hit,
        tier_bytes_read=(hit_blocks - static_blocks_hit) * bytes_per_block if bytes_per_block else None,
        store_bytes_read=static_blocks_hit * bytes_per_block if bytes_per_block else None,
        dynamic_only_token_hit_rate=alone,
        seconds=round(seconds, 4),
        lookups_per_second=round(len(trace.ids) / max(seconds, 1e-9)),
    )


def _runs(cfg: SimulateConfig, capacities: list[int | None], progress: bool) -> Iterator[tuple[str, int | None]]:
    from tqdm import tqdm

    runs = [(p, c) for p in cfg.policy_names for c in capacities]
    yield from tqdm(runs, unit="run", disable=not progress, dynamic_ncols=True, desc="simulate")


# --------------------------------------------------------------------------- output


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def format_table(r: SimulationResult) -> str:
    """The result as a text table: policy x capacity -> hit rates, saved tokens, bytes read."""
    head = (
        f"{r.requests:,} requests ({r.input_tokens:,} tokens, {r.blocks:,} blocks of {r.block_tokens} tokens, "
        f"{r.distinct_blocks:,} distinct)"
    )
    lines = [head]
    if r.warmup_requests:
        lines.append(f"static tier: {r.static_blocks:,} blocks chosen from the first {r.warmup_requests:,} requests (not scored)")
    elif r.static_token_hit_rate is not None:
        lines.append(f"static tier: {r.static_blocks:,} blocks of the store")
    if r.static_token_hit_rate is not None:
        lines.append(f"static tier alone: {r.static_token_hit_rate:.1%} of input tokens")
    with_static = r.static_token_hit_rate is not None
    cols = ["policy", "capacity", "token hit", "block hit", "saved tokens", "tier read"]
    if with_static:
        cols += ["static-only", "dynamic-only"]
    rows = []
    for x in r.results:
        cap = "inf" if x.capacity_blocks is None else f"{x.capacity_blocks:,}"
        if x.capacity_blocks is not None and r.kv_bytes_per_block:
            cap += f" ({_fmt_bytes(x.capacity_blocks * r.kv_bytes_per_block)})"
        tier = _fmt_bytes(x.tier_bytes_read) if x.tier_bytes_read is not None else f"{x.dynamic_hit_blocks:,} blocks"
        row = [x.policy, cap, f"{x.token_hit_rate:.1%}", f"{x.block_hit_rate:.1%}", f"{x.hit_tokens:,}", tier]
        if with_static:
            row += [f"{r.static_token_hit_rate:.1%}", f"{x.dynamic_only_token_hit_rate:.1%}"]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines.append("")
    lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def plot(r: SimulationResult, path: str | Path, title: str | None = None) -> Path:
    """A PNG of token hit rate against capacity (log x), one curve per policy; the static tier's
    rate and the unbounded rate as horizontal lines. Needs matplotlib (``pip install prefixgen[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('--plot needs matplotlib: pip install "prefixgen[plot]" (or pip install matplotlib)') from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    unbounded = None
    for name in dict.fromkeys(x.policy for x in r.results):
        points = sorted((x.capacity_blocks, x.token_hit_rate) for x in r.results if x.policy == name and x.capacity_blocks)
        unbounded = next((x.token_hit_rate for x in r.results if x.policy == name and x.capacity_blocks is None), unbounded)
        if points:
            ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if name == "belady" else "-")
    if unbounded is not None:
        ax.axhline(unbounded, color="grey", linestyle=":", label="unbounded")
    if r.static_token_hit_rate is not None:
        ax.axhline(r.static_token_hit_rate, color="black", linewidth=1, label=f"static tier alone ({r.static_blocks:,} blocks)")
    ax.set_xscale("log")
    xlabel = f"dynamic tier capacity (blocks of {r.block_tokens} tokens"
    if r.kv_bytes_per_block:
        xlabel += f", {_fmt_bytes(r.kv_bytes_per_block)} each"
    ax.set_xlabel(xlabel + ")")
    ax.set_ylabel("token hit rate")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or f"{Path(r.source).name}: {r.requests:,} requests")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
