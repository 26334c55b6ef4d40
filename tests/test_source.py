"""Share reading (data.source.read_share): each share is about 1/N of a local dataset's bytes, and
the shares together are exactly the records ``read_records`` (datasets streaming) gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from prefixgen.data import source
from prefixgen.data.records import normalize_messages
from prefixgen.data.source import ShareRead, read_records, read_share
from prefixgen.errors import DatasetError

from .conftest import MT_BENCH, REPO

STORIES_JSONL = REPO / "examples" / "stories.jsonl"


@pytest.fixture(params=[source.PIECE, 5], ids=["16MiB-pieces", "5-byte-pieces"])
def piece(request, monkeypatch) -> int:
    """Line ends counted in pieces of this many bytes (5: every \\r\\n and blank line is split
    between pieces somewhere)."""
    monkeypatch.setattr(source, "PIECE", request.param)
    return request.param


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _texts() -> list[str]:
    return [json.loads(line)["text"] for line in _lines(STORIES_JSONL)]


def _same(value, other) -> bool:
    """Equal values; chats compared as the build reads them (after normalize_messages)."""
    if isinstance(value, list):
        return normalize_messages(value, None) == normalize_messages(other, None) is not None
    return value == other


def assert_shares_are_the_records(
    dataset: Path, field: str, worlds=(1, 2, 3, 5, 64), within: bool | None = None, limit: int | None = None
) -> list[list[ShareRead]]:
    """Every share count in ``worlds``: the shares, one after another, are ``read_records``'s
    records (same indices, same values). Numbered within their shares (``local_index``), the same
    records, at the same bytes, with nothing scanned: the records of the shares before plus the
    row is the index (the plan's rule). ``within``: whether ``local_index`` numbers them within
    their shares (default: line files do, parquet rows keep their indices in the dataset).
    ``limit``: of the first ``limit`` records (--limit); line files then scan for the bytes they
    end at, the same bytes in every share. Returns what each share read (numbered in the dataset)."""
    want = list(read_records(str(dataset), field, limit=limit))
    assert want
    lines = not (dataset.is_dir() and any(dataset.glob("*.parquet"))) if within is None else within
    reads = []
    for world in worlds:
        got, world_reads, before, scans = [], [], 0, set()
        for share in range(world):
            read, local_read = ShareRead(), ShareRead()
            records = list(read_share(str(dataset), field, share, world, limit=limit, read=read))
            local = list(read_share(str(dataset), field, share, world, limit=limit, read=local_read, local_index=True))
            offset = before if lines else 0  # parquet rows keep their indices in the dataset
            assert [(r.index + offset, r.value, r.share) for r in local] == [
                (r.index, r.value, share if lines else None) for r in records
            ], (world, share)
            assert (local_read.records, local_read.bytes) == (read.records, read.bytes)
            scans.add(local_read.scanned_bytes)
            got += records
            before += len(records)
            world_reads.append(read)
        assert [r.index for r in got] == [r.index for r in want], world
        assert all(_same(a.value, b.value) for a, b in zip(got, want)), world
        assert sum(r.records for r in world_reads) == len(want)
        assert len(scans) == 1 and (limit is not None and lines or scans == {0}), scans  # each share: the same scan
        reads.append(world_reads)
    return reads


@pytest.mark.parametrize("dataset, field", [(STORIES_JSONL, "text"), (MT_BENCH, "turns")], ids=["stories", "mt-bench"])
def test_jsonl_shares_read_a_third_each(dataset, field):
    (one, three) = assert_shares_are_the_records(dataset, field, worlds=(1, 3))
    size = dataset.stat().st_size
    longest = max(map(len, _lines(dataset)))
    assert one[0].bytes == size and one[0].scanned_bytes == 0
    # Each of 3 shares reads a third of the bytes (and the line across its start); together, once.
    assert all(abs(r.bytes - size / 3) <= longest + 2 for r in three), [r.bytes for r in three]
    assert size <= sum(r.bytes for r in three) <= size + 2 * longest
    # Numbering the records costs a count of the line ends before the share, not a parse.
    assert three[0].scanned_bytes == 0 and 0 < three[1].scanned_bytes < three[2].scanned_bytes < size


def test_a_folder_of_jsonl_files_with_blank_lines_crlf_and_no_final_newline(tmp_path, piece):
    lines = _lines(STORIES_JSONL)
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    # Read in name order: a.jsonl, b.jsonl, sub/c.jsonl.
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(lines[:50]) + b"\n   \n" + b"".join(lines[50:90]))
    (folder / "b.jsonl").write_bytes(b"".join(line.replace(b"\n", b"\r\n") for line in lines[90:170]))
    (folder / "sub" / "c.jsonl").write_bytes(b"\n" + b"".join(lines[170:]).rstrip(b"\n"))  # no final newline
    (folder / "b2.jsonl").write_bytes(b"\xef\xbb\xbf\n" + lines[0])  # a first line holding only the BOM: blank
    reads = assert_shares_are_the_records(folder, "text", worlds=(1, 2, 3, 4, 7, 240, 300))
    texts = _texts()
    assert [r.value for r in read_share(str(folder), "text", 0, 1)] == texts[:170] + texts[:1] + texts[170:]
    size = sum(p.stat().st_size for p in folder.rglob("*.jsonl"))
    assert sum(r.bytes for r in reads[2]) <= size + 2 * max(map(len, lines))


def test_a_chat_folder_without_a_final_newline(tmp_path, piece):
    lines = _lines(MT_BENCH)
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "part-0.jsonl").write_bytes(b"".join(lines[:33]).rstrip(b"\n"))
    (folder / "part-1.jsonl").write_bytes(b"".join(lines[33:]))
    assert_shares_are_the_records(folder, "turns")


def test_text_files_split_lines_as_datasets_does(tmp_path, piece):
    texts = _texts()
    folder = tmp_path / "t"
    folder.mkdir()
    # Blank lines are records; \r\n and a lone \r end lines too (universal newlines); no final newline.
    (folder / "0.txt").write_text("\n".join(texts[:80]) + "\n\n" + "\r\n".join(texts[80:120]) + "\r\n", newline="")
    (folder / "1.txt").write_text(texts[120] + "\r" + texts[121] + "\n" + "\n".join(texts[122:]), newline="")
    (folder / "2.txt").write_text("last line\r", newline="")
    assert_shares_are_the_records(folder, "text", worlds=(1, 2, 3, 6, 250, 700))
    values = [r.value for r in read_share(str(folder), "text", 0, 1)]
    assert "" in values and values[-1] == "last line" and not any("\r" in v for v in values)


def test_parquet_shares_read_their_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: json.loads(line)[k] for k in ("question_id", "turns")} for line in _lines(MT_BENCH)]  # one schema
    folder = tmp_path / "p"
    folder.mkdir()
    for i, part in enumerate((rows[:30], rows[30:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"{i}.parquet", row_group_size=4)
    one, three = assert_shares_are_the_records(folder, "turns", worlds=(1, 3, 4, 80, 100))[:2]
    # Only the field's column, only the row groups holding the share's rows.
    assert one[0].bytes < sum(p.stat().st_size for p in folder.glob("*.parquet"))
    assert all(r.bytes < one[0].bytes / 2 for r in three) and sum(r.bytes for r in three) < 1.3 * one[0].bytes


def test_a_limit_shares_the_bytes_of_its_first_records(tmp_path, piece):
    """--limit N: the first N records, in shares of their bytes (found by a scan of line ends, the
    same in every share); a .txt line may hold records past the limit (a lone \\r ends one)."""
    lines = _lines(STORIES_JSONL)
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(lines[:50]) + b"\n   \n" + b"".join(lines[50:90]))
    (folder / "b.jsonl").write_bytes(b"".join(lines[90:170]).rstrip(b"\n"))
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(_texts()[:40]) + "\n\nx\ry\rz\r\nlast", newline="")  # records 41-43 on one line
    for dataset, field, limit in [(folder, "text", 1), (folder, "text", 70), (folder, "text", 120), (folder, "text", 999),
                                  (texts, "text", 42), (texts, "text", 43), (texts, "text", 45)]:  # fmt: skip
        reads = assert_shares_are_the_records(dataset, field, worlds=(1, 2, 3, 7), limit=limit)
        (whole,) = reads[0]
        if limit < 999:  # bytes after the limit's last record are neither read nor scanned
            assert whole.scanned_bytes == whole.bytes  # the scan stops in the line the limit ends in
            assert whole.bytes < sum(p.stat().st_size for p in ([dataset] if dataset.is_file() else folder.iterdir()))
    # Each of 3 shares reads about a third of the 120 records' bytes.
    reads = assert_shares_are_the_records(folder, "text", worlds=(3,), limit=120)[0]
    assert max(r.records for r in reads) <= 2 * min(r.records for r in reads)


def test_parquet_limits_share_their_first_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t} for t in _texts()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "0.parquet", row_group_size=16)
    for limit in (5, 100, 10_000):
        reads = assert_shares_are_the_records(tmp_path, "text", worlds=(1, 2, 3), limit=limit)
        n = min(limit, len(rows))
        assert [r.records for r in reads[2]] == [n * (i + 1) // 3 - n * i // 3 for i in range(3)]  # row ranges


def test_other_sources_and_limits_read_everything_and_keep_every_nth(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text\n" + "\n".join(f"record {i}" for i in range(10)) + "\n")
    listed = tmp_path / "list.jsonl"  # one JSON list, not lines: datasets reads it whole
    listed.write_text(json.dumps([{"text": f"record {i}"} for i in range(8)], indent=1))
    for dataset, limit, n in [(csv, None, 10), (listed, None, 8), (csv, 7, 7)]:
        for share in range(3):
            read = ShareRead()
            got = list(read_share(str(dataset), "text", share, 3, limit=limit, read=read))
            assert [r.index for r in got] == list(range(share, n, 3))
            assert read.records == n and read.bytes == dataset.stat().st_size


def _csv_and_json_folders(tmp_path: Path, files: int) -> tuple[Path, Path]:
    """``files`` .csv files of stories (one holding no row) and as many .json files (each one JSON
    list) of chats, of uneven sizes."""
    texts, chats = _texts(), [json.loads(line) for line in _lines(MT_BENCH)]
    csvs, jsons = tmp_path / "csv", tmp_path / "json"
    csvs.mkdir()
    jsons.mkdir()
    cut = [0, 3, 3, *(len(texts) * (i + 1) // (files - 2) for i in range(files - 2))]  # file 1: no row
    for i in range(files):
        with open(csvs / f"part-{i:02d}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["text"], *([t] for t in texts[cut[i] : cut[i + 1]])])
        part = chats[len(chats) * i // files : len(chats) * (i + 1) // files]
        (jsons / f"part-{i:02d}.json").write_text(json.dumps(part, indent=1))
    return csvs, jsons


def test_csv_and_json_folders_share_their_files(tmp_path):
    csvs, jsons = _csv_and_json_folders(tmp_path, files=5)
    assert [r.value for r in read_records(str(csvs), "text")] == _texts()
    for folder, field in [(csvs, "text"), (jsons, "turns")]:
        sizes = [p.stat().st_size for p in sorted(folder.iterdir())]
        # Share S reads only its run of files (the first 5 % N shares one more), numbered within it.
        reads = assert_shares_are_the_records(folder, field, worlds=(1, 2, 3, 5), within=True)
        assert [r.bytes for r in reads[1]] == [sum(sizes[:3]), sum(sizes[3:])]
        assert [r.bytes for r in reads[2]] == [sum(sizes[:2]), sum(sizes[2:4]), sizes[4]]
        assert [r.scanned_bytes for r in reads[2]] == [0, sum(sizes[:2]), sum(sizes[:4])]  # numbered in the dataset
        assert sum(r.records for r in reads[3]) == len(list(read_records(str(folder), field)))
        # Fewer files than shares: every share reads everything and keeps every 6th record.
        n = len(list(read_records(str(folder), field)))
        for share in (0, 5):
            read = ShareRead()
            got = list(read_share(str(folder), field, share, 6, read=read, local_index=True))
            assert [(r.index, r.share) for r in got] == [(i, None) for i in range(share, n, 6)]
            assert (read.records, read.bytes) == (n, sum(sizes))


def test_a_damaged_line_or_a_missing_dataset_is_a_dataset_error(tmp_path):
    lines = _lines(STORIES_JSONL)
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(lines[:30]) + b'{"text": "cut off\n' + b"".join(lines[30:40]))
    assert len(list(read_share(str(data), "text", 0, 2))) < 30  # the damage is in the second half
    with pytest.raises(DatasetError, match=r"failed at record 30 \(.*d\.jsonl, byte \d+\)"):
        list(read_share(str(data), "text", 1, 2))
    # Numbered within the share (no scan before it), the message names the record so, and the byte.
    first = len(list(read_share(str(data), "text", 0, 2)))
    with pytest.raises(DatasetError, match=rf"failed at record {30 - first} of share 1 \(.*d\.jsonl, byte \d+\)"):
        list(read_share(str(data), "text", 1, 2, local_index=True))
    with pytest.raises(DatasetError, match="does not exist"):
        read_share(str(tmp_path / "missing.jsonl"), "text", 0, 2)
    with pytest.raises(ValueError, match="not in 0..1"):
        list(read_share(str(data), "text", 2, 2))
