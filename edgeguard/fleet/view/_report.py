"""What ``fleet status`` prints: the one-line verdict, the filtered and sorted rows, the rich table, JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from edgeguard.fleet.view._state import DeviceView

__all__ = ["SORT_COLUMNS", "headline", "select", "report_json", "render_table"]

# --sort COL: the key each column sorts by (None sorts last).
SORT_COLUMNS: dict[str, str] = {
    "device": "device",
    "state": "online",
    "heartbeat": "heartbeat_age_s",
    "model": "model",
    "outbox": "outbox_depth",
    "rate": "inferences_per_s",
    "latency": "latency_p99_ms",
    "restarts": "restarts",
    "problem": "problems",
}


def select(
    views: Sequence[DeviceView],
    now: float,
    *,
    stale_after_s: float,
    group: str | None = None,
    problem_only: bool = False,
    sort: str = "device",
) -> list[dict[str, Any]]:
    """The rows to show, as JSON-able dicts: filtered by group and problem, sorted by ``sort``."""
    if sort not in SORT_COLUMNS:
        raise ValueError(f"unknown sort column {sort!r} (one of {', '.join(SORT_COLUMNS)})")
    rows = [v.to_json(now, stale_after_s) for v in views if group is None or group in v.groups]
    if problem_only:
        rows = [r for r in rows if r["problems"]]
    key = SORT_COLUMNS[sort]

    def order(row: dict[str, Any]) -> tuple[int, Any, str, str]:
        value = row[key]
        if key == "problems":
            value = -len(value)  # the most troubled first
        elif key == "online":
            value = {False: 0, None: 1, True: 2}[value]  # offline first
        elif isinstance(value, (int, float)) and key in ("outbox_depth", "heartbeat_age_s", "restarts"):
            value = -value  # the biggest number is the interesting one
        return (value is None, value if value is not None else 0, row["fleet"], row["device"])

    return sorted(rows, key=order)


# Most serious first: the headline names the worst device, and equal counts are listed in this order.
_SEVERITY = ("offline", "no heartbeat", "degraded", "outbox")


def _cause(row: dict[str, Any]) -> str:
    first = str(row["problems"][0])
    return next(c for c in _SEVERITY if first.startswith(c))


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """The first line: is the fleet OK, and if not, why."""
    total = len(rows)
    if total == 0:
        return "NO DEVICES: nothing has published under this fleet (check --broker, --fleet and the ACL)"
    online = sum(1 for r in rows if r["online"])
    troubled = [r for r in rows if r["problems"]]
    if not troubled:
        return f"OK: {online}/{total} devices online, none degraded"
    counts: dict[str, int] = {}
    for r in troubled:
        counts[_cause(r)] = counts.get(_cause(r), 0) + 1
    ranked = sorted(counts, key=lambda c: (-counts[c], _SEVERITY.index(c)))
    why = ", ".join(f"{counts[c]} {c}" for c in ranked)
    worst = min(troubled, key=lambda r: (_SEVERITY.index(_cause(r)), r["fleet"], r["device"]))
    return (
        f"PROBLEM: {len(troubled)}/{total} devices need attention ({why}); "
        f"first: {worst['device']}: {worst['problems'][0]}"
    )


def report_json(
    rows: Sequence[dict[str, Any]], *, every: Sequence[dict[str, Any]], dropped: int, now: float
) -> dict[str, Any]:
    """``rows``: the devices shown (after --problem); ``every``: all devices in scope, which the verdict is
    about (a filtered listing must not turn "2 of 200 need attention" into "2 of 2")."""
    return {
        "ok": not any(r["problems"] for r in every) and bool(every),
        "summary": headline(every),
        "time": now,
        "devices": list(rows),
        "count": len(rows),
        "online": sum(1 for r in every if r["online"]),
        "total": len(every),
        "messages_dropped": dropped,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _n(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def render_table(
    rows: Sequence[dict[str, Any]], now: float | None = None, every: Sequence[dict[str, Any]] | None = None
) -> Table:
    now = time.time() if now is None else now
    title = headline(rows if every is None else every)
    table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
    for name, justify in (
        ("device", "left"), ("state", "left"), ("hb age", "right"), ("model", "left"), ("fast path", "left"),
        ("problem", "left"), ("outbox", "right"), ("inf/s", "right"), ("p99 ms", "right"),
        ("restarts", "right"), ("MTBF/MTTR", "right"), ("last security event", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "problem")  # type: ignore[arg-type]
    for r in rows:
        if r["online"] is False:
            state = Text(f"offline {_age(now - r['since']) if r['since'] else ''}".strip(), style="red")
        elif r["problems"]:
            state = Text(f"degraded {_age(now - r['since']) if r['since'] else ''}".strip(), style="yellow")
        else:
            state = Text(f"online {_age(now - r['since']) if r['since'] else ''}".strip(), style="green")
        model = f"{r['model']}@{r['version']}" if r["model"] else "-"
        mtbf = f"{_age(r['mtbf_s'])}/{_age(r['mttr_s'])}" if r["mtbf_s"] is not None else "-"
        table.add_row(
            r["device"],
            state,
            _age(r["heartbeat_age_s"]),
            model,
            r["accelerator"] or "-",
            "; ".join(r["problems"]) or "-",
            _n(r["outbox_depth"]),
            _n(r["inferences_per_s"], "{:.1f}"),
            _n(r["latency_p99_ms"], "{:.1f}"),
            _n(r["restarts"]),
            mtbf,
            r["last_security_event"] or "-",
        )
    return table
