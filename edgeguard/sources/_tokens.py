"""Bearer tokens for the local API: loaded from a file or a systemd credential, checked in constant time.

File format, one token per line; a field that starts with ``#`` starts a comment (a ``#`` inside a token is
part of the token)::

    <name> <scope>[,<scope>...] <token>

Scopes are ``infer``, ``status``, ``admin`` and ``explain`` (``POST /v1/explain``: each request costs up to
``sources.api.explain_max_passes`` inferences, so it is its own scope). Tokens are 16..1024 characters. The
file must not be accessible by group or others (like key files), must be a regular file (a symbolic link is
not followed) and at most 256 KiB. Under systemd, ``LoadCredential=api-tokens:/etc/edgeguard/...``
puts it in ``$CREDENTIALS_DIRECTORY/api-tokens``; ``tokens_credential = "api-tokens"`` reads it from there.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeguard._echo import echo
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

__all__ = ["Scope", "SCOPES", "Token", "TokenStore", "credential_path"]

Scope = Literal["infer", "status", "admin", "explain"]
SCOPES: tuple[Scope, ...] = ("infer", "status", "admin", "explain")
MIN_TOKEN_CHARS = 16
MAX_TOKENS = 256
MAX_TOKEN_CHARS = 1024
MAX_FILE_BYTES = 256 * 1024  # MAX_TOKENS lines of a name, scopes and a long token, with comments


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: bytes  # SHA-256 of the token: equal-length values for compare_digest, no plaintext kept


def credential_path(name: str, *, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"credential {name!r} requested but $CREDENTIALS_DIRECTORY is not set (not under systemd?)"
        )
    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"credential name {name!r} is not a plain name")
    return Path(directory) / name


class TokenStore:
    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @classmethod
    def from_file(cls, path: Path, *, check_mode: bool = True) -> TokenStore:
        checked = read_checked(
            path, what="api tokens file", limit=MAX_FILE_BYTES, error=ConfigError, private=check_mode
        )
        try:
            text = checked.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"api tokens file {path}: not UTF-8 text") from None
        tokens: list[Token] = []
        names: set[str] = set()
        for lineno, raw in enumerate(text.splitlines(), 1):
            parts = _fields(raw)
            if not parts:
                continue
            if len(parts) != 3:
                raise ConfigError(f"api tokens file {path}:{lineno}: expected '<name> <scopes> <token>'")
            name, scopes_raw, secret = parts
            scopes = frozenset(scopes_raw.split(","))
            bad = sorted(scopes - set(SCOPES))
            if bad:
                raise ConfigError(
                    f"api tokens file {path}:{lineno}: unknown scope {echo(bad[0])} (use {', '.join(SCOPES)})"
                )
            if len(secret) < MIN_TOKEN_CHARS:
                raise ConfigError(
                    f"api tokens file {path}:{lineno}: token {echo(name)} is shorter than "
                    f"{MIN_TOKEN_CHARS} characters"
                )
            if len(secret) > MAX_TOKEN_CHARS:
                raise ConfigError(
                    f"api tokens file {path}:{lineno}: token {echo(name)} is longer than "
                    f"{MAX_TOKEN_CHARS} characters"
                )
            if name in names:
                raise ConfigError(f"api tokens file {path}:{lineno}: duplicate token name {echo(name)}")
            names.add(name)
            tokens.append(Token(name, scopes, hashlib.sha256(secret.encode()).digest()))
        if len(tokens) > MAX_TOKENS:
            raise ConfigError(f"api tokens file {path}: more than {MAX_TOKENS} tokens")
        return cls(tokens)

    def authenticate(self, presented: str) -> Token | None:
        """The token matching ``presented``, comparing against every entry so timing reveals nothing."""
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        found: Token | None = None
        for token in self._tokens:
            if hmac.compare_digest(token.digest, digest):
                found = token
        return found


def _fields(line: str) -> list[str]:
    """The whitespace-separated fields of a line up to a comment. A comment starts with a field that starts
    with ``#``: a ``#`` inside a token is part of the token (cutting there accepted the token's prefix)."""
    fields: list[str] = []
    for f in line.split():
        if f.startswith("#"):
            break
        fields.append(f)
    return fields
