"""A Deferred-based client library for the chatproto wire protocol.

Embed it in any Twisted application::

    conn = yield connect(reactor, "tcp:127.0.0.1:7420", "alice", password,
                         on_message=lambda m: print(m["from"], m["body"]))
    yield conn.send("bob", "hi")

:func:`connect` gives one :class:`Connection` (one TCP/TLS connection, logged in).
:class:`ChatClientService` keeps a connection up with reconnect and backoff
(``ClientService``) and resumes after the last processed position, so the caller's
``on_message`` sees every message once, in order, whatever the network does.

Groups (``#name`` or ``#name@realm``) are addressed like users in ``send`` and
``history``; their membership changes arrive through ``on_message`` as items of kind
``event`` (``meta["event"]``: ``joined``, ``kicked``...).  Presence is ephemeral: each
``{"type": "presence", "user", "status", "text"?}`` frame goes to ``on_presence``; it
is neither stored nor acknowledged, and missed presence is not replayed.

Acks are handled here: after ``on_message`` returns for an item, its position is
acknowledged (coalesced, one ack per reactor turn).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import wire

__all__ = [
    "ChatClientService",
    "ClientProtocol",
    "Connection",
    "RemoteError",
    "WatchedEndpoint",
    "connect",
    "endpoint_for",
]

MessageCallback = Callable[[dict[str, Any]], Any]
PresenceCallback = Callable[[dict[str, Any]], Any]


class RemoteError(Exception):
    """The realm answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.extra = extra or {}


class ConnectionDone(Exception):
    """The connection closed before the request was answered."""


def endpoint_for(
    reactor: Any, server: str, realm: str | None = None, ca: str | None = None
) -> IStreamClientEndpoint:
    """Make a client endpoint from ``server``.

    ``tls:HOST:PORT`` connects with TLS and verifies the certificate names ``realm``
    (default: HOST) using service_identity, against ``ca`` (a PEM file) or the
    system's trust store.  Anything else is a Twisted client endpoint description
    (``tcp:HOST:PORT``, ``unix:PATH``...).
    """
    if server.startswith("tls:"):
        host, _, port = server[4:].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected tls:HOST:PORT, got {server!r}")
        host = host.strip("[]")
        trust = None
        if ca:
            with open(ca, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(realm or host, trustRoot=trust)
        return wrapClientTLS(options, HostnameEndpoint(reactor, host, int(port)))
    return clientFromString(reactor, server)


@implementer(IStreamClientEndpoint)
class WatchedEndpoint:
    """An endpoint that remembers why its last connection closed (``reason``).

    It also absorbs a gap in Twisted's ``ClientService``: a connection lost after
    ``prepareConnection`` failed (a refused login) has no transition in its state
    machine and would be logged as an unhandled ``NoTransition`` error.
    :class:`ChatClientService` wraps its endpoint in one.
    """

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner
        self.reason: Failure | None = None

    def connect(self, factory: Any) -> Deferred[Any]:
        watcher = self

        class _Factory:
            def __getattr__(self, name: str) -> Any:
                return getattr(factory, name)

            def buildProtocol(self, addr: Any) -> Any:
                proto = factory.buildProtocol(addr)
                if proto is not None:
                    lost = proto.connectionLost

                    def connectionLost(reason: Failure | None = None) -> None:
                        watcher.reason = reason
                        try:
                            lost(reason)
                        except NoTransition:
                            # ClientService has no transition for a connection lost
                            # after prepareConnection failed; the failure already
                            # told it the attempt is over.
                            pass

                    proto.connectionLost = connectionLost
                return proto

        self.reason = None
        return self.inner.connect(_Factory())  # type: ignore[arg-type]


class ClientProtocol(Int32StringReceiver):
    """The client side of the wire protocol: requests with ids, and pushed frames."""

    log = Logger()
    transport: Any
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(
        self,
        reactor: Any,
        on_message: MessageCallback | None = None,
        ack: bool = True,
        on_presence: PresenceCallback | None = None,
    ) -> None:
        self.reactor = reactor
        self.on_message = on_message
        self.on_presence = on_presence
        self.ack = ack
        self.paused = False
        self._held: list[dict[str, Any]] = []
        self.on_close: Callable[[Failure], Any] | None = None
        self.on_synced: Callable[[int], Any] | None = None
        self.last_pos = 0
        self.hello: dict[str, Any] = {}
        self._next_id = 0
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._ack_pos = 0
        self._ack_call: Any = None
        self.connected_d: Deferred[ClientProtocol] = Deferred()
        #: True from the moment the connection is lost
        self.lost = False
        self.closed_d: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def request(self, type_: str, **fields: Any) -> Deferred[dict[str, Any]]:
        """Send a request; fires with the ``result`` frame or fails with RemoteError."""
        if self.lost:
            return defer.fail(ConnectionDone("the connection is closed"))
        self._next_id += 1
        rid = self._next_id
        d: Deferred[dict[str, Any]] = Deferred()
        self._pending[rid] = d
        self.sendString(wire.encode({"type": type_, "id": rid, **fields}))
        return d

    def notify(self, type_: str, **fields: Any) -> None:
        """Send a frame that gets no answer (``ack``, ``pong``)."""
        self.sendString(wire.encode({"type": type_, **fields}))

    def stringReceived(self, payload: bytes) -> None:
        try:
            frame = wire.decode(payload)
        except Exception:
            self.log.failure("undecodable frame from the realm")
            self.transport.loseConnection()
            return
        kind = frame["type"]
        if kind == "msg":
            self._message(frame)
        elif kind in ("result", "error"):
            d = self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if kind == "result":
                if d is not None:
                    d.callback(frame)
            else:
                err = RemoteError(
                    frame.get("code", "?"),
                    frame.get("message", ""),
                    {k: v for k, v in frame.items() if k not in ("type", "id", "code", "message")},
                )
                if d is not None:
                    d.errback(err)
                else:
                    self.log.info("realm: {code}: {message}", code=err.code, message=err.message)
                    self.last_error = err
        elif kind == "presence":
            if self.on_presence is not None:
                try:
                    self.on_presence(frame)
                except Exception:
                    self.log.failure("on_presence callback failed")
        elif kind == "ping":
            self.notify("pong")
        elif kind == "synced":
            if self.on_synced is not None:
                self.on_synced(frame["pos"])

    last_error: RemoteError | None = None

    def pause(self) -> None:
        """Deliver (and acknowledge) nothing more until :meth:`resume`."""
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        self.paused = False
        held, self._held = self._held, []
        for frame in held:
            self._message(frame)
        if self.transport is not None and not self.paused:
            self.transport.resumeProducing()

    def _message(self, frame: dict[str, Any]) -> None:
        if self.paused:
            self._held.append(frame)  # frames already read when the pause came
            return
        pos = frame.get("pos", 0)
        if pos <= self.last_pos:
            return  # already processed (resume overlap)
        if self.on_message is not None:
            try:
                self.on_message(frame)
            except Exception:
                self.log.failure("on_message callback failed for pos {pos}", pos=pos)
        self.last_pos = pos
        self._ack_pos = pos
        if self.ack and self._ack_call is None:
            self._ack_call = self.reactor.callLater(0, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_call = None
        if self.transport is not None and self.connected:
            self.notify("ack", pos=self._ack_pos)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True  # before any callback below runs and might use this connection
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        pending, self._pending = self._pending, {}
        err: BaseException
        if self.last_error is not None:
            err = self.last_error
        elif reason is not None and not reason.check(error.ConnectionDone):
            err = reason.value or ConnectionDone(
                "connection lost"
            )  # e.g. a TLS verification failure: the caller needs it
        else:
            err = ConnectionDone("connection closed")
        for d in pending.values():
            d.errback(err)
        if self.on_close is not None and reason is not None:
            self.on_close(reason)
        self.closed_d.callback(None)


class Connection:
    """A logged-in connection: the caller's handle for requests."""

    def __init__(self, proto: ClientProtocol, user: str, realm: str) -> None:
        self.protocol = proto
        self.user = user
        self.realm = realm
        self.synced: Deferred[int] = Deferred()

    @property
    def last_pos(self) -> int:
        """The highest stream position processed (and acknowledged) so far."""
        return self.protocol.last_pos

    @property
    def limits(self) -> dict[str, Any]:
        return dict(self.protocol.hello.get("limits", {}))

    def send(self, to: str, body: str, nonce: str | None = None) -> Deferred[dict[str, Any]]:
        """Send a message to a user or a ``#group``; fires with ``{"pos", "msg_id", "ts"}``
        once stored.  Repeating a send with the same ``nonce`` (after a dropped
        connection) never stores it twice: the realm answers with the first result."""
        fields: dict[str, Any] = {"to": to, "body": body}
        if nonce is not None:
            fields["nonce"] = nonce
        return self.protocol.request("send", **fields)

    def history(
        self,
        peer: str,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """A page of the conversation with ``peer``, oldest first (see PROTOCOL.md)."""
        fields: dict[str, Any] = {"with": peer}
        for k, v in (("before", before), ("after", after), ("limit", limit)):
            if v is not None:
                fields[k] = v
        return self.protocol.request("history", **fields).addCallback(lambda r: r["messages"])

    def who(self, group: str | None = None) -> Deferred[list[dict[str, Any]]]:
        """Online users of the realm, or the online members of ``group`` (members only):
        ``[{"user", "sessions", "status"?, "text"?}]``."""
        fields = {} if group is None else {"group": group}
        return self.protocol.request("who", **fields).addCallback(lambda r: r["users"])

    # groups: each change fires with {"group", "pos", "msg_id"} once committed ---------

    def create_group(
        self,
        group: str,
        visibility: str | None = None,
        history: str | None = None,
        topic: str = "",
    ) -> Deferred[dict[str, Any]]:
        """Create ``group`` (you become its owner).  ``visibility``: ``public`` (anyone
        may join, the default) or ``invite``; ``history``: ``joined`` (members see what
        came after they joined, the default) or ``all``."""
        fields: dict[str, Any] = {"group": group}
        if visibility is not None:
            fields["visibility"] = visibility
        if history is not None:
            fields["history"] = history
        if topic:
            fields["topic"] = topic
        return self.protocol.request("create_group", **fields)

    def join(self, group: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request("join", group=group)

    def leave(self, group: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request("leave", group=group)

    def invite(self, group: str, user: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request("invite", group=group, user=user)

    def kick(self, group: str, user: str, reason: str | None = None) -> Deferred[dict[str, Any]]:
        fields: dict[str, Any] = {"group": group, "user": user}
        if reason:
            fields["reason"] = reason
        return self.protocol.request("kick", **fields)

    def ban(self, group: str, user: str, reason: str | None = None) -> Deferred[dict[str, Any]]:
        fields: dict[str, Any] = {"group": group, "user": user}
        if reason:
            fields["reason"] = reason
        return self.protocol.request("ban", **fields)

    def unban(self, group: str, user: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request("unban", group=group, user=user)

    def set_topic(self, group: str, topic: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request("set_topic", group=group, topic=topic)

    def set_role(self, group: str, user: str, role: str) -> Deferred[dict[str, Any]]:
        """Give ``user`` the role ``member``, ``admin`` or ``owner`` (owners only)."""
        return self.protocol.request("set_role", group=group, user=user, role=role)

    def delete_group(self, group: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request("delete_group", group=group)

    def list_groups(self) -> Deferred[list[dict[str, Any]]]:
        """The public groups: ``[{"group", "topic", "visibility", "history", "members"}]``."""
        return self.protocol.request("list_groups").addCallback(lambda r: r["groups"])

    def members(self, group: str) -> Deferred[list[dict[str, Any]]]:
        """The members of ``group`` (members only): ``[{"user", "role", "online"}]``."""
        return self.protocol.request("members", group=group).addCallback(lambda r: r["members"])

    def group_info(self, group: str) -> Deferred[dict[str, Any]]:
        """The summary of ``group`` and your ``role`` in it (``None``: not a member)."""
        return self.protocol.request("group_info", group=group).addCallback(
            lambda r: {k: v for k, v in r.items() if k not in ("type", "id")}
        )

    def set_status(self, status: str, text: str = "") -> Deferred[dict[str, Any]]:
        """Set your presence (``online``, ``away``, ``busy``) for as long as you are
        connected; your contacts get a presence frame."""
        fields: dict[str, Any] = {"status": status}
        if text:
            fields["text"] = text
        return self.protocol.request("set_status", **fields)

    def close(self) -> Deferred[None]:
        """Close the connection; fires when it is closed."""
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()
        return self.protocol.closed_d


@inlineCallbacks
def _handshake(
    proto: ClientProtocol,
    user: str | None,
    password: str | None,
    device: str,
    since: int | None,
    register: bool,
    quiet: bool = False,
) -> Any:
    hello = yield proto.request("hello", version=wire.PROTOCOL_VERSION)
    proto.hello = hello
    realm = hello["realm"]
    if user is None or password is None:
        return Connection(proto, "", realm)
    if register:
        yield proto.request("register", user=user, password=password)
    synced: Deferred[int] = Deferred()
    proto.on_synced = lambda pos: synced.callback(pos) if not synced.called else None

    def lost(_: object) -> None:
        if not synced.called:
            # Waiters already attached get the failure; nobody waiting is no error.
            synced.errback(ConnectionDone("connection closed before the backlog was out"))
            synced.addErrback(lambda _: None)

    proto.closed_d.addCallback(lost)
    if since is not None:
        proto.last_pos = since
    fields: dict[str, Any] = {"user": user, "password": password, "device": device}
    if since is not None:
        fields["since"] = since
    if quiet:
        fields["quiet"] = True
    result = yield proto.request("login", **fields)
    conn = Connection(proto, result["user"], realm)
    conn.synced = synced
    return conn


@inlineCallbacks
def connect(
    reactor: Any,
    server: str | IStreamClientEndpoint,
    user: str | None = None,
    password: str | None = None,
    *,
    device: str = "default",
    on_message: MessageCallback | None = None,
    since: int | None = None,
    register: bool = False,
    realm: str | None = None,
    ca: str | None = None,
    ack: bool = True,
    quiet: bool = False,
    on_presence: PresenceCallback | None = None,
) -> Any:
    """Connect, say hello and (with ``user``/``password``) log in.

    Fires with a :class:`Connection`; fails with :class:`RemoteError` (``auth_failed``,
    ``unsupported_version``...) or a connection error.  ``since`` resumes after a
    stream position (default: the realm's record of this device's last ack).
    ``register=True`` creates the account first (if the realm allows it).
    ``conn.synced`` fires once the backlog has been delivered to ``on_message``.
    ``ack=False`` makes a passive connection that acknowledges nothing (one-shot tools
    that must not move the read position of the user's devices).  ``quiet=True``
    logs in without making the user appear online to contacts (nor offline after).
    ``on_presence`` is called with each presence frame (a dict).
    """
    endpoint = endpoint_for(reactor, server, realm, ca) if isinstance(server, str) else server
    factory = Factory.forProtocol(lambda: ClientProtocol(reactor, on_message, ack, on_presence))  # type: ignore[arg-type]
    proto = yield endpoint.connect(factory)
    try:
        conn = yield _handshake(proto, user, password, device, since, register, quiet)
    except BaseException:
        proto.transport.loseConnection()
        raise
    return conn


class ChatClientService(ClientService):
    """Keeps one logged-in connection up, reconnecting with backoff and resuming.

    ``on_message`` is called once per item, in position order, across reconnects;
    ``on_presence`` with each presence frame (ephemeral: not replayed after a reconnect,
    but the realm sends a snapshot of online contacts after each login).
    ``whenReady()`` fires with the current :class:`Connection` once logged in and
    synced.  Errors reconnecting cannot cure (``auth_failed``, ``unsupported_version``,
    ``bad_request``) stop the service and fail ``done``.
    """

    log = Logger()
    FATAL = ("auth_failed", "unsupported_version", "bad_request")

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        user: str,
        password: str,
        *,
        device: str = "default",
        on_message: MessageCallback | None = None,
        since: int | None = None,
        on_presence: PresenceCallback | None = None,
        **kwargs: Any,
    ) -> None:
        self.reactor = reactor
        self.user = user
        self._password = password
        self.device = device
        self.on_message = on_message
        self.on_presence = on_presence
        self.last_pos = since
        self.connection: Connection | None = None
        #: Fails with the RemoteError that made the service give up.
        self.done: Deferred[None] = Deferred()
        self._ready: list[Deferred[Connection]] = []
        self._built: ClientProtocol | None = None
        factory = Factory.forProtocol(self._build)  # type: ignore[arg-type]
        if not isinstance(endpoint, WatchedEndpoint):
            endpoint = WatchedEndpoint(endpoint)
        super().__init__(
            endpoint, factory, clock=reactor, prepareConnection=self._prepare, **kwargs
        )

    def _build(self) -> ClientProtocol:
        self._built = ClientProtocol(self.reactor, self._message, on_presence=self._presence)
        return self._built

    def _message(self, frame: dict[str, Any]) -> None:
        self.last_pos = frame["pos"]
        if self.on_message is not None:
            self.on_message(frame)

    def _presence(self, frame: dict[str, Any]) -> None:
        if self.on_presence is not None:
            self.on_presence(frame)

    @inlineCallbacks
    def _prepare(self, _proxy: Any) -> Any:
        proto = self._built  # the protocol itself, not ClientService's proxy of it
        assert proto is not None
        try:
            conn = yield _handshake(
                proto, self.user, self._password, self.device, self.last_pos, False
            )
            yield conn.synced
        except BaseException as e:
            proto.transport.loseConnection()
            if isinstance(e, RemoteError) and e.code in self.FATAL:
                self.log.error("giving up: {err}", err=e)
                if not self.done.called:
                    self.done.errback(e)
                self.reactor.callLater(0, self.stopService)
            raise
        self.connection = conn
        proto.closed_d.addCallback(lambda _: setattr(self, "connection", None))
        waiters, self._ready = self._ready, []
        for d in waiters:
            d.callback(conn)

    def whenReady(self) -> Deferred[Connection]:
        if self.connection is not None and not self.connection.protocol.lost:
            return defer.succeed(self.connection)
        d: Deferred[Connection] = Deferred()
        self._ready.append(d)
        return d

    @inlineCallbacks
    def send(self, to: str, body: str, attempts: int = 5) -> Any:
        """Send through whatever connection is up, retrying across reconnects.

        Each attempt carries the same random nonce, so a send whose result was lost
        with the connection is stored once, not once per attempt.  Fires with the
        result; fails with :class:`RemoteError` (not retried) or, after ``attempts``
        lost connections, :class:`ConnectionDone`.
        """
        nonce = secrets.token_urlsafe(16)
        for _ in range(attempts):
            conn = yield self.whenReady()
            try:
                result = yield conn.send(to, body, nonce)
            except RemoteError:
                raise
            except Exception:  # the connection went away: wait for the next one
                continue
            return result
        raise ConnectionDone(f"send to {to} not confirmed after {attempts} connections")

    def pause(self) -> None:
        """Stop reading: no further item is delivered to ``on_message`` (nor acked)."""
        if self._built is not None:
            self._built.pause()

    def stopService(self) -> Deferred[None]:
        if not self.done.called:
            self.done.callback(None)
        return super().stopService()
