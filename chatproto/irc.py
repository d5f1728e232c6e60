"""The IRC gateway: real IRC clients (irssi, weechat, HexChat) on the realm.

:class:`IRCProtocol` is a translator like :class:`chatproto.protocol.ClientProtocol`:
it parses IRC lines (``irc_<COMMAND>`` dispatch, as ``twisted.words.protocols.irc``
does), calls the realm service or the logged-in :class:`chatproto.realm.Session`, and
turns :class:`chatproto.errors.ChatError` into numerics.  It decides nothing: every rule
(who may send, join, kick, set a topic) lives in the realm.

It is also the session's *mind*.  A gateway connection is an ordinary realm session of
the device ``irc``: it acknowledges what it has written, so an IRC user who comes back
gets everything said while they were away (offline backlog after login, with
``server-time`` tags) -- the always-on bouncer behaviour -- and ``CHATHISTORY`` pages
older history.  Messages sent from IRC are stored before they are delivered, with the
same guarantees as native ones.

Mapping (documented in docs/irc.md): the nick is the account name; a local user is
``name``, a user of another realm ``name/realm``; the group ``#name@realm`` is the
channel ``#name`` (``#name/realm`` for another realm).  Group roles map onto channel
prefixes: owner ``~`` (mode ``q``), admin ``@`` (mode ``o``).

The fan-out hot path is :meth:`IRCProtocol.deliver`: the line for a message is the same
for every receiver, so it is encoded once per message (and per tag variant) and cached
on the factory; during a delivery burst each connection holds its lines and writes them
in one ``write`` when the burst ends.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.words.protocols import irc as twirc
from zope.interface import implementer

import chatproto
from chatproto import address
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.groups import MAX_TOPIC
from chatproto.protocol import ClientFactory
from chatproto.ratelimit import TokenBucket
from chatproto.realm import MAX_STATUS_TEXT, ISessionMind, Notice, RealmService, Session

__all__ = [
    "CAPABILITIES",
    "DEVICE",
    "IRCFactory",
    "IRCProtocol",
    "channel_of",
    "group_of",
    "nick_of",
    "parse_line",
    "user_of",
]

#: The realm device every IRC connection of an account logs in as (its ack position is
#: where the next IRC login resumes).
DEVICE = "irc"
#: IRCv3 capabilities offered in CAP LS (``sasl`` gets its mechanism list with 302).
CAPABILITIES = (
    "away-notify",
    "batch",
    "draft/chathistory",
    "echo-message",
    "labeled-response",
    "message-tags",
    "sasl",
    "server-time",
)
#: Longest line (without tags, with CR LF) a client may send and the server sends.
MAX_LINE = 512
#: Longest tag section of a line (with the ``@`` and the space), per the message-tags spec.
MAX_TAGS = 8191
#: Targets one PRIVMSG/NOTICE may name (``TARGMAX``).
MAX_TARGETS = 4
#: Seconds between writing an item and acknowledging it to the realm.
ACK_DELAY = 1.0
#: Lines held back by the flood limit before the connection is closed (Excess Flood).
MAX_QUEUED = 256
#: Base64 chunk size of AUTHENTICATE.
SASL_CHUNK = 400

_CRLF = b"\r\n"
_batch_ids = itertools.count(1)


class IRCBadLine(Exception):
    """A line that cannot be parsed (it is ignored, as RFC 1459 asks)."""


# -- parsing ------------------------------------------------------------------------

_TAG_UNESCAPE = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}


def _unescape_tag(value: str) -> str:
    if "\\" not in value:
        return value
    out = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append(_TAG_UNESCAPE.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def _escape_tag(value: str) -> str:
    return (
        value.replace("\\", "\\\\")
        .replace(";", "\\:")
        .replace(" ", "\\s")
        .replace("\r", "\\r")
        .replace("\n", "\\n")
    )


def parse_line(line: str) -> tuple[dict[str, str], str, list[str]]:
    """``@tags :prefix COMMAND params`` -> (tags, upper-case command, params).

    The part after the tags is split by ``twisted.words.protocols.irc.parsemsg``; the
    client's prefix is ignored.  Raises :class:`IRCBadLine` for an empty or broken line.
    """
    tags: dict[str, str] = {}
    if line.startswith("@"):
        raw, _, line = line.partition(" ")
        for item in raw[1:].split(";"):
            if item:
                key, _, value = item.partition("=")
                tags[key] = _unescape_tag(value)
        line = line.lstrip(" ")
    line = line.lstrip(" ")
    if not line or (line.startswith(":") and " " not in line.strip()):
        raise IRCBadLine("empty line")
    try:
        _prefix, command, params = twirc.parsemsg(line)
    except (twirc.IRCBadMessage, ValueError, IndexError):
        raise IRCBadLine("unparsable line") from None
    if not command or not command.isalnum():
        raise IRCBadLine("bad command")
    return tags, command.upper(), params


# -- names ----------------------------------------------------------------------------


def nick_of(user: str, realm: str) -> str:
    """The IRC nick of a canonical user address: ``name`` or ``name/realm``."""
    name, _, where = user.partition("@")
    return name if where == realm or not where else f"{name}/{where}"


def user_of(nick: str) -> str:
    """The realm address text of a nick (``name/realm`` -> ``name@realm``)."""
    return nick.replace("/", "@", 1)


def channel_of(group: str, realm: str) -> str:
    """The IRC channel of a canonical group address: ``#name`` or ``#name/realm``."""
    name, _, where = group.partition("@")
    return name if where == realm or not where else f"{name}/{where}"


def group_of(channel: str) -> str:
    """The realm address text of a channel (``#name/realm`` -> ``#name@realm``)."""
    return channel.replace("/", "@", 1)


def _server_time(ts: float) -> str:
    whole = int(ts)
    ms = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def _param(text: str) -> str:
    """A middle parameter cannot hold spaces or start with ':'."""
    return text.replace(" ", "_").lstrip(":") or "*"


#: Commands whose last parameter is free text, always sent as trailing (``:text``).
_TEXT_COMMANDS = frozenset(
    {"PRIVMSG", "NOTICE", "TOPIC", "KICK", "PART", "QUIT", "ERROR", "AWAY", "FAIL", "CAP"}
)


def _line(source: str | None, command: str, *params: str) -> bytes:
    """One line; the last parameter is sent as trailing (``:text``) for numerics and
    text commands, or when it needs to be (empty, spaces, leading ``:``)."""
    parts = [f":{source} {command}" if source else command]
    if params:
        parts.extend(params[:-1])
        last = params[-1]
        if (
            command in _TEXT_COMMANDS
            or command[0].isdigit()
            or not last
            or " " in last
            or last[0] == ":"
        ):
            last = ":" + last
        parts.append(last)
    data = " ".join(parts).encode("utf-8", "replace")
    if len(data) > MAX_LINE - 2:  # RFC 1459 limit: truncate (a long topic, a long reason)
        cut = MAX_LINE - 2
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # not inside a character
            cut -= 1
        data = data[:cut]
    return data + _CRLF


def _with_tag(line: bytes, tag: bytes) -> bytes:
    if line.startswith(b"@"):
        return b"@" + tag + b";" + line[1:]
    return b"@" + tag + b" " + line


def _split_utf8(text: str, limit: int) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` UTF-8 bytes, at spaces when one
    is near the end of the piece, never inside a character."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return [text]
    out = []
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # do not split a character
            cut -= 1
        space = data.rfind(b" ", max(1, cut - 80), cut)
        if space > 0:
            cut = space + 1
        out.append(data[:cut].decode("utf-8", "replace"))
        data = data[cut:]
    if data:
        out.append(data.decode("utf-8", "replace"))
    return out


def _body_lines(body: str, limit: int) -> list[str]:
    """A message body as IRC texts: one per body line, long lines split."""
    out: list[str] = []
    for raw in body.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "").split("\n"):
        if raw:
            out.extend(_split_utf8(raw, limit))
    return out or [" "]


# -- numerics for realm errors ------------------------------------------------------

#: ChatError code -> (numeric, text).  The target of the numeric is the request's target.
_ERROR_NUMERICS = {
    "no_such_user": ("401", "No such nick"),
    "bad_address": ("401", "No such nick/channel"),
    "remote_realm": ("401", "That realm is not reachable (federation is off)"),
    "no_such_group": ("403", "No such channel"),
    "not_member": ("442", "You're not on that channel"),
    "forbidden": ("482", "You're not channel operator"),
    "banned": ("474", "Cannot join channel (+b)"),
    "not_invited": ("473", "Cannot join channel (+i)"),
    "group_full": ("471", "Cannot join channel (+l)"),
    "limit_reached": ("405", "You have joined too many channels"),
    "already_member": ("443", "is already on channel"),
    "group_exists": ("403", "Channel exists"),
}


class _Reply:
    """The replies to one command: written at once, or collected for a labeled
    response (one line gets the ``label`` tag; several go in a labeled batch; none
    gets ``ACK``)."""

    __slots__ = ("label", "lines", "proto")

    def __init__(self, proto: IRCProtocol, label: str | None) -> None:
        self.proto = proto
        self.label = label
        self.lines: list[bytes] | None = [] if label is not None else None

    def send(self, line: bytes) -> None:
        if self.lines is None:
            self.proto._write(line)
        else:
            self.lines.append(line)

    def num(self, code: str, *params: str) -> None:
        p = self.proto
        self.send(_line(p.server, code, p.nick, *params))

    def finish(self) -> None:
        lines, self.lines = self.lines, None
        if lines is None or self.label is None:
            return
        p = self.proto
        label = b"label=" + _escape_tag(self.label).encode("utf-8", "replace")
        if not lines:
            p._write(_with_tag(f":{p.server} ACK\r\n".encode(), label))
        elif len(lines) == 1 or not p.has("batch"):
            p._write(b"".join([_with_tag(lines[0], label), *lines[1:]]))
        else:
            ref = f"L{next(_batch_ids)}"
            tag = b"batch=" + ref.encode()
            start = _with_tag(f":{p.server} BATCH +{ref} labeled-response\r\n".encode(), label)
            body = b"".join(_with_tag(line, tag) for line in lines)
            p._write(start + body + f":{p.server} BATCH -{ref}\r\n".encode())


class _Send:
    """A PRIVMSG/NOTICE on its way through the realm, until its echo is recognised."""

    __slots__ = ("body", "ctx", "matched", "to")

    def __init__(self, to: str, body: str, ctx: _Reply) -> None:
        self.to = to
        self.body = body
        self.ctx = ctx
        self.matched = False


#: The reply object for unlabeled commands: writes straight through.
class _Direct(_Reply):
    __slots__ = ()

    def finish(self) -> None:
        pass


@implementer(ISessionMind, IPushProducer)
class IRCProtocol(LineOnlyReceiver):
    """One IRC client connection.  States: ``registering`` -> ``ready`` -> ``closed``."""

    log = Logger()
    factory: IRCFactory
    transport: Any
    delimiter = b"\n"
    MAX_LENGTH = MAX_TAGS + MAX_LINE

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
        self._direct = _Direct(self, None)
        self._tagmode = 0  # bit 1: server-time, bit 2: message-tags (msgid)
        self._pending: deque[_Send] = deque()  # sends awaiting their echo
        self._targets: dict[str, str] = {}  # IRC target -> canonical address
        self._awaiting: dict[tuple[str, str], _Reply] = {}  # (event, group) -> labeled reply
        self._paused = False
        self._paused_bytes = 0
        self._held: list[bytes] | None = None
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
        f.connections.add(self)
        cfg = f.realm.config.irc
        if cfg.flood_rate > 0:
            self._bucket = TokenBucket(cfg.flood_rate, cfg.flood_burst, self.connected_at)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.state = "closed"
        self.factory.connections.discard(self)
        for call in (self._ack_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self._ack_call = self._drain_call = None
        self._queue.clear()
        if self.session is not None:
            self.log.info(
                "IRC session of {user} from {peer} ended: {reason}",
                user=self.session.user_id,
                peer=self._peer(),
                reason=reason.getErrorMessage() if reason is not None else "closed",
            )
            self.session.logout()
            self.session = None
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport else None
        return getattr(peer, "host", str(peer))

    def has(self, cap: str) -> bool:
        return cap in self.caps

    def mask(self, user: str) -> str:
        """``nick!name@realm`` for a canonical user address."""
        nick = nick_of(user, self.realm.realm)
        name, _, where = user.partition("@")
        return f"{nick}!{name}@{where or self.realm.realm}"

    # IPushProducer ------------------------------------------------------------------

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
        if self._held is not None:  # keep order: held lines go out first
            held, self._held = self._held, None
            data = b"".join(held) + data
        if self._paused:
            self._paused_bytes += len(data)
            if self._paused_bytes > self.realm.config.limits.max_output_buffer:
                self.log.info("dropping slow IRC reader {peer}", peer=self._peer())
                self.state = "closed"
                self.transport.abortConnection()
                return
        self.transport.write(data)

    def send_line(self, source: str | None, command: str, *params: str) -> None:
        self._write(_line(source, command, *params))

    # keepalive (called by the factory's sweep, shared with the native protocol) -------

    def login_timed_out(self) -> None:
        self.close_with("Registration timed out")

    def keepalive_expired(self) -> None:
        self.close_with("Ping timeout")

    def send_ping(self) -> None:
        self._write(f"PING :{self.factory.server_name}\r\n".encode())

    def close_with(self, message: str) -> None:
        """``ERROR :message``, then close (the IRC way of ending a connection)."""
        if self.state == "closed":
            return
        self._write(_line(None, "ERROR", message))
        self.state = "closed"
        self.closed_at = self.factory.clock.seconds()
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
        elif self._paused or self.state == "closed":
            self._write(data)
        elif f.realm.bursting:
            self._held = [data]
            f.realm.hold(self)
        else:
            self.transport.write(data)
        if self._ack_call is None:
            self._written()

    def _deliver_other(self, envelope: Envelope) -> None:
        """Events, other kinds, and our own messages (echo-message)."""
        if envelope.kind == "event":
            self._deliver_event(envelope)
            return
        if envelope.sender == self.user_id:
            pending = self._pending
            if pending:
                head = pending[0]
                if head.to == envelope.recipient and head.body == envelope.body:
                    pending.popleft()
                    head.matched = True
                    if "echo-message" in self.caps:
                        head.ctx.send(self.factory.lines(envelope, self._tagmode))
                    self._written()
                    return
            if "echo-message" not in self.caps:
                self._written()  # our own message from elsewhere: the client cannot show it
                return
        self._write(self.factory.lines(envelope, self._tagmode))
        self._written()

    def _written(self) -> None:
        """Acknowledge what was written, a little later (one ack per ACK_DELAY)."""
        if self._ack_call is None and self.session is not None and self.state != "closed":
            self._ack_call = self.factory.clock.callLater(ACK_DELAY, self._ack)

    def _ack(self) -> None:
        self._ack_call = None
        if self.session is None or self.session.closed:
            return
        if self._paused:  # still queued on our side: acknowledge once the client reads
            self._written()
            return
        self.session.ack(self.session._last)

    def flush(self) -> None:
        """Write the lines held during a delivery burst."""
        held, self._held = self._held, None
        if held:
            self._write(b"".join(held))

    def notify(self, notice: Notice) -> None:
        data = notice.data
        if data.get("type") != "presence" or "away-notify" not in self.caps:
            return
        user = data.get("user", "")
        if user == self.user_id:
            return
        status = data.get("status")
        if status in ("away", "busy"):
            self.send_line(self.mask(user), "AWAY", data.get("text") or status)
        elif status == "online":
            self._write(f":{self.mask(user)} AWAY\r\n".encode())

    def synced(self, pos: int) -> None:
        self._written()

    def wait_writable(self) -> Deferred[None]:
        if not self._paused or self.state == "closed":
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
        ctx: _Reply = self._direct
        if env.sender == me:
            ctx = self._awaiting.pop((event, group), self._direct)
        prefix = b""
        if self._tagmode & 1:
            prefix = f"@time={_server_time(env.ts)} ".encode()

        def out(source: str, command: str, *params: str) -> None:
            ctx.send(prefix + _line(source, command, *params))

        if event in ("created", "joined"):
            who = env.sender if event == "created" else user
            if who == me:
                if group not in self.joined:
                    self.joined.add(group)
                    out(actor, "JOIN", chan)
                    self._channel_burst(ctx, group, chan)
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
        elif event == "role":
            nick = nick_of(user, self.realm.realm)
            change = {"owner": "+q", "admin": "-q+o", "member": "-qo"}.get(meta.get("role", ""))
            if change:
                args = [nick] * (len(change) - change.count("+") - change.count("-"))
                out(actor, "MODE", chan, change, *args)
        elif event == "deleted":
            if group in self.joined:
                self.joined.discard(group)
                out(actor, "KICK", chan, self.nick, "the channel was deleted")
        if ctx is not self._direct:
            ctx.finish()
        self._written()

    def _gone(self, user: str, group: str) -> None:
        if user == self.user_id:
            self.joined.discard(group)

    def _channel_burst(self, ctx: _Reply, group: str, chan: str) -> None:
        """Topic and names of a channel the client has just joined."""
        g = self.realm.groups.groups.get(group)
        if g is None:
            return
        if g.topic:
            ctx.num("332", chan, g.topic)
        self._names(ctx, group, chan)

    def _names(self, ctx: _Reply, group: str, chan: str) -> None:
        g = self.realm.groups.groups.get(group)
        if g is not None and (g.visibility == "public" or self.user_id in g.members):
            realm = self.realm.realm
            names = [
                _PREFIXES.get(m.role, "") + nick_of(u, realm) for u, m in sorted(g.members.items())
            ]
            head = f":{self.server} 353 {self.nick} = {chan} :"
            room = MAX_LINE - 2 - len(head.encode())
            chunk: list[str] = []
            size = 0
            for name in names:
                if chunk and size + len(name) + 1 > room:
                    ctx.num("353", "=", chan, " ".join(chunk))
                    chunk, size = [], 0
                chunk.append(name)
                size += len(name) + 1
            if chunk:
                ctx.num("353", "=", chan, " ".join(chunk))
        ctx.num("366", chan, "End of /NAMES list")

    # input --------------------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self.close_with("Input line was too long")

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
        if self.state != "closed":
            self.transport.resumeProducing()

    def _handle(self, raw: bytes) -> None:
        self.last_rx = self.factory.clock.seconds()
        self.pinged = False
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        size = len(raw)
        if raw.startswith(b"@"):  # the 512-byte limit is for the line without its tags
            size -= len(raw) - len(raw.partition(b" ")[2].lstrip(b" "))
        if size > MAX_LINE - 2:
            self._direct.num("417", "Input line was too long")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._direct.send(
                _line(self.server, "FAIL", "*", "INVALID_UTF8", "Lines must be UTF-8")
            )
            return
        try:
            tags, command, params = parse_line(text)
        except IRCBadLine:
            return  # silently ignored, like every IRC server
        label = tags.get("label") if "labeled-response" in self.caps else None
        ctx = _Reply(self, label) if label is not None else self._direct
        handler = _HANDLERS.get(command)
        if handler is None:
            if self.state == "ready":
                ctx.num("421", command[:32], "Unknown command")
            else:
                ctx.num("451", "You have not registered")
            ctx.finish()
            return
        if self.state != "ready" and command not in _PRE_REGISTRATION:
            ctx.num("451", "You have not registered")
            ctx.finish()
            return
        need = _MIN_PARAMS.get(command, 0)
        if len(params) < need or any(not p for p in params[: need if need < 2 else 1]):
            ctx.num("461", command, "Not enough parameters")
            ctx.finish()
            return
        try:
            result = handler(self, ctx, params, tags)
        except ChatError as e:
            self._error(ctx, command, e, params[0] if params else "*")
            result = None
        except Exception:
            self.log.failure("IRC {command} from {peer} failed", command=command, peer=self._peer())
            ctx.num("400", command, "Internal error; it was logged")
            result = None
        if isinstance(result, Deferred):
            result.addErrback(self._crashed, ctx, command)
            result.addBoth(lambda _: ctx.finish())
        else:
            ctx.finish()

    def _crashed(self, failure: Failure, ctx: _Reply, command: str) -> None:
        self.log.failure("IRC {command} failed", failure, command=command)
        ctx.num("400", command, "Internal error; it was logged")

    def _error(self, ctx: _Reply, command: str, err: ChatError, target: str) -> None:
        """A realm error as the numeric an IRC client expects."""
        if err.code == "rate_limited":
            ctx.num("263", command, f"Please wait a while and try again ({err.message})")
            return
        if err.code == "too_large":
            ctx.num("417", err.message)
            return
        known = _ERROR_NUMERICS.get(err.code)
        if known is None:
            ctx.num("400", command, err.message)
            return
        code, text = known
        if code == "401" and target.startswith("#"):
            code, text = "403", "No such channel"
        if code == "442" and command in ("PRIVMSG", "NOTICE"):
            code, text = "404", "Cannot send to channel"
        ctx.num(code, target, text)

    # registration -------------------------------------------------------------------

    def irc_CAP(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        sub = params[0].upper()
        if sub == "LS":
            if self.state != "ready":
                self.cap_negotiating = True
            v302 = len(params) > 1 and params[1].isdigit() and int(params[1]) >= 302
            offered = [c if c != "sasl" or not v302 else "sasl=PLAIN" for c in CAPABILITIES]
            ctx.send(_line(self.server, "CAP", self.nick, "LS", " ".join(offered)))
        elif sub == "LIST":
            ctx.send(_line(self.server, "CAP", self.nick, "LIST", " ".join(sorted(self.caps))))
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
            ctx.send(_line(self.server, "CAP", self.nick, reply, " ".join(wanted)))
        elif sub == "END":
            if self.state != "ready" and self.cap_negotiating:
                self.cap_negotiating = False
                self._try_register()
        else:
            ctx.num("410", sub[:20], "Invalid CAP command")

    def irc_PASS(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        if self.state == "ready" or self.session is not None:
            ctx.num("462", "You may not reregister")
            return
        self.password = params[0]

    def irc_NICK(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        wanted = params[0]
        try:
            name = address.normalise_name(user_of(wanted))
        except ChatError:
            ctx.num("432", _param(wanted), "Erroneous nickname")
            return
        if self.state == "ready":
            if name != address.normalise_name(self.user_id.partition("@")[0]):
                ctx.num("433", _param(wanted), "Your nick is your account name; it cannot change")
            return
        self.nick = wanted
        self._try_register()

    def irc_USER(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        if self.state == "ready" or self.username:
            ctx.num("462", "You may not reregister")
            return
        self.username = params[0][:32]
        self.realname = params[3][:128]
        self._try_register()

    def irc_AUTHENTICATE(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
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
            d: Deferred[Session] = self.realm.login(account, password, self, DEVICE, self._peer())
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
            self._direct.num("464", "Password required: log in with SASL PLAIN or PASS")
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
                self._direct.num(
                    "464",
                    f"Password incorrect ({err.message}, retry after "
                    f"{err.extra.get('retry_after', 1)} s)",
                )
            elif err.code == "auth_failed":
                self._direct.num("464", "Password incorrect")
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
        self.nick = nick_of(self.user_id, realm.realm)
        self.state = "ready"
        ctx = self._direct
        if old != self.nick and old != "*":
            self._write(f":{old}!{self.username}@{realm.realm} NICK {self.nick}\r\n".encode())
        ctx.num("001", f"Welcome to the {realm.realm} chat realm, {self.mask(self.user_id)}")
        ctx.num("002", f"Your host is {self.server}, running version {f.version}")
        ctx.num("003", f"This server was created {f.created}")
        ctx.num("004", self.server, f.version, "i", "biqnot", "bqo")
        for chunk in f.isupport_lines():
            ctx.num("005", *chunk, "are supported by this server")
        self._lusers(ctx)
        self._motd(ctx)
        self.log.info("IRC login {user} from {peer}", user=self.user_id, peer=self._peer())
        for group in sorted(realm.groups.of_user.get(self.user_id, ())):
            chan = channel_of(group, realm.realm)
            self.joined.add(group)
            self._write(f":{self.mask(self.user_id)} JOIN {chan}\r\n".encode())
            self._channel_burst(ctx, group, chan)
        session = self.session

        def failed(f: Failure) -> None:
            self.log.failure("IRC backlog for {user} failed", f, user=session.user_id)
            self.close_with("could not send the backlog; reconnect")

        session.start().addErrback(failed)

    def _lusers(self, ctx: _Reply) -> None:
        realm = self.realm
        users = realm.online_count()
        ctx.num("251", f"There are {users} users and 0 invisible on 1 servers")
        ctx.num("254", str(len(realm.groups.groups)), "channels formed")
        ctx.num("255", f"I have {users} clients and 0 servers")

    def _motd(self, ctx: _Reply) -> None:
        motd = self.realm.config.irc.motd
        if not motd:
            ctx.num("422", "MOTD File is missing")
            return
        ctx.num("375", f"- {self.server} Message of the day - ")
        for text in motd.splitlines() or [""]:
            for piece in _split_utf8(text, 400):
                ctx.num("372", f"- {piece}")
        ctx.num("376", "End of /MOTD command.")

    # connection commands ------------------------------------------------------------

    def irc_PING(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        ctx.send(_line(self.server, "PONG", self.server, params[0]))

    def irc_PONG(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        return None

    def irc_QUIT(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        if self.session is not None:
            if self._ack_call is not None and self._ack_call.active():
                self._ack_call.cancel()
            self._ack()
        self.close_with(f"Closing link: {self.nick} (Quit: {params[0] if params else ''})")

    def irc_MOTD(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        self._motd(ctx)

    def irc_LUSERS(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        self._lusers(ctx)

    def irc_AWAY(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        assert self.session is not None
        text = params[0] if params else ""
        if text:
            self.session.set_status("away", text[:MAX_STATUS_TEXT])
            ctx.num("306", "You have been marked as being away")
        else:
            self.session.set_status("online")
            ctx.num("305", "You are no longer marked as being away")

    def irc_TAGMSG(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        """Client-only tags (typing notices) are not stored or relayed."""
        return None

    # messages -------------------------------------------------------------------------

    def _resolve(self, target: str) -> str:
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

    def irc_PRIVMSG(
        self, ctx: _Reply, params: list[str], tags: dict[str, str], notice: bool = False
    ) -> Any:
        assert self.session is not None
        command = "NOTICE" if notice else "PRIVMSG"
        if len(params) < 2 or not params[1]:
            if not notice:
                ctx.num("412", "No text to send")
            return None
        text = params[1]
        targets = params[0].split(",")
        if len(targets) > MAX_TARGETS:
            if not notice:
                ctx.num("407", params[0][:64], f"Too many targets (at most {MAX_TARGETS})")
            return None
        waits = []
        for target in targets:
            try:
                to = self._resolve(target)
            except ChatError as e:
                if not notice:
                    self._error(ctx, command, e, target)
                continue
            entry = _Send(to, text, ctx)
            self._pending.append(entry)
            d = self.session.send(to, text)
            waits.append(
                d.addCallbacks(
                    self._sent,
                    self._send_failed,
                    callbackArgs=(entry,),
                    errbackArgs=(entry, command, target, notice),
                )
            )
        if not waits:
            return None
        if len(waits) == 1:
            return waits[0]
        from twisted.internet.defer import gatherResults

        return gatherResults(waits)

    def _sent(self, env: Envelope, entry: _Send) -> None:
        if not entry.matched:  # not echoed yet (still syncing): no label then
            try:
                self._pending.remove(entry)
            except ValueError:
                pass

    def _send_failed(
        self, f: Failure, entry: _Send, command: str, target: str, notice: bool
    ) -> None:
        if not entry.matched:
            try:
                self._pending.remove(entry)
            except ValueError:
                pass
        f.trap(ChatError)
        if not notice:
            self._error(entry.ctx, command, f.value, target)  # type: ignore[arg-type]

    def irc_NOTICE(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        return self.irc_PRIVMSG(ctx, params, tags, notice=True)

    # channels -------------------------------------------------------------------------

    def _group(self, chan: str) -> str:
        if not chan.startswith("#"):
            raise ChatError("no_such_group")
        return str(address.parse(group_of(chan), self.realm.realm, group=True))

    def _event(self, ctx: _Reply, command: str, chan: str, event: str, **args: Any) -> Any:
        """One group change through the realm; errors become numerics for ``chan``."""
        assert self.session is not None
        try:
            group = self._group(chan)
        except ChatError as e:
            self._error(ctx, command, e, chan)
            return None
        if ctx is not self._direct:
            self._awaiting[(event, group)] = ctx
        d = self.session.group_event(event, group, **args)

        def failed(f: Failure) -> None:
            self._awaiting.pop((event, group), None)
            f.trap(ChatError)
            err: ChatError = f.value  # type: ignore[assignment]
            target = chan
            if err.code == "not_member" and args.get("user") and command == "KICK":
                ctx.num(
                    "441",
                    nick_of(args["user"], self.realm.realm),
                    chan,
                    "They aren't on that channel",
                )
                return
            if err.code == "already_member" and command == "INVITE":
                ctx.num(
                    "443", nick_of(args["user"], self.realm.realm), chan, "is already on channel"
                )
                return
            if err.code == "no_such_user":
                target = nick_of(args.get("user", "*"), self.realm.realm)
            self._error(ctx, command, err, target)

        def done(env: Envelope) -> Envelope:
            self._awaiting.pop((event, group), None)
            return env

        return d.addCallbacks(done, failed)

    def irc_JOIN(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        if params[0] == "0":  # JOIN 0 = part every channel
            waits = [
                self._event(ctx, "PART", channel_of(g, self.realm.realm), "left")
                for g in sorted(self.joined)
            ]
            return _all(waits)
        waits = []
        for chan in params[0].split(",")[:MAX_TARGETS]:
            try:
                group = self._group(chan)
            except ChatError:
                ctx.num("403", _param(chan), "No such channel")
                continue
            g = self.realm.groups.groups.get(group)
            if g is None and not group.endswith("@" + self.realm.realm):
                # another realm's group we have no member of yet: ask its home realm
                # (the JOIN comes when the home realm's joined event does)
                waits.append(self._event(ctx, "JOIN", chan, "joined"))
            elif g is None:
                waits.append(self._event(ctx, "JOIN", chan, "created"))
            elif self.user_id in g.members:
                if group not in self.joined:  # a member whose client had closed it
                    self.joined.add(group)
                    ctx.send(_line(self.mask(self.user_id), "JOIN", chan))
                    self._channel_burst(ctx, group, chan)
            else:
                waits.append(self._event(ctx, "JOIN", chan, "joined"))
        return _all(waits)

    def irc_PART(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        return _all(
            [self._event(ctx, "PART", chan, "left") for chan in params[0].split(",")[:MAX_TARGETS]]
        )

    def irc_TOPIC(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        chan = params[0]
        if len(params) > 1:
            return self._event(ctx, "TOPIC", chan, "topic", topic=params[1][:MAX_TOPIC])
        assert self.session is not None
        info = self.realm.group_info(self.session, self._group(chan))
        if info["topic"]:
            ctx.num("332", chan, info["topic"])
        else:
            ctx.num("331", chan, "No topic is set")
        return None

    def irc_NAMES(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        if not params:
            ctx.num("366", "*", "End of /NAMES list")
            return
        for chan in params[0].split(",")[:MAX_TARGETS]:
            try:
                group = self._group(chan)
            except ChatError:
                ctx.num("366", _param(chan), "End of /NAMES list")
                continue
            self._names(ctx, group, chan)

    def irc_LIST(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> None:
        wanted = None
        if params and params[0]:
            wanted = set()
            for chan in params[0].split(","):
                try:
                    wanted.add(self._group(chan))
                except ChatError:
                    pass
        ctx.num("321", "Channel", "Users  Name")
        for info in self.realm.list_groups():
            if wanted is None or info["group"] in wanted:
                chan = channel_of(info["group"], self.realm.realm)
                ctx.num("322", chan, str(info["members"]), info["topic"])
        ctx.num("323", "End of /LIST")

    def irc_INVITE(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        nick, chan = params[0], params[1]
        try:
            user = self._resolve(nick)
        except ChatError:
            ctx.num("401", _param(nick), "No such nick")
            return None
        d = self._event(ctx, "INVITE", chan, "invited", user=user)
        if d is None:
            return None

        def invited(env: Any) -> None:
            if isinstance(env, Envelope):
                ctx.num("341", nick_of(user, self.realm.realm), chan)

        return d.addCallback(invited)

    def irc_KICK(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        chan = params[0]
        reason = params[2] if len(params) > 2 else ""
        waits = []
        for nick in params[1].split(",")[:MAX_TARGETS]:
            try:
                user = self._resolve(nick)
            except ChatError:
                ctx.num("401", _param(nick), "No such nick")
                continue
            waits.append(self._event(ctx, "KICK", chan, "kicked", user=user, reason=reason))
        return _all(waits)

    def irc_MODE(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        target = params[0]
        if not target.startswith("#"):
            try:
                same = self._resolve(target) == self.user_id
            except ChatError:
                same = False
            if not same:
                ctx.num("502", "Cant change mode for other users")
            elif len(params) > 1 and params[1].strip("+-i"):
                ctx.num("501", "Unknown MODE flag")
            else:
                ctx.num("221", "+i")
            return None
        group = self._group(target)
        g = self.realm.groups.get(group)
        if len(params) == 1:
            modes = "+int" if g.visibility == "invite" else "+nt"
            ctx.num("324", target, modes)
            return None
        modestring, args = params[1], list(params[2:])
        sign = "+"
        changes: list[tuple[str, str, str | None]] = []
        for c in modestring:
            if c in "+-":
                sign = c
            elif c in "bqo":
                if not args:
                    if c == "b" and sign == "+":
                        changes.append(("+", "b", None))  # list bans
                        continue
                    ctx.num("461", "MODE", "Not enough parameters")
                    return None
                changes.append((sign, c, args.pop(0)))
            elif c == "i":
                want = sign == "+"
                if want != (g.visibility == "invite"):
                    ctx.num(
                        "472",
                        c,
                        "is unknown mode char to me "
                        "(invite-only is chosen when the group is created)",
                    )
            elif c in "nt":
                pass  # always on: only members speak, only admins set the topic
            else:
                ctx.num("472", c, "is unknown mode char to me")
        waits: list[Any] = []
        for sign, c, arg in changes:
            if arg is None:
                if self.user_id in g.members or g.visibility == "public":
                    realm = self.realm.realm
                    for user in sorted(g.bans):
                        ctx.num("367", target, f"{nick_of(user, realm)}!*@*")
                ctx.num("368", target, "End of channel ban list")
                continue
            nick = arg.partition("!")[0]
            try:
                user = self._resolve(nick)
            except ChatError:
                ctx.num("401", _param(nick), "No such nick")
                continue
            if c == "b":
                event = "banned" if sign == "+" else "unbanned"
                waits.append(self._chain(waits, ctx, target, event, user=user))
            else:
                role = {"+q": "owner", "-q": "admin", "+o": "admin", "-o": "member"}[sign + c]
                waits.append(self._chain(waits, ctx, target, "role", user=user, role=role))
        return _all(waits)

    def _chain(self, before: list[Any], ctx: _Reply, chan: str, event: str, **args: Any) -> Any:
        """Mode changes one after another, in the order given."""
        prev = before[-1] if before else None
        if prev is None or not isinstance(prev, Deferred):
            return self._event(ctx, "MODE", chan, event, **args)
        return prev.addBoth(lambda _: self._event(ctx, "MODE", chan, event, **args))

    # users ----------------------------------------------------------------------------

    def irc_WHO(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        assert self.session is not None
        mask = params[0] if params else "*"
        if mask.startswith("#"):
            try:
                members = self.realm.members(self.session, self._group(mask))
                roles = {m["user"]: m["role"] for m in members}
            except ChatError:
                roles = {}
            for user, role in roles.items():
                self._who_line(ctx, mask, user, _PREFIXES.get(role, ""))
        elif mask != "*":
            try:
                user = self._resolve(mask)
            except ChatError:
                user = ""
            if user and self.realm.is_user(user):
                self._who_line(ctx, "*", user, "")
        ctx.num("315", _param(mask), "End of WHO list")
        return None

    def _who_line(self, ctx: _Reply, chan: str, user: str, prefix: str) -> None:
        realm = self.realm.realm
        name, _, where = user.partition("@")
        presence = self.realm.presence_of(user)
        flag = "G" if presence and presence[0] in ("away", "busy", "offline") else "H"
        ctx.num(
            "352", chan, name, where, self.server, nick_of(user, realm), flag + prefix, f"0 {name}"
        )

    def irc_WHOIS(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        nick = params[-1].split(",")[0]
        try:
            user = self._resolve(nick)
        except ChatError:
            user = ""
        if not user or not self.realm.is_user(user):
            ctx.num("401", _param(nick), "No such nick")
            ctx.num("318", _param(nick), "End of /WHOIS list")
            return None
        realm = self.realm.realm
        name, _, where = user.partition("@")
        n = nick_of(user, realm)
        ctx.num("311", n, name, where, "*", name)
        chans = []
        for group in sorted(self.realm.groups.of_user.get(user, ())):
            g = self.realm.groups.groups[group]
            if g.visibility == "public" or self.user_id in g.members:
                chans.append(_PREFIXES.get(g.members[user].role, "") + channel_of(group, realm))
        if chans:
            ctx.num("319", n, " ".join(chans))
        ctx.num("312", n, self.server, f"chatproto realm {realm}")
        presence = self.realm.presence_of(user)
        if presence and presence[0] in ("away", "busy"):
            ctx.num("301", n, presence[1] or presence[0])
        ctx.num("330", n, n, "is logged in as")
        ctx.num("318", n, "End of /WHOIS list")
        return None

    # history --------------------------------------------------------------------------

    def irc_CHATHISTORY(self, ctx: _Reply, params: list[str], tags: dict[str, str]) -> Any:
        """``CHATHISTORY LATEST|BEFORE|AFTER <target> <*|msgid=ID> <limit>`` (msgids are
        realm stream positions)."""

        def fail(code: str, *args: str) -> None:
            ctx.send(_line(self.server, "FAIL", "CHATHISTORY", code, *args))

        assert self.session is not None
        sub = params[0].upper()
        if sub not in ("LATEST", "BEFORE", "AFTER") or len(params) < 4:
            fail("INVALID_PARAMS", sub[:20], "Supported: LATEST, BEFORE, AFTER with * or msgid=")
            return None
        target, ref, count = params[1], params[2], params[3]
        page = self.realm.config.limits.history_page
        pos: int | None = None
        if ref != "*":
            key, _, value = ref.partition("=")
            if key != "msgid" or not value.isdigit():
                fail("INVALID_MSGREFTYPE", sub, _param(ref), "Only msgid references are supported")
                return None
            pos = int(value)
        if not count.isdigit() or not 1 <= int(count) <= page:
            fail("INVALID_PARAMS", sub, f"limit must be 1 to {page}")
            return None
        if ref == "*" and sub != "LATEST":
            fail("INVALID_PARAMS", sub, "BEFORE and AFTER need a msgid")
            return None
        try:
            peer = self._resolve(target)
        except ChatError:
            fail("INVALID_TARGET", sub, _param(target), "No such target")
            return None
        before = pos if sub == "BEFORE" else None
        after = pos if sub == "AFTER" else None
        if sub == "LATEST" and pos is not None:
            after = pos  # the newest items after the reference (at most limit)
        d = self.session.history(peer, before, after, int(count))

        def got(items: list[Envelope]) -> None:
            ref_id = f"H{next(_batch_ids)}"
            tag = f"batch={ref_id}".encode()
            lines = [f":{self.server} BATCH +{ref_id} chathistory {_param(target)}\r\n".encode()]
            for env in items:
                if env.kind == "event":
                    continue
                lines.append(
                    _with_tag(self.factory.lines(env, 3), tag)
                    if self.has("batch")
                    else self.factory.lines(env, self._tagmode)
                )
            lines.append(f":{self.server} BATCH -{ref_id}\r\n".encode())
            if not self.has("batch"):
                lines = lines[1:-1]
            for line in lines:
                ctx.send(line)

        def failed(f: Failure) -> None:
            f.trap(ChatError)
            message = getattr(f.value, "message", "no history")
            fail("INVALID_TARGET", sub, _param(target), message)

        return d.addCallbacks(got, failed)


def _all(waits: Iterable[Any]) -> Any:
    ds = [d for d in waits if isinstance(d, Deferred)]
    if not ds:
        return None
    if len(ds) == 1:
        return ds[0]
    from twisted.internet.defer import gatherResults

    return gatherResults(ds, consumeErrors=True)


_PREFIXES = {"owner": "~", "admin": "@"}
#: Commands a client may send before registration completes.
_PRE_REGISTRATION = frozenset(
    {"CAP", "PASS", "NICK", "USER", "AUTHENTICATE", "PING", "PONG", "QUIT"}
)
#: Least number of parameters per command (461 below that).
_MIN_PARAMS = {
    "CAP": 1,
    "PASS": 1,
    "NICK": 1,
    "USER": 4,
    "AUTHENTICATE": 1,
    "PING": 1,
    "PRIVMSG": 1,
    "NOTICE": 1,
    "JOIN": 1,
    "PART": 1,
    "TOPIC": 1,
    "INVITE": 2,
    "KICK": 2,
    "MODE": 1,
    "WHOIS": 1,
    "CHATHISTORY": 2,
    "TAGMSG": 1,
}
_HANDLERS: dict[str, Callable[..., Any]] = {
    name[len("irc_") :]: fn for name, fn in vars(IRCProtocol).items() if name.startswith("irc_")
}


class IRCFactory(ClientFactory):
    """Builds :class:`IRCProtocol` for one realm.

    Holds the realm, a ``clock`` tests may replace, the live connections (one keepalive
    sweep for all, as :class:`chatproto.protocol.ClientFactory` does) and the encoded
    lines of the message being fanned out.
    """

    protocol = IRCProtocol  # type: ignore[assignment]
    noisy = False
    log = Logger()

    def __init__(self, realm: RealmService, clock: Any = None) -> None:
        super().__init__(realm, clock)
        cfg = realm.config.irc
        self.server_name = cfg.server_name or realm.realm
        self.version = f"chatproto-{chatproto.__version__}"
        self.created = _server_time(self.clock.seconds())
        self._cache_env: Envelope | None = None
        self._cache: list[bytes | None] = [None, None, None, None]
        self._isupport: list[list[str]] | None = None

    def isupport_lines(self) -> list[list[str]]:
        """RPL_ISUPPORT tokens, at most 13 per line."""
        if self._isupport is None:
            realm = self.realm
            lim = realm.config.limits
            tokens = [
                f"AWAYLEN={MAX_STATUS_TEXT}",
                "CASEMAPPING=ascii",
                f"CHANLIMIT=#:{lim.max_groups_per_user}",
                "CHANMODES=b,,,int",
                f"CHANNELLEN={1 + address.MAX_NAME + 1 + address.MAX_REALM}",
                "CHANTYPES=#",
                f"CHATHISTORY={lim.history_page}",
                f"KICKLEN={MAX_TOPIC}",
                "MODES=4",
                "MSGREFTYPES=msgid",
                f"NETWORK={realm.realm}",
                f"NICKLEN={address.MAX_NAME}",
                "PREFIX=(qo)~@",
                f"TARGMAX=PRIVMSG:{MAX_TARGETS},NOTICE:{MAX_TARGETS},JOIN:{MAX_TARGETS},"
                f"PART:{MAX_TARGETS},KICK:{MAX_TARGETS},NAMES:{MAX_TARGETS},WHOIS:1",
                f"TOPICLEN={MAX_TOPIC}",
                "USERLEN=32",
                "UTF8ONLY",
            ]
            self._isupport = [tokens[i : i + 13] for i in range(0, len(tokens), 13)]
        return self._isupport

    def lines(self, env: Envelope, mode: int) -> bytes:
        """The encoded PRIVMSG line(s) of a text item, the same for every receiver;
        ``mode`` bit 1 adds ``time``, bit 2 ``msgid`` (the stream position).  Cached for
        the item being fanned out, so R receivers cost one encoding."""
        if env is not self._cache_env:
            self._cache_env = env
            self._cache = [None, None, None, None]
        cached = self._cache[mode]
        if cached is not None:
            return cached
        plain = self._cache[0]
        if plain is None:
            plain = self._cache[0] = self._encode(env)
        if mode == 0:
            return plain
        tags = []
        if mode & 1:
            tags.append(f"time={_server_time(env.ts)}")
        if mode & 2:
            tags.append(f"msgid={env.pos}")
        prefix = ("@" + ";".join(tags) + " ").encode()
        out = b"".join(prefix + line + _CRLF for line in plain.split(_CRLF)[:-1])
        self._cache[mode] = out
        return out

    def _encode(self, env: Envelope) -> bytes:
        realm = self.realm.realm
        sender = env.sender
        name, _, where = sender.partition("@")
        source = f":{nick_of(sender, realm)}!{name}@{where} "
        if env.recipient.startswith("#"):
            target = channel_of(env.recipient, realm)
        else:
            target = nick_of(env.recipient, realm)
        if env.kind == "text":
            head = f"{source}PRIVMSG {target} :"
            body = env.body
        elif env.kind == "bounce":  # another realm refused what we sent: from the server
            head = f":{self.server_name} NOTICE {target} :"
            body = f"[not delivered] {env.body}"
        elif env.kind == "file":  # IRC cannot carry it: a notice saying how to fetch it
            head = f"{source}NOTICE {target} :"
            meta = env.meta or {}
            body = (
                f"[file] {meta.get('name', env.body)} ({meta.get('size', '?')} bytes, "
                f"{meta.get('media_type', 'application/octet-stream')}): fetch it with a "
                f"chatproto client, file id {meta.get('file_id', '?')}"
            )
        else:  # kinds to come: a notice naming what it is
            head = f"{source}NOTICE {target} :"
            body = f"[{env.kind}] {env.body}".strip()
        hb = head.encode("utf-8")
        room = MAX_LINE - 2 - len(hb)
        if len(env.body) * 4 <= room and "\n" not in body and "\r" not in body:
            return hb + body.encode("utf-8", "replace").replace(b"\0", b"") + _CRLF
        return b"".join(
            hb + piece.encode("utf-8", "replace") + _CRLF for piece in _body_lines(body, room)
        )
