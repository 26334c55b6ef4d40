"""Compact in-memory sets and maps of block keys, for builds of tens of millions of blocks.

A Python ``set``/``dict`` of 32-byte keys costs ~100-150 bytes per key; a :class:`KeySet` costs
32 bytes per key with ``full_keys`` (8 for ``key64`` plus the other 24 bytes) or 8 without, plus
the bytes of its values. New keys go to a small dict (the *delta*); a full delta is sorted into a
*run* of numpy columns sorted by ``key64``, and runs of similar size are merged (an LSM tree whose
runs stop growing at ``max_run`` keys, so a merge never needs more than ``max_run`` keys of scratch
memory). A lookup binary-searches every run at once for a batch of keys.

With ``full_keys`` a lookup is exact. Without, a run only knows a key's ``key64``: :meth:`candidates`
gives every value whose key shares it, and the caller confirms the full key where it keeps it
(the store writer reads it back from its own index segment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DELTA_KEYS = 1 << 16
MAX_RUN = 1 << 22


@dataclass(slots=True)
class _Run:
    key64: np.ndarray  # [n] uint64, sorted: key bytes 0..8, little-endian
    rest: np.ndarray | None  # [n, 24] uint8: key bytes 8..32 (full_keys only)
    values: np.ndarray | None  # [n] value_dtype

    def __len__(self) -> int:
        return len(self.key64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.key64, self.rest, self.values) if a is not None)


def key64_of(keys: np.ndarray) -> np.ndarray:
    """[n, 32] uint8 keys -> [n] uint64 of their first 8 bytes, little-endian (FORMAT.md's ``key64``).

    Example:
        >>> key64_of(np.frombuffer(bytes([1] + [0] * 31), np.uint8).reshape(1, 32)).tolist()
        [1]
    """
    return np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1).astype(np.uint64, copy=False)


def key_array(keys: Sequence[bytes]) -> np.ndarray:
    """[n, 32] uint8 array of a list of 32-byte keys (one copy)."""
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)


class KeySet:
    """A set of 32-byte keys, or a map from them to integers when ``value_dtype`` is given.

    Example:
        >>> s = KeySet(delta_keys=2)
        >>> s.add([b"a" * 32, b"b" * 32, b"c" * 32])
        >>> s.contains([b"b" * 32, b"z" * 32]).tolist(), len(s)
        ([True, False], 3)
        >>> m = KeySet(full_keys=False, value_dtype=np.uint64)
        >>> m.add([b"a" * 32], np.array([7]))
        >>> m.candidates(b"a" * 32)
        [7]
    """

    def __init__(
        self, full_keys: bool = True, value_dtype: type | None = None, delta_keys: int = DELTA_KEYS, max_run: int = MAX_RUN
    ):
        self.full_keys = full_keys
        self.value_dtype = np.dtype(value_dtype) if value_dtype is not None else None
        self.delta_keys = max(1, delta_keys)
        self.max_run = max(self.delta_keys, max_run)
        self._delta: dict[bytes, int] = {}
        self._runs: list[_Run] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n + len(self._delta)

    @property
    def nbytes(self) -> int:
        """Bytes held by the runs (the delta is at most ``delta_keys`` dict entries on top)."""
        return sum(r.nbytes for r in self._runs)

    def add(self, keys: Sequence[bytes], values: Sequence[int] | np.ndarray | None = None) -> None:
        """Add keys not yet in the set (adding a present key again keeps both rows: don't)."""
        if values is None:
            self._delta.update(dict.fromkeys(keys, 0))
        else:
            self._delta.update(zip(keys, np.asarray(values).tolist()))
        if len(self._delta) >= self.delta_keys:
            self._spill()

    def contains(self, keys: Sequence[bytes]) -> np.ndarray:
        """[n] bool: which keys are in the set (with ``full_keys=False``: which share a ``key64``
        with a key in the set, a superset the caller must confirm)."""
        found = np.fromiter((k in self._delta for k in keys), dtype=bool, count=len(keys))
        if not self._runs or found.all():
            return found
        q = key_array(keys)
        q64, qrest = key64_of(q), q[:, 8:]
        for run in self._runs:
            pos = np.searchsorted(run.key64, q64)
            at = np.minimum(pos, len(run) - 1)
            hit = (pos < len(run)) & (run.key64[at] == q64) & ~found
            if not self.full_keys:
                found |= hit
                continue
            same = hit.copy()
            same[hit] = (run.rest[at[hit]] == qrest[hit]).all(axis=1)
            found |= same
            for i in np.flatnonzero(hit & ~same):  # equal key64, other key: look along the tie (2**-64 rare)
                found[i] = any(r == keys[i] for r in self._tie(run, int(pos[i]), int(q64[i])))
        return found

    def candidates(self, key: bytes) -> list[int]:
        """Values of every row that may be ``key``: the exact one from the delta, else those whose
        ``key64`` (and, with ``full_keys``, whole key) matches."""
        if key in self._delta:
            return [self._delta[key]]
        q64 = int.from_bytes(key[:8], "little")
        out = []
        for run in self._runs:
            pos = int(np.searchsorted(run.key64, np.uint64(q64)))
            for j, full in zip(range(pos, len(run)), self._tie(run, pos, q64)):
                if not self.full_keys or full == key:
                    out.append(int(run.values[j]) if run.values is not None else 0)
        return out

    # ------------------------------------------------------------------ runs

    def _tie(self, run: _Run, pos: int, q64: int):
        """Full keys (or None without ``full_keys``) of the rows from ``pos`` whose key64 is ``q64``."""
        while pos < len(run) and int(run.key64[pos]) == q64:
            yield q64.to_bytes(8, "little") + run.rest[pos].tobytes() if self.full_keys else None
            pos += 1

    def _spill(self) -> None:
        """Sort the delta into a run, then merge the newest runs while they are of similar size."""
        keys = key_array(list(self._delta))
        values = np.fromiter(self._delta.values(), dtype=self.value_dtype, count=len(keys)) if self.value_dtype else None
        self._delta = {}
        k64 = key64_of(keys)
        order = np.argsort(k64, kind="stable")
        rest = np.ascontiguousarray(keys[order, 8:]) if self.full_keys else None
        self._runs.append(_Run(k64[order], rest, values[order] if values is not None else None))
        self._n += len(keys)
        while len(self._runs) > 1 and 2 * len(self._runs[-1]) >= len(self._runs[-2]):
            a, b = self._runs[-2], self._runs[-1]
            if len(a) + len(b) > self.max_run:
                break
            self._runs[-2:] = [_merge(a, b)]


def _merge(a: _Run, b: _Run) -> _Run:
    """One run holding the rows of two, sorted by key64 (``b``'s rows after ``a``'s equal ones).
    Each row is placed once, straight into the new columns: the scratch is one index per row of
    ``b`` and one flag per row."""
    n = len(a) + len(b)
    at = np.searchsorted(a.key64, b.key64, side="right") + np.arange(len(b))  # b's rows in the result
    from_a = np.ones(n, dtype=bool)
    from_a[at] = False

    def put(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        out = np.empty((n, *x.shape[1:]), dtype=x.dtype)
        out[at] = y
        out[from_a] = x
        return out

    return _Run(put(a.key64, b.key64), put(a.rest, b.rest), put(a.values, b.values))
