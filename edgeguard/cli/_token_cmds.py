"""``edgeguard token add | list | revoke``: edit the local API's tokens file (format in docs/sources.md).

The file holds the secrets themselves (the service keeps only their SHA-256), so it is read the way key files
are (one descriptor, no symlink followed, regular file, private mode, bounded read) and replaced with
``atomic_write`` at mode 0600. The service reads it again on SIGHUP or ``POST /v1/admin/reload``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError
from edgeguard.sources import TokenStore
from edgeguard.sources._tokens import MAX_TOKENS, SCOPES

__all__ = ["register", "TokenLine", "read_token_lines", "new_token", "tokens_path_from_args", "render_line"]

_MAX_FILE = 1 << 20  # MAX_TOKENS lines of a few dozen characters fit many times over
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_RELOAD_HINT = (
    "the running service reads it again on SIGHUP (kill -HUP <pid of edgeguard run>) or on "
    "`POST /v1/admin/reload` with an admin token"
)

_TOKEN_HELP = """\
Manage the local API's bearer tokens. The file is given with --tokens FILE or found through the service
config (-c CONFIG.toml, key sources.api.tokens_file). `add` prints the new token once (only its SHA-256
fingerprint is shown afterwards); `list` never prints secrets; `revoke` removes a token. Every change
replaces the file atomically at mode 0600; reload the service (SIGHUP or POST /v1/admin/reload) to apply it.

example:
  edgeguard token add camera --scope infer -c mydevice/edgeguard.toml
  edgeguard token list -c mydevice/edgeguard.toml
  edgeguard token revoke camera -c mydevice/edgeguard.toml"""  # noqa: S105 - help text


@dataclass(frozen=True)
class TokenLine:
    """One line of the file: a token (name, scopes, secret) or anything else kept verbatim (``raw``)."""

    raw: str
    name: str | None = None
    scopes: tuple[str, ...] = ()
    secret: str = ""

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.secret.encode()).hexdigest()[:16]


def new_token() -> str:
    """256 random bits, URL-safe (no whitespace or '#', which the file format reserves)."""
    return secrets.token_urlsafe(32)


def render_line(name: str, scopes: tuple[str, ...], secret: str) -> str:
    return f"{name} {','.join(scopes)} {secret}"


def read_token_lines(path: Path) -> list[TokenLine]:
    """The file's lines, after the service's own parser accepted it (so a broken file is never rewritten)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigError(f"tokens file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"tokens file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"tokens file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"tokens file {path} is accessible by group/others (chmod 600 it)")
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ConfigError(f"tokens file {path}: larger than {_MAX_FILE} bytes")
    TokenStore.from_file(path)  # the service's rules (scopes, length, duplicates) with its line numbers
    lines = []
    for raw in data.decode("utf-8").splitlines():
        parts = raw.split("#", 1)[0].split()
        if len(parts) == 3:
            lines.append(TokenLine(raw, parts[0], tuple(parts[1].split(",")), parts[2]))
        else:
            lines.append(TokenLine(raw))
    return lines


def _write(path: Path, lines: list[TokenLine]) -> None:
    atomic_write(path, "".join(line.raw + "\n" for line in lines).encode(), mode=0o600)


def tokens_path_from_args(args: argparse.Namespace) -> Path:
    """--tokens FILE, else the config's sources.api.tokens_file."""
    if args.tokens is not None:
        return Path(args.tokens)
    if args.config is None:
        raise ConfigError("give the tokens file with --tokens FILE or the service config with -c CONFIG.toml")
    from edgeguard.service import load_config  # noqa: PLC0415 - keep the service stack out of other commands

    cfg = load_config(args.config)
    if cfg.api.tokens_file is None:
        raise ConfigError(
            f"{args.config}: sources.api.tokens_file is not set (a systemd credential is edited where it "
            "is stored: give that file with --tokens)"
        )
    return cfg.api.tokens_file


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser(
        "token",
        help="add, list or revoke the local API's bearer tokens",
        description=_TOKEN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)

    def where(q: argparse.ArgumentParser) -> None:
        g = q.add_mutually_exclusive_group()
        g.add_argument("-c", "--config", type=Path, metavar="CONFIG.toml",
                       help="service config whose sources.api.tokens_file is edited")
        g.add_argument("--tokens", type=Path, metavar="FILE", help="the tokens file itself")

    q = tsub.add_parser("add", help="create a token and print it once")
    q.add_argument("name", metavar="NAME", help="1..64 of A-Z a-z 0-9 _ . - (unique in the file)")
    q.add_argument(
        "--scope",
        default="infer",
        metavar="SCOPES",
        help=f"comma-separated, of {', '.join(SCOPES)} (default: infer)",
    )
    q.add_argument("--create", action="store_true",
                   help="create the tokens file (mode 0600) when it does not exist (default: refuse)")
    where(q)
    q.set_defaults(handler=_add)
    q = tsub.add_parser("list", help="names, scopes and fingerprints (never the secrets)")
    q.add_argument("--json", action="store_true", help="one JSON array instead of the table (default: table)")
    where(q)
    q.set_defaults(handler=_list)
    q = tsub.add_parser("revoke", help="remove a token")
    q.add_argument("name", metavar="NAME")
    where(q)
    q.set_defaults(handler=_revoke)


def _add(args: argparse.Namespace) -> int:
    path = tokens_path_from_args(args)
    if not _NAME.fullmatch(args.name):
        raise ConfigError(f"token name {args.name!r}: use 1..64 of A-Z a-z 0-9 _ . -")
    scopes = tuple(s for s in args.scope.split(",") if s)
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError(f"--scope {args.scope!r}: use one or more of {', '.join(SCOPES)}")
    if args.create and not path.exists() and not path.is_symlink():
        lines = [TokenLine("# name   scopes   token (edgeguard token add|list|revoke)")]
    else:
        lines = read_token_lines(path)
    if any(line.name == args.name for line in lines):
        raise ConfigError(f"a token named {args.name!r} exists in {path} (revoke it first)")
    if sum(1 for line in lines if line.name) >= MAX_TOKENS:
        raise ConfigError(f"{path} already holds {MAX_TOKENS} tokens")
    secret = new_token()
    lines.append(TokenLine(render_line(args.name, scopes, secret), args.name, scopes, secret))
    _write(path, lines)
    print(f"added {args.name} ({','.join(scopes)}) to {path}; the token, shown only now:")
    print(secret)
    print(f"note: {_RELOAD_HINT}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    path = tokens_path_from_args(args)
    tokens = [line for line in read_token_lines(path) if line.name]
    if args.json:
        rows = [{"name": t.name, "scopes": list(t.scopes), "fingerprint": t.fingerprint} for t in tokens]
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'NAME':<20}{'SCOPES':<22}FINGERPRINT (SHA-256)")
    for t in tokens:
        print(f"{t.name:<20}{','.join(t.scopes):<22}{t.fingerprint}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = tokens_path_from_args(args)
    lines = read_token_lines(path)
    kept = [line for line in lines if line.name != args.name]
    if len(kept) == len(lines):
        raise ConfigError(f"no token named {args.name!r} in {path}")
    _write(path, kept)
    print(f"revoked {args.name} in {path}")
    print(f"note: {_RELOAD_HINT}", file=sys.stderr)
    return 0
