"""The recurrent half of an export: a hybrid model's stored states (``prefixgen/store/states.py``) as the
files a target's engine keeps them in, beside the attention KV the framework writes unit by unit.

An engine keeps one state per cached prefix end, not per token: SGLang's HiCache keeps the state after a
page under that page's key (``PoolName.MAMBA``, hit policy ``TRAILING_PAGES``: a prefix is restorable up to
a page whose state file exists). So a unit gets a state file when its last block has a stored state (the
build keeps one every ``state_stride`` tokens and where records and chat turns end); other units get the
KV only, and an engine serves a prompt up to the last unit with a state.

A target writes states by defining ``state_files(key, conv, ssm)`` (the unit's key, conv
``[R, channels, kernel - 1]`` and ssm ``[R, heads, a, b]`` as the store keeps them), yielding
``(name, data)`` like ``files``. A target without it cannot hold a hybrid model's cache; it says why in
``recurrent_refusal`` (the framework's message names the target and that reason).
"""

from __future__ import annotations

from typing import Any

from prefixgen.cache_spec import RECURRENT
from prefixgen.errors import ExportError
from prefixgen.export.base import ExportSummary, ExportTarget, StoreInfo
from prefixgen.export.outdir import ExportDir
from prefixgen.export.walk import Blocks, Units
from prefixgen.store.reader import PrefixStore
from prefixgen.store.states import read_state, state_path

DEFAULT_REFUSAL = "its engine keeps no per-sequence state in the files this export writes"


def check_recurrent(store: Any, target: ExportTarget, info: StoreInfo) -> None:
    """Refuse a hybrid store for a target that cannot write its recurrent states (one message, with the
    target's reason); nothing for a store without recurrent layers or a target that writes states."""
    recurrent = [g for g in info.groups if g.kind == RECURRENT]
    if not recurrent or hasattr(target, "state_files"):
        return
    name = getattr(target, "name", type(target).__name__)
    reason = getattr(target, "recurrent_refusal", DEFAULT_REFUSAL)
    raise ExportError(
        f"{store} holds a model whose cache has {recurrent[0].describe()}: --to {name} cannot write recurrent state "
        f"(a state per sequence, not KV per token): {reason}. Export it --to sglang, or serve the store with "
        "PrefixStore.load or prefixgen serve"
    )


def write_states(
    store: PrefixStore,
    blocks: Blocks,
    units: Units,
    keys: list[Any],
    target: ExportTarget,
    outdir: ExportDir,
    summary: ExportSummary,
) -> None:
    """For a target with ``state_files``: the state files of every unit whose last block has a stored state
    (CRC and token count checked), counted in ``summary``. A file that exists is skipped (a resumed export)."""
    if not hasattr(target, "state_files") or not len(units):
        return
    block_tokens = store.manifest.block_size
    for u, row in enumerate(units.blocks[:, -1].tolist()):
        key = bytes(blocks.key[row])
        if not state_path(store.path, key).exists():
            continue
        names = target.state_names(keys[u])
        if all(outdir.exists(n) for n in names):
            summary.skipped_existing += len(names)
            continue
        conv, ssm = read_state(store.path, key, (int(blocks.depth[row]) + 1) * block_tokens)
        for name, data in target.state_files(keys[u], conv, ssm):
            if outdir.exists(name):
                summary.skipped_existing += 1
                continue
            summary.bytes += outdir.write(name, data)
            summary.files += 1
            summary.states += 1
