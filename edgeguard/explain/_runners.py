"""How an explanation reaches the model: through a loaded engine (a sealed bundle, on the device) or a model
file and its ``pack --meta`` JSON (the publisher, before sealing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.engine import Backend
from edgeguard.engine.postprocess import Postprocessor
from edgeguard.engine.preprocess import LetterboxTransform, Preprocessor
from edgeguard.errors import ConfigError, InputRejected

__all__ = ["Runner", "ServingEngine", "engine_runner", "backend_runner", "draft_manifest"]

Tensors = dict[str, np.ndarray]


class ServingEngine(Protocol):
    """What an explanation needs from :class:`edgeguard.engine.Engine` (the service's ``EngineLike`` fits)."""

    manifest: Manifest

    def infer(self, inputs: Any) -> Any: ...


@dataclass(frozen=True)
class Runner:
    """What ``explain`` needs: preprocessing, a batch runner, the post-processing and the output order."""

    pre: Preprocessor
    post: Postprocessor | None
    order: list[str]
    backend: Backend | None = None
    engine: ServingEngine | None = None
    stack: bool = False  # the model takes a batch axis: one run per batch

    def prepare(self, image: np.ndarray) -> tuple[Tensors, LetterboxTransform | None]:
        prepared = self.pre(image)
        return prepared.tensors, prepared.transform

    def run(self, batch: Sequence[Tensors]) -> list[Mapping[str, np.ndarray]]:
        if self.engine is not None:
            return [self.engine.infer(t).outputs for t in batch]
        assert self.backend is not None
        if self.stack and len(batch) > 1:
            joined = {name: np.concatenate([t[name] for t in batch]) for name in batch[0]}
            out = self.backend.run(joined)
            return [{k: v[i:i + 1] for k, v in out.items()} for i in range(len(batch))]
        return [self.backend.run(t) for t in batch]


def engine_runner(engine: ServingEngine) -> Runner:
    """Through the engine: the input guard and the fast path the device serves with, one pass at a time."""
    pre = Preprocessor.from_manifest(engine.manifest)
    if pre is None:
        raise InputRejected(f"model {engine.manifest.name!r} declares no image preprocessing: nothing to "
                            "explain")
    order = [o.name for o in engine.manifest.outputs]
    return Runner(pre, Postprocessor.from_manifest(engine.manifest), order, engine=engine)


def draft_manifest(meta: Mapping[str, Any], model_format: str) -> Manifest:
    """The fields of a manifest that preprocessing and post-processing read, from ``pack --meta`` JSON."""
    if not isinstance(meta.get("preprocess"), dict) or not isinstance(meta.get("inputs"), list):
        raise ConfigError("--meta needs 'inputs' and a 'preprocess' section (how images become inputs)")
    try:
        inputs = tuple(TensorSpec(name=str(t["name"]), dtype=str(t["dtype"]), shape=tuple(t["shape"]))
                       for t in meta["inputs"])
        outputs = tuple(TensorSpec(name=str(t["name"]), dtype=str(t["dtype"]), shape=tuple(t["shape"]))
                        for t in meta.get("outputs", []))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"--meta: each tensor needs name, dtype and shape ({exc})") from None
    return Manifest(format="onnx" if model_format == "onnx" else "tflite", name="draft", version=0,
                    created="", payload_sha256="", payload_size=0, chunk_size=0, publisher_key_id="",
                    recipient_key_ids=(),
                    inputs=inputs, outputs=outputs, preprocess=meta["preprocess"],
                    postprocess=meta.get("postprocess"))


def backend_runner(backend: Backend, manifest: Manifest) -> Runner:
    pre = Preprocessor.from_manifest(manifest)
    assert pre is not None  # draft_manifest requires a preprocess section
    order = [o.name for o in manifest.outputs] or [o.name for o in backend.outputs]
    stack = len(backend.inputs) == 1 and bool(backend.inputs[0].shape) and backend.inputs[0].shape[0] is None
    return Runner(pre, Postprocessor.from_manifest(manifest), order, backend=backend, stack=stack)
