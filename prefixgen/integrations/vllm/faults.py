"""How a store fault becomes a cache miss: which exceptions count as faults, and logging each once (a fault would
repeat on every request). The connector's one logger, ``prefixgen.integrations.vllm``, shared by its modules."""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from prefixgen.errors import PrefixgenError

logger = init_logger("prefixgen.integrations.vllm")

# What reading a store can raise when the store is damaged, being pruned or on a failing disk (a
# missing or truncated shard, a deleted file, an I/O error, a damaged or truncated index column): a cache
# miss. Nothing else is: a ValueError, IndexError or KeyError is a bug, and is raised (a lookup) or logged
# with its traceback (a load).
STORE_FAULTS = (PrefixgenError, OSError)


def warn_once(logged: set[str], key: str, message: str, *args: Any) -> bool:
    """Log ``message`` the first time ``key`` (a shard, or an error's text) is seen (a fault would repeat on every
    request); True then. Called from several load threads: a rare race logs twice, never loses a count."""
    if key in logged:
        return False
    logged.add(key)
    logger.warning(message, *args)
    return True
