"""The store side of an export: every stored chain cut into units of ``unit_tokens`` tokens, with
each unit's blocks, its parent unit and (through the target) its key.

Memory: the index's rows (key, parent, location, ~90 bytes a block) plus each block's tokens and
each unit's key; never the KV, which the export reads unit batch by unit batch.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prefixgen.analysis.count import select_blocks
from prefixgen.errors import CorruptBlockError, CorruptStoreError, ExportError
from prefixgen.format import SHARDS_DIR, TORCH_DTYPES, BlockHash, block_crcs, hash_block, read_safetensors_header
from prefixgen.maintain.prune import record_counts
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore


@dataclass(slots=True)
class Blocks:
    """Every stored block once (a key indexed twice counts once), sorted by key."""

    key: np.ndarray  # [n, 32] uint8
    parent: np.ndarray  # [n, 32] uint8: the previous block's key, or the store's root
    depth: np.ndarray  # [n] int64: the block's number in its chain
    shard: np.ndarray  # [n] int64: index into shard_names
    slot: np.ndarray  # [n] int64
    crc: np.ndarray  # [n] uint32
    shard_names: list[str]

    def __len__(self) -> int:
        return len(self.depth)

    def take(self, rows: np.ndarray) -> Blocks:
        rows = np.sort(rows)
        return Blocks(
            self.key[rows],
            self.parent[rows],
            self.depth[rows],
            self.shard[rows],
            self.slot[rows],
            self.crc[rows],
            self.shard_names,
        )

    def locations(self, rows: np.ndarray) -> list[BlockLocation]:
        names = self.shard_names
        return list(
            map(
                BlockLocation,
                [names[s] for s in self.shard[rows].tolist()],
                self.slot[rows].tolist(),
                self.crc[rows].tolist(),
                self.depth[rows].tolist(),
            )
        )


def read_blocks(store: PrefixStore) -> Blocks:
    """Every block the store's index holds, deduplicated."""
    names: dict[str, int] = {}
    parts = []
    for i, seg in enumerate(store.index.segments):
        cols = store.index.columns(i)
        local = np.asarray([names.setdefault(seg.shard_name(j), len(names)) for j in range(len(seg.shards))], dtype=np.int64)
        parts.append(
            (
                np.asarray(cols["key"]),
                np.asarray(cols["parent"]),
                cols["depth"].astype(np.int64),
                local[seg.shard_ids(cols).astype(np.int64)] if len(local) else np.zeros(seg.n, np.int64),
                cols["slot"].astype(np.int64),
                cols["crc"].astype(np.uint32),
            )
        )
    if not parts:
        empty = np.zeros((0, 32), np.uint8)
        return Blocks(empty, empty, *(np.zeros(0, np.int64),) * 3, np.zeros(0, np.uint32), [])
    key, parent, depth, shard, slot, crc = (np.concatenate(c) for c in zip(*parts))
    _, first = np.unique(_void(key), return_index=True)  # sorted by key, one row per key
    return Blocks(key[first], parent[first], depth[first], shard[first], slot[first], crc[first], list(names))


def select(store: PrefixStore, blocks: Blocks, min_records: int | None, max_blocks: int | None) -> Blocks:
    """The blocks that ``build``/``prune`` with the same rule would keep (``select_blocks`` over the
    store's record counts): prefix-closed, so whole chains' heads."""
    key64 = np.ascontiguousarray(blocks.key[:, :8]).view("<u8").reshape(-1)
    records = record_counts(store, key64)
    if not records.any():
        raise ExportError(
            f"{store.path} has no record counts (counts/ is empty): --min-records/--max-bytes have nothing to rank blocks by"
        )
    keep = select_blocks(records, blocks.depth, min_records=min_records or 1, max_blocks=max_blocks, tiebreak=key64)
    return blocks.take(keep)


@dataclass(slots=True)
class Units:
    """Every full unit of every stored chain."""

    blocks: np.ndarray  # [m, k] rows (into Blocks) of each unit's blocks, in chain order
    parent: np.ndarray  # [m] the previous unit of the chain, or -1 for a chain's first unit
    depth: np.ndarray  # [m] the unit's number in its chain

    def __len__(self) -> int:
        return len(self.depth)


def plan_units(blocks: Blocks, root: BlockHash, k: int) -> Units:
    """Cut every chain into units of ``k`` blocks (full units only). A block whose chain has a
    block missing above it (a damaged or partly pruned store) is left out with its descendants:
    its key chain cannot be computed."""
    n = len(blocks)
    if n == 0:
        return Units(np.zeros((0, k), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    keys = _void(blocks.key)
    pos = np.minimum(np.searchsorted(keys, _void(blocks.parent)), max(n - 1, 0))
    par = np.where(keys[pos] == _void(blocks.parent), pos, -1)
    is_root = (blocks.parent == np.frombuffer(root, np.uint8)).all(axis=1)
    # A block is usable when its whole chain up to the root is stored: decide it level by level.
    usable = np.zeros(n, bool)
    order = np.argsort(blocks.depth, kind="stable")
    levels = np.flatnonzero(np.r_[True, np.diff(blocks.depth[order]) != 0, True])
    for a, b in zip(levels[:-1], levels[1:]):
        rows = order[a:b]
        d = int(blocks.depth[rows[0]])
        if d == 0:
            usable[rows] = is_root[rows]
        else:
            p = par[rows]
            usable[rows] = (p >= 0) & usable[np.maximum(p, 0)] & (blocks.depth[np.maximum(p, 0)] == d - 1)
    ends = np.flatnonzero(usable & (blocks.depth % k == k - 1))
    unit_blocks = np.empty((len(ends), k), np.int64)
    cur = ends
    for i in range(k - 1, -1, -1):
        unit_blocks[:, i] = cur
        cur = par[cur]
    unit_of = np.full(n, -1, np.int64)
    unit_of[ends] = np.arange(len(ends))
    parent = np.where(cur >= 0, unit_of[np.maximum(cur, 0)], -1)
    return Units(unit_blocks, parent, blocks.depth[ends] // k)


def read_tokens(store: PrefixStore, blocks: Blocks, rows: np.ndarray) -> np.ndarray:
    """[len(rows), block_size] uint32 tokens of the given blocks, read from their shards' ``tokens``
    tensors (one read per shard), each checked against its key: a key is the hash of its parent
    and its tokens, so a damaged token row is refused rather than exported under a wrong key."""
    bs = store.block_size
    out = np.empty((len(rows), bs), np.uint32)
    shard = blocks.shard[rows]
    for s in np.unique(shard).tolist():
        at = np.flatnonzero(shard == s)
        path = store.path / SHARDS_DIR / blocks.shard_names[s]
        try:
            with open(path, "rb") as f:
                header = read_safetensors_header(f, path)
                a, b = header.tensors["tokens"]["data_offsets"]
                f.seek(header.data_start + a)
                table = np.frombuffer(f.read(b - a), dtype="<u4").reshape(-1, bs)
        except (FileNotFoundError, KeyError, ValueError):
            raise CorruptStoreError(f"{path} is missing or has no tokens; run `prefixgen verify`") from None
        slots = blocks.slot[rows[at]]
        if len(slots) and slots.max() >= len(table):
            raise CorruptStoreError(f"{path} is truncated; run `prefixgen verify`")
        out[at] = table[slots]
    for i, r in enumerate(rows.tolist()):
        if hash_block(blocks.parent[r].tobytes(), out[i].tolist()) != blocks.key[r].tobytes():
            path = store.path / SHARDS_DIR / blocks.shard_names[int(blocks.shard[r])]
            raise CorruptStoreError(
                f"{path}: the tokens of slot {int(blocks.slot[r])} do not match their key; run `prefixgen verify`"
            )
    return out


def unit_keys(units: Units, tokens: Callable[[int], np.ndarray], first_key: Callable[[], Any], next_key: Callable) -> list[Any]:
    """Each unit's key, parents first: ``next_key(parent's key or first_key(), tokens(unit))``."""
    keys: list[Any] = [None] * len(units)
    parent = units.parent.tolist()
    for u in np.argsort(units.depth, kind="stable").tolist():
        p = parent[u]
        keys[u] = next_key(first_key() if p < 0 else keys[p], tokens(u))
    return keys


def _void(a: np.ndarray) -> np.ndarray:
    """[n, 32] uint8 -> [n] 32-byte void scalars (sortable and searchable as one value)."""
    return np.ascontiguousarray(a).view("V32").reshape(-1)


class MappedShards:
    """The store's shards mapped read-only, for an export that writes each unit straight from the page cache:
    a unit's KV is a view of its shard's pages (its blocks' checksums checked first), and the files' writes
    (``prefixgen.export.iov``) copy each byte once, in the kernel. A read into a buffer would copy it once
    more. Native stores only (fp8 KV is dequantized, so read); a unit whose blocks are not consecutive
    slots of one shard is None (the caller reads it)."""

    def __init__(self, store: PrefixStore, blocks: Blocks):
        self.store = store
        self.blocks = blocks
        layout = store.manifest.kv
        self.block_bytes = layout.bytes_per_token * store.block_size
        self.per_token = layout.token_shape  # [L, parts, H, D]: parts 1 for an MLA latent
        self.dtype = TORCH_DTYPES[layout.dtype]
        self._maps: dict[int, tuple[mmap.mmap, int, int]] = {}  # shard -> (map, kv offset, blocks in it)
        self._lock = threading.Lock()

    def unit(self, rows: np.ndarray) -> Any:
        """The KV of the blocks ``rows`` (one unit, in chain order) as ``[blocks * B, L, 2, H, D]``, a view of the
        mapped shard; None when they are not consecutive slots of one shard. Raises CorruptBlockError when a
        block fails its checksum, CorruptStoreError when the shard is missing or truncated."""
        shard = self.blocks.shard[rows]
        slot = self.blocks.slot[rows]
        if (shard != shard[0]).any() or (np.diff(slot) != 1).any():
            return None
        m, offset, count = self._map(int(shard[0]))
        first = int(slot[0])
        path = self.store.path / SHARDS_DIR / self.blocks.shard_names[int(shard[0])]
        if first + len(rows) > count:
            raise CorruptStoreError(f"{path} is truncated; run `prefixgen verify`")
        start = offset + first * self.block_bytes
        view = memoryview(m)[start : start + len(rows) * self.block_bytes]
        crcs = block_crcs(view, self.block_bytes, algorithm=self.store.manifest.block_checksum)
        bad = np.flatnonzero(crcs != self.blocks.crc[rows])
        if len(bad):
            raise CorruptBlockError(
                f"{path}: block at slot {first + int(bad[0])} fails its checksum; the store is damaged "
                "(run `prefixgen verify`, then rebuild the damaged part with `prefixgen build --resume`)",
                block=int(bad[0]),
            )
        with warnings.catch_warnings():  # read-only pages, read-only use: the targets only take views of them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=self.dtype).view(-1, *self.per_token)

    def _map(self, shard: int) -> tuple[mmap.mmap, int, int]:
        with self._lock:
            if shard not in self._maps:
                path = self.store.path / SHARDS_DIR / self.blocks.shard_names[shard]
                try:
                    with open(path, "rb") as f:
                        offset = read_safetensors_header(f, path).offset("kv")
                        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (FileNotFoundError, KeyError, ValueError):
                    raise CorruptStoreError(f"{path} is missing or has no kv; run `prefixgen verify`") from None
                self._maps[shard] = (m, offset, max(0, len(m) - offset) // self.block_bytes)
            return self._maps[shard]

    def close(self) -> None:
        """Unmap the shards (their views must be gone: the files are written)."""
        for m, _, _ in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still referenced somewhere: the map goes with it
                pass
        self._maps.clear()
