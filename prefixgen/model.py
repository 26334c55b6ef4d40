"""Loading a model and tokenizer, what the model is for the manifest (its fingerprint) and the shape of its
KV cache: the one place the build and the servers get a model from.

Both the build (to write the manifest) and the loader (``check_compatible``) use this, so a store
is refused for any model whose fingerprint differs in an identity field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from prefixgen.cache_spec import MLA, RECURRENT, CacheSpec, cache_spec, state_stride_tokens
from prefixgen.compat import RECURRENT_MIN_VERSION, cache_kwargs, output_cache, recurrent_state, supports_recurrent_cache
from prefixgen.errors import ModelError
from prefixgen.format import DTYPE_SIZES, KVLayout, ModelFingerprint, read_safetensors_header
from prefixgen.kvcache import new_cache

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
        _digest_tensor(h, name, tuple(param.shape), param.detach().reshape(-1))
    return h.hexdigest()


def _digest_tensor(h: Any, name: str, shape: tuple[int, ...], flat: torch.Tensor | np.ndarray) -> None:
    """Feed one parameter into the weights digest: its name and shape, then its strided sample as bfloat16."""
    step = max(1, flat.shape[0] // _SAMPLES)
    sample = flat[::step][:_SAMPLES]
    if isinstance(sample, np.ndarray):
        sample = torch.from_numpy(np.ascontiguousarray(sample))
    h.update(f"{name}:{shape}\n".encode())
    h.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().astype("<i2").tobytes())


# safetensors dtypes a checkpoint may hold -> (numpy dtype to read the bytes, torch dtype they mean)
_CHECKPOINT_DTYPES = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),
    "F64": (np.float64, torch.float64),
}


def _sample_concatenated(flats: list[np.ndarray], np_dtype) -> np.ndarray:
    """[<= _SAMPLES] the strided sample of the 1-D arrays ``flats`` laid end to end, without concatenating them
    (a fused expert tensor is every expert's checkpoint tensor in order)."""
    sizes = np.cumsum([0] + [f.shape[0] for f in flats])
    step = max(1, int(sizes[-1]) // _SAMPLES)
    at = np.arange(0, int(sizes[-1]), step)[:_SAMPLES]
    which = np.searchsorted(sizes, at, side="right") - 1
    picked = np.empty(len(at), dtype=np_dtype)
    for i in np.unique(which):
        picked[which == i] = flats[i][at[which == i] - sizes[i]]
    return picked


def checkpoint_weights_digest(folder: str | Path, tie_word_embeddings: bool = False, dtype: torch.dtype | None = None) -> str:
    """The :func:`weights_digest` of the model transformers loads from the ``*.safetensors`` files in
    ``folder`` in ``dtype`` (None: the files' own), computed from the files alone (memory-mapped; only
    the sampled elements are read).

    ``dtype`` must be the dtype the server computes in: a build digests the weights as loaded, and a
    float32 checkpoint loaded as float16 rounds twice (to float16, then to bfloat16 for the digest), which
    is not always rounding it once to bfloat16. Loaded as float32 or bfloat16, the digest is the files'.

    For servers whose modules differ from transformers' (vLLM fuses ``qkv_proj``): the checkpoint's
    tensor names are transformers' parameter names. A tied ``lm_head.weight`` is not a parameter of
    its own (transformers lists the shared tensor once, as the embedding), nor are buffers saved in
    old checkpoints (``rotary_emb.inv_freq``).

    Example:
        >>> checkpoint_weights_digest("models/stories260K") == weights_digest(model)  # doctest: +SKIP
        True
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no .safetensors files: the weights digest needs the checkpoint in safetensors")
    tensors: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for path in files:
        with open(path, "rb") as f:
            header = read_safetensors_header(f, path)
        for name, info in header.tensors.items():
            tensors[name] = (path, info, header.data_start)
    h = hashlib.sha256()
    maps: dict[Path, np.memmap] = {}

    def flat_of(name: str) -> tuple[np.ndarray, str]:
        path, info, data_start = tensors[name]
        if info["dtype"] not in _CHECKPOINT_DTYPES:
            raise ModelError(f"{path}: tensor {name} has dtype {info['dtype']}, which the weights digest cannot read")
        if path not in maps:
            maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        a, b = (data_start + o for o in info["data_offsets"])
        return maps[path][a:b].view(np.dtype(_CHECKPOINT_DTYPES[info["dtype"]][0]).newbyteorder("<")), info["dtype"]

    fused = _fused_experts(tensors)
    for name in sorted(set(tensors) - {p for parts, _ in fused.values() for p in parts} | set(fused)):
        if name.endswith("rotary_emb.inv_freq") or (tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name in fused:  # one tensor of transformers' made of the checkpoint's per-expert ones, end to end
            parts, shape = fused[name]
            flats = [flat_of(p) for p in parts]
            np_dtype, torch_dtype = _CHECKPOINT_DTYPES[flats[0][1]]
            picked = _sample_concatenated([f for f, _ in flats], np_dtype)
        else:
            flat, stored = flat_of(name)
            np_dtype, torch_dtype = _CHECKPOINT_DTYPES[stored]
            step = max(1, flat.shape[0] // _SAMPLES)
            picked, shape = flat[::step][:_SAMPLES], tuple(tensors[name][1]["shape"])
        sample = torch.from_numpy(np.ascontiguousarray(picked).astype(np_dtype)).view(torch_dtype)
        if dtype is not None:
            sample = sample.to(dtype)  # as the server loads it (what build digested)
        _digest_tensor(h, name, shape, sample)  # already strided: sampling again keeps it whole
    return h.hexdigest()


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _fused_experts(tensors: dict[str, tuple[Path, dict[str, Any], int]]) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """transformers 5's fused MoE parameters made from a checkpoint's per-expert tensors (its ``qwen2_moe`` weight
    conversion, used by Qwen2/3-MoE, Qwen3-Next, DeepSeek and others: ``conversion_mapping.py``): ``experts.gate_up_proj``
    ``[E, 2I, H]`` stacks each expert's ``gate_proj`` and ``up_proj`` rows, ``experts.down_proj`` ``[E, H, I]`` each
    ``down_proj``. Row-major, the fused tensor is its parts end to end: name -> (parts in that order, its shape)."""
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for name in tensors:
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = name
    fused: dict[str, tuple[list[str], tuple[int, ...]]] = {}
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        if all({"gate_proj", "up_proj"} <= set(x) for x in order):
            rows, cols = tensors[order[0]["gate_proj"]][1]["shape"]
            parts = [x[p] for x in order for p in ("gate_proj", "up_proj")]
            fused[f"{prefix}.gate_up_proj"] = (parts, (len(order), 2 * rows, cols))
        if all("down_proj" in x for x in order):
            rows, cols = tensors[order[0]["down_proj"]][1]["shape"]
            fused[f"{prefix}.down_proj"] = ([x["down_proj"] for x in order], (len(order), rows, cols))
    return fused


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


# Fields of a transformers text config that do not change the KV a model computes for a prompt; every other
# field of the effective text config is part of a store's identity (ModelFingerprint.text_config). Each with why.
KV_NEUTRAL_CONFIG_FIELDS: dict[str, str] = {
    "_name_or_path": "where the config was read from, not what it says",
    "transformers_version": "the version that wrote the config file",
    "architectures": "the head class (compared on its own, as architecture); KV comes from the decoder layers",
    "dtype": "the dtype to load in: the KV dtype is compared on its own (the manifest's kv.dtype)",
    "torch_dtype": "the older name of dtype",
    "initializer_range": "only initialises new weights; the weights themselves are digested",
    "use_cache": "whether a cache is kept, not what is in it",
    "output_attentions": "what forward returns besides the cache",
    "output_hidden_states": "what forward returns besides the cache",
    "return_dict": "the return type of forward",
    "bos_token_id": "generation stop and pad ids: sampling, not KV (the tokenizer digest covers tokenization)",
    "eos_token_id": "as bos_token_id",
    "pad_token_id": "as bos_token_id",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "chunk_size_feed_forward": "splits the MLP into chunks computing the same values",
    "tie_word_embeddings": "the output head (the weights digest covers the weights)",
}


def config_identity(config: Any) -> dict[str, Any]:
    """The identity of a model's effective text config (``get_text_config()`` of a composite config): every field of
    ``to_dict()`` but :data:`KV_NEUTRAL_CONFIG_FIELDS`, JSON round-tripped so a manifest compares equal to a fresh one.

    Example:
        >>> config_identity(transformers.LlamaConfig(rms_norm_eps=0.5))["rms_norm_eps"]
        0.5
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    data = {k: v for k, v in text.to_dict().items() if k not in KV_NEUTRAL_CONFIG_FIELDS}
    return json.loads(json.dumps(data, sort_keys=True, default=str))


# RoPE variants whose frequencies depend on the position alone: in transformers 5.24 their init
# functions (modeling_rope_utils.ROPE_INIT_FUNCTIONS) ignore ``seq_len`` and ``dynamic_rope_update``
# leaves them alone, so a block's KV is the same whatever sequence or batch it was computed in.
# "dynamic" (NTK) and "longrope" recompute the frequencies from the largest position in the batch
# at every forward: a block's KV would depend on its record's length and on its batch neighbours.
REUSABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_types(config: Any) -> list[str]:
    """The ``rope_type`` of every RoPE the config declares (per layer type where it has several);
    empty for a model without RoPE parameters.

    Example:
        >>> rope_types(transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0}))
        ['linear']
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return []
    nested = [v for v in rope.values() if isinstance(v, dict)]
    found = []
    for params in nested or [rope]:
        kind = params.get("rope_type", params.get("type"))
        if kind is not None:
            found.append(str(kind))
    return found


def check_rope(config: Any) -> None:
    """Raise ModelError for a RoPE whose frequencies depend on the sequence length (see
    REUSABLE_ROPE_TYPES): its KV is not reusable as a prefix of another sequence."""
    bad = sorted({t for t in rope_types(config) if t not in REUSABLE_ROPE_TYPES})
    if bad:
        raise ModelError(
            f"this model's RoPE (rope_type {', '.join(repr(t) for t in bad)}) changes its frequencies with the "
            "sequence length, so a prefix's KV depends on what follows it and cannot be stored for reuse; "
            f"prefixgen accepts rope_type {', '.join(REUSABLE_ROPE_TYPES)}"
        )


def spec_layout(spec: CacheSpec, dtype: str, storage: str = "native") -> KVLayout:
    """The store layout of a model's cache (``CacheSpec.check_storable`` first): per-head K/V of every
    attention layer (full and sliding-window alike), or one MLA latent per layer.

    Example:
        >>> spec_layout(cache_spec(load_config("models/stories260K")), "float32").bytes_per_token  # doctest: +SKIP
        1280
    """
    spec.check_storable()
    groups = () if spec.plain else spec.groups
    g = spec.groups[0]
    if g.kind == MLA:
        return KVLayout(spec.num_layers, 1, g.kv_lora_rank + g.rope_dim, dtype, storage, "mla", g.kv_lora_rank, groups)
    if spec.recurrent is not None:
        # Rows hold the attention layers only; the recurrent group records the stride of its stored states,
        # chosen by bytes with the SSM state in float32, as transformers keeps it (cache_spec.state_stride_tokens).
        stride = state_stride_tokens(spec, DTYPE_SIZES[dtype], ssm_itemsize=4)
        groups = tuple(dataclasses.replace(x, state_stride=stride) if x.kind == RECURRENT else x for x in groups)
        g = next(x for x in spec.groups if x.kind != RECURRENT)
        return KVLayout(len(spec.attention_layers), g.kv_heads, g.head_dim, dtype, storage, groups=groups)
    return KVLayout(spec.num_layers, g.kv_heads, g.head_dim, dtype, storage, groups=groups)


@torch.inference_mode()
def probe_kv_layout(model: torch.nn.Module) -> KVLayout:
    """The store layout of ``model``'s cache (:func:`prefixgen.cache_spec.cache_spec` of its config),
    checked against the cache a two-token forward makes.

    Raises ModelError, naming the kind, for a cache prefixgen cannot store (linear-attention or
    state-space layers, an encoder-decoder), or if its RoPE depends on the sequence
    length (``check_rope``), since such KV cannot be reused as a prefix of longer sequences.
    """
    spec = cache_spec(model.config)
    spec.check_storable()
    check_rope(model.config)
    if spec.recurrent is not None and not supports_recurrent_cache():
        raise ModelError(
            f"this model's cache has {spec.recurrent.describe()}: storing and continuing their states needs "
            f"transformers {RECURRENT_MIN_VERSION} or later (this is {transformers.__version__}): "
            f"pip install 'transformers>={RECURRENT_MIN_VERSION}'"
        )
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, new_cache(model.config)))
        kv_cache = output_cache(out)
    except Exception as exc:  # any failure here means we cannot use this model's cache
        raise ModelError(f"could not run a forward pass with a KV cache on this model: {exc}") from None
    layers = getattr(kv_cache, "layers", None)
    if not layers:
        raise ModelError(f"the model's cache ({type(kv_cache).__name__}) has no KV layers; prefixgen needs a KV cache")
    if spec.recurrent is not None:
        _check_states(spec, layers)
        layers = [layers[i] for i in spec.attention_layers]
    kinds = sorted({type(layer).__name__ for layer in layers})
    if kinds != ["DynamicLayer"]:
        raise ModelError(
            f"the model's cache has layers of kind {', '.join(kinds)}: prefixgen stores per-token caches of "
            "plain layers (full, sliding-window and MLA attention)"
        )
    layout = spec_layout(spec, str(layers[0].keys.dtype).removeprefix("torch."))
    if layout.kind == "mla":  # keys: the latent [1, 1, 2, kv_lora_rank]; values: the rope key [1, 1, 2, rope_dim]
        shapes = {(1, 1, 2, layout.latent_rank), (1, 1, 2, layout.head_dim - layout.latent_rank)}
    else:
        shapes = {(1, layout.num_kv_heads, 2, layout.head_dim)}
    if len(layers) != layout.num_layers or any({tuple(x.keys.shape), tuple(x.values.shape)} != shapes for x in layers):
        raise ModelError(
            f"the model's cache ({len(layers)} layers, keys {tuple(layers[0].keys.shape)}) differs from what its "
            f"config describes ({spec.describe()}): prefixgen cannot store it"
        )
    return layout


def _check_states(spec: CacheSpec, layers: Sequence) -> None:
    """The recurrent layers' states a forward made have the sizes the config describes."""
    g = spec.recurrent
    for i in g.layers:
        layer = layers[i]
        if not hasattr(layer, "conv_states"):
            raise ModelError(f"layer {i} of this model is recurrent but its cache ({type(layer).__name__}) keeps no state")
        conv, ssm = recurrent_state(layer)
        if conv.shape[1] * (conv.shape[2] - 1) != g.conv or ssm[0].numel() != g.ssm:
            raise ModelError(
                f"the recurrent state of layer {i} (conv {tuple(conv.shape)}, ssm {tuple(ssm.shape)}) differs from "
                f"what its config describes ({g.conv} conv and {g.ssm} ssm values): prefixgen cannot store it"
            )


def fingerprint(model: torch.nn.Module, tokenizer: Any, layout: KVLayout, name: str = "") -> ModelFingerprint:
    """The fingerprint recorded in a store's manifest and compared by ``check_compatible``.

    Example:
        >>> fp = fingerprint(model, tokenizer, probe_kv_layout(model), "stories260K")  # doctest: +SKIP
    """
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return config_fingerprint(model.config, tokenizer, layout, weights_digest(model), name, architecture=str(archs[0]))


def config_fingerprint(
    config: Any, tokenizer: Any, layout: KVLayout, weights: str, name: str = "", architecture: str = ""
) -> ModelFingerprint:
    """The fingerprint of a model known by its config, KV layout and weights digest (a server that
    does not run the transformers model, such as vLLM, gets ``weights`` from :func:`checkpoint_weights_digest`).

    Example:
        >>> fp = config_fingerprint(AutoConfig.from_pretrained(d), tok, layout, checkpoint_weights_digest(d))  # doctest: +SKIP
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # RoPE is the text model's
    return ModelFingerprint(
        name=name or str(getattr(config, "_name_or_path", "")),
        architecture=architecture or str((getattr(config, "architectures", None) or [""])[0]),
        model_type=str(getattr(config, "model_type", "")),
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        weights_digest=weights,
        tokenizer_digest=tokenizer_digest(tokenizer) if tokenizer is not None else "",
        rope=_rope(text),
        max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
        revision=getattr(config, "_commit_hash", None),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        text_config=config_identity(config),
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


def load_tokenizer(model: str, *, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    """The tokenizer of ``model`` (a folder or Hub id), with the chat template of the file ``chat_template``
    if given: what build, analyze and serve tokenize with.

    Example:
        >>> load_tokenizer("models/stories260K").vocab_size  # doctest: +SKIP
        512
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
    """The transformers config of ``model`` (no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{model} needs its own code: if you trust it, pass --trust-remote-code") from None
        raise ModelError(f"cannot read the config of model {model}: {_first_line(exc)}") from None
    except Exception as exc:
        raise ModelError(f"cannot read the config of model {model}: {_first_line(exc)}") from None


def config_kv_layout(config: Any, dtype: str = "auto", kv_dtype: str = "auto") -> KVLayout:
    """The KV layout a build of this model would write, from its config alone (no weights, no forward):
    layers x 2 x kv_heads x head_dim values per token (MLA: layers x latent), in the dtype ``dtype`` resolves to on this
    machine (as build's ``--dtype``), stored as fp8 with per-block scales if ``kv_dtype`` is ``fp8``.
    Equals :func:`probe_kv_layout` of the loaded model for full-attention models.

    Example:
        >>> config_kv_layout(load_config("models/stories260K"), "float32").bytes_per_token  # doctest: +SKIP
        1280
    """
    torch_dtype = resolve_dtype(dtype, resolve_device("auto"))
    return spec_layout(cache_spec(config), str(torch_dtype).removeprefix("torch."), "fp8" if kv_dtype == "fp8" else "native")


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


def kv_layout_from_config(model: str, kv_dtype: str = "auto", trust_remote_code: bool = False) -> KVLayout:
    """The KV layout of ``model`` read from its config alone (no weights), in the config's dtype
    (bfloat16 when it names none or names another): for planning a GPU build without weights.
    :func:`config_kv_layout` takes the dtype as build's ``--dtype`` would resolve it here.

    Example:
        >>> kv_layout_from_config("models/stories260K").bytes_per_token
        1280
    """
    text = load_config(model, trust_remote_code=trust_remote_code).get_text_config()
    dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "bfloat16").removeprefix("torch.")
    return config_kv_layout(text, dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16", kv_dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def tp_kv_heads(total_kv_heads: int, tp_size: int, tp_rank: int) -> range | None:
    """The KV heads tensor-parallel rank ``tp_rank`` of ``tp_size`` holds, as vLLM's ``QKVParallelLinear``
    (and SGLang's QKV projection) shard them: consecutive slices of ``total / tp`` heads, or, when there
    are fewer heads than ranks, one head replicated over ``tp / total`` consecutive ranks. None when
    the heads do not split over ``tp_size`` either way. The one split the connector and exports share.

    Example:
        >>> tp_kv_heads(8, 2, 1), tp_kv_heads(2, 4, 3), tp_kv_heads(4, 3, 0)
        (range(4, 8), range(1, 2), None)
    """
    if tp_size <= 0:
        return None
    if tp_size >= total_kv_heads:
        if tp_size % total_kv_heads:
            return None
        head = tp_rank // (tp_size // total_kv_heads)
        return range(head, head + 1)
    if total_kv_heads % tp_size:
        return None
    per_rank = total_kv_heads // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
