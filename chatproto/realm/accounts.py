"""Accounts: passwords, logins, session tokens and the life of an account.

Passwords are argon2id, hashed and verified in a small thread pool of their own (never
on the reactor thread).  Logins go through a twisted.cred portal (password or browser
session token); failures are throttled per account and per peer address.  An account
is identified by its name *and* its floor -- the stream position at which it was
created -- so an account deleted and registered again under the same name is another
account: it sees nothing from before its floor and holds nothing of the old one (see
PROTOCOL.md, "What deleting an account removes").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from chatproto import address
from chatproto.accounts import remote_groups_of
from chatproto.address import GUEST_PREFIX, Address, reserved_name
from chatproto.config import Config
from chatproto.errors import ChatError
from chatproto.ratelimit import FailureThrottle, UserBuckets
from chatproto.realm.sessions import ISession, Session, check_device
from chatproto.store import IStore
from chatproto.text import log_shown
from chatproto.tokens import SessionToken, TokenChecker, Tokens
from chatproto.tokens import digest as token_digest

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = [
    "Accounts",
    "PasswordHasher",
    "StoreChecker",
    "argon2_hasher",
    "check_password",
]


def argon2_hasher(auth: Any) -> argon2.PasswordHasher:
    """argon2id with the realm's parameters (``config.auth``); shared by the realm and
    ``chatrealmctl`` so both write hashes the other verifies."""
    return argon2.PasswordHasher(
        time_cost=auth.argon2_time_cost,
        memory_cost=auth.argon2_memory_cost,
        parallelism=auth.argon2_parallelism,
        type=argon2.Type.ID,
    )


class PasswordHasher:
    """argon2id hashing and verification, always off the reactor thread."""

    def __init__(self, reactor: IReactorThreads, pool: ThreadPool, config: Config) -> None:
        self._ph = argon2_hasher(config.auth)
        self._reactor = reactor
        self._pool = pool
        # Verified against when the user does not exist, so that an unknown user costs
        # the same time as a wrong password.
        self._dummy = self._ph.hash("chatproto: no such user")

    def hash(self, password: str) -> Deferred[str]:
        return deferToThreadPool(self._reactor, self._pool, self._ph.hash, password)  # type: ignore[arg-type]

    def _verify(self, pwhash: str | None, password: str) -> bool:
        try:
            return self._ph.verify(pwhash or self._dummy, password) and pwhash is not None
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    def verify(self, pwhash: str | None, password: str) -> Deferred[bool]:
        return deferToThreadPool(self._reactor, self._pool, self._verify, pwhash, password)  # type: ignore[arg-type]


@implementer(ICredentialsChecker)
class StoreChecker:
    """A cred checker for username/password against the store's argon2id hashes."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store: IStore, hasher: PasswordHasher) -> None:
        self._store = store
        self._hasher = hasher

    @inlineCallbacks
    def requestAvatarId(self, credentials: IUsernamePassword) -> Any:
        raw = credentials.username
        name_text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        pw = credentials.password
        password = pw.decode("utf-8", "replace") if isinstance(pw, bytes) else pw
        try:
            name = address.normalise_name(name_text)
        except ChatError:
            name = None
        pwhash = (yield self._store.password_hash(name)) if name else None
        ok = yield self._hasher.verify(pwhash, password)
        if not ok:
            raise UnauthorizedLogin()
        return name


@implementer(IRealm)
class _CredRealm:
    """The cred realm: an authenticated avatar id becomes a :class:`Session`."""

    def __init__(self, service: RealmService) -> None:
        self._service = service

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if ISession not in interfaces:
            raise NotImplementedError("only ISession avatars are provided")
        session = self._service.attach(avatarId, mind)
        return ISession, session, session.logout


class Accounts:
    """Local accounts: creation, deletion, logins and session tokens.

    ``hasher`` replaces the argon2id hasher (tests pass a cheap one); without it the
    accounts get a thread pool of their own, started and stopped with the realm.
    """

    log = Logger()

    def __init__(self, realm: RealmService, hasher: PasswordHasher | None = None) -> None:
        self._r = realm
        config = realm.config
        self.config = config
        self.realm = config.realm
        self._suffix = "@" + config.realm
        self.store = realm.store
        self.clock = realm.clock
        #: the realm's counters (logins, failures, throttled attempts)
        self.stats = realm.stats
        self._hash_pool: ThreadPool | None = None
        if hasher is None:
            # Hashing gets its own small pool: argon2 is memory-hard (tens of MiB per
            # hash), so it must not run as wide as the reactor's general pool.
            self._hash_pool = ThreadPool(
                1, max(1, config.auth.argon2_parallelism), "chatproto-argon2"
            )
            hasher = PasswordHasher(realm.reactor, self._hash_pool, config)
        self.hasher = hasher
        self._password_checker = StoreChecker(self.store, hasher)
        #: Session tokens of browser logins (see chatproto.tokens and chatproto.web).
        self.tokens = Tokens(
            self.clock, config.web.session_ttl, self.store, shared=config.worker is not None
        )
        self.portal = Portal(_CredRealm(realm), [self._password_checker, TokenChecker(self.tokens)])
        a = config.auth
        self._account_throttle = FailureThrottle(
            a.free_failures_per_account, a.failure_delay, a.max_failure_delay, a.failure_window
        )
        self._address_throttle = FailureThrottle(
            a.free_failures_per_address, a.failure_delay, a.max_failure_delay, a.failure_window
        )
        #: Registrations per client address (a worker of a cluster counts them in
        #: Redis): each costs an argon2 hash in the small pool logins wait in too
        #: (``auth.registrations_per_address`` at once, one more every
        #: ``auth.registration_interval`` seconds; enough for people, not for a flood).
        self.register_limit = UserBuckets(
            1 / a.registration_interval, max(1, a.registrations_per_address)
        )
        #: The login throttles by what they count (the workers of a cluster share them).
        self.throttles = {"account": self._account_throttle, "address": self._address_throttle}
        #: local account names known to exist (filled at start and as accounts appear)
        self.known: set[str] = set()
        #: name -> floor of the account this realm last knew under that name (see
        #: chatproto.accounts): another floor means another account.
        self._floors: dict[str, int] = {}
        #: name -> how many times the account's credentials were taken back (a
        #: password change, a suspension, a deletion): a password checked before one
        #: of them (argon2 takes a while, in a thread) opens no session after it.
        self._revoked: dict[str, int] = {}

    def revoked(self, name: str) -> None:
        """Local account ``name``'s credentials were taken back (its password changed,
        it was suspended or deleted): a login or browser login whose password was
        being checked meanwhile fails (``auth_failed``) instead of opening a session
        the change already ended."""
        self._revoked[name] = self._revoked.get(name, 0) + 1

    def _still_valid(self, name: str, before: int, session: Any = None) -> None:
        """Raise ``auth_failed`` (logging ``session`` out) if ``name``'s credentials
        were taken back since they were ``before``."""
        if self._revoked.get(name, 0) != before:
            if session is not None:
                session.logout()
            raise ChatError("auth_failed", "the account changed while logging in; try again")

    def start(self) -> None:
        if self._hash_pool is not None:
            self._hash_pool.start()

    def stop(self) -> None:
        if self._hash_pool is not None:
            self._hash_pool.stop()

    @inlineCallbacks
    def load(self) -> Any:
        """Read the accounts' floors and the browser logins from the store (at start,
        before groups replay)."""
        self._floors = dict((yield self.store.user_floors()))
        self.known.update(self._floors)
        n = yield self.tokens.load(self._floors)
        if n:
            self.log.info("{n} browser logins kept from before the start", n=n)

    def prune(self) -> None:
        """Forget throttle entries and tokens past their time (called periodically)."""
        now = self.clock.seconds()
        self._account_throttle.prune(now)
        self._address_throttle.prune(now)
        self.register_limit.prune(now)
        self.tokens.prune()

    def floor_of(self, name: str) -> int | None:
        """The floor of local account ``name`` as this realm knows it (None: none
        known); another floor under the same name is another account."""
        return self._floors.get(name)

    def is_user(self, user: str) -> bool:
        """Whether canonical address ``user`` is a known local account."""
        name, _, where = user.partition("@")
        return where == self.realm and name in self.known

    def exists(self, name: str) -> Deferred[bool]:
        """Whether local account ``name`` exists (asking the store when it is not
        known here: it may have been added by ``chatrealmctl``)."""
        if name in self.known:
            return succeed(True)

        def found(exists: bool) -> bool:
            if exists:
                self.known.add(name)
            return exists

        return self.store.user_exists(name).addCallback(found)

    @inlineCallbacks
    def create_user(self, name: str, password: str) -> Any:
        """Create a local account (used by in-band register and embedding apps).

        Names of the form kept for guests are refused (``bad_address``), and so is
        a nick a guest is using (``user_exists``): see chatproto.realm.guests."""
        name = address.normalise_name(name)
        if reserved_name(name):
            raise ChatError("bad_address", f"names starting with {GUEST_PREFIX!r} are reserved")
        if self._r.guests.nick_taken(name):
            raise ChatError("user_exists", f"a guest is using the name {name} on IRC")
        check_password(password)
        pwhash = yield self.hasher.hash(password)
        address_ = yield self._create(name, pwhash)
        return address_

    def create_guest(self, name: str, pwhash: str) -> Any:
        """Create the temporary account of a guest (chatproto.realm.guests): a name of
        the reserved form, a hash no password verifies against."""
        assert reserved_name(name)
        return self._create(name, pwhash)

    @inlineCallbacks
    def _create(self, name: str, pwhash: str) -> Any:
        yield self.store.create_user(name, pwhash, self.clock.seconds())
        self.known.add(name)
        floor = yield self.store.user_floor(name)
        yield self._adopt(name, floor or 0)
        self.log.info("account {user} created", user=f"{name}@{self.realm}")
        return Address(name, self.realm)

    @inlineCallbacks
    def delete_user(self, name: str) -> Any:
        """Delete a local account (see PROTOCOL.md, "What deleting an account
        removes"): its sessions are closed, its session tokens, send nonces and
        unfinished uploads go, and its standing in every group (membership, role,
        invitation, ban) ends with stored events, committed with the deletion; the
        home realms of other realms' groups it is in are told.

        Messages stay (the other party keeps the conversation); an account created
        later under the same name starts after them (see ``IStore.user_floor``).
        Fires with True if the account existed.
        """
        addr = Address(address.normalise_name(name), self.realm)
        user = str(addr)
        self.known.discard(addr.name)
        self._floors.pop(addr.name, None)
        self._end_sessions(addr.name, None)
        self._forget_roles(addr.name)
        groups = set(self._r.groups.standing(user)) | remote_groups_of(
            self._r.groups, user, self.realm
        )
        existed = yield self._r.group_handler.end_standing(user, groups, account=addr.name)
        self._r.standing_changed(addr.name, ("account",))
        yield self._r.files.forget_user(user)
        if existed:
            self.log.info("account {user} deleted", user=user)
        return bool(existed)

    def _forget_roles(self, name: str) -> None:
        """A deleted account's realm admin role and suspension go with it: held here
        under its name and floor, they matched "no floor known" (0) and so still
        named a deleted account created at position 0 in ``chatrealmctl admins``."""
        self._r.moderation.admins.pop(name, None)
        self._r.admin.suspended.pop(name, None)

    def _end_sessions(self, name: str, floor: int | None) -> None:
        """Close the sessions and drop the tokens and send nonces of account ``name``,
        except those of the account created at ``floor`` (None: all of them)."""
        user = f"{name}@{self.realm}"
        self.revoked(name)
        self.tokens.revoke_user(name, keep_floor=floor)
        self._r.messages.forget_nonces(user)
        self._r.reading.forget(user)
        for s in list(self._r.sessions.of(user)):
            if floor is None or (s.opened and s.floor != floor):
                s.mind.disconnect("auth_failed", "this account was deleted")
                s.logout()

    @inlineCallbacks
    def refresh(self, name: str) -> Any:
        """Another process serving the realm (a worker of a cluster) may have deleted
        local account ``name``, or made another one of the name: read its floor from
        the store and end here what a deleted account held (see :meth:`delete_user`;
        its group standing ended with events of the stream)."""
        floor = yield self.store.user_floor(name)
        if floor is None:
            self.known.discard(name)
            self._floors.pop(name, None)
            self._end_sessions(name, None)
            self._forget_roles(name)
        else:
            self.known.add(name)
            yield self._adopt(name, floor)

    @inlineCallbacks
    def _adopt(self, name: str, floor: int) -> Any:
        """Account ``name`` is the one created at ``floor``.  If this realm knew another
        (deleted by ``chatrealmctl`` while the realm ran), what it held ends now: its
        sessions, tokens and nonces, and any group standing from before ``floor``."""
        if self._floors.get(name) == floor:
            return
        self._floors[name] = floor
        user = f"{name}@{self.realm}"
        self._end_sessions(name, floor)
        stale = [a for a, pos in self._r.groups.standing(user).items() if pos <= floor]
        if stale:
            self.log.warn(
                "account {user}: ending standing of a deleted account in {n} groups",
                user=user,
                n=len(stale),
            )
            yield self._r.group_handler.end_standing(user, stale)

    @inlineCallbacks
    def repair_standing(self) -> Any:
        """At start-up: a local user with standing in a group but no account, or with
        standing from before their account was created (a database where an older
        version deleted accounts), loses it (see :meth:`delete_user`)."""
        for user, marks in sorted(self._r.groups.standing_of_suffix(self._suffix).items()):
            floor = self._floors.get(user.rpartition("@")[0])
            stale = [a for a, pos in marks.items() if floor is None or pos <= floor]
            if stale:
                self.log.warn(
                    "account {user}: ending standing of a deleted account in {n} groups",
                    user=user,
                    n=len(stale),
                )
                yield self._r.group_handler.end_standing(user, stale)

    def account_floor(self, user: str) -> Deferred[int | None]:
        """The floor of the local account at canonical address ``user`` (it sees only
        items after it), or None if there is no such account."""
        name, _, where = user.rpartition("@")
        if where != self.realm:
            return succeed(None)
        return self.store.user_floor(name)

    def register(self, name: str, password: str, peer: str = "?") -> Deferred[Address]:
        """In-band registration from client address ``peer``: a registration that
        cannot succeed (a bad name or password, a name taken) is refused before the
        password is hashed; the others take a token of ``peer``'s allowance
        (:attr:`register_limit`; ``rate_limited`` without one).  Errors come as a failed
        Deferred, except ``registration_closed``."""
        if not self.config.auth.allow_registration:
            raise ChatError("registration_closed")
        try:
            name = self._registrable(name, password)
        except ChatError as e:
            return fail(e)

        if self.config.auth.registrations_per_address == 0:  # no bound (behind a proxy)
            return self.create_user(name, password)

        def taken(wait: float) -> Deferred[Address]:
            if wait:
                self.stats.rate_limited("register")
                raise ChatError(
                    "rate_limited", "too many registrations", retry_after=round(wait, 3)
                )
            return self.create_user(name, password)

        return self.register_limit.take(peer, self.clock.seconds()).addCallback(taken)

    def _registrable(self, name: str, password: str) -> str:
        """The normalised ``name``, if registering it may succeed; else ChatError."""
        name = address.normalise_name(name)
        if reserved_name(name):
            raise ChatError("bad_address", f"names starting with {GUEST_PREFIX!r} are reserved")
        check_password(password)
        if name in self.known:
            raise ChatError("user_exists", f"user {name!r} already exists")
        return name

    @inlineCallbacks
    def login(
        self,
        username: str,
        password: str,
        mind: Any,
        device: str = "default",
        peer: str = "?",
        quiet: bool = False,
    ) -> Any:
        """Authenticate and attach ``mind``; fires with a :class:`Session`.

        A ``quiet`` session (a one-shot tool, a bot's side channel) does not make its
        user appear online to contacts, nor offline when it ends.

        Unknown users and wrong passwords both fail with ``auth_failed``; repeated
        failures per account and per peer address get ``rate_limited``.
        """
        check_device(device)
        yield self._r.when_started()  # (suspensions, admins... are loaded)
        creds, key = self._throttled_credentials(username, password, peer)
        before = self._revoked.get(key, 0)
        try:
            _iface, session, _logout = yield self.portal.login(creds, mind, ISession)
        except UnauthorizedLogin:
            self._login_failed(key, peer)
        self._account_throttle.succeeded(key)
        self._still_valid(session.user.name, before, session)
        yield self._session_opened(session, device, quiet, peer)
        return session

    @inlineCallbacks
    def open_session(self, name: str, mind: Any, device: str, peer: str) -> Any:
        """A session of local account ``name`` for ``mind`` without credentials (a
        guest's: chatproto.realm.guests); fires with the :class:`Session`."""
        check_device(device)
        session = self._r.attach(name, mind)
        yield self._session_opened(session, device, False, peer)
        return session

    @inlineCallbacks
    def login_token(
        self,
        token: str | None,
        mind: Any,
        device: str | None = None,
        peer: str = "?",
        quiet: bool = False,
    ) -> Any:
        """:meth:`login` with a session token (a browser's cookie) instead of a
        password; ``device`` defaults to the one the token was issued for.  An unknown
        or expired token fails with ``auth_failed``.  A worker of a cluster asks the
        store of a token it does not hold (issued on another worker a moment ago:
        :meth:`chatproto.tokens.Tokens.find`)."""
        yield self._r.when_started()  # (the browser logins are loaded)
        record = yield self.tokens.find(token)
        if record is None:
            self.stats.login_failures += 1
            raise ChatError("auth_failed", "not logged in (no valid session token)")
        if (yield self.store.user_floor(record.user)) != record.floor:
            self.tokens.revoke(token)  # issued to a deleted account of this name
            raise ChatError("auth_failed", "not logged in (no valid session token)")
        device = record.device if device is None else device
        check_device(device)
        try:
            _iface, session, _logout = yield self.portal.login(
                SessionToken(token or ""), mind, ISession
            )
        except UnauthorizedLogin:
            raise ChatError("auth_failed", "not logged in (no valid session token)") from None
        session.login = record.login_id(token_digest(token or ""))
        yield self._session_opened(session, device, quiet, peer)
        return session

    @inlineCallbacks
    def issue_token(
        self, username: str, password: str, device: str = "web", peer: str = "?"
    ) -> Any:
        """Check a password (throttled exactly like :meth:`login`) and issue a session
        token for ``device``; fires with ``(token, Address)``.  No session is opened:
        the token is presented later (:meth:`login_token`, :meth:`token_user`)."""
        check_device(device)
        yield self._r.when_started()
        before = self._revoked.get(self._login_name(username)[:64], 0)
        name = yield self.verify_password(username, password, peer)
        self._still_valid(name, before)
        floor = (yield self.store.user_floor(name)) or 0
        if self._r.admin.is_suspended(name, floor):
            raise ChatError("account_suspended", "this account is suspended")
        yield self._adopt(name, floor)
        self.log.info(
            "session token for {user} ({device}) from {peer}",
            user=f"{name}@{self.realm}",
            device=device,
            peer=peer,
        )
        token = yield self.tokens.issue(name, device, floor)
        self._r.standing_changed(name, ("logins",))
        return token, Address(name, self.realm)

    @inlineCallbacks
    def verify_password(self, username: str, password: str, peer: str = "?") -> Any:
        """Check a password (throttled exactly like :meth:`login`) without opening a
        session; fires with the account's name, or fails with ``auth_failed`` or
        ``rate_limited`` (IRC's ``OPER`` asks it)."""
        creds, key = self._throttled_credentials(username, password, peer)
        try:
            name = yield self._password_checker.requestAvatarId(creds)
        except UnauthorizedLogin:
            self._login_failed(key, peer)
        self._account_throttle.succeeded(key)
        return name

    def token_user(self, token: str | None) -> Address | None:
        """The local user a live session token stands for (marking it used), or None.
        A token of an account this realm knows was deleted stands for nobody."""
        record = self.tokens.check(token)
        if record is None or self._floors.get(record.user) != record.floor:
            return None
        return Address(record.user, self.realm)

    def revoke_token(self, token: str | None) -> None:
        """Log a browser out: the token stops working (open sessions are the
        gateway's to close)."""
        record = self.tokens.revoke(token)
        if record is not None:
            self._r.standing_changed(record.user, ("logins",))

    def _throttled_credentials(
        self, username: str, password: str, peer: str
    ) -> tuple[UsernamePassword, str]:
        now = self.clock.seconds()
        username = self._login_name(username)
        key = username[:64]
        wait = max(self._account_throttle.wait(key, now), self._address_throttle.wait(peer, now))
        if wait > 0:
            self.stats.rate_limited("login")
            self.log.info("login throttled for {user} from {peer}", user=log_shown(key), peer=peer)
            raise ChatError("rate_limited", "too many failed logins", retry_after=round(wait, 3))
        return UsernamePassword(username.encode("utf-8"), password.encode("utf-8")), key

    def _login_failed(self, key: str, peer: str) -> NoReturn:
        now = self.clock.seconds()
        self._account_throttle.failed(key, now)
        self._address_throttle.failed(peer, now)
        self.stats.login_failures += 1
        # (the name as the client gave it: not an address when it failed to be one)
        self.log.info("login failed for {user} from {peer}", user=log_shown(key), peer=peer)
        raise ChatError("auth_failed") from None

    @inlineCallbacks
    def _session_opened(self, session: Session, device: str, quiet: bool, peer: str) -> Any:
        session.device = device
        session.quiet = quiet
        session.peer = peer
        floor = yield self.store.user_floor(session.user.name)
        session.floor = floor or 0
        if self._r.admin.is_suspended(session.user.name, session.floor):
            session.logout()
            raise ChatError("account_suspended", "this account is suspended")
        self.stats.login(session.protocol)
        session.opened = True
        if floor is not None and self._floors.get(session.user.name) != floor:
            yield self._adopt(session.user.name, floor)
        try:
            yield self._r.presence.came_online(session)
        except Exception:
            self.log.failure("presence for {user}", user=session.user_id)
        self.log.info(
            "login {user} device {device} from {peer}",
            user=session.user_id,
            device=device,
            peer=peer,
        )

    def _login_name(self, username: str) -> str:
        """``name`` or ``name@<this realm>`` -> the normalised name (else as given).

        The throttle key is the normalised name, so spelling variants of one account
        (``ALICE``, fullwidth letters) share its failure count.
        """
        try:
            addr = address.user(username, self.realm)
        except ChatError:
            return username.casefold()
        return addr.name if addr.is_local(self.realm) else username.casefold()


def check_password(password: Any) -> None:
    """The password rule for every account (in-band and ``chatrealmctl``)."""
    if not isinstance(password, str) or not 8 <= len(password) <= 1024:
        raise ChatError("bad_request", "a password must be 8 to 1024 characters")
