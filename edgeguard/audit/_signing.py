"""Where the device's Ed25519 signing key lives by default (audit checkpoints, the integrity baseline and
command answers all use the one key; ``edgeguard.service._command_wiring.answer_key`` loads it).

When the config names none (``device.signing_key``), the worker uses ``<state_dir>/device-sign.key`` and
creates it (mode 0600, with ``device-sign.pub`` beside it) on first start. Copy ``device-sign.pub`` off the
device when it is provisioned: verifying a log against the public key found next to it proves nothing to
someone who could rewrite both.
"""

from __future__ import annotations

__all__ = ["SIGNING_KEY_FILE", "SIGNING_PUB_FILE"]

SIGNING_KEY_FILE = "device-sign.key"
SIGNING_PUB_FILE = "device-sign.pub"
