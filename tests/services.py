"""External services the tests use (PostgreSQL; Redis later): found or skipped, and
a PostgreSQL schema of its own for every test.

One module, imported as ``tests.services`` by conftest.py and by the tests alike, so the
schemas a test makes are recorded in one list whatever module made them (conftest.py is
loaded twice: by pytest as ``conftest`` and by the tests as ``tests.conftest``).
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

import pytest

#: The PostgreSQL server of the tests (each test gets schemas of its own in it).
PG_DSN = os.environ.get(
    "CHATPROTO_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)

#: Schemas made and not dropped yet (dropped after each test: :func:`drop_made_schemas`).
_made: list[str] = []


def service_available(host: str, port: int) -> bool:
    """True when a TCP service answers, or when CI is set (there the service must be
    there: a test needing it runs and fails rather than skipping)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return bool(os.environ.get("CI"))


def postgresql_or_skip() -> str:
    """The tests' DSN; skips the test when no PostgreSQL server answers (or psycopg is
    missing), unless CI is set: then the test runs, and fails without the server."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("psycopg is not installed: pip install -e '.[dev]' (or '.[postgresql]')")
    params = conninfo_to_dict(PG_DSN)
    host, port = params.get("host", "127.0.0.1"), int(params.get("port", 5432))
    if not service_available(host, port):
        pytest.skip(f"no PostgreSQL server at {host}:{port} (and CI is not set)")
    return PG_DSN


def pg_schema() -> str:
    """A new schema name, unique to this process and call; dropped after the test."""
    name = f"chatproto_t{os.getpid()}_{secrets.token_hex(4)}"
    _made.append(name)
    return name


def drop_made_schemas() -> None:
    """Drop every schema :func:`pg_schema` named so far (those never created too)."""
    if not _made:
        return
    import psycopg
    from psycopg import sql

    names = list(_made)
    _made.clear()
    with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SET lock_timeout = '10s'")
        for name in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def use_postgresql(cfg: Any) -> Any:
    """Point ``cfg`` (a :class:`chatproto.config.Config`) at a new schema of the tests'
    PostgreSQL server (skips the test if there is none and CI is unset)."""
    cfg.storage.backend = "postgresql"
    cfg.storage.dsn = postgresql_or_skip()
    cfg.storage.schema = pg_schema()
    cfg.check()
    return cfg
