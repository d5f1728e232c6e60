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


#: The store the running test's realms are on (see ``store_backend`` in conftest.py):
#: one list, whichever copy of conftest.py reads or sets it.
current_store = [os.environ.get("CHATPROTO_TEST_STORE", "sqlite")]


def use_postgresql(cfg: Any) -> Any:
    """Point ``cfg`` (a :class:`chatproto.config.Config`) at a new schema of the tests'
    PostgreSQL server (skips the test if there is none and CI is unset)."""
    cfg.storage.backend = "postgresql"
    cfg.storage.dsn = postgresql_or_skip()
    cfg.storage.schema = pg_schema()
    cfg.check()
    return cfg


# Redis (the bus of a cluster) ------------------------------------------------------

#: The Redis server of the tests (each test uses a key prefix of its own in it).
REDIS = os.environ.get("CHATPROTO_TEST_REDIS", "127.0.0.1:6379")


def redis_or_skip() -> str:
    """The tests' Redis ``HOST:PORT``; skips the test when none answers (or
    txredisapi is missing), unless CI is set: then the test runs, and fails."""
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("txredisapi is not installed: pip install -e '.[dev]' (or '.[cluster]')")
    host, _, port = REDIS.rpartition(":")
    if not service_available(host, int(port)):
        pytest.skip(f"no Redis server at {REDIS} (and CI is not set)")
    return REDIS


def redis_prefix() -> str:
    """A Redis key prefix unique to this process and call."""
    return f"chatproto-t{os.getpid()}-{secrets.token_hex(4)}"


def redis_command(address: str, *args: str, timeout: float = 5.0) -> bytes:
    """One command to Redis, synchronously; the raw reply (for tests' set-up and
    clean-up only)."""
    host, _, port = address.rpartition(":")
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(out)
        return s.recv(65536)


def redis_drop_prefix(address: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (a test's), best effort."""
    try:
        redis_command(
            address,
            "EVAL",
            "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end",
            "0",
            prefix + ":*",
        )
    except OSError:
        pass


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a server that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
