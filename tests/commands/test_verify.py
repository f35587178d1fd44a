"""The command gatekeeper with a controlled clock: every check, in order, on real keys and a real nonce store
(SQLite in a temp dir); table-driven bad inputs and a mutate-one-byte property test."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeguard.commands import (
    COMMAND_LABEL,
    MAX_VALIDITY_S,
    CommandGate,
    NonceStore,
    canonical,
    envelope,
    parse_unverified_nonce,
)
from edgeguard.errors import CommandRefused
from edgeguard.keys import TrustStore, public_key_id

NOW = 1_800_000_000
OPERATOR = Ed25519PrivateKey.generate()
REVOKED = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()


def payload(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "fleet": "plant",
        "target": {"device": "dev-1"},
        "name": "ping",
        "args": {},
        "issued_at": NOW,
        "expires_at": NOW + 300,
        "nonce": "0123456789abcdef0123456789abcdef",
        "key_id": public_key_id(OPERATOR.public_key()),
    }
    doc.update(over)
    return doc


def signed(doc: dict[str, Any] | None = None, key: Ed25519PrivateKey = OPERATOR) -> bytes:
    doc = doc if doc is not None else payload()
    if doc.get("key_id") == public_key_id(OPERATOR.public_key()):
        doc = {**doc, "key_id": public_key_id(key.public_key())}
    return envelope(doc, key, COMMAND_LABEL)


def raw_envelope(body: bytes, key: Ed25519PrivateKey = OPERATOR, **over: Any) -> bytes:
    env = {
        "v": 1,
        "key_id": public_key_id(key.public_key()),
        "payload": base64.b64encode(body).decode(),
        "sig": base64.b64encode(key.sign(COMMAND_LABEL + body)).decode(),
    }
    env.update(over)
    return json.dumps(env).encode()


@pytest.fixture
def gate(tmp_path: Path) -> CommandGate:
    trust = TrustStore(
        [OPERATOR.public_key(), REVOKED.public_key()], revoked=[public_key_id(REVOKED.public_key())]
    )
    return CommandGate(
        operators=trust,
        nonces=NonceStore(tmp_path / "nonces.sqlite", capacity=4),
        fleet="plant",
        device_id="dev-1",
        groups=frozenset({"line-2"}),
        max_bytes=4096,
        max_clock_skew_s=60,
    )


def refused(gate: CommandGate, data: bytes, now: float = NOW) -> str:
    with pytest.raises(CommandRefused) as info:
        gate.check(data, now=now)
    assert "\n" not in str(info.value)
    return info.value.check


def test_valid_command_for_device_group_and_fleet(gate: CommandGate) -> None:
    for i, target in enumerate(({"device": "dev-1"}, {"group": "line-2"}, {"fleet": "plant"})):
        cmd = gate.check(signed(payload(target=target, nonce=f"{i:032x}", args={"level": "DEBUG"})), now=NOW)
        assert cmd.name == "ping" and cmd.args == {"level": "DEBUG"}
        assert cmd.target == next(iter(target.items()))
        assert cmd.key_id == public_key_id(OPERATOR.public_key())


def _bad_cases() -> list[tuple[str, Callable[[], bytes], str, float]]:
    """(id, message, expected check, device time)."""
    other_nonce = "f" * 32
    return [
        ("oversize", lambda: b"{" + b" " * 5000 + b"}", "too large", NOW),
        ("not json", lambda: b"\xff\xfe garbage", "malformed", NOW),
        ("json array", lambda: b"[1, 2]", "malformed", NOW),
        ("missing sig", lambda: json.dumps({"v": 1, "key_id": "0" * 16, "payload": ""}).encode(), "malformed",
         NOW),
        ("extra key", lambda: raw_envelope(canonical(payload()), extra="x"), "malformed", NOW),
        ("envelope v2", lambda: raw_envelope(canonical(payload()), v=2), "malformed", NOW),
        ("bad key id", lambda: raw_envelope(canonical(payload()), key_id="XYZ"), "malformed", NOW),
        ("payload not b64", lambda: raw_envelope(canonical(payload()), payload="***"), "malformed", NOW),
        ("short sig", lambda: raw_envelope(canonical(payload()), sig="AAAA"), "malformed", NOW),
        ("unknown signer", lambda: signed(key=STRANGER), "untrusted signer", NOW),
        ("revoked signer", lambda: signed(key=REVOKED), "revoked", NOW),
        ("forged signature", lambda: raw_envelope(
            canonical(payload()), sig=base64.b64encode(bytes(64)).decode()), "signature", NOW),
        ("payload swapped after signing", lambda: raw_envelope(
            canonical(payload()), sig=json.loads(signed(payload(name="restart")))["sig"]), "signature", NOW),
        ("not canonical", lambda: raw_envelope(json.dumps(payload()).encode()), "malformed", NOW),
        ("float time", lambda: raw_envelope(canonical(payload()).replace(
            str(NOW + 300).encode(), str(NOW + 300).encode() + b".5")), "malformed", NOW),
        ("unknown payload key", lambda: signed({**payload(), "extra": 1}), "malformed", NOW),
        ("payload key id differs", lambda: raw_envelope(canonical(payload(key_id="0" * 16))), "malformed",
         NOW),
        ("bad name", lambda: signed(payload(name="Ping!")), "malformed", NOW),
        ("bad nonce", lambda: signed(payload(nonce="abc")), "malformed", NOW),
        ("two targets", lambda: signed(payload(target={"device": "dev-1", "group": "x"})), "malformed", NOW),
        ("numeric arg", lambda: signed(payload(args={"level": 3})), "malformed", NOW),
        ("other fleet", lambda: signed(payload(fleet="other", target={"fleet": "other"})), "fleet", NOW),
        ("other device", lambda: signed(payload(target={"device": "dev-2"})), "target", NOW),
        ("other group", lambda: signed(payload(target={"group": "line-3"})), "target", NOW),
        ("fleet target of other fleet", lambda: signed(payload(target={"fleet": "x"})), "target", NOW),
        ("expired", lambda: signed(), "expired", NOW + 300 + 61),
        ("issued in the future", lambda: signed(), "not yet valid", NOW - 61),
        ("expires before issued", lambda: signed(payload(expires_at=NOW)), "malformed", NOW),
        ("validity too long", lambda: signed(payload(expires_at=NOW + MAX_VALIDITY_S + 1)), "malformed", NOW),
        ("negative time", lambda: signed(payload(issued_at=-5)), "malformed", NOW),
        ("bool version", lambda: signed(payload(v=True, nonce=other_nonce)), "malformed", NOW),
    ]


@pytest.mark.parametrize(
    ("data", "check", "now"), [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()]
)
def test_bad_commands_are_refused_with_their_check(
    gate: CommandGate, data: Callable[[], bytes], check: str, now: float
) -> None:
    assert refused(gate, data(), now) == check
    assert len(gate.nonces) == 0  # nothing refused before the replay check leaves a nonce behind


def test_skew_tolerance_is_inclusive(gate: CommandGate) -> None:
    gate.check(signed(payload(nonce="1" * 32)), now=NOW + 300 + 60)  # at expiry + skew: still valid
    gate.check(signed(payload(nonce="2" * 32)), now=NOW - 60)  # issued up to skew ahead of the device


def test_replay_is_refused_and_survives_a_new_store(gate: CommandGate, tmp_path: Path) -> None:
    data = signed()
    gate.check(data, now=NOW)
    assert refused(gate, data, NOW + 1) == "replayed"
    gate.nonces.close()
    gate.nonces = NonceStore(tmp_path / "nonces.sqlite", capacity=4)  # a restart: the same file
    assert refused(gate, data, NOW + 2) == "replayed"


def test_nonce_kept_until_expiry_plus_skew_then_forgotten(gate: CommandGate) -> None:
    gate.check(signed(), now=NOW)
    gate.check(signed(payload(nonce="9" * 32, issued_at=NOW + 400, expires_at=NOW + 700)), now=NOW + 400)
    assert len(gate.nonces) == 1  # the first one (kept until NOW + 360) was pruned


def test_full_store_refuses_rather_than_forgetting(gate: CommandGate) -> None:
    for i in range(4):
        gate.check(signed(payload(nonce=f"{i:032x}")), now=NOW)
    assert refused(gate, signed(payload(nonce="a" * 32)), NOW) == "nonce store full"
    assert refused(gate, signed(payload(nonce=f"{0:032x}")), NOW) == "replayed"  # still remembered
    # once they expire there is room again
    late = payload(nonce="b" * 32, issued_at=NOW + 400, expires_at=NOW + 500)
    assert gate.check(signed(late), now=NOW + 400).nonce == "b" * 32


def test_unverified_nonce_only_when_well_formed() -> None:
    assert parse_unverified_nonce(signed(), 4096) == "0123456789abcdef0123456789abcdef"
    assert parse_unverified_nonce(signed(payload(nonce="<script>")), 4096) is None
    assert parse_unverified_nonce(b"garbage", 4096) is None
    assert parse_unverified_nonce(signed(), 10) is None


def test_attacker_text_is_cut_in_reasons(gate: CommandGate) -> None:
    with pytest.raises(CommandRefused) as info:
        gate.check(raw_envelope(canonical(payload()), key_id="A" * 3000), now=NOW)
    assert len(str(info.value)) < 300


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_byte_change_is_refused(gate: CommandGate, data: st.DataObject) -> None:
    """Sign, change one byte anywhere, and the command must not pass (the replay check is not what stops it:
    the original was never checked on this store)."""
    good = bytearray(signed(payload(nonce="c" * 32)))
    i = data.draw(st.integers(0, len(good) - 1))
    b = data.draw(st.integers(0, 255).filter(lambda v: v != good[i]))
    good[i] = b
    with pytest.raises(CommandRefused) as info:
        gate.check(bytes(good), now=NOW)
    assert info.value.check != "replayed"


def test_non_canonical_base64_is_refused(gate: CommandGate) -> None:
    """Unused trailing bits: a second spelling of the same signature must not pass (one message, one form)."""
    env = json.loads(signed())
    sig = env["sig"]
    assert sig.endswith("==")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = sig[:-3] + last[last.index(sig[-3]) ^ 1] + "=="
    assert base64.b64decode(twin) == base64.b64decode(sig)
    env["sig"] = twin
    assert refused(gate, json.dumps(env).encode()) == "malformed"
