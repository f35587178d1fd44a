#!/usr/bin/env python3
"""Simulate N EdgeGuard devices on one MQTT broker: real sessions, the device's topics and payload shapes.

    python tools/fleet_sim.py 200 --broker 127.0.0.1:1883 --fleet sim --heartbeat 30 --keepalive 30

Each device is its own MQTT session (paho clients driven by one thread through one selector: no thread per
device) with the device's LWT (``{"state":"offline"}``, retained, QoS 1) and birth (``{"state":"online"}``),
heartbeats in the shape MqttLink publishes (model, fast path, latency, outbox, link, supervisor; checked
against docs/schemas/heartbeat.json by tests/fleet/test_view_schemas.py), and results in the link's envelope
now and then. No inference runs.

Faults on demand, one command per line on stdin (device names are ``<prefix>NNNN``, e.g. ``sim-0007``):
    drop DEV          close the connection without DISCONNECT (the broker publishes the LWT at once)
    freeze DEV        stop talking, socket open (the broker times it out after 1.5 x keepalive, then LWT)
    slow DEV FACTOR   heartbeat every FACTOR x the period
    degrade DEV WHY   report degraded with reason WHY ("degrade DEV" alone recovers)
    event DEV KIND    publish an event of kind KIND (e.g. bundle-rejected)
    stats             print `stats heartbeats=H results=R commands=C deploys=D`: counts so far
    deploys           print `deploys DEV=N ...`: deploy commands each device received (those with N > 0)
    fail-probation DEV [REASON]   the device's current or next probation fails: it rolls back by itself
    refuse-deploy DEV [CHECK]     the device refuses deploys with CHECK (default self-test)
    quit              say goodbye (offline status) from every device and exit
The simulator prints ``ready N`` once every device is connected, ``frozen DEV LAST`` / ``dropped DEV LAST``
with the monotonic time of the device's last packet, and ``error ...`` for a command it did not understand.
RLIMIT_NOFILE is raised to its hard limit (one socket per device).

Signed commands (``--operator-pub FILE`` or ``--fleet-dir DIR``): each device subscribes to its ``cmd``
topic, checks commands with the device's own gatekeeper and answers signed with its own key (generated, or
``DIR/devices/<id>/device-sign.key``), announced in its birth status like a real device. ping, status,
deploy and rollback are simulated (tools/fleet_sim_deploy.py: deploys with probation, heartbeat ``deploy``
object, ``deploy-*`` events). With ``--fleet-dir`` the devices are the first N active devices of the fleet's
inventory (id order, their groups), the fleet name and operator key come from it.

    python tools/fleet_sim.py 20 --fleet-dir plant-a --broker 127.0.0.1:1883 --heartbeat 1
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import resource
import selectors
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_sim_deploy import SimCommands
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.commands import CommandGate, NonceStore
from edgeguard.keys import TrustStore, load_signing_key, load_trusted_key, public_key_id


@dataclass
class SimDevice:
    name: str
    client: mqtt.Client
    prefix: str
    period: float
    next_heartbeat: float = 0.0
    started: float = field(default_factory=time.monotonic)
    connected: bool = False
    dead: bool = False  # dropped or frozen: never serviced again
    slow: float = 1.0
    degraded_reason: str | None = None
    hb_seq: int = 0
    result_seq: int = 0
    inferences: int = 0
    last_packet: float = 0.0
    groups: list[str] = field(default_factory=list)
    cmds: SimCommands | None = None


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def heartbeat(dev: SimDevice, fleet: str, groups: list[str], now_wall: float) -> dict[str, Any]:
    """The heartbeat MqttLink publishes for a serving device (docs/link.md), with plausible figures."""
    uptime = time.monotonic() - dev.started
    dev.inferences += random.randint(0, 20)
    p50 = round(random.uniform(2.0, 6.0), 3)
    version = dev.cmds.version if dev.cmds is not None else 3
    beat: dict[str, Any] = {
        "model": {"name": "detector", "version": version, "sha256": "0" * 64},
        "profile": "generic-x86_64",
        "backend": "onnxruntime",
        "accelerator": "cpu",
        "degraded": dev.degraded_reason is not None,
        "degraded_reason": dev.degraded_reason,
        "candidates": [],
        "inferences": dev.inferences,
        "backend_failures": 0,
        "demotions": 0,
        "promotions": 0,
        "latency_ms": {"p50": p50, "p99": round(p50 * 2.5, 3)},
        "rejected": 0,
        "rejections": {"model": 0},
        "ood": {"checked": 0, "flagged": 0},
        "load_ms": 120.0,
        "selftest_ms": 8.0,
        "pid": os.getpid(),
        "state": "serving",
        "groups": dev.groups or groups,
        "supervisor": {
            "restarts": 0, "failures": 0, "mtbf_s": None, "mttr_s": None, "last_reason": None,
            "safe_state": False, "safe_reason": None, "watchdogs": [], "recent": [],
        },
        "sources": {},
        "system": {"cpu_temp_c": 48.5, "load": [0.4, 0.3, 0.2], "memory": None, "disk": None},
        "pipeline": {"completed": dev.inferences, "failed": 0, "in_flight": 0, "reloads": 0},
        "security": {"api_unauthorized": 0, "api_forbidden": 0, "rejected_inputs": 0},
        "device": dev.name,
        "time": now_wall,
        "uptime_s": round(uptime, 3),
        "sequence": dev.hb_seq,
        "outbox": {
            "depth": 0, "bytes": 0, "oldest_age_s": None, "dropped": {}, "dropped_total": 0,
            "alarm": None, "corrupt_files": 0,
        },
        "link": {
            "connected": True, "error": None, "error_kind": None, "protocol": "3.1.1", "connects": 1,
            "attempts": 1, "published": dev.result_seq, "acked": dev.result_seq, "inflight": 0,
            "rejected": 0, "inbound_dropped": 0, "events_dropped": 0,
        },
    }
    if dev.cmds is not None:
        beat["deploy"] = dev.cmds.deploy.doc()
    return beat


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.devices: dict[str, SimDevice] = {}
        self.groups = [g for g in args.groups.split(",") if g]
        self.ready_said = False
        self.fleet = args.fleet
        self.names = [f"{args.prefix}{i:04d}" for i in range(args.count)]
        self.device_groups: dict[str, list[str]] = {}
        self.fleet_dir: Path | None = args.fleet_dir
        operator_pub: Path | None = args.operator_pub
        if self.fleet_dir is not None:
            self._from_fleet_dir(self.fleet_dir)
            operator_pub = operator_pub or self.fleet_dir / "keys/operator.pub"
        self.operators = TrustStore([load_trusted_key(operator_pub)]) if operator_pub else None
        self.state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="edgeguard-sim-"))

    def _from_fleet_dir(self, root: Path) -> None:
        from edgeguard.fleet.provision import FleetDir, Inventory

        fd = FleetDir.open(root)
        inv = Inventory.load(fd.inventory, fd.config.name)
        active = sorted(d for d, rec in inv.devices.items() if rec.state == "active")
        if len(active) < self.args.count:
            raise SystemExit(f"fleet_sim: {root} has {len(active)} active devices, not {self.args.count}")
        self.fleet = fd.config.name
        self.names = active[: self.args.count]
        self.device_groups = {d: list(inv.devices[d].groups) for d in self.names}

    def _answer_key(self, name: str) -> Ed25519PrivateKey:
        if self.fleet_dir is not None:
            path = self.fleet_dir / "devices" / name / "device-sign.key"
            if path.exists():
                return load_signing_key(path, "device-sign")
        return Ed25519PrivateKey.generate()

    def _commands(self, dev: SimDevice, client: mqtt.Client) -> SimCommands:
        assert self.operators is not None
        d = self.state_dir / dev.name
        d.mkdir(parents=True, exist_ok=True)
        gate = CommandGate(operators=self.operators, nonces=NonceStore(d / "nonces.sqlite"), fleet=self.fleet,
                           device_id=dev.name, groups=frozenset(dev.groups))

        def publish(suffix: str, body: bytes, qos: int) -> None:
            client.publish(dev.prefix + suffix, body, qos=qos)
            dev.last_packet = time.monotonic()

        return SimCommands(
            device=dev.name, fleet=self.fleet, gate=gate, key=self._answer_key(dev.name), publish=publish,
            subscribe=lambda t: client.subscribe(t, qos=1), unsubscribe=client.unsubscribe,
            model="detector", version=self.args.model_version,
        )

    def make(self, index: int) -> SimDevice:
        a = self.args
        name = self.names[index]
        prefix = f"edgeguard/v1/{self.fleet}/{name}/"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgeguard-{self.fleet}-{name}",
                             protocol=mqtt.MQTTv311, clean_session=False)
        offline = json.dumps({"state": "offline", "device": name}).encode()
        client.will_set(prefix + "status", offline, qos=1, retain=True)
        if a.tls:  # mutual TLS with the device's own fleet certificate, as a provisioned device connects
            assert self.fleet_dir is not None
            d = self.fleet_dir / "devices" / name
            client.tls_set(ca_certs=str(self.fleet_dir / "ca/ca.pem"), certfile=str(d / "client.pem"),
                           keyfile=str(d / "client.key"))
        dev = SimDevice(name=name, client=client, prefix=prefix, period=a.heartbeat,
                        groups=self.device_groups.get(name, []))
        if self.operators is not None:
            dev.cmds = self._commands(dev, client)
        # Spread the first heartbeats over one period, as a fleet started over time would.
        dev.next_heartbeat = time.monotonic() + random.uniform(0, min(a.heartbeat, 1.0))

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            if rc.is_failure:
                print(f"error {name}: broker refused ({rc})", flush=True)
                return
            dev.connected = True
            birth: dict[str, Any] = {"state": "online", "device": name, "fleet": self.fleet,
                                     "time": time.time()}
            if dev.cmds is not None:
                pub = dev.cmds.key.public_key()
                raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                birth["groups"] = dev.groups or self.groups
                birth["signing_key"] = {"id": public_key_id(pub), "ed25519": base64.b64encode(raw).decode()}
                c.subscribe(prefix + "cmd", qos=1)
            c.publish(prefix + "status", json.dumps(birth).encode(), qos=1, retain=True)
            dev.last_packet = time.monotonic()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            if dev.cmds is None or dev.dead:
                return
            if msg.topic == prefix + "cmd":
                dev.cmds.on_command(bytes(msg.payload))
            elif "/bundles/" in msg.topic:
                dev.cmds.on_bundle(msg.topic, bytes(msg.payload))

        client.on_connect = on_connect
        client.on_message = on_message
        host, _, port = a.broker.rpartition(":")
        client.connect(host, int(port), keepalive=a.keepalive)
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        self.sel.register(sock, selectors.EVENT_READ, dev)
        self.devices[name] = dev
        return dev

    def publish(self, dev: SimDevice, suffix: str, body: dict[str, Any], qos: int = 0) -> None:
        dev.client.publish(dev.prefix + suffix, json.dumps(body).encode(), qos=qos)
        dev.last_packet = time.monotonic()  # paho writes at once when no loop thread runs

    def tick(self) -> None:
        now = time.monotonic()
        wall = time.time()
        for dev in self.devices.values():
            if dev.dead:
                continue
            if dev.cmds is not None:
                dev.cmds.tick(wall)
                if dev.cmds.changed:  # a deploy state change is reported at once, as a device does
                    dev.cmds.changed = False
                    dev.next_heartbeat = 0.0
            if dev.connected and now >= dev.next_heartbeat:
                dev.next_heartbeat = now + dev.period * dev.slow
                dev.hb_seq += 1
                self.publish(dev, "heartbeat", heartbeat(dev, self.fleet, self.groups, wall))
                if self.args.results_every and dev.hb_seq % self.args.results_every == 0:
                    dev.result_seq += 1
                    self.publish(dev, "results", {
                        "id": f"{dev.name}:{dev.result_seq}", "seq": dev.result_seq, "kind": "result",
                        "priority": False, "created": wall, "data": {"outputs": {"y": [[0.2, 0.4]]}},
                    }, qos=1)
            dev.client.loop_misc()  # keepalive PINGREQ when due
            if dev.client.want_write():
                dev.client.loop_write()

    def command(self, line: str) -> bool:
        words = line.split(maxsplit=2)
        if not words:
            return True
        if words[0] == "quit":
            return False
        if words[0] == "stats":
            beats = sum(d.hb_seq for d in self.devices.values())
            results = sum(d.result_seq for d in self.devices.values())
            counts = [d.cmds.counts for d in self.devices.values() if d.cmds is not None]
            commands = sum(c["commands"] for c in counts)
            deploys = sum(c["deploys"] for c in counts)
            print(f"stats heartbeats={beats} results={results} commands={commands} deploys={deploys}",
                  flush=True)
            return True
        if words[0] == "deploys":
            got = [f"{d.name}={d.cmds.counts['deploys']}" for d in self.devices.values()
                   if d.cmds is not None and d.cmds.counts["deploys"]]
            print("deploys " + " ".join(got), flush=True)
            return True
        dev = self.devices.get(words[1]) if len(words) > 1 else None
        if dev is None or dev.dead:
            print(f"error: {line.strip()!r}: unknown or dead device", flush=True)
            return True
        if words[0] in ("drop", "freeze"):
            dev.dead = True
            sock = dev.client.socket()
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)  # type: ignore[arg-type]
            if words[0] == "drop" and isinstance(sock, socket.socket):
                sock.close()  # no DISCONNECT: the broker publishes the LWT
            print(f"{'dropped' if words[0] == 'drop' else 'frozen'} {dev.name} {dev.last_packet}", flush=True)
        elif words[0] == "slow" and len(words) == 3:
            dev.slow = float(words[2])
        elif words[0] == "degrade":
            dev.degraded_reason = words[2] if len(words) == 3 else None
            dev.next_heartbeat = 0.0
        elif words[0] in ("fail-probation", "refuse-deploy") and dev.cmds is None:
            print(f"error: {line.strip()!r}: commands are off (--operator-pub or --fleet-dir)", flush=True)
        elif words[0] == "fail-probation" and dev.cmds is not None:
            dev.cmds.fail_probation = words[2] if len(words) == 3 else "error rate 0.4 > max_error_rate"
        elif words[0] == "refuse-deploy" and dev.cmds is not None:
            dev.cmds.refuse_deploy = words[2] if len(words) == 3 else "self-test"
        elif words[0] == "event" and len(words) == 3:
            self.publish(dev, "events", {"kind": words[2], "time": time.time(), "device": dev.name,
                                         "reason": "simulated"}, qos=1)
        else:
            print(f"error: {line.strip()!r}: unknown command", flush=True)
        return True

    def goodbye(self) -> None:
        for dev in self.devices.values():
            if dev.dead or not dev.connected:
                continue
            bye = {"state": "offline", "device": dev.name, "time": time.time()}
            dev.client.publish(dev.prefix + "status", json.dumps(bye).encode(), qos=1, retain=True)
            with contextlib.suppress(Exception):
                dev.client.loop_write()
                dev.client.disconnect()

    def run(self) -> int:
        for i in range(self.args.count):
            self.make(i)
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.sel.register(stdin, selectors.EVENT_READ, None)
        pending = b""
        while True:
            for key, _ in self.sel.select(timeout=0.02):
                if key.data is None:
                    chunk = os.read(stdin, 65536)
                    if not chunk:  # stdin closed: keep running until killed
                        self.sel.unregister(stdin)
                        continue
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if not self.command(line.decode(errors="replace")):
                            self.goodbye()
                            return 0
                    continue
                dev = key.data
                if not dev.dead:
                    dev.client.loop_read()
                    sock = dev.client.socket()
                    # TLS: bytes already decrypted into the SSL object's buffer never wake the selector
                    for _ in range(1000):
                        if dev.dead or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                            break
                        dev.client.loop_read()
            self.tick()
            if not self.ready_said and all(d.connected for d in self.devices.values()):
                self.ready_said = True
                print(f"ready {len(self.devices)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("count", type=int, help="number of simulated devices")
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    p.add_argument("--fleet", default="sim")
    p.add_argument("--prefix", default="sim-", help="device name prefix (names: PREFIX0000, PREFIX0001, ...)")
    p.add_argument("--groups", default="", help="comma-separated groups every device reports")
    p.add_argument("--heartbeat", type=float, default=30.0, metavar="S", help="heartbeat period")
    p.add_argument("--keepalive", type=int, default=30, metavar="S", help="MQTT keepalive")
    p.add_argument("--results-every", type=int, default=1, metavar="K", help="a result per K beats")
    p.add_argument("--operator-pub", type=Path, metavar="FILE", help="operator key: enables signed commands")
    p.add_argument("--fleet-dir", type=Path, metavar="DIR",
                   help="devices, fleet name, keys and operator key from a fleet directory")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="nonce stores (default: a temporary dir)")
    p.add_argument("--tls", action="store_true",
                   help="with --fleet-dir: mutual TLS with each device's client.pem/client.key and ca/ca.pem")
    p.add_argument("--model-version", type=int, default=3, metavar="N", help="version devices start at")
    args = p.parse_args()
    if args.count < 1 or args.heartbeat <= 0 or args.keepalive < 1:
        p.error("count, --heartbeat and --keepalive must be positive")
    if args.tls and args.fleet_dir is None:
        p.error("--tls needs --fleet-dir (the devices' certificates)")
    _raise_nofile()
    try:
        return Fleet(args).run()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
