"""The moderation requests of the client protocol: ``report``, ``reports``,
``suspend`` and ``unsuspend`` (PROTOCOL.md, "Moderation").

A mixin of :class:`chatproto.protocol.ClientProtocol` (and so of the WebSocket
gateway's protocol): each handler checks the request's fields and calls the realm's
moderation handler (:mod:`chatproto.realm.moderation`), which decides who may.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from chatproto import wire

__all__ = ["ModerationRequests"]


class ModerationRequests:
    """``handle_<type>`` methods for the moderation requests (a mixin)."""

    session: Any
    factory: Any

    def _moderation(self) -> Any:
        return self.factory.realm.moderation

    def handle_report(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        msg_id = wire.field(req, "msg_id", str)
        reason = wire.field(req, "reason", str)
        d = maybeDeferred(self._moderation().report, self.session, msg_id, reason)
        return d.addCallback(lambda rid: {"report": rid})

    def handle_reports(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        before = wire.integer(req, "before", 1, required=False)
        limit = wire.integer(req, "limit", 1, required=False)
        d = maybeDeferred(self._moderation().reports, self.session.user_id, before, limit)
        return d.addCallback(lambda rows: {"reports": rows})

    def handle_suspend(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        reason = wire.field(req, "reason", str, required=False, default="")
        d = maybeDeferred(self._moderation().suspend, self.session.user_id, user, reason)
        return d.addCallback(lambda r: {"user": r[0], "closed": r[1]})

    def handle_unsuspend(self, req: dict[str, Any]) -> Deferred[dict[str, Any]]:
        user = wire.field(req, "user", str)
        d = maybeDeferred(self._moderation().unsuspend, self.session.user_id, user)
        return d.addCallback(lambda r: {"user": r[0], "was_suspended": r[1]})
