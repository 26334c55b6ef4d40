"""Prefill of hybrid models (Gated DeltaNet in Qwen3-Next, Mamba2 in Granite 4.0): the attention layers'
KV per block as for every model, and the recurrent layers' state at the boundaries a store keeps.

A recurrent state is what the layer holds after the last token of a forward, so a task runs alone
(right padding would run the state on over the padding) and in segments, one forward per segment,
each ending at a boundary whose state is kept: every ``state_stride`` tokens (rounded up to whole blocks)
and where the task ends (a record's last block, or the end of one chunk of a long record). The forward
of the first segment is the forward of that prefix alone; each later one continues the cache of the
one before, as a serving engine's chunked prefill does.

A task whose past is stored starts from the last boundary at or before its past whose state is kept
(the state file exists), recomputing the tokens between (their KV is stored already and not written
again); from the start when there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prefixgen.builder.plan import Batch, PrefillTask
from prefixgen.compat import cache_kwargs, output_cache
from prefixgen.format import BlockHash, KVLayout
from prefixgen.kvcache import hybrid_to_cache, kv_layers, new_cache, recurrent_layers, rows_from_layers, states_from_cache
from prefixgen.store.states import read_state, state_path, write_state


def stride_blocks(layout: KVLayout, block_size: int) -> int:
    """Blocks between two stored states: the manifest's ``state_stride`` tokens, rounded up to whole blocks."""
    stride = next(g.state_stride for g in layout.groups if g.layers == recurrent_layers(layout))
    return max(1, -(-stride // block_size))


class StatePlan:
    """Where a record wants a recurrent state beyond the stride (the planner asks, ``Planner(states=...)``):
    where its prefixes end as a server's lookup covers them. A lookup of a prompt of ``n`` tokens covers
    ``(n - 1) // B`` blocks (one token is left to prefill) or, as the prefix of a longer prompt, ``n // B``:
    the record's end gives both, each chat turn's prompt the first.

    Example:
        >>> StatePlan(Path("store"), 16).wanted(TokenizedRecord(0, list(range(40)), (20,)), 2)  # doctest: +SKIP
        [1, 2]
    """

    def __init__(self, store: Path, block_size: int):
        self.store, self.block_size = Path(store), block_size
        self.asked: set[bytes] = set()  # states a task of this run computes already

    def wanted(self, record, blocks: int) -> list[int]:
        bs, n = self.block_size, len(record.ids)
        want = {(n - 1) // bs, n // bs} | {(e - 1) // bs for e in record.ends}
        return sorted(b for b in want if 1 <= b <= blocks)

    def missing(self, key: BlockHash) -> bool:
        """True (once per key) if no state is kept after block ``key`` and no task of this run computes it."""
        if bytes(key) in self.asked or state_path(self.store, key).exists():
            return False
        self.asked.add(bytes(key))
        return True


class RecurrentPrefiller:
    """Runs batches of a hybrid model task by task; returns, per task, the KV of its new tokens
    ``[new, L, parts, H, D]`` (attention layers only) and writes the states it reaches into ``store``.

    Example:
        >>> prefiller = RecurrentPrefiller(model, device, source.get, manifest.kv, Path("store"), 16)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        past: Callable[[Sequence[BlockHash]], torch.Tensor],
        layout: KVLayout,
        store: Path,
        block_size: int,
        fsync: bool = True,
    ):
        self.model, self.device, self.past, self.layout = model, device, past, layout
        self.store, self.block_size, self.fsync = Path(store), block_size, fsync
        self.stride = stride_blocks(layout, block_size)
        self.states_written = 0

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[torch.Tensor]:
        return [self._task(t) for t in batch.tasks]

    def _task(self, t: PrefillTask) -> torch.Tensor:
        bs = self.block_size
        blocks = len(t.tokens) // bs
        start = self._resume_point(t)
        cache = self._cache_at(t, start)
        # Segment ends: the stride's boundaries after the start, those the planner asked for, and the task's end.
        ends = sorted({b for b in range(start + 1, blocks + 1) if b % self.stride == 0} | {blocks} | set(t.states))
        at = start
        for end in ends:
            if end <= at:
                continue
            ids = torch.tensor([t.tokens[at * bs : end * bs]], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
            cache = output_cache(out)
            conv, ssm = states_from_cache(cache, self.layout)  # [1, R, channels, kernel - 1], [1, R, ...]
            if end * bs > t.cached or end in t.states:  # this task's new blocks' boundaries, and those asked for
                self.states_written += write_state(self.store, t.keys[end - 1], end * bs, conv[0], ssm[0], self.fsync)
            at = end
        # The attention layers hold every token from 0: the task's new tokens are its rows from `cached`.
        return rows_from_layers(kv_layers(cache, self.layout), self.layout, t.cached)[0]

    def _resume_point(self, t: PrefillTask) -> int:
        """The last block boundary at or before the task's past whose state is kept (0: none)."""
        for b in range(t.cached // self.block_size, 0, -1):
            if state_path(self.store, t.keys[b - 1]).exists():
                return b
        return 0

    def _cache_at(self, t: PrefillTask, start: int):
        if not start:
            return new_cache(self.model.config)
        tokens = start * self.block_size
        conv, ssm = read_state(self.store, t.keys[start - 1], tokens)
        kv = self.past(t.keys[:start]).to(self.device)  # [tokens, L, parts, H, D]
        return hybrid_to_cache(kv, conv.to(self.device), ssm.to(self.device), self.layout, tokens)
