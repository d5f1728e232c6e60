"""PostgreSQL implementation of :class:`chatproto.store.IStore`: for scale-out.

Selected with ``[storage] backend = "postgresql"`` and a ``dsn``; needs the
``postgresql`` extra (psycopg 3).  The single-process default (SQLite) imports none of
this.  Layout as for SQLite: :class:`PostgresDB` is the synchronous core (one psycopg
connection, plain methods), used directly by ``chatrealmctl``; :class:`PostgresStore`
runs it in threads with the group commit of :mod:`chatproto.store.groupcommit`.
The core is split by concern: :mod:`chatproto.store.postgresql.schema` (the
migrations), :mod:`chatproto.store.postgresql.rows` (how a row holds an item and
text), :mod:`chatproto.store.postgresql.writers` (several writers: locks and the safe
position), :mod:`chatproto.store.postgresql.commit` (the append path) and
:mod:`chatproto.store.postgresql.db` (the connection and the rest); the statements
it shares with SQLite are in the mixins of :mod:`chatproto.store.accounts`,
:mod:`chatproto.store.reading`, :mod:`chatproto.store.peers` and
:mod:`chatproto.store.filerows`.

Why threads and not psycopg's asyncio API: the realm runs on whatever reactor twistd
picks (epoll by default); psycopg's async connections would need Twisted's asyncio
reactor for every realm on PostgreSQL.  A blocking psycopg call releases the GIL while
it waits on the server, so one writer thread and a few reader threads cost little, and
the store shares its group commit, its outbox cache and its tests with the SQLite one.

Durability: every connection runs with ``synchronous_commit = on``, whatever the
server's default, so an append's Deferred fires (and the client gets its ack) only
once the commit is flushed to the server's WAL: SIGKILL of the realm, or of the
server, loses nothing acknowledged.

Positions: items take their position from the sequence ``items_pos`` inside the
commit's transaction; outbox rows are numbered from their items' positions
(:func:`chatproto.store.postgresql.writers.outbox_seqs`).  A single-process
realm holds an advisory lock on its schema while open, so a second one on the same
schema refuses to start.  Workers of a cluster (issue 16) share the schema: each is a
writer, and positions are then handed out in one order and committed in another.  So
every commit holds its writer's in-flight lock and records, in ``stream_writers``, the
position below which that writer has nothing in flight; a reader advances only to
:meth:`PostgresDB.safe_position` (a worker's store bounds its reads by it), and never
later meets an item below a position it has seen (docs/operator-guide.md, "Several
writers"); the federation sender reads the outbox up to the same position, so a peer
gets the realm's items in position order whichever worker committed them.

Text PostgreSQL cannot hold (U+0000, which JSON allows in a message body, an item id
or a device name) is stored escaped: see :func:`escape_text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from chatproto.envelope import Envelope
from chatproto.store import MAX_DEVICES, IStore
from chatproto.store.groupcommit import CommitResult, GroupCommitStore
from chatproto.store.postgresql.db import CONNECT_TIMEOUT, PostgresDB, describe_dsn
from chatproto.store.postgresql.rows import escape_text, unescape_text
from chatproto.store.postgresql.schema import MIGRATIONS, SCHEMA_VERSION
from chatproto.store.postgresql.writers import CTL_WRITER, LOCK_WAIT, SOLE_WRITER, outbox_upto

__all__ = [
    "CONNECT_TIMEOUT",
    "CTL_WRITER",
    "LOCK_WAIT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SOLE_WRITER",
    "PostgresDB",
    "PostgresStore",
    "describe_dsn",
    "escape_text",
    "unescape_text",
]


@implementer(IStore)
class PostgresStore(GroupCommitStore):
    """The asynchronous, group-committing store over :class:`PostgresDB` connections:
    one writing connection (holding the schema's writer lock) and one per reader
    thread.  A connection lost (the server restarted) is replaced on next use: reads
    are retried once, a commit in flight fails (its senders get an error, nothing is
    acknowledged that was not committed) and the next one reconnects."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        reactor: IReactorThreads,
        readers: int = 2,
        worker: str | None = None,
        realm: str | None = None,
    ) -> None:
        super().__init__(reactor, readers, "postgresql")
        self.dsn = dsn
        self.schema = schema
        self.path = describe_dsn(dsn, schema)
        #: The cluster worker this store writes as (None: the realm's only writer).
        self.worker = worker
        #: The realm's name: acks and read markers of its users are written only while
        #: their account exists (see CommitSQL._of_accounts).  None: not checked.
        self.realm = realm
        #: With several writers: reads return no item above this position, the last
        #: :meth:`safe_position` seen (a reader never sees an item while one below it
        #: may still commit).  None: no bound (one writer commits in position order).
        self.visible: int | None = None if worker is None else 0
        #: The last :meth:`safe_position` found a writer's commit in flight below the
        #: highest position drawn (outbox rows above the bound, numbered by their
        #: items' positions, wait for a later read).
        self.outbox_held = False

    def _new_writer(self, create: bool = False) -> PostgresDB:
        db = PostgresDB(self.dsn, self.schema, create=create, writer=self.worker or SOLE_WRITER)
        db.local_suffix = "@" + self.realm if self.realm else None
        return db

    def _open_writer(self) -> PostgresDB:
        writer = self._new_writer(create=True)
        try:
            writer.lock_writer(worker=self.worker)
            writer.migrate()
            if self.worker is None:
                # One process commits in its order: what workers recorded of groups'
                # realms no longer holds once it changes them (see grouprealms.py).
                writer.forget_group_realms()
            if self.visible is not None:
                self.visible = writer.safe_position()
        except psycopg.Error as e:
            writer.close()
            raise RuntimeError(f"{self.path}: {e}") from None
        except Exception:
            writer.close()
            raise
        return writer

    def _db(self) -> PostgresDB:
        writer = self._writer
        assert writer is not None, "store is not open"
        assert isinstance(writer, PostgresDB)
        if writer.broken:  # on the writer thread: reconnect, and be the writer again
            writer.close()
            fresh = self._new_writer()
            try:
                fresh.lock_writer(worker=self.worker)
            except Exception:
                fresh.close()
                raise
            self._writer = writer = fresh
        return writer

    def _connect(self) -> PostgresDB:
        return PostgresDB(self.dsn, self.schema, create=False)

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
        """A commit whose connection turns out lost before COMMIT was sent committed
        nothing: it is done again, once, on a new connection.  Lost later, whether it
        committed is unknown, so it fails (no sender is told "stored")."""
        args = (batches, acks, outbox, remote, outbox_acks, deletions, reads, devices)
        db = self._db()
        try:
            return db.commit_batch(*args)
        except psycopg.OperationalError:
            if not db.broken or db.commit_sent:
                raise
            self.log.info("{store}: connection lost; reconnecting", store=self.path)
        return self._db().commit_batch(*args)

    def _retry_read(self, db: Any, error: Exception) -> bool:
        return isinstance(error, psycopg.OperationalError) and bool(db.broken)

    # several writers (issue 16) -----------------------------------------------------

    def safe_position(self) -> Deferred[int]:
        """The position every reader may advance to (see
        :meth:`PostgresDB.safe_position`); with several writers it also raises the
        bound of this store's reads (:attr:`visible`, for the outbox too).  Fires
        with it."""

        def seen(safe: tuple[int, int]) -> int:
            pos, top = safe
            if self.visible is not None and pos > self.visible:
                self.visible = pos
            self.outbox_held = pos < top
            return pos

        return self._read(lambda db: db.safe_bounds()).addCallback(seen)

    def stream_top(self) -> Deferred[int]:
        """The highest position drawn so far by any writer (committed, in flight or
        rolled back): every item acknowledged before this is called is at or below
        it."""
        return self._read(lambda db: db.items_top())

    def outbox_read(self, realm: str, after: int, limit: int) -> Deferred[list[Any]]:
        """With several writers, from the database (outbox rows of every worker), in
        position order (their seqs follow their items' positions), never above
        :attr:`visible`: a row that commits late below one the link has
        acknowledged would otherwise be deleted unsent."""
        if self.visible is None:
            return super().outbox_read(realm, after, limit)
        upto = outbox_upto(self.visible)
        return self._read(lambda db: db.outbox_read(realm, after, limit, upto))

    def _cache_outbox(self, rows: list[tuple[str, int, Any]]) -> None:
        if self.worker is None:  # with several writers the database is read instead
            super()._cache_outbox(rows)

    def read_events(self, after: int, limit: int) -> Deferred[list[Envelope]]:
        upto = self.visible
        if upto is None:
            return super().read_events(after, limit)
        return self._read(lambda db: db.read_events(after, limit, upto))

    def read_stream(
        self, after: int, upto: int, limit: int, skip: Sequence[int] = ()
    ) -> Deferred[list[Envelope]]:
        """See :meth:`PostgresDB.read_stream`."""
        return self._read(lambda db: db.read_stream(after, upto, limit, skip))

    def writers(self) -> Deferred[list[tuple[str, int, float, bool]]]:
        """See :meth:`PostgresDB.writers`."""
        return self._read(lambda db: db.writers())

    # reads bounded by the safe position (several writers) --------------------------

    def read_feed(
        self,
        user: str,
        after: int,
        limit: int,
        groups: Sequence[tuple[str, int, int | None]] = (),
    ) -> Deferred[list[Envelope]]:
        upto = self.visible
        if upto is None:
            return super().read_feed(user, after, limit, groups)
        ranges = [(g, lo, upto if hi is None else min(hi, upto)) for g, lo, hi in groups]
        return self._read(lambda db: db.read_feed(user, after, limit, ranges, upto))

    def history(
        self,
        conversation: str,
        before: int | None,
        after: int | None,
        limit: int,
        floor: int = 0,
    ) -> Deferred[list[Envelope]]:
        upto = self.visible
        if upto is None:
            return super().history(conversation, before, after, limit, floor)
        if before is None or before > upto + 1:
            before = upto + 1
        return self._read(lambda db: db.history(conversation, before, after, limit, floor, upto))

    def max_pos(self) -> Deferred[int]:
        upto = self.visible
        if upto is None:
            return super().max_pos()
        return self._read(lambda db: min(db.max_pos(), upto))
