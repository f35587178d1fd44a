"""Proof that the plaintext model never reaches a disk: open a bundle and load the model into onnxruntime in a
child process whose audit hook (PEP 578) records every file opened for writing; none may hold the plaintext,
and neither may anything left in the temp and state directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgeguard.bundle import pack_bundle
from tests.bundle.conftest import Party

_CHILD = r"""
import json, os, sys
from pathlib import Path

written = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
            written.append(os.path.abspath(os.fsdecode(path)))
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
        written.append(os.path.abspath(os.fsdecode(args[1])))

sys.addaudithook(hook)

import numpy as np
import onnxruntime as ort
from edgeguard.bundle import open_bundle
from edgeguard.keys import TrustStore, load_device_key, load_trusted_key

bundle, keys, state = map(Path, sys.argv[1:4])
opened = open_bundle(bundle, trust=TrustStore([load_trusted_key(keys / "publisher.pub")]),
                     device_key=load_device_key(keys / "device.key"), state_dir=state)
session = ort.InferenceSession(bytes(opened.model), providers=["CPUExecutionProvider"])
out = session.run(None, {"images": np.zeros((1, 3, 320, 320), np.float32)})[0]
opened.wipe()
print(json.dumps({"written": written, "out_shape": list(out.shape), "name": opened.manifest.name}))
"""


def _windows(model: bytes) -> list[bytes]:
    # 64 windows of 128 bytes spread over the model: any stored copy of a meaningful part contains some.
    step = len(model) // 64
    return [model[i : i + 128] for i in range(step // 2, len(model) - 128, step)]


def _holds_plaintext(path: Path, windows: list[bytes]) -> bool:
    data = path.read_bytes()
    return any(w in data for w in windows)


def test_plaintext_never_written(party: Party, yolov8n_path: Path, tmp_path: Path) -> None:
    model = yolov8n_path.read_bytes()
    bundle = tmp_path / "yolo.egm"
    bundle.write_bytes(
        pack_bundle(model, name="yolov8n", version=1, sign_key=party.publisher, recipients=[party.recipient])
    )
    tmp, state = tmp_path / "tmp", tmp_path / "state"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(bundle), str(party.dir), str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["name"] == "yolov8n" and report["out_shape"][0] == 1
    written = [Path(p) for p in report["written"]]
    # Positive control: the hook did see the one legitimate write (the rollback floor, temp file + rename).
    floor = state / "rollback" / "yolov8n"
    assert floor.resolve() in [p.resolve() for p in written], written
    windows = _windows(model)
    assert _holds_plaintext(yolov8n_path, windows)  # the check itself can find the plaintext
    for path in written:
        if path.is_file():
            assert not _holds_plaintext(path, windows), f"plaintext model found in {path}"
    for root in (tmp, state):
        for path in root.rglob("*"):
            if path.is_file():
                assert not _holds_plaintext(path, windows), f"plaintext model found in {path}"
    assert not _holds_plaintext(bundle, windows)  # and the bundle itself is ciphertext
