"""Sites: the devices of a group share its input (MQTT 5 shared subscription) and stand in for each other.

Device side (never imports the fleet packages): :class:`GroupMember` (the share, backpressure, stream
leases) and its config. :class:`GroupClient` is the sender's side (a gateway or a test): correlation ids,
retries and duplicate counting. docs/sites.md walks through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeguard._lazy import lazy_exports

if TYPE_CHECKING:
    from ._client import GroupClient
    from ._config import SiteConfig, StreamBinding, group_topic, share_topic
    from ._lease import Lease, StreamLease
    from ._member import NOT_MQTT5, GroupMember

__all__ = [
    "GroupClient",
    "GroupMember",
    "Lease",
    "NOT_MQTT5",
    "SiteConfig",
    "StreamBinding",
    "StreamLease",
    "group_topic",
    "share_topic",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "GroupClient": "._client",
        "GroupMember": "._member",
        "NOT_MQTT5": "._member",
        "Lease": "._lease",
        "StreamLease": "._lease",
        "SiteConfig": "._config",
        "StreamBinding": "._config",
        "group_topic": "._config",
        "share_topic": "._config",
    },
)
