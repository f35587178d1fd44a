"""What every input source produces, what it hands it to, and the one parser of request bodies.

The local API and the MQTT input topic carry the same body formats, so both call :func:`parse_body`; the
tensor checks proper (dtype, shape, range, finiteness) belong to the engine's input guard, which sees every
request after this. This module only turns bytes into arrays or image bytes, refusing anything oversized or
malformed with one line that says why.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from edgeguard._echo import cut, echo
from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import InputRejected

__all__ = [
    "BodyLimits",
    "InferenceRequest",
    "InferenceSink",
    "SourceName",
    "parse_body",
    "UnsupportedMediaType",
    "NPY_MAGIC",
]

SourceName = Literal["api", "mqtt", "serial", "directory", "group"]
NPY_MAGIC = b"\x93NUMPY"
_NUMERIC_KINDS = frozenset("biuf")
_IMAGE_MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF8", b"RIFF")


class UnsupportedMediaType(InputRejected):
    """The request declared a content type no parser handles (HTTP 415)."""


@dataclass(frozen=True, kw_only=True)
class BodyLimits:
    """Hard bounds on one request body, checked before any decoding."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_elements: int = 4 * 1024 * 1024  # tensor elements per request, over all inputs
    max_id_chars: int = 128

    def __post_init__(self) -> None:
        if not 64 <= self.max_body_bytes <= 1024**3:
            raise ValueError("max_body_bytes must be within 64 B .. 1 GiB")
        if not 1 <= self.max_elements <= 1 << 28:
            raise ValueError("max_elements must be within 1 .. 2**28")


@dataclass(frozen=True, kw_only=True)
class InferenceRequest:
    """One parsed request: named tensors, or one encoded image (decoded by the engine's preprocessor)."""

    source: SourceName
    tensors: Mapping[str, np.ndarray] | None = None
    image: bytes | None = None
    correlation_id: str | None = None  # the client's own id, echoed in the result
    # Fields the source adds to the result (group input: served_by, attempt, redelivered, fencing_token);
    # set by the source from what it knows, never from the request body.
    annotations: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.tensors is None) == (self.image is None):
            raise ValueError("exactly one of tensors or image must be given")


class InferenceSink(Protocol):
    """Runs one request to a result. Raises InputRejected (bad input), BackendError, ServiceUnavailable.

    The service's implementation runs the engine, stores the result in the outbox (durable on return) and
    returns the result's JSON, including its unique ``id``.
    """

    def __call__(self, request: InferenceRequest) -> dict[str, Any]: ...


def parse_body(
    *,
    body: bytes,
    content_type: str,
    specs: Sequence[TensorSpec],
    source: SourceName,
    limits: BodyLimits,
    input_name: str | None = None,
    correlation_id: str | None = None,
) -> InferenceRequest:
    """Bytes of one request body -> :class:`InferenceRequest`; InputRejected with the reason otherwise."""
    if len(body) > limits.max_body_bytes:
        raise InputRejected(f"body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}")
    if not body:
        raise InputRejected("empty body")
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in ("", "application/octet-stream"):
        ctype = _sniff(body)
    if ctype == "application/json":
        return _parse_json(body, specs=specs, source=source, limits=limits)
    if ctype in ("application/x-npy", "application/npy"):
        name = _single_input(specs, input_name)
        array = _parse_npy(body, limits)
        return InferenceRequest(
            source=source, tensors={name: array}, correlation_id=_check_id(correlation_id, limits)
        )
    if ctype.startswith("image/"):
        return InferenceRequest(source=source, image=body, correlation_id=_check_id(correlation_id, limits))
    raise UnsupportedMediaType(
        f"unsupported content type {echo(ctype)} (use application/json, application/x-npy or image/*)"
    )


def _sniff(body: bytes) -> str:
    if body.startswith(NPY_MAGIC):
        return "application/x-npy"
    if body.startswith(_IMAGE_MAGICS):
        return "image/unknown"
    if body.lstrip()[:1] == b"{":
        return "application/json"
    return "application/octet-stream-unknown"


def _single_input(specs: Sequence[TensorSpec], input_name: str | None) -> str:
    names = [s.name for s in specs]
    if input_name is not None:
        if input_name not in names:
            raise InputRejected(f"unknown input {echo(input_name)}; the model takes {', '.join(names)}")
        return input_name
    if len(names) != 1:
        raise InputRejected(
            f"the model takes {len(names)} inputs ({', '.join(names)}): name one with ?input="
        )
    return names[0]


def _check_id(value: object, limits: BodyLimits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limits.max_id_chars or not value.isprintable():
        raise InputRejected(f"'id' must be a printable string of 1..{limits.max_id_chars} characters")
    return value


def _parse_npy(body: bytes, limits: BodyLimits) -> np.ndarray:
    _check_npy_header(body, limits)
    try:
        # allow_pickle=False: an .npy body must never be able to run code.
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputRejected(f"malformed .npy body: {cut(exc)}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in _NUMERIC_KINDS:
        raise InputRejected("the .npy body must hold one numeric array")
    return array


def _check_npy_header(body: bytes, limits: BodyLimits) -> None:
    """Refuse on the header alone: ``np.load`` allocates the whole claimed shape times the claimed item size
    before it reads any data, so a body of a hundred bytes could otherwise ask for any amount of memory
    (``|V1048576`` items, a shape of a million, is a terabyte).

    Checked in this order, each before anything trusts it: the dtype is plain numeric (no void, object,
    structured or sub-array types, whose item size is whatever the sender claims), the element count is
    within ``max_elements``, and the claimed data size in **bytes** (count x item size) is exactly what
    follows the header in the body, which is itself within ``max_body_bytes``.
    """
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        elif version == (3, 0):  # only for non-latin-1 field names: structured dtypes, never numeric arrays
            raise InputRejected("the .npy body must hold one numeric array")
        else:
            raise ValueError(f"unknown format version {version[0]}.{version[1]}")
    # numpy tokenizes the header dict: one it cannot tokenize raises TokenError or SyntaxError.
    except (ValueError, OSError, EOFError, TypeError, SyntaxError, tokenize.TokenError) as exc:
        raise InputRejected(f"malformed .npy body: {_first_line(exc)[:80]}") from None
    if (
        not isinstance(dtype, np.dtype)
        or dtype.kind not in _NUMERIC_KINDS
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise InputRejected("the .npy body must hold one numeric array (bool, int, uint or float)")
    size = math.prod(shape)
    if size > limits.max_elements:
        raise InputRejected(f"{size} elements exceed the limit of {limits.max_elements}")
    claimed = size * dtype.itemsize
    present = len(body) - fp.tell()
    if claimed != present:
        raise InputRejected(
            f"malformed .npy body: the header claims {claimed} bytes of data, the body holds {present}"
        )


def _json_float(text: str) -> float:
    return float(text)


def _json_int(text: str) -> int:
    return int(text)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


def _loads_yielding(body: bytes) -> Any:
    """``json.loads`` that lets other threads run while it parses. json's C scanner holds the GIL from the
    first byte to the last: one 16 MiB body of numbers kept the event loop (and with it the liveness tick)
    waiting for seconds on a loaded CPU, and the supervisor killed a healthy worker as hung. A Python-level
    callback per number and per object enters the interpreter, which honours a pending GIL hand-over, so the
    loop gets its turn every few milliseconds, for about 10 % more parse time (measured on a 28 MiB body:
    0.60 s -> 0.67 s, longest pause of another thread 558 ms -> 34 ms)."""
    return json.loads(body, parse_float=_json_float, parse_int=_json_int, object_pairs_hook=_json_object)


def _parse_json(
    body: bytes, *, specs: Sequence[TensorSpec], source: SourceName, limits: BodyLimits
) -> InferenceRequest:
    try:
        doc = _loads_yielding(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputRejected(f"malformed JSON: {cut(exc)}") from None
    except RecursionError:  # nesting deeper than the interpreter's limit
        raise InputRejected("malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InputRejected("the JSON body must be an object")
    unknown = sorted(set(doc) - {"inputs", "image_b64", "id"})
    if unknown:
        raise InputRejected(f"unknown key {echo(unknown[0])} (expected 'inputs' or 'image_b64', and 'id')")
    cid = _check_id(doc.get("id"), limits)
    if ("inputs" in doc) == ("image_b64" in doc):
        raise InputRejected("give exactly one of 'inputs' or 'image_b64'")
    if "image_b64" in doc:
        raw = doc["image_b64"]
        if not isinstance(raw, str):
            raise InputRejected("'image_b64' must be a base64 string")
        try:
            image = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InputRejected("'image_b64' is not valid base64") from None
        return InferenceRequest(source=source, image=image, correlation_id=cid)
    inputs = doc["inputs"]
    if not isinstance(inputs, dict) or not inputs:
        raise InputRejected("'inputs' must be a non-empty object of input name -> tensor")
    by_name = {s.name: s for s in specs}
    tensors: dict[str, np.ndarray] = {}
    budget = limits.max_elements
    for name, value in inputs.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputRejected(
                f"unknown input {echo(name)}; the model takes {', '.join(by_name) or '(none)'}"
            )
        array = _json_tensor(name, value, spec.dtype)
        budget -= array.size
        if budget < 0:
            raise InputRejected(f"more than {limits.max_elements} tensor elements in one request")
        tensors[name] = array
    return InferenceRequest(source=source, tensors=tensors, correlation_id=cid)


def _json_tensor(name: str, value: Any, dtype: str) -> np.ndarray:
    """A nested list, or {"shape": [...], "data": [flat list]}, as an array of the declared dtype."""
    shape: list[int] | None = None
    data = value
    if isinstance(value, dict):
        if set(value) - {"shape", "data", "dtype"} or "data" not in value:
            raise InputRejected(f"input {name!r}: a tensor object has 'data' and optionally 'shape', 'dtype'")
        if "dtype" in value and value["dtype"] != dtype:
            raise InputRejected(
                f"input {name!r}: dtype {echo(value['dtype'])} given, the model takes {dtype}"
            )
        data = value["data"]
        if "shape" in value:
            raw_shape = value["shape"]
            if not isinstance(raw_shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw_shape
            ):
                raise InputRejected(f"input {name!r}: 'shape' must be a list of non-negative integers")
            shape = raw_shape
    if not isinstance(data, list):
        raise InputRejected(f"input {name!r}: tensor data must be a JSON array")
    try:
        array = np.asarray(data, dtype=np.dtype(dtype))
        if shape is not None:
            array = array.reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputRejected(f"input {name!r}: {_first_line(exc)}") from None
    return array


def _first_line(exc: BaseException) -> str:
    return cut((str(exc).splitlines() or [type(exc).__name__])[0])
