"""``edgeguard fleet ...``: operator-side commands. ``fleet ingest`` writes the fleet's messages to PostgreSQL
(see docs/ingest.md); other fleet tools register their own subcommands under ``fleet`` here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError

from . import (
    _fleet_command_cmds,
    _fleet_dashboard_cmds,
    _fleet_provision_cmds,
    _fleet_rollout_cmds,
    _fleet_view_cmds,
)

_STATUS_MAX_BYTES = 64 * 1024


def register(sub: argparse._SubParsersAction[Any]) -> None:
    fleet = sub.add_parser(
        "fleet",
        help="operate a fleet: CA, devices, broker config, sealing, commands, status, ingest (docs/fleet.md)",
        description="Operator-side fleet tools (docs/fleet.md, docs/ingest.md). Never needed on a device.",
    )
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND")

    def usage(_args: argparse.Namespace) -> int:
        fleet.print_help()
        return 2

    fleet.set_defaults(handler=usage)
    _fleet_provision_cmds.register_fleet(fsub)
    _fleet_command_cmds.register_fleet(fsub)
    _fleet_view_cmds.register_fleet(fsub)
    _fleet_dashboard_cmds.register_fleet(fsub)
    _fleet_rollout_cmds.register_fleet(fsub)
    p = fsub.add_parser(
        "ingest",
        help="store the fleet's results, heartbeats, status and events in PostgreSQL, exactly once",
        description="Subscribe (MQTT 5 shared subscription) to a fleet and write what it publishes to "
        "PostgreSQL; a message is acknowledged to the broker only after its row is committed. "
        "Flags override the [ingest] table of the config file. SIGTERM/SIGINT stop after the current batch.",
    )
    p.add_argument("-c", "--config", type=Path, metavar="CONFIG.toml", help="file with an [ingest] table")
    p.add_argument("--fleet", help="fleet name (topic level after edgeguard/v1/)")
    p.add_argument("--dsn", help="libpq connection string (keep the password in ~/.pgpass or PGPASSWORD)")
    p.add_argument("--broker", metavar="HOST:PORT", help="MQTT 5 broker")
    p.add_argument(
        "--client-id", help="fixed MQTT client id: the broker keeps this worker's session under it"
    )
    p.add_argument("--group", help="shared-subscription group (workers of one group split the messages)")
    p.add_argument("--batch-size", type=int, dest="batch_max", help="rows per transaction at most")
    p.add_argument(
        "--flush-interval", type=float, dest="flush_interval_s", help="seconds a batch waits at most"
    )
    p.add_argument("--status-file", type=Path, help="write the status snapshot (JSON) here, atomically")
    p.add_argument(
        "--migrate", action="store_true", help="create or migrate the schema and partitions, then exit"
    )
    p.add_argument("--status", action="store_true", help="print the status a running worker wrote, then exit")
    p.add_argument("--json", action="store_true", help="with --status: the whole snapshot as JSON")
    p.set_defaults(handler=_ingest)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fleet": args.fleet,
        "dsn": args.dsn,
        "client_id": args.client_id,
        "group": args.group,
        "batch_max": args.batch_max,
        "flush_interval_s": args.flush_interval_s,
        "status_file": args.status_file,
    }
    if args.broker is not None:
        host, sep, port = args.broker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--broker {args.broker!r}: expected HOST:PORT")
        out["broker_host"], out["broker_port"] = host, int(port)
    return out


def _ingest(args: argparse.Namespace) -> int:
    if args.status:
        return _print_status(args)
    # Imported here: psycopg is an optional dependency (extra "fleet") and only this command needs it.
    try:
        from edgeguard.fleet.ingest import (  # noqa: PLC0415
            IngestWorker,
            load_ingest_config,
            maintain_partitions,
            migrate,
        )
    except ImportError as exc:
        raise ConfigError(
            f"fleet ingest needs the 'fleet' extra (pip install 'edgeguard[fleet]'): {exc}"
        ) from None
    import psycopg  # noqa: PLC0415

    cfg = load_ingest_config(args.config, **_overrides(args))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.migrate:
        import datetime as dt  # noqa: PLC0415

        try:
            with psycopg.connect(cfg.dsn, autocommit=True, connect_timeout=cfg.db_connect_timeout_s) as conn:
                applied = migrate(conn)
                m = maintain_partitions(
                    conn,
                    today=dt.datetime.now(dt.timezone.utc).date(),
                    retention_days=cfg.retention_days,
                    ahead_days=cfg.partitions_ahead_days,
                )
        except psycopg.Error as exc:
            raise ConfigError(
                f"database: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
            ) from None
        except RuntimeError as exc:
            raise ConfigError(f"database: {exc}") from None
        print(
            f"schema: applied {applied or 'nothing (up to date)'}; partitions created {len(m.created)},"
            f" dropped {len(m.dropped)}"
        )
        return 0
    worker = IngestWorker(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    status_path = cfg.status_file

    def write_status(snap: dict[str, Any]) -> None:
        if status_path is None:
            return
        from edgeguard._atomic import atomic_write  # noqa: PLC0415

        try:
            atomic_write(status_path, json.dumps(snap).encode(), mode=0o644)
        except OSError as exc:  # status is advisory: a full disk must not stop the ingest
            logging.getLogger("edgeguard.fleet.ingest").warning("ingest: status file not written: %s", exc)

    code = worker.run(stop, write_status)
    if worker.fatal is not None:
        print(f"edgeguard: ingest: {worker.fatal}", file=sys.stderr)
    return code


def _read_status(path: Path) -> dict[str, Any]:
    # Opened once, without following links, the descriptor checked and read with a bound (keys.py pattern).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"status file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"status file {path}: not a regular file")
        if st.st_size > _STATUS_MAX_BYTES:
            raise ConfigError(f"status file {path}: larger than {_STATUS_MAX_BYTES} bytes")
        data = os.read(fd, _STATUS_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
    except ValueError:
        raise ConfigError(f"status file {path}: not JSON") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"status file {path}: not a JSON object")
    return doc


def _print_status(args: argparse.Namespace) -> int:
    cfg_path: Path | None = args.status_file
    if cfg_path is None and args.config is not None:
        from edgeguard.fleet.ingest._config import load_ingest_config  # noqa: PLC0415

        cfg_path = load_ingest_config(args.config, **_overrides(args)).status_file
    if cfg_path is None:
        raise ConfigError("--status needs --status-file (or status_file in the config)")
    doc = _read_status(cfg_path)
    age = time.time() - float(doc.get("time", 0))
    state = str(doc.get("state", "unknown"))
    reason = doc.get("reason")
    if age > 60:
        state, reason = "stale", f"status written {age:.0f} s ago: is the worker running?"
    if args.json:
        print(json.dumps({**doc, "state": state, "reason": reason}))
    else:
        c = doc.get("counters", {})
        print(state + (f": {reason}" if reason else ""))
        print(
            f"pending {doc.get('pending')}  lag {doc.get('lag_s')} s  inserted {c.get('inserted')}  "
            f"duplicates {c.get('duplicates')}  rejected {c.get('rejected')}  batches {c.get('batches')}"
        )
    return 0 if state == "ok" else 1
