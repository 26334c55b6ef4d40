"""`prefixgen export --to vllm`: a store as the files vLLM's own ``fs`` offloading tier reads
(``OffloadingConnector`` + ``TieringOffloadingSpec``, a CPU primary tier and an ``fs`` secondary tier),
so that an unmodified vLLM server serves them. Checked against **vLLM 0.32.0** (tests_vllm/ runs its code):

* **Where** (``vllm/v1/kv_offload/file_mapper.py``, ``FileMapper``): the fs tier builds its mapper with
  ``parallel_agnostic=True``; with ``canonical_layout`` on, a standard attention model under pure tensor
  parallelism is parallelism-agnostic (``offloading/config.py``: ``build_offloading_config``), so the
  run config has tp/pp/pcp/dcp 1, rank 0 and ``canonical_format`` ``v1-nhd`` (or ``v1-hnd``). A file is
  ``<root>/<model>_<sha256[:12] of the run config>_r0/<hhh>/<hh>_g0/<hash>.bin`` (``model`` is vLLM's
  ``--model`` string with "/" replaced by "_"); ``config.json`` (the run config) sits in
  ``<root>/<model>_<sha256[:12]>/``.
* **Which hash**: a chunk of ``blocks_per_file`` vLLM blocks is keyed by vLLM's prefix-cache hash of its
  last block (``scheduler.py``: ``update_offload_keys``): ``h[i] = H((h[i-1], tuple(block_i), None))``,
  ``H`` the server's ``--prefix-caching-hash-algo`` (``sha256``: SHA-256 of the pickle; ``sha256_cbor``:
  of the canonical CBOR), ``h[-1] = NONE_HASH = H(seed)``, ``seed`` the server's ``PYTHONHASHSEED``
  string or, unset, ``"vllm-none-hash"`` (``kv_cache_utils.init_none_hash``).
* **What**: one row of the CPU primary tier (``cpu/shared_offload_region.py``,
  ``create_next_canonical_view``): for each attention layer, the chunk's canonical pages (all KV heads,
  ``canonical_mapping.py``), one per vLLM block, then zeros up to the row stride: the workers' bytes per
  chunk rounded up to 4 KiB (``CPUOffloadingSpec``). A canonical page is ``[block_size, heads, K|V]``
  for the NHD family (``LBNHC``: FlashAttention's default) or ``[heads, block_size, K|V]`` for HND
  (``LBHNC``), K and V of one head and token adjacent, in the KV cache dtype.
* **Sliding window** (several KV cache groups, the hybrid manager on): the layers grouped as vLLM groups them
  (:func:`vllm_kv_cache_groups`); one file per group ``_g<i>`` and chunk (same hash); a group's row holds, per
  KV cache tensor (the groups' ``j``-th layers share one, ``worker.py``: ``register_kv_caches``), the canonical
  pages of its ``j``-th layer, zeros where a padded group has none.
* **MLA**: one group; a layer's canonical page is its GPU page, the latent rows ``[block, latent]``
  (``canonical_mapping._layer_mapping``), and the run config has ``replicated_layout`` (``offloading/config.py``
  sets it for a canonical MLA group). TP 1 only.
* **Refused**, with vLLM's reason: chunked local attention and recurrent state (``spec_certifiable``: no
  canonical page for a ``ChunkedLocalAttentionSpec`` or a ``MambaSpec``).

vLLM checks nothing inside a file but its length: a wrong layout, dtype or TP size is wrong KV (or a
short read, after which vLLM deletes the file). The export folder's manifest records every parameter.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from prefixgen.cache_spec import CHUNKED, FULL, MLA, SLIDING
from prefixgen.errors import ExportError
from prefixgen.export.base import StoreInfo
from prefixgen.export.cbor import cbor
from prefixgen.model import tp_kv_heads

VLLM_VERSION = "0.32.0"  # the version whose names, hashes and layouts this target was checked against
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"  # vllm.v1.core.kv_cache_utils.DEFAULT_NONE_HASH_SEED
HASH_ALGORITHMS = ("sha256", "sha256_cbor")  # the prefix-caching hashes reproducible outside the server
# VLLM_KV_CACHE_LAYOUT names (and their legacy aliases) of the layouts with a canonical format: family for
# canonical_format_id. The block-outermost layouts (BL..., BH...) pack layers per block and are not certified.
KV_LAYOUTS = {"LBNHC": "nhd", "NHD": "nhd", "LBHNC": "hnd", "HND": "hnd"}
CANONICAL_FORMAT_VERSION = 1  # canonical_mapping.CANONICAL_FORMAT_VERSION
ROW_ALIGNMENT = 4096  # SharedOffloadRegion.BLOCK_SIZE_ALIGNMENT: mmap.PAGESIZE of an x86-64 server
BASE_PATH_HASH_LEN = 12  # file_mapper._BASE_PATH_HASH_LEN
DEFAULT_LAYER_NAMES = "model.layers.{i}.self_attn.attn"  # vLLM's Attention prefix in Llama/Qwen/Mistral-style models


@dataclass
class VLLMTarget:
    """vLLM's ``fs`` offloading tier with ``canonical_layout`` (see the module's docstring).

    ``model_name`` is vLLM's ``--model`` string; ``block_size`` its ``--block-size``; ``blocks_per_file``
    the connector's ``blocks_per_chunk`` (or its ``block_size`` / ``--block-size``); ``dtype`` the KV cache
    dtype (None: the store's); ``tp_size`` ``--tensor-parallel-size``; ``hash_seed`` ``PYTHONHASHSEED``
    (None: unset); ``hash_algorithm`` ``--prefix-caching-hash-algo``; ``kv_layout`` the KV cache layout
    the server resolves (``VLLM_KV_CACHE_LAYOUT``; FlashAttention: NHD); ``layer_names`` the attention
    layers' names, ``{i}`` the layer number.

    Example:
        >>> t = VLLMTarget(model_name="org/m")
        >>> t.check(info)  # doctest: +SKIP
        >>> t.names(t.next_key(t.first_key(), tokens[:16]))  # doctest: +SKIP
        ['org_m_3f2a9c0d1e7b_r0/a1b/2c_g0/a1b2c....bin']
    """

    name: ClassVar[str] = "vllm"
    recurrent_refusal: ClassVar[str] = (
        "vLLM 0.32.0's offloading has a canonical (topology-free) page only for attention layers "
        "(offloading/config.py, spec_certifiable: a MambaSpec is not an AttentionSpec), so a hybrid's files are "
        "each worker's raw state pages, which this export does not write"
    )

    model_name: str
    block_size: int = 16
    blocks_per_file: int = 1
    dtype: str | None = None
    tp_size: int = 1
    hash_seed: str | int | None = None
    hash_algorithm: str = "sha256"
    kv_layout: str = "NHD"
    layer_names: str = DEFAULT_LAYER_NAMES

    @property
    def unit_tokens(self) -> int:
        return self.block_size * self.blocks_per_file

    def check(self, info: StoreInfo) -> None:
        """Refuse what this target cannot write exactly as vLLM would for the stated server."""
        if not self.model_name:
            raise ExportError("--model-name is empty: give the --model string the vLLM server is started with")
        self._check_kinds(info)
        self._check_options(info)
        self._lay_out(info)

    def _check_kinds(self, info: StoreInfo) -> None:
        """The cache kinds vLLM's offloading has a canonical page for: full, sliding and (TP 1) MLA."""
        self._mla = info.group_kinds() == {MLA}
        if MLA in info.group_kinds() and not self._mla:
            raise ExportError(
                f"{info.model_type} stores a cache of {info.describe()}: --to vllm writes an MLA latent only for models "
                "whose every layer is MLA. Export it --to sglang or --to lmcache, or serve it with prefixgen serve"
            )
        if CHUNKED in info.group_kinds():
            raise ExportError(
                f"{info.model_type} stores a cache of {info.describe()}: vLLM 0.32.0's offloading has no canonical "
                "(topology-free) page for chunked local attention (offloading/config.py, spec_certifiable: a "
                "ChunkedLocalAttentionSpec is neither a FullAttentionSpec nor a SlidingWindowSpec), so its files are "
                "each worker's own pages, which this export does not write. Export it --to sglang or --to lmcache, "
                "or serve it with prefixgen serve"
            )
        if self._mla and self.tp_size != 1:
            # TP > 1: one latent copy for every rank in a folder of its own (replicated_layout, with the mp executor) or
            # one per rank's row (other executors): offloading/config.py decides from the server's executor.
            raise ExportError(
                f"--tp-size {self.tp_size} with an MLA latent: vLLM keeps its offloaded latent per executor "
                "(replicated_layout with the mp executor, a copy per rank otherwise), which this export does not "
                "write; export with --tp-size 1 for a server with --tensor-parallel-size 1"
            )

    def _check_options(self, info: StoreInfo) -> None:
        """The server options this export must match: block size, hash, layout, names, dtype, TP."""
        if self.block_size <= 0 or self.blocks_per_file <= 0:
            raise ExportError("--block-size and --blocks-per-file must be positive")
        if self.block_size % info.block_size:
            raise ExportError(
                f"the store's block size ({info.block_size}) does not divide vLLM's --block-size {self.block_size}: "
                f"rebuild the store with a --block-size that divides {self.block_size}"
            )
        if self.hash_algorithm not in HASH_ALGORITHMS:
            raise ExportError(
                f"--prefix-caching-hash-algo {self.hash_algorithm!r} cannot be reproduced outside the server "
                f"(xxhash seeds NONE_HASH at random unless PYTHONHASHSEED is set, and its bytes are not portable): use "
                f"{' or '.join(HASH_ALGORITHMS)}"
            )
        _seed_text(self.hash_seed)
        if self.kv_layout.upper() not in KV_LAYOUTS:
            raise ExportError(
                f"KV cache layout {self.kv_layout!r} has no canonical page format vLLM certifies: use NHD (LBNHC, "
                "FlashAttention's default) or HND (LBHNC, FlashInfer on Blackwell)"
            )
        if "{i}" not in self.layer_names:
            raise ExportError(f"--layer-names {self.layer_names!r} has no {{i}} for the layer number")
        if info.storage == "fp8":
            raise ExportError(
                "the store holds fp8 KV with per-block scales, which vLLM's fp8 KV cache (one scale per layer) cannot "
                "read: rebuild the store with --kv-dtype auto to export it to vLLM"
            )
        dtype = self.dtype or info.kv_dtype
        if dtype != info.kv_dtype:
            raise ExportError(
                f"the store's KV is {info.kv_dtype} but --dtype is {dtype}: vLLM would read the bytes as {dtype}. "
                f"Serve with --dtype {info.kv_dtype} (and --kv-cache-dtype auto), or rebuild the store in {dtype}"
            )
        if tp_kv_heads(info.num_kv_heads, self.tp_size, 0) is None:
            raise ExportError(
                f"--tp-size {self.tp_size} does not split the model's {info.num_kv_heads} KV heads: vLLM cannot serve it"
            )

    def _lay_out(self, info: StoreInfo) -> None:
        """The groups, page and row sizes of the files, and the folder they go in."""
        self._info = info
        self._dtype = self.dtype or info.kv_dtype
        rank_heads = max(1, info.num_kv_heads // self.tp_size)
        token_bytes = info.parts * info.head_dim * info.torch_dtype.itemsize  # K then V of one head, or one latent
        self._groups = vllm_kv_cache_groups(info)
        # A row has one area per KV cache tensor, which each group's i-th layer shares (groups overlay one
        # allocation): as many as the largest group has layers; a group with fewer leaves its last ones zero.
        tensors = max(len(g) for g in self._groups)
        # Every worker's pages of a chunk: what the CPU tier's row holds (replicated heads counted per rank).
        worker_bytes = tensors * rank_heads * self.block_size * token_bytes * self.blocks_per_file
        self._page_bytes = info.num_kv_heads * self.unit_tokens * token_bytes  # one layer's canonical pages of a chunk
        self._row_bytes = -(-worker_bytes * self.tp_size // ROW_ALIGNMENT) * ROW_ALIGNMENT
        self._base = _base_path(self.run_config())

    @property
    def file_bytes(self) -> int:
        """Bytes of every file: one CPU-tier row (after ``check``)."""
        return self._row_bytes

    def run_config(self) -> dict[str, Any]:
        """The fields ``FileMapper`` hashes into the folder name (and writes to config.json), as the fs
        tier of the stated server builds them (after ``check``)."""
        groups = [
            {"tokens_per_block": self.block_size, "layer_names": [self.layer_names.format(i=i) for i in g]} for g in self._groups
        ]
        return {
            "model_name": self.model_name,
            "tokens_per_hash": self.block_size,
            "blocks_per_file": self.blocks_per_file,
            "tp_size": 1,  # parallel-agnostic: every topology shares one folder
            "pp_size": 1,
            "pcp_size": 1,
            "dcp_size": 1,
            "dtype": self._dtype,
            "kv_cache_groups": groups,
            "inference_engine": "vllm",
            "canonical_format": f"v{CANONICAL_FORMAT_VERSION}-{KV_LAYOUTS[self.kv_layout.upper()]}",
            # An MLA latent is one copy for every rank: offloading/config.py sets replicated_layout for a canonical,
            # parallelism-agnostic MLA group (TP 1 included), and FileMapper hashes the field in when it is set.
            **({"replicated_layout": True} if self._mla else {}),
        }

    def extra_files(self) -> list[tuple[str, bytes]]:
        """``config.json`` as the fs tier writes it when it is missing (``json.dump(indent=2, sort_keys=True)``)."""
        return [(f"{self._base}/config.json", json.dumps(self.run_config(), indent=2, sort_keys=True).encode())]

    def first_key(self) -> bytes:
        """vLLM's ``NONE_HASH``: the parent of a prompt's first block."""
        return self._hash(_seed_text(self.hash_seed))

    def next_key(self, parent: bytes, tokens: np.ndarray) -> bytes:
        """The hash of the chunk's last vLLM block: the chain continued over its ``blocks_per_file`` blocks."""
        h = parent
        for block in np.asarray(tokens).reshape(self.blocks_per_file, self.block_size).tolist():
            h = self._hash((h, tuple(block), None))
        return h

    def names(self, key: bytes) -> list[str]:
        """``FileMapper.get_file_name`` of the chunk's key for each KV cache group (rank 0), relative to the root."""
        hx = key.hex()
        groups = len(getattr(self, "_groups", None) or [()])
        return [f"{self._base}_r0/{hx[:3]}/{hx[3:5]}_g{g}/{hx}.bin" for g in range(groups)]

    def files(self, key: bytes, kv: torch.Tensor) -> Iterator[tuple[str, list]]:
        """The chunk's CPU-tier row of each KV cache group: per layer of the group its canonical pages, then zeros.
        ``kv`` is ``[U, L, 2, H, D]``; the pages are a strided view of it, written run by run
        (``prefixgen.export.iov``)."""
        everything = len(self._groups) == 1 and len(self._groups[0]) == kv.shape[1]
        for name, layers in zip(self.names(key), self._groups):
            pages = self.canonical(kv if everything else kv[:, layers])
            yield name, [pages, _zeros(self._row_bytes - len(layers) * self._page_bytes)]

    def canonical(self, kv: torch.Tensor) -> np.ndarray:
        """The chunk's canonical pages as a view of ``kv`` (``[U, L, 2, H, D]``), one item per head's K or V:
        NHD ``[L, U, H, 2]``, HND ``[L, blocks, H, block, 2]``; C order is the row's byte order."""
        tokens, layers, _, heads, dim = kv.shape
        if self._mla:  # MLAAttentionSpec's canonical page is the GPU page: [block, latent] (canonical_mapping.py)
            kv = self._info.engine_mla_rows(kv)  # the rope key's pairs as vLLM's cache keeps them
            rows = kv.contiguous().view(torch.uint8).numpy().reshape(tokens, layers, -1)
            return rows.view(f"V{rows.shape[-1]}")[..., 0].transpose(1, 0)  # [L, U]: one latent row per item
        # One head's K (or V) is one run of D values in the store and in the page: moved as one opaque item.
        raw = kv.contiguous().view(torch.uint8).numpy().reshape(tokens, layers, 2, heads, -1)
        runs = raw.view(f"V{raw.shape[-1]}")[..., 0]  # [U, L, 2, H]
        if KV_LAYOUTS[self.kv_layout.upper()] == "nhd":  # per layer: [U, H, K|V]
            return runs.transpose(1, 0, 3, 2)
        b = self.blocks_per_file  # per layer and block: [H, block, K|V]
        return runs.reshape(b, self.block_size, layers, 2, heads).transpose(2, 0, 4, 1, 3)

    def _hash(self, obj: Any) -> bytes:
        if self.hash_algorithm == "sha256_cbor":
            return hashlib.sha256(cbor(obj)).digest()
        return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()  # vllm.utils.hashing.sha256


def vllm_kv_cache_groups(info: StoreInfo) -> list[list[int]]:
    """The store's layers in vLLM 0.32.0's KV cache groups, for a server whose hybrid KV cache manager is on (the
    ``OffloadingConnector`` is ``SupportsHMA``): one group of every layer when they share one spec; otherwise
    ``kv_cache_utils._get_kv_cache_groups_uniform_page_size``: layers bucketed by spec in order of first
    appearance, every bucket cut into groups of the smallest bucket's size (the largest's when it is under 1.5
    times that), the ``i``-th of a bucket's ``n`` groups its layers ``i::n`` (a sliding window of another size is
    a spec of its own).

    Example:
        >>> vllm_kv_cache_groups(gemma3_info)  # sliding 0-4 and 6-10, full 5 and 11  # doctest: +SKIP
        [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
    """
    if not info.groups:
        return [list(range(info.num_layers))]
    spec: dict[int, tuple] = {}
    for g in info.groups:
        key = (g.kind, g.window) if g.kind == SLIDING else (FULL,)
        spec.update((i, key) for i in g.layers)
    buckets: dict[tuple, list[int]] = {}
    for i in sorted(spec):
        buckets.setdefault(spec[i], []).append(i)
    if len(buckets) == 1:
        return [sorted(spec)]
    sizes = [len(b) for b in buckets.values()]
    size = max(sizes) if max(sizes) < min(sizes) * 1.5 else min(sizes)
    groups = []
    for layers in buckets.values():
        n = -(-len(layers) // size)
        groups += [layers[i::n] for i in range(n)]
    return groups


@lru_cache(maxsize=4)
def _zeros(n: int) -> np.ndarray:
    """``n`` zero bytes (a row's padding), shared and read-only."""
    z = np.zeros(n, np.uint8)
    z.setflags(write=False)
    return z


def _base_path(fields: dict[str, Any]) -> str:
    """``FileMapper._compute_base_path`` relative to the root: ``<model with / as _>_<sha256[:12]>``."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:BASE_PATH_HASH_LEN]
    return f"{fields['model_name'].replace('/', '_')}_{digest}"


def _seed_text(seed: str | int | None) -> str:
    """The string vLLM hashes for ``NONE_HASH``: PYTHONHASHSEED as written, or the default seed when unset."""
    if seed is None:
        return DEFAULT_NONE_HASH_SEED
    text = str(seed)
    if text != "random" and not (text.isdigit() and int(text) <= 4294967295):
        raise ExportError(
            f"--hash-seed {text!r} is not a PYTHONHASHSEED Python starts with: give the server's value (an integer 0..4294967295)"
        )
    if text == "random":
        raise ExportError("PYTHONHASHSEED=random gives every server process its own NONE_HASH: no export can match it")
    return text
