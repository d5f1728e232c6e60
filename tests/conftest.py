"""Shared fixtures: a real realm (SQLite in a temp dir) with fast argon2 settings."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver

from chatproto import wire
from chatproto.client import ChatClientService
from chatproto.config import Config
from chatproto.protocol import ClientFactory
from chatproto.realm import RealmService
from chatproto.store.backend import make_store
from tests import services
from tests.services import (  # re-exported: tests import them from here
    PG_DSN,
    pg_schema,
    postgresql_or_skip,
    service_available,
    use_postgresql,
)

__all__ = ["PG_DSN", "pg_schema", "postgresql_or_skip", "service_available", "use_postgresql"]

#: The store realm-level tests run on: "sqlite" (default) or "postgresql"
#: (CHATPROTO_TEST_STORE=postgresql pytest ...).  The store contract tests
#: (tests/test_store.py), the modules of :data:`EVERY_STORE` and a few other realm
#: tests run on every backend regardless.
TEST_STORE = os.environ.get("CHATPROTO_TEST_STORE", "sqlite")
if TEST_STORE not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"CHATPROTO_TEST_STORE={TEST_STORE!r}: sqlite or postgresql")

#: The test modules whose every test runs twice in every run (``pytest -n auto``, so CI
#: too): on SQLite and on PostgreSQL, each PostgreSQL run in schemas of its own (the
#: realm-level loopback, groups, files and federation tests; docs/testing-guide.md
#: says why these).  A test that already names its stores (a ``server`` or
#: ``store_backend`` parameter) keeps its own.
EVERY_STORE = frozenset(
    {
        "test_loopback",
        "test_groups",
        "test_groups_loopback",
        "test_files",
        "test_files_loopback",
        "test_federation_loopback",
        "test_federation_groups",
        "test_federation_groups_loopback",
    }
)


def pytest_generate_tests(metafunc: Any) -> None:
    if metafunc.module.__name__.rpartition(".")[2] not in EVERY_STORE:
        return
    if hasattr(metafunc.function, "hypothesis"):
        # A property test builds no realm per example, and pytest-twisted wraps a
        # hypothesis test's function object in place: run twice in one process, the
        # second run fails inside the first's wrapper.
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = names.split(",") if isinstance(names, str) else names
        if {"server", "store_backend"} & {n.strip() for n in names}:
            return
    metafunc.parametrize("store_backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(autouse=True)
def store_backend(request: Any) -> Any:
    """The store this test's realms are on (:func:`fast_config`'s default): the
    parameter of an :data:`EVERY_STORE` module's test, else :data:`TEST_STORE`."""
    store = getattr(request, "param", TEST_STORE)
    services.current_store[0] = store
    yield store
    services.current_store[0] = TEST_STORE


@pytest.fixture(autouse=True)
def _drop_pg_schemas() -> Any:
    """Drop the PostgreSQL schemas the test made (after every other fixture of it)."""
    yield
    services.drop_made_schemas()


def pytest_sessionfinish(session: Any) -> None:
    services.drop_made_schemas()  # any made outside a test (a wider-scoped fixture)


def fast_config(tmp_path: Any, store: str | None = None, **limits: Any) -> Config:
    """A config for tests: temp data dir and cheap argon2 parameters, on the store
    ``store`` (default: the running test's, see :func:`store_backend`)."""
    cfg = Config(data_dir=str(tmp_path / "data"))
    cfg.auth.argon2_time_cost = 1
    cfg.auth.argon2_memory_cost = 1024
    cfg.auth.argon2_parallelism = 1
    for k, v in limits.items():
        setattr(cfg.limits, k, v)
    cfg.check()
    if (store or services.current_store[0]) == "postgresql":
        use_postgresql(cfg)
    return cfg


def make_realm(cfg: Config, clock: Any = None, reactor: Any = None) -> RealmService:
    reactor = reactor or _reactor
    if cfg.storage.backend == "sqlite":
        store = make_store(cfg, reactor, synchronous="NORMAL")
    else:
        store = make_store(cfg, reactor)
    return RealmService(cfg, store, reactor, clock=clock)


@pytest.fixture
def dsn() -> str:
    """The PostgreSQL server's DSN, for the tests of the PostgreSQL store itself
    (skipped without one, unless CI is set)."""
    return postgresql_or_skip()


@pytest.fixture
def schema(dsn: str) -> str:
    """A schema of the test's own on that server (dropped after the test)."""
    return pg_schema()


def sqlite_only() -> None:
    """Skip a test that looks inside the SQLite file when the realm tests run on
    another store (its behaviour is covered for every store elsewhere)."""
    if services.current_store[0] != "sqlite":
        pytest.skip(f"looks inside SQLite; the test's store is {services.current_store[0]}")


@pytest.fixture
def config(tmp_path: Any) -> Config:
    return fast_config(tmp_path)


@pytest.fixture
def realm(config: Config) -> Any:
    service = make_realm(config)
    pytest_twisted.blockon(service.startService())
    yield service
    pytest_twisted.blockon(service.stopService())


@pytest.fixture
def server(tmp_path: Any, request: Any) -> Any:
    """A realm listening on 127.0.0.1 port 0: (realm, factory, "tcp:...").  On the
    test store, or on the one named by an indirect parameter::

        @pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
    """
    store = getattr(request, "param", None)
    cfg = fast_config(tmp_path, store=store, send_burst=10_000, send_rate=10_000.0)
    yield from listening(cfg)


def listening(cfg: Any) -> Any:
    """For a fixture to ``yield from``: a realm of ``cfg`` listening on 127.0.0.1 port
    0, as ``(realm, factory, "tcp:...")``; afterwards its connections are aborted and
    it stops."""
    realm = make_realm(cfg)
    pytest_twisted.blockon(realm.startService())
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield realm, factory, f"tcp:127.0.0.1:{port.getHost().port}"
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(realm.stopService())


def route_appends(store: Any, append: Any) -> None:
    """Make every append of ``store`` go through ``append(items, outbox)`` (which
    returns a Deferred): its :meth:`append` and the send path's ``append_to``, whose
    waiter then hears of that Deferred's outcome (a test holding or failing commits)."""
    store.append = append
    store.append_to = lambda waiter, items, outbox=(): append(items, outbox).addCallbacks(
        waiter.callback, waiter.errback
    )


def count_appends(realm: Any) -> list[int]:
    """Record the number of items of each append of the realm's store."""
    sizes: list[int] = []
    append = realm.store.append

    def counting(items: Any, outbox: Any = ()) -> defer.Deferred[Any]:
        sizes.append(len(items))
        return append(items, outbox)

    route_appends(realm.store, counting)
    return sizes


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


class FlowTransport(StringTransport):
    """A StringTransport with the flow control of Twisted's TCP transport
    (``abstract.FileDescriptor``): while more than ``bufferSize`` bytes are unread it
    calls its streaming producer's ``pauseProducing`` on *every* write, and
    ``resumeProducing`` once the peer has read everything (:meth:`read`)."""

    bufferSize = 64 * 1024

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and self.unread() > self.bufferSize:
            self.producer_paused = True
            self.producer.pauseProducing()

    def unread(self) -> int:
        return len(self.io.getvalue())

    def read(self, n: int | None = None) -> bytes:
        """The peer reads ``n`` bytes (all: None); the producer resumes once none are
        left unread."""
        data = self.value()
        out, rest = (data, b"") if n is None else (data[:n], data[n:])
        self.clear()
        self.io.write(rest)
        if not rest and self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return out


class RawClient(Int32StringReceiver):
    """A hand-driven native client speaking raw frames (for hostile-client tests).

    ``frames`` collects what the realm sent (decoded; a frame the strict decoder
    refuses is kept as its raw bytes), ``received`` counts bytes, ``lost`` fires when
    the connection closes."""

    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.received = 0
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        super().dataReceived(data)

    def stringReceived(self, payload: bytes) -> None:
        try:
            self.frames.append(wire.decode(payload))
        except Exception:
            self.frames.append(payload)

    def send(self, obj: dict[str, Any]) -> None:
        self.sendString(wire.encode(obj))

    def send_raw(self, payload: bytes) -> None:
        self.sendString(payload)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)

    def reply(self, rid: Any) -> Any:
        """The reply frame with ``id`` ``rid`` once it came (polls)."""
        return until(lambda: any(_id_of(f) == rid for f in self.frames)).addCallback(
            lambda _: next(f for f in self.frames if _id_of(f) == rid)
        )


def _id_of(frame: Any) -> Any:
    return frame.get("id") if isinstance(frame, dict) else None


@defer.inlineCallbacks
def raw_client(
    addr: str, login: tuple[str, str] | None = None, ca: str | None = None, **fields: Any
) -> Any:
    """A :class:`RawClient` connected to ``addr`` (``tcp:`` or ``tls:HOST:PORT``)
    after ``hello`` and, with ``login`` (user, password), logged in and synced."""
    from twisted.internet.protocol import Factory

    from chatproto.client import endpoint_for

    endpoint = endpoint_for(_reactor, addr, "localhost", ca)
    proto = yield endpoint.connect(Factory.forProtocol(RawClient))
    proto.send({"type": "hello", "version": 1, "id": "hello"})
    yield proto.reply("hello")
    if login is not None:
        user, password = login
        proto.send({"type": "login", "id": "login", "user": user, "password": password, **fields})
        reply = yield proto.reply("login")
        assert reply["type"] == "result", reply
        yield until(lambda: any(_type_of(f) == "synced" for f in proto.frames))
    return proto


def _type_of(frame: Any) -> Any:
    return frame.get("type") if isinstance(frame, dict) else None


def tcp_of(transport: Any) -> Any:
    """The TCP transport under ``transport`` (itself, or the one under TLS)."""
    from twisted.protocols.policies import ProtocolWrapper

    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


def unsent(transport: Any) -> int:
    """Bytes a Twisted TCP transport (under TLS or not) holds, not yet sent."""
    t = tcp_of(transport)
    return len(t.dataBuffer) - t.offset + t._tempDataLen


class LogWatch:
    """The realm's log as twistd writes it (tracebacks included) while a test runs."""

    def __init__(self) -> None:
        from twisted.logger import globalLogPublisher

        self.lines: list[str] = []
        self.failures: list[str] = []
        self._publisher = globalLogPublisher
        self._publisher.addObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEventAsClassicLogText

        text = formatEventAsClassicLogText(event) or ""
        self.lines.append(text)
        if "log_failure" in event:
            self.failures.append(text)

    def close(self) -> None:
        self._publisher.removeObserver(self)


@pytest.fixture
def log_watch() -> Any:
    watch = LogWatch()
    yield watch
    watch.close()


def old_sqlite(path: str, version: int) -> Any:
    """A SQLite database at schema ``version``, as a chatproto of that schema made it
    (the migrations up to it), for upgrade tests."""
    import chatproto.store.sqlite as sqlite_module

    db = sqlite_module.SQLiteDB(path)
    current = sqlite_module.SCHEMA_VERSION
    sqlite_module.SCHEMA_VERSION = version
    try:
        db.migrate()
    finally:
        sqlite_module.SCHEMA_VERSION = current
    return db


def old_postgres(dsn: str, schema: str, version: int) -> Any:
    """A PostgreSQL database (``schema``) at schema ``version``, as a chatproto of
    that schema made it (the migrations up to it), for upgrade tests: what
    :func:`old_sqlite` is for SQLite."""
    import chatproto.store.postgresql.db as pg_db

    current = pg_db.SCHEMA_VERSION
    pg_db.SCHEMA_VERSION = version
    try:
        db = pg_db.PostgresDB(dsn, schema, writer="realm")
        db.migrate()
    finally:
        pg_db.SCHEMA_VERSION = current
    return db
