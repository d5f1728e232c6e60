"""The federation link protocol shared by both directions: length-prefixed frames
(JSON control frames; binary data frames start with a 0x00 byte), error frames,
keepalive, and the limits a link enforces.  :mod:`chatproto.federation.inbound` and
:mod:`chatproto.federation.outbound` subclass :class:`LinkProtocol` with the frames of
their direction."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from chatproto import wire
from chatproto.envelope import Envelope
from chatproto.errors import ChatError, FatalProtocolError
from chatproto.signing import parse_keys

__all__ = [
    "FEDERATION_VERSION",
    "MAX_TXN_ITEMS",
    "MIN_MAX_FRAME",
    "PRESENCE_BURST",
    "PRESENCE_RATE",
    "READING_BURST",
    "READING_RATE",
    "LinkProtocol",
    "OutputFlow",
    "check_version",
    "envelope_to_wire",
]

FEDERATION_VERSION = 1
#: Items one transaction may hold; more is a protocol violation (``too_large``).
MAX_TXN_ITEMS = 1000
#: Presence frames a peer may send per second on one link (burst: PRESENCE_BURST);
#: each costs this realm a look-up of who to tell, so more is a flood (rate_limited).
PRESENCE_RATE = 200.0
PRESENCE_BURST = 2000.0
#: ``reading`` frames (read markers and typing notices of private conversations,
#: typing in groups; chatproto.realm.reading) a link accepts per second, and at
#: once; past that they are dropped (ephemeral: the next marker says as much), not
#: fatal.
READING_RATE = 100.0
READING_BURST = 1000.0
#: The smallest ``max_frame`` a welcome may announce (``[federation] max_frame``'s).
MIN_MAX_FRAME = 65536


def check_version(req: dict[str, Any]) -> None:
    """``version`` of a hello or welcome: the integer 1 (not ``true``, not ``1.0``)."""
    version = req.get("version")
    if type(version) is not int or version != FEDERATION_VERSION:
        raise FatalProtocolError(
            "unsupported_version", f"federation version {FEDERATION_VERSION} only"
        )


def envelope_to_wire(env: Envelope | dict[str, Any]) -> dict[str, Any]:
    """An item as a transaction carries it (no position: positions are per realm).
    A queued request (a dict) goes as it is."""
    if isinstance(env, dict):
        return env
    return env.to_item()


@implementer(IPushProducer)
class OutputFlow:
    """Told by the connection when the peer stops reading what the link writes (the
    connection's buffer is full), and when it reads again.  Meanwhile the link reads
    nothing from the peer: every frame it would read can make it write (an ``ack``
    per ``txn``, a ``pong`` per ``ping``), so a peer that writes and never reads
    would otherwise make the realm hold all those answers.  Held, the peer's frames
    wait in its own buffers, and a link that reads nothing for three keepalive
    intervals is aborted as silent.  A file being served on the link is paused and
    resumed with it (its producer registers here, not on the transport)."""

    def __init__(self, link: LinkProtocol) -> None:
        self.link = link
        self.paused = False
        #: The producer of a file being served on the link (one at a time).
        self.file: Any = None

    def attach(self, producer: Any) -> None:
        self.file = producer
        if self.paused:
            producer.pauseProducing()

    def detach(self) -> None:
        self.file = None

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        self.link.hold_reading("output")
        if self.file is not None:
            self.file.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.file is not None:
            self.file.resumeProducing()
        self.link.release_reading("output")

    def stopProducing(self) -> None:
        if self.file is not None:
            self.file.stopProducing()


class LinkProtocol(Int32StringReceiver):
    """Framing, decoding and errors shared by both directions."""

    log = Logger()
    transport: Any
    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.closed = False
        self.peer_realm: str | None = None
        self._clock: Any = None
        self._interval = 0.0
        self._last_rx = 0.0
        self._keepalive_call: Any = None
        self.flow = OutputFlow(self)
        #: Why reading from the peer is held (``output``: it does not read ours).
        self._holds: set[str] = set()

    def send(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            self.sendString(wire.encode(obj))

    def start_flow(self) -> None:
        """Register :attr:`flow` with the connection that carries the bytes: under TLS,
        the TCP connection below it (a producer registered on the TLS layer would hold
        back its close, and the link is closed from outside too, by ClientService)."""
        wire_transport = self.transport
        if isinstance(wire_transport, TLSMemoryBIOProtocol):
            wire_transport = wire_transport.transport
        wire_transport.registerProducer(self.flow, True)

    def hold_reading(self, why: str) -> None:
        """Read (and handle) nothing more from the peer until :meth:`release_reading`
        of every reason given."""
        if not self._holds and not self.closed:
            self.paused = True  # frames already read wait too (Int32StringReceiver)
            self.transport.pauseProducing()
        self._holds.add(why)

    def release_reading(self, why: str) -> None:
        if why not in self._holds:
            return
        self._holds.discard(why)
        if not self._holds and not self.closed:
            self.paused = False
            self.transport.resumeProducing()
            Int32StringReceiver.dataReceived(self, b"")  # the frames read meanwhile

    # keepalive: a peer that vanished without closing (a half-open connection, a
    # frozen host) would otherwise hold a link "up" forever with nothing acknowledged.

    def start_keepalive(self, clock: Any, interval: float) -> None:
        """Ping the peer after ``interval`` seconds without a byte from it (once the
        link is up), and abort the connection after three intervals: the link then
        reconnects with backoff.  0: off."""
        self._clock = clock
        self._interval = interval
        self._last_rx = clock.seconds()
        if interval > 0:
            self._keepalive_call = clock.callLater(interval, self._keepalive)

    def stop_keepalive(self) -> None:
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return  # closing: nothing more is read (or buffered)
        if self._clock is not None:
            self._last_rx = self._clock.seconds()
        Int32StringReceiver.dataReceived(self, data)

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self.closed:
            return
        idle = self._clock.seconds() - self._last_rx
        if idle >= 3 * self._interval:
            reason = f"no frame for {idle:.0f} seconds"
            self.log.warn(
                "federation: {peer} is silent ({reason}); closing the link",
                peer=self.peer_realm or self._addr(),
                reason=reason,
            )
            self.closed = True
            self.silent(reason)
            self.transport.abortConnection()
            return
        stalled = self.stalled(3 * self._interval)
        if stalled is not None:
            self.fail("timeout", stalled)
            return
        if idle >= self._interval and self.is_up():
            self.send({"type": "ping"})
        self._keepalive_call = self._clock.callLater(self._interval, self._keepalive)

    def is_up(self) -> bool:
        """Whether the link is past its hello/welcome (pings are sent only then)."""
        return False

    def stalled(self, limit: float) -> str | None:
        """Hook, at each keepalive tick: why the peer, though not silent, has made no
        progress for ``limit`` seconds on something it owes (then: error, close)."""
        return None

    def silent(self, reason: str) -> None:
        """Hook: the peer went silent and the connection is being aborted."""

    def handle_ping(self, req: dict[str, Any]) -> None:
        if not self.is_up():
            raise FatalProtocolError("bad_request", "ping before the link is up")
        self.send({"type": "pong"})

    def handle_pong(self, req: dict[str, Any]) -> None:
        pass  # being received is all a pong is for

    def fail(self, code: str, message: str) -> None:
        """Send an error, close, and tell the owner (backoff for the peer)."""
        if self.closed:
            return
        self.log.warn(
            "federation: closing link with {peer}: {code}: {message}",
            peer=self.peer_realm or self._addr(),
            code=code,
            message=message,
        )
        self.send({"type": "error", "code": code, "message": message})
        self.closed = True
        self.misbehaved(f"{code}: {message}")
        self.transport.loseConnection()

    def misbehaved(self, reason: str) -> None:
        """Hook: the peer broke the protocol (subclasses apply backoff)."""

    def _addr(self) -> str:
        try:
            peer = self.transport.getPeer()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "?"

    def lengthLimitExceeded(self, length: int) -> None:
        before = "" if self.is_up() else " before the link is up"
        self.fail("too_large", f"frame of {length} bytes; the limit{before} is {self.MAX_LENGTH}")

    def stringReceived(self, payload: bytes) -> None:
        if self.closed:
            return
        try:
            req = wire.decode(payload)
            kind = req["type"]
            handler = getattr(self, f"handle_{kind}", None)
            if handler is None:
                raise FatalProtocolError("unknown_type", f"unknown frame type {kind[:40]!r}")
            handler(req)
        except ChatError as e:
            self.fail(e.code, e.message)
        except Exception:
            self.log.failure("federation: handling a frame from {peer}", peer=self.peer_realm)
            self.fail("internal_error", "the frame could not be handled")

    def peer_keys(self, req: dict[str, Any]) -> dict[str, bytes] | None:
        """The signing keys a ``hello`` or ``welcome`` announces (None: none)."""
        if req.get("keys") is None:
            return None
        try:
            return parse_keys(req["keys"])
        except ChatError as e:
            raise FatalProtocolError(
                "bad_request", f"{req.get('type')} keys: {e.message}"
            ) from None

    def handle_error(self, req: dict[str, Any]) -> None:
        self.log.warn(
            "federation: {peer} closed the link: {code}: {message}",
            peer=self.peer_realm or self._addr(),
            code=str(req.get("code"))[:40],
            message=str(req.get("message"))[:200],
        )
        self.closed = True
        self.refused(str(req.get("code")), str(req.get("message"))[:200])
        self.transport.loseConnection()

    def refused(self, code: str, message: str) -> None:
        """Hook: the peer sent an error frame."""
