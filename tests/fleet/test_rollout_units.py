"""Units of the rollout: wave planning, the chunk format, the observation gatekeeper, and the engine's
decisions on a fake transport (the engine's Transport Protocol) with a fake clock."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.commands import ANSWER_LABEL, envelope
from edgeguard.errors import ConfigError
from edgeguard.fleet.rollout import (
    AnswerSeen,
    DeployStateSeen,
    MqttTransport,
    Observation,
    Rollout,
    RolloutEngine,
    Settings,
    Wave,
    parse_unverified_message,
    parse_waves,
    plan_waves,
)

BASE = "edgeguard/v1/plant/"


# ------------------------------------------------------------------------------------------------ planning
@pytest.mark.parametrize(
    ("count", "percents", "sizes"),
    [
        (20, [5, 25, 100], [1, 4, 15]),
        (100, [5, 25, 100], [5, 20, 75]),
        (3, [5, 25, 100], [1, 2]),  # 25% of 3 rounds up to 1 = the canary: that wave is left out
        (1, [5, 100], [1]),
        (10, [10, 50], [1, 4]),  # a rollout may stop short of 100%
    ],
)
def test_waves_are_cumulative_rounded_up_in_id_order(
    count: int, percents: list[int], sizes: list[int]
) -> None:
    devices = [f"d{i:03d}" for i in reversed(range(count))]
    waves = plan_waves(devices, percents)
    assert [len(ds) for _, ds in waves] == sizes
    flat = [d for _, ds in waves for d in ds]
    assert flat == sorted(devices)[: len(flat)]


@pytest.mark.parametrize(
    ("canary", "then", "error"),
    [
        ("25%", "10%,100%", "wave percentages must increase: 25% then 10%"),
        ("5%", "5%", "wave percentages must increase: 5% then 5%"),
        ("0%", "", "wave size '0%': a whole percentage 1..100 (e.g. 5%)"),
        ("5%", "101%", "wave size '101%': a whole percentage 1..100 (e.g. 5%)"),
        ("half", "", "wave size 'half': a whole percentage 1..100 (e.g. 5%)"),
    ],
)
def test_bad_wave_percentages_are_refused(canary: str, then: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_waves(canary, then)
    assert str(exc.value) == error


def test_wave_percentages_parse() -> None:
    assert parse_waves("5%", "25%,100%") == [5, 25, 100]
    assert parse_waves("10", "") == [10]


# ------------------------------------------------------------------------------------------------ chunks
def test_the_operator_publishes_the_contracts_chunks_with_the_device_sides_writer() -> None:
    """One writer of the chunk format (edgeguard.deploy), used by the rollout's transport."""
    data = bytes(range(256)) * 41  # 10,496 bytes
    sha = hashlib.sha256(data).hexdigest()
    sent: list[tuple[str, bytes, bool]] = []

    transport = MqttTransport.__new__(MqttTransport)  # only the publishing half: no broker connection
    transport.prefix = "edgeguard/v1/plant"
    transport._chunk_size = 4096
    transport._publish = lambda topic, payload, retain: sent.append((topic, payload, retain))  # type: ignore[method-assign]
    transport.publish_bundle(data)
    assert [t for t, _, _ in sent] == [f"edgeguard/v1/plant/bundles/{sha}/{i}" for i in (0, 1, 2)] + [
        f"edgeguard/v1/plant/bundles/{sha}/meta"]
    assert [len(p) for _, p, _ in sent[:3]] == [4096, 4096, 2304] and all(r for _, _, r in sent)
    assert b"".join(p for _, p, _ in sent[:3]) == data
    assert sent[3][1] == b'{"v":1,"sha256":"' + sha.encode() + b'","size":10496,"chunk_size":4096,"chunks":3}'
    sent.clear()
    transport.remove_bundle(sha, len(data))
    assert [t for t, _, _ in sent] == [f"edgeguard/v1/plant/bundles/{sha}/meta"] + [
        f"edgeguard/v1/plant/bundles/{sha}/{i}" for i in (0, 1, 2)]
    assert all(p == b"" and r for _, p, r in sent)


# ------------------------------------------------------------------------------------- the gatekeeper
def _answer(key: Ed25519PrivateKey, device: str, **body: object) -> bytes:
    doc = {"v": 1, "device": device, "fleet": "plant", "time": 1, **body}
    return envelope(doc, key, ANSWER_LABEL)


def test_only_answers_verified_with_the_devices_pinned_key_are_observed() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pinned = {"d1": key.public_key()}
    good = _answer(key, "d1", nonce="a" * 32, name="deploy", ok=True, result={"probation_until": 5})
    obs = parse_unverified_message(BASE, BASE + "d1/cmd/resp", good, pinned=pinned)
    assert obs == AnswerSeen("d1", "a" * 32, "deploy", True, {"probation_until": 5}, None, None)
    forged = _answer(other, "d1", nonce="a" * 32, name="deploy", ok=True, result={})
    assert parse_unverified_message(BASE, BASE + "d1/cmd/resp", forged, pinned=pinned) is None
    # a genuine answer of d1 replayed on d2's topic, and a device with no pinned key
    assert parse_unverified_message(BASE, BASE + "d2/cmd/resp", good, pinned=pinned) is None
    tampered = json.loads(good)
    tampered["payload"] = base64.b64encode(b'{"ok":true}').decode()
    assert parse_unverified_message(BASE, BASE + "d1/cmd/resp", json.dumps(tampered).encode(),
                                    pinned=pinned) is None


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("d1/heartbeat", b"not json"),
        ("d1/heartbeat", b"[1]"),
        ("d1/heartbeat", b'{"deploy": {"state": "exploded"}}'),
        ("d1/heartbeat", b'{"deploy": "committed"}'),
        ("d1/heartbeat", b'{"deploy": {"state": "committed"}}' + b" " * (256 * 1024)),
        ("d1/events", b'{"kind": "degraded"}'),
        ("d1/results", b'{"deploy": {"state": "committed"}}'),
        ("bundles/meta", b'{"deploy": {"state": "committed"}}'),
    ],
)
def test_unusable_messages_are_dropped(topic: str, payload: bytes) -> None:
    assert parse_unverified_message(BASE, BASE + topic, payload, pinned={}) is None


def test_heartbeat_and_events_give_deploy_states() -> None:
    hb = {"deploy": {"state": "probation", "version": 4, "rollout": "r", "reason": None,
                     "probation_until": 99.5, "time": 1}}
    obs = parse_unverified_message(BASE, BASE + "d1/heartbeat", json.dumps(hb).encode(), pinned={})
    assert obs == DeployStateSeen("d1", "probation", "r", 4, None, 99.5, "heartbeat")
    ev = {"kind": "deploy-rolled-back", "rollout": "r", "version": 4, "reason": "crash", "time": 1}
    obs = parse_unverified_message(BASE, BASE + "d1/events", json.dumps(ev).encode(), pinned={})
    assert obs == DeployStateSeen("d1", "rolled-back", "r", 4, "crash", None, "event")


# ------------------------------------------------------------------------------------- the engine
class FakeTransport:
    """Scripted devices: ``react(device, name, nonce)`` returns what each command leads to."""

    def __init__(self, clock: list[float], react: Callable[[str, str, str], list[Observation]]) -> None:
        self.clock = clock
        self.react = react
        self.sent: list[tuple[str, str]] = []
        self.pending: list[Observation] = []
        self.progress: list[Mapping[str, object]] = []
        self.published = self.removed = 0

    def publish_bundle(self, data: bytes) -> None:
        self.published += 1

    def remove_bundle(self, sha256: str, size: int) -> None:
        self.removed += 1

    def send(self, device: str, name: str, args: Mapping[str, str]) -> str:
        nonce = f"{len(self.sent):032x}"
        self.sent.append((device, name))
        self.pending += self.react(device, name, nonce)
        return nonce

    def poll(self, timeout: float) -> list[Observation]:
        self.clock[0] += timeout
        out, self.pending = self.pending, []
        return out

    def publish_progress(self, rollout_id: str, doc: Mapping[str, object]) -> None:
        self.progress.append(doc)


def _rollout(devices: list[str], max_failures: int, percents: list[int]) -> Rollout:
    waves = [Wave(index=i, percent=p, devices=ds) for i, (p, ds) in enumerate(plan_waves(devices, percents))]
    return Rollout(id="r", model="m", version=2, sha256="0" * 64, size=1, bundle="/b", group="g",
                   max_failures=max_failures, settings=Settings(probation_s=10, answer_timeout_s=30,
                                                                commit_grace_s=20),
                   started=0.0, waves=waves)


def _ok(device: str, nonce: str, until: float) -> AnswerSeen:
    result = {"state": "probation", "probation_until": until}
    return AnswerSeen(device, nonce, "deploy", True, result, None, None)


def _state(device: str, state: str, reason: str | None = None) -> DeployStateSeen:
    return DeployStateSeen(device, state, "r", 2, reason, None, "heartbeat")


def test_engine_halts_past_max_failures_and_rolls_back_only_the_current_wave(tmp_path: Path) -> None:
    clock = [1000.0]
    bad = {"d01", "d02"}

    def react(device: str, name: str, nonce: str) -> list[Observation]:
        if name == "rollback":
            return [AnswerSeen(device, nonce, "rollback", True, {"state": "rolled-back"}, None, None)]
        if device in bad:
            return [_ok(device, nonce, clock[0] + 10), _state(device, "rolled-back", "crash")]
        return [_ok(device, nonce, clock[0] + 10), _state(device, "committed")]

    t = FakeTransport(clock, react)
    devices = [f"d{i:02d}" for i in range(10)]
    r = RolloutEngine(_rollout(devices, 1, [10, 50, 100]), root=tmp_path, transport=t, bundle=lambda: b"x",
                      now=lambda: clock[0]).run()
    assert r.state == "halted" and r.failures == 2
    assert [w.state for w in r.waves] == ["passed", "failed", "pending"]
    assert r.waves[1].failed == {"d01": "rolled-back: crash", "d02": "rolled-back: crash"}
    rollbacks = sorted(d for d, n in t.sent if n == "rollback")
    assert rollbacks == ["d01", "d02", "d03", "d04"]  # the current wave only; d00 (canary) keeps it
    assert sorted(r.waves[1].rolled_back) == ["d01", "d02", "d03", "d04"]
    assert not any(d in ("d05", "d06", "d07", "d08", "d09") for d, _ in t.sent)
    assert t.published == 1 and t.removed == 1
    saved = Rollout.load(tmp_path, "r")
    assert saved.state == "halted" and saved.waves[1].failed == r.waves[1].failed


def test_silent_devices_and_missing_commits_fail_by_their_deadlines(tmp_path: Path) -> None:
    clock = [1000.0]

    def react(device: str, name: str, nonce: str) -> list[Observation]:
        if device == "d0":
            return []  # never answers
        return [_ok(device, nonce, clock[0] + 10)]  # answers, never commits

    t = FakeTransport(clock, react)
    r = RolloutEngine(_rollout(["d0", "d1"], 5, [100]), root=tmp_path, transport=t, bundle=lambda: b"x",
                      now=lambda: clock[0]).run()
    assert r.state == "done" and r.failures == 2  # within --max-failures: the rollout goes on
    assert r.waves[0].failed == {
        "d0": "no answer within 30 s",
        "d1": "no commit within 20 s after its probation",
    }


def test_resume_follows_devices_that_took_the_deploy_and_asks_only_those_that_did_not(tmp_path: Path) -> None:
    clock = [1000.0]
    r = _rollout(["a", "b", "c"], 0, [100])
    w = r.waves[0]
    w.state = "deploying"
    w.sent = {"a": 990.0, "b": 990.0, "c": 990.0}
    w.nonces = {"a": "1" * 32, "b": "2" * 32, "c": "3" * 32}
    heartbeats: list[Observation] = [
        _state("a", "probation"),  # took it: followed
        DeployStateSeen("b", "idle", None, 1, None, None, "heartbeat"),  # never got it: asked again
        _state("c", "committed"),
    ]

    def react(device: str, name: str, nonce: str) -> list[Observation]:
        assert (device, name) == ("b", "deploy")
        return [_ok(device, nonce, clock[0] + 10), _state(device, "committed")]

    t = FakeTransport(clock, react)
    t.pending = [*heartbeats, _state("a", "committed")]
    out = RolloutEngine(r, root=tmp_path, transport=t, bundle=lambda: b"x", now=lambda: clock[0]).run()
    assert out.state == "done" and sorted(out.waves[0].ok) == ["a", "b", "c"]
    assert t.sent == [("b", "deploy")]


def test_refusals_fail_and_a_busy_refusal_waits_for_the_devices_state(tmp_path: Path) -> None:
    clock = [1000.0]

    def react(device: str, name: str, nonce: str) -> list[Observation]:
        if device == "x":
            why = "not signed by the publisher"
            return [AnswerSeen(device, nonce, "deploy", False, {}, "signature", why)]
        return [AnswerSeen(device, nonce, "deploy", False, {}, "deploy busy", "probation"),
                _state(device, "committed")]

    t = FakeTransport(clock, react)
    r = RolloutEngine(_rollout(["x", "y"], 3, [100]), root=tmp_path, transport=t, bundle=lambda: b"x",
                      now=lambda: clock[0]).run()
    assert r.waves[0].failed == {"x": "refused: signature: not signed by the publisher"}
    assert r.waves[0].ok == ["y"]


def test_resumed_after_dying_before_any_command_asks_each_device_once_heard_from(tmp_path: Path) -> None:
    clock = [1000.0]
    r = _rollout(["a", "b"], 1, [100])
    r.waves[0].state = "deploying"  # saved, then the process died before sending anything

    def react(device: str, name: str, nonce: str) -> list[Observation]:
        return [_ok(device, nonce, clock[0] + 10), _state(device, "committed")]

    t = FakeTransport(clock, react)
    t.pending = [DeployStateSeen("a", "idle", None, 1, None, None, "heartbeat")]  # b is never heard from
    out = RolloutEngine(r, root=tmp_path, transport=t, bundle=lambda: b"x", now=lambda: clock[0]).run()
    assert t.sent == [("a", "deploy")]
    assert out.waves[0].ok == ["a"] and out.waves[0].failed == {"b": "no answer within 30 s"}
