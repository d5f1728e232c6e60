"""Moderation: realm administrators and abuse reports (issue 18).

A *realm admin* is an account the operators named (``chatrealmctl grant-admin``,
stored per account like a suspension).  Admins may, from any client: suspend and
unsuspend accounts (:class:`chatproto.realm.admin.Admin` does it, exactly as for
``chatrealmctl suspend``) and read the abuse reports.  Any user may *report* a
message they can read: the report is stored with a copy of what the message was
(sender, recipient, position, the start of its body), so an admin sees it even after
the message is gone; reports are rate-limited per user.  Everyone else asking for an
admin's action gets ``forbidden``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from chatproto import address
from chatproto.errors import ChatError
from chatproto.ratelimit import UserBuckets
from chatproto.relations import check_msg_id
from chatproto.text import check_reason

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = ["EXCERPT_LENGTH", "REPORTS_PAGE", "REPORT_BURST", "REPORT_RATE", "Moderation"]

#: Reports one user may make at once, and how fast the allowance refills (one every
#: two minutes): enough for a person, not for a flood.
REPORT_BURST = 5
REPORT_RATE = 1 / 120
#: Characters of a reported message's body kept with the report.
EXCERPT_LENGTH = 1000
#: Most (and default) reports in one ``reports`` page.
REPORTS_PAGE = 100


class Moderation:
    """Realm admins (who they are) and abuse reports (making and reading them)."""

    log = Logger()

    def __init__(self, realm: RealmService) -> None:
        self._r = realm
        #: admin account name -> the floor of the account that was made admin
        self.admins: dict[str, int] = {}
        #: Reports per user (a worker of a cluster counts them in Redis).
        self.report_limit = UserBuckets(REPORT_RATE, REPORT_BURST)

    @inlineCallbacks
    def load(self) -> Any:
        """Read the admins from the store (at start, after the accounts)."""
        held = yield self._r.store.admins()
        self.admins = {name: self._r.accounts.floor_of(name) or 0 for name in held}

    # admins -----------------------------------------------------------------------------

    def is_admin(self, user: str) -> bool:
        """Whether canonical address ``user`` is a realm admin of this realm (the
        account that was made one, not a later one of the same name)."""
        name, _, where = user.rpartition("@")
        if where != self._r.realm or name not in self.admins:
            return False
        return self.admins[name] == (self._r.accounts.floor_of(name) or 0)

    def require_admin(self, user: str) -> None:
        """Raise ``forbidden`` unless ``user`` is a realm admin."""
        if not self.is_admin(user):
            raise ChatError("forbidden", "only a realm administrator may do this")

    def _local(self, user: str) -> tuple[str, str]:
        addr = address.user(user, self._r.realm)
        if addr.realm != self._r.realm:
            raise ChatError("bad_address", f"{addr} is not a user of this realm")
        return addr.name, str(addr)

    @inlineCallbacks
    def grant(self, user: str) -> Any:
        """Make local user ``user`` a realm admin (stored); fires with the canonical
        address, or fails with ``no_such_user``."""
        name, canonical = self._local(user)
        if not (yield self._r.store.grant_admin(name, self._r.clock.seconds())):
            raise ChatError("no_such_user", f"no user {canonical}")
        self.admins[name] = (yield self._r.store.user_floor(name)) or 0
        self._r.standing_changed(name, ("admins",))
        self.log.info("{user} is a realm admin", user=canonical)
        return canonical

    @inlineCallbacks
    def revoke(self, user: str) -> Any:
        """Take the role away; fires with ``(canonical address, whether they had it)``."""
        name, canonical = self._local(user)
        had = yield self._r.store.revoke_admin(name)
        had = self.admins.pop(name, None) is not None or bool(had)
        self._r.standing_changed(name, ("admins",))
        if had:
            self.log.info("{user} is no longer a realm admin", user=canonical)
        return canonical, had

    def list_admins(self) -> list[str]:
        """The realm admins' canonical addresses, sorted."""
        return sorted(
            f"{n}@{self._r.realm}" for n in self.admins if self.is_admin(f"{n}@{self._r.realm}")
        )

    # what an admin does from a client -------------------------------------------------

    @inlineCallbacks
    def verify_admin(self, user: str, name: str, password: str, peer: str = "?") -> Any:
        """``user`` proves, with their own account ``name`` and password, that they
        act as a realm admin (IRC's ``OPER``); fires with their canonical address, or
        fails with ``auth_failed`` (another account, a wrong password), ``rate_limited``
        or ``forbidden`` (not a realm admin)."""
        try:
            own = self._local(name)[1] == user
        except ChatError:
            own = False
        if not own:
            raise ChatError("auth_failed", "give your own account name and password")
        yield self._r.accounts.verify_password(name, password, peer)
        self.require_admin(user)
        return user

    def kill(self, actor: str, user: str, reason: str = "") -> int:
        """Admin ``actor`` ends every session of local user ``user`` now (native, web,
        IRC; IRC's ``KILL``); returns how many.  The account stays."""
        self.require_admin(actor)
        _name, canonical = self._local(user)
        why = f"killed by {actor}" + (f": {reason}" if reason else "")
        closed = self._r.admin.end_sessions(canonical, "session_ended", why[:400])
        self.log.info(
            "realm admin {actor} killed {user}: {n} sessions closed",
            actor=actor,
            user=canonical,
            n=closed,
        )
        return closed

    def suspend(self, actor: str, user: str, reason: str) -> Any:
        """Admin ``actor`` suspends ``user`` (see :meth:`Admin.suspend`).  The
        reason is a field: checked (``bad_request``) before who asks."""
        reason = check_reason(reason)
        self.require_admin(actor)
        canonical = self._local(user)[1]
        if canonical == actor:
            raise ChatError("bad_request", "an admin cannot suspend themselves")
        self.log.info("realm admin {actor} suspends {user}", actor=actor, user=canonical)
        return self._r.admin.suspend(user, reason)

    def unsuspend(self, actor: str, user: str) -> Any:
        self.require_admin(actor)
        # the address checked before it is logged: a client's text never makes a line
        canonical = self._local(user)[1]
        self.log.info(
            "realm admin {actor} lifts the suspension of {user}", actor=actor, user=canonical
        )
        return self._r.admin.unsuspend(user)

    # reports ----------------------------------------------------------------------------

    @inlineCallbacks
    def report(self, session: Any, msg_id: str, reason: str) -> Any:
        """``session``'s user reports the message ``msg_id`` (one they can read, not
        their own) for ``reason``; fires with the stored report's id.  Fails with
        ``not_found``, ``bad_request`` or ``rate_limited``."""
        user = session.user_id
        reason = check_reason(reason, required=True)
        msg_id = check_msg_id(msg_id)
        now = self._r.clock.seconds()
        wait = yield self.report_limit.take(user, now)
        if wait > 0:
            self._r.stats.rate_limited("report")
            raise ChatError("rate_limited", "too many reports", retry_after=round(wait, 3))
        env = yield self._r.store.stored_item(msg_id)
        if env is None or not self._may_read(session, env):
            raise ChatError("not_found", "no such message, or you cannot read it")
        if env.sender == user:
            raise ChatError("bad_request", "you cannot report your own message")
        report = {
            "reporter": user,
            "msg_id": env.id,
            "reason": reason,
            "ts": now,
            "sender": env.sender,
            "recipient": env.recipient,
            "pos": env.pos,
            "excerpt": (env.body or "")[:EXCERPT_LENGTH],
        }
        rid = yield self._r.store.add_report(report)
        self.log.info(
            "report {id}: {user} reports {msg} of {sender}: {reason}",
            id=rid,
            user=user,
            msg=env.id,
            sender=env.sender,
            reason=reason,
        )
        return rid

    def _may_read(self, session: Any, env: Any) -> bool:
        user = session.user_id
        if env.recipient.startswith("#"):
            try:
                floor = self._r.groups.readable_from(env.recipient, user)
            except ChatError:
                return False
            return env.pos > floor
        return user in (env.sender, env.recipient) and env.pos > session.floor

    def reports(self, actor: str | None, before: int | None, limit: int | None) -> Any:
        """A page of reports, newest first (``before``: a report id); ``actor`` must be
        a realm admin (None: an operator, through the control channel), once the
        fields are checked (``bad_request`` first, as for every request)."""
        limit = REPORTS_PAGE if limit is None else limit
        if not 1 <= limit <= REPORTS_PAGE:
            raise ChatError("bad_request", f"limit must be between 1 and {REPORTS_PAGE}")
        if actor is not None:
            self.require_admin(actor)
        return self._r.store.reports(before, limit)

    def prune(self) -> None:
        """Forget the rate-limit state of users whose allowance is full again."""
        self.report_limit.prune(self._r.clock.seconds())
