"""The ``[audit]``, ``[integrity]`` and API lockout keys: defaults, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeguard.errors import ConfigError
from edgeguard.service import parse_config

_BASE: dict[str, Any] = {
    "device": {"id": "dev-1"},
    "model": {"bundle": "m.egm", "trust": ["p.pub"], "device_key": "d.key"},
}


def _parse(**tables: Any) -> Any:
    return parse_config({**_BASE, **tables}, path=Path("/etc/edgeguard/edgeguard.toml"))


def test_defaults_and_relative_paths() -> None:
    cfg = _parse(integrity={"paths": ["edgeguard.service"], "policy": "refuse"})
    assert cfg.audit.enabled and cfg.audit.checkpoint_records == 100 and cfg.audit.max_files == 8
    assert cfg.integrity.policy == "refuse"
    assert cfg.integrity.paths == (Path("/etc/edgeguard/edgeguard.service"),)
    api = _parse(sources={"api": {"tokens_file": "t", "lockout_failures": 5}}).api.to_api_config()
    assert api.abuse.lockout_failures == 5 and api.abuse.lockout_loopback is False


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"audit": {"checkpoint_records": 0}}, "audit: audit.checkpoint_records must be 1..100000"),
        ({"audit": {"max_files": 1}}, "audit.max_files must be 2..1000"),
        ({"audit": {"bogus": 1}}, "audit.bogus: unknown key"),
        ({"integrity": {"policy": "ignore"}}, "integrity.policy: must be one of 'alert', 'refuse'"),
        ({"integrity": {"interval_s": 0.5}}, "integrity.interval_s must be 0 or 1..86400 s"),
        ({"sources": {"api": {"tokens_file": "t", "lockout_max_s": 1.0}}}, "lockout_max_s must be"),
        ({"sources": {"api": {"tokens_file": "t", "rate_anomaly_factor": 1.0}}},
         "sources.api: rate_anomaly_factor must be 0"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _parse(**tables)
    assert message in str(exc.value) and "\n" not in str(exc.value)
