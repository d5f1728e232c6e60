"""The realms an item of a group goes to, decided in its commit (workers of a cluster).

In one process a group's items and its membership changes are committed in the order
they are checked, so the realms an item is queued for when it is handed to the store
(``GroupHandler.member_realms``) are those of its position.  With several writers
(:mod:`chatproto.cluster`) that does not hold: a worker checks an item against the
group as it knows it, and another worker may commit, meanwhile, the join of a new
realm's first member or the leave of a realm's last member at a position before the
item's.  The realm that joined would miss the item; the realm that left would receive
it -- the group's text sent to a realm with no member any more.

So on a worker the outbox of an item of one of the realm's groups is a
:class:`GroupFanout`, not a list of realms, and a change of the group's other realms
is committed with a :class:`GroupRealms`.  Both are outbox entries ``("", note)``
given to ``IStore.append`` / ``append_remote`` (only the PostgreSQL store of a worker
is given them).  The store orders the two by a lock per group taken before it draws
positions (exclusive for a change, shared for items), keeps the realms of the last
change in its table ``group_realms``, and queues each item, in the item's own
transaction, for the realms recorded when it drew the item's position: exactly the
realms with a member at that position, in the realm's order, as durable as any outbox
row (see :meth:`chatproto.store.postgresql.commit.CommitSQL.fan_out`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatproto.envelope import Envelope

__all__ = ["GroupFanout", "GroupRealms", "group_notes", "queued_realms"]


@dataclass(eq=False)
class GroupFanout:
    """Queue ``item`` (of group ``group``, one of the realm's own) for the group's
    other realms with a member at the item's position, but ``origin``.

    ``realms``: the realms as the worker knows them when it checked the item; the
    store uses them while it has recorded no change of the group's realms (then no
    worker has changed them since the store began keeping them, and every worker's
    view is right).  ``queued``: set by the store at the commit, the realms it queued
    the item for (the worker wakes their links)."""

    group: str
    item: Envelope
    realms: tuple[str, ...]
    origin: str = ""
    queued: list[str] = field(default_factory=list)


@dataclass(eq=False)
class GroupRealms:
    """The other realms with a member of group ``group`` after the group event it is
    committed with (the join of a new realm's first member, the removal of a realm's
    last member, the group's deletion)."""

    group: str
    realms: tuple[str, ...]


def group_notes(
    outbox: Sequence[Sequence[tuple[str, Any]]] | None,
) -> list[tuple[int, GroupFanout | GroupRealms]]:
    """The notes among a commit's outbox entries (per batch), as ``(batch index,
    note)`` in order; an empty list for a commit without any (the usual case)."""
    if not outbox:
        return []
    return [
        (i, obj)
        for i, queued in enumerate(outbox)
        for realm, obj in queued
        if not realm and isinstance(obj, GroupFanout | GroupRealms)
    ]


def queued_realms(outbox: Iterable[tuple[str, Any]]) -> list[str]:
    """The realms a committed append queued something for (its links to wake): the
    realm of each plain entry with an item stored, and those a :class:`GroupFanout`
    was queued for by the store."""
    realms: set[str] = set()
    for realm, obj in outbox:
        if isinstance(obj, GroupFanout):
            if obj.item.pos:
                realms.update(obj.queued)
        elif isinstance(obj, GroupRealms):
            continue
        elif not isinstance(obj, Envelope) or obj.pos:
            realms.add(realm)
    return sorted(realms)
