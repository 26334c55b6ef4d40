"""The export folder: its manifest (which store, model and target parameters its files are for),
its lock, and the file writes (temporary name, then rename).

An engine decides a hit by whether a file with the key's name exists, and checks nothing inside
it: files of another model, block size, dtype or target parameters under the same names would be
served as wrong KV. So a folder holds the export of one model and one set of target parameters,
recorded in ``prefixgen-export.json``; an export that differs in any of them is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from prefixgen.errors import ExportError
from prefixgen.export.iov import Piece, write_pieces
from prefixgen.format import atomic_write, fsync_dir
from prefixgen.store.reader import PrefixStore

EXPORT_MANIFEST = "prefixgen-export.json"
LOCK_FILE = ".prefixgen-export.lock"
TMP_SUFFIX = ".prefixgen.tmp"
EXPORT_FORMAT = 1


@dataclass(slots=True)
class ExportRecord:
    """What ``prefixgen-export.json`` says. ``identity()`` must match for two exports to share a folder."""

    target: str
    params: dict[str, Any]
    block_size: int
    kv: dict[str, Any]
    model: dict[str, Any]
    sources: list[dict[str, Any]] = field(default_factory=list)
    format: int = EXPORT_FORMAT

    @classmethod
    def of(cls, store: PrefixStore, target: Any) -> ExportRecord:
        m = store.manifest
        model = {name: getattr(m.model, name) for name in m.model.IDENTITY_FIELDS}
        source = {"store": str(store.path.resolve()), "root": m.root, "created_at": m.created_at}
        return cls(
            target=str(getattr(target, "name", type(target).__name__)),
            params=_params(target),
            block_size=m.block_size,
            kv={
                "num_layers": m.kv.num_layers,
                "num_kv_heads": m.kv.num_kv_heads,
                "head_dim": m.kv.head_dim,
                "dtype": m.kv.dtype,
                "storage": m.kv.storage,
            },
            model=model,
            sources=[source],
        )

    def identity(self) -> dict[str, Any]:
        return {"target": self.target, "params": self.params, "block_size": self.block_size, "kv": self.kv, "model": self.model}

    def differences(self, other: ExportRecord) -> list[str]:
        """``what: folder has X, store has Y`` for each identity value that differs."""
        out = []
        for group, mine in self.identity().items():
            theirs = other.identity()[group]
            if isinstance(mine, dict) and isinstance(theirs, dict):
                for name in sorted(set(mine) | set(theirs)):
                    if mine.get(name) != theirs.get(name):
                        out.append(f"{group}.{name}: folder has {mine.get(name)!r}, this export has {theirs.get(name)!r}")
            elif mine != theirs:
                out.append(f"{group}: folder has {mine!r}, this export has {theirs!r}")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def _params(target: Any) -> dict[str, Any]:
    """A target's parameters: its dataclass fields (JSON-able values)."""
    if is_dataclass(target):
        values = asdict(target)
    else:
        values = dict(getattr(target, "params", {}) or {})
    return json.loads(json.dumps(values, default=str))


class ExportDir:
    """An export folder opened for writing: locked (one export at a time), its manifest checked
    against this export's and written (or extended with this store) before any file."""

    def __init__(self, path: Path, record: ExportRecord, append: bool, fsync: bool):
        self.path = path
        self.fsync = fsync
        self._dirs = {path}  # folders known to exist
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ExportError(f"another export is writing into {path}; wait for it to finish") from None
        try:
            self._open(record, append)
        except BaseException:
            self.close()
            raise

    def _open(self, record: ExportRecord, append: bool) -> None:
        mpath = self.path / EXPORT_MANIFEST
        if mpath.is_file():
            try:
                old = ExportRecord(**json.loads(mpath.read_text()))
            except (json.JSONDecodeError, TypeError, OSError) as exc:
                raise ExportError(f"{mpath} is damaged ({exc}): export into a new folder") from None
            problems = old.differences(record)
            if problems:
                raise ExportError(
                    f"{self.path} holds an export of another model or with other parameters; its files would be "
                    "served for this one's. Export into another folder. Differences:\n  " + "\n  ".join(problems)
                )
            src = record.sources[0]
            if any(s.get("store") == src["store"] and s.get("root") == src["root"] for s in old.sources):
                pass  # this store into this folder again: resume, writing only the missing files
            elif not append:
                stores = ", ".join(str(s.get("store")) for s in old.sources)
                raise ExportError(f"{self.path} holds the export of {stores}; pass --append to add {src['store']} to it")
            else:
                old.sources.append(src)
                atomic_write(mpath, [old.to_json().encode()], self.fsync)
        else:
            others = [n for n in os.listdir(self.path) if n != LOCK_FILE and not n.endswith(TMP_SUFFIX)]
            if others and not append:
                raise ExportError(
                    f"{self.path} is not empty and holds no prefixgen export: choose a new or empty folder "
                    "(or pass --append to add to the files there)"
                )
            atomic_write(mpath, [record.to_json().encode()], self.fsync)
        # Leftovers of a killed export (we hold the lock: no one writes them), in nested folders too (vLLM's).
        for folder, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    Path(folder, name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path / name)

    def write(self, name: str, data: Piece | Sequence[Piece]) -> int:
        """Write one file under a temporary name, then rename it: an engine never sees half a file.
        ``data``: bytes, or an array (written in C order whatever its strides), or a list of them."""
        path = self.path / name
        tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
        if path.parent not in self._dirs:  # nested names (vLLM's <hhh>/<hh>_g0/): each folder made once
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        pieces = data if isinstance(data, list | tuple) else [data]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = write_pieces(fd, pieces)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return written

    def close(self) -> None:
        if self.fsync and not self._lock.closed:
            for folder in sorted(self._dirs, key=lambda d: len(d.parts), reverse=True):  # renames in nested folders too
                fsync_dir(folder)
        if not self._lock.closed:
            self._lock.close()  # releases the flock
