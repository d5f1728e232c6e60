"""Session tokens: how a browser stays logged in without keeping the password.

The web gateway (:mod:`chatproto.web`) logs a browser in once, over an HTTP POST with
the password; the realm then issues a random token that the gateway puts in an
``HttpOnly``, ``SameSite=Strict`` cookie.  Every later request of that browser (the
WebSocket session, file uploads and downloads) presents the cookie instead of the
password.  The token is a cred credential like a username/password pair:
:class:`TokenChecker` sits in the realm's portal beside the password checker, so a
token login ends in the same ``requestAvatar`` and the same :class:`Session`.

Tokens are owned by the realm (:attr:`chatproto.realm.RealmService.tokens`), kept in
memory only (a restart logs browsers out: they log in again), and only their SHA-256
is stored, so a memory dump does not hand out live sessions.  A token expires
``ttl`` seconds after it was last used (a sliding window), and each user holds at most
:data:`MAX_TOKENS_PER_USER` (the oldest is dropped first).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "MAX_TOKENS_PER_USER",
    "ISessionToken",
    "SessionToken",
    "TokenChecker",
    "TokenRecord",
    "Tokens",
]

#: Live tokens (browser logins) one user may hold; a new login drops the oldest.
MAX_TOKENS_PER_USER = 64


class ISessionToken(Interface):
    """A credential made of one session token (the cookie's value)."""

    token = Attribute("The token as the client presented it (str).")


@implementer(ISessionToken, ICredentials)
@attrs.define(frozen=True)
class SessionToken:
    token: str


@attrs.define
class TokenRecord:
    """What a token stands for: a local user name and the device it logged in as, and
    the account's floor (``IStore.user_floor``): a name deleted and registered again
    is another account, which the token does not stand for."""

    user: str
    device: str
    last_used: float
    floor: int = 0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Tokens:
    """The realm's live session tokens (in memory, hashed, expiring)."""

    def __init__(self, clock: IReactorTime, ttl: float) -> None:
        self._clock = clock
        self.ttl = ttl
        #: sha256(token) -> record, oldest first (moved to the end on use)
        self._records: OrderedDict[str, TokenRecord] = OrderedDict()

    def issue(self, user: str, device: str, floor: int = 0) -> str:
        """A new token for local user name ``user`` (the account created at ``floor``)
        logging in as ``device``."""
        mine = [k for k, r in self._records.items() if r.user == user]
        for key in mine[: max(0, len(mine) - MAX_TOKENS_PER_USER + 1)]:
            del self._records[key]
        token = secrets.token_urlsafe(32)
        self._records[_digest(token)] = TokenRecord(user, device, self._clock.seconds(), floor)
        return token

    def check(self, token: str | None) -> TokenRecord | None:
        """The record of a live token (and mark it used), or None."""
        if not token:
            return None
        key = _digest(token)
        record = self._records.get(key)
        if record is None:
            return None
        now = self._clock.seconds()
        if now - record.last_used > self.ttl:
            del self._records[key]
            return None
        record.last_used = now
        self._records.move_to_end(key)
        return record

    def revoke(self, token: str | None) -> TokenRecord | None:
        """Forget a token (logout); returns what it stood for, if it was live."""
        if not token:
            return None
        return self._records.pop(_digest(token), None)

    def revoke_user(self, user: str, keep_floor: int | None = None) -> int:
        """Forget every token of ``user`` (account deleted) -- but those of the account
        created at ``keep_floor``, if given; returns how many."""
        keys = [k for k, r in self._records.items() if r.user == user and r.floor != keep_floor]
        for key in keys:
            del self._records[key]
        return len(keys)

    def prune(self) -> None:
        """Drop expired tokens (records are kept in last-used order)."""
        now = self._clock.seconds()
        while self._records:
            key, record = next(iter(self._records.items()))
            if now - record.last_used <= self.ttl:
                break
            del self._records[key]

    def __len__(self) -> int:
        return len(self._records)


@implementer(ICredentialsChecker)
class TokenChecker:
    """A cred checker for :class:`ISessionToken`: the avatar id is the user name."""

    credentialInterfaces = (ISessionToken,)

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        record = self._tokens.check(credentials.token)
        if record is None:
            return fail(UnauthorizedLogin())
        return succeed(record.user)
