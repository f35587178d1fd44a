"""``edgeguard fingerprint make|verify``: ownership proof for a published model (docs/security.md).

``make`` chooses a secret trigger set on the publisher's model and writes it 0600; ``verify`` runs a suspect
model (ONNX or TFLite) on it and answers match (exit 0) or no match (exit 1). A bad trigger file or model is a
usage error (exit 2), one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError

__all__ = ["register"]

_MAKE_EPILOG = """\
examples:
  edgeguard fingerprint make yolov8n.onnx --out trigger.npz --input-shape images=1,3,320,320
  edgeguard fingerprint make model.tflite --out trigger.npz --count 48 --range 0,1
The trigger file is written with mode 0600: keep it secret (whoever holds it can tune a copy to evade it)."""

_VERIFY_EPILOG = """\
examples:
  edgeguard fingerprint verify suspect.onnx --trigger trigger.npz --input-shape images=1,3,320,320
  edgeguard fingerprint verify suspect.tflite --trigger trigger.npz --threshold 0.9 --json
exit codes: 0 match, 1 no match, 2 bad model or trigger file."""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "fingerprint",
        help="publisher side: make a secret trigger set for a model, or check a suspect model against it",
        description="Ownership proof: a secret set of inputs on which this model's answers are distinctive "
        "and stable. A copy of the model (quantized, slightly changed) answers them like the model; an "
        "unrelated model does not. Forward passes only (docs/security.md, \"Ownership proof\").",
    )
    fsub = p.add_subparsers(dest="fingerprint_command", metavar="SUBCOMMAND", required=True)
    make = fsub.add_parser(
        "make", help="choose a secret trigger set on MODEL and write it (mode 0600)",
        description="Draws secret random inputs, keeps those whose answers are stable under small changes "
        "and unlike each other, and writes them with the model's answers.",
        epilog=_MAKE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument("model", type=Path, metavar="MODEL", help="the publisher's .onnx or .tflite model")
    make.add_argument("--out", type=Path, required=True, metavar="TRIGGER.npz", help="trigger file to write")
    make.add_argument("--count", type=int, default=32,
                      help="triggers to keep (2..1024; models with few outputs, e.g. 2 classes, want 64+)")
    make.add_argument("--threshold", type=float, default=0.75,
                      help="match rate that `verify` calls a match, stored in the file (0..1]")
    make.add_argument("--range", default=None, metavar="LO,HI",
                      help="value range of the inputs (default: 0,1 for float inputs, the dtype's range for "
                      "8-bit integers, 0,255 for wider ones)")
    make.add_argument("--input-shape", action="append", default=[], metavar="NAME=D,D,...",
                      help="static shape for an input with dynamic axes, e.g. images=1,3,320,320 (repeat)")
    make.set_defaults(handler=_make)
    verify = fsub.add_parser(
        "verify", help="does SUSPECT answer the trigger set like the publisher's model? exit 0 yes, 1 no",
        description="Runs SUSPECT on the triggers and prints the match rate, the threshold and how likely "
        "that rate is by chance for an unrelated model.",
        epilog=_VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("suspect", type=Path, metavar="SUSPECT", help="the .onnx or .tflite model to check")
    verify.add_argument("--trigger", type=Path, required=True, metavar="TRIGGER.npz",
                        help="trigger file from `fingerprint make` (mode 0600)")
    verify.add_argument("--threshold", type=float, default=None,
                        help="match rate needed, overriding the file's (0..1]")
    verify.add_argument("--input-shape", action="append", default=[], metavar="NAME=D,D,...",
                        help="static shape for an input with dynamic axes, e.g. images=1,3,320,320")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr when it is a terminal; nothing when piped."""
    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn  # noqa: PLC0415

    with Progress(what, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _parse_range(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"--range {value!r}: expected LO,HI") from None
    if not lo < hi:
        raise ConfigError(f"--range {value!r}: LO must be below HI")
    return lo, hi


def _threshold(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigError(f"--threshold {value}: must be within (0, 1]")
    return value


def _make(args: argparse.Namespace) -> int:
    from edgeguard.fingerprint import load_model, make_trigger, parse_shapes, save_trigger  # noqa: PLC0415

    if not 2 <= args.count <= 1024:
        raise ConfigError(f"--count {args.count}: must be within 2..1024")
    threshold = _threshold(args.threshold)
    assert threshold is not None
    span = _parse_range(args.range)
    if not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {args.out.parent} does not exist")
    with load_model(args.model, shapes=parse_shapes(args.input_shape)) as model:
        ranges = {s.name: span for s in model.inputs} if span is not None else None
        with _progress("probing the model") as say:
            try:
                trigger = make_trigger(model, count=args.count, threshold=threshold, ranges=ranges,
                                       progress=say)
            except ValueError as exc:
                raise ConfigError(f"{args.model}: {exc}") from None
    save_trigger(args.out, trigger)
    print(f"wrote {trigger.count} triggers ({trigger.index.size} output values each) to {args.out} "
          "(mode 0600): keep it secret")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edgeguard.fingerprint import compare, load_model, load_trigger, parse_shapes  # noqa: PLC0415

    threshold = _threshold(args.threshold)
    trigger = load_trigger(args.trigger)
    with load_model(args.suspect, shapes=parse_shapes(args.input_shape)) as model, \
            _progress("running the triggers") as say:
        result = compare(model, trigger, threshold=threshold, progress=say)
    if args.json:
        print(json.dumps(result.to_json()))
    elif result.reason:
        print(f"no match: {result.reason}")
    else:
        verdict = "match" if result.ok else "no match"
        print(f"{verdict}: {result.matched}/{result.count} triggers answered like the publisher's model "
              f"(rate {result.rate:.3f}, threshold {result.threshold:.3f}; chance for an unrelated model "
              f"{result.chance:.1e})")
    return 0 if result.ok else 1
