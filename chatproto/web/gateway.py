"""The WebSocket gateway: the native protocol, one JSON frame per WebSocket message.

A browser cannot open a raw TCP connection, so the web listener carries the native
protocol over WebSocket (autobahn's Twisted integration) instead of over
length-prefixed frames.  Nothing else changes: each WebSocket connection gets a
:class:`WebSessionProtocol`, which *is* the native :class:`ClientProtocol` (same
handlers, same states, same keepalive sweep, same slow-reader rule, same bound on
the requests in progress), connected to a
:class:`FrameTransport` that turns each length-prefixed frame the protocol writes into
one WebSocket text message, and each text message received into one frame.  So the
gateway is a translator, not a second rule set; PROTOCOL.md ("WebSocket transport")
lists the only differences:

- ``login`` may omit ``user`` and ``password``: the session then belongs to the
  browser's session cookie (a token the realm issued at ``POST /api/login``, see
  :mod:`chatproto.web.site`), and ``device`` defaults to the token's device;
- the handshake is refused (HTTP 403) unless ``Origin`` is allowed (see
  :func:`chatproto.web.site.origin_allowed`);
- binary messages are reserved (``bad_frame``), and so are data frames in text
  messages: a browser moves file bytes over HTTP (:mod:`chatproto.web.site`); the
  data frames of a ``download`` asked over WebSocket go out as binary messages.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto import wire
from chatproto.admission import LOGIN_MAX_FRAME
from chatproto.errors import ChatError, FatalProtocolError
from chatproto.protocol import CLOSED_STATES, ClientFactory, ClientProtocol
from chatproto.realm import RealmService

__all__ = [
    "SESSION_COOKIE",
    "ChatWebSocket",
    "FrameTransport",
    "GatewayResource",
    "WebSessionFactory",
    "WebSessionProtocol",
    "cookie_value",
]

#: Name of the session cookie (HttpOnly, SameSite=Strict; set by POST /api/login).
SESSION_COOKIE = "chatproto_session"

_unpack = struct.Struct("!I").unpack_from


def cookie_value(header: str | bytes | None, name: str = SESSION_COOKIE) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` request header, or None."""
    if not header:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"') or None
    return None


class WebSessionProtocol(ClientProtocol):
    """The native client protocol, with ``login`` by session cookie.

    ``token`` is the browser's session token, read from the WebSocket handshake.
    """

    token: str | None = None
    protocol_name = "web"

    def __init__(self) -> None:
        super().__init__()
        #: Messages received after the session stopped reading (MAX_IN_FLIGHT
        #: requests in progress), in order: the rest of the read that was being
        #: parsed when it paused the connection, no more.
        self._waiting: deque[tuple[bytes, bool]] = deque()

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        """One WebSocket message: a frame, handled as a native session's, or left
        waiting (in order) while :data:`chatproto.protocol.MAX_IN_FLIGHT` requests
        are in progress: autobahn parses every message of a read at once, so they
        cannot be left unread as a native connection leaves its bytes."""
        if self._requests_paused or self._waiting:
            self._waiting.append((payload, is_binary))
            return
        self._message(payload, is_binary)
        self._bound_requests()

    def _message(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            self.refuse(FatalProtocolError("bad_frame", "binary WebSocket messages are not used"))
            return
        if payload[:1] == b"\x00":  # a data frame: over WebSocket, files go over HTTP
            self.refuse(FatalProtocolError("bad_frame", "a WebSocket message is a JSON object"))
            return
        if len(payload) > self.MAX_LENGTH:
            self.lengthLimitExceeded(len(payload))
            return
        self.stringReceived(payload)

    def _frames(self, data: bytes) -> None:
        # Answers went out (_request_done reads on with b""): first the messages that
        # waited, then (for sessions driven with length-prefixed frames, as tests do)
        # the native way.
        waiting = self._waiting
        while waiting and not self._requests_paused and self.state not in CLOSED_STATES:
            self._message(*waiting.popleft())
            self._bound_requests()
        super()._frames(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._waiting.clear()
        super().connectionLost(reason)

    def handle_login(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if req.get("user") is not None or req.get("password") is not None:
            # a password login, exactly as native: the browser's cookie has no part
            # in it, so logging that cookie out does not close it (close_token)
            self.token = None
            return super().handle_login(req)
        if self.state != "auth":
            raise ChatError("already_authenticated")
        device = wire.field(req, "device", str, required=False)
        since = wire.integer(req, "since", required=False)
        quiet = wire.field(req, "quiet", bool, required=False, default=False)
        self.state = "authenticating"
        d = self.factory.realm.login_token(self.token, self, device, self._peer(), quiet)
        return self._logging_in(d, since)

    def authenticated(self) -> None:
        super().authenticated()
        if isinstance(self.transport, FrameTransport):  # (tests use a StringTransport)
            self.transport.authenticated()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if isinstance(self.transport, FrameTransport) and not self.output_blocked:
            self.transport.writable()


class WebSessionFactory(ClientFactory):
    """The web listener's :class:`ClientFactory`: its own keepalive sweep over the
    WebSocket sessions, which are otherwise native sessions."""

    protocol = WebSessionProtocol  # type: ignore[assignment]


class FrameTransport:
    """What a :class:`WebSessionProtocol` writes to: length-prefixed frames in, one
    WebSocket text message per frame out.  Flow control is the TCP (or TLS)
    connection's, so a browser that stops reading pauses the session exactly as a
    native client does."""

    def __init__(self, ws: ChatWebSocket) -> None:
        self._ws = ws
        self._buffer = b""
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if self.disconnecting or self._ws.state != self._ws.STATE_OPEN:
            return  # closing: like a TCP transport, writes after the close go nowhere
        buf = self._buffer + data if self._buffer else data
        offset = 0
        while len(buf) - offset >= 4:
            (n,) = _unpack(buf, offset)
            if len(buf) - offset - 4 < n:
                break
            payload = buf[offset + 4 : offset + 4 + n]
            # A control frame is a text message; a download's data frame (kind 0x00,
            # a file's bytes, not UTF-8) a binary one: as text, a browser would
            # have to fail the connection (RFC 6455 8.1).
            self._ws.sendMessage(payload, isBinary=payload[:1] != b"{")
            offset += 4 + n
        self._buffer = buf[offset:]

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def pauseProducing(self) -> None:
        """Stop reading the connection (the session has enough requests in progress,
        or upload bytes to write)."""
        t: Any = self._ws.transport
        if t is not None:
            t.pauseProducing()

    def resumeProducing(self) -> None:
        t: Any = self._ws.transport
        if t is not None:
            t.resumeProducing()

    def writable(self) -> None:
        """The peer reads again (the session's output is no longer held)."""
        self._ws.answer_ping()

    def authenticated(self) -> None:
        """The session logged in: WebSocket messages up to the listener's limits."""
        ws, factory = self._ws, self._ws.factory
        ws.maxMessagePayloadSize = factory.maxMessagePayloadSize
        ws.maxFramePayloadSize = factory.maxFramePayloadSize

    def loseConnection(self) -> None:
        """A polite close: the error frame already sent, then a WebSocket close."""
        if not self.disconnecting:
            self.disconnecting = True
            if self._ws.state == self._ws.STATE_OPEN:
                self._ws.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._ws.dropConnection(abort=True)

    def getPeer(self) -> Any:
        t = self._ws.transport
        return t.getPeer() if t is not None else IPv4Address("TCP", "0.0.0.0", 0)

    def getHost(self) -> Any:
        t = self._ws.transport
        return t.getHost() if t is not None else IPv4Address("TCP", "0.0.0.0", 0)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        t: Any = self._ws.transport
        if t is None:
            return
        # twisted.web's HTTP channel is still registered on the connection it handed
        # over to the WebSocket; the session takes its place.
        try:
            t.unregisterProducer()
        except RuntimeError:  # none registered (a transport that says so)
            pass
        t.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        t: Any = self._ws.transport
        if t is not None:
            t.unregisterProducer()


class ChatWebSocket(WebSocketServerProtocol):
    """One browser connection: checks Origin, then relays text messages to a
    :class:`WebSessionProtocol` and its frames back."""

    #: Not ``log``: that is autobahn's txaio logger, whose per-frame debug calls are
    #: no-ops below its level (a twisted Logger there would format every one of them).
    _log = Logger()
    factory: ChatWebSocketFactory
    session: WebSessionProtocol | None = None
    #: The payload of the latest ping not answered yet (the peer was not reading).
    _unanswered: bytes | None = None

    def onConnect(self, request: ConnectionRequest) -> None:
        secure = ISSLTransport.providedBy(self.transport)
        if not self.factory.origin_ok(request.origin, request.headers.get("host"), secure):
            self._log.info(
                "websocket from {peer}: origin {origin!r} refused",
                peer=request.peer,
                origin=request.origin,
            )
            raise ConnectionDeny(403, "origin not allowed")
        self._token = cookie_value(request.headers.get("cookie"))
        return None

    def onOpen(self) -> None:
        # Before login the session takes frames of LOGIN_MAX_FRAME bytes (a longer
        # one: too_large); autobahn stops a peer sending twice that (memory bound).
        self.maxMessagePayloadSize = self.maxFramePayloadSize = 2 * LOGIN_MAX_FRAME
        transport: Any = self.transport
        peer = transport.getPeer()
        session: Any = self.factory.sessions.buildProtocol(peer)
        session.token = self._token
        self.session = session
        session.makeConnection(FrameTransport(self))

    def dataReceived(self, data: bytes) -> None:
        # The messages of one read are one batch of the session (see begin_read).
        session = self.session
        if session is None:
            super().dataReceived(data)
            return
        session.begin_read()
        try:
            super().dataReceived(data)
        finally:
            session.end_read()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is not None:
            session.message_received(payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        # autobahn writes a pong for every ping, past the session's output bound: a
        # peer sending pings and reading nothing would make the realm hold them all.
        # While its output is held, only the latest ping is kept, and answered when
        # the peer reads again (RFC 6455, 5.5.3: answering the latest one suffices).
        session = self.session
        if session is not None and session.output_blocked:
            self._unanswered = payload
            return
        super().onPing(payload)

    def answer_ping(self) -> None:
        """Answer the ping kept while the peer was not reading, if any."""
        payload, self._unanswered = self._unanswered, None
        if payload is not None:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self.session = self.session, None
        if session is not None:
            why = ConnectionDone if wasClean else ConnectionLost
            session.connectionLost(Failure(why(f"websocket closed ({code}: {reason})")))


class ChatWebSocketFactory(WebSocketServerFactory):
    """Builds :class:`ChatWebSocket` for one realm; ``sessions`` builds their
    sessions (and sweeps them), ``origin_ok`` decides the Origin check."""

    protocol = ChatWebSocket  # type: ignore[assignment]

    def __init__(self, realm: RealmService, origin_ok: Any, clock: Any = None) -> None:
        super().__init__()
        self.realm = realm
        self.origin_ok = origin_ok
        self.sessions = WebSessionFactory(realm, clock)
        max_frame = realm.config.limits.max_frame
        # A message over max_frame gets the native too_large error; autobahn itself
        # only stops a peer that sends far more than that (memory bound).
        self.setProtocolOptions(
            maxMessagePayloadSize=2 * max_frame,
            maxFramePayloadSize=2 * max_frame,
            # the native decoder checks UTF-8 (bad_frame) as it parses the JSON, so
            # autobahn's own incremental check would only do the work twice
            utf8validateIncoming=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            # the "null" origin goes to onConnect too, to be refused as any other
            # (403), not by autobahn's own check (400)
            allowNullOrigin=True,
            # A message over the bound, or a protocol violation, gets a close frame
            # with its code (1009 too big, 1002...; RFC 6455 7.1.7), what PROTOCOL.md
            # promises, rather than a dropped connection, which a client reports as
            # 1006 (abnormal closure).  What the peer sends after it is discarded
            # unread, and closeHandshakeTimeout bounds the wait for its answer.
            failByDrop=False,
        )

    def close_token(self, token: str) -> None:
        """Close the open sessions that logged in with ``token`` (logout); not a
        session of the same browser that logged in with a password."""
        for proto in list(self.sessions.connections):
            if getattr(proto, "token", None) == token:
                proto.close_with("auth_failed", "logged out")


class GatewayResource(WebSocketResource):
    """autobahn's WebSocket resource, minus the HTTP channel's idle timer (the
    connection now belongs to the WebSocket, which has its own keepalive)."""

    def render(self, request: Any) -> Any:
        channel = request.channel
        if hasattr(channel, "setTimeout"):
            channel.setTimeout(None)
        release = getattr(channel, "release_admission", None)
        if release is not None:  # the WebSocket session counts from now on
            release()
        return super().render(request)
