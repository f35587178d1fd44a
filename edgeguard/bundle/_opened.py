"""What a successful open hands out. Built only by ``_open`` once every check has passed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeguard.bundle._rollback import RollbackFloor
from edgeguard.bundle.manifest import GoldenSample, Manifest

__all__ = ["OpenedBundle", "VerifiedBundle"]


@dataclass(frozen=True)
class VerifiedBundle:
    """Header, manifest, signature and body digest checked; nothing decrypted."""

    manifest: Manifest
    manifest_bytes: bytes
    signed_by: str


class OpenedBundle:
    """A fully verified bundle: the manifest, the plaintext model (memory only) and the golden vectors.

    Hand ``model`` to a backend (``InferenceSession(bytes(model))``, ``Interpreter(model_content=...)``),
    then call ``wipe()``. Wiping zeroes this buffer only: copies a backend or Python made cannot be
    reached, so it is best effort (docs/bundle.md, "Caveats").
    """

    def __init__(
        self, manifest: Manifest, model: bytearray, golden: tuple[GoldenSample, ...], state_dir: Path | None
    ) -> None:
        self.manifest = manifest
        self.model = model
        self.golden = golden
        self._state_dir = state_dir

    def wipe(self) -> None:
        """Overwrite the plaintext with zeros (best effort; see the class docstring)."""
        if self.model:
            memoryview(self.model)[:] = bytes(len(self.model))

    def commit_rollback_floor(self) -> bool:
        """Raise this model name's rollback floor to this version; True when it moved. Idempotent."""
        if self._state_dir is None:
            return False
        return RollbackFloor(self._state_dir).raise_to(self.manifest.name, self.manifest.version)
