"""``edgeguard fleet dashboard``: the fleet in a browser, live (docs/operators.md, "The dashboard").

A local aiohttp server fed by one MQTT subscription (the fleet view's ``Follower`` and ``FleetState``, plus
results and rollout progress), pushing changes to the page by Server-Sent Events. The page is three static
files shipped in this package (``static/``): no build step, no CDN. Operator auth: a bearer token from a
file, or the cookie a token login sets. With an operator key, the page's ping / reload / rollback buttons
send signed commands and show the devices' answers as verified or forged.
"""

from edgeguard.fleet.dashboard._actions import ACTIONS, ActionBusy, Actions
from edgeguard.fleet.dashboard._live import LiveFleet, device_status
from edgeguard.fleet.dashboard._rollouts import (
    Rollout,
    RolloutBook,
    RolloutRejected,
    parse_rollout_unverified,
)
from edgeguard.fleet.dashboard._run import Dashboard, read_token_file
from edgeguard.fleet.dashboard._server import COOKIE, DashboardServer

__all__ = [
    "ACTIONS",
    "COOKIE",
    "ActionBusy",
    "Actions",
    "Dashboard",
    "DashboardServer",
    "LiveFleet",
    "Rollout",
    "RolloutBook",
    "RolloutRejected",
    "device_status",
    "parse_rollout_unverified",
    "read_token_file",
]
