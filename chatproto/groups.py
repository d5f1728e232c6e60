"""Groups: their state, the permission rules, and how events change them.

A group lives on its home realm as ``#name@realm``.  Its state (topic, visibility,
history rule, members with roles, bans, invites) is a pure function of the group's
*events*: every change is an :class:`chatproto.envelope.Envelope` of kind ``event``
committed to the group's stream like a message, then applied here with
:meth:`Groups.apply`.  At start-up the realm replays the stored events, so there is no
second source of truth to keep in step, and history reads naturally ("bob joined").

:meth:`Groups.check` holds every permission rule; it raises
:class:`chatproto.errors.ChatError` and never touches storage or sessions.  The realm
service calls it, commits the event, then applies it and routes it.
"""

from __future__ import annotations

from typing import Any

import attrs

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.text import check_label

__all__ = [
    "ACCOUNT_DELETED",
    "EVENTS",
    "HISTORY_RULES",
    "ROLES",
    "SETTINGS",
    "VISIBILITIES",
    "Group",
    "Groups",
    "Membership",
    "check_settings",
    "check_snapshot",
]

ROLES = ("member", "admin", "owner")
RANK = {role: i for i, role in enumerate(ROLES)}
VISIBILITIES = ("public", "invite")
HISTORY_RULES = ("joined", "all")
MAX_TOPIC = 512
#: Closed feed ranges kept per user (oldest dropped first).
MAX_PAST_RANGES = 64
#: The ``reason`` of the ``left`` event that ends a deleted account's standing in a
#: group (see :meth:`Groups.account_removal`).
ACCOUNT_DELETED = "account deleted"

#: Event names (``meta["event"]``) and what they do to the state.
EVENTS = (
    "created",
    "joined",
    "left",
    "invited",
    "kicked",
    "banned",
    "unbanned",
    "topic",
    "role",
    "deleted",
    "settings",
    "voice",
)
#: Group settings a ``settings`` event may change (besides ``visibility``), with the
#: type of their value; see :meth:`Groups.check`.
SETTINGS = {
    "moderated": bool,
    "secret": bool,
    "topic_lock": bool,
    "limit": int,
    "key": str,
    "external": bool,
}
#: Longest join key; a key is printable ASCII without spaces or commas.
MAX_KEY = 32
#: Largest member limit a group may set (0: none but the realm's).
MAX_LIMIT = 1_000_000


@attrs.define
class Membership:
    role: str
    #: The member sees items with ``lo < pos`` (``lo`` = position of their join event,
    #: minus one, so their own join is included; 0 for history rule ``all``).
    lo: int
    #: The position of the event that made them a member (their join, the group's
    #: creation, or a mirror's snapshot): an account created at or after it is not
    #: the one that joined.
    since: int = 0
    #: may speak in a moderated group (IRC's voice, ``+v``)
    voice: bool = False


@attrs.define
class Group:
    address: str
    topic: str = ""
    #: who set the topic, and when (the event's sender and timestamp; IRC's 333)
    topic_by: str = ""
    topic_at: float = 0.0
    visibility: str = "public"
    history: str = "joined"
    created_pos: int = 0
    #: when the group was created (its created event's timestamp)
    created_at: float = 0.0
    #: only admins, owners and voiced members may send
    moderated: bool = False
    #: not listed by list_groups, nor shown to non-members
    secret: bool = False
    #: only admins and owners set the topic (else any member)
    topic_lock: bool = True
    #: at most this many members (0: only the realm's limit); invitees may exceed it
    limit: int = 0
    #: joining needs this key ("" = none); invitees need none
    key: str = ""
    #: non-members may send to it too (IRC's ``-n``), unless it is moderated
    external: bool = False
    members: dict[str, Membership] = attrs.field(factory=dict)
    #: banned user -> position of the ban
    bans: dict[str, int] = attrs.field(factory=dict)
    #: invited user -> position of the invitation
    invites: dict[str, int] = attrs.field(factory=dict)

    def role_of(self, user: str) -> str | None:
        m = self.members.get(user)
        return m.role if m else None

    def takes_outsiders(self) -> bool:
        """Whether non-members may send messages to it (IRC's ``-n`` off): an
        ``external`` group that is not ``moderated``."""
        return self.external and not self.moderated

    def summary(self) -> dict[str, Any]:
        return {
            "group": self.address,
            "topic": self.topic,
            "visibility": self.visibility,
            "history": self.history,
            "members": len(self.members),
            "moderated": self.moderated,
            "secret": self.secret,
            "topic_lock": self.topic_lock,
            "limit": self.limit,
            "has_key": bool(self.key),
            "external": self.external,
        }


class Groups:
    """All groups of one realm (in memory), with the rules and the event application."""

    def __init__(self, max_members: int, max_groups_per_user: int, realm: str = "") -> None:
        self.max_members = max_members
        #: This realm's suffix (``@realm``): a mirror with no member ending in it is
        #: dropped (see :meth:`apply`).  Empty: mirrors are kept while they have members.
        self._suffix = "@" + realm if realm else ""
        self.max_groups_per_user = max_groups_per_user
        self.groups: dict[str, Group] = {}
        #: user -> addresses of the groups they are a member of
        self.of_user: dict[str, set[str]] = {}
        #: user -> closed (group, lo, hi] ranges still in their feed: past memberships
        #: (so an offline member learns they were kicked), invites, bans.
        self.past: dict[str, list[tuple[str, int, int]]] = {}

    def snapshot(self, address: str) -> dict[str, Any]:
        """The state a member realm needs to mirror the group (see :meth:`apply`):
        settings and members with roles.  Bans and invites stay on the home realm."""
        group = self.get(address)
        return {
            "topic": group.topic,
            "visibility": group.visibility,
            "history": group.history,
            "members": {u: m.role for u, m in sorted(group.members.items())},
        }

    def get(self, address: str) -> Group:
        group = self.groups.get(address)
        if group is None:
            raise ChatError("no_such_group", f"no group {address}")
        return group

    # rules --------------------------------------------------------------------------

    def _need_role(self, group: Group, actor: str, least: str) -> str:
        role = group.role_of(actor)
        if role is None:
            raise ChatError("not_member", f"you are not a member of {group.address}")
        if RANK[role] < RANK[least]:
            raise ChatError("forbidden", f"this needs the {least} role in {group.address}")
        return role

    def _outranks(self, group: Group, actor: str, target: str) -> None:
        actor_role = group.role_of(actor) or "member"
        target_role = group.role_of(target)
        if target_role is not None and RANK[target_role] >= RANK[actor_role]:
            raise ChatError(
                "forbidden", f"{target} is {target_role}; you can only act on lower roles"
            )

    def check_speaker(self, group_addr: str, sender: str) -> None:
        """Raise ChatError unless ``sender`` may send to the group: ``not_member``, or
        ``moderated`` (a moderated group, and a member neither voiced nor admin)."""
        group = self.get(group_addr)
        m = group.members.get(sender)
        if m is None:
            if group.takes_outsiders():
                return
            raise ChatError("not_member", f"you are not a member of {group_addr}")
        if group.moderated and m.role == "member" and not m.voice:
            raise ChatError("moderated", f"{group_addr} is moderated: only voiced members speak")

    def _room_for(self, user: str) -> None:
        if len(self.of_user.get(user, ())) >= self.max_groups_per_user:
            raise ChatError(
                "limit_reached", f"a user may be in at most {self.max_groups_per_user} groups"
            )

    def check(self, event: str, group_addr: str, actor: str, **args: Any) -> dict[str, Any]:
        """Check that ``actor`` may cause ``event``; return the event's ``meta``.

        Raises ChatError with a stable code: ``no_such_group``, ``group_exists``,
        ``not_member``, ``forbidden``, ``already_member``, ``banned``, ``not_invited``,
        ``group_full``, ``bad_key``, ``limit_reached``, ``bad_request``.
        """
        meta: dict[str, Any] = {"event": event}
        if event == "created":
            if group_addr in self.groups:
                raise ChatError("group_exists", f"{group_addr} already exists")
            self._room_for(actor)
            visibility = args.get("visibility") or "public"
            history = args.get("history") or "joined"
            if visibility not in VISIBILITIES:
                raise ChatError("bad_request", "visibility must be 'public' or 'invite'")
            if history not in HISTORY_RULES:
                raise ChatError("bad_request", "history must be 'joined' or 'all'")
            topic = _shown(args.get("topic", ""), "the topic")
            meta.update(visibility=visibility, history=history, topic=topic)
            return meta
        group = self.get(group_addr)
        target: str = args.get("user") or ""
        if event == "joined":
            if actor in group.members:
                raise ChatError("already_member", f"you are already in {group_addr}")
            if actor in group.bans:
                raise ChatError("banned", f"you are banned from {group_addr}")
            invited = actor in group.invites
            if group.visibility == "invite" and not invited:
                raise ChatError("not_invited", f"{group_addr} is invite-only")
            if group.key and not invited and args.get("key") != group.key:
                raise ChatError("bad_key", f"{group_addr} needs a key to join")
            if group.limit and not invited and len(group.members) >= group.limit:
                raise ChatError("group_full", f"{group_addr} is limited to {group.limit} members")
            if len(group.members) >= self.max_members:
                raise ChatError("group_full", f"{group_addr} has {self.max_members} members")
            self._room_for(actor)
            meta["user"] = actor
        elif event == "left":
            role = self._need_role(group, actor, "member")
            owners = [u for u, m in group.members.items() if m.role == "owner"]
            if role == "owner" and owners == [actor] and len(group.members) > 1:
                raise ChatError(
                    "forbidden", "you are the only owner: make someone owner or delete the group"
                )
            meta["user"] = actor
        elif event == "invited":
            self._need_role(group, actor, "admin")
            if target in group.members:
                raise ChatError("already_member", f"{target} is already in {group_addr}")
            if target in group.bans:
                raise ChatError("banned", f"{target} is banned from {group_addr}")
            meta["user"] = target
        elif event in ("kicked", "banned"):
            self._need_role(group, actor, "admin")
            if target == actor:
                raise ChatError("bad_request", "use leave to leave a group")
            if event == "kicked" and target not in group.members:
                raise ChatError("not_member", f"{target} is not in {group_addr}")
            if event == "banned" and target in group.bans:
                raise ChatError("banned", f"{target} is already banned")
            self._outranks(group, actor, target)
            meta["user"] = target
            if args.get("reason"):
                meta["reason"] = _shown(args["reason"], "the reason")
        elif event == "unbanned":
            self._need_role(group, actor, "admin")
            if target not in group.bans:
                raise ChatError("bad_request", f"{target} is not banned")
            meta["user"] = target
        elif event == "topic":
            self._need_role(group, actor, "admin" if group.topic_lock else "member")
            meta["topic"] = _shown(args.get("topic", ""), "the topic")
        elif event == "settings":
            self._need_role(group, actor, "admin")
            meta.update(check_settings(args))
        elif event == "voice":
            self._need_role(group, actor, "admin")
            if target not in group.members:
                raise ChatError("not_member", f"{target} is not in {group_addr}")
            if not isinstance(args.get("voice"), bool):
                raise ChatError("bad_request", "voice must be true or false")
            meta.update(user=target, voice=args["voice"])
        elif event == "role":
            self._need_role(group, actor, "owner")
            new_role = args.get("role")
            if new_role not in ROLES:
                raise ChatError("bad_request", "role must be member, admin or owner")
            if target not in group.members:
                raise ChatError("not_member", f"{target} is not in {group_addr}")
            owners = [u for u, m in group.members.items() if m.role == "owner"]
            if target == actor and new_role != "owner" and owners == [actor]:
                raise ChatError("forbidden", "a group needs at least one owner")
            meta.update(user=target, role=new_role)
        elif event == "deleted":
            self._need_role(group, actor, "owner")
        else:  # pragma: no cover - callers pass known events
            raise ChatError("bad_request", f"unknown event {event!r}")
        return meta

    # state --------------------------------------------------------------------------

    def audience(self, env: Envelope) -> set[str]:
        """The users who get ``env`` live: current members, plus whoever it removes."""
        group = self.groups.get(env.recipient)
        users = set(group.members) if group else set()
        meta = env.meta or {}
        if meta.get("event") in ("kicked", "banned", "left", "invited") and meta.get("user"):
            users.add(meta["user"])
        return users

    def apply(self, env: Envelope, mirror: bool = False) -> None:
        """Apply a committed event to the state (also used to replay at start-up).

        Defensive: an event that no longer makes sense (a second ``created`` for a live
        group, a join by a member) changes nothing, so replay always converges.

        ``mirror``: the group lives on another realm, which sent the event (federation).
        Its state here is a mirror: the home realm sends a ``joined`` event to the
        joiner's realm with ``meta["snapshot"]`` (:meth:`snapshot` taken just before the
        event), which replaces the mirrored settings and members; later events keep it
        in step.  The mirror routes the group's items to local members, bounds their
        feeds and answers their ``members``/``group_info``/``who``; the home realm alone
        checks the rules.  A mirror left with no local member is dropped (no more
        events come for it).
        """
        meta = env.meta or {}
        event = meta.get("event")
        addr = env.recipient
        if event == "created":
            if addr in self.groups:
                return
            created = Group(
                addr,
                topic=meta.get("topic", ""),
                visibility=meta.get("visibility", "public"),
                history=meta.get("history", "joined"),
                created_pos=env.pos,
                created_at=env.ts,
            )
            if created.topic:
                created.topic_by, created.topic_at = env.sender, env.ts
            self.groups[addr] = created
            self._add(created, env.sender, "owner", env.pos)
            return
        group = self.groups.get(addr)
        if group is None:
            if not mirror or event == "deleted":
                return
            group = self.groups[addr] = Group(addr, created_pos=env.pos)
        if mirror and isinstance(meta.get("snapshot"), dict):
            self._restore(group, meta["snapshot"], env.pos)
        user = meta.get("user", "")
        if event == "joined":
            if user not in group.members:
                group.invites.pop(user, None)
                self._add(group, user, "member", env.pos)
        elif event == "left" and meta.get("reason") == ACCOUNT_DELETED:
            self._forget(group, user)
            successor = meta.get("successor")
            heir = group.members.get(successor) if isinstance(successor, str) else None
            if heir is not None:
                heir.role = "owner"
        elif event in ("left", "kicked"):
            self._remove(group, user, env.pos)
        elif event == "banned":
            group.bans[user] = env.pos
            group.invites.pop(user, None)
            if user in group.members:
                self._remove(group, user, env.pos)
            else:
                self._note(user, addr, env.pos)  # a non-member learns of the ban
        elif event == "unbanned":
            group.bans.pop(user, None)
        elif event == "invited":
            group.invites[user] = env.pos
            self._note(user, addr, env.pos)  # the invitee gets it, even when offline
        elif event == "topic":
            group.topic = meta.get("topic", "")
            group.topic_by, group.topic_at = env.sender, env.ts
        elif event == "role" and user in group.members:
            group.members[user].role = meta.get("role", "member")
        elif event == "voice" and user in group.members:
            group.members[user].voice = bool(meta.get("voice"))
        elif event == "settings":
            if meta.get("visibility") in VISIBILITIES:
                group.visibility = meta["visibility"]
            for name, kind in SETTINGS.items():
                if isinstance(meta.get(name), kind):
                    setattr(group, name, meta[name])
        elif event == "deleted":
            for member in list(group.members):
                self._remove(group, member, env.pos)
        if not group.members:
            # Deleted, or its last member left: the name is free again.  Former
            # members' ranges end at this event, so they still read up to it.
            del self.groups[addr]
        elif mirror and self._suffix and not any(u.endswith(self._suffix) for u in group.members):
            self._drop(group)

    def _restore(self, group: Group, snap: dict[str, Any], pos: int) -> None:
        """Set a mirror's state from the home realm's snapshot (checked on receipt)."""
        group.topic = snap.get("topic", group.topic)
        group.visibility = snap.get("visibility", group.visibility)
        group.history = snap.get("history", group.history)
        roles = snap.get("members") or {}
        for user in [u for u in group.members if u not in roles]:
            self._remove(group, user, pos)
        for user, role in roles.items():
            if user in group.members:
                group.members[user].role = role
            else:
                self._add(group, user, role, pos)

    def _drop(self, group: Group) -> None:
        """Forget a mirror whose local members are all gone: the members left are
        users of other realms, who have no feed here (so no closed ranges)."""
        for user in group.members:
            mine = self.of_user.get(user)
            if mine is not None:
                mine.discard(group.address)
                if not mine:
                    del self.of_user[user]
        group.members.clear()
        del self.groups[group.address]

    def _add(self, group: Group, user: str, role: str, pos: int) -> None:
        # "all": everything since the group (this incarnation of the name) was created.
        lo = group.created_pos - 1 if group.history == "all" else pos - 1
        group.members[user] = Membership(role, lo, pos)
        self.of_user.setdefault(user, set()).add(group.address)

    def _remove(self, group: Group, user: str, pos: int) -> None:
        m = group.members.pop(user, None)
        if m is not None:
            self._closed_range(user, group.address, m.lo, pos)
        mine = self.of_user.get(user)
        if mine is not None:
            mine.discard(group.address)
            if not mine:
                del self.of_user[user]

    def _forget(self, group: Group, user: str) -> None:
        """A deleted account's standing in ``group`` ends without a trace: no closed
        range in their feed (nobody reads it), no invitation, no ban, no membership."""
        group.invites.pop(user, None)
        group.bans.pop(user, None)
        if group.members.pop(user, None) is not None:
            mine = self.of_user.get(user)
            if mine is not None:
                mine.discard(group.address)
                if not mine:
                    del self.of_user[user]
        ranges = self.past.get(user)
        if ranges is not None:
            ranges[:] = [r for r in ranges if r[0] != group.address]
            if not ranges:
                del self.past[user]

    def _note(self, user: str, addr: str, pos: int) -> None:
        self._closed_range(user, addr, pos - 1, pos)

    def _closed_range(self, user: str, addr: str, lo: int, hi: int) -> None:
        ranges = self.past.setdefault(user, [])
        ranges.append((addr, lo, hi))
        if len(ranges) > MAX_PAST_RANGES:
            del ranges[0]

    # deleted accounts ---------------------------------------------------------------

    def standing(self, user: str) -> dict[str, int]:
        """The groups where ``user`` is a member, invited or banned, each with the
        lowest position of that standing (what a deleted account leaves behind)."""
        out: dict[str, int] = {}
        for addr, group in self.groups.items():
            marks = [group.invites.get(user), group.bans.get(user)]
            m = group.members.get(user)
            if m is not None:
                marks.append(m.since)
            found = [p for p in marks if p is not None]
            if found:
                out[addr] = min(found)
        return out

    def standing_of_suffix(self, suffix: str) -> dict[str, dict[str, int]]:
        """:meth:`standing` of every user whose address ends with ``suffix`` (a
        realm's own users), in one pass: user -> group -> lowest position."""
        out: dict[str, dict[str, int]] = {}
        for addr, group in self.groups.items():
            for marks in (
                group.invites,
                group.bans,
                {u: m.since for u, m in group.members.items()},
            ):
                for user, pos in marks.items():
                    if user.endswith(suffix):
                        mine = out.setdefault(user, {})
                        mine[addr] = min(pos, mine.get(addr, pos))
        return out

    def account_removal(self, addr: str, user: str) -> list[dict[str, Any]]:
        """The ``meta`` of the event that ends a deleted account's standing in group
        ``addr``: a ``left`` event with reason :data:`ACCOUNT_DELETED` (which also ends
        an invitation or a ban) and, when ``user`` is the only owner and others remain,
        ``successor``: the member who becomes owner -- the admin who has been a member
        longest, else the member who has.  (One event, not a ``role`` event first: a
        member realm accepts from the home realm no act of one of its users it did not
        ask for, and it asked for the leave only.)  A group left with no member is
        deleted, as when its last member leaves.  Empty when ``user`` has no standing."""
        group = self.groups.get(addr)
        if group is None or not (
            user in group.members or user in group.invites or user in group.bans
        ):
            return []
        meta: dict[str, Any] = {"event": "left", "user": user, "reason": ACCOUNT_DELETED}
        if group.role_of(user) == "owner":
            others = {u: m for u, m in group.members.items() if u != user}
            if others and not any(m.role == "owner" for m in others.values()):
                admins = [u for u, m in others.items() if m.role == "admin"]
                pool = admins or list(others)
                meta["successor"] = min(pool, key=lambda u: others[u].since)
        return [meta]

    # reading ------------------------------------------------------------------------

    def feed_ranges(self, user: str) -> list[tuple[str, int, int | None]]:
        """(group, lo, hi) ranges of group items in ``user``'s feed (hi None = open):
        current memberships, then closed ones (past memberships, invites, bans)."""
        out: list[tuple[str, int, int | None]] = [
            (addr, self.groups[addr].members[user].lo, None) for addr in self.of_user.get(user, ())
        ]
        out.extend(self.past.get(user, ()))
        return out

    def readable_from(self, group_addr: str, user: str) -> int:
        """The lowest position (exclusive) of the group's history ``user`` may read."""
        group = self.get(group_addr)
        m = group.members.get(user)
        if m is None:
            raise ChatError("not_member", f"you are not a member of {group_addr}")
        return m.lo


def check_snapshot(raw: Any) -> dict[str, Any]:
    """A group snapshot from a home realm (``meta["snapshot"]`` of a ``joined``
    event), checked: raises ChatError ``bad_request`` unless it has exactly a topic,
    a visibility, a history rule and members (user address -> role, at least one).
    The addresses themselves are the caller's to check.  Its size is not bounded by
    this realm's member limit (the home realm's may be higher), only by the link's
    frame size."""
    if not isinstance(raw, dict) or set(raw) != {"topic", "visibility", "history", "members"}:
        raise ChatError("bad_request", "a snapshot has topic, visibility, history and members")
    _shown(raw["topic"], "the topic")  # shown to our members as a local one is
    if raw["visibility"] not in VISIBILITIES or raw["history"] not in HISTORY_RULES:
        raise ChatError("bad_request", "bad snapshot visibility or history")
    members = raw["members"]
    if not isinstance(members, dict) or not members:
        raise ChatError("bad_request", "snapshot members: a non-empty object")
    if not all(isinstance(u, str) and r in ROLES for u, r in members.items()):
        raise ChatError("bad_request", "snapshot members map users to roles")
    return raw


def check_settings(args: dict[str, Any]) -> dict[str, Any]:
    """The settings a ``settings`` event changes, checked (``bad_request``)."""
    out: dict[str, Any] = {}
    if args.get("visibility") is not None:
        if args["visibility"] not in VISIBILITIES:
            raise ChatError("bad_request", "visibility must be 'public' or 'invite'")
        out["visibility"] = args["visibility"]
    for name, kind in SETTINGS.items():
        value = args.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ChatError("bad_request", f"{name} must be a {kind.__name__}")
        out[name] = value
    if "limit" in out and not 0 <= out["limit"] <= MAX_LIMIT:
        raise ChatError("bad_request", f"limit must be 0 (none) to {MAX_LIMIT}")
    key = out.get("key")
    if key and (len(key) > MAX_KEY or not all(33 <= ord(c) < 127 and c != "," for c in key)):
        raise ChatError(
            "bad_request",
            f"a key is 1 to {MAX_KEY} printable ASCII characters, no space or comma",
        )
    if not out:
        raise ChatError("bad_request", "settings changes nothing")
    return out


def _topic(text: Any) -> str:
    if not isinstance(text, str):
        raise ChatError("bad_request", "topic/reason must be a string")
    if len(text) > MAX_TOPIC:
        raise ChatError("too_large", f"topic/reason longer than {MAX_TOPIC} characters")
    return text


def _shown(text: Any, what: str) -> str:
    """A topic or reason a user asks for: shown to every member, so a label
    (:func:`chatproto.text.check_label`)."""
    return check_label(_topic(text), what)
