"""Write the fixture stores of tests/data/crc32-stores/ with the code on PYTHONPATH (run it with a
prefixgen from before format version 3, whose blocks have zlib CRC-32 checksums):

    mkdir /tmp/old && git archive 6cd8589 prefixgen | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/make_crc32_stores.py tests/data/crc32-stores

Two stores: `native` (float32; a compacted segment from a first writer plus a one-shard segment of
a second writer: format version 2) and `fp8` (one writer: version 1). Every block's KV is
`block_kv(key)` (tests/test_checksum.py recomputes it).
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from prefixgen.format import KVLayout, Manifest, ModelFingerprint, block_keys, root_key
from prefixgen.maintain.compact import compact_store
from prefixgen.store.writer import StoreWriter, prepare_store

BS = 4
SEQUENCES = [list(range(10 * i, 10 * i + 4 * (i + 2))) for i in range(4)]  # 2 to 5 blocks each


def block_kv(key: bytes, layout: KVLayout) -> torch.Tensor:
    """[BS, L, 2, H, D] float32: a function of the block's key."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    shape = (BS, layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def manifest(layout: KVLayout, version: int) -> Manifest:
    fp = ModelFingerprint("m", "A", "a", layout.num_layers, layout.num_kv_heads, layout.head_dim, "22" * 32, "33" * 32)
    return Manifest(BS, fp, layout, root_key(fp.weights_digest).hex(), version)


def write(path: Path, m: Manifest, seqs: list[list[int]], shard_blocks: int) -> None:
    with StoreWriter(path, m, "b", shard_bytes=shard_blocks * m.kv.block_bytes(BS)) as w:
        for s in seqs:
            keys = block_keys(s, BS, m.root_key)
            kv = torch.cat([block_kv(k, m.kv) for k in keys])
            w.add(keys, [m.root_key] + keys[:-1], list(range(len(keys))), np.asarray(s, np.uint32).reshape(-1, BS), kv)


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    native = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32")
    m = prepare_store(out / "native", manifest(native, 2), "new")
    write(out / "native", m, SEQUENCES[:3], shard_blocks=4)
    compact_store(out / "native")
    write(out / "native", m, SEQUENCES[3:], shard_blocks=8)
    fp8 = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32", storage="fp8")
    m = prepare_store(out / "fp8", manifest(fp8, 1), "new")  # as version 1 wrote it
    write(out / "fp8", m, SEQUENCES, shard_blocks=6)
    for p in out.rglob("*"):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()  # empty folders (locks/) do not survive git


if __name__ == "__main__":
    main(Path(sys.argv[1]))
