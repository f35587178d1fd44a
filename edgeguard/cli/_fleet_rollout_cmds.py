"""``edgeguard fleet deploy`` and ``edgeguard fleet rollout``: a sealed bundle to one device, a group or the
fleet, at once or in waves with probation and automatic rollback (docs/fleet.md, "Rolling out a model")."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeguard.errors import ConfigError

from ._fleet_rollout_show import live_table, summary

if TYPE_CHECKING:
    from edgeguard.fleet.provision import FleetDir
    from edgeguard.fleet.rollout import MqttTransport, Rollout

_RAW = argparse.RawDescriptionHelpFormatter
_DEPLOY_HELP = """\
Publish a sealed bundle on the broker (retained chunks under <prefix>/bundles/<sha256>/) and send a signed
`deploy` command to each device of --to (a device id, a group, or all: the inventory's non-revoked devices);
print each device's verified answer as it arrives. The device answers once it has fetched, verified and
self-tested the bundle and switched to it under probation. Exit 0 when every device answered ok.

example:
  edgeguard fleet deploy -f plant-a plant-a/bundles/yolo-v4.egm --to cam-01 --probation 120"""

_ROLLOUT_HELP = """\
Roll a sealed bundle out in waves: the first --canary percent of the --to devices (in id order), then each
cumulative --then percentage. Every wave waits until each of its devices has left probation (committed = ok;
refused, rolled back, failed or silent = failure) before the next starts. When failures exceed
--max-failures the rollout halts and the devices of the current wave that took the new version are sent
`rollback`. State is kept in DIR/rollouts/<id>.json: `--resume ID` continues after the process died.
Progress is published retained on <prefix>/rollouts/<id> and shown live on a terminal (quiet when piped).
Exit 0 when done, 1 when halted or aborted.

  fleet rollout MODEL.egm --to GROUP [--canary 5%] [--then 25%,100%] [--max-failures 2]
  fleet rollout --resume ID          continue a rollout whose process died
  fleet rollout status [ID] [--json] the rollouts of this fleet directory, or one in detail
  fleet rollout abort ID             stop it and roll back the current wave's devices

example:
  edgeguard fleet rollout -f plant-a plant-a/bundles/yolo-v4.egm --to line-1 --canary 5% \\
      --then 25%,100% --max-failures 2 --probation 300
  edgeguard fleet rollout -f plant-a status yolo-v4-20261129-2215"""


def register_fleet(fsub: argparse._SubParsersAction[Any]) -> None:
    default_fleet = Path(os.environ.get("EDGEGUARD_FLEET", "."))
    for name, help_, desc, handler in (
        ("deploy", "send a sealed bundle to devices at once; show their answers", _DEPLOY_HELP, _deploy),
        ("rollout", "roll a sealed bundle out in waves with probation and automatic rollback", _ROLLOUT_HELP,
         _rollout),
    ):
        p = fsub.add_parser(name, help=help_, description=desc, formatter_class=_RAW)
        p.add_argument("-f", "--fleet", type=Path, default=default_fleet, metavar="DIR",
                       help="the fleet directory ($EDGEGUARD_FLEET or the current directory)")
        if name == "deploy":
            p.add_argument("bundle", type=Path, metavar="MODEL.egm", help="sealed bundle (`fleet seal`)")
            p.add_argument("--to", required=True, metavar="ID|GROUP|all", help="the devices to deploy to")
            p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                           help="seconds to wait for the answers (default: 300)")
        else:
            p.add_argument("words", nargs="*", metavar="MODEL.egm | status [ID] | abort ID",
                           help="a bundle to roll out, or status / abort")
            p.add_argument("--to", metavar="ID|GROUP|all", help="the devices to roll out to")
            p.add_argument("--canary", default="5%", metavar="P%", help="first wave (default: 5%%)")
            p.add_argument("--then", default="25%,100%", metavar="P%,..",
                           help="next waves, cumulative and increasing (default: 25%%,100%%)")
            p.add_argument("--max-failures", type=int, default=2, metavar="N",
                           help="halt when more devices than this fail (default: 2)")
            p.add_argument("--id", dest="rollout_id", metavar="ID",
                           help="rollout id (default: MODEL-vN-time)")
            p.add_argument("--resume", metavar="ID", help="continue this rollout")
            p.add_argument("--answer-timeout", type=float, default=300.0, metavar="S",
                           help="a device that neither answers nor reports within S fails (default: 300)")
            p.add_argument("--commit-grace", type=float, default=60.0, metavar="S",
                           help="a device not committed S after its probation fails (default: 60)")
            p.add_argument("--json", action="store_true", help="print the final (or status) document as JSON")
        p.add_argument("--probation", type=int, default=60, metavar="S",
                       help="probation seconds (default: 60)")
        p.add_argument("--max-error-rate", type=float, default=0.05, metavar="R",
                       help="error rate (0..1) that fails probation (default: 0.05)")
        p.add_argument("--max-p95-ms", type=float, metavar="MS", help="p95 latency that fails probation")
        p.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (default: fleet.toml's first)")
        p.add_argument("--operator", metavar="NAME",
                       help="mutual TLS as DIR/operators/NAME (`fleet add-operator`), CA DIR/ca/ca.pem")
        p.add_argument("--ca-file", type=Path, help="enables TLS: verify the broker against this CA")
        p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
        p.add_argument("--key", type=Path, help="client certificate's key (mutual TLS)")
        p.add_argument("--sign-key", type=Path, metavar="operator.key",
                       help="operator command-signing key (default: DIR/keys/operator.key)")
        p.set_defaults(handler=handler)


# ---------------------------------------------------------------------------------------------- shared
def _fleet(args: argparse.Namespace) -> FleetDir:
    from edgeguard.fleet.provision import FleetDir  # noqa: PLC0415 - operator code, loaded only when used

    return FleetDir.open(args.fleet)


def _settings(args: argparse.Namespace) -> Any:
    from edgeguard.fleet.rollout import Settings  # noqa: PLC0415

    return Settings(
        probation_s=args.probation,
        max_error_rate=args.max_error_rate,
        max_p95_ms=args.max_p95_ms,
        answer_timeout_s=float(getattr(args, "answer_timeout", 0.0) or getattr(args, "timeout", 300.0)),
        commit_grace_s=getattr(args, "commit_grace", 60.0),
    )


def _transport(args: argparse.Namespace, fd: FleetDir) -> MqttTransport:
    from edgeguard.cli._fleet_command_cmds import pinned_keys  # noqa: PLC0415
    from edgeguard.fleet.rollout import MqttTransport  # noqa: PLC0415
    from edgeguard.keys import load_signing_key  # noqa: PLC0415
    from edgeguard.link import LinkConfig  # noqa: PLC0415

    if args.broker:
        host, sep, port = args.broker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--broker {args.broker[:80]!r}: use HOST:PORT")
        host, port_n = host.strip("[]"), int(port)
    else:
        host, port_n = fd.config.brokers[0].host, fd.config.brokers[0].port
    ca, cert, key = args.ca_file, args.cert, args.key
    if args.operator:
        op = fd.operator_dir(args.operator)
        ca, cert, key = ca or fd.ca_cert, cert or op / "client.pem", key or op / "client.key"
    try:
        broker = LinkConfig(host=host, port=port_n, protocol="3.1.1", ca_file=ca, client_cert=cert,
                            client_key=key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sign_key = load_signing_key(args.sign_key or fd.root / "keys/operator.key", "operator")
    devices = fd.root / "devices"
    pinned = pinned_keys([str(devices)]) if devices.is_dir() else {}
    t = MqttTransport(broker=broker, fleet=fd.config.name, sign_key=sign_key, pinned=pinned)
    t.connect()
    return t


def _read_bundle(path: Path) -> tuple[bytes, str, int]:
    """The bundle's bytes, and the model name and version its manifest states (read without checking the
    signature: it is the operator's own file, and each device verifies it before use)."""
    from edgeguard._safeio import read_checked  # noqa: PLC0415
    from edgeguard.bundle import inspect_bundle  # noqa: PLC0415
    from edgeguard.errors import BundleRejected  # noqa: PLC0415

    if not path.is_file():
        raise ConfigError(f"{path}: no such bundle file")
    data = read_checked(path, what="bundle", limit=2 * 1024**3, error=ConfigError).data
    try:
        manifest: Any = inspect_bundle(data)["manifest"]
    except BundleRejected as exc:
        raise ConfigError(f"{path}: not a sealed bundle ({exc})") from None
    return data, str(manifest["name"]), int(manifest["version"])


def _select(fd: FleetDir, to: str) -> list[str]:
    from edgeguard.fleet.provision import Inventory  # noqa: PLC0415

    inv = Inventory.load(fd.inventory, fd.config.name)
    return [d.id for d in inv.select([to])]


# ---------------------------------------------------------------------------------------------- deploy
def _deploy(args: argparse.Namespace) -> int:
    from edgeguard.fleet.rollout import AnswerSeen  # noqa: PLC0415

    fd = _fleet(args)
    data, model, version = _read_bundle(args.bundle)
    devices = _select(fd, args.to)
    settings = _settings(args)
    if not 0 < args.timeout <= 86400:
        raise ConfigError("--timeout: 0..86400 s")
    import hashlib  # noqa: PLC0415

    sha = hashlib.sha256(data).hexdigest()
    t = _transport(args, fd)
    try:
        t.publish_bundle(data)
        deploy_args = settings.deploy_args(sha256=sha, size=len(data), rollout="")
        del deploy_args["rollout"]
        sent = {d: t.send(d, "deploy", deploy_args) for d in devices}
        start = time.monotonic()
        ok, answered = 0, set[str]()
        while len(answered) < len(devices) and time.monotonic() - start < args.timeout:
            for obs in t.poll(0.5):
                if not isinstance(obs, AnswerSeen) or obs.nonce != sent.get(obs.device):
                    continue
                if obs.device in answered:
                    continue
                answered.add(obs.device)
                if obs.ok:
                    ok += 1
                    r = obs.result
                    print(f"✓ {obs.device}  {r.get('state')}  {r.get('model')} v{r.get('version')} "
                          f"slot {r.get('slot')} until {r.get('probation_until')}", flush=True)
                else:
                    print(f"✗ {obs.device}  refused: {obs.check}: {obs.reason}", flush=True)
        for d in devices:
            if d not in answered:
                print(f"? {d}  no answer within {args.timeout:g} s")
        if len(answered) == len(devices):
            t.remove_bundle(sha, len(data))
        else:  # a device may still be fetching it: removing the chunks now would fail that deploy
            print(f"the bundle stays retained under edgeguard/v1/{fd.config.name}/bundles/{sha}/ "
                  "for the devices that have not answered", file=sys.stderr)
    finally:
        t.close()
    print(f"{ok}/{len(devices)} devices took {model} v{version} (sha256 {sha[:16]}…)")
    return 0 if ok == len(devices) else 1


# ---------------------------------------------------------------------------------------------- rollout
def _try_lock(root: Path, rollout_id: str) -> int | None:
    """One process per rollout (flock: released when the process dies, so --resume works after a kill).
    The locked descriptor, or None when another process holds it."""
    d = root / "rollouts"
    d.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(d / f"{rollout_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _running(root: Path, rollout_id: str) -> Iterator[None]:
    fd = _try_lock(root, rollout_id)
    if fd is None:
        raise ConfigError(f"rollout {rollout_id} is running in another process")
    try:
        yield
    finally:
        os.close(fd)


def _rollout(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words[:1] == ["status"]:
        return _status(args, words[1:])
    if words[:1] == ["abort"]:
        if len(words) != 2:
            raise ConfigError("usage: fleet rollout abort ID")
        return _abort(args, words[1])
    fd = _fleet(args)
    if args.resume:
        if words:
            raise ConfigError("--resume ID takes no bundle (the rollout's state names it)")
        return _run(args, fd, _resumable(fd, args.resume))
    if len(words) != 1:
        raise ConfigError("usage: fleet rollout MODEL.egm --to GROUP | --resume ID | status [ID] | abort ID")
    return _run(args, fd, _new(args, fd, Path(words[0])))


def _resumable(fd: FleetDir, rollout_id: str) -> Rollout:
    from edgeguard.fleet.rollout import Rollout  # noqa: PLC0415

    r = Rollout.load(fd.root, rollout_id)
    if r.final:
        raise ConfigError(f"rollout {rollout_id} is {r.state}: nothing to resume")
    return r


def _new(args: argparse.Namespace, fd: FleetDir, bundle: Path) -> Rollout:
    import hashlib  # noqa: PLC0415

    from edgeguard.fleet.rollout import Rollout, Wave, parse_waves, plan_waves, rollout_path  # noqa: PLC0415

    if not args.to:
        raise ConfigError("--to GROUP (or a device id, or all) is required")
    percents = parse_waves(args.canary, args.then)
    if args.max_failures < 0:
        raise ConfigError("--max-failures: 0 or more")
    settings = _settings(args)
    data, model, version = _read_bundle(bundle)
    devices = _select(fd, args.to)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rid = args.rollout_id or f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model)[:40]}-v{version}-{stamp}"
    if rollout_path(fd.root, rid).exists():
        raise ConfigError(f"rollout {rid} exists already (resume it with --resume {rid}, or pick --id)")
    now = time.time()
    return Rollout(
        id=rid,
        model=model,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        bundle=str(bundle.resolve()),
        group=args.to,
        max_failures=args.max_failures,
        settings=settings,
        started=now,
        updated=now,
        waves=[Wave(index=i, percent=p, devices=ds)
               for i, (p, ds) in enumerate(plan_waves(devices, percents))],
    )


def _run(args: argparse.Namespace, fd: FleetDir, r: Rollout) -> int:
    from edgeguard.fleet.rollout import RolloutEngine  # noqa: PLC0415

    def bundle() -> bytes:
        import hashlib  # noqa: PLC0415

        data, _, _ = _read_bundle(Path(r.bundle))
        if hashlib.sha256(data).hexdigest() != r.sha256:
            raise ConfigError(f"{r.bundle} changed since the rollout started (sha256 differs)")
        return data

    with _running(fd.root, r.id):
        r.save(fd.root)  # the id exists from here on: --resume works even if the broker is unreachable
        print(f"rollout {r.id}: {r.model} v{r.version} to {r.group}, "
              f"{len(r.waves)} waves of {', '.join(str(len(w.devices)) for w in r.waves)} devices",
              file=sys.stderr if args.json else sys.stdout, flush=True)
        t = _transport(args, fd)
        try:
            with live_table(r) as on_change:
                RolloutEngine(r, root=fd.root, transport=t, bundle=bundle, on_change=on_change).run()
        finally:
            t.close()
    if args.json:
        print(json.dumps(r.progress(), indent=1, sort_keys=True))
    else:
        print(summary(r))
    return 0 if r.state == "done" else 1


def _status(args: argparse.Namespace, words: list[str]) -> int:
    from edgeguard.fleet.rollout import Rollout, list_rollouts  # noqa: PLC0415

    fd = _fleet(args)
    if len(words) > 1:
        raise ConfigError("usage: fleet rollout status [ID]")
    if words:
        r = Rollout.load(fd.root, words[0])
        if args.json:
            print(json.dumps(r.progress(), indent=1, sort_keys=True))
        else:
            print(summary(r))
            for w in r.waves:
                failed = "; ".join(f"{d}: {why}" for d, why in w.failed.items())
                print(f"  wave {w.index} ({w.percent}%, {len(w.devices)} devices) {w.state}: ok {len(w.ok)}"
                      + (f", failed {failed}" if failed else "")
                      + (f", rolled back {', '.join(w.rolled_back)}" if w.rolled_back else ""))
        return 0
    rollouts = list_rollouts(fd.root)
    if args.json:
        print(json.dumps([x.progress() for x in rollouts], indent=1, sort_keys=True))
    elif not rollouts:
        print(f"no rollouts in {fd.root / 'rollouts'}")
    for x in [] if args.json else rollouts:
        print(summary(x))
    return 0


def _abort(args: argparse.Namespace, rollout_id: str) -> int:
    from edgeguard.fleet.rollout import Rollout, RolloutEngine, abort_marker  # noqa: PLC0415

    fd = _fleet(args)
    r = Rollout.load(fd.root, rollout_id)
    if r.final:
        raise ConfigError(f"rollout {rollout_id} is {r.state} already")
    marker = abort_marker(fd.root, rollout_id)
    marker.touch(mode=0o600)
    lock = _try_lock(fd.root, rollout_id)
    if lock is not None:  # nobody runs it: stop it from here
        try:
            r = Rollout.load(fd.root, rollout_id)
            t = _transport(args, fd)
            try:
                RolloutEngine(r, root=fd.root, transport=t, bundle=lambda: b"").abort()
            finally:
                t.close()
        finally:
            os.close(lock)
    else:  # its process is running: it sees the marker and stops by itself
        deadline = time.monotonic() + 120
        while not r.final:
            if time.monotonic() > deadline:
                print(f"edgeguard: rollout {rollout_id}: its process has not stopped within 120 s",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)  # polling another process's state file: there is nothing to wait on
            r = Rollout.load(fd.root, rollout_id)
    print(summary(r))
    return 0
