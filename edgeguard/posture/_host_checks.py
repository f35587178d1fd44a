"""Posture checks on the host: core dumps and ptrace, swap, the clock, the watchdog, the unit's sandboxing
and the publisher's signed advisories (docs/security.md, "edgeguard scan")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgeguard._safeio import read_checked
from edgeguard.keys import TrustStore

from ._advisories import AdvisoryError, affected, read_advisories
from ._findings import Finding
from ._host import HostProbe, read_swaps

if TYPE_CHECKING:  # the service imports this package: no import of it at run time
    from edgeguard.service.config import ServiceConfig

__all__ = [
    "ADVISORY_FILE",
    "check_core_dumps",
    "check_swap",
    "check_clock",
    "check_watchdog",
    "check_systemd",
    "check_advisories",
]

ADVISORY_FILE = "advisories.json"
_SCORE_MEDIUM = 5.0  # systemd-analyze's own bands: < 5 "OK", 5..7 "MEDIUM", 7..9 "EXPOSED", above "UNSAFE"
_SCORE_HIGH = 7.0

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
        data = read_checked(unit, what="unit file", limit=256 * 1024, error=OSError).data
        return data.decode("utf-8", "replace")
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
