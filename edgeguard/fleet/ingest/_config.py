"""Ingest configuration: the ``[ingest]`` and ``[ingest.broker]`` tables of a TOML file, or CLI flags.

Every key is checked here, once, with a ConfigError naming it (see docs/ingest.md for each key).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["BrokerConfig", "IngestConfig", "load_ingest_config", "TOPIC_SEGMENT"]

# The same charset the device uses for fleet and device names (edgeguard.link): no wildcards, no empty levels.
TOPIC_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """The MQTT 5 broker the fleet publishes to. ``session_expiry_s`` is how long the broker keeps this
    worker's session (and queues its share of messages) while the worker is away."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        _check(
            bool(self.host) and " " not in self.host and len(self.host) <= 253,
            "ingest.broker.host",
            "must be a host name",
        )
        _check(1 <= self.port <= 65535, "ingest.broker.port", "must be 1..65535")
        _check(
            self.password is None or self.username is not None, "ingest.broker.password", "needs a username"
        )
        _check(
            (self.client_cert is None) == (self.client_key is None),
            "ingest.broker.client_cert",
            "needs client_key (and back)",
        )
        _check(
            self.client_cert is None or self.ca_file is not None,
            "ingest.broker.client_cert",
            "mutual TLS needs ca_file",
        )
        _check(5 <= self.keepalive_s <= 3600, "ingest.broker.keepalive_s", "must be 5..3600 s")
        _check(
            0 <= self.session_expiry_s <= 0xFFFFFFFF,
            "ingest.broker.session_expiry_s",
            "must be 0..4294967295 s",
        )

    def __repr__(self) -> str:  # the password never reaches a log line or a traceback
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if shown["password"] is not None:
            shown["password"] = "***"  # noqa: S105 - the mask, not a password
        return "BrokerConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """One ingest worker. ``dsn`` is a libpq connection string; keep passwords out of it (use ~/.pgpass or
    PGPASSWORD), it is never logged either way.

    Batching: a batch is written when ``batch_max`` messages are waiting or ``flush_interval_s`` after its
    first one. ``receive_max`` is the MQTT 5 Receive Maximum: at most that many unacknowledged messages are
    in this worker at once, which bounds its memory while the database is slow or down (the broker keeps the
    rest; mosquitto 2.0 honours it only until the first acks, so the worker enforces it itself, together
    with ``max_pending_bytes``). ``write_method``: "copy" (COPY into a temporary table, then INSERT … SELECT …
    ON CONFLICT DO NOTHING) or "values" (multi-row INSERT … VALUES … ON CONFLICT DO NOTHING).
    """

    fleet: str
    dsn: str
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    group: str = "edgeguard-ingest"
    client_id: str = "edgeguard-ingest-1"
    batch_max: int = 500
    flush_interval_s: float = 0.2
    receive_max: int = 2000
    write_method: str = "copy"
    max_payload_bytes: int = 256 * 1024
    max_pending_bytes: int = 64 * 1024 * 1024
    db_connect_timeout_s: int = 5
    db_statement_timeout_s: float = 30.0
    db_retry_initial_s: float = 0.2
    db_retry_max_s: float = 5.0
    retention_days: int = 30
    partitions_ahead_days: int = 7
    maintenance_interval_s: float = 3600.0
    status_file: Path | None = None
    status_interval_s: float = 1.0

    def __post_init__(self) -> None:
        _check(bool(TOPIC_SEGMENT.fullmatch(self.fleet)), "ingest.fleet", "must be 1..64 of [A-Za-z0-9_.-]")
        _check(bool(TOPIC_SEGMENT.fullmatch(self.group)), "ingest.group", "must be 1..64 of [A-Za-z0-9_.-]")
        _check(
            1 <= len(self.client_id) <= 128 and self.client_id.isprintable(),
            "ingest.client_id",
            "must be 1..128 printable characters",
        )
        _check(bool(self.dsn.strip()), "ingest.dsn", "must be a libpq connection string")
        _check(1 <= self.batch_max <= 50_000, "ingest.batch_max", "must be 1..50000")
        _check(1 <= self.receive_max <= 65535, "ingest.receive_max", "must be 1..65535 (MQTT 5 limit)")
        _check(self.write_method in ("copy", "values"), "ingest.write_method", "must be copy or values")
        _check(
            64 <= self.max_payload_bytes <= 16 * 1024 * 1024,
            "ingest.max_payload_bytes",
            "must be 64..16777216",
        )
        _check(
            self.max_payload_bytes <= self.max_pending_bytes <= 4 * 1024**3,
            "ingest.max_pending_bytes",
            "must be max_payload_bytes..4 GiB",
        )
        _check(1 <= self.db_connect_timeout_s <= 300, "ingest.db_connect_timeout_s", "must be 1..300 s")
        _check(1 <= self.retention_days <= 36_500, "ingest.retention_days", "must be 1..36500")
        _check(1 <= self.partitions_ahead_days <= 366, "ingest.partitions_ahead_days", "must be 1..366")
        for key, lo, hi in (
            ("flush_interval_s", 0.001, 60.0),
            ("db_statement_timeout_s", 0.1, 3600.0),
            ("db_retry_initial_s", 0.01, 60.0),
            ("db_retry_max_s", 0.01, 600.0),
            ("maintenance_interval_s", 1.0, 86400.0),
            ("status_interval_s", 0.05, 3600.0),
        ):
            v = float(getattr(self, key))
            _check(math.isfinite(v) and lo <= v <= hi, f"ingest.{key}", f"must be {lo}..{hi} s")
        _check(
            self.db_retry_max_s >= self.db_retry_initial_s,
            "ingest.db_retry_max_s",
            "must be >= db_retry_initial_s",
        )

    def __repr__(self) -> str:  # the DSN may carry a password: never shown
        return f"IngestConfig(fleet={self.fleet!r}, group={self.group!r}, client_id={self.client_id!r}, ...)"

    @property
    def shared_topics(self) -> list[str]:
        """The four subscriptions, shared by every worker of ``group`` (MQTT 5 ``$share``)."""
        return [
            f"$share/{self.group}/edgeguard/v1/{self.fleet}/+/{kind}"
            for kind in ("results", "heartbeat", "status", "events")
        ]


_PATHS = {"ca_file", "client_cert", "client_key", "status_file"}


def _coerce(cls: type[Any], table: Any, section: str, extra: dict[str, Any]) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = dict(extra)
    for key, value in table.items():
        if key not in known or key in extra:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(known))})")
        if key in _PATHS and value is not None:
            if not isinstance(value, (str, Path)):
                raise ConfigError(f"{section}.{key}: must be a path string")
            kwargs[key] = Path(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from None


def _typecheck(cfg: Any, section: str) -> None:
    # TOML gives ints where floats are meant (fine) but also strings where numbers are meant: say which key.
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        ann = str(f.type)
        if ann == "int" and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"{section}.{f.name}: must be an integer")
        if ann == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ConfigError(f"{section}.{f.name}: must be a number")
        if ann == "str" and not isinstance(v, str):
            raise ConfigError(f"{section}.{f.name}: must be a string")


def build_config(table: dict[str, Any], **overrides: Any) -> IngestConfig:
    """An IngestConfig from an ``[ingest]`` table (may be empty) plus CLI overrides (None = not given)."""
    table = dict(table)
    broker_table = table.pop("broker", {})
    broker_over = {
        k[len("broker_") :]: v for k, v in overrides.items() if k.startswith("broker_") and v is not None
    }
    if not isinstance(broker_table, dict):
        raise ConfigError("ingest.broker: must be a table")
    broker = _coerce(BrokerConfig, {**broker_table, **broker_over}, "ingest.broker", {})
    _typecheck(broker, "ingest.broker")
    top = {k: v for k, v in overrides.items() if not k.startswith("broker_") and v is not None}
    merged = {**table, **top}
    for required in ("fleet", "dsn"):
        if required not in merged:
            raise ConfigError(f"ingest.{required}: missing (set it in the config file or with --{required})")
    cfg = _coerce(IngestConfig, merged, "ingest", {"broker": broker})
    _typecheck(cfg, "ingest")
    return cfg  # type: ignore[no-any-return]


def load_ingest_config(path: Path | None, **overrides: Any) -> IngestConfig:
    """Read the ``[ingest]`` table of ``path`` (other tables are ignored: the file may be shared) and apply
    the CLI ``overrides``."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: {exc}") from None
        raw = doc.get("ingest", {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: [ingest] must be a table")
        table = raw
    return build_config(table, **overrides)
