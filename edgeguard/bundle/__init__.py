"""Sealed model bundles (``.egm``): pack on the publisher side, verify and open into memory on the device.

``open_bundle`` (in ``_open``, the only module that reads bundle bytes) returns an ``OpenedBundle`` whose
``model`` is a plaintext ``bytearray`` that never touches a disk. The format is described in docs/bundle.md.
"""

from __future__ import annotations

from edgeguard.bundle._format import DEFAULT_CHUNK_SIZE, DEFAULT_SUITE, SUITES, BundleLimits
from edgeguard.bundle._open import OpenedBundle, VerifiedBundle, inspect_bundle, open_bundle, verify_bundle
from edgeguard.bundle._pack import (
    SUITE_CHOICES,
    detect_format,
    load_golden_npz,
    load_meta,
    pack_bundle,
    read_model,
)
from edgeguard.bundle._rollback import MODEL_NAME_RE, RollbackFloor, check_model_name
from edgeguard.bundle.manifest import GoldenSample, Manifest, TensorSpec, Tolerance
from edgeguard.keys import DeviceKey, PublisherKey, RecipientKey, TrustStore

__all__ = [
    "BundleLimits",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SUITE",
    "DeviceKey",
    "GoldenSample",
    "MODEL_NAME_RE",
    "Manifest",
    "OpenedBundle",
    "PublisherKey",
    "RecipientKey",
    "RollbackFloor",
    "SUITES",
    "SUITE_CHOICES",
    "TensorSpec",
    "Tolerance",
    "TrustStore",
    "VerifiedBundle",
    "check_model_name",
    "detect_format",
    "inspect_bundle",
    "load_golden_npz",
    "load_meta",
    "open_bundle",
    "pack_bundle",
    "read_model",
    "verify_bundle",
]
