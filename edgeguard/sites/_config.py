"""The ``[site]`` section: this device's group, how it shares the group's input, and the streams bound to it.

Every key is checked here (docs/service.md, docs/sites.md). The same ``[[site.streams]]`` tables go into the
config of every device of the group: each device serves only the streams that name it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgeguard.errors import ConfigError
from edgeguard.link._config import TOPIC_SEGMENT

__all__ = ["SiteConfig", "StreamBinding", "group_topic", "share_topic"]


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"site.{key}: {why}")


def group_topic(fleet: str, group: str, leaf: str) -> str:
    return f"edgeguard/v1/{fleet}/group/{group}/{leaf}"


def share_topic(fleet: str, group: str) -> str:
    """The MQTT 5 shared subscription the group's devices join: the broker hands each input to one member."""
    return f"$share/{group}/{group_topic(fleet, group, 'input')}"


@dataclass(frozen=True, kw_only=True)
class StreamBinding:
    """A stream that must stay on one device: served by ``primary``, taken over by the first online of
    ``standby`` when the holder's member status says offline; ``handback``: return it when the primary is
    back (else the standby keeps it until it goes offline itself)."""

    name: str
    primary: str
    standby: tuple[str, ...] = ()
    handback: bool = True

    def __post_init__(self) -> None:
        where = f"streams[{self.name}]"
        _check(TOPIC_SEGMENT.fullmatch(self.name) is not None, where, "name must be 1..64 of [A-Za-z0-9_.-]")
        for dev in (self.primary, *self.standby):
            _check(TOPIC_SEGMENT.fullmatch(dev) is not None, where, f"device id {dev!r} is not a topic level")
        _check(len(self.standby) >= 1, where, "needs at least one standby device")
        _check(len({self.primary, *self.standby}) == 1 + len(self.standby), where, "a device is listed twice")

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.primary, *self.standby)


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """enabled: join the group. group: the group's name (a topic level; the fleet's groups).
    keepalive_s: the site connection's MQTT keepalive; the broker declares a silent member offline after
        about 1.5 x this (its LWT), which starts stream takeovers.
    receive_maximum: inputs the broker may have in flight to this device (MQTT 5 Receive Maximum).
    queue_size: inputs taken and not yet answered that this device holds; leave_at / rejoin_at: the
        queue depths at which it leaves the share and joins it again (leave_at < queue_size, so what the
        broker still sends after the UNSUBSCRIBE fits).
    check_s: how often the device re-checks whether it can serve (at most one heartbeat).
    max_temp_c: leave the share while the profile's thermal zones read above this (None: never).
    workers: threads running inputs of the group.
    streams: streams bound to one device of the group at a time (``[[site.streams]]``).
    client_cert / client_key: the site connection's own TLS client certificate (both or neither; None:
        the link's). On a broker that makes the certificate's CN the client id (the fleet's generated
        config) the site connection needs a certificate of its own (CN ``site:<device>``, issued by
        ``edgeguard fleet add-device`` for a device in a group), or it and the link take each other's
        session over and over.
    """

    enabled: bool = False
    group: str = ""
    keepalive_s: int = 10
    receive_maximum: int = 8
    queue_size: int = 32
    leave_at: int = 24
    rejoin_at: int = 8
    check_s: float = 1.0
    max_temp_c: float | None = None
    workers: int = 1
    streams: tuple[StreamBinding, ...] = field(default_factory=tuple)
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if self.enabled:
            ok = TOPIC_SEGMENT.fullmatch(self.group) is not None
            _check(ok, "group", "must be 1..64 of [A-Za-z0-9_.-]")
        _check(2 <= self.keepalive_s <= 3600, "keepalive_s", "must be 2..3600 s")
        _check(1 <= self.receive_maximum <= 1000, "receive_maximum", "must be 1..1000")
        _check(2 <= self.queue_size <= 10000, "queue_size", "must be 2..10000")
        _check(1 <= self.leave_at < self.queue_size, "leave_at", "must be 1..queue_size-1")
        _check(0 <= self.rejoin_at < self.leave_at, "rejoin_at", "must be 0..leave_at-1")
        _check(math.isfinite(self.check_s) and 0.05 <= self.check_s <= 60.0, "check_s", "must be 0.05..60 s")
        _check(
            self.max_temp_c is None or (math.isfinite(self.max_temp_c) and 0 < self.max_temp_c < 150),
            "max_temp_c",
            "must be 0..150 degrees C",
        )
        _check(1 <= self.workers <= 64, "workers", "must be 1..64")
        both = (self.client_cert is None) == (self.client_key is None)
        _check(both, "client_cert", "needs client_key (and back)")
        names = [s.name for s in self.streams]
        _check(len(set(names)) == len(names), "streams", "a stream name is listed twice")
