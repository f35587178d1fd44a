"""A real audit log on disk for the tests (real files, real Ed25519 key, real fsync)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.audit import AuditConfig, AuditLog


def write_log(
    directory: Path,
    key: Ed25519PrivateKey,
    n: int,
    *,
    published: list[dict[str, Any]] | None = None,
    **config: Any,
) -> AuditLog:
    """``n`` records (``bundle-rejected`` with a counter), checkpoints per ``config``; stopped (which writes a
    final checkpoint)."""
    sink = published if published is not None else []
    log = AuditLog(
        directory=directory,
        signing_key=key,
        device_id="dev-1",
        config=AuditConfig(**config),
        publish=lambda _kind, data: sink.append(data["checkpoint"]),  # published nested under "checkpoint"
    )
    for i in range(n):
        log.append("bundle-rejected", {"i": i, "reason": f"signature: test {i}"})
    log.stop()
    return log
