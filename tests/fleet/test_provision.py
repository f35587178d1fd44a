"""Fleet provisioning through the real CLI on real files: init, add-device(s), enroll/sign-device, provision,
revoke, seal. The broker side (mosquitto with the generated configuration) is in test_provision_broker.py."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import pytest

from edgeguard.keys import load_device_key, load_recipient_key
from tests.fleet._fleet import cli, make_fleet, ok
from tests.service._env import tiny_onnx

PRIVATE = ("ca/ca.key", "keys/publisher.key", "keys/operator.key", "broker/server.key")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _inventory(fleet: Path) -> dict:
    return json.loads((fleet / "inventory.json").read_text())


def test_init_writes_private_keys_0600_prints_no_secret_and_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    code, out, err = cli(
        "fleet",
        "init",
        fleet,
        "--broker",
        "broker.example.net",
        "--broker",
        "10.0.0.5:8884",
        "--group",
        "line-1",
    )
    assert code == 0, err
    for rel in PRIVATE:
        assert _mode(fleet / rel) == 0o600, rel
        assert (fleet / rel).read_text().split("\n")[1] not in out  # no line of a private key is printed
    assert "PRIVATE" not in out + err
    toml = (fleet / "fleet.toml").read_text()
    assert 'name = "fleet"' in toml and '"broker.example.net:8883", "10.0.0.5:8884"' in toml
    assert 'topic_prefix = "edgeguard/v1/fleet"' in toml and '"line-1"' in toml
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((fleet / "broker/server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example.net"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]

    code, _, err = cli("fleet", "init", fleet, "--broker", "broker.example.net")
    assert code == 2 and "not empty" in err and err.count("\n") == 1
    before = (fleet / "keys/publisher.key").read_bytes()
    ok("fleet", "init", fleet, "--broker", "broker.example.net", "--force")
    assert (fleet / "keys/publisher.key").read_bytes() == before  # --force keeps the keys


def test_add_device_is_idempotent_and_rotate_issues_new_keys_and_revokes_the_old_certificate(
    tmp_path: Path,
) -> None:
    fleet = tmp_path / "fleet"
    make_fleet(fleet)
    ok("fleet", "add-device", "-f", fleet, "cam-1", "--group", "line-1")
    first = _inventory(fleet)["devices"]["cam-1"]
    key1 = (fleet / "devices/cam-1/device.key").read_bytes()
    assert first["state"] == "active" and first["groups"] == ["line-1"] and first["enrolled"] == "fleet"
    assert _mode(fleet / "archives/cam-1.egp") == 0o600
    for name in ("device.key", "device-sign.key", "client.key", "api-tokens", "edgeguard.toml"):
        assert _mode(fleet / "devices/cam-1" / name) == 0o600, name

    ok("fleet", "add-device", "-f", fleet, "cam-1")  # again: same keys, same certificate, groups kept
    again = _inventory(fleet)["devices"]["cam-1"]
    assert again == first
    assert (fleet / "devices/cam-1/device.key").read_bytes() == key1

    ok("fleet", "add-device", "-f", fleet, "cam-1", "--rotate")
    inv = _inventory(fleet)
    rotated = inv["devices"]["cam-1"]
    assert rotated["bundle_key_id"] != first["bundle_key_id"]
    assert rotated["signing_key_id"] != first["signing_key_id"]
    assert rotated["cert_serial"] != first["cert_serial"]
    # In a group, it also had a site certificate (CN site:cam-1): both old ones are revoked.
    assert rotated["site_cert_serial"] not in (None, first["site_cert_serial"])
    old = [first["cert_serial"], first["site_cert_serial"]]
    assert [r["serial"] for r in inv["revoked_certs"]] == old
    from cryptography import x509

    crl = x509.load_pem_x509_crl((fleet / "ca/crl.pem").read_bytes())
    for serial in old:
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(rotated["cert_serial"], 16)) is None


def test_provision_installs_the_archive_and_rerunning_changes_nothing(tmp_path: Path) -> None:
    fleet, root = tmp_path / "fleet", tmp_path / "board"
    kid = make_fleet(fleet)
    ok("fleet", "add-device", "-f", fleet, "cam-1")
    out = ok("provision", fleet / "archives/cam-1.egp", "--root", root, "--fleet-key-id", kid)
    assert "11 file(s) written" in out
    etc = root / "etc/edgeguard"
    assert _mode(root / "var/lib/edgeguard") == 0o700
    for name in ("device.key", "device-sign.key", "client.key", "api-tokens", "edgeguard.toml"):
        assert _mode(etc / name) == 0o600, name
    assert (etc / "device.key").read_bytes() == (fleet / "devices/cam-1/device.key").read_bytes()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in etc.iterdir()}

    # Re-provisioning: the fleet key is now the installed one (no flag), and nothing is rewritten.
    ok("fleet", "add-device", "-f", fleet, "cam-1")  # a fresh archive of the same device
    out = ok("provision", fleet / "archives/cam-1.egp", "--root", root)
    assert "nothing changed" in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in etc.iterdir()} == before

    # A board provisioned as cam-1 is not silently turned into cam-2.
    ok("fleet", "add-device", "-f", fleet, "cam-2")
    code, _, err = cli("provision", fleet / "archives/cam-2.egp", "--root", root)
    assert code == 2 and "provisioned as cam-1" in err and "--replace" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in etc.iterdir()} == before

    # The installed config is one the service accepts, pointing at the installed files.
    from edgeguard.service.config import load_config

    cfg = load_config(etc / "edgeguard.toml")
    assert cfg.device.id == "cam-1" and cfg.device.fleet == "plant"
    assert cfg.device.state_dir.resolve() == (root / "var/lib/edgeguard").resolve()
    assert (
        cfg.link.client_cert is not None and cfg.link.client_cert.resolve() == (etc / "client.pem").resolve()
    )
    assert [p.resolve() for p in cfg.model.trust] == [(etc / "publisher.pub").resolve()]


def _tamper(archive: Path, out: Path) -> None:
    doc = json.loads(archive.read_bytes())
    body = json.loads(base64.b64decode(doc["body"]))
    body["device"] = "cam-2"  # the fleet signed cam-1's archive
    doc["body"] = base64.b64encode(json.dumps(body, sort_keys=True).encode()).decode()
    out.write_text(json.dumps(doc))


def test_a_tampered_or_foreign_archive_is_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    fleet, other, root = tmp_path / "fleet", tmp_path / "other", tmp_path / "board"
    kid = make_fleet(fleet)
    make_fleet(other)
    ok("fleet", "add-device", "-f", fleet, "cam-1")
    ok("fleet", "add-device", "-f", other, "cam-1")
    _tamper(fleet / "archives/cam-1.egp", tmp_path / "tampered.egp")
    flipped = bytearray((fleet / "archives/cam-1.egp").read_bytes())
    i = flipped.index(b'"signature": "') + 20
    flipped[i] = ord("A") if flipped[i] != ord("A") else ord("B")
    (tmp_path / "flipped.egp").write_bytes(bytes(flipped))
    (tmp_path / "big.egp").write_bytes(b" " * (1024 * 1024 + 1))
    (tmp_path / "junk.egp").write_bytes(b"\x00\xff not json")

    cases = {
        tmp_path / "tampered.egp": "archive rejected: signature:",
        tmp_path / "flipped.egp": "archive rejected: signature:",
        other / "archives/cam-1.egp": "archive rejected: untrusted signer:",
        tmp_path / "big.egp": "archive rejected: too large:",
        tmp_path / "junk.egp": "archive rejected: malformed:",
    }
    for archive, reason in cases.items():
        code, _out, err = cli("provision", archive, "--root", root, "--fleet-key-id", kid)
        assert code == 3, (archive, err)
        assert err.startswith(f"edgeguard: {reason}") and err.count("\n") == 1, err
        assert not root.exists(), archive  # refused before anything was written
    code, _, err = cli("provision", fleet / "archives/cam-1.egp", "--root", root)
    assert code == 2 and "--fleet-key-id" in err  # no pinned key: refused, never trust on first use


def test_enrolled_device_keeps_its_private_keys_and_gets_a_sealed_archive(tmp_path: Path) -> None:
    fleet, enr, root = tmp_path / "fleet", tmp_path / "enroll", tmp_path / "board"
    kid = make_fleet(fleet)
    ok("enroll", "--id", "cam-7", "--out", enr, "--fleet-key-id", kid)
    keys = {n: (enr / n).read_bytes() for n in ("device.key", "device-sign.key", "client.key")}
    ok("enroll", "--id", "cam-7", "--out", enr)  # again: the same keys
    assert {n: (enr / n).read_bytes() for n in keys} == keys
    ok("fleet", "sign-device", "-f", fleet, enr / "device.csr", "--group", "line-2")
    archive = (fleet / "archives/cam-7.egp").read_bytes()
    assert b"PRIVATE" not in archive and b"api-tokens" not in archive  # sealed: not even the file names
    for name in keys:
        assert not (fleet / "devices/cam-7" / name).exists()
    rec = _inventory(fleet)["devices"]["cam-7"]
    assert rec["enrolled"] == "device" and rec["groups"] == ["line-2"]
    assert rec["bundle_key_id"] == load_device_key(enr / "device.key").key_id

    # Without the enrolled keys the sealed archive cannot be opened.
    code, _, err = cli("provision", fleet / "archives/cam-7.egp", "--root", root, "--fleet-key-id", kid)
    assert code == 3 and "archive rejected: not a recipient:" in err
    # Another device's enrolment cannot open it either.
    ok("enroll", "--id", "cam-7", "--out", tmp_path / "impostor", "--fleet-key-id", kid)
    code, _, err = cli(
        "provision", fleet / "archives/cam-7.egp", "--root", root, "--keys", tmp_path / "impostor"
    )
    assert code == 3 and "not a recipient" in err
    assert not root.exists()

    ok(
        "provision", fleet / "archives/cam-7.egp", "--root", root, "--keys", enr
    )  # fleet key id pinned at enroll
    for name, data in keys.items():
        assert (root / "etc/edgeguard" / name).read_bytes() == data
    # A CSR edited after the device signed it is refused.
    csr = (enr / "device.csr").read_text().splitlines()
    csr[3] = csr[3][:10] + ("A" if csr[3][10] != "A" else "B") + csr[3][11:]
    (tmp_path / "edited.csr").write_text("\n".join(csr) + "\n")
    code, _, err = cli("fleet", "sign-device", "-f", fleet, tmp_path / "edited.csr", "--rotate")
    assert code == 2 and ("CSR" in err) and err.count("\n") == 1


def test_seal_to_a_group_opens_on_its_devices_only_and_revoked_devices_are_left_out(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    make_fleet(fleet, groups=("line-1", "line-2"))
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx())
    ok("fleet", "add-device", "-f", fleet, "a1", "a2", "--group", "line-1")
    ok("fleet", "add-device", "-f", fleet, "b1", "--group", "line-2")
    out = ok(
        "fleet",
        "seal",
        "-f",
        fleet,
        model,
        "--name",
        "sensor",
        "--version",
        "1",
        "--to",
        "line-1",
        "-o",
        tmp_path / "s1.egm",
    )
    assert "for 2 device(s) (a1, a2)" in out

    def verify(bundle: str, device: str) -> tuple[int, str]:
        code, _, err = cli(
            "verify",
            tmp_path / bundle,
            "--trust",
            fleet / "keys/publisher.pub",
            "--device-key",
            fleet / "devices" / device / "device.key",
        )
        return code, err

    assert verify("s1.egm", "a1") == (0, "") and verify("s1.egm", "a2") == (0, "")
    code, err = verify("s1.egm", "b1")
    assert code == 3 and "bundle rejected: not a recipient" in err

    ok("fleet", "revoke-device", "-f", fleet, "a2")
    assert _inventory(fleet)["devices"]["a2"]["state"] == "revoked"
    out = ok(
        "fleet",
        "seal",
        "-f",
        fleet,
        model,
        "--name",
        "sensor",
        "--version",
        "2",
        "--to",
        "all",
        "-o",
        tmp_path / "s2.egm",
    )
    assert "for 2 device(s) (a1, b1)" in out
    assert verify("s2.egm", "b1")[0] == 0 and verify("s2.egm", "a2")[0] == 3
    code, _, err = cli(
        "fleet",
        "seal",
        "-f",
        fleet,
        model,
        "--name",
        "sensor",
        "--version",
        "3",
        "--to",
        "a2",
        "-o",
        tmp_path / "s3.egm",
    )
    assert code == 2 and "a2 is revoked" in err and not (tmp_path / "s3.egm").exists()
    code, _, err = cli(
        "fleet",
        "seal",
        "-f",
        fleet,
        model,
        "--name",
        "sensor",
        "--version",
        "3",
        "--to",
        "nope",
        "-o",
        tmp_path / "s3.egm",
    )
    assert code == 2 and "no device and no group" in err
    # A revoked device is not re-issued by accident.
    code, _, err = cli("fleet", "add-device", "-f", fleet, "a2")
    assert code == 2 and "revoked" in err


@pytest.mark.slow
def test_add_devices_from_csv_provisions_100_devices(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    make_fleet(fleet)
    rows = ["id,groups"] + [f"dev-{i:03d},{'even' if i % 2 == 0 else 'odd'};all-cams" for i in range(100)]
    (tmp_path / "devices.csv").write_text("\n".join(rows) + "\n")
    t0 = time.perf_counter()
    out = ok("fleet", "add-devices", "-f", fleet, tmp_path / "devices.csv")
    elapsed = time.perf_counter() - t0
    print(f"\nprovisioned 100 devices in {elapsed:.2f} s ({elapsed * 10:.1f} ms per device)")
    assert out.strip().count("\n") == 0 and "provisioned 100 device(s)" in out  # piped: one summary line
    inv = _inventory(fleet)["devices"]
    assert len(inv) == 100 and inv["dev-007"]["groups"] == ["odd", "all-cams"]
    assert len({d["cert_serial"] for d in inv.values()}) == 100
    assert len(list((fleet / "archives").iterdir())) == 100
    assert load_recipient_key(fleet / "devices/dev-042/device.pub").key_id == inv["dev-042"]["bundle_key_id"]


def test_the_device_config_carries_groups_signing_key_and_commands_when_the_runtime_knows_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Until the signed-commands config keys exist, they are left out (the loader would refuse them); once
    they do, the one template writes them. Rendered both ways here, the second with the check patched."""
    import sys

    from edgeguard.fleet.provision import _template

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    args = dict(device_id="cam-1", fleet="plant", groups=("line-1", "night"), broker_host="10.0.0.5",
                broker_port=8883, api_port=8780)  # fmt: skip
    known = _template.optional_keys()
    doc = tomllib.loads(_template.render_device_config(**args))
    assert ("groups" in doc["device"]) == known[0] and ("commands" in doc) == known[2]
    assert doc["link"] == {"host": "10.0.0.5", "port": 8883, "ca_file": "fleet-ca.pem",
                           "client_cert": "client.pem", "client_key": "client.key"}  # fmt: skip

    monkeypatch.setattr(_template, "optional_keys", lambda: (True, True, True))
    monkeypatch.setattr("edgeguard.service.config.parse_config", lambda doc, path: None)
    doc = tomllib.loads(_template.render_device_config(**args))
    assert doc["device"]["groups"] == ["line-1", "night"]
    assert doc["device"]["signing_key"] == "device-sign.key"
    assert doc["commands"] == {"enabled": True, "operator_keys": ["operator.pub"]}


def test_devices_csv_header_comments_and_bad_rows(tmp_path: Path) -> None:
    from edgeguard.fleet.provision import read_devices_csv

    csv = tmp_path / "d.csv"
    csv.write_text("# exported from the asset list\nid,groups\ncam-1,line-1;night\ncam-2\n")
    assert read_devices_csv(csv) == [("cam-1", ("line-1", "night")), ("cam-2", ())]
    fleet = tmp_path / "fleet"
    make_fleet(fleet)
    for text, why in (
        ("cam-1\ncam-1\n", "listed twice"),
        ("cam/1\n", "device id"),
        ("cam-1,all\n", "group"),
    ):
        csv.write_text(text)
        code, _, err = cli("fleet", "add-devices", "-f", fleet, csv)
        assert code == 2 and why in err and err.count("\n") == 1, err
    assert not (fleet / "archives").exists() or not any((fleet / "archives").iterdir())


def test_add_devices_shows_a_progress_bar_on_a_terminal_and_one_line_on_stdout(tmp_path: Path) -> None:
    import os
    import pty
    import subprocess
    import sys

    fleet = tmp_path / "fleet"
    make_fleet(fleet)
    (tmp_path / "d.csv").write_text("".join(f"cam-{i}\n" for i in range(3)))
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgeguard",
                "fleet",
                "add-devices",
                "-f",
                str(fleet),
                str(tmp_path / "d.csv"),
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=120,
            check=False,
        )
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert (
        proc.stdout.decode().strip()
        == f"provisioned 3 device(s) of fleet plant: archives in {fleet / 'archives'}"
    )
    assert b"provisioning" in seen and b"3/3" in seen, seen[-500:]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--broker", "bad host:8883"], "not a host name or IP address"),
        (["--broker", "broker.lan:0"], "port must be 1..65535"),
        (["--broker", "broker.lan", "--name", "a/b"], "fleet name"),
        (["--broker", "broker.lan", "--group", "all"], "group name"),
        (["--broker", "broker.lan", "--api-port", "70000"], "device_api_port"),
    ],
)
def test_bad_init_options_are_one_line_errors_and_write_nothing(
    tmp_path: Path, args: list[str], why: str
) -> None:
    code, out, err = cli("fleet", "init", tmp_path / "f", *args)
    assert code == 2 and why in err and err.count("\n") == 1 and out == "", err
    assert not (tmp_path / "f").exists()


def test_a_damaged_fleet_directory_is_a_one_line_error(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    make_fleet(fleet)
    (fleet / "inventory.json").write_text('{"fleet": "plant", "devices": {"x": {}}}')
    code, _, err = cli("fleet", "add-device", "-f", fleet, "cam-1")
    assert code == 2 and "inventory" in err and "damaged" in err and err.count("\n") == 1, err
    code, _, err = cli("fleet", "devices", "-f", tmp_path)
    assert code == 2 and "not a fleet directory" in err
    (fleet / "fleet.toml").write_text('name = "plant"\nbrokers = ["b:1"]\ntopic_prefix = "other/v1/plant"\n')
    code, _, err = cli("fleet", "devices", "-f", fleet)
    assert code == 2 and "topic_prefix must be" in err


def test_the_device_side_never_imports_the_fleet_package() -> None:
    """`edgeguard run` builds the whole parser; the operator package must stay off the board's process."""
    import subprocess
    import sys

    code = (
        "import sys, edgeguard.cli, edgeguard.service, edgeguard.provisioning\n"
        "edgeguard.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.startswith('edgeguard.fleet'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_broker_config_signs_a_fresh_crl_each_run(tmp_path: Path) -> None:
    from cryptography import x509

    fleet = tmp_path / "fleet"
    make_fleet(fleet)
    ok("fleet", "broker-config", "-f", fleet, "-o", tmp_path / "b", "--user", "root")
    first = x509.load_pem_x509_crl((tmp_path / "b/crl.pem").read_bytes())
    ok("fleet", "broker-config", "-f", fleet, "-o", tmp_path / "b", "--user", "root")
    second = x509.load_pem_x509_crl((tmp_path / "b/crl.pem").read_bytes())
    assert second.signature != first.signature  # re-signed (ECDSA signatures differ each time)
    assert second.next_update_utc is not None and second.next_update_utc >= first.next_update_utc
