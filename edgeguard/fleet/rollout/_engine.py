"""The rollout itself: waves of signed ``deploy`` commands, each wave waiting until every device has left
probation, halting (and rolling back where the new version started) when failures exceed the bound.

A device's outcome in a wave (docs/fleet.md, "Rolling out a model"):

- ok: it reports ``committed`` for this rollout (heartbeat ``deploy`` object or ``deploy-committed`` event);
- failed: its signed answer refuses the deploy; it reports ``rolled-back`` or ``failed`` for this rollout;
  no answer and no deploy state for this rollout within ``answer_timeout_s`` of the command; or no commit
  within ``commit_grace_s`` after its probation ended.

Every change is saved (atomically) before the next step, so a resumed process continues where this one
stopped. On resume a device whose outcome is unknown is asked again only once one of its heartbeats shows it
is not working on this rollout (a deploy it already took is never sent twice). The transport is a Protocol
(MQTT in ``_mqtt.py``; tests of the logic pass their own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from ._observe import AnswerSeen, DeployStateSeen, Observation
from ._plan import Rollout, Wave

__all__ = ["RolloutEngine", "Transport", "abort_marker"]

_log = logging.getLogger("edgeguard.fleet.rollout")
_ROLLBACK_WAIT_S = 30.0


class Transport(Protocol):
    def publish_bundle(self, data: bytes) -> None: ...
    def remove_bundle(self, sha256: str, size: int) -> None: ...
    def send(self, device: str, name: str, args: Mapping[str, str]) -> str: ...  # -> the command's nonce
    def poll(self, timeout: float) -> list[Observation]: ...
    def publish_progress(self, rollout_id: str, doc: Mapping[str, object]) -> None: ...


def abort_marker(root: Path, rollout_id: str) -> Path:
    """``fleet rollout abort`` creates this file; the process running the rollout sees it and stops."""
    return root / "rollouts" / f"{rollout_id}.abort"


class RolloutEngine:
    def __init__(
        self,
        rollout: Rollout,
        *,
        root: Path,
        transport: Transport,
        bundle: Callable[[], bytes],
        on_change: Callable[[Rollout], None] | None = None,
        now: Callable[[], float] = time.time,
        tick_s: float = 0.5,
    ) -> None:
        self.r = rollout
        self.root = root
        self.t = transport
        self._bundle = bundle
        self._on_change = on_change
        self._now = now
        self._tick = tick_s
        self._unsure: set[str] = set()  # resumed: outcome unknown until a heartbeat says where it is
        self._busy: dict[str, str] = {}  # refused "deploy busy": decided by later deploy states

    # -- bookkeeping
    def _save(self) -> None:
        self.r.updated = self._now()
        self.r.save(self.root)
        self.t.publish_progress(self.r.id, self.r.progress())
        if self._on_change is not None:
            self._on_change(self.r)

    def _fail(self, wave: Wave, device: str, why: str) -> None:
        if wave.outcome(device):
            return
        wave.failed[device] = why
        self.r.failures += 1
        _log.warning("rollout %s: %s failed: %s", self.r.id, device, why)

    def _send_deploy(self, wave: Wave, device: str) -> None:
        args = self.r.settings.deploy_args(sha256=self.r.sha256, size=self.r.size, rollout=self.r.id)
        wave.nonces[device] = self.t.send(device, "deploy", args)
        wave.sent[device] = self._now()

    # -- the run
    def run(self) -> Rollout:
        """Drive the rollout until it is done, halted or aborted; returns its final state."""
        r = self.r
        if r.final:
            return r
        self.t.publish_bundle(self._bundle())
        now = self._now()
        for wave in r.waves:
            if wave.state in ("deploying", "probation"):  # resumed mid-wave
                self._unsure = {d for d in wave.open_devices() if d not in wave.probation}
                for d in self._unsure:  # its deadline runs from now if we died before sending to it
                    wave.sent.setdefault(d, now)
        self._save()
        while not r.final:
            current = r.current()
            if current is None:
                r.state, r.reason = "done", None
                break
            wave = current
            if wave.state == "pending":
                # Saved before the first command: a process that dies while sending is resumed into
                # "deploying", where each device's heartbeat decides whether it is asked (again).
                wave.state = "deploying"
                self._save()
                for device in wave.devices:
                    self._send_deploy(wave, device)
                self._save()
            if self._follow(wave):
                break
            wave.state = "passed"
            self._save()
        self._finish()
        return r

    def _follow(self, wave: Wave) -> bool:
        """Until every device of ``wave`` has an outcome (False), or the rollout halts or aborts (True)."""
        r = self.r
        while wave.open_devices():
            changed = False
            for obs in self.t.poll(self._tick):
                changed |= self._observe(wave, obs)
            changed |= self._deadlines(wave)
            if changed:
                self._update_wave(wave)
                self._save()
            if abort_marker(self.root, r.id).exists():
                self._stop(wave, "aborted", "aborted by the operator")
                return True
            if r.failures > r.max_failures:
                self._stop(wave, "halted", f"{r.failures} failures exceed --max-failures {r.max_failures}")
                return True
        self._update_wave(wave)
        return False

    def _update_wave(self, wave: Wave) -> None:
        if wave.probation:
            wave.probation_until = max(wave.probation.values())
        if wave.state == "deploying" and all(d in wave.probation or wave.outcome(d) for d in wave.devices):
            wave.state = "probation"

    def _observe(self, wave: Wave, obs: Observation) -> bool:
        device = obs.device
        if device not in wave.devices or wave.outcome(device):
            return False
        if isinstance(obs, AnswerSeen):
            if obs.nonce is None or obs.nonce != wave.nonces.get(device):
                return False
            if obs.ok:
                until = obs.result.get("probation_until")
                if isinstance(until, (int, float)):
                    wave.probation[device] = float(until)
                    self._unsure.discard(device)
                    return True
                self._fail(wave, device, f"deploy answer without a probation: {str(dict(obs.result))[:200]}")
                return True
            if obs.check == "deploy busy":  # perhaps busy with this very rollout: its heartbeat will say
                self._busy[device] = f"refused: deploy busy: {obs.reason}"
                return False
            self._fail(wave, device, f"refused: {obs.check}: {obs.reason}")
            return True
        return self._observe_state(wave, obs)

    def _observe_state(self, wave: Wave, obs: DeployStateSeen) -> bool:
        device = obs.device
        if obs.rollout != self.r.id:
            if device in self._unsure and obs.source == "heartbeat" and obs.state != "fetching":
                # resumed, and the device is not working on this rollout: it never took the command
                self._unsure.discard(device)
                self._send_deploy(wave, device)
                return True
            return False
        self._unsure.discard(device)
        self._busy.pop(device, None)
        if obs.state == "committed":
            wave.ok.append(device)
            return True
        if obs.state in ("rolled-back", "failed"):
            self._fail(wave, device, f"{obs.state}: {obs.reason or 'no reason given'}")
            return True
        if obs.state == "probation" and obs.probation_until is not None and device not in wave.probation:
            wave.probation[device] = obs.probation_until
            return True
        return False

    def _deadlines(self, wave: Wave) -> bool:
        s, now, changed = self.r.settings, self._now(), False
        for device in wave.open_devices():
            until = wave.probation.get(device)
            if until is not None:
                if now > until + s.commit_grace_s:
                    self._fail(wave, device, f"no commit within {s.commit_grace_s:g} s after its probation")
                    changed = True
            elif now > wave.sent.get(device, now) + s.answer_timeout_s:
                why = self._busy.get(device) or f"no answer within {s.answer_timeout_s:g} s"
                self._fail(wave, device, why)
                changed = True
        return changed

    def _stop(self, wave: Wave, state: str, reason: str) -> None:
        """Halt or abort: roll back the devices of this wave that took the new version (or may be taking
        it: their deploy was sent and not refused), then record the end."""
        r = self.r
        r.state, r.reason = ("halted" if state == "halted" else "aborted"), reason
        if wave.state != "pending":
            wave.state = "failed"
        targets = [d for d in wave.devices if d in wave.sent and not self._refused(wave, d)]
        self._save()
        nonces = {d: self.t.send(d, "rollback", {"reason": f"rollout {r.id} {state}"}) for d in targets}
        deadline = self._now() + _ROLLBACK_WAIT_S
        waiting = set(nonces)
        while waiting and self._now() < deadline:
            for obs in self.t.poll(self._tick):
                if isinstance(obs, AnswerSeen) and obs.device in waiting and obs.nonce == nonces[obs.device]:
                    waiting.discard(obs.device)
                    if obs.ok and obs.device not in wave.rolled_back:
                        wave.rolled_back.append(obs.device)
                elif (
                    isinstance(obs, DeployStateSeen)
                    and obs.rollout == r.id
                    and obs.state == "rolled-back"
                    and obs.device in waiting
                    and obs.device not in wave.rolled_back
                ):
                        wave.rolled_back.append(obs.device)
                        waiting.discard(obs.device)
        for d in targets:  # those that rolled back by themselves during probation count too
            if d in wave.failed and wave.failed[d].startswith("rolled-back") and d not in wave.rolled_back:
                wave.rolled_back.append(d)
        self._save()

    def abort(self) -> Rollout:
        """Stop a rollout no process is running (``fleet rollout abort`` when it died)."""
        wave = self.r.current()
        if wave is None:
            self.r.state, self.r.reason = "aborted", "aborted by the operator"
        else:
            self._stop(wave, "aborted", "aborted by the operator")
        self._finish()
        return self.r

    @staticmethod
    def _refused(wave: Wave, device: str) -> bool:
        return wave.failed.get(device, "").startswith("refused")

    def _finish(self) -> None:
        try:
            self.t.remove_bundle(self.r.sha256, self.r.size)
        except Exception as exc:  # the rollout's outcome stands; a retained bundle left behind is said
            _log.warning("rollout %s: bundle not removed from the broker: %s", self.r.id, exc)
        abort_marker(self.root, self.r.id).unlink(missing_ok=True)
        self._save()
