"""``edgeguard fleet dashboard``: the fleet live in a browser (docs/operators.md, fleet/dashboard)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError

from ._fleet_view_cmds import _PASSWORD_ENV, _broker_args, _host_port

__all__ = ["register_fleet"]

_HELP = """\
Serve a live dashboard of the fleet on http://LISTEN/ (loopback by default): online / degraded / offline
counts, a sortable, filterable table of every device with sparklines (latency, inferences/s, outbox depth),
the model/version distribution, rollouts (waves, probation timers, rollbacks), security events and each
device's detail (last heartbeat, last results, events). Fed by one MQTT subscription; pushed to the page by
Server-Sent Events.
Operator auth: every request needs the token in --token-file (one line, 16+ URL-safe characters, mode 0600)
as `Authorization: Bearer TOKEN`, or the session cookie the sign-in form sets; anything else gets 401.
With --sign-key, the device detail offers ping / reload / rollback as signed commands and shows each answer
as verified (with the key pinned by --device-keys, or learned from the device's status) or forged.
The broker password, if any, is read from $EDGEGUARD_MQTT_PASSWORD.

example:
  python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > dash.token && chmod 600 dash.token
  edgeguard fleet dashboard --broker 127.0.0.1:1883 --fleet plant1 --token-file dash.token
  edgeguard fleet dashboard --fleet plant1 --token-file dash.token --sign-key ops/operator.key \\
      --device-keys fleet/devices --listen 127.0.0.1:8787"""


def register_fleet(fsub: argparse._SubParsersAction[Any]) -> None:
    p = fsub.add_parser(
        "dashboard",
        help="the fleet live in a browser (counts, table, sparklines, rollouts, security events, actions)",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _broker_args(p)
    p.add_argument("--listen", default="127.0.0.1:8787", metavar="HOST:PORT",
                   help="address to serve on (port 0: any free port; the URL is printed)")
    p.add_argument("--token-file", required=True, type=Path, metavar="FILE",
                   help="operator token file (one line, mode 0600)")
    p.add_argument("--sign-key", type=Path, metavar="operator.key",
                   help="operator key: enables the ping / reload / rollback buttons (signed commands)")
    p.add_argument("--device-keys", action="append", default=[], metavar="DIR|ID=FILE",
                   help="pinned answer keys, as for `fleet send` (repeatable)")
    p.add_argument("--history", type=int, default=60, metavar="N",
                   help="heartbeats kept per device for the sparklines")
    p.set_defaults(handler=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    # The operator packages, loaded by this handler only: a device never imports them.
    from edgeguard.fleet.dashboard import Actions, Dashboard, read_token_file  # noqa: PLC0415
    from edgeguard.fleet.view import BrokerOptions, FleetState  # noqa: PLC0415

    if not 1 <= args.history <= 10_000:
        raise ConfigError("--history must be 1..10000")
    host, port = _listen(args.listen)
    bhost, bport = _host_port(args.broker, "--broker")
    token = read_token_file(args.token_file)
    password = os.environ.get(_PASSWORD_ENV) if args.username else None
    try:
        options = BrokerOptions(host=bhost, port=bport, ca_file=args.tls_ca, client_cert=args.tls_cert,
                                client_key=args.tls_key, username=args.username, password=password)
        state = FleetState(max_devices=args.max_devices, stale_after_s=args.stale_after)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    actions = None
    if args.sign_key is not None:  # commands go to each device's own fleet (a sender per fleet, made on use)
        actions = _actions(args, Actions, password)
    dash = Dashboard(broker=options, fleet=args.fleet, token=token, state=state, actions=actions,
                     history=args.history)
    dash.start()
    try:
        dash.serve(host, port, lambda url: print(f"dashboard on {url} (fleet {args.fleet})", flush=True))
    except KeyboardInterrupt:
        return 0
    finally:
        dash.close()
    return 0


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if sep and host and port == "0":
        return host.strip("[]"), 0
    return _host_port(text, "--listen")


def _actions(args: argparse.Namespace, actions_cls: Any, password: str | None) -> Any:
    from edgeguard.keys import load_signing_key  # noqa: PLC0415
    from edgeguard.link import LinkConfig  # noqa: PLC0415

    from ._fleet_command_cmds import pinned_keys  # noqa: PLC0415

    host, port = _host_port(args.broker, "--broker")
    try:
        link = LinkConfig(host=host, port=port, protocol="5", username=args.username, password=password,
                          ca_file=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return actions_cls(key=load_signing_key(args.sign_key, "operator"), broker=link,
                       pinned=pinned_keys(args.device_keys))
