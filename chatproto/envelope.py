"""The one message envelope for everything that enters a stream.

Private messages (and later group messages, file messages, membership events and
messages from other realms) are all an :class:`Envelope`; only the transport differs.
Every stored envelope has a realm-wide, strictly increasing stream position ``pos``
assigned when it is committed, and a realm-unique ``id`` usable for de-duplication.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import attrs


def new_message_id() -> str:
    """A fresh, realm-unique (and, with 128 random bits, globally unique) message id."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")


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
