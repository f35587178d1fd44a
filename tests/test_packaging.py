"""pyproject.toml: the licence in the PEP 639 form, so installing prints no setuptools deprecation warning."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_licence_is_an_spdx_string_with_its_file_and_a_setuptools_that_reads_it() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = doc["project"]
    assert project["license"] == "Apache-2.0"  # a table here is what setuptools warns about
    assert all((ROOT / f).is_file() for f in project["license-files"])
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    # setuptools reads the SPDX string and license-files from 77.0 on; older ones fail or warn.
    (req,) = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    lower = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", req)
    assert lower is not None and int(lower.group(1)) >= 77, req
    assert not any("License ::" in c for c in project.get("classifiers", []))  # PEP 639 forbids both
