"""Preprocessing: strict declarations, letterbox geometry and its inverse, image decoding limits."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.engine.guard import InputGuard, validate_declarations
from edgeguard.engine.preprocess import (
    ImageLimits,
    LetterboxTransform,
    Preprocessor,
    decode_image,
    parse_preprocess,
)
from edgeguard.errors import BundleRejected, ConfigError, InputRejected

from ._manifests import manifest, yolo_manifest


def pre(decl: dict[str, Any], *, shape: tuple[int | None, ...] = (1, 3, 64, 64), dtype: str = "float32",
        limits: ImageLimits | None = None) -> Preprocessor:
    spec = parse_preprocess(manifest((TensorSpec("img", dtype, shape),), preprocess=decl))
    assert spec is not None
    return Preprocessor(spec, limits=limits)


BAD_DECLS = [
    ({"resize": "crop"}, {}, "preprocess.resize: 'crop' is not one of letterbox, stretch"),
    ({"colour": "RGB"}, {}, "preprocess: unknown key 'colour'"),
    ({"input": "other"}, {}, "preprocess.input: 'other' is not a declared input (img)"),
    ({"layout": "NHWC"}, {}, "preprocess.layout: NHWC expects [1, H, W, 3]; 'img' is [1, 3, 64, 64]"),
    ({"dtype": "uint8"}, {}, "preprocess.dtype: uint8 does not match input 'img' dtype float32"),
    ({"size": [32, 32]}, {}, "preprocess.size: [32, 32] does not match input 'img' [1, 3, 64, 64]"),
    ({}, {"shape": (1, 3, None, None)}, "preprocess.size: required: input 'img' has dynamic height/width "
     "[1, 3, None, None]"),
    ({"mean": [0.5, 0.5]}, {}, "preprocess.mean: expected a list of 3 numbers, got [0.5, 0.5]"),
    ({"std": [1, 0, 1]}, {}, "preprocess.std: 0 is outside [1e-12, 1e+30]"),
    ({"pad_value": 300}, {}, "preprocess.pad_value: 300 is outside [0, 255]"),
    ({"scale": "1/255"}, {}, "preprocess.scale: expected a finite number, got '1/255'"),
    ({}, {"dtype": "int8"}, "preprocess.quant: required for a int8 input unless it takes raw uint8 pixels "
     "(then leave out scale/mean/std)"),
    ({"quant": {"scale": 0.1, "zero_point": 0}}, {},
     "preprocess.quant: only for int8/uint8 inputs, not float32"),
    ({"quant": {"scale": 0.1, "zero_point": 200}}, {"dtype": "int8"},
     "preprocess.quant.zero_point: 200 is outside [-128, 127]"),
    ({}, {"shape": (1, 3, 64)},
     "preprocess.input: 'img' has shape [1, 3, 64]; image preprocessing needs rank 4"),
]


@pytest.mark.parametrize(("decl", "input_kw", "message"), BAD_DECLS, ids=[m for _, _, m in BAD_DECLS])
def test_bad_declaration_is_refused_with_exact_message(decl: dict[str, Any], input_kw: dict[str, Any],
                                                       message: str) -> None:
    spec = TensorSpec("img", input_kw.get("dtype", "float32"), input_kw.get("shape", (1, 3, 64, 64)))
    with pytest.raises(ConfigError) as err:
        parse_preprocess(manifest((spec,), preprocess=decl))
    assert str(err.value) == message


def test_validate_declarations_turns_a_bad_declaration_into_a_malformed_bundle() -> None:
    validate_declarations(yolo_manifest())
    with pytest.raises(BundleRejected) as err:
        validate_declarations(yolo_manifest(preprocess={"layout": "NCWH"}))
    assert err.value.check == "malformed"
    assert str(err.value) == ("bundle rejected: malformed: manifest preprocess.layout: 'NCWH' is not one of "
                              "NCHW, NHWC")


def test_letterbox_places_the_image_and_pads() -> None:
    p = pre({"pad_value": 114})
    image = np.full((100, 200, 3), 255, np.uint8)  # wide: scaled to 64x32, padded 16 rows above and below
    out = p(image)
    x = out.tensors["img"]
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, :16, :], 114 / 255, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 48:, :], 114 / 255, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 16:48, :], 1.0, rtol=1e-6)
    assert out.transform == LetterboxTransform(200, 100, 0.32, 0.32, 0.0, 16.0)


def test_top_left_anchor_stretch_nhwc_bgr_and_normalisation() -> None:
    image = np.zeros((10, 20, 3), np.uint8)
    image[..., 0] = 200  # red
    p = pre({"anchor": "top_left", "pad_value": 0}, shape=(1, 3, 40, 40))
    assert p(image).transform.pad_y == 0.0
    p = pre({"resize": "stretch", "layout": "NHWC", "color": "BGR", "mean": [0.5, 0.5, 0.5],
             "std": [0.25, 0.25, 0.25]}, shape=(1, 8, 8, 3))
    x = p(image).tensors["img"]
    assert x.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(x[0, 0, 0], [(0 - 0.5) / 0.25, (0 - 0.5) / 0.25, (200 / 255 - 0.5) / 0.25],
                               rtol=1e-5)
    # A BGR camera frame is converted when the model wants RGB.
    rgb = pre({"resize": "stretch"}, shape=(1, 3, 8, 8))
    np.testing.assert_allclose(rgb(image[:, :, ::-1], color="BGR").tensors["img"], rgb(image).tensors["img"])


def test_uint8_raw_and_int8_quantized_inputs() -> None:
    image = np.full((8, 8, 3), 255, np.uint8)
    with pytest.raises(ConfigError, match=r"NCHW expects \[1, 3, H, W\]; 'img' is \[1, 8, 8, 3\]"):
        pre({}, shape=(1, 8, 8, 3), dtype="uint8")  # the layout defaults to NCHW
    raw_p = pre({"layout": "NHWC"}, shape=(1, 8, 8, 3), dtype="uint8")
    assert raw_p(image).tensors["img"].dtype == np.uint8
    assert int(raw_p(image).tensors["img"].max()) == 255
    q = pre({"layout": "NHWC", "quant": {"scale": 1 / 255, "zero_point": -128}}, shape=(1, 8, 8, 3),
            dtype="int8")
    x = q(image).tensors["img"]
    assert x.dtype == np.int8 and int(x.max()) == 127
    assert int(q(np.zeros((8, 8, 3), np.uint8)).tensors["img"].min()) == -128


@settings(max_examples=60, deadline=None)
@given(
    src_w=st.integers(1, 900), src_h=st.integers(1, 900),
    box=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    anchor=st.sampled_from(["center", "top_left"]), resize=st.sampled_from(["letterbox", "stretch"]),
)
def test_box_round_trip_through_the_transform(src_w: int, src_h: int, box: tuple[float, ...], anchor: str,
                                              resize: str) -> None:
    p = pre({"anchor": anchor, "resize": resize}, shape=(1, 3, 48, 80))
    _, transform = p._resize(np.zeros((src_h, src_w, 3), np.uint8))
    x1, x2 = sorted((box[0] * src_w, box[2] * src_w))
    y1, y2 = sorted((box[1] * src_h, box[3] * src_h))
    original = np.array([[x1, y1, x2, y2]])
    model = transform.to_model(original)
    assert np.all(model[:, 0::2] >= -1e-6) and np.all(model[:, 0::2] <= 80 + 1e-6)
    assert np.all(model[:, 1::2] >= -1e-6) and np.all(model[:, 1::2] <= 48 + 1e-6)
    np.testing.assert_allclose(transform.to_original(model), original, atol=1e-6)


def test_encoded_png_gives_the_same_tensor_as_its_pixels(astronaut_png: Path) -> None:
    p = pre({})
    data = astronaut_png.read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(p(data).tensors["img"], p(pixels).tensors["img"])
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    assert decode_image(jpeg.getvalue(), limits=ImageLimits()).shape == (512, 512, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size and carries almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


BAD_IMAGES = [
    (b"GIF89a not an image we take", {}, "image: not a PNG or JPEG image (or an unsupported variant)"),
    (_png_header_only(60000, 60000), {}, "image: over the limit of 40000000 pixels (decompression bomb)"),
    (_png_header_only(20000, 100), {}, "image: 20000x100 pixels, over the limit of 40000000 pixels or 16384 "
     "per side"),
    (_png_header_only(8000, 8000), {}, "image: 8000x8000 pixels, over the limit of 40000000 pixels or 16384 "
     "per side"),
    (_png_header_only(3000, 3000), {"max_pixels": 1_000_000},
     "image: 3000x3000 pixels, over the limit of 1000000 pixels or 16384 per side"),
    (b"\x89PNG" + b"\0" * 2000, {"max_encoded_bytes": 1000},
     "image: 2004 bytes, over the limit of 1000 bytes"),
]


@pytest.mark.parametrize(("data", "limits", "message"), BAD_IMAGES, ids=[m for _, _, m in BAD_IMAGES])
def test_bad_images_are_refused_before_decoding(data: bytes, limits: dict[str, int], message: str) -> None:
    with pytest.raises(InputRejected) as err:
        pre({}, limits=ImageLimits(**limits))(data)
    assert str(err.value) == message


def test_truncated_png_is_refused() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(buf, format="PNG")
    with pytest.raises(InputRejected, match=r"^image: cannot decode: "):
        pre({})(buf.getvalue()[:-30])


BAD_ARRAYS = [
    (np.zeros((4, 4, 3), np.float32), "image: dtype float32 does not match uint8"),
    (np.zeros((4, 4, 4), np.uint8), "image: shape (4, 4, 4) is not HxWx3 (or HxW greyscale)"),
    (np.zeros((0, 4, 3), np.uint8), "image: 4x0 pixels is empty or over the limit of 40000000 pixels or "
     "16384 per side"),
    ("not an image", "image: expected an HxWx3 uint8 array or PNG/JPEG bytes, got str"),
]


@pytest.mark.parametrize(("image", "message"), BAD_ARRAYS, ids=[m for _, m in BAD_ARRAYS])
def test_bad_frames_are_refused(image: Any, message: str) -> None:
    with pytest.raises(InputRejected) as err:
        pre({})(image)
    assert str(err.value) == message


def test_greyscale_frame_and_preprocessed_tensor_pass_the_guard() -> None:
    m = yolo_manifest()
    p = Preprocessor.from_manifest(m)
    assert p is not None
    out = p(np.full((30, 50), 90, np.uint8))
    checked = InputGuard(m).check(out.tensors)
    assert checked["images"].shape == (1, 3, 320, 320)


def _zeros_png(width: int, height: int, *, color_type: int, bit_depth: int = 8) -> bytes:
    """A complete PNG of zeros: a few KiB that decode to width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    channels = {0: 1, 2: 3, 3: 1}[color_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    plte = chunk(b"PLTE", b"\0\0\0" * 256) if color_type == 3 else b""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("color_type", "depth", "per_pixel"),
    [
        (0, 8, {"L": 8}),
        # 16-bit grey: Pillow >= 10.3 opens it as "I;16" (2 bytes stored), older Pillow as "I" (4 bytes).
        (0, 16, {"I;16": 9, "I": 11}),
        (3, 8, {"P": 8}),
        (2, 8, {"RGB": 7}),
    ],
)
def test_decoded_bytes_are_bounded_by_the_models_input_size(
    color_type: int, depth: int, per_pixel: dict[str, int]
) -> None:
    """The same 2000 x 2000 image is refused for a 64 x 64 model (budget: the 16 MiB floor) and taken by a
    1024 x 1024 one (48 x 1024 x 1024 x 3 bytes), both before decoding a pixel."""
    from PIL import Image

    data = _zeros_png(2000, 2000, color_type=color_type, bit_depth=depth)
    with Image.open(io.BytesIO(data)) as im:  # the header only: the mode this Pillow decodes it to
        mode = im.mode
    cost = 2000 * 2000 * per_pixel[mode]
    with pytest.raises(InputRejected) as err:
        pre({})(data)
    assert str(err.value) == (f"image: 2000x2000 pixels ({mode}) take {cost} bytes decoded, over the "
                              f"{16 * 1024 * 1024} bytes this model's input allows")
    big = pre({}, shape=(1, 3, 1024, 1024))
    assert big(data).tensors["img"].shape == (1, 3, 1024, 1024)


def test_decoded_budget_has_a_floor_and_a_factor() -> None:
    limits = ImageLimits()
    assert limits.decoded_budget(32, 32) == 16 * 1024 * 1024
    assert limits.decoded_budget(640, 640) == 48 * 640 * 640 * 3
    with pytest.raises(ValueError, match="decode_factor"):
        ImageLimits(decode_factor=0)


def test_concurrent_decodes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from edgeguard.engine import preprocess

    real = preprocess.decode_image
    lock = threading.Lock()
    now = [0, 0]  # decoding now, most at once

    def counting(data: bytes, **kw: Any) -> np.ndarray:
        with lock:
            now[0] += 1
            now[1] = max(now[1], now[0])
        try:
            threading.Event().wait(0.02)  # hold the slot, so that overlapping callers would show
            return real(data, **kw)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(preprocess, "decode_image", counting)
    p = pre({}, limits=ImageLimits(max_concurrent_decodes=2))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda _i: p(buf.getvalue()), range(16)))
    assert len(out) == 16 and now[1] == 2
