"""The native client protocol: frames in, realm calls, frames out.

:class:`ClientProtocol` is a translator (see ``twisted.words.service`` and the wormhole
mailbox server): it decodes a frame (:mod:`chatproto.wire`), dispatches it to a
``handle_<type>`` method that calls the realm service or the logged-in
:class:`chatproto.realm.Session`, encodes the answer and turns
:class:`chatproto.errors.ChatError` into ``error`` frames.  It decides nothing: every
rule lives in the realm.

It is also the session's *mind*: the realm calls :meth:`ClientProtocol.deliver` for each
stream item.  The protocol registers itself as a streaming producer on its transport so
it learns when the peer stops reading; past ``limits.max_output_buffer`` bytes written
while paused, the connection is dropped (the client resumes later from its last ack).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import wire
from chatproto.envelope import Envelope
from chatproto.errors import ChatError, FatalProtocolError
from chatproto.realm import ISessionMind, Notice, RealmService, Session

__all__ = [
    "ClientFactory",
    "ClientProtocol",
    "delivery_frame",
]

_pack = struct.Struct("!I").pack

#: Requests allowed before login; every other request needs a logged-in session.
_PUBLIC = frozenset({"hello", "register", "login", "ping", "pong"})
#: An ack frame as clients encode it (compact JSON, "type" first): {"type":"ack","pos":N}
_ACK_PREFIX = b'{"type":"ack","pos":'
#: Requests that are never answered, except by an error.
_SILENT = frozenset({"ack", "pong"})


def delivery_frame(env: Envelope) -> bytes:
    """The length-prefixed ``msg`` frame for ``env``, encoded once and cached."""
    frame = env.frame
    if frame is None:
        payload = wire.encode({"type": "msg", **env.to_wire()})
        frame = env.frame = _pack(len(payload)) + payload
    return frame


@implementer(ISessionMind, IPushProducer)
class ClientProtocol(Int32StringReceiver):
    """One client connection.  States: ``hello`` -> ``auth`` -> ``ready``."""

    log = Logger()
    factory: ClientFactory
    transport: Any

    #: request type -> handler (filled in below the class and for each subclass)
    handlers: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = _handlers(cls)

    def __init__(self) -> None:
        self.state = "hello"
        self.session: Session | None = None
        self._paused = False
        self._paused_bytes = 0
        self._held: list[bytes] | None = None
        self._writable: list[Deferred[None]] = []
        self.connected_at = 0.0
        self.closed_at = 0.0
        self.last_rx = 0.0
        self.pinged = False

    # connection lifecycle -----------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self.MAX_LENGTH = f.realm.config.limits.max_frame
        self.connected_at = self.last_rx = f.clock.seconds()
        f.connections.add(self)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.state = "closed"
        self.factory.connections.discard(self)
        if self.session is not None:
            self.log.info(
                "session of {user} ({device}) from {peer} ended: {reason}",
                user=self.session.user_id,
                device=self.session.device,
                peer=self._peer(),
                reason=reason.getErrorMessage() if reason is not None else "closed",
            )
            self.session.logout()
            self.session = None
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)

    # IPushProducer: the transport tells us when the peer stops reading --------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._paused_bytes = 0

    def resumeProducing(self) -> None:
        self._paused = False
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self._paused = True

    # output -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.state == "closed":
            return
        if self._held is not None:  # keep order: held frames go out first
            held, self._held = self._held, None
            data = b"".join(held) + data
        if self._paused:
            self._paused_bytes += len(data)
            if self._paused_bytes > self.factory.realm.config.limits.max_output_buffer:
                self.log.info(
                    "dropping slow reader {peer} ({user})",
                    peer=self._peer(),
                    user=self.session.user_id if self.session else None,
                )
                self.state = "closed"
                self.transport.abortConnection()
                return
        self.transport.write(data)

    def send_frame(self, payload: bytes) -> None:
        self._write(_pack(len(payload)) + payload)

    def send_error(self, err: ChatError, rid: Any = None) -> None:
        self.send_frame(wire.error_frame(err.code, err.message, rid, **err.extra))

    def close_with(self, code: str, message: str) -> None:
        if self.state == "closed":
            return
        self.send_frame(wire.error_frame(code, message))
        self.state = "closed"
        self.closed_at = self.factory.clock.seconds()
        self.transport.loseConnection()

    # ISessionMind -------------------------------------------------------------------

    def deliver(self, envelope: Envelope) -> None:
        frame = envelope.frame or delivery_frame(envelope)
        if self._held is not None:
            self._held.append(frame)
        elif self._paused or self.state == "closed":
            self._write(frame)  # slow-reader accounting
        elif self.factory.realm.bursting:
            # Hold this burst's frames and write them in one go when it ends.
            self._held = [frame]
            self.factory.realm.hold(self)
        else:
            self.transport.write(frame)

    def flush(self) -> None:
        """Write the frames held during a delivery burst."""
        held, self._held = self._held, None
        if held:
            self._write(b"".join(held))

    def notify(self, notice: Notice) -> None:
        frame = notice.frame
        if frame is None:
            payload = wire.encode(notice.data)
            frame = notice.frame = _pack(len(payload)) + payload
        self._write(frame)

    def synced(self, pos: int) -> None:
        self.send_frame(wire.encode({"type": "synced", "pos": pos}))

    def wait_writable(self) -> Deferred[None]:
        if not self._paused or self.state == "closed":
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._writable.append(d)
        return d

    def disconnect(self, code: str, message: str) -> None:
        self.close_with(code, message)

    # input --------------------------------------------------------------------------

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.info("frame of {n} bytes from {peer}: too large", n=length, peer=self._peer())
        self.close_with("too_large", f"frame of {length} bytes; the limit is {self.MAX_LENGTH}")

    def stringReceived(self, payload: bytes) -> None:
        if self.state == "closed":
            return
        self.last_rx = self.factory.clock.seconds()
        self.pinged = False
        if payload.startswith(_ACK_PREFIX) and self.session is not None:
            # Fast path for the most frequent frame, exactly as the client library and
            # PROTOCOL.md spell it; anything else takes the general path below.
            digits = payload[len(_ACK_PREFIX) : -1]
            if payload[-1:] == b"}" and digits.isdigit() and len(digits) <= 15:
                self.session.ack(int(digits))
                return
        rid = None
        try:
            obj = wire.decode(payload)
            rid = obj.get("id")
            kind = obj["type"]
            handler = self.handlers.get(kind)
            if handler is None:
                raise ChatError("unknown_type", f"unknown request type {kind[:40]!r}")
            if self.state == "hello" and kind != "hello":
                raise ChatError("hello_required")
            if kind not in _PUBLIC and self.state != "ready":
                raise ChatError("not_authenticated")
            d = maybeDeferred(handler, self, obj)
        except ChatError as e:
            self._fail(e, rid)
            return
        except Exception:
            self._crash(Failure(), rid)
            return
        if kind in _SILENT:
            d.addCallbacks(lambda _: None, self._errback, errbackArgs=(rid,))
        else:
            d.addCallbacks(self._reply, self._errback, callbackArgs=(rid,), errbackArgs=(rid,))

    def _reply(self, result: dict[str, Any] | None, rid: Any) -> None:
        self.send_frame(wire.result_frame(rid, **(result or {})))

    def _errback(self, failure: Failure, rid: Any) -> None:
        if failure.check(ChatError):
            self._fail(failure.value, rid)  # type: ignore[arg-type]
        else:
            self._crash(failure, rid)

    def _fail(self, err: ChatError, rid: Any) -> None:
        self.send_error(err, rid)
        if isinstance(err, FatalProtocolError):
            self.log.info(
                "closing {peer}: {code} {message}",
                peer=self._peer(),
                code=err.code,
                message=err.message,
            )
            self.state = "closed"
            self.closed_at = self.factory.clock.seconds()
            self.transport.loseConnection()

    def _crash(self, failure: Failure, rid: Any) -> None:
        self.log.failure("request from {peer} failed", failure, peer=self._peer())
        self.send_error(ChatError("internal_error"), rid)

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport else None
        return getattr(peer, "host", str(peer))

    # handlers -----------------------------------------------------------------------

    def handle_hello(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.state != "hello":
            raise ChatError("bad_request", "hello was already exchanged")
        version = wire.field(req, "version", int)
        if version not in wire.SUPPORTED_VERSIONS:
            raise FatalProtocolError(
                "unsupported_version",
                f"version {version} is not supported; this server speaks "
                + ", ".join(map(str, wire.SUPPORTED_VERSIONS)),
                supported=list(wire.SUPPORTED_VERSIONS),
            )
        self.state = "auth"
        realm = self.factory.realm
        lim = realm.config.limits
        features = ["resume", "multi-device"]
        if realm.config.auth.allow_registration:
            features.append("register")
        return {
            "version": version,
            "realm": realm.realm,
            "limits": {
                "max_frame": lim.max_frame,
                "max_body": lim.max_body,
                "send_rate": lim.send_rate,
                "send_burst": lim.send_burst,
                "history_page": lim.history_page,
                "keepalive_interval": lim.keepalive_interval,
            },
            "features": features,
        }

    def handle_register(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        password = wire.field(req, "password", str)
        d = self.factory.realm.register(user, password)
        return d.addCallback(lambda addr: {"user": str(addr)})

    def handle_login(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.state != "auth":
            raise ChatError("already_authenticated")
        user = wire.field(req, "user", str)
        password = wire.field(req, "password", str)
        device = wire.field(req, "device", str, required=False, default="default")
        since = wire.field(req, "since", int, required=False)
        if since is not None and since < 0:
            raise ChatError("bad_request", "since must be >= 0")
        quiet = wire.field(req, "quiet", bool, required=False, default=False)
        self.state = "authenticating"
        d = self.factory.realm.login(user, password, self, device, self._peer(), quiet)
        return self._logging_in(d, since)

    def _logging_in(self, d: Deferred[Session], since: int | None) -> Deferred[dict[str, Any]]:
        """Finish a login whose credentials ``d`` is checking (state "authenticating"):
        the result frame, then the backlog after ``since``."""

        def ok(session: Session) -> dict[str, Any]:
            if self.state == "closed":
                session.logout()
                return {}
            self.session = session
            self.state = "ready"
            # The result frame goes out first; start() then streams the backlog.
            self.factory.clock.callLater(0, self._start_session, session, since)
            return {"user": session.user_id, "device": session.device}

        def failed(f: Failure) -> Failure:
            if self.state == "authenticating":
                self.state = "auth"
            return f

        return d.addCallbacks(ok, failed)

    def _start_session(self, session: Session, since: int | None) -> None:
        def failed(f: Failure) -> None:
            # A session whose backlog failed would silently never go live: close it,
            # the client reconnects and resumes from its last ack.
            self.log.failure("backlog for {user} failed", f, user=session.user_id)
            self.close_with("internal_error", "could not send the backlog; reconnect")

        session.start(since).addErrback(failed)

    def handle_send(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        to = wire.field(req, "to", str)
        body = wire.field(req, "body", str)
        nonce = wire.field(req, "nonce", str, required=False)
        if nonce is not None and not 0 < len(nonce) <= 64:
            raise ChatError("bad_request", "nonce must be 1-64 characters")
        d = self.session.send(to, body, nonce)
        return d.addCallback(lambda e: {"pos": e.pos, "msg_id": e.id, "ts": e.ts})

    def handle_history(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        peer = wire.field(req, "with", str)
        before = wire.field(req, "before", int, required=False)
        after = wire.field(req, "after", int, required=False)
        limit = wire.field(req, "limit", int, required=False)
        if before is not None and after is not None:
            raise ChatError("bad_request", "give before or after, not both")
        d = self.session.history(peer, before, after, limit)
        return d.addCallback(lambda items: {"messages": [e.to_wire() for e in items]})

    def handle_who(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        group = wire.field(req, "group", str, required=False)
        return {"users": self.session.who(group)}

    # groups -------------------------------------------------------------------------

    def _event(self, event: str, req: dict[str, Any], **args: Any) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        group = wire.field(req, "group", str)
        d = self.session.group_event(event, group, **args)
        return d.addCallback(lambda e: {"group": e.recipient, "pos": e.pos, "msg_id": e.id})

    def handle_create_group(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event(
            "created",
            req,
            visibility=wire.field(req, "visibility", str, required=False),
            history=wire.field(req, "history", str, required=False),
            topic=wire.field(req, "topic", str, required=False, default=""),
        )

    def handle_join(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event("joined", req)

    def handle_leave(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event("left", req)

    def handle_delete_group(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event("deleted", req)

    def handle_invite(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event("invited", req, user=wire.field(req, "user", str))

    def handle_unban(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event("unbanned", req, user=wire.field(req, "user", str))

    def handle_kick(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        reason = wire.field(req, "reason", str, required=False, default="")
        return self._event("kicked", req, user=user, reason=reason)

    def handle_ban(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        reason = wire.field(req, "reason", str, required=False, default="")
        return self._event("banned", req, user=user, reason=reason)

    def handle_set_topic(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._event("topic", req, topic=wire.field(req, "topic", str))

    def handle_set_role(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        return self._event("role", req, user=user, role=wire.field(req, "role", str))

    def handle_list_groups(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"groups": self.factory.realm.list_groups()}

    def handle_members(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        group = wire.field(req, "group", str)
        return {"members": self.factory.realm.members(self.session, group)}

    def handle_group_info(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        return self.factory.realm.group_info(self.session, wire.field(req, "group", str))

    def handle_set_status(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        status = wire.field(req, "status", str)
        self.session.set_status(status, wire.field(req, "text", str, required=False, default=""))
        return {}

    def handle_ack(self, req: dict[str, Any]) -> None:
        assert self.session is not None
        self.session.ack(wire.field(req, "pos", int))

    def handle_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {}

    def handle_pong(self, req: dict[str, Any]) -> None:
        return None


def _handlers(cls: type) -> dict[str, Any]:
    """``type`` -> ``handle_<type>`` of ``cls`` (subclasses, such as the web gateway's
    session protocol, may override handlers; see ``__init_subclass__``)."""
    return {
        name[len("handle_") :]: getattr(cls, name)
        for name in dir(cls)
        if name.startswith("handle_")
    }


_HANDLERS = ClientProtocol.handlers = _handlers(ClientProtocol)


class ClientFactory(Factory):
    """Builds :class:`ClientProtocol` for one realm.

    Holds the realm, a ``clock`` tests may replace, and the set of live connections for
    the keepalive sweep: one timer for the whole listener (not one per connection) that
    reaps connections which did not log in within ``login_timeout``, pings idle ones
    every ``keepalive_interval`` and drops those that stay silent for another interval.
    """

    protocol = ClientProtocol  # type: ignore[assignment]
    noisy = False
    log = Logger()

    def __init__(self, realm: RealmService, clock: Any = None) -> None:
        self.realm = realm
        self.clock = clock if clock is not None else realm.clock
        self.connections: set[ClientProtocol] = set()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock

    def startFactory(self) -> None:
        lim = self.realm.config.limits
        interval = max(0.5, min(lim.login_timeout, lim.keepalive_interval) / 4)
        self._sweeper.start(interval, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    def sweep(self) -> None:
        now = self.clock.seconds()
        lim = self.realm.config.limits
        ping = wire.encode({"type": "ping"})
        for proto in list(self.connections):
            if proto.state == "closed":
                # Closed politely on an earlier sweep but the peer never took the
                # close (half-open, or not reading): abort it now.
                if now - proto.closed_at >= lim.keepalive_interval:
                    proto.transport.abortConnection()
                continue
            if proto.state != "ready":
                if now - proto.connected_at >= lim.login_timeout:
                    proto.close_with("timeout", "did not log in in time")
                continue
            idle = now - proto.last_rx
            if idle >= 2 * lim.keepalive_interval:
                self.log.info(
                    "reaping silent connection of {user}",
                    user=proto.session and proto.session.user_id,
                )
                proto.close_with("timeout", "no answer to keepalive pings")
            elif idle >= lim.keepalive_interval and not proto.pinged:
                proto.pinged = True
                proto.send_frame(ping)
