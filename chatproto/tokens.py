"""Session tokens: how a browser stays logged in without keeping the password.

The web gateway (:mod:`chatproto.web`) logs a browser in once, over an HTTP POST with
the password; the realm then issues a random token that the gateway puts in an
``HttpOnly``, ``SameSite=Strict`` cookie.  Every later request of that browser (the
WebSocket session, file uploads and downloads) presents the cookie instead of the
password.  The token is a cred credential like a username/password pair:
:class:`TokenChecker` sits in the realm's portal beside the password checker, so a
token login ends in the same ``requestAvatar`` and the same :class:`Session`.

Tokens are owned by the realm (:attr:`chatproto.realm.RealmService.tokens`) and kept
in its store (``IStore.put_session_token``): a restarted realm keeps its browsers
logged in.  Only a token's SHA-256 is stored (in memory and in the store), so neither a
memory dump nor a copy of the database hands out live sessions.  A token expires
``ttl`` seconds after it was last used (a sliding window; the store learns of a use at
most every :data:`TOUCH_EVERY` seconds, so after a restart a token may have up to that
much less time left), and each user holds at most :data:`MAX_TOKENS_PER_USER` (the
oldest is dropped first).  A token is revoked by logging out (this browser), by "log
out everywhere" (every browser of the account), by ``chatrealmctl sessions revoke``,
and with the account's password, deletion or suspension.

In a cluster each worker holds the tokens in memory and hears of those another worker
issued over the bus, a round trip later.  A login presenting a token the worker does
not hold reads the store before refusing it (:meth:`Tokens.find`; the store is the
truth, the bus a wake-up): only for a token of the shape this module issues, never
for one revoked here whose deletion the store has not confirmed, and within a bound
(:data:`MISS_READS_AT_ONCE`, :data:`MISS_READS_PER_SECOND`), so guessed tokens cost
the store no more than that whatever their rate.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from chatproto.ratelimit import TokenBucket

__all__ = [
    "LOGIN_ID_LENGTH",
    "MAX_TOKENS_PER_USER",
    "MISS_READS_AT_ONCE",
    "MISS_READS_BURST",
    "MISS_READS_PER_SECOND",
    "TOUCH_EVERY",
    "ISessionToken",
    "SessionToken",
    "TokenChecker",
    "TokenRecord",
    "Tokens",
    "digest",
]

#: Live tokens (browser logins) one user may hold; a new login drops the oldest.
MAX_TOKENS_PER_USER = 64

#: Seconds between two writes of a token's last use to the store (at most).
TOUCH_EVERY = 60.0

#: Store reads of tokens a worker does not hold (:meth:`Tokens.find`) under way at once,
MISS_READS_AT_ONCE = 4
#: and begun per second on average, in bursts of at most :data:`MISS_READS_BURST`;
#: past either bound a token not held is refused without a read (as before a worker
#: read the store at all: the browser logs in again a moment later).
MISS_READS_PER_SECOND = 10.0
MISS_READS_BURST = 20

#: What ``secrets.token_urlsafe(32)`` makes: anything else is no token.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


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
    created: float = 0.0
    #: when ``last_used`` was last written to the store
    stored_use: float = 0.0
    #: whether the store holds it (False from :meth:`Tokens.issue` until its write
    #: is done: a :meth:`Tokens.reload` meanwhile must not take it for revoked)
    stored: bool = True

    def login_id(self, digest: str) -> str:
        """How operators and the user name this login: the start of its digest."""
        return digest[:LOGIN_ID_LENGTH]


#: Hex digits of a token's digest that name its login (``chatrealmctl sessions web``).
LOGIN_ID_LENGTH = 12


def digest(token: str) -> str:
    """The SHA-256 of a token, in hex: what is kept of it."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


_digest = digest


class Tokens:
    """The realm's live session tokens: hashed, expiring, and kept in ``store`` (an
    :class:`chatproto.store.IStore`; None: in memory only).

    Checks are answered from memory (a token is checked on every web request, some
    before their body is read); every change is written through to the store, which
    :meth:`load` reads at start.  With ``shared`` (a worker of a cluster: other
    processes issue tokens into the same store) a login may also read the store for a
    token not held here (:meth:`find`).
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, ttl: float, store: Any = None, shared: bool = False
    ) -> None:
        self._clock = clock
        self.ttl = ttl
        self._store = store
        self._shared = shared and store is not None
        #: sha256(token) -> record, oldest first (moved to the end on use)
        self._records: OrderedDict[str, TokenRecord] = OrderedDict()
        #: sha256(token) -> when it was revoked here, until the store confirms it gone:
        #: a store read meanwhile may still find it, and must not bring it back
        self._forgotten: dict[str, float] = {}
        #: user name -> when every login of that account was revoked here, until the
        #: store confirms them gone (as _forgotten, for the logins not held here)
        self._users_forgotten: dict[str, float] = {}
        #: bumped at the end of each reload (it may have ended tokens never held
        #: here): a store read under way across it is made again
        self._changes = 0
        self._miss_reads = 0
        self._miss_bucket = TokenBucket(MISS_READS_PER_SECOND, MISS_READS_BURST, clock.seconds())

    def _stored(self, d: Deferred[Any], what: str) -> Deferred[Any]:
        def failed(f: Failure) -> None:
            self.log.failure("session tokens: {what} not stored", f, what=what)

        return d.addErrback(failed)

    def load(self, floors: dict[str, int]) -> Deferred[int]:
        """Read the live tokens from the store (at start): those of accounts that
        still exist (``floors``: name -> floor) and not expired.  Fires with how many."""
        if self._store is None:
            return succeed(0)

        def loaded(rows: list[tuple[str, str, int, str, float, float]]) -> int:
            now = self._clock.seconds()
            for key, name, floor, device, created, last_used in rows:
                if floors.get(name) != floor or now - last_used > self.ttl:
                    continue
                self._records[key] = TokenRecord(
                    name, device, last_used, floor, created, stored_use=last_used
                )
            return len(self._records)

        return self._store.session_tokens().addCallback(loaded)

    def reload(self, user: str | None = None) -> Deferred[set[str]]:
        """Read the live tokens of ``user`` (None: of everyone) from the store again,
        in place of those held here (another process serving the realm issued or
        revoked some); fires with the login ids of those live tokens.  A token whose
        account floor is not the store's is not live (see :meth:`load`)."""
        if self._store is None:
            now = self._clock.seconds()
            return succeed(
                {
                    r.login_id(k)
                    for k, r in self._records.items()
                    if user in (None, r.user) and now - r.last_used <= self.ttl
                }
            )

        def loaded(rows: list[tuple[str, str, int, str, float, float]]) -> set[str]:
            self._changes += 1
            now = self._clock.seconds()
            stored = {row[0]: row for row in rows}
            for key in [k for k, r in self._records.items() if user in (None, r.user)]:
                if key not in stored and self._records[key].stored:
                    del self._records[key]
            for key, name, floor, device, created, last_used in stored.values():
                if now - last_used > self.ttl:
                    self._records.pop(key, None)
                elif key not in self._records:
                    self._records[key] = TokenRecord(
                        name, device, last_used, floor, created, stored_use=last_used
                    )
            return {self._records[k].login_id(k) for k in stored if k in self._records}

        return self._store.session_tokens(user).addCallback(loaded)

    def issue(self, user: str, device: str, floor: int = 0) -> Deferred[str]:
        """A new token for local user name ``user`` (the account created at ``floor``)
        logging in as ``device``; fires once the store holds it."""
        mine = [k for k, r in self._records.items() if r.user == user]
        dropped = mine[: max(0, len(mine) - MAX_TOKENS_PER_USER + 1)]
        for key in dropped:
            del self._records[key]
        token = secrets.token_urlsafe(32)
        now = self._clock.seconds()
        key = _digest(token)
        record = TokenRecord(user, device, now, floor, now, stored_use=now)
        self._records[key] = record
        if self._store is None:
            return succeed(token)
        record.stored = False
        if dropped:
            self._stored(self._store.delete_session_tokens(dropped), "a dropped login")
        d = self._store.put_session_token(key, user, floor, device, now, now)

        def stored(_: Any) -> str:
            record.stored = True
            return token

        def failed(f: Failure) -> Failure:
            self._records.pop(key, None)  # nobody was given it
            return f

        return d.addCallbacks(stored, failed)

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
        if self._store is not None and now - record.stored_use >= min(TOUCH_EVERY, self.ttl / 10):
            record.stored_use = now
            self._stored(self._store.touch_session_token(key, now), "a login's use")
        return record

    def find(self, token: str | None) -> Deferred[TokenRecord | None]:
        """:meth:`check`, and for a token not held here, with ``shared``, what the
        store says of it: fires with the record of a live token (now held here), or
        None.  A token revoked here (until the store confirms it gone), one of an
        account whose logins are being deleted here, one of another shape than those
        issued and one past its time stay refused; a read across a re-reading of the
        logins (:meth:`reload`: it may be one they ended) is made again, once.  Every
        token not held is refused once :data:`MISS_READS_AT_ONCE` reads are under way
        or the :data:`MISS_READS_PER_SECOND` bucket is empty.  A failed read refuses."""
        record = self.check(token)
        if record is not None or not self._shared or not token:
            return succeed(record)
        key = _digest(token)
        now = self._clock.seconds()
        if (
            _TOKEN_SHAPE.fullmatch(token) is None
            or key in self._forgotten
            or self._miss_reads >= MISS_READS_AT_ONCE
            or self._miss_bucket.take(now) > 0
        ):
            return succeed(None)
        self._miss_reads += 1

        def done(result: Any) -> Any:
            self._miss_reads -= 1
            return result

        return self._read_missing(token, key, again=True).addBoth(done)

    def _read_missing(self, token: str, key: str, again: bool) -> Deferred[TokenRecord | None]:
        changes = self._changes

        def read(row: tuple[str, str, int, str, float, float] | None) -> Any:
            if key in self._records:  # (a reload meanwhile read it: it is live)
                return self.check(token)
            if row is None or key in self._forgotten or row[1] in self._users_forgotten:
                return None
            if self._changes != changes:  # logins were re-read meanwhile: read again
                return self._read_missing(token, key, again=False) if again else None
            _, name, floor, device, created, last_used = row
            self._records[key] = TokenRecord(
                name, device, last_used, floor, created, stored_use=last_used
            )
            return self.check(token)  # (None if past its time)

        def failed(f: Failure) -> None:
            self.log.failure("session tokens: reading a login not held here", f)
            return None

        return self._store.session_token(key).addCallbacks(read, failed)

    def _forget(self, keys: Iterable[str]) -> Deferred[int]:
        keys = list(keys)
        for key in keys:
            self._records.pop(key, None)
        if self._store is None or not keys:
            return succeed(len(keys))
        now = self._clock.seconds()
        for key in keys:
            self._forgotten[key] = now

        def gone(n: int) -> int:
            for key in keys:  # (kept after a failed deletion, until prune)
                self._forgotten.pop(key, None)
            return n

        d = self._store.delete_session_tokens(keys).addCallback(gone)
        return self._stored(d, "a revocation").addCallback(lambda _: len(keys))

    def revoke(self, token: str | None) -> TokenRecord | None:
        """Forget a token (logout); returns what it stood for, if it was live.  It
        stops working at once; the store forgets it in the background (see
        :meth:`revoke_logins` to wait for that)."""
        if not token:
            return None
        key = _digest(token)
        record = self._records.get(key)
        self._forget([key])
        return record

    def revoke_user(self, user: str, keep_floor: int | None = None) -> int:
        """Forget every token of ``user`` (account deleted) -- but those of the account
        created at ``keep_floor``, if given; returns how many."""
        keys = [k for k, r in self._records.items() if r.user == user and r.floor != keep_floor]
        self._forget(keys)
        if self._store is not None and keep_floor is None:
            # and any the store holds that this realm did not load (another account's)
            self._users_forgotten[user] = self._clock.seconds()

            def gone(n: int) -> int:
                self._users_forgotten.pop(user, None)
                return n

            d = self._store.delete_user_session_tokens(user).addCallback(gone)
            self._stored(d, "a revocation")
        return len(keys)

    def revoke_logins(
        self, user: str, login_ids: Iterable[str] | None = None
    ) -> Deferred[list[str]]:
        """Forget the logins of ``user`` whose login ids (:meth:`TokenRecord.login_id`)
        are ``login_ids`` (None: all of them); fires, once the store has forgotten
        them, with their digests."""
        wanted = None if login_ids is None else set(login_ids)
        keys = [
            k
            for k, r in self._records.items()
            if r.user == user and (wanted is None or r.login_id(k) in wanted)
        ]
        return self._forget(keys).addCallback(lambda _: keys)

    def logins(self, user: str | None = None) -> list[dict[str, Any]]:
        """The live logins (of ``user``, or everyone's), most recently used last."""
        now = self._clock.seconds()
        return [
            {
                "user": r.user,
                "login": r.login_id(k),
                "device": r.device,
                "created": r.created,
                "last_used": r.last_used,
            }
            for k, r in self._records.items()
            if (user is None or r.user == user) and now - r.last_used <= self.ttl
        ]

    def prune(self) -> None:
        """Drop expired tokens (records are kept in last-used order), here and in the
        store (where a use may be up to :data:`TOUCH_EVERY` seconds behind)."""
        now = self._clock.seconds()
        while self._records:
            key, record = next(iter(self._records.items()))
            if now - record.last_used <= self.ttl:
                break
            del self._records[key]
        for forgotten in (self._forgotten, self._users_forgotten):
            for key, when in list(forgotten.items()):
                if now - when > self.ttl:  # (a read would find it past its time anyway)
                    del forgotten[key]
        if self._store is not None:
            before = now - self.ttl - TOUCH_EVERY
            self._stored(self._store.expire_session_tokens(before), "expiry")

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
