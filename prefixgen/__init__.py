"""prefixgen: precompute the KV caches of a dataset's prefixes for LLM servers.

Example:
    >>> from prefixgen import PrefixStore
    >>> store = PrefixStore.open("store")  # doctest: +SKIP
    >>> cache = store.load(prompt_ids[: store.match(prompt_ids)])  # doctest: +SKIP
"""

from prefixgen.config import BuildConfig
from prefixgen.errors import (
    ConfigError,
    CorruptStoreError,
    DatasetError,
    IncompatibleStoreError,
    ModelError,
    NewerFormatError,
    PrefixgenError,
    StoreError,
)
from prefixgen.format import BlockHash, block_keys, hash_block, root_key
from prefixgen.store.reader import PrefixStore

__version__ = "0.1.0"

__all__ = [
    "BlockHash",
    "BuildConfig",
    "ConfigError",
    "CorruptStoreError",
    "DatasetError",
    "IncompatibleStoreError",
    "ModelError",
    "NewerFormatError",
    "PrefixStore",
    "PrefixgenError",
    "StoreError",
    "block_keys",
    "build",
    "hash_block",
    "root_key",
]


def build(config: BuildConfig, model=None, tokenizer=None):
    """Run ``prefixgen build`` from Python (optionally with a loaded model and tokenizer);
    see :func:`prefixgen.builder.pipeline.build`."""
    from prefixgen.builder.pipeline import build as _build

    return _build(config, model=model, tokenizer=tokenizer)
