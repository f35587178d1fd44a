"""``edgeguard fleet status``, ``fleet watch`` and ``fleet exporter``: the operator's read-only views.

Each subscribes once to the fleet's retained status, heartbeats and events (edgeguard/fleet/view) and builds
the fleet's state in memory. ``status`` answers "is the fleet OK, and if not, why" in its first line and exits
0 when every device is fine, 1 when not (or no device was seen), 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeguard.errors import ConfigError, EdgeGuardError

if TYPE_CHECKING:  # the operator package is imported by the handlers only: a device never loads it
    from edgeguard.fleet.view import FleetEvent, FleetState, Follower

__all__ = ["register_fleet"]

_PASSWORD_ENV = "EDGEGUARD_MQTT_PASSWORD"  # noqa: S105 - a variable name, not a secret; never on the command line: argv is visible to every local user

_STATUS_HELP = """\
Subscribe to the fleet's retained status, heartbeats and events, and show every device: online/offline and
since when, heartbeat age, model@version, fast path, problems (offline, no heartbeat, degraded and why, outbox
alarm), outbox depth, inferences/s, p99 latency, restarts, MTBF/MTTR and the last security event.
The first line says whether the fleet is OK and, if not, why. Exit 0 OK, 1 not OK, 2 bad options.
The broker password, if any, is read from $EDGEGUARD_MQTT_PASSWORD.

example:
  edgeguard fleet status --broker 127.0.0.1:1883 --fleet plant1
  edgeguard fleet status --fleet plant1 --problem --sort outbox
  edgeguard fleet status --fleet plant1 --groups          # site groups: members, share, load, failovers
  edgeguard fleet status --fleet plant1 --json | jq '.devices[] | select(.online == false) | .device'"""

_WATCH_HELP = """\
Follow the fleet live: print each event (security and reliability events, devices going online, offline or
degraded) as it arrives, one line each (--json: one JSON object per line); --table redraws the status table.
Stop with Ctrl-C.

example:
  edgeguard fleet watch --fleet plant1
  edgeguard fleet watch --fleet plant1 --table"""

_EXPORTER_HELP = """\
Serve the fleet's heartbeats as Prometheus metrics on http://LISTEN/metrics (needs the `fleet` extra:
pip install 'edgeguard[fleet]'). Metrics carry fleet/device/group/model labels; see docs/operators.md and
examples/grafana-fleet-dashboard.json.

example:
  edgeguard fleet exporter --broker 127.0.0.1:1883 --fleet plant1 --listen 127.0.0.1:9786"""


def register_fleet(fsub: argparse._SubParsersAction[Any]) -> None:
    """Add status, watch and exporter to the ``fleet`` group's subparsers."""
    for name, help_, desc, handler in (
        ("status", "is the fleet OK, and if not, why (a table, or --json)", _STATUS_HELP, _status),
        ("watch", "stream the fleet's events as they happen (--table: a live table)", _WATCH_HELP, _watch),
        ("exporter", "serve the fleet's heartbeats as Prometheus metrics", _EXPORTER_HELP, _exporter),
    ):
        p = fsub.add_parser(
            name, help=help_, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        _broker_args(p)
        if name != "exporter":
            p.add_argument("--group", metavar="G", help="only devices in group G")
            p.add_argument("--problem", action="store_true", help="only devices that need attention")
            p.add_argument(
                "--sort",
                default="device",
                help="sort column: device, state, heartbeat, model, outbox, rate, latency, restarts, problem",
            )
            p.add_argument("--json", action="store_true", help="JSON for scripts (default: a table)")
        if name == "status":
            p.add_argument("--groups", action="store_true",
                           help="the site groups instead: members, share, load, failovers (docs/sites.md)")
            p.add_argument("--wait", type=float, default=2.0, metavar="S",
                           help="after the retained snapshot, wait up to S s for every heartbeat")
        if name == "watch":
            p.add_argument("--table", action="store_true", help="redraw the status table live")
        if name == "exporter":
            p.add_argument("--listen", default="127.0.0.1:9786", metavar="HOST:PORT", help="metrics address")
        p.set_defaults(handler=handler)


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT", help="MQTT broker")
    p.add_argument("--fleet", default="+", metavar="F", help="fleet name (+: every fleet)")
    p.add_argument("--tls-ca", type=Path, metavar="CA.pem", help="verify the broker against this CA (TLS)")
    p.add_argument("--tls-cert", type=Path, metavar="CERT.pem", help="operator client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, metavar="KEY.pem", help="its private key")
    p.add_argument("--username", help=f"MQTT user name (password from ${_PASSWORD_ENV})")
    p.add_argument("--stale-after", type=float, default=90.0, metavar="S",
                   help="a heartbeat older than max(S, 3 intervals) is a problem")
    p.add_argument("--max-devices", type=int, default=100_000, metavar="N",
                   help="devices kept in memory; messages from more are counted and ignored")


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _follow(args: argparse.Namespace, on_event: Any = None) -> tuple[Follower, FleetState]:
    from edgeguard.fleet.view import SORT_COLUMNS, BrokerOptions, FleetState, Follower  # noqa: PLC0415 - the operator package, loaded by the handlers only

    if getattr(args, "sort", "device") not in SORT_COLUMNS:  # before connecting to anything
        raise ConfigError(f"--sort: unknown column {args.sort!r} (one of {', '.join(SORT_COLUMNS)})")
    host, port = _host_port(args.broker, "--broker")
    try:
        options = BrokerOptions(
            host=host,
            port=port,
            ca_file=args.tls_ca,
            client_cert=args.tls_cert,
            client_key=args.tls_key,
            username=args.username,
            password=os.environ.get(_PASSWORD_ENV) if args.username else None,
        )
        state = FleetState(max_devices=args.max_devices, stale_after_s=args.stale_after)
        follower = Follower(broker=options, fleet=args.fleet, state=state, on_event=on_event)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    follower.start()
    return follower, state


def _status(args: argparse.Namespace) -> int:
    from edgeguard.fleet.view import report_json, select  # noqa: PLC0415 - the operator package, loaded by the handlers only

    if args.wait < 0:
        raise ConfigError("--wait must be >= 0")
    follower, state = _follow(args)
    try:
        follower.wait_heartbeats(args.wait)
    finally:
        follower.stop()
    now = time.time()
    views = state.snapshot()
    if args.groups:
        return _print_groups(args, views)
    every = select(views, now, stale_after_s=state.stale_after_s, group=args.group, sort=args.sort)
    rows = [r for r in every if r["problems"]] if args.problem else every
    if args.json:
        print(json.dumps(report_json(rows, every=every, dropped=state.dropped, now=now)))
    else:
        _print_table(rows, now, every)
    return 0 if every and not any(r["problems"] for r in every) else 1


def _print_groups(args: argparse.Namespace, views: list[Any]) -> int:
    from rich.console import Console  # noqa: PLC0415 - only the table needs rich's console

    from edgeguard.fleet.view import group_rows, render_groups  # noqa: PLC0415 - the operator package, loaded by the handlers only

    rows = [g for g in group_rows(views) if args.group is None or g["group"] == args.group]
    if args.json:
        print(json.dumps({"groups": rows}))
    elif not rows:
        print("no group members seen (no heartbeat carries sources.group)")
    else:
        Console(width=max(160, Console().width)).print(render_groups(rows))
    # OK when every group has a member in its share.
    return 0 if rows and all(g["joined"] for g in rows) else 1


def _print_table(rows: list[dict[str, Any]], now: float, every: list[dict[str, Any]]) -> None:
    from rich.console import Console  # noqa: PLC0415 - only the table needs rich's console

    from edgeguard.fleet.view import headline, render_table  # noqa: PLC0415 - the operator package, loaded by the handlers only

    if not rows:
        print(headline(every))
        return
    Console(width=max(160, Console().width)).print(render_table(rows, now, every))


def _format_event(event: FleetEvent) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    mark = "SECURITY " if event.security else ""
    reason = f": {event.reason}" if event.reason else ""
    return f"{stamp} {event.fleet}/{event.device} {mark}{event.kind}{reason}"


def _watch(args: argparse.Namespace) -> int:
    # paho's thread only enqueues; printing (which may block on a slow terminal or pipe) happens here.
    # Bounded: when the reader falls behind, events are counted and the count is printed, never grown.
    events: queue.Queue[FleetEvent] = queue.Queue(maxsize=10_000)
    lost = [0]

    def on_event(event: FleetEvent) -> None:
        try:
            events.put_nowait(event)
        except queue.Full:
            lost[0] += 1

    follower, state = _follow(args, on_event)
    try:
        if args.table:
            return _watch_table(args, state)
        while True:
            event = events.get()
            if args.group is not None and args.group not in state.groups_of(event.fleet, event.device):
                continue
            if args.problem and event.kind in ("online",):
                continue
            print(json.dumps(event.to_json()) if args.json else _format_event(event), flush=True)
            if lost[0]:
                print(f"({lost[0]} events not shown: the output was too slow)", file=sys.stderr, flush=True)
                lost[0] = 0
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    finally:
        follower.stop()


def _watch_table(args: argparse.Namespace, state: FleetState) -> int:
    from rich.live import Live  # noqa: PLC0415 - only --table needs it

    from edgeguard.fleet.view import render_table, select  # noqa: PLC0415 - the operator package, loaded by the handlers only

    stop = threading.Event()

    def table() -> Any:
        now = time.time()
        every = select(
            state.snapshot(), now, stale_after_s=state.stale_after_s, group=args.group, sort=args.sort
        )
        return render_table([r for r in every if r["problems"]] if args.problem else every, now, every)

    with Live(table(), refresh_per_second=1) as live:
        while not stop.wait(1.0):
            live.update(table())
    return 0


def _exporter(args: argparse.Namespace) -> int:
    try:
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415 - optional extra
    except ImportError:
        raise ConfigError("the exporter needs prometheus_client: pip install 'edgeguard[fleet]'") from None
    from edgeguard.fleet.view._exporter import FleetCollector  # noqa: PLC0415 - needs the extra

    host, port = _host_port(args.listen, "--listen")
    follower, state = _follow(args)
    registry = CollectorRegistry()
    registry.register(FleetCollector(state))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        follower.stop()
        raise EdgeGuardError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    print(f"serving metrics on http://{host}:{server.server_port}/metrics", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
        follower.stop()
    return 0
