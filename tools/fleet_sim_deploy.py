"""Signed commands and simulated deploys for tools/fleet_sim.py (one :class:`SimCommands` per device).

Commands are checked by the device's own gatekeeper (``edgeguard.commands.CommandGate``: signature with the
operator key, fleet, target, expiry, replay with a nonce store on disk) and answered signed with the
simulated device's key, exactly as a device does (docs/commands.md). ``deploy`` fetches the bundle's retained
chunks (``source=mqtt``) or reads ``path:`` and checks its size and sha256, then runs a probation of
``probation_s`` seconds that ends in ``committed`` (or ``rolled-back`` when the fault ``fail-probation`` is
set); ``rollback`` returns to the previous version at once. Nothing is decrypted or run: no inference.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.commands import ANSWER_LABEL, FORMAT_VERSION, CommandGate, envelope, parse_unverified_nonce
from edgeguard.errors import CommandRefused

__all__ = ["SimCommands", "DeployState"]

_SHA = re.compile(r"[0-9a-f]{64}")
_MAX_BUNDLE = 64 * 1024 * 1024
Publish = Callable[[str, bytes, int], None]  # (suffix under the device's prefix or a full topic, body, qos)


@dataclass
class DeployState:
    state: str = "idle"
    version: int | None = None
    rollout: str | None = None
    reason: str | None = None
    probation_until: float | None = None
    time: float = field(default_factory=time.time)

    def doc(self) -> dict[str, Any]:
        return {
            "state": self.state, "version": self.version, "rollout": self.rollout, "reason": self.reason,
            "probation_until": self.probation_until, "time": self.time,
        }


@dataclass
class _Fetch:
    nonce: str
    sha256: str
    size: int
    probation_s: float
    rollout: str | None
    chunks: dict[int, bytes] = field(default_factory=dict)
    meta: dict[str, Any] | None = None


class SimCommands:
    def __init__(
        self,
        *,
        device: str,
        fleet: str,
        gate: CommandGate,
        key: Ed25519PrivateKey,
        publish: Publish,
        subscribe: Callable[[str], object],
        unsubscribe: Callable[[str], object],
        model: str,
        version: int,
    ) -> None:
        self.device, self.fleet = device, fleet
        self.gate, self.key = gate, key
        self._publish, self._subscribe, self._unsubscribe = publish, subscribe, unsubscribe
        self.model, self.version = model, version
        self.previous: int | None = None
        self.deploy = DeployState(version=version)
        self.fetch: _Fetch | None = None
        self.fail_probation: str | None = None  # fault: the next (or current) probation fails with this
        self.refuse_deploy: str | None = None  # fault: deploys are refused with this check
        self.counts = {"commands": 0, "deploys": 0, "rollbacks": 0}
        self.changed = False  # a heartbeat is due now

    # -- answers and events
    def _answer(self, body: dict[str, Any]) -> None:
        doc = {"v": FORMAT_VERSION, "device": self.device, "fleet": self.fleet, "time": int(time.time())}
        doc.update(body)
        self._publish("cmd/resp", envelope(doc, self.key, ANSWER_LABEL), 1)

    def _refuse(self, nonce: str | None, name: str | None, check: str, reason: str) -> None:
        self._answer({"nonce": nonce, "name": name, "ok": False, "check": check, "reason": reason})

    def _event(self, kind: str, **data: Any) -> None:
        body = {**data, "kind": kind, "time": time.time(), "device": self.device}
        self._publish("events", json.dumps(body).encode(), 1)

    def _set(self, state: str, *, reason: str | None = None, until: float | None = None) -> None:
        rollout = self.deploy.rollout if self.fetch is None else self.fetch.rollout
        self.deploy = DeployState(state, self.version, rollout, reason, until)
        self.changed = True

    # -- inbound
    def on_command(self, data: bytes) -> None:
        self.counts["commands"] += 1
        try:
            cmd = self.gate.check(data, now=time.time())
        except CommandRefused as exc:
            nonce = parse_unverified_nonce(data, self.gate.max_bytes)
            if nonce is not None:
                self._refuse(nonce, None, exc.check, exc.detail)
            return
        if cmd.name == "ping":
            self._answer({"nonce": cmd.nonce, "name": cmd.name, "ok": True, "result": {"pong": True}})
        elif cmd.name == "status":
            result = {"state": "serving", "model": {"name": self.model, "version": self.version},
                      "deploy": self.deploy.doc()}
            self._answer({"nonce": cmd.nonce, "name": cmd.name, "ok": True, "result": result})
        elif cmd.name == "deploy":
            self._start_deploy(cmd.nonce, dict(cmd.args))
        elif cmd.name == "rollback":
            self._rollback(cmd.nonce, cmd.args.get("reason", "requested by the operator"))
        else:
            self._refuse(cmd.nonce, cmd.name, "unsupported", f"{cmd.name}: not simulated")

    def _start_deploy(self, nonce: str, args: dict[str, str]) -> None:
        self.counts["deploys"] += 1
        sha, size, source = args.get("sha256", ""), args.get("size", ""), args.get("source", "")
        rollout = args.get("rollout")
        if self.fetch is not None or self.deploy.state in ("fetching", "probation"):
            self._refuse(nonce, "deploy", "deploy busy", f"a deploy is {self.deploy.state}")
            return
        if not _SHA.fullmatch(sha) or not size.isdigit() or not 0 < int(size) <= _MAX_BUNDLE:
            self._refuse(nonce, "deploy", "malformed", "sha256 (64 hex) and size (bytes) are required")
            return
        if self.refuse_deploy is not None:
            self._event("deploy-refused", check=self.refuse_deploy, rollout=rollout, reason="simulated")
            self._refuse(nonce, "deploy", self.refuse_deploy, "simulated refusal")
            return
        try:
            probation = float(args.get("probation_s", "60"))
        except ValueError:
            probation = -1
        if not 0 < probation <= 7 * 86400:
            self._refuse(nonce, "deploy", "malformed", "probation_s must be 1..604800")
            return
        self.fetch = _Fetch(nonce, sha, int(size), probation, rollout)
        self._set("fetching")
        self._event("deploy-started", rollout=rollout, version=None, reason=None)
        if source == "mqtt":
            self._subscribe(f"edgeguard/v1/{self.fleet}/bundles/{sha}/#")
        elif source.startswith("path:"):
            try:
                data = Path(source.removeprefix("path:")).read_bytes()
            except OSError as exc:
                self._fetch_failed("fetch", f"cannot read {source}: {exc.strerror}")
                return
            self._fetched(data)
        else:
            self._fetch_failed("malformed", f"source {source[:80]!r}: mqtt or path:/abs/path")

    def on_bundle(self, topic: str, payload: bytes) -> None:
        f = self.fetch
        if f is None or not payload:
            return
        part = topic.rpartition("/")[2]
        if part == "meta":
            try:
                meta = json.loads(payload)
            except ValueError:
                return
            if isinstance(meta, dict) and meta.get("sha256") == f.sha256:
                f.meta = meta
        elif part.isdigit() and len(payload) <= 1024 * 1024:
            f.chunks[int(part)] = payload
        if f.meta is not None and len(f.chunks) >= int(f.meta.get("chunks", 0)):
            data = b"".join(f.chunks[i] for i in range(int(f.meta["chunks"])) if i in f.chunks)
            self._unsubscribe(f"edgeguard/v1/{self.fleet}/bundles/{f.sha256}/#")
            self._fetched(data)

    def _fetched(self, data: bytes) -> None:
        f = self.fetch
        assert f is not None
        if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
            self._fetch_failed("digest", "the fetched bundle does not match sha256/size")
            return
        version = _bundle_version(data)
        self.previous, self.version = self.version, version if version is not None else self.version + 1
        until = time.time() + f.probation_s
        self._set("probation", until=until)
        self.fetch = None
        result = {"state": "probation", "model": self.model, "version": self.version, "slot": "b",
                  "probation_until": until, "rollout": self.deploy.rollout}
        self._event("deploy-probation", rollout=self.deploy.rollout, version=self.version, reason=None,
                    probation_until=until)
        self._answer({"nonce": f.nonce, "name": "deploy", "ok": True, "result": result})

    def _fetch_failed(self, check: str, reason: str) -> None:
        f = self.fetch
        assert f is not None
        self._set("failed", reason=f"{check}: {reason}")
        self.fetch = None
        self._event("deploy-refused", check=check, rollout=f.rollout, reason=reason)
        self._refuse(f.nonce, "deploy", check, reason)

    def _rollback(self, nonce: str, reason: str) -> None:
        self.counts["rollbacks"] += 1
        if self.previous is None or self.deploy.state not in ("probation", "committed"):
            self._refuse(nonce, "rollback", "state", f"nothing to roll back (deploy {self.deploy.state})")
            return
        self._roll_back(reason)
        self._answer({"nonce": nonce, "name": "rollback", "ok": True,
                      "result": {"state": "rolled-back", "model": self.model, "version": self.version}})

    def _roll_back(self, reason: str) -> None:
        failed = self.version
        assert self.previous is not None
        self.version, self.previous = self.previous, None
        self._set("rolled-back", reason=reason)
        self._event("deploy-rolled-back", rollout=self.deploy.rollout, version=failed, reason=reason)

    # -- time passing (the simulator's loop)
    def tick(self, now_wall: float) -> None:
        d = self.deploy
        if d.state != "probation":
            return
        if self.fail_probation is not None:
            self._roll_back(self.fail_probation)
        elif d.probation_until is not None and now_wall >= d.probation_until:
            self._set("committed")
            self._event("deploy-committed", rollout=d.rollout, version=self.version, reason=None)


def _bundle_version(data: bytes) -> int | None:
    from edgeguard.bundle import inspect_bundle
    from edgeguard.errors import BundleRejected

    try:
        manifest: Any = inspect_bundle(data)["manifest"]
        return int(manifest["version"])
    except (BundleRejected, KeyError, TypeError, ValueError):
        return None
