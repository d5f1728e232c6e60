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
``event`` (``meta["event"]``: ``joined``, ``kicked``...).  With federation, a message
another realm refused comes back as an item of kind ``bounce`` (``meta["id"]`` is the
refused ``msg_id``, ``meta["code"]`` the reason).  Presence is ephemeral: each
``{"type": "presence", "user", "status", "text"?}`` frame goes to ``on_presence``; it
is neither stored nor acknowledged, and missed presence is not replayed.

Acks are handled here: after ``on_message`` returns for an item, its position is
acknowledged (coalesced, one ack per reactor turn).
"""

from __future__ import annotations

import mimetypes
import os
import secrets
from collections.abc import Callable
from typing import Any

from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import transfer, wire
from chatproto.client_reading import ReadingCalls

__all__ = [
    "ONESHOT_SINCE",
    "ChatClientService",
    "ChecksumMismatch",
    "ClientProtocol",
    "Connection",
    "RemoteError",
    "TransferInterrupted",
    "WatchedEndpoint",
    "connect",
    "endpoint_for",
]

#: A login that resumes "after" this position is streamed nothing and acknowledges
#: nothing: for one-shot commands (a new device starts at its user's furthest ack, so a
#: one-shot login that acknowledged the backlog would hide it from the next listener).
ONESHOT_SINCE = 2**53 - 1

MessageCallback = Callable[[dict[str, Any]], Any]
#: ``progress(done, total)``: bytes of a transfer done so far, and its size.
ProgressCallback = Callable[[int, int], Any]
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


class TransferInterrupted(ConnectionDone):
    """A file transfer stopped: its connection was lost, or the caller's ``interrupt``
    fired (``stopped``).

    For an upload, ``upload`` is the id to pass as ``resume=`` to
    :meth:`Connection.send_file` (None: nothing was started, or it was cancelled); a
    download resumes by calling :meth:`Connection.download` again with the same path
    (its ``.part`` file is kept).  ``done`` counts the bytes of ``size``: with ``held``
    it is what the realm holds of the upload (it said so), or what the ``.part`` file
    holds; without, the bytes sent before the connection went (the realm may hold
    fewer).  ``finishing``: the connection went while the realm was finishing the
    upload, so it may have been posted: resuming says (it is never posted twice).
    """

    def __init__(
        self,
        message: str,
        upload: str | None = None,
        done: int = 0,
        *,
        size: int = 0,
        held: bool = False,
        finishing: bool = False,
        stopped: bool = False,
    ) -> None:
        super().__init__(message)
        self.upload = upload
        self.done = done
        self.size = size
        self.held = held
        self.finishing = finishing
        self.stopped = stopped


class _Interrupt:
    """The caller's ``interrupt`` Deferred, as a flag plus hooks run when it fires."""

    def __init__(self, d: Deferred[Any] | None) -> None:
        self.fired = False
        self._hooks: list[Callable[[], Any]] = []
        if d is not None:
            d.addCallback(self._fire)

    def _fire(self, _: object) -> None:
        self.fired = True
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_fire(self, hook: Callable[[], Any]) -> None:
        if self.fired:
            hook()
        else:
            self._hooks.append(hook)


class ChecksumMismatch(Exception):
    """A downloaded file's sha256 is not the one the realm announced (the partial
    file was removed)."""


def sha256_file(path: str) -> str:
    """The hex sha256 of a file (blocking: run it in a thread)."""
    return str(transfer.hash_file(path).hexdigest())


class _Receiver:
    """One download on a connection: data frames -> a ``.part`` file, in order."""

    def __init__(
        self,
        proto: ClientProtocol,
        stream: int,
        path: str,
        offset: int,
        length: int,
        progress: ProgressCallback | None,
        total: int,
    ) -> None:
        self.proto = proto
        self.stream = stream
        self.writer = transfer.SerialWriter(proto.run, path, offset)
        self.expected = offset
        self.end = offset + length
        self.progress = progress
        self.total = total
        self.done: Deferred[None] = Deferred()
        if length == 0:
            self.done.callback(None)

    def data(self, offset: int, data: bytes) -> None:
        if self.done.called:
            return
        if offset != self.expected or offset + len(data) > self.end:
            self.fail(RemoteError("bad_offset", f"data at {offset}, expected {self.expected}"))
            return
        self.expected += len(data)
        d = self.writer.write(data)
        self.proto._reading_backlog(len(data))
        d.addBoth(self._written, len(data))

    def _written(self, result: Any, n: int) -> None:
        self.proto._reading_backlog(-n)
        if isinstance(result, Failure):
            self.fail(result)
            return
        if self.progress is not None:
            self.progress(result, self.total)
        if result >= self.end and not self.done.called:
            self.done.callback(None)

    def fail(self, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(reason)


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

    def __init__(self, inner: IStreamClientEndpoint, description: str = "") -> None:
        self.inner = inner
        self.reason: Failure | None = None
        #: How logs name it (ClientService logs each retry with the endpoint's repr).
        self.description = description

    def __repr__(self) -> str:
        return self.description or repr(self.inner)

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


@implementer(IPushProducer)
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
        #: Called with each other pushed frame (``read``, ``typing``; ephemeral).
        self.on_notice: Callable[[dict[str, Any]], Any] | None = None
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
        #: File transfers: upload sinks and download receivers by stream number.
        self._sinks: dict[int, transfer.DataSink] = {}
        self._receivers: dict[int, _Receiver] = {}
        self._upload_errors: dict[int, RemoteError] = {}
        self._out_paused = False
        self._backlog = 0
        self._backlog_paused = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run blocking file work in the reactor's thread pool."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    # IPushProducer (for uploads) --------------------------------------------------

    def pauseProducing(self) -> None:
        self._out_paused = True
        for sink in list(self._sinks.values()):
            sink.pause()

    def resumeProducing(self) -> None:
        self._out_paused = False
        for sink in list(self._sinks.values()):
            if not self._out_paused:
                sink.resume()

    def stopProducing(self) -> None:
        for sink in list(self._sinks.values()):
            sink.stop()

    def _reading_backlog(self, n: int) -> None:
        """Download bytes waiting for the disk: stop reading the socket past 4 MiB."""
        self._backlog += n
        if self._backlog > 4 * 1024 * 1024 and not self._backlog_paused:
            self._backlog_paused = True
            self.transport.pauseProducing()
        elif self._backlog_paused and self._backlog <= 1024 * 1024:
            self._backlog_paused = False
            if not self.lost and not self.paused:
                self.transport.resumeProducing()

    def upload(
        self,
        stream: int,
        path: str,
        offset: int,
        length: int,
        chunk: int,
        progress: ProgressCallback | None = None,
        total: int = 0,
    ) -> Deferred[int]:
        """Send ``length`` bytes of ``path`` from ``offset`` as data frames of stream
        ``stream``, paced by the transport; fires with the bytes sent."""
        if not self._sinks:
            # This connection is the streaming producer of its output while uploads
            # run (they stop reading their files while the transport's buffer is
            # full); only then, since a TLS transport with a producer registered
            # does not close until it is unregistered.
            self._out_paused = False
            self.transport.registerProducer(self, True)
        sink = transfer.DataSink(self.transport.write, wire.OP_UPLOAD, stream, offset, chunk)
        sink.paused = self._out_paused
        if progress is not None:
            inner = sink.write

            def write(data: bytes) -> None:
                inner(data)
                progress(sink.offset, total)

            sink.write = write  # type: ignore[method-assign]
        self._sinks[stream] = sink
        producer = transfer.RangeProducer(self.run, path, offset, length)

        def done(result: Any) -> Any:
            self._sinks.pop(stream, None)
            if not self._sinks and not self.lost:
                self.transport.unregisterProducer()
            return result

        return producer.start(sink).addBoth(done)

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
        if payload[:1] == b"\x00":
            try:
                op, stream, offset, data = wire.decode_data(payload)
            except Exception:
                self.log.failure("bad data frame from the realm")
                self.transport.loseConnection()
                return
            receiver = self._receivers.get(stream)
            if op == wire.OP_DOWNLOAD and receiver is not None:
                receiver.data(offset, data)
            return
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
                on = frame.get("stream")
                if d is not None:
                    d.errback(err)
                elif isinstance(on, int) and (on in self._receivers or on in self._sinks):
                    self._transfer_error(on, err)
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
        elif self.on_notice is not None:  # read, typing, and kinds added later
            try:
                self.on_notice(frame)
            except Exception:
                self.log.failure("on_notice callback failed")

    last_error: RemoteError | None = None

    def _transfer_error(self, stream: int, err: RemoteError) -> None:
        """The realm reported an error for one transfer (an upload's data frames, a
        download that failed while streaming)."""
        receiver = self._receivers.get(stream)
        if receiver is not None:
            receiver.fail(err)
        sink = self._sinks.get(stream)
        if sink is not None:
            self._upload_errors[stream] = err
            sink.stop()

    def pause(self) -> None:
        """Deliver (and acknowledge) nothing more until :meth:`resume`."""
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        """Deliver again (what was held first) and read the socket again -- unless the
        bytes of downloads waiting for the disk still hold it (see
        :meth:`_reading_backlog`, which resumes it once they are written)."""
        self.paused = False
        held, self._held = self._held, []
        for frame in held:
            self._message(frame)
        if self.transport is not None and not self.paused and not self._backlog_paused:
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
        for receiver in list(self._receivers.values()):
            receiver.fail(TransferInterrupted("connection lost during the download"))
        for sink in list(self._sinks.values()):
            sink.stop()
        if self.on_close is not None and reason is not None:
            self.on_close(reason)
        self.closed_d.callback(None)


class Connection(ReadingCalls):
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

    def send(
        self, to: str, body: str, nonce: str | None = None, reply_to: str | None = None
    ) -> Deferred[dict[str, Any]]:
        """Send a message to a user or a ``#group``; fires with ``{"pos", "msg_id", "ts"}``
        once stored.  Repeating a send with the same ``nonce`` (after a dropped
        connection) never stores it twice: the realm answers with the first result.
        ``reply_to``: the ``msg_id`` of the message of that conversation it answers."""
        fields: dict[str, Any] = {"to": to, "body": body}
        if nonce is not None:
            fields["nonce"] = nonce
        if reply_to is not None:
            fields["reply_to"] = reply_to
        return self.protocol.request("send", **fields)

    def react(self, msg_id: str, emoji: str, remove: bool = False) -> Deferred[dict[str, Any]]:
        """Add (``remove``: take back) a reaction to a message one may read; fires
        with the reaction item's ``{"pos", "msg_id", "ts"}``."""
        fields: dict[str, Any] = {"msg_id": msg_id, "emoji": emoji}
        if remove:
            fields["remove"] = True
        return self.protocol.request("react", **fields)

    def edit(self, msg_id: str, body: str) -> Deferred[dict[str, Any]]:
        """Replace the text of one's own message; fires with the edit item's
        ``{"pos", "msg_id", "ts"}``."""
        return self.protocol.request("edit", msg_id=msg_id, body=body)

    def delete(self, msg_id: str) -> Deferred[dict[str, Any]]:
        """Delete one's own message or file (in a group, an admin may delete any);
        fires with the delete item's ``{"pos", "msg_id", "ts"}``."""
        return self.protocol.request("delete", msg_id=msg_id)

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

    def who(
        self, group: str | None = None, user: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Online users of the realm, or the online members of ``group`` (members only):
        ``[{"user", "sessions", "status"?, "text"?}]``.  With ``user``: that user, if
        online (``[]`` otherwise); fails with ``no_such_user`` for no such account."""
        fields: dict[str, Any] = {}
        if group is not None:
            fields["group"] = group
        if user is not None:
            fields["user"] = user
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

    # moderation (PROTOCOL.md, "Moderation") --------------------------------------------

    def report(self, msg_id: str, reason: str) -> Deferred[int]:
        """Report message ``msg_id`` (one you can read) to the realm's admins; fires
        with the report's id.  Rate-limited (``rate_limited``)."""
        d = self.protocol.request("report", msg_id=msg_id, reason=reason)
        return d.addCallback(lambda r: r["report"])

    def reports(
        self, before: int | None = None, limit: int | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Realm admins only: a page of abuse reports, newest first (``forbidden``
        for anyone else)."""
        fields = {k: v for k, v in (("before", before), ("limit", limit)) if v is not None}
        return self.protocol.request("reports", **fields).addCallback(lambda r: r["reports"])

    def suspend(self, user: str, reason: str = "") -> Deferred[dict[str, Any]]:
        """Realm admins only: suspend local account ``user`` (``{"user", "closed"}``)."""
        return self.protocol.request("suspend", user=user, reason=reason)

    def unsuspend(self, user: str) -> Deferred[dict[str, Any]]:
        """Realm admins only: lift a suspension (``{"user", "was_suspended"}``)."""
        return self.protocol.request("unsuspend", user=user)

    # files --------------------------------------------------------------------------

    @inlineCallbacks
    def send_file(
        self,
        to: str,
        path: str,
        *,
        name: str | None = None,
        media_type: str | None = None,
        progress: ProgressCallback | None = None,
        resume: str | None = None,
        interrupt: Deferred[Any] | None = None,
    ) -> Any:
        """Upload the file at ``path`` to a user or ``#group``.

        Fires with ``{"file", "pos", "msg_id", "ts", "upload"}`` once the realm has
        verified and stored it and committed its ``file`` message.  ``progress(sent,
        size)`` is called as bytes go out.  Fails with :class:`RemoteError` (codes
        ``too_large``, ``quota_exceeded``, ``checksum_mismatch``...; the limits are
        checked before any byte is sent) or :class:`TransferInterrupted`: pass its
        ``upload`` as ``resume=`` on a new connection to continue where the realm's
        bytes end.  Resuming an upload the realm has posted already (the answer was
        lost) fires with that post and ``"already_posted": True``: a file is posted
        at most once.

        When ``interrupt`` fires (Ctrl-C, say), no more bytes are sent: the realm is
        asked what it holds and the call fails with :class:`TransferInterrupted`
        (``stopped``, ``held``, ``done`` = the realm's bytes); an upload not begun yet
        is cancelled (``upload`` None).  Once ``file_finish`` is sent it is answered
        whatever happens, and the call ends as the realm decided.
        """
        proto = self.protocol
        stop = _Interrupt(interrupt)
        size = os.path.getsize(path)
        sha = yield proto.run(sha256_file, path)
        if stop.fired:
            raise TransferInterrupted(
                "interrupted before the upload began", size=size, stopped=True
            )
        if resume is not None:
            r = yield proto.request("file_resume", upload=resume)
            if r.get("finished"):
                post = {k: v for k, v in r.items() if k not in ("type", "id", "finished")}
                return {**post, "upload": resume, "already_posted": True}
            if r["size"] != size or r["sha256"] != sha:
                raise ValueError(f"upload {resume} is of another file than {path}")
        else:
            fields: dict[str, Any] = {
                "to": to,
                "name": name or os.path.basename(path),
                "size": size,
                "sha256": sha,
            }
            kind = media_type or mimetypes.guess_type(path)[0]
            if kind:
                fields["media_type"] = kind
            r = yield proto.request("file_offer", **fields)
            if stop.fired:
                yield proto.request("file_cancel", upload=r["upload"])
                raise TransferInterrupted(
                    "interrupted before any byte was sent (the upload was cancelled)",
                    size=size,
                    held=True,
                    stopped=True,
                )
        upload, offset, stream = r["upload"], r["offset"], r["stream"]
        sent = offset

        def sending(done: int, total: int) -> None:
            nonlocal sent
            sent = done
            if progress is not None:
                progress(done, total)

        sending(offset, size)
        if not stop.fired:
            going = proto.upload(stream, path, offset, size - offset, r["chunk"], sending, size)
            stop.on_fire(going.cancel)  # stops reading the file: ConnectionDone below
            try:
                yield going
            except transfer.ConnectionDone:
                err = proto._upload_errors.pop(stream, None)
                if err is not None:
                    raise err from None
                if not stop.fired or proto.lost:
                    raise TransferInterrupted(
                        f"connection lost while uploading {path}", upload, sent, size=size
                    ) from None
        if stop.fired:
            # frames and requests are handled in order: this counts every byte sent
            held = yield proto.request("file_resume", upload=upload)
            raise TransferInterrupted(
                "interrupted", upload, held.get("offset", size), size=size, held=True, stopped=True
            )
        try:
            result = yield proto.request("file_finish", upload=upload)
        except RemoteError:
            raise
        except Exception:
            if not proto.lost:
                raise
            raise TransferInterrupted(
                f"connection lost while the realm was finishing {path}",
                upload,
                size,
                size=size,
                finishing=True,
            ) from None
        out = {k: v for k, v in result.items() if k not in ("type", "id")}
        out["upload"] = upload
        if stop.fired:
            out["interrupted_late"] = True  # the interrupt came while it was finishing
        return out

    def cancel_upload(self, upload: str) -> Deferred[dict[str, Any]]:
        """Discard an unfinished upload (after :class:`TransferInterrupted`)."""
        return self.protocol.request("file_cancel", upload=upload)

    @inlineCallbacks
    def download(
        self,
        file_id: str,
        path: str,
        *,
        progress: ProgressCallback | None = None,
        interrupt: Deferred[Any] | None = None,
    ) -> Any:
        """Download file ``file_id`` (from a ``file`` message's ``meta``) to ``path``.

        Bytes go to ``path + ".part"`` first; if that exists (an interrupted earlier
        download) only the rest is asked for (a ranged download).  The sha256 is
        checked before the file is renamed to ``path``.  ``progress(received, size)``
        is called as bytes are written.  Fires with the file's description (``file``,
        ``name``, ``size``, ``media_type``, ``sha256``, ``from``, ``to``...); fails
        with :class:`RemoteError` (``no_such_file``, ``bad_request``),
        :class:`ChecksumMismatch`, or :class:`TransferInterrupted` (call again to
        resume; ``done`` is what the ``.part`` file holds, on disk).  When
        ``interrupt`` fires, the download stops the same way (``stopped``).
        """
        proto = self.protocol
        stop = _Interrupt(interrupt)
        part = path + ".part"
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            r = yield proto.request("download", file=file_id, offset=offset)
        except RemoteError as e:
            if e.code != "bad_request" or not offset:
                raise
            offset = 0  # the partial file is longer than the file: start again
            yield proto.run(os.truncate, part, 0)
            r = yield proto.request("download", file=file_id, offset=0)
        stream = r["stream"]
        receiver = _Receiver(proto, stream, part, offset, r["length"], progress, r["size"])
        proto._receivers[stream] = receiver
        if progress is not None:
            progress(offset, r["size"])

        def stopped() -> None:
            if not receiver.done.called:
                receiver.fail(TransferInterrupted("interrupted", stopped=True))
                if not proto.lost:  # frames already on their way are dropped
                    proto.request("download_cancel", stream=stream).addErrback(lambda _: None)

        stop.on_fire(stopped)
        try:
            yield receiver.done
        except BaseException as e:
            proto._receivers.pop(stream, None)
            yield receiver.writer.drained()  # the .part file holds what arrived
            if isinstance(e, TransferInterrupted):
                raise TransferInterrupted(
                    str(e),
                    done=receiver.writer.offset,
                    size=r["size"],
                    held=True,
                    stopped=e.stopped,
                ) from None
            raise
        proto._receivers.pop(stream, None)
        yield receiver.writer.drained()
        if r["size"] == 0 and not os.path.exists(part):
            yield proto.run(lambda: open(part, "wb").close())
        digest = yield receiver.writer.digest()
        if digest != r["sha256"]:
            yield proto.run(os.unlink, part)
            raise ChecksumMismatch(f"{path}: sha256 {digest}, expected {r['sha256']}")
        yield proto.run(os.replace, part, path)
        return {k: v for k, v in r.items() if k not in ("type", "id", "stream")}

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
    on_notice: Callable[[dict[str, Any]], Any] | None = None,
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
    ``on_presence`` is called with each presence frame (a dict); ``on_notice`` with
    each other pushed frame (``read`` and ``typing``, see PROTOCOL.md).
    """
    endpoint = endpoint_for(reactor, server, realm, ca) if isinstance(server, str) else server
    factory = Factory.forProtocol(lambda: ClientProtocol(reactor, on_message, ack, on_presence))  # type: ignore[arg-type]
    proto = yield endpoint.connect(factory)
    proto.on_notice = on_notice
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
        on_notice: Callable[[dict[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.reactor = reactor
        self.user = user
        self._password = password
        self.device = device
        self.on_message = on_message
        self.on_presence = on_presence
        self.on_notice = on_notice
        self.last_pos = since
        self.connection: Connection | None = None
        #: The user's canonical address (``alice@realm``), from the first login on.
        self.address: str | None = None
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
        self._built.on_notice = self.on_notice
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
            self.address = conn.user
            self.logged_in(conn)  # before any item of the backlog is processed
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

    def logged_in(self, conn: Connection) -> None:
        """Called on each connection as soon as the realm accepts the login, before
        ``on_message`` gets the backlog (``conn.synced`` has not fired yet): a subclass
        learns the canonical address (``conn.user``) that tells the user's own messages
        from the ones addressed to them.  Does nothing here."""

    def whenReady(self) -> Deferred[Connection]:
        if self.connection is not None and not self.connection.protocol.lost:
            return defer.succeed(self.connection)
        d: Deferred[Connection] = Deferred()
        self._ready.append(d)
        return d

    @inlineCallbacks
    def send(self, to: str, body: str, attempts: int = 5, reply_to: str | None = None) -> Any:
        """Send through whatever connection is up, retrying across reconnects.

        Each attempt carries the same random nonce, so a send whose result was lost
        with the connection is stored once, not once per attempt.  Fires with the
        result; fails with :class:`RemoteError` (not retried) or, after ``attempts``
        lost connections, :class:`ConnectionDone`.  ``reply_to``: see
        :meth:`Connection.send`.
        """
        nonce = secrets.token_urlsafe(16)
        for _ in range(attempts):
            conn = yield self.whenReady()
            try:
                result = yield conn.send(to, body, nonce, reply_to=reply_to)
            except RemoteError:
                raise
            except Exception:  # the connection went away: wait for the next one
                continue
            return result
        raise ConnectionDone(f"send to {to} not confirmed after {attempts} connections")

    @inlineCallbacks
    def send_file(self, to: str, path: str, attempts: int = 5, **kwargs: Any) -> Any:
        """:meth:`Connection.send_file` through whatever connection is up; when the
        connection drops, the upload resumes on the next one (only the bytes the
        realm does not have are sent again).  Fails with :class:`RemoteError` (not
        retried) or, after ``attempts`` lost connections, :class:`ConnectionDone`."""
        resume = kwargs.pop("resume", None)
        for _ in range(attempts):
            conn = yield self.whenReady()
            try:
                result = yield conn.send_file(to, path, resume=resume, **kwargs)
            except TransferInterrupted as e:
                if e.stopped:  # the caller's interrupt, not the network
                    raise
                resume = e.upload or resume
                continue
            except RemoteError:
                raise
            except ConnectionDone:
                continue
            return result
        raise ConnectionDone(f"upload of {path} not finished after {attempts} connections")

    @inlineCallbacks
    def download(self, file_id: str, path: str, attempts: int = 5, **kwargs: Any) -> Any:
        """:meth:`Connection.download` through whatever connection is up, resuming
        from ``path.part`` on the next connection when one drops."""
        for _ in range(attempts):
            conn = yield self.whenReady()
            try:
                info = yield conn.download(file_id, path, **kwargs)
            except RemoteError:
                raise
            except ConnectionDone as e:
                if isinstance(e, TransferInterrupted) and e.stopped:
                    raise
                continue
            return info
        raise ConnectionDone(f"download of {file_id} not finished after {attempts} connections")

    def pause(self) -> None:
        """Stop reading: no further item is delivered to ``on_message`` (nor acked)."""
        if self._built is not None:
            self._built.pause()

    def stopService(self) -> Deferred[None]:
        if not self.done.called:
            self.done.callback(None)
        return super().stopService()
