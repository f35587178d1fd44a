"""``edgeguard explain IMAGE -o heat.png``: which regions of an image decide the model's top class or box.

Through a sealed bundle (``--bundle``, ``--trust``, ``--device-key``: the engine the device serves with) or,
for a publisher before sealing, a model file and its ``pack --meta`` JSON (``--model``, ``--meta``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError, InputRejected

__all__ = ["register"]

_EPILOG = """\
examples:
  edgeguard explain --bundle model.egm --trust keys/publisher.pub --device-key keys/device.key \\
      astronaut.png -o heat.png
  edgeguard explain --model yolov8n.onnx --meta examples/yolov8n-meta.json astronaut.png -o heat.png --json
The heat is the mean drop of the answer's score when a window of the image is hidden (occlusion
sensitivity): 1 + rows x cols forward passes, never more than --max-passes."""

_MAX_META_BYTES = 1024 * 1024


def register(sub: argparse._SubParsersAction[Any]) -> None:
    from edgeguard.cli._bundle_cmds import add_trust_args  # noqa: PLC0415

    p = sub.add_parser(
        "explain", help="heatmap of the image regions that decide a model's top class or box",
        description="Occlusion-sensitivity heatmap for the model's top box (yolov8), top class (topk) or "
        "strongest output, written as a PNG overlay. Forward passes only, batched when the model takes a "
        "batch axis; a progress bar on a terminal.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="PNG or JPEG photo")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="HEAT.png", help="PNG to write")
    p.add_argument("--bundle", type=Path, metavar="B", help="sealed bundle, with --trust, --device-key")
    add_trust_args(p)
    for action in p._actions:  # --trust is needed with --bundle only (checked in _check)
        if action.dest == "trust":
            action.required = False
    p.add_argument("--device-key", type=Path, metavar="KEY", help="device.key (with --bundle)")
    p.add_argument("--profile", metavar="P", help="device profile name or .toml path (default: detected)")
    p.add_argument("--model", type=Path, metavar="M", help="publisher side: .onnx/.tflite model, with --meta")
    p.add_argument("--meta", type=Path, metavar="META.json",
                   help="the model's `pack --meta` JSON (inputs, preprocess, postprocess), with --model")
    p.add_argument("--window", type=int, default=None,
                   help="occluding window side in image pixels (default: the longer side / 8)")
    p.add_argument("--max-passes", type=int, default=257, help="forward passes at most (the image + grid)")
    p.add_argument("--batch", type=int, default=8, help="occluded images per batch")
    p.add_argument("--json", action="store_true", help="also print the target and a 16x16 heat grid as JSON")
    p.set_defaults(handler=_explain)


@contextmanager
def _progress() -> Iterator[Callable[[int, int], None]]:
    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn  # noqa: PLC0415

    with Progress("occluding", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("occluding", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _read_image(path: Path) -> Any:
    from edgeguard._safeio import read_checked  # noqa: PLC0415
    from edgeguard.engine.preprocess import ImageLimits, decode_image  # noqa: PLC0415

    limits = ImageLimits()
    data = read_checked(path, what="image", limit=limits.max_encoded_bytes, error=InputRejected).data
    try:
        return decode_image(data, limits=limits, max_decoded_bytes=limits.min_decoded_bytes * 4)
    except InputRejected as exc:
        raise InputRejected(f"{path}: {exc}") from None


def _check(args: argparse.Namespace) -> None:
    if (args.bundle is None) == (args.model is None):
        raise ConfigError("give either --bundle (with --trust and --device-key) or --model (with --meta)")
    if args.bundle is not None and (not args.trust or args.device_key is None):
        raise ConfigError("--bundle needs --trust PUB and --device-key KEY")
    if args.model is not None and args.meta is None:
        raise ConfigError("--model needs --meta META.json (the model's `pack --meta`: inputs, preprocess)")
    if not 2 <= args.max_passes <= 100_000:
        raise ConfigError(f"--max-passes {args.max_passes}: must be within 2..100000")
    if not 1 <= args.batch <= 256:
        raise ConfigError(f"--batch {args.batch}: must be within 1..256")
    if args.window is not None and args.window < 1:
        raise ConfigError(f"--window {args.window}: must be positive")
    if not args.output.parent.is_dir():
        raise ConfigError(f"-o {args.output}: directory {args.output.parent} does not exist")


def _explain(args: argparse.Namespace) -> int:
    from edgeguard._atomic import atomic_write  # noqa: PLC0415
    from edgeguard.explain import explain, overlay_png  # noqa: PLC0415

    _check(args)
    image = _read_image(args.image)  # a bad image is refused before any key or model work
    with _runner(args) as runner, _progress() as say:
        result = explain(image, prepare=runner.prepare, run=runner.run, post=runner.post, order=runner.order,
                         window=args.window, max_passes=args.max_passes, batch=args.batch, progress=say)
    box = result.target.original_box
    atomic_write(args.output, overlay_png(image, result.heatmap.heat, box), mode=0o644)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        what = result.target.label or f"{result.target.kind} {result.target.index}"
        print(f"explained {what} with {result.heatmap.passes} forward passes "
              f"(window {result.heatmap.window}px, stride {result.heatmap.stride}px): {args.output}")
    return 0


@contextmanager
def _runner(args: argparse.Namespace) -> Iterator[Any]:
    from edgeguard.explain import backend_runner, draft_manifest, engine_runner  # noqa: PLC0415

    if args.model is not None:
        from edgeguard._safeio import read_checked  # noqa: PLC0415
        from edgeguard.fingerprint import load_model  # noqa: PLC0415

        raw = read_checked(args.meta, what="--meta", limit=_MAX_META_BYTES, error=ConfigError).data
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--meta {args.meta}: not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"--meta {args.meta}: not a JSON object")
        with load_model(args.model, shapes=_meta_shapes(meta)) as model:
            yield backend_runner(model.backend, draft_manifest(meta, model.format))
        return
    from edgeguard._hardening import harden_process  # noqa: PLC0415
    from edgeguard.bundle import open_bundle  # noqa: PLC0415
    from edgeguard.cli._bundle_cmds import trust_from_args  # noqa: PLC0415
    from edgeguard.cli._engine_cmds import _profile  # noqa: PLC0415
    from edgeguard.engine import Engine  # noqa: PLC0415
    from edgeguard.keys import load_device_key  # noqa: PLC0415

    harden_process(lock_core_limit=False)  # about to hold the device key and the plaintext
    profile, _ = _profile(args)
    key = load_device_key(args.device_key)
    opened = open_bundle(args.bundle, trust=trust_from_args(args), device_key=key,
                         state_dir=None, commit_floor=False)
    with Engine.load(opened, profile=profile) as engine:
        yield engine_runner(engine)


def _meta_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for t in meta.get("inputs", []) if isinstance(meta.get("inputs"), list) else []:
        try:
            shapes[str(t["name"])] = tuple(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError("--meta inputs: each tensor needs a name and a fixed shape") from None
    return shapes
