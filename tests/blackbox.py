"""The black-box harness: a real realm on 127.0.0.1 port 0 and clients that speak raw
Int32 + JSON frames to it, knowing only PROTOCOL.md (tests/test_blackbox_*.py).

A test asks for the realm with the limits it needs (``open_realm``), connects clients
(``Peer``), and sends requests; each request has an id of its own and ``req`` fires
with the one frame that answers it.  Requests that are never answered (``ack``,
``pong``) are checked with a *fence*: a ``ping`` sent after them, whose result comes
after anything they caused, since the realm answers both at once, in order.

The second part (below ``errcode``) drives :class:`tests.conftest.RawClient`, which
keeps every frame it got: ``call`` a request, ``wait_for`` a pushed frame, build
binary ``data_frame`` payloads."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

from chatproto import wire
from chatproto.client import endpoint_for
from chatproto.protocol import ClientFactory
from tests.conftest import RawClient, fast_config, listening, make_realm, raw_client, until

PW = "password-bb"


def serve(cfg: Any, users: Iterable[str] = ()) -> Iterator[tuple[Any, str]]:
    """The body of a fixture (``yield from serve(cfg)``): a realm on ``cfg`` listening
    on 127.0.0.1 port 0, with ``users`` registered (password :data:`PW`); yields
    ``(realm service, "tcp:..." address)``, then drops the connections and stops it."""
    for realm, _factory, addr in listening(cfg):  # (once: then its teardown)
        for name in users:
            pytest_twisted.blockon(realm.create_user(name, PW))
        yield realm, addr


class Realm:
    """A realm listening on loopback: ``addr`` for clients, ``realm`` for what a test
    cannot do over the wire (an operator's action)."""

    def __init__(self, tmp_path: Any, **limits: Any) -> None:
        """Not listening yet: see :meth:`start` (a test) and :meth:`open` (a fixture)."""
        auth = limits.pop("auth", {})
        cfg = fast_config(tmp_path, **limits)
        cfg.auth.registrations_per_address = 0  # tests register many accounts
        cfg.auth.free_failures_per_address = 10**6
        for k, v in auth.items():
            setattr(cfg.auth, k, v)
        self.config = cfg
        self.realm = make_realm(cfg)
        self._names = itertools.count(1)

    @classmethod
    @defer.inlineCallbacks
    def start(cls, tmp_path: Any, **limits: Any) -> Any:
        """A started realm (``limits``: of ``[limits]``, and ``auth={...}``)."""
        self = cls(tmp_path, **limits)
        yield self.realm.startService()
        self.factory = ClientFactory(self.realm)
        self.port = _reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addr = f"tcp:127.0.0.1:{self.port.getHost().port}"
        return self

    @classmethod
    def open(cls, tmp_path: Any, **limits: Any) -> Realm:
        """:meth:`start`, for a fixture (outside the reactor's greenlet)."""
        realm: Realm = pytest_twisted.blockon(cls.start(tmp_path, **limits))
        return realm

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for proto in list(self.factory.connections):
            proto.transport.abortConnection()
        yield self.port.stopListening()
        yield self.realm.stopService()

    def close(self) -> None:
        """:meth:`stop`, for a fixture."""
        pytest_twisted.blockon(self.stop())

    def name(self, prefix: str = "u") -> str:
        """A fresh account name."""
        return f"{prefix}{next(self._names)}"

    @defer.inlineCallbacks
    def connect(self, hello: bool = True) -> Any:
        """A connected :class:`Peer`, past ``hello`` unless ``hello`` is false."""
        endpoint = endpoint_for(_reactor, self.addr, "localhost", None)
        peer = yield endpoint.connect(Factory.forProtocol(Peer))
        if hello:
            r = yield peer.req("hello", version=1)
            assert r["type"] == "result", r
        return peer

    @defer.inlineCallbacks
    def user(self, name: str | None = None, **login: Any) -> Any:
        """A new account, registered and logged in on a fresh connection (synced)."""
        name = name or self.name()
        peer = yield self.connect()
        r = yield peer.req("register", user=name, password=PW)
        assert r["type"] == "result", r
        yield peer.login(name, **login)
        return peer

    @defer.inlineCallbacks
    def login(self, name: str, **login: Any) -> Any:
        """Another logged-in (synced) connection of the account ``name``."""
        peer = yield self.connect()
        yield peer.login(name, **login)
        return peer


class Peer(Int32StringReceiver):
    """One client connection: ``frames`` is everything the realm sent, in order."""

    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.name = ""
        self._ids = itertools.count(1)
        self._waiting: dict[Any, defer.Deferred[Any]] = {}

    # wire ---------------------------------------------------------------------------

    def stringReceived(self, payload: bytes) -> None:
        try:
            frame = wire.decode(payload)
        except Exception:
            frame = payload
        self.frames.append(frame)
        if isinstance(frame, dict) and frame.get("type") in ("result", "error"):
            d = self._waiting.pop(frame.get("id"), None)
            if d is not None:
                d.callback(frame)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)

    def send(self, obj: dict[str, Any]) -> None:
        self.sendString(wire.encode(obj))

    def send_raw(self, payload: bytes) -> None:
        self.transport.write(struct.pack("!I", len(payload)) + payload)

    # requests -----------------------------------------------------------------------

    def req(self, type_: str, **fields: Any) -> defer.Deferred[Any]:
        """Send a request with a fresh id; fires with its answer (result or error)."""
        rid = f"q{next(self._ids)}"
        return self.req_raw({"type": type_, "id": rid, **fields})

    def req_raw(self, obj: dict[str, Any]) -> defer.Deferred[Any]:
        """Send ``obj`` as it is (its ``id`` must be fresh); fires with its answer."""
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting[obj["id"]] = d
        self.send(obj)
        return _timeout(d)

    @defer.inlineCallbacks
    def fence(self) -> Any:
        """The frames that came after the last call of :meth:`fence` (or from the
        start) up to the result of a ``ping`` sent now, which is not among them."""
        start = getattr(self, "_fenced", 0)
        r = yield self.req("ping")
        end = self.frames.index(r)
        self._fenced = end + 1
        return self.frames[start:end]

    @defer.inlineCallbacks
    def login(self, name: str, password: str = PW, **fields: Any) -> Any:
        r = yield self.req("login", user=name, password=password, **fields)
        assert r["type"] == "result", r
        self.name = r["user"]
        yield self.wait_for(lambda f: f.get("type") == "synced")
        return r

    def wait_for(self, pred: Callable[[dict[str, Any]], bool]) -> defer.Deferred[Any]:
        """Fires with the first frame so far or to come that ``pred`` accepts."""

        def found() -> Any:
            return next((f for f in self.frames if isinstance(f, dict) and pred(f)), None)

        return until(lambda: found() is not None).addCallback(lambda _: found())

    def pushed(self, type_: str) -> list[dict[str, Any]]:
        """The frames of ``type_`` received so far."""
        return [f for f in self.frames if isinstance(f, dict) and f.get("type") == type_]

    def close(self) -> defer.Deferred[None]:
        self.transport.loseConnection()
        return self.lost


def _timeout(d: defer.Deferred[Any], seconds: float = 15.0) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, _reactor)


def errcode(frame: dict[str, Any]) -> str:
    """``"ok"`` for a result, else the error's code."""
    if frame.get("type") == "result":
        return "ok"
    assert frame.get("type") == "error", frame
    return str(frame["code"])


# Helpers over tests.conftest.RawClient (a raw-frame client that keeps every frame it
# got in ``frames``): used by the black-box tests of PROTOCOL.md's later sections
# (files, stream positions, groups, presence, addresses, federation).

_call_ids = itertools.count(1)


def data_frame(stream: int, offset: int, data: bytes, op: int = 1) -> bytes:
    """A binary data frame's payload (PROTOCOL.md, Binary data frames)."""
    return b"\x00" + bytes([op]) + struct.pack("!IQ", stream, offset) + data


@defer.inlineCallbacks
def call(client: RawClient, frame: dict[str, Any]) -> Any:
    """Send ``frame`` with a fresh ``id`` and return the reply (result or error)."""
    rid = next(_call_ids)
    client.send({**frame, "id": rid})
    reply = yield client.reply(rid)
    return reply


@defer.inlineCallbacks
def closed(client: RawClient) -> Any:
    """Close ``client``'s connection and wait until it is gone."""
    client.transport.loseConnection()
    yield client.lost


def msgs(client: RawClient) -> list[dict[str, Any]]:
    return [f for f in client.frames if isinstance(f, dict) and f.get("type") == "msg"]


def errors(client: RawClient) -> list[dict[str, Any]]:
    """Error frames without ``id`` (pushed, not answers)."""
    return [
        f
        for f in client.frames
        if isinstance(f, dict) and f.get("type") == "error" and "id" not in f
    ]


def wait_for(client: RawClient, predicate: Any, timeout: float = 10.0) -> Any:
    """Fires with the first frame of ``client`` that satisfies ``predicate``."""
    return until(
        lambda: any(isinstance(f, dict) and predicate(f) for f in client.frames), timeout
    ).addCallback(lambda _: next(f for f in client.frames if isinstance(f, dict) and predicate(f)))


@defer.inlineCallbacks
def login(addr: str, user: str, **fields: Any) -> Any:
    client = yield raw_client(addr, (user, PW), **fields)
    return client


def code(reply: dict[str, Any]) -> str | None:
    """The error code of a reply, None for a result."""
    return reply.get("code") if reply.get("type") == "error" else None
