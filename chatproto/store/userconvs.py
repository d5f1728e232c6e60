"""The private conversations each user is in: the ``user_convs`` rows of the SQL stores.

A user's feed, conversation partners, conversation list and private-message search
read the items of that user's private conversations through the ``items_conv``
index (``conv, pos``); this table says which conversations those are -- one row
``(user_addr, conv, peer)`` per user and private conversation (a DM to oneself: one
row, its own peer).  It replaces two indexes of ``items`` on ``sender`` and
``recipient`` that every stored item paid for (bench/README.md, issue 20): a row here
is written only when a conversation is new to a user, in the transaction of the item
that makes it so.

Rows are never deleted (not even with an account: a later account of the name reads
only after its floor, as it does in the items), so a row known to be committed stays
true: the writer keeps the rows it committed or found in memory (:class:`UserConvs`)
and writes only the others, with "insert or ignore" -- which is right after a restart
(the set starts empty) and with several writers sharing a database (PostgreSQL
cluster workers: each inserts what it has not seen, the database keeps one).
"""

from __future__ import annotations

from collections.abc import Sequence

from chatproto.envelope import Envelope

__all__ = ["MAX_REMEMBERED", "UserConvs", "user_conv_rows"]

#: The rows a writer remembers before it forgets them all (and re-learns them, one
#: indexed "insert or ignore" each): a bound on the writer's memory.
MAX_REMEMBERED = 200_000


def user_conv_rows(env: Envelope) -> list[tuple[str, str, str]]:
    """The ``(user_addr, conv, peer)`` rows an item implies: none for a group's item,
    one per party of a private one (one for a DM to oneself)."""
    if env.recipient.startswith("#"):
        return []
    conv = env.conversation
    if env.sender == env.recipient:
        return [(env.sender, conv, env.sender)]
    return [(env.sender, conv, env.recipient), (env.recipient, conv, env.sender)]


class UserConvs:
    """A writer's memory of the ``user_convs`` rows committed already, as the
    ``(user_addr, peer)`` pairs they are of (an item is checked without making its
    conversation's key)."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._known: set[tuple[str, str]] = set()
        self._limit = limit

    def new_rows(
        self,
        batches: Sequence[Sequence[Envelope]],
        results: Sequence[Sequence[int | None] | Exception],
    ) -> list[tuple[str, str, str]]:
        """The rows the items stored in this commit may add (``results[i]``: the
        positions of batch ``i``, None for an item not stored, or the batch's
        error), that this writer has not seen committed; sorted, so that writers
        inserting the same rows at once take their locks in one order."""
        known = self._known
        out: set[tuple[str, str, str]] = set()
        for batch, res in zip(batches, results, strict=True):
            if isinstance(res, Exception):
                continue
            # A batch is mostly one sender's items to one recipient: an item of the
            # same pair as the item before it, looked at already, is passed over
            # with two string comparisons (no tuples, no lookups).
            seen_sender = seen_recipient = ""
            for env, pos in zip(batch, res, strict=True):
                sender, recipient = env.sender, env.recipient
                if sender == seen_sender and recipient == seen_recipient:
                    continue
                if pos is None:  # not stored: its rows must wait for an item stored
                    continue
                seen_sender, seen_recipient = sender, recipient
                if recipient.startswith("#"):
                    continue
                if (sender, recipient) in known and (recipient, sender) in known:
                    continue
                out.update(r for r in user_conv_rows(env) if (r[0], r[2]) not in known)
        return sorted(out)

    def committed(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """``rows`` are in the database now (their transaction committed)."""
        if len(self._known) + len(rows) > self._limit:
            self._known.clear()
        self._known.update((r[0], r[2]) for r in rows)
