"""The device side of remote commands: receive on ``cmd``, verify (CommandGate), act, answer on ``cmd/resp``.

The link calls :meth:`CommandService.handle` on its network thread: it only queues the bytes (bounded; a full
queue is counted and reported, never grown). One thread of its own runs the gatekeeper (which writes the nonce
store: disk I/O) and the actions, so neither paho's thread nor the worker's event loop ever waits on them.

Every command, accepted or refused, is an event (``command-accepted`` / ``command-refused``, through the hook
runner like other events), and every command that can be named gets a signed answer. Two refusals are events
only, by design: a message whose envelope cannot be read (there is no nonce an operator could match an answer
to, and signing replies to arbitrary bytes would serve anyone who can publish on the topic), and a full queue
(the device is flooded; answering would add to it). A message over ``commands.max_bytes`` is answered with
``nonce: null``: its size is known before it is parsed, its nonce is not. One over the link's packet limit
never reaches the device under MQTT 5 (the broker drops it, told by the CONNECT's Maximum Packet Size); under
3.1.1 the link discards it unread and :meth:`dropped_by_link` answers it like the gate would.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard._echo import cut
from edgeguard.errors import CommandRefused

from ._format import ANSWER_LABEL, FORMAT_VERSION, envelope
from ._verify import Command, CommandGate, parse_unverified_nonce

__all__ = ["CommandService", "Action", "NOT_YET"]

_log = logging.getLogger("edgeguard.commands")

Action = Callable[[Mapping[str, str]], dict[str, Any]]
# Commands of the protocol whose device side does not exist yet: refused honestly rather than unknown.
NOT_YET: Final[frozenset[str]] = frozenset()
_QUEUE = 16


class CommandService:
    def __init__(
        self,
        *,
        gate: CommandGate,
        signing_key: Ed25519PrivateKey,
        actions: Mapping[str, Action],
        publish_answer: Callable[[bytes], None],
        event: Callable[[str, dict[str, Any]], None],
        after_answer: Mapping[str, Callable[[], None]] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        """``after_answer``: per command name, what to do once its answer is queued (a restart must not
        race its own answer)."""
        self.gate = gate
        self._key = signing_key
        self._actions = dict(actions)
        self._after = dict(after_answer or {})
        self._publish = publish_answer
        self._event = event
        self._now = now
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE)
        self._thread: threading.Thread | None = None
        self.counts = {"accepted": 0, "refused": 0, "dropped_busy": 0}

    # -- link side (paho's thread): cheap, never raises
    def handle(self, data: bytes) -> None:
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            self.counts["dropped_busy"] += 1
            busy = CommandRefused("busy", f"{_QUEUE} commands already queued")
            self._refused(None, None, busy, answer=False)

    def dropped_by_link(self, why: str) -> None:
        """The link threw a message away before it reached :meth:`handle` (over the link's packet limit)."""
        self._refused(None, None, CommandRefused("too large", why), answer=True)

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="eg-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        self.gate.nonces.close()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            try:
                self.process(data)
            except Exception:  # a bug in one command must not stop the next ones
                _log.exception("command handling failed")

    # -- the work (this thread)
    def process(self, data: bytes) -> None:
        try:
            cmd = self.gate.check(data, now=self._now())
        except CommandRefused as exc:
            nonce = parse_unverified_nonce(data, self.gate.max_bytes)
            self._refused(nonce, None, exc, answer=nonce is not None or exc.check == "too large")
            return
        self.counts["accepted"] += 1
        self._event(
            "command-accepted",
            {"nonce": cmd.nonce, "name": cmd.name, "signer": cmd.key_id, "target": ":".join(cmd.target)},
        )
        _log.info("command %s (%s) from operator key %s", cmd.name, cmd.nonce, cmd.key_id)
        try:
            result = self._act(cmd)
        except CommandRefused as exc:
            self._refused(cmd.nonce, cmd.name, exc, answer=True)
            return
        except Exception as exc:  # an action's failure is an answer, not a crash
            _log.exception("command %s failed", cmd.name)
            self._refused(cmd.nonce, cmd.name, CommandRefused("failed", f"{type(exc).__name__}: {exc}"),
                          answer=True)
            return
        self._answer({"nonce": cmd.nonce, "name": cmd.name, "ok": True, "result": result})
        then = self._after.get(cmd.name)
        if then is not None:
            then()

    def _act(self, cmd: Command) -> dict[str, Any]:
        action = self._actions.get(cmd.name)
        if action is None:
            why = "not yet implemented" if cmd.name in NOT_YET else "no such command on this device"
            raise CommandRefused("unsupported", f"{cmd.name}: {why}")
        return action(cmd.args)

    def _refused(self, nonce: str | None, name: str | None, exc: CommandRefused, *, answer: bool) -> None:
        self.counts["refused"] += 1
        _log.warning("%s", exc)
        self._event("command-refused", {"nonce": nonce, "check": exc.check, "reason": exc.detail})
        if answer:
            body = {"nonce": nonce, "name": name, "ok": False, "check": exc.check, "reason": exc.detail}
            self._answer(body)

    def _answer(self, body: dict[str, Any]) -> None:
        gate = self.gate
        doc = {"v": FORMAT_VERSION, "device": gate.device_id, "fleet": gate.fleet, "time": int(self._now())}
        doc.update(body)
        try:
            payload = envelope(_plain(doc), self._key, ANSWER_LABEL)
        except ValueError as exc:  # a result that is not JSON (NaN in a figure): say so, signed
            doc.pop("result", None)
            doc.update(ok=False, check="failed", reason=cut(f"result not encodable: {exc}"))
            payload = envelope(doc, self._key, ANSWER_LABEL)
        self._publish(payload)


def _plain(doc: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON with ``str`` for anything else (paths, enums in a health document)."""
    out: dict[str, Any] = json.loads(json.dumps(doc, default=str, allow_nan=False))
    return out
