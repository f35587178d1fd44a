"""Fixtures of the posture tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.posture._rig import Rig, make_rig


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)
