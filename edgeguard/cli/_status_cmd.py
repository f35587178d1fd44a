"""``edgeguard status [-c CONFIG] [--json] [--wait S]``: is the service OK, and if not, why.

Asks the running service (``GET /v1/health`` on its local API, with a token of scope ``status`` taken from the
config's tokens file); when nothing answers, reads what the supervisor last wrote in the state directory. The
first line answers the question; the lines after it give the model, fast path, inferences, outbox, link and
restarts with MTBF/MTTR. Exit 0 when OK, 1 when not, 2 for a config problem (no config, no usable token).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError

from ._token_cmds import read_token_lines

__all__ = ["register", "Report", "collect"]

_HELP = """\
Show whether the service configured in CONFIG is OK, and if not, why (first line), then its model, fast path,
inferences, outbox, MQTT link and restarts with MTBF/MTTR. The running service is asked through its local API
with a token of scope `status` from the config's tokens file (or --tokens FILE); when it does not answer, the
supervisor's state file in the state directory tells what happened last.
Exit 0 OK, 1 not OK (or not running), 2 config error.

example:
  edgeguard status -c mydevice/edgeguard.toml
  edgeguard status -c mydevice/edgeguard.toml --wait 60    # until OK, for scripts
  edgeguard status --json | jq .summary"""

_TIMEOUT_S = 5.0  # a health answer is built from in-memory counters: seconds mean the service is stuck


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser(
        "status",
        help="is the service OK, and if not, why (health, model, outbox, link, MTBF)",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path("/etc/edgeguard/edgeguard.toml"),
        metavar="CONFIG.toml",
        help="service configuration (default: /etc/edgeguard/edgeguard.toml)",
    )
    p.add_argument("--tokens", type=Path, metavar="FILE",
                   help="tokens file holding a token of scope status (default: the config's tokens_file)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="keep asking until the service is OK or this many seconds passed (default: 0, once)")
    p.set_defaults(handler=_status)


@dataclass
class Report:
    ok: bool
    summary: str  # the first line
    source: str  # "api" or "state files"
    details: list[str] = field(default_factory=list)
    health: dict[str, Any] | None = None
    supervisor: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary, "source": self.source, "health": self.health,
                "supervisor": self.supervisor}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _status_token(cfg: Any, tokens: Path | None) -> str:
    path = tokens
    if path is None:
        if cfg.api.tokens_file is not None:
            path = cfg.api.tokens_file
        else:
            from edgeguard.sources import credential_path  # noqa: PLC0415

            path = credential_path(cfg.api.tokens_credential)
    for line in read_token_lines(path):
        if line.name and "status" in line.scopes:
            return line.secret
    raise ConfigError(
        f"no token of scope status in {path} (add one: edgeguard token add NAME --scope status)"
    )


def _ask(cfg: Any, token: str) -> tuple[int, dict[str, Any], str]:
    api = cfg.api
    if api.host is not None:
        # A wildcard bind is reached through loopback from this machine.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(api.host, api.host)  # noqa: S104
        where = f"http://{host}:{api.port}"
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, api.port, timeout=_TIMEOUT_S)
    else:
        where = f"unix:{api.unix_socket}"
        conn = _UnixConnection(str(api.unix_socket), _TIMEOUT_S)
    try:
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read(1 << 22)  # a health document is a few kB; a bound all the same
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    return resp.status, doc if isinstance(doc, dict) else {}, where


def _fmt_s(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f} s"


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f} ms"


def _from_health(code: int, h: dict[str, Any], where: str) -> Report:
    model = h.get("model") or {}
    state = h.get("state", "?")
    link, outbox, sup = h.get("link") or {}, h.get("outbox") or {}, h.get("supervisor") or {}
    why = [
        str(reason)
        for reason in (
            h.get("alarm"),
            None if state == "serving" else f"state {state}: {h.get('degraded_reason') or 'not serving'}",
            None if code == 200 else f"health check answered {code}",
        )
        if reason
    ]
    ok = not why and h.get("ok", True) is not False
    name = f"{model.get('name')} v{model.get('version')}" if model else "no model"
    if ok:
        summary = f"OK: serving {name} on {h.get('accelerator')} ({h.get('backend')}), pid {h.get('pid')}"
        if h.get("degraded_reason"):
            summary += f"; degraded: {h['degraded_reason']}"
    else:
        summary = f"NOT OK: {'; '.join(why) or 'health check failed'}"
    skipped = [c["label"] for c in h.get("candidates", []) if c.get("status") != "active"]
    lat = h.get("latency_ms") or {}
    alarm = f", ALARM {outbox['alarm']}" if outbox.get("alarm") else ""
    link_state = "connected" if link.get("connected") else f"down ({link.get('error') or 'connecting'})"
    last = f", last: {sup['last_reason']}" if sup.get("last_reason") else ""
    details = [
        f"api        {where} (pid {h.get('pid')})",
        f"model      {name}" + (f" sha256 {str(model.get('sha256'))[:16]}..." if model else ""),
        (
            f"fast path  {h.get('accelerator')} via {h.get('backend')}, profile {h.get('profile')}"
            + (f"; not used: {', '.join(skipped)}" if skipped else "")
            if h.get("backend")
            else "fast path  none (no model loaded)"
        ),
        f"inference  {h.get('inferences', 0)} done, p50 {_fmt_ms(lat.get('p50'))}, "
        f"p99 {_fmt_ms(lat.get('p99'))}, "
        f"rejected {h.get('rejected', 0)}",
        f"outbox     depth {outbox.get('depth', '?')}, oldest {_fmt_s(outbox.get('oldest_age_s'))}, "
        f"dropped {outbox.get('dropped_total', 0)}{alarm}",
        f"link       {link_state}, MQTT {link.get('protocol')}, published {link.get('published', 0)}, "
        f"acked {link.get('acked', 0)}",
        f"restarts   {sup.get('restarts', 0)} (failures {sup.get('failures', 0)}), "
        f"MTBF {_fmt_s(sup.get('mtbf_s'))}, MTTR {_fmt_s(sup.get('mttr_s'))}{last}",
    ]
    return Report(ok, summary, "api", details, health=h)


def _from_state_files(cfg: Any, why: str) -> Report:
    from edgeguard.service._state import read_state  # noqa: PLC0415 - the reader the worker itself uses

    path = cfg.supervisor_state_path
    if not path.exists():
        return Report(False, f"NOT OK: not running ({why}); never started here (no {path})", "state files")
    sup = read_state(path).to_json()
    last = "in the SAFE STATE: " + str(sup["safe_reason"]) if sup.get("safe_state") else (
        f"last failure: {sup['last_reason']}" if sup.get("last_reason") else "no failure recorded")
    details = [
        f"state      {path}",
        f"restarts   {sup['restarts']} (failures {sup['failures']}), MTBF {_fmt_s(sup['mtbf_s'])}, "
        f"MTTR {_fmt_s(sup['mttr_s'])}",
    ] + [f"failure    {f['reason']} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(f['at']))}"
         for f in sup["history"][-3:]]
    return Report(False, f"NOT OK: not running ({why}); {last}", "state files", details, supervisor=sup)


def collect(cfg: Any, tokens: Path | None) -> Report:
    """One look at the service: its API when it answers, else its state files."""
    if not cfg.api.enabled:
        return _from_state_files(cfg, "the local API is disabled in the config")
    token = _status_token(cfg, tokens)
    try:
        code, doc, where = _ask(cfg, token)
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return _from_state_files(cfg, f"no answer from its API: {reason}")
    if code in (401, 403):
        raise ConfigError(f"{where} refused the status token ({code}): is the tokens file the one it serves?")
    if not doc:
        return Report(False, f"NOT OK: {where} answered {code} without a health document", "api")
    return _from_health(code, doc, where)


def _status(args: argparse.Namespace) -> int:
    from edgeguard.service import load_config  # noqa: PLC0415 - keep the service stack out of other commands

    cfg = load_config(args.config)
    deadline = time.monotonic() + max(0.0, args.wait)
    report = collect(cfg, args.tokens)
    while not report.ok and time.monotonic() < deadline:
        time.sleep(0.25)  # polling a condition with a deadline, not papering over a race
        report = collect(cfg, args.tokens)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(report.summary)
        for line in report.details:
            print(f"  {line}")
    return 0 if report.ok else 1
