"""Canonical CBOR (RFC 8949 4.2.1) of the few types the engines' ``sha256_cbor`` block hashes take: the
bytes ``cbor2.dumps(obj, canonical=True)`` gives, without depending on cbor2. Shared by the vLLM and LMCache
export targets."""

from __future__ import annotations

from typing import Any

from prefixgen.errors import ExportError


def cbor_head(major: int, n: int) -> bytes:
    """A CBOR item head with the shortest argument (canonical CBOR, RFC 8949 4.2.1)."""
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ExportError(f"{n} does not fit a CBOR integer")


def cbor(obj: Any) -> bytes:
    """``cbor2.dumps(obj, canonical=True)`` for what vLLM and LMCache hash: None, non-negative ints, str, bytes, tuples."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, int):
        return cbor_head(0, obj)
    if isinstance(obj, bytes):
        return cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        data = obj.encode()
        return cbor_head(3, len(data)) + data
    return cbor_head(4, len(obj)) + b"".join(cbor(x) for x in obj)
