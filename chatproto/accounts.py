"""What deleting an account removes: the stream items that end its standing in groups.

An account is a name *and* the stream position at which it was created (its floor,
see ``IStore.user_floor``).  Positions are never reused and deleting an account
consumes one, so an account registered again under a deleted name has a greater
floor than anything its predecessor held.  Private items, backlog, history, files and
presence partners are read "after the floor" and need nothing here.

Group state is the replay of stored events (see :mod:`chatproto.groups`), keyed by
address, so a deleted account's memberships, roles, invitations and bans are ended by
*stored* events, committed in the same transaction as the account's deletion
(``IStore.delete_user``): :func:`plan_removal` makes them.  It is pure -- the realm
calls it with its live group state, ``chatrealmctl`` with the state it replays from
the database (:func:`replay_groups`) -- so both delete accounts the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from chatproto.envelope import Envelope, new_message_id
from chatproto.groups import ACCOUNT_DELETED, Groups

__all__ = [
    "Removal",
    "is_removal_request",
    "plan_removal",
    "remote_groups_of",
    "removal_request",
    "replay_groups",
]

#: How many group events :func:`replay_groups` reads per page.
REPLAY_PAGE = 1000


@attrs.define
class Removal:
    """Stream items to commit for a deleted account, and what to queue for other
    realms with them (``IStore.append``'s ``outbox``)."""

    items: list[Envelope] = attrs.field(factory=list)
    outbox: list[tuple[str, Envelope | dict[str, Any]]] = attrs.field(factory=list)


def removal_request(user: str, group: str, ts: float) -> dict[str, Any]:
    """The request that tells a group's home realm that its member ``user`` (of the
    sending realm) was deleted: a ``left`` request with reason ``account deleted``.  A
    realm is the authority on its own accounts, so the home realm ends the standing
    without the rules of ``leave`` (an only owner is succeeded, see
    :meth:`chatproto.groups.Groups.account_removal`)."""
    return {
        "id": new_message_id(),
        "kind": "request",
        "from": user,
        "to": group,
        "event": "left",
        "args": {"reason": ACCOUNT_DELETED},
        "ts": ts,
    }


def is_removal_request(item: Any) -> bool:
    """Whether a queued outbox entry is a :func:`removal_request`."""
    return (
        isinstance(item, dict)
        and item.get("kind") == "request"
        and item.get("event") == "left"
        and isinstance(item.get("args"), dict)
        and item["args"].get("reason") == ACCOUNT_DELETED
    )


def plan_removal(
    groups: Groups,
    user: str,
    addrs: Iterable[str],
    realm: str,
    realms_of: Callable[[Iterable[str]], set[str]],
    ts: float,
) -> Removal:
    """The items ending user ``user``'s standing in each group of ``addrs`` (a local
    account deleted here, or, on a group's home realm, a user another realm deleted).

    A group of this realm (``realm``): the events of
    :meth:`Groups.account_removal`, queued for every other realm with a member
    (``realms_of(users)`` names the realms items may go to), like any group event.
    A group of another realm: a :func:`removal_request` to its home realm, which
    decides and sends the events back; if ``user`` is in this realm's mirror of it,
    also a local ``left`` event for the mirror (stored, not sent), so that the account
    is out of the mirror at once and after a restart, whatever the home realm answers
    and whenever.  Requests go only to realms that ``realms_of`` allows.
    """
    out = Removal()
    suffix = "@" + realm
    for addr in sorted(set(addrs)):
        group = groups.groups.get(addr)
        if addr.endswith(suffix):
            if group is None:
                continue
            targets = sorted(realms_of(set(group.members) | {user}))
            for meta in groups.account_removal(addr, user):
                env = Envelope(new_message_id(), "event", user, addr, ts, "", meta)
                out.items.append(env)
                out.outbox.extend((r, env) for r in targets)
            continue
        home = addr.rpartition("@")[2]
        if realms_of({"x@" + home}):
            out.outbox.append((home, removal_request(user, addr, ts)))
        if group is not None and user in group.members:
            meta = {"event": "left", "user": user, "reason": ACCOUNT_DELETED}
            out.items.append(Envelope(new_message_id(), "event", user, addr, ts, "", meta))
    return out


def remote_groups_of(groups: Groups, user: str, realm: str) -> set[str]:
    """Groups of other realms that local ``user`` may have standing in: the mirrors
    they are a member of, and groups whose events (an invitation, a ban) are in their
    feed.  The home realms hold the rest of the truth; each is told (see
    :func:`plan_removal`)."""
    suffix = "@" + realm
    found = {a for a in groups.of_user.get(user, ()) if not a.endswith(suffix)}
    found.update(a for a, _lo, _hi in groups.past.get(user, ()) if not a.endswith(suffix))
    return found


def replay_groups(
    groups: Groups, read_events: Callable[[int, int], list[Envelope]], realm: str
) -> None:
    """Apply every stored group event, oldest first, as the realm does at start-up
    (groups of other realms as mirrors).  ``read_events(after, limit)`` is
    ``IStore.read_events`` made synchronous (``SQLiteDB.read_events``)."""
    suffix = "@" + realm
    after = 0
    while True:
        events = read_events(after, REPLAY_PAGE)
        for env in events:
            groups.apply(env, mirror=not env.recipient.endswith(suffix))
        if len(events) < REPLAY_PAGE:
            return
        after = events[-1].pos
