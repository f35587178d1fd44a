"""Ownership proof for published models: a secret trigger set and the match test (``edgeguard fingerprint``).

    with load_model(Path("model.onnx")) as m:
        save_trigger(Path("trigger.npz"), make_trigger(m))          # publisher, once; keep the file secret
    with load_model(Path("suspect.onnx")) as s:
        compare(s, load_trigger(Path("trigger.npz"))).ok             # True: derives from the model

Publisher-side tooling; forward passes only. See docs/security.md, "Ownership proof".
"""

from __future__ import annotations

from ._core import DEFAULT_COUNT, DEFAULT_THRESHOLD, Match, compare, make_trigger
from ._model import InputSpec, LoadedModel, load_model, parse_shapes
from ._trigger import MAX_TRIGGER_BYTES, TriggerSet, load_trigger, save_trigger

__all__ = [
    "DEFAULT_COUNT",
    "DEFAULT_THRESHOLD",
    "MAX_TRIGGER_BYTES",
    "InputSpec",
    "LoadedModel",
    "Match",
    "TriggerSet",
    "compare",
    "load_model",
    "load_trigger",
    "make_trigger",
    "parse_shapes",
    "save_trigger",
]
