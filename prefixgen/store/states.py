"""Recurrent states of a hybrid model's store (Gated DeltaNet, Mamba2): one file per stored boundary.

A state is per sequence, not per token, so it does not fit the shards' token rows: the state after
block ``i`` of a prefix lives in ``states/<hex of block i's key>.safetensors`` (FORMAT.md, "Recurrent
states"), with two tensors over the model's recurrent layers in layer order:

- ``conv`` ``[R, channels, kernel - 1]``: the causal convolution's last ``kernel - 1`` inputs (the
  only ones the next token's convolution reads; vLLM's conv state);
- ``ssm`` ``[R, heads, a, b]``: the SSM / delta-rule state, in the dtype the model keeps it in
  (float32 for Gated DeltaNet in transformers, whatever the model's dtype).

A block's key names its whole prefix, so a state file is written once (:func:`create_once`) and never
changes; a file whose block is not in the index (a build that stopped before its shard was
committed, a pruned block) is never read: readers look states up only for blocks the index holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prefixgen.checksum import crc32c
from prefixgen.errors import CorruptStoreError, MissingStateError
from prefixgen.format import BlockHash, create_once

STATES_DIR = "states"
STATE_SUFFIX = ".safetensors"


def state_path(store: Path, key: BlockHash) -> Path:
    """Where the state after the block ``key`` is kept."""
    return Path(store) / STATES_DIR / f"{bytes(key).hex()}{STATE_SUFFIX}"


def _crc(conv: torch.Tensor, ssm: torch.Tensor) -> int:
    value = 0
    for t in (conv, ssm):
        value = crc32c(t.contiguous().view(torch.uint8).reshape(-1).numpy(), value)
    return value


def write_state(
    store: Path,
    key: BlockHash,
    tokens: int,
    conv: torch.Tensor,
    ssm: torch.Tensor,
    fsync: bool = True,
    owner: str | None = None,
) -> bool:
    """Keep the state after ``tokens`` tokens (block ``key``'s end): ``conv`` ``[R, channels, kernel - 1]``,
    ``ssm`` ``[R, ...]``. False if it was there already (another build wrote the same prefix's state).
    ``owner``: the writer whose temporary file it is while written (gc removes it if that writer dies)."""
    conv, ssm = conv.detach().to("cpu").contiguous(), ssm.detach().to("cpu").contiguous()
    metadata = {"tokens": str(tokens), "crc32c": str(_crc(conv, ssm))}
    path = state_path(store, key)
    path.parent.mkdir(exist_ok=True)
    return create_once(path, [st_save({"conv": conv, "ssm": ssm}, metadata=metadata)], fsync=fsync, owner=owner)


def last_state(store: Path, keys: Sequence[BlockHash]) -> int:
    """Blocks of ``keys`` up to the last one with a stored state (0 if none): how far a prefix of a hybrid
    model can be served, since its recurrent layers continue only from a stored state. Looks from the
    end, one file at a time: a state is kept at least every stride, so a few looks find it."""
    return next((i + 1 for i in range(len(keys) - 1, -1, -1) if state_path(store, keys[i]).exists()), 0)


def read_state(store: Path, key: BlockHash, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv, ssm) after the block ``key``, checked against its CRC32C and the ``tokens`` it must follow."""
    return read_state_file(state_path(store, key), tokens)


def read_state_file(path: Path, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv, ssm) of the state file ``path``, checked against its CRC32C (and ``tokens``, if given). Raises
    ``MissingStateError`` (a ``CorruptStoreError``) where the file is gone."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingStateError(f"{path}: the recurrent state is missing ({exc})") from None
    try:
        tensors = st_load(data)
        header_len = int(np.frombuffer(data[:8], dtype="<u8")[0])
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        conv, ssm = tensors["conv"], tensors["ssm"]
        ok = int(metadata["tokens"]) == (tokens or int(metadata["tokens"])) and int(metadata["crc32c"]) == _crc(conv, ssm)
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: the recurrent state is damaged ({exc})") from None
    except Exception as exc:  # safetensors' own errors for a truncated or garbled file
        raise CorruptStoreError(f"{path}: the recurrent state is damaged ({exc})") from None
    if not ok:
        raise CorruptStoreError(f"{path}: the recurrent state fails its checksum or is not of a {tokens}-token prefix")
    return conv, ssm
