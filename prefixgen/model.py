"""Loading a model and tokenizer, what the model is for the manifest (its fingerprint) and the shape of its
KV cache: the one place the build and the servers get a model from.

Both the build (to write the manifest) and the loader (``check_compatible``) use this, so a store
is refused for any model whose fingerprint differs in an identity field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import transformers

from prefixgen.compat import cache_kwargs, output_cache
from prefixgen.errors import ModelError
from prefixgen.format import KVLayout, ModelFingerprint

# Samples per parameter for the weights digest: enough to see any fine-tune, cheap for 70B.
_SAMPLES = 1 << 16


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and up to 65,536 evenly strided elements,
    rounded to bfloat16 so a model loaded in float32 or bfloat16 from the same checkpoint
    gives the same digest.

    Example:
        >>> len(weights_digest(torch.nn.Linear(2, 2)))
        64
    """
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step][:_SAMPLES].to(torch.bfloat16).view(torch.int16).cpu().numpy()
        h.update(f"{name}:{tuple(param.shape)}\n".encode())
        h.update(sample.astype("<i2").tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 over what decides token ids: the tokenizer's full JSON (or vocab) and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def _rope(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    theta = getattr(config, "rope_theta", None)
    if theta is not None:
        rope.setdefault("rope_theta", theta)
    # JSON round trip: the manifest must compare equal to a freshly computed fingerprint.
    return json.loads(json.dumps(rope, sort_keys=True, default=str))


@torch.inference_mode()
def probe_kv_layout(model: torch.nn.Module) -> KVLayout:
    """Run two tokens through ``model`` and read the shape of the cache it makes.

    Raises ModelError if the cache is not a plain full-attention KV cache (sliding-window,
    linear-attention, state-space or compressed layers), since such KV cannot be reused as a
    prefix of longer sequences.
    """
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, None))
        kv_cache = output_cache(out)
    except Exception as exc:  # any failure here means we cannot use this model's cache
        raise ModelError(f"could not run a forward pass with a KV cache on this model: {exc}") from None
    layers = getattr(kv_cache, "layers", None)
    if not layers:
        raise ModelError(f"the model's cache ({type(kv_cache).__name__}) has no KV layers; prefixgen needs a KV cache")
    kinds = sorted({type(layer).__name__ for layer in layers})
    if kinds != ["DynamicLayer"]:
        raise ModelError(
            f"the model's cache has layers of kind {', '.join(kinds)}: prefixgen stores only plain "
            "full-attention KV caches (no sliding-window, linear-attention, state-space or MLA layers)"
        )
    k = layers[0].keys  # [1, kv_heads, 2, head_dim]
    for layer in layers:
        if layer.keys.shape != k.shape or layer.values.shape != k.shape:
            raise ModelError("the model's layers have KV of different shapes; prefixgen needs one shape for all")
    return KVLayout(
        num_layers=len(layers), num_kv_heads=k.shape[1], head_dim=k.shape[3], dtype=str(k.dtype).removeprefix("torch.")
    )


def fingerprint(model: torch.nn.Module, tokenizer: Any, layout: KVLayout, name: str = "") -> ModelFingerprint:
    """The fingerprint recorded in a store's manifest and compared by ``check_compatible``.

    Example:
        >>> fp = fingerprint(model, tokenizer, probe_kv_layout(model), "stories260K")  # doctest: +SKIP
    """
    config = model.config
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelFingerprint(
        name=name or str(getattr(config, "_name_or_path", "")),
        architecture=str(archs[0]),
        model_type=str(getattr(config, "model_type", "")),
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        weights_digest=weights_digest(model),
        tokenizer_digest=tokenizer_digest(tokenizer) if tokenizer is not None else "",
        rope=_rope(config),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        revision=getattr(config, "_commit_hash", None),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    chat_template: str | None = None,
) -> tuple[torch.nn.Module, Any, torch.device]:
    """Model (eval mode, on its device) and tokenizer named by ``model`` (a folder or Hub id); clear errors for a
    missing model, a model that is not a causal LM, or one that needs remote code.

    Example:
        >>> model, tokenizer, device = load_model("models/tiny")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is the one to watch
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, chat_template=chat_template)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{model} needs its own code: if you trust it, pass --trust-remote-code") from None
        raise ModelError(f"{model} is not a causal language model that transformers can load: {_first_line(exc)}") from None
    except Exception as exc:
        raise ModelError(f"cannot load model {model}: {_first_line(exc)}") from None
    return lm.to(torch_device).eval(), tokenizer, torch_device


def load_tokenizer(model: str, *, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    """The tokenizer of ``model`` (no weights loaded), with the Jinja ``chat_template`` file if given.

    Example:
        >>> load_tokenizer("models/stories260K")("Once upon a time").input_ids[:2]  # doctest: +SKIP
        [1, 403]
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {model}: {_first_line(exc)}") from None
    if chat_template:
        try:
            with open(chat_template) as f:
                tokenizer.chat_template = f.read()
        except OSError as exc:
            raise ModelError(f"cannot read --chat-template {chat_template}: {exc.strerror}") from None
    return tokenizer


def load_config(model: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``model`` (no weights loaded)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load a model config from {model}: {_first_line(exc)}") from None


def kv_layout_from_config(model: str, kv_dtype: str = "auto", trust_remote_code: bool = False) -> KVLayout:
    """The KV layout of ``model`` read from its config alone (no weights): layers, KV heads, head
    size and the config's dtype (bfloat16 when it names none), stored as fp8 if ``kv_dtype`` says so.
    ``probe_kv_layout`` on the loaded model is the authority; this is for planning without weights.

    Example:
        >>> kv_layout_from_config("models/stories260K").bytes_per_token
        1280
    """
    config = load_config(model, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "bfloat16").removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "bfloat16"
    return KVLayout(int(text.num_hidden_layers), kv_heads, head_dim, dtype, storage="fp8" if kv_dtype == "fp8" else "native")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
