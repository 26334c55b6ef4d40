"""Recurrent state (Gated DeltaNet, Mamba2) of a hybrid model's stored prefix, loaded into vLLM's Mamba groups.

A stored prefix of a hybrid model continues only with the recurrent layers' state at its end: the store keeps it
at block boundaries on a stride and where records and turns end (``prefixgen.store.states``). vLLM 0.32.0 keeps
a request's state in the blocks of its ``MambaSpec`` KV cache group (``v1/core/single_type_kv_cache_manager.py``,
``MambaManager``), and a connector's external tokens get those blocks like any group's:

* ``MambaManager.get_num_skipped_tokens(n)`` is ``n - 1`` (only the state after the last computed token is
  needed), so ``add_local_computed_blocks`` pads the table with ``null_block`` and
  ``allocate_external_computed_blocks`` allocates exactly one real block, the one holding token ``n - 1``:
  block ``(n - 1) // block_size`` of the group (:func:`state_block`).
* ``mamba_cache_mode`` "none" (vLLM's prefix caching off, ``MambaModelConfig.verify_and_update_config``): the
  group's block size is ``max_model_len``, a request has one state block, and a prefill that starts after
  computed tokens reads its initial state from it (``has_initial_state``): a load may end at any token.
* "align" (prefix caching on): the group's block size is the (attention) block size and the state read at a
  resumed prefill is the block ending at the computed tokens, so a load must end on a multiple of it
  (:meth:`StateLoads.claimable`); a stored state elsewhere is not used and the claim stops at an earlier one.

The worker writes the attention groups' KV as for any model and the state into each recurrent layer's block:
``layer.kv_cache`` is ``(conv, ssm)`` (``MambaBase.bind_kv_cache``). The conv state is ``[blocks, kernel - 1,
channels]`` (vLLM's default "SD" layout; ``is_conv_state_dim_first`` for "DS") in the model dtype; the store
keeps ``[channels, kernel - 1]``. The SSM state is ``mamba_ssm_cache_dtype`` (float32 for Qwen3-Next, as the
store keeps it); a Gated DeltaNet state is declared ``[heads, v, k]`` (``gated_delta_net_state_shape``, the CUDA
kernels' layout) but the CPU kernel (``ops/cpu/gdn_attention.py``) views each block's memory as ``[heads, k, v]``,
transformers' (the store's) layout: on CPU the store's state is copied as it is, on CUDA transposed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixgen.cache_spec import RECURRENT
from prefixgen.format import BlockHash
from prefixgen.integrations.vllm.faults import STORE_FAULTS, warn_once
from prefixgen.integrations.vllm.groups import NULL, VllmGroup
from prefixgen.integrations.vllm.metadata import LoadSpec
from prefixgen.integrations.vllm.reports import Reports
from prefixgen.store.index import BlockLocation
from prefixgen.store.states import read_state, state_path


class StatedPrefix(list):
    """A lookup's stored blocks (``BlockLocation``) with, per block count that ends on a stored state vLLM can
    resume from, that block's key (``ends``): the scheduler cuts a claim to one of them (:meth:`StateLoads.cut`)."""

    ends: dict[int, BlockHash]


def store_row(layout: Any, layer: int) -> int:
    """The row of a store block that holds model layer ``layer``'s KV: a hybrid store's rows hold its attention
    layers only, in order (``kvcache.attention_layers``); -1 if it holds none of ``layer``."""
    from prefixgen.kvcache import attention_layers

    rows = attention_layers(layout)
    return rows.index(layer) if layer in rows else -1


def state_block(block_ids: Sequence[int], block_size: int, end: int) -> int:
    """The block of a Mamba group's table (``block_ids``) that holds the state after ``end`` tokens: the one
    holding token ``end - 1``, the only one ``MambaManager`` allocates for a connector's tokens."""
    block = block_ids[(end - 1) // block_size]
    if block == NULL:
        raise RuntimeError(f"PrefixgenConnector: no state block for {end} tokens in a Mamba block table {list(block_ids)}")
    return block


@dataclass
class StateLoads:
    """The connector's recurrent-state side for one engine: which stored states a claim may end on (scheduler)
    and writing a load's state into vLLM's recurrent layers (worker)."""

    store: Path
    store_block: int  # tokens per store block
    groups: list[VllmGroup]  # vLLM's Mamba KV cache groups
    alignment: int  # a load must end on a multiple of it (align mode: the group's block size; none mode: 1)
    rows: tuple[int, ...]  # the store's recurrent layers, in the order of a state's rows
    layers: list[tuple[Any, int, int]] = field(default_factory=list)  # worker: (vLLM layer, its row in a state, group)
    gdn_on_cpu_layout: bool = True  # a Gated DeltaNet state as transformers keeps it ([heads, k, v]): vLLM's CPU kernel

    @classmethod
    def for_engine(cls, store: Any, groups: Sequence[VllmGroup], kv_cache_config: Any) -> StateLoads | None:
        """For a model with recurrent groups whose store keeps states (None otherwise)."""
        from vllm.platforms import current_platform
        from vllm.v1.kv_cache_interface import MambaSpec

        from prefixgen.kvcache import recurrent_layers

        recurrent = [g for g in groups if g.kind == RECURRENT]
        if not recurrent or not recurrent_layers(store.manifest.kv):
            return None
        specs = [kv_cache_config.kv_cache_groups[g.index].kv_cache_spec for g in recurrent]
        align = any(isinstance(s, MambaSpec) and s.mamba_cache_mode == "align" for s in specs)
        alignment = max(g.block_size for g in recurrent) if align else 1
        rows = recurrent_layers(store.manifest.kv)
        return cls(store.path, store.block_size, recurrent, alignment, rows, gdn_on_cpu_layout=current_platform.is_cpu())

    # ------------------------------------------------------------------ scheduler side (its lookup thread)

    def lookup(self, keys: Sequence[BlockHash], found: list[BlockLocation]) -> StatedPrefix:
        """``found`` (the stored blocks of ``keys``) with the block counts a load may end at: a state is stored
        after that block and the tokens fit vLLM's alignment. One ``stat`` per matched block (on the lookup
        thread): a claim cut short later (a block reported bad) needs the earlier ones."""
        out = StatedPrefix(found)
        out.ends = {
            n: keys[n - 1]
            for n in range(1, len(found) + 1)
            if (n * self.store_block) % self.alignment == 0 and state_path(self.store, keys[n - 1]).exists()
        }
        return out

    @staticmethod
    def cut(
        found: list[BlockLocation], usable: list[BlockLocation], bad: set[bytes] = frozenset()
    ) -> tuple[list[BlockLocation], BlockHash | None]:
        """``usable`` (a prefix of a lookup's ``found``) up to its last block with a state not in ``bad`` (states a
        worker could not load), and that state's key."""
        ends = getattr(found, "ends", {})
        n = max((e for e in ends if e <= len(usable) and bytes(ends[e]) not in bad), default=0)
        return usable[:n], ends.get(n)

    # ------------------------------------------------------------------ worker side

    def take(self, name: str, layer: Any, index: int) -> bool:
        """Whether vLLM's layer ``name`` (HF layer ``index``) is a recurrent one; if so it is kept to be written."""
        group = next((g.index for g in self.groups if name in g.layer_names), None)
        if group is None:
            return False
        if index not in self.rows:
            raise RuntimeError(f"PrefixgenConnector: vLLM's recurrent layer {name} is not a recurrent layer of the store")
        self.layers.append((layer, self.rows.index(index), group))
        return True

    def write(self, key: BlockHash, end: int, block_ids: list[list[int]]) -> int:
        """Write the stored state after ``end`` tokens (block ``key``) into every recurrent layer's state block;
        the bytes written. Raises ``CorruptStoreError`` for a missing or damaged state (nothing is written then)."""
        from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

        conv, ssm = read_state(self.store, key, end)  # [R, channels, kernel - 1], [R, heads, a, b]
        dim_first = is_conv_state_dim_first()
        written = 0
        for layer, row, group in self.layers:
            conv_cache, ssm_cache = layer.kv_cache[0], layer.kv_cache[1]
            block = state_block(block_ids[group], self._block_size(group), end)
            c = conv[row] if dim_first else conv[row].transpose(0, 1)  # vLLM's [kernel - 1, channels] ("SD")
            s = ssm[row]  # [heads, k, v] (GDN, transformers' order) or [heads, head_dim, d_state] (Mamba2)
            target = ssm_cache[block]
            if _is_gdn(layer):
                if self.gdn_on_cpu_layout:
                    target = target.view(s.shape)  # the CPU kernel's view of the block: [heads, k, v]
                else:
                    s = s.transpose(-1, -2)  # the CUDA kernels' [heads, v, k]
            conv_cache[block].copy_(c.to(conv_cache.dtype))
            target.copy_(s.to(ssm_cache.dtype))
            written += c.numel() * conv_cache.element_size() + s.numel() * ssm_cache.element_size()
        if self.layers and self.layers[0][0].kv_cache[0].device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # written before vLLM is told the load is done
        return written

    def _block_size(self, group: int) -> int:
        return next(g.block_size for g in self.groups if g.index == group)


def write_state(states: StateLoads, load: LoadSpec, reports: Reports) -> int:
    """A hybrid's load whose KV is written: its recurrent state too (:meth:`StateLoads.write`); the tokens written (its
    start if the state is missing or damaged: vLLM recomputes the load whole, and the state is reported bad, so that
    later claims end on another state; its block's KV is fine and stays claimable)."""
    try:
        nbytes = states.write(load.state, load.end, load.block_ids)
    except STORE_FAULTS as exc:
        warn_once(reports.logged, str(exc), "PrefixgenConnector: %s; vLLM computes the prompt", exc)
        with reports.lock:
            reports.stats.failed_states += 1
            reports.bad.bad_states.add(bytes(load.state))
        return load.start
    with reports.lock:
        reports.stats.states += 1
        reports.stats.state_bytes += nbytes
    return load.end


def _is_gdn(layer: Any) -> bool:
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    return layer.mamba_type == MambaAttentionBackendEnum.GDN_ATTN
