"""Tamper-evident audit trail and intrusion detection on the device (docs/security.md).

* :class:`AuditLog`: append-only, hash-chained, fsynced, rotated log of security-relevant events with
  Ed25519-signed checkpoints (published on ``events``); :func:`verify_log` checks it.
* :class:`IntegrityMonitor`: a signed baseline of the digests of the runtime's files, config, trust store,
  tokens and hooks, checked at start and periodically.
"""

from ._config import AuditConfig, IntegrityConfig
from ._integrity import IntegrityMonitor, IntegrityReport
from ._kinds import AUDITED_KINDS
from ._log import CHECKPOINT_FILE, AuditLog, log_files, parse_line
from ._record import GENESIS, Record
from ._signing import SIGNING_KEY_FILE, SIGNING_PUB_FILE
from ._verify import Problem, Report, check_checkpoint, checkpoints_from_capture, verify_log

__all__ = [
    "AUDITED_KINDS",
    "AuditConfig",
    "AuditLog",
    "CHECKPOINT_FILE",
    "GENESIS",
    "IntegrityConfig",
    "IntegrityMonitor",
    "IntegrityReport",
    "Problem",
    "Record",
    "Report",
    "SIGNING_KEY_FILE",
    "SIGNING_PUB_FILE",
    "check_checkpoint",
    "checkpoints_from_capture",
    "log_files",
    "parse_line",
    "verify_log",
]
