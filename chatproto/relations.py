"""Items that refer to other items: replies, reactions, edits and deletes (issue 17).

The rules, with no I/O (the realm applies them in :mod:`chatproto.realm.relations`;
the stores use :func:`current_view`).  Everything stays append-only: an edit, a delete
or a reaction is a new stream item of its own kind whose ``meta.ref`` is the
``msg_id`` of the item it refers to, addressed to the same conversation, so it is
delivered, acknowledged, resumed after and carried across realms like any item.  A
reply is a text item whose ``meta.reply_to`` names the item it answers.

What is read back is the *current* state: a ``history`` page (and a backlog) shows
an edited item with its latest text and ``meta.edited``; a history page also shows
each item's reactions, aggregated (``meta.reactions``: emoji -> the users who
reacted, in the order they did).  A deleted item is wiped in the store itself (its
body, its meta and the bodies of its edits: not just hidden) and reads back as
``"body":""`` with ``"meta":{"deleted":true}``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.text import label_problem

__all__ = [
    "DELETED_META",
    "MAX_CHANGES",
    "MAX_EMOJI",
    "REF_KINDS",
    "TARGET_KINDS",
    "check_emoji",
    "check_msg_id",
    "current_view",
    "ref_meta",
    "ref_of",
    "remote_meta",
]

#: The kinds of items that refer to another item by ``meta.ref``.
REF_KINDS = frozenset({"edit", "delete", "reaction"})
#: The kinds of items one may reply to, react to, edit (text only) or delete.
TARGET_KINDS = frozenset({"text", "file"})
#: The ``meta`` of a deleted item, as stored once its content is wiped.
DELETED_META: dict[str, Any] = {"deleted": True}
#: The longest reaction, in characters (an emoji sequence, or a short word).
MAX_EMOJI = 32
#: The most edits and reactions (adding or taking one back) one user makes to one
#: item, all told: a history page reads every edit and reaction of the items it shows,
#: so this bounds what one user's flood costs each reader of the conversation.
MAX_CHANGES = 100
#: The longest ``msg_id`` a request or a peer may name (ids the realm makes are 35
#: characters; an alternate id 57).
MAX_MSG_ID = 128


def check_msg_id(value: Any, field: str = "msg_id") -> str:
    """A ``msg_id`` named by a client or a peer: a string of 1 to 128 characters
    with no control character (``bad_request`` otherwise)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MSG_ID:
        raise ChatError("bad_request", f"{field} must be a string of 1-{MAX_MSG_ID} characters")
    if label_problem(value) is not None or " " in value:
        raise ChatError("bad_request", f"{field} is not a message id")
    return value


#: Categories of characters that show nothing on their own: format characters
#: (joiners, tags), combining and enclosing marks (variation selectors, keycaps),
#: spaces and separators, controls, unassigned code points.
_UNSEEN = frozenset({"Cf", "Mn", "Me", "Zs", "Zl", "Zp", "Cc", "Cn"})
#: Letters and symbols that show as blank space.
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _shows(char: str) -> bool:
    return char not in _BLANK and unicodedata.category(char) not in _UNSEEN


def check_emoji(value: Any) -> str:
    """A reaction: 1 to :data:`MAX_EMOJI` characters, one line of plain text (a
    label, see chatproto.text) without spaces, with a character that shows (not only
    joiners, selectors, tags or fillers) (``bad_request`` otherwise)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_EMOJI:
        raise ChatError("bad_request", f"emoji must be a string of 1-{MAX_EMOJI} characters")
    problem = label_problem(value)
    if problem is not None:
        raise ChatError("bad_request", f"the emoji contains a {problem}")
    if any(c.isspace() for c in value):
        raise ChatError("bad_request", "the emoji contains a space")
    if not any(_shows(c) for c in value):
        raise ChatError("bad_request", "the emoji has no character that shows")
    return value


def ref_meta(kind: str, ref: str, emoji: str | None = None, remove: bool = False) -> dict[str, Any]:
    """The ``meta`` of a new item of ``kind`` (one of :data:`REF_KINDS`)."""
    if kind == "reaction":
        meta: dict[str, Any] = {"ref": ref, "emoji": emoji}
        if remove:
            meta["remove"] = True
        return meta
    return {"ref": ref}


def remote_meta(kind: str, meta: Any, body: str) -> dict[str, Any]:
    """The ``meta`` of an ``edit``, ``delete`` or ``reaction`` item from another
    realm, checked (``bad_request`` otherwise): exactly what :func:`ref_meta` makes,
    with an empty ``body`` but for an edit."""
    if not isinstance(meta, dict):
        raise ChatError("bad_request", f"a {kind} item has a meta object")
    allowed = {"ref", "emoji", "remove"} if kind == "reaction" else {"ref"}
    if not set(meta) <= allowed or "ref" not in meta:
        raise ChatError("bad_request", f"a {kind} item's meta has {sorted(allowed)}")
    ref = check_msg_id(meta["ref"], "meta.ref")
    if kind == "reaction":
        if "remove" in meta and meta["remove"] is not True:
            raise ChatError("bad_request", "meta.remove is true when present")
        out = ref_meta(kind, ref, check_emoji(meta.get("emoji")), "remove" in meta)
    else:
        out = ref_meta(kind, ref)
    if kind != "edit" and body:
        raise ChatError("bad_request", f"a {kind} item has an empty body")
    return out


def ref_of(env: Envelope) -> str | None:
    """The ``msg_id`` an item refers to (an edit, delete or reaction), or None."""
    if env.kind in REF_KINDS and env.meta is not None:
        ref = env.meta.get("ref")
        if isinstance(ref, str):
            return ref
    return None


def current_view(
    items: Sequence[Envelope], refs: Iterable[Envelope], reactions: bool = True
) -> list[Envelope]:
    """``items`` as they read now, given the items that refer to them (``refs``,
    oldest first): an edited item with its latest edit's text and ``meta.edited``
    (that edit's ``ts``); a deleted one as deleted; with ``reactions``, each item's
    reactions in ``meta.reactions`` (``{emoji: [user, ...]}``, users in the order
    they reacted; an item nobody reacted to has none).

    Only an edit by the item's own sender counts, and only a reaction's latest word
    per user and emoji.  Items that changed are copies; the others are returned as
    they are (a store may share them)."""
    state: dict[str, tuple[Envelope | None, bool, dict[str, dict[str, None]]]] = {}
    targets = {e.id: e for e in items if e.kind in TARGET_KINDS}
    if not targets:
        return list(items)
    for r in refs:
        ref = ref_of(r)
        target = targets.get(ref) if ref is not None else None
        if target is None or ref is None:
            continue
        edit, deleted, reacts = state.get(ref, (None, False, {}))
        if r.kind == "edit":
            if r.sender == target.sender and target.kind == "text":
                edit = r
        elif r.kind == "delete":
            deleted = True
        elif reactions:
            emoji = r.meta.get("emoji") if r.meta is not None else None
            if isinstance(emoji, str):
                users = reacts.setdefault(emoji, {})
                if r.meta is not None and r.meta.get("remove") is True:
                    users.pop(r.sender, None)
                else:
                    users[r.sender] = None
        state[ref] = (edit, deleted, reacts)
    out = []
    for e in items:
        s = state.get(e.id)
        if s is None or (e.meta is not None and e.meta.get("deleted") is True):
            out.append(e)
            continue
        edit, deleted, reacts = s
        if deleted:
            out.append(attrs.evolve(e, body="", meta=dict(DELETED_META), frame=None))
            continue
        meta = dict(e.meta) if e.meta is not None else {}
        body = e.body
        if edit is not None:
            body = edit.body
            meta["edited"] = edit.ts
        shown = {emoji: list(users) for emoji, users in reacts.items() if users}
        if shown:
            meta["reactions"] = shown
        if not meta and e.meta is None:
            out.append(e)
            continue
        out.append(attrs.evolve(e, body=body, meta=meta, frame=None))
    return out
