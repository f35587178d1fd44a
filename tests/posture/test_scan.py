"""`edgeguard scan`: each check sees its planted weakness and forgets it once fixed; a fresh setup reports
nothing above "low"; the CLI's table, JSON and exit statuses. Real files, real modes and owners, the real
`systemd-analyze` on the shipped unit, real signed advisory files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgeguard._hardening import ProcessHardening
from edgeguard.posture import ScanReport
from tests.posture._rig import NOW, UNIT, Rig, synced_clock


def _above_low(report: ScanReport) -> list[tuple[str, str, str]]:
    return [(f.check, f.severity, f.evidence) for f in report.findings if f.rank > 1]


def _has(report: ScanReport, check: str, severity: str) -> bool:
    return any(f.check == check and f.severity == severity for f in report.findings)


def test_fresh_setup_reports_nothing_above_low(rig: Rig) -> None:
    report = rig.scan()
    assert _above_low(report) == [] and report.ok
    # Broker without TLS on loopback is still named, as a low finding.
    assert _has(report, "broker-tls", "low") and _has(report, "broker-anonymous", "low")
    secrets = [line.split()[2] for line in (rig.root / "tokens").read_text().splitlines()]
    assert not any(s in json.dumps(report.to_json()) for s in secrets)


# --- plant / fix, one row per weakness -------------------------------------------------------------------

Step = Callable[[Rig], None]


def _remote_link(text: str) -> Step:
    """The broker on another host (192.0.2.10), with ``text`` as more [link] keys."""

    def edit(r: Rig) -> None:
        cfg = r.root / "edgeguard.toml"
        cfg.write_text(cfg.read_text().replace('[link]\nhost = "127.0.0.1"', '[link]\nhost = "192.0.2.10"'))

    def step(r: Rig) -> None:
        (r.root / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
        r.link_extra = text
        r.after.append(edit)

    return step


def _edit(fn: Callable[[Rig], None]) -> Step:
    return lambda r: r.after.append(fn)


def _chmod(rel: str, mode: int) -> Step:
    return _edit(lambda r: (r.root / rel).chmod(mode))


def _chown(rel: str, uid: int) -> Step:
    def step(r: Rig) -> None:
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root")
        r.after.append(lambda r: os.chown(r.root / rel, uid, -1))

    return step


def _append_tokens(*lines: str) -> Step:
    def edit(r: Rig) -> None:
        with (r.root / "tokens").open("a") as f:
            f.write("".join(line + "\n" for line in lines))

    return _edit(edit)


def _age_tokens(days: int) -> Step:
    def edit(r: Rig) -> None:
        t = (datetime.now(timezone.utc) - timedelta(days=days)).timestamp()
        os.utime(r.root / "tokens", (t, t))

    return _edit(edit)


def _api_host(host: str) -> Step:
    def edit(r: Rig) -> None:
        cfg = r.root / "edgeguard.toml"
        text = cfg.read_text()
        cfg.write_text(text.replace('host = "127.0.0.1"\nport = 8780', f'host = "{host}"\nport = 8780'))

    def step(r: Rig) -> None:
        r.api_extra = "allow_non_loopback = true\n"
        r.after.append(edit)

    return step


def _probe(**changes: Any) -> Step:
    def step(r: Rig) -> None:
        r.probe = replace(r.probe, **changes)

    return step


def _unit_without(*keys: str) -> Step:
    def step(r: Rig) -> None:
        prefixes = tuple(f"{k}=" for k in keys)
        lines = [line for line in UNIT.read_text().splitlines() if not line.startswith(prefixes)]
        (r.root / "weak.service").write_text("\n".join(lines) + "\n")
        r.probe = replace(r.probe, unit=lambda: r.root / "weak.service")

    return step


def _swap(device: str, uuid: str | None = None) -> Step:
    def step(r: Rig) -> None:
        (r.root / "proc" / "swaps").write_text(
            f"Filename\tType\tSize\tUsed\tPriority\n{device}\tpartition\t1048572\t0\t-2\n"
        )
        if uuid is not None:
            dm = r.root / "sys" / "block" / Path(device).name / "dm"
            dm.mkdir(parents=True, exist_ok=True)
            (dm / "uuid").write_text(uuid + "\n")

    return step


def _clock(**changes: Any) -> Step:
    return _probe(clock=lambda state_dir: replace(synced_clock(state_dir), **changes))


def _sysctl(name: str, value: str) -> Step:
    return lambda r: r.proc(name, value)


def _extra(text: str) -> Step:
    return lambda r: setattr(r, "extra", text)


def _nothing(r: Rig) -> None:
    return None


_DUMPABLE = ProcessHardening(supported=True, dumpable=True, core_limit=-1)
_HARDENED = ProcessHardening(supported=True, dumpable=False, core_limit=0)

ROWS: list[tuple[str, Step, Step, str, str]] = [
    # id, plant, fix (applied after the planted file edits are dropped), check, severity when planted
    (
        "broker-no-tls",
        _remote_link('username = "d"\n'),
        _remote_link('username = "d"\nca_file = "ca.pem"\n'),
        "broker-tls",
        "high",
    ),
    (
        "broker-anonymous",
        _remote_link('ca_file = "ca.pem"\n'),
        _remote_link('ca_file = "ca.pem"\nusername = "d"\npassword = "p-0123456789"\n'),
        "broker-anonymous",
        "high",
    ),
    ("api-beyond-loopback", _api_host("0.0.0.0"), _api_host("127.0.0.1"), "api-bind", "high"),
    ("token-weak", _append_tokens("weak infer aaaaaaaaaaaaaaaaaaaa"), _nothing, "api-tokens", "high"),
    (
        "token-shared",
        _append_tokens("copy infer app-token-0123456789abcdef"),
        _nothing,
        "api-tokens",
        "medium",
    ),
    ("tokens-old", _age_tokens(400), _nothing, "api-tokens", "medium"),
    (
        "key-readable",
        _chmod("keys/device.key", 0o644),
        _chmod("keys/device.key", 0o600),
        "file-perms",
        "high",
    ),
    ("tokens-readable", _chmod("tokens", 0o640), _chmod("tokens", 0o600), "file-perms", "high"),
    (
        "config-writable",
        _chmod("edgeguard.toml", 0o666),
        _chmod("edgeguard.toml", 0o644),
        "file-perms",
        "high",
    ),
    ("hook-writable", _chmod("hooks/50-log", 0o777), _chmod("hooks/50-log", 0o755), "file-perms", "high"),
    ("hooks-dir-writable", _chmod("hooks", 0o777), _chmod("hooks", 0o755), "file-perms", "high"),
    ("state-writable", _chmod("state", 0o777), _nothing, "file-perms", "high"),
    ("state-readable", _chmod("state", 0o755), _nothing, "file-perms", "low"),
    ("keys-dir-writable", _chmod("keys", 0o777), _chmod("keys", 0o755), "file-perms", "high"),
    (
        "trust-foreign-owner",
        _chown("keys/publisher.pub", 65534),
        _chown("keys/publisher.pub", 0),
        "file-perms",
        "high",
    ),
    ("worker-dumpable", _probe(process=_DUMPABLE), _probe(process=_HARDENED), "core-dumps", "high"),
    (
        "suid-dumpable",
        _sysctl("fs.suid_dumpable", "2"),
        _sysctl("fs.suid_dumpable", "0"),
        "core-dumps",
        "high",
    ),
    (
        "ptrace-open",
        _sysctl("kernel.yama.ptrace_scope", "0"),
        _sysctl("kernel.yama.ptrace_scope", "1"),
        "ptrace",
        "low",
    ),
    ("unit-cores", _unit_without("LimitCORE"), _probe(unit=lambda: UNIT), "core-dumps", "medium"),
    (
        "not-mlocked",
        _probe(mlock="a 12.0 MiB plaintext buffer is not locked in RAM"),
        _probe(mlock="ok"),
        "mlock",
        "low",
    ),
    ("swap-partition", _swap("/dev/sda2"), _swap("/dev/zram0"), "swap", "medium"),
    (
        "swap-dm-plain",
        _swap("/dev/dm-1", "LVM-abc"),
        _swap("/dev/dm-1", "CRYPT-PLAIN-swap"),
        "swap",
        "medium",
    ),
    ("clock-unsynced", _clock(synchronised=False), _clock(synchronised=True), "clock", "medium"),
    ("clock-set-back", _clock(wall=NOW - timedelta(days=30)), _clock(wall=NOW), "clock", "high"),
    ("floor-corrupt", _clock(problem="state/time-floor: corrupt"), _clock(problem=None), "clock", "medium"),
    (
        "watchdog-off",
        _extra("\n[watchdog]\nsystemd = false\n"),
        _extra('\n[watchdog]\nsystemd = false\ndevice = "/dev/watchdog"\n'),
        "watchdog",
        "medium",
    ),
    ("unit-no-watchdog", _unit_without("WatchdogSec"), _probe(unit=lambda: UNIT), "watchdog", "medium"),
]


@pytest.mark.parametrize(
    ("plant", "fix", "check", "severity"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_each_planted_weakness_is_found_and_gone_once_fixed(
    rig: Rig, plant: Step, fix: Step, check: str, severity: str
) -> None:
    plant(rig)
    weak = rig.scan()
    assert _has(weak, check, severity), [f.to_json() for f in weak.findings]
    assert weak.ok == (severity in ("info", "low"))
    rig.after.clear()
    fix(rig)
    fixed = rig.scan()
    left = [f.to_json() for f in fixed.findings if f.check == check and f.rank >= _rank(severity)]
    assert left == []
    assert _above_low(fixed) == []


def _rank(severity: str) -> int:
    return ("info", "low", "medium", "high", "critical").index(severity)
