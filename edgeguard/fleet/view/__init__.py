"""Read-only fleet views for operators: ``fleet status`` / ``fleet watch`` and the Prometheus exporter.

Everything starts from one MQTT subscription (``Follower``) feeding one in-memory ``FleetState``.
The exporter needs the ``fleet`` extra (prometheus_client) and is imported only by its command.
"""

from edgeguard.fleet.view._follow import BrokerOptions, Follower, fleet_filters
from edgeguard.fleet.view._groups import group_rows, render_groups
from edgeguard.fleet.view._report import SORT_COLUMNS, headline, render_table, report_json, select
from edgeguard.fleet.view._state import SECURITY_EVENTS, DeviceView, FleetEvent, FleetState, parse_topic

__all__ = [
    "BrokerOptions",
    "DeviceView",
    "FleetEvent",
    "FleetState",
    "Follower",
    "SECURITY_EVENTS",
    "SORT_COLUMNS",
    "fleet_filters",
    "group_rows",
    "render_groups",
    "headline",
    "parse_topic",
    "render_table",
    "report_json",
    "select",
]
