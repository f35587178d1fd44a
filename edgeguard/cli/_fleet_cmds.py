"""``edgeguard fleet ...``: the operator-side command group; each fleet tool adds its own subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from . import _fleet_view_cmds

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "fleet",
        help="operate a fleet: status, watch, Prometheus exporter (docs/operators.md)",
        description="Operator-side fleet tools (docs/operators.md). Never needed on a device.",
    )
    fsub = p.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    p.set_defaults(handler=lambda _args: _usage(p))
    _fleet_view_cmds.register_fleet(fsub)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2
