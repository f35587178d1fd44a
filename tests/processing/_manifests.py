"""Manifests for processing tests: only the fields the guard and the processing modules read matter."""

from __future__ import annotations

from typing import Any

from edgeguard.bundle.manifest import Manifest, TensorSpec

# NudeNet 320n (the zoo's "yolov8n"): class order of its detection head.
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)


def manifest(
    inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...] = (), **fields: Any
) -> Manifest:
    return Manifest(
        format="onnx", name="test-model", version=1, created="2026-01-01T00:00:00Z", payload_sha256="0" * 64,
        payload_size=1, chunk_size=65536, publisher_key_id="k", recipient_key_ids=("r",),
        inputs=inputs, outputs=outputs, **fields,
    )


def yolo_manifest(**fields: Any) -> Manifest:
    return manifest(
        (TensorSpec("images", "float32", (1, 3, 320, 320), (0.0, 1.0)),),
        (TensorSpec("output0", "float32", (1, 22, 2100)),),
        **{"preprocess": {"resize": "letterbox"},
           "postprocess": {"kind": "yolov8", "labels": list(NUDENET_LABELS)}, **fields},
    )
