"""Operator actions on a running realm: the handler behind the control channel.

What ``chatrealmctl`` asks of a running realm (:mod:`chatproto.ops.control`) is done
here, with the realm's own handlers, so that an operator's change takes effect at once
-- a kicked user's connections close, a changed password ends the sessions that
logged in with the old one -- instead of in the database behind the realm's back.
Deleting an account is the accounts handler's (:meth:`RealmService.delete_user`);
this module only counts the sessions it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from chatproto import address
from chatproto.errors import ChatError
from chatproto.realm.accounts import check_password
from chatproto.text import check_reason
from chatproto.tokens import LOGIN_ID_LENGTH

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService
    from chatproto.realm.sessions import Session

__all__ = ["STANDING", "Admin"]

#: What of an account's standing another process serving the realm may have changed
#: in the store (see :meth:`Admin.follow`): the account itself (deleted, or another
#: one of the name), its suspension, the admin role, its browser logins.
STANDING = ("account", "suspensions", "admins", "logins")


class Admin:
    """Kick, set passwords, delete accounts and list sessions, for operators."""

    log = Logger()

    def __init__(self, realm: RealmService) -> None:
        self._r = realm
        #: suspended local accounts: name -> (the account's floor, reason, since)
        self.suspended: dict[str, tuple[int, str, float]] = {}

    @inlineCallbacks
    def load(self) -> Any:
        """Read the suspended accounts from the store (at start, after the accounts)."""
        held = yield self._r.store.suspensions()
        accounts = self._r.accounts
        self.suspended = {
            name: (accounts.floor_of(name) or 0, reason, ts) for name, (reason, ts) in held.items()
        }

    @inlineCallbacks
    def catch_up(self) -> Any:
        """Re-read the suspensions, the admins and the browser logins from the store
        (a worker of a cluster that may have missed another's changes) and end the
        sessions here of accounts suspended since, and those opened with a browser
        login that ended; fires with how many were closed."""
        before = set(self.suspended)
        yield self.load()
        yield self._r.moderation.load()
        live = yield self._r.tokens.reload()
        closed = self._close_logins(self._r.sessions.all(), lambda login: login not in live)
        for name in sorted(set(self.suspended) - before):
            if self.is_suspended(name):
                reason = self.suspended[name][1]
                why = "this account is suspended" + (f": {reason}" if reason else "")
                user = f"{name}@{self._r.realm}"
                closed += self._close(self._r.sessions.of(user), "account_suspended", why)
        return closed

    def is_suspended(self, name: str, floor: int | None = None) -> bool:
        """Whether local account ``name`` (the one created at ``floor``; default: the
        one this realm knows) is suspended.  Not another account of the same name."""
        held = self.suspended.get(name)
        if held is None:
            return False
        if floor is None:
            floor = self._r.accounts.floor_of(name)
        return floor is None or held[0] == floor

    @inlineCallbacks
    def suspend(self, user: str, reason: str = "") -> Any:
        """Suspend local user ``user``: recorded in the store, their sessions (native,
        web, IRC) and browser logins end now, and they cannot log in until
        :meth:`unsuspend`; messages to them are refused (``account_suspended``), from
        this realm and from others (which bounce them to their senders).  Fires with
        ``(canonical address, sessions ended)``, or fails with ``no_such_user``."""
        name, canonical = self._local(user)
        reason = check_reason(reason)
        now = self._r.clock.seconds()
        if not (yield self._r.store.suspend_user(name, reason, now)):
            raise ChatError("no_such_user", f"no user {canonical}")
        floor = yield self._r.store.user_floor(name)
        self.suspended[name] = (floor or 0, reason, now)
        why = "this account is suspended" + (f": {reason}" if reason else "")
        closed = self.end_sessions(canonical, "account_suspended", why, ("suspensions",))
        self.log.info("suspended {user}: {n} sessions closed", user=canonical, n=closed)
        return canonical, closed

    @inlineCallbacks
    def unsuspend(self, user: str) -> Any:
        """Lift ``user``'s suspension; fires with ``(canonical address, whether it was
        suspended)``."""
        name, canonical = self._local(user)
        had = yield self._r.store.unsuspend_user(name)
        had = bool(self.suspended.pop(name, None)) or bool(had)
        self._r.standing_changed(name, ("suspensions",))
        if had:
            self.log.info("suspension of {user} lifted", user=canonical)
        return canonical, had

    def _local(self, user: str) -> tuple[str, str]:
        """``name`` or ``name@<this realm>`` -> (name, canonical address)."""
        addr = address.user(user, self._r.realm)
        if addr.realm != self._r.realm:
            raise ChatError("bad_address", f"{addr} is not a user of this realm")
        return addr.name, str(addr)

    def end_sessions(self, user: str, code: str, why: str, reload: tuple[str, ...] = ()) -> int:
        """Close every session of canonical address ``user`` (native, web and IRC),
        telling each ``code`` and ``why``, and forget its browser logins; returns how
        many sessions were open here.  The other workers of a cluster do the same
        with theirs, after re-reading ``reload`` (see :meth:`follow`)."""
        name = user.rpartition("@")[0]
        self._r.tokens.revoke_user(name)
        closed = self._close(self._r.sessions.of(user), code, why)
        self._r.standing_changed(name, ("logins", *reload), (code, why))
        return closed

    def _close(self, sessions: Any, code: str, why: str) -> int:
        """Close ``sessions``, telling each ``code`` and ``why``; how many."""
        sessions = list(sessions)
        for s in sessions:
            try:
                s.mind.disconnect(code, why)
            except Exception:  # one broken connection must not keep the others open
                self.log.failure("closing a session of {user}", user=s.user_id)
            s.logout()
        return len(sessions)

    def _close_logins(
        self, sessions: Iterable[Session], ended: Callable[[str], bool], why: str = ""
    ) -> int:
        """Close those of ``sessions`` opened with a browser login that ``ended``
        says is over, telling each ``session_ended`` and ``why`` (default: "this
        browser login was ended"); how many."""
        gone = [s for s in sessions if s.login and ended(s.login)]
        return self._close(gone, "session_ended", why or "this browser login was ended")

    @inlineCallbacks
    def follow(self, name: str, reload: Any, end: tuple[str, str] | None = None) -> Any:
        """Another process serving this realm (a worker of a cluster) changed local
        account ``name``'s standing in the store: re-read what it says it changed
        (``reload``, of :data:`STANDING`; anything else is ignored), close the
        sessions here whose browser login it ended, and with ``end`` (code, reason)
        every session of the account here, as it did with its own.  Changes nothing
        in the store and tells nobody (it is the telling's end).  Fires with the
        number of sessions closed."""
        user = f"{name}@{self._r.realm}"
        if "account" in reload or "logins" in reload:  # (a login names the account)
            yield self._r.accounts.refresh(name)
        if "suspensions" in reload:
            yield self.load()
        if "admins" in reload:
            yield self._r.moderation.load()
        closed = 0
        if "logins" in reload:
            live = yield self._r.tokens.reload(name)
            closed += self._close_logins(self._r.sessions.of(user), lambda login: login not in live)
        if end is not None:
            code, why = end
            self._r.accounts.revoked(name)
            closed += self._close(self._r.sessions.of(user), code, why)
        return closed

    @inlineCallbacks
    def revoke_logins(self, user: str, logins: Any = None, why: str = "") -> Any:
        """End browser logins of local user ``user``: those whose login ids are in
        ``logins`` (None: every one -- "log out everywhere"), and the web sessions
        opened with them (told ``session_ended``).  Fires, once the store has
        forgotten them, with ``(canonical address, logins ended, sessions ended)``."""
        name, canonical = self._local(user)
        wanted = None if logins is None else set(logins)
        gone = yield self._r.tokens.revoke_logins(name, wanted)
        self._r.standing_changed(name, ("logins",))
        ids = {key[:LOGIN_ID_LENGTH] for key in gone}
        closed = self._close_logins(self._r.sessions.of(canonical), ids.__contains__, why)
        self.log.info(
            "browser logins of {user} ended: {n} logins, {c} sessions closed",
            user=canonical,
            n=len(gone),
            c=closed,
        )
        return canonical, len(gone), closed

    def logins(self, user: str | None = None) -> list[dict[str, Any]]:
        """The live browser logins (of local user ``user``, or everyone's), with
        canonical addresses, by user then last use."""
        name = None if user is None else self._local(user)[0]
        out = [
            {**rec, "user": f"{rec['user']}@{self._r.realm}"} for rec in self._r.tokens.logins(name)
        ]
        out.sort(key=lambda d: (d["user"], d["last_used"]))
        return out

    def kick(self, user: str, reason: str = "") -> tuple[str, int]:
        """End every session of local user ``user`` now; fires (returns) with the
        canonical address and the number of sessions ended.  The account stays: the
        user may log in again."""
        _name, canonical = self._local(user)
        reason = check_reason(reason)
        why = "an operator ended your sessions" + (f": {reason}" if reason else "")
        closed = self.end_sessions(canonical, "session_ended", why)
        self.log.info("kicked {user}: {n} sessions closed", user=canonical, n=closed)
        return canonical, closed

    @inlineCallbacks
    def set_password(self, user: str, password: str) -> Any:
        """Set ``user``'s password (the realm's rule, argon2id off the reactor thread)
        and end the sessions and browser logins made with the old one; fires with
        ``(canonical address, sessions ended)``, or fails with ``no_such_user``."""
        name, canonical = self._local(user)
        check_password(password)
        pwhash = yield self._r.hasher.hash(password)
        if not (yield self._r.store.set_password(name, pwhash)):
            raise ChatError("no_such_user", f"no user {canonical}")
        self._r.accounts.revoked(name)
        closed = self.end_sessions(canonical, "session_ended", "the password was changed")
        self.log.info("password of {user} changed: {n} sessions closed", user=canonical, n=closed)
        return canonical, closed

    @inlineCallbacks
    def delete_user(self, user: str) -> Any:
        """Delete ``user`` with :meth:`RealmService.delete_user` (which closes their
        sessions); fires with ``(canonical address, existed, sessions closed)``."""
        name, canonical = self._local(user)
        closed = len(self._r.sessions.of(canonical))
        existed = yield self._r.delete_user(name)
        self.suspended.pop(name, None)  # a new account of this name starts free
        return canonical, bool(existed), closed

    def sessions(self) -> list[dict[str, Any]]:
        """Every logged-in session, by user then opening time."""
        out = []
        for s in self._r.sessions.all():
            out.append(
                {
                    "user": s.user_id,
                    "device": s.device,
                    "protocol": s.protocol,
                    "peer": s.peer,
                    "opened_at": float(s.opened_at),
                    "quiet": bool(s.quiet),
                }
            )
        out.sort(key=lambda d: (d["user"], d["opened_at"], d["device"]))
        return out
