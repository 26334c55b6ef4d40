"""Build records: ``builds/<build_id>.json`` (:class:`BuildRecord`), a distributed build's rank parts and
their merge, and the columns of ``counts/<build_id>.safetensors``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefixgen.format.manifest import _fields_dict, _known_fields

BUILD_STAT_FIELDS = (
    "records",
    "skipped_records",
    "truncated_records",
    "dataset_tokens",
    "stored_tokens",
    "prefilled_tokens",
    "padding_tokens",
    "bytes_written",
)


@dataclass(slots=True)
class BuildRecord:
    """``builds/<build_id>.json``: one build run's options and statistics (rewritten atomically
    as the run goes; ``status`` is ``running`` until it ends)."""

    build_id: str
    dataset: str
    status: str = "running"  # running | complete | interrupted | failed
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    writers: list[str] = field(default_factory=list)
    records: int = 0
    skipped_records: int = 0
    truncated_records: int = 0
    dataset_tokens: int = 0
    stored_tokens: int = 0
    prefilled_tokens: int = 0
    padding_tokens: int = 0
    bytes_written: int = 0
    # Where the time went: read, tokenize, plan (hash + dedup), batch, prefill, copy (device to
    # host), write (background threads, summed) and write_wait (the pipeline waiting on the disk).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # With --min-records/--max-bytes: min_records, max_bytes, selected_blocks (chosen to store) and
    # candidate_blocks (distinct blocks of the dataset); None when every block is stored.
    selection: dict[str, Any] | None = None
    # Distributed builds: ranks of the run; a rank's own part (``builds/<id>.ranks/``) has ``rank``
    # and ``head_tokens`` (shared-prefix tokens it prefilled first); the merged record has ``ranks``.
    world_size: int = 1
    rank: int = 0
    head_tokens: int = 0
    ranks: list[dict[str, Any]] = field(default_factory=list)
    # Tokens this run's tokenizer produced over all its passes (a rank of a distributed build: its
    # count shares; one process: the dataset, plus the count pass of --min-records/--max-bytes).
    tokenized_tokens: int = 0
    # A rank of a distributed build, in its count pass: the records it parsed and the bytes of the
    # dataset it read for them, and the bytes outside its share it read to number its records
    # (data.source.read_share): 0 now that ranks number records within their share (the plan makes
    # their indices in the dataset); kept, as earlier builds recorded a scan there. 0 for one process.
    read_records: int = 0
    read_bytes: int = 0
    scanned_bytes: int = 0
    # Distributed builds: plans this rank made (the ranks of a run make one between them), and the
    # attempt this rank ran in (``--rank``: each --resume of the ranks after one died plans the work
    # left anew, as attempt k+1; the build is complete when every rank completed the same attempt).
    plans_made: int = 0
    attempt: int = 0
    # What the records held: "text", "chat" (--messages-field) or "ids" (--ids-field: token ids used as
    # they are, not tokenized by prefixgen). Derived from ``options`` when not given (records written
    # before it was recorded).
    input: str = ""

    def __post_init__(self) -> None:
        if not self.input:
            self.input = record_input(self.options)

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        return cls(**_known_fields(cls, data))


def record_input(options: dict[str, Any]) -> str:
    """What a build's records held, from its options: ``ids``, ``chat`` or ``text``.

    Example:
        >>> record_input({"ids_field": "prompt_token_ids"}), record_input({"messages_field": "m"}), record_input({})
        ('ids', 'chat', 'text')
    """
    return "ids" if options.get("ids_field") else "chat" if options.get("messages_field") else "text"


RANK_PARTS_SUFFIX = ".ranks"  # builds/<build_id>.ranks/w<N>-r<R>.json: one rank's part of a distributed build
PLAN_SUFFIX = ".plan"  # builds/<build_id>.plan/<run>/: count shares and the plan of a distributed run
_SUMMED = (*BUILD_STAT_FIELDS, "head_tokens", "tokenized_tokens", "read_records", "read_bytes", "scanned_bytes", "plans_made")
_PER_RANK = ("rank", "status", "attempt", "writers", *_SUMMED, "seconds", "stage_seconds")


def merge_rank_parts(base: BuildRecord, parts: Sequence[BuildRecord]) -> BuildRecord:
    """One record for a distributed build: ``base`` (``builds/<id>.json``) with its ranks' parts
    summed, every writer id, per-rank statistics in ``ranks``, and a status that is ``complete``
    only when every rank of the run is, in the same attempt (a rank of an earlier attempt has the
    work of the latest plan still to do).

    Example:
        >>> parts = [BuildRecord("b", "d", status="complete", world_size=2, rank=r, records=3) for r in (0, 1)]
        >>> m = merge_rank_parts(BuildRecord("b", "d", world_size=2), parts)
        >>> m.status, m.records, len(m.ranks)
        ('complete', 6, 2)
    """
    merged = BuildRecord.from_dict(base.to_dict())
    parts = sorted(parts, key=lambda p: p.rank)
    for name in _SUMMED:
        setattr(merged, name, sum(getattr(p, name) for p in parts))
    merged.writers = [w for p in parts for w in p.writers]
    merged.seconds = max((p.seconds for p in parts), default=0.0)
    merged.finished_at = max((p.finished_at for p in parts), default="")
    merged.ranks = [{k: getattr(p, k) for k in _PER_RANK} for p in parts]
    merged.selection = next((p.selection for p in parts if p.selection), merged.selection)  # the plan's, one for all
    statuses = {p.status for p in parts}
    world = parts[0].world_size if parts else merged.world_size
    merged.world_size = world
    if "failed" in statuses:
        merged.status = "failed"
    elif "interrupted" in statuses:
        merged.status = "interrupted"
    elif statuses == {"complete"} and {p.rank for p in parts} == set(range(world)) and len({p.attempt for p in parts}) == 1:
        merged.status = "complete"
    else:
        merged.status = "running"
    return merged


# counts/<build_id>.safetensors: how many of that build's records contained each block.
COUNT_COLUMNS: dict[str, tuple[str, int]] = {"key": ("uint8", 32), "records": ("uint64", 1)}
