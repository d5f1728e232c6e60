"""The one message envelope for everything that enters a stream.

Private messages (and later group messages, file messages, membership events and
messages from other realms) are all an :class:`Envelope`; only the transport differs.
Every stored envelope has a realm-wide, strictly increasing stream position ``pos``
assigned when it is committed, and a realm-unique ``id`` usable for de-duplication.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from typing import Any

import attrs

from chatproto.errors import ChatError
from chatproto.wire import MAX_INT

__all__ = [
    "MAX_SHOWN_TS",
    "MAX_TS_AHEAD",
    "MIN_TS",
    "Envelope",
    "alternate_id",
    "alternate_range",
    "conversation_key",
    "new_message_id",
    "new_message_ids",
    "new_text",
    "remote_ts",
    "shown_ts",
]

#: The window of an item's ``ts`` from another realm, against this realm's clock:
#: from 2000-01-01T00:00:00Z to 10 minutes ahead.  A number outside it (a peer's
#: clock that is wrong) is replaced by the clock: the item is kept, and shown with a
#: plausible time.
MIN_TS = 946_684_800.0
MAX_TS_AHEAD = 600.0
#: The latest ``ts`` an item is shown with: 9999-12-31T23:59:59Z, the last second
#: every date library handles (see :func:`shown_ts`).
MAX_SHOWN_TS = 253_402_300_799.0

# 96 random bits per id, from the OS, drawn in blocks (one system call per 4096 ids):
# unique across processes, restarts and realms with overwhelming probability, and --
# unlike a random prefix plus a counter -- unpredictable, so a peer realm that has seen
# some of our ids cannot take the next ones first (see alternate_id).  They follow the
# time in milliseconds (11 hex digits), so ids sort by time and the stores' unique id
# index grows at one end: with random ids alone every insert dirtied (and, once the
# index outgrew SQLite's cache, read) a page of its own -- about half of the SQLite
# writer's CPU per message on both realms of a federation (bench/README.md).
_ID_BYTES = 12
_BLOCK = _ID_BYTES * 4096
_pool = b""
_offset = 0
_lock = threading.Lock()


def _reseed() -> None:
    global _pool, _offset
    _pool, _offset = b"", 0


os.register_at_fork(after_in_child=_reseed)  # forked workers must not share the pool


def _random(n: int) -> bytes:
    """The random bytes of ``n`` ids, from the pool (refilled as needed)."""
    global _pool, _offset
    size = n * _ID_BYTES
    with _lock:
        offset = _offset
        if offset + size > len(_pool):
            _pool, offset = os.urandom(max(_BLOCK, size)), 0
        _offset = offset + size
        return _pool[offset : offset + size]


def new_message_id() -> str:
    """A fresh, globally unique, unpredictable message id (usable for de-duplication
    across realms): the time in milliseconds (11 hex digits), then 96 random bits (24
    hex digits)."""
    return f"{time.time_ns() // 1_000_000:011x}{_random(1).hex()}"


def new_message_ids(n: int) -> list[str]:
    """``n`` ids as :func:`new_message_id` makes them, for a batch of items made at
    once (one lock, one clock reading and one hex conversion for all)."""
    if n <= 0:
        return []
    stamp = f"{time.time_ns() // 1_000_000:011x}"
    # each id's random part as hex, a space between two, the stamp put before each:
    # loops in C (hex, replace, split), not a Python one per id
    return (stamp + _random(n).hex(" ", _ID_BYTES).replace(" ", " " + stamp)).split(" ")


def alternate_id(env: Envelope, key: bytes) -> str:
    """The id an item from another realm is stored under when its own id is taken by
    an item of another conversation (a peer that saw the id and sent it first).

    Keyed with a secret of the receiving store (``key``), so a peer cannot take this
    one too; deterministic, so the same item sent again is recognised."""
    digest = hashlib.blake2b(
        f"{env.id} {env.sender} {env.recipient}".encode("utf-8", "surrogatepass"),
        key=key,
        digest_size=_ALT_DIGEST,
    ).hexdigest()
    return _alternate_stem(env.id) + digest


#: Bytes of an alternate id's digest (twice as many hex digits).
_ALT_DIGEST = 8


def _alternate_stem(item_id: str) -> str:
    return f"{item_id[:40]}~"


def alternate_range(item_id: str) -> tuple[str, str]:
    """The lowest and the highest id :func:`alternate_id` can give an item sent as
    ``item_id`` (whatever its conversation and key): a store looks for its
    alternates between the two."""
    stem = _alternate_stem(item_id)
    return stem + "0" * (2 * _ALT_DIGEST), stem + "f" * (2 * _ALT_DIGEST)


def remote_ts(value: Any, now: float) -> float:
    """The ``ts`` of an item from another realm, given this realm's clock ``now``.

    A JSON number (not a boolean), finite (an integer: within ±(2**53 - 1)), else
    :class:`chatproto.errors.ChatError` ``bad_request`` (the item is refused, the rest
    of its transaction is not).  One before :data:`MIN_TS` or more than
    :data:`MAX_TS_AHEAD` seconds after ``now`` reads as ``now``.  Never raises
    anything else, for any value a JSON decoder makes (a 400-digit integer, ``1e400``
    decoded as infinity, NaN)."""
    kind = type(value)
    if kind is not float and kind is not int:
        raise ChatError("bad_request", "item ts must be a number (seconds since 1970)")
    if kind is float and not math.isfinite(value):
        raise ChatError("bad_request", "item ts must be a finite number")
    if kind is int and not -MAX_INT <= value <= MAX_INT:
        raise ChatError("bad_request", "item ts: an integer beyond 2**53 - 1")
    if not MIN_TS <= value <= now + MAX_TS_AHEAD:
        return float(now)
    return float(value)


def shown_ts(value: Any) -> float:
    """A stored ``ts`` as it may be shown: a float between 0 and :data:`MAX_SHOWN_TS`;
    anything else (infinite, NaN, NULL, text: a row stored before the checks of
    :func:`remote_ts`, or written by hand) reads as 0.0, so no stored value can make
    a backlog, a history page or a date formatter fail."""
    if type(value) is float and 0.0 <= value <= MAX_SHOWN_TS:
        return value
    if type(value) is int and 0 <= value <= MAX_SHOWN_TS:
        return float(value)
    return 0.0


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
    #: The end of a ``send`` result for this item (``"pos":..,"msg_id":..,"ts":..}``),
    #: cached with ``frame`` (see chatproto.protocol.send_result).
    result_tail: str | None = attrs.field(default=None, repr=False, eq=False)
    #: The signature of the realm of ``sender`` (``{"key", "ed25519"}``), carried by
    #: an item another realm relays (see chatproto/signing.py); never sent to clients.
    sig: dict[str, str] | None = attrs.field(default=None, repr=False)

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
        meta = self.meta
        if meta is not None:
            # A group snapshot from a home realm is for the realm's mirror, not for
            # clients (it can hold thousands of members).
            d["meta"] = meta if "snapshot" not in meta else _without_snapshot(meta)
        return d

    def to_item(self) -> dict[str, Any]:
        """The item as a federation transaction carries it (no position: positions are
        per realm)."""
        d: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "from": self.sender,
            "to": self.recipient,
            "ts": self.ts,
            "body": self.body,
        }
        if self.meta is not None:
            d["meta"] = self.meta
        if self.sig is not None:
            d["sig"] = self.sig
        return d


_new = object.__new__


def new_text(
    msg_id: str, sender: str, recipient: str, ts: float, body: str, meta: dict[str, Any] | None
) -> Envelope:
    """``Envelope(msg_id, "text", sender, recipient, ts, body, meta)``, for the send
    path (Messaging.send_batch: one per message), made without the class call: the
    generated ``__init__`` is a Python function that the class call runs from C, not
    inline as a function called here is (~40% of what making an item cost).  Every
    field is set as ``__init__`` sets it (a test holds the two alike, field by field:
    a field added to Envelope is added here)."""
    env: Envelope = _new(Envelope)
    env.id = msg_id
    env.kind = "text"
    env.sender = sender
    env.recipient = recipient
    env.ts = ts
    env.body = body
    env.meta = meta
    env.pos = 0
    env.frame = None
    env.result_tail = None
    env.sig = None
    return env


def _without_snapshot(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "snapshot"}
