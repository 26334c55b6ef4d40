"""`prefixgen export --to lmcache`: a store as the files LMCache's ``fs://`` remote backend reads.

Checked against **LMCache 0.5.6** with **vLLM 0.32.0** (LMCacheConnectorV1), ``remote_serde: naive``
and the default ``save_chunk_meta``; tests_lmcache/ compares every part below with LMCache's own
code. What LMCache does with a prompt, and so what an export must hold:

* ``ChunkedTokenDatabase`` cuts the prompt into chunks of ``chunk_size`` tokens (256) and chains a
  hash over them: ``h[i] = H((h[i-1], tuple(chunk_i), ()))``, where ``H`` is vLLM's hash function
  named by ``pre_caching_hash_algorithm`` (``sha256_cbor``: SHA-256 of the canonical CBOR of the
  tuple; ``sha256``: SHA-256 of its pickle) folded to an int by LMCache: the digest's first 8 bytes,
  big-endian. ``h[-1]`` is vLLM's ``NONE_HASH``: ``H(seed)`` folded the same way, where ``seed`` is
  the server's ``PYTHONHASHSEED`` string or, when unset, ``"vllm-none-hash"`` (vLLM 0.32.0's
  ``init_none_hash`` for the SHA-256 functions). Only full chunks are looked up
  (``save_unfull_chunk`` is off by default).
* A chunk's ``CacheEngineKey`` is ``model@world_size@worker_id@hash@dtype`` (``to_string``): vLLM's
  ``--model`` string, the tensor-parallel size and rank (no pipeline parallelism), the hash in
  lowercase hex without padding, and LMCache's name of the KV dtype (``float``, ``half``,
  ``bfloat16``).
* ``FSConnector`` names the file ``key.to_string()`` with ``/`` replaced by ``-SEP-``, plus
  ``.data``, in the ``remote_url`` folder, and reads it as a ``RemoteMetadata`` header (7 native
  int32: payload bytes, memory format, dtype code, 4 shape dims) followed by the payload: the
  chunk's KV in the ``KV_2LTD`` format ``[2 (K, V), layers, chunk tokens, kv_heads * head_dim]``,
  this rank's heads only, in the KV dtype.

The other cache kinds (FORMAT.md, "Layer groups and MLA"):

* **MLA** (``use_mla``, DeepSeek V2/V3): a chunk is ``KV_MLA_FMT`` ``[1, layers, chunk tokens,
  kv_lora_rank + rope]`` (``metadata.get_shapes`` with ``kv_shape`` ``(layers, 1, chunk, 1, latent)``), the
  store's latent rows, the rope key's pairs in place as vLLM's MLA rope (``is_neox_style=False``) leaves them
  (``StoreInfo.engine_mla_rows``; transformers caches them de-interleaved for ``rope_interleave``). The latent is the same on every rank, so LMCache saves it once
  (``save_only_first_rank``, on by default for MLA): the key's world size is 1
  (``TokenDatabase._make_key_by_hash``) and every rank reads worker 0's file
  (``remote_enable_mla_worker_id_as0``). One file per chunk, ``model@1@0@hash@dtype.data``, whatever the
  tensor-parallel size.
* **Sliding window / chunked local attention**: LMCache's vLLM connector (``LMCacheConnectorV1``) does not
  declare ``SupportsHMA``, so vLLM 0.32.0 turns its hybrid KV cache manager off
  (``VllmConfig``: "Turning off hybrid kv cache manager because `--kv-transfer-config` selects a KV
  connector that does not support it") and allocates sliding and chunked layers as full attention
  (``kv_cache_utils._promote_local_kv_cache_specs``): every layer keeps every token's K and V in one KV
  cache group, and LMCache saves and loads ``KV_2LTD`` over all layers, as for a full-attention model.
  The store holds every token's KV of every layer, so the chunk is the plain one.
* **Recurrent state**: refused (``recurrent_refusal``). ``LMCacheConnectorV1``
  (``vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py``) does not declare ``SupportsHMA``, so
  vLLM 0.32.0 turns its hybrid KV cache manager off (``config/vllm.py``, ``VllmConfig.__post_init__``:
  "hybrid SSM models (e.g. Jamba, Bamba) require HMA and will fail at startup without it"). LMCache's
  multi-process connector (``LMCacheMPConnector``, ``lmcache_mp_connector.py``) is ``SupportsHMA`` and keeps
  Mamba state in ``align`` mode (``validate_mamba_step_alignment``), but its chunks live in the LMCache
  server's own storage, which this export does not write.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from prefixgen.errors import ExportError
from prefixgen.export.cbor import cbor
from prefixgen.model import tp_kv_heads

if TYPE_CHECKING:
    from prefixgen.export.base import StoreInfo

LMCACHE_VERSION = "0.5.6"
VLLM_VERSION = "0.32.0"
HASH_ALGORITHMS = ("sha256_cbor", "sha256")
# vLLM 0.32.0 (vllm.v1.core.kv_cache_utils.DEFAULT_NONE_HASH_SEED): the seed of the first hash of the
# SHA-256 functions when the server's PYTHONHASHSEED is unset.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
# LMCache 0.5.6: lmcache.utils.TORCH_DTYPE_TO_STR_DTYPE (in the key) and lmcache.v1.protocol.DTYPE_TO_INT
# (in the header), for the KV dtypes a store has.
DTYPE_NAMES = {"float32": "float", "float16": "half", "bfloat16": "bfloat16"}
DTYPE_CODES = {"float32": 4, "float16": 2, "bfloat16": 3}
KV_2LTD = 1  # lmcache.v1.memory_management.MemoryFormat.KV_2LTD
KV_MLA_FMT = 6  # lmcache.v1.memory_management.MemoryFormat.KV_MLA_FMT
HEADER = struct.Struct("<7i")  # RemoteMetadata of one group: length, fmt, dtype, shape[4] (LMCache packs native "i")
MAX_NAME_BYTES = 255  # a file name longer than this cannot exist (LMCache's reads would miss)


@dataclass
class LMCacheTarget:
    """LMCache's ``fs://`` layout: one file per full chunk of ``chunk_size`` tokens per TP rank.

    ``model_name`` is vLLM's ``--model`` string as the server is started; ``hash_seed`` its
    ``PYTHONHASHSEED`` (None: unset); ``chunk_size`` and ``hash_algorithm`` LMCache's ``chunk_size``
    and ``pre_caching_hash_algorithm``; ``tp_size`` vLLM's ``--tensor-parallel-size``. Any of them
    different on the server and the files are never found (a miss, never wrong KV).

    ``check(info)`` comes first: ``names`` and ``files`` use the store's dtype and heads.

    Example:
        >>> t = LMCacheTarget(model_name="org/m", hash_seed=0, chunk_size=256)
        >>> t.check(StoreInfo.from_manifest(store.manifest))  # a float32 store  # doctest: +SKIP
        >>> t.names(t.next_key(t.first_key(), tokens[:256]))  # doctest: +SKIP
        ['org-SEP-m@1@0@e293db1618fad666@float.data']
    """

    name: ClassVar[str] = "lmcache"
    recurrent_refusal: ClassVar[str] = (
        "LMCache's in-process connector (LMCacheConnectorV1) is not SupportsHMA, so vLLM 0.32.0 turns its hybrid KV "
        "cache manager off, and without it a hybrid SSM model fails at startup (vllm/config/vllm.py); LMCache's "
        "multi-process connector (LMCacheMPConnector) does keep Mamba state, but in its server's own storage, "
        "which this export does not write"
    )

    model_name: str
    hash_seed: str | int | None = None
    chunk_size: int = 256
    hash_algorithm: str = "sha256_cbor"
    tp_size: int = 1

    @property
    def unit_tokens(self) -> int:
        return self.chunk_size

    def check(self, info: StoreInfo) -> None:
        """Refuse what LMCache 0.5.6 cannot be given: bad parameters, a chunk size that is not a
        multiple of the store's block size, a dtype it has no name for, heads that do not split
        over ``tp_size``, a chunk too large for its int32 header, a name too long for a file."""
        if not self.model_name:
            raise ExportError("--model-name is empty: give the --model string the vLLM server is started with")
        if self.hash_algorithm not in HASH_ALGORITHMS:
            raise ExportError(
                f"hash {self.hash_algorithm!r} is not supported: use one of {', '.join(HASH_ALGORITHMS)} "
                "(LMCache's pre_caching_hash_algorithm; the others are not reproducible outside the server)"
            )
        _seed_text(self.hash_seed)  # refuses a seed Python would not start with
        if self.chunk_size <= 0 or self.chunk_size % info.block_size:
            raise ExportError(
                f"chunk size {self.chunk_size} is not a multiple of the store's block size {info.block_size}: "
                f"LMCache chunks must be whole stored blocks (use a multiple of {info.block_size}, e.g. 256)"
            )
        if info.kv_dtype not in DTYPE_NAMES:
            raise ExportError(f"KV dtype {info.kv_dtype!r} has no LMCache name (supported: {', '.join(DTYPE_NAMES)})")
        self._info = info
        self._mla = info.kind == "mla"
        # MLA: one latent "head", saved once for every rank (worker 0's file); otherwise each rank's heads.
        self._heads = [range(1)] if self._mla else [_head_range(info.num_kv_heads, self.tp_size, r) for r in range(self.tp_size)]
        payload = info.parts * info.num_layers * self.chunk_size * len(self._heads[0]) * info.head_dim * info.torch_dtype.itemsize
        if payload >= 2**31:
            raise ExportError(
                f"a chunk of {self.chunk_size} tokens is {payload} bytes per rank: LMCache's header holds "
                "its length as int32 (under 2 GiB); use a smaller --chunk-size or a larger --tp-size"
            )
        longest = max(len(n.encode()) for n in self.names(2**64 - 1))
        if longest > MAX_NAME_BYTES:
            raise ExportError(
                f"LMCache's file names for model {self.model_name!r} are {longest} bytes, over the {MAX_NAME_BYTES} "
                "a file system allows: LMCache could not find them either; serve the model under a shorter --model"
            )

    def first_key(self) -> int:
        """vLLM's ``NONE_HASH`` as LMCache folds it: the hash before a prompt's first chunk."""
        return _fold(self._hash(_seed_text(self.hash_seed)))

    def next_key(self, parent: int, tokens: np.ndarray) -> int:
        """LMCache's chunk hash of ``tokens`` (int64 ``[chunk_size]``) after the chunk hashed ``parent``."""
        return _fold(self._hash((parent, tuple(int(t) for t in tokens), ())))

    def names(self, key: int) -> list[str]:
        """The chunk's file name for each TP rank (``FSConnector._get_file_name``); for MLA the one file every
        rank reads (world size 1, worker 0)."""
        dtype = DTYPE_NAMES[self._info.kv_dtype]
        world, ranks = (1, [0]) if self._mla else (self.tp_size, range(self.tp_size))
        return [f"{self.model_name}@{world}@{rank}@{key:x}@{dtype}".replace("/", "-SEP-") + ".data" for rank in ranks]

    def files(self, key: int, kv: torch.Tensor) -> Iterable[tuple[str, list]]:
        """Each rank's file of the chunk: ``RemoteMetadata`` header, then its heads' KV as
        ``[2, layers, chunk_size, heads * head_dim]``. ``kv`` is ``[chunk_size, L, 2, H, D]``. MLA (``kv``
        ``[chunk_size, L, 1, 1, latent]``): one file, ``KV_MLA_FMT`` ``[1, layers, chunk_size, latent]``."""
        kv = self._info.engine_mla_rows(kv)  # MLA: the rope key's pairs as vLLM's cache keeps them
        tokens, layers, parts, heads, head_dim = kv.shape
        code = DTYPE_CODES[self._info.kv_dtype]
        raw = kv.contiguous().view(torch.uint8).numpy().reshape(tokens, layers, parts, -1)  # [T, L, parts, H * D bytes]
        if self._mla:
            rows = raw.view(f"V{raw.shape[-1]}")[:, :, 0, 0].transpose(1, 0)  # [L, T]: one latent row per item
            header = HEADER.pack(rows.size * rows.itemsize, KV_MLA_FMT, code, 1, layers, tokens, head_dim)
            yield self.names(key)[0], [header, rows]
            return
        for name, rank_heads in zip(self.names(key), self._heads):
            n = len(rank_heads)
            # A rank's heads are one contiguous run of n * D values in the store and in the file: seen as one
            # opaque item each, the [T, L, 2] -> [2, L, T] transpose is a memcpy per run, not per value.
            runs = raw.view(f"V{raw.shape[-1] * n // heads}")  # [T, L, 2, heads // n]
            part = runs[:, :, :, rank_heads.start // n].transpose(2, 1, 0)  # [2, L, T]
            header = HEADER.pack(part.size * part.itemsize, KV_2LTD, code, 2, layers, tokens, n * head_dim)
            yield name, [header, part]  # the KV written run by run, straight from ``kv`` (prefixgen.export.iov)

    def _hash(self, obj: Any) -> bytes:
        if self.hash_algorithm == "sha256_cbor":
            return hashlib.sha256(cbor(obj)).digest()
        return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()  # vLLM's sha256


def _fold(digest: bytes) -> int:
    """LMCache's ``_normalize_hash_to_int``: a digest as its first 8 bytes, big-endian."""
    return int.from_bytes(digest[:8], "big")


def _seed_text(seed: str | int | None) -> str:
    """The string vLLM hashes for ``NONE_HASH``: PYTHONHASHSEED as written (Python accepts ``random``
    or an integer 0..4294967295), or vLLM's default seed when unset."""
    if seed is None:
        return DEFAULT_NONE_HASH_SEED
    text = str(seed)
    if text != "random" and not (text.isdigit() and int(text) <= 4294967295):
        raise ExportError(
            f"--hash-seed {text!r} is not a PYTHONHASHSEED Python starts with: give the server's value (an integer 0..4294967295)"
        )
    return text


def _head_range(total: int, tp_size: int, rank: int) -> range:
    """The KV heads vLLM gives TP rank ``rank``: consecutive slices of ``total / tp_size``, or one head
    replicated over ``tp_size / total`` ranks (``QKVParallelLinear``)."""
    heads = tp_kv_heads(total, tp_size, rank)
    if heads is None:
        raise ExportError(f"the store's {total} KV heads do not split over tensor parallel size {tp_size}")
    return heads
