"""`--help` describes every option with its default; quantize and run show an example."""

from __future__ import annotations

import argparse

import pytest

from edgeguard.cli import build_parser


def _subparsers(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix}{name}"
                out.append((full, sub))
                out.extend(_subparsers(sub, full + " "))
    return out


COMMANDS = _subparsers(build_parser())


def test_every_command_is_covered() -> None:
    names = {name for name, _ in COMMANDS}
    assert {"pack", "quantize", "run", "bench", "init", "status", "zoo fetch", "token add"} <= names


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_has_help_and_default(name: str, parser: argparse.ArgumentParser) -> None:
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
            continue
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue  # positionals are named in the usage line; hidden options are for tests
        text = action.help or ""
        if not text:
            missing.append(f"{action.option_strings[0]}: no help")
            continue
        if action.required:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue  # a flag's default is "off"
        if "default" not in text:
            missing.append(f"{action.option_strings[0]}: help does not give the default ({text!r})")
    assert not missing, f"edgeguard {name}: " + "; ".join(missing)


@pytest.mark.parametrize("name", ["quantize", "run", "pack", "init", "status", "bench", "zoo"])
def test_example_in_epilog_or_description(name: str) -> None:
    parser = dict(COMMANDS)[name]
    text = parser.format_help()
    assert "example:" in text and f"edgeguard {name}" in text.split("example:", 1)[1], text
