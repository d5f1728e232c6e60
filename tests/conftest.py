"""Shared fixtures: a real realm (SQLite in a temp dir) with fast argon2 settings."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.config import Config
from chatproto.realm import RealmService
from chatproto.store.sqlite import SQLiteStore


def fast_config(tmp_path: Any, **limits: Any) -> Config:
    """A config for tests: temp data dir and cheap argon2 parameters."""
    cfg = Config(data_dir=str(tmp_path / "data"))
    cfg.auth.argon2_time_cost = 1
    cfg.auth.argon2_memory_cost = 1024
    cfg.auth.argon2_parallelism = 1
    for k, v in limits.items():
        setattr(cfg.limits, k, v)
    cfg.check()
    return cfg


def make_realm(cfg: Config, clock: Any = None, reactor: Any = None) -> RealmService:
    reactor = reactor or _reactor
    store = SQLiteStore(cfg.database_path, reactor, synchronous="NORMAL")
    return RealmService(cfg, store, reactor, clock=clock)


@pytest.fixture
def config(tmp_path: Any) -> Config:
    return fast_config(tmp_path)


@pytest.fixture
def realm(config: Config) -> Any:
    service = make_realm(config)
    pytest_twisted.blockon(service.startService())
    yield service
    pytest_twisted.blockon(service.stopService())


def service_available(host: str, port: int) -> bool:
    """True when a TCP service answers (for PostgreSQL/Redis tests, later)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return bool(os.environ.get("CI"))
