"""``PrefixgenConnector``: vLLM loads prompt prefixes from a prefixgen store instead of computing them.

vLLM v1 imports a KV connector from any module named in ``kv_transfer_config``, so no vLLM patch
is needed::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PrefixgenConnector",
        "kv_connector_module_path": "prefixgen.integrations.vllm", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"store": "STORE"}}'

Written against the v1 connector API of vLLM 0.32.0 (the API is marked experimental; README
says which versions are tested). vLLM builds one connector per process and role:

* **scheduler** (:meth:`PrefixgenConnector.get_num_new_matched_tokens`): on a lookup thread (vLLM is
  told "not yet", None, and asks again next step: ``schedule()`` never hashes or reads the index), hashes
  the prompt with the store's chained block keys in growing runs (1, 2, 4, ... blocks, stopping at the
  first miss), finds the longest stored prefix of all but the last prompt token; then claims the stored
  tokens beyond vLLM's own prefix-cache hit. Another thread reopens the index every ``refresh_seconds``
  if the store changed (append, compaction, prune, gc). Requests with a LoRA adapter, multimodal inputs, prompt
  embeddings or a cache_salt are skipped (nothing loaded, counted): the store's keys hash the base
  model's token ids only. After vLLM allocated the request's blocks, the load (block locations in
  the store, vLLM block ids) goes to the workers in the step's :class:`PrefixgenConnectorMetadata`.
* **worker** (:meth:`PrefixgenConnector.start_load_kv`): hands each load to a pool of load threads;
  one reads the blocks (only their bytes, CRC-checked, through
  :class:`~prefixgen.store.reader.PrefixStore`, with ``pread``) in pieces of at most ``staging_bytes``
  into a reused read buffer (pinned on CUDA, where the device copies straight out of it): from a head-major
  store (format 5) only this rank's KV heads, one read per block, checked against their own checksums;
  from a token-major one every head, keeping this rank's in host memory. It writes each attention layer's
  share into vLLM's paged cache
  with the layer's own cache-write op (``impl.do_kv_cache_update``, i.e.
  ``cpu_attn_reshape_and_cache`` on CPU and ``reshape_and_cache_flash`` on FlashAttention; on
  CUDA on a side stream), so no backend's memory layout is hard-coded here. A finished load is
  reported through :meth:`get_finished`; vLLM then schedules the request. A load not done within
  ``load_timeout_seconds`` is given up there (it writes nothing more; vLLM recomputes) and its thread,
  stuck in a read, replaced: load threads are daemons, so neither shutdown nor exit waits for a hung read.
  Loads of the same stored blocks at the same moment share one read (single-flight): a load whose blocks a load
  in flight has still to read joins it, and that load's thread writes each piece into both (``shared_loads``).

Layer groups (:mod:`~prefixgen.integrations.vllm.groups`): the connector declares ``SupportsHMA``; vLLM's hybrid
KV cache manager gives each kind of layer (full, sliding window, chunked, MLA, recurrent) a KV cache group with a
block table of its own, and each load writes a layer's tokens into its group's blocks only: a sliding-window or
chunked layer gets the window's (vLLM holds no block before it), an MLA layer the latent. A model with recurrent
state loads nothing (the store holds no state): said at start, counted per request (``skipped_recurrent``).

Store faults are cache misses: a block that fails its CRC, a missing, truncated or unreadable
shard, a damaged index segment are logged once (per shard), counted (:class:`LoadStats`,
:class:`ClaimStats`) and not loaded: the worker reports the vLLM block holding the first token it
could not write (:meth:`get_block_ids_with_load_errors`) and vLLM recomputes from there. The
worker also tells the scheduler which stored blocks and shards failed
(:class:`PrefixgenWorkerMetadata`), and the scheduler no longer claims them.

Both sides refuse, at engine start, what the store cannot serve (:func:`unsupported_features`:
context parallelism, speculative decoding, a KV cache group of a kind it does not load, a
``kv_load_failure_policy`` other than ``recompute``); the scheduler refuses a store built for another
model than vLLM's effective config (weights, architecture, KV shape, positions, tokenizer, every field of
the text config after ``hf_overrides``, the KV dtype, quantization, load format), naming each field that
differs.

Live (:mod:`~prefixgen.integrations.vllm.check`): nothing is loaded until vLLM has computed a request whose
prefix is stored and its own paged KV for those blocks matched the store's (after start, each
:meth:`PrefixgenConnector.reset_cache` and weights found changed), and a ``check_rate`` sample of requests
is compared again; a mismatch stops loading.

The package, one job a module (vLLM v1's split of a connector into its scheduler and worker sides):

* :mod:`.connector`: ``PrefixgenConnector``, the class vLLM builds: start-up checks, then each call handed to its side;
* :mod:`.scheduler`: lookups, claims, index refresh, the loads handed to the workers, the live check's verdicts;
* :mod:`.worker`: ``PrefixgenWorker``, the worker side vLLM calls: loads handed to load threads, shared reads,
  deadlines, what finished or failed; :mod:`.loading`: one load (``Loading``), between its thread and the engine's;
* :mod:`.loader`: the load pipeline: pieces read into staging, rows on the device, writes into vLLM's caches;
* :mod:`.reads`: a worker's store reads, each fault a cache miss; :mod:`.reports`: what its load threads report;
* :mod:`.probes`: the workers' half of the live check (vLLM's KV against the store's, the weights watch);
* :mod:`.staging`: the reused (pinned) read buffers and the copy of a piece to the device;
* :mod:`.metadata`: what the two sides tell each other each step;
* :mod:`.metrics`: :class:`LoadStats`, :class:`ClaimStats`, vLLM's stats and the Prometheus counters;
* :mod:`.refusals`: engine features and requests the connector refuses, the model fingerprint it checks;
* :mod:`.check`: the live check and the engine identity beyond the fingerprint;
* :mod:`.groups`: vLLM's KV cache groups, block tables and slots, each layer's cache write;
* :mod:`.states`: a hybrid model's recurrent states, written once a load's KV is;
* :mod:`.faults` and :mod:`.threads`: store faults as cache misses, logged once; threads a hung read cannot hold up.
"""

from prefixgen.integrations.vllm.connector import PrefixgenConnector
from prefixgen.integrations.vllm.faults import STORE_FAULTS
from prefixgen.integrations.vllm.groups import slot_mapping
from prefixgen.integrations.vllm.metadata import LoadSpec, PrefixgenConnectorMetadata, PrefixgenWorkerMetadata
from prefixgen.integrations.vllm.metrics import (
    PROM_COUNTERS,
    SKIPPED,
    ClaimStats,
    LoadStats,
    PrefixgenConnectorStats,
    PrefixgenPromMetrics,
)
from prefixgen.integrations.vllm.refusals import (
    SUPPORTED_VLLM,
    engine_fingerprint,
    model_folder,
    skip_reason,
    unsupported_features,
)
from prefixgen.integrations.vllm.scheduler import LOOKUP_RUN, stored_prefix
from prefixgen.integrations.vllm.worker import kv_head_range

# What ``kv_connector_module_path: "prefixgen.integrations.vllm"`` and users import (vLLM's connector factory does
# ``getattr(importlib.import_module(path), "PrefixgenConnector")``).
__all__ = [
    "LOOKUP_RUN",
    "PROM_COUNTERS",
    "SKIPPED",
    "STORE_FAULTS",
    "SUPPORTED_VLLM",
    "ClaimStats",
    "LoadSpec",
    "LoadStats",
    "PrefixgenConnector",
    "PrefixgenConnectorMetadata",
    "PrefixgenConnectorStats",
    "PrefixgenPromMetrics",
    "PrefixgenWorkerMetadata",
    "engine_fingerprint",
    "kv_head_range",
    "model_folder",
    "skip_reason",
    "slot_mapping",
    "stored_prefix",
    "unsupported_features",
]
