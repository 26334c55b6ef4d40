"""The load pipeline of a worker: stored blocks read in pieces into reused staging buffers (:mod:`.reads`), each
piece's rows made on the cache's device (permuted, converted, dequantized there), and written into vLLM's paged
caches with each layer's own cache-write op, at each KV cache group's slots, for every load that shares the read."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from prefixgen.config import ConnectorConfig
from prefixgen.errors import ConfigError, IncompatibleStoreError
from prefixgen.integrations.vllm.check import find_model
from prefixgen.integrations.vllm.groups import VllmGroup, group_span, is_mla, key_order, rope_key_order, write_layer
from prefixgen.integrations.vllm.loading import Loading, wait_copies
from prefixgen.integrations.vllm.reads import StoreReads
from prefixgen.integrations.vllm.reports import Reports
from prefixgen.integrations.vllm.staging import Staging, StagingPool, upload
from prefixgen.integrations.vllm.states import StateLoads, store_row
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore, StoredKV

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class Loader:
    """Writes stored prefixes into one rank's paged caches, once :meth:`register` mapped vLLM's layers to the store's."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        config: ConnectorConfig,
        store: PrefixStore,
        groups: list[VllmGroup],
        reports: Reports,
        states: StateLoads | None = None,
    ):
        self._vllm_config = vllm_config
        self.config = config
        self.store = store
        self.groups = groups
        self._states = states  # a hybrid model's recurrent layers: a load's state is written into them (states.py)
        self._reports = reports
        self.reads = StoreReads(store, reports)
        self.dtype = vllm_config.model_config.dtype
        self.layers: list[tuple[Any, int]] = []  # (vLLM attention layer, HF layer index)
        self.layer_groups: list[int] = []  # the KV cache group of each of self.layers
        self.key_order: torch.Tensor | None = None  # vLLM's order of a key's values, if not the store's
        self.heads = range(self.store.manifest.kv.num_kv_heads)
        self.stage = range(self.store.manifest.kv.num_layers)  # this pipeline stage's layers (all without PP)
        self.staging: StagingPool | None = None  # the read buffers (made in register)
        self.stream = None  # CUDA: the side stream the loads write on

    def register(self, kv_caches: dict[str, torch.Tensor], heads: range) -> Any:
        """Map vLLM's attention layers to the store's layers and check each can take the store's KV (this rank's
        ``heads``); make the read buffers. vLLM's model holding the layers, or None if not found."""
        from vllm.model_executor.models.utils import extract_layer_index

        self.heads = heads
        layers = self._vllm_config.compilation_config.static_forward_context
        group_of = {name: g.index for g in self.groups for name in g.layer_names}
        for name in kv_caches:
            layer = layers[name]
            if self._states and self._states.take(name, layer, extract_layer_index(name)):
                continue  # a recurrent layer: its state is written once a load's KV is (states.py)
            self.layers.append((layer, self._layer_index(name, layer)))
            self.layer_groups.append(group_of[name])
        # A pipeline stage holds consecutive layers: only theirs are converted and uploaded.
        indices = sorted(index for _, index in self.layers)
        if indices and indices == list(range(indices[0], indices[-1] + 1)):
            self.stage = range(indices[0], indices[-1] + 1)
        cuda = bool(self.layers) and self.layers[0][0].kv_cache.device.type == "cuda"
        piece = self.piece_blocks() * self.block_read_bytes()  # a piece as staged: at most staging_bytes
        self.staging = StagingPool(piece, self.config.staging_buffers, pinned=cuda)
        return self._find_model()

    def _layer_index(self, name: str, layer: Any) -> int:
        """The store layer of vLLM's layer ``name``, once the layer is found able to take the store's KV (a key/value
        cache-write op, the store's head size and this rank's KV heads)."""
        from vllm.model_executor.models.utils import extract_layer_index

        kv = self.store.manifest.kv
        impl = getattr(layer, "impl", None)
        update = getattr(impl, "do_kv_cache_update", None)
        if update is None or ("key" not in inspect.signature(update).parameters and not is_mla(layer)):
            raise ConfigError(
                f"PrefixgenConnector cannot write into layer {name}: its attention backend "
                f"({type(impl).__name__}) has no key/value cache-write op; use a standard attention backend "
                "(CPU_ATTN on CPU, FLASH_ATTN on CUDA)"
            )
        index = store_row(kv, extract_layer_index(name))  # a hybrid's rows hold its attention layers only
        if not 0 <= index < kv.num_layers or layer.head_size != kv.head_dim or layer.num_kv_heads != len(self.heads):
            raise IncompatibleStoreError(
                f"{self.store.path}: vLLM layer {name} (KV heads {layer.num_kv_heads}, head size {layer.head_size}) "
                f"does not match the store ({kv.num_layers} layers, {len(self.heads)} KV heads per rank, "
                f"head_dim {kv.head_dim})"
            )
        return index

    def _find_model(self) -> Any:
        """vLLM's model holding the registered layers (or None), and the order of a key's values (RoPE) in it."""
        kv = self.store.manifest.kv
        model = find_model(self.layers[0][0]) if self.layers else None
        if kv.kind == "mla":
            self.key_order = rope_key_order(self._vllm_config.model_config.hf_text_config, kv.head_dim - kv.latent_rank)
        else:
            self.key_order = key_order(model, kv.head_dim)
        return model

    def load(self, loading: Loading, detach: Callable[[Loading, int], None]) -> None:
        """Write tokens ``[load.start, load.end)`` into vLLM's caches, a piece of at most ``staging_bytes`` at a time, and
        each piece into the slots of the loads that joined ``loading`` too (each piece is read once), recording in each
        one's ``written`` how far it got (its end unless a store fault cut it short). Each write is made holding the
        load's lock, and none once that load was given up. ``detach(loading, read)``: after each piece, with the
        locations read so far (followers whose shared run is read leave the group)."""
        t0 = time.perf_counter()
        load = loading.load
        bs = self.store.block_size
        lock = self._reports.lock
        device = self.layers[0][0].kv_cache.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)  # this thread's: the rank's device, for the kernels it launches
        step = self.piece_blocks()
        last = None  # CUDA: the event of the previous piece's writes
        begin = loading.written // bs - load.first_block  # a follower's rest starts after its shared run: 0 otherwise
        for i in range(begin, len(load.locations), step):
            with lock:
                members = list(loading.group or [loading])
            if all(m.state == "abandoned" for m in members):  # all given up: vLLM owns these slots again
                break
            piece = load.locations[i : i + step]
            loading.reading = frozenset(loc.shard for loc in piece)
            staging = self.staging.acquire()
            try:
                read, good = self.read(piece, staging)  # as stored: a view of the staging buffer
                with lock:  # the loads that joined while it was read are written too; later ones join after it
                    members = list(loading.group or [loading])
                    loading.next_read = i + len(piece)
                if good and cuda:
                    if last is not None:
                        last.synchronize()  # the previous piece is written: its device copy goes (one piece on the device)
                    with torch.cuda.stream(self.stream):
                        read = read.to(upload(read.kv, device))  # raw, straight from the pinned read buffer
                        last = torch.cuda.Event()
                        last.record(self.stream)  # the buffer is free after it (the writes below come later)
                        last.buffers = (read,)  # type: ignore[attr-defined]  # the device copy, alive until it is waited for
                kv = self.rows(read, device) if good else None  # [good * bs, layers, 2, heads, D] on the cache's device
                first = (load.first_block + i) * bs  # the piece's first token
                for member in members if good else []:
                    last = self.write_piece(member, kv, first, first + good * bs, device) or last
            finally:
                self.staging.release(staging, last)  # reused once the copies out of it are done
            if good < len(piece):
                break
            detach(loading, i + len(piece))  # followers whose shared run is read go on by themselves
        with lock:
            self._reports.stats.seconds += time.perf_counter() - t0

    def rows(self, read: StoredKV, device: torch.device) -> torch.Tensor:
        """vLLM's token-major rows of a piece ``read`` as stored, on the cache's device (where it was uploaded raw:
        on CPU, where the upload is the identity, the host), permuted and converted there: a head-major piece's
        transpose, a dtype conversion or fp8's dequantization is one pass on the device (on CUDA, on the load stream),
        none on the host; a token-major piece with nothing to convert stays a view."""
        if device.type == "cuda":
            with torch.cuda.stream(self.stream):
                kv = read.rows(self.dtype)
        else:
            kv = read.rows(self.dtype)
        if kv.untyped_storage().data_ptr() != read.kv.untyped_storage().data_ptr():
            with self._reports.lock:
                self._reports.stats.device_converted_bytes += kv.numel() * kv.element_size()
        return kv

    def write_piece(self, member: Loading, kv: torch.Tensor, first: int, end: int, device: torch.device) -> Any:
        """Tokens ``[first, end)`` of a prompt (``kv``: [tokens, layers, 2, heads, D] on the host, or on the device on CUDA)
        into ``member``'s slots, from its first token not written (nothing if it was given up); CUDA: the event of the
        write, or None."""
        with member.lock:
            written = member.written
            end = min(member.load.end, end, member.shared_end)  # a follower: not past the run it shares with the leader
            if member.state == "abandoned" or written < first or end <= written:
                return None  # given up, or nothing of it in this piece (written < first: a piece it needs was not read)
            part = kv[written - first : end - first]  # [tokens, layers, parts, heads, D]: a view, no copy
            spans = self.spans(member.load.block_ids, written, end)  # per KV cache group: its window's slots
            done = None
            if device.type == "cuda":
                wait_copies(member)
                with torch.cuda.stream(self.stream):
                    if member.after is not None:  # nothing the engine queued for its blocks lands after the write
                        self.stream.wait_event(member.after)
                        member.after = None
                    on_device = [(o, slots.pin_memory().to(device, non_blocking=True)) for o, slots in spans]
                    self.write(part, on_device)
                    done = torch.cuda.Event()
                    done.record(self.stream)
                done.buffers = (kv, on_device)  # type: ignore[attr-defined]  # alive until the event is waited for
                member.pending = done
            else:
                self.write(part, spans)
            member.written = end
            with self._reports.lock:
                stats = self._reports.stats
                stats.tokens += end - written
                stats.bytes += part.numel() * part.element_size()
                for g in self.groups:
                    if g.windowed:  # sliding-window and chunked groups: only the window's tokens have blocks
                        stats.window_tokens += len(spans[g.index][1])
                        stats.window_tokens_skipped += end - written - len(spans[g.index][1])
        return done

    def piece_blocks(self) -> int:
        """Store blocks per piece: their KV as read fits in ``staging_bytes`` (one block at least)."""
        return max(1, self.config.staging_bytes // self.block_read_bytes())

    def block_read_bytes(self) -> int:
        """Host bytes one store block takes in a read buffer: this rank's heads as stored (a token-major store's every
        head, side by side in each token), fp8 as its bytes and scales (dequantized on the cache's device, :meth:`rows`)."""
        return self.reads.block_bytes(self.heads)

    def read(self, locations: list[BlockLocation], staging: Staging) -> tuple[StoredKV | None, int]:
        """This rank's KV heads and this stage's layers of the leading blocks of ``locations`` that read cleanly, as
        stored, into ``staging``, and how many they are (:meth:`StoreReads.read`)."""
        return self.reads.read(locations, staging, self.heads, self.stage)

    def spans(self, block_ids: list[list[int]], start: int, end: int) -> list[tuple[int, torch.Tensor]]:
        """Per KV cache group, the tokens of ``[start, end)`` it holds blocks for: the offset of the first from
        ``start`` and their slots (a sliding-window or chunked group: only its window's; groups.py)."""
        return [group_span(ids, g.block_size, start, end) for g, ids in zip(self.groups, block_ids)]

    def write(self, kv: torch.Tensor, spans: list[tuple[int, torch.Tensor]]) -> None:
        """Each layer's K and V, or MLA latent (``kv``: [tokens, this stage's layers, parts, heads, D] on the cache's
        device, each token's heads side by side) into its cache, at its KV cache group's slots (``spans``,
        :meth:`spans`).

        The op gets views ``kv[:, layer, 0]`` ([tokens, heads, D], a token stride of the whole row): the layout of the
        keys vLLM's own forward passes it (a slice of the fused QKV projection), so no per-layer copy is made."""
        first = self.stage.start
        for (layer, index), group in zip(self.layers, self.layer_groups):
            offset, slots = spans[group]
            if len(slots):
                write_layer(layer, kv[offset:, index - first], layer.kv_cache, slots, self.key_order)
