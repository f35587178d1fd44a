"""EdgeGuard: a secure inference runtime for edge devices.

Sealed model bundles are verified and decrypted into memory only, run on the fastest accelerator that passes a
self-test, and every result is kept on disk until an MQTT broker acknowledges it.
"""

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    # Looked up on first use (PEP 562): importlib.metadata costs ~20 ms, paid by every process that imports
    # edgeguard (the supervisor, `edgeguard --help`) whether or not it ever asks for the version.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        value = version("edgeguard")
    except PackageNotFoundError:  # running from a source tree that was not installed
        value = "0.0.0+source"
    globals()["__version__"] = value
    return value
