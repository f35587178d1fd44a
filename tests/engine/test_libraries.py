"""`edgeguard doctor` names the backend libraries in use, their versions, and why another one is not used.

Each test asserts on whatever this venv holds; the legs of tools/legs.py run them on tflite_runtime beside
numpy 1.26, on onnxruntime 1.23.2, and at every lower bound of pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest

from edgeguard.cli import main


def _preferred_litert() -> tuple[str, str]:
    """The interpreter package LiteRTBackend should pick here, found without importing either one."""
    for module, dist in (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime")):
        if importlib.util.find_spec(module) is not None:
            return module, importlib.metadata.version(dist)
    raise AssertionError("the test venvs always hold one LiteRT interpreter")


def test_doctor_names_the_libraries_in_use() -> None:
    # The real CLI in a child process, as an operator runs it on a board.
    doctor = [sys.executable, "-m", "edgeguard", "doctor", "--profile", "generic-x86_64"]
    out = subprocess.run([*doctor, "--json"], capture_output=True, text=True, timeout=120, check=True).stdout
    libs = json.loads(out)["libraries"]
    module, version = _preferred_litert()
    assert libs["onnx"]["library"] == "onnxruntime" and libs["onnx"]["version"] == onnxruntime.__version__
    assert (libs["tflite"]["library"], libs["tflite"]["version"]) == (module, version)
    assert libs["arrays"] == {"library": "numpy", "version": np.__version__, "note": None}
    if module == "tflite_runtime":
        assert libs["tflite"]["note"].startswith("ai_edge_litert not installed; using tflite_runtime")
    text = subprocess.run(doctor, capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout
    assert f"libraries: onnxruntime {onnxruntime.__version__} · {module} {version} · numpy {np.__version__}" \
        in text


def test_doctor_says_why_ai_edge_litert_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # as on a board that has only tflite-runtime
    assert main(["doctor", "--profile", "generic-x86_64", "--json"]) == 0
    lite = json.loads(capsys.readouterr().out)["libraries"]["tflite"]
    if importlib.util.find_spec("tflite_runtime") is None:
        assert (lite["library"], lite["version"]) == (None, None)
        assert lite["note"] == ("ai_edge_litert not installed; tflite_runtime not installed either: no "
                                "tflite bundle can run (pip install ai-edge-litert)")
        return
    version = importlib.metadata.version("tflite-runtime")
    assert (lite["library"], lite["version"]) == ("tflite_runtime", version)
    assert lite["note"].startswith("ai_edge_litert not installed; using tflite_runtime")
    assert ("fails with numpy" in lite["note"]) == (int(np.__version__.split(".")[0]) >= 2)


def test_a_broken_ai_edge_litert_is_not_reported_as_absent(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # A wheel that is present but cannot import (a missing shared library, say) must be named as broken.
    class Broken:
        def __getattr__(self, name: str) -> object:
            raise ImportError("libfoo.so.1: cannot open shared object file", name="ai_edge_litert._pywrap")

    monkeypatch.setitem(sys.modules, "ai_edge_litert", Broken())
    monkeypatch.delitem(sys.modules, "ai_edge_litert.interpreter", raising=False)
    assert main(["doctor", "--profile", "generic-x86_64", "--json"]) == 0
    lite = json.loads(capsys.readouterr().out)["libraries"]["tflite"]
    assert lite["note"].startswith("ai_edge_litert failed to import (")
    assert "libfoo.so.1" in lite["note"] and "\n" not in lite["note"]
