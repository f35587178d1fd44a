"""The quantizer's own failure: no int8 candidate met the accuracy budget, or onnxruntime refused it."""

from __future__ import annotations

from edgeguard.errors import EdgeGuardError

__all__ = ["QuantizeError"]


class QuantizeError(EdgeGuardError):
    """Quantization failed or could not meet the accuracy budget (exit code 1); the message says why.

    ``report`` holds the ``QuantizeReport`` with every measurement when the accuracy guard refused.
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
