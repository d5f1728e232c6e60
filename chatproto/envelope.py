"""The one message envelope for everything that enters a stream.

Private messages (and later group messages, file messages, membership events and
messages from other realms) are all an :class:`Envelope`; only the transport differs.
Every stored envelope has a realm-wide, strictly increasing stream position ``pos``
assigned when it is committed, and a realm-unique ``id`` usable for de-duplication.
"""

from __future__ import annotations

import base64
import itertools
import os
from typing import Any

import attrs

__all__ = [
    "Envelope",
    "conversation_key",
    "new_message_id",
]

# 96 random bits per process, then a counter: unique across restarts and realms with
# overwhelming probability, and far cheaper than asking the OS for randomness per id.
_PREFIX = ""
_COUNTER = itertools.count(1)


def _reseed() -> None:
    global _PREFIX, _COUNTER
    _PREFIX = base64.urlsafe_b64encode(os.urandom(12)).decode("ascii")
    _COUNTER = itertools.count(1)


_reseed()
os.register_at_fork(after_in_child=_reseed)  # forked workers must not share a prefix


def new_message_id() -> str:
    """A fresh, globally unique message id (usable for de-duplication across realms)."""
    return f"{_PREFIX}{next(_COUNTER):x}"


def conversation_key(a: str, b: str) -> str:
    """The key of the private conversation between two canonical user addresses."""
    return f"{a} {b}" if a <= b else f"{b} {a}"


@attrs.define(slots=True, eq=False)
class Envelope:
    """One stored stream item.

    ``pos`` is 0 until the store commits the item.  ``meta`` carries kind-specific data
    (file metadata, event details) and is ``None`` for plain text.
    """

    id: str
    kind: str
    sender: str
    recipient: str
    ts: float
    body: str
    meta: dict[str, Any] | None = None
    pos: int = 0
    #: The encoded delivery frame, cached so fan-out encodes once per item.
    frame: bytes | None = attrs.field(default=None, repr=False)

    @property
    def conversation(self) -> str:
        if self.recipient.startswith("#"):
            return self.recipient
        return conversation_key(self.sender, self.recipient)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pos": self.pos,
            "msg_id": self.id,
            "kind": self.kind,
            "from": self.sender,
            "to": self.recipient,
            "ts": self.ts,
            "body": self.body,
        }
        if self.meta is not None:
            d["meta"] = self.meta
        return d
