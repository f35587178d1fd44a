"""Measure a classifier's robustness and its feature-squeezing detector (``edgeguard robustness``).

Data is split in two disjoint parts: ``calibration`` (clean inputs that set the detector's threshold, exactly
as ``pack --adversarial`` does) and ``test`` (clean accuracy, the false-positive rate on clean inputs, and the
inputs that are attacked). For every attack and ``eps``: accuracy under attack over all test inputs, and the
detection rate over the *successful* attacks (inputs the model got right clean and wrong after the attack).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.engine._adv_calibrate import calibrate_adversarial
from edgeguard.engine.adversarial import AdversarialSpec, SqueezerKind, parse_defence, squeeze_scores

from ._attacks import SpsaConfig, fgsm, pgd
from ._search import search_squeezers

__all__ = ["AttackRow", "RobustnessReport", "evaluate", "probe_manifest"]

AttackName = Literal["fgsm", "pgd"]


@dataclass(frozen=True)
class AttackRow:
    attack: str
    eps: float
    accuracy: float  # over all test inputs
    successful: int  # clean-correct inputs the attack turned wrong
    detected: int  # of those, scored over the threshold
    detection_rate: float | None  # detected / successful (None: no successful attack)


@dataclass
class RobustnessReport:
    model: str
    test_samples: int
    calibration_samples: int
    clean_accuracy: float
    target_fpr: float
    threshold: float
    clean_fpr: float  # clean test inputs over the threshold
    squeezers: dict[str, Any]
    spsa: dict[str, Any]
    rows: list[AttackRow] = field(default_factory=list)

    def halving_eps(self, attack: str) -> float | None:
        """The smallest eps at which ``attack`` brings accuracy to half the clean accuracy or below."""
        hits = [r.eps for r in self.rows if r.attack == attack and r.accuracy <= self.clean_accuracy / 2]
        return min(hits) if hits else None

    def goal(self, attack: str = "pgd") -> dict[str, Any]:
        """The issue's goal: >= 80 % detection at <= 5 % false positives, at the eps where accuracy halves."""
        eps = self.halving_eps(attack)
        row = next((r for r in self.rows if r.attack == attack and r.eps == eps), None)
        rate = row.detection_rate if row is not None else None
        met = rate is not None and rate >= 0.8 and self.clean_fpr <= 0.05
        return {"attack": attack, "eps": eps, "detection_rate": rate, "clean_fpr": self.clean_fpr, "met": met}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["goal"] = {a: self.goal(a) for a in sorted({r.attack for r in self.rows})}
        return out


def probe_manifest(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   postprocess: Mapping[str, Any] | None = None) -> Manifest:
    """A manifest holding only what the detector's calibration reads (no bundle is made)."""
    return Manifest(format="onnx", name="probe", version=1, created="", payload_sha256="", payload_size=1,
                    chunk_size=1, publisher_key_id="", recipient_key_ids=(), inputs=tuple(inputs),
                    outputs=tuple(outputs), postprocess=postprocess)


def evaluate(
    run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    *,
    manifest: Manifest,
    calibration: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    eps: Sequence[float],
    attacks: Sequence[AttackName] = ("fgsm", "pgd"),
    fpr: float = 0.05,
    bits: int = 4,
    median: int = 2,
    joint: bool = False,
    softmax: bool | None = None,
    spsa: SpsaConfig | None = None,
    pgd_steps: int = 10,
    seed: int = 0,
    name: str = "model",
    progress: Callable[[str], None] = lambda _: None,
    squeezers: Sequence[tuple[SqueezerKind, int]] | None = None,
    search: bool = False,
    max_squeezers: int = 2,
) -> RobustnessReport:
    """Calibrate the detector on ``calibration`` (inputs, labels), then attack ``test`` and score it all.

    ``squeezers``: an explicit list (normalised score) instead of ``bits``/``median``/``joint``. ``search``:
    choose that list on the calibration split (``_search.search_squeezers``; the test split is not read).
    """
    cal_x, cal_y = calibration
    x, y = test
    cal_samples = [{manifest.inputs[0].name: cal_x[i:i + 1]} for i in range(len(cal_x))]
    decl = calibrate_adversarial(run, cal_samples, manifest=manifest, fpr=fpr, bits=bits, median=median,
                                 softmax=softmax, joint=joint, squeezers=squeezers)
    spec = parse_defence(_with_defence(manifest, decl))
    assert spec is not None
    lo, hi = spec.value_range
    cfg = spsa or SpsaConfig(low=lo, high=hi)
    cfg = SpsaConfig(samples=cfg.samples, delta=cfg.delta, max_batch=cfg.max_batch, low=lo, high=hi)
    searched: dict[str, Any] | None = None
    if search:
        progress("searching the squeezer set on the calibration split")
        base = spec
        found = search_squeezers(run, lambda b: _classify(run, base, b), base, (cal_x, cal_y), eps=eps,
                                 fpr=fpr, cfg=cfg, rng=np.random.default_rng([seed, 1]), pgd_steps=pgd_steps,
                                 max_squeezers=max_squeezers)
        searched = {"calibration_detection": round(found.calibration_detection, 4), "tried": found.tried}
        decl = calibrate_adversarial(run, cal_samples, manifest=manifest, fpr=fpr, softmax=softmax,
                                     squeezers=found.squeezers)
        spec = parse_defence(_with_defence(manifest, decl))
        assert spec is not None

    def classify(batch: np.ndarray) -> np.ndarray:
        return _classify(run, spec, batch)

    def scores(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([squeeze_scores(run, {spec.input: batch[i:i + 256]}, spec)[1]
                               for i in range(0, len(batch), 256)])

    clean_pred = classify(x).argmax(axis=1)
    correct = clean_pred == y
    clean_scores = scores(x)
    report = RobustnessReport(
        model=name, test_samples=len(y), calibration_samples=len(cal_x),
        clean_accuracy=float(correct.mean()), target_fpr=fpr, threshold=spec.threshold,
        clean_fpr=float((clean_scores > spec.threshold).mean()),
        squeezers=({"squeezers": [q.to_json() for q in spec.listed]} if spec.listed else
                   {"bits": spec.bits, "median": spec.median, "joint": spec.joint})
        | {"range": list(spec.value_range), "batched": spec.batched}
        | ({"search": searched} if searched is not None else {}),
        spsa={"samples": cfg.samples, "delta": cfg.delta, "pgd_steps": pgd_steps},
    )
    rng = np.random.default_rng(seed)
    for attack in attacks:
        for e in eps:
            progress(f"{attack} eps={e:g}")
            if attack == "fgsm":
                adv = fgsm(classify, x, y, e, cfg=cfg, rng=rng)
            else:
                adv = pgd(classify, x, y, e, cfg=cfg, rng=rng, steps=pgd_steps)
            pred = classify(adv).argmax(axis=1)
            success = correct & (pred != y)
            detected = int((scores(adv[success]) > spec.threshold).sum()) if success.any() else 0
            n_success = int(success.sum())
            report.rows.append(AttackRow(attack, float(e), float((pred == y).mean()), n_success, detected,
                                         detected / n_success if n_success else None))
    return report


def _classify(run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]], spec: AdversarialSpec,
              batch: np.ndarray) -> np.ndarray:
    out = run({spec.input: batch.astype(np.float32)})[spec.output]
    flat = np.asarray(out, dtype=np.float64).reshape(len(batch), -1)
    if spec.softmax:
        flat = np.exp(flat - flat.max(axis=1, keepdims=True))
        flat /= flat.sum(axis=1, keepdims=True)
    return flat


def _with_defence(manifest: Manifest, defence: dict[str, Any]) -> Manifest:
    fields = {f: getattr(manifest, f) for f in manifest.__dataclass_fields__}
    return Manifest(**{**fields, "defence": defence})


def spec_of(manifest: Manifest, defence: dict[str, Any]) -> AdversarialSpec | None:
    return parse_defence(_with_defence(manifest, defence))
