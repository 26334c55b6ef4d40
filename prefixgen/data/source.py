"""Step 1 of the build: stream records from a local file, a folder of them, or a Hub dataset.

Everything is read with ``datasets`` in streaming mode, so memory stays flat however large the
dataset is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixgen.errors import DatasetError

# file extension -> datasets builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(slots=True)
class Record:
    """One dataset record: its position in the stream and the value of the chosen field."""

    index: int
    value: Any


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise DatasetError(f"{path} holds no dataset files (looked for {', '.join(BUILDERS)})")
    kinds = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise DatasetError(f"{path}: unsupported file type; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise DatasetError(f"{path} mixes file types ({', '.join(sorted(kinds))}); put one kind per folder")
    for p in files:
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise DatasetError(f"cannot read {p}: {exc.strerror}") from None
    return kinds.pop(), [str(p) for p in files]


def open_dataset(dataset: str, split: str = "train", subset: str | None = None):
    """An iterable (streaming) ``datasets`` dataset for a path or Hub id.

    Example:
        >>> ds = open_dataset("tests/data/chat.jsonl")  # doctest: +SKIP
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(dataset)
    try:
        if path.exists():
            builder, files = _local_files(path)
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1 or Path(dataset).suffix.lower() in BUILDERS:
            raise DatasetError(f"dataset {dataset} does not exist; give a file, a folder or a Hugging Face dataset id")
        return datasets.load_dataset(dataset, subset, split=split, streaming=True)
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many kinds; all mean the same to the user
        raise DatasetError(f"cannot open dataset {dataset}: {exc}") from None


def read_records(
    dataset: str, field: str, split: str = "train", subset: str | None = None, limit: int | None = None
) -> Iterator[Record]:
    """Stream ``Record``s holding ``field`` of each row. The dataset is opened and its first row
    read now, so a missing dataset or field fails here, before any work (the error lists the
    fields that exist); the rest streams.

    Example:
        >>> next(read_records("data.jsonl", "text")).value  # doctest: +SKIP
        'Once upon a time'
    """
    rows = iter(open_dataset(dataset, split, subset))
    try:
        first = next(rows, None)
    except Exception as exc:
        raise DatasetError(f"cannot read dataset {dataset}: {exc}") from None
    if first is None:
        return iter(())
    if field not in first:
        raise DatasetError(
            f"dataset {dataset} has no field {field!r}; its fields are: {', '.join(sorted(first))} "
            "(choose one with --text-field or --messages-field)"
        )
    stream = itertools.chain([first], rows)
    if limit is not None:
        stream = itertools.islice(stream, limit)
    return _records(dataset, field, stream)


def _records(dataset: str, field: str, rows: Iterator[dict]) -> Iterator[Record]:
    index = 0
    try:
        for row in rows:
            yield Record(index, row.get(field))
            index += 1
    except Exception as exc:
        raise DatasetError(f"reading dataset {dataset} failed at record {index}: {exc}") from None


def count_records(dataset: str, limit: int | None = None) -> int | None:
    """How many records a local dataset holds (at most ``limit``), or None where that is not known
    without parsing it (Hub datasets, .json and .csv files). Lines of .jsonl and .txt files (one
    record each), rows of .parquet files from their metadata.

    Example:
        >>> count_records("examples/stories.jsonl")
        240
    """
    path = Path(dataset)
    if not path.exists():
        return None
    try:
        _, files = _local_files(path)
    except DatasetError:
        return None
    total = 0
    for name in files:
        suffix = Path(name).suffix.lower()
        if suffix in (".jsonl", ".txt"):
            total += _count_lines(name)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(name).metadata.num_rows
        else:
            return None
        if limit is not None and total >= limit:
            return limit
    return total


def _count_lines(path: str) -> int:
    """Lines (the last one may lack its newline), read in 16 MiB pieces."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            lines += piece.count(b"\n")
            last = piece[-1:]
    return lines + (last != b"\n")
