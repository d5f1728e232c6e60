"""Reactions, replies and deletes for IRC clients (issue 17): IRCv3's ``+draft/react``
(and ``+draft/unreact``) and ``+draft/reply`` client tags, and
``draft/message-redaction`` (``REDACT``).

IRC names a message by its ``msgid``, which this gateway makes the item's stream
position; the realm names it by ``msg_id``.  :class:`MsgIds` (one per factory)
remembers both for the items the gateway rendered lately with their msgid (to
clients with ``message-tags``: the others are never shown one), so a reaction or a
``REDACT`` from an IRC client reaches the realm by ``msg_id`` (a msgid it never
rendered, or forgot, is ``UNKNOWN_MSGID``), and the realm's reaction, reply and
delete items reach IRC clients by msgid:

- a ``reaction`` item: ``@msgid=P;+draft/react=👍;+draft/reply=T TAGMSG target`` (with
  ``+draft/unreact`` when it is taken back), to clients with ``message-tags``;
- a ``delete`` item: ``REDACT target T``, to clients with ``draft/message-redaction``;
- a reply: ``+draft/reply=T`` on its PRIVMSG (see ``IRCFactory.lines``); and a
  PRIVMSG from an IRC client with ``+draft/reply`` naming a message of its
  conversation that the gateway rendered is a realm reply (:func:`reply_from_tags`).

An edit has no IRC form: it reaches IRC clients as a notice ``[edit] <text>``.  The
realm decides everything (who may react or delete what): this module translates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.irc.commands import command
from chatproto.irc.lines import channel_of, decimal, format_line, server_time
from chatproto.irc.replies import PendingSend, Reply
from chatproto.realm.tags import tag_data

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

__all__ = ["REDACTION", "MsgIds", "react_from_tags", "render", "reply_from_tags"]

#: The capability of IRCv3 message redaction (a work-in-progress spec: prefixed).
REDACTION = "draft/message-redaction"
#: Items whose msgid and msg_id a factory remembers.
REMEMBERED = 65536


class MsgIds:
    """``msg_id`` <-> IRC msgid (the stream position) of recently rendered items.

    At least the last ``size`` items rendered are remembered (at most twice that:
    the older half is forgotten at once, so each item costs two dictionary writes)."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._pos: dict[str, int] = {}  # in the order remembered
        #: msgid -> (msg_id, sender, recipient)
        self._ids: dict[int, tuple[str, str, str]] = {}

    def remember(self, env: Envelope) -> None:
        known = self._pos
        if env.id in known or not env.pos:
            return
        known[env.id] = env.pos
        self._ids[env.pos] = (env.id, env.sender, env.recipient)
        if len(known) > 2 * self._size:
            ids = self._ids
            old = list(known.items())[: len(known) - self._size]
            for msg_id, pos in old:
                del known[msg_id]
                ids.pop(pos, None)

    def msgid(self, msg_id: Any) -> int | None:
        """The IRC msgid of the item with this ``msg_id``, if rendered lately."""
        return self._pos.get(msg_id) if isinstance(msg_id, str) else None

    def msg_id(self, msgid: str, user: str, to: str) -> str | None:
        """The ``msg_id`` of IRC msgid ``msgid``, if rendered lately and an item of
        the conversation of ``user`` with ``to`` (a group, or the other user)."""
        pos = decimal(msgid)
        found = self._ids.get(pos) if pos is not None else None
        if found is None:
            return None
        msg_id, sender, recipient = found
        if to.startswith("#"):
            return msg_id if recipient == to else None
        return msg_id if {sender, recipient} == {user, to} else None


def _target(p: IRCProtocol, env: Envelope) -> str:
    if env.recipient.startswith("#"):
        return channel_of(env.recipient, p.realm.realm)
    # a private item: shown in the conversation with the other party
    other = env.sender if env.recipient == p.user_id else env.recipient
    return p.nick_for(other)


def render(p: IRCProtocol, env: Envelope) -> bytes | None:
    """The line(s) of a ``reaction`` or ``delete`` item for ``p``'s client (b"" when
    it gets none), or None for the generic rendering (an edit)."""
    ids = p.factory.msgids
    ids.remember(env)
    meta = env.meta or {}
    target = ids.msgid(meta.get("ref"))
    mine = env.sender == p.user_id
    if env.kind == "reaction":
        if target is None or not p.tag_mode & 2 or (mine and "echo-message" not in p.caps):
            return b""
        emoji = str(meta.get("emoji", ""))
        verb = "+draft/unreact" if meta.get("remove") else "+draft/react"
        tags = f"@time={server_time(env.ts)};" if p.tag_mode & 1 else "@"
        tags += f"msgid={env.pos};" + tag_data({verb: emoji, "+draft/reply": str(target)})
        return (tags + " ").encode() + format_line(p.mask(env.sender), "TAGMSG", _target(p, env))
    if env.kind == "delete":
        if target is None or REDACTION not in p.caps:
            return b""
        return format_line(p.mask(env.sender), "REDACT", _target(p, env), str(target))
    return None


def react_from_tags(
    p: IRCProtocol, ctx: Reply, target: str, to: str, client: dict[str, str]
) -> Any:
    """A ``TAGMSG`` with ``+draft/react`` (or ``+draft/unreact``) and ``+draft/reply``
    naming a message this gateway rendered: a stored reaction (the realm's rules),
    instead of an ephemeral relay.  None when the tags are not that."""
    emoji = client.get("+draft/react") or client.get("+draft/unreact")
    reply = client.get("+draft/reply")
    if not emoji or not reply or p.session is None:
        return None
    msg_id = p.factory.msgids.msg_id(reply, p.user_id, to)
    if msg_id is None:
        return None  # not one we know (here): relayed as tags, as before
    remove = "+draft/react" not in client
    # Its echo (echo-message) answers this command: it carries the label.
    entry = PendingSend(to, echo_key(msg_id, emoji, remove), ctx)
    p.pending_sends.append(entry)
    d = p.realm.relations.react(p.session, msg_id, emoji, remove)
    if p.realm.cluster is not None:
        d.addCallback(p.when_routed)  # its echo comes from the stream (see there)
    d.addBoth(_settled, p, entry)
    return d.addCallbacks(lambda _: None, _failed, errbackArgs=(p, ctx, "TAGMSG", target))


def reply_from_tags(
    p: IRCProtocol, to: str, client: dict[str, str] | None
) -> tuple[str | None, dict[str, str] | None]:
    """``(reply_to, client tags to keep)`` of a ``PRIVMSG`` to ``to`` (canonical)
    with these client tags: with ``+draft/reply`` naming a message of that
    conversation this gateway rendered, a realm reply to it (its ``msg_id``; the tag
    itself is not kept: the gateway writes it from ``reply_to``); else no reply, and
    the tags are kept as they are (relayed)."""
    if not client:
        return None, None
    msgid = client.get("+draft/reply")
    msg_id = p.factory.msgids.msg_id(msgid, p.user_id, to) if msgid else None
    if msg_id is None:
        return None, client or None
    rest = {k: v for k, v in client.items() if k != "+draft/reply"}
    return msg_id, rest or None


def echo_key(msg_id: Any, emoji: Any, remove: bool) -> str:
    """What a pending reaction is recognised by when its item comes back (in
    ``IRCProtocol.pending_sends``, beside PRIVMSGs; never a message body: NUL)."""
    return f"\0reaction {msg_id} {emoji} {bool(remove)}"


def echo_of(p: IRCProtocol, env: Envelope) -> Reply | None:
    """The command a reaction item of ours answers (its echo goes with that command's
    replies, labeled), or None."""
    pending = p.pending_sends
    if not pending or env.kind != "reaction" or env.sender != p.user_id:
        return None
    head = pending[0]
    meta = env.meta or {}
    key = echo_key(meta.get("ref"), meta.get("emoji"), bool(meta.get("remove")))
    if head.to != env.recipient or head.body != key:
        return None
    pending.popleft()
    head.matched = True
    return head.ctx


def _settled(result: Any, p: IRCProtocol, entry: PendingSend) -> Any:
    if not entry.matched:
        try:
            p.pending_sends.remove(entry)
        except ValueError:
            pass
    return result


def _failed(f: Failure, p: IRCProtocol, ctx: Reply, command: str, target: str) -> None:
    f.trap(ChatError)
    p.error(ctx, command, f.value, target)  # type: ignore[arg-type]


_FAIL = {"not_found": "UNKNOWN_MSGID", "forbidden": "REDACT_FORBIDDEN"}


@command("REDACT", params=2)
def redact(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    """``REDACT <target> <msgid> [:reason]``: delete a message (one's own; in a
    channel, any for its operators).  The realm's ``delete`` decides; every client
    with the capability then gets ``REDACT`` (the sender's too)."""
    assert p.session is not None
    target, msgid = params[0], params[1]

    def fail(code: str, text: str) -> None:
        ctx.send(format_line(p.server, "FAIL", "REDACT", code, target, msgid, text))

    try:
        to = p.resolve(target)
    except ChatError as e:
        ctx.send(format_line(p.server, "FAIL", "REDACT", "INVALID_TARGET", target, e.message))
        return None
    msg_id = p.factory.msgids.msg_id(msgid, p.user_id, to)
    if msg_id is None:
        fail("UNKNOWN_MSGID", "No such message here")
        return None

    def failed(f: Failure) -> None:
        f.trap(ChatError)
        err: ChatError = f.value  # type: ignore[assignment]
        fail(_FAIL.get(err.code, "REDACT_FORBIDDEN"), err.message)

    return p.realm.relations.delete(p.session, msg_id).addCallbacks(lambda _: None, failed)
