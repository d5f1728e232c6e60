"""The asynchronous, group-committing front end shared by the SQL stores.

A SQL backend is two parts: a synchronous core (:class:`StoreDB`: one connection, plain
methods, usable from ``chatrealmctl`` as it is) and this front end, which runs the core
in threads and implements :class:`chatproto.store.IStore` on top of it.
:class:`chatproto.store.sqlite.SQLiteStore` and
:class:`chatproto.store.postgresql.PostgresStore` differ only in how they connect.

Threads: one writer thread owns the only writing connection; reads run on a small
reader pool, each thread with its own connection.  Group commit: appends arriving while
a write is in flight are queued on the reactor thread and committed together in the
next transaction -- no timer, so a lone message is committed at once and a busy realm
pays one durable commit per batch, not per message.  That next transaction is queued
on the writer thread behind the one in flight and takes what waits when it starts, so
the writer goes from one commit to the next while the reactor hands out the first's
results (GroupCommitStore._flush).  Positions are assigned inside that
transaction by the one writer, so they are committed in the order they are handed out
(see docs/operator-guide.md for what several writers will need).  Federation rides on
it: outbox rows are committed with their items, outbox acknowledgements (deletes) with
the next batch, and the rows this process committed are kept in memory until
acknowledged, so a link reads its queue without a database round trip.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from chatproto.envelope import Envelope, alternate_id
from chatproto.store import MAX_DEVICES, NoSuchAccount, Waiter

__all__ = [
    "OUTBOX_CACHE",
    "CommitPhases",
    "CommitResult",
    "GroupCommitStore",
    "StoreDB",
    "delete_accounts",
    "outbox_rows",
    "plan_inserts",
    "skip_missing_accounts",
]

T = TypeVar("T")

#: Outbox rows per realm kept in memory for the link (beyond it, a link that is behind
#: reads the database until it has caught up).
OUTBOX_CACHE = 50_000

#: What :meth:`StoreDB.commit_batch` returns: positions per batch (``None`` for a
#: remote item stored already; an exception for a batch that failed alone), and the
#: outbox rows queued as ``(realm, seq, envelope or request)`` in sequence order.
#: Search indexing (``index_search`` of both SQL stores) is background work, kept
#: out of a busy realm's way: it runs INDEX_DELAY seconds after the last commit that
#: stored items (the realm is quiet), in steps of INDEX_STEP items, or as soon as
#: INDEX_FORCE items wait (a realm busy for long: then step after step, between its
#: commits, until fewer wait; search reads the items not indexed yet directly, so
#: these bound what it reads).  A step taken while commits run or wait is of
#: INDEX_BUSY_STEP items: a step holds the writer thread, and the commits queued behind
#: it wait for it (2000 items took 9-33 ms on a realm at 30k messages/s, a latency bump
#: for every message in those commits; bench/README.md, issue 20).
INDEX_STEP = 2000
INDEX_BUSY_STEP = 400
INDEX_DELAY = 1.0
INDEX_FORCE = 20_000

#: Seconds acks and read markers wait, when nothing else does, for a commit of items
#: to ride before they get one of their own (PROTOCOL.md: acks and markers are committed
#: with the next group commit; a crash may lose the last few).  A lightly loaded realm
#: otherwise paid two commits, two fsyncs and two writer round trips per message: the
#: item's, then the recipient's ack alone, with the sender's next message queued
#: behind it.
MARK_DELAY = 0.05

CommitResult = tuple[list[list[int | None] | Exception], list[tuple[str, int, Any]]]


@attrs.frozen
class CommitPhases:
    """Where one group commit's time went, in seconds (``commit_observer``)."""

    #: From its submission to the writer thread starting it: the commit before it,
    #: or a search indexing step, still held the writer.
    queued: float
    #: The writer thread's work on it: the transaction, its COMMIT included.
    writing: float
    #: From the writer's end to the reactor thread taking the results: how long the
    #: event loop took to come back to them.
    handoff: float


@attrs.define(eq=False)  # (identity: a commit in flight is removed as itself)
class _Taken:
    """What one group commit took when it started (GroupCommitStore._pull_and_commit)."""

    batch: list[Any]
    acks: dict[tuple[str, str], int]
    outbox_acks: dict[str, int]
    ack_waiters: list[Deferred[None]]
    reads: dict[tuple[str, str], int]
    #: When the writer thread began and ended the commit (``GroupCommitStore.timer``).
    began: float = 0.0
    ended: float = 0.0


def plan_inserts(
    batches: Sequence[Sequence[Envelope]],
    remote: Sequence[bool],
    stored_ids: Callable[[Sequence[str]], dict[str, tuple[str, str]]],
    id_key: Callable[[], bytes],
) -> tuple[list[list[bool] | None], list[Envelope], list[tuple[Envelope, str]]]:
    """Inside a commit: which items of ``batches`` to insert.  A local batch's items
    all are; a remote batch's (``remote``) are first looked up by id with one query
    (``stored_ids``: id -> (sender, recipient) of the stored ones): one stored (or
    earlier in this commit) with the same sender and recipient is left out (a
    retried delivery); one whose id another conversation's item holds goes under its
    :func:`chatproto.envelope.alternate_id` (``id_key``: the store's key).

    Returns per batch None (all inserted) or a mask of the items inserted; the items
    to insert, in batch order; and the items renamed with their former ids (the
    caller gives them back if the commit fails)."""
    remote_ids = [e.id for b, r in zip(batches, remote, strict=True) if r for e in b]
    seen = stored_ids(remote_ids) if remote_ids else {}
    renamed: list[tuple[Envelope, str]] = []
    plan: list[list[bool] | None] = []
    chosen: list[Envelope] = []
    for batch, is_remote in zip(batches, remote, strict=True):
        if not is_remote:
            chosen.extend(batch)
            plan.append(None)
            if remote_ids:  # a remote item later in this commit may reuse an id
                seen.update((e.id, (e.sender, e.recipient)) for e in batch)
            continue
        mask = []
        for e in batch:
            who = (e.sender, e.recipient)
            had = seen.get(e.id)
            if had is not None and had != who:  # the id is taken by another item
                renamed.append((e, e.id))
                e.id = alternate_id(e, id_key())
                had = seen.get(e.id) or stored_ids([e.id]).get(e.id)
            if had is None:
                seen[e.id] = who
            mask.append(had is None)
        chosen.extend(e for e, m in zip(batch, mask, strict=True) if m)
        plan.append(mask)
    return plan, chosen, renamed


def skip_missing_accounts(
    batches: Sequence[Sequence[Envelope]],
    outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None,
    deletions: Sequence[tuple[str, str] | None] | None,
    user_floor: Callable[[str], int | None],
) -> tuple[
    Sequence[Sequence[Envelope]],
    Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None,
    dict[int, Exception],
]:
    """Inside a commit, before its items: a batch deleting an account (``deletions[i]``
    its ``(name, address)``) that is not there (``user_floor`` None) fails alone with
    :class:`NoSuchAccount`, and nothing of it is written.  Returns the batches and
    outbox to write (those batches emptied) and the failures by batch index (see
    :func:`delete_accounts`)."""
    missing: dict[int, Exception] = {}
    if deletions is None or not any(deletions):
        return batches, outbox, missing
    batches = list(batches)
    outbox = list(outbox) if outbox is not None else [()] * len(batches)
    for i, account in enumerate(deletions):
        if account is not None and user_floor(account[0]) is None:
            missing[i] = NoSuchAccount(account[0])
            batches[i], outbox[i] = [], []
    return batches, outbox, missing


def delete_accounts(
    positions: list[list[int | None] | Exception],
    missing: dict[int, Exception],
    deletions: Sequence[tuple[str, str] | None] | None,
    delete_account: Callable[[str, str], None],
) -> set[str]:
    """Inside a commit, once its items are inserted (``positions`` per batch): the
    batches of ``missing`` (:func:`skip_missing_accounts`) get their failure, and
    each other batch that did not fail deletes its account (``delete_account``).
    Returns the addresses of the accounts deleted."""
    for i, err in missing.items():
        positions[i] = err
    gone: set[str] = set()
    for i, account in enumerate(deletions or ()):
        if account is not None and not isinstance(positions[i], Exception):
            delete_account(*account)
            gone.add(account[1])
    return gone


def without_users(marks: dict[tuple[str, str], int], gone: set[str]) -> dict[tuple[str, str], int]:
    """``marks`` (acks by ``(user, device)``, read markers by ``(user, conversation)``)
    less those of the users ``gone``: an ack or read marker still waiting when its
    account is deleted goes with the deletion's commit, and written after it, it would
    outlive the account (a later account of the name would find it)."""
    return {k: p for k, p in marks.items() if k[0] not in gone}


def outbox_rows(
    batches: Sequence[Sequence[Envelope]],
    outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]],
    positions: Sequence[list[int | None] | Exception],
    text_in: Callable[[str], str],
) -> tuple[list[tuple[str, int, str | None]], list[tuple[str, int, Any]], list[tuple[Any, ...]]]:
    """Inside a commit, once its items have ``positions`` (per batch; an Exception for
    a batch that failed): the outbox rows the batches queued, as ``(realm, item
    position or 0, request JSON or None)``; the same entries as the commit's result
    gives them (``(realm, 0 until its seq is known, Envelope or request dict)``); and
    the rows of the group requests among them (id, actor, group, ts, JSON; the text
    as the store keeps it: ``text_in``).  A failed batch queues nothing, and an item
    not stored (a duplicate) is not queued."""
    rows: list[tuple[str, int, str | None]] = []
    queued_rows: list[tuple[str, int, Any]] = []
    requests: list[tuple[Any, ...]] = []
    for batch, queued, res in zip(batches, outbox, positions, strict=True):
        if not queued or isinstance(res, Exception):
            continue
        where = {id(e): p for e, p in zip(batch, res, strict=True)}
        for realm, env in queued:
            if isinstance(env, dict):
                payload = json.dumps(env)
                rows.append((realm, 0, payload))
                queued_rows.append((realm, 0, dict(env)))
                if env.get("kind") == "request":
                    ts = env.get("ts")
                    requests.append(
                        (
                            text_in(str(env.get("id"))),
                            text_in(str(env.get("from"))),
                            text_in(str(env.get("to"))),
                            float(ts) if isinstance(ts, int | float) else 0.0,
                            payload,
                        )
                    )
                continue
            pos = where.get(id(env))
            if pos is not None:
                rows.append((realm, pos, None))
                queued_rows.append((realm, 0, env))
    return rows, queued_rows, requests


class StoreDB(Protocol):
    """The synchronous core of a SQL store: one connection, one thread at a time.

    The methods mirror :class:`chatproto.store.IStore` (same arguments and results,
    returned directly instead of through a Deferred); see there for the contract.
    """

    def close(self) -> None: ...
    def describe(self) -> str: ...
    def outbox_top(self) -> int: ...
    def commit_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
        deletions: Sequence[tuple[str, str] | None] | None = None,
        reads: dict[tuple[str, str], int] | None = None,
        devices: int = ...,
    ) -> CommitResult: ...
    def read_markers(self, conv: str) -> dict[str, int]: ...
    def read_position(self, conv: str, before_ts: float, floor: int) -> int: ...
    def index_search(self, limit: int) -> int: ...

    #: Whether the last :meth:`index_search` stopped short of items it could not
    #: index yet (PostgreSQL with several writers), so a step is due again later.
    index_later: bool

    def search_upto(self) -> int: ...
    def search(
        self,
        words: Sequence[str],
        scopes: Sequence[tuple[str, str, int]],
        before: int | None,
        limit: int,
    ) -> list[Envelope]: ...
    def prefs(self, key: str) -> dict[str, str]: ...
    def set_pref(self, user: str, key: str, value: str | None) -> None: ...
    def conversations(
        self,
        user: str,
        floor: int,
        groups: Sequence[tuple[str, int]],
        name: str,
        limit: int,
        pending: dict[tuple[str, str], int],
    ) -> list[dict[str, Any]]: ...
    def create_user(self, name: str, pwhash: str, ts: float) -> None: ...
    def user_floor(self, name: str) -> int | None: ...
    def password_hash(self, name: str) -> str | None: ...
    def set_password(self, name: str, pwhash: str) -> bool: ...
    def delete_user(
        self,
        name: str,
        address: str,
        items: Sequence[Envelope] = (),
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> bool: ...
    def list_users(self) -> list[str]: ...
    def user_floors(self) -> dict[str, int]: ...
    def suspend_user(self, name: str, reason: str, ts: float) -> bool: ...
    def unsuspend_user(self, name: str) -> bool: ...
    def suspensions(self) -> dict[str, tuple[str, float]]: ...
    def put_session_token(
        self, digest: str, name: str, floor: int, device: str, created: float, last_used: float
    ) -> None: ...
    def touch_session_token(self, digest: str, last_used: float) -> None: ...
    def delete_session_tokens(self, digests: Sequence[str]) -> int: ...
    def delete_user_session_tokens(self, name: str) -> int: ...
    def session_tokens(
        self, name: str | None = None
    ) -> list[tuple[str, str, int, str, float, float]]: ...
    def session_token(self, digest: str) -> tuple[str, str, int, str, float, float] | None: ...
    def expire_session_tokens(self, before: float) -> int: ...
    def grant_admin(self, name: str, ts: float) -> bool: ...
    def revoke_admin(self, name: str) -> bool: ...
    def admins(self) -> dict[str, float]: ...
    def add_report(self, report: dict[str, Any]) -> int: ...
    def reports(self, before: int | None, limit: int) -> list[dict[str, Any]]: ...
    def outbox_read(
        self, realm: str, after: int, limit: int, upto: int | None = None
    ) -> list[tuple[int, Envelope | dict[str, Any]]]: ...
    def outbox_enqueue(self, realm: str, payloads: Sequence[dict[str, Any]]) -> None: ...
    def pending_requests(self, actor: str, group: str) -> list[dict[str, Any]]: ...
    def request_done(self, request_id: str) -> None: ...
    def expire_requests(self, before: float) -> int: ...
    def stored_item(self, item_id: str) -> Envelope | None: ...
    def stored_item_in(self, item_id: str, conversation: str) -> Envelope | None: ...
    def ref_count(self, ref: str, sender: str) -> int: ...
    def peer_keys(self) -> dict[str, list[dict[str, str]]]: ...
    def set_peer_keys(self, realm: str, keys: list[dict[str, str]]) -> None: ...
    def outbox_ack(self, realm: str, seq: int) -> None: ...
    def outbox_counts(self) -> dict[str, int]: ...
    def outbox_stats(self) -> dict[str, tuple[int, float | None]]: ...
    def outbox_holds(self, realm: str, pos: int) -> bool: ...
    def read_feed(
        self,
        user: str,
        after: int,
        limit: int,
        groups: Sequence[tuple[str, int, int | None]] = (),
    ) -> list[Envelope]: ...
    def read_events(self, after: int, limit: int) -> list[Envelope]: ...
    def conversation_partners(self, user: str, after: int = 0) -> list[str]: ...
    def history(
        self,
        conversation: str,
        before: int | None,
        after: int | None,
        limit: int,
        floor: int = 0,
    ) -> list[Envelope]: ...
    def get_ack(self, user: str, device: str) -> int: ...
    def max_pos(self) -> int: ...
    def file_info(self, file_id: str) -> dict[str, Any] | None: ...
    def file_usage(self, sender: str, after: int = 0) -> int: ...
    def expire_files(self, before: float) -> list[str]: ...
    def blob_referenced(self, sha256: str) -> bool: ...
    def put_upload(self, record: dict[str, Any]) -> None: ...
    def delete_upload(self, upload_id: str) -> None: ...
    def list_uploads(self) -> list[dict[str, Any]]: ...


class GroupCommitStore:
    """:class:`chatproto.store.IStore` over a :class:`StoreDB` run in threads.

    Subclasses provide :meth:`_open_writer` (connect, migrate: the writing
    connection) and :meth:`_connect` (a reading connection), and may override
    :meth:`_retry_read` for connections that can break (a database server restarted).
    """

    log = Logger()
    #: Shown in logs (``realm started ... store <path>``): a file, or a server and schema.
    path = "?"
    #: The most devices per user whose acks are kept (see IStore.set_ack).
    max_devices = MAX_DEVICES

    def __init__(self, reactor: IReactorThreads, readers: int, name: str) -> None:
        self._reactor = reactor
        self._writer_pool = ThreadPool(1, 1, name=f"chatproto-{name}-writer")
        self._reader_pool = ThreadPool(1, readers, name=f"chatproto-{name}-reader")
        self._writer: StoreDB | None = None
        self._local = threading.local()
        self._readers: list[StoreDB] = []
        self._readers_lock = threading.Lock()
        #: Queued appends: (items, waiter (a Deferred, or :meth:`append_to`'s), outbox
        #: pairs, received from another realm, account deleted with them).  An outbox
        #: request (:meth:`outbox_enqueue`) is an append with no items; an account
        #: deletion, one with an account.
        self._pending: list[
            tuple[
                Sequence[Envelope],
                Waiter,
                Sequence[tuple[str, Envelope | dict[str, Any]]],
                bool,
                tuple[str, str] | None,
            ]
        ] = []
        self._pending_acks: dict[tuple[str, str], int] = {}
        #: Outbox acknowledgements waiting for the next group commit: realm -> seq.
        self._pending_outbox_acks: dict[str, int] = {}
        self._outbox_ack_waiters: list[Deferred[None]] = []
        #: The outbox rows committed by this process and not yet acknowledged, per
        #: realm, oldest first: ``(seq, envelope or request)``.  ``_outq_floor[realm]``:
        #: every row of ``realm`` with a greater seq is in ``_outq[realm]``, so the link
        #: reads what was just committed from here instead of from the database.
        self._outq: dict[str, collections.deque[tuple[int, Any]]] = {}
        self._outq_floor: dict[str, int] = {}
        #: The highest outbox seq whose commit the reactor has seen through (done()):
        #: reads from the database return nothing beyond it.  A reader thread can see a
        #: row as soon as the writer commits it, before the realm has applied what the
        #: commit means (a join to its group state, say); a link sending that row at
        #: once would let the peer act on it first (then items the realm queues
        #: according to its stale state go astray).  Set at open: rows of earlier runs.
        self._published_seq = 0
        #: What each commit in flight took (for its acks and read markers), oldest
        #: first (two at most, see :meth:`_flush`).
        self._inflight: list[_Taken] = []
        #: Read markers waiting for the next group commit, and those in the commit
        #: being written: (user, conversation) -> position (see :meth:`set_read`).
        self._pending_reads: dict[tuple[str, str], int] = {}
        self._threads_started = False
        #: Search indexing (see SQLiteDB.index_search, PostgresDB.index_search): on the
        #: writer thread in steps of INDEX_STEP items when there is no commit to make, so it
        #: never stands in the send path; wanted after a commit stored items.
        self._indexing = False
        self._index_wanted = True
        self._index_gen = 0  # commits that stored items (one that lands mid-step counts)
        self._unindexed = 0  # items committed since the last step began (about)
        self._index_call: Any = None
        self._index_quiet = False
        self._closing = False
        #: Seconds acks and read markers waiting alone wait for a commit of items
        #: (MARK_DELAY), the timer after which they get one of their own, and whether
        #: it ran out (see :meth:`_flush`).
        self.mark_delay = MARK_DELAY
        self._mark_call: Any = None
        self._marks_due = False
        #: Told when a group commit's results start and finish being handed out, so
        #: the realm can write each connection's frames of the whole batch at once.
        self.burst_listener: Any = None
        #: Group commits submitted to the writer thread and not yet done (two at most:
        #: see :meth:`_flush`), how many were submitted, and how many of those have
        #: taken what waited (the writer thread counts them; the reactor only reads it).
        self._jobs = 0
        self._submitted = 0
        self._started = 0
        #: Held by whoever adds to or takes ``_pending``: the reactor appends, and a
        #: commit takes what waits when it starts, on the writer thread.
        self._pending_lock = threading.Lock()
        self._idle: list[Deferred[None]] = []
        #: Statistics for benchmarks, logs and metrics: transactions and items
        #: committed (``committed_remote``: those of them received from other realms).
        self.commits = 0
        self.committed_items = 0
        self.committed_remote = 0
        #: Told of each group commit once it is done (for the metrics, see
        #: :mod:`chatproto.ops.metrics`): ``(items, seconds, sync_seconds, phases)``
        #: -- the items stored, the seconds from the start of the commit to its
        #: results (the transaction and the wait for the writer thread), the seconds
        #: its COMMIT took (the fsync; None when the backend does not say), and
        #: :class:`CommitPhases`.  On the reactor thread.
        self.commit_observer: Callable[[int, float, float | None, CommitPhases], None] | None = None
        #: The clock commit durations are measured with (a monotonic one).
        self.timer: Callable[[], float] = time.perf_counter

    # backend hooks --------------------------------------------------------------------

    def _open_writer(self) -> StoreDB:
        """Connect the writing connection and bring the schema up to date; raise
        (with a message an operator can act on) if that is not possible."""
        raise NotImplementedError

    def _connect(self) -> StoreDB:
        """A new reading connection (called on a reader thread)."""
        raise NotImplementedError

    def _commit(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]],
        remote: Sequence[bool],
        outbox_acks: dict[str, int],
        deletions: Sequence[tuple[str, str] | None] | None = None,
        reads: dict[tuple[str, str], int] | None = None,
        devices: int = MAX_DEVICES,
    ) -> CommitResult:
        """One group commit, on the writer thread."""
        return self._db().commit_batch(
            batches, acks, outbox, remote, outbox_acks, deletions, reads, devices
        )

    def _retry_read(self, db: StoreDB, error: Exception) -> bool:
        """Whether a read that failed with ``error`` is worth one more try on a fresh
        connection (``db`` is then dropped).  Reads are idempotent."""
        return False

    # lifecycle ----------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Open and migrate the database; the threads start on first use.

        Opening is done synchronously, once, at start-up, before anything is served:
        a realm must not accept logins on a store whose schema is not there yet, and a
        store that cannot be opened must stop start-up (under twistd this runs before
        the reactor, where a Deferred still waiting would be too late to exit on).
        """
        try:
            writer = self._open_writer()
        except Exception as e:
            return fail(e)
        try:
            self._published_seq = writer.outbox_top()
            unindexed = writer.max_pos() - writer.search_upto()
        except Exception as e:
            writer.close()
            return fail(e)
        self._writer = writer
        if unindexed > 0:
            # Items stored before this start and not indexed yet (a realm stopped
            # while busy, an upgrade, a migrated database): indexed once the realm is
            # quiet, or alongside its commits if they are many, as after a commit.
            self._unindexed = unindexed
            self._index_call = self._reactor.callLater(  # type: ignore[attr-defined]
                INDEX_DELAY, self._index_due
            )
        return succeed(None)

    def _start_threads(self) -> None:
        # Started on first use, not in open(): open() runs before the reactor under
        # twistd, and threads started then would keep a process that fails to start
        # (a port in use) from exiting.
        if not self._threads_started:
            self._threads_started = True
            self._writer_pool.start()
            self._reader_pool.start()

    def close(self) -> Deferred[None]:
        self._closing = True
        if self._index_call is not None and self._index_call.active():
            self._index_call.cancel()
        self._index_call = None
        self._flush()  # (acks and read markers waiting for MARK_DELAY: now)
        d = self._when_idle()

        def _shut(_: object) -> None:
            # Stop the pools first (each waits for the work it has in hand), then close
            # the connections here: a connection must never be closed by one thread
            # while another still uses it (SQLite would crash the process).
            if self._threads_started:
                self._writer_pool.stop()
                self._reader_pool.stop()
                self._threads_started = False
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            with self._readers_lock:
                for r in self._readers:
                    r.close()
                self._readers.clear()

        d.addCallback(_shut)
        return d

    def _when_idle(self) -> Deferred[None]:
        if not self._jobs and not self._has_pending():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # thread helpers -----------------------------------------------------------------

    def _write(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self._start_threads()
        return deferToThreadPool(self._reactor, self._writer_pool, fn, *args)  # type: ignore[arg-type]

    def _db(self) -> StoreDB:
        """The writing connection (on the writer thread)."""
        assert self._writer is not None, "store is not open"
        return self._writer

    def _reader(self) -> StoreDB:
        db: StoreDB | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            with self._readers_lock:
                self._readers.append(db)
        return db

    def _drop_reader(self, db: StoreDB) -> None:
        self._local.db = None
        with self._readers_lock:
            if db in self._readers:
                self._readers.remove(db)
        try:
            db.close()
        except Exception:
            pass

    def _read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(db, *args)`` on a reader thread with that thread's connection."""

        def run() -> T:
            db = self._reader()
            try:
                return fn(db, *args)
            except Exception as e:
                if not self._retry_read(db, e):
                    raise
                self._drop_reader(db)
            return fn(self._reader(), *args)

        self._start_threads()
        return deferToThreadPool(self._reactor, self._reader_pool, run)  # type: ignore[arg-type]

    # accounts -----------------------------------------------------------------------

    def create_user(self, name: str, pwhash: str, ts: float) -> Deferred[None]:
        return self._write(lambda: self._db().create_user(name, pwhash, ts))

    def password_hash(self, name: str) -> Deferred[str | None]:
        return self._read(lambda db: db.password_hash(name))

    def set_password(self, name: str, pwhash: str) -> Deferred[bool]:
        return self._write(lambda: self._db().set_password(name, pwhash))

    def delete_user(
        self,
        name: str,
        address: str,
        items: Sequence[Envelope] = (),
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> Deferred[bool]:
        """One batch of the group commit (so its outbox rows reach the links like any
        append's, in order)."""
        d: Deferred[list[Envelope]] = Deferred()
        with self._pending_lock:
            self._pending.append((items, d, outbox, False, (name, address)))
        self._flush()

        def missing(f: Failure) -> bool:
            f.trap(NoSuchAccount)
            return False

        return d.addCallbacks(lambda _: True, missing)

    def user_floors(self) -> Deferred[dict[str, int]]:
        return self._read(lambda db: db.user_floors())

    def suspend_user(self, name: str, reason: str, ts: float) -> Deferred[bool]:
        return self._write(lambda: self._db().suspend_user(name, reason, ts))

    def unsuspend_user(self, name: str) -> Deferred[bool]:
        return self._write(lambda: self._db().unsuspend_user(name))

    def suspensions(self) -> Deferred[dict[str, tuple[str, float]]]:
        return self._read(lambda db: db.suspensions())

    def put_session_token(
        self, digest: str, name: str, floor: int, device: str, created: float, last_used: float
    ) -> Deferred[None]:
        return self._write(
            lambda: self._db().put_session_token(digest, name, floor, device, created, last_used)
        )

    def touch_session_token(self, digest: str, last_used: float) -> Deferred[None]:
        return self._write(lambda: self._db().touch_session_token(digest, last_used))

    def delete_session_tokens(self, digests: Sequence[str]) -> Deferred[int]:
        digests = list(digests)
        return self._write(lambda: self._db().delete_session_tokens(digests))

    def delete_user_session_tokens(self, name: str) -> Deferred[int]:
        return self._write(lambda: self._db().delete_user_session_tokens(name))

    def session_tokens(
        self, name: str | None = None
    ) -> Deferred[list[tuple[str, str, int, str, float, float]]]:
        return self._read(lambda db: db.session_tokens(name))

    def session_token(
        self, digest: str
    ) -> Deferred[tuple[str, str, int, str, float, float] | None]:
        return self._read(lambda db: db.session_token(digest))

    def expire_session_tokens(self, before: float) -> Deferred[int]:
        return self._write(lambda: self._db().expire_session_tokens(before))

    def grant_admin(self, name: str, ts: float) -> Deferred[bool]:
        return self._write(lambda: self._db().grant_admin(name, ts))

    def revoke_admin(self, name: str) -> Deferred[bool]:
        return self._write(lambda: self._db().revoke_admin(name))

    def admins(self) -> Deferred[dict[str, float]]:
        return self._read(lambda db: db.admins())

    def add_report(self, report: dict[str, Any]) -> Deferred[int]:
        report = dict(report)
        return self._write(lambda: self._db().add_report(report))

    def reports(self, before: int | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        return self._read(lambda db: db.reports(before, limit))

    def user_exists(self, name: str) -> Deferred[bool]:
        return self.password_hash(name).addCallback(lambda h: h is not None)

    def list_users(self) -> Deferred[list[str]]:
        return self._read(lambda db: db.list_users())

    def user_floor(self, name: str) -> Deferred[int | None]:
        return self._read(lambda db: db.user_floor(name))

    # streams ------------------------------------------------------------------------

    def append(
        self, items: Sequence[Envelope], outbox: Sequence[tuple[str, Envelope]] = ()
    ) -> Deferred[list[Envelope]]:
        d: Deferred[list[Envelope]] = Deferred()
        self._queue(d, items, outbox)
        return d

    def append_to(
        self,
        waiter: Waiter,
        items: Sequence[Envelope],
        outbox: Sequence[tuple[str, Envelope]] = (),
    ) -> None:
        self._queue(waiter, items, outbox)

    def _queue(
        self, waiter: Waiter, items: Sequence[Envelope], outbox: Sequence[tuple[str, Envelope]]
    ) -> None:
        """Queue an append (:meth:`append`, :meth:`append_to`) for the next commit."""
        with self._pending_lock:
            self._pending.append((items, waiter, outbox, False, None))
        if self._jobs < 2:  # else the commits in flight flush it when done
            self._flush()

    def append_remote(
        self, items: Sequence[Envelope], outbox: Sequence[tuple[str, Envelope]] = ()
    ) -> Deferred[list[Envelope]]:
        d: Deferred[list[Envelope]] = Deferred()
        with self._pending_lock:
            self._pending.append((items, d, outbox, True, None))
        self._flush()
        return d

    def outbox_read(self, realm: str, after: int, limit: int) -> Deferred[list[Any]]:
        """From memory when every row after ``after`` was committed by this process
        (the common case: a link keeping up); else from the database."""
        floor = self._outq_floor.get(realm)
        if floor is None or after < floor:
            upto = self._published_seq
            return self._read(lambda db: db.outbox_read(realm, after, limit, upto))
        q = self._outq.get(realm)
        if not q:
            return succeed([])
        lo, hi = 0, len(q)  # the first row with seq > after (seqs increase)
        while lo < hi:
            mid = (lo + hi) // 2
            if q[mid][0] <= after:
                lo = mid + 1
            else:
                hi = mid
        return succeed(list(itertools.islice(q, lo, lo + limit)))

    def outbox_ack(self, realm: str, seq: int) -> Deferred[None]:
        """Delete ``realm``'s rows up to ``seq`` in the next group commit (with the
        items being appended: no commit of its own under load); fires once deleted."""
        q = self._outq.get(realm)
        while q and q[0][0] <= seq:  # the link never reads acknowledged rows again
            q.popleft()
        d: Deferred[None] = Deferred()
        with self._pending_lock:
            if seq > self._pending_outbox_acks.get(realm, 0):
                self._pending_outbox_acks[realm] = seq
            self._outbox_ack_waiters.append(d)
        self._flush()
        return d

    def outbox_counts(self) -> Deferred[dict[str, int]]:
        return self._read(lambda db: db.outbox_counts())

    def outbox_stats(self) -> Deferred[dict[str, tuple[int, float | None]]]:
        return self._read(lambda db: db.outbox_stats())

    def outbox_holds(self, realm: str, pos: int) -> Deferred[bool]:
        return self._read(lambda db: db.outbox_holds(realm, pos))

    def outbox_enqueue(self, realm: str, payloads: Sequence[dict[str, Any]]) -> Deferred[None]:
        """Queued with the appends, in call order (one group commit)."""
        d: Deferred[list[Envelope]] = Deferred()
        with self._pending_lock:
            self._pending.append(([], d, [(realm, p) for p in payloads], False, None))
        self._flush()
        return d.addCallback(lambda _: None)

    def pending_requests(self, actor: str, group: str) -> Deferred[list[dict[str, Any]]]:
        return self._read(lambda db: db.pending_requests(actor, group))

    def request_done(self, request_id: str) -> Deferred[None]:
        return self._write(lambda: self._db().request_done(request_id))

    def expire_requests(self, before: float) -> Deferred[int]:
        return self._write(lambda: self._db().expire_requests(before))

    def stored_item(self, item_id: str) -> Deferred[Envelope | None]:
        return self._read(lambda db: db.stored_item(item_id))

    def stored_item_in(self, item_id: str, conversation: str) -> Deferred[Envelope | None]:
        return self._read(lambda db: db.stored_item_in(item_id, conversation))

    def ref_count(self, ref: str, sender: str) -> Deferred[int]:
        return self._read(lambda db: db.ref_count(ref, sender))

    def peer_keys(self) -> Deferred[dict[str, list[dict[str, str]]]]:
        return self._read(lambda db: db.peer_keys())

    def set_peer_keys(self, realm: str, keys: list[dict[str, str]]) -> Deferred[None]:
        return self._write(lambda: self._db().set_peer_keys(realm, keys))

    def _cache_outbox(self, rows: list[tuple[str, int, Any]]) -> None:
        """Remember committed outbox rows for :meth:`outbox_read` (bounded per realm:
        past :data:`OUTBOX_CACHE` the oldest go and the floor rises above them)."""
        for realm, seq, obj in rows:
            q = self._outq.get(realm)
            if q is None:
                q = self._outq[realm] = collections.deque()
                self._outq_floor.setdefault(realm, seq - 1)
            q.append((seq, obj))
            if len(q) > OUTBOX_CACHE:
                self._outq_floor[realm] = q.popleft()[0]

    def _has_pending(self) -> bool:
        return bool(
            self._pending or self._pending_acks or self._pending_outbox_acks or self._pending_reads
        )

    def set_ack(self, user: str, device: str, pos: int) -> None:
        key = (user, device)
        with self._pending_lock:
            if pos <= self._pending_acks.get(key, 0):
                return
            self._pending_acks[key] = pos
        self._flush()

    def _flush(self) -> None:
        """Submit a group commit of what waits, if the writer thread can take one.

        Pipelined: while a commit is in flight and has started on the writer thread,
        a second one can be submitted behind it when items wait; it takes the items
        appended until it starts (:meth:`_pull_and_commit`), so the writer goes from
        one commit to the next without waiting for the reactor to hand out the
        first's results (a busy reactor takes a while to get to them), and the
        reactor hands out one commit's results while the next is written.  Results
        come back in the order the commits were written (one writer thread), so
        items are handed out in position order.  Acks, outbox acknowledgements and
        read markers go with the next commit to start."""
        if not self._has_pending():
            if not self._jobs:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)
                self._index_when_idle()
            return
        if self._jobs and (self._jobs > 1 or not self._pending or self._started != self._submitted):
            return  # the commits in flight flush it when done
        if not (self._pending or self._pending_outbox_acks or self._marks_due or self._closing):
            # Only acks and read markers wait: they ride the next commit of items, or
            # get one of their own MARK_DELAY seconds from now.
            if self._mark_call is None:
                self._mark_call = self._reactor.callLater(  # type: ignore[attr-defined]
                    self.mark_delay, self._marks_ripe
                )
            return
        if self._mark_call is not None:  # (this commit takes the marks that wait)
            if self._mark_call.active():
                self._mark_call.cancel()
            self._mark_call = None
        self._marks_due = False
        self._jobs += 1
        self._submitted += 1
        started = self.timer()
        taken: list[_Taken] = []  # what the commit took (set on the writer thread)
        d = self._write(self._pull_and_commit, taken)
        over = False

        def finish() -> None:
            """The commit is no longer in flight (once, whatever happens after)."""
            nonlocal over
            if not over:
                over = True
                self._jobs -= 1
                if taken:
                    with self._pending_lock:
                        self._inflight.remove(taken[0])

        def done(out: tuple[CommitResult | None, Failure | None]) -> None:
            result, failure = out
            finish()
            batch, ack_waiters = taken[0].batch, taken[0].ack_waiters
            if failure is not None or result is None:
                failed(failure or Failure(RuntimeError("no commit result")))
                return
            results, queued = result
            self.commits += 1
            before = self.committed_items
            outcomes: list[list[Envelope] | Exception] = []
            for (items, _, _, is_remote, _), res in zip(batch, results, strict=True):
                if isinstance(res, Exception):
                    outcomes.append(res)
                    continue
                if not is_remote:  # every local item is stored
                    for env, pos in zip(items, res, strict=True):
                        env.pos = pos  # type: ignore[assignment]
                    self.committed_items += len(items)
                    outcomes.append(list(items))
                    continue
                stored = []
                for env, pos in zip(items, res, strict=True):
                    if pos is not None:
                        env.pos = pos
                        stored.append(env)
                self.committed_items += len(stored)
                self.committed_remote += len(stored)
                outcomes.append(stored)
            if self.committed_items != before:
                self._index_wanted = True
                self._index_gen += 1
                self._unindexed += self.committed_items - before
                self._index_quiet = False
                if self._index_call is not None and self._index_call.active():
                    self._index_call.reset(INDEX_DELAY)  # still busy: later
                if self._unindexed >= INDEX_FORCE and not self._indexing:
                    self._take_index_step()  # busy for long: between the commits
            observer = self.commit_observer
            if observer is not None:
                try:
                    sync = getattr(self._writer, "sync_seconds", None)
                    t, now = taken[0], self.timer()
                    phases = CommitPhases(t.began - started, t.ended - t.began, now - t.ended)
                    observer(self.committed_items - before, now - started, sync, phases)
                except Exception:  # the metrics must never cost a commit its results
                    self.log.failure("commit observer failed")
            if queued:  # before the waiters run: they wake the links, which read these
                self._cache_outbox(queued)
                self._published_seq = max(self._published_seq, queued[-1][1])
            for w in ack_waiters:
                w.callback(None)
            # the next commit (what arrived while this one ran) starts now, on the
            # writer thread, if it has not already (see above)
            if self._pending:
                self._flush()
            listener = self.burst_listener
            if listener is not None:
                listener.begin_burst()
            try:
                for b, outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        b[1].errback(Failure(outcome))
                    else:
                        b[1].callback(outcome)
            finally:
                if listener is not None:
                    listener.end_burst()

        def failed(f: Failure) -> None:
            finish()
            batch, ack_waiters = (taken[0].batch, taken[0].ack_waiters) if taken else ([], [])
            self.log.failure("group commit of {n} batches failed", f, n=len(batch))
            for b in batch:
                b[1].errback(f)
            for w in ack_waiters:
                w.errback(f)

        def next_(result: object) -> None:
            if isinstance(result, Failure):  # done() itself failed: never wedge the store
                self.log.failure("handing out a group commit's results failed", result)
            finish()
            if self._jobs < 2:  # else the commit in flight flushes when done
                self._flush()

        d.addCallbacks(done, failed).addBoth(next_)

    def _pull_and_commit(self, taken: list[_Taken]) -> tuple[CommitResult | None, Failure | None]:
        """On the writer thread: take what waits now (appends, acks, outbox
        acknowledgements, read markers; put in ``taken`` for the reactor) and commit
        it; returns the commit's result, or its failure (what was taken must be
        failed with it).  Everything queued before a call of it is in its commit or
        in an earlier one, so an append is committed after everything queued before
        it, as with one commit at a time."""
        began = self.timer()
        with self._pending_lock:
            t = _Taken(
                self._pending,
                self._pending_acks,
                self._pending_outbox_acks,
                self._outbox_ack_waiters,
                self._pending_reads,
                began,
            )
            self._pending, self._pending_acks, self._pending_outbox_acks = [], {}, {}
            self._outbox_ack_waiters, self._pending_reads = [], {}
            self._inflight.append(t)
            # (counted once it has taken them: a commit submitted behind this one
            # always finds the items that made _flush submit it)
            self._started += 1
        taken.append(t)
        try:
            if not (t.batch or t.acks or t.outbox_acks or t.reads):
                t.ended = self.timer()
                return ([], []), None
            batch = t.batch
            items = [b[0] for b in batch]
            queues = [b[2] for b in batch]
            remote = [b[3] for b in batch]
            deleting = [b[4] for b in batch]
            result = self._commit(
                items,
                t.acks,
                queues,
                remote,
                t.outbox_acks,
                deleting,
                t.reads or None,
                self.max_devices,
            )
            t.ended = self.timer()
            return result, None
        except BaseException:  # (what was taken must be failed, whatever it was)
            return None, Failure()

    def read_feed(
        self,
        user: str,
        after: int,
        limit: int,
        groups: Sequence[tuple[str, int, int | None]] = (),
    ) -> Deferred[list[Envelope]]:
        ranges = list(groups)
        return self._read(lambda db: db.read_feed(user, after, limit, ranges))

    def read_events(self, after: int, limit: int) -> Deferred[list[Envelope]]:
        return self._read(lambda db: db.read_events(after, limit))

    def conversation_partners(self, user: str, after: int = 0) -> Deferred[list[str]]:
        return self._read(lambda db: db.conversation_partners(user, after))

    def history(
        self,
        conversation: str,
        before: int | None,
        after: int | None,
        limit: int,
        floor: int = 0,
    ) -> Deferred[list[Envelope]]:
        return self._read(lambda db: db.history(conversation, before, after, limit, floor))

    def get_ack(self, user: str, device: str) -> Deferred[int]:
        key = (user, device)
        with self._pending_lock:
            pending = self._pending_acks.get(key, 0)
            for t in self._inflight:
                pending = max(pending, t.acks.get(key, 0))
        return self._read(lambda db: db.get_ack(user, device)).addCallback(
            lambda stored: max(stored, pending)
        )

    def max_pos(self) -> Deferred[int]:
        return self._read(lambda db: db.max_pos())

    # read markers, conversations, preferences (see chatproto/store/reading.py) -------

    def _index_when_idle(self) -> None:
        """One step of search indexing, if there is something to index and no commit
        to make (a commit arriving meanwhile waits for the step: a few ms)."""
        if self._indexing or self._jobs or self._has_pending() or self._closing:
            return
        if not self._index_wanted or self._writer is None:
            return
        if self._unindexed >= INDEX_FORCE or self._index_quiet:
            self._take_index_step()
        elif self._index_call is None:
            self._index_call = self._reactor.callLater(  # type: ignore[attr-defined]
                INDEX_DELAY, self._index_due
            )

    def _index_due(self) -> None:
        """No commit stored items for INDEX_DELAY seconds: index (step by step, as
        long as the realm stays quiet)."""
        self._index_call = None
        self._index_quiet = True
        self._index_when_idle()

    def _take_index_step(self) -> None:
        if self._closing or self._writer is None:
            return
        self._indexing = True
        self._index_quiet = False
        gen = self._index_gen
        step = INDEX_BUSY_STEP if self._jobs or self._has_pending() else INDEX_STEP
        d = self._write(lambda: self._db().index_search(step))

        def done(n: int) -> None:
            self._indexing = False
            # (a step queued behind commits of the writer thread: n counts them too)
            self._unindexed = max(0, self._unindexed - n) if n >= step else 0
            self._index_wanted = n >= step or gen != self._index_gen
            if n >= step and gen == self._index_gen:  # still quiet: go on
                self._index_quiet = True
            if n < step and self._writer is not None and self._writer.index_later:
                # Stopped short (PostgreSQL with several writers: another's step held
                # the lock, or commits in flight held the safe position below items):
                # again INDEX_DELAY seconds later (the timer of _index_when_idle), not
                # only after this store's next commit, which may not come.
                self._index_wanted = True
            if self._unindexed >= INDEX_FORCE:
                self._take_index_step()
            else:
                self._index_when_idle()

        def failed(f: Failure) -> None:
            self._indexing = False
            self._index_wanted = False  # tried again after the next commit
            self.log.failure("search indexing failed", f)

        d.addCallbacks(done, failed)

    def _marks_ripe(self) -> None:
        """MARK_DELAY ran out with acks or read markers waiting alone: commit them."""
        self._mark_call = None
        self._marks_due = True
        self._flush()

    def set_read(self, user: str, conv: str, pos: int) -> None:
        """Move ``user``'s read marker in ``conv`` forward to ``pos``, with the next
        group commit (like an ack: no commit of its own under load)."""
        key = (user, conv)
        with self._pending_lock:
            if pos <= self._pending_reads.get(key, 0):
                return
            self._pending_reads[key] = pos
        self._flush()

    def _unwritten_reads(self) -> dict[tuple[str, str], int]:
        merged: dict[tuple[str, str], int] = {}
        with self._pending_lock:
            for reads in [*(t.reads for t in self._inflight), self._pending_reads]:
                for key, pos in reads.items():
                    if pos > merged.get(key, 0):
                        merged[key] = pos
        return merged

    def read_markers(self, conv: str) -> Deferred[dict[str, int]]:
        pending = {u: p for (u, c), p in self._unwritten_reads().items() if c == conv}

        def merge(stored: dict[str, int]) -> dict[str, int]:
            for u, p in pending.items():
                if p > stored.get(u, 0):
                    stored[u] = p
            return stored

        return self._read(lambda db: db.read_markers(conv)).addCallback(merge)

    def read_position(self, conv: str, before_ts: float, floor: int) -> Deferred[int]:
        return self._read(lambda db: db.read_position(conv, before_ts, floor))

    def conversations(
        self,
        user: str,
        floor: int,
        groups: Sequence[tuple[str, int]],
        name: str,
        limit: int,
    ) -> Deferred[list[dict[str, Any]]]:
        pending = self._unwritten_reads()
        ranges = list(groups)
        return self._read(lambda db: db.conversations(user, floor, ranges, name, limit, pending))

    def search(
        self,
        words: Sequence[str],
        scopes: Sequence[tuple[str, str, int]],
        before: int | None,
        limit: int,
    ) -> Deferred[list[Envelope]]:
        terms, where = list(words), list(scopes)
        return self._read(lambda db: db.search(terms, where, before, limit))

    def prefs(self, key: str) -> Deferred[dict[str, str]]:
        return self._read(lambda db: db.prefs(key))

    def set_pref(self, user: str, key: str, value: str | None) -> Deferred[None]:
        return self._write(lambda: self._db().set_pref(user, key, value))

    # files: reads on the reader threads (they see every commit completed before they
    # start, as for items); writes on the one writer thread ----------------------------

    def file_info(self, file_id: str) -> Deferred[dict[str, Any] | None]:
        return self._read(lambda db: db.file_info(file_id))

    def file_usage(self, sender: str, after: int = 0) -> Deferred[int]:
        return self._read(lambda db: db.file_usage(sender, after))

    def expire_files(self, before: float) -> Deferred[list[str]]:
        return self._write(lambda: self._db().expire_files(before))

    def blob_referenced(self, sha256: str) -> Deferred[bool]:
        return self._read(lambda db: db.blob_referenced(sha256))

    def put_upload(self, record: dict[str, Any]) -> Deferred[None]:
        return self._write(lambda: self._db().put_upload(record))

    def delete_upload(self, upload_id: str) -> Deferred[None]:
        return self._write(lambda: self._db().delete_upload(upload_id))

    def list_uploads(self) -> Deferred[list[dict[str, Any]]]:
        return self._read(lambda db: db.list_uploads())
