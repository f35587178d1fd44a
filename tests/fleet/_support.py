"""Real components for the ingest tests: a result publisher in the device's exact format, the ingest worker as
a child process, a TCP proxy between the worker and PostgreSQL that a test can cut and restore."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg

from tests.support.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]

# The device's result envelope (edgeguard.link._link._ENVELOPE), reproduced; test_envelope_matches_device
# asserts it byte for byte against what a real MqttLink publishes.
_ENVELOPE = b'{"id":"%s:%d","seq":%d,"kind":"%s","priority":%s,"created":%r,"data":%s}'


def envelope(
    device: str, seq: int, *, created: float, data: bytes, kind: str = "result", priority: bool = False
) -> bytes:
    return _ENVELOPE % (
        device.encode(),
        seq,
        seq,
        kind.encode(),
        b"true" if priority else b"false",
        created,
        data,
    )


def result_messages(
    fleet: str, devices: int, per_device: int, *, start_seq: int = 0, created: float | None = None
) -> list[tuple[str, bytes]]:
    """(topic, payload) for ``devices`` x ``per_device`` results, interleaved across devices."""
    now = time.time() if created is None else created
    out = []
    for seq in range(start_seq, start_seq + per_device):
        for d in range(devices):
            dev = f"cam-{d:04d}"
            data = b'{"label":"person","score":0.91,"latency_ms":%d.5}' % (seq % 40)
            out.append(
                (
                    f"edgeguard/v1/{fleet}/{dev}/results",
                    envelope(dev, seq, created=now + seq * 0.001, data=data),
                )
            )
    return out


class Publisher:
    """A real paho client publishing at QoS 1; ``publish_all`` returns once the broker acknowledged all."""

    def __init__(self, broker: MosquittoBroker, client_id: str | None = None) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{os.getpid()}-{id(self):x}",
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self._acked = 0
        self._cond = threading.Condition()
        self.client.on_publish = self._on_publish
        if broker.tls is not None:
            self.client.tls_set(ca_certs=str(broker.tls.ca_cert), cert_reqs=ssl.CERT_REQUIRED)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, *_a: Any) -> None:
        with self._cond:
            self._acked += 1
            self._cond.notify_all()

    def publish_all(
        self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, timeout: float = 120.0
    ) -> int:
        with self._cond:
            start = self._acked
        n = 0
        for topic, payload in messages:
            if qos and n % 1000 == 0:
                # paho's message ids are 16-bit: with more than 65,535 unacknowledged publishes they wrap and
                # overwrite each other in paho's table. Keep at most 10,000 outstanding.
                with self._cond:
                    if not self._cond.wait_for(lambda sent=n: sent - (self._acked - start) < 10_000, timeout):
                        raise TimeoutError(f"broker acknowledged {self._acked - start} of {n}")
            self.client.publish(topic, payload, qos=qos)
            n += 1
        with self._cond:
            if not self._cond.wait_for(lambda: self._acked - start >= n, timeout):
                raise TimeoutError(f"broker acknowledged {self._acked - start} of {n}")
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------------------------------ the worker
def write_config(
    path: Path,
    *,
    fleet: str,
    dsn: str,
    broker: MosquittoBroker,
    client_id: str,
    status_file: Path,
    **extra: Any,
) -> Path:
    keys = {
        "fleet": fleet,
        "dsn": dsn,
        "client_id": client_id,
        "status_file": str(status_file),
        "flush_interval_s": 0.05,
        "status_interval_s": 0.1,
        "db_retry_initial_s": 0.05,
        "db_retry_max_s": 0.5,
        "db_connect_timeout_s": 2,
        # few partitions to create at start: 4 tables x 4 days
        "retention_days": 2,
        "partitions_ahead_days": 1,
        **extra,
    }
    lines = ["[ingest]"] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    lines += ["[ingest.broker]", f'host = "{broker.host}"', f"port = {broker.port}", "keepalive_s = 5"]
    if broker.tls is not None:
        lines.append(f'ca_file = "{broker.tls.ca_cert}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class IngestProc:
    """``edgeguard fleet ingest -c CONFIG`` as a child process; its status file is how tests watch it."""

    def __init__(self, config: Path, status_file: Path, log: Path) -> None:
        self.config, self.status_file, self.log = config, status_file, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> IngestProc:
        self.status_file.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeguard", "fleet", "ingest", "-c", str(self.config)],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_bytes())
            return doc
        except (OSError, ValueError):
            return None

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
        """Poll the status file (written every 0.1 s) until ``pred`` holds."""
        deadline = time.monotonic() + timeout
        snap = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"ingest exited with {self.proc.returncode}: {self.log_tail()}")
            snap = self.status()
            if snap is not None and pred(snap):
                return snap
            time.sleep(0.05)
        raise TimeoutError(f"status never matched; last: {snap}\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def count(dsn: str, table: str = "results") -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM edgeguard.{table}").fetchone()
        assert row is not None
        return int(row[0])


def wait_rows(dsn: str, n: int, timeout: float = 60.0, table: str = "results") -> int:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error):  # the schema may not exist yet
            got = count(dsn, table)
            if got >= n:
                return got
        time.sleep(0.1)
    return got


# --------------------------------------------------------------------------------------------- the proxy
class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. ``cut()`` closes every connection and refuses new ones (the
    database is gone, as far as the worker can tell); ``restore()`` accepts again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._open = True
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                r, _, _ = select.select([a, b], [], [], 0.5)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        with self._lock:
            self._open = False
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def restore(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        self._listener.close()
