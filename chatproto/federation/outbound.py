"""Outbound federation links: we connect to a peer realm, check its certificate,
say ``hello``, and once ``welcome``d send the transactions of our outbox (the
:class:`chatproto.federation.peer.PeerLink` that owns the connection decides what
and when); the peer's ``ack`` frames and its file fetches come back here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import wire
from chatproto.admission import PREAUTH_MAX_FRAME
from chatproto.errors import ChatError, FatalProtocolError
from chatproto.federation.link import (
    FEDERATION_VERSION,
    MIN_MAX_FRAME,
    LinkProtocol,
    check_version,
)
from chatproto.federation.tls import peer_refusal

if TYPE_CHECKING:
    from chatproto.federation.peer import PeerLink

__all__ = ["OutboundFactory", "OutboundProtocol"]


@implementer(IHandshakeListener)
class OutboundProtocol(LinkProtocol):
    """A link we opened to a peer to send our outbox: check the peer's certificate,
    ``hello``, wait for ``welcome``, then ``txn`` out and ``ack`` in."""

    factory: OutboundFactory

    def __init__(self) -> None:
        super().__init__()
        #: Fires when the peer welcomed us (cancelled when ClientService gives up).
        self.welcomed: Deferred[OutboundProtocol] = Deferred()
        self._welcome_seen = False
        self._serving = False

    def connectionMade(self) -> None:
        link = self.factory.link
        self.peer_realm = link.realm
        self.MAX_LENGTH = PREAUTH_MAX_FRAME  # until the welcome
        self.start_flow()
        self.start_keepalive(link.fed.clock, link.fed.cfg.keepalive)

    def is_up(self) -> bool:
        return self._welcome_seen

    def silent(self, reason: str) -> None:
        self.factory.link.error(reason)

    def handshakeCompleted(self) -> None:
        link = self.factory.link
        reason = peer_refusal(self.transport, link.realm, link.fed.cfg)
        if reason is not None:
            self.log.warn(
                "federation: refused to send to {realm} at {addr}: {reason}",
                realm=link.realm,
                addr=self._addr(),
                reason=reason,
            )
            link.error(f"refused: {reason}")
            self.closed = True
            self.transport.abortConnection()
            return
        self.send(
            {
                "type": "hello",
                "version": FEDERATION_VERSION,
                "realm": link.fed.realm.realm,
                "keys": link.fed.announce(),
            }
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.stop_keepalive()
        if not self.welcomed.called:
            self.welcomed.errback(reason or Failure(ConnectionError("closed")))
        self.factory.link.lost(self, reason)

    def misbehaved(self, reason: str) -> None:
        self.factory.link.misbehaved(reason)

    def refused(self, code: str, message: str) -> None:
        self.factory.link.error(f"{code}: {message}")

    def handle_welcome(self, req: dict[str, Any]) -> None:
        link = self.factory.link
        if self._welcome_seen:
            raise FatalProtocolError("bad_request", "welcome was already received")
        self._welcome_seen = True
        check_version(req)
        if req.get("realm") != link.realm:
            raise FatalProtocolError("bad_request", f"welcome from {str(req.get('realm'))[:80]!r}")
        peer_max = req.get("max_frame")
        if peer_max is not None:
            if type(peer_max) is not int or not MIN_MAX_FRAME <= peer_max <= wire.MAX_INT:
                raise FatalProtocolError(
                    "bad_request", f"welcome max_frame: an integer of at least {MIN_MAX_FRAME}"
                )
            link.peer_max_frame = peer_max
        keys = self.peer_keys(req)
        if keys is not None:
            link.fed.realm.peer_keys.learn(link.realm, keys)
        self.MAX_LENGTH = link.fed.cfg.max_frame
        if self.welcomed.called:  # the attempt was abandoned (link stopped or kicked)
            self.closed = True
            self.transport.loseConnection()
            return
        self.welcomed.callback(self)

    def handle_fetch(self, req: dict[str, Any]) -> None:
        """The peer stores a file item we sent and wants its bytes: stream them as
        data frames, then ``fetched`` (or ``fetch_error``).  The realm's file service
        decides what the peer may read."""
        if not self._welcome_seen:
            raise FatalProtocolError("bad_request", "fetch before welcome")
        rid = req.get("id")
        if self._serving or type(rid) is not int or not 0 < rid <= wire.MAX_INT:
            raise FatalProtocolError(
                "bad_request", "one fetch at a time, with an integer id from 1 to 2**53 - 1"
            )
        self._serving = True
        files = self.factory.link.fed.realm.files
        d = files.serve_remote(self.factory.link.realm, req.get("file"))
        d.addCallback(lambda download: download.start(_DataFrames(self)))

        def done(_: object) -> None:
            self._serving = False
            self.send({"type": "fetched", "id": rid})

        def failed(f: Failure) -> None:
            self._serving = False
            if f.check(ChatError):
                err = f.value
                assert isinstance(err, ChatError)
                self.send(
                    {"type": "fetch_error", "id": rid, "code": err.code, "message": err.message}
                )
            elif not self.closed:
                self.log.failure("federation: serving a file to {peer}", f, peer=self.peer_realm)
                self.send(
                    {
                        "type": "fetch_error",
                        "id": rid,
                        "code": "internal_error",
                        "message": "not read",
                    }
                )

        d.addCallbacks(done, failed)

    def handle_ack(self, req: dict[str, Any]) -> None:
        if not self._welcome_seen:
            raise FatalProtocolError("bad_request", "ack before welcome")
        self.factory.link.acked(self, req.get("id"), req.get("rejected") or [])


@implementer(IConsumer)
class _DataFrames:
    """An IConsumer writing what it is given as binary frames (``0x00`` + bytes) on a
    link; the producer is paused and resumed with the link's output
    (:class:`chatproto.federation.link.OutputFlow`: flow control)."""

    def __init__(self, link: LinkProtocol) -> None:
        self.link = link

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.link.flow.attach(producer)

    def unregisterProducer(self) -> None:
        self.link.flow.detach()

    def write(self, data: bytes) -> None:
        if not self.link.closed:
            self.link.sendString(b"\x00" + data)


class OutboundFactory(Factory):
    noisy = False
    protocol = OutboundProtocol  # type: ignore[assignment]

    def __init__(self, link: PeerLink) -> None:
        self.link = link
