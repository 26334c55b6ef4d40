"""``prefixgen build``: the pipeline, written in one place (:func:`build`, one process).

    open the model -> [count pass] -> prepare the store -> the run's record and writer
    records -> tokenize [-> select] -> plan (dedup) -> batch (by length) -> prefill -> write -> record
    compact this run's index segments

With --min-records/--max-bytes a count pass reads the dataset first and chooses the blocks to store
(builder/selection.py); the select step then cuts each record to its chosen blocks. Each step is an
iterator over the one before, so records stream through in bounded memory; the steps themselves are
``builder.steps``'s.

A distributed build wraps the same chain (``builder.distributed``, :meth:`Ranks.build`): count in
shares -> plan -> the shared prefixes -> this chain on the rank's share -> merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prefixgen.builder.distributed import launched
from prefixgen.builder.resume import drop_other_launches
from prefixgen.builder.steps import (
    BuildInterrupted,
    PastSource,
    StageTimer,
    build_record,
    chain,
    compact_run,
    count_pass,
    finished,
    open_job,
    open_writer,
    prefill_batches,
    recorded,
    released_on_error,
    start_run,
)
from prefixgen.config import BuildConfig
from prefixgen.data.source import count_records
from prefixgen.format import BuildRecord
from prefixgen.store.reader import PrefixStore
from prefixgen.store.writer import prepare_store, remove_temp_files

__all__ = ["BuildInterrupted", "PastSource", "StageTimer", "build"]


def build(cfg: BuildConfig, model: torch.nn.Module | None = None, tokenizer: Any = None) -> BuildRecord:
    """Fill the store ``cfg.out`` with the KV of every block-aligned prefix of ``cfg.dataset``.

    ``model`` and ``tokenizer`` may be given already loaded (on their device); else they are
    loaded from ``cfg.model``. Returns the build record (also written to the store). Raises a
    PrefixgenError subclass with a message for the user on bad input; on Ctrl-C,
    BuildInterrupted after storing what was done.

    Example:
        >>> rec = build(BuildConfig(dataset="data.jsonl", model="models/tiny", out="store"))  # doctest: +SKIP
        >>> rec.status, rec.stored_tokens  # doctest: +SKIP
        ('complete', 4096)
    """
    cfg.validate()
    ranks = launched(cfg)
    if ranks is not None:  # count in shares -> plan -> this same chain on the rank's share -> merge
        return ranks.build(cfg, model, tokenizer)
    out = Path(cfg.out)
    job = open_job(cfg, model, tokenizer, cfg.device)
    selection = count_pass(job) if cfg.selects else None  # --min-records/--max-bytes: before anything is written
    job.manifest = prepare_store(out, job.manifest, cfg.write_mode)
    if cfg.resume:
        remove_temp_files(out)
    store = PrefixStore.open(out)  # what is stored already: no work
    record = build_record(store, cfg)
    record.selection = selection.record() if selection else None
    done = finished(store, record, cfg)  # nothing to do: scripts can always pass --resume and rerun
    if done is not None:
        return done
    writer = open_writer(job, record)
    with released_on_error(writer):  # until the run's record takes over (it releases the writer however it ends)
        if selection is not None:
            record.tokenized_tokens += selection.tokenized_tokens
        if cfg.resume:  # the resumed build counts its records again from the start
            drop_other_launches(out, record.build_id, writer.writer_id, distributed=False)
            writer.drop_old_counts()
        total = None if cfg.quiet else lambda: count_records(cfg.dataset, cfg.limit)  # the progress bar's
        run = start_run(job, store, record, writer, cfg.quiet, total)
    with recorded(run):
        prefill_batches(run, chain(run, job.records, run.tokenize, selection))
    compact_run(run)
    return record
