"""The native client protocol: frames in, realm calls, frames out.

:class:`ClientProtocol` is a translator (see ``twisted.words.service`` and the wormhole
mailbox server): it decodes a frame (:mod:`chatproto.wire`), dispatches it to a
``handle_<type>`` method that calls the realm service or the logged-in
:class:`chatproto.realm.Session`, encodes the answer and turns
:class:`chatproto.errors.ChatError` into ``error`` frames.  It decides nothing: every
rule lives in the realm.

It is also the session's *mind*: the realm calls :meth:`ClientProtocol.deliver` for each
stream item.  The protocol registers itself as a streaming producer on its transport so
it learns when the peer stops reading, and writes through a
:class:`chatproto.flow.OutputQueue`: what the transport cannot take is held there, and
past ``limits.max_output_buffer`` bytes held the connection is closed with
``slow_reader`` (the client resumes later from its last ack).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from math import isfinite
from operator import itemgetter
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
from chatproto.admission import LOGIN_MAX_FRAME, Ticket
from chatproto.envelope import Envelope
from chatproto.errors import ChatError, FatalProtocolError
from chatproto.files import Download, Upload, announced_limits, finish_result
from chatproto.flow import OutputQueue
from chatproto.moderation import ModerationRequests
from chatproto.reading_requests import ReadingRequests
from chatproto.realm import ISessionMind, Notice, RealmService, Session
from chatproto.realm.messaging import SendRequest
from chatproto.transfer import ConnectionDone, DataSink

__all__ = [
    "CLOSED_STATES",
    "ClientFactory",
    "ClientProtocol",
    "delivery_frame",
    "delivery_frames",
    "send_result",
]

_COMPACT_SEND = wire.COMPACT_SEND
_pack = struct.Struct("!I").pack
_unpack_from = struct.Struct("!I").unpack_from

#: Requests allowed before login; every other request needs a logged-in session.
_PUBLIC = frozenset({"hello", "register", "login", "ping", "pong"})
#: An ack frame as clients encode it (compact JSON, "type" first): {"type":"ack","pos":N}
_ACK_PREFIX = b'{"type":"ack","pos":'
#: How a send frame starts, as every client of this project writes it.
_SEND_PREFIX = b'{"type":"send",'
#: Upload bytes waiting for the disk above which a connection stops reading, and below
#: which it reads again (flow control of uploads: the client's sends then stall).
UPLOAD_HIGH = 4 * 1024 * 1024
UPLOAD_LOW = 1024 * 1024
#: Downloads one connection may have in progress at once (asked for, not yet all
#: written or cancelled): each holds an open file and a block read ahead, so a client
#: that asks for many and reads none must not hold the realm's files and memory.
MAX_DOWNLOADS = 16
#: Requests of one connection in progress at once (read, not yet answered; ``send``
#: aside: its bucket bounds it) past which the connection stops reading until
#: answers go out.  Each may build a large answer (a ``history`` page of 200 bodies is
#: over 3 MB) before the slow-reader bound sees it: a client pipelining a thousand of
#: them in one read made the realm build them all (GBs) whether it read or not.
MAX_IN_FLIGHT = 16
#: Requests that are never answered, except by an error.
_SILENT = frozenset({"ack", "pong"})
#: States in which nothing more is read: "closing" waits for the answers of sends
#: read before a fatal frame (ClientProtocol.refuse), then closes.  (Public: the
#: WebSocket gateway's session, a ClientProtocol, reads by the same rule, and the IRC
#: gateway's connection, whose "closing" writes the replies of the lines read before
#: the one that ends it: IRCProtocol.close_after.  ClientFactory.sweep ends both.)
CLOSED_STATES = frozenset({"closed", "closing"})


def delivery_frame(env: Envelope) -> bytes:
    """The length-prefixed ``msg`` frame for ``env``, encoded once and cached.

    An item without ``meta`` (a text message: the hot path) is formatted directly,
    byte for byte what :func:`chatproto.wire.encode` makes of ``Envelope.to_wire``
    (tested with arbitrary envelopes), in a fraction of the time: the addresses and
    the kind come quoted from a cache, and the time from the batch's (see _ts_text)."""
    global _last_fields
    frame = env.frame
    if frame is None:
        ts = env.ts
        if env.meta is None and type(env.pos) is int and type(ts) is float and isfinite(ts):
            pos = env.pos
            id_s = _str(env.id)
            kind, sender, recipient = env.kind, env.sender, env.recipient
            last_kind, last_sender, last_recipient, last_ts, middle, ts_s = _last_fields
            if not (
                kind is last_kind
                and sender is last_sender
                and recipient is last_recipient
                and ts is last_ts
            ):
                ts_s = _ts_text(ts)
                quoted = _QUOTED.get
                middle = (
                    f',"kind":{quoted(kind) or _quoted(kind)}'
                    f',"from":{quoted(sender) or _quoted(sender)}'
                    f',"to":{quoted(recipient) or _quoted(recipient)},"ts":{ts_s},"body":'
                )
                _last_fields = (kind, sender, recipient, ts, middle, ts_s)
            payload = (
                f'{{"type":"msg","pos":{pos},"msg_id":{id_s}{middle}{_str(env.body)}}}'
            ).encode()
            env.result_tail = f'"pos":{pos},"msg_id":{id_s},"ts":{ts_s}}}'  # for send_result
        else:
            payload = wire.encode({"type": "msg", **env.to_wire()})
        frame = env.frame = _pack(len(payload)) + payload
    return frame


def delivery_frames(envs: Sequence[Envelope]) -> bytes:
    """The frames of ``envs``, joined: :func:`delivery_frame` of each (and cached on
    each as it caches them), for a run of one sender's items to one recipient
    (Sessions.route_private, ClientProtocol.deliver_run).

    An item whose kind, sender, recipient and time are the objects of the fields last
    formatted (the run's items after its first: made by one send batch) and which has
    no ``meta`` and an integer position is formatted here, without a call per item;
    any other item by :func:`delivery_frame`.  The last run's bytes are kept, for the
    next session it reaches (the sender's own, after the recipient's)."""
    global _last_run
    last_envs, data = _last_run
    if envs is last_envs:
        return data
    out: list[bytes] = []
    add = out.append
    last_kind, last_sender, last_recipient, last_ts, middle, ts_s = _last_fields
    for env in envs:
        frame = env.frame
        if frame is None:
            pos = env.pos
            if (
                env.kind is last_kind
                and env.sender is last_sender
                and env.recipient is last_recipient
                and env.ts is last_ts
                and env.meta is None
                and type(pos) is int
            ):  # (what delivery_frame does for it)
                id_s = _str(env.id)
                payload = (
                    f'{{"type":"msg","pos":{pos},"msg_id":{id_s}{middle}{_str(env.body)}}}'
                ).encode()
                env.result_tail = f'"pos":{pos},"msg_id":{id_s},"ts":{ts_s}}}'
                frame = env.frame = _pack(len(payload)) + payload
            else:
                frame = delivery_frame(env)
                last_kind, last_sender, last_recipient, last_ts, middle, ts_s = _last_fields
        add(frame)
    data = b"".join(out)
    _last_run = (envs, data)
    return data


#: The run whose frames delivery_frames joined last, and its bytes (holding the run
#: keeps its identity from being another list's).
_last_run: tuple[Any, bytes] = (None, b"")


#: JSON string literals of the short strings every frame repeats (addresses, kinds),
#: by the string; bounded (cleared when full).
_QUOTED: dict[str, str] = {}
_QUOTED_MAX = 65536


def _quoted(text: str) -> str:
    """``text`` as a JSON string literal (as ``_str`` makes it), from a cache."""
    quoted = _QUOTED.get(text)
    if quoted is None:
        if len(_QUOTED) >= _QUOTED_MAX:
            _QUOTED.clear()
        quoted = _QUOTED[text] = _str(text)
    return quoted


#: The last time formatted, and its text: the items of a batch share one ``ts``
#: object (Messaging.send_batch reads the clock once), and the shortest repr of a
#: float is the dearest part of a frame (the float-to-decimal conversion).
_last_ts: tuple[float | None, str] = (None, "")


def _ts_text(ts: float) -> str:
    """``repr(ts)`` (as the JSON encoder writes a finite float), from a one-entry
    cache keyed by the object's identity (the same object: the same text)."""
    global _last_ts
    last, text = _last_ts
    if last is not ts:
        text = float.__repr__(ts)
        _last_ts = (ts, text)
    return text


#: The fields between an item's id and its body that the items of a run share (kind,
#: sender, recipient, time: the same objects, made once per batch), their text, and
#: the time's: a one-entry cache keyed by the objects' identity (see delivery_frame).
_last_fields: tuple[Any, Any, Any, Any, str, str] = (None, None, None, None, "", "")


def _send_result_fields(env: Envelope) -> dict[str, Any]:
    return {"pos": env.pos, "msg_id": env.id, "ts": env.ts}


def send_result(env: Envelope, rid: Any) -> bytes:
    """The length-prefixed ``result`` frame of a ``send`` whose item is ``env``.

    Formatted directly when the fields allow it (the hot path), byte for byte what
    :func:`chatproto.wire.result_frame` makes of the same fields (tested with
    arbitrary envelopes and request ids); else by that generic encoder."""
    tail = env.result_tail  # made with the item's delivery frame, usually
    ts = env.ts
    if tail is not None or (
        type(env.pos) is int and type(ts) is float and isfinite(ts) and type(env.id) is str
    ):
        if tail is None:
            tail = f'"pos":{env.pos},"msg_id":{_str(env.id)},"ts":{_ts_text(ts)}}}'
        if rid is None:
            payload = (_RESULT + tail).encode("utf-8")
        elif type(rid) is int:
            payload = f'{_RESULT}"id":{rid},{tail}'.encode()
        elif type(rid) is str:
            payload = f'{_RESULT}"id":{_str(rid)},{tail}'.encode()
        else:
            payload = wire.result_frame(rid, **_send_result_fields(env))
    else:
        payload = wire.result_frame(rid, **_send_result_fields(env))
    return _pack(len(payload)) + payload


#: A send's request and its request id, from the read's (request, id) pairs: map()
#: with these makes the lists in C, without a comprehension's frame per read.
_first = itemgetter(0)
_second = itemgetter(1)

_RESULT = '{"type":"result",'
#: A JSON string literal, as the wire encoder writes it (not ASCII-only)
_str = json.encoder.encode_basestring  # type: ignore[attr-defined]


@implementer(ISessionMind, IPushProducer)
class ClientProtocol(ReadingRequests, ModerationRequests, Int32StringReceiver):
    """One client connection.  States: ``hello`` -> ``auth`` -> ``ready``."""

    log = Logger()
    factory: ClientFactory
    transport: Any
    #: What the realm's metrics and ``chatrealmctl sessions`` call this protocol.
    protocol_name = "native"

    #: request type -> handler (filled in below the class and for each subclass)
    handlers: dict[str, Any] = {}

    #: Compact ``send`` frames take the fast path (wire.compact_send) only while
    #: ``send`` is this class's own handler: a subclass that overrides it gets every
    #: send through it.
    _compact_sends = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = _handlers(cls)
        cls._compact_sends = cls.handlers.get("send") is ClientProtocol.handle_send

    def __init__(self) -> None:
        self.state = "hello"
        self.session: Session | None = None
        #: Output, with the slow-reader bound (replaced at connectionMade).
        self._out = OutputQueue(None, 0)
        self._held: list[bytes] | None = None
        #: The ``send`` requests of the read being handled, with their request ids
        #: (None: not inside a read; see begin_read).
        self._sends: list[tuple[SendRequest, Any]] | None = None
        #: Sends handed to the realm whose answers are not written yet (commit runs
        #: and sends of the general path), and the error frame of a fatal frame read
        #: meanwhile: the connection closes after them (state "closing", see refuse).
        self._committing = 0
        self._closing_frame = b""
        self._writable: list[Deferred[None]] = []
        self.connected_at = 0.0
        self.closed_at = 0.0
        self.last_rx = 0.0
        self.pinged = False
        #: File transfers on this connection: stream number -> upload id.  A stream in
        #: _stopped_streams failed: its frames still in flight are dropped until
        #: file_resume replaces it.
        self._upload_streams: dict[int, str] = {}
        self._stopped_streams: set[int] = set()
        self._download_sinks: dict[int, DataSink] = {}
        self._downloads_opening = 0
        self._last_stream = 0
        #: Upload bytes accepted and not yet on disk; past UPLOAD_HIGH, stop reading.
        self._upload_pending = 0
        self._reading_paused = False
        #: Requests read and not answered yet (see MAX_IN_FLIGHT); at the bound,
        #: the frames read after them wait in _unprocessed, unread.
        self._in_flight = 0
        self._requests_paused = False

    # connection lifecycle -----------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self.connected_at = self.last_rx = f.clock.seconds()
        self._out = OutputQueue(
            self.transport, f.realm.config.limits.max_output_buffer, self, f.clock
        )
        if not f.opened(self):
            self.state = "closed"  # refused: too many connections wait to log in
            return
        # Small frames until login (see chatproto.admission).
        self.MAX_LENGTH = min(LOGIN_MAX_FRAME, f.realm.config.limits.max_frame)
        self._out.register()

    def authenticated(self) -> None:
        """The connection has logged in: it takes frames up to ``max_frame`` and no
        longer counts among the unauthenticated."""
        self.MAX_LENGTH = self.factory.realm.config.limits.max_frame
        self.factory.authenticated(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state in CLOSED_STATES:
            return  # closing: nothing more is read (or buffered)
        # (begin_read and end_read, inline: under light load a read holds one frame,
        # and their two calls cost more than their tests)
        if self._sends is None:
            self._sends = []
        try:
            self._frames(data)
        finally:
            if self._sends:
                self._flush_sends()
            self._sends = None

    def _frames(self, data: bytes) -> None:
        """Split ``data`` (after what is left of the last read) into frames for
        :meth:`stringReceived`: Int32StringReceiver.dataReceived's loop and its
        ``MAX_LENGTH`` rule (read again for each frame: it grows at login), without
        its per-frame slicing of the length prefix and bookkeeping of the old
        ``recvd`` attribute, which nothing here uses.

        A compact ``send`` frame of a ready session (stringReceived's fast path) is
        matched in place, joining the read's batch without a call of stringReceived
        or a copy of its bytes; the read's time is taken once for them."""
        buf = self._unprocessed + data if self._unprocessed else data
        self._unprocessed = buf  # (what is left if a frame handler raises)
        if self._requests_paused:
            return  # (bytes the transport had read before it paused)
        offset, end = 0, len(buf)
        match = _COMPACT_SEND if self._compact_sends else None
        sends = self._sends
        seen = False  # a frame taken by the fast path: last_rx is now
        while end - offset >= 4:
            (length,) = _unpack_from(buf, offset)
            if length > self.MAX_LENGTH:
                self._unprocessed = buf[offset:]
                self.lengthLimitExceeded(length)
                return
            start = offset + 4
            offset = start + length
            if offset > end:
                offset = start - 4
                break
            if match is not None and sends is not None and self.state == "ready":
                m = match(buf, start, offset)
                if m is not None:
                    # (wire.compact_send_fields, inline: the id at most once, UTF-8;
                    # held to decode() by test_compact_sends_matched_in_the_read_...)
                    first, to, body, nonce, last = m.groups()
                    if first is None or last is None:
                        try:
                            req = (
                                to.decode(),
                                body.decode(),
                                None if nonce is None else nonce.decode(),
                                False,
                                None,
                                None,
                            )
                        except UnicodeDecodeError:
                            req = None
                        if req is not None:
                            if not seen:
                                seen = True
                                self.last_rx = self.factory.clock.seconds()
                                self.pinged = False
                            rid = first if first is not None else last
                            sends.append((req, None if rid is None else int(rid)))
                            continue
            self.stringReceived(buf[start:offset])
            sends = self._sends  # (a new list once the sends so far were handed on)
            if self._bound_requests():
                break
        self._unprocessed = buf[offset:]

    def _bound_requests(self) -> bool:
        """After a frame is handled: with :data:`MAX_IN_FLIGHT` requests in progress,
        stop reading the connection until answers go out (see :meth:`_request_done`),
        and say so: the frames read after it wait, unhandled."""
        if self._in_flight < MAX_IN_FLIGHT or self.state in CLOSED_STATES:
            return False
        self._requests_paused = True
        if not self._reading_paused:
            self.transport.pauseProducing()
        return True

    def begin_read(self) -> None:
        """Frames until :meth:`end_read` come from one read of the connection: their
        ``send`` requests are handled as one batch (one append, one delivery burst,
        one write of their results; see Messaging.send_batch)."""
        if self._sends is None:
            self._sends = []

    def end_read(self) -> None:
        self._flush_sends()
        self._sends = None

    def _flush_sends(self) -> None:
        """Hand the ``send`` requests read so far to the realm, as one batch."""
        sends = self._sends
        if not sends:
            return
        self._sends = []
        session = self.session
        if session is None:  # (logged out while reading: nothing to send as)
            return
        outcomes, commits = session.send_batch(list(map(_first, sends)))
        # The envelopes of the runs in ``commits`` are the Envelope outcomes, in
        # request order: their request ids are taken run by run, in slices.
        appended: list[Any]
        if len(commits) == 1 and len(commits[0].items) == len(sends):  # one run: all of them
            appended = list(map(_second, sends))
        else:
            appended = []
            for (_, rid), out in zip(sends, outcomes, strict=True):
                if type(out) is Envelope:
                    appended.append(rid)
                elif isinstance(out, Deferred):
                    self._committing += 1
                    out.addCallbacks(
                        self._sent, self._errback, callbackArgs=(rid,), errbackArgs=(rid,)
                    ).addBoth(self._answered)
                else:
                    self.refuse(out, rid)
        k = 0
        self._committing += len(commits)
        for run in commits:
            n = len(run.items)
            run.listen(self._sent_run, self._failed_run, appended[k : k + n])
            k += n

    def _sent_run(self, items: list[Envelope], rids: list[Any]) -> None:
        """The results of a committed run, in one write.  An integer request id and
        an item whose result tail its delivery frame made (the common case): that
        frame formatted here, as send_result formats it; else send_result."""
        out: list[bytes] = []
        add = out.append
        for env, rid in zip(items, rids, strict=True):
            tail = env.result_tail
            if tail is not None and type(rid) is int:
                payload = f'{_RESULT}"id":{rid},{tail}'.encode()
                add(_pack(len(payload)))
                add(payload)
            else:
                add(send_result(env, rid))
        self._write(b"".join(out))
        self._answered(None)

    def _failed_run(self, failure: Failure, rids: list[Any]) -> None:
        for rid in rids:
            self._errback(failure, rid)
        self._answered(None)

    def _answered(self, _: object) -> None:
        """The answers of a run (or of one send) are written; a connection closing
        after them closes once they all are."""
        self._committing -= 1
        if self.state == "closing" and not self._committing:
            self.finish_closing()

    def finish_closing(self) -> None:
        """Close a connection that waited for its sends' answers (state "closing"):
        the error frame of the fatal frame, then the close.  The keepalive sweep calls
        it when the answers take longer than ``keepalive_interval``."""
        if self.state == "closing":
            self._close(self._closing_frame)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.state = "closed"
        self._out.drop()
        self._out.close()
        self.factory.closed(self)
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
        for sink in list(self._download_sinks.values()):
            sink.stop()

    # IPushProducer: the transport tells us when the peer stops reading --------------
    # (and we tell the producers of downloads on this connection).  Writing directly
    # (chatproto.flow), the connection is a pull producer whose output queue pauses it,
    # and Twisted calls resumeProducing each time its buffer drains.

    def pauseProducing(self) -> None:
        # Twisted calls this on every write while the transport's buffer is full.
        if self._out.paused:
            return
        self._out.pause()
        for sink in list(self._download_sinks.values()):
            sink.pause()

    def resumeProducing(self) -> None:
        if not self._out.resume():
            return  # what was held refilled the transport: still paused
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)
        for sink in list(self._download_sinks.values()):
            if sink.paused and not self._out.blocked:
                sink.resume()

    @property
    def output_blocked(self) -> bool:
        """Output is held for the peer (it is not reading fast enough)."""
        return self._out.blocked

    def stopProducing(self) -> None:
        self._out.pause()
        for sink in list(self._download_sinks.values()):
            sink.stop()

    # output -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.state == "closed":
            return
        if self._held is not None:  # keep order: held frames go out first
            held, self._held = self._held, None
            data = b"".join(held) + data
        if not self._out.write(data):
            self._slow_reader()

    def _slow_reader(self) -> None:
        """More than ``max_output_buffer`` bytes are held for a peer that does not
        read: forget them and close (the client resumes from its last ack)."""
        self.log.info(
            "dropping slow reader {peer} ({user}): {n} bytes unread",
            peer=self._peer(),
            user=self.session.user_id if self.session else None,
            n=self._out.held,
        )
        self._out.drop()
        self.factory.realm.stats.slow_reader(self.protocol_name)
        limit = self._out.limit
        self.close_with("slow_reader", f"more than {limit} bytes of output were not read")

    def send_frame(self, payload: bytes) -> None:
        self._write(_pack(len(payload)) + payload)

    def _close(self, payload: bytes) -> None:
        """Send the frame ``payload`` after everything written or held, then close."""
        self.state = "closed"
        self.closed_at = self.factory.clock.seconds()
        if self._held is not None:
            held, self._held = self._held, None
            self._out.write(b"".join(held))
        self._out.close(_pack(len(payload)) + payload)
        self._lose_connection()

    def _lose_connection(self) -> None:
        """Close after what is written.  A TLS transport shuts down only once no
        producer is registered, so the connection's own registration goes first (or
        the close would wait for the keepalive sweep to abort it).  Downloads stop:
        nothing would pause them any more."""
        for sink in list(self._download_sinks.values()):
            sink.stop()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # keepalive (called by ClientFactory.sweep) ---------------------------------------

    def login_timed_out(self) -> None:
        self.close_with("timeout", "did not log in in time")

    def keepalive_expired(self) -> None:
        self.factory.log.info(
            "reaping silent connection of {user}",
            user=self.session and self.session.user_id,
        )
        self.close_with("timeout", "no answer to keepalive pings")

    def send_ping(self) -> None:
        self.send_frame(_PING)

    def send_error(self, err: ChatError, rid: Any = None) -> None:
        self.send_frame(wire.error_frame(err.code, err.message, rid, **err.extra))

    def close_with(self, code: str, message: str) -> None:
        if self.state == "closed":
            return
        self._close(wire.error_frame(code, message))

    # ISessionMind -------------------------------------------------------------------

    def deliver(self, envelope: Envelope) -> None:
        frame = envelope.frame or delivery_frame(envelope)
        if self._held is not None:
            self._held.append(frame)
        elif self._out.blocked or self.state == "closed":
            self._write(frame)  # held, with the slow-reader bound
        elif self.factory.realm.bursting:
            # Hold this burst's frames and write them in one go when it ends.
            self._held = [frame]
            self.factory.realm.hold(self)
        else:
            self._out.put(frame)

    def deliver_run(self, envelopes: Sequence[Envelope]) -> None:
        """Several committed items in order (Sessions.route_private): what
        :meth:`deliver` does with each, as one piece of bytes.  (Its code, inline
        here and there: both are the delivery hot path.)"""
        data = delivery_frames(envelopes)
        if self._held is not None:
            self._held.append(data)
        elif self._out.blocked or self.state == "closed":
            self._write(data)  # held, with the slow-reader bound
        elif self.factory.realm.bursting:
            self._held = [data]
            self.factory.realm.hold(self)
        else:
            self._out.put(data)

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
        if not self._out.blocked or self.state == "closed":
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._writable.append(d)
        return d

    def disconnect(self, code: str, message: str) -> None:
        self.close_with(code, message)

    # input --------------------------------------------------------------------------

    def lengthLimitExceeded(self, length: int) -> None:
        # (a fatal frame as bad_frame is: the sends read before it are answered first)
        before = "" if self.session is not None else " before login"
        self.refuse(
            FatalProtocolError(
                "too_large", f"frame of {length} bytes; the limit{before} is {self.MAX_LENGTH}"
            )
        )

    def stringReceived(self, payload: bytes) -> None:
        if self.state in CLOSED_STATES:
            return
        self.last_rx = self.factory.clock.seconds()
        self.pinged = False
        if payload[:1] == b"\x00":
            self._data_frame(payload)
            return
        if payload.startswith(_ACK_PREFIX) and self.session is not None:
            # Fast path for the most frequent frame, exactly as the client library and
            # PROTOCOL.md spell it; anything else takes the general path below.
            # (no leading zero: 007 is not JSON, and the general path refuses it)
            digits = payload[len(_ACK_PREFIX) : -1]
            if (
                payload[-1:] == b"}"
                and digits.isdigit()
                and len(digits) <= 15
                and (digits[:1] != b"0" or len(digits) == 1)
            ):
                self.session.ack(int(digits))
                return
        sends = self._sends
        if (
            sends is not None
            and self.state == "ready"
            and self._compact_sends
            and payload.startswith(_SEND_PREFIX)
        ):
            # Fast path for the most frequent request, as clients spell it (see
            # wire.compact_send); anything else takes the general path below.
            fields = wire.compact_send(payload)
            if fields is not None:
                rid, to, body, nonce = fields
                sends.append(((to, body, nonce, False, None, None), rid))
                return
        rid = None
        try:
            obj = wire.decode(payload)
            rid = obj.get("id")
            if type(rid) is int and not -wire.MAX_INT <= rid <= wire.MAX_INT:
                rid = None  # not echoed: the answer has no id
                raise ChatError("bad_request", "'id' is out of range (|n| <= 2**53 - 1)")
            kind = obj["type"]
            handler = self.handlers.get(kind)
            if handler is None:
                raise ChatError("unknown_type", f"unknown request type {kind[:40]!r}")
            if self.state == "hello" and kind != "hello":
                raise ChatError("hello_required")
            if kind not in _PUBLIC and self.state != "ready":
                raise ChatError("not_authenticated")
            if handler is _HANDLE_SEND:
                # The hot path: sends read together are handled as one batch (see
                # begin_read); the result frames are formatted straight from the
                # committed envelopes (see send_result).
                req = self._send_request(obj)
                if self._sends is None:  # not inside a read (a direct call): alone
                    self._sends = [(req, rid)]
                    self.end_read()
                else:
                    self._sends.append((req, rid))
                return
            if self._sends:  # what was sent before this request goes first
                self._flush_sends()
            d = maybeDeferred(handler, self, obj)
        except ChatError as e:
            self.refuse(e, rid)
            return
        except Exception:
            self._crash(Failure(), rid)
            return
        if kind in _SILENT:
            d.addCallbacks(lambda _: None, self._errback, errbackArgs=(rid,))
        else:
            d.addCallbacks(self._reply, self._errback, callbackArgs=(rid,), errbackArgs=(rid,))
        if not d.called:
            self._in_flight += 1
            d.addBoth(self._request_done)

    def _request_done(self, _: object) -> None:
        """A request's answer is written: below :data:`MAX_IN_FLIGHT` again, a
        connection that stopped reading for it reads on, first the frames it had
        read already."""
        self._in_flight -= 1
        if not self._requests_paused or self._in_flight >= MAX_IN_FLIGHT:
            return
        self._requests_paused = False
        if self.state in CLOSED_STATES:
            return
        if not self._reading_paused:
            self.transport.resumeProducing()
        self.dataReceived(b"")

    def _reply(self, result: dict[str, Any] | None, rid: Any) -> None:
        self.send_frame(wire.result_frame(rid, **(result or {})))

    def _sent(self, env: Envelope, rid: Any) -> None:
        self._write(send_result(env, rid))

    def _errback(self, failure: Failure, rid: Any) -> None:
        if failure.check(ChatError):
            self.refuse(failure.value, rid)  # type: ignore[arg-type]
        else:
            self._crash(failure, rid)

    def refuse(self, err: ChatError, rid: Any = None) -> None:
        """Answer request ``rid`` (None: no request) with ``err``: an error frame, and
        for a :class:`FatalProtocolError` the connection closed after it (logged).
        Gateways that carry this protocol in other framing (the WebSocket gateway)
        refuse what their framing brings that the protocol does not allow here."""
        if not isinstance(err, FatalProtocolError):
            self.send_error(err, rid)
            return
        if self.state in CLOSED_STATES:
            return
        self.log.info(
            "closing {peer}: {code} {message}",
            peer=self._peer(),
            code=err.code,
            message=err.message,
        )
        payload = wire.error_frame(err.code, err.message, rid, **err.extra)
        # The sends read before this frame are handed to the realm now, and their
        # answers go out before the error: the close waits for their commits (at most
        # keepalive_interval, see ClientFactory.sweep).  Nothing more is read.
        if self._sends:
            self._flush_sends()
        if self._committing and self.state != "closed":
            self.state = "closing"
            self.closed_at = self.factory.clock.seconds()
            self._closing_frame = payload
            return
        self._close(payload)

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
        features = ["resume", "multi-device", "files"]
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
                **announced_limits(realm.config.files),
            },
            "features": features,
        }

    def handle_register(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        password = wire.field(req, "password", str)
        d = self.factory.realm.register(user, password, self._peer())
        return d.addCallback(lambda addr: {"user": str(addr)})

    def handle_login(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.state != "auth":
            raise ChatError("already_authenticated")
        user = wire.field(req, "user", str)
        password = wire.field(req, "password", str)
        device = wire.field(req, "device", str, required=False, default="default")
        since = wire.integer(req, "since", required=False)
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
            self.authenticated()
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
        # stringReceived calls _send and _sent directly; this is the same request for
        # callers that go through the handler table.
        return self._send(req).addCallback(_send_result_fields)

    def _send(self, req: dict[str, Any]) -> Deferred[Envelope]:
        assert self.session is not None
        return self.factory.realm.send_private(self.session, *self._send_request(req))

    def _send_request(self, req: dict[str, Any]) -> SendRequest:
        """The ``(to, body, nonce, notice, reply_to, tags)`` of a ``send`` request, its
        fields checked."""
        # The common case (strings present) checked inline; anything else goes through
        # wire.field for its checks and error messages.
        to = req.get("to")
        if type(to) is not str:
            to = wire.field(req, "to", str)
        body = req.get("body")
        if type(body) is not str:
            body = wire.field(req, "body", str)
        nonce = req.get("nonce")
        if nonce is not None:
            nonce = wire.field(req, "nonce", str)
            if not 0 < len(nonce) <= 64:
                raise ChatError("bad_request", "nonce must be 1-64 characters")
        notice = False
        reply_to = tags = None
        if "reply_to" in req or "notice" in req or "tags" in req:
            notice = wire.field(req, "notice", bool, required=False, default=False)
            reply_to = wire.field(req, "reply_to", str, required=False)
            tags = wire.field(req, "tags", dict, required=False)
        return to, body, nonce, notice, reply_to, tags

    def handle_tags(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Client tags on their own (typing...): pushed, not stored."""
        assert self.session is not None
        to = wire.field(req, "to", str)
        d = self.session.send_tags(to, wire.field(req, "tags", dict))
        return d.addCallback(lambda data: {"tags_id": data["id"], "ts": data["ts"]})

    def handle_history(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        peer = wire.field(req, "with", str)
        before = wire.integer(req, "before", required=False)
        after = wire.integer(req, "after", required=False)
        limit = wire.integer(req, "limit", 1, required=False)
        if before is not None and after is not None:
            raise ChatError("bad_request", "give before or after, not both")
        d = self.session.history(peer, before, after, limit)
        return d.addCallback(lambda items: {"messages": [e.to_wire() for e in items]})

    # replies, reactions, edits, deletes (chatproto.realm.relations decides) ---------

    def handle_react(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        remove = wire.field(req, "remove", bool, required=False, default=False)
        d = self.factory.realm.relations.react(
            self.session, wire.field(req, "msg_id", str), wire.field(req, "emoji", str), remove
        )
        return d.addCallback(_send_result_fields)

    def handle_edit(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        d = self.factory.realm.relations.edit(
            self.session, wire.field(req, "msg_id", str), wire.field(req, "body", str)
        )
        return d.addCallback(_send_result_fields)

    def handle_delete(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        d = self.factory.realm.relations.delete(self.session, wire.field(req, "msg_id", str))
        return d.addCallback(_send_result_fields)

    def handle_who(self, req: dict[str, Any]) -> Any:
        assert self.session is not None
        group = wire.field(req, "group", str, required=False)
        user = wire.field(req, "user", str, required=False)
        if user is None:
            return {"users": self.session.who(group)}
        return self.session.who(group, user).addCallback(lambda users: {"users": users})

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
        key = wire.field(req, "key", str, required=False)
        return self._event("joined", req, **({"key": key} if key is not None else {}))

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

    def handle_set_group(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Change group settings: any of visibility, moderated, secret, topic_lock,
        limit, key, external (the realm checks them; see PROTOCOL.md)."""
        kinds = {"visibility": str, "moderated": bool, "secret": bool, "topic_lock": bool}
        kinds.update(limit=int, key=str, external=bool)
        args = {name: wire.field(req, name, kind, required=False) for name, kind in kinds.items()}
        return self._event("settings", req, **{k: v for k, v in args.items() if v is not None})

    def handle_set_voice(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        return self._event("voice", req, user=user, voice=wire.field(req, "voice", bool))

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
        self.session.ack(wire.integer(req, "pos"))

    # files ------------------------------------------------------------------------
    # The realm's file service decides; these translate requests and data frames.

    def _new_stream(self) -> int:
        self._last_stream = (self._last_stream + 1) % 2**32 or 1
        return self._last_stream

    def _upload_opened(self, up: Upload) -> dict[str, Any]:
        # Resumed: the old stream is closed (its later frames get no_such_upload), so
        # resuming over and over holds one stream per upload, not one per resume.
        self._upload_closed(up.upload_id)
        stream = self._new_stream()
        self._upload_streams[stream] = up.upload_id
        return {
            **up.to_wire(),
            "stream": stream,
            "chunk": self.factory.realm.config.files.chunk_size,
        }

    def _upload_closed(self, upload_id: str) -> None:
        for stream in [s for s, u in self._upload_streams.items() if u == upload_id]:
            del self._upload_streams[stream]
            self._stopped_streams.discard(stream)

    def handle_file_offer(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        d = self.factory.realm.files.offer(
            self.session.user_id,
            wire.field(req, "to", str),
            wire.field(req, "name", str),
            wire.integer(req, "size"),
            wire.field(req, "sha256", str),
            wire.field(req, "media_type", str, required=False),
        )
        return d.addCallback(self._upload_opened)

    def handle_file_resume(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        upload_id = wire.field(req, "upload", str)
        posted = self.factory.realm.files.posted(self.session.user_id, upload_id)
        if posted is not None:  # finished already: its result, no stream
            return succeed({"upload": upload_id, "finished": True, **finish_result(*posted)})
        d = self.factory.realm.files.status(self.session.user_id, upload_id)
        return d.addCallback(self._upload_opened)

    def handle_file_finish(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        upload_id = wire.field(req, "upload", str)
        d = self.factory.realm.files.finish(self.session.user_id, upload_id)

        def done(result: Any) -> dict[str, Any]:
            self._upload_closed(upload_id)
            return finish_result(*result)

        return d.addCallback(done)

    def handle_file_cancel(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        upload_id = wire.field(req, "upload", str)
        d = self.factory.realm.files.cancel(self.session.user_id, upload_id)

        def cancelled(_: object) -> dict[str, Any]:
            self._upload_closed(upload_id)
            return {}

        return d.addCallback(cancelled)

    def _data_frame(self, payload: bytes) -> None:
        if self.session is None:
            self.refuse(
                FatalProtocolError("bad_frame", "data frames need a logged-in session"), None
            )
            return
        try:
            op, stream, offset, data = wire.decode_data(payload)
            if op != wire.OP_UPLOAD:
                raise FatalProtocolError("bad_frame", "clients send upload data frames only")
            chunk = self.factory.realm.config.files.chunk_size
            if len(data) > chunk:
                raise FatalProtocolError(
                    "bad_frame", f"a data frame carries at most {chunk} bytes (file_chunk)"
                )
        except ChatError as e:
            self.refuse(e, None)
            return
        if stream not in self._upload_streams:
            self.send_error(
                ChatError("no_such_upload", f"no upload stream {stream}", stream=stream)
            )
            return
        if stream in self._stopped_streams:
            return  # the stream failed; the client resumes on a new one
        upload_id = self._upload_streams[stream]
        d = self.factory.realm.files.write(self.session.user_id, upload_id, offset, data)
        self._upload_pending += len(data)
        if self._upload_pending > UPLOAD_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        d.addBoth(self._upload_written, stream, upload_id, len(data))

    def _upload_written(self, result: Any, stream: int, upload_id: str, n: int) -> None:
        self._upload_pending -= n
        if self._reading_paused and self._upload_pending <= UPLOAD_LOW:
            self._reading_paused = False
            if self.state != "closed" and not self._requests_paused:
                self.transport.resumeProducing()
        if not isinstance(result, Failure):
            return
        if self._upload_streams.get(stream) == upload_id and stream not in self._stopped_streams:
            self._stopped_streams.add(stream)
            err = result.value if isinstance(result.value, ChatError) else None
            if err is None:
                self.log.failure("upload {id} failed", result, id=upload_id)
                err = ChatError("internal_error")
            extra = {**err.extra, "stream": stream, "upload": upload_id}
            self.send_frame(wire.error_frame(err.code, err.message, None, **extra))

    def handle_download(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        assert self.session is not None
        file_id = wire.field(req, "file", str)
        offset = wire.integer(req, "offset", required=False, default=0)
        length = wire.integer(req, "length", required=False)
        if len(self._download_sinks) + self._downloads_opening >= MAX_DOWNLOADS:
            raise ChatError(
                "limit_reached",
                f"at most {MAX_DOWNLOADS} downloads in progress on one connection",
            )
        self._downloads_opening += 1
        d = self.factory.realm.files.open_download(self.session.user_id, file_id, offset, length)

        def settled(result: Any) -> Any:
            self._downloads_opening -= 1
            return result

        d.addBoth(settled)

        def opened(dl: Download) -> dict[str, Any]:
            stream = self._new_stream()
            chunk = self.factory.realm.config.files.chunk_size
            sink = DataSink(self._write, wire.OP_DOWNLOAD, stream, dl.offset, chunk)
            sink.paused = self._out.blocked
            self._download_sinks[stream] = sink
            # The result goes out first, then the data frames.
            self.factory.clock.callLater(0, self._start_download, dl, sink)
            return {**dl.info.to_wire(), "offset": dl.offset, "length": dl.length, "stream": stream}

        return d.addCallback(opened)

    def _start_download(self, dl: Download, sink: DataSink) -> None:
        """Stream the download's data frames, unless it was cancelled or the
        connection is closed or closing (waiting for its sends' answers before a
        fatal error: nothing but those answers and the error goes out any more).  A
        download whose file is deleted (before or while it streams) ends with the
        ``no_such_file`` the realm's files fail it with (see ``Download``)."""
        if self._download_sinks.get(sink.stream) is not sink:
            dl.close()
            return
        if self.state in CLOSED_STATES:
            del self._download_sinks[sink.stream]  # (nothing was opened for it yet)
            dl.close()
            return

        def done(result: Any) -> None:
            self._download_sinks.pop(sink.stream, None)
            if not isinstance(result, Failure) or self.state == "closed":
                return
            if result.check(ConnectionDone):  # a download_cancel
                return
            if result.check(ChatError):  # its file was deleted
                err = result.value
                assert isinstance(err, ChatError)
                self.send_frame(wire.error_frame(err.code, err.message, None, stream=sink.stream))
                return
            self.log.failure("download of {file} failed", result, file=dl.info.file_id)
            self.send_frame(
                wire.error_frame("internal_error", "the download failed", None, stream=sink.stream)
            )

        dl.start(sink).addBoth(done)

    def handle_download_cancel(self, req: dict[str, Any]) -> dict[str, Any]:
        stream = wire.integer(req, "stream", 1, 2**32 - 1)
        sink = self._download_sinks.pop(stream, None)
        if sink is not None:
            sink.stop()
        return {}

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
_HANDLE_SEND = ClientProtocol.handle_send
_PING = wire.encode({"type": "ping"})


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
        self.connections: set[Any] = set()
        #: connection -> its place among the realm's unauthenticated connections
        self._tickets: dict[Any, Ticket] = {}
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock

    def startFactory(self) -> None:
        lim = self.realm.config.limits
        interval = max(0.5, min(lim.login_timeout, lim.keepalive_interval) / 4)
        self._sweeper.start(interval, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    # the connections' bookkeeping (this protocol's and the gateways')

    def opened(self, proto: Any) -> bool:
        """A connection ``proto`` opened: counted among the realm's unauthenticated
        connections (``realm.unauthenticated``) and swept, or, past a bound, aborted
        at once (False: the protocol does nothing more)."""
        peer = proto.transport.getPeer() if proto.transport is not None else None
        ticket = self.realm.unauthenticated.admit(getattr(peer, "host", str(peer)))
        if ticket is None:
            proto.transport.abortConnection()
            return False
        self._tickets[proto] = ticket
        self.connections.add(proto)
        return True

    def authenticated(self, proto: Any) -> None:
        """``proto`` logged in: it no longer counts among the unauthenticated."""
        ticket = self._tickets.pop(proto, None)
        if ticket is not None:
            ticket.release()

    def closed(self, proto: Any) -> None:
        """``proto``'s connection is gone (``connectionLost``)."""
        self.connections.discard(proto)
        self.authenticated(proto)

    def sweep(self) -> None:
        """One pass of the keepalive timer.  Protocols (this one, and gateways such as
        IRC that subclass the factory) keep ``state``, ``connected_at``, ``last_rx``,
        ``pinged`` and ``closed_at`` and say in their own words what happens:
        ``login_timed_out()``, ``keepalive_expired()`` and ``send_ping()``."""
        now = self.clock.seconds()
        lim = self.realm.config.limits
        for proto in list(self.connections):
            if proto.state == "closing":
                # Waiting for the answers of the sends read before a fatal frame.
                if now - proto.closed_at >= lim.keepalive_interval:
                    proto.finish_closing()
                continue
            if proto.state == "closed":
                # Closed politely on an earlier sweep but the peer never took the
                # close (half-open, or not reading): abort it now.
                if now - proto.closed_at >= lim.keepalive_interval:
                    proto.transport.abortConnection()
                continue
            if proto.state != "ready":
                if now - proto.connected_at >= lim.login_timeout:
                    proto.login_timed_out()
                continue
            idle = now - proto.last_rx
            if idle >= 2 * lim.keepalive_interval:
                proto.keepalive_expired()
            elif idle >= lim.keepalive_interval and not proto.pinged:
                proto.pinged = True
                proto.send_ping()
