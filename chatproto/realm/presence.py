"""Presence: who is online, with which status, and who hears about it.

A user's presence is heard by their *contacts*: fellow members of their groups and the
users they have a private conversation with (their *partners*, read from the store when
they come online).  Presence is ephemeral: nothing here is stored, and a realm that
restarts starts with everyone offline.  Users of other realms are known as their realm
last told us (``remote``); a local user's changes are told to the realms of their
remote contacts through the federation service.

The handler holds state only; it sends through :class:`chatproto.realm.sessions.Sessions`
and reads group membership from :class:`chatproto.groups.Groups`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from chatproto import address
from chatproto.errors import ChatError
from chatproto.groups import Groups
from chatproto.ratelimit import ConnectionBuckets
from chatproto.realm.sessions import Notice, Session, Sessions
from chatproto.store import IStore
from chatproto.text import check_label, label_problem

__all__ = [
    "MAX_STATUS_TEXT",
    "MAX_UNHEARD_PER_REALM",
    "PRESENCE_STATES",
    "STATUS_BURST",
    "STATUS_RATE",
    "Presence",
]

PRESENCE_STATES = ("online", "away", "busy", "offline")
MAX_STATUS_TEXT = 256
#: ``set_status`` token bucket of each connection: per second, and at most at once.
#: One status change is a frame to every online contact (all the members of the
#: user's groups): unbounded, a client could make the realm write without end.
STATUS_RATE = 1.0
STATUS_BURST = 10
#: Users of one peer realm whose presence is kept while no user of this realm hears
#: it (no online partner, no fellow member): past this, the oldest are forgotten (and
#: read as offline).  Their realm sends only its users with a contact here, but a
#: peer could name new users without end, each kept for ever.
MAX_UNHEARD_PER_REALM = 65536


class Presence:
    """Presence of local and remote users, and its audience.

    ``federation`` returns the federation service (or None when federation is off);
    ``realms_of`` maps users to the other realms this realm federates with.
    """

    log = Logger()

    def __init__(
        self,
        realm: str,
        sessions: Sessions,
        groups: Groups,
        store: IStore,
        federation: Callable[[], Any],
        realms_of: Callable[[Iterable[str]], set[str]],
    ) -> None:
        self.realm = realm
        self._suffix = "@" + realm
        self._sessions = sessions
        self._groups = groups
        self._store = store
        self._federation = federation
        self._realms_of = realms_of
        #: user -> (status, text) for users with a status other than plain online
        self.status: dict[str, tuple[str, str]] = {}
        #: online user -> users they have a private conversation with (presence
        #: audience); change it only through add_partners/_drop_partners
        self.partners: dict[str, set[str]] = {}
        #: remote user -> online local users with them in ``partners`` (the reverse
        #: index, so a remote presence frame finds its audience without a scan)
        self.partner_of: dict[str, set[str]] = {}
        #: user -> number of their non-quiet sessions (presence "online" when > 0)
        self.visible: dict[str, int] = {}
        #: the most users online at once since the realm started (IRC's LUSERS)
        self.most_online = 0
        #: remote user -> (status, text), as their realm last told us
        self.remote: dict[str, tuple[str, str]] = {}
        #: realm -> its users in ``remote`` that no one here heard of when they were
        #: last told, oldest first (bounded: MAX_UNHEARD_PER_REALM)
        self._unheard: dict[str, OrderedDict[str, None]] = {}
        #: each session's set_status bucket
        self._status_buckets = ConnectionBuckets()

    # queries ----------------------------------------------------------------------

    def online_count(self) -> int:
        """How many users are online (have a non-quiet session)."""
        return len(self.visible)

    def of(self, user: str) -> tuple[str, str]:
        """(status, text) of canonical local user address ``user``: ``offline`` when no
        non-quiet session is open, else ``online``/``away``/``busy``."""
        if user not in self.visible:
            return ("offline", "")
        return self.status.get(user, ("online", ""))

    def is_online(self, user: str) -> bool:
        """Whether ``user`` (local or remote) is known to be online."""
        return user in self.visible or user in self.remote

    def who(self, users: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Online users of the realm, or the online ones among ``users`` (members of
        other realms as their realm last told us, without ``sessions``)."""
        out = []
        for u in sorted(self.visible if users is None else users):
            sessions = self.visible.get(u)
            if sessions:
                entry: dict[str, Any] = {"user": u, "sessions": sessions}
                status: tuple[str, str] | None = self.status.get(u)
            elif u in self.remote:
                entry = {"user": u}
                status = self.remote[u]
                if status == ("online", ""):
                    status = None
            else:
                continue
            if status:
                entry["status"] = status[0]
                if status[1]:
                    entry["text"] = status[1]
            out.append(entry)
        return out

    def contacts(self, user: str) -> set[str]:
        """Who hears ``user``'s presence: fellow group members and DM partners."""
        contacts = self.group_fellows(user)
        contacts.update(self.partners.get(user, ()))
        contacts.discard(user)
        return contacts

    def group_fellows(self, user: str) -> set[str]:
        """The members of ``user``'s groups (``user`` among them)."""
        fellows: set[str] = set()
        groups = self._groups
        for addr in groups.of_user.get(user, ()):
            fellows.update(groups.groups[addr].members)
        return fellows

    def notice(self, user: str, status: str, text: str) -> Notice:
        data: dict[str, Any] = {"type": "presence", "user": user, "status": status}
        if text:
            data["text"] = text
        return Notice(data)

    def known(self, user: str) -> Notice | None:
        """A presence frame for ``user`` if they are online: a local user with a
        non-quiet session, or a remote user as their realm last told us."""
        if user in self.visible:
            status, text = self.status.get(user, ("online", ""))
        elif user in self.remote:
            status, text = self.remote[user]
        else:
            return None
        return self.notice(user, status, text)

    # local users ------------------------------------------------------------------

    def broadcast(self, user: str, status: str, text: str) -> None:
        notice = self.notice(user, status, text)  # encoded once for everyone
        remote: set[str] = set()
        contacts = self.contacts(user)
        self._sessions.notify(contacts, notice)
        for contact in contacts:
            realm = contact.rpartition("@")[2]
            if realm != self.realm:
                remote.add(realm)
        fed = self._federation()
        if remote and fed is not None:
            fed.presence(remote, notice.data)

    def add_partners(self, user: str, others: Iterable[str]) -> None:
        """``others`` have a private conversation with online local ``user``."""
        mine = self.partners.setdefault(user, set())
        for other in others:
            if other not in mine:
                mine.add(other)
                if not other.endswith(self._suffix):
                    self.partner_of.setdefault(other, set()).add(user)

    def new_conversation(self, sender: str, recipient: str) -> None:
        """A private item between ``sender`` and ``recipient`` was committed: each
        online one of them has the other as a partner from now on."""
        if sender == recipient:
            return
        partners = self.partners.get(sender)
        if partners is not None and recipient not in partners:
            self.add_partners(sender, (recipient,))
            if recipient in self._sessions.online:
                self.add_partners(recipient, (sender,))

    def _drop_partners(self, user: str) -> None:
        """``user``'s last session closed: forget their partners (and the reverse)."""
        for other in self.partners.pop(user, ()):
            if not other.endswith(self._suffix):
                locals_ = self.partner_of.get(other)
                if locals_ is not None:
                    locals_.discard(user)
                    if not locals_:
                        del self.partner_of[other]

    @inlineCallbacks
    def came_online(self, session: Session) -> Any:
        # partners of this account, not of a deleted one of the same name (the floor)
        partners = yield self._store.conversation_partners(session.user_id, session.floor)
        if session.closed and session.user_id not in self._sessions.online:
            return  # gone while the store was read: nothing to keep for them
        # (a bounce from a group lists the group as a partner: not a presence contact)
        self.add_partners(session.user_id, (p for p in partners if not p.startswith("#")))
        if session.quiet or session.closed:
            return
        session.counted = True
        visible = self.visible.get(session.user_id, 0) + 1
        self.visible[session.user_id] = visible
        if visible == 1:
            self.most_online = max(self.most_online, len(self.visible))
            # "online", or the status set meanwhile from a quiet session
            self.broadcast(session.user_id, *self.status.get(session.user_id, ("online", "")))

    def went_offline(self, session: Session, last: bool) -> None:
        """``session`` closed (``last``: its user has no other session)."""
        user = session.user_id
        if session.counted:
            session.counted = False
            visible = self.visible[user] - 1
            if visible:
                self.visible[user] = visible
            else:
                del self.visible[user]
                self.status.pop(user, None)
                self.broadcast(user, "offline", "")
        if last:
            if not self.is_online(user):  # (a status set from quiet sessions only)
                self.status.pop(user, None)
            self._drop_partners(user)

    def set_status(self, session: Session, status: str, text: str = "") -> None:
        if status not in PRESENCE_STATES or status == "offline":
            raise ChatError("bad_request", "status must be online, away or busy")
        if not isinstance(text, str) or len(text) > MAX_STATUS_TEXT:
            raise ChatError("bad_request", f"status text: a string of at most {MAX_STATUS_TEXT}")
        check_label(text, "the status text")
        now = session.realm.clock.seconds()
        bucket = self._status_buckets.bucket(session, "set_status", STATUS_RATE, STATUS_BURST, now)
        wait = bucket.take(now)
        if wait:
            session.realm.stats.rate_limited("set_status")
            raise ChatError("rate_limited", "set_status too fast", retry_after=round(wait, 3))
        if status == "online" and not text:
            self.status.pop(session.user_id, None)
        else:
            self.status[session.user_id] = (status, text)
        if self.is_online(session.user_id):  # else from quiet sessions only: not shown
            self.broadcast(session.user_id, status, text)

    def snapshot(self, session: Session) -> None:
        """Tell a session that has just synced which of its contacts are online."""
        for contact in sorted(self.contacts(session.user_id)):
            notice = self.known(contact)
            if notice is not None:
                session.mind.notify(notice)

    def on_join(self, user: str, addr: str) -> None:
        """A joiner and the group's online members learn of each other at once.

        Every realm with members calls this when it applies a ``joined`` event (the
        home realm at commit, member realms on receipt), so across realms: a realm
        tells the joiner's realm which of its own members are online, and the
        joiner's realm tells the others that the joiner is.
        """
        group = self._groups.groups.get(addr)
        if group is None:
            return
        local = user.endswith(self._suffix)
        mine = self.known(user)
        online = self._sessions.online
        for member in group.members:
            if member == user:
                continue
            if local:
                theirs = self.known(member)
                if theirs is not None:
                    for s in online.get(user, ()):
                        s.mind.notify(theirs)
            if mine is not None:
                for s in online.get(member, ()):
                    s.mind.notify(mine)
        fed = self._federation()
        if fed is None:
            return
        if not local:
            realms = self._realms_of((user,))
            for member in group.members if realms else ():
                notice = self.known(member) if member in self.visible else None
                if notice is not None:
                    fed.presence(realms, notice.data)
        elif mine is not None and user in self.visible:
            realms = self._realms_of(group.members)
            if realms:
                fed.presence(realms, mine.data)

    def for_realm(self, realm: str) -> list[dict[str, Any]]:
        """Presence frames of the local users who are online and have a contact on
        ``realm`` (a fellow group member or a DM partner): what a link to ``realm``
        sends when it becomes ready, since that realm heard nothing while it was
        unreachable."""
        suffix = "@" + realm
        users: set[str] = set()
        for remote, locals_ in self.partner_of.items():
            if remote.endswith(suffix):
                users.update(locals_)
        for group in self._groups.groups.values():
            if any(m.endswith(suffix) for m in group.members):
                users.update(m for m in group.members if m in self.visible)
        frames = []
        for u in sorted(users):
            notice = self.known(u) if u in self.visible else None
            if notice is not None:
                frames.append(notice.data)
        return frames

    def wanted_by(self, realm: str) -> bool:
        """Whether a local user who is online has a contact on ``realm``: their
        presence is what a link to ``realm`` carries even with no item queued."""
        suffix = "@" + realm
        visible = self.visible
        for remote, locals_ in self.partner_of.items():
            if remote.endswith(suffix) and any(u in visible for u in locals_):
                return True
        for group in self._groups.groups.values():
            members = group.members
            if any(m.endswith(suffix) for m in members) and any(m in visible for m in members):
                return True
        return False

    # remote users -----------------------------------------------------------------

    def remote_change(self, origin: str, user: Any, status: Any, text: Any) -> None:
        """A presence change of a user of peer realm ``origin``: told to the local
        users who have a conversation with them or share a group with them.  A frame
        that changes nothing we knew (a link coming back repeats what is online) is
        not passed on.  Anything malformed is ignored."""
        try:
            addr = address.user(user, origin)
        except ChatError:
            return
        if addr.realm != origin or status not in PRESENCE_STATES:
            self.log.info(
                "federation: ignored presence {user} from {origin}",
                user=str(user)[:80],
                origin=origin,
            )
            return
        if not isinstance(text, str) or len(text) > MAX_STATUS_TEXT or label_problem(text):
            text = ""  # the rule of local status text (chatproto.text)
        who = str(addr)
        known = self.remote.get(who)
        unheard = self._unheard.get(origin)
        if status == "offline":
            if unheard is not None:
                unheard.pop(who, None)
            if known is None:
                return
            del self.remote[who]
        else:
            if known == (status, text):
                return
            self.remote[who] = (status, text)
        audience = self._audience(who)
        if status != "offline":
            if audience:
                if unheard is not None:
                    unheard.pop(who, None)
            else:
                self._keep_unheard(origin, who)
        self._sessions.notify(audience, self.notice(who, status, text))

    def _audience(self, who: str) -> set[str]:
        """The users here who hear remote user ``who``: the online users with ``who``
        as a partner, and the members of ``who``'s groups."""
        audience = set(self.partner_of.get(who, ()))
        groups = self._groups
        for group in groups.of_user.get(who, ()):
            audience.update(groups.groups[group].members)
        return audience

    def _keep_unheard(self, origin: str, who: str) -> None:
        """Note that no one here hears ``who`` (kept for a contact who comes online
        later, or a conversation about to start); past MAX_UNHEARD_PER_REALM of
        ``origin``'s, forget the oldest that still has no audience."""
        unheard = self._unheard.setdefault(origin, OrderedDict())
        unheard[who] = None
        unheard.move_to_end(who)
        while len(unheard) > MAX_UNHEARD_PER_REALM:
            oldest, _ = unheard.popitem(last=False)
            if not self._audience(oldest):
                self.remote.pop(oldest, None)

    def realm_silent(self, origin: str) -> None:
        """Peer realm ``origin`` has not been connected to us for a while: the
        presence we heard of its users is stale, so they go offline here (their realm
        sends who is online when its link is back)."""
        suffix = "@" + origin
        for who in [u for u in self.remote if u.endswith(suffix)]:
            self.remote_change(origin, who, "offline", "")
