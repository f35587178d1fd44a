"""``edgeguard quantize MODEL --calibration DATA -o OUT``: int8 quantization with an accuracy guard.

ONNX models are quantized (see ``edgeguard.quantize``); a progress bar shows the steps on stderr and a table
of the candidates, with the choice and the reason, is printed at the end. When no candidate is faster and
within budget the fp32 model is kept ("kept fp32: ..."), which is an answer, exit 0. Pre-quantized TFLite
and ONNX models are checked and accepted as they are. ``edgeguard.quantize`` is imported only when the
command runs: it needs the optional ``quantize`` extra (onnx, sympy), which a device does not install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser(
        "quantize",
        help="quantize an fp32 ONNX model to int8, guarded by accuracy",
        description="Int8 quantization (onnxruntime static QDQ or dynamic) with an accuracy guard: several "
        "candidates (nodes kept fp32 where quantization breaks agreement, other activation types, compute "
        "layers only, dynamic) are measured against fp32 on held-out data, and the fastest that meets the "
        "budget is written; when none does, the fp32 model is kept and written as it is (exit 0). "
        "Pre-quantized int8 .tflite and .onnx models are checked and accepted as they are.",
        epilog="example:\n  edgeguard quantize yolov8n.onnx --calibration photos/ -o yolov8n-int8.onnx \\\n"
        "      --input-shape images=1,3,320,320\n"
        "  (needs the [quantize] extra: pip install 'edgeguard[quantize]', or .venv/bin/pip install -e "
        "'.[quantize]' in a clone)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="fp32 .onnx model (or a pre-quantized .tflite)")
    p.add_argument("--calibration", type=Path, metavar="DATA",
                   help="folder of .png/.jpg images, folder of raw files (byte/sequence models with one "
                   "integer input [1, L]), or an .npz in the inputs' own dtypes (arrays named after the "
                   "inputs, samples stacked on axis 0, or golden-vector '<i>/in/<name>' keys)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="where to write the model")
    p.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]D,D,...",
                   help="static shape for an input with dynamic axes, e.g. images=1,3,320,320 (repeatable)")
    p.add_argument("--budget", type=float, default=None,
                   help="minimum agreement with fp32 in [0, 1] (default by output kind: boxes 0.9 top-box "
                   "IoU, classes 0.9 top-1 agreement, mask 0.8 IoU, others 0.99 cosine)")
    p.add_argument("--preprocess", type=Path, default=None, metavar="FILE.json",
                   help="how calibration images become tensors (the manifest 'preprocess' schema); default: "
                   "letterbox to the model size, RGB, /255, NCHW float32")
    p.add_argument("--samples", type=int, default=32, help="calibration + held-out samples from images")
    p.add_argument("--activations", choices=("uint8", "int8"), default="uint8",
                   help="activation type (uint8 with int8 weights is fastest on x86; measure on ARM)")
    p.add_argument("--no-per-channel", action="store_true", help="per-tensor instead of per-channel weights")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads to time with (0: default)")
    p.add_argument("--bench-runs", type=int, default=30, help="timed runs per candidate")
    p.add_argument("--report", type=Path, default=None, metavar="FILE.json",
                   help="also write the report as JSON (fits the manifest's 'quantization' field)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(handler=_quantize)


def _parse_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise ConfigError(f"--input-shape {value!r}: expected [NAME=]D,D,... with integers") from None
        shapes[name] = shape
    return shapes


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)


def _tflite(args: argparse.Namespace) -> int:
    from edgeguard.quantize import check_tflite  # noqa: PLC0415 - optional extra, see module docstring

    check = check_tflite(args.model)
    if args.model.resolve() != args.output.resolve():
        shutil.copyfile(args.model, args.output)
    if args.report:
        _write_json(args.report, check.to_json())
    if args.json:
        print(json.dumps(check.to_json(), indent=2))
    else:
        print(f"{args.model.name}: pre-quantized TFLite ({check.quantized_tensors} quantized, "
              f"{check.float_tensors} float tensors; inputs {', '.join(check.input_dtypes)}): accepted as is "
              f"-> {args.output}")
    return 0


def _already_quantized(args: argparse.Namespace) -> bool:
    """Accept an ONNX model someone already quantized as it is, like an int8 .tflite; False if it is not."""
    from edgeguard.quantize._prepare import quantized_nodes, read_model  # noqa: PLC0415 - optional extra

    counts = quantized_nodes(read_model(args.model))
    if not counts:
        return False
    if args.model.resolve() != args.output.resolve():
        atomic_write(args.output, args.model.read_bytes(), mode=0o644)
    found = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
    data = {"method": "pre-quantized ONNX (accepted as is)", "path": str(args.model),
            "quantized_nodes": counts}
    if args.report:
        _write_json(args.report, data)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"{args.model.name}: already quantized ONNX ({found}): accepted as is -> {args.output}")
    return True


def _quantize(args: argparse.Namespace) -> int:
    if args.model.suffix.lower() == ".tflite":
        return _tflite(args)
    try:
        import onnx  # noqa: F401, PLC0415 - optional extra, see module docstring
    except ImportError as exc:
        raise ConfigError(f"quantize needs the 'quantize' extra (pip install 'edgeguard[quantize]'): "
                          f"{exc}") from None
    if args.model.is_file() and _already_quantized(args):
        return 0
    if args.calibration is None:
        raise ConfigError("--calibration DATA is required to quantize an ONNX model")
    try:
        from edgeguard.quantize import (  # noqa: PLC0415 - optional extra, see module docstring
            QuantizeError,
            QuantizeOptions,
            QuantizeReport,
            quantize_onnx,
        )
    except ImportError as exc:
        raise ConfigError(f"quantize needs the 'quantize' extra (pip install 'edgeguard[quantize]'): "
                          f"{exc}") from None
    shapes = _parse_shapes(args.input_shape)
    if "" in shapes:
        shapes = _single_input_shape(args.model, shapes)
    preprocess = None
    if args.preprocess is not None:
        try:
            preprocess = json.loads(args.preprocess.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--preprocess {args.preprocess}: {exc}") from None
    try:
        options = QuantizeOptions(
            budget=args.budget, input_shapes=shapes, preprocess=preprocess, samples=args.samples,
            per_channel=not args.no_per_channel, activations=args.activations, bench_runs=args.bench_runs,
            threads=args.threads,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    console = Console(stderr=True)
    report: QuantizeReport
    # onnxruntime's quantizer logs through the root logger (e.g. "Axis 1 is out-of-range for weight ..." on
    # batch-norm weights); those notes would tear the progress bar, and the report says what matters.
    quiet = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(quiet)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("quantizing", total=1)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            try:
                report = quantize_onnx(args.model, args.calibration, args.output, options=options,
                                       progress=progress)
            except QuantizeError as exc:
                if isinstance(exc.report, QuantizeReport):
                    _show(exc.report, args)
                raise
            except (ConfigError, OSError):
                raise
            except Exception as exc:
                # An onnxruntime or onnx failure outside any guarded stage: one line, never a traceback.
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise QuantizeError(f"quantizing {args.model.name} failed: {type(exc).__name__}: {first}") \
                    from None
    finally:
        root.removeHandler(quiet)
    if report.kept_fp32:
        # Kept fp32 is an answer: -o receives the original file byte for byte, so the next step of a
        # pipeline (pack) still finds a model, and the table says which one it is.
        if args.model.resolve() != args.output.resolve():
            atomic_write(args.output, args.model.read_bytes(), mode=0o644)
        report = dataclasses.replace(report, output=str(args.output))
    _show(report, args)
    return 0


def _single_input_shape(model: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    import onnx  # noqa: PLC0415 - optional extra, see module docstring

    from edgeguard.quantize._prepare import input_shapes  # noqa: PLC0415

    try:
        declared = input_shapes(onnx.load(str(model), load_external_data=False))
    except Exception as exc:
        raise ConfigError(f"{model}: not a readable ONNX model: {exc}") from None
    if len(declared) != 1:
        names = ", ".join(declared)
        raise ConfigError(f"--input-shape without NAME= needs a single-input model; inputs: {names}")
    shapes[next(iter(declared))] = shapes.pop("")
    return shapes


def _show(report: Any, args: argparse.Namespace) -> None:
    if args.report:
        _write_json(args.report, report.to_json())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return
    table = Table(title=f"int8 candidates for {Path(report.model).name} (fp32 {report.fp32_ms:.2f} ms)")
    for column in ("candidate", "fp32 nodes", "agreement", "budget", "ms", "speed-up", "verdict"):
        left = column in ("candidate", "agreement", "verdict")
        table.add_column(column, justify="left" if left else "right")
    for c in report.candidates:
        if c.error:
            table.add_row(c.name, str(len(c.excluded)), c.error, "", "", "", "[red]failed[/]")
            continue
        agreement = ", ".join(f"{a.value:.3f}" for a in c.agreements)
        budget = ", ".join(f"{b:g}" for b in report.budgets)
        verdict = "[bold green]chosen[/]" if c.name == report.chosen else (
            ("passes" if (c.speedup or 0.0) >= 1.0 else "[yellow]not faster[/]") if c.passes
            else "[red]below budget[/]")
        if c.auto_excluded:
            verdict += f" (+{len(c.auto_excluded)} nodes fp32 where QDQ failed)"
        ms = f"{c.latency_ms:.2f}" if c.latency_ms else "-"
        table.add_row(c.name, str(len(c.excluded) + len(c.auto_excluded)), agreement, budget, ms,
                      f"{c.speedup:.2f}x" if c.speedup else "-", verdict)
    out = Console()
    metrics = next((c.agreements for c in report.candidates if c.agreements), ())
    out.print(f"calibration: {report.calibration}; input shapes: {report.input_shapes}; "
              f"opset {report.opset[0]} -> {report.opset[1]}; agreement = "
              + ", ".join(f"{a.metric} ({a.kind})" for a in metrics), soft_wrap=True, markup=False)
    for step in report.steps:
        out.print(f"preparation: {step}", soft_wrap=True, markup=False)
    out.print(table)
    out.print(f"choice: {report.reason}", soft_wrap=True, markup=False)
    if report.output:
        what = "the original fp32 model" if report.kept_fp32 else "the int8 model"
        out.print(f"wrote {what} to {report.output}", soft_wrap=True, markup=False)
