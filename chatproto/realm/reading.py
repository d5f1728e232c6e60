"""The reading handler: read markers, the conversation list, typing notifications.

What a user has read is realm state, not a client's: a **read marker** ("read up to
position P") per user and conversation is stored (with the group commit, like acks;
see :mod:`chatproto.store.reading`), pushed at once to the user's other sessions (so
every device agrees) and, in a private conversation, to the other party unless the
reader turned read receipts off.  The **conversation list** (``conversations``) is
the sidebar a fresh client starts from: every conversation with its last item, the
user's marker and the unread count the realm computes.  **Typing** notices are
ephemeral: passed on to whoever is online, never stored; in a group with members on
other realms, through the group's home realm as its items go.

Markers, typing, search and the conversation list are rate-limited per connection (a
token bucket each), so none can be used to flood other users or the store.  The rules
are in PROTOCOL.md ("Read markers and the conversation list", "typing").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from chatproto import address
from chatproto.envelope import Envelope, conversation_key, new_message_id
from chatproto.errors import ChatError
from chatproto.ratelimit import ConnectionBuckets, TokenBucket
from chatproto.realm.sessions import Notice, Session
from chatproto.relations import check_msg_id
from chatproto.store.reading import search_words

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = [
    "CONVERSATIONS_BURST",
    "CONVERSATIONS_LIMIT",
    "CONVERSATIONS_RATE",
    "MARK_BURST",
    "MARK_RATE",
    "MAX_QUERY",
    "MAX_QUERY_WORDS",
    "READ_RECEIPTS",
    "SEARCH_BURST",
    "SEARCH_DEFAULT",
    "SEARCH_PAGE",
    "SEARCH_RATE",
    "TYPING_BURST",
    "TYPING_RATE",
    "Reading",
    "typing_tags",
]

#: ``mark_read`` token bucket of each connection: per second, and at most at once.
MARK_RATE = 5.0
MARK_BURST = 20
#: ``typing`` token bucket of each connection.
TYPING_RATE = 1.0
TYPING_BURST = 5
#: Typists of other realms whose typing bucket (in groups) is kept, at most.
REMOTE_TYPISTS = 4096
#: The most (and default) conversations one ``conversations`` request returns.
CONVERSATIONS_LIMIT = 500
#: ``conversations`` token bucket of each connection: a list costs the store a few
#: queries per conversation (and a count of each one's unread items), and a client
#: needs one when it connects, not a stream of them.
CONVERSATIONS_RATE = 0.2
CONVERSATIONS_BURST = 5
#: The preference key of the read-receipt switch (value ``"off"`` when off).
READ_RECEIPTS = "read_receipts"
#: ``search``: the most (and default) results of one page, the longest query (in
#: characters) and the most words in it, and each connection's token bucket.
SEARCH_PAGE = 50
SEARCH_DEFAULT = 20
MAX_QUERY = 256
MAX_QUERY_WORDS = 16
SEARCH_RATE = 2.0
SEARCH_BURST = 10


class Reading:
    """Read markers, conversation lists and typing, for the realm's sessions."""

    def __init__(self, realm: RealmService) -> None:
        self._realm = realm
        self._store = realm.store
        #: users who turned read receipts off (their markers are theirs alone)
        self._hidden: set[str] = set()
        self._buckets = ConnectionBuckets()
        #: (typist of another realm, group) -> their typing bucket, the most recent last
        self._remote_typists: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def load(self) -> Deferred[None]:
        """Read the users' read-receipt switches (at start-up)."""

        def loaded(prefs: dict[str, str]) -> None:
            self._hidden = {u for u, v in prefs.items() if v == "off"}

        return self._store.prefs(READ_RECEIPTS).addCallback(loaded)

    def shares(self, user: str) -> bool:
        """Whether ``user`` shows others how far they have read."""
        return user not in self._hidden

    def forget(self, user: str) -> None:
        """An account was deleted: its switch goes with it (the store drops its rows)."""
        self._hidden.discard(user)

    def _take(self, session: Session, what: str, rate: float, burst: int) -> None:
        now = self._realm.clock.seconds()
        wait = self._buckets.bucket(session, what, rate, burst, now).take(now)
        if wait:
            self._realm.stats.rate_limited(what)
            raise ChatError("rate_limited", f"{what} too fast", retry_after=round(wait, 3))

    def _conversation(self, user: str, peer: str) -> Deferred[tuple[str, str, Any]]:
        """A Deferred of ``(conversation key, canonical address of the other end, group
        or None)`` for ``user`` and ``peer`` (a user or a group address).  A group must
        be one ``user`` may read (as for ``history``: raises at once); a user must
        exist (a local one) or be on a realm this one federates with."""
        if peer.startswith("#"):
            group = self._realm.group_handler.readable(user, peer)
            return succeed((group.address, group.address, group))
        resolved = self._realm.messages.resolve_user(peer, True, user)

        def key(addr: Any) -> tuple[str, str, Any]:
            other = str(addr)
            return conversation_key(user, other), other, None

        if isinstance(resolved, Deferred):
            return resolved.addCallback(key)
        return succeed(key(resolved))

    # read markers -----------------------------------------------------------------------

    def mark_read(self, session: Session, peer: str, pos: int) -> Deferred[dict[str, Any]]:
        """Move ``session``'s user's marker in the conversation with ``peer`` to
        ``pos`` (clamped to the newest committed position; never backwards); fires
        with ``{"with": address, "pos": the marker}``."""
        self._take(session, "mark_read", MARK_RATE, MARK_BURST)
        d = self._conversation(session.user_id, peer)
        return d.addCallback(lambda c: self._mark(session.user_id, c, pos, session.floor))

    @inlineCallbacks
    def _mark(self, user: str, conv: tuple[str, str, Any], pos: int, floor: int = 0) -> Any:
        key, other, group = conv
        newest = yield self._store.max_pos()
        pos = min(pos, newest)
        markers = yield self._store.read_markers(key)
        old = markers.get(user, 0)
        if pos <= old:
            return {"with": other, "pos": old}
        self._store.set_read(user, key, pos)
        sessions = self._realm.sessions
        sessions.notify((user,), Notice({"type": "read", "with": other, "user": user, "pos": pos}))
        if group is None and other != user and self.shares(user):
            if other.endswith("@" + self._realm.realm):
                notice = Notice({"type": "read", "with": user, "user": user, "pos": pos})
                sessions.notify((other,), notice)
            else:  # positions are this realm's: the other realm is told the item's id
                page = yield self._store.history(key, pos + 1, None, 1, floor)
                if page:
                    frame = {"type": "reading", "kind": "read", "from": user, "to": other}
                    self._to_peer(other, {**frame, "msg_id": page[-1].id})
        return {"with": other, "pos": pos}

    # markers by time (IRC's draft/read-marker names a marker by a message's time) ------

    def mark_read_until(
        self, session: Session, peer: str, before_ts: float
    ) -> Deferred[dict[str, Any]]:
        """:meth:`mark_read` up to the newest item of the conversation with ``peer``
        whose ``ts`` is less than ``before_ts`` (items about items aside); the same
        checks, rate limit and result."""
        self._take(session, "mark_read", MARK_RATE, MARK_BURST)
        user = session.user_id
        d = self._conversation(user, peer)
        return d.addCallback(self._mark_until, session, before_ts)

    @inlineCallbacks
    def _mark_until(self, conv: tuple[str, str, Any], session: Session, before_ts: float) -> Any:
        # Only items above the user's marker can move it (markers never go back):
        # the walk back from the newest item stops there, so an old time does not
        # walk a whole large conversation.
        markers = yield self._store.read_markers(conv[0])
        old = markers.get(session.user_id, 0)
        pos = yield self._store.read_position(
            conv[0], before_ts, max(self._floor(session, conv), old)
        )
        if not pos:  # nothing above the marker: it stays (what _mark answers, without
            return {"with": conv[1], "pos": old}  # reading the markers a second time)
        result = yield self._mark(session.user_id, conv, pos, session.floor)
        return result

    def marker(self, session: Session, peer: str) -> Deferred[dict[str, Any]]:
        """The user's marker in the conversation with ``peer`` (checked as for
        :meth:`mark_read`, and from the same token bucket), as :meth:`own_marker`."""
        self._take(session, "mark_read", MARK_RATE, MARK_BURST)
        d = self._conversation(session.user_id, peer)
        return d.addCallback(lambda c: self.own_marker(session, c[1]))

    @inlineCallbacks
    def own_marker(self, session: Session, where: str) -> Any:
        """``{"with": where, "pos": P, "ts": T}``: the user's marker ``P`` in the
        conversation with ``where`` (a canonical address the caller checked), ``T``
        the time :meth:`marker_time` gives it."""
        user = session.user_id
        key = where if where.startswith("#") else conversation_key(user, where)
        markers = yield self._store.read_markers(key)
        pos = markers.get(user, 0)
        ts = yield self.marker_time(session, where, pos)
        return {"with": where, "pos": pos, "ts": ts}

    def marker_time(self, session: Session, peer: str, pos: int) -> Deferred[float | None]:
        """The ``ts`` of the newest item at or below position ``pos`` that ``history``
        gives ``session``'s user in the conversation with ``peer`` (a canonical
        address, as a ``read`` notice names it); None when ``pos`` is 0 or there is
        none (not a member any more, nothing readable)."""
        user = session.user_id
        if pos <= 0:
            return succeed(None)
        if peer.startswith("#"):
            key = peer
            try:
                floor = self._realm.groups.readable_from(peer, user)
            except ChatError:
                return succeed(None)
        else:
            key, floor = conversation_key(user, peer), session.floor
        d = self._store.history(key, pos + 1, None, 1, floor)
        return d.addCallback(lambda page: page[-1].ts if page else None)

    def _floor(self, session: Session, conv: tuple[str, str, Any]) -> int:
        """The lowest position (exclusive) ``session``'s user may read in ``conv``."""
        if conv[2] is None:
            return session.floor
        return self._realm.groups.readable_from(conv[1], session.user_id)

    def set_read_receipts(self, session: Session, share: bool) -> Deferred[dict[str, Any]]:
        """Turn ``session``'s user's read receipts on or off (durably)."""
        user = session.user_id
        if share:
            self._hidden.discard(user)
        else:
            self._hidden.add(user)
        d = self._store.set_pref(user, READ_RECEIPTS, None if share else "off")
        return d.addCallback(lambda _: {})

    # the conversation list ----------------------------------------------------------------

    @inlineCallbacks
    def conversations(self, session: Session, limit: int | None) -> Any:
        """The user's conversations, most recent first (see PROTOCOL.md)."""
        limit = CONVERSATIONS_LIMIT if limit is None else limit
        if not 1 <= limit <= CONVERSATIONS_LIMIT:
            raise ChatError("bad_request", f"limit must be between 1 and {CONVERSATIONS_LIMIT}")
        self._take(session, "conversations", CONVERSATIONS_RATE, CONVERSATIONS_BURST)
        user = session.user_id
        rules = self._realm.groups
        groups = []
        for addr in sorted(rules.of_user.get(user, ())):
            groups.append((addr, rules.groups[addr].members[user].lo))
        rows = yield self._store.conversations(
            user, session.floor, groups, session.user.name, limit
        )
        out = []
        for row in rows:
            conv: str = row["conv"]
            last: Envelope | None = row["last"]
            markers: dict[str, int] = row["markers"]
            entry: dict[str, Any] = {}
            if conv.startswith("#"):
                entry["with"] = conv
            else:
                a, _, b = conv.partition(" ")
                entry["with"] = b if a == user else a
            entry["last"] = last.to_wire() if last is not None else None
            entry["read"] = row["read"]
            entry["unread"] = row["unread"]
            if conv.startswith("#"):
                entry["mentions"] = row["mentions"]
                members = rules.groups[conv].members if conv in rules.groups else {}
                top = last.pos if last is not None else 0
                entry["read_by"] = sum(
                    1
                    for u, p in markers.items()
                    if u != user and p >= top and u in members and self.shares(u)
                )
            else:
                other = entry["with"]
                if other != user and other in markers and self.shares(other):
                    entry["peer_read"] = markers[other]
            out.append(entry)
        return {"conversations": out, "read_receipts": self.shares(user)}

    # search --------------------------------------------------------------------------------

    def search(
        self,
        session: Session,
        query: str,
        peer: str | None,
        before: int | None,
        limit: int | None,
    ) -> Deferred[list[Envelope]]:
        """A page of the items ``session``'s user may read (exactly what ``history``
        gives them) whose text has every word of ``query``, newest first."""
        limit = SEARCH_DEFAULT if limit is None else limit
        if not 1 <= limit <= SEARCH_PAGE:
            raise ChatError("bad_request", f"limit must be between 1 and {SEARCH_PAGE}")
        if len(query) > MAX_QUERY:
            raise ChatError("bad_request", f"the query is longer than {MAX_QUERY} characters")
        words = search_words(query)
        if not words:
            raise ChatError("bad_request", "the query has no word (letters or digits)")
        if len(words) > MAX_QUERY_WORDS:
            raise ChatError("bad_request", f"the query has more than {MAX_QUERY_WORDS} words")
        self._take(session, "search", SEARCH_RATE, SEARCH_BURST)
        user = session.user_id
        scopes: list[tuple[str, str, int]]
        if peer is None:
            rules = self._realm.groups
            scopes = [("user", user, session.floor)]
            for addr in sorted(rules.of_user.get(user, ())):
                scopes.append(("conv", addr, rules.readable_from(addr, user)))
        elif peer.startswith("#"):  # as history: members only, under the group's rule
            group = self._realm.group_handler.address(peer, True, user)
            scopes = [("conv", group, self._realm.groups.readable_from(group, user))]
        else:
            other = address.user(peer, self._realm.realm)
            scopes = [("conv", conversation_key(user, str(other)), session.floor)]
        return self._store.search(words, scopes, before, limit)  # type: ignore[no-any-return]

    # typing --------------------------------------------------------------------------------

    def typing(self, session: Session, peer: str, active: bool) -> Deferred[dict[str, Any]]:
        """Tell the other end of a conversation that ``session``'s user is (or stopped)
        typing: a ``typing`` notice to their online sessions, never stored."""
        self._take(session, "typing", TYPING_RATE, TYPING_BURST)
        d = self._conversation(session.user_id, peer)
        return d.addCallback(lambda c: self._typing(session.user_id, c, active))

    def _typing(self, user: str, conv: tuple[str, str, Any], active: bool) -> dict[str, Any]:
        _, other, group = conv
        if group is not None:
            self._group_typing(user, other, group, active, None)
        elif other != user and other.endswith("@" + self._realm.realm):
            notice = Notice({"type": "typing", "with": user, "user": user, "typing": active})
            self._realm.sessions.notify((other,), notice)
        elif other != user:
            frame = {"type": "reading", "kind": "typing", "from": user, "to": other}
            self._to_peer(other, {**frame, "typing": active})
        return {"with": other}

    def _group_typing(
        self, user: str, addr: str, group: Any, active: bool, origin: str | None
    ) -> None:
        """``user`` is typing in group ``addr``: its members here are told, and the
        other realms with members through the group's home realm, as its items go
        (from a member realm to the home realm, from the home realm to every member
        realm but ``origin``, the realm it came from)."""
        notice = Notice({"type": "typing", "with": addr, "user": user, "typing": active})
        self._realm.sessions.notify([m for m in group.members if m != user], notice)
        home = addr.rpartition("@")[2]
        if home == self._realm.realm:
            realms = self._realm.realms_of(group.members) - {origin}
        elif origin is None:
            realms = {home}
        else:
            return  # the home realm told the other member realms itself
        frame = {"type": "reading", "kind": "typing", "from": user, "to": addr, "typing": active}
        for realm in sorted(realms):
            self._to_realm(realm, frame)

    # across realms ---------------------------------------------------------------------------

    def _to_peer(self, other: str, frame: dict[str, Any]) -> None:
        """A ``reading`` frame for the realm of ``other`` (federation: ephemeral)."""
        self._to_realm(other.rpartition("@")[2], frame)

    def _to_realm(self, realm: str, frame: dict[str, Any]) -> None:
        fed = self._realm.federation
        if fed is not None and self._realm.config.federation.allows(realm):
            fed.reading(realm, frame)

    def _remote_group_typing(self, origin: str, sender: str, target: str, active: bool) -> None:
        """A member of group ``target`` typing, from peer realm ``origin``: from a
        member realm, about one of its own users, to our group; or from the group's
        home realm, about a member of any realm but ours (a relay: typing carries no
        words).  The typist must be a member (the group, or our mirror of it), and a
        typist gets :data:`TYPING_BURST` notices at once and :data:`TYPING_RATE` a
        second here, as on a connection; anything else is ignored."""
        try:
            who = str(address.user(sender, origin))
            addr = str(address.parse(target, origin, group=True))
        except ChatError:
            return
        home, mine = addr.rpartition("@")[2], self._realm.realm
        typist_realm = who.rpartition("@")[2]
        if typist_realm == mine:
            return  # our own users' typing never comes from elsewhere
        if home == mine:
            if typist_realm != origin:
                return  # a member realm speaks for its own users only
        elif home != origin:
            return  # only the home realm relays a group's typing
        group = self._realm.groups.groups.get(addr)
        if group is None or who not in group.members:
            return
        now = self._realm.clock.seconds()
        key = (who, addr)
        bucket = self._remote_typists.pop(key, None) or TokenBucket(TYPING_RATE, TYPING_BURST, now)
        self._remote_typists[key] = bucket
        if len(self._remote_typists) > REMOTE_TYPISTS:
            self._remote_typists.popitem(last=False)
        if bucket.take(now):
            self._realm.stats.rate_limited("remote_typing")
            return
        self._group_typing(who, addr, group, active, origin)

    def remote(self, origin: str, frame: dict[str, Any]) -> Any:
        """A ``reading`` frame from peer realm ``origin``: one of its users read (up to
        an item, named by its id: positions are per realm) or is typing in their
        private conversation with one of ours.  Anything else is ignored: a sender of
        another realm than ``origin``, a recipient who is not a local account, an item
        of another conversation."""
        sender, target = frame.get("from"), frame.get("to")
        if not isinstance(sender, str) or not isinstance(target, str):
            return None
        if target.startswith("#"):
            if frame.get("kind") == "typing" and isinstance(frame.get("typing"), bool):
                self._remote_group_typing(origin, sender, target, frame["typing"])
            return None
        try:
            who = address.user(sender, origin)
            me = address.user(target, self._realm.realm)
        except ChatError:
            return None
        if who.realm != origin or me.realm != self._realm.realm or not self._realm.is_user(str(me)):
            return None
        if frame.get("kind") == "typing" and isinstance(frame.get("typing"), bool):
            data = {"type": "typing", "with": str(who), "user": str(who)}
            self._realm.sessions.notify((str(me),), Notice({**data, "typing": frame["typing"]}))
            return None
        if frame.get("kind") != "read":
            return None
        try:
            msg_id = check_msg_id(frame.get("msg_id"))
        except ChatError:
            return None  # a reading frame has no answer: refused, it is dropped
        return self._remote_read(str(who), str(me), msg_id)

    @inlineCallbacks
    def _remote_read(self, who: str, me: str, msg_id: str) -> Any:
        key = conversation_key(who, me)
        env = yield self._store.stored_item(msg_id)
        if env is None or env.conversation != key:
            return
        markers = yield self._store.read_markers(key)
        if env.pos <= markers.get(who, 0):
            return
        self._store.set_read(who, key, env.pos)
        notice = Notice({"type": "read", "with": who, "user": who, "pos": env.pos})
        self._realm.sessions.notify((me,), notice)


def typing_tags(notice: dict[str, Any], me: str, ts: float) -> dict[str, Any]:
    """A ``typing`` notice for ``me`` as the ``tags`` notice an IRC gateway writes as
    ``TAGMSG`` (IRCv3 ``+typing``: ``active`` or ``done``), to ``me`` or the group."""
    where = str(notice["with"])
    return {
        "type": "tags",
        "id": new_message_id(),
        "from": notice["user"],
        "to": where if where.startswith("#") else me,
        "ts": ts,
        "tags": {"+typing": "active" if notice.get("typing") else "done"},
    }
