"""Prefill of hybrid models (Gated DeltaNet in Qwen3-Next, Mamba2 in Granite 4.0): the attention layers'
KV per block as for every model, and the recurrent layers' state at the boundaries a store keeps.

A recurrent state is what the layer holds after the last token of a forward, so a task runs alone
(right padding would run the state on over the padding) and in segments, one forward per segment,
each ending at a boundary whose state is kept or needed: every ``state_stride`` tokens (rounded up to
whole blocks), where the planner asks (:class:`StatePlan`: where records and chat turns end) and where
the task ends. The forward of the first segment is the forward of that prefix alone; each later one
continues the cache of the one before, as a serving engine's chunked prefill does.

The states stored are those of the stride and the planner's only, a function of the records alone:
a task's end that is neither (a chunk of a long record, a distributed build's head run) depends on
``--batch-tokens`` and on how ranks cut the work, so its state is kept in memory only, for the task
that continues there (:attr:`RecurrentPrefiller.recent`), and one process and any number of ranks
store the same states.

A task whose past is stored starts from its past's state when this run still holds it in memory, else
from the last boundary at or before its past whose state is kept (the state file exists), recomputing
the tokens between (their KV is stored already and not written again); from the start when there is none.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prefixgen.builder.plan import Batch, PrefillTask
from prefixgen.compat import cache_kwargs, output_cache
from prefixgen.format import BlockHash, KVLayout
from prefixgen.kvcache import hybrid_to_cache, kv_layers, new_cache, recurrent_layers, rows_from_layers, states_from_cache
from prefixgen.store.states import read_state, state_path, write_state

RECENT_STATES = 16  # task-end states kept in memory (RecurrentPrefiller.recent)


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
        # States where recent tasks ended, not stored (see the module's docstring), by their last block's
        # key: (conv, ssm) on the device, the next chunk's start. A few: a chunk's continuation runs in
        # a batch soon after it; one evicted is recomputed from the last stored state.
        self.recent: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

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
        if start == blocks and start in t.states:  # a state asked for where this run's memory holds it
            conv, ssm = (x[None] for x in self.recent[bytes(t.keys[start - 1])])
            self.states_written += write_state(self.store, t.keys[start - 1], start * bs, conv[0], ssm[0], self.fsync)
        for end in ends:
            if end <= at:
                continue
            ids = torch.tensor([t.tokens[at * bs : end * bs]], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
            cache = output_cache(out)
            conv, ssm = states_from_cache(cache, self.layout)  # [1, R, channels, kernel - 1], [1, R, ...]
            # The stride's boundaries among this task's new blocks, and those the planner asked for.
            if (end % self.stride == 0 and end * bs > t.cached) or end in t.states:
                self.states_written += write_state(self.store, t.keys[end - 1], end * bs, conv[0], ssm[0], self.fsync)
            at = end
        if blocks > start:
            self._remember(t.keys[blocks - 1], conv[0], ssm[0])
        # The attention layers hold every token from 0: the task's new tokens are its rows from `cached`.
        return rows_from_layers(kv_layers(cache, self.layout), self.layout, t.cached)[0]

    def _remember(self, key: BlockHash, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.recent[bytes(key)] = (conv, ssm)
        self.recent.move_to_end(bytes(key))
        while len(self.recent) > RECENT_STATES:
            self.recent.popitem(last=False)

    def _resume_point(self, t: PrefillTask) -> int:
        """The task's past when this run holds its state in memory, else the last block boundary at or
        before it whose state is kept (0: none)."""
        past = t.cached // self.block_size
        if past and bytes(t.keys[past - 1]) in self.recent:
            return past
        for b in range(past, 0, -1):
            if state_path(self.store, t.keys[b - 1]).exists():
                return b
        return 0

    def _cache_at(self, t: PrefillTask, start: int):
        if not start:
            return new_cache(self.model.config)
        tokens = start * self.block_size
        held = self.recent.get(bytes(t.keys[start - 1]))
        conv, ssm = held if held is not None else read_state(self.store, t.keys[start - 1], tokens)
        kv = self.past(t.keys[:start]).to(self.device)  # [tokens, L, parts, H, D]
        return hybrid_to_cache(kv, conv.to(self.device), ssm.to(self.device), self.layout, tokens)
