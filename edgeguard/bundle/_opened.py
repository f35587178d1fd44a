"""What a successful open hands out. Built only by ``_open`` once every check has passed."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from edgeguard._hardening import release
from edgeguard._memory import wipe
from edgeguard.bundle._rollback import RollbackFloor
from edgeguard.bundle.manifest import GoldenSample, Manifest
from edgeguard.errors import BundleRejected

__all__ = ["OpenedBundle", "VerifiedBundle"]


@dataclass(frozen=True)
class VerifiedBundle:
    """Header, manifest, signature, index digest and every chunk's digest checked; nothing decrypted."""

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
        self,
        manifest: Manifest,
        model: bytearray,
        golden: tuple[GoldenSample, ...],
        state_dir: Path | None,
        *,
        model_name: str | None = None,
    ) -> None:
        self.manifest = manifest
        self.model = model
        self.golden = golden
        self._state_dir = state_dir
        self._model_name = model_name

    def wipe(self) -> None:
        """Overwrite the plaintext with zeros (best effort; see the class docstring)."""
        if self.model:
            wipe(self.model)
            release(self.model)  # unlock the pages that open_bundle locked (zeros now)

    def verify_payload_digest(self) -> None:
        """Compare SHA-256 of the plaintext with the manifest's ``payload_sha256`` (one more pass over the
        model, ~4x the cost of decrypting it on CPUs with AES instructions); on a mismatch wipe the model
        and raise ``BundleRejected("integrity")``.

        ``open_bundle`` does not need this for integrity: every plaintext byte was decrypted from a
        ciphertext byte whose digest the publisher signed, under the key the publisher committed to. It
        checks that the publisher's claimed identity of the model is true (docs/bundle.md, "Why opening
        does not re-hash the plaintext"): audits, ``verify --deep``, or a background check after load.
        """
        if not hmac.compare_digest(hashlib.sha256(self.model).hexdigest(), self.manifest.payload_sha256):
            self.wipe()
            raise BundleRejected("integrity", "decrypted model does not match the manifest's SHA-256")

    def commit_rollback_floor(self) -> bool:
        """Raise this model name's rollback floor to this version and pin the slot to it; True when the floor
        moved. Idempotent. The floor and slot are re-checked in the same critical section as the write:
        ``BundleRejected`` ("rollback", "wrong model") when another commit since this bundle was opened makes
        it unacceptable now."""
        if self._state_dir is None:
            return False
        m = self.manifest
        return RollbackFloor(self._state_dir).commit(m.name, m.version, model_name=self._model_name)
