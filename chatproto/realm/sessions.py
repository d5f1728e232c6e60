"""Sessions: the logged-in connections of local users, and delivery to them.

A :class:`Session` is the twisted.cred avatar a connection gets at login: what the
protocol calls.  The connection is the *mind* (:class:`ISessionMind`): what the realm
calls back.  :class:`Sessions` holds who is connected and hands committed items to
their connections (``route``), optionally in *bursts* (one write per connection per
group commit).  It knows nothing of storage rules or presence (see
:mod:`chatproto.realm.presence`), and never touches bytes.

Delivery model: every stored item has a realm-wide stream position ``pos``.  A user's
feed is the items addressed to or sent by them; a session resumes "after position P".
A logging-in session is registered for live delivery *before* its backlog is read, and
buffers live items until the backlog is out; positions make the overlap harmless, so
nothing is lost and nothing is sent twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import Interface, implementer

from chatproto.address import Address
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.flow import BURST_WRITE
from chatproto.ops.stats import RealmStats
from chatproto.ratelimit import TokenBucket
from chatproto.text import check_label

__all__ = [
    "MAX_DEVICE",
    "SYNC_BUFFER",
    "SYNC_PAGE",
    "ISession",
    "ISessionMind",
    "Notice",
    "Session",
    "Sessions",
    "check_device",
]

#: Backlog is read and sent in pages of this many items, pausing for slow readers.
SYNC_PAGE = 500
#: Live items buffered while a backlog is read; past this the backlog pass re-reads.
SYNC_BUFFER = 2000
#: Maximum length of a device name.
MAX_DEVICE = 64


class ISession(Interface):
    """The avatar interface a connection gets from the portal (see :class:`Session`)."""


class ISessionMind(Interface):
    """What the realm calls on a connection (the cred *mind*).

    Optional: a mind whose ``own_copies`` attribute is false shows no copy of its
    user's own private texts to others; the realm then does not deliver those to it
    (Sessions.route_private) and calls its ``written()`` once per run instead.  A
    mind with a ``deliver_run(envelopes)`` method gets a run of private items of one
    sender to one recipient in one call (Sessions.route_private), with what
    ``deliver`` of each would do."""

    def deliver(envelope):  # type: ignore[misc]
        """Send one stream item (an :class:`chatproto.envelope.Envelope`)."""

    def synced(pos):  # type: ignore[misc]
        """The backlog is out: everything up to ``pos`` has been delivered."""

    def notify(notice):  # type: ignore[misc]
        """Send an ephemeral :class:`Notice` (presence, client tags); not stored,
        not acked.  A mind ignores the types it does not know."""

    def wait_writable():  # type: ignore[misc]
        """A Deferred firing when the connection can take more output."""

    def disconnect(code, message):  # type: ignore[misc]
        """Close the connection, telling the peer why (an error ``code``)."""


@attrs.define(slots=True, eq=False)
class Notice:
    """An ephemeral push (presence): a frame body and its cached encoding."""

    data: dict[str, Any]
    frame: bytes | None = None


@implementer(ISession)
class Session:
    """One logged-in connection of a user: what the protocol calls after login.

    ``device`` names the client installation; its acknowledged position is kept per
    device so each device resumes where it left off.
    """

    def __init__(self, realm: Any, user: Address, device: str, mind: Any) -> None:
        #: the :class:`chatproto.realm.RealmService` (the facade this avatar calls)
        self.realm = realm
        self.user = user
        self.user_id = str(user)
        self.device = device
        self.mind = mind
        lim = realm.config.limits
        self.bucket = TokenBucket(lim.send_rate, lim.send_burst, realm.clock.seconds())
        self._syncing = True
        self._buffer: list[Envelope] | None = []
        self._last = 0  # highest position delivered to this session
        #: The account sees only items after this position (when it was created).
        self.floor = 0
        #: Set once the floor is read at login (see RealmService._session_opened).
        self.opened = False
        #: A quiet session does not show its user as online (see RealmService.login).
        self.quiet = False
        self.counted = False  # counted as visible by the presence handler
        self.closed = False
        #: Where the connection comes from (the client's address), for operators.
        self.peer = "?"
        #: The browser login (``chatproto.tokens`` login id) the session logged in
        #: with, or None (a password login): revoking the login ends the session.
        self.login: str | None = None
        #: When the session was opened (the realm's clock), for operators.
        self.opened_at = realm.clock.seconds()

    @property
    def delivered(self) -> int:
        """The highest stream position delivered to this session so far."""
        return self._last

    @property
    def protocol(self) -> str:
        """The protocol of the connection: ``native``, ``web``, ``irc`` (its mind's
        ``protocol_name``), or ``other`` (an embedding application's mind)."""
        return getattr(self.mind, "protocol_name", "other")

    # delivery -----------------------------------------------------------------------

    def _deliver(self, env: Envelope) -> None:
        if self.closed:
            return
        if self._syncing:
            if self._buffer is not None:
                self._buffer.append(env)
                if len(self._buffer) > SYNC_BUFFER:
                    self._buffer = None  # re-read from the store instead
            return
        self._emit(env)

    def _emit(self, env: Envelope) -> None:
        if env.pos > self._last:
            self._last = env.pos
            self.mind.deliver(env)

    @inlineCallbacks
    def start(self, since: int | None = None) -> Any:
        """Send the backlog after ``since`` (default: this device's ack), then go live.

        ``since`` is clamped to the newest committed position, so a client cannot
        acknowledge (and so skip) items that do not exist yet.  Fires with the position
        the session is synced to.
        """
        store = self.realm.store
        newest = yield store.max_pos()
        if since is None:
            since = yield store.get_ack(self.user_id, self.device)
        self._last = max(min(since, newest), self.floor)
        while not self.closed:
            ranges = self.realm.groups.feed_ranges(self.user_id)
            page = yield store.read_feed(self.user_id, self._last, SYNC_PAGE, ranges)
            self.realm.stats.deliveries_backlog += len(page)
            for env in page:
                if self.closed:
                    break
                self._emit(env)
                # Never write past a paused reader: wait item by item, so a slow
                # client resuming a large backlog is paced rather than dropped.
                yield self.mind.wait_writable()
            if len(page) == SYNC_PAGE:
                continue
            if self._buffer is None:  # live items overflowed: read them from the store
                self._buffer = []
                continue
            break
        buffered, self._buffer = self._buffer or [], None
        self._syncing = False
        for env in buffered:
            self._emit(env)
        if not self.closed:
            self.mind.synced(self._last)
            self.realm.presence_snapshot(self)
        return self._last

    # requests -----------------------------------------------------------------------

    def send(
        self,
        to: str,
        body: str,
        nonce: str | None = None,
        notice: bool = False,
        tags: dict[str, str] | None = None,
    ) -> Deferred[Envelope]:
        """Store a message durably, then deliver it; fires with the envelope.

        A client-chosen ``nonce`` makes a retried send idempotent (see send_private);
        ``notice`` stores it as a notice (IRC's NOTICE); ``tags`` are client tags
        kept with it (chatproto.realm.tags).
        """
        return self.realm.send_private(self, to, body, nonce, notice, tags=tags)

    def send_tags(self, to: str, tags: Any) -> Deferred[dict[str, Any]]:
        """Client tags on their own (IRC's TAGMSG): pushed to the online sessions of
        ``to``, not stored (chatproto.realm.tags)."""
        return self.realm.send_tags(self, to, tags)

    def send_batch(self, requests: Any) -> Any:
        """Several sends at once (``SendRequest`` tuples): see
        :meth:`chatproto.realm.messaging.Messaging.send_batch`."""
        return self.realm.messages.send_batch(self, requests)

    def history(
        self, peer: str, before: int | None, after: int | None, limit: int | None
    ) -> Deferred[list[Envelope]]:
        return self.realm.history(self, peer, before, after, limit)

    def who(self, group: str | None = None, user: str | None = None) -> Any:
        """Online users (see :meth:`RealmService.who`); a Deferred with ``user``."""
        return self.realm.who(self, group, user)

    def group_event(self, event: str, group: str, **args: Any) -> Deferred[Envelope]:
        """Create/join/leave/invite/kick/ban/unban/topic/role/delete (see groups.py)."""
        return self.realm.group_event(self, event, group, **args)

    def set_status(self, status: str, text: str = "") -> None:
        self.realm.set_status(self, status, text)

    def ack(self, pos: int) -> None:
        """Record that the client processed everything up to ``pos``."""
        pos = min(pos, self._last)  # nobody acknowledges what they were not sent
        if pos > 0:
            self.realm.store.set_ack(self.user_id, self.device, pos)

    def logout(self) -> None:
        if not self.closed:
            self.closed = True
            self.realm.detach(self)


class Sessions:
    """The online sessions of local users, and delivery of committed items to them.

    ``limits`` is the realm's ``config.limits``.  ``on_idle`` is called when the
    outermost burst ends, before held frames are flushed (the realm wakes federation
    links there: once per group commit).
    """

    log = Logger()

    def __init__(
        self,
        limits: Any,
        on_idle: Callable[[], None] | None = None,
        stats: RealmStats | None = None,
    ) -> None:
        #: the realm's ``config.limits`` (read at each login: it may be changed live)
        self.limits = limits
        #: the realm's counters (``deliveries_live`` is counted here)
        self.stats = stats if stats is not None else RealmStats()
        #: canonical user address -> that user's open sessions
        self.online: dict[str, list[Session]] = {}
        self._on_idle = on_idle
        #: Delivery bursts open (nested), and the minds holding frames until the
        #: outermost ends (:meth:`begin_burst`, :meth:`hold`).  Public: the realm
        #: service's own begin_burst/hold/bursting, which every delivery and read
        #: calls, change and read them without a second call.
        self.burst_depth = 0
        self.held: list[Any] = []
        #: At most what one connection holds of this burst's items (an estimate).
        self._burst_bytes = 0
        #: Told of every notice (``(users, notice)``): a worker of a cluster passes
        #: them to the other workers (chatproto.cluster.worker).  None in one process.
        self.relay: Callable[[list[str], Notice], None] | None = None

    def attach(self, session: Session) -> Session:
        """Register a new session for live delivery (``too_many_sessions``)."""
        sessions = self.online.setdefault(session.user_id, [])
        if len(sessions) >= self.limits.max_sessions_per_user:
            if not sessions:
                del self.online[session.user_id]
            raise ChatError("too_many_sessions")
        sessions.append(session)
        return session

    def detach(self, session: Session) -> bool:
        """Unregister ``session``; True when it was its user's last one."""
        sessions = self.online.get(session.user_id)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self.online[session.user_id]
        return session.user_id not in self.online

    def of(self, user: str) -> Sequence[Session]:
        """The open sessions of canonical user address ``user``."""
        return self.online.get(user, ())

    def all(self) -> list[Session]:
        return [s for sessions in self.online.values() for s in sessions]

    # delivery bursts ------------------------------------------------------------------

    @property
    def bursting(self) -> bool:
        """True while committed items are being handed out (see :meth:`begin_burst`)."""
        return self.burst_depth > 0

    def begin_burst(self) -> None:
        """Items delivered until the matching :meth:`end_burst` may be held by each
        connection and written at once (one write per connection per group commit
        instead of one per item).  Nests."""
        self.burst_depth += 1

    def hold(self, mind: Any) -> None:
        """``mind`` holds frames until the burst ends (it calls this once per burst)."""
        self.held.append(mind)

    def end_burst(self) -> None:
        self.burst_depth -= 1
        if self.burst_depth:
            return
        if self._on_idle is not None:
            self._on_idle()  # must not raise: the frames held below must still go out
        self._flush_held()

    def _flush_held(self) -> None:
        self._burst_bytes = 0
        if self.held:
            held, self.held = self.held, []
            for mind in held:
                try:
                    mind.flush()
                except Exception:  # one broken connection must not hold back the rest
                    self.log.failure("flushing held frames failed")

    def route(self, env: Envelope, users: Iterable[str]) -> None:
        """Deliver a committed item to every online session of ``users``.

        The frame is encoded once (``Envelope.frame``) and no storage is touched here.
        """
        self.burst_depth += 1
        try:
            self.stats.deliveries_live += self._reach(env, users)
            self._count_burst(env)
        finally:
            self.end_burst()

    def route_private(self, items: Sequence[Envelope]) -> None:
        """Deliver committed private items, in position order, each to the online
        sessions of its recipient and of its sender: :meth:`route` of each, in one
        call and one burst (a run of one send batch: Messaging.send_batch).

        The items go out in runs of one (sender, recipient) pair: a session whose
        mind has ``deliver_run`` (see :class:`ISessionMind`) gets each run in one
        call, others item by item.  A run ends where the burst's bytes pass
        BURST_WRITE, so what is held is written at the same item as with
        :meth:`route` (what :meth:`_count_burst` does, for the run).

        A session of the sender whose mind shows no copy of its user's own texts to
        others (``own_copies`` false: an IRC client without echo-message) is not
        handed them: its position still moves past them (so nothing is re-sent on
        resume), and its mind's ``written()`` is called once per run instead (the
        IRC gateway's ack timer, as its deliver would have armed it)."""
        self.burst_depth += 1
        reached = 0
        online = self.online
        passed: list[Session] = []  # sessions moved past a run they show nowhere
        n = len(items)
        i = 0
        try:
            while i < n:
                env = items[i]
                sender, recipient = env.sender, env.recipient
                # the run: up to the next pair, or the item that passes BURST_WRITE
                room = BURST_WRITE - self._burst_bytes
                size = 0
                j = i
                while j < n:
                    e = items[j]
                    if e.recipient != recipient or e.sender != sender:
                        break
                    frame = e.frame
                    size += len(frame) if frame is not None else 512 + 4 * len(e.body)
                    j += 1
                    if size > room:
                        break
                run = items[i:j] if i or j < n else items
                i = j
                first, last = run[0].pos, run[-1].pos
                count = len(run)
                # (A session list is the user's own, emptied in place as sessions go:
                # nothing logs in during a burst.)
                targets: list[list[Session]] = []
                quiet: list[Session] = []  # the sender's sessions shown no copy
                sessions = online.get(recipient)
                if sessions:
                    targets.append(sessions)
                if sender != recipient:
                    sessions = online.get(sender)
                    if sessions:
                        # (every session shown a copy, the common case: no list made)
                        for s in sessions:
                            if not getattr(s.mind, "own_copies", True):
                                shown = [s for s in sessions if getattr(s.mind, "own_copies", True)]
                                quiet = [s for s in sessions if s not in shown]
                                if shown:
                                    targets.append(shown)
                                break
                        else:
                            targets.append(sessions)
                for sessions in targets:  # what _reach does, inline, for a run
                    reached += len(sessions) * count
                    for s in sessions:
                        if s._syncing or s.closed or first <= s._last:
                            for e in run:
                                s._deliver(e)  # buffering while syncing, de-duplication
                            continue
                        s._last = last
                        mind = s.mind
                        deliver_run = getattr(mind, "deliver_run", None)
                        if deliver_run is not None:
                            deliver_run(run)
                        else:
                            for e in run:
                                mind.deliver(e)
                if quiet:  # counted as delivered, not handed over
                    reached += len(quiet) * count
                    texts: bool | None = None  # (every item of the run a text)
                    for s in quiet:
                        if not (s._syncing or s.closed or first <= s._last):
                            if texts is None:
                                texts = True
                                for e in run:
                                    if e.kind != "text":
                                        texts = False
                                        break
                            if texts:  # what the loop below does for such a run
                                s._last = last  # (positions increase along it)
                                if s not in passed:
                                    passed.append(s)
                                continue
                        for e in run:  # (a text: its mind shows it nowhere)
                            if e.kind != "text" or s._syncing or s.closed or e.pos <= s._last:
                                s._deliver(e)
                            else:
                                s._last = e.pos
                                if s not in passed:
                                    passed.append(s)
                self._burst_bytes += size
                if self._burst_bytes > BURST_WRITE and self.burst_depth > 1:
                    self._flush_held()
            for s in passed:
                s.mind.written()
        finally:
            self.stats.deliveries_live += reached
            self.end_burst()

    def _reach(self, env: Envelope, users: Iterable[str]) -> int:
        """Hand ``env`` to the online sessions of ``users``; how many there were.

        route_private repeats this loop inline (a change here is made there too;
        test_send_batch's test_with_an_observer_a_run_is_routed_item_by_item_alike
        holds the two alike)."""
        online = self.online
        pos = env.pos
        reached = 0
        for user in users:
            sessions = online.get(user)
            if sessions:
                reached += len(sessions)
                for s in sessions:
                    if s._syncing or s.closed or pos <= s._last:
                        s._deliver(env)  # buffering while syncing, de-duplication
                    else:  # the hot path of fan-out, inlined (Session._emit)
                        s._last = pos
                        s.mind.deliver(env)
        return reached

    def _count_burst(self, env: Envelope) -> None:
        """Bounded holds: once the burst's items may come to BURST_WRITE bytes for one
        connection, what is held goes out now (counted once per item, not per
        delivery; an item's frame, or its body's worst case as UTF-8 plus its
        envelope).  route_private repeats this inline: a change here is made there too."""
        frame = env.frame
        self._burst_bytes += len(frame) if frame is not None else 512 + 4 * len(env.body)
        if self._burst_bytes > BURST_WRITE and self.burst_depth > 1:
            self._flush_held()

    def notify(self, users: Iterable[str], notice: Notice, exclude: Session | None = None) -> None:
        """Send an ephemeral notice to the synced sessions of ``users`` (but
        ``exclude``: the session it comes from, say)."""
        online = self.online
        if self.relay is not None:  # a worker of a cluster: the others' sessions too
            users = list(users)
            self.relay(users, notice)
        for user in users:
            for s in online.get(user, ()):
                if not s._syncing and s is not exclude:
                    s.mind.notify(notice)


def check_device(device: Any) -> None:
    if not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE:
        raise ChatError("bad_request", f"device must be 1-{MAX_DEVICE} characters")
    check_label(device, "the device name")
