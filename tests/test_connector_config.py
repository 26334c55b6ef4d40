"""ConnectorConfig: the vLLM connector's kv_connector_extra_config, its defaults and its refusals (no vLLM needed)."""

from __future__ import annotations

import pytest

from prefixgen.config import ConnectorConfig
from prefixgen.errors import ConfigError


def test_defaults_and_sizes_with_units():
    cfg = ConnectorConfig.from_extra({"store": "s"})
    assert (cfg.staging_bytes, cfg.load_threads, cfg.chat_template) == (64 << 20, 2, None)
    assert cfg.yield_seconds == 0.005  # on by default: idle engine steps leave the GIL to the loads
    assert cfg.load_timeout_seconds == 30.0 and cfg.refresh_seconds == 2.0  # a deadline and store changes seen by default
    assert cfg.staging_buffers == 3  # read buffers kept: 2 load threads reading, 1 piece still copied to a GPU
    assert ConnectorConfig.from_extra({"store": "s", "staging_bytes": "256MiB"}).staging_bytes == 256 << 20
    assert ConnectorConfig.from_extra({"store": "s", "staging_bytes": 4096}).staging_bytes == 4096
    assert ConnectorConfig.from_extra({"store": "s", "other": 1}).store == "s"  # keys it does not know: the caller's


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "needs the store's path"),
        ({"store": "s", "staging_bytes": "lots"}, "is not a size"),
        ({"store": "s", "staging_bytes": 0}, "staging_bytes must be positive"),
        ({"store": "s", "load_threads": 0}, "load_threads must be a positive integer"),
        ({"store": "s", "load_threads": "2"}, "load_threads must be a positive integer"),
        ({"store": "s", "staging_buffers": 0}, "staging_buffers must be a positive integer"),
        ({"store": "s", "staging_buffers": True}, "staging_buffers must be a positive integer"),
        ({"store": "s", "yield_seconds": -1}, "yield_seconds must be a number of seconds >= 0"),
        ({"store": "s", "yield_seconds": "1ms"}, "yield_seconds must be a number of seconds >= 0"),
        ({"store": "s", "load_timeout_seconds": -1}, "load_timeout_seconds must be a number of seconds >= 0"),
        ({"store": "s", "refresh_seconds": "often"}, "refresh_seconds must be a number of seconds >= 0"),
    ],
)
def test_bad_values_are_refused_by_name(extra, message):
    with pytest.raises(ConfigError, match=message):
        ConnectorConfig.from_extra(extra)
