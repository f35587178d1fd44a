"""Docs that promise files: tools/README.md lists exactly the tools that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tools_readme_lists_exactly_the_tools_that_exist() -> None:
    text = (ROOT / "tools" / "README.md").read_text()
    listed = {m.split("\\")[0].split()[0] for m in re.findall(r"^\| `([^`]+)`", text, flags=re.M)}
    listed = {name if "." in name else f"{name}.sh" for name in listed}
    present = {p.name for p in (ROOT / "tools").iterdir() if p.suffix in (".py", ".sh")}
    assert listed == present, (listed, present)


def test_tools_readme_promises_no_fleet_helpers_that_do_not_exist() -> None:
    intro = (ROOT / "tools" / "README.md").read_text().split("|", 1)[0]
    fleet_tools = [p for p in (ROOT / "tools").iterdir() if "fleet" in p.name or "provision" in p.name]
    if not fleet_tools:
        assert "do not exist yet" in intro or "fleet" not in intro.lower(), intro
