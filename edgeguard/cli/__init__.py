"""The ``edgeguard`` command line.

Each concern registers its own subcommands (``_bundle_cmds``, ``_engine_cmds``, ``_service_cmds``, ``_demo``,
``_zoo_cmds``, ``_init_cmd``, ``_token_cmds``, ``_status_cmd``, ``_provision_cmds``, ``_fleet_cmds``,
``_audit_cmds``, ``_fingerprint_cmds``, ``_explain_cmds``);
this module only builds the parser and maps error families to the exit-code contract:

    0 ok · 1 runtime error · 2 usage/config error · 3 bundle (or provisioning archive) rejected

A failure prints one line on stderr and no traceback (``EDGEGUARD_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from edgeguard.errors import (
    ArchiveRejected,
    BundleRejected,
    ConfigError,
    EdgeGuardError,
    InputRejected,
    KeyFileError,
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
exit codes: 0 ok, 1 runtime error, 2 usage or config error, 3 bundle (or provisioning archive) rejected.
Start with `edgeguard demo`, then `edgeguard init DIR` (README: "Your first device, step by step");
`edgeguard COMMAND --help` explains each command and gives every option's default."""


# The modules whose register(sub) adds the subcommands, in listing order.
_MODULES = (
    "_bundle_cmds", "_engine_cmds", "_quantize_cmds", "_service_cmds", "_demo",
    "_zoo_cmds", "_init_cmd", "_token_cmds", "_status_cmd", "_scan_cmds", "_provision_cmds",
    "_audit_cmds", "_robustness_cmds", "_fingerprint_cmds", "_explain_cmds", "_fleet_cmds",
)

# Every top-level command: the module that registers it and its one-line help, so that `edgeguard --help`
# imports none of them and `edgeguard CMD` imports only CMD's (the bundle and engine modules pull in numpy,
# cryptography and onnxruntime: ~0.3 s before anything is printed). tests/cli/test_help.py checks this table
# against what the modules' register() really adds; a new command goes in both.
_COMMANDS: dict[str, tuple[str, str]] = {
    "keygen": ("_bundle_cmds", "create a publisher, device or operator key pair"),
    "pack": ("_bundle_cmds", "seal a model into a signed, encrypted bundle (.egm)"),
    "verify": ("_bundle_cmds", "verify a bundle (and decrypt it in memory with --device-key)"),
    "inspect": ("_bundle_cmds", "print a bundle's manifest as JSON (signature not checked)"),
    "infer": ("_engine_cmds", "run one input through a sealed model"),
    "doctor": ("_engine_cmds", "board, accelerators, and which one a model would use"),
    "bench": ("_engine_cmds", "engine vs raw library throughput and cold start (ratios)"),
    "quantize": ("_quantize_cmds", "quantize an fp32 ONNX model to int8, guarded by accuracy"),
    "run": ("_service_cmds", "run the service (supervisor, worker, input sources, MQTT link, watchdogs)"),
    "demo": (
        "_demo", "seal a real model with throwaway keys, run it from memory, buffer and deliver its results"
    ),
    "zoo": ("_zoo_cmds", "list and fetch the known models and sample photos"),
    "init": ("_init_cmd", "create a working development device (keys, tokens, sealed model, config) in DIR"),
    "token": ("_token_cmds", "add, list or revoke the local API's bearer tokens"),
    "status": ("_status_cmd", "is the service OK, and if not, why (health, model, outbox, link, MTBF)"),
    "scan": ("_scan_cmds", "the device's security posture: findings, evidence, fixes"),
    "advisories": ("_scan_cmds", "publisher side: sign the advisory file devices check against"),
    "enroll": ("_provision_cmds", "make this device's keys and a CSR (private keys stay here)"),
    "provision": ("_provision_cmds", "install a fleet provisioning archive on this device"),
    "audit": ("_audit_cmds", "verify or read the tamper-evident audit log"),
    "robustness": ("_robustness_cmds", "black-box attacks and the adversarial-input detector, measured"),
    "fingerprint": (
        "_fingerprint_cmds",
        "publisher side: make a secret trigger set for a model, or check a suspect model against it",
    ),
    "explain": ("_explain_cmds", "heatmap of the image regions that decide a model's top class or box"),
    "fleet": (
        "_fleet_cmds",
        "operate a fleet: CA, devices, broker config, sealing, commands, status, ingest (docs/fleet.md)",
    ),
}


class _Version(argparse._VersionAction):
    """``--version``, looked up only when asked for (importlib.metadata is not free)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from edgeguard import __version__  # noqa: PLC0415

        self.version = f"edgeguard {__version__}"
        super().__call__(parser, namespace, values, option_string)


def build_parser(command: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The command-line parser with every command registered by its module.

    ``lazy``: register only ``command``'s module (none when it is None or unknown); the other commands are
    listed from ``_COMMANDS`` without their options, enough for the top-level help and argparse's choices."""
    parser = argparse.ArgumentParser(
        prog="edgeguard",
        description="Secure inference runtime for edge devices: sealed models, hardware fast path, "
        "durable results over MQTT.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if lazy:
        owner = _COMMANDS.get(command or "")
        modules: Sequence[str] = (owner[0],) if owner is not None else ()
    else:
        modules = _MODULES
    for name in modules:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    if lazy:
        for cmd, (_, text) in _COMMANDS.items():
            if cmd not in sub.choices:
                sub.add_parser(cmd, help=text)
    _describe_defaults(parser)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word: the first argument that is not an option (the top level's options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


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
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(words), lazy=True)
    args = parser.parse_args(words)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    debug = os.environ.get("EDGEGUARD_DEBUG") == "1"
    try:
        return int(handler(args))
    except (BundleRejected, ArchiveRejected) as exc:
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
