"""``prefixgen verify``: check every byte a reader relies on, and change nothing.

Checked: the manifest; each index segment; that its shard exists with the recorded size and
checksum; every block's CRC; that every key is the hash of its parent and tokens; that each
parent is stored (or is the root); build and count files parse.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prefixgen.errors import PrefixgenError
from prefixgen.format import (
    BUILDS_DIR,
    SHARDS_DIR,
    ST_DTYPES,
    TMP_SUFFIX,
    Manifest,
    Segment,
    block_crcs,
    hash_block,
    read_safetensors_header,
    shard_checksum,
    shard_tensors,
)
from prefixgen.store.reader import PrefixStore


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


def verify_store(path: str | os.PathLike, progress: bool = False) -> VerifyReport:
    """Check the store at ``path``; never modifies it.

    Example:
        >>> report = verify_store("store")  # doctest: +SKIP
        >>> report.ok, report.blocks  # doctest: +SKIP
        (True, 1234)
    """
    report = VerifyReport()
    path = Path(path)
    try:
        store = PrefixStore.open(path)
    except PrefixgenError as exc:
        report.faults.append(str(exc))
        return report
    manifest = store.manifest
    all_keys: set[bytes] = set()
    parents: list[tuple[str, bytes]] = []
    referenced: set[str] = set()
    for seg in tqdm(store.index.segments, desc="verify", unit="shard", disable=not progress):
        _verify_segment(path, manifest, seg, report, all_keys, parents)
        referenced.add(seg.shard)
    root = manifest.root_key
    unreachable = sum(1 for _, parent in parents if parent != root and parent not in all_keys)
    if unreachable:
        report.faults.append(f"{unreachable} blocks have a parent that is not stored (a segment or shard was removed)")
    for name in sorted(os.listdir(path / SHARDS_DIR)) if (path / SHARDS_DIR).is_dir() else []:
        if name.endswith(TMP_SUFFIX):
            report.notes.append(f"{SHARDS_DIR}/{name}: temporary file of an interrupted writer (ignored by readers)")
        elif name not in referenced:
            report.notes.append(
                f"{SHARDS_DIR}/{name}: shard with no index segment, from an interrupted writer (ignored by readers)"
            )
    for p in sorted((path / BUILDS_DIR).glob("*.json")) + sorted((path / BUILDS_DIR).glob("*/*.json")):
        try:
            json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            report.faults.append(f"{p}: build record is damaged ({exc})")
    try:
        store.count_arrays()
    except (PrefixgenError, OSError, ValueError) as exc:
        report.faults.append(f"record counts are damaged: {exc}")
    return report


def _verify_segment(
    path: Path, manifest: Manifest, seg: Segment, report: VerifyReport, all_keys: set[bytes], parents: list
) -> None:
    layout, bs = manifest.kv, manifest.block_size
    meta = seg.metadata
    shard = path / SHARDS_DIR / seg.shard
    where = f"{SHARDS_DIR}/{seg.shard}"
    try:
        blocks = int(meta["blocks"])
        size = int(meta["shard_bytes"])
        checksum = int(meta["shard_crc32"])
    except (KeyError, ValueError):
        report.faults.append(f"{seg.path}: index segment metadata is missing or damaged")
        return
    if not shard.is_file():
        report.faults.append(f"{where}: missing, but {blocks} indexed blocks live in it")
        return
    if shard.stat().st_size != size:
        report.faults.append(f"{where}: {shard.stat().st_size} bytes, the index recorded {size}")
        return
    try:
        with open(shard, "rb") as f:
            header = read_safetensors_header(f, shard)
            data = f.read()
    except (PrefixgenError, OSError) as exc:
        report.faults.append(f"{where}: {exc}")
        return
    expected = {t.name: (ST_DTYPES[t.dtype], list(t.shape)) for t in shard_tensors(layout, bs, blocks)}
    actual = {k: (v.get("dtype"), v.get("shape")) for k, v in header.tensors.items()}
    if actual != expected:
        report.faults.append(f"{where}: tensors {actual} do not match the manifest's layout {expected}")
        return
    raw_header = _raw_header(shard, header.data_start)

    def tensor(name: str) -> memoryview:
        a, b = header.tensors[name]["data_offsets"]
        return memoryview(data)[a:b]

    scales = tensor("kv_scale") if layout.storage == "fp8" else None
    crcs = block_crcs(tensor("kv"), layout.bytes_per_token * bs, scales, layout.scale_bytes_per_block())
    if shard_checksum(raw_header, crcs) != checksum:
        report.faults.append(f"{where}: checksum mismatch, the file is damaged")
    tokens = np.frombuffer(tensor("tokens"), dtype="<u4").reshape(blocks, bs)
    cols = seg.cols
    bad_crc = bad_key = bad_slot = 0
    for row in range(seg.n):
        slot = int(cols["slot"][row])
        if slot >= blocks:
            bad_slot += 1
            continue
        key, parent = cols["key"][row].tobytes(), cols["parent"][row].tobytes()
        if crcs[slot] != cols["crc"][row]:
            bad_crc += 1
        if hash_block(parent, tokens[slot]) != key:
            bad_key += 1
        all_keys.add(key)
        parents.append((key, parent))
    for count, what in (
        (bad_crc, "fail their CRC (damaged KV)"),
        (bad_key, "have a key that is not the hash of parent and tokens"),
        (bad_slot, "point past the end of the shard"),
    ):
        if count:
            report.faults.append(f"{where}: {count} blocks {what}")
    report.shards += 1
    report.blocks += seg.n


def _raw_header(path: Path, data_start: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(data_start)
