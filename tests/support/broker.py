"""A real mosquitto for tests: free port, config written by the test, kill -9 and restart on the same port.

Usage (plain broker)::

    from tests.support.broker import MosquittoBroker, Recorder
    with MosquittoBroker(tmp_path) as broker:          # started, accepting connections
        with Recorder(broker, "edgeguard/v1/#") as rec:
            ...
            rec.wait_for(lambda msgs: len(msgs) >= 10)
        broker.kill()                                  # SIGKILL
        broker.start()                                 # same port

TLS / mutual TLS / passwords::

    pki = make_pki(tmp_path / "pki")                   # CA, server and client certs (cryptography.x509)
    MosquittoBroker(tmp_path, tls=pki, require_certificate=True, users={"dev": "pw"})

Pytest fixtures (import them into a test module or a conftest.py to use them): ``mosquitto`` (a started plain
broker), ``broker_factory`` (build custom ones; all stopped at teardown), ``pki`` (session-wide certificates),
``recorder_factory``.

Mosquitto started as root drops privileges to the ``mosquitto`` user unless the config says ``user root``; the
config written here does, and it logs to stderr (captured in ``<dir>/mosquitto.log``), persistence off unless
asked for.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = os.environ.get("EDGEGUARD_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

__all__ = [
    "MOSQUITTO",
    "Pki",
    "make_pki",
    "free_port",
    "MosquittoBroker",
    "Recorder",
    "mosquitto",
    "broker_factory",
    "pki",
    "recorder_factory",
]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports handed out by free_port come from below the kernel's ephemeral range. A port that bind(0) found free
# and released is in that range, and an outgoing connection (a device's MQTT client, say) could take it as its
# local port before the test's server bound it: with 20 device services one did ("address already in use", a
# crash loop). Outside the range only explicit binds compete; each port is handed out once per process, and
# the start is spread by pid so that parallel test processes rarely meet.
_EPHEMERAL_LOW = _ephemeral_low()
_PORTS_LOW = max(1024, _EPHEMERAL_LOW - 12000)
_next_port = _PORTS_LOW + (os.getpid() * 97) % (_EPHEMERAL_LOW - _PORTS_LOW)


def free_port() -> int:
    """A loopback TCP port nobody listens on now, never one this process handed out before."""
    global _next_port
    for _ in range(_EPHEMERAL_LOW - _PORTS_LOW):
        port = _next_port
        _next_port = _PORTS_LOW + (_next_port + 1 - _PORTS_LOW) % (_EPHEMERAL_LOW - _PORTS_LOW)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_PORTS_LOW}..{_EPHEMERAL_LOW - 1}")


# ----------------------------------------------------------------------------------------------------- PKI
@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server cert for 127.0.0.1/localhost, a client cert, and a second ("rogue") CA with
    its own client and server certs that the first CA does not vouch for."""

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    rogue_server_cert: Path
    rogue_server_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # fast to generate, accepted by OpenSSL everywhere


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _cert(
    subject_cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    *,
    ca: bool,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if issuer_key is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """Generate the certificates into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def pem(name: str, cert: x509.Certificate) -> None:
        out[name] = directory / f"{name}.pem"
        out[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def keyfile(name: str, key: ec.EllipticCurvePrivateKey) -> None:
        out[name] = directory / f"{name}.key"
        _write_key(out[name], key)

    for prefix in ("", "rogue_"):
        ca_key = _key()
        ca = _cert(f"EdgeGuard test {prefix}CA", ca_key, None, None, ca=True)
        pem(f"{prefix}ca_cert", ca)
        for role in ("server", "client"):
            k = _key()
            c = _cert(f"{prefix}{role}", k, ca.subject, ca_key, ca=False, server=role == "server")
            pem(f"{prefix}{role}_cert", c)
            keyfile(f"{prefix}{role}_key", k)
    return Pki(
        dir=directory,
        ca_cert=out["ca_cert"],
        server_cert=out["server_cert"],
        server_key=out["server_key"],
        client_cert=out["client_cert"],
        client_key=out["client_key"],
        rogue_ca_cert=out["rogue_ca_cert"],
        rogue_client_cert=out["rogue_client_cert"],
        rogue_client_key=out["rogue_client_key"],
        rogue_server_cert=out["rogue_server_cert"],
        rogue_server_key=out["rogue_server_key"],
    )


# ------------------------------------------------------------------------------------------------ passwords
def _hash_line(user: str, password: str) -> str:
    """mosquitto's `$6$` (salted SHA-512) password line, for machines without mosquitto_passwd."""
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    if MOSQUITTO_PASSWD is not None:
        tmp.write_text("")
        for user, password in users.items():
            subprocess.run(
                [MOSQUITTO_PASSWD, "-H", "sha512", "-b", str(tmp), user, password],
                check=True,
                capture_output=True,
            )
    else:
        tmp.write_text("".join(_hash_line(u, p) + "\n" for u, p in users.items()))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- broker
class MosquittoBroker:
    """One mosquitto process on a fixed free port; ``kill()`` / ``start()`` keep the port."""

    def __init__(
        self,
        directory: Path,
        *,
        tls: Pki | None = None,
        require_certificate: bool = False,
        users: Mapping[str, str] | None = None,
        persistence: bool = False,
        extra_config: str = "",
        port: int | None = None,
        start: bool = True,
    ) -> None:
        self.dir = Path(directory) / f"mosquitto-{id(self):x}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.require_certificate = require_certificate
        self.users: dict[str, str] | None = dict(users) if users is not None else None
        self.persistence = persistence
        self.extra_config = extra_config
        self.conf_path = self.dir / "mosquitto.conf"
        self.passwd_path = self.dir / "passwd"
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        if start:
            self.start()

    # -- config
    def _config(self, users: Mapping[str, str] | None) -> str:
        lines = [
            "user root",  # running as root: do not drop to the `mosquitto` user (it could not write our dir)
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "per_listener_settings false",
            "max_queued_messages 100000",
            f"listener {self.port} {self.host}",
        ]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        if users is not None:
            write_password_file(self.passwd_path, users)
            lines += [f"password_file {self.passwd_path}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        return "\n".join(lines) + "\n" + self.extra_config + "\n"

    # -- lifecycle
    def start(self, *, users: Mapping[str, str] | None = None, timeout: float = 10.0) -> None:
        """Start (or restart after kill) on the same port. ``users`` overrides the password file for this
        start only (e.g. admit a recording subscriber before the device; then call ``set_users``)."""
        if self.running:
            raise RuntimeError("broker already running")
        self.conf_path.write_text(self._config(users if users is not None else self.users))
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        self.starts += 1
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto not accepting on port {self.port}: {self.log_tail()}")

    def set_users(self, users: Mapping[str, str]) -> None:
        """Rewrite the password file and make the running broker reload it (SIGHUP)."""
        self.users = dict(users)
        write_password_file(self.passwd_path, users)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.1)  # the reload happens in mosquitto's next loop iteration

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no persistence save, no LWT-free goodbye."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None

    def restart(self, *, kill: bool = True, down_s: float = 0.0) -> None:
        self.kill() if kill else self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ------------------------------------------------------------------------------------------------- recorder
class Recorder:
    """An independent paho subscriber recording (topic, payload) in arrival order; resubscribes on every
    (re)connect, reconnects fast, and counts SUBACKs so a test can wait until it is listening again.

    It subscribes at QoS 0 by default, on purpose: mosquitto then writes each message to our socket before it
    sends the publisher its PUBACK, so a broker killed with -9 has nothing it acknowledged stranded in its
    memory (at QoS 1 it holds messages beyond its in-flight window for us in RAM, and our unread PUBACKs make
    the dying broker's socket send RST, which discards data already on its way). Messages then reach us unless
    the broker itself loses them, which is what the outage tests need to tell EdgeGuard's losses apart."""

    def __init__(
        self,
        broker: MosquittoBroker,
        topic: str = "#",
        *,
        qos: int = 0,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        tls_client_cert: bool = False,
    ) -> None:
        self.topic = topic
        self.qos = qos
        self.messages: list[tuple[str, bytes]] = []
        self.retained: list[tuple[str, bytes]] = []
        self.subscribed = 0
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"recorder-{os.getpid()}-{id(self):x}",
            protocol=mqtt.MQTTv311,
            clean_session=False,  # persistent session: QoS1 messages queued while we reconnect are kept
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if broker.tls is not None:
            self.client.tls_set(
                ca_certs=str(broker.tls.ca_cert),
                certfile=str(broker.tls.client_cert) if tls_client_cert else None,
                keyfile=str(broker.tls.client_key) if tls_client_cert else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        self.wait_subscribed(1)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if not rc.is_failure:
            client.subscribe(self.topic, qos=self.qos)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, _rc: Any, _p: Any = None) -> None:
        with self._cond:
            self.subscribed += 1
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            if msg.retain:
                self.retained.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def wait_subscribed(self, count: int, timeout: float = 15.0) -> None:
        """Wait until the recorder has been subscribed ``count`` times since it was created."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.subscribed >= count, timeout):
                raise TimeoutError(f"recorder not subscribed ({self.subscribed}/{count})")

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 20.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._cond:
            return list(self.messages)

    def on_topic(self, suffix: str) -> list[bytes]:
        return [p for t, p in self.snapshot() if t.endswith(suffix)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()  # first: wakes paho's loop thread, so loop_stop() returns at once
        self.client.loop_stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    made: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture
def mosquitto(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    return broker_factory()


@pytest.fixture
def recorder_factory() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(broker: MosquittoBroker, topic: str = "#", **kwargs: Any) -> Recorder:
        r = Recorder(broker, topic, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
