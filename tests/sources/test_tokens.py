from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard.errors import ConfigError
from edgeguard.sources import TokenStore, credential_path

GOOD = "app infer,status s3cret-token-0123456789\nops status,admin,infer ops-token-abcdefghijkl # operator\n"


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "tokens"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_load_and_authenticate(tmp_path: Path) -> None:
    store = TokenStore.from_file(_write(tmp_path, "# tokens\n\n" + GOOD))
    assert len(store) == 2
    app = store.authenticate("s3cret-token-0123456789")
    assert app is not None and app.name == "app" and app.scopes == {"infer", "status"}
    assert store.authenticate("s3cret-token-012345678") is None
    assert store.authenticate("") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("app infer\n", "expected '<name> <scopes> <token>'"),
        ("app write s3cret-token-0123456789\n", "unknown scope 'write'"),
        ("app infer short\n", "shorter than 16"),
        ("a infer s3cret-token-0123456789\na infer s3cret-token-9876543210\n", "duplicate token name 'a'"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        TokenStore.from_file(_write(tmp_path, text))


def test_world_readable_file_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="group/others"):
        TokenStore.from_file(_write(tmp_path, GOOD, 0o644))


def test_credential_path(tmp_path: Path) -> None:
    assert (
        credential_path("api-tokens", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
        == tmp_path / "api-tokens"
    )
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        credential_path("api-tokens", environ={})
    with pytest.raises(ConfigError, match="plain name"):
        credential_path("../etc/passwd", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
