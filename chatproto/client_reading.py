"""The client library's calls about reading: the conversation list, read markers, the
read-receipt switch, typing notices and search.

A mixin of :class:`chatproto.client.Connection` (kept apart so the client module
stays about connections and transfers).  The realm pushes two ephemeral frames for
these, which the library hands to ``on_notice`` (see :func:`chatproto.client.connect`):
``read`` (someone's read marker moved: yours on another device, or the other party's
in a private conversation) and ``typing``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["ReadingCalls"]


class ReadingCalls:
    """Requests of PROTOCOL.md's "Read markers and the conversation list",
    ``typing`` and ``search``; the class using it has ``protocol.request``."""

    protocol: Any

    def conversations(self, limit: int | None = None) -> Deferred[dict[str, Any]]:
        """Your conversations, most recent first: fires with the result, whose
        ``conversations`` each have ``with``, ``last``, ``read``, ``unread`` (and
        ``peer_read`` for a private one, ``mentions`` and ``read_by`` for a group)."""
        fields = {"limit": limit} if limit is not None else {}
        return self.protocol.request("conversations", **fields).addCallback(_fields)

    def mark_read(self, peer: str, pos: int) -> Deferred[dict[str, Any]]:
        """Mark the conversation with ``peer`` (a user or a ``#group``) read up to
        position ``pos``; fires with ``{"with", "pos"}`` (the marker now)."""
        return self.protocol.request("mark_read", **{"with": peer, "pos": pos}).addCallback(_fields)

    def set_read_receipts(self, share: bool) -> Deferred[dict[str, Any]]:
        """Show (or stop showing) the other party how far you have read."""
        return self.protocol.request("set_read_receipts", share=share).addCallback(_fields)

    def search(
        self,
        query: str,
        peer: str | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """The items you may read (in the conversation with ``peer``, or in all of
        them) whose text has every word of ``query`` (as word beginnings, in any
        case); newest first.  The next page: ``before`` = the last item's ``pos``."""
        fields: dict[str, Any] = {"query": query}
        for k, v in (("with", peer), ("before", before), ("limit", limit)):
            if v is not None:
                fields[k] = v
        return self.protocol.request("search", **fields).addCallback(lambda r: r["messages"])

    def typing(self, peer: str, active: bool = True) -> Deferred[dict[str, Any]]:
        """Tell ``peer`` (a user or a ``#group``) you are typing (or stopped)."""
        return self.protocol.request("typing", **{"with": peer, "typing": active}).addCallback(
            _fields
        )


def _fields(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("type", "id")}
