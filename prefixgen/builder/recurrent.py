"""Prefill of hybrid models (Gated DeltaNet in Qwen3-Next, Mamba2 in Granite 4.0): the attention layers'
KV per block as for every model, and the recurrent layers' state at the boundaries a store keeps.

A recurrent state is what the layer holds after the last token of a forward, so a task runs unpadded
(right padding would run the state on over the padding; left padding would decay a continued state)
and in segments, one forward per segment, each ending at a boundary whose state is kept or needed: every ``state_stride`` tokens (rounded up to
whole blocks), where the planner asks (:class:`StatePlan`: where records and chat turns end) and where
the task ends. The forward of the first segment is the forward of that prefix alone; each later one
continues the cache of the one before, as a serving engine's chunked prefill does. The tasks of a
batch that start from the same boundary run together in lockstep (:meth:`RecurrentPrefiller._together`):
each forward takes all of them up to the next boundary of any, which needs no padding; a task that
ends leaves the batch.

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
from prefixgen.compat import cache_kwargs, keep_rows, output_cache
from prefixgen.format import BlockHash, KVLayout
from prefixgen.kvcache import hybrid_batch_to_cache, kv_layers, new_cache, recurrent_layers, rows_from_layers, states_from_cache
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
    """Runs batches of a hybrid model (tasks from the same boundary together, in lockstep); returns, per task, the KV of its new tokens
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
        owner: str | None = None,
    ):
        self.model, self.device, self.past, self.layout = model, device, past, layout
        self.store, self.block_size, self.fsync = Path(store), block_size, fsync
        self.owner = owner  # the run's writer: its state files' temporary names carry it (gc)
        self.stride = stride_blocks(layout, block_size)
        self.states_written = 0
        # States where recent tasks ended, not stored (see the module's docstring), by their last block's
        # key: (conv, ssm) on the device, the next chunk's start. A few: a chunk's continuation runs in
        # a batch soon after it; one evicted is recomputed from the last stored state.
        self.recent: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[torch.Tensor]:
        """The KV of each task's new tokens. Tasks that start from the same boundary run together
        (:meth:`_together`): a batch's tasks have similar lengths (the batcher sorts them), and most
        start from the beginning or from the same stride boundary."""
        out: list = [None] * len(batch.tasks)
        groups: dict[int, list[int]] = {}
        held: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, t in enumerate(batch.tasks):
            start = self._resume_point(t)
            groups.setdefault(start, []).append(i)
            if start:
                # Taken now: the groups before this task's may finish more than RECENT_STATES tasks, whose
                # states evict the one it starts from (it was chosen because it is held; none is stored).
                key = bytes(t.keys[start - 1])
                if key in self.recent:
                    held[key] = self.recent[key]
        for start, rows in groups.items():
            for i, kv in zip(rows, self._together([batch.tasks[i] for i in rows], start, held)):
                out[i] = kv
        return out

    def _together(
        self, tasks: list[PrefillTask], start: int, held: dict[bytes, tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Run ``tasks`` from block ``start`` in lockstep, with no padding: each forward takes every task
        still running up to the next boundary of any of them (a stride boundary, a state asked for, a
        task's end), so each task's forwards end at least at its own boundaries (and its state there is
        that of a forward ending there); a task that ends leaves the batch. ``held``: the states at the
        tasks' starts that this run holds in memory, taken before any group of the batch ran."""
        bs = self.block_size
        blocks = [len(t.tokens) // bs for t in tasks]
        out: list = [None] * len(tasks)
        for r, t in enumerate(tasks):  # nothing to compute: a state asked for is in this run's memory or stored
            if blocks[r] == start:
                state = held.get(bytes(t.keys[start - 1])) if start in t.states else None
                if state is not None:
                    self.states_written += write_state(self.store, t.keys[start - 1], start * bs, *state, self.fsync, self.owner)
                out[r] = torch.empty(0, *self.layout.token_shape, dtype=self.model.dtype, device=self.device)
        live = [r for r in range(len(tasks)) if blocks[r] > start]  # the cache's rows, in order
        if not live:
            return out
        cache = self._cache_at([tasks[r] for r in live], start, held)
        at = start
        while live:
            # The next boundary of any task: the stride's (the same for all), a state asked for, a task's end.
            cut = min(min(b for b in (*tasks[r].states, blocks[r]) if b > at) for r in live)
            cut = min(cut, (at // self.stride + 1) * self.stride)
            ids = torch.tensor([tasks[r].tokens[at * bs : cut * bs] for r in live], device=self.device)
            output = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
            cache = output_cache(output)
            conv, ssm = states_from_cache(cache, self.layout)  # [rows, R, channels, kernel - 1], [rows, R, ...]
            done = [j for j, r in enumerate(live) if blocks[r] == cut]
            kv = rows_from_layers(kv_layers(cache, self.layout), self.layout, 0) if done else None  # [rows, T, ...]
            for j, r in enumerate(live):
                t = tasks[r]
                # The stride's boundaries among this task's new blocks, and those the planner asked for.
                if (cut % self.stride == 0 and cut * bs > t.cached) or cut in t.states:
                    self.states_written += write_state(
                        self.store, t.keys[cut - 1], cut * bs, conv[j], ssm[j], self.fsync, self.owner
                    )
                if blocks[r] == cut:
                    # The attention layers hold every token from 0: the task's new tokens are its rows from `cached`.
                    out[r] = kv[j, t.cached :]
                    self._remember(t.keys[cut - 1], conv[j], ssm[j])
            at = cut
            if done:
                stay = [j for j in range(len(live)) if j not in done]
                if stay and len(stay) < len(live):
                    keep_rows(cache, torch.tensor(stay, device=self.device))
                live = [live[j] for j in stay]
        return out

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

    def _cache_at(self, tasks: list[PrefillTask], start: int, held: dict[bytes, tuple[torch.Tensor, torch.Tensor]]):
        """The cache of ``tasks`` (one row each) after block ``start``: empty at 0; else each one's past KV
        and its state there (``held``: this run's memory when the batch began, else the stored file)."""
        if not start:
            return new_cache(self.model.config)
        tokens = start * self.block_size
        kvs, convs, ssms = [], [], []
        for t in tasks:
            state = held.get(bytes(t.keys[start - 1]))
            conv, ssm = state if state is not None else read_state(self.store, t.keys[start - 1], tokens)
            kvs.append(self.past(t.keys[:start]).to(self.device))  # [tokens, L, parts, H, D]
            convs.append(conv.to(self.device))
            ssms.append(ssm.to(self.device))
        return hybrid_batch_to_cache(torch.stack(kvs), torch.stack(convs), torch.stack(ssms), self.layout, tokens)
