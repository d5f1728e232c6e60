"""Several writers on one schema (issue 16): writer locks and the safe position.

Part of :mod:`chatproto.store.postgresql` (a mixin of its
:class:`chatproto.store.postgresql.db.PostgresDB`).  Positions are drawn from the
sequence ``items_pos`` in one order and committed in another; each commit holds its
writer's in-flight lock and records how far that writer has persisted, so a reader
advances only to :meth:`WriterPositions.safe_position` (docs/operator-guide.md,
"Several writers").  The outbox is numbered by the same positions
(:func:`outbox_seqs`): the federation sender reads it in position order, up to the
same safe position.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from chatproto.envelope import Envelope
from chatproto.store.postgresql.rows import ITEM_COLS, item_of_row

__all__ = [
    "CTL_WRITER",
    "LOCK_WAIT",
    "OUTBOX_SPREAD",
    "SOLE_WRITER",
    "WriterPositions",
    "group_lock_key",
    "index_lock_key",
    "inflight_lock_key",
    "outbox_seqs",
    "outbox_upto",
    "schema_lock_key",
    "worker_lock_key",
]

#: Seconds a starting realm waits for the writer lock of its schema.
LOCK_WAIT = 2.0


def _key(text: str) -> int:
    """An advisory lock key (a signed 64-bit int) named by ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def schema_lock_key(schema: str) -> int:
    """The advisory lock key of a schema's writers: held exclusively by a single-process
    realm, shared by the workers of a cluster (so the two never mix)."""
    return _key(f"chatproto writer {schema}")


def worker_lock_key(schema: str, writer: str) -> int:
    """The session lock a worker holds while it runs: one process per worker name."""
    return _key(f"chatproto worker {schema} {writer}")


def inflight_lock_key(schema: str, writer: str) -> int:
    """The transaction lock a writer holds while a commit of its is in flight (see
    :meth:`PostgresDB.safe_position`)."""
    return _key(f"chatproto in flight {schema} {writer}")


def index_lock_key(schema: str) -> int:
    """The transaction lock of a step of search indexing (see
    :meth:`chatproto.store.postgresql.search.SearchIndex.index_search`): one writer
    indexes at a time."""
    return _key(f"chatproto search index {schema}")


def group_lock_key(schema: str, group: str) -> int:
    """The transaction lock that orders a group's items and the changes of its realms
    (see :mod:`chatproto.store.grouprealms`): shared by a commit of items, exclusive
    by one of a change, taken before positions are drawn."""
    return _key(f"chatproto group {schema} {group}")


#: Outbox seqs per position: the rows a commit queues at position P are numbered
#: ``P * OUTBOX_SPREAD + k``, k = 0, 1, ... (decimal, so that a transaction's name
#: on the federation link shows the positions: ``41000000-42000001``).
OUTBOX_SPREAD = 1_000_000


def outbox_upto(pos: int) -> int:
    """The highest outbox seq of position ``pos``: a reader bounded by the safe
    position ``pos`` reads no outbox row above it."""
    return (pos + 1) * OUTBOX_SPREAD - 1


def outbox_seqs(positions: Sequence[int], draw: Callable[[], int]) -> list[int]:
    """Inside a commit, the seqs of its outbox rows, in the order it queued them:
    ``positions[i]`` is the position of row i's item, 0 for a row that carries no
    item (a group request).

    The outbox order is the stream's: a row is numbered from its item's position,
    which the commit drew in its transaction, so the federation sender, reading up
    to the safe position, sends one realm's items in position order whichever
    worker committed them, and never reads past a row that will commit later.  A
    row with no item takes the highest position of the rows queued before it in the
    commit (the first item's, for those queued before any), after them; the k of
    the rows at one position count up in queue order.  Only a commit whose rows
    carry no item at all draws a position for them (``draw``), as it does past
    :data:`OUTBOX_SPREAD` rows at one position (a million requests queued in one
    commit after one item): a gap in the positions, as a rollback leaves."""
    used: dict[int, int] = {}
    base = next((p for p in positions if p), 0)
    out: list[int] = []
    for pos in positions:
        if pos:
            at = pos
            base = max(base, pos)
        else:
            if not base:
                base = draw()
            at = base
        k = used.get(at, 0)
        if k >= OUTBOX_SPREAD:
            at = base = draw()
            k = 0
        used[at] = k + 1
        out.append(at * OUTBOX_SPREAD + k)
    return out


#: The writer name of a single-process realm, and of ``chatrealmctl``'s commits.
SOLE_WRITER = "realm"
CTL_WRITER = "chatrealmctl"


class WriterPositions:
    """The writer locks, the in-flight marks of commits and the safe position, over
    the connection ``conn`` to schema ``schema`` (set by the class using it)."""

    conn: psycopg.Connection[Any]
    schema: str
    writer: str
    path: str
    _inflight: int
    _writer_row: bool
    _locked: bool

    @property
    def broken(self) -> bool:
        """The connection is lost (the server restarted, the network failed)."""
        return bool(self.conn.broken or self.conn.closed)

    def lock_writer(self, wait: float = LOCK_WAIT, worker: str | None = None) -> None:
        """Become the schema's one writer (held until this connection closes); raise
        if another process still is after ``wait`` seconds (the lock of a process
        that has just died is released once the server notices).

        With ``worker`` (a cluster's worker name), become one of the schema's several
        writers instead: the schema's lock is taken shared (so a single-process realm
        and a cluster never write to one schema together) and the worker's name
        exclusively (one process per name)."""
        c = self.conn
        # (lock_timeout 0 would mean "wait for ever": at least a millisecond)
        ms = max(1, int(wait * 1000))
        c.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{ms}ms")))
        try:
            if worker is None:
                c.execute("SELECT pg_advisory_lock(%s)", (schema_lock_key(self.schema),))
            else:
                c.execute("SELECT pg_advisory_lock_shared(%s)", (schema_lock_key(self.schema),))
                self._locked = True
                c.execute("SELECT pg_advisory_lock(%s)", (worker_lock_key(self.schema, worker),))
        except psycopg.errors.LockNotAvailable:
            if worker is not None and self._locked:
                raise RuntimeError(
                    f"worker {worker!r} already runs on {self.path}: one process per worker name"
                ) from None
            raise RuntimeError(
                f"another realm process is writing to {self.path}: one writer per "
                "realm (stop it, or give this realm another storage.schema)"
                + ("" if worker is None else "; a single-process realm runs there")
            ) from None
        finally:
            if not self.broken:
                c.execute("RESET lock_timeout")
        self._locked = True

    # several writers (issue 16) -----------------------------------------------------

    def _register_writer(self) -> None:
        """Make sure this writer's ``stream_writers`` row exists, committed (outside
        any transaction: a reader must see the row before the writer's first
        in-flight transaction, or it would not know to wait for it)."""
        if not self._writer_row:
            self.conn.execute(
                "INSERT INTO stream_writers (writer, persisted_upto, lock_key, updated) "
                "VALUES (%s, (SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                "FROM items_pos), %s, %s) ON CONFLICT (writer) DO UPDATE "
                "SET lock_key = excluded.lock_key",
                (self.writer, self._inflight, time.time()),
            )
            self._writer_row = True

    def _begin_commit(self) -> None:
        """First thing in a transaction that draws positions: hold this writer's
        in-flight lock until the transaction ends, so readers know a commit of ours is
        in flight (see :meth:`safe_position`)."""
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._inflight,))

    def _end_commit(self) -> None:
        """Last thing before COMMIT: every position this writer drew is committed with
        this transaction, and any it draws later is above the sequence's value now."""
        self.conn.execute(
            "UPDATE stream_writers SET updated = %s, persisted_upto = greatest("
            "persisted_upto, (SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
            "FROM items_pos)) WHERE writer = %s",
            (time.time(), self.writer),
        )

    def safe_position(self) -> int:
        """The highest position P such that every item at a position <= P that will
        ever be committed is committed now (visible to any read that starts after
        this returns): what a reader may advance to with several writers.

        Positions are drawn from the sequence ``items_pos`` in one order and committed
        in another.  A writer draws only inside a transaction that first takes its
        in-flight lock (:meth:`_begin_commit`) and, before COMMIT, records in its
        ``stream_writers`` row the sequence's value then (:meth:`_end_commit`): every
        position of its <= that value is committed, every later one will be above
        it.  So: read the sequence's value T first; then each writer whose in-flight
        lock is held has a commit in flight whose positions are all above its row's
        (committed) value; any other writer has nothing drawn below T in flight (its
        lock is released only after its COMMIT is visible).  The answer is T, lowered
        to the row value of every writer in flight.  A writer that died holds no lock:
        it holds nobody back.
        """
        return self.safe_bounds()[0]

    def safe_bounds(self) -> tuple[int, int]:
        """:meth:`safe_position`, and the highest position drawn: above the safe one
        while a writer's commit is in flight (items and outbox rows of other writers
        committed above it are not read until the safe position passes them)."""
        c = self.conn
        top = self.items_top()
        row = c.execute(
            "SELECT min(persisted_upto) FROM stream_writers "
            "WHERE NOT pg_try_advisory_xact_lock_shared(lock_key)"
        ).fetchone()
        held = row[0] if row else None
        return (top if held is None else min(top, int(held)), top)

    def writers(self) -> list[tuple[str, int, float, bool]]:
        """Every writer that ever committed here: ``(name, persisted_upto, when it last
        committed (Unix time), whether a commit of its is in flight now)``."""
        rows = self.conn.execute(
            "SELECT writer, persisted_upto, updated, "
            "NOT pg_try_advisory_xact_lock_shared(lock_key) FROM stream_writers "
            "ORDER BY writer"
        ).fetchall()
        return [(r[0], int(r[1]), float(r[2]), bool(r[3])) for r in rows]

    def read_stream(
        self, after: int, upto: int, limit: int, skip: Sequence[int] = ()
    ) -> list[Envelope]:
        """Every item with ``after < pos <= upto``, oldest first, but those at the
        positions ``skip`` (a worker's live delivery reads these, ``upto`` a
        :meth:`safe_position`, ``skip`` the items it committed itself and holds)."""
        if skip:
            rows = self.conn.execute(
                f"SELECT {ITEM_COLS} FROM items WHERE pos > %s AND pos <= %s "
                "AND NOT (pos = ANY(%s)) ORDER BY pos LIMIT %s",
                (after, upto, list(skip), limit),
            ).fetchall()
        else:
            rows = self.conn.execute(
                f"SELECT {ITEM_COLS} FROM items WHERE pos > %s AND pos <= %s ORDER BY pos LIMIT %s",
                (after, upto, limit),
            ).fetchall()
        return [item_of_row(r) for r in rows]

    def _seq_top(self, seq: str) -> int:
        row = self.conn.execute(
            sql.SQL("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {}").format(
                sql.Identifier(seq)
            )
        ).fetchone()
        return int(row[0]) if row else 0

    def outbox_top(self) -> int:
        """The highest outbox seq assigned so far, or that any row committed so far
        can hold (rows may have been deleted since): the last of the seqs of the
        highest position drawn (see :func:`outbox_upto`)."""
        return outbox_upto(self.items_top())

    def items_top(self) -> int:
        """The highest position ever assigned (items may have been deleted since)."""
        return self._seq_top("items_pos")
