"""``edgeguard init DIR``: a working development device in one command.

Keys, a tokens file, a sealed zoo model and a config that uses them, all inside DIR, so that
``edgeguard run -c DIR/edgeguard.toml`` starts as is. The publisher key sits next to the device key here
because one machine plays both roles while developing; in production it stays offline (docs/bundle.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from edgeguard import zoo
from edgeguard._atomic import atomic_write
from edgeguard.bundle import RollbackFloor, pack_bundle, read_model
from edgeguard.errors import ConfigError, EdgeGuardError
from edgeguard.keys import generate_keypair, load_publisher_key, load_recipient_key

from ._golden import synthetic_golden
from ._token_cmds import new_token, render_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["register", "CONFIG_TEMPLATE"]

DEFAULT_MODEL = "yolov8n"
# Only models with a META can be sealed by init (the quantizer-suite models have none).
_MODELS = [key for key, item in zoo.ITEMS.items() if item.kind == "model" and key in zoo.META]

# The one template of the generated config: every path is relative to the file, so DIR can move.
CONFIG_TEMPLATE = """\
# Development device made by `edgeguard init` (every key: examples/edgeguard.toml, docs/service.md).
[device]
id = "{device_id}"
fleet = "dev"
state_dir = "state"                 # outbox, rollback floors, supervisor state

[model]
bundle = "model.egm"                # {model}, sealed for keys/device.pub
trust = ["keys/publisher.pub"]      # development only: keep publisher.key offline in production
device_key = "keys/device.key"
{model_name_line}
[sources.api]
host = "127.0.0.1"                  # loopback only
port = {port}
tokens_file = "tokens"              # edgeguard token add|list|revoke

[link]
# A broker here is optional: results wait in the outbox (state/) until one answers.
host = "127.0.0.1"
port = 1883
"""

_INIT_HELP = f"""\
Create a development device in DIR: keys/ (publisher and device), tokens (mode 0600: `app` with scopes
infer,status and `ops` with admin,status), model.egm (a zoo model sealed for this device, with golden vectors)
and edgeguard.toml (mode 0600: API on 127.0.0.1, state in DIR/state, MQTT at 127.0.0.1:1883 if one is
running). Then `edgeguard run -c DIR/edgeguard.toml` serves it.

The default model is {DEFAULT_MODEL}: it runs with the base install (onnxruntime, no extra), takes a photo
as is (letterbox preprocessing and YOLO box decoding are in its bundle) and answers with labelled boxes.
It is NudeNet's detector: faces and body parts, not COCO objects.

example:
  edgeguard init mydevice
  edgeguard init mydevice --model blazeface --port 8781 --force"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser(
        "init",
        help="create a working development device (keys, tokens, sealed model, config) in DIR",
        description=_INIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="directory to create (must be empty unless --force)")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=_MODELS,
                   help=f"zoo model to seal (default: {DEFAULT_MODEL})")
    p.add_argument("--port", type=int, default=8780, help="local API port on 127.0.0.1 (default: 8780)")
    p.add_argument(
        "--device-id", default="dev-1", help="device id in MQTT topics and result ids (default: dev-1)"
    )
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR: keys there are kept, the other files replaced "
                   "(default: refuse)")
    p.set_defaults(handler=_init)


def _model_name_line(model: str) -> str:
    # `model.name` pins which model a device accepts; older runtimes refuse unknown keys, so the line is
    # written only when this runtime's config knows it.
    from edgeguard.service.config import ModelSection  # noqa: PLC0415 - the service stack only for init

    known = {f.name for f in dataclasses.fields(ModelSection)}
    return f'name = "{model}"\n' if "name" in known else ""


def _init(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 1..65535")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not args.force:
        raise ConfigError(f"{root} is not empty (use --force to write into it; keys there are kept)")
    from edgeguard.service.config import DeviceSection, parse_config  # noqa: PLC0415

    DeviceSection(id=args.device_id)  # checked before it goes into the TOML text (no quotes, no newlines)
    # Validate the config text before anything is written: a bad option is one line, not a half-made DIR.
    text = CONFIG_TEMPLATE.format(
        device_id=args.device_id, model=args.model, port=args.port,
        model_name_line=_model_name_line(args.model),
    )
    parse_config(tomllib.loads(text), path=root.resolve() / "edgeguard.toml")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)

    keys = root / "keys"
    for kind in ("publisher", "device"):
        if not (keys / f"{kind}.key").exists():
            generate_keypair(kind, keys)
    app, ops = new_token(), new_token()
    atomic_write(
        root / "tokens",
        (
            "# name  scopes  token   (edgeguard token add|list|revoke -c edgeguard.toml)\n"
            f"{render_line('app', ('infer', 'status'), app)}\n"
            f"{render_line('ops', ('admin', 'status'), ops)}\n"
        ).encode(),
        mode=0o600,
    )
    try:
        model_path = zoo.fetch(args.model, quiet=not os.isatty(1))
    except zoo.ZooError as exc:
        raise EdgeGuardError(str(exc)) from None
    model, model_format = read_model(model_path)
    meta = dict(zoo.META[args.model])
    # With --force on a device that already served, its rollback floor may be above 1: seal at the floor
    # (accepted, as floors are inclusive) so the device does not refuse its own fresh bundle.
    version = max(1, RollbackFloor(root / "state").get(args.model))
    data = pack_bundle(
        model,
        name=args.model,
        version=version,
        sign_key=load_publisher_key(keys / "publisher.key"),
        recipients=[load_recipient_key(keys / "device.pub")],
        model_format=model_format,
        golden=synthetic_golden(model, model_format=model_format, meta=meta),
        meta=meta,
    )
    atomic_write(root / "model.egm", data, mode=0o644)
    config = root / "edgeguard.toml"
    atomic_write(config, text.encode(), mode=0o600)
    q = shlex.quote
    print(f"created {root}: keys/, tokens (app: infer,status; ops: admin,status), "
          f"model.egm ({args.model} v{version}), edgeguard.toml")
    print("next:")
    print(f"  edgeguard run -c {q(str(config))}          # the service (Ctrl-C stops it)")
    print(f"  edgeguard status -c {q(str(config))}       # in another terminal")
    print(f"  curl -s -H 'Authorization: Bearer {app}' --data-binary @photo.jpg \\")
    print(f"       -H 'Content-Type: image/jpeg' http://127.0.0.1:{args.port}/v1/infer")
    return 0
