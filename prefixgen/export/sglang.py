"""SGLang's HiCache file backend (``--hicache-storage-backend file``), as SGLang 0.5.23 reads it.

Checked against SGLang 0.5.23's own code (``tests_sglang/`` runs it):

* one file per page of ``--page-size`` tokens, ``{key}_{model}_{tp_rank}_{tp_size}.bin``
  (``HiCacheFile.config_suffix``; pipeline-parallel and MLA servers name files otherwise and are
  not supported), ``model`` the served model name with "/" replaced by "-";
* ``key`` the page's hash as ``sglang.srt.mem_cache.utils.get_hash_str`` computes it: SHA-256 over
  the previous page's digest (none for the first page: requests without ``extra_key`` or
  ``cache_salt`` start unseeded) then the page's token ids as little-endian uint32, as hex;
* content: the raw bytes of one page of the host pool (``MHATokenToKVPoolHost.get_data_page``,
  flattened), holding the rank's KV heads only, in the KV cache dtype:

  - ``page_first``: ``[2 (K, V), page_size, layers, heads, head_dim]``
  - ``layer_first`` and ``page_first_direct``: ``[2, layers, page_size, heads, head_dim]``

SGLang checks nothing inside a file: a wrong layout or dtype is silently wrong KV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from prefixgen.config import SGLANG_LAYOUTS
from prefixgen.errors import ExportError
from prefixgen.export.base import StoreInfo
from prefixgen.model import tp_kv_heads

SGLANG_VERSION = "0.5.23"  # the version whose hash, names and layouts this target was checked against


@dataclass(slots=True)
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
        _rank_heads(info.num_kv_heads, self.tp_size)  # raises when the heads do not split over the ranks

    def first_key(self) -> str | None:
        return None  # SGLang's first page is unseeded (requests without extra_key or cache_salt)

    def next_key(self, parent: str | None, tokens: np.ndarray) -> str:
        h = hashlib.sha256()
        if parent is not None:
            h.update(bytes.fromhex(parent))
        h.update(np.ascontiguousarray(tokens, dtype="<u4").tobytes())
        return h.hexdigest()

    def names(self, key: str) -> list[str]:
        model = "-".join(self.model_name.split("/"))
        return [f"{key}_{model}_{rank}_{self.tp_size}.bin" for rank in range(self.tp_size)]

    def files(self, key: str, kv: torch.Tensor) -> Iterator[tuple[str, np.ndarray]]:
        """One file per TP rank: that rank's heads of ``kv`` ([page, layers, 2, heads, dim]) in ``layout``."""
        page, layers, _, heads, dim = kv.shape
        raw = kv.contiguous().view(torch.uint8).numpy().reshape(page, layers, 2, -1)  # [P, L, 2, H * D bytes]
        # The layouts only move whole runs of a rank's heads (h * D values, contiguous in the store and in
        # the file): seen as one opaque item each, the transpose is a memcpy per run, not per value.
        order = (2, 0, 1) if self.layout == "page_first" else (2, 1, 0)  # [2, P, L] or [2, L, P]
        for name, rank_heads in zip(self.names(key), _rank_heads(heads, self.tp_size)):
            n = rank_heads.stop - rank_heads.start
            runs = raw.view(f"V{raw.shape[-1] * n // heads}")  # [P, L, 2, heads // n]: one item per n heads
            part = runs[:, :, :, rank_heads.start // n].transpose(order)
            yield name, part  # written run by run, straight from ``kv`` (prefixgen.export.iov)


def _rank_heads(num_kv_heads: int, tp_size: int) -> list[slice]:
    """The KV heads each TP rank holds, as SGLang's QKV projection splits them: consecutive groups of
    ``heads / tp`` when tp divides the heads; one head shared by ``tp / heads`` ranks when the heads
    divide tp."""
    heads = [tp_kv_heads(num_kv_heads, tp_size, rank) for rank in range(tp_size)]
    if None not in heads:
        return [slice(h.start, h.stop) for h in heads]
    raise ExportError(f"--tp-size {tp_size} does not split the model's {num_kv_heads} KV heads: SGLang cannot serve it that way")
