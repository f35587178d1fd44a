"""``fleet status --groups`` from heartbeats: the site member fields are type-checked, groups aggregate."""

from __future__ import annotations

import json
from typing import Any

from edgeguard.fleet.view import FleetState, group_rows, render_groups


def _hb(dev: str, **group: Any) -> bytes:
    site = {
        "group": "line-1",
        "share": "joined",
        "reason": None,
        "served": 10,
        "redelivered": 0,
        "streams": {},
        **group,
    }
    return json.dumps({"state": "serving", "sources": {"group": site}}).encode()


def test_groups_show_members_share_load_redelivered_failovers_and_stream_holders() -> None:
    s = FleetState()
    s.ingest(
        "edgeguard/v1/f/a/heartbeat",
        _hb(
            "a",
            served=30,
            streams={"cam-1": {"holder": "b", "fencing_token": 2, "serving": False, "takeovers": 0}},
        ),
        1.0,
    )
    s.ingest(
        "edgeguard/v1/f/b/heartbeat",
        _hb(
            "b",
            served=10,
            redelivered=3,
            streams={"cam-1": {"holder": "b", "fencing_token": 2, "serving": True, "takeovers": 1}},
        ),
        1.0,
    )
    s.ingest("edgeguard/v1/f/c/heartbeat", _hb("c", share="left", reason="no model: expired", served=0), 1.0)
    s.ingest("edgeguard/v1/f/d/heartbeat", b'{"state": "serving"}', 1.0)  # not a member of any group
    [g] = group_rows(s.snapshot())
    assert g["members"] == ["a", "b", "c"] and g["joined"] == ["a", "b"]
    assert g["left"] == {"c": "no model: expired"}
    assert g["load"] == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert g["redelivered"] == 3 and g["failovers"] == 1
    assert g["streams"] == {"cam-1": {"holder": "b", "fencing_token": 2}}
    assert "line-1" in s.groups_of("f", "a")
    render_groups([g])  # renders without error
    # Offline members are out of the share whatever their last heartbeat said.
    s.ingest("edgeguard/v1/f/a/status", b'{"state": "offline"}', 2.0)
    [g] = group_rows(s.snapshot())
    assert g["left"]["a"] == "offline" and g["joined"] == ["b"]


def test_wrong_types_in_the_member_fields_are_absent_not_errors() -> None:
    s = FleetState()
    bad = {
        "group": "line-1",
        "share": 5,
        "served": "many",
        "redelivered": True,
        "streams": {"x/y": {}, "cam": {"holder": 3, "fencing_token": "9", "takeovers": None}},
    }
    s.ingest("edgeguard/v1/f/a/heartbeat", json.dumps({"sources": {"group": bad}}).encode(), 1.0)
    s.ingest("edgeguard/v1/f/b/heartbeat", json.dumps({"sources": {"group": {"group": "a/b"}}}).encode(), 1.0)
    s.ingest("edgeguard/v1/f/c/heartbeat", json.dumps({"sources": "nope"}).encode(), 1.0)
    [g] = group_rows(s.snapshot())
    assert g["members"] == ["a"] and g["served"] == {"a": 0} and g["redelivered"] == 0
    assert g["streams"] == {}
    [view] = [v for v in s.snapshot() if v.device == "a"]
    assert view.site is not None and view.site["share"] is None
    assert view.site["streams"] == {
        "cam": {"holder": None, "fencing_token": None, "serving": False, "takeovers": None}
    }
