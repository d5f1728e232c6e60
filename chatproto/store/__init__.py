"""Storage behind one interface, shaped around the realm's operations (not its tables).

:class:`IStore` is what the realm service calls; every method returns a Deferred and
never blocks the reactor.  :class:`chatproto.store.sqlite.SQLiteStore` is the embedded
default; other backends (PostgreSQL for scale-out) implement the same interface.

Contract shared by every backend:

- :meth:`IStore.append` commits a batch durably and assigns each item a realm-wide
  stream position, strictly greater than every position committed before; the Deferred
  fires only after the commit.  Concurrent calls are batched into one transaction
  (group commit), so durability does not cost one fsync per message.
- positions are never reused, even after deletions.
- an account is its name and its *floor*, the position at which it was created: it
  sees only items after it.  Deleting an account consumes a position, so an account
  created later under the same name has a greater floor than every position its
  predecessor existed at, and nothing of the predecessor's (read "after the floor")
  is ever its.
- an appended item of kind ``file`` (``meta`` holding ``file_id``, ``sha256``, ``size``,
  ``name``, ``media_type``) also records its file, in the same transaction: the
  message and the file's metadata exist together or not at all.
- items that refer to another item (chatproto/relations.py): an appended ``delete``
  item wipes the item its ``meta.ref`` names, if that is a ``text`` or ``file`` item
  of the same conversation -- body, meta (now ``{"deleted": true}``), signature, the
  bodies of its ``edit`` items and its file record -- in the same transaction, and
  the backend leaves no copy of the old text in its files where it can help it
  (SQLite: ``secure_delete`` and a WAL truncation).  :meth:`IStore.history` pages
  leave out ``edit``, ``delete`` and ``reaction`` items and show the rest through
  :func:`chatproto.relations.current_view` (latest edit, reactions);
  :meth:`IStore.read_feed` keeps every item and shows edited ones with their latest
  text.  :meth:`IStore.stored_item` reads an item as stored (no view).
- an item read back can always be sent: its ``ts`` goes through
  :func:`chatproto.envelope.shown_ts` and a ``meta`` stored as JSON text through
  :func:`stored_meta`, so a row stored before today's checks (or edited by hand)
  never makes a backlog or a history page fail.
- an item's ``sig`` (a signature of its author's realm, chatproto/signing.py) is
  stored with it and read back with it, so a relay forwards it unchanged.
- acks are kept for at most :attr:`IStore.max_devices` devices per user: the
  transaction that stores the ack of a device new to the store forgets the devices
  of that user with the lowest acks beyond the bound (see :meth:`IStore.set_ack`), so
  what a user can make the store keep does not grow with the device names it makes
  up.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from chatproto.errors import ChatError

__all__ = [
    "MAX_DEVICES",
    "REPORT_FIELDS",
    "IStore",
    "NoSuchAccount",
    "UserExists",
    "Waiter",
    "file_record",
    "report_row",
    "stored_meta",
    "stored_number",
    "stored_sig",
]


class Waiter(Protocol):
    """What waits for an append's commit (:meth:`IStore.append_to`): a Deferred is
    one; so is :class:`chatproto.realm.messaging.SendRun`, which hands the outcome
    on without a callback chain."""

    def callback(self, result: Any) -> Any: ...
    def errback(self, fail: Failure | None = None) -> Any: ...


#: The default of :attr:`IStore.max_devices` (``[limits] max_devices_per_user``).
MAX_DEVICES = 64

# NaN and the infinities (which json.dumps writes by default) read as null: the wire
# encoder refuses them.
_meta_decoder = json.JSONDecoder(parse_constant=lambda _name: None)


def stored_meta(text: str | None) -> dict[str, Any] | None:
    """The ``meta`` of a stored item from its JSON text, always encodable again:
    ``NaN``/``Infinity`` read as ``null``, and text that is not a JSON object (a
    damaged row) as no meta at all."""
    if text is None:
        return None
    try:
        meta = _meta_decoder.decode(text)
    except (ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def stored_number(value: Any) -> float | None:
    """A timestamp read from the database, or None for anything but a finite number
    (a damaged row must not make a read fail)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stored_sig(text: str | None) -> dict[str, str] | None:
    """The ``sig`` of a stored item from its JSON text, or None (none, or a damaged
    row: the item then goes on unsigned, as one that needs no signature)."""
    if text is None:
        return None
    try:
        sig = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(sig, dict) or not all(isinstance(v, str) for v in sig.values()):
        return None
    return sig


class NoSuchAccount(ChatError):
    """A deletion's account is not there (``IStore.delete_user``): the deletion's batch
    fails alone in its group commit (nothing of it is committed) and ``delete_user``
    answers False."""

    def __init__(self, name: str) -> None:
        super().__init__("no_such_user", f"no account {name!r}")


class UserExists(ChatError):
    def __init__(self, name: str) -> None:
        super().__init__("user_exists", f"user {name!r} already exists")


class IStore(Interface):
    max_devices = Attribute(
        """The most devices per user whose acks are kept (:meth:`set_ack`); at least
        1.  The realm sets it from ``[limits] max_devices_per_user``; a store made
        without a realm keeps :data:`MAX_DEVICES`."""
    )

    def open():  # type: ignore[misc]
        """Open (creating or migrating the schema).  Returns a Deferred."""

    def close():  # type: ignore[misc]
        """Flush pending writes and close.  Returns a Deferred."""

    def create_user(name, pwhash, ts):  # type: ignore[misc]
        """Create an account; errback with :class:`UserExists` if taken."""

    def password_hash(name):  # type: ignore[misc]
        """The stored hash for ``name``, or ``None``."""

    def set_password(name, pwhash):  # type: ignore[misc]
        """Replace a hash; fires with True if the user exists."""

    def delete_user(name, address, items=(), outbox=()):  # type: ignore[misc]
        """Delete account ``name`` (``address`` is its canonical address), its read
        markers (acks), its unfinished uploads and its pending group requests (see
        :meth:`pending_requests`), and commit ``items`` with
        ``outbox`` (as :meth:`append`: the events ending its group standing, see
        :mod:`chatproto.accounts`) -- all in one transaction, and one position is
        consumed (see the floor, above).  Fires with True if the account existed;
        if it did not, nothing is committed (``items`` get no position).

        Ordered with :meth:`append` calls (group commit), like one of them."""

    def user_floor(name):  # type: ignore[misc]
        """The stream position at which account ``name`` was created (it sees only
        later items), or ``None`` if there is no such account."""

    def user_floors():  # type: ignore[misc]
        """Fires with ``{name: floor}`` for every account (see :meth:`user_floor`)."""

    def suspend_user(name, reason, ts):  # type: ignore[misc]
        """Suspend account ``name`` (it may not log in; see chatproto.realm.admin),
        recording ``reason`` and ``ts``; replaces an earlier suspension.  Fires with
        False if there is no such account.  A suspension belongs to the account, not
        the name: an account created later under the same name is not suspended."""

    def unsuspend_user(name):  # type: ignore[misc]
        """Lift the suspension of account ``name``; fires with whether it had one."""

    def suspensions():  # type: ignore[misc]
        """Fires with ``{name: (reason, ts)}`` for every suspended account."""

    # browser logins (chatproto.tokens), realm admins and abuse reports -----------------

    def put_session_token(digest, name, floor, device, created, last_used):  # type: ignore[misc]
        """Record (insert or replace) a browser login: the SHA-256 ``digest`` of its
        token (never the token), the account (``name`` created at ``floor``), its
        ``device``, when it was issued and last used."""

    def touch_session_token(digest, last_used):  # type: ignore[misc]
        """Move a login's ``last_used`` forward (never back); nothing if it is gone."""

    def delete_session_tokens(digests):  # type: ignore[misc]
        """Forget these logins; fires with how many there were."""

    def delete_user_session_tokens(name):  # type: ignore[misc]
        """Forget every login of account name ``name``; fires with how many."""

    def session_tokens(name=None):  # type: ignore[misc]
        """Fires with every login of an existing account (its floor matching) -- of
        account name ``name`` only, if given -- as ``(digest, name, floor, device,
        created, last_used)``, least recently used first."""

    def session_token(digest):  # type: ignore[misc]
        """Fires with the login whose token's SHA-256 is ``digest``, as a row of
        :meth:`session_tokens`, or None (no such login, or its account is gone).  A
        worker of a cluster asks it of a token another worker issued that it has not
        heard of yet (:meth:`chatproto.tokens.Tokens.find`)."""

    def expire_session_tokens(before):  # type: ignore[misc]
        """Forget the logins last used before ``before``, and those of accounts that
        are gone; fires with how many."""

    def grant_admin(name, ts):  # type: ignore[misc]
        """Make account ``name`` a realm administrator; False if there is no such
        account.  Like a suspension it belongs to the account, not the name."""

    def revoke_admin(name):  # type: ignore[misc]
        """Take the role away; fires with whether the account had it."""

    def admins():  # type: ignore[misc]
        """Fires with ``{name: ts granted}`` for every administrator."""

    def add_report(report):  # type: ignore[misc]
        """Store an abuse report (a dict with the keys of :data:`REPORT_FIELDS` but
        ``id``); fires with its id (ids only grow)."""

    def reports(before, limit):  # type: ignore[misc]
        """The ``limit`` newest reports with ``id < before`` (None: the newest),
        newest first, as dicts with the keys of :data:`REPORT_FIELDS`."""

    def user_exists(name):  # type: ignore[misc]
        """Fires with a bool."""

    def list_users():  # type: ignore[misc]
        """Fires with the sorted list of local user names."""

    def append(items, outbox=()):  # type: ignore[misc]
        """Commit a list of :class:`chatproto.envelope.Envelope` and assign ``pos``.

        ``outbox`` lists ``(realm, envelope)`` pairs (envelopes of ``items``) to queue
        for delivery to other realms, committed in the same transaction as the items,
        so an item is never stored without its federation delivery or the reverse.
        A pair may instead hold a dict: a wire item queued as it is (the copy of an
        item one realm gets with more in it, such as a group snapshot), read back by
        :meth:`outbox_read` like a request.
        Fires with the same envelopes, ``pos`` set, after the commit.
        """

    def append_to(waiter, items, outbox=()):  # type: ignore[misc]
        """:meth:`append`, its outcome handed to ``waiter`` (a :class:`Waiter`: its
        ``callback`` with the envelopes, or its ``errback`` with the failure) instead
        of a new Deferred: the send path's runs (one per send batch) cost no Deferred
        and no callback chain.  A store may call the waiter before returning."""

    def append_remote(items, outbox=()):  # type: ignore[misc]
        """Commit items received from another realm, skipping any whose ``id`` is
        already stored with the same sender and recipient (a transaction retried by
        the peer): de-duplication by id.  An item whose id is taken by an item of
        another conversation (a peer saw the id and sent it first) is stored under
        :func:`chatproto.envelope.alternate_id` instead, keyed with a secret of the
        store (``env.id`` is updated), and de-duplicated the same way.

        Group-committed with :meth:`append` and in call order.  Fires, after the commit,
        with the envelopes newly stored (``pos`` set), oldest first.
        """

    def outbox_read(realm, after, limit):  # type: ignore[misc]
        """Queued entries for ``realm`` with outbox sequence ``> after``, oldest first:
        a list of ``(seq, envelope)``, or ``(seq, dict)`` for a request queued with
        :meth:`outbox_enqueue`.  Sequences are never reused (across restarts)."""

    def outbox_enqueue(realm, payloads):  # type: ignore[misc]
        """Durably queue requests (JSON objects, not stored items) for ``realm``.

        A payload of ``kind`` ``request`` (a local user's change to another realm's
        group) is also remembered, in the same transaction, until
        :meth:`request_done`: see :meth:`pending_requests`."""

    def pending_requests(actor, group):  # type: ignore[misc]
        """The group requests queued with :meth:`outbox_enqueue` with ``from``
        ``actor`` and ``to`` ``group`` and not yet done (answered, refused or
        expired), oldest first: the payloads as queued.  Whether the outbox row is
        still there (not yet acknowledged) does not matter."""

    def request_done(request_id):  # type: ignore[misc]
        """Forget a remembered request (its answer came, or it was refused)."""

    def expire_requests(before):  # type: ignore[misc]
        """Forget the remembered requests with ``ts < before``; fires with how many."""

    def stored_item(item_id):  # type: ignore[misc]
        """The stored item with this ``id`` (an Envelope, ``pos`` set), or ``None``."""

    def stored_item_in(item_id, conversation):  # type: ignore[misc]
        """The item another realm names ``item_id`` in ``conversation`` (an
        Envelope's ``conversation``), as stored here: the item with that id if it is
        of that conversation, else one of it stored under the
        :func:`chatproto.envelope.alternate_id` of ``item_id`` (its id was taken by
        an item of another conversation, see :meth:`append_remote`); or ``None``.
        How a peer's reaction, edit, delete or reply finds what it refers to."""

    def ref_count(ref, sender):  # type: ignore[misc]
        """How many ``edit`` and ``reaction`` items from ``sender`` that refer to the
        item ``ref`` are stored (see :data:`chatproto.relations.MAX_CHANGES`)."""

    def peer_keys():  # type: ignore[misc]
        """``{realm: keys}``: the signing keys each peer realm last announced, as
        given to :meth:`set_peer_keys` (see chatproto/signing.py)."""

    def set_peer_keys(realm, keys):  # type: ignore[misc]
        """Remember ``keys`` (a JSON-able list) as the keys ``realm`` announces,
        replacing what was remembered."""

    def outbox_ack(realm, seq):  # type: ignore[misc]
        """Drop the items queued for ``realm`` up to ``seq`` (the peer stored them);
        fires once they are deleted.  A backend may delete them with its next group
        commit instead of in a commit of their own: a crash first means they are sent
        again, and the peer drops them by id."""

    def outbox_counts():  # type: ignore[misc]
        """``{realm: number of queued items}`` for every realm with a non-empty queue."""

    def outbox_stats():  # type: ignore[misc]
        """``{realm: (queued items, timestamp of the oldest)}`` for every realm with a
        non-empty queue (for the metrics).  The timestamp is the oldest row's item's
        ``ts`` (a request's ``ts``), or None when it has none."""

    def outbox_holds(realm, pos):  # type: ignore[misc]
        """Whether the stored item at ``pos`` is queued for ``realm`` (sent or to be
        sent, not yet acknowledged): fires with a bool.  A peer fetches a file's bytes
        only while its item is queued for it (see ``FileService.serve_remote``)."""

    def read_feed(user, after, limit, groups=()):  # type: ignore[misc]
        """Items for ``user`` (canonical address) with ``pos > after``, oldest first.

        Private items to or from the user, plus the items of each ``(group, lo, hi)``
        in ``groups`` with ``lo < pos <= hi`` (``hi`` None: no upper bound).
        """

    def read_events(after, limit):  # type: ignore[misc]
        """Items of kind ``event`` (group changes) after ``after``, oldest first."""

    def conversation_partners(user, after=0):  # type: ignore[misc]
        """Users with whom ``user`` has a private conversation with an item at a
        position ``> after`` (the account's floor): for presence."""

    def history(conversation, before, after, limit, floor=0):  # type: ignore[misc]
        """A page of one conversation, oldest first, of items with ``pos > floor``.

        With ``after`` the ``limit`` oldest items after it; otherwise the ``limit``
        newest items before ``before`` (or the newest overall).
        """

    def set_ack(user, device, pos):  # type: ignore[misc]
        """Record that ``device`` of ``user`` processed everything up to ``pos``.

        Monotonic (a lower ``pos`` is ignored).  Acks may be written lazily with the
        next batch: losing one only means a client sees an item again and drops it by
        its position.

        Bounded: the transaction that stores the ack of a device that has none
        stored leaves the acks of at most :attr:`max_devices` devices of the user --
        those with the highest acks, and among equal acks those whose names come
        first in code point order; the others are forgotten (the device just
        acknowledged too, if it is among the lowest).  The user's highest ack is
        never forgotten, so a forgotten device resumes where :meth:`get_ack` says a
        device never seen does: after the user's highest ack.  (The SQL stores also
        trim a user's rows kept past the bound before -- a lower bound, an older
        version -- at its first ack after they open, and with several writers
        (PostgreSQL), new devices of one user committed at the same moment may leave
        a few more until the user's next new device: chatproto/store/acks.py.)
        """

    def get_ack(user, device):  # type: ignore[misc]
        """The device's ack; for a device never seen, the user's highest ack; else 0."""

    def max_pos():  # type: ignore[misc]
        """The highest committed position (0 when empty)."""

    # read markers, the conversation list, preferences (chatproto/store/reading.py) -----

    def set_read(user, conv, pos):  # type: ignore[misc]
        """Move ``user``'s read marker in conversation ``conv`` (a conversation key,
        see :func:`chatproto.envelope.conversation_key`, or a group address) forward to
        ``pos``; a lower ``pos`` is ignored.  Written lazily with the next batch, like
        :meth:`set_ack`; reads see it at once."""

    def read_markers(conv):  # type: ignore[misc]
        """``{user: position}``: every read marker in conversation ``conv``."""

    def read_position(conv, before_ts, floor):  # type: ignore[misc]
        """The position of the newest item of conversation ``conv`` after ``floor``
        whose ``ts`` is less than ``before_ts``, items about items (reactions, edits,
        deletes) aside; 0 when none.  (IRC names a read marker by a time.)"""

    def conversations(user, floor, groups, name, limit):  # type: ignore[misc]
        """The conversations of ``user``, most recent first, at most ``limit``: its
        private conversations with an item after ``floor``, and each group of
        ``groups`` (``(group, lo)``) with an item after ``lo``.  Each a dict (see
        :func:`chatproto.store.reading.conversation_summary`): ``conv``, ``last`` (the
        last item), ``read`` (the user's marker), ``unread`` (items of kind text or
        file after the marker and the bound, from others), ``mentions`` (of those, the
        text items of a group that mention ``name``: :mod:`chatproto.mentions`) and
        ``markers`` (``{user: position}`` in the conversation)."""

    def search(words, scopes, before, limit):  # type: ignore[misc]
        """Items of kind text or file whose body has, for each of ``words`` (lower-case
        letters and digits, see :func:`chatproto.store.reading.search_words`), a word
        beginning with it; newest first, at most ``limit``, with ``pos < before``
        (None: no bound), within ``scopes``: ``("user", address, floor)`` -- the
        private items to or from that user after ``floor`` -- or ``("conv", key,
        lo)`` -- one conversation's items after ``lo``.  The SQL stores ask a
        full-text index kept in the transaction that writes the item (SQLite FTS5,
        PostgreSQL's GIN over ``to_tsvector('simple', body)``)."""

    def prefs(key):  # type: ignore[misc]
        """``{user: value}`` for every user who set preference ``key``."""

    def set_pref(user, key, value):  # type: ignore[misc]
        """Set preference ``key`` of ``user`` to the string ``value`` (None clears it);
        fires once durable.  Deleted with the account, as are its read markers."""

    # files (see chatproto/files.py) --------------------------------------------------

    def file_info(file_id):  # type: ignore[misc]
        """The file recorded by a ``file`` item, or ``None``: a dict with ``file_id``,
        ``sha256``, ``size``, ``name``, ``media_type``, ``sender``, ``recipient``,
        ``ts`` and ``pos`` (the position of its message)."""

    def file_usage(sender, after=0):  # type: ignore[misc]
        """Total ``size`` of the recorded files sent by ``sender`` whose messages are at
        positions ``> after`` (the account's floor): for quotas."""

    def expire_files(before):  # type: ignore[misc]
        """Forget every file recorded with ``ts < before`` (their messages stay); fires
        with the sorted sha256 digests no remaining file refers to (whose bytes may go)."""

    def blob_referenced(sha256):  # type: ignore[misc]
        """Fires with True when some recorded file has this content."""

    def put_upload(record):  # type: ignore[misc]
        """Record (insert or replace) an unfinished upload: a JSON-able dict with at
        least ``upload_id`` and ``user``."""

    def delete_upload(upload_id):  # type: ignore[misc]
        """Forget an unfinished upload (finished, cancelled or expired)."""

    def list_uploads():  # type: ignore[misc]
        """Fires with every recorded unfinished upload (the dicts given to put_upload)."""


#: The fields of an abuse report, in the order the SQL stores keep them: who reported
#: which message (``msg_id``) why and when, and what the message was when reported
#: (its ``sender``, ``recipient``, ``pos`` and the first characters of its body).
REPORT_FIELDS = (
    "id",
    "reporter",
    "msg_id",
    "reason",
    "ts",
    "sender",
    "recipient",
    "pos",
    "excerpt",
)


def report_row(row: Any) -> dict[str, Any]:
    """A report from its row (the columns of :data:`REPORT_FIELDS`), with plain types."""
    rid, reporter, msg_id, reason, ts, sender, recipient, pos, excerpt = row
    return {
        "id": int(rid),
        "reporter": str(reporter),
        "msg_id": str(msg_id),
        "reason": str(reason),
        "ts": float(ts) if isinstance(ts, (int, float)) else 0.0,
        "sender": str(sender),
        "recipient": str(recipient),
        "pos": int(pos),
        "excerpt": str(excerpt),
    }


#: The metadata keys a ``file`` item's ``meta`` carries (and a file record repeats).
FILE_META = ("file_id", "sha256", "size", "name", "media_type")


def file_record(env: Any) -> dict[str, Any]:
    """The file record of a committed ``file`` item (for :meth:`IStore.file_info`)."""
    meta = env.meta
    rec = {k: meta[k] for k in FILE_META}
    rec.update(sender=env.sender, recipient=env.recipient, ts=env.ts, pos=env.pos)
    return rec
