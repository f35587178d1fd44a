"""tools/legs.py: the lowest-bounds constraints follow pyproject.toml; each leg installs what it claims."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tools import legs


def _pyproject() -> dict[str, object]:
    with (Path(legs.ROOT) / "pyproject.toml").open("rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def test_lowest_constraints_pin_every_declared_lower_bound() -> None:
    project = _pyproject()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    declared = [*project["dependencies"], *(r for reqs in extras.values() for r in reqs)]  # type: ignore[misc]
    pins = {line.split("==")[0]: line.split("==")[1] for line in legs.lowest_constraints().splitlines()
            if not line.startswith("#")}
    for req in declared:
        name, spec, _ = legs._parse(req)
        if name in legs.NOT_FOR_TESTS:
            assert name not in pins  # linters run once, in the main venv
            continue
        bound = spec.split(">=")[1].split(",")[0].strip()
        assert pins[name].split(" ;")[0] == bound, req


def test_a_requirement_without_a_lower_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    project = _pyproject()
    project["dependencies"] = [*project["dependencies"], "newlib"]  # type: ignore[misc]
    monkeypatch.setattr(legs, "_project", lambda: project)
    with pytest.raises(SystemExit, match=r"'newlib' declares no lower bound"):
        legs.lowest_constraints()


def test_each_leg_installs_what_it_claims() -> None:
    by_name = {leg.name: leg for leg in legs.LEGS}
    tflite = legs._install_args(by_name["tflite-runtime"])
    assert not any(a.startswith("ai-edge-litert") for a in tflite)  # the one interpreter is the one tested
    assert "tflite-runtime==2.14.0" in tflite and "numpy==1.26.4" in tflite
    assert not any(a.startswith("numpy>") for a in tflite)  # the pin replaces the project's own requirement
    jetpack = legs._install_args(by_name["jetpack"])
    assert "onnxruntime==1.23.2" in jetpack and not any(a.startswith("onnxruntime>") for a in jetpack)
    assert not by_name["tflite-runtime"].skips_allowed and by_name["lowest"].lowest
