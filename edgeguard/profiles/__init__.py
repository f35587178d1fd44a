"""Device profiles: which board this is, and which accelerators to try in which order.

The data lives in ``device_profiles/*.toml`` (one file per board; see docs/profiles.md). Only the CLI and the
service read profiles; everything below them takes the typed :class:`Profile`.
"""

from __future__ import annotations

from ._load import (
    BoardFacts,
    detect_profile,
    get_profile,
    load_profile_file,
    load_profiles,
    match_profile,
    profile_dirs,
    read_board_facts,
)
from ._schema import ONNX_KINDS, TFLITE_KINDS, Accelerator, Detection, EngineTuning, OptionValue, Profile

__all__ = [
    "Accelerator",
    "Detection",
    "EngineTuning",
    "OptionValue",
    "Profile",
    "ONNX_KINDS",
    "TFLITE_KINDS",
    "BoardFacts",
    "detect_profile",
    "get_profile",
    "load_profile_file",
    "load_profiles",
    "match_profile",
    "profile_dirs",
    "read_board_facts",
]
