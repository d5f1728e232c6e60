"""How the PostgreSQL store's rows hold an item, a request and text.

Part of :mod:`chatproto.store.postgresql`: the conversions every part of it shares
(the append path writes rows with them, the reads make Envelopes of them).

Text PostgreSQL cannot hold (U+0000, which JSON allows in a message body, an item id
or a device name) is stored escaped: see :func:`escape_text`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from chatproto.envelope import MAX_SHOWN_TS, Envelope, shown_ts
from chatproto.store import (
    stored_meta,
    stored_sig,
)

__all__ = [
    "INDEXED_KINDS",
    "ITEM_COLS",
    "escape_text",
    "item_of_row",
    "row_of_item",
    "unescape_text",
]

#: The kinds an append looks at twice: a file is recorded, a delete wipes its target,
#: an edit of a deleted item (checked before the delete was committed) loses its text.
INDEXED_KINDS = frozenset({"file", "delete", "edit", "reaction"})

ITEM_COLS = "pos, id, kind, sender, recipient, ts, body, meta, sig"

#: Marks a stored string that was escaped (see :func:`escape_text`).
_ESCAPED = "\x01"


def escape_text(text: str) -> str:
    """``text`` as PostgreSQL can store it, reversibly (:func:`unescape_text`).

    PostgreSQL's text cannot hold U+0000, which a client may legitimately send (a JSON
    string allows it).  A string containing one -- or starting with the marker U+0001
    -- is stored as the marker followed by its JSON form (ASCII, no U+0000); every
    other string as it is.  So the mapping is one-to-one, and costs one scan of the
    string on the way in and one character test on the way out.
    """
    if "\x00" in text or text[:1] == _ESCAPED:
        return _ESCAPED + json.dumps(text)
    return text


def unescape_text(text: str) -> str:
    if text[:1] == _ESCAPED:
        value: str = json.loads(text[1:])
        return value
    return text


def item_of_row(r: Sequence[Any]) -> Envelope:
    """An item from its row; ``ts`` and ``meta`` made safe to send (see
    :func:`chatproto.store.stored_meta`), whatever the row holds."""
    pos, id_, kind, sender, recipient, ts, body, meta, sig = r
    return Envelope(
        id=unescape_text(id_),
        kind=kind,
        sender=sender,
        recipient=recipient,
        ts=ts if type(ts) is float and 0.0 <= ts <= MAX_SHOWN_TS else shown_ts(ts),
        body=unescape_text(body),
        meta=stored_meta(meta) if meta is not None else None,
        pos=pos,
        sig=stored_sig(sig),
    )


def row_of_item(e: Envelope, pos: int) -> tuple[Any, ...]:
    return (
        pos,
        escape_text(e.id),
        e.kind,
        e.sender,
        e.recipient,
        e.conversation,
        e.ts,
        escape_text(e.body),
        json.dumps(e.meta) if e.meta is not None else None,
        json.dumps(e.sig) if e.sig is not None else None,
    )
