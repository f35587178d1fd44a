"""Remote model deploy, device side (docs/fleet.md, "Deploy"): bundles over MQTT chunks or from a path, A/B
slots holding sealed bundles, probation with automatic rollback, refused versions. The chunk format's writer
(:func:`publish_bundle`) is shared with the operator tools.
"""

from __future__ import annotations

from ._format import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    BundleMeta,
    ChunkGate,
    ChunkRefused,
    bundle_messages,
    bundle_topic,
    publish_bundle,
    removal_messages,
)
from ._manager import Candidate, DeployConfig, DeployHost, DeployManager
from ._request import DeployRequest
from ._slots import RefusedVersions, SlotRecord, SlotStore
from ._steps import STEPS, StepHook

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "STEPS",
    "BundleMeta",
    "Candidate",
    "ChunkGate",
    "ChunkRefused",
    "DeployConfig",
    "DeployHost",
    "DeployManager",
    "DeployRequest",
    "RefusedVersions",
    "SlotRecord",
    "SlotStore",
    "StepHook",
    "bundle_messages",
    "bundle_topic",
    "publish_bundle",
    "removal_messages",
]
