"""Step 1 of the build: stream records from a local file, a folder of them, or a Hub dataset.

Everything is read with ``datasets`` in streaming mode, so memory stays flat however large the
dataset is.

A rank of a distributed build reads only its share (:func:`read_share`), as a pure function of the
dataset and the number of shares N, so every rank (and a resumed one) agrees:

* local ``.jsonl`` / ``.txt`` files (one, or a folder's, in name order as one byte stream): share S
  is the lines that start in bytes ``[S * size // N, (S + 1) * size // N)``. A rank reads those
  bytes (and the end of its last line). Its records' indices in the dataset need the number of
  records before the share: with ``local_index`` they are not computed (records are numbered
  within the share, and nothing before it is read: a distributed build adds the record counts of
  the shares before when it plans); without, the line ends of the bytes before the share are
  counted (a byte count, no parsing);
* local ``.parquet`` files: share S is the rows ``[S * rows // N, (S + 1) * rows // N)`` (row counts
  from the files' footers); a rank reads the field's column in the row groups holding them;
* datasets of N or more files read through ``datasets`` (a folder of ``.json`` or ``.csv`` files,
  most Hub datasets): share S is a contiguous run of its files (``datasets``' shards), as
  ``IterableDataset.shard(N, S, contiguous=True)`` cuts them: the first ``files % N`` shares get
  ``files // N + 1`` files, the others ``files // N``. A rank reads only its files; its records are
  numbered within the share with ``local_index`` (else the records of the files before are read to
  count them);
* with ``limit`` (``--limit K``), line files are cut from the bytes of their first K records (every
  rank scans line ends up to where they end: no parsing), parquet files from the rows ``[0, K)``;
* anything else (a single ``.json`` or ``.csv`` file, fewer files than shares, file runs with
  ``--limit``): share S is the records with ``index % N == S``, and every rank reads the whole
  dataset to find them.

Records read this way equal those of :func:`read_records` (same indices and values): lines are
parsed with ``json`` (blank lines of a .jsonl are no records, as for ``datasets``), text lines are
split at ``\\n``, ``\\r\\n`` and ``\\r`` (Python's universal newlines, as ``datasets`` reads them).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixgen.errors import DatasetError

# file extension -> datasets builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(slots=True)
class Record:
    """One dataset record: its position in the stream and the value of the chosen field.

    ``share``: None where ``index`` is the record's position in the dataset; else ``index`` is its
    row within that share (:func:`read_share` with ``local_index``: its position in the dataset is
    not known yet)."""

    index: int
    value: Any
    share: int | None = None

    @property
    def name(self) -> str:
        """How messages name the record: ``record 12``, or ``record 5 of share 2``."""
        return f"record {self.index}" if self.share is None else f"record {self.index} of share {self.share}"


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


def dataset_fingerprint(dataset: str) -> str:
    """What tells a local dataset's content apart from its earlier content without reading it: a
    digest of each file's name, size and modification time ("" for a Hub dataset, whose id and
    options say which one). The ranks of a distributed build derive their build id from it, so a
    rerun after the dataset grew is a new build, not the finished old one.

    Example:
        >>> dataset_fingerprint("tests/data/mt_bench_question.jsonl")  # doctest: +SKIP
        'f3a0c1d2e4b5a697'
    """
    import hashlib

    path = Path(dataset)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p.relative_to(path) if p != path else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


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
    return _field_records(dataset, open_dataset(dataset, split, subset), field, limit)


def _field_records(
    dataset: str, ds: Any, field: str, limit: int | None = None, start: int = 0, share: int | None = None
) -> Iterator[Record]:
    """``Record``s of the rows of ``ds`` (an opened iterable dataset, or one share of it), the first
    numbered ``start`` (within share ``share``, as in ``Record``); its first row is read now."""
    rows = iter(ds)
    try:
        first = next(rows, None)
    except Exception as exc:
        raise DatasetError(f"cannot read dataset {dataset}: {exc}") from None
    if first is None:
        return iter(())
    if field not in first:
        raise DatasetError(
            f"dataset {dataset} has no field {field!r}; its fields are: {', '.join(sorted(first))} "
            "(choose one with --text-field, --messages-field or --ids-field)"
        )
    stream = itertools.chain([first], rows)
    if limit is not None:
        stream = itertools.islice(stream, limit)
    return _records(dataset, field, stream, start, share)


def _records(dataset: str, field: str, rows: Iterator[dict], start: int = 0, share: int | None = None) -> Iterator[Record]:
    index = start
    try:
        for row in rows:
            yield Record(index, row.get(field), share)
            index += 1
    except Exception as exc:
        raise DatasetError(f"reading dataset {dataset} failed at {Record(index, None, share).name}: {exc}") from None


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


# ---------------------------------------------------------------------------- shares

PIECE = 16 << 20  # bytes read at a time when counting line ends


@dataclass(slots=True)
class ShareRead:
    """What reading a share took; :func:`read_share` adds to it as it streams."""

    records: int = 0  # records parsed (the share's; the whole dataset's where every rank reads it all)
    bytes: int = 0  # bytes of the dataset's files read to parse them (0 for a Hub dataset: not known)
    # bytes before the share whose line ends were counted to number its records (0 with local_index)
    scanned_bytes: int = 0


def read_share(
    dataset: str,
    field: str,
    share: int,
    shares: int,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
    read: ShareRead | None = None,
    local_index: bool = False,
) -> Iterator[Record]:
    """Stream share ``share`` of ``shares`` of the dataset: its ``Record``s, with the indices and
    values :func:`read_records` gives them, reading about 1/``shares`` of a local .jsonl, .txt or
    .parquet dataset, or of the files of one with ``shares`` files or more (the module docstring
    defines the shares). ``read`` counts what was read. ``local_index``: records of line files and
    of file runs are numbered within the share (``Record.share`` is ``share``, ``index`` the row
    from 0), so that nothing before the share is read; their indices in the dataset are the
    records of the shares before plus the row. Other records keep their indices in the dataset
    (``Record.share`` None): they are known without reading more.

    Example:
        >>> [r.index for r in read_share("examples/stories.jsonl", "text", 2, 3)][:2]
        [160, 161]
        >>> [r.name for r in read_share("examples/stories.jsonl", "text", 2, 3, local_index=True)][:2]
        ['record 0 of share 2', 'record 1 of share 2']
    """
    read = read if read is not None else ShareRead()
    _span(0, share, shares)  # checks share
    kind, files = _share_files(dataset)
    if kind == "parquet":
        return _parquet_share(dataset, files, field, share, shares, read, limit)
    if kind in ("json", "text"):
        return _line_share(dataset, files, kind, field, share, shares, read, local_index, limit)
    ds = open_dataset(dataset, split, subset)
    if limit is None and ds.num_shards >= shares and (not files or ds.num_shards == len(files)):
        return _file_share(dataset, ds, files, field, share, shares, read, local_index)
    return _filtered_share(dataset, ds, files, field, share, shares, limit, read)


def _share_files(dataset: str) -> tuple[str | None, list[str]]:
    """The kind of share reading a dataset allows (``json`` lines, ``text`` lines, ``parquet``, or
    None: read everything and filter) and its files."""
    path = Path(dataset)
    if not path.exists():
        return None, []
    kind, files = _local_files(path)
    suffixes = {Path(f).suffix.lower() for f in files}
    if kind == "json" and suffixes == {".jsonl"} and not any(_starts_with_list(f) for f in files):
        return "json", files
    if kind in ("text", "parquet"):
        return kind, files
    return None, files


def _starts_with_list(path: str) -> bool:
    """A .jsonl file holding one JSON list (``datasets`` reads it whole, as records)."""
    with open(path, "rb") as f:
        return f.read(64).removeprefix(_BOM).lstrip().startswith(b"[")


def _filtered_share(
    dataset: str, ds: Any, files: list[str], field: str, share: int, shares: int, limit: int | None, read: ShareRead
) -> Iterator[Record]:
    """Share ``index % shares == share`` of a dataset read whole (no cheaper way to find it)."""
    records = _field_records(dataset, ds, field, limit)  # reads the first row now: a bad dataset fails here
    read.bytes += sum(Path(f).stat().st_size for f in files)

    def filtered() -> Iterator[Record]:
        for record in records:
            read.records += 1
            if record.index % shares == share:
                yield record

    return filtered()


def _file_share(
    dataset: str, ds: Any, files: list[str], field: str, share: int, shares: int, read: ShareRead, local: bool
) -> Iterator[Record]:
    """Share ``share`` of a dataset of at least ``shares`` files (``ds``'s shards, one per local
    file): a contiguous run of its files, as ``IterableDataset.shard(contiguous=True)`` cuts them
    (the first ``num_shards % shares`` shares one file more). ``local``: numbered within the share
    (else the records of the files before it are read to count them)."""
    sizes = [Path(f).stat().st_size for f in files]  # [] for a Hub dataset: its bytes are not known
    lo, hi = _contiguous(ds.num_shards, share, shares)
    read.bytes += sum(sizes[lo:hi])
    before = 0
    for earlier in range(0 if local else share):
        before += sum(1 for _ in ds.shard(num_shards=shares, index=earlier, contiguous=True))
    read.scanned_bytes += sum(sizes[: 0 if local else lo])
    part = ds.shard(num_shards=shares, index=share, contiguous=True)
    records = _field_records(dataset, part, field, start=before, share=share if local else None)

    def counted() -> Iterator[Record]:
        for record in records:
            read.records += 1
            yield record

    return counted()


def _contiguous(total: int, part: int, parts: int) -> tuple[int, int]:
    """The ``[start, end)`` of ``part`` of ``range(total)`` cut into ``parts`` runs as ``datasets``
    shards (``split_shard_indices_by_worker``): sizes differ by at most one, the first runs larger."""
    div, mod = divmod(total, parts)
    start = div * part + min(part, mod)
    return start, start + div + (part < mod)


def _span(total: int, share: int, shares: int) -> tuple[int, int]:
    if not 0 <= share < shares:
        raise ValueError(f"share {share} is not in 0..{shares - 1}")
    return total * share // shares, total * (share + 1) // shares


def _line_share(
    dataset: str,
    files: list[str],
    kind: str,
    field: str,
    share: int,
    shares: int,
    read: ShareRead,
    local: bool,
    limit: int | None = None,
) -> Iterator[Record]:
    """The lines of ``files`` (one byte stream) that start in this share's byte range; ``local``:
    numbered within the share (else the records before it are counted from their line ends).
    ``limit``: the range is cut from the bytes of the first ``limit`` records only."""
    sizes = [Path(f).stat().st_size for f in files]
    total = sum(sizes) if limit is None else _limit_end(files, kind, limit, read)
    lo, hi = _span(total, share, shares)
    in_share = share if local else None  # Record.share
    index, base = 0, 0  # records before the current position (in the share, if local); the next file's first byte
    for name, size in zip(files, sizes):
        first, base = base, base + size  # this file's first byte in the stream
        start, end = max(lo - first, 0), min(hi - first, size)  # this file's part of the range
        if start >= size:  # the whole file is before the share: count its records
            index += 0 if local else _count_line_records(name, kind, size, read)
            continue
        if end <= start:
            break  # the range ended in an earlier file
        with open(name, "rb") as f:
            if start > 0:  # the line holding byte start - 1 belongs to the share before
                f.seek(start - 1)
                read.bytes += len(f.readline())
                start = f.tell()
                index += 0 if local else _count_line_records(name, kind, start, read)
            pos = start
            while pos < end:
                line = f.readline()
                if not line:
                    break
                read.bytes += len(line)
                line = line[: total - first - pos]  # the limit's last line may end at a lone \r in it
                for value in _parse_line(dataset, name, pos, line, kind, field, index, in_share, pos == 0):
                    read.records += 1
                    yield Record(index, value, in_share)
                    index += 1
                pos += len(line)


def _parse_line(
    dataset: str, name: str, pos: int, line: bytes, kind: str, field: str, index: int, share: int | None, first: bool
) -> list:
    """The field's values of the records in one ``\\n``-terminated line: one for a .jsonl line (none
    for a blank one), one or more for a .txt line (a lone ``\\r`` also ends a line). ``index`` and
    ``share``: the line's first record (as in ``Record``), for a message."""
    try:
        text = line.decode("utf-8")
        if kind == "text":
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            return text.removesuffix("\n").split("\n")
        if first:
            text = text.removeprefix("\ufeff")
        if not text.strip(" \t\r\n"):
            return []
        row = json.loads(text)
        if not isinstance(row, dict):
            raise ValueError(f"a JSON {type(row).__name__}, not an object")
    except ValueError as exc:  # UnicodeDecodeError and json.JSONDecodeError too
        raise DatasetError(
            f"reading dataset {dataset} failed at {Record(index, None, share).name} ({name}, byte {pos}): {exc}"
        ) from None
    return [row.get(field)]


def _limit_end(files: list[str], kind: str, limit: int, read: ShareRead) -> int:
    """The byte, in ``files`` taken as one stream, where their first ``limit`` records end (all of
    it if they hold fewer): a scan of line ends, no parsing. A .txt line may hold several records
    (a lone ``\\r`` ends one), so the end may fall inside a ``\\n``-terminated line."""
    left, base = limit, 0  # records still to pass; the current file's first byte
    for name in files:
        with open(name, "rb") as f:
            pos, first = 0, True
            for line in f:
                read.scanned_bytes += len(line)
                if kind == "json":
                    ends = [len(line)] if _is_json_record(line, first) else []
                elif b"\r" not in line:
                    ends = [len(line)]  # one record (a last line without its end too)
                else:
                    ends = [m.end() for m in _TEXT_LINE_END.finditer(line)]
                    ends += [len(line)] if ends[-1] < len(line) else []  # a last line without its end
                if len(ends) >= left:
                    return base + pos + ends[left - 1] if left else base + pos
                left -= len(ends)
                pos, first = pos + len(line), False
            base += pos
    return base


def _count_line_records(path: str, kind: str, upto: int, read: ShareRead) -> int:
    """Records in the first ``upto`` bytes of a line file (``upto`` is a line start or its size),
    counting line ends in pieces, without copying or parsing: ``\\n`` (and for .txt a lone
    ``\\r``), plus a last line without its newline. A .jsonl with a line that starts with
    whitespace (a blank line is no record) is counted line by line instead."""
    records, last, cr = 0, b"\n", False  # last: the byte before the piece; cr: the piece before ended with \r
    with open(path, "rb") as f:
        left = upto
        while left > 0 and (piece := f.read(min(PIECE, left))):
            at = upto - left  # the piece's first byte in the file
            left -= len(piece)
            read.scanned_bytes += len(piece)
            if kind == "json" and (
                (last == b"\n" and piece[:1] in _SPACE)
                or (at == 0 and piece.startswith(_BOM) and piece[len(_BOM) : len(_BOM) + 1] in _SPACE)
                or _LINE_STARTS_WITH_SPACE.search(piece)
            ):
                return _count_json_lines_slowly(path, upto, read)
            records += piece.count(b"\n")
            if kind == "text" and (crs := piece.count(b"\r")):
                records += crs - piece.count(b"\r\n")
            if kind == "text" and cr and piece[:1] == b"\n":
                records -= 1  # a \r\n split between pieces: one line end, counted twice
            last, cr = piece[-1:], piece[-1:] == b"\r"
    ends = (b"\n", b"\r") if kind == "text" else (b"\n",)
    return records + (last not in ends)  # a last line without its end


_BLANK = b" \t\r\n"  # what a blank .jsonl line holds
_SPACE = tuple(_BLANK[i : i + 1] for i in range(len(_BLANK)))
_BOM = b"\xef\xbb\xbf"
_TEXT_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_STARTS_WITH_SPACE = re.compile(rb"\n[ \t\r\n]")  # a literal first byte: searched as fast as counted


def _count_json_lines_slowly(path: str, upto: int, read: ShareRead) -> int:
    """Non-blank lines in the first ``upto`` bytes (blank .jsonl lines are no records)."""
    records = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if upto <= 0:
                break
            upto -= len(line)
            read.scanned_bytes += len(line)
            records += _is_json_record(line, i == 0)
    return records


def _is_json_record(line: bytes, first: bool) -> bool:
    """Whether a .jsonl line is a record: not blank (after the BOM that may start a file)."""
    return bool((line.removeprefix(_BOM) if first else line).strip(_BLANK))


def _parquet_share(
    dataset: str, files: list[str], field: str, share: int, shares: int, read: ShareRead, limit: int | None = None
) -> Iterator[Record]:
    """The rows of ``files`` (one table) in this share's row range, from the row groups holding
    them; ``limit``: of the first ``limit`` rows only."""
    import pyarrow.parquet as pq

    try:
        opened = [pq.ParquetFile(f) for f in files]
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise DatasetError(f"cannot read dataset {dataset}: {exc}") from None
    rows = sum(p.metadata.num_rows for p in opened)
    lo, hi = _span(rows if limit is None else min(rows, limit), share, shares)
    base = 0  # rows before the current row group
    for name, pf in zip(files, opened):
        has_field = field in pf.schema_arrow.names
        for group in range(pf.num_row_groups):
            meta = pf.metadata.row_group(group)
            start, end = max(lo - base, 0), min(hi - base, meta.num_rows)
            first = base
            base += meta.num_rows
            if start >= end:
                continue
            if not has_field:
                for i in range(start, end):
                    read.records += 1
                    yield Record(first + i, None)
                continue
            read.bytes += sum(
                meta.column(c).total_compressed_size
                for c in range(meta.num_columns)
                if meta.column(c).path_in_schema.split(".")[0] == field
            )
            at = 0  # the batch's first row in the group
            try:
                for batch in pf.iter_batches(row_groups=[group], columns=[field], batch_size=4096):
                    a, b = max(start, at), min(end, at + batch.num_rows)  # rows of the share in this batch
                    for i, value in enumerate(batch.column(0).slice(a - at, max(b - a, 0)).to_pylist()):
                        read.records += 1
                        yield Record(first + a + i, value)
                    at += batch.num_rows
                    if at >= end:
                        break
            except Exception as exc:  # pyarrow raises several kinds for a damaged file
                raise DatasetError(f"reading dataset {dataset} failed in {name}, row group {group}: {exc}") from None
