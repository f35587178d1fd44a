"""``POST /v1/explain`` on the real service (`edgeguard run`, sealed YOLOv8n, real mosquitto): the heat lies
on the face box, only an ``explain`` token gets it, the passes are capped by config, the answer carries no
scores or raw outputs, bad bodies are refused and the service keeps serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.service._env import ADMIN, INFER, STATUS, Device, yolo_bundle
from tests.support.broker import MosquittoBroker

EXPLAIN = "why-token-0123456789abcdef"


def _walk_keys(doc: object) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in _walk_keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in _walk_keys(v)}
    return set()


def test_explain_endpoint_on_the_real_service(tmp_path: Path, yolov8n_path: Path,
                                              astronaut_png: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(b"", api_extra="explain_max_passes = 50\n")
        tokens = tmp_path / "tokens"
        tokens.write_text(tokens.read_text() + f"why explain {EXPLAIN}\n")
        (tmp_path / "model.egm").write_bytes(yolo_bundle(tmp_path, yolov8n_path))
        dev.start()
        try:
            dev.wait_ready()
            png = astronaut_png.read_bytes()
            code, doc = dev.request("POST", "/v1/explain", png, token=EXPLAIN, ctype="image/png",
                                    timeout=300)
            assert code == 200, doc
            target = doc["target"]
            assert target["kind"] == "box" and target["index"] == 1  # FACE_FEMALE (this meta has no labels)
            assert doc["passes"] <= 50 and doc["image"] == {"width": 512, "height": 512}
            # The output policy: the target and a coarse grid only; no score, no raw outputs.
            assert not {"score", "scores", "outputs", "post"} & _walk_keys(doc)
            grid = np.array(doc["grid"])
            x1, y1, x2, y2 = target["box"]
            cells = np.zeros(grid.shape, bool)
            cells[int(y1 // 32):int(-(-y2 // 32)), int(x1 // 32):int(-(-x2 // 32))] = True
            assert grid[cells].mean() > 3.0 * grid[~cells].mean(), grid

            # Scope: an infer, status or admin token is refused; no token is 401.
            for token in (INFER, STATUS, ADMIN):
                code, err = dev.request("POST", "/v1/explain", png, token=token, ctype="image/png")
                assert code == 403 and "'explain' scope" in err["error"], err
            assert dev.request("POST", "/v1/explain", png, token=None, ctype="image/png")[0] == 401
            # Bad bodies: one line each, and the service keeps serving.
            code, err = dev.request("POST", "/v1/explain", b"\x89PNG\r\n\x1a\n broken", token=EXPLAIN,
                                    ctype="image/png")
            assert code == 400 and "\n" not in err["error"], err
            code, err = dev.request("POST", "/v1/explain", b'{"inputs": {}}', token=EXPLAIN)
            assert code == 415 and "PNG or JPEG" in err["error"], err
            code, err = dev.request("POST", "/v1/explain", b"x" * (5 * 1024 * 1024), token=EXPLAIN,
                                    ctype="image/png")
            assert code == 413, err
            code, res = dev.request("POST", "/v1/infer", png, ctype="image/png")
            assert code == 200 and res["post"]["kind"] == "detections"
        finally:
            dev.stop()


def test_explain_route_off_when_passes_are_zero(tmp_path: Path, yolov8n_path: Path,
                                                astronaut_png: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        # An explanation names the top box or class, so it is a query like /v1/infer: it counts against the
        # token's query budget (here one per window), even when the route is off.
        dev.provision(b"", api_extra="explain_max_passes = 0\nbudget = {window_queries = 1}\n")
        tokens = tmp_path / "tokens"
        tokens.write_text(tokens.read_text() + f"why explain {EXPLAIN}\n")
        (tmp_path / "model.egm").write_bytes(yolo_bundle(tmp_path, yolov8n_path))
        dev.start()
        try:
            dev.wait_ready()
            code, err = dev.request("POST", "/v1/explain", astronaut_png.read_bytes(), token=EXPLAIN,
                                    ctype="image/png")
            assert code == 404 and "explain_max_passes" in err["error"], err
            code, err = dev.request("POST", "/v1/explain", astronaut_png.read_bytes(), token=EXPLAIN,
                                    ctype="image/png")
            assert code == 429 and "query budget" in err["error"], err
            assert dev.request("GET", "/v1/health", None, token=STATUS)[0] == 200  # still serving
        finally:
            dev.stop()
