"""Block checksums: CRC-32 (zlib, stores of format versions 1 and 2) and CRC32C (Castagnoli, the
iSCSI CRC of RFC 3720; version 3).

CRC32C is what a CPU computes in hardware (SSE4.2 ``crc32``, ARMv8 ``crc32c``): the ``crc32c``
package does that at 19-24 GB/s per core here against 2.5-3.7 GB/s for ``zlib.crc32`` (BENCHMARKS.md),
on any buffer without a copy and with the GIL released, so the reader's threads check pieces in
parallel. Without the package, :func:`crc32c_rows` computes the same values with numpy (slower,
but correct: tests compare both and the RFC 3720 check value).

Example:
    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

try:
    import crc32c as _crc32c  # hardware CRC32C (pyproject dependency)
except ImportError:  # pragma: no cover - exercised by forcing HARDWARE = False in the tests
    _crc32c = None

CRC32 = "crc32"  # zlib's CRC-32 (IEEE 802.3): block checksums of format versions 1 and 2
CRC32C = "crc32c"  # CRC-32C (Castagnoli): block checksums of format version 3
BLOCK_CHECKSUMS = (CRC32, CRC32C)

# True when the crc32c package (hardware CRC32C) is importable; tests set it False to run the fallback.
HARDWARE = _crc32c is not None

_POLY = 0x82F63B78  # CRC-32C polynomial, bit-reflected
_MASK = 0xFFFFFFFF
_LANE_BYTES = 256  # the numpy fallback cuts each row into lanes of this many bytes, all hashed at once


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C of the bytes of ``data`` (any buffer), continuing from ``value`` as ``zlib.crc32``
    continues (``crc32c(b, crc32c(a)) == crc32c(a + b)``).

    Example:
        >>> crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")
        True
    """
    if HARDWARE:
        # gil_release_mode=1: always release the GIL, so threads checking pieces run in parallel.
        return _crc32c.crc32c(data, value, gil_release_mode=1)
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    return int(crc32c_rows(raw.reshape(1, -1), np.asarray([value], np.uint32))[0])


def checksum_function(algorithm: str) -> Callable[[Any, int], int]:
    """``f(data, value)`` computing ``algorithm`` (``"crc32"`` or ``"crc32c"``) of a buffer,
    continued from ``value``."""
    if algorithm == CRC32:
        return zlib.crc32
    if algorithm == CRC32C:
        return crc32c
    raise ValueError(f"unknown block checksum {algorithm!r} (known: {', '.join(BLOCK_CHECKSUMS)})")


# --------------------------------------------------------------------------- numpy fallback
#
# A CRC register update is linear over GF(2): feeding bytes D into register r gives
# Z_len(D)(r) XOR feed(0, D), where Z_k is the 32x32 bit matrix "feed k zero bytes". So a row is
# cut into lanes of _LANE_BYTES, every lane of every row is hashed from register 0 at once (one
# numpy step per 4 bytes), and lanes are merged pairwise (left lane shifted past the right one by
# Z_len(right)). Zero bytes in front of a row do not change a register that starts at 0, so rows
# are padded in front to a power-of-two count of lanes. The start value enters as Z_len(row).


def _apply(tables: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A 32x32 GF(2) matrix applied to every uint32 of ``r``; ``tables`` [4, 256]: its image of each byte."""
    return tables[0][r & 0xFF] ^ tables[1][(r >> 8) & 0xFF] ^ tables[2][(r >> 16) & 0xFF] ^ tables[3][r >> 24]


def _tables(cols: np.ndarray) -> np.ndarray:
    """[4, 256] byte tables of the matrix whose column ``b`` (image of bit ``b``) is ``cols[b]``."""
    t = np.zeros((4, 256), np.uint32)
    for k in range(4):
        for i in range(8):
            t[k, 1 << i : 2 << i] = t[k, : 1 << i] ^ cols[8 * k + i]
    return t


@lru_cache(maxsize=64)
def _zeros(nbytes: int) -> np.ndarray:
    """[4, 256] tables of Z_nbytes (feed ``nbytes`` zero bytes), by squaring Z_1."""
    if nbytes == 1:
        cols = []
        for b in range(32):
            r = 1 << b
            for _ in range(8):
                r = (r >> 1) ^ (_POLY if r & 1 else 0)
            cols.append(r)
        return _tables(np.asarray(cols, np.uint32))
    low = nbytes & -nbytes  # Z_n = Z_low . Z_(n - low), Z_(2k) = Z_k . Z_k
    a, b = (_zeros(nbytes // 2), _zeros(nbytes // 2)) if low == nbytes else (_zeros(low), _zeros(nbytes - low))
    return _tables(_apply(a, _apply(b, np.uint32(1) << np.arange(32, dtype=np.uint32))))


def crc32c_rows(rows: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """[n] CRC32C of each row of ``rows`` ([n, L] uint8), continued from ``values`` ([n] uint32,
    default 0), with numpy only: the fallback when the ``crc32c`` package is missing.

    Example:
        >>> hex(int(crc32c_rows(np.frombuffer(b"123456789", np.uint8).reshape(1, -1))[0]))
        '0xe3069283'
    """
    n, length = rows.shape
    start = np.zeros(n, np.uint32) if values is None else np.asarray(values, np.uint32)
    # The start register (~value) fed `length` bytes, then XORed with the data's own register.
    out = (_apply(_zeros(length), start ^ np.uint32(_MASK)) if length else start ^ np.uint32(_MASK)).astype(np.uint32)
    if length == 0:
        return out ^ np.uint32(_MASK)
    lane = min(_LANE_BYTES, 1 << max(2, (length - 1).bit_length()))
    lanes = 1 << max(0, (-(-length // lane) - 1).bit_length())
    padded = np.zeros((n, lanes * lane), np.uint8)
    padded[:, lanes * lane - length :] = rows
    words = padded.view("<u4").reshape(n, lanes, lane // 4)
    reg = np.zeros((n, lanes), np.uint32)
    feed4 = _zeros(4)
    for j in range(lane // 4):
        reg = _apply(feed4, reg ^ words[:, :, j])  # 4 bytes into a reflected register: Z_4(r ^ word)
    width = lane
    while reg.shape[1] > 1:
        reg = _apply(_zeros(width), reg[:, 0::2]) ^ reg[:, 1::2]
        width *= 2
    return out ^ reg[:, 0] ^ np.uint32(_MASK)
