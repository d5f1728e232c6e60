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

from collections import deque
from collections.abc import Iterator, Sequence
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
from chatproto.flow import OutputQueue
from chatproto.irc import channels as _channels  # noqa: F401  (registers its commands)
from chatproto.irc import messages as _messages
from chatproto.irc import modes as _modes  # noqa: F401
from chatproto.irc import oper as _oper  # noqa: F401
from chatproto.irc import reading as _reading
from chatproto.irc import registration as _registration
from chatproto.irc import relations as _relations
from chatproto.irc import users as _users  # noqa: F401
from chatproto.irc.commands import COMMANDS, MIN_PARAMS, PRE_REGISTRATION, all_of, command
from chatproto.irc.identity import Identity
from chatproto.irc.lines import (
    MAX_CLIENT_TAGS,
    MAX_LINE,
    MAX_TAGS,
    IRCBadLine,
    channel_of,
    format_line,
    group_of,
    parse_line,
    plain_text,
    prefix,
    quick_match,
    server_time,
    shown_label,
    text_room,
    user_of,
)
from chatproto.irc.modes import settings_modes
from chatproto.irc.reading import READ_MARKER, MarkerState
from chatproto.irc.registration import CAPABILITIES, DEVICE
from chatproto.irc.replies import ERROR_NUMERICS, Direct, PendingSend, Reply
from chatproto.protocol import CLOSED_STATES
from chatproto.ratelimit import TokenBucket
from chatproto.realm import MAX_STATUS_TEXT, ISessionMind, Notice, RealmService, Session
from chatproto.realm.messaging import SendRequest
from chatproto.realm.reading import typing_tags

if TYPE_CHECKING:
    from chatproto.irc.factory import IRCFactory

__all__ = ["ACK_DELAY", "CAPABILITIES", "DEVICE", "MAX_QUEUED", "IRCProtocol"]

#: Seconds between writing an item and acknowledging it to the realm.
ACK_DELAY = 1.0
#: Lines held back by the flood limit before the connection is closed (Excess Flood).
MAX_QUEUED = 256
#: Commands that change a group's state: the lines after one are handled once it
#: completes (they may depend on it); other commands run at once and only their
#: replies keep the order (many PRIVMSGs in flight do not wait for each other).
BARRIERS = frozenset({"JOIN", "PART", "TOPIC", "INVITE", "KICK", "MODE"})


#: Commands whose sends are batched per read (see IRCProtocol.queue_send).
_BATCHED = frozenset({"PRIVMSG", "NOTICE"})
#: Stands in the line queues for a line too long to keep (no line holds a newline).
_TOO_LONG = b"\n"


@implementer(ISessionMind, IPushProducer)
class IRCProtocol(LineOnlyReceiver):
    """One IRC client connection.  States: ``registering`` -> ``ready`` ->
    ``closed``, through ``closing`` when the client ends it (see :meth:`close_after`)."""

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
        #: what the other IRC users see in the QUIT when this connection ends
        self.quit_reason = ""
        #: logged in as a guest (a temporary account: chatproto.realm.guests)
        self.guest = False
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
        #: OPER succeeded: a realm admin acting as an IRC operator (chatproto.irc.oper)
        self.oper = False
        self.direct = Direct(self, None)
        #: how this connection's user is shown (set at registration)
        self.identity: Identity | None = None
        #: replies of pending commands (and of those after them), oldest first
        self.replies: deque[Reply] = deque()
        #: a group change (JOIN, PART, MODE...) is pending: later lines wait for it,
        #: since they may depend on it (JOIN then PRIVMSG to the channel)
        self._barrier = False
        self._after_barrier: deque[bytes] = deque()
        #: the barrier is the session's backlog read (see await_backlog)
        self._backlog = False
        #: the sends of the batch being handled (see queue_send); None outside one
        self._sends: list[SendRequest] | None = None
        self._entries: list[PendingSend] = []  # (and theirs, side by side)
        #: the Replies the batch's quick lines share (see _take_lines)
        self._shared: list[Reply] = []
        self.tag_mode = 0  # bit 1: server-time, bit 2: message-tags (msgid)
        self.pending_sends: deque[PendingSend] = deque()  # sends awaiting their echo
        self._targets: dict[str, str] = {}  # IRC target -> canonical address
        self.awaiting: dict[tuple[str, str], Reply] = {}  # (event, group) -> labeled reply
        #: (event, group) -> the read marker read of the channel burst a command's own
        #: group event started (the command ends once it is written: channels.group_change)
        self.bursts: dict[tuple[str, str], Deferred[None]] = {}
        #: the channel bursts of registration still reading their markers (the
        #: backlog barrier lifts once they are written: synced)
        self.welcome_bursts: list[Deferred[None]] = []
        self.markers = MarkerState()  # MARKREAD (chatproto.irc.reading)
        #: Output, with the slow-reader bound (replaced at connectionMade).
        self._out = OutputQueue(None, 0)
        self._held: list[bytes] | None = None
        self._writable: list[Deferred[None]] = []
        self._ack_call: Any = None
        self._bucket: TokenBucket | None = None
        self._queue: deque[bytes] = deque()
        self._drain_call: Any = None
        #: a line too long was read: nothing more is (see dataReceived)
        self._stopped = False
        #: the ERROR text of a connection closing (see close_after), and whether
        #: it is a QUIT (which acknowledges what was written)
        self._closing_message = ""
        self._closing_quit = False

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
        self._out = OutputQueue(
            self.transport, f.realm.config.limits.max_output_buffer, self, f.clock
        )
        if not f.opened(self):
            self.state = "closed"  # refused: too many connections wait to log in
            return
        cfg = f.realm.config.irc
        if cfg.flood_rate > 0:
            self._bucket = TokenBucket(cfg.flood_rate, cfg.flood_burst, self.connected_at)
        self._out.register()

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
            directory = self.factory.directory
            why = self.quit_reason or "Connection closed"
            quit_line = format_line(self.mask(self.user_id), "QUIT", why)
            directory.left(self.user_id, self, self.factory.clock.seconds())
            if not directory.on_irc(self.user_id):  # its last IRC connection
                told: set[int] = set()
                for _group, conn in self.channel_audience():
                    if id(conn) not in told:
                        told.add(id(conn))
                        conn.write(quit_line)
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

    def channel_audience(self) -> Iterator[tuple[str, IRCProtocol]]:
        """(group, connection) for each IRC connection of another member of this
        user's groups that shows that group's channel.

        Membership is durable (a user who leaves IRC stays in their groups), but IRC
        clients keep member lists by QUIT and JOIN: they are told when the user's
        last IRC connection closes (QUIT), and when one registers again (JOIN)."""
        groups = self.realm.groups
        directory = self.factory.directory
        me = self.user_id
        for addr in sorted(groups.of_user.get(me, ())):
            for member in groups.groups[addr].members:
                if member != me:
                    for conn in directory.connections(member):
                        if addr in conn.joined:
                            yield addr, conn

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

    # IPushProducer (a pull producer writing directly: see chatproto.flow) -----------

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
        """``ERROR :message``, then close (the IRC way of ending a connection).
        ``message`` is written as one line whatever it holds (a reason stored
        before reasons were labels)."""
        if self.state == "closed":
            return
        message = " ".join(message.replace("\0", "").splitlines())
        if not self.quit_reason:
            self.quit_reason = message
        self.state = "closed"
        self.closed_at = self.factory.clock.seconds()
        if self._held is not None:
            held, self._held = self._held, None
            self._out.write(b"".join(held))
        self._out.close(format_line(None, "ERROR", message))
        # A TLS transport shuts down only once no producer is registered.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def close_after(self, ctx: Reply, message: str, quit: bool = False) -> None:
        """End the connection for a line it sent (QUIT; a line too long; Excess
        Flood): the replies of the lines read before it -- the echoes and labeled
        replies of PRIVMSGs still being stored among them -- then ``ERROR
        :message``, then the close.  ``ctx`` is that line's Reply, in line behind
        theirs.

        Meanwhile the state is ``closing``: no more lines are handled.  The wait is
        bounded: the keepalive sweep (:meth:`chatproto.protocol.ClientFactory.sweep`)
        calls :meth:`finish_closing` once it has lasted ``keepalive_interval``.  A
        ``quit`` acknowledges what was written to the client when it closes."""
        if self.state in CLOSED_STATES:
            return
        if self._sends:
            self.flush_sends()  # the sends read before it go to the realm now
        self.state = "closing"
        self.closed_at = self.factory.clock.seconds()
        self._closing_message = message
        self._closing_quit = quit
        self._queue.clear()  # lines read after it are not handled
        self._after_barrier.clear()
        d = ctx.turn()
        if d.called:
            self.finish_closing()
        else:
            d.addCallback(lambda _: self.finish_closing())

    def finish_closing(self) -> None:
        """Close a connection in state ``closing`` (see :meth:`close_after`): once
        the replies before its last line are written, or when the keepalive sweep
        finds it has waited ``keepalive_interval``."""
        if self.state != "closing":
            return
        if self._closing_quit and self.session is not None:
            if self._ack_call is not None and self._ack_call.active():
                self._ack_call.cancel()
            self._ack()
        self.close_with(self._closing_message)

    # ISessionMind -------------------------------------------------------------------

    @property
    def own_copies(self) -> bool:
        """Whether our user's own texts to others are shown here: with echo-message
        (or sends still awaiting their echo).  Without, :meth:`deliver` would drop
        them, so the realm does not hand them over (Sessions.route_private): it moves
        our position past them and calls :meth:`written` (the ack timer)."""
        return "echo-message" in self.caps or bool(self.pending_sends)

    def deliver(self, envelope: Envelope) -> None:
        """The realm hands over one committed item: render and write (or hold) it.

        The hot path of fan-out: a text item from someone else, whose line the factory
        has already encoded for the previous receiver; written in one go per burst."""
        me = self.user_id
        if envelope.sender == me:
            if (
                envelope.kind == "text"
                and not self.pending_sends
                and envelope.recipient != me
                and "echo-message" not in self.caps
            ):  # our own message, shown nowhere (what _deliver_other does, sooner)
                if self._ack_call is None:
                    self.written()
                return
            self._deliver_other(envelope)
            return
        if envelope.kind != "text":
            self._deliver_other(envelope)
            return
        f = self.factory
        data = f._cache[self.tag_mode] if envelope is f._cache_env else None
        if data is None:
            data = f.lines(envelope, self.tag_mode)
        held = self._held  # (deliver_run writes a run's lines the same way)
        if held is not None:
            held.append(data)
        elif self._out.blocked or self.state == "closed":
            self.write(data)
        elif f.realm.bursting:
            self._held = [data]
            f.realm.hold(self)
        else:
            self._out.put(data)
        if self._ack_call is None:
            self.written()

    def deliver_run(self, envelopes: Sequence[Envelope]) -> None:
        """Several committed private texts of one sender to one recipient, in order
        (Sessions.route_private): what :meth:`deliver` does with each, in one go when
        they are someone else's plain texts to a client without tags (their lines
        from IRCFactory.run_lines), else one by one."""
        data = None
        if envelopes[0].sender != self.user_id and not self.tag_mode:
            data = self.factory.run_lines(envelopes)
        if data is None:
            for envelope in envelopes:
                self.deliver(envelope)
            return
        # (deliver's write, inline as there: the two hold, write and acknowledge alike)
        held = self._held
        if held is not None:
            held.append(data)
        elif self._out.blocked or self.state == "closed":
            self.write(data)
        elif self.factory.realm.bursting:
            self._held = [data]
            self.factory.realm.hold(self)
        else:
            self._out.put(data)
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
                ctx = _relations.echo_of(self, envelope)  # our own reaction's echo
                if data:
                    if ctx is not None:
                        ctx.send(data)
                    else:
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
                    if envelope.recipient == self.user_id:  # to ourselves: received too
                        self.write(self.factory.lines(envelope, self.tag_mode))
                    if "echo-message" in self.caps:
                        head.ctx.send(self.factory.lines(envelope, self.tag_mode))
                    self.written()
                    return
            if "echo-message" not in self.caps and envelope.recipient != self.user_id:
                self.written()  # our own message from elsewhere: the client cannot show it
                return
        self.write(self.factory.lines(envelope, self.tag_mode))
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
        self.session.ack(self.session.delivered)

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
            if self.tag_mode & 2 and (
                data["from"] != me or data["to"] == me or "echo-message" in self.caps
            ):
                self.write(self.factory.tag_line(data, self.tag_mode))
            return
        if kind == "read":  # a read marker moved: MARKREAD (draft/read-marker)
            _reading.read_notice(self, data)
            return
        if kind == "typing":  # a native client typing: TAGMSG +typing (IRCv3 typing)
            if self.tag_mode & 2 and data.get("user") != self.user_id:
                tags = typing_tags(data, self.user_id, self.factory.clock.seconds())
                self.write(self.factory.tag_line(tags, self.tag_mode))
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
        if self._backlog:
            self._backlog = False
            bursts, self.welcome_bursts = self.welcome_bursts, []
            bursts = [d for d in bursts if not d.called]
            if bursts:  # a channel's 366 still waits for its marker: lines after it too
                all_of(bursts).addBoth(self._barrier_done)
                return
            self._barrier_done(None)

    def await_backlog(self) -> None:
        """The session is about to read its backlog: hold the lines that come
        meanwhile until it is out (:meth:`synced`), as after a group change.

        A syncing session holds live items until its backlog is out
        (chatproto.realm.sessions), so a JOIN handled meanwhile would finish with
        its JOIN not yet written, and a PING after it would overtake it."""
        self._backlog = self._barrier = True

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
        if self.tag_mode & 1:
            prefix = f"@time={server_time(env.ts)} ".encode()

        def out(source: str, command: str, *params: str) -> None:
            ctx.send(prefix + format_line(source, command, *params))

        if event in ("created", "joined"):
            who = env.sender if event == "created" else user
            if who == me:
                if group not in self.joined:
                    self.joined.add(group)
                    out(actor, "JOIN", chan)
                    burst = self.channel_burst(ctx, group, chan)
                    if burst is not None and not burst.called and ctx is not self.direct:
                        self.bursts[(event, group)] = burst  # the command waits for it
            else:
                out(self.mask(who), "JOIN", chan)
        elif event == "left":
            self._gone(user, group)
            out(self.mask(user), "PART", chan, "left")
        elif event == "kicked":
            self._gone(user, group)
            out(actor, "KICK", chan, self.nick_for(user), meta.get("reason") or "kicked")
        elif event == "banned":
            nick = self.nick_for(user)
            out(actor, "MODE", chan, "+b", f"{nick}!*@*")
            if (user == me and group in self.joined) or user != me:
                self._gone(user, group)
                out(actor, "KICK", chan, nick, meta.get("reason") or "banned")
        elif event == "unbanned":
            out(actor, "MODE", chan, "-b", f"{self.nick_for(user)}!*@*")
        elif event == "invited":
            if user == me:
                out(actor, "INVITE", self.nick, chan)
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

    def channel_burst(self, ctx: Reply, group: str, chan: str) -> Deferred[None] | None:
        """Topic and names of a channel the client has just joined (and its read
        marker: a Deferred then, fired once written)."""
        g = self.realm.groups.groups.get(group)
        if g is None:
            return None
        if g.topic:
            ctx.num("332", chan, g.topic)
            self.topic_time(ctx, group, chan)
        if READ_MARKER in self.caps:
            return _reading.join_marker(self, ctx, group, chan)
        self.names(ctx, group, chan)
        return None

    def topic_time(self, ctx: Reply, group: str, chan: str) -> None:
        """333 RPL_TOPICWHOTIME: who set the topic, and when."""
        g = self.realm.groups.groups.get(group)
        if g is not None and g.topic_by:
            ctx.num("333", chan, self.nick_for(g.topic_by), str(int(g.topic_at)))

    def names(self, ctx: Reply, group: str, chan: str, end: bool = True) -> None:
        """353 lines of a channel's members (if the client may see them), then, with
        ``end``, 366."""
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
        if end:
            ctx.num("366", chan, "End of /NAMES list")

    # input --------------------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than MAX_LENGTH: nothing more is read; it ends the
        connection in its turn (after the lines read before it: see _handle)."""
        self._stopped = True
        self._buffer = b""
        if self._bucket is None:
            self._handle(_TOO_LONG)
        else:
            self.lineReceived(_TOO_LONG)

    def dataReceived(self, data: bytes) -> None:
        """``LineOnlyReceiver.dataReceived``, with each line handed to
        :meth:`_handle` at once when no flood limit may hold it back (one call less
        per line than through :meth:`lineReceived`).  The PRIVMSG/NOTICE lines of
        one read are one batch for the realm (one append, one delivery burst: see
        Messaging.send_batch); the read is the client's activity (keepalive)."""
        if self._stopped or self.state in CLOSED_STATES:
            return  # nothing more is read (or buffered)
        self.last_rx = self.factory.clock.seconds()
        self.pinged = False
        own = self._open_batch()
        try:
            lines = (self._buffer + data).split(b"\n")
            self._buffer = lines.pop()
            if self._bucket is None:
                if not self._take_lines(lines):
                    return
            else:
                transport = self.transport
                for line in lines:
                    # a line may have closed the connection: what follows it is dropped
                    if transport.disconnecting or self.state in CLOSED_STATES:
                        return
                    if len(line) > self.MAX_LENGTH:
                        self.lineLengthExceeded(line)
                        return
                    self.lineReceived(line)
            if len(self._buffer) > self.MAX_LENGTH:
                self.lineLengthExceeded(self._buffer)
        finally:
            if own:
                self._end_batch()

    def _take_lines(self, lines: list[bytes]) -> bool:
        """The lines of a read when no flood limit holds them back: each to
        :meth:`_handle`, except the quick lines, queued here (the fast lane).

        A quick line is one the lean lane of :meth:`_handle` takes (``quick_match``:
        a PRIVMSG or NOTICE with no tags and one target) to a user, from a registered
        client without echo-message, which :func:`messages.send_text` would queue
        without a word: its target resolves, fits the 417 check by its length bound,
        and, for a PRIVMSG, is not away (301).  Any other line goes to :meth:`_handle`
        (which answers it as before).  The checks of a target hold for the quick
        lines after it up to the next other line (nothing else runs meanwhile).

        What this saves is per line: the calls of the lean lane and its target's
        checks, and the line's own Reply: the quick lines between two other lines
        share one (``ctx.sends`` of them, finishing with the last settled), and one
        PendingSend per run of them to one target (not per target: lines to A, B, A
        make three).  Their replies come later, at the batch's flush or
        commit (263, 401, 400...), and in line order only while each line has a
        Reply of its own: :meth:`flush_sends` gives them one each (``_unshare``)
        whenever a send of the batch was not appended as it was.

        False when a line ended the reading (what follows it is dropped).
        tests/test_irc_send_batch.py holds the transcripts to the general path's."""
        transport = self.transport
        handle = self._handle
        max_length = self.MAX_LENGTH
        directory = self.factory.directory
        presence_of = self.factory.realm.presence_of
        replies = self.replies
        match = quick_match
        longest = MAX_LINE - 2  # (a line without its CR LF)
        shared: Reply | None = None  # the quick lines' Reply since the last other line
        entry: PendingSend | None = None
        add_send: Any = None  # (the batch's lists' append, once a line is quick)
        add_entry: Any = None
        # the checks of (k_command, k_target) hold for a text up to ``limit`` characters
        k_command = k_target = to = ""
        limit = -1
        notice = False
        # Whether a line may be quick: what _handle's lean lane and the checks below
        # need of the connection (read again after each other line: a quick line
        # changes none of it), and what the loop's first tests ask of every line.
        fast = (
            "echo-message" not in self.caps
            and not self._barrier
            and self.state == "ready"
            and not transport.disconnecting
        )
        for line in lines:
            if fast:
                raw = line.removesuffix(b"\r")  # (what _handle strips)
                if len(raw) <= longest:
                    try:
                        m = match(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        m = None
                    if m is not None:
                        command, target, text = m.groups()
                        if target != k_target or command != k_command:
                            k_command, k_target = command, target
                            entry = None
                            limit = -1  # (not quick: the lean lane answers it)
                            notice = command == "NOTICE"
                            try:
                                to = self.resolve(target)
                            except ChatError:
                                to = "#"
                            if to[0] != "#":
                                shown = directory.nick(to)
                                mask = directory.mask(self.user_id)
                                limit = text_room(mask, command, shown)  # (send_text's 417)
                                if not notice:
                                    presence = presence_of(to)
                                    if presence and presence[0] in ("away", "busy"):
                                        limit = -1  # (its 301)
                        if len(text) <= limit:
                            if shared is None:
                                if replies:
                                    shared = Reply(self, None, held=True)
                                else:
                                    shared = Reply(self, None)
                                shared.queued = True
                                replies.append(shared)
                                self._shared.append(shared)
                                assert self._sends is not None  # (in a batch)
                                add_send = self._sends.append
                                add_entry = self._entries.append
                                entry = None
                            if entry is None:
                                entry = PendingSend(to, text, shared, command, target, notice)
                                entry.matched = True  # (no echo-message)
                            shared.sends += 1
                            add_send((to, text, None, notice, None, None))
                            add_entry(entry)
                            continue
            # another line: what it does may change what the checks above found
            # (a line may have closed the connection: what follows it is dropped)
            if transport.disconnecting or self.state in CLOSED_STATES:
                return False
            if len(line) > max_length:
                self.lineLengthExceeded(line)
                return False
            shared = None
            k_target = ""
            handle(line)
            fast = (
                "echo-message" not in self.caps
                and not self._barrier
                and self.state == "ready"
                and not transport.disconnecting
            )
        return True

    def _open_batch(self) -> bool:
        """Collect the sends of the lines handled from now on (a read, or held lines
        being run); True when this opened the batch (then :meth:`_end_batch` ends it),
        False when one is open already (this is part of it)."""
        if self._sends is not None:
            return False
        self._sends = []
        self._entries = []
        return True

    def _end_batch(self) -> None:
        try:
            self.flush_sends()
        finally:
            self._sends = None

    def queue_send(
        self, entry: PendingSend, tags: dict[str, str] | None, reply_to: str | None = None
    ) -> None:
        """Send ``entry`` (a PRIVMSG or NOTICE to one target) with the other sends of
        this batch (the read being handled, or the held lines being run): handed to
        the realm at its end, or before the next command that is not a PRIVMSG or
        NOTICE.  Its command's Reply (``entry.ctx``) finishes once all its sends are
        settled: committed (see :meth:`_sent`) or refused (:meth:`_send_failed`).

        No Deferred per line: a batch's committed run settles its entries in order.
        ``reply_to``: the ``msg_id`` it answers (a realm reply)."""
        entry.ctx.sends += 1
        if "echo-message" in self.caps:
            self.pending_sends.append(entry)  # its echo answers the command
        else:  # its own copy shows nowhere (a DM to ourselves is written as received)
            entry.matched = True
        req: SendRequest = (entry.to, entry.body, None, entry.quiet, reply_to, tags)
        if self._sends is None:  # not inside a batch: a batch of its own
            self._sends = [req]
            self._entries = [entry]
            self._end_batch()
        else:
            self._sends.append(req)
            self._entries.append(entry)

    def flush_sends(self) -> None:
        """Hand the sends queued by :meth:`queue_send` to the realm, as one batch."""
        sends = self._sends
        if not sends:
            return
        entries = self._entries
        shared = self._shared
        self._sends = []
        self._entries = []
        if shared:
            self._shared = []
        if self.session is None:
            if shared:
                entries = self._unshare(sends, entries, shared)
            refused = Failure(ChatError("not_authenticated"))
            for entry in entries:
                self._send_failed(refused, entry)
            return
        outcomes, commits = self.session.send_batch(sends)
        clustered = self.factory.realm.cluster is not None
        # The runs hold one envelope per appended send: as many as the sends, and every
        # send was appended (the usual; no loop over the outcomes).
        appended = entries  # the entries of the appended runs, in order
        if sum(len(run.items) for run in commits) != len(entries):
            if shared:
                entries = self._unshare(sends, entries, shared)
            appended = []
            for entry, out in zip(entries, outcomes, strict=True):
                if type(out) is Envelope:
                    appended.append(entry)
                elif isinstance(out, Deferred):
                    if clustered:
                        out.addCallback(self.when_routed)
                    out.addCallbacks(
                        self._sent,
                        self._send_failed,
                        callbackArgs=(entry,),
                        errbackArgs=(entry,),
                    )
                else:
                    self._send_failed(Failure(out), entry)
        # Each run holds the next of the appended envelopes, in request order.
        start = 0
        for committed in commits:
            end = start + len(committed.items)
            run = appended[start:end]
            start = end
            if clustered:
                committed.deferred().addCallback(self.when_routed).addCallbacks(
                    self._run_sent, self._run_failed, callbackArgs=(run,), errbackArgs=(run,)
                )
            else:
                committed.listen(self._run_sent, self._run_failed, run)

    def _unshare(
        self, sends: list[SendRequest], entries: list[PendingSend], shared: list[Reply]
    ) -> list[PendingSend]:
        """``entries`` with a Reply of its own for each quick line that shared one
        (see :meth:`_take_lines`), placed after the line before it in the order of
        replies: what the lean lane gives each line.  For a batch whose sends were
        not all appended as they were (refused, or sent by the general path), where
        the replies of a line may come before those of an earlier one."""
        split = set(shared)
        after: dict[Reply, list[Reply]] = {}  # a shared Reply -> the ones of its later lines
        out: list[PendingSend] = []
        for req, entry in zip(sends, entries, strict=True):
            ctx = entry.ctx
            if ctx in split:
                more = after.get(ctx)
                if more is None:
                    after[ctx] = []
                else:
                    own = Reply(self, None, held=True)
                    own.queued = True
                    own.sends = 1
                    ctx.sends -= 1
                    more.append(own)
                    entry = PendingSend(
                        entry.to, req[1], own, entry.command, entry.target, entry.quiet
                    )
                    entry.matched = True
            out.append(entry)
        order = self.replies
        kept = list(order)
        order.clear()
        for ctx in kept:
            order.append(ctx)
            more = after.get(ctx)
            if more:
                order.extend(more)
        return out

    def when_routed(self, result: Any) -> Any:
        """``result`` (a committed envelope, or a run's list of them) once its items
        have reached this worker's sessions: a worker of a cluster routes its own
        commits from the store, a round trip later, and a send's echo (the
        command's reply) comes with them."""
        last = result[-1] if isinstance(result, list) and result else result
        pos = getattr(last, "pos", 0)
        wait = self.realm.until_routed(pos) if pos else None
        if wait is None:
            return result
        return wait.addBoth(lambda _: result)

    def _run_sent(self, _: object, run: list[PendingSend]) -> None:
        """A run was committed: each of its entries is settled, in order: what
        :meth:`_sent` does (:meth:`_unlist`, then :meth:`_settle`), inline, since this
        is once per message: the two calls are ~1,240 of ~75,000 instructions per IRC
        DM (callgrind, bench/send_path.py --irc --store memory).  A change to those
        changes this too."""
        first = run[0]
        if first.matched and run.count(first) == len(run):
            # one PendingSend for the whole run (quick lines to one target: see
            # _take_lines): what the loop below does, at once
            ctx = first.ctx
            ctx.sends -= len(run)
            if not ctx.sends:
                ctx.finish()
            return
        pending = self.pending_sends
        for entry in run:
            if not entry.matched:
                try:
                    pending.remove(entry)
                except ValueError:
                    pass
            ctx = entry.ctx
            ctx.sends -= 1
            if not ctx.sends:
                ctx.finish()

    def _run_failed(self, failure: Failure, run: list[PendingSend]) -> None:
        for entry in run:
            self._send_failed(failure, entry)

    def _sent(self, _: object, entry: PendingSend) -> None:
        """A queued send was committed (and delivered: its echo, if any, is written)."""
        self._unlist(entry)
        self._settle(entry.ctx)

    def _send_failed(self, failure: Failure, entry: PendingSend) -> None:
        """A queued send was refused (the realm's error as a numeric: not for a
        NOTICE) or failed (logged; 400)."""
        self._unlist(entry)
        ctx = entry.ctx
        if isinstance(failure.value, ChatError):
            if not entry.quiet:
                self.error(ctx, entry.command, failure.value, entry.target)
        else:
            self._crashed(failure, ctx, entry.command)
        self._settle(ctx)

    def _unlist(self, entry: PendingSend) -> None:
        """A settled send whose echo was not recognised (refused, or the session was
        still syncing) no longer waits for it.  (:meth:`_run_sent` has a copy of this
        and of :meth:`_settle`, for speed.)"""
        if not entry.matched:
            try:
                self.pending_sends.remove(entry)
            except ValueError:
                pass

    def _settle(self, ctx: Reply) -> None:
        ctx.sends -= 1
        if not ctx.sends:
            ctx.finish()

    def lineReceived(self, line: bytes) -> None:
        if self.state in CLOSED_STATES:
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
            self._fatal("Excess Flood")
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
        own = self._open_batch()
        try:
            while self._queue and self.state not in CLOSED_STATES:
                if self._bucket.take(self.factory.clock.seconds()):
                    self._schedule_drain()
                    return
                self._handle(self._queue.popleft())
        finally:
            if own:
                self._end_batch()
        if self.state not in CLOSED_STATES and not self._after_barrier:
            self.transport.resumeProducing()

    def _handle(self, raw: bytes) -> None:
        if self._barrier:  # a group change is pending: what follows may depend on it
            if len(self._after_barrier) >= MAX_QUEUED:
                self.realm.stats.rate_limited("irc_flood")
                self._fatal("Excess Flood")
                return
            if not self._after_barrier:
                self.transport.pauseProducing()
            self._after_barrier.append(raw)
            return
        if raw is _TOO_LONG:
            self._fatal("Input line was too long")
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
            self._invalid_utf8(raw)
            return
        # The lean lane: a PRIVMSG or NOTICE with no tags and one target, from a
        # registered client (most lines), skips the general parse and checks.
        quick = quick_match(text) if not tags_size and self.state == "ready" else None
        if quick is not None:  # (what quick_message gives, without the call)
            command, target, body = quick.groups()
            # What self._reply(None) does, inline: the call is ~750 of ~75,000
            # instructions per IRC DM (callgrind, bench/send_path.py --irc --store
            # memory).  A change to _reply changes this too.
            if self.replies:
                ctx = Reply(self, None, held=True)
                ctx.queued = True
                self.replies.append(ctx)
            else:
                ctx = Reply(self, None)
            handler = None
        else:
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
            if len(params) < need or (need and not params[0]):  # (only the first: may be "")
                ctx.num("461", command, "Not enough parameters")
                ctx.finish()
                return
            if self._sends and command not in _BATCHED:
                self.flush_sends()  # the sends read before this command go first
        try:
            if handler is None:  # (the sender's mask: what privmsg looks up)
                mask = self.factory.directory.mask(self.user_id)
                notice = command == "NOTICE"
                _messages.send_text(self, ctx, command, mask, target, body, None, notice)
                result = None
            else:
                result = handler(self, ctx, params, tags)
        except ChatError as e:
            where = target if handler is None else params[0] if params else "*"
            self.error(ctx, command, e, where)
            result = None
        except Exception:
            self.log.failure("IRC {command} from {peer} failed", command=command, peer=self.peer())
            ctx.num("400", command, "Internal error; it was logged")
            result = None
        if ctx.sends:  # sends queued in this batch: the last one settled finishes it
            if not ctx.queued:
                ctx.queued = True
                self.replies.append(ctx)
        elif isinstance(result, Deferred):
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

    def _invalid_utf8(self, raw: bytes) -> None:
        """A line that is not UTF-8 (``UTF8ONLY``): not handled, answered ``FAIL
        <command> INVALID_UTF8`` (the IRCv3 utf8-only spec's example, what
        conformance tests expect), with the line's ``label`` (labeled-response);
        ``*`` when the command itself cannot be read."""
        try:
            tags, command, _params = parse_line(raw.decode("utf-8", "replace"))
        except IRCBadLine:
            tags, command = {}, "*"
        if "\ufffd" in command:  # (parse_line takes no such command: belt and braces)
            command = "*"
        label = tags.get("label") if "labeled-response" in self.caps else None
        if label is not None and "\ufffd" in label:  # a label we cannot echo as sent
            label = None
        ctx = self._reply(label)
        ctx.send(
            format_line(self.server, "FAIL", command[:32], "INVALID_UTF8", "Lines must be UTF-8")
        )
        ctx.finish()

    def _barrier_done(self, result: Any) -> Any:
        """A group change completed: run the lines that came after it, up to the
        next group change."""
        self._barrier = False
        waiting = self._after_barrier
        own = self._open_batch()
        try:
            while waiting and not self._barrier and self.state not in CLOSED_STATES:
                self._handle(waiting.popleft())
        finally:
            if own:
                self._end_batch()
        if not waiting and self.state not in CLOSED_STATES and not self._queue:
            self.transport.resumeProducing()
        return result

    def _fatal(self, message: str) -> None:
        """A line that ends the connection, in its turn (see :meth:`close_after`)."""
        ctx = self._reply(None)
        self.close_after(ctx, message)
        ctx.finish()

    def _reply(self, label: str | None) -> Reply:
        """The Reply for a new command: held behind the pending ones, if any.  (The
        lean lane of :meth:`_handle` has its own copy of this, for speed.)"""
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
        if known is None or (known[0] == "405" and command != "JOIN"):  # 405: JOIN's
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
        guests = self.factory.realm.guests
        if guests.by_nick:  # a guest's nick names it while it is connected (not cached)
            guest = guests.user_of(target)
            if guest is not None:
                return guest
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

    def known_user(self, nick: str) -> str | None:
        """The address of the user ``nick`` names if the realm knows them (WHO, WHOIS,
        KILL), else None: a channel, a malformed nick or an unknown user."""
        try:
            user = self.resolve(nick)
        except ChatError:
            return None
        return user if user and self.realm.is_user(user) else None

    def group_address(self, chan: str) -> str:
        if not chan.startswith("#"):
            raise ChatError("no_such_group")
        return str(address.parse(group_of(chan), self.realm.realm, group=True))

    # connection commands ------------------------------------------------------------

    @command("PING", params=1, early=True)
    def irc_PING(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        ctx.send(format_line(self.server, "PONG", self.server, params[0]))

    @command("PONG", early=True)
    def irc_PONG(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        return None

    @command("QUIT", early=True)
    def irc_QUIT(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        """Close once the replies to the commands before it are written (nothing
        after it is handled)."""
        reason = shown_label(params[0]) if params else ""  # (shown to others as sent)
        self.quit_reason = f"Quit: {reason}"
        self.close_after(ctx, f"Closing link: {self.nick} (Quit: {reason})", quit=True)

    @command("MOTD")
    def irc_MOTD(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        _registration.motd(self, ctx)

    @command("LUSERS")
    def irc_LUSERS(self, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
        _registration.lusers(self, ctx)

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
