"""``fleet status --groups``: the site groups as the devices' heartbeats describe them (docs/sites.md).

Per group: its members (devices whose heartbeat carries ``sources.group`` for it), which are in the share and
why the others left, the load split (each member's share of the inputs served), redelivered inputs
(duplicates the devices marked), failovers (stream takeovers by standbys) and who holds each stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from edgeguard.fleet.view._state import DeviceView

__all__ = ["group_rows", "render_groups"]


def group_rows(views: Sequence[DeviceView]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for v in sorted(views, key=lambda v: (v.fleet, v.device)):
        site = v.site
        if site is None:
            continue
        g = groups.setdefault(
            site["group"],
            {
                "group": site["group"],
                "members": [],
                "joined": [],
                "left": {},
                "served": {},
                "redelivered": 0,
                "failovers": 0,
                "streams": {},
            },
        )
        g["members"].append(v.device)
        online = v.online is not False
        if online and site["share"] == "joined":
            g["joined"].append(v.device)
        else:
            g["left"][v.device] = "offline" if not online else (site["reason"] or "left")
        g["served"][v.device] = site["served"] or 0
        g["redelivered"] += site["redelivered"] or 0
        for name, s in site["streams"].items():
            g["failovers"] += s["takeovers"] or 0
            best = g["streams"].get(name)
            if s["holder"] is not None and (
                best is None or (s["fencing_token"] or 0) > best["fencing_token"]
            ):
                g["streams"][name] = {"holder": s["holder"], "fencing_token": s["fencing_token"] or 0}
    for g in groups.values():
        total = sum(g["served"].values())
        g["load"] = {d: round(n / total, 3) if total else None for d, n in g["served"].items()}
    return [groups[k] for k in sorted(groups)]


def render_groups(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="groups", show_lines=False)
    for col in ("group", "members", "in share", "left (why)", "load", "redelivered", "failovers", "streams"):
        table.add_column(col)
    for g in rows:
        load = " ".join(f"{d}:{share:.0%}" for d, share in g["load"].items() if share is not None)
        left = "; ".join(f"{d}: {why}" for d, why in g["left"].items()) or "-"
        streams = " ".join(f"{n}@{s['holder']}#{s['fencing_token']}" for n, s in g["streams"].items()) or "-"
        table.add_row(
            g["group"],
            str(len(g["members"])),
            str(len(g["joined"])),
            left,
            load or "-",
            str(g["redelivered"]),
            str(g["failovers"]),
            streams,
        )
    return table
