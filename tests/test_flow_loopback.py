"""Direct writes over real loopback TCP (chatproto.flow, issue 20): deliveries go on
the socket without Twisted's write registration; a peer that stops reading fills the
kernel's buffers, the rest goes through Twisted, and once Twisted has drained the
connection writes directly again, every frame in order."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from tests.conftest import fast_config, listening, raw_client, tcp_of, until
from tests.test_irc_loopback import irc_client

PW = "password-d"


@pytest.fixture
def listener(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, send_burst=10**6, send_rate=10.0**6)
    cfg.irc.enabled = True
    cfg.irc.flood_rate = 0.0
    yield from listening(cfg)


def _spy_start_writing(transport: Any) -> list[int]:
    """Count the transport's registrations for writing (Twisted's write path)."""
    calls: list[int] = []
    original = transport.startWriting

    def start_writing() -> None:
        calls.append(1)
        original()

    transport.startWriting = start_writing
    return calls


def _msgs(client: Any) -> list[Any]:
    return [f for f in client.frames if isinstance(f, dict) and f.get("type") == "msg"]


@pytest_twisted.inlineCallbacks
def test_deliveries_go_out_directly_then_through_twisted_then_directly_again(
    listener: Any,
) -> Any:
    realm, factory, addr = listener
    yield realm.create_user("alice", PW)
    yield realm.create_user("bob", PW)
    reader = yield raw_client(addr, ("alice", PW))
    writer = yield raw_client(addr, ("bob", PW))
    server = next(p for p in factory.connections if p.session and p.session.user_id.startswith("a"))
    assert server._out.direct
    calls = _spy_start_writing(server.transport)
    # 1. Paced: every delivery goes on the socket directly, no write registration.
    for i in range(20):
        writer.send({"type": "send", "to": "alice", "body": f"m{i}"})
        yield until(lambda i=i: len(_msgs(reader)) == i + 1)
    assert calls == [], "the realm registered for writing: not a direct write"
    # 2. The reader stops reading: the kernel's buffers fill, the socket takes part
    # of a write, Twisted gets the rest, and what follows is held until it drains.
    server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    tcp_of(reader.transport).getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    tcp_of(reader.transport).pauseProducing()
    body = "y" * 8000
    sent = 20
    while not calls and sent < 400:
        writer.send({"type": "send", "to": "alice", "body": body})
        sent += 1
        yield task.deferLater(_reactor, 0.002, lambda: None)
    assert calls, "the kernel never refused bytes"
    for _ in range(5):  # more while Twisted holds some: held by the queue
        writer.send({"type": "send", "to": "alice", "body": body})
        sent += 1
    yield until(lambda: server._out.held > 0)
    assert server._out.blocked and server.state == "ready"
    tcp_of(reader.transport).resumeProducing()
    yield until(lambda: len(_msgs(reader)) == sent, timeout=30)
    yield until(lambda: not server._out.blocked)
    # 3. Drained: direct again.
    del calls[:]
    for i in range(5):
        writer.send({"type": "send", "to": "alice", "body": f"again{i}"})
        sent += 1
        yield until(lambda n=sent: len(_msgs(reader)) == n)
    assert calls == []
    msgs = _msgs(reader)
    assert [m["pos"] for m in msgs] == sorted({m["pos"] for m in msgs})
    assert [m["body"] for m in msgs][-5:] == [f"again{i}" for i in range(5)]
    assert [m["body"] for m in msgs][:20] == [f"m{i}" for i in range(20)]
    reader.transport.loseConnection()
    writer.transport.loseConnection()
    yield until(lambda: reader.lost.called and writer.lost.called)


@pytest_twisted.inlineCallbacks
def test_the_irc_gateway_writes_directly(listener: Any) -> Any:
    from chatproto.irc import IRCFactory

    realm, _factory, _addr = listener
    yield realm.create_user("alice", PW)
    yield realm.create_user("bob", PW)
    irc = IRCFactory(realm)
    port = _reactor.listenTCP(0, irc, interface="127.0.0.1")
    try:
        alice = yield irc_client(port.getHost().port, "alice", PW)
        bob = yield irc_client(port.getHost().port, "bob", PW)
        yield alice.signed_on
        yield bob.signed_on
        server = next(p for p in irc.connections if p.user_id.startswith("bob"))
        assert server._out.direct
        calls = _spy_start_writing(server.transport)
        for i in range(10):
            alice.msg("bob", f"hi {i}")
            yield until(lambda i=i: ("privmsg", "alice", "bob", f"hi {i}") in bob.events)
        assert calls == []
        alice.transport.loseConnection()
        bob.transport.loseConnection()
        yield until(lambda: alice.lost.called and bob.lost.called)
    finally:
        for proto in list(irc.connections):
            proto.transport.abortConnection()
        yield port.stopListening()
