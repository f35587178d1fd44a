"""Static QDQ int8 quantization with an accuracy guard and a speed choice.

The steps, each reported through ``progress``:

1. prepare the fp32 model (static shapes, opset >= 13, shape inference);
2. load calibration and held-out samples, run fp32 on the held-out ones as the reference;
3. for each candidate exclusion set (``_candidates``): quantize (calibration ranges are measured once and
   reused), run the held-out samples, compare with fp32 by the output's kind (``_metrics``);
4. benchmark fp32 and every candidate that built, interleaved round by round so machine noise hits all alike;
5. keep the fastest candidate that meets the budget and is faster than fp32; refuse with the measurements when
   none does (``QuantizeError``), rather than ship a model that silently lost accuracy.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError

from ._calibration import CalibrationSet, load_calibration
from ._candidates import Candidate, find_candidates
from ._errors import QuantizeError
from ._metrics import DEFAULT_BUDGETS, Agreement, OutputKind, agreement, output_kind
from ._prepare import PreparedModel, prepare_model

__all__ = ["QuantizeOptions", "CandidateResult", "QuantizeReport", "quantize_onnx"]

Progress = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)
Sample = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """How to quantize. ``budget`` is the minimum agreement (see ``_metrics``); ``None`` = per output kind."""

    budget: float | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    preprocess: Mapping[str, Any] | None = None  # how calibration images become tensors (manifest schema)
    samples: int = 32
    seed: int = 0
    per_channel: bool = True
    activations: Literal["uint8", "int8"] = "uint8"  # u8 activations + s8 weights: fastest on x86 VNNI
    weights: Literal["int8", "uint8"] = "int8"
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    bench_runs: int = 30
    threads: int = 0  # 0 = onnxruntime's default
    min_speedup: float = 1.0

    def __post_init__(self) -> None:
        if self.budget is not None and not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")
        if not 4 <= self.samples <= 10_000:
            raise ValueError(f"samples must be in [4, 10000], got {self.samples}")
        if not 3 <= self.bench_runs <= 10_000:
            raise ValueError(f"bench_runs must be in [3, 10000], got {self.bench_runs}")
        if not 0 <= self.threads <= 256:
            raise ValueError(f"threads must be in [0, 256], got {self.threads}")
        if not 0.0 < self.min_speedup <= 100.0:
            raise ValueError(f"min_speedup must be in (0, 100], got {self.min_speedup}")


@dataclass(frozen=True)
class CandidateResult:
    name: str
    description: str
    excluded: tuple[str, ...]
    agreements: tuple[Agreement, ...] = ()
    passes: bool = False
    latency_ms: float | None = None
    speedup: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "excluded_nodes": len(self.excluded),
            "agreement": [{"kind": a.kind, "metric": a.metric, "value": round(a.value, 4), "detail": a.detail}
                          for a in self.agreements],
            "passes": self.passes,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "speedup": None if self.speedup is None else round(self.speedup, 3),
            "error": self.error,
        }


@dataclass(frozen=True)
class QuantizeReport:
    model: str
    output: str | None
    input_shapes: dict[str, tuple[int, ...]]
    opset: tuple[int, int]  # (before, after)
    calibration: str
    kinds: tuple[OutputKind, ...]
    budgets: tuple[float, ...]
    fp32_ms: float
    candidates: tuple[CandidateResult, ...]
    chosen: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Suitable for ``manifest.quantization``."""
        return {
            "method": "onnxruntime static QDQ",
            "model": self.model,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "opset": list(self.opset),
            "calibration": self.calibration,
            "kinds": list(self.kinds),
            "budgets": list(self.budgets),
            "fp32_ms": round(self.fp32_ms, 3),
            "candidates": [c.to_json() for c in self.candidates],
            "chosen": self.chosen,
            "reason": self.reason,
        }


def cpu_session(path: Path, threads: int) -> Any:
    """The CPU session the quantizer measures with (also used by tools/bench_quantize.py)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # Several sessions take turns here: a spinning idle pool would steal the CPU from the next one to run.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run_all(session: Any, samples: Sequence[Sample]) -> list[list[np.ndarray]]:
    return [list(session.run(None, sample)) for sample in samples]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our samples."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self._it = iter(samples)

    def get_next(self) -> Sample | None:
        return next(self._it, None)


def _quantize(prepared: Path, out: Path, samples: Sequence[Sample], cand: Candidate, *,
              options: QuantizeOptions, cache: Path) -> None:
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    qtypes = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    kwargs: dict[str, Any] = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        kwargs["calibration_cache_path"] = str(cache)  # measure ranges once, reuse for every candidate
    quantize_static(
        str(prepared), str(out), _Reader(samples),
        quant_format=QuantFormat.QDQ,
        per_channel=options.per_channel,
        activation_type=qtypes[options.activations],
        weight_type=qtypes[options.weights],
        nodes_to_exclude=list(cand.exclude),
        calibrate_method=methods[options.calibrate_method],
        extra_options={"ActivationSymmetric": options.activations == "int8", "WeightSymmetric": True},
        **kwargs,
    )


def _bench(sessions: Mapping[str, Any], sample: Sample, runs: int) -> dict[str, float]:
    """Median milliseconds per run, interleaving sessions round by round (fair under shared-CPU noise)."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, sample)
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, sample)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, src.read_bytes(), mode=0o644)


_TIE: float = 0.03  # latencies within 3 % are a tie on a noisy machine: then the most accurate one wins


def _margin(result: CandidateResult) -> float:
    return min((a.value for a in result.agreements), default=0.0)


def _choose(eligible: Sequence[CandidateResult]) -> CandidateResult | None:
    if not eligible:
        return None
    fastest = min(r.latency_ms or float("inf") for r in eligible)
    tied = [r for r in eligible if (r.latency_ms or float("inf")) <= fastest * (1.0 + _TIE)]
    return max(tied, key=_margin)


def quantize_onnx(
    model: Path, calibration: Path, output: Path | None, *,
    options: QuantizeOptions | None = None, progress: Progress | None = None,
) -> QuantizeReport:
    """Quantize ``model`` to int8 QDQ, guarded by accuracy, and write the chosen model to ``output``.

    Raises ``ConfigError`` for bad arguments or data and ``QuantizeError`` when no candidate meets the
    budget (the report's figures are in the message). ``output=None`` measures without writing.
    """
    opts = options or QuantizeOptions()
    say: Progress = progress or (lambda _what, _done, _total: None)
    if not model.is_file():
        raise ConfigError(f"{model}: no such model file")
    if output is not None and not output.parent.is_dir():
        raise ConfigError(f"-o {output}: directory {output.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="edgeguard-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        total = 4
        say("preparing the fp32 model", 0, total)
        prepared: PreparedModel = prepare_model(model, tmp, shapes=opts.input_shapes)
        proto = onnx.load(str(prepared.path))
        candidates = find_candidates(proto)
        onnx.save(proto, str(prepared.path))  # keeps names given to anonymous nodes
        total = 3 + len(candidates)
        say("loading calibration data", 1, total)
        data: CalibrationSet = load_calibration(calibration, prepared.inputs, preprocess=opts.preprocess,
                                                samples=opts.samples, seed=opts.seed)
        fp32 = cpu_session(prepared.path, opts.threads)
        reference = _run_all(fp32, data.held_out)
        shapes = [o.shape for o in fp32.get_outputs()]
        kinds = tuple(output_kind(tuple(int(d) for d in s), reference[0][i]) for i, s in enumerate(shapes))
        budgets = tuple(opts.budget if opts.budget is not None else DEFAULT_BUDGETS[k] for k in kinds)

        built: dict[str, tuple[Candidate, Any, tuple[Agreement, ...], bool]] = {}
        results: dict[str, CandidateResult] = {}
        for step, cand in enumerate(candidates, start=2):
            say(f"quantizing candidate {cand.name} ({len(cand.exclude)} nodes kept fp32)", step, total)
            path = tmp / f"{cand.name}.onnx"
            try:
                _quantize(prepared.path, path, data.calibration, cand, options=opts,
                          cache=tmp / "calibration.json")
                session = cpu_session(path, opts.threads)
                outputs = _run_all(session, data.held_out)
            except Exception as exc:
                results[cand.name] = CandidateResult(cand.name, cand.description, cand.exclude,
                                                     error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            agreements = tuple(
                agreement(kind, [r[i] for r in reference], [o[i] for o in outputs])
                for i, kind in enumerate(kinds)
            )
            passes = all(a.value >= b for a, b in zip(agreements, budgets, strict=True))
            built[cand.name] = (cand, session, agreements, passes)

        say("benchmarking fp32 against the candidates", total - 1, total)
        sessions = {"fp32": fp32, **{k: v[1] for k, v in built.items()}}
        timings = _bench(sessions, data.held_out[0], opts.bench_runs)
        fp32_ms = timings["fp32"]
        for name, (cand, _, agreements, passes) in built.items():
            ms = timings[name]
            results[name] = CandidateResult(cand.name, cand.description, cand.exclude, agreements, passes,
                                            ms, fp32_ms / ms if ms > 0 else None)
        ordered = tuple(results[c.name] for c in candidates)
        eligible = [r for r in ordered if r.passes and (r.speedup or 0.0) >= opts.min_speedup]
        chosen = _choose(eligible)
        if chosen is None:
            passing = [r for r in ordered if r.passes]
            if passing:
                reason = (f"the candidates that meet the accuracy budget are not faster than fp32 "
                          f"(best {max(r.speedup or 0.0 for r in passing):.2f}x, needed "
                          f"{opts.min_speedup:.2f}x): keep the fp32 model")
            else:
                best = max((r for r in ordered if r.agreements), default=None,
                           key=lambda r: min(a.value - b for a, b in zip(r.agreements, budgets, strict=True)))
                worst = "" if best is None else "; best " + best.name + ": " + ", ".join(
                    f"{a.metric} {a.value:.3f} < {b:g} ({a.detail})" for a, b in
                    zip(best.agreements, budgets, strict=True) if a.value < b)
                reason = f"no int8 candidate meets the accuracy budget{worst}: keep the fp32 model"
        else:
            others = [r.name for r in eligible if r is not chosen]
            also = f"; also passing: {', '.join(others)}" if others else ""
            reason = (f"{chosen.name}: fastest candidate that meets the budget, {chosen.speedup or 0.0:.2f}x "
                      f"fp32 (ties within 3 % go to the most accurate){also}")
            failing = [r.name for r in ordered if not r.passes]
            if failing:
                reason += f"; below budget or failed: {', '.join(failing)}"
        report = QuantizeReport(
            model=str(model), output=None if output is None or chosen is None else str(output),
            input_shapes=prepared.inputs, opset=(prepared.opset_from, prepared.opset),
            calibration=data.source, kinds=kinds, budgets=budgets, fp32_ms=fp32_ms, candidates=ordered,
            chosen=None if chosen is None else chosen.name, reason=reason,
        )
        say("done", total, total)
        if chosen is None:
            raise QuantizeError(reason, report)
        if output is not None:
            _atomic_copy(tmp / f"{chosen.name}.onnx", output)
        return report
