"""Measure a remote deploy on real components: the zoo's 12 MB YOLOv8n (ONNX) published as 256 KiB retained
chunks on a private mosquitto, deployed with a signed command to one real `edgeguard run` device, and the
time a failing probation takes to roll back.

    .venv/bin/python tools/bench_deploy.py [--runs N] [--json]

Figures (wall clock, this machine): publish (operator side, all PUBACKs), deploy (command sent -> verified
answer "probation": fetch, digest, verify, self-test, switch), rollback after an error-rate breach (the
breaching request answered -> the previous model serving again), and after a worker crash on probation (the
crashing request -> the previous model serving, through a supervisor restart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from edgeguard import zoo
from edgeguard.deploy import DEFAULT_CHUNK_SIZE
from tests.commands._support import commands_device, sender
from tests.deploy._support import deploy_args, deploy_state, publish_chunks, send_deploy, serving_version
from tests.service._env import Device, yolo_bundle
from tests.support.broker import MosquittoBroker


def _device(root: Path, broker: MosquittoBroker, env: dict[str, str] | None) -> tuple[Device, object]:
    dev, ops = commands_device(root, broker)
    model = zoo.fetch("yolov8n")
    (root / "model.egm").write_bytes(yolo_bundle(root, model, 1))
    text = dev.config.read_text() + "\n[outbox]\nmax_payload_bytes = 1048576\n\n[deploy]\nmin_requests = 3\n"
    dev.config.write_text(text)
    dev.start(env=env, start_new_session=True)
    dev.wait_ready(300)
    dev.wait((root / "state/device-sign.pub").exists, 60, "answer key")
    return dev, ops


def _infer(dev: Device) -> int:
    x = np.zeros((1, 3, 320, 320), np.float32)
    body = json.dumps({"inputs": {"images": x.tolist()}}).encode()
    try:
        return dev.request("POST", "/v1/infer", body, timeout=120)[0]
    except OSError:
        return -1


def run_once(root: Path, kind: str) -> dict[str, float]:
    model = zoo.fetch("yolov8n")
    with MosquittoBroker(root / "broker") as broker:
        env = {"EDGEGUARD_FAULT": f"{kind}-on-version:3"}
        dev, ops = _device(root, broker, env)
        try:
            v2 = yolo_bundle(root, model, 2)
            t0 = time.perf_counter()
            publish_chunks(broker, v2, chunk_size=DEFAULT_CHUNK_SIZE)
            publish_s = time.perf_counter() - t0
            s = sender(broker, root)
            t0 = time.perf_counter()
            d = send_deploy(s, ops, deploy_args(v2, probation_s=0))  # type: ignore[arg-type]
            deploy_s = time.perf_counter() - t0
            assert d.answer is not None and d.answer.ok, d.answer.doc if d.answer else None
            dev.wait(lambda: deploy_state(dev)["state"] == "committed", 120, "commit")
            v3 = yolo_bundle(root, model, 3)
            publish_chunks(broker, v3, chunk_size=DEFAULT_CHUNK_SIZE)
            d = send_deploy(s, ops, deploy_args(v3, probation_s=3600))  # type: ignore[arg-type]
            assert d.answer is not None and d.answer.ok
            t0 = time.perf_counter()
            for _ in range(3 if kind == "fail" else 1):  # deploy.min_requests = 3
                t0 = time.perf_counter()
                _infer(dev)
            dev.wait(lambda: serving_version(dev) == 2, 300, "back on v2")
            rollback_s = time.perf_counter() - t0
            s.close()
            return {"bytes": len(v2), "publish_s": publish_s, "deploy_s": deploy_s, "rollback_s": rollback_s}
        finally:
            dev.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each kind (example: --runs 5)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    out: dict[str, list[dict[str, float]]] = {"fail": [], "crash": []}
    for _ in range(args.runs):
        for kind, runs in out.items():
            with tempfile.TemporaryDirectory() as d:
                runs.append(run_once(Path(d), kind))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for kind, runs in out.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{kind}: bundle {med['bytes'] / 1e6:.1f} MB, publish {med['publish_s']:.2f} s, deploy "
              f"{med['deploy_s']:.2f} s, rollback after a {kind}ing probation {med['rollback_s']:.2f} s "
              f"(medians of {len(runs)}; all: " + ", ".join(f"{r['deploy_s']:.2f}/{r['rollback_s']:.2f}"
                                                            for r in runs) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
