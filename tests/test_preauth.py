"""Memory before authentication, over real sockets: until a connection has logged in
(a client) or said a valid hello (a peer realm), its frames are small, and the number
of such connections is bounded per address and overall (chatproto.admission)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, ssl
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport

from chatproto import wire
from chatproto.admission import LOGIN_MAX_FRAME, Admission
from chatproto.client import connect
from chatproto.config import Federation
from chatproto.federation import FederationTLS
from chatproto.protocol import ClientFactory
from tests.conftest import fast_config, make_realm, until
from tests.fedharness import LogCapture
from tests.test_federation_loopback import RawPeer, realms  # noqa: F401 (fixture)

PW = "password-1"


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    yield capture
    capture.close()


def no_tracebacks(logs: LogCapture) -> None:
    bad = [line for line in logs.lines if "Traceback" in line or "Unhandled" in line]
    assert not bad, "\n".join(bad[:3])


@defer.inlineCallbacks
def raw(port: int, source: str = "127.0.0.1", creator: Any = None) -> Any:
    """A RawPeer connected to 127.0.0.1:``port`` from ``source`` (another loopback
    address is another address), over TLS when ``creator`` is given."""
    endpoint: Any = TCP4ClientEndpoint(_reactor, "127.0.0.1", port, bindAddress=(source, 0))
    if creator is not None:
        endpoint = wrapClientTLS(creator, endpoint)
    proto = yield endpoint.connect(Factory.forProtocol(RawPeer))
    return proto


def partial_frame(length: int, sent: int) -> bytes:
    """The length prefix of a ``length``-byte frame and its first ``sent`` bytes."""
    return struct.pack("!I", length) + b"{" + b" " * (sent - 1)


# the shared helper ----------------------------------------------------------------------


def test_admission_bounds_per_address_and_overall_and_logs_sparingly(logs: Any) -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    gate = Admission("test", total=3, per_address=2, clock=clock)
    a1, a2 = gate.admit("a"), gate.admit("a")
    assert a1 is not None and a2 is not None
    assert gate.admit("a") is None  # per address
    b1 = gate.admit("b")
    assert b1 is not None
    assert gate.admit("c") is None  # overall
    assert gate.waiting == 3 and gate.count("a") == 2
    a1.release()
    a1.release()  # idempotent
    assert gate.waiting == 2 and gate.count("a") == 1
    assert gate.admit("a") is not None
    refusals = [line for line in logs.lines if "test: refused" in line]
    assert len(refusals) == 1  # the second refusal came within LOG_EVERY seconds
    clock.advance(11)
    assert gate.admit("d") is None
    refusals = [line for line in logs.lines if "test: refused" in line]
    assert len(refusals) == 2 and "(1 more refused in the last 11s)" in refusals[1]
    unbounded = Admission("test", total=0, per_address=0, clock=clock)
    assert all(unbounded.admit("a") is not None for _ in range(100))


def test_native_frames_before_login_are_small_over_string_transport(tmp_path: Any) -> None:
    """One byte at a time: a frame longer than LOGIN_MAX_FRAME before login is
    ``too_large`` and closes the connection at its length prefix (nothing of it is
    buffered); the same length after login is taken."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock

    from chatproto.testing import make_test_realm

    clock = Clock()
    realm = make_test_realm(clock)
    factory = ClientFactory(realm)
    proto: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    assert realm.unauthenticated.waiting == 1
    hello = wire.encode({"type": "hello", "version": 1})
    data = struct.pack("!I", len(hello)) + hello + struct.pack("!I", LOGIN_MAX_FRAME + 1)
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert transport.disconnecting
    out = transport.value()
    assert b'"code":"too_large"' in out and b"before login" in out
    proto.dataReceived(b"x" * 100_000)  # closing: dropped, not buffered
    assert len(proto._unprocessed) < 16
    proto.connectionLost(None)
    assert realm.unauthenticated.waiting == 0


# federation -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_large_partial_frame_before_hello_is_refused_at_once(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """What grew a realm by 150 MiB: TLS connections without a client certificate,
    each holding a 4 MiB partial frame before hello.  Now the length prefix alone gets
    ``too_large`` and a closed link; nothing of the frame is kept."""
    (b,) = yield realms(["b.example"])
    peer = yield raw(b.fed_port, creator=ssl.CertificateOptions(verify=False))
    peer.transport.write(partial_frame(4 * 1024 * 1024, 64 * 1024))
    yield until(lambda: peer.lost.called, timeout=10)
    assert [(f["type"], f["code"]) for f in peer.frames] == [("error", "too_large")]
    assert "before the link is up is 8192" in peer.frames[0]["message"]
    # a hello (about 60 bytes) still fits
    peer = yield raw(b.fed_port, creator=ssl.CertificateOptions(verify=False))
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: peer.lost.called, timeout=10)
    assert peer.frames[0]["code"] == "untrusted_peer"  # no certificate: refused as before
    # the realm's side closes after the peer sees it (a reactor turn or more under load)
    yield until(lambda: b.fed.unauthenticated.waiting == 0, timeout=10)
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_unauthenticated_peers_are_bounded_per_address_and_overall(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """At most 2 connections from one address and 3 in all may wait for their hello;
    past that a connection is closed at once, without a word.  A peer whose hello is
    accepted no longer counts."""
    a, b = yield realms(
        ["a.example", "b.example"], max_unauthenticated=3, max_unauthenticated_per_address=2
    )
    yield b.stop_federation()  # only raw peers from here on
    b.fed.listen()
    anon = ssl.CertificateOptions(verify=False)
    port = b.fed_port
    gate = b.fed.unauthenticated
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    as_a = FederationTLS(
        Federation(certificate=cert["cert"], private_key=cert["key"], ca=a.cfg.federation.ca)
    ).client("b.example")
    first = yield raw(port, creator=as_a)
    second = yield raw(port, creator=anon)
    yield until(lambda: gate.count("127.0.0.1") == 2)
    third = yield raw(port, creator=anon)
    yield until(lambda: third.lost.called, timeout=10)
    assert third.frames == []
    assert logs.has("federation: refused a connection from 127.0.0.1: 2 connections from it")
    other = yield raw(port, "127.0.0.2", creator=anon)
    yield until(lambda: gate.waiting == 3)
    overall = yield raw(port, "127.0.0.3", creator=anon)
    yield until(lambda: overall.lost.called, timeout=10)
    assert not (first.lost.called or second.lost.called or other.lost.called)
    # a.example says hello: authenticated, it no longer counts
    first.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: len(first.frames) == 1, timeout=10)
    assert first.frames[0]["type"] == "welcome"
    assert gate.count("127.0.0.1") == 1 and gate.waiting == 2
    fourth = yield raw(port, creator=anon)
    yield until(lambda: gate.waiting == 3)
    for p in (first, second, other, fourth):
        p.transport.loseConnection()
    yield until(lambda: gate.waiting == 0, timeout=10)
    no_tracebacks(logs)


# clients --------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Any) -> Any:
    """A realm whose client listener lets 2 connections per address and 3 in all wait
    to log in."""
    cfg = fast_config(tmp_path, max_unauthenticated=3, max_unauthenticated_per_address=2)
    realm = make_realm(cfg)
    pytest_twisted.blockon(realm.startService())
    pytest_twisted.blockon(realm.create_user("alice", PW))
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield realm, factory, port.getHost().port
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(realm.stopService())


@pytest_twisted.inlineCallbacks
def test_a_large_frame_before_login_is_too_large_and_after_login_is_taken(
    server: Any, logs: Any
) -> Any:
    _realm, _, port = server
    peer = yield raw(port)
    peer.send({"type": "hello", "version": 1, "id": 1})
    peer.transport.write(partial_frame(60_000, 20_000))  # under max_frame (65536)
    yield until(lambda: peer.lost.called, timeout=10)
    assert [f.get("code") for f in peer.frames] == [None, "too_large"]
    assert "before login is 16384" in peer.frames[1]["message"]
    # logged in, a frame of 18 KB (a body of 3000 control characters, escaped) is fine
    alice = yield connect(_reactor, f"tcp:127.0.0.1:{port}", "alice", PW)
    sent = yield alice.send("alice", "\x01" * 3000)
    assert sent["pos"] > 0
    yield alice.close()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_clients_waiting_to_log_in_are_bounded_per_address_and_overall(
    server: Any, logs: Any
) -> Any:
    realm, _, port = server
    gate = realm.unauthenticated
    first = yield raw(port)
    second = yield raw(port)
    yield until(lambda: gate.count("127.0.0.1") == 2)
    third = yield raw(port)
    yield until(lambda: third.lost.called, timeout=10)
    assert logs.has("clients: refused a connection from 127.0.0.1")
    other = yield raw(port, "127.0.0.2")
    yield until(lambda: gate.waiting == 3)
    overall = yield raw(port, "127.0.0.3")
    yield until(lambda: overall.lost.called, timeout=10)
    # a login frees its place (the client library from 127.0.0.2: the per-address
    # bound of 127.0.0.1 is reached)
    for p in (first, second):
        p.transport.loseConnection()
    yield until(lambda: gate.waiting == 1)
    alice = yield connect(_reactor, f"tcp:127.0.0.1:{port}", "alice", PW)
    assert gate.waiting == 1  # logged in: not counted
    yield alice.close()
    other.transport.loseConnection()
    yield until(lambda: gate.waiting == 0)
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_irc_and_websocket_connections_share_the_bound(tmp_path: Any, logs: Any) -> Any:
    """The realm's bound covers every client listener: with 2 allowed from one
    address, an IRC connection and a WebSocket session waiting to log in leave no
    room for a native one; and a WebSocket message over 16384 bytes before login is
    ``too_large``."""
    from autobahn.twisted.websocket import WebSocketClientFactory

    from chatproto.irc import IRCFactory
    from chatproto.web.site import WebSite
    from tests.test_web import WSClient

    cfg = fast_config(tmp_path, max_unauthenticated=10, max_unauthenticated_per_address=2)
    realm = make_realm(cfg)
    yield realm.startService()
    irc_port = _reactor.listenTCP(0, IRCFactory(realm), interface="127.0.0.1")
    site = WebSite(realm)
    web_port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    native = ClientFactory(realm)
    native_port = _reactor.listenTCP(0, native, interface="127.0.0.1")
    try:
        irc = yield raw(irc_port.getHost().port)
        yield until(lambda: realm.unauthenticated.waiting == 1)
        base = f"127.0.0.1:{web_port.getHost().port}"
        wsf = WebSocketClientFactory(f"ws://{base}/ws", origin=f"http://{base}")
        wsf.protocol = WSClient
        wsf.opened = defer.Deferred()
        ws = yield TCP4ClientEndpoint(_reactor, "127.0.0.1", web_port.getHost().port).connect(wsf)
        yield wsf.opened
        yield until(lambda: realm.unauthenticated.waiting == 2)
        refused = yield raw(native_port.getHost().port)
        yield until(lambda: refused.lost.called, timeout=10)
        yield ws.call("hello", version=1)
        ws.send_json({"type": "ping", "pad": "x" * 20_000})
        err = yield ws.until(lambda f: f["type"] == "error")
        assert err["code"] == "too_large" and "before login" in err["message"]
        yield ws.closed
        irc.transport.loseConnection()
        yield until(lambda: realm.unauthenticated.waiting == 0)
    finally:
        for p in (irc_port, web_port, native_port):
            yield p.stopListening()
        for proto in list(native.connections):
            proto.transport.abortConnection()
        yield realm.stopService()
    no_tracebacks(logs)
