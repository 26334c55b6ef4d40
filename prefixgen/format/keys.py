"""Block keys: the chained SHA-256 that names every block-aligned prefix, its root, and the key64 sort key.

Example:
    >>> root = root_key("00" * 32)
    >>> keys = block_keys(list(range(32)), block_size=16, root=root)
    >>> len(keys), len(keys[0])
    (2, 32)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NewType

import numpy as np

HASH_ALGORITHM = "sha256-chain-v1"
ROOT_DOMAIN = b"prefixgen-root-v1\x00"

BlockHash = NewType("BlockHash", bytes)
"""32 raw bytes of SHA-256: the key of one block, chained over every block before it."""


def root_key(weights_digest: str) -> BlockHash:
    """The parent of block 0: derived from the model's weights digest, so stores of different
    models never share a key.

    Example:
        >>> root_key("ab" * 32).hex()[:8]
        'a6380d81'
    """
    return BlockHash(hashlib.sha256(ROOT_DOMAIN + bytes.fromhex(weights_digest)).digest())


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """SHA-256 over the parent's 32 bytes followed by the block's token ids as little-endian uint32.

    Example:
        >>> hash_block(BlockHash(bytes(32)), [1, 2, 3]).hex()[:8]
        '3db346a4'
    """
    data = np.asarray(tokens, dtype="<u4").tobytes()
    return BlockHash(hashlib.sha256(parent + data).digest())


def block_keys(tokens: Sequence[int], block_size: int, root: BlockHash) -> list[BlockHash]:
    """Keys of every full block of ``tokens`` (a trailing partial block has none).

    Example:
        >>> len(block_keys(list(range(40)), 16, root_key("00" * 32)))
        2
    """
    data = np.asarray(
        tokens, dtype="<u4"
    ).tobytes()  # slicing bytes is cheaper than slicing the array: a server hashes per request
    step = block_size * 4
    keys: list[BlockHash] = []
    parent = root
    for start in range(0, len(data) - step + 1, step):
        parent = BlockHash(hashlib.sha256(parent + data[start : start + step]).digest())
        keys.append(parent)
    return keys


def key64(key: bytes) -> int:
    """The first 8 bytes of a key as a little-endian uint64: the sort key of index segments."""
    return int.from_bytes(key[:8], "little")
