"""docs/threat-model.md stays true: every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_named_test_exists() -> None:
    doc = (ROOT / "docs" / "threat-model.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if line.startswith("|") and REF.search(line)]
    assert len(rows) >= 40, "the threat model lost its rows"
    missing = []
    for row in rows:
        for file, name in REF.findall(row):
            path = ROOT / file
            if (not path.is_file() or name not in _tests_in(path)):
                missing.append(f"{file}::{name}")
    assert not missing, f"docs/threat-model.md names tests that do not exist: {missing}"
