"""The service's typed configuration: ``edgeguard.toml`` -> frozen dataclasses (docs/service.md lists every
key).

Only the service reads TOML; everything below it takes these typed objects. Unknown keys and wrong types are a
``ConfigError`` naming the key (``sources.api.port: must be an integer, got '80'``).
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard._echo import cut
from edgeguard.audit import AuditConfig, IntegrityConfig
from edgeguard.bundle import MODEL_NAME_RE
from edgeguard.deploy import DeployConfig
from edgeguard.errors import ConfigError
from edgeguard.link._config import LinkConfig
from edgeguard.outbox import OutboxConfig
from edgeguard.sites._config import SiteConfig, StreamBinding
from edgeguard.sources import (
    AbuseConfig,
    ApiConfig,
    BodyLimits,
    BudgetConfig,
    BudgetLimits,
    DirectoryConfig,
    SerialConfig,
)

# The supervisor's and the watchdogs' sections live in a module of their own, free of the worker's stack: the
# supervisor process imports them without this module (see _supervisor_main).
from ._settings import SupervisorSection, WatchdogSection, _check, _seconds
from ._toml import SECRET_KEYS, build, load_toml

__all__ = [
    "ServiceConfig",
    "DeviceSection",
    "ModelSection",
    "SupervisorSection",
    "WatchdogSection",
    "ApiSection",
    "BudgetSection",
    "MqttInputSection",
    "SerialSection",
    "DirectorySection",
    "CommandsSection",
    "load_config",
    "parse_config",
]

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class DeviceSection:
    id: str
    fleet: str = "default"
    state_dir: Path = Path("/var/lib/edgeguard")
    groups: tuple[str, ...] = ()  # the groups a signed command may address this device by (docs/commands.md)
    # Ed25519 key signing this device's command answers; unset: device-sign.key in state_dir, made at first
    # start (its public half is in the retained birth status).
    signing_key: Path | None = None

    def __post_init__(self) -> None:
        _check(bool(_ID.fullmatch(self.id)), "device.id", "1..64 of A-Z a-z 0-9 _ . -")
        _check(bool(_ID.fullmatch(self.fleet)), "device.fleet", "1..64 of A-Z a-z 0-9 _ . -")
        _check(len(self.groups) <= 64, "device.groups", "at most 64 groups")
        for g in self.groups:
            _check(bool(_ID.fullmatch(g)), "device.groups", f"{g[:80]!r}: 1..64 of A-Z a-z 0-9 _ . -")

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key if self.signing_key is not None else self.state_dir / "device-sign.key"


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    bundle: Path
    trust: tuple[Path, ...]
    revocations: Path | None = None
    device_key: Path | None = None
    device_key_credential: str | None = None  # name under $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
    profile: str | None = None
    # The only model name this device serves. Unset: the slot is pinned to the first name served (kept with
    # the rollback floor in the state dir), so a renamed older bundle cannot slip under a floor of 0.
    name: str | None = None

    def __post_init__(self) -> None:
        _check(len(self.trust) >= 1, "model.trust", "needs at least one publisher key")
        _check(
            self.name is None or bool(MODEL_NAME_RE.fullmatch(self.name)),
            "model.name",
            f"must match {MODEL_NAME_RE.pattern.removesuffix(chr(92) + 'Z')}",
        )
        _check(
            (self.device_key is None) != (self.device_key_credential is None),
            "model.device_key",
            "give exactly one of device_key or device_key_credential",
        )


@dataclass(frozen=True, kw_only=True)
class BudgetSection:
    """``[sources.api.budget]``: per-token query budgets and rate limits (docs/security.md). The defaults
    limit nothing; ``[sources.api.budget.tokens.<name>]`` gives one token limits of its own."""

    rate_per_s: float = 0.0
    burst: int = 0
    window_queries: int = 0
    window_s: float = 86400.0
    persist_interval_s: float = 10.0
    persist_every_queries: int = 100
    tokens: Any = None  # {token name: {rate_per_s, burst, window_queries}}

    def __post_init__(self) -> None:
        self.to_budget_config()

    def to_budget_config(self) -> BudgetConfig:
        where = "sources.api.budget"
        tokens: dict[str, BudgetLimits] = {}
        if self.tokens is not None:
            if not isinstance(self.tokens, dict):
                raise ConfigError(f"{where}.tokens: must be a table of token names")
            for name, table in self.tokens.items():
                tokens[name] = build(BudgetLimits, table, f"{where}.tokens.{cut(name, 64)}")
        try:
            default = BudgetLimits(rate_per_s=self.rate_per_s, burst=self.burst,
                                   window_queries=self.window_queries)
            return BudgetConfig(default=default, tokens=tokens, window_s=self.window_s,
                                persist_interval_s=self.persist_interval_s,
                                persist_every_queries=self.persist_every_queries)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class ApiSection:
    enabled: bool = True
    unix_socket: Path | None = None
    host: str | None = "127.0.0.1"
    port: int = 8780
    allow_non_loopback: bool = False
    tokens_file: Path | None = None
    tokens_credential: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_elements: int = 4 * 1024 * 1024
    max_in_flight: int = 32
    max_bytes_in_flight: int = 64 * 1024 * 1024
    infer_threads: int = 2
    parse_threads: int = 1
    # Abuse detection (docs/sources.md, "Lockout and rate anomalies"); lockout_failures = 0 turns lockout off,
    # rate_anomaly_factor = 0 the rate anomaly detector.
    lockout_failures: int = 10
    lockout_window_s: float = 60.0
    lockout_initial_s: float = 30.0
    lockout_max_s: float = 3600.0
    rate_anomaly_factor: float = 5.0
    rate_anomaly_window_s: float = 10.0
    rate_anomaly_min_requests: int = 50
    lockout_loopback: bool = False
    explain_max_passes: int = 65  # forward passes one POST /v1/explain may cost; 0 = the route is off
    # Per-token query budgets: the [sources.api.budget] table (BudgetSection).
    budget: BudgetSection = field(default_factory=BudgetSection)

    def __post_init__(self) -> None:
        if self.enabled:
            _check(
                (self.tokens_file is None) != (self.tokens_credential is None),
                "sources.api.tokens_file",
                "give exactly one of tokens_file or tokens_credential",
            )
        try:
            self.to_api_config()
        except ValueError as exc:
            raise ConfigError(f"sources.api: {exc}") from None

    def to_api_config(self) -> ApiConfig:
        return ApiConfig(
            unix_socket=self.unix_socket,
            host=self.host,
            port=self.port,
            allow_non_loopback=self.allow_non_loopback,
            limits=BodyLimits(max_body_bytes=self.max_body_bytes, max_elements=self.max_elements),
            max_in_flight=self.max_in_flight,
            max_bytes_in_flight=self.max_bytes_in_flight,
            infer_threads=self.infer_threads,
            parse_threads=self.parse_threads,
            explain_max_passes=self.explain_max_passes,
            abuse=AbuseConfig(
                lockout_failures=self.lockout_failures,
                lockout_window_s=self.lockout_window_s,
                lockout_initial_s=self.lockout_initial_s,
                lockout_max_s=self.lockout_max_s,
                rate_anomaly_factor=self.rate_anomaly_factor,
                rate_anomaly_window_s=self.rate_anomaly_window_s,
                rate_anomaly_min_requests=self.rate_anomaly_min_requests,
                lockout_loopback=self.lockout_loopback,
            ),
        )


@dataclass(frozen=True, kw_only=True)
class MqttInputSection:
    enabled: bool = False
    queue_size: int = 64
    max_queued_bytes: int = 16 * 1024 * 1024  # received, not yet processed bytes; at least max_body_bytes
    max_body_bytes: int = 256 * 1024  # at most link.inbound_max_bytes (the link drops larger messages first)
    max_elements: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        _check(1 <= self.queue_size <= 10000, "sources.mqtt.queue_size", "must be 1..10000")
        _check(
            self.max_body_bytes <= self.max_queued_bytes <= 1 << 32,
            "sources.mqtt.max_queued_bytes",
            "must be max_body_bytes .. 4 GiB",
        )
        try:
            self.limits()
        except ValueError as exc:
            raise ConfigError(f"sources.mqtt: {exc}") from None

    def limits(self) -> BodyLimits:
        return BodyLimits(max_body_bytes=self.max_body_bytes, max_elements=self.max_elements)


@dataclass(frozen=True, kw_only=True)
class SerialSection:
    enabled: bool = False
    port: str = ""
    baudrate: int = 115200
    input: str | None = None
    max_payload: int = 65536
    reopen_min_s: float = 0.2
    reopen_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.enabled:
            try:
                self.to_serial_config()
            except ValueError as exc:
                raise ConfigError(f"sources.serial: {exc}") from None

    def to_serial_config(self) -> SerialConfig:
        return SerialConfig(
            port=self.port,
            baudrate=self.baudrate,
            input=self.input,
            max_payload=self.max_payload,
            reopen_min_s=self.reopen_min_s,
            reopen_max_s=self.reopen_max_s,
        )


@dataclass(frozen=True, kw_only=True)
class DirectorySection:
    enabled: bool = False
    path: Path = Path("/var/lib/edgeguard/incoming")
    poll_s: float = 0.5
    settle_s: float = 1.0
    max_file_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        try:
            self.to_directory_config()
        except ValueError as exc:
            raise ConfigError(f"sources.directory: {exc}") from None

    def to_directory_config(self) -> DirectoryConfig:
        return DirectoryConfig(
            path=self.path, poll_s=self.poll_s, settle_s=self.settle_s, max_file_bytes=self.max_file_bytes
        )


@dataclass(frozen=True, kw_only=True)
class CommandsSection:
    """Signed remote commands on ``cmd`` (docs/commands.md)."""

    enabled: bool = False
    operator_keys: tuple[Path, ...] = ()  # trusted operator Ed25519 .pub files
    revocations: Path | None = None  # revoked operator key ids, same format as model.revocations
    max_bytes: int = 65536  # a command larger than this is refused before it is parsed
    max_clock_skew_s: float = 300.0  # tolerance on issued_at / expires_at against this device's clock

    def __post_init__(self) -> None:
        if self.enabled:
            _check(len(self.operator_keys) >= 1, "commands.operator_keys", "needs at least one operator key")
        _check(256 <= self.max_bytes <= 1 << 20, "commands.max_bytes", "must be 256..1048576")
        _seconds(self.max_clock_skew_s, "commands.max_clock_skew_s", 0, 86400)


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    path: Path  # the file it came from (SIGHUP re-reads it)
    device: DeviceSection
    model: ModelSection
    service: SupervisorSection = field(default_factory=SupervisorSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    api: ApiSection = field(default_factory=lambda: ApiSection(enabled=False))
    mqtt_input: MqttInputSection = field(default_factory=MqttInputSection)
    serial: SerialSection = field(default_factory=SerialSection)
    directory: DirectorySection = field(default_factory=DirectorySection)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    commands: CommandsSection = field(default_factory=CommandsSection)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    integrity: IntegrityConfig = field(default_factory=IntegrityConfig)
    site: SiteConfig = field(default_factory=SiteConfig)

    @property
    def outbox_path(self) -> Path:
        return self.device.state_dir / "outbox"

    @property
    def supervisor_state_path(self) -> Path:
        return self.device.state_dir / "supervisor.json"


_TOP = (
    "device", "model", "service", "watchdog", "sources", "outbox", "link", "commands", "deploy", "audit",
    "integrity", "site",
)
_SOURCES = ("api", "mqtt", "serial", "directory")


def parse_config(doc: dict[str, Any], *, path: Path) -> ServiceConfig:
    for key in doc:
        if key not in _TOP:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(_TOP)})")
    for key in ("device", "model"):
        if key not in doc:
            raise ConfigError(f"{key}: section missing")
    base = path.parent
    device = build(DeviceSection, _paths(doc["device"], ("state_dir", "signing_key"), base), "device")
    model = build(
        ModelSection, _paths(doc["model"], ("bundle", "trust", "revocations", "device_key"), base), "model"
    )
    sources = doc.get("sources", {})
    if not isinstance(sources, dict):
        raise ConfigError("sources: must be a table")
    for key in sources:
        if key not in _SOURCES:
            raise ConfigError(f"sources.{key}: unknown source (known: {', '.join(_SOURCES)})")
    cfg = ServiceConfig(
        path=path,
        device=device,
        model=model,
        service=build(SupervisorSection, _paths(doc.get("service", {}), ("hooks_dir",), base), "service"),
        watchdog=build(WatchdogSection, doc.get("watchdog", {}), "watchdog"),
        api=_api_section(sources.get("api", {"enabled": False}), base),
        mqtt_input=build(MqttInputSection, sources.get("mqtt", {}), "sources.mqtt"),
        serial=build(SerialSection, sources.get("serial", {}), "sources.serial"),
        directory=build(
            DirectorySection, _paths(sources.get("directory", {}), ("path",), base), "sources.directory"
        ),
        outbox=build(OutboxConfig, doc.get("outbox", {}), "outbox"),
        link=build(
            LinkConfig, _paths(doc.get("link", {}), ("ca_file", "client_cert", "client_key"), base), "link"
        ),
        commands=build(
            CommandsSection,
            _paths(doc.get("commands", {}), ("operator_keys", "revocations"), base),
            "commands",
        ),
        deploy=build(DeployConfig, doc.get("deploy", {}), "deploy"),
        audit=build(AuditConfig, doc.get("audit", {}), "audit"),
        integrity=build(IntegrityConfig, _paths(doc.get("integrity", {}), ("paths",), base), "integrity"),
        site=_site(_paths(doc.get("site", {}), ("client_cert", "client_key"), base)),
    )
    if cfg.site.enabled and cfg.link.protocol == "3.1.1":
        raise ConfigError(
            "site.enabled: group input needs MQTT 5 shared subscriptions, but link.protocol is 3.1.1 "
            "(docs/sites.md)"
        )
    if cfg.site.client_cert is not None and cfg.link.ca_file is None:
        raise ConfigError("site.client_cert: mutual TLS needs link.ca_file (docs/sites.md)")
    if cfg.commands.enabled and cfg.commands.max_bytes > cfg.link.inbound_max_bytes:
        raise ConfigError(
            f"commands.max_bytes: {cfg.commands.max_bytes} exceeds link.inbound_max_bytes "
            f"({cfg.link.inbound_max_bytes}); raise that too"
        )
    if cfg.mqtt_input.enabled and cfg.mqtt_input.max_body_bytes > cfg.link.inbound_max_bytes:
        raise ConfigError(
            f"sources.mqtt.max_body_bytes: {cfg.mqtt_input.max_body_bytes} exceeds "
            f"link.inbound_max_bytes ({cfg.link.inbound_max_bytes}); raise that too"
        )
    return cfg


def _api_section(table: Any, base: Path) -> ApiSection:
    if not isinstance(table, dict):
        raise ConfigError("sources.api: must be a table")
    table = dict(table)
    budget = build(BudgetSection, table.pop("budget", {}), "sources.api.budget")
    paths = _paths(table, ("unix_socket", "tokens_file"), base)
    return build(ApiSection, paths, "sources.api", budget=budget)


def _site(table: Any) -> SiteConfig:
    """``[site]`` with its ``[[site.streams]]`` tables (each checked like a section of its own)."""
    if not isinstance(table, dict):
        raise ConfigError("site: must be a table")
    doc = dict(table)
    raw = doc.pop("streams", [])
    if not isinstance(raw, list):
        raise ConfigError("site.streams: must be an array of tables ([[site.streams]])")
    streams = tuple(build(StreamBinding, s, f"site.streams[{i}]") for i, s in enumerate(raw))
    return build(SiteConfig, doc, "site", streams=streams)


def _paths(table: Any, keys: tuple[str, ...], base: Path) -> Any:
    """Relative paths in the config are relative to the config file, not to the working directory."""
    if not isinstance(table, dict):
        return table
    out = dict(table)
    for key in keys:
        v = out.get(key)
        if isinstance(v, str) and v and not v.startswith("/"):
            out[key] = str(base / v)
        elif isinstance(v, list):
            out[key] = [str(base / x) if isinstance(x, str) and x and not x.startswith("/") else x for x in v]
    return out


# Keys whose value is a secret: a config file holding one must be as private as a key file.
_SECRET_KEYS = tuple(tuple(k.split(".", 1)) for k in sorted(SECRET_KEYS))


def load_config(path: Path) -> ServiceConfig:
    doc, mode = load_toml(path)
    # Checked before the values are parsed, so not even an error about another key gets out of such a file.
    held = [f"{s}.{k}" for s, k in _SECRET_KEYS if isinstance(doc.get(s), dict) and doc[s].get(k)]
    if held and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"config {path} holds {held[0]} but is accessible by group/others (mode {mode:04o}): "
            f"run chmod 600 {path} (owned by the user the service runs as)"
        )
    return parse_config(doc, path=path.resolve())
