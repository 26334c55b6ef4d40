"""SGLang's HiCache file backend (``--hicache-storage-backend file``), as SGLang 0.5.23 reads it.

Checked against SGLang 0.5.23's own code (``tests_sglang/`` runs it):

* one file per page of ``--page-size`` tokens, ``{key}_{model}_{tp_rank}_{tp_size}.bin``
  (``HiCacheFile.config_suffix``; pipeline-parallel servers name files otherwise and are not
  supported), ``model`` the served model name with "/" replaced by "-";
* ``key`` the page's hash as ``sglang.srt.mem_cache.utils.get_hash_str`` computes it: SHA-256 over
  the previous page's digest (none for the first page: requests without ``extra_key`` or
  ``cache_salt`` start unseeded) then the page's token ids as little-endian uint32, as hex;
* content: the raw bytes of one page of the host pool (``MHATokenToKVPoolHost.get_data_page``,
  flattened), holding the rank's KV heads only, in the KV cache dtype:

  - ``page_first``: ``[2 (K, V), page_size, layers, heads, head_dim]``
  - ``layer_first`` and ``page_first_direct``: ``[2, layers, page_size, heads, head_dim]``

The other cache kinds (FORMAT.md, "Layer groups and MLA"):

* **MLA** (DeepSeek V2/V3): SGLang keeps the latent once, replicated on every TP rank, in
  ``MLATokenToKVPoolHost``; ``HiCacheFile`` names its pages without the rank (``is_mla_model``:
  ``{key}_{model}.bin``, one file for every rank) and a page is ``get_data_page``'s
  ``[page_size, layers, 1, kv_lora_rank + rope]`` (``page_first``) or ``[layers, page_size, 1, ...]``
  (``layer_first``, ``page_first_direct``): the store's latent rows, with the rope key's pairs put back
  in place for ``rope_interleave`` models (``StoreInfo.engine_mla_rows``: SGLang's DeepSeek attention
  rotates with ``is_neox_style = not rope_interleave``, transformers caches the result de-interleaved).
* **Sliding window / chunked, hybrid SWA** (the architectures ``configs.model_config.is_hybrid_swa_model``
  lists, GPT-OSS among them): two host pools (``build_hybrid_swa_group``): ``kv`` over the full-attention
  layers and ``swa`` over the sliding ones (``get_hybrid_layer_ids``), each an ``MHATokenToKVPoolHost``
  of its own layers. A page's ``swa`` file is ``{key}.swa`` plus the rank suffix
  (``HiCacheFile._log_key``); SGLang loads the pages of the window before a hit (``TRAILING_PAGES``),
  and the export writes every page's, so any hit finds its window. With the file backend the pools are
  separate (``supports_page_envelope_host`` is for no backend or ``mori`` only).
* **Sliding window / chunked, other architectures** (Gemma 2/3, Mistral with a window): SGLang keeps
  every token of every layer in one MHA pool and masks by the window, so a page is the plain layout over
  all layers, as for full attention.
* **Recurrent state** (hybrids: Qwen3-Next's Gated DeltaNet, Granite 4.0's Mamba2): SGLang keeps the KV of the
  attention layers in the ``kv`` pool (the store's rows, which hold those layers only) and a state per prefix end
  in its Mamba host pool (``MambaPoolHost``, ``PoolName.MAMBA``). ``HiCacheFile`` keeps the state after a page as
  ``{key}.mamba`` plus the rank suffix (``_get_suffixed_key``: TP-sharded even for MLA models), read with hit
  policy ``TRAILING_PAGES`` over the last page (``_sync_trailing_keys``: "for mamba (N=1) this is just the last
  hit page hash"), so a prompt is restored up to the last page with a state file. The export writes one where
  a page ends on a stored state (the build's stride and record ends). A state page is ``get_data_page``:
  the temporal (SSM) state ``[R, 1, *temporal]`` in its dtype then the conv state ``[R, 1, channels, kernel - 1]``
  (``_iter_page_tensors``, page-first layouts only: ``MambaPoolHost`` asserts ``page_first`` or
  ``page_first_direct``), in SGLang's default state dtypes (``mamba2_state_dtype``: conv bfloat16 from
  ``SGLANG_MAMBA_CONV_DTYPE``, SSM float32). Gated DeltaNet's state is ``[heads, value_dim, key_dim]`` in SGLang
  (``Qwen3NextConfig.mamba2_cache_params``: ``head_dim`` the value dim, ``state_size`` the key dim) and
  ``[heads, key_dim, value_dim]`` in transformers, so it is transposed; Mamba2's is ``[heads, head_dim, d_state]``
  in both. One TP rank only (SGLang splits the conv channels per q/k/v block over ranks).

SGLang checks nothing inside a file: a wrong layout or dtype is silently wrong KV (``HiCacheFile.get`` reads one
host page's bytes and takes a longer file too). So the export writes the server's KV dtype (``kv_dtype``;
:func:`sglang_kv_dtype` resolves ``auto`` as SGLang does) and records it in ``prefixgen-export.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from prefixgen.cache_spec import CHUNKED, FULL, RECURRENT, SLIDING
from prefixgen.config import SGLANG_LAYOUTS
from prefixgen.errors import ExportError
from prefixgen.export.base import StoreInfo
from prefixgen.format import TORCH_DTYPES
from prefixgen.model import tp_kv_heads

SGLANG_VERSION = "0.5.23"  # the version whose hash, names and layouts this target was checked against
# SGLang 0.5.23's configs.model_config.is_hybrid_swa_model: the architectures served with a separate SWA pool
# (with --disable-hybrid-swa-memory off, its default). Others keep sliding layers' every token in the one pool.
HYBRID_SWA_ARCHITECTURES = frozenset(
    {
        "BeamForCausalLM",
        "Llama4ForConditionalGeneration",
        "GptOssForCausalLM",
        "GraniteSWAForCausalLM",
        "GraniteMoeSWAForCausalLM",
        "IQuestQ1ForCausalLM",
        "MiMoV2ForCausalLM",
        "MiMoV2FlashForCausalLM",
        "Step3p5ForCausalLM",
        "Step3p7ForConditionalGeneration",
        "Gemma4ForCausalLM",
        "Gemma4ForConditionalGeneration",
        "Gemma4UnifiedForConditionalGeneration",
        "LagunaForCausalLM",
        "MellumForCausalLM",
        "MuseGlimmerForCausalLM",
        "MuseGlimmerForConditionalGeneration",
        "InklingForConditionalGeneration",
        "UnlimitedOCRForCausalLM",
    }
)
SWA_SUFFIX = ".swa"  # HiCacheFile._log_key: a page's key in the SWA pool (PoolName.SWA)
MAMBA_SUFFIX = ".mamba"  # HiCacheFile._log_key: a page's key in the Mamba state pool (PoolName.MAMBA)
# SGLang 0.5.23's mamba2_state_dtype defaults: SGLANG_MAMBA_CONV_DTYPE "bfloat16", the SSM state float32.
STATE_DTYPES = {"conv": torch.bfloat16, "ssm": torch.float32}
# The hybrids whose state layout in SGLang was checked against the store's (tests_sglang/test_sglang_cache_kinds.py):
# model type -> whether SGLang's SSM state is the store's (transformers') with its last two axes swapped.
STATE_TRANSPOSED = {"qwen3_next": True, "granitemoehybrid": False}


@dataclass  # not slots: ``check`` keeps what it derives from the store on the instance
class SGLangTarget:
    """Pages for SGLang's HiCache file backend (see the module's docstring).

    Example:
        >>> t = SGLangTarget(model_name="Qwen/Qwen3-8B", tp_size=2)
        >>> t.names(t.next_key(t.first_key(), np.arange(16)))[1][-26:]
        '_Qwen-Qwen3-8B_1_2.bin'
    """

    name: ClassVar[str] = "sglang"

    model_name: str
    page_size: int = 16
    tp_size: int = 1
    layout: str = "page_first"
    kv_dtype: str = ""  # the server's KV dtype the files hold ("": the store's; see sglang_kv_dtype)

    @property
    def unit_tokens(self) -> int:
        return self.page_size

    def check(self, info: StoreInfo) -> None:
        """Refuse what SGLang's MHA host pool cannot hold as this store has it."""
        if self.layout not in SGLANG_LAYOUTS:
            raise ExportError(f"SGLang layout {self.layout!r} is not one of {', '.join(SGLANG_LAYOUTS)}")
        if info.storage == "fp8":
            raise ExportError(
                "the store holds fp8 KV with per-block scales, which SGLang's fp8 KV cache (one scale per layer) "
                "cannot read: rebuild the store with --kv-dtype auto to export it to SGLang"
            )
        if self.kv_dtype and self.kv_dtype not in SGLANG_KV_DTYPES:
            raise ExportError(f"--kv-dtype {self.kv_dtype!r} is not one of {', '.join(SGLANG_KV_DTYPES)}")
        self._info = info
        self._mla = info.kind == "mla"
        if RECURRENT in info.group_kinds():
            self._check_states(info)
        if self._mla:
            self._pools = []  # one latent page file, replicated over the ranks
            return
        _rank_heads(info.num_kv_heads, self.tp_size)  # raises when the heads do not split over the ranks
        local = info.layers_of(SLIDING, CHUNKED)
        if local and info.architecture in HYBRID_SWA_ARCHITECTURES:
            # (pool's key suffix, its layers): the full-attention pool, then the SWA pool of the local layers
            self._pools = [("", info.layers_of(FULL)), (SWA_SUFFIX, local)]
            self._pools = [(suffix, layers) for suffix, layers in self._pools if layers]
        else:
            self._pools = [("", list(range(info.num_layers)))]

    def _check_states(self, info: StoreInfo) -> None:
        """Refuse a hybrid store whose states SGLang's Mamba host pool could not take as exported."""
        if info.model_type not in STATE_TRANSPOSED:
            raise ExportError(
                f"{info.model_type}'s recurrent state layout in SGLang is not checked by this export (checked: "
                f"{', '.join(sorted(STATE_TRANSPOSED))}): serve the store with PrefixStore.load or prefixgen serve"
            )
        if self.layout not in ("page_first", "page_first_direct"):
            raise ExportError(
                f"SGLang keeps a hybrid model's recurrent state only with --hicache-mem-layout page_first or "
                f"page_first_direct (MambaPoolHost asserts it), not {self.layout}: export with --layout page_first"
            )
        if self.tp_size != 1:
            raise ExportError(
                "--tp-size above 1 is not supported for a hybrid model's recurrent state (SGLang splits its conv "
                "channels per q/k/v block over the ranks): export with --tp-size 1"
            )

    def state_names(self, key: str) -> list[str]:
        """The state file of the page ``key`` (``HiCacheFile._get_suffixed_key``: the rank suffix, rank 0 of 1)."""
        return [f"{key}{MAMBA_SUFFIX}_{'-'.join(self.model_name.split('/'))}_0_{self.tp_size}.bin"]

    def state_files(self, key: str, conv: torch.Tensor, ssm: torch.Tensor) -> Iterator[tuple[str, list[np.ndarray]]]:
        """The state after the page ``key`` as ``MambaPoolHost.get_data_page`` holds it: the SSM state
        ``[R, 1, *temporal]`` (Gated DeltaNet's last two axes swapped) then the conv state ``[R, 1, channels,
        kernel - 1]``, each in SGLang's default state dtype. ``conv``/``ssm`` as the store keeps them."""
        if STATE_TRANSPOSED[self._info.model_type]:
            ssm = ssm.transpose(-1, -2)  # [R, heads, key_dim, value_dim] -> SGLang's [R, heads, value_dim, key_dim]
        parts = [
            t.to(STATE_DTYPES[name]).contiguous().view(torch.uint8).reshape(-1).numpy()
            for name, t in (("ssm", ssm), ("conv", conv))
        ]
        yield self.state_names(key)[0], parts

    def first_key(self) -> str | None:
        return None  # SGLang's first page is unseeded (requests without extra_key or cache_salt)

    def next_key(self, parent: str | None, tokens: np.ndarray) -> str:
        h = hashlib.sha256()
        if parent is not None:
            h.update(bytes.fromhex(parent))
        h.update(np.ascontiguousarray(tokens, dtype="<u4").tobytes())
        return h.hexdigest()

    def names(self, key: str) -> list[str]:
        """The page's files: per pool (full attention, then SWA for a hybrid model) one per TP rank; one for an
        MLA model (its latent is the same on every rank). ``check`` comes first."""
        model = "-".join(self.model_name.split("/"))
        if getattr(self, "_mla", False):
            return [f"{key}_{model}.bin"]
        pools = getattr(self, "_pools", None) or [("", [])]
        return [f"{key}{suffix}_{model}_{rank}_{self.tp_size}.bin" for suffix, _ in pools for rank in range(self.tp_size)]

    def files(self, key: str, kv: torch.Tensor) -> Iterator[tuple[str, np.ndarray]]:
        """The page's files (``names``): per pool and TP rank, that rank's heads of the pool's layers of ``kv``
        ([page, layers, 2, heads, dim]) in ``layout``; for MLA (``kv`` [page, layers, 1, 1, latent]) the latent
        page once."""
        if self.kv_dtype and kv.dtype != TORCH_DTYPES[self.kv_dtype]:
            kv = kv.to(TORCH_DTYPES[self.kv_dtype])  # the server's KV dtype, rounded as its own cast would
        kv = self._info.engine_mla_rows(kv)  # MLA: the rope key's pairs as SGLang's cache keeps them
        page, layers, parts, heads, dim = kv.shape
        raw = kv.contiguous().view(torch.uint8).numpy().reshape(page, layers, parts, -1)  # [P, L, parts, H * D bytes]
        names = iter(self.names(key))
        if self._mla:
            rows = raw.view(f"V{raw.shape[-1]}")[:, :, 0, 0]  # [P, L]: one latent row per item
            yield next(names), rows if self.layout == "page_first" else rows.transpose(1, 0)
            return
        # The layouts only move whole runs of a rank's heads (h * D values, contiguous in the store and in
        # the file): seen as one opaque item each, the transpose is a memcpy per run, not per value.
        order = (2, 0, 1) if self.layout == "page_first" else (2, 1, 0)  # [2, P, L] or [2, L, P]
        for _, pool_layers in self._pools:
            pool = raw if len(pool_layers) == layers else raw[:, pool_layers]  # [P, pool layers, 2, H * D bytes]
            for rank_heads in _rank_heads(heads, self.tp_size):
                n = rank_heads.stop - rank_heads.start
                runs = pool.view(f"V{raw.shape[-1] * n // heads}")  # [P, l, 2, heads // n]: one item per n heads
                part = runs[:, :, :, rank_heads.start // n].transpose(order)
                yield next(names), part  # written run by run, straight from ``kv`` (prefixgen.export.iov)


SGLANG_KV_DTYPES = ("float32", "bfloat16", "float16")


def sglang_kv_dtype(requested: str, model: str) -> str:
    """The KV dtype an SGLang 0.5.23 server of ``model`` (a folder or Hub id in the local cache) keeps, for
    ``--kv-dtype`` ``requested``: a dtype name as is; ``auto`` as the server resolves ``--dtype auto
    --kv-cache-dtype auto`` (``_get_and_verify_dtype`` and ``configure_kv_cache_dtype``): the config's dtype, a
    float32 (or unset) config served as float16 (bfloat16 for Gemma), and fp8 when the checkpoint's quantization
    config says ``kv_cache_quant_algo: FP8``, which the export refuses (SGLang's fp8 cache has one scale per
    layer, taken from the checkpoint).

    Example:
        >>> sglang_kv_dtype("auto", "models/stories260K")  # a float32 config
        'float16'
    """
    if requested != "auto":
        if requested not in SGLANG_KV_DTYPES:
            raise ExportError(f"--kv-dtype {requested!r}: choose auto or one of {', '.join(SGLANG_KV_DTYPES)}")
        return requested
    from prefixgen.errors import ModelError
    from prefixgen.model import load_config

    try:
        config = load_config(model)
    except ModelError as exc:
        raise ExportError(
            f"--kv-dtype auto needs the model's config to know the KV dtype SGLang will keep ({exc}); pass "
            "--kv-dtype with the server's dtype (its --dtype, or float16 for a float32 model served with --dtype auto)"
        ) from None
    quant = getattr(config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else {}
    scheme = quant.get("kv_cache_scheme")
    fp8 = str(quant.get("kv_cache_quant_algo") or "").upper() == "FP8" or (
        isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8
    )
    if fp8:
        raise ExportError(
            f"{model}'s quantization config asks for an fp8 KV cache (kv_cache_quant_algo FP8), which SGLang then keeps "
            "with one scale per layer from the checkpoint: prefixgen cannot export that; serve with --kv-cache-dtype "
            "bf16 and export with --kv-dtype bfloat16"
        )
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    if name in ("float32", "float"):
        return "bfloat16" if str(getattr(config, "model_type", "")).startswith("gemma") else "float16"
    if name not in SGLANG_KV_DTYPES:
        raise ExportError(f"{model}'s config dtype {name!r} is not one SGLang keeps KV in: pass --kv-dtype")
    return name


def _rank_heads(num_kv_heads: int, tp_size: int) -> list[slice]:
    """The KV heads each TP rank holds, as SGLang's QKV projection splits them: consecutive groups of
    ``heads / tp`` when tp divides the heads; one head shared by ``tp / heads`` ranks when the heads
    divide tp."""
    heads = [tp_kv_heads(num_kv_heads, tp_size, rank) for rank in range(tp_size)]
    if None not in heads:
        return [slice(h.start, h.stop) for h in heads]
    raise ExportError(f"--tp-size {tp_size} does not split the model's {num_kv_heads} KV heads: SGLang cannot serve it that way")
