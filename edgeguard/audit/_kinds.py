"""Which event kinds are security-relevant and go into the audit log (docs/security.md, "Audit log").

Every event the worker publishes passes :func:`edgeguard.audit.AuditTrail.event`; a kind listed here is
also recorded. A new security event is one line here.
"""

from __future__ import annotations

__all__ = ["AUDITED_KINDS"]

AUDITED_KINDS: frozenset[str] = frozenset(
    {
        # models
        "bundle-accepted",
        "bundle-rejected",
        "reloaded",
        "reload-failed",
        "rollback",
        "model-loaded",
        # remote deploy (docs/fleet.md "Deploy")
        "deploy-started",
        "deploy-probation",
        "deploy-committed",
        "deploy-rolled-back",
        "deploy-refused",
        # configuration
        "config-changed",
        # operator commands (signed commands)
        "command-accepted",
        "command-refused",
        "command-rejected",
        # access to the local API
        "token-refused",
        "api-lockout",
        "api-rate-anomaly",
        # inputs the model's adversarial-input detector refused (defence.adversarial.mode = reject)
        "adversarial-input",
        "query-budget-exhausted",
        # integrity of the device's files
        "integrity-alert",
        "integrity-baseline",
        "integrity-rebaseline",
        "integrity-restored",
        # liveness
        "service-start",
        "restart",
        "crash-loop",
        "safe-state",
        "watchdog",
        "degraded",
        "recovered",
        "safe-state-left",
        # results the device could not keep (tampered storage, full disk)
        "outbox_corrupt",
        "outbox_dropped",
        # posture
        "posture",
        "posture-finding",
        "clock-rollback",
    }
)
