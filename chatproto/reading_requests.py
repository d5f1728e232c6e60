"""The native protocol's requests about reading: the conversation list, read markers,
the read-receipt switch, typing notices and search.

A mixin of :class:`chatproto.protocol.ClientProtocol` (so the WebSocket gateway's
protocol has them too): each ``handle_<type>`` checks the frame's fields and calls the
realm's reading handler (:mod:`chatproto.realm.reading`), which decides.  Kept apart
from :mod:`chatproto.protocol` so that module stays about connections and the send
path.
"""

from __future__ import annotations

from typing import Any

from chatproto import wire
from chatproto.realm.reading import CONVERSATIONS_LIMIT, SEARCH_PAGE

__all__ = ["ReadingRequests"]


class ReadingRequests:
    """``handle_conversations``, ``handle_mark_read``, ``handle_set_read_receipts``,
    ``handle_search`` and ``handle_typing``; the class using it has
    ``factory.realm`` and ``session``."""

    factory: Any
    session: Any

    def handle_conversations(self, req: dict[str, Any]) -> Any:
        limit = wire.integer(req, "limit", 1, CONVERSATIONS_LIMIT, required=False)
        return self.factory.realm.reading.conversations(self.session, limit)

    def handle_mark_read(self, req: dict[str, Any]) -> Any:
        peer = wire.field(req, "with", str)
        pos = wire.integer(req, "pos")
        return self.factory.realm.reading.mark_read(self.session, peer, pos)

    def handle_set_read_receipts(self, req: dict[str, Any]) -> Any:
        share = wire.field(req, "share", bool)
        return self.factory.realm.reading.set_read_receipts(self.session, share)

    def handle_search(self, req: dict[str, Any]) -> Any:
        query = wire.field(req, "query", str)
        peer = wire.field(req, "with", str, required=False)
        before = wire.integer(req, "before", required=False)
        limit = wire.integer(req, "limit", 1, SEARCH_PAGE, required=False)
        d = self.factory.realm.reading.search(self.session, query, peer, before, limit)
        return d.addCallback(lambda items: {"messages": [e.to_wire() for e in items]})

    def handle_typing(self, req: dict[str, Any]) -> Any:
        peer = wire.field(req, "with", str)
        active = wire.field(req, "typing", bool, required=False, default=True)
        return self.factory.realm.reading.typing(self.session, peer, active)
