"""Step 4 of the build: run batches of PrefillTasks through it.

Padding scheme: each row holds one task's new tokens, right-padded; the past KV of row i
(``cached_i`` tokens) sits at the start of a past of ``P = max(cached)`` slots. Right padding needs
no mask: under the causal mask a real token never sees the padding after it. When the pasts differ
in length, the slots past ``cached_i`` are masked and explicit ``position_ids`` (``cached_i + j``)
give every real token the RoPE position it has alone. Either way the KV of real positions equals
single-sequence prefill (tests/test_build.py proves it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from prefixgen.builder.plan import Batch
from prefixgen.compat import cache_kwargs, make_cache, output_cache
from prefixgen.format import BlockHash, KVLayout
from prefixgen.kvcache import empty_cache, layers_from_rows, rows_from_layers


def fit_batch_tokens(model: torch.nn.Module, kv_bytes_per_token: int, requested: int, device: torch.device) -> int:
    """The token budget of one forward: ``requested``, lowered on CUDA so that a batch's
    activations and KV copies fit in half of the free device memory (out-of-memory batches are
    still split and retried, this only makes them rare).

    Per token: the KV four times over (the model's cache, its token-major copy, the reuse cache,
    and a margin for the past of the next batch) plus one layer's activations (hidden x 6 +
    intermediate x 3 values).
    """
    if device.type != "cuda":
        return requested
    free, _ = torch.cuda.mem_get_info(device)
    config = model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    per_token = 4 * kv_bytes_per_token + (6 * hidden + 3 * inter) * model.dtype.itemsize
    return max(16, min(requested, int(free * 0.5 / max(per_token, 1))))


class Prefiller:
    """Runs batches: returns, per task, the KV of its new tokens ``[new, L, parts, H, D]`` on the device.

    ``past(keys)`` returns the KV of stored or earlier-computed blocks, ``[len(keys)*B, L, parts, H, D]``.
    ``layout`` says how a cache layer maps to a row (``prefixgen.kvcache``); per-head K/V if not given.

    Example:
        >>> prefiller = Prefiller(model, device, past=source.get)  # doctest: +SKIP
        >>> kvs = prefiller.run(batch)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        past: Callable[[Sequence[BlockHash]], torch.Tensor],
        layout: KVLayout | None = None,
    ):
        self.model = model
        self.layout = layout
        self.device = device
        self.past = past
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[torch.Tensor]:
        tasks = batch.tasks
        rows, n_max, p_max = len(tasks), batch.new_len, batch.past_len
        ids = torch.zeros(rows, n_max, dtype=torch.long)
        for i, t in enumerate(tasks):
            ids[i, : t.new_tokens] = torch.tensor(t.tokens[t.cached :])
        past = self._past(tasks, p_max) if p_max else empty_cache()
        kwargs: dict[str, Any] = {"input_ids": self._up(ids), "use_cache": True, "logits_to_keep": 1}
        if any(t.cached != p_max for t in tasks):
            # Pasts of different lengths leave holes: only then a mask and explicit positions.
            # Right padding alone needs neither: under the causal mask a real token never sees
            # the padding after it, and the fast causal attention kernels stay in use.
            mask, pos = self._holes(tasks, n_max, p_max)
            kwargs["attention_mask"] = self._up(mask)
            kwargs["position_ids"] = self._up(pos)
        out = self.model(**kwargs, **cache_kwargs(self.model, past))
        layers = output_cache(out).layers
        # New tokens only, token-major in one copy: [rows, N, L, parts, H, D].
        kv = rows_from_layers(layers, self._layout(layers), p_max)
        return [kv[i, : t.new_tokens] for i, t in enumerate(tasks)]

    def _holes(self, tasks: list, n_max: int, p_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask [rows, P+N] (row i sees its own past and its real tokens) and positions
        [rows, N] (``cached_i + j``; padding continues them, masked, its KV thrown away)."""
        rows = len(tasks)
        pos = torch.zeros(rows, n_max, dtype=torch.long)
        mask = torch.zeros(rows, p_max + n_max, dtype=torch.long)
        for i, t in enumerate(tasks):
            pos[i] = torch.arange(t.cached, t.cached + n_max)
            mask[i, : t.cached] = 1
            mask[i, p_max : p_max + t.new_tokens] = 1
        if self.max_positions:
            pos.clamp_(max=self.max_positions - 1)
        return mask, pos

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        """Host to device without a stream sync: a copy from pageable memory would wait for the
        GPU to finish all queued work, stalling the pipeline every batch."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _layout(self, layers: Sequence) -> KVLayout:
        if self.layout is not None:
            return self.layout
        k0 = layers[0].keys  # [rows, H, T, D]
        return KVLayout(len(layers), k0.shape[1], k0.shape[3], str(k0.dtype).removeprefix("torch."))

    def _past(self, tasks: list, p_max: int):
        """A DynamicCache [rows, H, p_max, D] per layer (MLA: the latent and rope key, H = 1); row i holds
        its own past at the start."""
        rows = len(tasks)
        mla = self.layout is not None and self.layout.kind == "mla"
        buf = None
        for i, t in enumerate(tasks):
            if not t.cached:
                continue
            kv = self.past(t.keys[: t.cached // t.block_size]).to(self.device)  # [cached, L, parts, H, D]
            if mla:  # token-major rows, split per layer below
                if buf is None:
                    buf = torch.zeros(rows, p_max, *kv.shape[1:], dtype=kv.dtype, device=self.device)
                buf[i, : t.cached] = kv
                continue
            if buf is None:  # per-head K/V: one copy, into a buffer whose slices are the cache's tensors
                _, layers, _, heads, dim = kv.shape
                buf = torch.zeros(layers, 2, rows, heads, p_max, dim, dtype=kv.dtype, device=self.device)
            buf[:, :, i, :, : t.cached] = kv.permute(1, 2, 3, 0, 4)
        if mla:
            return make_cache(layers_from_rows(buf, self.layout))
        return make_cache([(buf[layer, 0], buf[layer, 1]) for layer in range(buf.shape[0])])
