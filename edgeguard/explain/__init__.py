"""Explanations: which image regions decide a model's top class or box (``edgeguard explain``, the API's
``POST /v1/explain``). Occlusion sensitivity, forward passes only, batched, with a hard cap on passes.
See docs/security.md, "Explanations"."""

from __future__ import annotations

from ._explain import DEFAULT_MAX_PASSES, Explanation, Prepare, RunBatch, explain
from ._occlusion import Heatmap, occlusion, plan_grid
from ._overlay import overlay_png
from ._runners import Runner, backend_runner, draft_manifest, engine_runner
from ._service import explain_image_bytes
from ._target import Target, choose_target

__all__ = [
    "DEFAULT_MAX_PASSES",
    "Explanation",
    "Heatmap",
    "Prepare",
    "RunBatch",
    "Runner",
    "backend_runner",
    "draft_manifest",
    "engine_runner",
    "Target",
    "choose_target",
    "explain",
    "explain_image_bytes",
    "occlusion",
    "overlay_png",
    "plan_grid",
]
