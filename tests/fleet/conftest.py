"""Fleet fixtures: a fresh PostgreSQL database per test (dropped after), real mosquitto brokers."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg  # the dev extra installs it: a missing driver fails these tests, it does not skip them
import pytest

from tests.support.broker import broker_factory, mosquitto, pki, recorder_factory

__all__ = ["broker_factory", "mosquitto", "pki", "recorder_factory", "pg_dsn", "PG_ADMIN_DSN"]

# The PostgreSQL these machines and CI run (trust auth); EDGEGUARD_TEST_PG points elsewhere.
PG_ADMIN_DSN = os.environ.get("EDGEGUARD_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A database of its own with a random name; dropped (connections and all) at teardown."""
    name = f"eg_ingest_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(f"tests/fleet need PostgreSQL at {PG_ADMIN_DSN!r} (EDGEGUARD_TEST_PG): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(PG_ADMIN_DSN, dbname=name)
    try:
        yield dsn
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
