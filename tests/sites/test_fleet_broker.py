"""Sites on the fleet's own broker (`fleet broker-config`: mutual TLS, the CN is the user name and the client
id, the ACL): a grouped device's site connection has its own certificate (CN ``site:<device>``), so it and
the link no longer take each other's session; the ACL gives the group topics to that identity only."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from edgeguard.sites import GroupClient
from tests.fleet._fleet import TlsClient, cli, make_fleet, ok
from tests.fleet.test_provision_broker import FleetBroker, _reload
from tests.service._env import TINY_META, tiny_onnx
from tests.support.broker import free_port
from tests.support.slowdown import scaled

PREFIX = "edgeguard/v1/plant"
G1, G2 = f"{PREFIX}/group/line-1", f"{PREFIX}/group/line-2"


def _fleet(tmp_path: Path) -> tuple[Path, FleetBroker, str]:
    port = free_port()
    root = tmp_path / "fleet"
    kid = make_fleet(root, broker_port=port, api_port=free_port())
    ok("fleet", "add-device", "-f", root, "dev-a", "dev-b", "--group", "line-1")
    ok("fleet", "add-device", "-f", root, "dev-c", "--group", "line-2")
    for name in ("ops", "watch"):
        ok("fleet", "add-operator", "-f", root, name)
    ok(
        "fleet",
        "broker-config",
        "-f",
        root,
        "-o",
        tmp_path / "broker",
        "--user",
        "root",
        "--bind",
        "127.0.0.1",
    )
    broker = FleetBroker(tmp_path, tmp_path / "broker/mosquitto.conf", port)
    broker.start()
    return root, broker, kid


def _client(root: Path, broker: FleetBroker, who: str, *, site: bool = False) -> TlsClient:
    d = root / (f"operators/{who}" if who in ("ops", "watch") else f"devices/{who}")
    cert = d / ("site.pem" if site else "client.pem")
    return TlsClient(
        "127.0.0.1", broker.port, ca=root / "ca/ca.pem", cert=cert, key=d / "client.key", name=who
    )


def _cn(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_site_certificates_are_issued_to_grouped_devices_idempotently_and_revoked_with_them(
    tmp_path: Path,
) -> None:
    root = tmp_path / "fleet"
    make_fleet(root, broker_port=free_port(), api_port=free_port())
    ok("fleet", "add-device", "-f", root, "dev-a", "--group", "line-1")
    ok("fleet", "add-device", "-f", root, "dev-n")  # in no group: no site certificate, no [site] table
    d = root / "devices/dev-a"
    assert _cn(d / "site.pem") == "site:dev-a" and _cn(d / "client.pem") == "dev-a"
    site_pub = x509.load_pem_x509_certificate((d / "site.pem").read_bytes()).public_key()
    assert site_pub == x509.load_pem_x509_certificate((d / "client.pem").read_bytes()).public_key()
    assert not (root / "devices/dev-n/site.pem").exists()
    toml = (d / "edgeguard.toml").read_text()
    assert 'client_cert = "site.pem"' in toml and 'group = "line-1"' in toml
    assert "[site]" not in (root / "devices/dev-n/edgeguard.toml").read_text()
    before = (d / "site.pem").read_bytes()
    inv = json.loads((root / "inventory.json").read_text())
    serial = inv["devices"]["dev-a"]["site_cert_serial"]
    assert serial and inv["devices"]["dev-n"]["site_cert_serial"] is None

    ok("fleet", "add-device", "-f", root, "dev-a")  # again: the same certificate
    assert (d / "site.pem").read_bytes() == before
    assert json.loads((root / "inventory.json").read_text())["devices"]["dev-a"]["site_cert_serial"] == serial

    ok("fleet", "revoke-device", "-f", root, "dev-a")  # both of its certificates go on the CRL
    crl = x509.load_pem_x509_crl((root / "ca/crl.pem").read_bytes())
    revoked = {format(r.serial_number, "x") for r in crl}
    assert serial.lstrip("0") in revoked
    assert inv["devices"]["dev-a"]["cert_serial"].lstrip("0") in revoked

    # Leaving every group revokes the site certificate (the ACL would no longer name it anyway).
    ok("fleet", "add-device", "-f", root, "dev-b", "--group", "line-1")
    b_serial = json.loads((root / "inventory.json").read_text())["devices"]["dev-b"]["site_cert_serial"]
    (tmp_path / "devices.csv").write_text("id,groups\ndev-b,\n")
    ok("fleet", "add-devices", "-f", root, tmp_path / "devices.csv")
    assert not (root / "devices/dev-b/site.pem").exists()
    crl = x509.load_pem_x509_crl((root / "ca/crl.pem").read_bytes())
    assert b_serial.lstrip("0") in {format(r.serial_number, "x") for r in crl}


def test_only_the_site_identity_reads_its_own_groups_input_and_writes_its_own_member_status(
    tmp_path: Path,
) -> None:
    root, broker, _ = _fleet(tmp_path)
    ops = _client(root, broker, "ops")
    a_link = _client(root, broker, "dev-a")
    a, c = _client(root, broker, "dev-a", site=True), _client(root, broker, "dev-c", site=True)
    clients = (ops, a_link, a, c)
    try:
        assert all(x.wait_connected() for x in clients), broker.log_tail()
        a.subscribe(f"$share/line-1/{G1}/input")
        c.subscribe(f"{G1}/#")  # another group's topics: the broker delivers nothing from there
        a_link.subscribe(f"{G1}/#")  # the link's identity has no group topic
        c.subscribe(f"$share/line-2/{G2}/input")
        ops.subscribe(f"{PREFIX}/group/#")
        for i in range(4):
            ops.publish(f"{G1}/input", b"in-%d" % i)
        assert a.wait_message(f"{G1}/input", b"in-3")
        assert [p for t, p in a.messages if t == f"{G1}/input"] == [b"in-%d" % i for i in range(4)]
        # c joins line-1's share too: mosquitto grants any SUBSCRIBE and checks each delivery against the
        # ACL, so c reads none of line-1's inputs (those the broker picks c for are dropped: docs/sites.md).
        c.subscribe(f"$share/line-1/{G1}/input")
        for i in range(4, 8):
            ops.publish(f"{G1}/input", b"in-%d" % i)
        ops.publish(f"{G2}/input", b"c's")  # the control: c's own group input comes after those
        assert c.wait_message(f"{G2}/input", b"c's")
        assert a.wait_for(lambda m: len([t for t, _ in m if t == f"{G1}/input"]) >= 5)  # its share of them
        # Member status and probe: each its own; the link identity writes nothing of the group.
        a.publish(f"{G1}/member/dev-b", b"forged by a")
        c.publish(f"{G1}/lease/cam-1", b"forged lease")
        a_link.publish(f"{G1}/member/dev-a", b"from the link")
        a.publish(f"{G1}/lease/cam-1", b"a's lease")
        a.publish(f"{G1}/member/dev-a", b"mine")
        assert ops.wait_message(f"{G1}/member/dev-a", b"mine")
        payloads = {p for t, p in ops.messages if t.startswith(G1)}
        assert payloads == {b"in-%d" % i for i in range(8)} | {b"a's lease", b"mine"}
        assert not [t for t, _ in c.messages + a_link.messages if t.startswith(G1)]
        # Two connections with one key, two client ids: neither was closed by the other.
        assert "already connected" not in broker.log_path.read_text()
        assert a_link.connected and a.connected
    finally:
        for x in clients:
            x.close()
    acl = (tmp_path / "broker/acl").read_text()
    assert "user site:dev-a" in acl and "user dev-a\n" not in acl

    ok("fleet", "revoke-device", "-f", root, "dev-a")
    ok(
        "fleet",
        "broker-config",
        "-f",
        root,
        "-o",
        tmp_path / "broker",
        "--user",
        "root",
        "--bind",
        "127.0.0.1",
    )
    _reload(broker)
    a = _client(root, broker, "dev-a", site=True)
    try:
        assert not a.wait_connected(), "a revoked device's site certificate was accepted"
    finally:
        a.close()
    broker.stop()


def _tls(root: Path, who: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root / "ca/ca.pem"))
    ctx.load_cert_chain(str(root / f"operators/{who}/client.pem"), str(root / f"operators/{who}/client.key"))
    return ctx


def _start(root: Path, kid: str, bundle: Path, tmp_path: Path, dev: str) -> subprocess.Popen[bytes]:
    board = tmp_path / dev
    ok("provision", root / f"archives/{dev}.egp", "--root", board, "--fleet-key-id", kid)
    etc = board / "etc/edgeguard"
    shutil.copy(bundle, board / "var/lib/edgeguard/model.egm")
    conf = etc / "edgeguard.toml"
    # The generated [site] table names the group and the site certificate; joining is the operator's call.
    text = conf.read_text().replace("[site]", "[site]\nkeepalive_s = 2\ncheck_s = 0.25", 1)
    text = re.sub(r"(\[sources\.api\][^\[]*?\nport = )\d+", rf"\g<1>{free_port()}", text, count=1)  # one host
    conf.write_text(text.replace("enabled = false", "enabled = true", 1))
    creds = tmp_path / f"credentials-{dev}"
    creds.mkdir(mode=0o700)
    shutil.copy(etc / "device.key", creds / "device-key")
    shutil.copy(etc / "api-tokens", creds / "api-tokens")
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "EDGEGUARD_LOG": "INFO"}
    env.pop("NOTIFY_SOCKET", None)
    log = (tmp_path / f"{dev}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "edgeguard", "run", "-c", str(conf)], env=env, stdout=log, stderr=log
    )


@pytest.mark.slow
def test_two_provisioned_devices_share_group_input_on_the_fleet_broker_and_keep_their_links(
    tmp_path: Path,
) -> None:
    """`edgeguard provision --root` + `edgeguard run` for two members of line-1 (and dev-c of line-2): the
    group's inputs are served by both, each link connects once and is never dropped, dev-c serves none."""
    root, broker, kid = _fleet(tmp_path)
    (tmp_path / "tiny.onnx").write_bytes(tiny_onnx())
    (tmp_path / "meta.json").write_text(json.dumps(TINY_META))
    bundle = tmp_path / "model.egm"
    ok("fleet", "seal", "-f", root, tmp_path / "tiny.onnx", "--name", "sensor", "--version", "1",
       "--to", "all", "--meta", tmp_path / "meta.json", "-o", bundle)  # fmt: skip
    devs = ("dev-a", "dev-b", "dev-c")
    watch = _client(root, broker, "watch")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        assert watch.wait_connected(), broker.log_tail()
        watch.subscribe(f"{PREFIX}/#")
        for d in devs:
            procs[d] = _start(root, kid, bundle, tmp_path, d)

        def joined(d: str, group: str) -> bool:
            def check(msgs: list[tuple[str, bytes]]) -> bool:
                beats = [json.loads(p) for t, p in msgs if t == f"{PREFIX}/{d}/heartbeat"]
                return (
                    bool(beats) and (beats[-1].get("sources", {}).get("group") or {}).get("share") == "joined"
                )

            return watch.wait_for(check, scaled(90))

        for d, g in (("dev-a", "line-1"), ("dev-b", "line-1"), ("dev-c", "line-2")):
            assert joined(d, g), (tmp_path / f"{d}.log").read_text()[-3000:] + broker.log_tail()
        n = 60
        with GroupClient(
            host="127.0.0.1", port=broker.port, fleet="plant", group="line-1", tls=_tls(root, "ops"),
            retry_after_s=scaled(30),
        ) as client:  # fmt: skip
            for i in range(n):
                v = (i % 10) / 10.0
                client.send(f"c-{i}", json.dumps({"inputs": {"x": [[v, v, v, v]]}}).encode())
            assert client.wait_all(scaled(120)), (client.unanswered()[:5], broker.log_tail())
            served = collections.Counter(a.result["served_by"] for a in client.answers.values() if a.result)
        assert set(served) == {"dev-a", "dev-b"} and sum(served.values()) == n, served
    finally:
        watch.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        broker.stop()
    # No kick-off loop: each link connected once and was never dropped, each site connection likewise.
    for d in devs:
        log = (tmp_path / f"{d}.log").read_text()
        assert log.count("link: connected to") == 1, log[-3000:]
        assert "link: disconnected" not in log and "site connection lost" not in log, log[-3000:]
    assert "already connected" not in broker.log_path.read_text()


def test_provision_installs_the_site_certificate_and_refuses_one_for_another_identity(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    kid = make_fleet(root, broker_port=free_port(), api_port=free_port())
    ok("fleet", "add-device", "-f", root, "dev-a", "--group", "line-1")
    ok("provision", root / "archives/dev-a.egp", "--root", tmp_path / "board", "--fleet-key-id", kid)
    etc = tmp_path / "board/etc/edgeguard"
    assert (etc / "site.pem").read_bytes() == (root / "devices/dev-a/site.pem").read_bytes()
    # A (signed) archive whose site.pem is the link's certificate (CN dev-a, not site:dev-a) is refused.
    shutil.copy(root / "devices/dev-a/client.pem", root / "devices/dev-a/site.pem")
    from edgeguard.fleet import provision as fp

    fd = fp.FleetDir.open(root)
    issuer = fp.Issuer(fd, fp.Inventory.load(fd.inventory, fd.config.name))
    issuer.write_archive(issuer.inv.devices["dev-a"])
    board2 = tmp_path / "board2"
    code, _out, err = cli("provision", root / "archives/dev-a.egp", "--root", board2, "--fleet-key-id", kid)
    assert code != 0 and "site.pem is not the site certificate of this device's key" in err, err
    assert not (board2 / "etc/edgeguard/site.pem").exists()
