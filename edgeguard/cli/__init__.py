"""The ``edgeguard`` command line.

Each concern registers its own subcommands (``_bundle_cmds``, ``_engine_cmds``, ``_service_cmds``, ``_demo``,
``_zoo_cmds``, ``_init_cmd``, ``_token_cmds``, ``_status_cmd``, ``_audit_cmds``);
this module only builds the parser and maps error families to the exit-code contract:

    0 ok · 1 runtime error · 2 usage/config error · 3 bundle rejected

A failure prints one line on stderr and no traceback (``EDGEGUARD_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from edgeguard import __version__
from edgeguard.errors import BundleRejected, ConfigError, EdgeGuardError, InputRejected, KeyFileError

from . import (
    _audit_cmds,
    _bundle_cmds,
    _demo,
    _engine_cmds,
    _init_cmd,
    _quantize_cmds,
    _scan_cmds,
    _service_cmds,
    _status_cmd,
    _token_cmds,
    _zoo_cmds,
)

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_REJECTED"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3

# An input the user named that cannot be read (or an output directory that is not there) is a usage error
# (2), like every other bad argument; other OS errors (a full disk, an I/O error) stay runtime errors (1).
_USAGE_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
)

_EPILOG = """\
exit codes: 0 ok, 1 runtime error, 2 usage or config error, 3 bundle rejected.
Start with `edgeguard demo`, then `edgeguard init DIR` (README: "Your first device, step by step");
`edgeguard COMMAND --help` explains each command and gives every option's default."""


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
    for module in (
        _bundle_cmds, _engine_cmds, _quantize_cmds, _service_cmds, _scan_cmds, _demo,
        _zoo_cmds, _init_cmd, _token_cmds, _status_cmd, _audit_cmds,
    ):
        module.register(sub)
    _describe_defaults(parser)
    return parser


def _describe_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: ...)" to every optional option's help that does not state its default yet.

    Done once here rather than in each module, so a new option cannot ship without its default in --help
    (tests/cli/test_help.py walks every command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _describe_defaults(child)
            continue
        if (
            not action.option_strings
            or action.required
            or action.help in (None, argparse.SUPPRESS)
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction))
            or "default" in str(action.help)
        ):
            continue
        value = action.default
        shown = "none" if value in (None, [], ()) else str(value).replace("%", "%%")
        action.help = f"{action.help} (default: {shown})"


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
        code = EXIT_USAGE if exc.errno in _USAGE_ERRNOS else EXIT_RUNTIME
        return _fail(code, f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
