"""The adversarial-input detector on the real service (`edgeguard run`: supervisor and worker child
processes, a real mosquitto, the local API over a real socket), sealed into a real bundle with the digits
classifier: ``flag`` answers 200 with the score and verdict; ``reject`` answers 422 with the reason,
publishes an ``adversarial-input`` event, writes the audit record, and keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.audit import log_files, parse_line
from edgeguard.robustness import SpsaConfig, pgd
from tests.service._env import STATUS, Device, seal
from tests.support.broker import MosquittoBroker, Recorder
from tests.support.digits import DigitsCase, digits_case, probs


def _crafted(case: DigitsCase) -> tuple[np.ndarray, np.ndarray]:
    """One clean input and a black-box PGD version of it that fools the model and scores high."""
    x, y = case.test.x[:40], case.test.y[:40]
    adv = pgd(lambda b: probs(case, b), x, y, 0.1, cfg=SpsaConfig(samples=32), rng=np.random.default_rng(1))
    ok = np.flatnonzero((probs(case, x).argmax(1) == y) & (probs(case, adv).argmax(1) != y))
    assert ok.size, "the attack fools the model on some input"
    return x[ok], adv[ok]


def _body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": {"x": x[None].tolist()}}).encode()


def _audited(dev: Device, kind: str) -> list[dict[str, Any]]:
    out = []
    for f in log_files(dev.state / "audit"):
        for line in f.read_bytes().splitlines():
            r = parse_line(line)
            if r is not None and r.kind == kind:
                out.append(r.data)
    return out


def _device(tmp_path: Path, broker: MosquittoBroker, mode: str) -> Device:
    case = digits_case()
    dev = Device(root=tmp_path, broker=broker)
    bundle = seal(tmp_path, case.model, name="digits", version=1, meta=case.meta(mode),
                  golden_in={"x": case.test.x[:1]})
    dev.provision(bundle)
    return dev


def test_flag_mode_scores_every_result(tmp_path: Path) -> None:
    case = digits_case()
    clean, adv = _crafted(case)
    with MosquittoBroker(tmp_path) as broker:
        dev = _device(tmp_path, broker, "flag")
        dev.start()
        try:
            dev.wait_ready()
            answers = [dev.request("POST", "/v1/infer", _body(a)) for a in adv]
            clean_answers = [dev.request("POST", "/v1/infer", _body(c)) for c in clean]
            code, health = dev.request("GET", "/v1/health", token=STATUS)
        finally:
            assert dev.stop() == 0
    assert all(code == 200 for code, _ in answers + clean_answers), answers
    flagged = [doc["adversarial"] for _, doc in answers]
    assert sum(flagged) >= 0.75 * len(flagged), [doc["adversarial_score"] for _, doc in answers]
    assert sum(doc["adversarial"] for _, doc in clean_answers) <= 0.25 * len(clean_answers)
    assert all(isinstance(doc["adversarial_score"], float) for _, doc in answers + clean_answers)
    assert code == 200
    counts = health["adversarial"]  # the engine's figures, also in every heartbeat
    assert counts["mode"] == "flag" and counts["checked"] == len(adv) + len(clean) and counts["rejected"] == 0


def test_reject_mode_answers_422_publishes_and_audits_and_keeps_serving(tmp_path: Path) -> None:
    case = digits_case()
    clean, adv = _crafted(case)
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = _device(tmp_path, broker, "reject")
        dev.start()
        try:
            dev.wait_ready()
            answers, clean_codes = [], []
            for a, c in zip(adv, clean, strict=True):
                answers.append(dev.request("POST", "/v1/infer", _body(a)))
                clean_codes.append(dev.request("POST", "/v1/infer", _body(c))[0])  # the service keeps serving
            refused = [doc for code, doc in answers if code == 422]
            assert len(refused) >= 0.75 * len(adv), answers
            assert set(clean_codes) <= {200, 422} and clean_codes.count(422) <= 0.25 * len(clean), clean_codes
            refusals = len(refused) + clean_codes.count(422)
            assert all("looks adversarial" in doc["error"] for doc in refused), refused
            assert dev.request("POST", "/v1/infer", _body(case.test.x[-1]))[0] == 200

            def events() -> list[dict[str, Any]]:
                return [e for e in (json.loads(p) for p in rec.on_topic("/events"))
                        if e["kind"] == "adversarial-input"]

            assert rec.wait_for(lambda _m: len(events()) == refusals, 30), events()
            assert all(e["source"] == "api" and e["score"] > e["threshold"] for e in events())
        finally:
            assert dev.stop() == 0
    audited = _audited(dev, "adversarial-input")
    assert len(audited) == refusals and all(a["model"]["name"] == "digits" for a in audited)
