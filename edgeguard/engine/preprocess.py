"""Image preprocessing declared in ``manifest.preprocess``: a camera frame or encoded image in, tensors out.

The declaration (schema in docs/processing.md) says how the publisher's model wants its pixels: resize or
letterbox to the model's height and width, colour order, normalisation ``(pixel * scale - mean) / std``,
layout, dtype and, for quantized inputs, the scale and zero point. ``Preprocessor`` applies it and returns
the tensors plus the ``LetterboxTransform`` that maps boxes found in model coordinates back
onto the original image.

Encoded images (PNG, JPEG) are an untrusted input: their declared size is checked against ``ImageLimits``
from the header, before a single pixel is decoded, so a decompression bomb is refused cheaply. Besides the
absolute pixel limits, the bytes the decode would take (see :func:`decoded_bytes`) must fit a budget derived
from the model's own input size (``ImageLimits.decoded_budget``): a 38 KiB greyscale PNG of 36 Mpx passed a
pixel limit alone and cost the worker +377 MiB, for a model that looks at 32 x 32 pixels. Decodes run at most
``max_concurrent_decodes`` at a time per preprocessor, so the threads of every source together cannot
multiply that budget.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.errors import InputRejected

from ._declarations import DeclReader

__all__ = [
    "ImageLimits",
    "LetterboxTransform",
    "Preprocessed",
    "PreprocessSpec",
    "Preprocessor",
    "decode_image",
    "decoded_bytes",
    "parse_preprocess",
]

# Pillow inflates PNG text and ICC chunks while it reads the header, up to 1 MiB each and 64 MiB in all by
# default: memory spent before any of our checks. No preprocessing reads them, so keep them small.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 256 * 1024

ColorOrder = Literal["RGB", "BGR"]
# Bytes per pixel of Pillow's own storage for a decoded image of each mode (modes not listed take 4).
_STORED_BYTES: Final = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_DTYPES: Final = ("float32", "float16", "uint8", "int8")
_QRANGE: Final = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Bounds on an image handed to the preprocessor (checked before decoding)."""

    max_encoded_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000; a decoded RGB frame of this size is 120 MB
    max_side: int = 16384
    # Decoded bytes allowed per image, as a multiple of the model's input frame (height x width x 3): 48 lets
    # a 640 x 640 model take a 4K frame (~58 MB to decode); never less than min_decoded_bytes, which holds a
    # 1080p frame (~14.5 MB) whatever the model.
    decode_factor: int = 48
    min_decoded_bytes: int = 16 * 1024 * 1024
    max_concurrent_decodes: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.max_encoded_bytes <= 1 << 30:
            raise ValueError(f"max_encoded_bytes must be in [1, 1 GiB], got {self.max_encoded_bytes}")
        if not 1 <= self.max_pixels <= 1 << 30:
            raise ValueError(f"max_pixels must be in [1, 2**30], got {self.max_pixels}")
        if not 1 <= self.max_side <= 1 << 16:
            raise ValueError(f"max_side must be in [1, 65536], got {self.max_side}")
        if not 1 <= self.decode_factor <= 4096:
            raise ValueError(f"decode_factor must be in [1, 4096], got {self.decode_factor}")
        if not 1 << 20 <= self.min_decoded_bytes <= 1 << 32:
            raise ValueError(f"min_decoded_bytes must be in [1 MiB, 4 GiB], got {self.min_decoded_bytes}")
        if not 1 <= self.max_concurrent_decodes <= 64:
            raise ValueError(f"max_concurrent_decodes must be in [1, 64], got {self.max_concurrent_decodes}")

    def decoded_budget(self, height: int, width: int) -> int:
        """Decoded bytes allowed for one image fed to a model input of ``height`` x ``width`` pixels."""
        return max(self.decode_factor * height * width * 3, self.min_decoded_bytes)


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """What decoding an image of this size and Pillow mode to the RGB array takes: the image in its own
    storage (1 byte per pixel for grey/palette, 2 for 16-bit grey, else 4), Pillow's RGB copy of it unless it
    is RGB already (4 bytes per pixel), and the ``HxWx3`` uint8 array (3)."""
    pixels = width * height
    if mode == "RGB":
        return pixels * (4 + 3)
    return pixels * (_STORED_BYTES.get(mode, 4) + 4 + 3)


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    """A validated ``manifest.preprocess`` declaration (see docs/processing.md for each key)."""

    input: str
    height: int
    width: int
    resize: Literal["letterbox", "stretch"] = "letterbox"
    anchor: Literal["center", "top_left"] = "center"
    pad_value: int = 114
    color: ColorOrder = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: str = "float32"
    quant_scale: float | None = None
    quant_zero_point: int | None = None


@dataclass(frozen=True)
class LetterboxTransform:
    """Where the original image sits inside the model input: ``model = original * scale + pad``."""

    src_width: int
    src_height: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[..., 4]`` boxes (x1, y1, x2, y2 in model pixels) to original pixels, clipped to it."""
        out: np.ndarray = np.array(boxes, dtype=np.float64)
        out[..., 0::2] = np.clip((out[..., 0::2] - self.pad_x) / self.scale_x, 0.0, self.src_width)
        out[..., 1::2] = np.clip((out[..., 1::2] - self.pad_y) / self.scale_y, 0.0, self.src_height)
        return out

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[..., 4]`` boxes from original pixels to model pixels (the inverse of ``to_original``)."""
        out: np.ndarray = np.array(boxes, dtype=np.float64)
        out[..., 0::2] = out[..., 0::2] * self.scale_x + self.pad_x
        out[..., 1::2] = out[..., 1::2] * self.scale_y + self.pad_y
        return out


@dataclass(frozen=True)
class Preprocessed:
    tensors: dict[str, np.ndarray]
    transform: LetterboxTransform


def _spatial(spec: TensorSpec, layout: str) -> tuple[int | None, int | None, int | None]:
    if layout == "NCHW":
        return spec.shape[2], spec.shape[3], spec.shape[1]
    return spec.shape[1], spec.shape[2], spec.shape[3]


def parse_preprocess(manifest: Manifest) -> PreprocessSpec | None:
    """Validate ``manifest.preprocess`` against the schema and the declared inputs; ``None`` if absent.

    Raises ``ConfigError`` naming the offending key.
    """
    if manifest.preprocess is None:
        return None
    r = DeclReader("preprocess", manifest.preprocess)
    inputs = {spec.name: spec for spec in manifest.inputs}
    default_input = next(iter(inputs)) if len(inputs) == 1 else None
    name = r.string("input", default_input)
    if name not in inputs:
        raise r.fail("input", f"{name!r} is not a declared input ({', '.join(inputs) or 'none declared'})")
    target = inputs[name]
    layout = r.string("layout", "NCHW", choices=("NCHW", "NHWC"))
    if len(target.shape) != 4:
        raise r.fail("input", f"{name!r} has shape {list(target.shape)}; image preprocessing needs rank 4")
    batch = target.shape[0]
    decl_h, decl_w, channels = _spatial(target, layout)
    if batch not in (None, 1) or channels not in (None, 3):
        want = "[1, 3, H, W]" if layout == "NCHW" else "[1, H, W, 3]"
        raise r.fail("layout", f"{layout} expects {want}; {name!r} is {list(target.shape)}")
    size = r.numbers("size", [], length=None, low=1, high=16384)
    if size and (len(size) != 2 or any(v != int(v) for v in size)):
        raise r.fail("size", "expected [height, width] as two integers")
    height = int(size[0]) if size else decl_h
    width = int(size[1]) if size else decl_w
    if height is None or width is None:
        raise r.fail("size", f"required: input {name!r} has dynamic height/width {list(target.shape)}")
    if (decl_h is not None and decl_h != height) or (decl_w is not None and decl_w != width):
        raise r.fail("size", f"[{height}, {width}] does not match input {name!r} {list(target.shape)}")
    dtype = r.string("dtype", target.dtype, choices=_DTYPES)
    if dtype != target.dtype:
        raise r.fail("dtype", f"{dtype} does not match input {name!r} dtype {target.dtype}")
    quant = r.obj("quant")
    quant_scale: float | None = None
    quant_zp: int | None = None
    if quant is not None:
        if dtype not in _QRANGE:
            raise r.fail("quant", f"only for int8/uint8 inputs, not {dtype}")
        quant_scale = quant.number("scale", low=1e-12, high=1e6)
        lo, hi = _QRANGE[dtype]
        quant_zp = quant.integer("zero_point", low=lo, high=hi)
        quant.finish()
    normalising = any(r.has(k) for k in ("scale", "mean", "std"))
    if dtype in _QRANGE and quant is None and (dtype == "int8" or normalising):
        raise r.fail("quant", f"required for a {dtype} input unless it takes raw uint8 pixels "
                     "(then leave out scale/mean/std)")
    spec = PreprocessSpec(
        input=name,
        height=height,
        width=width,
        resize=r.string("resize", "letterbox", choices=("letterbox", "stretch")),  # type: ignore[arg-type]
        anchor=r.string("anchor", "center", choices=("center", "top_left")),  # type: ignore[arg-type]
        pad_value=r.integer("pad_value", 114, low=0, high=255),
        color=r.string("color", "RGB", choices=("RGB", "BGR")),  # type: ignore[arg-type]
        scale=r.number("scale", 1.0 / 255.0, low=1e-12, high=1e6),
        mean=r.numbers("mean", (0.0, 0.0, 0.0), length=3),  # type: ignore[arg-type]
        std=r.numbers("std", (1.0, 1.0, 1.0), length=3, low=1e-12),  # type: ignore[arg-type]
        layout=layout,  # type: ignore[arg-type]
        dtype=dtype,
        quant_scale=quant_scale,
        quant_zero_point=quant_zp,
    )
    r.finish()
    return spec


def decode_image(data: bytes, *, limits: ImageLimits, max_decoded_bytes: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to an ``HxWx3`` uint8 RGB array, refusing oversize images before decoding.

    ``max_decoded_bytes``: the budget for :func:`decoded_bytes` (the preprocessor passes the one its model's
    input size gives); ``None`` checks the pixel limits only.
    """
    if len(data) > limits.max_encoded_bytes:
        raise InputRejected(f"image: {len(data)} bytes, over the limit of {limits.max_encoded_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Our own limits below are stricter; Pillow's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
            width, height = img.size
            if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
                raise InputRejected(
                    f"image: {width}x{height} pixels, over the limit of {limits.max_pixels} pixels "
                    f"or {limits.max_side} per side"
                )
            cost = decoded_bytes(width, height, img.mode)
            if max_decoded_bytes is not None and cost > max_decoded_bytes:
                raise InputRejected(
                    f"image: {width}x{height} pixels ({img.mode}) take {cost} bytes decoded, over the "
                    f"{max_decoded_bytes} bytes this model's input allows"
                )
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            rgb.load()
            pixels: np.ndarray = np.asarray(rgb, dtype=np.uint8)
            return pixels
    except InputRejected:
        raise
    except Image.DecompressionBombError:
        # Pillow's own guard fires in open() for sizes far beyond ours, before we can read the size.
        limit = limits.max_pixels
        raise InputRejected(f"image: over the limit of {limit} pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise InputRejected("image: not a PNG or JPEG image (or an unsupported variant)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputRejected(f"image: cannot decode: {exc}") from None


class Preprocessor:
    """Applies one ``PreprocessSpec``. Stateless apart from precomputed constants; thread-safe."""

    def __init__(self, spec: PreprocessSpec, *, limits: ImageLimits | None = None) -> None:
        self.spec = spec
        self.limits = limits or ImageLimits()
        std = np.asarray(spec.std, dtype=np.float32)
        # (pixel * scale - mean) / std folded into one multiply-add per element.
        self._mul = (spec.scale / std).astype(np.float32)
        self._add = (-np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)
        self._raw = spec.dtype == "uint8" and spec.quant_scale is None
        self._budget = self.limits.decoded_budget(spec.height, spec.width)
        # Decodes wait here rather than fail: every caller is a source's bounded thread pool or thread.
        self._decodes = threading.BoundedSemaphore(self.limits.max_concurrent_decodes)

    @classmethod
    def from_manifest(cls, manifest: Manifest, *, limits: ImageLimits | None = None) -> Preprocessor | None:
        spec = parse_preprocess(manifest)
        return None if spec is None else cls(spec, limits=limits)

    def _check_array(self, image: Any) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            raise InputRejected(f"image: expected an HxWx3 uint8 array or PNG/JPEG bytes, got "
                                f"{type(image).__name__}")
        if image.dtype != np.uint8:
            raise InputRejected(f"image: dtype {image.dtype.name} does not match uint8")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        frame: np.ndarray = image
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputRejected(f"image: shape {tuple(image.shape)} is not HxWx3 (or HxW greyscale)")
        h, w = int(image.shape[0]), int(image.shape[1])
        if h < 1 or w < 1 or h > self.limits.max_side or w > self.limits.max_side \
                or h * w > self.limits.max_pixels:
            raise InputRejected(f"image: {w}x{h} pixels is empty or over the limit of "
                                f"{self.limits.max_pixels} pixels or {self.limits.max_side} per side")
        return frame

    def __call__(self, image: np.ndarray | bytes, *, color: ColorOrder = "RGB") -> Preprocessed:
        """Turn a frame (``HxWx3`` uint8 in ``color`` order) or PNG/JPEG bytes into the model's input."""
        if not isinstance(image, (bytes, bytearray, memoryview)):
            return self._prepare(self._check_array(image), color)
        with self._decodes:  # the decoded frame lives until it is resized: hold the slot that long
            pixels = decode_image(bytes(image), limits=self.limits, max_decoded_bytes=self._budget)
            return self._prepare(pixels, "RGB")

    def _prepare(self, pixels: np.ndarray, color: ColorOrder) -> Preprocessed:
        if color != self.spec.color:
            pixels = pixels[:, :, ::-1]
        canvas, transform = self._resize(pixels)
        return Preprocessed({self.spec.input: self._to_tensor(canvas)}, transform)

    def _resize(self, pixels: np.ndarray) -> tuple[np.ndarray, LetterboxTransform]:
        spec = self.spec
        src_h, src_w = int(pixels.shape[0]), int(pixels.shape[1])
        if spec.resize == "stretch":
            new_w, new_h, pad_x, pad_y = spec.width, spec.height, 0, 0
        else:
            ratio = min(spec.width / src_w, spec.height / src_h)
            new_w = max(1, min(spec.width, round(src_w * ratio)))
            new_h = max(1, min(spec.height, round(src_h * ratio)))
            if spec.anchor == "center":
                pad_x, pad_y = (spec.width - new_w) // 2, (spec.height - new_h) // 2
            else:
                pad_x, pad_y = 0, 0
        if (new_w, new_h) != (src_w, src_h):
            picture = Image.fromarray(np.ascontiguousarray(pixels))
            resized = np.asarray(picture.resize((new_w, new_h), Image.Resampling.BILINEAR))
        else:
            resized = pixels
        if (new_w, new_h) == (spec.width, spec.height):
            canvas = np.ascontiguousarray(resized)
        else:
            canvas = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
            canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
        # The scale is the exact ratio of the integer sizes, so boxes map back without drift.
        transform = LetterboxTransform(src_w, src_h, new_w / src_w, new_h / src_h, float(pad_x), float(pad_y))
        return canvas, transform

    def _to_tensor(self, canvas: np.ndarray) -> np.ndarray:
        spec = self.spec
        if self._raw:
            data: np.ndarray = canvas
        else:
            data = canvas.astype(np.float32) * self._mul + self._add
            if spec.quant_scale is not None and spec.quant_zero_point is not None:
                lo, hi = _QRANGE[spec.dtype]
                data = np.clip(np.rint(data / spec.quant_scale) + spec.quant_zero_point, lo, hi)
        if spec.layout == "NCHW":
            data = data.transpose(2, 0, 1)
        return np.ascontiguousarray(data[None].astype(spec.dtype, copy=False))

