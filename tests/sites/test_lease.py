"""The stream lease rules (edgeguard/sites/_lease.py) on in-memory members: one broker order, many views.

``Bus`` plays the broker for one lease topic: it orders every publish and delivers each, in that order, to
every member (what mosquitto does for one topic); the retained copy is the last one published.
"""

from __future__ import annotations

import pytest

from edgeguard.errors import ConfigError
from edgeguard.sites import Lease, StreamBinding, StreamLease
from edgeguard.sites._lease import parse_lease_unverified, parse_member_status

CAM = StreamBinding(name="cam-1", primary="a", standby=("b", "c"), handback=True)


class Bus:
    def __init__(self, *members: StreamLease) -> None:
        self.members = {m.me: m for m in members}
        self.retained: Lease | None = None
        self.log: list[Lease] = []

    def connect(self, m: StreamLease) -> None:
        m.on_connect()
        if self.retained is not None:
            m.on_lease(self.retained)
        m.on_loaded()

    def status(self, dev: str, online: bool) -> None:
        for m in self.members.values():
            m.on_status(dev, online)

    def publish(self, lease: Lease) -> None:
        self.retained = lease
        self.log.append(lease)
        for m in self.members.values():
            if m.connected:
                again = m.on_lease(lease)
                if again is not None:
                    m.pending = again
                    self.publish(again)

    def step(self) -> None:
        """Every member decides once; what they publish is delivered in publish order."""
        for m in list(self.members.values()):
            if m.connected:
                out = m.decide()
                if out is not None:
                    self.publish(out)

    def serving(self) -> list[str]:
        return [m.me for m in self.members.values() if m.serving]


def _site() -> tuple[Bus, StreamLease, StreamLease, StreamLease]:
    a, b, c = (StreamLease(CAM, d) for d in "abc")
    bus = Bus(a, b, c)
    for m in (a, b, c):
        bus.connect(m)
        bus.status(m.me, True)
    return bus, a, b, c


def test_primary_claims_first_then_standby_takes_over_on_lwt_and_hands_back() -> None:
    bus, a, b, c = _site()
    bus.step()
    assert bus.serving() == ["a"] and a.token == 1
    bus.step()
    assert bus.log == [Lease("a", 1)]  # nothing more while a is online

    a.on_disconnect()  # killed; the broker's LWT tells the others
    bus.status("a", False)
    bus.step()
    assert bus.serving() == ["b"] and b.token == 2 and b.takeovers == 1  # b before c: the listed order
    assert c.lease == Lease("b", 2)

    bus.connect(a)  # restarted: the lease names b (live), a waits
    bus.status("a", True)
    assert not a.serving
    bus.step()  # b hands back (policy): stops first, then publishes a's lease
    assert bus.log[-1] == Lease("a", 3) and bus.serving() == ["a"] and b.handbacks == 1


def test_without_handback_the_standby_keeps_the_stream() -> None:
    keep = StreamBinding(name="cam-1", primary="a", standby=("b",), handback=False)
    a, b = StreamLease(keep, "a"), StreamLease(keep, "b")
    bus = Bus(a, b)
    for m in (a, b):
        bus.connect(m)
        bus.status(m.me, True)
    bus.step()
    a.on_disconnect()
    bus.status("a", False)
    bus.step()
    bus.connect(a)
    bus.status("a", True)
    bus.step()
    bus.step()
    assert bus.serving() == ["b"] and bus.log[-1] == Lease("b", 2)


def test_a_restarted_holder_never_resumes_its_old_lease_without_a_new_token() -> None:
    bus, a, _b, _c = _site()
    bus.step()
    a.on_disconnect()
    fresh = StreamLease(CAM, "a")  # a new process: the retained lease names "a", but not this life's
    bus.members["a"] = fresh
    bus.connect(fresh)
    assert fresh.lease == Lease("a", 1) and not fresh.serving
    bus.step()
    assert fresh.serving and fresh.token == 2


def test_two_claims_of_one_token_the_first_wins_everywhere_and_the_retained_copy_is_repaired() -> None:
    bus, a, b, _c = _site()
    bus.step()
    # Both a (restarting) and b (seeing a's LWT) claim token 2 at the same moment.
    a.on_disconnect()
    fresh = StreamLease(CAM, "a")
    bus.members["a"] = fresh
    bus.connect(fresh)
    bus.status("a", False)  # b saw the LWT before a's birth
    claim_a, claim_b = fresh.decide(), b.decide()
    assert claim_a == Lease("a", 2) and claim_b == Lease("b", 2)
    bus.publish(claim_b)  # b's reached the broker first
    bus.publish(claim_a)  # ignored everywhere (token not above 2); b republishes 3 to fix the retained copy
    assert bus.serving() == ["b"]
    assert bus.retained == Lease("b", 3) and fresh.stale_ignored >= 1


def test_never_two_servers_over_random_schedules() -> None:
    import random

    for seed in range(200):
        rng = random.Random(seed)
        bus, *members = _site()
        for _ in range(30):
            m = rng.choice(members)
            action = rng.random()
            if action < 0.2 and m.connected:
                m.on_disconnect()
                bus.status(m.me, False)
            elif action < 0.4 and not m.connected:
                fresh = StreamLease(CAM, m.me)
                bus.members[m.me] = fresh
                members[members.index(m)] = fresh
                bus.connect(fresh)
                bus.status(m.me, True)
            else:
                bus.step()
            assert len(bus.serving()) <= 1, (seed, bus.log)
        tokens = [lease.token for lease in bus.log]
        assert tokens == sorted(tokens)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"x" * 2000,
        b"not json",
        b"[]",
        b'{"stream":"other","holder":"a","token":1}',
        b'{"stream":"cam-1","holder":"a/b","token":1}',
        b'{"stream":"cam-1","holder":"a","token":0}',
        b'{"stream":"cam-1","holder":"a","token":true}',
        b'{"stream":"cam-1","holder":"a","token":"1"}',
        b'{"stream":"cam-1","holder":"a","token":1e99}',
    ],
)
def test_bad_lease_messages_are_ignored(payload: bytes) -> None:
    assert parse_lease_unverified(payload, "cam-1") is None


def test_member_status_parsing() -> None:
    assert parse_member_status(b'{"state":"online"}') is True
    assert parse_member_status(b'{"state":"offline"}') is False
    for bad in (b"", b"{", b'{"state":1}', b"[1]", b"x" * 5000):
        assert parse_member_status(bad) is None


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"name": "cam/1", "primary": "a", "standby": ("b",)}, "name"),
        ({"name": "cam", "primary": "a", "standby": ()}, "standby"),
        ({"name": "cam", "primary": "a", "standby": ("a",)}, "twice"),
        ({"name": "cam", "primary": "a+", "standby": ("b",)}, "topic level"),
    ],
)
def test_stream_binding_refuses_bad_config(kwargs: dict, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        StreamBinding(**kwargs)
