"""Clusterable brokers for tests: a private RabbitMQ node (MQTT plugin) and a private nats-server (MQTT over
JetStream), each on free ports with a config written here, beside the system's own brokers.

Both look like ``tests.support.broker.MosquittoBroker`` where the helpers need it (``host``, ``port``,
``tls``, ``start``, ``kill``, ``stop``, ``running``, ``log_tail``), so ``Recorder``,
``tests.service._env.Device`` and the command helpers take them unchanged. ``start_s`` is how long the last
start took until the MQTT port accepted connections (RabbitMQ boots an Erlang node: seconds; NATS:
milliseconds).

The machine's own RabbitMQ (``rabbit@localhost``, AMQP 5672, its dist port 25672) and nats-server (4222) are
left alone: the node here has its own ``RABBITMQ_NODENAME``, Mnesia and log directories, enabled-plugins file,
config file (no AMQP listener at all, MQTT on a free port), Erlang cookie (``HOME``) and distribution port.

Pytest fixtures (session-scoped, one start per test session): ``rabbitmq_broker``, ``nats_broker``. They skip
only when the broker's binary is absent, naming it; a binary that is there but fails to start fails the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Pki, free_port

RABBITMQ_SERVER = os.environ.get("EDGEGUARD_TEST_RABBITMQ", "") or next(
    (
        str(p)
        for p in sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/rabbitmq-server"))
        if p.is_file()
    ),
    shutil.which("rabbitmq-server") or "",
)
NATS_SERVER = os.environ.get("EDGEGUARD_TEST_NATS", "") or shutil.which("nats-server") or ""

__all__ = [
    "RABBITMQ_SERVER",
    "NATS_SERVER",
    "ExternalBroker",
    "RabbitMqBroker",
    "NatsBroker",
    "rabbitmq_broker",
    "nats_broker",
    "STARTED",
    "DEPLOY_TIMES",
]

# (kind, version, seconds until the MQTT port accepted) of every broker the fixtures started this session:
# tests/brokers/conftest.py prints them at the end of the run.
STARTED: list[tuple[str, str, float]] = []
# (broker kind, bundle bytes, chunks, seconds from the first chunk published to the device's verified answer)
# of every deploy tests/brokers/test_brokers_deploy.py timed this session, printed in the terminal summary.
DEPLOY_TIMES: list[tuple[str, int, int, float]] = []


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


class ExternalBroker:
    """One broker process on a fixed free MQTT port; ``kill()`` / ``start()`` keep the port and the state."""

    kind = "broker"
    start_timeout_s = 60.0

    def __init__(self, directory: Path, *, start: bool = True) -> None:
        self.dir = Path(directory) / f"{self.kind}-{id(self):x}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls: Pki | None = None  # plain listeners only (TLS is mosquitto's, tested in tests/fleet)
        self.log_path = self.dir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start_s: float | None = None
        self._configure()
        if start:
            self.start()

    # -- what differs per broker
    def _configure(self) -> None:
        raise NotImplementedError

    def _command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    @property
    def version(self) -> str:
        raise NotImplementedError

    # -- lifecycle
    def start(self, timeout: float | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.kind} already running")
        argv, env = self._command()
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.dir,
                start_new_session=True,  # its own process group: kill() reaches the Erlang VM's helpers too
            )
        self.starts += 1
        self._wait_ready(timeout or self.start_timeout_s)
        self.start_s = time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not accepting MQTT on port {self.port}: {self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the broker's process group: no clean shutdown (what survives is what was on disk)."""
        if self.proc is not None:
            self._signal_group(9)
            self.proc.wait(timeout=30)
            self._wait_group_gone()
            self.proc = None

    def _wait_group_gone(self, timeout: float = 30.0) -> None:
        # The launcher (RabbitMQ's shell script) is reaped before the Erlang VM it started has gone, and the
        # VM keeps the MQTT port open until then: a start() right after would see the old node answering.
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.kind}: processes of group {self.proc.pid} still alive after {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None:
            self._signal_group(15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal_group(9)
                self.proc.wait(timeout=10)
            self._wait_group_gone()
            self.proc = None

    def restart(self, *, kill: bool = True) -> None:
        self.kill() if kill else self.stop()
        self.start()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> ExternalBroker:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RabbitMqBroker(ExternalBroker):
    """A RabbitMQ node of its own with only the MQTT plugin, anonymous MQTT logins mapped to guest/guest."""

    kind = "rabbitmq"
    start_timeout_s = 120.0  # an Erlang node on a loaded 2-core machine

    def _configure(self) -> None:
        self.dist_port = free_port()
        self.node = f"egtest{os.getpid()}x{self.port}@localhost"
        for sub in ("mnesia", "log", "home"):
            (self.dir / sub).mkdir(exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf (its NODENAME)
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "listeners.tcp = none",  # no AMQP listener: the system node has 5672
                    f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
                    "mqtt.allow_anonymous = true",
                    "mqtt.default_user = guest",
                    "mqtt.default_pass = guest",
                    "loopback_users = none",
                    "log.console = true",
                    "log.console.level = info",
                    "log.file = false",
                ]
            )
            + "\n"
        )

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = {
            **os.environ,
            "HOME": str(self.dir / "home"),  # its own .erlang.cookie
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": self.host,
        }
        return [RABBITMQ_SERVER], env

    @property
    def version(self) -> str:
        name = Path(RABBITMQ_SERVER).resolve().parents[1].name  # rabbitmq_server-3.10.8
        return name.removeprefix("rabbitmq_server-") if name.startswith("rabbitmq_server-") else "unknown"


class NatsBroker(ExternalBroker):
    """nats-server with JetStream (file store in its directory) and an MQTT listener; no NATS clients needed,
    but its client port is private too (MQTT needs ``server_name`` and JetStream)."""

    kind = "nats"
    start_timeout_s = 30.0

    def _configure(self) -> None:
        self.client_port = free_port()
        (self.dir / "nats.conf").write_text(
            "\n".join(
                [
                    f"server_name: egtest_{os.getpid()}_{self.port}",
                    f"listen: {self.host}:{self.client_port}",
                    "jetstream {",
                    f'  store_dir: "{self.dir / "js"}"',
                    "}",
                    "mqtt {",
                    f"  listen: {self.host}:{self.port}",
                    "}",
                ]
            )
            + "\n"
        )

    def _command(self) -> tuple[list[str], dict[str, str]]:
        return [NATS_SERVER, "-c", str(self.dir / "nats.conf")], dict(os.environ)

    @property
    def version(self) -> str:
        return _version([NATS_SERVER, "--version"]).removeprefix("nats-server: v")


# ------------------------------------------------------------------------------------------------- fixtures
def _session_broker(
    cls: type[ExternalBroker], binary: str, what: str, factory: pytest.TempPathFactory
) -> Iterator[ExternalBroker]:
    if not binary or not os.access(binary, os.X_OK):
        pytest.skip(f"{what} not installed (no {cls.kind} binary; set EDGEGUARD_TEST_{cls.kind.upper()})")
    broker = cls(factory.mktemp(cls.kind))
    STARTED.append((cls.kind, broker.version, broker.start_s or 0.0))
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture(scope="session")
def rabbitmq_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalBroker]:
    yield from _session_broker(RabbitMqBroker, RABBITMQ_SERVER, "rabbitmq-server", tmp_path_factory)


@pytest.fixture(scope="session")
def nats_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalBroker]:
    yield from _session_broker(NatsBroker, NATS_SERVER, "nats-server", tmp_path_factory)
