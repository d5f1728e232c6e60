"""Guests: opt-in access without an account, for the IRC gateway (``[irc] guests``).

Every real IRC network lets people in without a password; a realm does so only when
its operator says ``guests = true``.  A guest gets a **temporary account** for its
connection:

- its account name has the reserved form ``guest-<10 hex digits>``, which no
  ``register`` or ``chatrealmctl adduser`` can take (:func:`reserved_name`), so a
  guest never holds, nor later hands over, a real account's name;
- it is shown on IRC under the nick it chose, which must be free: not the name of an
  account (so a guest cannot pass for ``alice``) nor another guest's nick; an account
  cannot be registered under a nick a guest is using;
- when its connection ends the account is deleted like any other (its group standing
  ends with stored events; the messages it exchanged stay with the other party, as
  PROTOCOL.md says of deleted accounts), and a realm that restarts deletes the guest
  accounts it finds left over;
- it has limits of its own: at most ``irc.guests_max`` at once,
  ``irc.guests_per_address`` per client address, and its own send rate
  (``irc.guest_send_rate``, ``irc.guest_send_burst``).

The handler holds state only (nick and address bookkeeping); accounts are made and
removed through :class:`chatproto.realm.accounts.Accounts`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.logger import Logger

from chatproto import address
from chatproto.address import GUEST_PREFIX, reserved_name
from chatproto.errors import ChatError
from chatproto.ratelimit import TokenBucket
from chatproto.realm.sessions import Session

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = ["GUEST_HASH", "GUEST_PREFIX", "Guests", "reserved_name"]

#: The password hash a guest account is stored with: no password verifies against it
#: (not an argon2 hash), and it tells a left-over guest account from a real one.
GUEST_HASH = "!guest"


class Guests:
    """The guests of the realm: who is one, under which nick, from which address."""

    log = Logger()

    def __init__(self, realm: RealmService) -> None:
        self._realm = realm
        #: folded nick -> guest account name ("" while the login is under way)
        self.by_nick: dict[str, str] = {}
        #: guest account name -> (folded nick, client address)
        self.accounts: dict[str, tuple[str, str]] = {}
        self._per_address: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._realm.config.irc.guests)

    def user_of(self, nick: str) -> str | None:
        """The canonical address of the guest using ``nick`` (any case), or None."""
        if not self.by_nick:
            return None
        name = self.by_nick.get(nick.lower())
        return f"{name}@{self._realm.realm}" if name else None

    def is_guest(self, user: str) -> bool:
        """Whether canonical address ``user`` is a guest of this realm."""
        name, _, where = user.partition("@")
        return name in self.accounts and where == self._realm.realm

    def nick_taken(self, name: str) -> bool:
        """Whether a guest is using (or getting) nick ``name`` (normalised)."""
        return name in self.by_nick

    @inlineCallbacks
    def login(self, nick: str, mind: Any, device: str, peer: str) -> Any:
        """A temporary account for a connection without credentials, logged in as
        ``mind``; fires with its :class:`Session`.

        ``nick`` must be a valid name (``bad_address``) that no account and no other
        guest has (``user_exists``); ``limit_reached`` past the guest limits;
        ``auth_failed`` when guests are off."""
        realm = self._realm
        cfg = realm.config.irc
        if not cfg.guests:
            raise ChatError("auth_failed")
        key = address.normalise_name(nick)
        if key in self.by_nick:
            raise ChatError("user_exists", f"a guest is using the nick {nick}")
        if len(self.by_nick) >= cfg.guests_max:
            raise ChatError("limit_reached", "the realm has as many guests as it takes")
        if self._per_address.get(peer, 0) >= cfg.guests_per_address:
            raise ChatError("limit_reached", "as many guests from your address as allowed")
        self.by_nick[key] = ""  # reserved while the account is made
        self._per_address[peer] = self._per_address.get(peer, 0) + 1
        name = ""
        try:
            if (yield realm.accounts.exists(key)):
                raise ChatError("user_exists", f"{nick} is an account of this realm")
            while True:
                name = GUEST_PREFIX + os.urandom(5).hex()
                if not (yield realm.accounts.exists(name)):
                    break
            yield realm.accounts.create_guest(name, GUEST_HASH)
            self.accounts[name] = (key, peer)
            self.by_nick[key] = name
            session: Session = yield realm.accounts.open_session(name, mind, device, peer)
        except BaseException:
            self._release(key, peer)
            if name in self.accounts:
                self.accounts.pop(name, None)
                realm.accounts.delete_user(name).addErrback(self._failed, name)
            raise
        session.bucket = TokenBucket(
            cfg.guest_send_rate, cfg.guest_send_burst, realm.clock.seconds()
        )
        self.log.info("guest {nick} ({user}) from {peer}", nick=nick, user=name, peer=peer)
        return session

    def _release(self, key: str, peer: str) -> None:
        self.by_nick.pop(key, None)
        left = self._per_address.get(peer, 0) - 1
        if left > 0:
            self._per_address[peer] = left
        else:
            self._per_address.pop(peer, None)

    def rename(self, user: str, nick: str) -> Deferred[None]:
        """Guest ``user`` takes nick ``nick``: ``user_exists`` when an account or
        another guest has it, ``bad_address`` if it is no name."""
        name = user.partition("@")[0]
        try:
            key = address.normalise_name(nick)
            if key in self.by_nick or name not in self.accounts:
                raise ChatError("user_exists", f"{nick} is taken")
        except ChatError as e:
            return fail(e)
        self.by_nick[key] = ""  # reserved while the accounts are asked

        def checked(exists: bool) -> None:
            entry = self.accounts.get(name)
            if exists or entry is None:
                self.by_nick.pop(key, None)
                raise ChatError("user_exists", f"{nick} is an account of this realm")
            self.by_nick.pop(entry[0], None)
            self.by_nick[key] = name
            self.accounts[name] = (key, entry[1])

        return self._realm.accounts.exists(key).addCallback(checked)

    def ended(self, session: Session) -> None:
        """A session ended: a guest's account goes with it."""
        name = session.user.name
        entry = self.accounts.pop(name, None)
        if entry is None:
            return
        self._release(*entry)
        if self._realm.running:  # else the store is closing: deleted at the next start
            self._realm.accounts.delete_user(name).addErrback(self._failed, name)

    @inlineCallbacks
    def remove_left_over(self) -> Any:
        """At start: delete the guest accounts a previous run left (it stopped while
        guests were connected).  Only accounts stored with :data:`GUEST_HASH`."""
        store = self._realm.store
        for name in sorted(self._realm.accounts.known):
            if reserved_name(name) and (yield store.password_hash(name)) == GUEST_HASH:
                self.log.info("deleting left-over guest account {name}", name=name)
                yield self._realm.accounts.delete_user(name)

    def _failed(self, f: Any, name: str) -> None:
        self.log.failure("deleting guest account {name} failed", f, name=name)
