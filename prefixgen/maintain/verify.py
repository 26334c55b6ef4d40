"""``prefixgen verify``: check every byte a reader relies on, and change nothing.

Checked: the manifest; each index segment (its column checksums, that ``key64`` is the first
8 bytes of ``key`` and sorted, that every row points into its shard); that each shard exists with
the recorded size; that each parent is stored (or is the root); build and count files parse.
Unless ``quick``: each shard's checksum, every block's CRC, and that every key is the hash of its
parent and tokens (this reads every KV byte).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prefixgen.errors import MissingStateError, PrefixgenError
from prefixgen.format import (
    BUILDS_DIR,
    INDEX_DIR,
    MANIFEST_FILE,
    SHARDS_DIR,
    ST_DTYPES,
    TMP_SUFFIX,
    Manifest,
    SafetensorsHeader,
    Segment,
    ShardRef,
    block_checksums,
    hash_block,
    read_safetensors_header,
    shard_checksum,
    shard_tensors,
)
from prefixgen.maintain.buckets import KeyBuckets
from prefixgen.store.reader import PrefixStore
from prefixgen.store.states import STATES_DIR, read_state_file


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` found. ``ok`` is False if any fault was found; notes are harmless."""

    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults


def verify_store(path: str | os.PathLike, progress: bool = False, quick: bool = False) -> VerifyReport:
    """Check the store at ``path``; never modifies it. ``quick`` checks structure and index
    without reading the KV bytes.

    Example:
        >>> report = verify_store("store")  # doctest: +SKIP
        >>> report.ok, report.blocks  # doctest: +SKIP
        (True, 1234)
    """
    report = VerifyReport()
    path = Path(path)
    store, manifest = _open(path, report)
    if manifest is None:
        return report
    referenced, temps = _verify_index(path, manifest, report, quick, progress)
    for name in sorted(temps & set(_index_names(path))):
        report.notes.append(f"{INDEX_DIR}/{name}: temporary file of an interrupted writer (ignored by readers)")
    _verify_shard_files(path, referenced, report)
    _verify_states(path, report, quick)
    _verify_records(path, store, report)
    return report


def _open(path: Path, report: VerifyReport) -> tuple[PrefixStore | None, Manifest | None]:
    """(the store, its manifest); a damaged index segment is a fault and leaves (None, the manifest) to check the
    rest anyway, a store without a readable manifest (None, None)."""
    try:
        store = PrefixStore.open(path)
        return store, store.manifest
    except PrefixgenError as exc:
        report.faults.append(str(exc))
    try:
        return None, Manifest.from_json((path / MANIFEST_FILE).read_text(), path / MANIFEST_FILE)
    except (PrefixgenError, OSError):
        return None, None


def _verify_index(path: Path, manifest: Manifest, report: VerifyReport, quick: bool, progress: bool) -> tuple[set[str], set[str]]:
    """Check every index segment, the shards its rows point into, and that every parent is stored: (the shards the
    segments name, the temporary files seen in ``index/``)."""
    parents = _Parents()
    referenced: set[str] = set()
    # A compaction or prune beside us renames its new segment in before it unlinks the segments it
    # replaces: a segment that vanishes has its rows in a name the next listing shows, so we list
    # again and check the new names too (a healthy store verifies clean beside a compaction).
    done: set[str] = set()
    temps: set[str] = set()
    with parents, tqdm(desc="verify", unit="shard", disable=not progress) as bar:
        while todo := [n for n in _index_names(path) if n not in done]:
            for name in todo:
                done.add(name)
                if name.endswith(TMP_SUFFIX):
                    temps.add(name)
                elif name.endswith(".safetensors"):
                    try:
                        seg = Segment(path / INDEX_DIR / name)
                        _verify_segment(path, manifest, seg, report, parents, referenced, quick, bar)
                    except FileNotFoundError:
                        continue  # merged away: its rows are in a segment the next listing shows
                    except (PrefixgenError, OSError) as exc:
                        report.faults.append(f"{INDEX_DIR}/{name}: {exc}")
        parents.check(manifest, report)
    return referenced, temps


def _verify_shard_files(path: Path, referenced: set[str], report: VerifyReport) -> None:
    """Notes for the files in ``shards/`` no segment names (``referenced``): an interrupted writer's."""
    for name in sorted(os.listdir(path / SHARDS_DIR)) if (path / SHARDS_DIR).is_dir() else []:
        if name.endswith(TMP_SUFFIX):
            report.notes.append(f"{SHARDS_DIR}/{name}: temporary file of an interrupted writer (ignored by readers)")
        elif name not in referenced:
            report.notes.append(
                f"{SHARDS_DIR}/{name}: shard with no index segment, from an interrupted writer (ignored by readers)"
            )


def _verify_states(path: Path, report: VerifyReport, quick: bool) -> None:
    """A hybrid model's recurrent states (FORMAT.md, "Recurrent states"): each file read and checked (not ``quick``)."""
    for name in sorted(os.listdir(path / STATES_DIR)) if (path / STATES_DIR).is_dir() else []:
        if name.endswith(TMP_SUFFIX):
            report.notes.append(f"{STATES_DIR}/{name}: temporary file of an interrupted writer (ignored by readers)")
        elif name.startswith(".gc-"):
            report.notes.append(f"{STATES_DIR}/{name}: moved aside by a gc or prune that was stopped (ignored by readers)")
        elif not quick:
            try:
                read_state_file(path / STATES_DIR / name)
            except MissingStateError:  # listed, then removed (or moved aside) by a gc or prune: nothing to check
                report.notes.append(f"{STATES_DIR}/{name}: removed while verify ran (a gc or prune), skipped")
            except PrefixgenError as exc:
                report.faults.append(str(exc))


def _verify_records(path: Path, store: PrefixStore | None, report: VerifyReport) -> None:
    """Build records parse; record counts (``counts/``) are whole (with a readable index: ``store``)."""
    for p in sorted((path / BUILDS_DIR).glob("*.json")) + sorted((path / BUILDS_DIR).glob("*/*.json")):
        try:
            json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            report.faults.append(f"{p}: build record is damaged ({exc})")
    if store is not None:
        try:
            store.check_counts()
        except (PrefixgenError, OSError, ValueError) as exc:
            report.faults.append(f"record counts are damaged: {exc}")


def _index_names(path: Path) -> list[str]:
    return sorted(os.listdir(path / INDEX_DIR)) if (path / INDEX_DIR).is_dir() else []


def _verify_segment(
    path: Path,
    manifest: Manifest,
    seg: Segment,
    report: VerifyReport,
    parents: _Parents,
    referenced: set[str],
    quick: bool,
    bar: tqdm,
) -> None:
    """Check one segment a piece at a time (``Segment.chunks``): memory grows with a piece and the
    segment's shard list, not with its rows."""
    where = f"{INDEX_DIR}/{seg.path.name}"
    nshards = len(seg.shards)
    blocks = np.asarray([ref.blocks for ref in seg.shards], np.int64)
    rows_in = np.zeros(nshards, np.int64)  # index rows pointing into each shard
    past = np.zeros(nshards, np.int64)  # of which beyond the shard's end
    mismatch, unsorted, last, beyond = 0, False, None, False
    try:
        bad = seg.verify_checksums()
        if bad:
            report.faults.append(f"{where}: index segment fails its checksum (columns {', '.join(bad)}): it is damaged")
            return
        for _, cols in seg.chunks():
            k64 = cols["key64"]
            first8 = np.ascontiguousarray(cols["key"][:, :8]).view("<u8").reshape(-1)
            mismatch += int(np.count_nonzero(k64 != first8))
            if len(k64):
                unsorted |= (last is not None and k64[0] < last) or bool(np.any(k64[1:] < k64[:-1]))
                last = k64[-1]
            parents.add(first8, np.ascontiguousarray(cols["parent"][:, :8]).view("<u8").reshape(-1))
            ids = _shard_ids(cols)
            ok = ids < nshards
            beyond |= not ok.all()
            ids, slots = ids[ok].astype(np.int64), cols["slot"][ok].astype(np.int64)
            rows_in += np.bincount(ids, minlength=nshards)
            past += np.bincount(ids[slots >= blocks[ids]], minlength=nshards)
    except FileNotFoundError:
        raise  # merged away by a compaction: the caller checks its replacement
    except (PrefixgenError, OSError) as exc:
        report.faults.append(f"{where}: {exc}")
        return
    if mismatch > 0:
        report.faults.append(f"{where}: {mismatch} rows have a key64 that is not the first 8 bytes of their key")
    if unsorted:
        report.faults.append(f"{where}: key64 is not sorted, so lookups miss blocks")
    if beyond:
        report.faults.append(f"{where}: rows name shards beyond its list of {nshards}")
        return
    groups = _ShardRows(seg, rows_in)
    for i, ref in enumerate(seg.shards):
        if ref.name not in referenced:
            referenced.add(ref.name)
            report.shards += 1
        if not (path / SHARDS_DIR / ref.name).is_file() and not seg.path.exists():
            raise FileNotFoundError(seg.path)  # a prune replaced the segment, then removed the shard: check the new one
        _verify_shard(path, manifest, ref, int(rows_in[i]), int(past[i]), lambda i=i: groups.rows(i), report, quick)
        bar.update(1)
    report.blocks += seg.n


def _shard_ids(cols: dict[str, np.ndarray]) -> np.ndarray:
    """[rows] each row's index into its segment's shard list (0 in a one-shard segment)."""
    return cols["shard"] if "shard" in cols else np.zeros(len(cols["key64"]), np.uint32)


class _ShardRows:
    """The index rows of each shard of a segment, for the full check: read for consecutive shards
    together, up to GROUP_ROWS rows at a time, with one pass over the segment per group (a compacted
    segment's rows of one shard are spread over all of it). The rows of a shard are in segment order."""

    GROUP_ROWS = 1 << 16  # ~5 MiB of rows (key, parent, slot, crc) in memory at once

    def __init__(self, seg: Segment, rows_in: np.ndarray):
        self.seg, self.rows_in = seg, rows_in
        self.lo, self.hi = 0, 0  # shards lo .. hi-1 are held
        self.held: dict[int, dict[str, np.ndarray]] = {}

    def rows(self, i: int) -> dict[str, np.ndarray]:
        if not self.lo <= i < self.hi:
            self._read(i)
        return self.held[i]

    def _read(self, lo: int) -> None:
        cum = np.cumsum(self.rows_in[lo:])
        hi = lo + max(1, int(np.searchsorted(cum, self.GROUP_ROWS, "right")))
        parts: list[dict[str, np.ndarray]] = []
        self.held = {}
        for _, cols in self.seg.chunks():
            ids = _shard_ids(cols)
            m = (ids >= lo) & (ids < hi)
            if m.any():
                parts.append({"id": ids[m], **{c: cols[c][m] for c in ("slot", "crc", "key", "parent")}})
        names = ("id", "slot", "crc", "key", "parent")
        empty = {"id": (np.uint32, ()), "slot": (np.uint32, ()), "crc": (np.uint32, ()), "key": (np.uint8, (32,))}
        empty["parent"] = empty["key"]
        ids = np.concatenate([p["id"] for p in parts]) if parts else np.zeros(0, np.uint32)
        order = np.argsort(ids, kind="stable")
        bounds = np.searchsorted(ids[order], np.arange(lo, hi + 1))
        got = {}
        for c in names[1:]:  # one column at a time, its pieces freed as it is sorted
            col = np.concatenate([p.pop(c) for p in parts]) if parts else np.zeros((0, *empty[c][1]), empty[c][0])
            got[c] = col[order]
            del col
        for j in range(lo, hi):  # views of the sorted columns
            self.held[j] = {c: got[c][bounds[j - lo] : bounds[j - lo + 1]] for c in names[1:]}
        self.lo, self.hi = lo, hi


def _verify_shard(
    path: Path, manifest: Manifest, ref: ShardRef, n_rows: int, past: int, get_rows, report: VerifyReport, quick: bool
) -> None:
    """Check one shard, which ``n_rows`` index rows point into (``past`` of them beyond its end);
    ``get_rows()`` gives those rows' columns (read only for the full check)."""
    layout, bs = manifest.kv, manifest.block_size
    shard = path / SHARDS_DIR / ref.name
    where = f"{SHARDS_DIR}/{ref.name}"
    if min(ref.blocks, ref.bytes) < 0 or not ref.name:
        report.faults.append(f"{where}: index segment metadata is missing or damaged")
        return
    if not shard.is_file():
        report.faults.append(f"{where}: missing, but {n_rows} indexed blocks live in it")
        return
    if shard.stat().st_size != ref.bytes:
        report.faults.append(f"{where}: {shard.stat().st_size} bytes, the index recorded {ref.bytes}")
        return
    if past > 0:
        report.faults.append(f"{where}: {past} blocks point past the end of the shard")
        return
    try:
        with open(shard, "rb") as f:
            header = read_safetensors_header(f, shard)
            data = b"" if quick else f.read()
    except (PrefixgenError, OSError) as exc:
        report.faults.append(f"{where}: {exc}")
        return
    expected = {t.name: (ST_DTYPES[t.dtype], list(t.shape)) for t in shard_tensors(layout, bs, ref.blocks)}
    actual = {k: (v.get("dtype"), v.get("shape")) for k, v in header.tensors.items()}
    if actual != expected:
        report.faults.append(f"{where}: tensors {actual} do not match the manifest's layout {expected}")
        return
    if not quick:
        _verify_blocks(where, shard, manifest, ref, header, data, get_rows(), report)


def _verify_blocks(
    where: str,
    shard: Path,
    manifest: Manifest,
    ref: ShardRef,
    header: SafetensorsHeader,
    data: bytes,
    rows: dict[str, np.ndarray],
    report: VerifyReport,
) -> None:
    """The full check of one shard's bytes (``data``, its tensors after ``header``): each block's (and head's) CRC,
    the shard's checksum, and each index row's (``rows``) key against the hash of its parent and tokens."""
    layout, bs = manifest.kv, manifest.block_size

    def tensor(name: str) -> memoryview:
        a, b = header.tensors[name]["data_offsets"]
        return memoryview(data)[a:b]

    scales = tensor("kv_scale") if layout.storage == "fp8" else None
    crcs, heads = block_checksums(tensor("kv"), scales, layout, bs, manifest.block_checksum)
    if heads is not None and (
        bad_heads := int(np.count_nonzero(heads != np.frombuffer(tensor("head_crc"), "<u4").reshape(heads.shape)))
    ):
        # A head's bytes or its stored head_crc: a tensor-parallel reader of that head finds it damaged.
        report.faults.append(f"{where}: {bad_heads} block heads fail their head_crc (damaged KV or head_crc)")
    if shard_checksum(_raw_header(shard, header.data_start), crcs) != ref.crc32:
        report.faults.append(f"{where}: checksum mismatch, the file is damaged")
    tokens = np.frombuffer(tensor("tokens"), dtype="<u4").reshape(ref.blocks, bs)
    slots = rows["slot"].astype(np.int64)
    bad_crc = int(np.count_nonzero(crcs[slots] != rows["crc"]))
    bad_key = sum(
        hash_block(parent.tobytes(), tokens[slot]) != key.tobytes()
        for key, parent, slot in zip(rows["key"], rows["parent"], slots)
    )
    for count, what in (
        (bad_crc, "fail their CRC (damaged KV)"),
        (bad_key, "have a key that is not the hash of parent and tokens"),
    ):
        if count:
            report.faults.append(f"{where}: {count} blocks {what}")


class _Parents:
    """Every parent is stored or is the root (compared by key64: a false match is ~2**-64 likely).
    Stored keys and parents are spilled by bucket (``KeyBuckets``) and compared a bucket at a time."""

    def __init__(self):
        self.keys = KeyBuckets("<u8")
        self.parents = KeyBuckets("<u8")
        self.any = False

    def __enter__(self) -> _Parents:
        return self

    def __exit__(self, *exc) -> None:
        self.keys.close()
        self.parents.close()

    def add(self, keys64: np.ndarray, parents64: np.ndarray) -> None:
        self.any = True
        self.keys.add(keys64)
        self.parents.add(parents64)

    def check(self, manifest: Manifest, report: VerifyReport) -> None:
        if not self.any:
            return
        root = np.frombuffer(manifest.root_key[:8], dtype="<u8")[0]
        orphans = 0
        for b in range(self.keys.count):
            stored = np.unique(self.keys.bucket(b))
            parents = self.parents.bucket(b)
            if not len(stored):
                orphans += int(np.count_nonzero(parents != root))
                continue
            pos = np.minimum(np.searchsorted(stored, parents), len(stored) - 1)
            orphans += int(np.count_nonzero((stored[pos] != parents) & (parents != root)))
        if orphans:
            report.faults.append(f"{orphans} blocks have a parent that is not stored (a segment or shard was removed)")


def _raw_header(path: Path, data_start: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(data_start)
