"""Error families by origin.

Each family says where a failure came from, so the CLI and the service can map it to an exit code, a
counter or an event without looking at messages. Caller mistakes (a wrong argument type, an impossible
option) stay ``ValueError``/``TypeError`` and are bugs, not conditions to handle.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from edgeguard._echo import cut

__all__ = [
    "EdgeGuardError",
    "BundleRejected",
    "BundleCheck",
    "BUNDLE_CHECKS",
    "KeyFileError",
    "ConfigError",
    "BackendError",
    "InputRejected",
    "AdversarialInput",
    "OutboxError",
    "LinkError",
    "WatchdogError",
    "ServiceUnavailable",
    "DatabaseError",
    "ArchiveRejected",
    "ArchiveCheck",
    "ARCHIVE_CHECKS",
    "CommandRefused",
    "CommandCheck",
    "COMMAND_CHECKS",
    "AuditError",
]

# The one-word (or two-word) names of the checks a bundle can fail; they are part of the CLI contract.
BundleCheck = Literal[
    "signature",
    "untrusted signer",
    "revoked",
    "rollback",
    "wrong model",
    "expired",
    "not a recipient",
    "integrity",
    "malformed",
    "too large",
    "unsupported",
]
BUNDLE_CHECKS: Final[tuple[str, ...]] = get_args(BundleCheck)


class EdgeGuardError(Exception):
    """Base of every error EdgeGuard raises on purpose."""


class BundleRejected(EdgeGuardError):
    """A sealed bundle failed verification. ``check`` names the failed check; the message is one line."""

    def __init__(self, check: BundleCheck, detail: str) -> None:
        if check not in BUNDLE_CHECKS:
            raise ValueError(f"unknown bundle check {check!r}")
        self.check: BundleCheck = check
        self.detail = cut(detail)  # a detail may quote the unauthenticated manifest: bounded here for all
        super().__init__(f"bundle rejected: {check}: {self.detail}")


class KeyFileError(EdgeGuardError):
    """A key file is missing, malformed, of the wrong kind, or readable by group/others."""


class ConfigError(EdgeGuardError):
    """A config file, device profile or command-line option is invalid (exit code 2)."""


class BackendError(EdgeGuardError):
    """An inference backend failed to load or run a model (whatever the library raised)."""


class InputRejected(EdgeGuardError):
    """An inference input did not match the model's declared inputs; the message says exactly what."""


class AdversarialInput(InputRejected):
    """An input the model's feature-squeezing detector scores over its calibrated threshold, refused because
    the manifest says ``defence.adversarial.mode = "reject"`` (local API: 422)."""

    def __init__(self, message: str, *, score: float, threshold: float) -> None:
        super().__init__(message)
        self.score = score
        self.threshold = threshold


class OutboxError(EdgeGuardError):
    """The durable result store failed (disk full, corrupt database, I/O error)."""


class LinkError(EdgeGuardError):
    """The MQTT link failed: bad broker settings, refused credentials, TLS failure."""


class WatchdogError(EdgeGuardError):
    """A watchdog (systemd, /dev/watchdog, external microcontroller) could not be opened or kicked."""


class ServiceUnavailable(EdgeGuardError):
    """The service cannot take a request now (safe state, stopping, too many in flight); try again later."""


class DatabaseError(EdgeGuardError):
    """The fleet database (operator side) refused what EdgeGuard needs: a schema newer than this version."""


# The checks a provisioning archive can fail (edgeguard/provisioning/_archive.py runs them in this order).
ArchiveCheck = Literal[
    "too large", "malformed", "untrusted signer", "signature", "wrong device", "not a recipient", "integrity"
]
ARCHIVE_CHECKS: Final[tuple[str, ...]] = get_args(ArchiveCheck)


class ArchiveRejected(EdgeGuardError):
    """A provisioning archive failed verification (exit code 3, like a bundle). ``check`` names the check."""

    def __init__(self, check: ArchiveCheck, detail: str) -> None:
        if check not in ARCHIVE_CHECKS:
            raise ValueError(f"unknown archive check {check!r}")
        self.check: ArchiveCheck = check
        self.detail = cut(detail)
        super().__init__(f"archive rejected: {check}: {self.detail}")


# The checks a remote command can fail, in the order the gatekeeper runs them (docs/commands.md); each name is
# part of the signed answer an operator reads.
CommandCheck = Literal[
    "too large",
    "malformed",
    "untrusted signer",
    "revoked",
    "signature",
    "fleet",
    "target",
    "expired",
    "not yet valid",
    "replayed",
    "nonce store full",
    "unsupported",
    "busy",
    "failed",
    # deploy / rollback (docs/commands.md): the bundle's own checks keep their names
    "deploy busy",
    "digest",
    "fetch",
    "self-test",
    "refused version",
    "rollback",
    "wrong model",
    "not a recipient",
    "integrity",
]
COMMAND_CHECKS: Final[tuple[str, ...]] = get_args(CommandCheck)


class CommandRefused(EdgeGuardError):
    """A remote command was refused (or failed while acting). ``check`` names the failed check; the message
    is one line, and any text the sender chose in it is cut."""

    def __init__(self, check: CommandCheck, detail: str) -> None:
        if check not in COMMAND_CHECKS:
            raise ValueError(f"unknown command check {check!r}")
        self.check: CommandCheck = check
        self.detail = cut(detail)
        super().__init__(f"command refused: {check}: {self.detail}")


class AuditError(EdgeGuardError):
    """The audit log cannot be written or read (disk full, I/O error, a log file that is not ours)."""
