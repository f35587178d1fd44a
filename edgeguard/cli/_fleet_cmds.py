"""``edgeguard fleet ...``: operator-side commands. Each fleet tool registers its own subcommands here through
``register_fleet(fsub)`` (``_fleet_command_cmds``: ``fleet send``)."""

from __future__ import annotations

import argparse
from typing import Any

from . import _fleet_command_cmds


def register(sub: argparse._SubParsersAction[Any]) -> None:
    fleet = sub.add_parser("fleet", help="operator-side tools (signed remote commands)")
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND")

    def usage(_args: argparse.Namespace) -> int:
        fleet.print_help()
        return 2

    fleet.set_defaults(handler=usage)
    _fleet_command_cmds.register_fleet(fsub)
