"""``[deploy]`` in edgeguard.toml: the device's bounds on remote deploys (docs/service.md)."""

from __future__ import annotations

from dataclasses import dataclass

from edgeguard.errors import ConfigError

__all__ = ["DeployConfig"]


def _seconds(value: float, name: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"deploy.{name}: must be a number of seconds in [{lo:g}, {hi:g}]")


@dataclass(frozen=True, kw_only=True)
class DeployConfig:
    """``[deploy]`` in edgeguard.toml (docs/service.md)."""

    max_bundle_bytes: int = 512 * 1024 * 1024  # a deploy naming a larger bundle is refused ("too large")
    probation_s: float = 60.0  # when the command does not say
    max_probation_s: float = 86400.0
    fetch_stall_s: float = 120.0  # a fetch with no new chunk for this long is given up ("fetch")
    min_requests: int = 10  # requests before the error rate / p95 may end a probation early

    def __post_init__(self) -> None:
        if not 1024 <= self.max_bundle_bytes <= 1 << 40:
            raise ConfigError("deploy.max_bundle_bytes: must be 1024..2^40")
        _seconds(self.probation_s, "probation_s", 0, 86400 * 7)
        _seconds(self.max_probation_s, "max_probation_s", 0, 86400 * 7)
        _seconds(self.fetch_stall_s, "fetch_stall_s", 1, 86400)
        if not 1 <= self.min_requests <= 1_000_000:
            raise ConfigError("deploy.min_requests: must be 1..1000000")
