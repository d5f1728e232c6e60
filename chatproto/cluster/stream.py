"""Live delivery on a worker of a cluster: read the stream from the store, by position.

In a single process an item is routed to its audience right after its commit.  With
several workers that is not enough (the item's audience may sit on another worker) and
not safe (positions are committed out of order across workers, so a session shown
position P could later miss a smaller one: see
:meth:`chatproto.store.postgresql.PostgresDB.safe_position`).  So on a worker every
item -- its own commits and everybody else's -- reaches the local sessions the same
way: :class:`StreamReader` asks the store for the safe position, reads the items up to
it in position order, and routes each to the local sessions of its audience.

The bus only says "something was committed" (a wake-up); the store is the truth.  A
worker that missed wake-ups (it restarted, Redis was away) catches up on its next poll,
every ``poll_interval`` seconds, from the position it had reached.

Items this worker committed are routed with the audience computed at commit (the group
state before and after an event, as in one process); items of other workers have their
audience computed here, after applying group events to the local group state, as the
realm does when it replays events at start-up.  A ``delete`` of another worker's also
stops the downloads here of a file it deleted (``FileService.recheck``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from chatproto.envelope import Envelope

__all__ = ["PAGE", "StreamReader"]

#: Items read from the store per round trip.
PAGE = 1000


def _position(env: Envelope) -> int:
    return env.pos


class StreamReader:
    """Delivers the realm's stream to this worker's sessions, in position order.

    ``realm``: the :class:`chatproto.realm.RealmService`; ``store``: a store with
    ``safe_position()``, ``stream_top()`` and ``read_stream()`` (the PostgreSQL store
    of a worker);
    ``on_error``/``on_ok``: told when the store cannot be read, and again when it can.
    """

    log = Logger()

    def __init__(
        self,
        realm: Any,
        store: Any,
        clock: Any,
        poll_interval: float,
        on_error: Callable[[Exception], None] | None = None,
        on_ok: Callable[[], None] | None = None,
    ) -> None:
        self._realm = realm
        self._store = store
        self._suffix = "@" + realm.realm
        #: Every item up to this position has been routed here.
        self.delivered = 0
        #: The greatest safe position seen.
        self.safe = 0
        #: Items this worker committed and not yet routed: pos -> (envelope, audience).
        self._mine: dict[int, tuple[Envelope, Any]] = {}
        self._running: Deferred[None] | None = None
        self._again = False
        self._poll = LoopingCall(self.wake)
        self._poll.clock = clock
        self._interval = poll_interval
        self._on_error = on_error
        self._on_ok = on_ok
        self.failing = False
        #: (position, Deferred) of :meth:`catch_up` calls waiting for the stream.
        self._waiters: list[tuple[int, Deferred[None]]] = []
        #: Round trips and items routed (for ``chatrealmctl cluster status``).
        self.rounds = 0
        self.routed = 0

    def start(self, position: int) -> None:
        """Deliver live from ``position`` on (what the store showed at start-up)."""
        self.delivered = self.safe = position
        self._poll.start(self._interval, now=False)

    def stop(self) -> Deferred[None] | None:
        if self._poll.running:
            self._poll.stop()
        return self._running

    def committed(self, env: Envelope, users: Iterable[str]) -> None:
        """This worker committed ``env`` (audience ``users``): route it once it is
        safe, in position order with everyone else's items."""
        self._mine[env.pos] = (env, tuple(users))
        self.wake()

    def suspect(self) -> None:
        """The store failed elsewhere (a commit): read it, and say (``on_ok``) when it
        answers again."""
        self.failing = True
        self.wake()

    def catch_up(self) -> Deferred[None]:
        """Fires once everything committed when this is called has been applied
        here: a worker about to check a group rule first sees the changes other
        workers acknowledged (a join right after a create elsewhere).

        It waits for the highest position drawn so far (``stream_top``), not for the
        safe position: a change committed elsewhere above a commit still in flight
        is acknowledged already but not safe yet, and the check must see it.  The
        commits in flight below it end (committed or not) within a commit's time."""
        return self._store.stream_top().addCallback(self.until_routed)

    def until_routed(self, pos: int) -> Deferred[None] | None:
        """None if every item up to ``pos`` has been routed here, else a Deferred
        firing once it has (failing if the store cannot be read meanwhile)."""
        if pos <= self.delivered:
            return None
        d: Deferred[None] = Deferred()
        self._waiters.append((pos, d))
        self.wake()
        return d

    def _release(self, error: Exception | None = None) -> None:
        waiting, self._waiters = self._waiters, []
        for pos, d in waiting:
            if error is not None:
                d.errback(error)
            elif pos <= self.delivered:
                d.callback(None)
            else:
                self._waiters.append((pos, d))

    def wake(self, upto: int | None = None) -> None:
        """Something was committed (up to position ``upto`` when the bus says): read
        the store.  Rounds never overlap; a wake-up during one asks for another."""
        if upto is not None and upto <= self.delivered:
            return
        if self._running is not None:
            self._again = True
            return
        self._running = Deferred()
        self._round()

    @inlineCallbacks
    def _round(self) -> Any:
        try:
            while True:
                self._again = False
                try:
                    safe = yield self._store.safe_position()
                    self.safe = max(self.safe, safe)
                    while self.delivered < self.safe:
                        # This worker's own items are not read back: it holds them.
                        upto = self.safe
                        mine = sorted(p for p in self._mine if self.delivered < p <= upto)
                        page = yield self._store.read_stream(self.delivered, upto, PAGE, mine)
                        self.rounds += 1
                        full = len(page) == PAGE
                        end = page[-1].pos if full else upto
                        page += [self._mine[p][0] for p in mine if p <= end and p in self._mine]
                        page.sort(key=_position)
                        self._deliver(page, None if full else upto)
                except Exception as e:
                    self._release(e)
                    if not self.failing:
                        self.failing = True
                        self.log.warn("cluster: cannot read the stream from the store: {e}", e=e)
                        if self._on_error is not None:
                            self._on_error(e)
                    return
                if self.failing:
                    self.failing = False
                    self.log.info("cluster: the store answers again; caught up")
                    if self._on_ok is not None:
                        self._on_ok()
                if not self._again:
                    return
        finally:
            running, self._running = self._running, None
            if running is not None:
                running.callback(None)

    def _deliver(self, page: list[Envelope], upto: int | None) -> None:
        """Route one page (oldest first); ``upto``: the page ends the range (else
        the next page starts after its last item)."""
        realm = self._realm
        deletes = False
        realm.begin_burst()
        try:
            for env in page:
                mine = self._mine.pop(env.pos, None)
                deletes = deletes or (mine is None and env.kind == "delete")
                try:
                    if mine is not None and env.kind == "event":
                        users = mine[1]  # the group before and after, as at commit
                    elif mine is not None:
                        users = self._members(env)  # the members now, not at commit
                    else:
                        users = self._audience(env)
                    realm.sessions.route(env, users)
                except Exception:  # one bad item must not stop the stream
                    self.log.failure("cluster: routing item {pos} failed", pos=env.pos)
                self.delivered = env.pos
                self.routed += 1
        finally:
            realm.end_burst()
        if deletes:  # another worker deleted items: a file's downloads here stop too
            realm.files.recheck().addErrback(
                lambda f: self.log.failure("cluster: stopping downloads of deleted files", f)
            )
        if upto is not None:
            self.delivered = max(self.delivered, upto)
        for pos in [p for p in self._mine if p <= self.delivered]:
            del self._mine[pos]  # (never read back: not expected, but never kept)
        if self._waiters:
            self._release()

    def _audience(self, env: Envelope) -> Any:
        """Who gets an item another worker committed; applies a group event to the
        local group state first (as the committing worker did)."""
        realm = self._realm
        recipient = env.recipient
        if recipient.startswith("#"):
            groups = realm.groups
            if env.kind == "event":
                before = groups.audience(env)
                groups.apply(env, mirror=not recipient.endswith(self._suffix))
                users = before | groups.audience(env)
                if (env.meta or {}).get("event") == "joined":
                    realm.presence.on_join(env.sender, recipient)
                return users
            return self._members(env)
        realm.presence.new_conversation(env.sender, recipient)
        return self._members(env)

    def _members(self, env: Envelope) -> Any:
        """The audience of an item that is not a group event: the group's members
        as this worker knows them now (every event before the item applied), or the
        two ends of a private conversation."""
        recipient = env.recipient
        if recipient.startswith("#"):
            group = self._realm.groups.groups.get(recipient)
            return group.members if group is not None else ()
        return (recipient,) if env.sender == recipient else (recipient, env.sender)
