"""Shared fixtures: a real realm (SQLite in a temp dir) with fast argon2 settings."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from chatproto.client import ChatClientService
from chatproto.config import Config
from chatproto.protocol import ClientFactory
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


@pytest.fixture
def server(tmp_path: Any) -> Any:
    """A realm on SQLite listening on 127.0.0.1 port 0: (realm, factory, "tcp:...")."""
    cfg = fast_config(tmp_path, send_burst=10_000, send_rate=10_000.0)
    realm = make_realm(cfg)
    pytest_twisted.blockon(realm.startService())
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield realm, factory, f"tcp:127.0.0.1:{port.getHost().port}"
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(realm.stopService())


def until(predicate: Any, timeout: float = 10.0) -> defer.Deferred[None]:
    """Poll ``predicate`` every 10 ms; fail after ``timeout`` seconds."""

    @defer.inlineCallbacks
    def poll() -> Any:
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            yield task.deferLater(_reactor, 0.01, lambda: None)
        raise AssertionError("condition not met in time")

    return poll()


def drop_sessions(factory: ClientFactory, user: str) -> None:
    """Abort every connection of ``user`` from the server side (a network failure)."""
    for proto in list(factory.connections):
        if proto.session is not None and proto.session.user_id == user:
            proto.transport.abortConnection()


def resuming_service(addr: str, user: str, password: str, **kw: Any) -> ChatClientService:
    """A ChatClientService for ``user`` on ``addr`` ("tcp:HOST:PORT") retrying quickly."""
    host, port = addr.split(":")[1:]
    kw.setdefault("retryPolicy", lambda attempt: 0.05)
    endpoint = TCP4ClientEndpoint(_reactor, host, int(port))
    return ChatClientService(_reactor, endpoint, user, password, **kw)


def fired(d: Any) -> Any:
    """The result of a Deferred that has already fired (MemoryStore, inline file I/O,
    a test Clock); raises what it failed with."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]
