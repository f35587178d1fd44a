"""EdgeGuard: a secure inference runtime for edge devices.

Sealed model bundles are verified and decrypted into memory only, run on the fastest accelerator that passes a
self-test, and every result is kept on disk until an MQTT broker acknowledges it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
