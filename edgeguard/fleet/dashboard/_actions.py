"""The dashboard's buttons: ping / reload / rollback as signed commands (edgeguard/fleet/commands).

One ``CommandSender`` per fleet, connected on first use and kept. Sends run one at a time (a sender's answer
queue is shared: two commands in flight would each see the other's answers and skip them), in a worker
thread so the event loop keeps serving; a second click while one runs is answered "busy". The answer is shown
as the sender judged it: verified with the device's pinned key, verified with the key its retained status
announced (learned), or forged / unverifiable.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeguard.errors import EdgeGuardError
from edgeguard.fleet.commands import CommandSender, sign_command
from edgeguard.link import LinkConfig

__all__ = ["ACTIONS", "ActionBusy", "Actions"]

ACTIONS = ("ping", "reload", "rollback")


class ActionBusy(RuntimeError):
    """Another action is waiting for its answer."""


class Actions:
    def __init__(
        self,
        *,
        key: Ed25519PrivateKey,
        broker: LinkConfig,
        pinned: Mapping[str, Ed25519PublicKey],
        timeout_s: float = 10.0,
        ttl_s: int = 60,
    ) -> None:
        self._key = key
        self._broker = broker
        self._pinned = dict(pinned)
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._senders: dict[str, CommandSender] = {}
        self._busy = threading.Lock()

    def _sender(self, fleet: str) -> CommandSender:
        sender = self._senders.get(fleet)
        if sender is None:
            sender = CommandSender(broker=self._broker, fleet=fleet, pinned=self._pinned)
            sender.connect()
            self._senders[fleet] = sender
        return sender

    def run(self, fleet: str, device: str, action: str, reason: str | None = None) -> dict[str, Any]:
        """Send one signed command to one device and wait for its answer (blocking: call it in a thread).
        ValueError for an action the dashboard does not offer; ActionBusy while another runs."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action[:32]!r} (one of {', '.join(ACTIONS)})")
        if not self._busy.acquire(blocking=False):
            raise ActionBusy("another action is waiting for its answer")
        try:
            return self._run(fleet, device, action, reason)
        finally:
            self._busy.release()

    def _run(self, fleet: str, device: str, action: str, reason: str | None) -> dict[str, Any]:
        args = {"reason": reason[:200]} if action == "rollback" and reason else {}
        out: dict[str, Any] = {"fleet": fleet, "device": device, "action": action, "sent": time.time()}
        try:
            sender = self._sender(fleet)
            cmd = sign_command(
                self._key, fleet=fleet, target=("device", device), name=action, args=args,
                now=int(time.time()), ttl_s=self.ttl_s,
            )
            report = sender.send(cmd, timeout=self.timeout_s, devices=[device])
        except EdgeGuardError as exc:
            return {**out, "verdict": "error", "ok": False, "why": str(exc)}
        delivery = report.deliveries[device]
        out["nonce"] = cmd.nonce
        out["forged"] = [f.why for f in delivery.forged]
        answer = delivery.answer
        if answer is None:
            why = f"no verified answer within {self.timeout_s:g} s"
            if delivery.forged:
                why += f" ({len(delivery.forged)} forged)"
            return {**out, "verdict": "forged" if delivery.forged else "none", "ok": False, "why": why}
        doc = answer.doc
        return {
            **out,
            "verdict": answer.verdict,
            "ok": answer.ok,
            "latency_ms": None if delivery.latency_s is None else round(delivery.latency_s * 1000, 1),
            "result": doc.get("result") if answer.ok else None,
            "check": None if answer.ok else doc.get("check"),
            "why": "" if answer.ok else str(doc.get("reason", ""))[:200],
        }

    def close(self) -> None:
        for sender in self._senders.values():
            with contextlib.suppress(Exception):  # shutting down: one that cannot say goodbye is dropped
                sender.close()
        self._senders.clear()
