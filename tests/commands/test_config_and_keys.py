"""The [commands] config keys, device.groups / device.signing_key, `keygen operator`, and the answer key
fallback: clear one-line errors and private files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard.cli import main
from edgeguard.errors import ConfigError, KeyFileError
from edgeguard.keys import load_signing_key, load_verify_key, public_key_id
from edgeguard.service._command_wiring import answer_key
from edgeguard.service.config import ServiceConfig, parse_config

BASE = {
    "device": {"id": "dev-1", "fleet": "plant", "state_dir": "state"},
    "model": {"bundle": "m.egm", "trust": ["p.pub"], "device_key": "d.key"},
}


def cfg(tmp_path: Path, **sections: dict[str, object]) -> ServiceConfig:
    doc: dict[str, dict[str, object]] = {k: dict(v) for k, v in BASE.items()}
    for name, table in sections.items():
        doc[name] = {**doc.get(name, {}), **table}
    return parse_config(doc, path=tmp_path / "edgeguard.toml")


def test_defaults_and_paths(tmp_path: Path) -> None:
    c = cfg(tmp_path, commands={"enabled": True, "operator_keys": ["ops/operator.pub"]},
            device={"groups": ["line-2", "north"]})
    assert c.commands.operator_keys == (tmp_path / "ops/operator.pub",)
    assert c.commands.max_bytes == 65536 and c.commands.max_clock_skew_s == 300
    assert c.device.groups == ("line-2", "north")
    assert c.device.signing_key_path == tmp_path / "state/device-sign.key"
    assert cfg(tmp_path).commands.enabled is False


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"commands": {"enabled": True}}, "commands.operator_keys: needs at least one operator key"),
        ({"commands": {"max_bytes": 10}}, "commands.max_bytes: must be 256..1048576"),
        ({"commands": {"enabled": True, "operator_keys": ["o.pub"], "max_bytes": 300000}},
         "exceeds link.inbound_max_bytes"),
        ({"commands": {"max_clock_skew_s": -1}}, "commands.max_clock_skew_s"),
        ({"commands": {"operator_key": ["o.pub"]}}, "commands.operator_key: unknown key"),
        ({"device": {"groups": ["bad group"]}}, "device.groups"),
        ({"device": {"groups": "line-2"}}, "device.groups"),
    ],
)
def test_bad_keys_name_the_key(tmp_path: Path, sections: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(tmp_path, **sections)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_keygen_operator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "operator", "--out", str(tmp_path / "ops")]) == 0
    key = tmp_path / "ops/operator.key"
    assert key.stat().st_mode & 0o777 == 0o600
    kid = public_key_id(load_verify_key(tmp_path / "ops/operator.pub"))
    assert kid in capsys.readouterr().out
    assert public_key_id(load_signing_key(key).public_key()) == kid
    assert main(["keygen", "operator", "--out", str(tmp_path / "ops")]) == 2  # never overwritten


def test_answer_key_fallback_is_made_once_and_private(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    (tmp_path / "state").mkdir()
    first = answer_key(c)
    path = tmp_path / "state/device-sign.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_verify_key(tmp_path / "state/device-sign.pub", "device-sign") == first.public_key()
    assert answer_key(c).public_key() == first.public_key()
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="too open"):
        answer_key(c)


def test_a_configured_answer_key_that_is_missing_is_an_error(tmp_path: Path) -> None:
    c = cfg(tmp_path, device={"signing_key": "keys/device-sign.key"})
    with pytest.raises(KeyFileError):
        answer_key(c)
    assert not (tmp_path / "keys").exists()  # nothing generated in its place


def test_fleet_send_refuses_a_bad_target_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "operator", "--out", str(tmp_path / "ops")]) == 0
    code = main(["fleet", "send", "ping", "--to", "group:", "--sign-key", str(tmp_path / "ops/operator.key"),
                 "--fleet", "f", "--broker", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgeguard: --to: target 'group:'") and err.count("\n") == 1, err
