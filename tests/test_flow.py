"""Direct writes (chatproto.flow, issue 20): on a plain TCP transport, an OutputQueue
sends a reactor iteration's bytes on the socket itself (``writeSomeData``) while
Twisted holds none of its bytes, hands Twisted what the socket does not take, and
holds what follows until Twisted says it drained (a pull producer's resumeProducing).
These run on a StringTransport with a scripted socket; tests/test_flow_loopback.py
runs them over real TCP."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import main
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides, implementer

from chatproto.config import Config
from chatproto.flow import OutputQueue, writes_directly
from chatproto.protocol import ClientFactory
from chatproto.testing import frame, logged_in, make_test_realm, parse_frames


@implementer(ITCPTransport)
class SocketTransport(StringTransport):
    """A StringTransport with a socket under it.  ``writeSomeData`` puts up to
    ``room`` bytes (None: any number) on the wire (``sent``; each call's data in
    ``sends``), or fails as a lost connection (``lost``).  ``write`` is Twisted's
    buffer (:meth:`value`); :meth:`drain` is its ``doWrite`` emptying it, which tells
    a pull producer (``resumeProducing``)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
        self.connected = True
        self.room: int | None = None
        self.lost = False
        self.sent = b""
        self.sends: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int | Exception:
        self.sends.append(bytes(data))
        if self.lost:
            return main.CONNECTION_LOST
        n = len(data) if self.room is None else min(self.room, len(data))
        if self.room is not None:
            self.room -= n
        self.sent += bytes(data[:n])
        return n

    def drain(self) -> None:
        self.sent += self.value()
        self.clear()
        if self.producer is not None and not self.streaming:
            self.producer.resumeProducing()


class Owner:
    """A connection's producer methods, forwarded to its queue (as the protocols do)."""

    def __init__(self) -> None:
        self.pauses = 0
        self.q: OutputQueue

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.q.pause()

    def resumeProducing(self) -> None:
        self.q.resume()

    def stopProducing(self) -> None:
        self.q.pause()


@pytest.fixture(name="clock")
def clock_fixture() -> Clock:
    return Clock()


def direct_queue(limit: int = 1000) -> tuple[OutputQueue, SocketTransport, Owner, Clock]:
    clock, t, owner = Clock(), SocketTransport(), Owner()
    owner.q = q = OutputQueue(t, limit, owner, clock)
    q.register()
    return q, t, owner, clock


def test_only_a_plain_tcp_transport_is_written_directly() -> None:
    assert writes_directly(SocketTransport())
    assert not writes_directly(StringTransport())  # no socket
    assert not writes_directly(None)
    tls = SocketTransport()
    alsoProvides(tls, ISSLTransport)
    assert not writes_directly(tls)
    started_tls = SocketTransport()
    started_tls.TLS = True  # type: ignore[attr-defined]
    assert not writes_directly(started_tls)
    # A wrapper (Twisted's TLS protocol is one) copies its transport's interfaces.
    wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
    wrapper.makeConnection(SocketTransport())
    assert ITCPTransport.providedBy(wrapper) and not writes_directly(wrapper)
    # Without a producer (nothing would learn that Twisted drained), never.
    assert not OutputQueue(SocketTransport(), 10).direct


def test_an_iterations_writes_go_on_the_socket_in_one_send() -> None:
    q, t, _owner, clock = direct_queue()
    assert q.direct and t.producer is _owner and not t.streaming  # a pull producer
    q.write(b"ab")
    q.put(b"cd")
    assert t.sends == []  # not before the iteration's events are handled
    clock.advance(0)
    assert t.sends == [b"abcd"] and t.sent == b"abcd"
    assert t.value() == b"" and not q.blocked
    q.write(b"e")
    clock.advance(0)
    assert t.sends == [b"abcd", b"e"]


def test_what_the_socket_does_not_take_goes_to_twisted_and_what_follows_waits() -> None:
    q, t, owner, clock = direct_queue()
    t.room = 3
    q.write(b"abcdef")
    clock.advance(0)
    assert t.sent == b"abc" and t.value() == b"def"  # the rest: Twisted's buffer
    assert owner.pauses == 1 and q.paused and q.blocked  # as Twisted pauses a producer
    assert q.write(b"gh") and q.write(b"ij")
    clock.advance(0)
    assert q.held == 4 and len(t.sends) == 1 and t.value() == b"def"  # held here
    t.room = None
    t.drain()  # Twisted wrote "def": what was held goes out directly, in one send
    assert t.sends[-1] == b"ghij" and t.sent == b"abcdefghij"
    assert not q.blocked and q.held == 0 and t.value() == b""
    q.write(b"k")
    clock.advance(0)
    assert t.sends[-1] == b"k" and t.sent.endswith(b"jk")


def test_a_full_socket_leaves_everything_to_twisted() -> None:
    q, t, owner, clock = direct_queue()
    t.room = 0
    q.write(b"abc")
    clock.advance(0)
    assert t.value() == b"abc" and t.sent == b"" and q.blocked and owner.pauses == 1
    t.room = 1
    t.drain()
    assert t.sent == b"abc" and not q.blocked


def test_a_lost_connection_is_left_to_twisted_to_notice() -> None:
    q, t, _owner, clock = direct_queue()
    t.lost = True
    q.write(b"abc")
    clock.advance(0)
    assert t.value() == b"abc"  # Twisted's doWrite fails on it and loses the connection
    assert q.blocked


def test_a_closing_transport_is_written_through_twisted() -> None:
    q, t, _owner, clock = direct_queue()
    t.loseConnection()
    q.write(b"abc")
    clock.advance(0)
    assert t.sends == [] and t.value() == b"abc"


def test_the_slow_reader_bound_counts_what_waits_behind_twisted() -> None:
    q, t, _owner, clock = direct_queue(limit=10)
    t.room = 0
    assert q.write(b"x" * 5)
    clock.advance(0)
    assert q.write(b"y" * 6) and q.held == 6
    assert not q.write(b"z" * 6)  # 12 held: the owner drops the connection
    q.drop()
    assert q.held == 0


def test_a_close_writes_what_is_pending_then_what_is_held_then_its_last_frame() -> None:
    q, t, _owner, clock = direct_queue()
    q.write(b"1")
    q.close(b"2")  # before the iteration's send: in order, through Twisted
    clock.advance(0)
    assert t.sends == [] and t.value() == b"12"
    q, t, _owner, clock = direct_queue()
    t.room = 0
    q.write(b"1")
    clock.advance(0)
    q.write(b"2")
    q.close(b"3")
    assert t.value() == b"123"
    q.write(b"4")
    t.drain()
    assert t.sent == b"123" and t.sends == [b"1"]


def test_a_queue_paused_before_its_send_keeps_the_bytes_first_in_line() -> None:
    q, t, owner, clock = direct_queue()
    q.write(b"1")
    owner.stopProducing()  # (the connection is being lost)
    q.write(b"2")
    clock.advance(0)
    assert t.sends == [] and q.held == 2
    q.close(b"3")
    assert t.value() == b"123"


def _direct_logged_in(realm: Any, clock: Clock, user: str) -> tuple[Any, SocketTransport]:
    proto: Any = ClientFactory(realm, clock=clock).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 40001)
    )
    t = SocketTransport()
    proto.makeConnection(t)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": "h"}))
    if user not in realm.store.users:
        realm.create_user(user, "password1")
    proto.dataReceived(frame({"type": "login", "user": user, "password": "password1", "id": 1}))
    clock.advance(0)
    clock.advance(0)
    return proto, t


def test_the_native_protocol_writes_deliveries_directly(clock: Clock) -> None:
    cfg = Config()
    cfg.limits.send_burst = 10**6
    realm = make_test_realm(clock, cfg)
    b, tb = _direct_logged_in(realm, clock, "bob")
    assert b._out.direct and tb.producer is b and not tb.streaming
    assert [f["type"] for f in parse_frames(tb.sent)][-1] == "synced"
    a, _ta = logged_in(realm, clock, "alice")
    sends = len(tb.sends)
    for i in range(3):
        a.dataReceived(frame({"type": "send", "to": "bob", "body": f"m{i}", "id": i}))
    clock.advance(0)
    assert tb.value() == b""  # nothing through Twisted's buffer
    msgs = [f for f in parse_frames(tb.sent) if f["type"] == "msg"]
    assert [m["body"] for m in msgs] == ["m0", "m1", "m2"]
    assert len(tb.sends) - sends <= 3


def test_the_native_protocol_holds_and_drops_a_slow_reader_writing_directly(
    clock: Clock,
) -> None:
    limit = 20_000
    cfg = Config()
    cfg.limits.max_output_buffer = limit
    cfg.limits.send_burst = 10**6
    realm = make_test_realm(clock, cfg)
    b, tb = _direct_logged_in(realm, clock, "bob")
    a, _ta = logged_in(realm, clock, "alice")
    tb.room = 1000  # then the socket is full
    sent = 0
    while b.state != "closed" and sent < 100:
        a.dataReceived(frame({"type": "send", "to": "bob", "body": "x" * 1000, "id": sent}))
        clock.advance(0)
        sent += 1
        assert b._out.held <= limit
    assert b.state == "closed" and tb.disconnecting and 15 < sent < 30
    assert realm.stats.slow_readers == {"native": 1}
    assert tb.producer is None  # unregistered before the close
    tb.room = None
    tb.drain()
    got = parse_frames(tb.sent)
    assert got[-1]["code"] == "slow_reader"
    positions = [f["pos"] for f in got if f["type"] == "msg"]
    assert positions == sorted(positions) and 0 < len(positions) < sent


def test_a_download_waits_for_twisted_to_drain(clock: Clock) -> None:
    """A paused connection pauses its downloads; the drain resumes them (here: the
    queue's pause and Twisted's resumeProducing, through the protocol)."""
    cfg = Config()
    realm = make_test_realm(clock, cfg)
    b, tb = _direct_logged_in(realm, clock, "bob")

    class Sink:
        paused = False
        resumed = 0

        def pause(self) -> None:
            self.paused = True

        def resume(self) -> None:
            self.paused = False
            self.resumed += 1

        def stop(self) -> None:
            pass

    sink = Sink()
    b._download_sinks[1] = sink
    tb.drain()  # a drain while nothing was paused: the download is not poked
    assert sink.resumed == 0
    tb.room = 0
    b.send_frame(b"{}")
    clock.advance(0)
    assert sink.paused and b.output_blocked
    tb.room = None
    tb.drain()
    assert not sink.paused and sink.resumed == 1 and not b.output_blocked
    del b._download_sinks[1]
