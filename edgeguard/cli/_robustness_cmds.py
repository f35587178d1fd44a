"""``edgeguard robustness MODEL``: black-box attacks (SPSA FGSM/PGD) and the feature-squeezing detector,
measured side by side (edgeguard/robustness, docs/security.md "Adversarial inputs")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.errors import ConfigError

_RAW = argparse.RawDescriptionHelpFormatter

_HELP = """\
Attack a classifier with forward passes only (FGSM and PGD on an SPSA gradient estimate) at several
epsilons, and measure its feature-squeezing detector: the threshold is calibrated on clean calibration
inputs for --fpr exactly as `pack --adversarial` does, then the detection rate is counted over the
successful attacks and the false-positive rate over clean test inputs.

MODEL is `digits` (a small MLP this command trains, seeded, on scikit-learn's real digits data set, taken
from the scikit-learn wheel by the zoo), `ppocr-cls` (PP-OCR's text-line orientation classifier from the
zoo), or an .onnx classifier with a dynamic batch axis whose first output holds class probabilities
(--softmax for logits). --data is `digits`, `text-lines` (crops of the printed lines of skimage's page.png,
upright and upside down: the data for ppocr-cls), an .npz with `x` (inputs, batch first, in the model's
input layout) and `y` (integer labels), or a directory of images in one sub-directory per class index
(DIR/0/*.png, DIR/1/*.jpg, ...) turned into tensors by the `preprocess` of --meta (the device's own
preprocessing); for all but digits, half calibrates and half is attacked.

example:
  edgeguard robustness digits --plot robustness.png
  edgeguard robustness ppocr-cls --data text-lines --eps 0.05,0.1,0.2 --median 2 --pgd-steps 5
  edgeguard robustness classifier.onnx --data held_out.npz --eps 0.01,0.02,0.05 --json"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("robustness", help="black-box attacks and the adversarial-input detector, measured",
                       description=_HELP, formatter_class=_RAW)
    p.add_argument("model", metavar="MODEL",
                   help="`digits` (built-in), `ppocr-cls` (zoo) or a classifier .onnx")
    p.add_argument("--data", metavar="DATA", default="digits",
                   help="`digits`, `text-lines`, an .npz with x and y, or DIR/<class>/<image> "
                   "(default: digits)")
    p.add_argument("--meta", type=Path, metavar="FILE.json",
                   help="the model's pack --meta: inputs, outputs, and preprocess for an image DIR (default: "
                   "read from the model)")
    p.add_argument("--eps", default="0.05,0.1,0.12,0.15,0.2,0.3",
                   help="comma-separated L-inf radii, in input units (default: 0.05,0.1,0.12,0.15,0.2,0.3)")
    p.add_argument("--attacks", default="fgsm,pgd", help="fgsm, pgd or both (default: fgsm,pgd)")
    p.add_argument("--samples", type=int, default=300, help="test inputs attacked (default: 300)")
    p.add_argument("--fpr", type=float, default=0.05,
                   help="detector's target false-positive rate (default: 0.05)")
    p.add_argument("--bits", type=int, default=3, help="bit-depth squeezer, bits; 0 = off (default: 3)")
    p.add_argument("--median", type=int, default=0,
                   help="median squeezer window; 0 = off (default: 0, right for 8x8 digits; 2 for photos)")
    p.add_argument("--joint", action="store_true",
                   help="one squeezed version (bits, then median) instead of one per squeezer (default: off)")
    p.add_argument("--search", action="store_true",
                   help="choose the squeezer set (bit depths 1-5, medians 2/3; up to --max-squeezers, "
                   "normalised score) by attacking the calibration split only; overrides --bits/--median/"
                   "--joint (e.g. edgeguard robustness digits --search --fpr 0.04)")
    p.add_argument("--max-squeezers", type=int, default=2, metavar="N",
                   help="with --search: at most N squeezed versions per input, 1..4 (default: 2)")
    p.add_argument("--softmax", action="store_true", help="the model outputs logits (default: probabilities)")
    p.add_argument("--spsa-samples", type=int, default=32, help="SPSA directions per gradient (default: 32)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed: splits, training, SPSA (default: 0)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the plot here (default: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: a table)")
    p.set_defaults(handler=_robustness)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < 1e6 for v in values):
        raise ConfigError(f"--{what}: expected positive numbers, got {text!r}")
    return values


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"], np.float32), np.asarray(npz["y"]).astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--data {path}: an .npz with arrays x and y is needed ({exc})") from None
    if len(x) != len(y) or len(y) < 4:
        raise ConfigError(f"--data {path}: x has {len(x)} rows and y {len(y)}; "
                          "at least 4 matching rows needed")
    return x, y


_MAX_IMAGES = 10_000


def _load_image_dir(root: Path, meta_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """DIR/<class index>/<image>: each image through the --meta preprocess, labelled by its directory."""
    from edgeguard._safeio import read_checked  # noqa: PLC0415
    from edgeguard.bundle._pack import _tensor_from_meta, load_meta  # noqa: PLC0415
    from edgeguard.engine.preprocess import Preprocessor  # noqa: PLC0415
    from edgeguard.robustness import probe_manifest  # noqa: PLC0415

    if meta_path is None:
        raise ConfigError(f"--data {root} is a directory of images: --meta must declare its preprocess")
    meta = load_meta(meta_path)
    if "preprocess" not in meta or "inputs" not in meta:
        raise ConfigError(f"--meta {meta_path}: an image directory needs inputs and preprocess")
    manifest = probe_manifest([_tensor_from_meta(t, "inputs") for t in meta["inputs"]], [])
    manifest = type(manifest)(**{**{f: getattr(manifest, f) for f in manifest.__dataclass_fields__},
                                 "preprocess": meta["preprocess"]})
    pre = Preprocessor.from_manifest(manifest)
    assert pre is not None
    xs: list[np.ndarray] = []
    ys: list[int] = []
    classes = sorted((d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and d.name.isdigit()),
                     key=lambda d: int(d.name))
    for folder in classes:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or len(xs) >= _MAX_IMAGES:
                continue
            raw = read_checked(path, what="image", limit=20 * 1024 * 1024, error=ConfigError).data
            tensors = pre(raw).tensors
            xs.append(next(iter(tensors.values()))[0])
            ys.append(int(folder.name))
    if len(set(ys)) < 2 or len(ys) < 4:
        raise ConfigError(f"--data {root}: at least 4 images in at least 2 class directories (0/, 1/, ...)")
    return np.stack(xs).astype(np.float32), np.asarray(ys, np.int64)


def _robustness(args: argparse.Namespace) -> int:
    import onnxruntime as ort  # noqa: PLC0415 - heavy

    from edgeguard.bundle._pack import _tensor_from_meta  # noqa: PLC0415
    from edgeguard.bundle._reference import introspect  # noqa: PLC0415
    from edgeguard.robustness import (  # noqa: PLC0415
        DIGITS_META,
        SpsaConfig,
        evaluate,
        load_digits,
        mlp_onnx,
        plot_report,
        probe_manifest,
        train_digits_mlp,
    )

    eps = _floats(args.eps, "eps")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not attacks or any(a not in ("fgsm", "pgd") for a in attacks):
        raise ConfigError(f"--attacks: fgsm and/or pgd, got {args.attacks!r}")
    if not 1 <= args.max_squeezers <= 4:
        raise ConfigError(f"--max-squeezers must be in 1..4, got {args.max_squeezers}")
    if args.samples < 1 or args.spsa_samples < 1 or args.pgd_steps < 1:
        raise ConfigError("--samples, --spsa-samples and --pgd-steps must be at least 1")
    rng_seed = args.seed
    if args.data == "digits":
        digits = load_digits()
        train, cal, test = digits.split(0.6, 0.2, 0.2, seed=rng_seed)
        cal_xy, test_xy = (cal.x, cal.y), (test.x, test.y)
    else:
        if args.data == "text-lines":
            from edgeguard.robustness._textlines import text_lines  # noqa: PLC0415

            x, y = text_lines(seed=rng_seed)
        elif Path(args.data).is_dir():
            x, y = _load_image_dir(Path(args.data), args.meta)
        else:
            x, y = _load_npz(Path(args.data))
        order = np.random.default_rng(rng_seed).permutation(len(y))
        half = len(y) // 2
        cal_xy, test_xy = (x[order[:half]], y[order[:half]]), (x[order[half:]], y[order[half:]])
        train = None
    if args.model == "digits":
        if args.data != "digits" or train is None:
            raise ConfigError("MODEL digits is trained on --data digits; give an .onnx for other data")
        model = mlp_onnx(train_digits_mlp(train, seed=rng_seed))
        meta: dict[str, Any] = DIGITS_META
        inputs = tuple(_tensor_from_meta(t, "inputs") for t in meta["inputs"])
        outputs = tuple(_tensor_from_meta(t, "outputs") for t in meta["outputs"])
        post = meta["postprocess"]
        name = "digits-mlp"
    else:
        if args.model == "ppocr-cls":
            from edgeguard import zoo  # noqa: PLC0415

            path = zoo.fetch("ppocr-cls")
        else:
            path = Path(args.model)
        model = path.read_bytes()
        inputs, outputs = introspect(model, "onnx")
        post, name = None, path.name
        if args.meta is not None:
            from edgeguard.bundle._pack import load_meta  # noqa: PLC0415

            meta = load_meta(args.meta)
            if "inputs" in meta:
                inputs = tuple(_tensor_from_meta(t, "inputs") for t in meta["inputs"])
            if "outputs" in meta:
                outputs = tuple(_tensor_from_meta(t, "outputs") for t in meta["outputs"])
            post = meta.get("postprocess")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]

    def run(feed: Any) -> dict[str, np.ndarray]:
        return dict(zip(out_names, session.run(None, dict(feed)), strict=True))

    n = min(args.samples, len(test_xy[1]))
    report = evaluate(
        run, manifest=probe_manifest(inputs, outputs, post), calibration=cal_xy,
        test=(test_xy[0][:n], test_xy[1][:n]), eps=eps, attacks=attacks,
        fpr=args.fpr, bits=args.bits, median=args.median, joint=args.joint,
        search=args.search, max_squeezers=args.max_squeezers,
        softmax=True if args.softmax else None,
        spsa=SpsaConfig(samples=args.spsa_samples), pgd_steps=args.pgd_steps, seed=rng_seed, name=name,
        progress=_progress if sys.stderr.isatty() else (lambda _: None),
    )
    if args.plot is not None:
        plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    _print_table(report, args.plot)
    return 0


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr)


def _print_table(report: Any, plot: Path | None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    console.print(f"[bold]{report.model}[/]: clean accuracy {report.clean_accuracy:.3f} on "
                  f"{report.test_samples} test inputs; detector threshold {report.threshold:.4f} "
                  f"(calibrated on {report.calibration_samples} clean inputs for FPR {report.target_fpr:g}), "
                  f"clean FPR measured {report.clean_fpr:.3f}; squeezers {report.squeezers}")
    table = Table("attack", "eps", "accuracy", "successful", "detected", "detection rate")
    for r in report.rows:
        rate = "-" if r.detection_rate is None else f"{r.detection_rate:.3f}"
        table.add_row(r.attack, f"{r.eps:g}", f"{r.accuracy:.3f}", str(r.successful), str(r.detected), rate)
    console.print(table)
    for attack, goal in report.to_json()["goal"].items():
        verdict = "[green]met[/]" if goal["met"] else "[red]not met[/]"
        where = "accuracy never halved" if goal["eps"] is None else (
            f"at eps {goal['eps']:g} (accuracy halves): detection "
            f"{'-' if goal['detection_rate'] is None else format(goal['detection_rate'], '.3f')}, "
            f"clean FPR {goal['clean_fpr']:.3f}")
        console.print(f"goal (>= 0.80 detection at <= 0.05 FPR) for {attack}: {verdict} {where}")
    if plot is not None:
        console.print(f"plot: {plot}")
