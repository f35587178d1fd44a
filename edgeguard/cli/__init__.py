"""The ``edgeguard`` command line.

Each concern registers its own subcommands (``_bundle_cmds``, ``_engine_cmds``, ``_service_cmds``, ``_demo``);
this module only builds the parser and maps error families to the exit-code contract:

    0 ok · 1 runtime error · 2 usage/config error · 3 bundle rejected

A failure prints one line on stderr and no traceback (``EDGEGUARD_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from edgeguard import __version__
from edgeguard.errors import BundleRejected, ConfigError, EdgeGuardError, InputRejected, KeyFileError

from . import _bundle_cmds, _demo, _engine_cmds, _fleet_cmds, _quantize_cmds, _service_cmds

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_REJECTED"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3

_EPILOG = """\
exit codes: 0 ok, 1 runtime error, 2 usage or config error, 3 bundle rejected.
Start with `edgeguard demo`; `edgeguard COMMAND --help` explains each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeguard",
        description="Secure inference runtime for edge devices: sealed models, hardware fast path, "
        "durable results over MQTT.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (_bundle_cmds, _engine_cmds, _quantize_cmds, _service_cmds, _demo, _fleet_cmds):
        module.register(sub)
    return parser


def _fail(code: int, message: str) -> int:
    print(f"edgeguard: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    debug = os.environ.get("EDGEGUARD_DEBUG") == "1"
    try:
        return int(handler(args))
    except BundleRejected as exc:
        return _fail(EXIT_REJECTED, str(exc))
    except (ConfigError, KeyFileError, InputRejected) as exc:
        if debug:
            raise
        return _fail(EXIT_USAGE, str(exc))
    except EdgeGuardError as exc:
        if debug:
            raise
        return _fail(EXIT_RUNTIME, str(exc))
    except KeyboardInterrupt:
        return _fail(EXIT_RUNTIME, "interrupted")
    except OSError as exc:
        if debug:
            raise
        return _fail(EXIT_RUNTIME, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
