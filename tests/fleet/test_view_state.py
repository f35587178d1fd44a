"""FleetState, the one place where device messages become view state: bad input, bounds, rates, verdicts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeguard.fleet.view import FleetState, headline, select

HB = "edgeguard/v1/f/d1/heartbeat"


def hb(**fields: Any) -> bytes:
    doc = {"model": {"name": "m", "version": 2}, "accelerator": "cpu", "uptime_s": 10.0, "inferences": 100,
           "degraded": False, "outbox": {"depth": 0}, "supervisor": {"restarts": 0}}
    return json.dumps({**doc, **fields}).encode()


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("edgeguard/v1/f/d1/results", b"{}"),  # not a topic the view follows
        ("edgeguard/v1/f/d1/heartbeat/x", b"{}"),
        ("edgeguard/v2/f/d1/heartbeat", b"{}"),
        ("edgeguard/v1/f/d 1/heartbeat", b"{}"),  # outside the link's segment charset
        ("edgeguard/v1/f/" + "d" * 65 + "/heartbeat", b"{}"),
        ("", b"{}"),
        (HB, b"not json"),
        (HB, b"\xff\xfe"),
        (HB, b"[1, 2]"),
        (HB, b"null"),
        (HB, b"{" * 100_000),  # deep nesting: refused by size before the parser sees it
        (HB, b" " * 300_000),
        ("edgeguard/v1/f/d1/status", b'{"state": "pwned"}'),
        ("edgeguard/v1/f/d1/status", b"{}"),
    ],
)
def test_bad_messages_are_counted_dropped_and_never_raise(topic: str, payload: bytes) -> None:
    state = FleetState()
    assert state.ingest(topic, payload, 1.0) is None
    assert state.dropped == 1 and len(state) == 0


def test_fields_of_the_wrong_type_read_as_absent() -> None:
    state = FleetState()
    wrong = {"model": "yolo", "inferences": "many", "degraded": "yes", "outbox": [1],
             "latency_ms": {"p99": True}, "groups": [1, "a"]}
    state.ingest(HB, json.dumps(wrong).encode(), 1.0)
    (v,) = state.snapshot()
    assert (v.model, v.inferences, v.degraded, v.outbox_depth) == (None, None, False, None)
    assert v.latency_p99_ms is None
    assert v.groups == ("a",)
    assert state.groups_of("f", "d1") == ("a",) and state.groups_of("f", "nope") == ()


def test_devices_beyond_the_bound_are_counted_not_stored() -> None:
    state = FleetState(max_devices=3)
    for i in range(10):
        state.ingest(f"edgeguard/v1/f/d{i}/status", b'{"state": "online"}', 1.0)
    assert len(state) == 3 and state.devices_refused == 7
    state.ingest("edgeguard/v1/f/d0/heartbeat", hb(), 2.0)  # known devices keep updating
    assert next(v for v in state.snapshot() if v.device == "d0").last_heartbeat == 2.0


def test_events_kept_are_bounded_newest_first_kept() -> None:
    state = FleetState(max_events=5)
    for i in range(20):
        state.ingest("edgeguard/v1/f/d1/events", json.dumps({"kind": f"k{i}"}).encode(), float(i))
    assert [e.kind for e in state.events()] == [f"k{i}" for i in range(15, 20)]


def test_rate_from_two_heartbeats_and_none_across_a_restart() -> None:
    state = FleetState()
    state.ingest(HB, hb(uptime_s=10.0, inferences=100), 1.0)
    state.ingest(HB, hb(uptime_s=20.0, inferences=150), 11.0)
    assert state.snapshot()[0].rate == 5.0
    state.ingest(HB, hb(uptime_s=1.0, inferences=3), 21.0)  # the worker restarted: counters reset
    assert state.snapshot()[0].rate is None


def test_problems_stale_heartbeat_degraded_offline_and_the_headline() -> None:
    state = FleetState(stale_after_s=30.0)
    for d in ("a", "b", "c", "d"):
        state.ingest(f"edgeguard/v1/f/{d}/status", b'{"state": "online", "time": 5.0}', 5.0)
        state.ingest(f"edgeguard/v1/f/{d}/heartbeat", hb(), 10.0)
    state.ingest("edgeguard/v1/f/b/heartbeat", hb(degraded=True, degraded_reason="npu lost"), 20.0)
    state.ingest("edgeguard/v1/f/c/status", b'{"state": "offline"}', 20.0)
    state.ingest("edgeguard/v1/f/a/heartbeat", hb(), 20.0)
    state.ingest("edgeguard/v1/f/b/heartbeat", hb(degraded=True, degraded_reason="npu lost"), 60.0)
    state.ingest("edgeguard/v1/f/a/heartbeat", hb(), 60.0)
    rows = select(state.snapshot(), 61.0, stale_after_s=30.0, sort="problem")
    problems = {r["device"]: r["problems"] for r in rows}
    assert problems == {
        "a": [], "b": ["degraded: npu lost"], "c": ["offline"], "d": ["no heartbeat for 51 s"]
    }
    assert headline(rows) == (
        "PROBLEM: 3/4 devices need attention (1 offline, 1 no heartbeat, 1 degraded); first: c: offline"
    )
    assert rows[-1]["device"] == "a"  # the fine device sorts last by problem
    assert headline(select(state.snapshot(), 61.0, stale_after_s=30.0, group="none")).startswith("NO DEVICES")


def test_since_comes_from_the_device_and_a_retained_lwt_stays_unknown() -> None:
    state = FleetState()
    state.ingest("edgeguard/v1/f/a/status", b'{"state": "online", "time": 123.0}', 500.0, retained=True)
    state.ingest("edgeguard/v1/f/b/status", b'{"state": "offline"}', 500.0, retained=True)
    state.ingest("edgeguard/v1/f/c/status", b'{"state": "offline"}', 500.0)
    since = {v.device: v.since for v in state.snapshot()}
    assert since == {"a": 123.0, "b": None, "c": 500.0}


@given(st.text(max_size=80), st.binary(max_size=300))
def test_any_message_is_taken_or_dropped_never_raised(topic: str, payload: bytes) -> None:
    state = FleetState(max_devices=2)
    state.ingest(topic, payload, 1.0)
    assert state.dropped + state.messages + state.devices_refused == 1
