"""``prefixgen analyze``: what a store of a given size would buy, before any GPU hour is spent.

One pass over the dataset, tokenized exactly as ``build`` tokenizes it (same reader, same
``RecordTokenizer``, same chained block keys), counts how many records contain each block
(:class:`~prefixgen.analysis.count.BlockCounter`, bounded memory). From the counts follow the
sharing distribution and, for each choice ``build --min-records K`` / ``--max-bytes SIZE`` would make
(:meth:`BlockCounts.select`, the one selection rule), the tokens and bytes stored and the hit rate
on held-out records.

Needs no weights: the tokenizer and the config (for the KV bytes per token). Blocks are hashed under
a fixed root instead of the model's weights digest: counts only compare keys for equality, and two
token prefixes have equal keys under one root exactly when they have equal keys under any other.

Every choice keeps a prefix of one ranking of the blocks (by record count, then depth, then key):
``--min-records K`` keeps the blocks with count >= K, which rank first, and ``--max-bytes`` the first
``SIZE // block bytes``. So a held-out record's hit under any choice is the number of its leading
blocks whose running maximum rank is below the choice's cut, and one sorted array of those ranks
answers every choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from prefixgen.analysis.count import BlockCounter, BlockCounts, block_cost
from prefixgen.config import BuildConfig
from prefixgen.data.records import RecordTokenizer, open_records
from prefixgen.errors import ConfigError
from prefixgen.format import BuildRecord, KVLayout, block_keys, root_key
from prefixgen.model import config_kv_layout, load_config, load_tokenizer

# Counting needs key equality only, so any fixed root will do (see the module docstring).
ANALYZE_ROOT = root_key("00" * 32)
BUDGET_ROWS = 8  # byte budgets in the table: the largest 1-2-5 sizes below the whole store
CURVE_POINTS = 48  # points per plotted curve


@dataclass(slots=True)
class Choice:
    """What one ``build --min-records K [--max-bytes SIZE]`` would store, and what it would hit."""

    min_records: int
    max_bytes: int | None
    stored_blocks: int
    stored_tokens: int
    prefill_tokens: int  # tokens the build would prefill: each stored block once
    bytes: int  # bytes --max-bytes counts (count.block_cost: KV, fp8 scales, head_crc, states) with the chosen --kv-dtype
    bytes_fp8: int  # the same blocks stored as fp8
    holdout_hit_rate: float | None  # share of held-out prompt tokens served from the store


@dataclass(slots=True)
class Analysis:
    """Figures of one dataset under one model and tokenization. The store figures describe the records
    a build would store: all of them with ``holdout`` 0, else those not held out."""

    dataset: str
    model: str
    block_size: int
    kv_dtype: str  # the stored dtype: float32, bfloat16, float16 or float8_e4m3fn
    kv_bytes_per_token: int
    block_bytes: int  # what one stored block costs against --max-bytes (count.block_cost)
    holdout: float
    records: int
    skipped_records: int
    truncated_records: int
    dataset_tokens: int
    unique_blocks: int
    unique_tokens: int
    holdout_records: int
    holdout_tokens: int
    sharing: list[dict[str, int]]  # {min_records, max_records, blocks, tokens} per power-of-two bucket
    choices: list[Choice]
    # For --plot: per distinct --min-records store (label), store bytes and held-out hit rate at growing budgets.
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (without the plot curves)."""
        out = {name: getattr(self, name) for name in self.__slots__ if name not in ("curves", "choices")}
        out["choices"] = [{name: getattr(c, name) for name in Choice.__slots__} for c in self.choices]
        return out


def is_held_out(ids: list[int], fraction: float) -> bool:
    """Whether a record with these token ids is held out: a hash of the ids, so reruns (and a
    build of the other records) agree.

    Example:
        >>> is_held_out([1, 2, 3], 0.0), is_held_out([1, 2, 3], 1.0)
        (False, True)
    """
    digest = hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2.0**64


def analyze(cfg: BuildConfig, holdout: float = 0.1, progress: bool = False, warn: Callable[[str], None] = print) -> Analysis:
    """Count the blocks of ``cfg.dataset`` as ``build`` would see them and weigh every choice of store.

    ``cfg`` holds the dataset, tokenization and storage options of the build to plan (its ``out`` and
    compute options are ignored). ``holdout`` of the records (chosen by :func:`is_held_out`) are left
    out of the store and matched against it.

    Example:
        >>> a = analyze(BuildConfig(dataset="examples/stories.jsonl", model="models/stories260K"))  # doctest: +SKIP
        >>> a.unique_tokens, a.choices[0].bytes  # doctest: +SKIP
        (28112, 35983360)
    """
    cfg.validate_input()
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"--holdout must be a fraction in [0, 1), e.g. 0.1, got {holdout}")
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
    layout = dataclasses.replace(config_kv_layout(config, cfg.dtype, cfg.kv_dtype), order=cfg.kv_order)  # as build stores it
    stats = BuildRecord("", cfg.dataset)
    tokenize = RecordTokenizer.for_options(tokenizer, config, cfg, stats)
    records = open_records(cfg)
    bs = cfg.block_size
    counter = BlockCounter()
    held = _HeldOut()
    tokens = 0  # of the records counted into the store
    bar = tqdm(total=cfg.limit, unit="rec", desc="analyze", disable=not progress, dynamic_ncols=True)
    tokenize.warn = bar.write if progress else warn
    with bar:
        for record in tokenize(records):
            if holdout and is_held_out(record.ids, holdout):
                held.add(block_keys(record.ids[:-1], bs, ANALYZE_ROOT), len(record.ids))
            else:
                counter.add(block_keys(record.ids, bs, ANALYZE_ROOT))
                tokens += len(record.ids)
            bar.update(1)
    counts = counter.result()
    return _figures(cfg, layout, stats, tokens, counts, held, holdout)


class _HeldOut:
    """Held-out records as the server would match them: the first 16 bytes of each block key of all
    but the last token, and the prompt lengths."""

    def __init__(self) -> None:
        self.keys = bytearray()
        self.lens: list[int] = []
        self.tokens = 0

    def add(self, keys: list[bytes], tokens: int) -> None:
        self.keys += b"".join(k[:16] for k in keys)
        self.lens.append(len(keys))
        self.tokens += tokens

    def cut_ranks(self, counts: BlockCounts, rank: np.ndarray) -> np.ndarray:
        """Sorted [blocks] running-max rank of each held-out block along its record: the block is served
        by every store that keeps a prefix of the ranking longer than this."""
        lens = np.asarray(self.lens, dtype=np.int64)
        keys = np.frombuffer(bytes(self.keys), dtype=np.uint8).reshape(-1, 16)
        rows = counts.find(keys)
        missing = len(counts) + 1  # "never stored"
        r = np.where(rows >= 0, rank[np.maximum(rows, 0)], missing).astype(np.int64)
        # Running max within each record: shift record i by i * (missing + 1) so one cumulative max
        # over the whole array never carries a value across a record boundary.
        shift = np.repeat(np.arange(len(lens), dtype=np.int64) * (missing + 1), lens)
        r = np.maximum.accumulate(r + shift) - shift if len(r) else r
        return np.sort(r)


def _sharing(records: np.ndarray, ks: list[int], bs: int) -> list[dict[str, int]]:
    """How many blocks are in K to 2K-1 records, for each K of ``ks`` (powers of two); ``records`` [blocks]."""
    sharing = []
    for k in ks:
        blocks = int(np.count_nonzero((records >= k) & (records <= 2 * k - 1)))
        sharing.append({"min_records": k, "max_records": 2 * k - 1, "blocks": blocks, "tokens": blocks * bs})
    return sharing


def _curves(
    records: np.ndarray, ks: list[int], cuts: np.ndarray, held_tokens: int, bs: int, block_bytes: int
) -> dict[str, tuple[list[int], list[float]]]:
    """The held-out hit rate against the store's bytes for each ``--min-records K`` (``cuts``: the rank cut at each
    held-out block, as :meth:`_HeldOut.cut_ranks` gives), one curve per distinct store."""
    curves = {}
    for k in ks:
        stored = int(np.count_nonzero(records >= k))
        same = [j for j in ks if j >= k and np.count_nonzero(records >= j) == stored]
        if any(j < k and np.count_nonzero(records >= j) == stored for j in ks):
            continue  # the same store as a smaller K: drawn once, labelled with the range
        steps = np.unique(np.geomspace(1, max(stored, 1), CURVE_POINTS).astype(np.int64))
        rates = (np.searchsorted(cuts, steps) * bs / max(held_tokens, 1)).tolist()
        label = f"--min-records {k}" + (f" to {same[-1]}" if same[-1] != k else "")
        curves[label] = ((steps * block_bytes).tolist(), rates)
    return curves


def _figures(
    cfg: BuildConfig, layout: KVLayout, stats: BuildRecord, tokens: int, counts: BlockCounts, held: _HeldOut, holdout: float
) -> Analysis:
    bs = cfg.block_size
    # A hybrid's recurrent states, one every stride of blocks (and at record ends), spread over the blocks.
    block_bytes = block_cost(layout, bs)
    fp8 = layout.with_storage("fp8")
    n = len(counts)
    rank = np.empty(n, dtype=np.int64)
    rank[counts.select()] = np.arange(n)
    cuts = held.cut_ranks(counts, rank) if holdout and held.lens else None
    del rank

    def choice(k: int, max_bytes: int | None) -> Choice:
        blocks = int(np.count_nonzero(counts.records >= k))
        if max_bytes is not None:
            blocks = min(blocks, max_bytes // block_bytes)
        rate = None
        if cuts is not None:
            rate = float(np.searchsorted(cuts, blocks) * bs / held.tokens) if held.tokens else 0.0
        return Choice(k, max_bytes, blocks, blocks * bs, blocks * bs, blocks * block_bytes, blocks * block_cost(fp8, bs), rate)

    top = int(counts.records.max()) if n else 0
    ks = [1 << i for i in range(top.bit_length())] or [1]
    choices = [choice(k, None) for k in ks]
    choices += [choice(1, b) for b in _budgets(n * block_bytes, block_bytes)]
    sharing = _sharing(counts.records, ks, bs)
    curves = _curves(counts.records, ks, cuts, held.tokens, bs, block_bytes) if cuts is not None else {}
    return Analysis(
        dataset=cfg.dataset,
        model=cfg.model,
        block_size=bs,
        kv_dtype=layout.stored_dtype,
        kv_bytes_per_token=layout.bytes_per_token,
        block_bytes=block_bytes,
        holdout=holdout,
        records=stats.records - len(held.lens),
        skipped_records=stats.skipped_records,
        truncated_records=stats.truncated_records,
        dataset_tokens=tokens,
        unique_blocks=n,
        unique_tokens=n * bs,
        holdout_records=len(held.lens),
        holdout_tokens=held.tokens,
        sharing=sharing,
        choices=choices,
        curves=curves,
    )


def _budgets(total: int, block_bytes: int) -> list[int]:
    """Round byte budgets (1, 2, 5 x 10^k) below ``total`` and of at least one block: the largest few.

    Example:
        >>> _budgets(3_000, 100)
        [100, 200, 500, 1000, 2000]
    """
    out = []
    size = 1
    while size < total:
        for m in (1, 2, 5):
            if block_bytes <= m * size < total:
                out.append(m * size)
        size *= 10
    return out[-BUDGET_ROWS:]
