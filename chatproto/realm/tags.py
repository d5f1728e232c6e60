"""Client tags: small ``name -> value`` annotations that clients attach to a message,
or send on their own as an ephemeral signal -- IRCv3's client-only tags
(``+typing``, ``+draft/reply``, ``+draft/react``) and what native features map onto
them.

Two ways through the realm, one rule for both (:func:`check_tags`):

- **On a message**: ``send`` with ``tags`` stores them in the text item's ``meta``
  (``{"tags": {"+draft/reply": "42"}}``); they are delivered, replayed and sent
  across federation with the item, like its body.
- **On their own** (IRC's ``TAGMSG``, the native ``tags`` request): not stored.  The
  realm checks that the sender may speak to the target (as for a message: a member
  of the group, not silenced by ``moderated``; the send rate limit), then pushes a
  ``tags`` notice to the online sessions of the recipients (the group's members, or
  the other user) and to the sender's other sessions.  Like presence, a session that
  is not connected (or still replaying its backlog) misses it; it is not sent to
  other realms.

A tag name is ``+`` then an optional vendor (``draft/``, ``example.org/``) and a name
of letters, digits and ``-``; a value is a one-line label (chatproto.text).  All the
tags of one message or signal, written as IRC writes them (``+a=1;+b``, values
escaped), fit in :data:`MAX_TAG_DATA` bytes -- so whatever a native client sends
reaches IRC users intact, and whatever IRC users send fits.

Other features plug in here: a handler that wants to signal something ephemeral
(typing, a read marker) calls :meth:`ClientTags.relay` with the tags IRC users know;
minds receive the ``tags`` :class:`chatproto.realm.sessions.Notice` in ``notify``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed

from chatproto.envelope import new_message_id
from chatproto.errors import ChatError
from chatproto.realm.sessions import Notice, Session
from chatproto.text import label_problem

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = [
    "MAX_TAG_DATA",
    "ClientTags",
    "check_tags",
    "client_tags",
    "escape_value",
    "shown_tags",
    "tag_data",
]

#: Bytes of tag data (``+a=1;+b=2``, escaped as IRC writes it): the message-tags limit
#: for what a client sends.
MAX_TAG_DATA = 4094

_NAME = re.compile(r"\+(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*/)?[A-Za-z0-9-]+")


def escape_value(value: str) -> str:
    """A tag value as IRC writes it (``;``, space, ``\\``, CR, LF escaped; NUL, which
    IRCv3 message-tags cannot escape and many clients read as the end of the line,
    dropped: a checked value has none, an item stored before the checks might)."""
    return (
        value.replace("\0", "")
        .replace("\\", "\\\\")
        .replace(";", "\\:")
        .replace(" ", "\\s")
        .replace("\r", "\\r")
        .replace("\n", "\\n")
    )


def tag_data(tags: dict[str, str]) -> str:
    """The tags as IRC writes them, without the ``@`` and the space: ``+a=1;+b``."""
    return ";".join(f"{k}={escape_value(v)}" if v else k for k, v in tags.items())


def shown_tags(tags: Any) -> dict[str, str] | None:
    """The tags of a stored item's ``meta`` that may be written on an IRC line: the
    client tags with a well-formed name and a string value (those :func:`check_tags`
    accepted), or None.  Items stored before the checks (or by an older release) may
    hold anything there; nothing of it must break a line or the fan-out."""
    if not isinstance(tags, dict):
        return None
    return {
        k: v
        for k, v in tags.items()
        if isinstance(k, str) and _NAME.fullmatch(k) and isinstance(v, str)
    } or None


def client_tags(tags: dict[str, str]) -> dict[str, str]:
    """The client-only tags among those of an IRC line (names starting with ``+``
    and well formed); the others (``label``, server tags) are not relayed."""
    return {k: v for k, v in tags.items() if k[:1] == "+" and _NAME.fullmatch(k)}


def check_tags(tags: Any) -> dict[str, str]:
    """``tags`` if they are valid client tags, else ``bad_request`` (a bad name or
    value) or ``too_large`` (more than :data:`MAX_TAG_DATA` bytes)."""
    if not isinstance(tags, dict) or not tags:
        raise ChatError("bad_request", "tags must be a non-empty object of strings")
    for k, v in tags.items():
        if not isinstance(k, str) or not _NAME.fullmatch(k):
            raise ChatError(
                "bad_request", "a tag name is '+', an optional vendor/ and letters, digits, '-'"
            )
        if not isinstance(v, str):
            raise ChatError("bad_request", f"the value of tag {k} must be a string")
        problem = label_problem(v)
        if problem is not None:
            raise ChatError("bad_request", f"the value of tag {k} contains a {problem}")
    try:
        size = len(tag_data(tags).encode("utf-8"))
    except UnicodeEncodeError:
        raise ChatError("bad_request", "tags must be valid Unicode") from None
    if size > MAX_TAG_DATA:
        raise ChatError("too_large", f"tags are {size} bytes; the limit is {MAX_TAG_DATA}")
    return dict(tags)


class ClientTags:
    """Ephemeral client tags (``TAGMSG``): checked, then pushed to online sessions."""

    def __init__(self, realm: RealmService) -> None:
        self._realm = realm

    def send(self, session: Session, to: str, tags: Any) -> Deferred[dict[str, Any]]:
        """Tags from a client session (rate limited like a message); fires with the
        notice's data (its ``id`` is what IRC shows as ``msgid``).  The session that
        sent them is not sent the notice (it answers its client itself)."""
        realm = self._realm
        try:
            tags = check_tags(tags)
            wait = session.bucket.take(realm.clock.seconds())
            if wait:
                realm.stats.rate_limited("send")
                raise ChatError("rate_limited", "sending too fast", retry_after=round(wait, 3))
        except ChatError as e:
            return fail(e)
        return self.relay(session.user_id, to, tags, session)

    def relay(
        self, sender: str, to: str, tags: dict[str, str], origin: Session | None = None
    ) -> Deferred[dict[str, Any]]:
        """Push checked ``tags`` from local user ``sender`` to ``to`` (a user or a
        ``#group``), under the rules of a message to it; not to ``origin``.

        The entry point for realm features that signal something ephemeral."""
        realm = self._realm
        try:
            if to.startswith("#"):
                group = realm.group_handler.address(to, True, sender)
                realm.groups.check_speaker(group, sender)
                members = realm.groups.groups[group].members
                return succeed(self._push(sender, group, members, tags, origin))
            user = realm.messages.resolve_user(to, True, sender)
        except ChatError as e:
            return fail(e)
        if isinstance(user, Deferred):
            return user.addCallback(
                lambda u: self._push(sender, str(u), {str(u), sender}, tags, origin)
            )
        return succeed(self._push(sender, str(user), {str(user), sender}, tags, origin))

    def _push(
        self,
        sender: str,
        target: str,
        users: Any,
        tags: dict[str, str],
        origin: Session | None,
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": "tags",
            "id": new_message_id(),
            "from": sender,
            "to": target,
            "ts": self._realm.clock.seconds(),
            "tags": tags,
        }
        # Users of other realms have no session here: for them it goes nowhere.  The
        # session it comes from is told only when it is also a recipient (to oneself).
        if target == sender:
            origin = None
        self._realm.sessions.notify(users, Notice(data), exclude=origin)
        return data
