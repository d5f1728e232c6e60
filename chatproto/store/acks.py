"""The SQL stores' bound on the devices whose acks they keep per user.

An ack is a row per ``(user, device)`` (see :meth:`chatproto.store.IStore.set_ack`),
and a client names any device it likes at login, so the transaction that stores acks
also forgets, for a user named in it, the devices past :attr:`IStore.max_devices` --
those with the lowest acks.  Ranking a user's rows is a read of all of them (up to
the bound: 64 by default), which every ack paying for would cost the commit path
more than the ack itself (measured on SQLite, a commit of 200 acks: ~1.8 us per ack
for the upsert; ranking each acking user's rows too, ~3 us more per ack when users
have 2 devices, ~65 us when they have 64).  So a user's rows are
ranked only when the commit may have added one: when it acknowledges a device the
writer does not know to be stored (:class:`KnownAcks`; the PostgreSQL store also
asks the upsert which rows it inserted, since other writers forget rows too).  The
writer's memory starts empty, so rows kept past the bound before (by an older
chatproto, or under a higher bound) go at each user's first ack after a start.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from chatproto.store.userconvs import MAX_REMEMBERED

__all__ = ["KnownAcks"]


class KnownAcks:
    """A writer's memory of the ack rows ``(user, device)`` it knows are stored:
    rows it committed and did not forget since.  A user with none unknown among a
    commit's acks added no row (one writer), so its rows need no ranking.  Bounded:
    past ``limit`` rows it forgets them all (and re-ranks each user at its next ack).
    """

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._known: set[tuple[str, str]] = set()
        self._limit = limit

    def new_users(self, acks: Iterable[tuple[str, str]]) -> list[str]:
        """The users of ``acks`` (keys ``(user, device)``) with a device not known to
        be stored, sorted (writers trimming the same users take locks in one order)."""
        known = self._known
        return sorted({u for u, d in acks if (u, d) not in known})

    def committed(
        self, acks: Collection[tuple[str, str]], forgotten: Collection[tuple[str, str]]
    ) -> None:
        """The commit storing ``acks`` and forgetting the rows ``forgotten`` (some of
        ``acks`` among them, perhaps) is durable."""
        known = self._known
        if len(known) + len(acks) > self._limit:
            known.clear()
        known.update(acks)
        if forgotten:
            known.difference_update(forgotten)

    def forget_all(self) -> None:
        """Rows may be gone that this writer does not know of (an account's acks,
        deleted with it): nothing is known to be stored any more."""
        self._known.clear()
