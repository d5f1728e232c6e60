"""Helpers for testing chatproto and code built on it without sockets or threads.

The pattern (see docs/testing-guide.md, and tests/test_protocol.py)::

    clock = Clock()
    realm = make_test_realm(clock)          # MemoryStore, inline hashing, no threads
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1}))
    assert frames(transport)[-1]["type"] == "result"
"""

from __future__ import annotations

import struct
from typing import Any

import argon2
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatproto import wire
from chatproto.config import Config
from chatproto.protocol import ClientFactory, ClientProtocol
from chatproto.realm import PasswordHasher, RealmService
from chatproto.store.memory import MemoryStore

__all__ = [
    "InlineHasher",
    "NullMind",
    "connect_string_transport",
    "frame",
    "frames",
    "logged_in",
    "make_test_realm",
    "parse_frames",
]


class InlineHasher(PasswordHasher):
    """argon2id with minimal cost, computed inline (tests only: blocks the caller)."""

    def __init__(self) -> None:
        self._ph = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        self._dummy = self._ph.hash("chatproto: no such user")

    def hash(self, password: str) -> Deferred[str]:
        return succeed(self._ph.hash(password))

    def verify(self, pwhash: str | None, password: str) -> Deferred[bool]:
        return succeed(self._verify(pwhash, password))


class NullMind:
    """A session *mind* (:class:`chatproto.realm.sessions.ISessionMind`) that drops what
    the realm sends and is always writable: for :meth:`RealmService.login` without a
    connection.  Subclass it to record what a test looks at."""

    protocol_name = "test"

    def deliver(self, envelope: Any) -> None:
        pass

    def synced(self, pos: int) -> None:
        pass

    def notify(self, notice: Any) -> None:
        pass

    def wait_writable(self) -> Deferred[None]:
        return succeed(None)

    def disconnect(self, code: str, message: str) -> None:
        pass


def make_test_realm(clock: Clock | None = None, config: Config | None = None) -> RealmService:
    """A started realm on a :class:`MemoryStore` with time from ``clock``."""
    clock = clock if clock is not None else Clock()
    cfg = config if config is not None else Config()
    realm = RealmService(cfg, MemoryStore(), clock, clock=clock, hasher=InlineHasher())
    realm.startService()
    return realm


def connect_string_transport(
    realm: RealmService, factory: ClientFactory | None = None, host: str = "127.0.0.1"
) -> tuple[ClientProtocol, StringTransport]:
    """A server protocol for ``realm`` connected to a fresh StringTransport."""
    factory = factory if factory is not None else ClientFactory(realm)
    proto: Any = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    proto.makeConnection(transport)
    return proto, transport


def frame(obj: dict[str, Any]) -> bytes:
    """A length-prefixed control frame."""
    payload = wire.encode(obj)
    return struct.pack("!I", len(payload)) + payload


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    """Decode every complete frame in ``data`` (trailing partial frames are an error)."""
    out = []
    while data:
        if len(data) < 4:
            raise ValueError("partial length prefix")
        (n,) = struct.unpack("!I", data[:4])
        if len(data) < 4 + n:
            raise ValueError("partial frame")
        out.append(wire.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def frames(transport: StringTransport, clear: bool = True) -> list[dict[str, Any]]:
    """The frames written to ``transport`` so far (and clear it, by default)."""
    data = transport.value()
    if clear:
        transport.clear()
    return parse_frames(data)


def logged_in(
    realm: RealmService, clock: Clock, user: str, password: str = "password1", **login: Any
) -> tuple[ClientProtocol, StringTransport]:
    """A connection of ``realm`` past hello and login as ``user`` (created with
    ``password`` if the realm's :class:`MemoryStore` has no such user; ``login``: more
    fields of the login request, such as ``device`` or ``since``).  The hello's answer is
    taken off the transport; the login's answer and the backlog (sent on the clock's next
    turn, which this runs) are left on it."""
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": "h"}))
    [answer] = frames(transport)
    if answer.get("type") != "result":
        raise AssertionError(f"hello refused: {answer!r}")
    store: Any = realm.store
    if user not in store.users:
        realm.create_user(user, password)
    proto.dataReceived(
        frame({"type": "login", "user": user, "password": password, "id": 1, **login})
    )
    clock.advance(0)
    return proto, transport
