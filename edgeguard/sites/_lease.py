"""Who serves a stream bound to one device: a lease in a retained message with a fencing token.

The lease of stream S is the retained message on ``edgeguard/v1/<fleet>/group/<group>/lease/<S>``:
``{"stream": S, "holder": DEVICE, "token": N}``. The rules (docs/sites.md, "Primary and standby"):

1. Tokens only grow. A lease whose token is not above the highest one this device has accepted is stale and
   ignored. One broker orders all publishes on one topic, so every member accepts the same sequence of
   leases: whichever claim of token N reaches the broker first wins everywhere, a second claim of N is
   ignored everywhere (and its publisher, the winner, republishes N+1 so the retained copy tells the truth).
2. A device serves S only while the last lease it accepted names it and its site connection is up; it stops
   the moment either changes.
3. A device claims S (publishes token+1 naming itself) only when the holder is offline (its member status,
   set by its LWT, or the device itself after a restart: a lease it did not accept in this process is not
   its lease) and every candidate listed before it (primary first, then standbys) is offline too.
4. Hand-back (``handback = true``): a standby holding S whose primary's status is online again first stops
   serving, then publishes the lease naming the primary with token+1.

Results carry the token (``fencing_token``), so a consumer that has seen token N rejects results of a lower
one. No timer decides anything here: only the broker's LWT (offline) and birth (online) messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgeguard.link._config import TOPIC_SEGMENT

from ._config import StreamBinding

__all__ = ["Lease", "StreamLease", "parse_lease_unverified", "parse_member_status"]

MAX_LEASE_BYTES = 1024


@dataclass(frozen=True)
class Lease:
    holder: str
    token: int

    def payload(self, stream: str, wall: float) -> bytes:
        doc = {"stream": stream, "holder": self.holder, "token": self.token, "time": wall}
        return json.dumps(doc).encode()


def parse_lease_unverified(payload: bytes, stream: str) -> Lease | None:
    """A lease message as sent by a group member (unauthenticated: the broker ACL decides who may write the
    lease topic). None for anything malformed, oversized or about another stream; an empty payload (a
    cleared retained message) is None too."""
    if not payload or len(payload) > MAX_LEASE_BYTES:
        return None
    try:
        doc: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("stream") != stream:
        return None
    holder, token = doc.get("holder"), doc.get("token")
    if not isinstance(holder, str) or TOPIC_SEGMENT.fullmatch(holder) is None:
        return None
    if isinstance(token, bool) or not isinstance(token, int) or not 1 <= token < 1 << 62:
        return None
    return Lease(holder, token)


def parse_member_status(payload: bytes) -> bool | None:
    """True (online), False (offline, the LWT) or None (unknown/malformed) from a member status message."""
    if not payload or len(payload) > MAX_LEASE_BYTES:
        return None
    try:
        doc: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    state = doc.get("state") if isinstance(doc, dict) else None
    return True if state == "online" else False if state == "offline" else None


class StreamLease:
    """The lease state of one stream as this device sees it; :meth:`decide` says what to publish next.
    Pure: the member feeds it messages and connection changes and acts on the answer."""

    def __init__(self, binding: StreamBinding, me: str) -> None:
        self.binding = binding
        self.me = me
        self.lease: Lease | None = None  # the last accepted lease
        self.loaded = False  # the retained lease (or its absence) has been seen since the last connect
        self.accepted_here = False  # the current lease naming me was accepted by this process
        self.online: dict[str, bool] = {}  # member -> online, from member status messages
        self.connected = False
        self.pending: Lease | None = None  # a claim or hand-over published, not yet seen back
        self.takeovers = 0
        self.handbacks = 0
        self.stale_ignored = 0

    @property
    def serving(self) -> bool:
        return (
            self.connected
            and self.loaded
            and self.lease is not None
            and self.lease.holder == self.me
            and self.accepted_here
            and not (self.pending is not None and self.pending.holder != self.me)  # handing it over
        )

    @property
    def token(self) -> int:
        return 0 if self.lease is None else self.lease.token

    def on_connect(self) -> None:
        self.connected, self.loaded, self.pending = True, False, None

    def on_disconnect(self) -> None:
        self.connected, self.pending = False, None

    def on_loaded(self) -> None:
        """Everything retained on the lease topic has been delivered (the member's probe came back)."""
        self.loaded = True

    def on_status(self, device: str, online: bool | None) -> None:
        if online is not None:
            self.online[device] = online
        if device == self.me and online:
            self.online[device] = True

    def on_lease(self, lease: Lease) -> Lease | None:
        """A lease message arrived. Returns a lease to publish when this device must reassert (rule 1)."""
        if self.lease is not None and lease.token <= self.lease.token:
            self.stale_ignored += 1
            if self.lease.holder == self.me and self.accepted_here and lease.holder != self.me:
                # A losing claim overwrote the retained copy of my (winning) lease: put the truth back.
                return Lease(self.me, self.lease.token + 1)
            return None
        previous, self.lease = self.lease, lease
        self.accepted_here = lease.holder == self.me and self.loaded
        moved_here = previous is None or previous.holder != self.me
        if self.accepted_here and self.me != self.binding.primary and moved_here:
            self.takeovers += 1
        if self.pending is not None and lease.token >= self.pending.token:
            self.pending = None
        return None

    def _offline(self, device: str) -> bool:
        if device == self.me:
            return not self.accepted_here  # my lease from an earlier life is not mine to serve
        return self.online.get(device) is False

    def decide(self) -> Lease | None:
        """The lease this device should publish now (None: nothing). Call after every change."""
        if not (self.connected and self.loaded) or self.pending is not None:
            return None
        b = self.binding
        lease = self.lease
        if lease is not None and lease.holder == self.me and self.accepted_here:
            if b.handback and self.me != b.primary and self.online.get(b.primary) is True:
                self.handbacks += 1
                return self._publish(Lease(b.primary, lease.token + 1))  # the caller stopped serving first
            return None
        if lease is not None and lease.holder in b.candidates and not self._offline(lease.holder):
            return None  # someone live holds it
        for dev in b.candidates:
            if dev == self.me:
                return self._publish(Lease(self.me, self.token + 1))
            if not self._offline(dev):
                return None  # an earlier candidate is (or may be) online: its turn
        return None  # not a candidate

    def _publish(self, lease: Lease) -> Lease:
        self.pending = lease
        return lease

    def snapshot(self) -> dict[str, Any]:
        return {
            "holder": None if self.lease is None else self.lease.holder,
            "fencing_token": self.token,
            "serving": self.serving,
            "takeovers": self.takeovers,
            "handbacks": self.handbacks,
            "stale_ignored": self.stale_ignored,
        }
