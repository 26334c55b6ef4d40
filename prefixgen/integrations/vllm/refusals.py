"""What the connector refuses to serve, and the model identity it checks at engine start: engine features it
cannot load into (:func:`unsupported_features`), requests whose prefix the store's keys cannot name
(:func:`skip_reason`), and the fingerprint of the model vLLM serves (:func:`engine_fingerprint`), which a store must
match."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefixgen.format import ModelFingerprint
from prefixgen.integrations.vllm.groups import group_problems, vllm_groups
from prefixgen.model import checkpoint_weights_digest, config_fingerprint, config_kv_layout, load_tokenizer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

SUPPORTED_VLLM = "0.32.0"


def model_folder(vllm_config: VllmConfig) -> Path:
    """The local folder of the checkpoint vLLM loads (a Hub id resolves to its snapshot in the HF cache)."""
    model = vllm_config.model_config.model
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model,
            revision=vllm_config.model_config.revision,
            cache_dir=vllm_config.load_config.download_dir,
            allow_patterns=["*.safetensors", "*.json"],
            local_files_only=True,
        )
    )


def engine_fingerprint(vllm_config: VllmConfig, chat_template: str | None = None) -> ModelFingerprint:
    """The prefixgen fingerprint of the model vLLM serves: what ``prefixgen build`` writes into the
    manifest for the same model. The config is vLLM's effective one (``model_config.hf_config``: the
    checkpoint's with ``hf_overrides`` applied, e.g. a YaRN ``rope_parameters``), the weights digest
    that of the checkpoint's files.

    Example:
        >>> store.manifest.model.differences(engine_fingerprint(vllm_config))  # doctest: +SKIP
        []
    """
    mc = vllm_config.model_config
    text = mc.hf_text_config
    tokenizer = load_tokenizer(mc.tokenizer, trust_remote_code=mc.trust_remote_code, chat_template=chat_template)
    layout = config_kv_layout(text, str(mc.dtype).removeprefix("torch."))
    tied = bool(getattr(text, "tie_word_embeddings", False))
    weights = checkpoint_weights_digest(model_folder(vllm_config), tied, mc.dtype)  # the weights as vLLM loads them
    # The text config vLLM computes with (after hf_overrides; a composite model's language model), under the
    # architecture of the whole checkpoint (what a build records).
    architecture = str((getattr(mc.hf_config, "architectures", None) or [""])[0])
    return config_fingerprint(text, tokenizer, layout, weights, name=mc.model, architecture=architecture)


def unsupported_features(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[str]:
    """One line per engine feature the connector refuses at start, naming the feature and the setting
    (empty when it can serve this engine).

    Example:
        >>> unsupported_features(vllm_config, kv_cache_config)  # doctest: +SKIP
        ['speculative decoding (method eagle): ...']
    """
    problems = []
    pc = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, name, 1) > 1:
            problems.append(
                f"context parallelism ({name}={getattr(pc, name)}): vLLM then spreads each block's tokens over "
                "several ranks, which the connector does not write; run with context parallel size 1"
            )
    spec = vllm_config.speculative_config
    if spec is not None:
        problems.append(
            f"speculative decoding (method {spec.method}): its draft layers have KV caches the store does not hold; "
            "run without --speculative-config"
        )
    problems += group_problems(vllm_groups(kv_cache_config))  # each group loads into its own blocks (groups.py)
    policy = vllm_config.kv_transfer_config.kv_load_failure_policy
    if policy != "recompute":
        # vLLM's config keeps no record of which fields were set, so an explicit "fail" looks like the default:
        # the connector cannot tell them apart and does not override either.
        problems.append(
            f"kv_load_failure_policy {policy!r}: a stored block that cannot be read is a cache miss vLLM must "
            'recompute; add "kv_load_failure_policy": "recompute" to --kv-transfer-config (with "fail", vLLM fails '
            "the request instead)"
        )
    return problems


def state_problems(vllm_config: VllmConfig) -> list[str]:
    """Why the connector cannot load a hybrid store's recurrent states into this engine (empty when it can).

    At tensor parallelism above 1 vLLM 0.32.0 gives each rank a slice of every Mamba/GDN layer's conv channels and
    heads (``mamba_utils.MambaStateShapeCalculator``: ``divide(conv_dim, tp_world_size)``, ``divide(num_heads,
    tp_world_size)``; Mamba2 also repeats its groups over the ranks, ``extra_groups_for_head_shards``); a store keeps
    the whole layer's state, which the connector writes as it is (``states.py``)."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1:
        return [
            f"recurrent state with tensor parallelism (tensor_parallel_size={tp}): vLLM splits each Mamba/GDN layer's "
            "state over the ranks, and the connector writes a stored state whole; run with tensor_parallel_size 1, "
            "or serve this model without the connector"
        ]
    return []


def skip_reason(request: Request) -> str | None:
    """Why the store cannot serve ``request`` (vLLM's own block hashes include these, the store's keys hash
    token ids of the base model only), or None. The reasons are the ``skipped_<reason>`` fields of :class:`ClaimStats`.

    Example:
        >>> skip_reason(request_with_lora)  # doctest: +SKIP
        'lora'
    """
    if request.lora_request is not None:
        return "lora"  # prefixgen builds with the base model's weights only: no store is built for an adapter
    if request.mm_features:
        return "multimodal"
    if request.prompt_embeds is not None or request.prompt_token_ids is None:
        return "prompt_embeds"
    if request.cache_salt:
        return "cache_salt"
    return None
