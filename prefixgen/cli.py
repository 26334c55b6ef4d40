"""The ``prefixgen`` command: parse, call one library function, turn known errors into a message
and an exit code."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from prefixgen.config import SIZE_FIELDS, BuildConfig, ExportConfig, ServeConfig, format_size, parse_size
from prefixgen.errors import ConfigError, PrefixgenError, io_error_message

app = typer.Typer(
    help="Precompute prefix KV caches for LLM serving.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 16]" must show, not be read as markup
)


def _user_errors(fn):
    """Print a PrefixgenError as one line on stderr and exit with its code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrefixgenError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            message = io_error_message(exc)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None

    return wrapper


Opt = typer.Option


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except PrefixgenError as exc:
        raise typer.BadParameter(str(exc)) from None


def _default(name: str) -> str:
    """``[default: X]`` for a build option's help, X read from BuildConfig: defaults live only there."""
    value = getattr(BuildConfig(), name)
    return f"[default: {format_size(value) if name in SIZE_FIELDS else value}]"


# The dataset and tokenization options, declared once: build, analyze and simulate read a dataset
# exactly alike, so they take the same flags. Defaults live in BuildConfig (None here means unset).
DatasetArg = Annotated[
    Optional[str], typer.Argument(help="A .jsonl/.json/.parquet/.csv/.txt file, a folder of them, or a Hub dataset id.")
]
ModelOpt = Annotated[Optional[str], Opt("--model", "-m", help="A local model folder or a Hub model id.")]
ConfigOpt = Annotated[Optional[Path], Opt("--config", "-c", help="A TOML file of options; flags win.")]
SplitOpt = Annotated[Optional[str], Opt("--split", help=f"Dataset split (Hub datasets). {_default('split')}")]
SubsetOpt = Annotated[Optional[str], Opt("--subset", help="Dataset subset/config name (Hub datasets).")]
TextFieldOpt = Annotated[Optional[str], Opt("--text-field", help=f"Field holding the text. {_default('text_field')}")]
MessagesFieldOpt = Annotated[Optional[str], Opt("--messages-field", help="Field holding chats, rendered with the chat template.")]
IdsFieldOpt = Annotated[
    Optional[str],
    Opt("--ids-field", help="Field holding lists of token ids, used as they are (no tokenizer, chat template or BOS)."),
]
SystemPromptOpt = Annotated[
    Optional[str], Opt("--system-prompt", help="System prompt added to every chat (prepended to text records).")
]
ChatTemplateOpt = Annotated[Optional[str], Opt("--chat-template", help="A Jinja chat template file, for tokenizers without one.")]
LimitOpt = Annotated[Optional[int], Opt("--limit", help="Read at most N records.")]
MaxTokensOpt = Annotated[Optional[int], Opt("--max-tokens", help="Truncate records to N tokens.")]
BlockSizeOpt = Annotated[Optional[int], Opt("--block-size", help=f"Tokens per block. {_default('block_size')}")]
KvDtypeOpt = Annotated[Optional[str], Opt("--kv-dtype", help=f"auto (the model's dtype) or fp8. {_default('kv_dtype')}")]
TrustRemoteCodeOpt = Annotated[Optional[bool], Opt("--trust-remote-code", help="Allow the model's own code to run.")]
DtypeOpt = Annotated[Optional[str], Opt("--dtype", help=f"auto, bfloat16, float16 or float32. {_default('dtype')}")]
MinRecordsOpt = Annotated[Optional[int], Opt("--min-records", help="Store only blocks contained in at least K records.")]
# --max-bytes means one thing wherever it appears (analysis.count.block_cost): the KV bytes of the blocks
# (fp8 scales and format 5's per-head checksums included; their tokens and index rows are not counted).
MAX_BYTES_MEANS = "KV bytes, fp8 scales and head checksums included; tokens and index not counted"
MaxBytesOpt = Annotated[
    Optional[int],
    Opt(
        "--max-bytes",
        parser=_size,
        metavar="SIZE",
        help=f"Store the most shared blocks whose KV fits in SIZE ({MAX_BYTES_MEANS}), e.g. 500GB.",
    ),
]
ShardBytesOpt = Annotated[
    Optional[int], Opt(parser=_size, metavar="SIZE", help=f"Bytes per shard file, e.g. 512MiB. {_default('shard_bytes')}")
]


@app.command()
@_user_errors
def build(
    dataset: DatasetArg = None,
    model: ModelOpt = None,
    out: Annotated[
        Optional[str], Opt("--out", "-o", help="The store folder (new or empty, unless --append/--resume/--overwrite).")
    ] = None,
    config: ConfigOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    text_field: TextFieldOpt = None,
    messages_field: MessagesFieldOpt = None,
    ids_field: IdsFieldOpt = None,
    system_prompt: SystemPromptOpt = None,
    chat_template: ChatTemplateOpt = None,
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = None,
    block_size: BlockSizeOpt = None,
    batch_tokens: Annotated[Optional[int], Opt(help=f"Token budget of one forward pass. {_default('batch_tokens')}")] = None,
    dtype: DtypeOpt = None,
    kv_dtype: KvDtypeOpt = None,
    kv_order: Annotated[
        Optional[str],
        Opt(
            help="heads (format 5: each tensor-parallel rank reads only its KV heads) or tokens (format 3/4, "
            f"for readers before format 5). {_default('kv_order')}"
        ),
    ] = None,
    min_records: MinRecordsOpt = None,
    max_bytes: MaxBytesOpt = None,
    device: Annotated[Optional[str], Opt(help=f"auto, cpu, cuda or cuda:N. {_default('device')}")] = None,
    shard_bytes: ShardBytesOpt = None,
    write_threads: Annotated[Optional[int], Opt(help=f"Background threads writing shards. {_default('write_threads')}")] = None,
    prefix_cache_bytes: Annotated[
        Optional[int],
        Opt(
            parser=_size,
            metavar="SIZE",
            help=f"Device memory for the KV of recent blocks, reused as past. {_default('prefix_cache_bytes')}",
        ),
    ] = None,
    sort_window: Annotated[
        Optional[int], Opt(help=f"Batches' worth of records sorted by length together. {_default('sort_window')}")
    ] = None,
    fsync: Annotated[
        Optional[bool], Opt("--fsync/--no-fsync", help=f"Make every shard durable before indexing it. {_default('fsync')}")
    ] = None,
    resume: Annotated[Optional[bool], Opt("--resume", help="Finish an interrupted build of this dataset.")] = None,
    append: Annotated[Optional[bool], Opt("--append", help="Add this dataset to an existing store of the same model.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace an existing store.")] = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    quiet: Annotated[Optional[bool], Opt("--quiet", "-q", help="No progress bar or summary.")] = None,
    rank: Annotated[Optional[int], Opt(help="This process's rank, for launchers without torchrun (with --world-size).")] = None,
    world_size: Annotated[Optional[int], Opt(help="How many processes build the store together (with --rank).")] = None,
    dist_timeout: Annotated[
        Optional[int],
        Opt(
            help=f"Seconds the start-up collectives (torchrun) may take; waits for other ranks' work have none. {_default('dist_timeout')}"
        ),
    ] = None,
) -> None:
    """Stream DATASET through MODEL and store the KV of every block-aligned prefix in STORE."""
    flags = dict(locals())
    flags.pop("config")
    from prefixgen.builder.pipeline import build as run_build
    from prefixgen.config import BuildConfig

    cfg = BuildConfig.from_file(config, **flags) if config else BuildConfig().merged(**flags)
    record = run_build(cfg)
    if not cfg.quiet:
        _print_build(record)


@app.command()
@_user_errors
def analyze(
    dataset: DatasetArg = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    text_field: TextFieldOpt = None,
    messages_field: MessagesFieldOpt = None,
    ids_field: IdsFieldOpt = None,
    system_prompt: SystemPromptOpt = None,
    chat_template: ChatTemplateOpt = None,
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = None,
    block_size: BlockSizeOpt = None,
    dtype: DtypeOpt = None,
    kv_dtype: KvDtypeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    holdout: Annotated[float, Opt(help="Share of records left out of the store and matched against it (0: off).")] = 0.1,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    plot: Annotated[
        Optional[Path], Opt("--plot", metavar="FILE.png", help="Draw hit rate against store size (needs prefixgen[plot]).")
    ] = None,
    quiet: Annotated[Optional[bool], Opt("--quiet", "-q", help="No progress bar.")] = None,
) -> None:
    """Count DATASET's blocks as build would (tokenizer and config only, no weights) and show what each store size buys."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "holdout", "as_json", "plot")}
    from prefixgen.analysis.analyze import analyze as run_analyze
    from prefixgen.config import BuildConfig

    if plot is not None:
        from prefixgen.analysis.plot import check_matplotlib

        check_matplotlib()
        if not holdout:
            raise ConfigError("--plot draws the hit rate on held-out records: pass --holdout above 0, e.g. 0.1")
    cfg = BuildConfig.from_file(config, **flags) if config else BuildConfig().merged(**flags)
    result = run_analyze(cfg, holdout=holdout, progress=not cfg.quiet and sys.stderr.isatty())
    if plot is not None:
        from prefixgen.analysis.plot import plot_analysis

        plot_analysis(result, plot)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_analysis(result, plot)


def _size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def _print_analysis(a, plot: Optional[Path]) -> None:
    share = f" ({a.holdout_records:,} more held out, {a.holdout_tokens:,} tokens)" if a.holdout_records else ""
    typer.echo(f"records          {a.records:,}{share}")
    typer.echo(f"dataset tokens   {a.dataset_tokens:,}")
    typer.echo(f"unique blocks    {a.unique_blocks:,} ({a.unique_tokens:,} tokens, block size {a.block_size})")
    typer.echo(f"KV per token     {a.kv_bytes_per_token:,} bytes ({a.kv_dtype})")
    typer.echo("\nsharing: blocks by the number of records that contain them")
    typer.echo(f"  {'records':>13} {'blocks':>12} {'tokens':>14}")
    for row in a.sharing:
        lo, hi = row["min_records"], row["max_records"]
        typer.echo(f"  {lo if lo == hi else f'{lo}-{hi}':>13} {row['blocks']:>12,} {row['tokens']:>14,}")
    typer.echo("\nchoices (build --min-records K / --max-bytes SIZE)")
    hit = "held-out hit" if a.holdout_records else ""
    typer.echo(
        f"  {'K':>5} {'SIZE':>10} {'stored tokens':>14} {'prefill tok':>12} {'bytes':>11} {'bytes fp8':>11} {hit:>13}".rstrip()
    )
    for c in a.choices:
        size = _size_text(c.max_bytes) if c.max_bytes is not None else ""
        rate = f"{c.holdout_hit_rate:.1%}" if c.holdout_hit_rate is not None else ""
        typer.echo(
            f"  {c.min_records:>5} {size:>10} {c.stored_tokens:>14,} {c.prefill_tokens:>12,} "
            f"{_size_text(c.bytes):>11} {_size_text(c.bytes_fp8):>11} {rate:>13}".rstrip()
        )
    if plot is not None:
        typer.echo(f"\nplot written to {plot}")


# How `ls` names what a build read (BuildRecord.input).
INPUT_NAMES = {"text": "text", "chat": "chats (chat template)", "ids": "token ids (--ids-field)"}


def _print_build(r) -> None:
    seconds = max(r.seconds, 1e-9)
    dedup = 1 - r.prefilled_tokens / r.dataset_tokens if r.dataset_tokens else 0.0
    padding = r.padding_tokens / max(r.prefilled_tokens + r.padding_tokens, 1)
    rows = [
        ("status", r.status),
        ("records", f"{r.records:,} ({r.skipped_records:,} skipped, {r.truncated_records:,} truncated)"),
        ("dataset tokens", f"{r.dataset_tokens:,}"),
        ("prefilled tokens", f"{r.prefilled_tokens:,} ({dedup:.1%} of the dataset's tokens deduplicated)"),
        ("padding tokens", f"{r.padding_tokens:,} ({padding:.1%} of the batch slots)"),
        ("stored tokens", f"{r.stored_tokens:,}"),
        ("bytes written", f"{r.bytes_written / 1e6:,.1f} MB"),
        ("time", f"{r.seconds:,.1f} s ({r.prefilled_tokens / seconds:,.0f} prefilled tokens/s)"),
    ]
    for name, value in rows:
        typer.echo(f"{name:>18}  {value}")


@app.command("ls")
@_user_errors
def ls(
    store: Annotated[Path, typer.Argument(help="The store folder.")],
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    top: Annotated[int, Opt(help="How many shared prefixes to show.")] = 5,
) -> None:
    """Summarize a store: model, sizes, shards, builds and the most-shared prefixes."""
    from prefixgen.report import store_summary
    from prefixgen.store.reader import PrefixStore

    summary = store_summary(PrefixStore.open(store), top=top)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_store(summary)
    _print_shards(summary["shards"])
    _print_builds(summary["builds"])
    _print_top_prefixes(summary["top_prefixes"])


def _print_store(summary: dict) -> None:
    """``ls``: the store's model, KV, size and inputs."""
    m = summary["model"]
    typer.echo(
        f"store        {summary['path']} (format {summary['format_version']}, {summary['block_checksum']} block checksums)"
    )
    typer.echo(
        f"model        {m['name']} ({m['architecture']}, {m['num_layers']} layers, {m['num_kv_heads']} KV heads x {m['head_dim']})"
    )
    kv = summary["kv"]
    typer.echo(f"kv           {kv['dtype']}{' as fp8' if kv['storage'] == 'fp8' else ''}, block size {summary['block_size']}")
    typer.echo(f"cache        {kv['cache']}")
    typer.echo(f"blocks       {summary['blocks']:,} ({summary['stored_tokens']:,} tokens)")
    if summary["inputs"]:
        typer.echo(f"input        {', '.join(INPUT_NAMES.get(i, i) for i in summary['inputs'])}")
    if "ids" in summary["inputs"]:
        typer.echo(
            "             token ids were stored as given: they were not tokenized here, so the tokenizer check\n"
            "             (connector, serve) shows the model matches, not that a server tokenizes prompts into them"
        )
    typer.echo(
        f"on disk      {summary['bytes'] / 1e6:,.2f} MB in {len(summary['shards'])} shards, {summary['bytes_per_token']:,} bytes per token"
    )


def _print_shards(shards: list) -> None:
    """``ls``: each shard's blocks and size."""
    if shards:
        typer.echo("\nshards")
        typer.echo(f"  {'name':<48} {'blocks':>8} {'MB':>10}")
        for s in shards:
            typer.echo(f"  {s['name']:<48} {s['blocks']:>8,} {s['bytes'] / 1e6:>10,.2f}")


def _print_builds(builds: list) -> None:
    """``ls``: each build's run, and its selection rule if it had one."""
    if builds:
        typer.echo("\nbuilds")
        typer.echo(
            f"  {'started':<26} {'status':<12} {'input':<6} {'records':>9} {'dataset tok':>12} {'prefilled':>10} {'padding':>8} {'seconds':>8}"
        )
        for b in builds:
            typer.echo(
                f"  {b['started_at']:<26} {b['status']:<12} {b['input']:<6} {b['records']:>9,} {b['dataset_tokens']:>12,} "
                f"{b['prefilled_tokens']:>10,} {b['padding_tokens']:>8,} {b['seconds']:>8,.1f}"
            )
            sel = b.get("selection")
            if sel:
                rule = ", ".join(
                    f"--{k.replace('_', '-')} {v:,}"
                    for k, v in (("min_records", sel["min_records"]), ("max_bytes", sel["max_bytes"]))
                    if v is not None
                )
                typer.echo(
                    f"  {'':<26} selection: {rule}: stored {sel['selected_blocks']:,} of {sel['candidate_blocks']:,} blocks"
                )


def _print_top_prefixes(prefixes: list) -> None:
    """``ls``: the most-shared prefixes."""
    if prefixes:
        typer.echo("\nmost-shared prefixes")
        for p in prefixes:
            preview = p.get("preview")
            typer.echo(
                f"  {p['records']:>6,} records  {p['tokens']:>6,} tokens  {json.dumps(preview) if preview else p['key'][:16]}"
            )


@app.command()
@_user_errors
def verify(
    store: Annotated[Path, typer.Argument(help="The store folder.")],
    quick: Annotated[bool, Opt("--quick", help="Check structure and index only, without reading every KV byte.")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Check every shard's checksum and every index reference; exit 1 on any fault."""
    from prefixgen.maintain.verify import verify_store

    report = verify_store(store, progress=not quiet and sys.stderr.isatty(), quick=quick)
    for note in report.notes:
        typer.echo(f"note: {note}")
    for fault in report.faults:
        typer.echo(f"FAULT: {fault}", err=True)
    if not report.ok:
        typer.echo(f"{store}: {len(report.faults)} fault(s) found", err=True)
        raise typer.Exit(1)
    what = "structure and index" if quick else "checked"
    typer.echo(f"{store}: ok ({report.shards} shards, {report.blocks:,} blocks {what})")


@app.command()
@_user_errors
def compact(
    store: Annotated[Path, typer.Argument(help="The store folder.")],
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge the store's index segments into one, so lookups stay fast (safe beside running builds; refused while a prune runs)."""
    from prefixgen.maintain.compact import compact_store
    from prefixgen.store.reader import PrefixStore

    PrefixStore.open(store)  # a clear error if it is not a store
    r = compact_store(store, progress=not quiet and sys.stderr.isatty())
    if not r.segment:
        typer.echo(f"{store}: nothing to compact")
        return
    typer.echo(f"{store}: merged {r.segments_merged:,} segments ({r.rows_in:,} rows, {r.rows_out:,} unique) into {r.segment}")


@app.command()
@_user_errors
def prune(
    store: Annotated[Path, typer.Argument(help="The store folder.")],
    max_bytes: Annotated[
        Optional[int],
        Opt(
            parser=_size,
            metavar="SIZE",
            help=f"Keep the most valuable blocks whose KV fits in SIZE ({MAX_BYTES_MEANS}), e.g. 8GiB.",
        ),
    ] = None,
    min_records: Annotated[Optional[int], Opt(help="Keep only blocks contained in at least K records.", metavar="K")] = None,
    shard_bytes: ShardBytesOpt = None,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Keep the blocks shared by the most records (prefix-closed) and delete the rest. Refused while a build or compaction runs."""
    from prefixgen.maintain.prune import prune_store

    progress = not quiet and sys.stderr.isatty()
    r = prune_store(store, max_bytes=max_bytes, min_records=min_records, shard_bytes=shard_bytes, progress=progress)
    typer.echo(
        f"{store}: kept {r.blocks_kept:,} of {r.blocks_before:,} blocks; shards {r.bytes_before / 1e6:,.1f} MB -> "
        f"{r.bytes_after / 1e6:,.1f} MB ({r.shards_written} written, {r.shards_removed} removed)"
        + (f"; {r.states_removed} recurrent states removed" if r.states_removed else "")
    )
    for note in r.notes:
        typer.echo(f"note: {note}", err=True)


_EXPORT = ExportConfig()  # export's defaults, shown in the help (None below means unset: ExportConfig fills it in)


def _hash_seed(value: str) -> int | str:
    """--hash-seed: an integer PYTHONHASHSEED, ``random`` (hashed as written, as vLLM does), or ``unset``."""
    if value in ("unset", "random"):
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give the server's PYTHONHASHSEED (an integer or random) or unset") from None


@app.command()
@_user_errors
def export(
    store: Annotated[Optional[str], typer.Argument(help="The store folder.")] = None,
    to: Annotated[Optional[str], Opt("--to", help="The engine: sglang, lmcache or vllm.")] = None,
    out: Annotated[Optional[str], Opt("--out", "-o", help="The folder the engine reads (new or empty, unless --append).")] = None,
    model_name: Annotated[Optional[str], Opt(help="The model name the server serves (part of every file name).")] = None,
    page_size: Annotated[Optional[int], Opt(help=f"sglang: the server's --page-size. [default: {_EXPORT.page_size}]")] = None,
    tp_size: Annotated[Optional[int], Opt(help=f"The server's tensor-parallel size. [default: {_EXPORT.tp_size}]")] = None,
    layout: Annotated[
        Optional[str],
        Opt(
            help=f"sglang: the server's --hicache-mem-layout: page_first, page_first_direct or layer_first. [default: {_EXPORT.layout}]"
        ),
    ] = None,
    kv_dtype: Annotated[
        Optional[str],
        Opt(
            help="sglang: the KV dtype the server keeps: auto (as its --dtype auto: the model config's dtype, a float32 "
            f"model as float16), float32, bfloat16 or float16. [default: {_EXPORT.kv_dtype}]"
        ),
    ] = None,
    hash_seed: Annotated[
        Optional[str],
        Opt(
            parser=_hash_seed,
            help="lmcache, vllm: the PYTHONHASHSEED the server runs with, or 'unset' when it runs without one "
            "(vllm: unset if not given).",
            metavar="SEED",
        ),
    ] = None,
    chunk_size: Annotated[Optional[int], Opt(help=f"lmcache: the chunk_size. [default: {_EXPORT.chunk_size}]")] = None,
    hash_algorithm: Annotated[
        Optional[str], Opt("--hash", help=f"lmcache: the pre_caching_hash_algorithm. [default: {_EXPORT.hash_algorithm}]")
    ] = None,
    block_size: Annotated[Optional[int], Opt(help=f"vllm: the server's --block-size. [default: {_EXPORT.block_size}]")] = None,
    blocks_per_file: Annotated[
        Optional[int],
        Opt(help=f"vllm: the connector's blocks_per_chunk (vLLM blocks per file). [default: {_EXPORT.blocks_per_file}]"),
    ] = None,
    dtype: Annotated[Optional[str], Opt(help="vllm: the server's KV cache dtype. [default: the store's]")] = None,
    prefix_caching_hash_algo: Annotated[
        Optional[str],
        Opt(help=f"vllm: the server's --prefix-caching-hash-algo. [default: {_EXPORT.prefix_caching_hash_algo}]"),
    ] = None,
    kv_cache_layout: Annotated[
        Optional[str],
        Opt(help=f"vllm: the server's KV cache layout, NHD or HND (VLLM_KV_CACHE_LAYOUT). [default: {_EXPORT.kv_cache_layout}]"),
    ] = None,
    layer_names: Annotated[
        Optional[str],
        Opt(help=f"vllm: the server's attention layer names, {{i}} the layer. [default: {_EXPORT.layer_names}]"),
    ] = None,
    min_records: Annotated[Optional[int], Opt(help="Export only blocks contained in at least K records.", metavar="K")] = None,
    max_bytes: Annotated[
        Optional[int], Opt(parser=_size, metavar="SIZE", help="Export the most shared blocks whose KV fits in SIZE, e.g. 500GB.")
    ] = None,
    append: Annotated[Optional[bool], Opt("--append", help="Add this store to an existing export of the same model.")] = None,
    fsync: Annotated[
        Optional[bool], Opt("--fsync/--no-fsync", help=f"Make every file durable before its rename. [default: {_EXPORT.fsync}]")
    ] = None,
    quiet: Annotated[Optional[bool], Opt("--quiet", "-q", help="No progress bar or summary.")] = None,
) -> None:
    """Write STORE's prefixes in an engine's own cache layout (SGLang HiCache file, LMCache fs://, vLLM's fs offloading
    tier), for the engine to serve."""
    cfg = _EXPORT.merged(**locals()).validate()
    from prefixgen.export import export_store

    s = export_store(cfg.merged(quiet=cfg.quiet or not sys.stderr.isatty()))
    if not cfg.quiet:
        typer.echo(
            f"{cfg.out}: wrote {s.files:,} files, {s.bytes / 1e9:,.3f} GB in {s.seconds:,.1f} s ({s.gb_per_s:.2f} GB/s); "
            f"{s.skipped_existing:,} already there; {s.units:,} {cfg.to} units of {cfg.unit_tokens} tokens"
        )


_SERVE = ServeConfig()  # serve's defaults, shown in the help (None below means unset: ServeConfig fills it in)


@app.command()
@_user_errors
def gc(
    store: Annotated[Path, typer.Argument(help="The store folder.")],
    dry_run: Annotated[bool, Opt("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove leftovers of dead writers (temporary files, shards without a segment, plans of dead distributed builds); live writers' files are kept."""
    from prefixgen.maintain.gc import collect_garbage

    report = collect_garbage(store, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for name in report.removed:
        typer.echo(f"{verb} {name}" + (" (plan of a dead distributed build)" if name in report.plans else ""))
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    live = f"; {len(report.live_writers)} live writer(s) left alone" if report.live_writers else ""
    typer.echo(f"{store}: {verb} {len(report.removed)} file(s), {report.bytes_freed / 1e6:,.2f} MB{live}")


@app.command()
@_user_errors
def serve(
    store: Annotated[Optional[str], typer.Argument(help="The store folder (not needed with --no-store).")] = None,
    model: Annotated[Optional[str], Opt("--model", "-m", help="The model the store was built with.")] = None,
    host: Annotated[Optional[str], Opt(help=f"Address to listen on. [default: {_SERVE.host}]")] = None,
    port: Annotated[Optional[int], Opt(help=f"Port to listen on. [default: {_SERVE.port}]")] = None,
    device: Annotated[Optional[str], Opt(help=f"auto, cpu, cuda or cuda:N. [default: {_SERVE.device}]")] = None,
    dtype: Annotated[Optional[str], Opt(help=f"auto, bfloat16, float16 or float32. [default: {_SERVE.dtype}]")] = None,
    gpu_cache_bytes: Annotated[
        Optional[int],
        Opt(
            parser=_size,
            metavar="SIZE",
            help=f"Device memory for hot prefixes (LRU), e.g. 8GiB. [default: {format_size(_SERVE.gpu_cache_bytes)}]",
        ),
    ] = None,
    served_model_name: Annotated[Optional[str], Opt(help="The model name clients use. [default: --model]")] = None,
    chat_template: Annotated[
        Optional[str], Opt("--chat-template", help="The Jinja chat template file the store was built with, if any.")
    ] = None,
    default_max_tokens: Annotated[
        Optional[int], Opt(help=f"max_tokens of requests that do not say. [default: {_SERVE.default_max_tokens}]")
    ] = None,
    no_store: Annotated[Optional[bool], Opt("--no-store", help="Ignore the store: prefill every prompt in full.")] = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    refresh_seconds: Annotated[
        Optional[float],
        Opt(help=f"Look for store changes (append, prune, compact) at most this often. [default: {_SERVE.refresh_seconds}]"),
    ] = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API, loading prompt prefixes from STORE."""
    cfg = _SERVE.merged(**locals()).validate()
    from prefixgen.integrations.serve import serve as run_serve

    run_serve(cfg)


@app.command()
@_user_errors
def simulate(
    source: Annotated[
        Optional[str], typer.Argument(help="A dataset (as build reads it), or a trace file with --trace-format mooncake.")
    ] = None,
    model: ModelOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    text_field: TextFieldOpt = None,
    messages_field: MessagesFieldOpt = None,
    ids_field: IdsFieldOpt = None,
    system_prompt: SystemPromptOpt = None,
    chat_template: ChatTemplateOpt = None,
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = None,
    block_size: BlockSizeOpt = None,
    kv_dtype: KvDtypeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    trace_format: Annotated[Optional[str], Opt(help="dataset (tokenized as build does) or mooncake. [default: dataset]")] = None,
    trace_block_tokens: Annotated[Optional[int], Opt(help="Tokens per hash id of a Mooncake trace. [default: 512]")] = None,
    store: Annotated[Optional[str], Opt(help="A built store: the static tier (its blocks always hit).")] = None,
    warmup: Annotated[
        Optional[float], Opt(help="The first FRACTION of requests choose a static tier as build would; the rest are scored.")
    ] = None,
    min_records: Annotated[Optional[int], Opt(help="--warmup: keep blocks in at least K warm-up requests. [default: 1]")] = None,
    max_bytes: Annotated[
        Optional[int], Opt(parser=_size, metavar="SIZE", help="--warmup: the static tier's KV bytes at most, e.g. 500GB.")
    ] = None,
    max_blocks: Annotated[Optional[int], Opt(help="--warmup: the static tier's blocks at most.")] = None,
    capacity: Annotated[
        Optional[str],
        Opt(
            help="Dynamic tier sizes, comma-separated: blocks, bytes (20GB), % of distinct blocks, or inf. [default: 1%,3%,10%,30%,inf]"
        ),
    ] = None,
    policy: Annotated[Optional[str], Opt(help="Policies, comma-separated. [default: lru,lfu,arc,s3fifo,belady]")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Optional[Path], Opt(help="Write a PNG of token hit rate against capacity (needs matplotlib).")] = None,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Replay requests against a static tier and a dynamic tier under eviction policies; report the hits."""
    flags = {k: v for k, v in locals().items() if k not in ("as_json", "plot", "quiet")}
    from prefixgen.analysis.simulate import format_table
    from prefixgen.analysis.simulate import plot as write_plot
    from prefixgen.analysis.simulate import simulate as run_simulate
    from prefixgen.config import SimulateConfig

    cfg, data = SimulateConfig.from_flags(**flags)
    result = run_simulate(cfg, data, progress=not quiet and sys.stderr.isatty())
    if plot is not None:
        write_plot(result, plot)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(format_table(result))
        if plot is not None:
            typer.echo(f"\nplot: {plot}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
