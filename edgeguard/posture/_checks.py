"""The posture checks: each reads the config and the host (through :class:`HostProbe`) and returns findings.

A check never raises on what it inspects (a missing file, a tool that is not installed): that becomes a
finding or an "info" note. Evidence names paths, modes, owners, token *names* and versions, never a secret.
The severities and the reasoning behind each are listed in docs/security.md ("edgeguard scan").
"""

from __future__ import annotations

import ipaddress
import math
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edgeguard._smallfile import read_small_file
from edgeguard.keys import TrustStore

from ._advisories import AdvisoryError, affected, read_advisories
from ._findings import Finding, ScanReport, Severity
from ._host import HostProbe, read_swaps

if TYPE_CHECKING:  # the service imports this package: no import of it at run time
    from edgeguard.service.config import ServiceConfig

__all__ = ["run_scan", "CHECKS", "ADVISORY_FILE"]

ADVISORY_FILE = "advisories.json"
TOKEN_MAX_AGE_DAYS = 365
_SCORE_MEDIUM = 5.0  # systemd-analyze's own bands: < 5 "OK", 5..7 "MEDIUM", 7..9 "EXPOSED", above "UNSAFE"
_SCORE_HIGH = 7.0


def _loopback(host: str | None) -> bool:
    if host is None:
        return True  # no TCP listener at all
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- broker -----------------------------------------------------------------------------------------------


def check_broker(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    link = cfg.link
    local = _loopback(link.host)
    if link.ca_file is None:
        yield Finding(
            "broker-tls",
            "low" if local else "high",
            "MQTT broker connection without TLS",
            f"link.host = {link.host}:{link.port}, no link.ca_file"
            + (" (loopback: traffic stays on this device)" if local else ""),
            "set link.ca_file (and client_cert/client_key for mutual TLS) and use the broker's TLS port",
        )
    if link.username is None and link.client_cert is None:
        yield Finding(
            "broker-anonymous",
            "low" if local else "high",
            "the device connects to the broker anonymously, so the broker accepts anonymous clients",
            f"link.username and link.client_cert are unset ({link.host})",
            "give each device a broker identity (client certificate or username/password) and set "
            "allow_anonymous false on the broker",
        )
    # The link always verifies the broker's name (paho tls_set(cert_reqs=CERT_REQUIRED), tls_insecure
    # never set); a config that could turn it off is reported here should such a key ever exist.
    if link.ca_file is not None and getattr(link, "tls_insecure", False):
        yield Finding(
            "broker-hostname",
            "high",
            "TLS without a host name check: any certificate from the CA is accepted for any broker",
            "link.tls_insecure = true",
            "remove tls_insecure; issue the broker a certificate that names link.host",
        )


# --- API --------------------------------------------------------------------------------------------------


def check_api_bind(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    api = cfg.api
    if api.enabled and not _loopback(api.host):
        yield Finding(
            "api-bind",
            "high",
            "the local API listens beyond loopback",
            f"sources.api.host = {api.host!r}, port {api.port}"
            + (" (allow_non_loopback = true)" if api.allow_non_loopback else ""),
            "bind it to 127.0.0.1 or use sources.api.unix_socket; put a TLS proxy in front if it must be "
            "remote",
        )


def _token_bits(secret: str) -> float:
    """A generous strength estimate: length x log2(distinct characters used)."""
    distinct = len(set(secret))
    return len(secret) * math.log2(distinct) if distinct > 1 else 0.0


def check_tokens(cfg: ServiceConfig, host: HostProbe, *, now: float | None = None) -> Iterator[Finding]:
    api = cfg.api
    if not api.enabled or api.tokens_file is None:
        return  # a systemd credential is copied by systemd with a private mode; nothing to read here
    path = api.tokens_file
    try:
        raw = read_small_file(path, limit=1024 * 1024)
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        yield Finding(
            "api-tokens",
            "medium",
            "API tokens file unreadable",
            f"{path}: {exc.strerror}",
            "fix the path in sources.api.tokens_file",
        )
        return
    seen: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) != 3:
            continue
        name, _, secret = parts
        if len(secret) < 24 or _token_bits(secret) < 96:
            yield Finding(
                "api-tokens",
                "high",
                f"API token {name!r} is weak",
                f"{len(secret)} characters, {len(set(secret))} distinct (~{_token_bits(secret):.0f} bits)",
                "replace it with a random one: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            )
        if secret in seen:
            yield Finding(
                "api-tokens",
                "medium",
                f"API tokens {seen[secret]!r} and {name!r} are the same secret (shared)",
                f"two entries of {path} hold one token value",
                "give every client its own token, so one can be revoked without the other",
            )
        else:
            seen[secret] = name
    age_days = ((now if now is not None else time.time()) - st.st_mtime) / 86400
    if age_days > TOKEN_MAX_AGE_DAYS:
        yield Finding(
            "api-tokens",
            "medium",
            "API tokens are old (not rotated)",
            f"{path} last changed {age_days:.0f} days ago (limit {TOKEN_MAX_AGE_DAYS})",
            "issue new tokens, update the clients, then reload the service (SIGHUP)",
        )


# --- files ------------------------------------------------------------------------------------------------


def _who(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _file_findings(path: Path, what: str, *, secret: bool, directory: bool = False) -> Iterator[Finding]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return  # the service reports missing files itself; the scan judges what exists
    except OSError as exc:
        yield Finding(
            "file-perms",
            "medium",
            f"{what} cannot be inspected",
            f"{path}: {exc.strerror}",
            "check the path and its parent directories",
        )
        return
    mode = stat.S_IMODE(st.st_mode)
    trusted_owners = {0, os.geteuid()}
    if stat.S_ISLNK(st.st_mode):
        yield Finding(
            "file-perms",
            "medium",
            f"{what} is a symbolic link",
            f"{path} -> {os.readlink(path)}",
            "point the config at the real file (keys and tokens are never read through links)",
        )
        return
    if st.st_uid not in trusted_owners:
        yield Finding(
            "file-perms",
            "high",
            f"{what} is owned by another user",
            f"{path} is owned by {_who(st.st_uid)} (expected root or {_who(os.geteuid())})",
            f"chown root {path} (or the service user)",
        )
    if mode & 0o022:
        yield Finding(
            "file-perms",
            "high",
            f"{what} is writable by group or others",
            f"{path} mode {mode:04o}",
            f"chmod go-w {path}",
        )
    if secret and mode & 0o077:
        yield Finding(
            "file-perms",
            "high",
            f"{what} is readable by group or others",
            f"{path} mode {mode:04o}",
            f"chmod {'700' if directory else '600'} {path}",
        )
    if not directory:
        parent = path.parent
        try:
            pst = os.stat(parent)
        except OSError:
            return
        if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
            yield Finding(
                "file-perms",
                "high",
                f"the directory holding {what} is writable by anyone",
                f"{parent} mode {stat.S_IMODE(pst.st_mode):04o}",
                f"chmod o-w {parent}",
            )


def check_files(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    m = cfg.model
    if m.device_key is not None:
        yield from _file_findings(m.device_key, "the device key", secret=True)
    if cfg.api.enabled and cfg.api.tokens_file is not None:
        yield from _file_findings(cfg.api.tokens_file, "the API tokens file", secret=True)
    if cfg.link.client_key is not None:
        yield from _file_findings(cfg.link.client_key, "the broker client key", secret=True)
    for pub in m.trust:
        yield from _file_findings(pub, "a trusted publisher key", secret=False)
    if m.revocations is not None:
        yield from _file_findings(m.revocations, "the revocation list", secret=False)
    if cfg.link.ca_file is not None:
        yield from _file_findings(cfg.link.ca_file, "the broker CA file", secret=False)
    yield from _file_findings(cfg.path, "the config file", secret=False)
    hooks = cfg.service.hooks_dir
    if hooks is not None and hooks.is_dir():
        yield from _file_findings(hooks, "the hooks directory", secret=False, directory=True)
        for hook in sorted(hooks.iterdir())[:256]:
            yield from _file_findings(hook, f"hook {hook.name}", secret=False)
    state = cfg.device.state_dir
    if state.is_dir():
        yield from _file_findings(state, "the state directory", secret=False, directory=True)
        mode = stat.S_IMODE(os.stat(state).st_mode)
        if mode & 0o055 and not mode & 0o022:
            yield Finding(
                "file-perms",
                "low",
                "the state directory is readable by group or others",
                f"{state} mode {mode:04o} (outbox and floors are readable; results are encrypted at rest)",
                f"chmod 700 {state}",
            )


# --- process, kernel, swap, clock -----------------------------------------------------------------------


def check_core_dumps(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    proc = host.process
    if proc is not None and not proc.ok:
        yield Finding(
            "core-dumps",
            "high",
            "the process holding the plaintext model can dump core or be traced",
            f"dumpable={proc.dumpable}, RLIMIT_CORE={proc.core_limit}"
            + (f"; {'; '.join(proc.errors)}" if proc.errors else ""),
            "run on Linux with prctl available; see docs/security.md",
        )
    suid = host.sysctl("fs.suid_dumpable")
    if suid == "2":
        yield Finding(
            "core-dumps",
            "high",
            "the kernel dumps core even for non-dumpable processes",
            "fs.suid_dumpable = 2 (suidsafe)",
            "sysctl -w fs.suid_dumpable=0 (and persist it in /etc/sysctl.d/)",
        )
    scope = host.sysctl("kernel.yama.ptrace_scope")
    if scope in (None, "0"):
        yield Finding(
            "ptrace",
            "low",
            "any process may ptrace other processes of its user",
            "kernel.yama.ptrace_scope = " + ("0" if scope == "0" else "(Yama not enabled)"),
            "sysctl -w kernel.yama.ptrace_scope=1 (the worker is non-dumpable either way)",
        )
    unit = host.unit()
    if unit is not None:
        text = _unit_text(unit)
        if text is not None and not _unit_has(text, "LimitCORE", "0"):
            yield Finding(
                "core-dumps",
                "medium",
                "the service unit does not forbid core dumps",
                f"{unit} has no LimitCORE=0",
                "reinstall the unit from firmware_hooks/edgeguard.service",
            )
    if host.mlock not in (None, "ok"):
        yield Finding(
            "mlock",
            "low",
            "plaintext buffers are not locked in RAM",
            str(host.mlock),
            "raise LimitMEMLOCK= in the unit (or the memlock ulimit) above the model size",
        )


def check_swap(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    swaps = read_swaps(host.proc, host.sys_root)
    if swaps is None:
        return
    plain = [s.device for s in swaps if s.kind == "plain"]
    if plain:
        yield Finding(
            "swap",
            "medium",
            "swap is active and unencrypted: model pages could be written to disk in clear",
            "unencrypted swap: " + ", ".join(plain[:8]),
            "swapoff and use zram, or encrypted swap (cryptsetup with a random key per boot), or none",
        )


def check_clock(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    state = host.clock(cfg.device.state_dir)
    if state.problem is not None:
        yield Finding(
            "clock",
            "medium",
            "the time floor cannot be used",
            state.problem,
            "restore the file from a backup or remove it (the floor restarts at the release date)",
        )
    if state.behind_s > 0:
        yield Finding(
            "clock",
            "high",
            "the wall clock is behind the device's time floor (set back?)",
            f"wall clock {state.wall.isoformat()} is {state.behind_s:.0f} s before the floor "
            f"{state.floor.isoformat()} ({state.floor_source})",
            "synchronise the clock (NTP); EdgeGuard uses the floor meanwhile",
        )
    if state.synchronised is False:
        yield Finding(
            "clock",
            "medium",
            "the clock is not synchronised",
            "the kernel reports the clock unsynchronised (adjtimex STA_UNSYNC)",
            "enable systemd-timesyncd or chrony; expiry checks run against the time floor meanwhile",
        )
    elif state.synchronised is None:
        yield Finding(
            "clock",
            "low",
            "cannot tell whether the clock is synchronised",
            "no timesyncd marker and adjtimex unavailable",
            "enable systemd-timesyncd",
        )


def check_watchdog(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    wd = cfg.watchdog
    hardware = wd.device is not None or wd.mcu_port is not None
    unit = host.unit()
    text = _unit_text(unit) if unit is not None else None
    systemd_wd = (
        wd.systemd
        and host.systemd_running()
        and (host.under_systemd or (text is not None and _unit_value(text, "WatchdogSec") not in (None, "0")))
    )
    if not hardware and not systemd_wd:
        why = (
            "watchdog.systemd = false"
            if not wd.systemd
            else "systemd is not managing this host"
            if not host.systemd_running()
            else "the unit has no WatchdogSec"
        )
        yield Finding(
            "watchdog",
            "medium",
            "no watchdog will restart a hung device",
            f"{why}; no watchdog.device or watchdog.mcu_port",
            'run under the shipped systemd unit (WatchdogSec=) or set watchdog.device = "/dev/watchdog"',
        )


def check_systemd(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    if not host.systemd_running():
        return
    unit = host.unit()
    if unit is None:
        yield Finding(
            "systemd",
            "low",
            "EdgeGuard's systemd unit is not installed",
            "no edgeguard.service",
            "install it with firmware_hooks/install.sh",
        )
        return
    score = host.security_score(unit)
    if score is None:
        return
    if score >= _SCORE_MEDIUM:
        yield Finding(
            "systemd",
            "high" if score >= _SCORE_HIGH else "medium",
            "the service unit is weakly sandboxed",
            f"systemd-analyze security {unit}: exposure {score:.1f} (shipped unit: below {_SCORE_MEDIUM})",
            "reinstall the unit from firmware_hooks/edgeguard.service; see its hardening section",
        )


def check_advisories(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    path = cfg.model.bundle.parent / ADVISORY_FILE
    if not path.exists() and not path.is_symlink():
        yield Finding(
            "advisories",
            "info",
            "no advisory file",
            f"{path} does not exist",
            "ask the publisher to ship advisories.json beside the bundle",
        )
        return
    try:
        trust = TrustStore.from_files(cfg.model.trust, revocation_list=cfg.model.revocations)
        advisories = read_advisories(path, trust)
    except AdvisoryError as exc:
        yield Finding(
            "advisories",
            "high",
            "the advisory file is not trustworthy",
            str(exc),
            "replace it with the publisher's signed file",
        )
        return
    except Exception as exc:
        yield Finding(
            "advisories",
            "medium",
            "the trust store cannot be loaded",
            str(exc).splitlines()[0],
            "fix model.trust / model.revocations",
        )
        return
    for pkg in host.packages():
        version = host.version(pkg)
        if version is None:
            continue
        for adv in advisories:
            if adv.package == pkg and affected(version, adv.affected):
                yield Finding(
                    "advisories",
                    adv.severity,
                    f"{pkg} {version} is affected by {adv.id}: {adv.summary}",
                    f"{pkg} {version} matches {', '.join(adv.affected)} ({path.name})",
                    adv.fix,
                )


# --- unit file helpers --------------------------------------------------------------------------------


def _unit_text(unit: Path) -> str | None:
    try:
        return read_small_file(unit, limit=256 * 1024).decode("utf-8", "replace")
    except OSError:
        return None


def _unit_value(text: str, key: str) -> str | None:
    value = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(f"{key}="):
            value = line.split("=", 1)[1].strip()  # the last assignment wins, as in systemd
    return value


def _unit_has(text: str, key: str, value: str) -> bool:
    return _unit_value(text, key) == value


CHECKS: dict[str, Callable[[ServiceConfig, HostProbe], Iterator[Finding]]] = {
    "broker": check_broker,
    "api-bind": check_api_bind,
    "api-tokens": check_tokens,
    "file-perms": check_files,
    "core-dumps": check_core_dumps,
    "swap": check_swap,
    "clock": check_clock,
    "watchdog": check_watchdog,
    "systemd": check_systemd,
    "advisories": check_advisories,
}


def run_scan(cfg: ServiceConfig, host: HostProbe | None = None) -> ScanReport:
    """Every check once, in a fixed order. A check that fails unexpectedly is itself a finding."""
    host = host or HostProbe()
    findings: list[Finding] = []
    for name, check in CHECKS.items():
        try:
            findings.extend(check(cfg, host))
        except Exception as exc:
            findings.append(
                Finding(
                    name,
                    "medium",
                    f"check {name} could not run",
                    f"{type(exc).__name__}: {exc}",
                    "report this as a bug in EdgeGuard",
                )
            )
    severity_order: tuple[Severity, ...] = ("critical", "high", "medium", "low", "info")
    findings.sort(key=lambda f: (severity_order.index(f.severity), f.check))
    return ScanReport(at=datetime.now(timezone.utc), findings=tuple(findings), checks=tuple(CHECKS))
