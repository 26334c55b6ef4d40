"""Every option of ``prefixgen build`` (BuildConfig) and ``prefixgen serve`` (ServeConfig) and its
default: the one place defaults live (the CLI passes None for a flag not given).

A TOML file (``--config configs/NAME.toml``) sets any field by name; flags on the command line win.

Example:
    >>> cfg = BuildConfig(dataset="data.jsonl", model="models/tiny", out="store")
    >>> cfg.block_size
    16
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prefixgen.errors import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")
# Decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB) units; "B" or no unit is bytes.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """Bytes from a size with an optional unit: decimal ``kB MB GB TB`` or binary ``KiB MiB GiB TiB``
    (case-insensitive), fractions allowed.

    Example:
        >>> parse_size("512MiB"), parse_size("1.5GB"), parse_size("4096"), parse_size(7)
        (536870912, 1500000000, 4096, 7)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{text!r} is not a size: write bytes with an optional unit, e.g. 4096, 512MiB, 8GiB or 2TB")
    return int(float(m.group(1)) * _UNITS[unit])


KV_DTYPES = ("auto", "fp8")
KV_ORDERS = ("heads", "tokens")  # prefixgen.format.KV_ORDERS: head-major blocks (format 5) or token-major (3/4)
# Eviction policies of `prefixgen simulate` (prefixgen/analysis/policies.py implements each; a test checks both agree).
POLICY_NAMES = ("lru", "lfu", "arc", "s3fifo", "belady")


@dataclass(slots=True)
class BuildConfig:
    """Options of one build run. ``validate()`` checks them all and says what to fix."""

    dataset: str = ""
    model: str = ""
    out: str = ""
    # dataset
    split: str = "train"
    subset: str | None = None
    text_field: str = "text"
    messages_field: str | None = None  # records are chats, rendered with the model's chat template
    ids_field: str | None = None  # records are lists of token ids, used as they are (no tokenizer call)
    system_prompt: str | None = None
    chat_template: str | None = None  # a Jinja file, for tokenizers that have no chat template
    limit: int | None = None  # records
    max_tokens: int | None = None  # per record; the model's max positions always apply
    # store
    block_size: int = 16  # vLLM's block size
    kv_dtype: str = "auto"  # "auto": the model's dtype; "fp8": float8 e4m3 with per-block scales
    # "heads": head-major blocks (format 5; a tensor-parallel rank reads only its heads); "tokens": token-major
    # (format 3/4, for readers before format 5). An append keeps the store's order.
    kv_order: str = "heads"
    min_records: int | None = None  # store only blocks contained in at least this many records
    max_bytes: int | None = None  # store the most shared blocks whose KV fits in this many bytes
    shard_bytes: int = 256 << 20
    write_threads: int = 2
    fsync: bool = True  # durable shards; off writes into the page cache only
    resume: bool = False
    append: bool = False
    overwrite: bool = False
    # compute
    batch_tokens: int = 8192  # token budget of one forward (new tokens, padding included)
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # "auto": cuda if available, else cpu
    prefix_cache_bytes: int = 1 << 30  # device memory for KV of recent blocks reused as past
    sort_window: int = 32  # batches' worth of records sorted by length together
    trust_remote_code: bool = False
    quiet: bool = False
    # distributed (builder/distributed.py): torchrun sets RANK/WORLD_SIZE; these are for launchers without it
    rank: int | None = None
    world_size: int | None = None
    dist_timeout: int = 600  # seconds the start-up collectives may take (waits on other ranks' work have no timeout)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> BuildConfig:
        """Read a TOML file of fields (``-`` or ``_`` in names), then apply ``overrides``
        (``None`` values are ignored, so unset CLI flags do not override the file).

        Example:
            >>> BuildConfig.from_file("configs/demo.toml", limit=10).limit  # doctest: +SKIP
            10
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        values = {k.replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls().merged(**values).merged(**overrides)

    def merged(self, **overrides: Any) -> BuildConfig:
        """A copy with the non-None ``overrides`` applied (each checked against its field's type).
        ``overrides`` naming the field of ids and one of text or chats are refused (one source of
        options says which field to read: the command line, or one TOML file)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "ids_field" in values and values.keys() & {"text_field", "messages_field"}:
            other = "--text-field" if "text_field" in values else "--messages-field"
            raise ConfigError(
                f"--ids-field and {other} exclude each other: pass --ids-field for records of token ids, "
                "--text-field for text, --messages-field for chats"
            )
        for name in SIZE_FIELDS & values.keys():
            values[name] = parse_size(values[name])  # TOML may say "512MiB"
        for name, value in values.items():
            kind = _FIELD_TYPES.get(name)
            if kind is None:
                raise ConfigError(f"unknown option {name!r}")
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"option {name} must be {kind.__name__}, got {value!r}")
        return dataclasses.replace(self, **values)

    @property
    def write_mode(self) -> str:
        return "resume" if self.resume else "append" if self.append else "overwrite" if self.overwrite else "new"

    @property
    def record_field(self) -> str:
        """The field read from every record: of token ids, chats or text."""
        return self.ids_field or self.messages_field or self.text_field

    @property
    def selects(self) -> bool:
        """Whether the build stores a chosen part of the blocks (and so reads the dataset twice)."""
        return self.min_records is not None or self.max_bytes is not None

    def validate_fields(self) -> BuildConfig:
        """Check the options that say which field of a record is read and how (build, analyze and
        simulate); raise ConfigError naming what to change; return self."""
        if self.ids_field is not None:
            if self.messages_field is not None:
                raise ConfigError(
                    "--ids-field and --messages-field exclude each other: pass --ids-field for records of "
                    "token ids, --messages-field for chats"
                )
            if self.system_prompt is not None:
                raise ConfigError(
                    "--system-prompt needs a tokenizer, and --ids-field records are used as they are: "
                    "put the system prompt's ids at the start of every record instead"
                )
        return self

    def validate_input(self) -> BuildConfig:
        """Check the options that say what is read and how it is tokenized and stored (shared by
        ``build`` and ``analyze``); raise ConfigError naming the first bad value; return self."""
        if not self.dataset:
            raise ConfigError("no dataset given: pass DATASET (a file, a folder or a Hugging Face dataset id)")
        if not self.model:
            raise ConfigError("no model given: pass --model (a local folder or a Hugging Face model id)")
        if self.block_size <= 0:
            raise ConfigError(f"block-size must be positive, got {self.block_size}")
        self.validate_fields()
        for name in ("limit", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"--kv-dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if self.kv_order not in KV_ORDERS:
            raise ConfigError(f"--kv-order {self.kv_order!r} is not one of {', '.join(KV_ORDERS)}")
        if self.min_records is not None and self.min_records < 1:
            raise ConfigError(f"--min-records must be at least 1 (1 stores every block), got {self.min_records}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"--max-bytes must be positive, e.g. 500GB or 2TiB, got {self.max_bytes}")
        return self

    def validate(self) -> BuildConfig:
        """Raise ConfigError naming the first bad value and what to do; return self."""
        self.validate_input()
        if not self.out:
            raise ConfigError("no store given: pass --out STORE (a new or empty folder)")
        if sum((self.resume, self.append, self.overwrite)) > 1:
            raise ConfigError("--resume, --append and --overwrite exclude each other: pass at most one")
        for name in ("block_size", "batch_tokens", "shard_bytes", "write_threads", "sort_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_tokens < self.block_size:
            raise ConfigError(f"--batch-tokens ({self.batch_tokens}) must be at least --block-size ({self.block_size})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device {self.device!r} is not auto, cpu, cuda or cuda:N")
        if (self.rank is None) != (self.world_size is None):
            raise ConfigError("--rank and --world-size go together: pass both (e.g. --rank 0 --world-size 4) or neither")
        if self.world_size is not None and not 0 <= self.rank < self.world_size:
            raise ConfigError(f"--rank must be in 0..{self.world_size - 1} for --world-size {self.world_size}, got {self.rank}")
        if self.dist_timeout <= 0:
            raise ConfigError(f"dist-timeout must be positive, got {self.dist_timeout}")
        return self

    def options(self) -> dict[str, Any]:
        """The options recorded in the store's build record. ``ids_field`` only where it is set: the
        options of a text or chat build stay those earlier versions recorded (a distributed run's id
        is a digest of them, so a build begun before keeps its id on --resume)."""
        skip = ("out", "quiet") + (("ids_field",) if self.ids_field is None else ())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


TRACE_FORMATS = ("dataset", "mooncake")


@dataclass(slots=True)
class SimulateConfig:
    """Options of ``prefixgen simulate`` beyond the dataset ones (those are ``BuildConfig``'s).

    Example:
        >>> SimulateConfig(source="trace.jsonl", trace_format="mooncake").trace_block_tokens
        512
    """

    source: str = ""  # a dataset (as build reads it) or a trace file
    trace_format: str = "dataset"  # "dataset": tokenized as build does; "mooncake": block-hash JSON lines
    trace_block_tokens: int = 512  # tokens per hash id in a Mooncake trace (512 in the published ones)
    block_size: int | None = None  # datasets: tokens per block; None: the store's, else BuildConfig's 16
    store: str | None = None  # a built store: the static tier
    warmup: float | None = None  # the first FRACTION of requests choose the static tier and are not scored
    min_records: int = 1  # --warmup: store blocks in at least this many warm-up requests (as build)
    max_bytes: int | None = None  # --warmup: the static tier's KV bytes at most (as build)
    max_blocks: int | None = None  # --warmup: the static tier's blocks at most
    capacity: str = "1%,3%,10%,30%,inf"  # dynamic tier sizes: blocks, bytes (20GB), % of distinct blocks, inf
    policies: str = ",".join(POLICY_NAMES)

    @classmethod
    def from_flags(cls, **flags: Any) -> tuple[SimulateConfig, BuildConfig]:
        """``prefixgen simulate``'s flags (None: not given) split into its own options (``--policy`` is ``policies``)
        and the dataset ones, as build reads a dataset (a ``BuildConfig``): (options, dataset options).

        Example:
            >>> cfg, data = SimulateConfig.from_flags(source="d.jsonl", policy="lru", model="m", limit=None)
            >>> cfg.policies, data.model
            ('lru', 'm')
        """
        given = {("policies" if k == "policy" else k): v for k, v in flags.items() if v is not None}
        own = {f.name for f in dataclasses.fields(cls)}
        data = BuildConfig().merged(**{k: v for k, v in given.items() if k not in own})
        return cls(**{k: v for k, v in given.items() if k in own}), data

    @property
    def policy_names(self) -> list[str]:
        return [p.strip().lower() for p in self.policies.split(",") if p.strip()]

    def validate(self) -> SimulateConfig:
        """Raise ConfigError naming the first bad value and what to do; return self."""
        if not self.source:
            raise ConfigError("nothing to simulate: pass a dataset or a trace file (with --trace-format mooncake)")
        if self.trace_format not in TRACE_FORMATS:
            raise ConfigError(f"--trace-format {self.trace_format!r} is not one of {', '.join(TRACE_FORMATS)}")
        unknown = [p for p in self.policy_names if p not in POLICY_NAMES]
        if unknown or not self.policy_names:
            raise ConfigError(f"--policy {', '.join(unknown) or self.policies!r}: choose from {', '.join(POLICY_NAMES)}")
        for name in ("trace_block_tokens", "block_size", "max_blocks"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"--max-bytes must be positive, got {self.max_bytes}")
        if self.min_records < 1:
            raise ConfigError(f"--min-records must be at least 1, got {self.min_records}")
        if self.warmup is not None and not 0 < self.warmup < 1:
            raise ConfigError(f"--warmup must be a fraction between 0 and 1, got {self.warmup}")
        if self.warmup is not None and self.store:
            raise ConfigError("--store and --warmup both give a static tier: pass one of them")
        if self.warmup is None and (self.min_records != 1 or self.max_bytes is not None or self.max_blocks is not None):
            raise ConfigError("--min-records, --max-bytes and --max-blocks choose the static tier of --warmup: pass --warmup too")
        return self


# Fields that are byte sizes: they accept units on the command line and in TOML.
SIZE_FIELDS = frozenset({"shard_bytes", "prefix_cache_bytes", "max_bytes"})

# Field name -> the type its (non-None) values must have.
_FIELD_TYPES: dict[str, type] = {
    f.name: next(t for t in (bool, int, str) if t.__name__ in str(f.type).split(" | ")) for f in fields(BuildConfig)
}


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it, as ``parse_size`` reads it back.

    Example:
        >>> format_size(2 << 30), format_size(1536), format_size(100)
        ('2GiB', '1536B', '100B')
    """
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


@dataclass(slots=True)
class ServeConfig:
    """Every option of ``prefixgen serve`` and its default (the only place serve's defaults live).

    Example:
        >>> ServeConfig(store="store", model="models/stories260K").merged(port=9000, host=None).port
        9000
    """

    store: str = ""
    model: str = ""
    host: str = "127.0.0.1"  # loopback: expose on purpose, with --host 0.0.0.0
    port: int = 8000
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    gpu_cache_bytes: int = 2 << 30  # hot prefixes kept on the device (LRU of blocks)
    served_model_name: str | None = None  # the `model` clients ask for; default: --model
    chat_template: str | None = None  # a Jinja file: the one the store was built with, for tokenizers without one
    no_store: bool = False  # serve without the store (for comparisons)
    default_max_tokens: int = 256  # for requests that do not say
    trust_remote_code: bool = False
    # A request looks at the store's index folder at most this often and reopens the index when it changed
    # (an append, compaction, prune or gc while serving): new blocks hit, moved blocks are found again.
    refresh_seconds: float = 2.0

    def merged(self, **overrides: Any) -> ServeConfig:
        """A copy with the non-None ``overrides`` applied (sizes may carry units: ``"8GiB"``)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "gpu_cache_bytes" in values:
            values["gpu_cache_bytes"] = parse_size(values["gpu_cache_bytes"])
        return dataclasses.replace(self, **values)

    def validate(self) -> ServeConfig:
        """Raise ConfigError naming the first bad value and what to do; return self."""
        if not self.model:
            raise ConfigError("pass --model (the model the store was built with)")
        if not self.store and not self.no_store:
            raise ConfigError("pass STORE (a folder made by `prefixgen build`), or --no-store to serve without one")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be from 0 to 65535, got {self.port}")
        if self.gpu_cache_bytes < 0:
            raise ConfigError(f"--gpu-cache-bytes must be 0 or more, got {self.gpu_cache_bytes}")
        if self.default_max_tokens <= 0:
            raise ConfigError(f"--default-max-tokens must be positive, got {self.default_max_tokens}")
        if self.refresh_seconds < 0:
            raise ConfigError(f"--refresh-seconds must be 0 or more, got {self.refresh_seconds}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device {self.device!r} is not auto, cpu, cuda or cuda:N")
        return self


@dataclass(slots=True)
class ConnectorConfig:
    """The options of vLLM's ``PrefixgenConnector`` (its ``kv_connector_extra_config``) and their defaults.

    Example:
        >>> ConnectorConfig.from_extra({"store": "s", "staging_bytes": "32MiB"}).staging_bytes
        33554432
    """

    store: str = ""
    chat_template: str | None = None  # the Jinja file the store was built with, for tokenizers without one
    # Host bytes of stored KV one load stages (reads and uploads) at a time, as stored (fp8: its bytes and
    # scales; head-major: this rank's heads): each load thread keeps one read buffer of this size, whatever
    # the load's length (plus, on CPU, a converted copy of a piece when vLLM's dtype differs from the store's, it is
    # fp8 or head-major: fp8 converts to 2-4x its bytes; on CUDA that copy is on the device, beside the uploaded piece).
    staging_bytes: int = 64 << 20
    load_threads: int = 2  # requests loaded at the same time, each on its own thread
    # Read buffers (of staging_bytes each) kept for reuse between pieces: pinned on CUDA, so the device copies
    # straight out of them on the load stream. One is in use per load thread reading; one more lets a piece's
    # upload finish while the next piece is read. More are made (never waited for) when all are in use, e.g.
    # held by a read that hangs; only this many are kept after.
    staging_buffers: int = 3
    # While loads run, an engine step that schedules no token waits up to this long for one to finish (it
    # returns as soon as one does), so that an in-process engine's idle step loop leaves the GIL to the load
    # threads; a step that runs a batch never waits. 0: never wait (a 4,096-token load on an idle CPU engine:
    # 0.09 GB/s instead of 1.4-2.5, BENCHMARKS.md). The cost: a request arriving during such a wait is
    # scheduled up to this much later.
    yield_seconds: float = 0.005
    # A load not done this many seconds after its step started it is given up: vLLM recomputes the request from
    # the first token not written, and a thread stuck in a read that never returns (a dead NFS server, a shard
    # replaced by a named pipe) is replaced, so other loads go on. The scheduler's lookups (in the background)
    # have the same deadline: past it the prompt is a miss. 0: no deadline.
    load_timeout_seconds: float = 30.0
    # The scheduler looks at the store's index folder this often, on a thread of its own, and reopens the index
    # when it changed (an append, compaction, prune or gc while serving); the blocks and shards workers had
    # reported bad are claimed again after a reopen. 0: never (the index read at start is kept).
    refresh_seconds: float = 2.0
    # Load a store whose KV dtype is not the engine's, cast to the engine's (refused otherwise): the loaded KV is
    # then the store's rounded, not what vLLM computes, and outputs may differ from plain vLLM's (README, "KV dtype").
    cast_kv_dtype: bool = False
    # After the live check passed, the share of requests with a stored prefix that vLLM computes instead of loading,
    # to compare its KV with the store's again (integrations/vllm/check.py); 0: only after start and each reset.
    check_rate: float = 0.01
    # The largest per-layer relative RMS error of K or V a live check accepts; None: by the store's and engine's
    # dtypes (integrations.vllm.check.TOLERANCE, measured in BENCHMARKS.md). Raising it lets KV further from vLLM's be served.
    check_tolerance: float | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorConfig:
        """The config from vLLM's ``kv_connector_extra_config`` (keys it does not know are left to the
        caller); a missing store or a bad value is a ConfigError."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in extra.items() if k in known}
        if "staging_bytes" in values:
            values["staging_bytes"] = parse_size(values["staging_bytes"])
        cfg = cls(**values)
        if not cfg.store:
            raise ConfigError('PrefixgenConnector needs the store\'s path: kv_connector_extra_config = {"store": "PATH"}')
        if cfg.staging_bytes <= 0:
            raise ConfigError(f"PrefixgenConnector: staging_bytes must be positive, got {cfg.staging_bytes}")
        if not isinstance(cfg.load_threads, int) or cfg.load_threads < 1:
            raise ConfigError(f"PrefixgenConnector: load_threads must be a positive integer, got {cfg.load_threads!r}")
        if isinstance(cfg.staging_buffers, bool) or not isinstance(cfg.staging_buffers, int) or cfg.staging_buffers < 1:
            raise ConfigError(f"PrefixgenConnector: staging_buffers must be a positive integer, got {cfg.staging_buffers!r}")
        if not isinstance(cfg.yield_seconds, int | float) or cfg.yield_seconds < 0:
            raise ConfigError(f"PrefixgenConnector: yield_seconds must be a number of seconds >= 0, got {cfg.yield_seconds!r}")
        for name in ("load_timeout_seconds", "refresh_seconds"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"PrefixgenConnector: {name} must be a number of seconds >= 0, got {value!r}")
        if not isinstance(cfg.cast_kv_dtype, bool):
            raise ConfigError(f"PrefixgenConnector: cast_kv_dtype must be true or false, got {cfg.cast_kv_dtype!r}")
        if isinstance(cfg.check_rate, bool) or not isinstance(cfg.check_rate, int | float) or not 0 <= cfg.check_rate <= 1:
            raise ConfigError(f"PrefixgenConnector: check_rate must be a share between 0 and 1, got {cfg.check_rate!r}")
        tol = cfg.check_tolerance
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, int | float) or tol <= 0):
            raise ConfigError(f"PrefixgenConnector: check_tolerance must be a positive number, got {tol!r}")
        return cfg


EXPORT_TARGETS = ("sglang", "lmcache", "vllm")
SGLANG_LAYOUTS = ("page_first", "page_first_direct", "layer_first")


@dataclass(slots=True)
class ExportConfig:
    """Every option of ``prefixgen export`` and its default (the only place export's defaults live).

    Example:
        >>> ExportConfig(store="store", to="sglang", out="hicache", model_name="org/m").merged(tp_size=2).tp_size
        2
    """

    store: str = ""
    to: str = ""  # the engine whose layout the export takes: one of EXPORT_TARGETS
    out: str = ""  # the folder the engine reads (SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR, LMCache's fs:// path)
    model_name: str = ""  # the name the server serves the model under (it is part of every file name)
    tp_size: int = 1  # tensor-parallel ranks of the server: each gets files with its own KV heads
    # sglang
    page_size: int = 16  # the server's --page-size: tokens per file
    layout: str = "page_first"  # the server's --hicache-mem-layout
    # The KV dtype the server keeps: "auto" resolves it as SGLang's --dtype auto does from the store's model config
    # (export.sglang.sglang_kv_dtype; a float32 config is served as float16), else float32, bfloat16 or float16.
    kv_dtype: str = "auto"
    # lmcache
    # The server's PYTHONHASHSEED (LMCache's first chunk hash depends on it), or "unset" (vLLM then seeds with a
    # fixed string).
    hash_seed: int | str | None = None
    chunk_size: int = 256  # LMCache's chunk_size: tokens per file
    hash_algorithm: str = "sha256_cbor"  # LMCache's pre_caching_hash_algorithm
    # vllm (its own OffloadingConnector's fs tier; hash_seed and tp_size above apply too)
    block_size: int = 16  # the server's --block-size
    blocks_per_file: int = 1  # the connector's blocks_per_chunk (its extra config "block_size" / --block-size)
    dtype: str | None = None  # the server's KV cache dtype (None: the store's)
    prefix_caching_hash_algo: str = "sha256"  # the server's --prefix-caching-hash-algo
    kv_cache_layout: str = "NHD"  # the layout the server resolves (VLLM_KV_CACHE_LAYOUT; FlashAttention: NHD)
    layer_names: str = "model.layers.{i}.self_attn.attn"  # the server's attention layer names, {i} the layer
    # what and how
    min_records: int | None = None  # export only blocks contained in at least this many records
    max_bytes: int | None = None  # export the most shared blocks whose KV fits in this many bytes
    append: bool = False  # add this store's prefixes to an existing export of the same model and target
    fsync: bool = True  # make each file durable before its rename (off: a power loss may leave empty files)
    quiet: bool = False

    def merged(self, **overrides: Any) -> ExportConfig:
        """A copy with the non-None ``overrides`` applied (``max_bytes`` may carry a unit: ``"8GiB"``)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "max_bytes" in values:
            values["max_bytes"] = parse_size(values["max_bytes"])
        return dataclasses.replace(self, **values)

    @property
    def unit_tokens(self) -> int:
        """Tokens per exported file of the chosen target."""
        if self.to == "vllm":
            return self.block_size * self.blocks_per_file
        return self.chunk_size if self.to == "lmcache" else self.page_size

    def validate(self) -> ExportConfig:
        """Raise ConfigError naming the first bad value and what to do; return self."""
        if not self.store:
            raise ConfigError("pass STORE (a folder made by `prefixgen build`)")
        if self.to not in EXPORT_TARGETS:
            raise ConfigError(f"--to {self.to!r}: choose one of {', '.join(EXPORT_TARGETS)}")
        if not self.out:
            raise ConfigError("pass --out DIR: the folder the engine reads the export from")
        if not self.model_name:
            raise ConfigError("pass --model-name NAME: the model name the server serves (it is part of every file name)")
        for name in ("tp_size", "page_size", "chunk_size", "block_size", "blocks_per_file"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.layout not in SGLANG_LAYOUTS:
            raise ConfigError(f"--layout {self.layout!r} is not one of {', '.join(SGLANG_LAYOUTS)}")
        if self.to == "lmcache" and self.hash_seed is None:
            raise ConfigError(
                "--to lmcache needs --hash-seed SEED: the PYTHONHASHSEED the vLLM + LMCache server runs with "
                "(--hash-seed unset when it runs without one)"
            )
        if isinstance(self.hash_seed, str) and self.hash_seed not in ("unset", "random") and not self.hash_seed.isdigit():
            raise ConfigError(f"--hash-seed {self.hash_seed!r}: give the server's PYTHONHASHSEED (an integer) or unset")
        if self.min_records is not None and self.min_records < 1:
            raise ConfigError(f"--min-records must be at least 1 (1 exports every block), got {self.min_records}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"--max-bytes must be positive, e.g. 500GB or 2TiB, got {self.max_bytes}")
        return self
