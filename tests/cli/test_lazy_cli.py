"""`edgeguard --help` and `edgeguard CMD` import only what they need: the top-level listing comes from a table
in edgeguard/cli/__init__.py, which must agree with what each module's register() really adds."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

from edgeguard.cli import _COMMANDS, _MODULES, build_parser

HEAVY = ("numpy", "onnxruntime", "cryptography", "aiohttp", "paho", "edgeguard.bundle", "edgeguard.engine",
         "edgeguard.service", "importlib.metadata")


def _registered(module: str) -> list[tuple[str, str | None]]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(f"edgeguard.cli.{module}").register(sub)
    return [(a.dest, a.help) for a in sub._choices_actions]


def test_command_table_matches_what_the_modules_register() -> None:
    real = [(name, (module, text)) for module in _MODULES for name, text in _registered(module)]
    table = list(_COMMANDS.items())
    assert real == table, "edgeguard/cli: _COMMANDS must list each command as its module registers it"


def test_lazy_parser_lists_every_command_with_its_help() -> None:
    full, lazy = build_parser(), build_parser(None, lazy=True)
    assert lazy.format_help() == full.format_help()
    # A named command is the real one, options and all.
    pack = dict(_subcommands(build_parser("pack", lazy=True)))["pack"]
    assert pack.format_help() == dict(_subcommands(full))["pack"].format_help()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices.items())


_PROBE = """
import sys
from edgeguard.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("\\n".join(sorted(sys.modules)), file=sys.stderr)
"""


def _modules_after(*argv: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60)
    return set(done.stderr.split())


def test_help_and_version_load_no_command_module() -> None:
    for argv in (["--help"], []):
        loaded = _modules_after(*argv)
        assert not {m for m in loaded if m.startswith(HEAVY)}, argv
        assert not {m for m in loaded if m.startswith("edgeguard.cli._")}, argv
    done = subprocess.run([sys.executable, "-m", "edgeguard", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("edgeguard "), done


def test_a_command_loads_only_its_own_module() -> None:
    loaded = _modules_after("token", "--help")
    assert "edgeguard.cli._token_cmds" in loaded
    assert not {m for m in loaded if m.startswith("edgeguard.cli._") and m != "edgeguard.cli._token_cmds"}


def test_help_is_about_as_fast_as_starting_python() -> None:
    """The measured figure is in docs/footprint.md; here only the order of magnitude, robust to a busy
    machine: best of 3 of `edgeguard --help` within python's own start plus 0.15 s."""

    def best(argv: list[str]) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, timeout=60, check=True)
            times.append(time.perf_counter() - t0)
        return min(times)

    bare = best([sys.executable, "-c", "pass"])
    helped = best([sys.executable, "-m", "edgeguard", "--help"])
    assert helped <= bare + 0.15, f"--help {helped:.3f} s vs python {bare:.3f} s"
