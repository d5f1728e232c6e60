"""Read markers for IRC clients: IRCv3 ``draft/read-marker`` (``MARKREAD``).

The realm keeps one read marker per user and conversation, a stream position
(chatproto.realm.reading); IRC names a marker by the ``time`` of the last message
read.  This module translates both ways:

- ``MARKREAD <target> timestamp=T`` from a client moves the realm's marker to the
  newest item of the conversation shown at ``T`` or before (``time`` tags have
  milliseconds: an item of that millisecond counts), through
  ``Reading.mark_read_until`` (the realm's checks and ``mark_read`` rate limit);
  the answer is ``MARKREAD <target> timestamp=T'`` with the marker **now**, which
  is the older one when the client's is not newer (markers never go back);
- ``MARKREAD <target>`` asks for the marker (``*``: none);
- a marker the user moves anywhere else (another device, the web page, another IRC
  connection) reaches the client as ``MARKREAD`` when the client has the capability,
  and so does the marker of every channel it is shown joining, before its
  ``RPL_ENDOFNAMES``.

Only the user's own markers are shown this way (another user's read receipt never
is).  Errors are standard replies: ``FAIL MARKREAD NEED_MORE_PARAMS``,
``INVALID_PARAMS`` (a timestamp that is not ``timestamp=YYYY-MM-DDThh:mm:ss.sssZ``,
an unknown target, a channel one is not in), ``RATE_LIMITED`` and ``INTERNAL_ERROR``.
"""

from __future__ import annotations

import calendar
import datetime
import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from chatproto.errors import ChatError
from chatproto.irc.commands import command
from chatproto.irc.lines import channel_of, format_line, param, server_time
from chatproto.irc.replies import Reply

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

__all__ = ["READ_MARKER", "MarkerState", "join_marker", "parse_timestamp", "read_notice"]

#: The capability (a work-in-progress spec: prefixed).
READ_MARKER = "draft/read-marker"
#: A ``time`` tag has milliseconds: an item shown at T has a ``ts`` below T + this.
TICK = 0.001

_TIMESTAMP = re.compile(r"timestamp=(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z", re.ASCII)


class MarkerState:
    """Per connection: the MARKREAD sets in flight (their reply tells the marker, so
    the realm's notice of the same change is folded into it) and the last marker
    written per conversation (an older one that arrives late is not written)."""

    __slots__ = ("sent", "setting")

    def __init__(self) -> None:
        #: conversation -> highest marker notified while our own set was in flight
        self.setting: dict[str, int] = {}
        #: conversation -> the marker last written to the client
        self.sent: dict[str, int] = {}


def parse_timestamp(text: str) -> float | None:
    """``timestamp=YYYY-MM-DDThh:mm:ss.sssZ`` as seconds since the epoch, or None."""
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, ms = (int(g) for g in m.groups())
    try:  # a real date and time (no 31 February, no leap second)
        when = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:
        return None
    return calendar.timegm(when.timetuple()) + ms / 1000


def _shown(ts: float | None) -> str:
    return "*" if ts is None else "timestamp=" + server_time(ts)


def _target(p: IRCProtocol, where: str) -> str:
    """The IRC target of the conversation with ``where`` (a canonical address)."""
    if where.startswith("#"):
        return channel_of(where, p.realm.realm)
    return p.nick_for(where)


def _write(p: IRCProtocol, ctx: Reply, where: str, pos: int, ts: float | None) -> None:
    if p.state == "closed":
        return
    sent = p.markers.sent
    if pos < sent.get(where, 0):
        return  # a newer marker was written meanwhile
    sent[where] = pos
    ctx.send(format_line(p.server, "MARKREAD", _target(p, where), _shown(ts)))


@command("MARKREAD")
def markread(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    """``MARKREAD <target> [timestamp=T]``: set (or, without ``T``, get) the read
    marker of one conversation."""

    def fail(code: str, *args: str) -> None:
        ctx.send(format_line(p.server, "FAIL", "MARKREAD", code, *args))

    session = p.session
    assert session is not None
    if not params or not params[0]:
        fail("NEED_MORE_PARAMS", "Missing parameters")
        return None
    target = params[0]
    before: float | None = None
    if len(params) > 1:
        ts = parse_timestamp(params[1])
        if ts is None:
            want = "Expected timestamp=YYYY-MM-DDThh:mm:ss.sssZ"
            fail("INVALID_PARAMS", param(params[1][:64]), want)
            return None
        before = ts + TICK
    try:
        peer = p.resolve(target)
    except ChatError:
        fail("INVALID_PARAMS", param(target), "No such nick/channel")
        return None
    reading = p.realm.reading
    if before is None:
        d = maybeDeferred(reading.marker, session, peer)
        d.addCallback(lambda m: _write(p, ctx, m["with"], m["pos"], m["ts"]))
        return d.addErrback(_failed, fail, target)
    setting = p.markers.setting
    setting.setdefault(peer, 0)  # the realm's notices of this change come meanwhile

    def answer(result: dict[str, Any]) -> Deferred[None]:
        where = result["with"]
        pos = max(result["pos"], setting.pop(peer, 0))
        d = reading.marker_time(session, where, pos)
        return d.addCallback(lambda ts: _write(p, ctx, where, pos, ts))

    def settled(f: Failure) -> Failure:
        setting.pop(peer, None)
        return f

    d = maybeDeferred(reading.mark_read_until, session, peer, before)
    d.addErrback(settled)
    d.addCallback(answer)
    return d.addErrback(_failed, fail, target)


def _failed(f: Failure, fail: Any, target: str) -> None:
    if not f.check(ChatError):
        fail("INTERNAL_ERROR", param(target), "The read timestamp could not be set")
        return
    err: ChatError = f.value  # type: ignore[assignment]
    if err.code == "rate_limited":
        fail("RATE_LIMITED", param(target), f"Too many MARKREAD ({err.message}); wait a little")
    else:
        fail("INVALID_PARAMS", param(target), err.message)


def read_notice(p: IRCProtocol, data: dict[str, Any]) -> None:
    """A ``read`` notice of the realm: the user's own marker moved (on any of their
    devices) -- ``MARKREAD`` to a client with the capability."""
    session = p.session
    if READ_MARKER not in p.caps or session is None or data.get("user") != p.user_id:
        return  # (another user's read receipt: not shown to IRC clients)
    where, pos = data["with"], data["pos"]
    setting = p.markers.setting
    if where in setting:  # our own MARKREAD's answer tells it
        setting[where] = max(setting[where], pos)
        return
    d = p.realm.reading.marker_time(session, where, pos)
    d.addCallback(lambda ts: _write(p, p.direct, where, pos, ts))
    d.addErrback(lambda f: p.log.failure("MARKREAD for {user}", f, user=p.user_id))


def join_marker(p: IRCProtocol, ctx: Reply, group: str, chan: str) -> Deferred[None]:
    """The names of a channel just joined, then its ``MARKREAD``, then
    ``RPL_ENDOFNAMES`` (the spec wants the marker before it)."""
    p.names(ctx, group, chan, end=False)
    assert p.session is not None
    d = p.realm.reading.own_marker(p.session, group)

    def done(m: dict[str, Any] | None) -> None:
        if m is not None:
            _write(p, ctx, group, m["pos"], m["ts"])
        if p.state != "closed":
            ctx.num("366", chan, "End of /NAMES list")

    def failed(f: Failure) -> None:
        p.log.failure("MARKREAD of {group} for {user}", f, group=group, user=p.user_id)

    return d.addErrback(failed).addCallback(done)
