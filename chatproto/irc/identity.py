"""How IRC users are shown: the nick as they typed it, the username and realname of
their ``USER`` line, and who had a nick before (``WHOWAS``).

The realm knows accounts, not these: they are what an IRC client told this gateway,
kept while the account has an IRC connection (the latest connection's), and in a
bounded WHOWAS history after its last one closes.  A nick differs from the account
name only in case (the realm compares names case-folded); users with no IRC
connection (native, web, other realms) show as their address.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from chatproto.irc.lines import nick_of, shown_label

__all__ = ["WHOWAS_KEPT", "Directory", "Identity", "clean_realname", "clean_username"]

#: Entries the WHOWAS history keeps (oldest dropped first).
WHOWAS_KEPT = 1000
#: Longest username kept from USER.
MAX_USERNAME = 32
#: Longest realname kept from USER.
MAX_REALNAME = 128
#: Masks the directory remembers (all forgotten at once past this many).
MASKS_KEPT = 65536


@attrs.define
class Identity:
    nick: str
    username: str
    realname: str
    host: str
    #: when it was last seen (WHOWAS entries only)
    gone_at: float = 0.0
    #: ``nick!username@host``, and the nick it was made with (see Directory.mask)
    mask_text: str = attrs.field(default="", init=False, eq=False, repr=False)
    mask_nick: str | None = attrs.field(default=None, init=False, eq=False, repr=False)


def clean_username(text: str) -> str:
    """A username as a mask can hold it: no spaces, ``!``, ``@`` or control characters."""
    kept = "".join(c for c in text if c.isprintable() and c not in " !@:*?,")
    return kept[:MAX_USERNAME]


def clean_realname(text: str) -> str:
    """A realname as others see it (WHO, WHOIS, WHOWAS): plain text like a topic or
    an away text (no IRC formatting), without the characters a label may not hold
    (chatproto.text: C0 and C1 controls such as ESC, bidirectional overrides), at
    most ``MAX_REALNAME`` characters.  Dropped rather than refused: a client's
    ``USER`` line is not worth a failed registration."""
    return shown_label(text)[:MAX_REALNAME]


class Directory:
    """The identities of the accounts on IRC now, and the WHOWAS history."""

    def __init__(self, realm: str) -> None:
        self.realm = realm
        self._shown: dict[str, Identity] = {}
        self._conns: dict[str, list[Any]] = {}  # user -> live connections, newest last
        #: user -> mask of the users not on IRC (shown as their address); a user on
        #: IRC has its mask on its Identity
        self._masks: dict[str, str] = {}
        self.history: deque[tuple[str, Identity]] = deque(maxlen=WHOWAS_KEPT)

    def default(self, user: str) -> Identity:
        name, _, where = user.partition("@")
        return Identity(nick_of(user, self.realm), name, name, where or self.realm)

    def get(self, user: str) -> Identity:
        shown = self._shown.get(user)
        return shown if shown is not None else self.default(user)

    def nick(self, user: str) -> str:
        shown = self._shown.get(user)
        return shown.nick if shown is not None else nick_of(user, self.realm)

    def mask(self, user: str) -> str:
        """``nick!username@host``: every PRIVMSG line needs the sender's, twice (its
        length check and the delivered line).  Remembered on the identity shown,
        while its nick stays the same object (a NICK changes it; username and host are
        fixed), or for a user not on IRC (shown as its address, which never changes)."""
        shown = self._shown.get(user)
        if shown is not None:
            nick = shown.nick
            if shown.mask_nick is nick:
                return shown.mask_text
            mask = shown.mask_text = f"{nick}!{shown.username}@{shown.host}"
            shown.mask_nick = nick
            return mask
        known = self._masks.get(user)
        if known is not None:
            return known
        i = self.default(user)
        mask = f"{i.nick}!{i.username}@{i.host}"
        if len(self._masks) >= MASKS_KEPT:
            self._masks.clear()
        self._masks[user] = mask
        return mask

    def on_irc(self, user: str) -> bool:
        return user in self._shown

    def connections(self, user: str) -> list[Any]:
        """The registered IRC connections of ``user``, oldest first."""
        return self._conns.get(user, [])

    def arrived(self, user: str, conn: Any, identity: Identity) -> None:
        """A connection of ``user`` registered: it is shown as ``identity``."""
        self._conns.setdefault(user, []).append(conn)
        self._shown[user] = identity

    def renamed(self, user: str, nick: str) -> None:
        shown = self._shown.get(user)
        if shown is not None:
            shown.nick = nick

    def left(self, user: str, conn: Any, now: float) -> None:
        """A connection closed: the user is shown as its newest other connection, or
        goes to the WHOWAS history."""
        conns = self._conns.get(user)
        if not conns or conn not in conns:
            return
        conns.remove(conn)
        if conns:
            newest = conns[-1]
            self._shown[user] = newest.identity
            return
        del self._conns[user]
        gone = self._shown.pop(user, None)
        if gone is not None:
            self.history.appendleft((user, attrs.evolve(gone, gone_at=now)))

    def was(self, nick_folded: str) -> list[Identity]:
        """WHOWAS entries of a nick (case-folded), newest first."""
        return [i for _, i in self.history if i.nick.lower() == nick_folded]
