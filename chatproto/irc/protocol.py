"""One IRC client connection: :class:`IRCProtocol`.

A translator like :class:`chatproto.protocol.ClientProtocol`: it parses IRC lines,
dispatches each command to its handler (``chatproto.irc.commands``), and turns
:class:`chatproto.errors.ChatError` into numerics.  It decides nothing: every rule
(who may send, join, kick, set a topic) lives in the realm.

It is also the session's *mind*: it renders what the realm delivers (messages, group
events, presence) and acknowledges what it has written.  Registration (CAP, SASL,
PASS/NICK/USER, the welcome burst) and the connection-level commands (PING, QUIT,
AWAY, MOTD, LUSERS) are here; the realm commands are in ``chatproto.irc.messages``,
``chatproto.irc.channels`` and ``chatproto.irc.users``.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import address
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.flow import BURST_WRITE, OutputQueue
from chatproto.irc import channels as _channels  # noqa: F401  (registers its commands)
from chatproto.irc import messages as _messages  # noqa: F401
from chatproto.irc import modes as _modes  # noqa: F401
from chatproto.irc import relations as _relations
from chatproto.irc import users as _users  # noqa: F401
from chatproto.irc.commands import COMMANDS, MIN_PARAMS, PRE_REGISTRATION, command
from chatproto.irc.identity import Identity, clean_username
from chatproto.irc.lines import (
    MAX_CLIENT_TAGS,
    MAX_LINE,
    MAX_TAGS,
    IRCBadLine,
    channel_of,
    decimal,
    format_line,
    group_of,
    nick_of,
    param,
    parse_line,
    plain_text,
    prefix,
    server_time,
    split_utf8,
    user_of,
)
from chatproto.irc.modes import settings_modes
from chatproto.irc.replies import ERROR_NUMERICS, Direct, PendingSend, Reply
from chatproto.ratelimit import TokenBucket
from chatproto.realm import MAX_STATUS_TEXT, ISessionMind, Notice, RealmService, Session
from chatproto.realm.messaging import SendRequest

if TYPE_CHECKING:
    from chatproto.irc.factory import IRCFactory

__all__ = ["ACK_DELAY", "CAPABILITIES", "DEVICE", "MAX_QUEUED", "IRCProtocol"]

#: The realm device every IRC connection of an account logs in as (its ack position is
#: where the next IRC login resumes).
DEVICE = "irc"
#: IRCv3 capabilities offered in CAP LS (``sasl`` gets its mechanism list with 302).
CAPABILITIES = (
    "away-notify",
    "batch",
    "draft/chathistory",
    "draft/message-redaction",
    "echo-message",
    "labeled-response",
    "message-tags",
    "multi-prefix",
    "sasl",
    "server-time",
    "userhost-in-names",
)
#: Seconds between writing an item and acknowledging it to the realm.
ACK_DELAY = 1.0
#: Lines held back by the flood limit before the connection is closed (Excess Flood).
MAX_QUEUED = 256
#: Base64 chunk size of AUTHENTICATE.
SASL_CHUNK = 400
#: Commands that change a group's state: the lines after one are handled once it
#: completes (they may depend on it); other commands run at once and only their
#: replies keep the order (many PRIVMSGs in flight do not wait for each other).
BARRIERS = frozenset({"JOIN", "PART", "TOPIC", "INVITE", "KICK", "MODE"})


#: Commands whose sends are batched per read (see IRCProtocol.queue_send).
_BATCHED = frozenset({"PRIVMSG", "NOTICE"})


def _fire_each(envs: list[Envelope], waiters: list[Deferred[Envelope]]) -> None:
    for env, d in zip(envs, waiters, strict=True):
        d.callback(env)


def _fail_each(failure: Failure, waiters: list[Deferred[Envelope]]) -> None:
    for d in waiters:
        d.errback(failure)


@implementer(ISessionMind, IPushProducer)
class IRCProtocol(LineOnlyReceiver):
    """One IRC client connection.  States: ``registering`` -> ``ready`` -> ``closed``."""

    log = Logger()
    factory: IRCFactory
    transport: Any
    delimiter = b"\n"
    MAX_LENGTH = MAX_TAGS + MAX_LINE
    #: What the realm's metrics and ``chatrealmctl sessions`` call this protocol.
    protocol_name = "irc"

    def __init__(self) -> None:
        self.state = "registering"
        self.session: Session | None = None
        self.user_id = ""
        self.nick = "*"
        self.username = ""
        self.realname = ""
        self.password: str | None = None
        self.caps: set[str] = set()
        self.cap_negotiating = False
        self.logging_in = False
        self.sasl: str | None = None  # mechanism in progress
        self.sasl_buffer = ""
        self.joined: set[str] = set()  # group addresses the client was told it is in
        self.connected_at = 0.0
        self.closed_at = 0.0
        self.last_rx = 0.0
        self.pinged = False
        self.direct = Direct(self, None)
        #: how this connection's user is shown (set at registration)
        self.identity: Identity | None = None
        #: replies of pending commands (and of those after them), oldest first
        self.replies: deque[Reply] = deque()
        #: a group change (JOIN, PART, MODE...) is pending: later lines wait for it,
        #: since they may depend on it (JOIN then PRIVMSG to the channel)
        self._barrier = False
        self._after_barrier: deque[bytes] = deque()
        #: the sends of the read being handled (see queue_send); None outside a read
        self._sends: list[tuple[SendRequest, Deferred[Envelope]]] | None = None
        self._tagmode = 0  # bit 1: server-time, bit 2: message-tags (msgid)
        self.pending_sends: deque[PendingSend] = deque()  # sends awaiting their echo
        self._targets: dict[str, str] = {}  # IRC target -> canonical address
        self.awaiting: dict[tuple[str, str], Reply] = {}  # (event, group) -> labeled reply
        #: Output, with the slow-reader bound (replaced at connectionMade).
        self._out = OutputQueue(None, 0)
        self._held: list[bytes] | None = None
        self._held_size = 0  # bytes in _held
        self._writable: list[Deferred[None]] = []
        self._ack_call: Any = None
        self._bucket: TokenBucket | None = None
        self._queue: deque[bytes] = deque()
        self._drain_call: Any = None

    # connection lifecycle ---------------------------------------------------------

    @property
    def server(self) -> str:
        return self.factory.server_name

    @property
    def realm(self) -> RealmService:
        return self.factory.realm

    def connectionMade(self) -> None:
        f = self.factory
        self.connected_at = self.last_rx = f.clock.seconds()
        self._out = OutputQueue(self.transport, f.realm.config.limits.max_output_buffer)
        if not f.opened(self):
            self.state = "closed"  # refused: too many connections wait to log in
            return
        cfg = f.realm.config.irc
        if cfg.flood_rate > 0:
            self._bucket = TokenBucket(cfg.flood_rate, cfg.flood_burst, self.connected_at)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.state = "closed"
        self._out.drop()
        self._out.close()
        self.factory.closed(self)
        for call in (self._ack_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self._ack_call = self._drain_call = None
        self._queue.clear()
        self._after_barrier.clear()
        if self.identity is not None:
            self.factory.directory.left(self.user_id, self, self.factory.clock.seconds())
        if self.session is not None:
            self.log.info(
                "IRC session of {user} from {peer} ended: {reason}",
                user=self.session.user_id,
                peer=self.peer(),
                reason=reason.getErrorMessage() if reason is not None else "closed",
            )
            self.session.logout()
            self.session = None
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)

    def peer(self) -> str:
        peer = self.transport.getPeer() if self.transport else None
        return getattr(peer, "host", str(peer))

    def has(self, cap: str) -> bool:
        return cap in self.caps

    def nick_for(self, user: str) -> str:
        """The nick of a canonical user address (as its IRC user typed it)."""
        return self.factory.directory.nick(user)

    def mask(self, user: str) -> str:
        """``nick!username@host`` for a canonical user address."""
        return self.factory.directory.mask(user)

    # IPushProducer ------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._out.pause()  # Twisted calls this on every write while the buffer is full

    def resumeProducing(self) -> None:
        if not self._out.resume():
            return  # what was held refilled the transport: still paused
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self._out.pause()

    # output -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state == "closed":
            return
        if self._held is not None:  # keep order: held lines go out first
            held, self._held = self._held, None
            data = b"".join(held) + data
        if not self._out.write(data):
            # A reader this far behind is dropped (it gets the backlog on its next
            # login); the classic IRC words for it.
            self.log.info(
                "dropping slow IRC reader {peer}: {n} bytes unread",
                peer=self.peer(),
                n=self._out.held,
            )
            self._out.drop()
            self.realm.stats.slow_reader(self.protocol_name)
            self.close_with("SendQ exceeded")

    def send_line(self, source: str | None, command: str, *params: str) -> None:
        self.write(format_line(source, command, *params))

    # keepalive (called by the factory's sweep, shared with the native protocol) -------

    def login_timed_out(self) -> None:
        self.close_with("Registration timed out")

    def keepalive_expired(self) -> None:
        self.close_with("Ping timeout")

    def send_ping(self) -> None:
        self.write(f"PING :{self.factory.server_name}\r\n".encode())

    def close_with(self, message: str) -> None:
        """``ERROR :message``, then close (the IRC way of ending a connection)."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.closed_at = self.factory.clock.seconds()
        if self._held is not None:
            held, self._held = self._held, None
            self._out.write(b"".join(held))
        self._out.close(format_line(None, "ERROR", message))
        # A TLS transport shuts down only once no producer is registered.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # ISessionMind -------------------------------------------------------------------

    def deliver(self, envelope: Envelope) -> None:
        """The realm hands over one committed item: render and write (or hold) it.

        The hot path of fan-out: a text item from someone else, whose line the factory
        has already encoded for the previous receiver; written in one go per burst."""
        if envelope.kind != "text" or envelope.sender == self.user_id:
            self._deliver_other(envelope)
            return
        f = self.factory
        data = f._cache[self._tagmode] if envelope is f._cache_env else None
        if data is None:
            data = f.lines(envelope, self._tagmode)
        held = self._held
        if held is not None:
            held.append(data)
            self._held_size += len(data)
            if self._held_size > BURST_WRITE:
                self.flush()
        elif self._out.blocked or self.state == "closed":
            self.write(data)
        elif f.realm.bursting:
            self._held = [data]
            self._held_size = len(data)
            f.realm.hold(self)
        else:
            self.transport.write(data)
        if self._ack_call is None:
            self.written()

    def _deliver_other(self, envelope: Envelope) -> None:
        """Events, other kinds, and our own messages (echo-message)."""
        if envelope.kind == "event":
            self._deliver_event(envelope)
            return
        if envelope.kind in ("reaction", "delete"):  # TAGMSG, REDACT, or nothing
            data = _relations.render(self, envelope)
            if data is not None:
                if data:
                    self.write(data)
                self.written()
                return
        if envelope.sender == self.user_id:
            pending = self.pending_sends
            if pending:
                head = pending[0]
                if head.to == envelope.recipient and head.body == envelope.body:
                    pending.popleft()
                    head.matched = True
                    lines = self.factory.lines(envelope, self._tagmode)
                    if envelope.recipient == self.user_id:  # to ourselves: received too
                        self.write(lines)
                    if "echo-message" in self.caps:
                        head.ctx.send(lines)
                    self.written()
                    return
            if "echo-message" not in self.caps and envelope.recipient != self.user_id:
                self.written()  # our own message from elsewhere: the client cannot show it
                return
        self.write(self.factory.lines(envelope, self._tagmode))
        self.written()

    def written(self) -> None:
        """Acknowledge what was written, a little later (one ack per ACK_DELAY)."""
        if self._ack_call is None and self.session is not None and self.state != "closed":
            self._ack_call = self.factory.clock.callLater(ACK_DELAY, self._ack)

    def _ack(self) -> None:
        self._ack_call = None
        if self.session is None or self.session.closed:
            return
        if self._out.blocked:  # still queued on our side: acknowledge once the client reads
            self.written()
            return
        self.session.ack(self.session._last)

    def flush(self) -> None:
        """Write the lines held during a delivery burst."""
        held, self._held = self._held, None
        if held:
            self.write(b"".join(held))

    def notify(self, notice: Notice) -> None:
        data = notice.data
        kind = data.get("type")
        if kind == "tags":  # client tags on their own: TAGMSG, to message-tags clients
            me = self.user_id
            if self._tagmode & 2 and (
                data["from"] != me or data["to"] == me or "echo-message" in self.caps
            ):
                self.write(self.factory.tag_line(data, self._tagmode))
            return
        if kind != "presence" or "away-notify" not in self.caps:
            return
        user = data.get("user", "")
        if user == self.user_id:
            return
        status = data.get("status")
        if status in ("away", "busy"):
            self.send_line(self.mask(user), "AWAY", data.get("text") or status)
        elif status == "online":
            self.write(f":{self.mask(user)} AWAY\r\n".encode())

    def synced(self, pos: int) -> None:
        self.written()

    def wait_writable(self) -> Deferred[None]:
        if not self._out.blocked or self.state == "closed":
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._writable.append(d)
        return d

    def disconnect(self, code: str, message: str) -> None:
        self.close_with(message)

    # events ---------------------------------------------------------------------------

    def _deliver_event(self, env: Envelope) -> None:
        meta = env.meta or {}
        event = meta.get("event", "")
        group = env.recipient
        chan = channel_of(group, self.realm.realm)
        actor = self.mask(env.sender)
        user = meta.get("user", "")
        me = self.user_id
        ctx: Reply = self.direct
        if env.sender == me:
            ctx = self.awaiting.pop((event, group), self.direct)
        prefix = b""
        if self._tagmode & 1:
            prefix = f"@time={server_time(env.ts)} ".encode()

        def out(source: str, command: str, *params: str) -> None:
            ctx.send(prefix + format_line(source, command, *params))

        if event in ("created", "joined"):
            who = env.sender if event == "created" else user
            if who == me:
                if group not in self.joined:
                    self.joined.add(group)
                    out(actor, "JOIN", chan)
                    self.channel_burst(ctx, group, chan)
            else:
                out(self.mask(who), "JOIN", chan)
        elif event == "left":
            self._gone(user, group)
            out(self.mask(user), "PART", chan, "left")
        elif event == "kicked":
            self._gone(user, group)
            out(
                actor, "KICK", chan, nick_of(user, self.realm.realm), meta.get("reason") or "kicked"
            )
        elif event == "banned":
            nick = nick_of(user, self.realm.realm)
            out(actor, "MODE", chan, "+b", f"{nick}!*@*")
            if (user == me and group in self.joined) or user != me:
                self._gone(user, group)
                out(actor, "KICK", chan, nick, meta.get("reason") or "banned")
        elif event == "unbanned":
            out(actor, "MODE", chan, "-b", f"{nick_of(user, self.realm.realm)}!*@*")
        elif event == "invited":
            if user == me:
                out(actor, "INVITE", nick_of(me, self.realm.realm), chan)
        elif event == "topic":
            out(actor, "TOPIC", chan, meta.get("topic", ""))
        elif event == "role":  # owners and admins are both channel operators (@)
            change = "-o" if meta.get("role") == "member" else "+o"
            out(actor, "MODE", chan, change, self.nick_for(user))
        elif event == "voice":
            out(actor, "MODE", chan, "+v" if meta.get("voice") else "-v", self.nick_for(user))
        elif event == "settings":
            modes = settings_modes(meta)
            if modes:
                out(actor, "MODE", chan, *modes)
        elif event == "deleted":
            if group in self.joined:
                self.joined.discard(group)
                out(actor, "KICK", chan, self.nick, "the channel was deleted")
        self.written()

    def _gone(self, user: str, group: str) -> None:
        if user == self.user_id:
            self.joined.discard(group)

    def channel_burst(self, ctx: Reply, group: str, chan: str) -> None:
        """Topic and names of a channel the client has just joined."""
        g = self.realm.groups.groups.get(group)
        if g is None:
            return
        if g.topic:
            ctx.num("332", chan, g.topic)
        self.names(ctx, group, chan)

    def names(self, ctx: Reply, group: str, chan: str) -> None:
        g = self.realm.groups.groups.get(group)
        member = g is not None and self.user_id in g.members
        if g is not None and (member or (g.visibility == "public" and not g.secret)):
            multi = "multi-prefix" in self.caps
            full = "userhost-in-names" in self.caps
            names = [
                prefix(m.role, m.voice, multi) + (self.mask(u) if full else self.nick_for(u))
                for u, m in sorted(g.members.items())
            ]
            kind = "@" if g.secret else "="
            head = f":{self.server} 353 {self.nick} {kind} {chan} :"
            room = MAX_LINE - 2 - len(head.encode())
            chunk: list[str] = []
            size = 0
            for name in names:
                if chunk and size + len(name) + 1 > room:
                    ctx.num("353", kind, chan, " ".join(chunk))
                    chunk, size = [], 0
                chunk.append(name)
                size += len(name) + 1
            if chunk:
                ctx.num("353", kind, chan, " ".join(chunk))
        ctx.num("366", chan, "End of /NAMES list")

    # input --------------------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self.close_with("Input line was too long")

    def dataReceived(self, data: bytes) -> None:
        # The PRIVMSG/NOTICE lines of one read are one batch for the realm (one
        # append, one delivery burst: see Messaging.send_batch).
        self._sends = []
        try:
            LineOnlyReceiver.dataReceived(self, data)
        finally:
            self.flush_sends()
            self._sends = None

    def queue_send(
        self, to: str, text: str, notice: bool, tags: dict[str, str] | None
    ) -> Deferred[Envelope]:
        """Send ``text`` to ``to`` with the other sends of this read (at its end, or
        before the next command that is not a PRIVMSG or NOTICE); fires with the
        committed envelope."""
        assert self.session is not None
        if self._sends is None:  # not inside a read (a line held by flood control)
            return self.session.send(to, text, notice=notice, tags=tags)
        d: Deferred[Envelope] = Deferred()
        self._sends.append(((to, text, None, notice, None, tags), d))
        return d

    def flush_sends(self) -> None:
        """Hand the sends queued by :meth:`queue_send` to the realm, as one batch."""
        sends = self._sends
        if not sends:
            return
        self._sends = []
        if self.session is None:
            for _, d in sends:
                d.errback(Failure(ChatError("not_authenticated")))
            return
        outcomes, commits = self.session.send_batch([req for req, _ in sends])
        waiters: dict[int, Deferred[Envelope]] = {}
        for (_, d), out in zip(sends, outcomes, strict=True):
            if type(out) is Envelope:
                waiters[id(out)] = d
            elif isinstance(out, Deferred):
                out.chainDeferred(d)
            else:
                d.errback(Failure(out))
        for committed, items in commits:
            ds = [waiters[id(env)] for env in items]
            committed.addCallbacks(_fire_each, _fail_each, callbackArgs=(ds,), errbackArgs=(ds,))

    def lineReceived(self, line: bytes) -> None:
        if self.state == "closed":
            return
        if self._bucket is not None:
            if self._queue or self._bucket.take(self.factory.clock.seconds()):
                self._hold_line(line)
                return
        self._handle(line)

    def _hold_line(self, line: bytes) -> None:
        """Flood control: past the burst, lines wait (reading pauses) at flood_rate."""
        if len(self._queue) >= MAX_QUEUED:
            self.realm.stats.rate_limited("irc_flood")
            self.close_with("Excess Flood")
            return
        self._queue.append(line)
        if self._drain_call is None:
            self.transport.pauseProducing()
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        assert self._bucket is not None
        wait = max(0.0, (1.0 - self._bucket.tokens) / self._bucket.rate)
        self._drain_call = self.factory.clock.callLater(wait, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        assert self._bucket is not None
        while self._queue and self.state != "closed":
            if self._bucket.take(self.factory.clock.seconds()):
                self._schedule_drain()
                return
            self._handle(self._queue.popleft())
        if self.state != "closed" and not self._after_barrier:
            self.transport.resumeProducing()

    def _handle(self, raw: bytes) -> None:
        self.last_rx = self.factory.clock.seconds()
        self.pinged = False
        if self._barrier:  # a group change is pending: what follows may depend on it
            if len(self._after_barrier) >= MAX_QUEUED:
                self.realm.stats.rate_limited("irc_flood")
                self.close_with("Excess Flood")
                return
            if not self._after_barrier:
                self.transport.pauseProducing()
            self._after_barrier.append(raw)
            return
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        size = len(raw)
        tags_size = 0
        if raw.startswith(b"@"):  # the 512-byte limit is for the line without its tags
            tags_size = len(raw) - len(raw.partition(b" ")[2].lstrip(b" "))
            size -= tags_size
        if size > MAX_LINE - 2 or tags_size > MAX_CLIENT_TAGS:
            ctx = self._reply(None)
            ctx.num("417", "Input line was too long")
            ctx.finish()
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            ctx = self._reply(None)
            ctx.send(format_line(self.server, "FAIL", "*", "INVALID_UTF8", "Lines must be UTF-8"))
            ctx.finish()
            return
        try:
            tags, command, params = parse_line(text)
        except IRCBadLine:
            return  # silently ignored, like every IRC server
        label = tags.get("label") if "labeled-response" in self.caps else None
        ctx = self._reply(label)
        handler = COMMANDS.get(command)
        if handler is None:
            if self.state == "ready":
                ctx.num("421", command[:32], "Unknown command")
            else:
                ctx.num("451", "You have not registered")
            ctx.finish()
            return
        if self.state != "ready" and command not in PRE_REGISTRATION:
            ctx.num("451", "You have not registered")
            ctx.finish()
            return
        need = MIN_PARAMS.get(command, 0)
        if len(params) < need or any(not p for p in params[: need if need < 2 else 1]):
            ctx.num("461", command, "Not enough parameters")
            ctx.finish()
            return
        if self._sends and command not in _BATCHED:
            self.flush_sends()  # the sends read before this command go first
        try:
            result = handler(self, ctx, params, tags)
        except ChatError as e:
            self.error(ctx, command, e, params[0] if params else "*")
            result = None
        except Exception:
            self.log.failure("IRC {command} from {peer} failed", command=command, peer=self.peer())
            ctx.num("400", command, "Internal error; it was logged")
            result = None
        if isinstance(result, Deferred):
            if not ctx.queued:  # the first pending command: later ones wait for it
                ctx.queued = True
                self.replies.append(ctx)
            if command in BARRIERS:  # (a Deferred already fired lifts it at once)
                self._barrier = True
                result.addBoth(self._barrier_done)
            result.addErrback(self._crashed, ctx, command)
            result.addBoth(lambda _: ctx.finish())
        else:
            ctx.finish()

    def _barrier_done(self, result: Any) -> Any:
        """A group change completed: run the lines that came after it, up to the
        next group change."""
        self._barrier = False
        waiting = self._after_barrier
        while waiting and not self._barrier and self.state != "closed":
            self._handle(waiting.popleft())
        if not waiting and self.state != "closed" and not self._queue:
            self.transport.resumeProducing()
        return result

    def _reply(self, label: str | None) -> Reply:
        """The Reply for a new command: held behind the pending ones, if any."""
        order = self.replies
        if not order:
            return Reply(self, label)
        ctx = Reply(self, label, held=True)
        ctx.queued = True
        order.append(ctx)
        return ctx

    def _crashed(self, failure: Failure, ctx: Reply, command: str) -> None:
        self.log.failure("IRC {command} failed", failure, command=command)
        ctx.num("400", command, "Internal error; it was logged")

    def error(self, ctx: Reply, command: str, err: ChatError, target: str) -> None:
        """A realm error as the numeric an IRC client expects."""
        if err.code == "rate_limited":
            ctx.num("263", command, f"Please wait a while and try again ({err.message})")
            return
        if err.code == "too_large":
            ctx.num("417", err.message)
            return
        known = ERROR_NUMERICS.get(err.code)
        if known is None:
            ctx.num("400", command, err.message)
            return
        code, text = known
        if code == "401" and target.startswith("#"):
            code, text = "403", "No such channel"
        if code == "482" and command in ("PART", "MODE", "TOPIC"):
            text = f"You're not channel operator ({err.message})"  # the realm's reason
        if code == "442" and command in ("PRIVMSG", "NOTICE", "TAGMSG"):
            code, text = "404", "Cannot send to channel"
        ctx.num(code, target, text)

    # targets ------------------------------------------------------------------------

    def resolve(self, target: str) -> str:
        """A message target as the realm's canonical address (raises ChatError).

        Remembered per connection (a client talks to few targets, many times)."""
        known = self._targets.get(target)
        if known is not None:
            return known
        if target.startswith("#"):
            found = str(address.parse(group_of(target), self.realm.realm, group=True))
        else:
            found = str(address.user(user_of(target), self.realm.realm))
        if len(self._targets) >= 256:
            self._targets.clear()
        self._targets[target] = found
        return found

    def group_address(self, chan: str) -> str:
        if not chan.startswith("#"):
            raise ChatError("no_such_group")
        return str(address.parse(group_of(chan), self.realm.realm, group=True))

    # registration -------------------------------------------------------------------

    @command("CAP", params=1, early=True)
    def irc_CAP(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        sub = params[0].upper()
        if sub == "LS":
            if self.state != "ready":
                self.cap_negotiating = True
            v302 = len(params) > 1 and (decimal(params[1]) or 0) >= 302
            offered = [c if c != "sasl" or not v302 else "sasl=PLAIN" for c in CAPABILITIES]
            ctx.send(format_line(self.server, "CAP", self.nick, "LS", " ".join(offered)))
        elif sub == "LIST":
            caps = " ".join(sorted(self.caps))
            ctx.send(format_line(self.server, "CAP", self.nick, "LIST", caps))
        elif sub == "REQ":
            if self.state != "ready":
                self.cap_negotiating = True
            wanted = params[1].split() if len(params) > 1 else []
            ok = all(w.lstrip("-") in CAPABILITIES for w in wanted)
            if ok:
                for w in wanted:
                    if w.startswith("-"):
                        self.caps.discard(w[1:])
                    else:
                        self.caps.add(w)
                self._tagmode = ("server-time" in self.caps) | ("message-tags" in self.caps) << 1
            reply = "ACK" if ok else "NAK"
            ctx.send(format_line(self.server, "CAP", self.nick, reply, " ".join(wanted)))
        elif sub == "END":
            if self.state != "ready" and self.cap_negotiating:
                self.cap_negotiating = False
                self._try_register()
        else:
            ctx.num("410", sub[:20], "Invalid CAP command")

    @command("PASS", params=1, early=True)
    def irc_PASS(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        if self.state == "ready" or self.session is not None:
            ctx.num("462", "You may not reregister")
            return
        self.password = params[0]

    @command("NICK", params=1, early=True)
    def irc_NICK(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        wanted = params[0]
        try:
            name = address.normalise_name(user_of(wanted))
        except ChatError:
            ctx.num("432", param(wanted), "Erroneous nickname")
            return
        if self.state == "ready":
            if name != address.normalise_name(self.user_id.partition("@")[0]):
                ctx.num("433", param(wanted), "Your nick is your account name; it cannot change")
            elif wanted != self.nick:  # the same account, another case: shown as typed
                self._renamed(ctx, wanted)
            return
        self.nick = wanted
        self._try_register()

    def _renamed(self, ctx: Reply, nick: str) -> None:
        """A change of case: told to this connection and to the IRC users who share a
        channel with it."""
        line = format_line(self.mask(self.user_id), "NICK", nick)
        self.nick = nick
        if self.identity is not None:
            self.identity.nick = nick
        self.factory.directory.renamed(self.user_id, nick)
        ctx.send(line)
        groups = self.realm.groups
        seen: set[str] = set()
        for addr in groups.of_user.get(self.user_id, ()):
            seen.update(groups.groups[addr].members)
        for conn in self.factory.connections:
            if conn is not self and conn.state == "ready" and conn.user_id in seen:
                conn.write(line)

    @command("USER", params=4, early=True)
    def irc_USER(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        if self.state == "ready" or self.username:
            ctx.num("462", "You may not reregister")
            return
        if not params[3]:
            ctx.num("461", "USER", "Not enough parameters (an empty realname)")
            return
        self.username = params[0][:32]
        self.realname = params[3][:128]
        self._try_register()

    @command("AUTHENTICATE", params=1, early=True)
    def irc_AUTHENTICATE(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
        arg = params[0]
        if self.session is not None or self.state == "ready":
            ctx.num("907", "You have already authenticated using SASL")
            return None
        if self.logging_in:
            return None
        if arg == "*":
            self.sasl, self.sasl_buffer = None, ""
            ctx.num("906", "SASL authentication aborted")
            return None
        if self.sasl is None:
            if arg.upper() != "PLAIN":
                ctx.num("908", "PLAIN", "are available SASL mechanisms")
                ctx.num("904", "SASL authentication failed")
                return None
            self.sasl = "PLAIN"
            ctx.send(b"AUTHENTICATE +\r\n")
            return None
        if len(arg) > SASL_CHUNK:
            self.sasl, self.sasl_buffer = None, ""
            ctx.num("905", "SASL message too long")
            return None
        if arg != "+":
            self.sasl_buffer += arg
        if len(arg) == SASL_CHUNK:
            if len(self.sasl_buffer) > 4 * SASL_CHUNK:
                self.sasl, self.sasl_buffer = None, ""
                ctx.num("905", "SASL message too long")
            return None  # more to come
        data, self.sasl, self.sasl_buffer = self.sasl_buffer, None, ""
        try:
            authzid, authcid, password = (
                base64.b64decode(data, validate=True).decode("utf-8").split("\0")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            ctx.num("904", "SASL authentication failed: malformed PLAIN message")
            return None
        if authzid and authzid != authcid:
            ctx.num("904", "SASL authentication failed: authzid must be empty or the account")
            return None

        def ok(session: Session) -> None:
            account = nick_of(session.user_id, self.realm.realm)
            ctx.num(
                "900",
                f"{account}!{account}@{self.realm.realm}",
                account,
                f"You are now logged in as {account}",
            )
            ctx.num("903", "SASL authentication successful")
            self._try_register()

        def failed(err: ChatError) -> None:
            if err.code == "rate_limited":
                ctx.num(
                    "904",
                    f"SASL authentication failed: {err.message}, "
                    f"retry after {err.extra.get('retry_after', 1)} s",
                )
            elif err.code == "auth_failed":
                ctx.num("904", "SASL authentication failed")
            else:  # too_many_sessions, a bad device...: say what the realm said
                ctx.num("904", f"SASL authentication failed: {err.message}")

        return self._login(authcid, password, ok, failed)

    def _login(
        self,
        account: str,
        password: str,
        ok: Callable[[Session], None],
        failed: Callable[[ChatError], None],
    ) -> Deferred[None]:
        """Log in through the realm (its portal, its failure throttle)."""
        self.logging_in = True
        try:
            d: Deferred[Session] = self.realm.login(account, password, self, DEVICE, self.peer())
        except ChatError as e:  # pragma: no cover - login raises inside its Deferred
            d = Deferred()
            d.errback(e)

        def done(session: Session) -> None:
            self.logging_in = False
            if self.state == "closed":
                session.logout()
                return
            self.session = session
            self.user_id = session.user_id
            ok(session)

        def error(f: Failure) -> None:
            self.logging_in = False
            f.trap(ChatError)
            if self.state != "closed":
                failed(f.value)  # type: ignore[arg-type]

        return d.addCallbacks(done, error)

    def _try_register(self) -> None:
        if self.state != "registering" or self.cap_negotiating or self.logging_in:
            return
        if self.nick == "*" or not self.username:
            return
        if self.session is not None:
            self._welcome()
            return
        password = self.password
        if password is None:
            self.direct.num("464", "Password required: log in with SASL PLAIN or PASS")
            self.close_with("Access denied: no password")
            return
        account = self.nick
        name, sep, rest = password.partition(":")
        if sep:
            try:
                account, password = address.normalise_name(user_of(name)), rest
            except ChatError:
                pass

        def failed(err: ChatError) -> None:
            if err.code == "rate_limited":
                self.direct.num(
                    "464",
                    f"Password incorrect ({err.message}, retry after "
                    f"{err.extra.get('retry_after', 1)} s)",
                )
            elif err.code == "auth_failed":
                self.direct.num("464", "Password incorrect")
            else:  # the password was right, the login still refused (too_many_sessions)
                self.close_with(f"Access denied: {err.message}")
                return
            self.close_with("Access denied: bad password")

        self._login(account, password, lambda s: self._welcome(), failed)

    def _welcome(self) -> None:
        assert self.session is not None
        f = self.factory
        realm = self.realm
        old = self.nick
        account = nick_of(self.user_id, realm.realm)
        # The nick as typed when it names the account (in another case), else the account.
        same = old.lower() == account.lower() and "/" not in old
        self.nick = old if same else account
        self.state = "ready"
        f.authenticated(self)
        ctx = self.direct
        if old != self.nick and old != "*":
            self.write(f":{old}!{self.username}@{realm.realm} NICK {self.nick}\r\n".encode())
        name, _, host = self.user_id.partition("@")
        self.identity = Identity(
            self.nick, clean_username(self.username) or name, self.realname or name, host
        )
        f.directory.arrived(self.user_id, self, self.identity)
        ctx.num("001", f"Welcome to the {realm.realm} chat realm, {self.mask(self.user_id)}")
        ctx.num("002", f"Your host is {self.server}, running version {f.version}")
        ctx.num("003", f"This server was created {f.created}")
        ctx.num("004", self.server, f.version, "i", "biqnot", "bqo")
        for chunk in f.isupport_lines():
            ctx.num("005", *chunk, "are supported by this server")
        self._lusers(ctx)
        self._motd(ctx)
        self.log.info("IRC login {user} from {peer}", user=self.user_id, peer=self.peer())
        for group in sorted(realm.groups.of_user.get(self.user_id, ())):
            chan = channel_of(group, realm.realm)
            self.joined.add(group)
            self.write(f":{self.mask(self.user_id)} JOIN {chan}\r\n".encode())
            self.channel_burst(ctx, group, chan)
        session = self.session

        def failed(f: Failure) -> None:
            self.log.failure("IRC backlog for {user} failed", f, user=session.user_id)
            self.close_with("could not send the backlog; reconnect")

        session.start().addErrback(failed)

    def _lusers(self, ctx: Reply) -> None:
        realm = self.realm
        users = realm.online_count()
        ctx.num("251", f"There are {users} users and 0 invisible on 1 servers")
        ctx.num("254", str(len(realm.groups.groups)), "channels formed")
        ctx.num("255", f"I have {users} clients and 0 servers")
        ctx.num("265", str(users), str(users), f"Current local users {users}, max {users}")
        ctx.num("266", str(users), str(users), f"Current global users {users}, max {users}")

    def _motd(self, ctx: Reply) -> None:
        motd = self.realm.config.irc.motd
        if not motd:
            ctx.num("422", "MOTD File is missing")
            return
        ctx.num("375", f"- {self.server} Message of the day - ")
        for text in motd.splitlines() or [""]:
            for piece in split_utf8(text, 400):
                ctx.num("372", f"- {piece}")
        ctx.num("376", "End of /MOTD command.")

    # connection commands ------------------------------------------------------------

    @command("PING", params=1, early=True)
    def irc_PING(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        ctx.send(format_line(self.server, "PONG", self.server, params[0]))

    @command("PONG", early=True)
    def irc_PONG(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        return None

    @command("QUIT", early=True)
    def irc_QUIT(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
        """Close once the replies to the commands before it are written."""
        reason = params[0] if params else ""
        d = ctx.turn()
        if d.called:
            self._quit(reason)
            return None
        return d.addCallback(lambda _: self._quit(reason))

    def _quit(self, reason: str) -> None:
        if self.session is not None:
            if self._ack_call is not None and self._ack_call.active():
                self._ack_call.cancel()
            self._ack()
        self.close_with(f"Closing link: {self.nick} (Quit: {reason})")

    @command("MOTD")
    def irc_MOTD(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        self._motd(ctx)

    @command("LUSERS")
    def irc_LUSERS(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        self._lusers(ctx)

    @command("AWAY")
    def irc_AWAY(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        assert self.session is not None
        text = params[0] if params else ""
        if text:
            self.session.set_status("away", plain_text(text)[:MAX_STATUS_TEXT])
            ctx.num("306", "You have been marked as being away")
        else:
            self.session.set_status("online")
            ctx.num("305", "You are no longer marked as being away")
