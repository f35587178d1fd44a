"""How ``fleet rollout`` shows a rollout: a live table of its waves on a terminal, one summary line."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeguard.fleet.rollout import Rollout

__all__ = ["live_table", "table", "summary"]


@contextlib.contextmanager
def live_table(r: Rollout) -> Iterator[Any]:
    """A live table on a terminal; nothing when stdout is piped (the summary line says how it ended)."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.live import Live  # noqa: PLC0415

    last = [table(r)]

    def render() -> Any:
        # Rich redraws from its own thread while the engine changes ``r``: on the rare read that races
        # a change, show the previous frame (the next redraw, 1/4 s later, catches up).
        with contextlib.suppress(RuntimeError):
            last[0] = table(r)
        return last[0]

    with Live(get_renderable=render, refresh_per_second=4, transient=False) as live:
        yield lambda _ro: live.refresh()


def table(r: Rollout) -> Any:
    from rich.table import Table  # noqa: PLC0415

    colour = {"done": "green", "running": "cyan", "halted": "red", "aborted": "yellow"}[r.state]
    title = f"rollout {r.id}  {r.model} v{r.version} → {r.group}  [{colour}]{r.state}[/]  " \
            f"failures {r.failures}/{r.max_failures}" + (f"  ({r.reason})" if r.reason else "")
    t = Table(title=title, title_justify="left")
    for col in ("wave", "share", "devices", "state", "ok", "failed", "rolled back", "probation left"):
        t.add_column(col)
    now = time.time()
    for w in r.waves:
        left = ""
        if w.probation_until and w.state == "probation":
            left = f"{max(0.0, w.probation_until - now):.0f} s"
        failed = ", ".join(f"{d}: {why}" for d, why in list(w.failed.items())[:3])
        t.add_row(str(w.index), f"{w.percent}%", str(len(w.devices)), w.state, str(len(w.ok)),
                  f"{len(w.failed)} {failed}".strip(), str(len(w.rolled_back)), left)
    return t


def summary(r: Rollout) -> str:
    passed = sum(1 for w in r.waves if w.state == "passed")
    ok = sum(len(w.ok) for w in r.waves)
    total = sum(len(w.devices) for w in r.waves)
    line = f"rollout {r.id}: {r.state}; waves passed {passed}/{len(r.waves)}; devices ok {ok}/{total}; " \
           f"failures {r.failures} (max {r.max_failures})"
    if r.reason:
        line += f"; {r.reason}"
    rolled = [d for w in r.waves for d in w.rolled_back]
    if rolled:
        line += f"; rolled back: {', '.join(rolled)}"
    return line
