"""PostgreSQL implementation of :class:`chatproto.store.IStore`: for scale-out.

Selected with ``[storage] backend = "postgresql"`` and a ``dsn``; needs the
``postgresql`` extra (psycopg 3).  The single-process default (SQLite) imports none of
this.  Layout as for SQLite: :class:`PostgresDB` is the synchronous core (one psycopg
connection, plain methods), used directly by ``chatrealmctl``; :class:`PostgresStore`
runs it in threads with the group commit of :mod:`chatproto.store.groupcommit`.

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
commit's transaction; outbox rows likewise from ``outbox_seq``.  A single-process
realm holds an advisory lock on its schema while open, so a second one on the same
schema refuses to start.  Workers of a cluster (issue 16) share the schema: each is a
writer, and positions are then handed out in one order and committed in another.  So
every commit holds its writer's in-flight lock and records, in ``stream_writers``, the
position below which that writer has nothing in flight; a reader advances only to
:meth:`PostgresDB.safe_position` (a worker's store bounds its reads by it), and never
later meets an item below a position it has seen (docs/operator-guide.md, "Several
writers").

Text PostgreSQL cannot hold (U+0000, which JSON allows in a message body, an item id
or a device name) is stored escaped: see :func:`escape_text`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from chatproto.envelope import MAX_SHOWN_TS, Envelope, alternate_id, shown_ts
from chatproto.mentions import mention_pattern
from chatproto.relations import DELETED_META, TARGET_KINDS, current_view
from chatproto.store import (
    FILE_META,
    REPORT_FIELDS,
    IStore,
    NoSuchAccount,
    UserExists,
    report_row,
    stored_meta,
    stored_sig,
)
from chatproto.store.groupcommit import CommitResult, GroupCommitStore
from chatproto.store.reading import ReadingSQL

__all__ = [
    "SCHEMA_VERSION",
    "PostgresDB",
    "PostgresStore",
    "describe_dsn",
    "escape_text",
    "unescape_text",
]

SCHEMA_VERSION = 10

#: Migrations: MIGRATIONS[n] takes a schema at version n to n + 1 (each in one
#: transaction).  Version 1 is the SQLite schema at its version 8, version 2 at its
#: version 9, in PostgreSQL's types; text compares byte by byte (COLLATE "C") as it
#: does in SQLite.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        name TEXT COLLATE "C" PRIMARY KEY,
        pwhash TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        floor BIGINT NOT NULL DEFAULT 0
    );
    CREATE SEQUENCE items_pos AS BIGINT;
    CREATE TABLE items (
        pos BIGINT PRIMARY KEY,
        id TEXT COLLATE "C" NOT NULL UNIQUE,
        kind TEXT COLLATE "C" NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        recipient TEXT COLLATE "C" NOT NULL,
        conv TEXT COLLATE "C" NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        body TEXT NOT NULL,
        meta TEXT
    );
    ALTER SEQUENCE items_pos OWNED BY items.pos;
    CREATE INDEX items_recipient ON items (recipient, pos);
    CREATE INDEX items_sender ON items (sender, pos);
    CREATE INDEX items_conv ON items (conv, pos);
    CREATE INDEX items_events ON items (pos) WHERE kind = 'event';
    CREATE TABLE acks (
        addr TEXT COLLATE "C" NOT NULL,
        device TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        PRIMARY KEY (addr, device)
    );
    CREATE SEQUENCE outbox_seq AS BIGINT;
    CREATE TABLE outbox (
        seq BIGINT PRIMARY KEY,
        realm TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        payload TEXT
    );
    ALTER SEQUENCE outbox_seq OWNED BY outbox.seq;
    CREATE INDEX outbox_realm ON outbox (realm, seq);
    CREATE TABLE files (
        file_id TEXT COLLATE "C" PRIMARY KEY,
        sha256 TEXT COLLATE "C" NOT NULL,
        size BIGINT NOT NULL,
        name TEXT NOT NULL,
        media_type TEXT NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        recipient TEXT COLLATE "C" NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        pos BIGINT NOT NULL
    );
    CREATE INDEX files_sha256 ON files (sha256);
    CREATE INDEX files_sender ON files (sender);
    CREATE INDEX files_ts ON files (ts);
    CREATE TABLE uploads (
        upload_id TEXT COLLATE "C" PRIMARY KEY,
        user_name TEXT COLLATE "C" NOT NULL,
        record TEXT NOT NULL
    );
    CREATE TABLE settings (
        key TEXT COLLATE "C" PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE requests (
        id TEXT COLLATE "C" PRIMARY KEY,
        actor TEXT COLLATE "C" NOT NULL,
        grp TEXT COLLATE "C" NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX requests_actor ON requests (actor, grp, ts);
    """,
    # v2 (SQLite's v9): an item relayed for a user of another realm carries that
    # realm's signature (JSON); the keys peers announced are cached.
    """
    ALTER TABLE items ADD COLUMN sig TEXT;
    CREATE TABLE peer_keys (
        realm TEXT COLLATE "C" PRIMARY KEY,
        keys TEXT NOT NULL
    );
    """,
    # v3 (SQLite's v10): suspended accounts, named by their floor.
    """
    CREATE TABLE suspensions (
        name TEXT COLLATE "C" PRIMARY KEY,
        floor BIGINT NOT NULL,
        reason TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    );
    """,
    # v4 (SQLite's v11): browser logins (token digests), admins, abuse reports.
    """
    CREATE TABLE session_tokens (
        digest TEXT COLLATE "C" PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL,
        floor BIGINT NOT NULL,
        device TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_used DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX session_tokens_name ON session_tokens (name);
    CREATE TABLE admins (
        name TEXT COLLATE "C" PRIMARY KEY,
        floor BIGINT NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE reports (
        id BIGSERIAL PRIMARY KEY,
        reporter TEXT COLLATE "C" NOT NULL,
        msg_id TEXT COLLATE "C" NOT NULL,
        reason TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        recipient TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        excerpt TEXT NOT NULL
    );
    CREATE INDEX reports_reporter ON reports (reporter, ts);
    """,
    # v5 (PostgreSQL only; issue 16): several writers.  Each writer's row says "every
    # position I drew up to here is committed" (see PostgresDB.safe_position).
    """
    CREATE TABLE stream_writers (
        writer TEXT COLLATE "C" PRIMARY KEY,
        persisted_upto BIGINT NOT NULL,
        lock_key BIGINT NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    );
    """,
    # v6 (SQLite's v12): items referring to another item (edits, deletes, reactions)
    # are found by the id they refer to.
    """
    CREATE INDEX items_ref ON items ((meta::json ->> 'ref'))
        WHERE kind IN ('edit', 'delete', 'reaction');
    """,
    # v7 (PostgreSQL only; issue 16): the same for the outbox's sequence.
    """
    ALTER TABLE stream_writers ADD COLUMN outbox_upto BIGINT NOT NULL DEFAULT 0;
    """,
    # v8 (SQLite's v13): read markers and per-user preferences.
    """
    CREATE TABLE read_markers (
        conv TEXT COLLATE "C" NOT NULL,
        user_addr TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        PRIMARY KEY (conv, user_addr)
    );
    CREATE INDEX read_markers_user ON read_markers (user_addr);
    CREATE TABLE prefs (
        user_addr TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (user_addr, key)
    );
    """,
    # v9 (SQLite's v14): full-text search.  search_text holds the current text of
    # every text and file item (its latest edit's) as words (runs of letters and
    # digits, as SQLite's tokenizer splits them), kept by a trigger in the item's
    # transaction, with a GIN index of them ('simple': lower-cased, no stemming).
    """
    CREATE TABLE search_text (
        pos BIGINT PRIMARY KEY,
        body TEXT NOT NULL
    );
    CREATE INDEX search_text_words ON search_text USING gin (to_tsvector('simple', body));
    INSERT INTO search_text (pos, body)
        SELECT t.pos, regexp_replace(coalesce((
            SELECT e.body FROM items e WHERE e.kind = 'edit' AND t.kind = 'text'
            AND e.meta::json ->> 'ref' = t.id AND e.conv = t.conv
            AND e.sender = t.sender ORDER BY e.pos DESC LIMIT 1), t.body),
            '[^[:alnum:]]+', ' ', 'g')
        FROM items t WHERE t.kind IN ('text', 'file') AND t.body <> '';
    CREATE FUNCTION items_search() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            IF NEW.kind IN ('text', 'file') AND NEW.body <> '' THEN
                INSERT INTO search_text
                    VALUES (NEW.pos, regexp_replace(NEW.body, '[^[:alnum:]]+', ' ', 'g'));
            ELSIF NEW.kind = 'edit' THEN
                UPDATE search_text s
                    SET body = regexp_replace(NEW.body, '[^[:alnum:]]+', ' ', 'g') FROM items t
                    WHERE s.pos = t.pos AND t.id = (NEW.meta::json ->> 'ref')
                    AND t.conv = NEW.conv AND t.sender = NEW.sender AND t.kind = 'text'
                    AND t.body <> '';
            END IF;
        ELSIF TG_OP = 'UPDATE' THEN
            IF NEW.body = '' THEN
                DELETE FROM search_text WHERE pos = OLD.pos;
            END IF;
        ELSE
            DELETE FROM search_text WHERE pos = OLD.pos;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER items_search AFTER INSERT OR UPDATE OF body OR DELETE ON items
        FOR EACH ROW EXECUTE FUNCTION items_search();
    """,
    # v10 (SQLite's v15): what an edit, delete or reaction refers to, in a table of its
    # own written only for those items (instead of the expression index of v6, which
    # every insert paid for).
    """
    DROP INDEX IF EXISTS items_ref;
    CREATE TABLE IF NOT EXISTS refs (
        ref TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        PRIMARY KEY (ref, pos)
    );
    INSERT INTO refs
        SELECT meta::json ->> 'ref', pos FROM items
        WHERE kind IN ('edit', 'delete', 'reaction') AND (meta::json ->> 'ref') IS NOT NULL
        ON CONFLICT DO NOTHING;
    """,
]

#: The kinds an append looks at twice: a file is recorded, a delete wipes its target,
#: an edit of a deleted item (checked before the delete was committed) loses its text.
_INDEXED = frozenset({"file", "delete", "edit", "reaction"})
#: Selects the items that refer to one of a page's items (see PostgresDB._refs).
_REF_KINDS_SQL = "kind IN ('edit', 'delete', 'reaction')"

#: Seconds to wait for the server when connecting (unless the DSN says otherwise).
CONNECT_TIMEOUT = 10
#: Seconds a starting realm waits for the writer lock of its schema.
LOCK_WAIT = 2.0

_COLS = "pos, id, kind, sender, recipient, ts, body, meta, sig"

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


def _number(value: Any) -> float | None:
    """A timestamp read from the database, or None for anything but a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _row(r: Sequence[Any]) -> Envelope:
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


def _item_row(e: Envelope, pos: int) -> tuple[Any, ...]:
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


def _request_row(req: dict[str, Any]) -> tuple[Any, ...]:
    """A group request's row (see :meth:`chatproto.store.IStore.pending_requests`)."""
    ts = req.get("ts")
    return (
        escape_text(str(req.get("id"))),
        escape_text(str(req.get("from"))),
        escape_text(str(req.get("to"))),
        float(ts) if isinstance(ts, int | float) else 0.0,
        json.dumps(req),
    )


def describe_dsn(dsn: str, schema: str) -> str:
    """``postgresql://user@host:port/dbname (schema S)``: for logs and messages (never
    the password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return f"postgresql (unparsable DSN), schema {schema}"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    user = params.get("user")
    db = params.get("dbname") or user or ""
    who = f"{user}@" if user else ""
    return f"postgresql://{who}{host}:{port}/{db} (schema {schema})"


def _key(text: str) -> int:
    """An advisory lock key (a signed 64-bit int) named by ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_key(schema: str) -> int:
    """The advisory lock key of a schema's writers: held exclusively by a single-process
    realm, shared by the workers of a cluster (so the two never mix)."""
    return _key(f"chatproto writer {schema}")


def _worker_key(schema: str, writer: str) -> int:
    """The session lock a worker holds while it runs: one process per worker name."""
    return _key(f"chatproto worker {schema} {writer}")


def _inflight_key(schema: str, writer: str) -> int:
    """The transaction lock a writer holds while a commit of its is in flight (see
    :meth:`PostgresDB.safe_position`)."""
    return _key(f"chatproto in flight {schema} {writer}")


#: The writer name of a single-process realm, and of ``chatrealmctl``'s commits.
SOLE_WRITER = "realm"
CTL_WRITER = "chatrealmctl"


class PostgresDB(ReadingSQL):
    """Synchronous access to one schema of a PostgreSQL database (one connection).

    ``create``: make the schema if it does not exist (else a missing schema is an
    error: a wrong ``schema`` in the config must not start an empty realm elsewhere).
    """

    def __init__(
        self, dsn: str, schema: str, create: bool = True, writer: str = CTL_WRITER
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        #: The name this connection's commits are recorded under in ``stream_writers``.
        self.writer = writer
        self._inflight = _inflight_key(schema, writer)
        self._writer_row = False
        self.path = describe_dsn(dsn, schema)
        kwargs: dict[str, Any] = {"autocommit": True}
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as e:
            raise RuntimeError(f"storage.dsn is not a valid PostgreSQL DSN: {e}") from None
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in params:
            kwargs["application_name"] = "chatrealm"
        try:
            self.conn = psycopg.connect(dsn, **kwargs)
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"cannot connect to {self.path}: {first}") from None
        try:
            c = self.conn
            # An ack means committed: whatever the server's or role's default.
            c.execute("SET synchronous_commit TO on")
            exists = c.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
            if exists is None:
                if not create:
                    raise RuntimeError(f"no schema {schema!r} in {self.path}")
                c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            c.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        except BaseException:
            self.conn.close()
            raise
        self._key: bytes | None = None
        self._locked = False
        #: Seconds the last group commit's COMMIT took (the server's WAL flush and the
        #: round trip; for the metrics).
        self.sync_seconds = 0.0
        #: Whether the last :meth:`commit_batch` got as far as sending COMMIT (if its
        #: connection was lost before, nothing of it was committed).
        self.commit_sent = False

    def close(self) -> None:
        if self._locked and not self.broken:
            # Released at once: the server ends the session (and drops its locks) only
            # some time after the connection is closed, and a realm restarted at once
            # must not find its own lock still held.
            try:
                self.conn.execute("SELECT pg_advisory_unlock_all()")
            except psycopg.Error:
                pass
        self._locked = False
        self.conn.close()

    def describe(self) -> str:
        return self.path

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
                c.execute("SELECT pg_advisory_lock(%s)", (_lock_key(self.schema),))
            else:
                c.execute("SELECT pg_advisory_lock_shared(%s)", (_lock_key(self.schema),))
                self._locked = True
                c.execute("SELECT pg_advisory_lock(%s)", (_worker_key(self.schema, worker),))
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
                "INSERT INTO stream_writers (writer, persisted_upto, lock_key, updated, "
                "outbox_upto) VALUES (%s, (SELECT CASE WHEN is_called THEN last_value "
                "ELSE 0 END FROM items_pos), %s, %s, (SELECT CASE WHEN is_called THEN "
                "last_value ELSE 0 END FROM outbox_seq)) ON CONFLICT (writer) DO UPDATE "
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
            "FROM items_pos)), outbox_upto = greatest(outbox_upto, (SELECT CASE WHEN "
            "is_called THEN last_value ELSE 0 END FROM outbox_seq)) WHERE writer = %s",
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
        return self.safe_positions()[0]

    def safe_positions(self) -> tuple[int, int]:
        """:meth:`safe_position`, and the same for the outbox's sequence (the
        federation sender reads and acknowledges no outbox row above it)."""
        c = self.conn
        top, otop = self.items_top(), self.outbox_top()
        row = c.execute(
            "SELECT min(persisted_upto), min(outbox_upto) FROM stream_writers "
            "WHERE NOT pg_try_advisory_xact_lock_shared(lock_key)"
        ).fetchone()
        held, oheld = (row[0], row[1]) if row else (None, None)
        return (
            top if held is None else min(top, int(held)),
            otop if oheld is None else min(otop, int(oheld)),
        )

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
                f"SELECT {_COLS} FROM items WHERE pos > %s AND pos <= %s "
                "AND NOT (pos = ANY(%s)) ORDER BY pos LIMIT %s",
                (after, upto, list(skip), limit),
            ).fetchall()
        else:
            rows = self.conn.execute(
                f"SELECT {_COLS} FROM items WHERE pos > %s AND pos <= %s ORDER BY pos LIMIT %s",
                (after, upto, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def _seq_top(self, seq: str) -> int:
        row = self.conn.execute(
            sql.SQL("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {}").format(
                sql.Identifier(seq)
            )
        ).fetchone()
        return int(row[0]) if row else 0

    def outbox_top(self) -> int:
        """The highest outbox seq ever assigned (rows may have been deleted since)."""
        return self._seq_top("outbox_seq")

    def items_top(self) -> int:
        """The highest position ever assigned (items may have been deleted since)."""
        return self._seq_top("items_pos")

    # schema -------------------------------------------------------------------------

    def version(self) -> int:
        """The schema's version (0: no chatproto tables yet); changes nothing."""
        c = self.conn
        row = c.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return 0
        row = c.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`; return the version found.

        Each step is one transaction (PostgreSQL's DDL is transactional), under an
        advisory lock so that two processes starting together migrate once."""
        c = self.conn
        with c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.schema) ^ 1,))
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = self.version()
            if found > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {found}, newer than this chatproto "
                    f"({SCHEMA_VERSION}); upgrade chatproto"
                )
            for v in range(found, SCHEMA_VERSION):
                c.execute(MIGRATIONS[v])
                c.execute("DELETE FROM schema_version")
                c.execute("INSERT INTO schema_version VALUES (%s)", (v + 1,))
            # The key of alternate ids (chatproto.envelope.alternate_id): random, made
            # here, never leaves the database.
            c.execute(
                "INSERT INTO settings VALUES ('id_key', %s) ON CONFLICT (key) DO NOTHING",
                (os.urandom(16).hex(),),
            )
        return found

    # accounts -----------------------------------------------------------------------

    def create_user(self, name: str, pwhash: str, ts: float) -> None:
        try:
            self.conn.execute(
                "INSERT INTO users (name, pwhash, created, floor) VALUES (%s, %s, %s, "
                "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM items_pos))",
                (name, pwhash, ts),
            )
        except psycopg.errors.UniqueViolation:
            raise UserExists(name) from None

    def user_floor(self, name: str) -> int | None:
        row = self.conn.execute("SELECT floor FROM users WHERE name = %s", (name,)).fetchone()
        return int(row[0]) if row else None

    def password_hash(self, name: str) -> str | None:
        row = self.conn.execute("SELECT pwhash FROM users WHERE name = %s", (name,)).fetchone()
        return row[0] if row else None

    def set_password(self, name: str, pwhash: str) -> bool:
        cur = self.conn.execute("UPDATE users SET pwhash = %s WHERE name = %s", (pwhash, name))
        return cur.rowcount > 0

    def user_floors(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self.conn.execute("SELECT name, floor FROM users")}

    def suspend_user(self, name: str, reason: str, ts: float) -> bool:
        cur = self.conn.execute(
            "INSERT INTO suspensions (name, floor, reason, ts) "
            "SELECT name, floor, %s, %s FROM users WHERE name = %s "
            "ON CONFLICT (name) DO UPDATE SET floor = excluded.floor, "
            "reason = excluded.reason, ts = excluded.ts",
            (escape_text(reason), ts, name),
        )
        return cur.rowcount > 0

    def unsuspend_user(self, name: str) -> bool:
        cur = self.conn.execute(
            "DELETE FROM suspensions WHERE name = %s "
            "AND floor = (SELECT floor FROM users WHERE name = %s)",
            (name, name),
        )
        return cur.rowcount > 0

    def suspensions(self) -> dict[str, tuple[str, float]]:
        rows = self.conn.execute(
            "SELECT s.name, s.reason, s.ts FROM suspensions s "
            "JOIN users u ON u.name = s.name AND u.floor = s.floor"
        )
        return {r[0]: (unescape_text(r[1]), float(r[2])) for r in rows}

    # browser logins, admins, reports (issue 18) --------------------------------------

    def put_session_token(
        self, digest: str, name: str, floor: int, device: str, created: float, last_used: float
    ) -> None:
        self.conn.execute(
            "INSERT INTO session_tokens (digest, name, floor, device, created, last_used) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (digest) DO UPDATE SET "
            "name = excluded.name, floor = excluded.floor, device = excluded.device, "
            "created = excluded.created, last_used = excluded.last_used",
            (digest, name, floor, escape_text(device), created, last_used),
        )

    def touch_session_token(self, digest: str, last_used: float) -> None:
        self.conn.execute(
            "UPDATE session_tokens SET last_used = greatest(last_used, %s) WHERE digest = %s",
            (last_used, digest),
        )

    def delete_session_tokens(self, digests: Sequence[str]) -> int:
        cur = self.conn.execute(
            "DELETE FROM session_tokens WHERE digest = ANY(%s)", (list(digests),)
        )
        return cur.rowcount

    def delete_user_session_tokens(self, name: str) -> int:
        return self.conn.execute("DELETE FROM session_tokens WHERE name = %s", (name,)).rowcount

    def session_tokens(self) -> list[tuple[str, str, int, str, float, float]]:
        rows = self.conn.execute(
            "SELECT t.digest, t.name, t.floor, t.device, t.created, t.last_used "
            "FROM session_tokens t JOIN users u ON u.name = t.name AND u.floor = t.floor "
            "ORDER BY t.last_used"
        )
        return [
            (r[0], r[1], int(r[2]), unescape_text(r[3]), float(r[4]), float(r[5])) for r in rows
        ]

    def expire_session_tokens(self, before: float) -> int:
        return self.conn.execute(
            "DELETE FROM session_tokens t WHERE t.last_used < %s OR NOT EXISTS "
            "(SELECT 1 FROM users u WHERE u.name = t.name AND u.floor = t.floor)",
            (before,),
        ).rowcount

    def grant_admin(self, name: str, ts: float) -> bool:
        cur = self.conn.execute(
            "INSERT INTO admins (name, floor, ts) SELECT name, floor, %s FROM users "
            "WHERE name = %s ON CONFLICT (name) DO UPDATE SET floor = excluded.floor, "
            "ts = excluded.ts",
            (ts, name),
        )
        return cur.rowcount > 0

    def revoke_admin(self, name: str) -> bool:
        cur = self.conn.execute(
            "DELETE FROM admins WHERE name = %s "
            "AND floor = (SELECT floor FROM users WHERE name = %s)",
            (name, name),
        )
        return cur.rowcount > 0

    def admins(self) -> dict[str, float]:
        rows = self.conn.execute(
            "SELECT a.name, a.ts FROM admins a "
            "JOIN users u ON u.name = a.name AND u.floor = a.floor"
        )
        return {r[0]: float(r[1]) for r in rows}

    def add_report(self, report: dict[str, Any]) -> int:
        values = [report[k] for k in REPORT_FIELDS[1:]]
        values[2] = escape_text(values[2])  # reason
        values[7] = escape_text(values[7])  # excerpt
        row = self.conn.execute(
            "INSERT INTO reports (reporter, msg_id, reason, ts, sender, recipient, pos, "
            "excerpt) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            tuple(values),
        ).fetchone()
        assert row is not None  # RETURNING gives the row inserted
        return int(row[0])

    def reports(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT {', '.join(REPORT_FIELDS)} FROM reports WHERE id < %s "
            "ORDER BY id DESC LIMIT %s",
            (before if before is not None else 2**63 - 1, limit),
        )
        out = []
        for r in rows:
            rep = report_row(r)
            rep["reason"] = unescape_text(rep["reason"])
            rep["excerpt"] = unescape_text(rep["excerpt"])
            out.append(rep)
        return out

    def delete_user(
        self,
        name: str,
        address: str,
        items: Sequence[Envelope] = (),
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> bool:
        """Delete an account with the items ending its standing (one transaction, see
        ``IStore.delete_user``); ``items`` get their positions.  True if it existed."""
        out, _ = self.commit_batch([items], {}, [outbox], [False], None, [(name, address)])
        if isinstance(out[0], NoSuchAccount):
            return False
        if isinstance(out[0], Exception):
            raise out[0]
        for env, pos in zip(items, out[0], strict=True):
            env.pos = pos  # type: ignore[assignment]
        return True

    def _delete_account(self, name: str, address: str) -> None:
        """Inside a commit, before its batch's outbox rows: the account's rows go (its
        pending requests too: an answer must not land on a later account of the name)
        and one position is consumed, so an account created later under this name
        starts after everything before."""
        c = self.conn
        c.execute("DELETE FROM users WHERE name = %s", (name,))
        c.execute("DELETE FROM acks WHERE addr = %s", (address,))
        c.execute("DELETE FROM uploads WHERE user_name = %s", (escape_text(address),))
        c.execute("DELETE FROM requests WHERE actor = %s", (address,))
        c.execute("DELETE FROM read_markers WHERE user_addr = %s", (address,))
        c.execute("DELETE FROM prefs WHERE user_addr = %s", (address,))
        c.execute("SELECT nextval('items_pos')")

    def list_users(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM users ORDER BY name")]

    # streams ------------------------------------------------------------------------

    _COPY_ITEMS = (
        "COPY items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) FROM STDIN"
    )

    def _next(self, seq: str, n: int) -> list[int]:
        """``n`` new values of sequence ``seq``, increasing."""
        if n <= 0:
            return []
        rows = self.conn.execute(
            sql.SQL("SELECT nextval({}) AS v FROM generate_series(1, %s) ORDER BY v").format(
                sql.Literal(seq)
            ),
            (n,),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _copy(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)

    def append_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
    ) -> list[list[int | None] | Exception]:
        """Commit every batch in one transaction; return positions per batch."""
        return self.commit_batch(batches, acks, outbox, remote, outbox_acks)[0]

    def commit_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
        deletions: Sequence[tuple[str, str] | None] | None = None,
        reads: dict[tuple[str, str], int] | None = None,
    ) -> CommitResult:
        """Commit every batch in one transaction: positions per batch, and the outbox
        rows queued as ``(realm, seq, envelope or request)`` in sequence order.

        Fast path: the positions of every item in one ``nextval`` query, the items in
        one ``COPY``.  If that fails (an id taken, a value out of range), the
        transaction is redone batch by batch under savepoints, so one bad batch fails
        alone and never takes the others with it.  The rest is as for SQLite (see
        :meth:`chatproto.store.sqlite.SQLiteDB.commit_batch`).
        """
        flags = list(remote) if remote is not None else [False] * len(batches)
        args = (batches, flags, acks, outbox, outbox_acks, deletions, reads)
        try:
            return self._commit(*args, each=False)
        except psycopg.OperationalError:
            raise  # the connection, not the data: the caller sees it
        except Exception:
            return self._commit(*args, each=True)

    def _commit(
        self,
        batches: Sequence[Sequence[Envelope]],
        flags: list[bool],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None,
        outbox_acks: dict[str, int] | None,
        deletions: Sequence[tuple[str, str] | None] | None,
        reads: dict[tuple[str, str], int] | None,
        each: bool,
    ) -> CommitResult:
        c = self.conn
        queued_rows: list[tuple[str, int, Any]] = []
        self.commit_sent = False
        self._register_writer()
        with c.transaction():
            self._begin_commit()
            missing: dict[int, Exception] = {}
            if deletions is not None and any(deletions):  # as in SQLiteDB.commit_batch
                batches = list(batches)
                outbox = list(outbox) if outbox is not None else [()] * len(batches)
                for i, account in enumerate(deletions):
                    if account is not None and self.user_floor(account[0]) is None:
                        missing[i] = NoSuchAccount(account[0])
                        batches[i], outbox[i] = [], []
            if each:
                out = self._append_each(batches, flags)
            else:
                out = self._append_all(batches, flags)
            for i, err in missing.items():
                out[i] = err
            for i, account in enumerate(deletions or ()):
                if account is not None and not isinstance(out[i], Exception):
                    self._delete_account(*account)
            if outbox:
                rows: list[tuple[str, int, str | None]] = []
                requests: list[tuple[Any, ...]] = []
                for batch, queued, res in zip(batches, outbox, out, strict=True):
                    if not queued or isinstance(res, Exception):
                        continue
                    where = {id(e): p for e, p in zip(batch, res, strict=True)}
                    for realm, env in queued:
                        if isinstance(env, dict):
                            rows.append((realm, 0, json.dumps(env)))
                            queued_rows.append((realm, 0, dict(env)))
                            if env.get("kind") == "request":
                                requests.append(_request_row(env))
                            continue
                        pos = where.get(id(env))
                        if pos is not None:
                            rows.append((realm, pos, None))
                            queued_rows.append((realm, 0, env))
                if rows:
                    seqs = self._next("outbox_seq", len(rows))
                    self._copy(
                        "COPY outbox (seq, realm, pos, payload) FROM STDIN",
                        ((s, *r) for s, r in zip(seqs, rows, strict=True)),
                    )
                    for k, (realm, _, env) in enumerate(queued_rows):
                        queued_rows[k] = (realm, seqs[k], env)
                if requests:
                    with c.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO requests VALUES (%s, %s, %s, %s, %s) "
                            "ON CONFLICT (id) DO NOTHING",
                            requests,
                        )
            if outbox_acks:
                with c.cursor() as cur:
                    cur.executemany(
                        "DELETE FROM outbox WHERE realm = %s AND seq <= %s",
                        list(outbox_acks.items()),
                    )
            if acks:
                with c.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO acks VALUES (%s, %s, %s) ON CONFLICT (addr, device) "
                        "DO UPDATE SET pos = greatest(acks.pos, excluded.pos)",
                        [(u, escape_text(d), p) for (u, d), p in acks.items()],
                    )
            if reads:
                self._set_reads(reads)
            self._end_commit()
            self.commit_sent = True  # past here a lost connection leaves it unknown
            synced = time.perf_counter()
        self.sync_seconds = time.perf_counter() - synced
        return out, queued_rows

    def _id_key(self) -> bytes:
        if self._key is None:
            row = self.conn.execute("SELECT value FROM settings WHERE key = 'id_key'").fetchone()
            if row is None:
                raise RuntimeError(f"{self.path}: settings.id_key is missing")
            self._key = bytes.fromhex(row[0])
        return self._key

    def _stored_ids(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Which of ``ids`` are stored already, with their (sender, recipient)."""
        rows = self.conn.execute(
            "SELECT id, sender, recipient FROM items WHERE id = ANY(%s)",
            ([escape_text(i) for i in ids],),
        ).fetchall()
        return {unescape_text(r[0]): (r[1], r[2]) for r in rows}

    def _append_all(
        self, batches: Sequence[Sequence[Envelope]], remote: Sequence[bool]
    ) -> list[list[int | None] | Exception]:
        """Every item of every batch in one ``COPY``, in batch order; remote items
        de-duplicated first, as in SQLite's ``_append_all``."""
        remote_ids = [e.id for b, r in zip(batches, remote, strict=True) if r for e in b]
        seen = self._stored_ids(remote_ids) if remote_ids else {}
        renamed: list[tuple[Envelope, str]] = []
        plan: list[list[bool] | None] = []  # per batch: which items are inserted
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
                    e.id = alternate_id(e, self._id_key())
                    had = seen.get(e.id) or self._stored_ids([e.id]).get(e.id)
                if had is None:
                    seen[e.id] = who
                mask.append(had is None)
            chosen.extend(e for e, m in zip(batch, mask, strict=True) if m)
            plan.append(mask)
        try:
            positions = self._next("items_pos", len(chosen))
            if chosen:
                self._copy(
                    self._COPY_ITEMS,
                    (_item_row(e, p) for e, p in zip(chosen, positions, strict=True)),
                )
            out: list[list[int | None] | Exception] = []
            files: list[tuple[Envelope, int]] = []
            it = iter(positions)
            for batch, inserted in zip(batches, plan, strict=True):
                got: list[int | None] = []
                for k, e in enumerate(batch):
                    if inserted is None or inserted[k]:
                        pos = next(it)
                        got.append(pos)
                        if e.kind in _INDEXED:
                            files.append((e, pos))
                    else:
                        got.append(None)
                out.append(got)
            if files:
                self._index_files([e for e, _ in files], [p for _, p in files])
            return out
        except Exception:
            for e, original in renamed:  # redone item by item (_append_each)
                e.id = original
            raise

    _INSERT = (
        "INSERT INTO items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    _INSERT_REMOTE = (
        "INSERT INTO items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) "
        "VALUES (nextval('items_pos'), %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (id) DO NOTHING RETURNING pos"
    )

    def _insert_remote(self, batch: Sequence[Envelope]) -> list[int | None]:
        """Insert items from another realm one by one, skipping ids stored already
        (and moving one whose id another conversation took to its alternate id)."""
        c = self.conn
        out: list[int | None] = []
        for env in batch:
            row = c.execute(self._INSERT_REMOTE, _item_row(env, 0)[1:]).fetchone()
            if row is None:  # stored already -- or the id is taken by another item
                had = self._stored_ids([env.id]).get(env.id)
                if had is not None and had != (env.sender, env.recipient):
                    env.id = alternate_id(env, self._id_key())
                    row = c.execute(self._INSERT_REMOTE, _item_row(env, 0)[1:]).fetchone()
            out.append(int(row[0]) if row else None)
        files = [(e, pos) for e, pos in zip(batch, out, strict=True) if e.kind in _INDEXED and pos]
        if files:
            self._index_files([e for e, _ in files], [pos for _, pos in files if pos])
        return out

    def _append_each(
        self, batches: Sequence[Sequence[Envelope]], remote: Sequence[bool]
    ) -> list[list[int | None] | Exception]:
        c = self.conn
        out: list[list[int | None] | Exception] = []
        for batch, is_remote in zip(batches, remote, strict=True):
            try:
                with c.transaction():  # a savepoint: one bad batch fails alone
                    positions: list[int | None]
                    if is_remote:
                        positions = self._insert_remote(batch)
                    else:
                        local = self._next("items_pos", len(batch))
                        with c.cursor() as cur:
                            cur.executemany(
                                self._INSERT,
                                [_item_row(e, p) for e, p in zip(batch, local, strict=True)],
                            )
                        self._index_files(batch, local)
                        positions = list(local)
                out.append(positions)
            except psycopg.OperationalError:
                raise
            except Exception as err:  # one bad batch must not fail the others
                out.append(err)
        return out

    _COPY_FILES = (
        "COPY files (file_id, sha256, size, name, media_type, sender, recipient, ts, pos) "
        "FROM STDIN"
    )

    def _index_files(self, batch: Sequence[Envelope], positions: Sequence[int]) -> None:
        """Record the file of each ``file`` item (with its message's position), and
        wipe the item each ``delete`` item deletes."""
        rows = []
        for env, pos in zip(batch, positions, strict=True):
            ref = env.meta.get("ref") if env.kind != "file" and env.meta is not None else None
            if isinstance(ref, str):  # an edit, delete or reaction (chatproto.relations)
                self.conn.execute(
                    "INSERT INTO refs VALUES (%s, %s) ON CONFLICT DO NOTHING", (ref, pos)
                )
            if env.kind == "delete" and env.meta is not None:
                self._wipe(env)
            elif env.kind == "edit" and env.meta is not None:
                self.conn.execute(
                    "UPDATE items SET body = '' WHERE pos = %s AND EXISTS (SELECT 1 FROM items "
                    "WHERE id = %s AND meta = %s)",
                    (pos, escape_text(str(env.meta.get("ref"))), self._DELETED),
                )
            if env.kind == "file" and env.meta is not None and "file_id" in env.meta:
                m = env.meta
                rows.append(
                    (
                        escape_text(m["file_id"]),
                        m["sha256"],
                        m["size"],
                        escape_text(m["name"]),
                        escape_text(m["media_type"]),
                        env.sender,
                        env.recipient,
                        env.ts,
                        pos,
                    )
                )
        if rows:
            self._copy(self._COPY_FILES, rows)

    _DELETED = json.dumps(DELETED_META)

    def _wipe(self, env: Envelope) -> None:
        """Inside a commit: the item ``env`` (a ``delete``) deletes loses its content
        (as in :meth:`chatproto.store.sqlite.SQLiteDB._wipe`): body, meta, signature,
        the bodies of its edits and its file record."""
        ref = env.meta.get("ref") if env.meta is not None else None
        if not isinstance(ref, str):
            return
        c = self.conn
        row = c.execute(
            "SELECT kind, meta FROM items WHERE id = %s AND conv = %s",
            (escape_text(ref), env.conversation),
        ).fetchone()
        if row is None or row[0] not in TARGET_KINDS:
            return
        c.execute(
            "UPDATE items SET body = '', meta = %s, sig = NULL WHERE id = %s",
            (self._DELETED, escape_text(ref)),
        )
        c.execute(
            "UPDATE items SET body = '' WHERE pos IN (SELECT pos FROM refs WHERE ref = %s) "
            "AND kind = 'edit'",
            (ref,),
        )
        meta = stored_meta(row[1])
        if row[0] == "file" and meta is not None and isinstance(meta.get("file_id"), str):
            c.execute("DELETE FROM files WHERE file_id = %s", (escape_text(meta["file_id"]),))

    def _refs(self, items: Sequence[Envelope], edits_only: bool = False) -> list[Envelope]:
        """The items that refer to any of ``items`` (edits, deletes, reactions; with
        ``edits_only``, edits), oldest first."""
        # A ref is never escaped (no control characters: chatproto.relations); an id
        # that is matches none, but must not reach the server unescaped.
        ids = [escape_text(e.id) for e in items if e.kind in TARGET_KINDS]
        if not ids:
            return []
        kinds = "kind = 'edit' AND " if edits_only else ""
        rows = self.conn.execute(
            f"SELECT {_COLS} FROM items WHERE {kinds}{_REF_KINDS_SQL} "
            "AND pos IN (SELECT pos FROM refs WHERE ref = ANY(%s)) ORDER BY pos",
            (ids,),
        ).fetchall()
        return [_row(r) for r in rows]

    # federation outbox ----------------------------------------------------------------

    def outbox_read(
        self, realm: str, after: int, limit: int, upto: int | None = None
    ) -> list[tuple[int, Envelope | dict[str, Any]]]:
        """Queued entries: stored items (Envelopes) and requests (dicts), in order;
        with ``upto``, none with a greater seq."""
        rows = self.conn.execute(
            f"SELECT o.seq, o.payload, {', '.join('i.' + c for c in _COLS.split(', '))} "
            "FROM outbox o LEFT JOIN items i ON i.pos = o.pos "
            "WHERE o.realm = %s AND o.seq > %s AND o.seq <= %s ORDER BY o.seq LIMIT %s",
            (realm, after, upto if upto is not None else 2**62, limit),
        ).fetchall()
        return [(r[0], json.loads(r[1]) if r[1] is not None else _row(r[2:])) for r in rows]

    def outbox_enqueue(self, realm: str, payloads: Sequence[dict[str, Any]]) -> None:
        with self.conn.transaction():
            seqs = self._next("outbox_seq", len(payloads))
            self._copy(
                "COPY outbox (seq, realm, pos, payload) FROM STDIN",
                ((s, realm, 0, json.dumps(p)) for s, p in zip(seqs, payloads, strict=True)),
            )
            requests = [_request_row(p) for p in payloads if p.get("kind") == "request"]
            if requests:
                with self.conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO requests VALUES (%s, %s, %s, %s, %s) "
                        "ON CONFLICT (id) DO NOTHING",
                        requests,
                    )

    def outbox_ack(self, realm: str, seq: int) -> None:
        self.conn.execute("DELETE FROM outbox WHERE realm = %s AND seq <= %s", (realm, seq))

    def outbox_counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT realm, count(*) FROM outbox GROUP BY realm").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def outbox_stats(self) -> dict[str, tuple[int, float | None]]:
        rows = self.conn.execute(
            "SELECT q.realm, q.n, i.ts, o.payload "
            "FROM (SELECT realm, count(*) AS n, min(seq) AS first FROM outbox GROUP BY realm) q "
            "JOIN outbox o ON o.seq = q.first LEFT JOIN items i ON i.pos = o.pos AND o.pos > 0"
        ).fetchall()
        out: dict[str, tuple[int, float | None]] = {}
        for realm, n, ts, payload in rows:
            if ts is None and payload is not None:
                try:
                    ts = json.loads(payload).get("ts")
                except (ValueError, AttributeError):
                    ts = None
            out[realm] = (int(n), _number(ts))
        return out

    def outbox_holds(self, realm: str, pos: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM outbox WHERE realm = %s AND pos = %s LIMIT 1", (realm, pos)
        ).fetchone()
        return row is not None

    def pending_requests(self, actor: str, group: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT payload FROM requests WHERE actor = %s AND grp = %s ORDER BY ts, id",
            (escape_text(actor), escape_text(group)),
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def request_done(self, request_id: str) -> None:
        self.conn.execute("DELETE FROM requests WHERE id = %s", (escape_text(request_id),))

    def expire_requests(self, before: float) -> int:
        cur = self.conn.execute("DELETE FROM requests WHERE ts < %s", (before,))
        return int(cur.rowcount)

    # reads --------------------------------------------------------------------------

    def stored_item(self, item_id: str) -> Envelope | None:
        row = self.conn.execute(
            f"SELECT {_COLS} FROM items WHERE id = %s", (escape_text(item_id),)
        ).fetchone()
        return _row(row) if row is not None else None

    def ref_count(self, ref: str, sender: str) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM refs JOIN items ON items.pos = refs.pos WHERE refs.ref = %s "
            "AND items.sender = %s AND items.kind IN ('edit', 'reaction')",
            (escape_text(ref), escape_text(sender)),
        ).fetchone()
        return int(row[0]) if row is not None else 0

    def peer_keys(self) -> dict[str, list[dict[str, str]]]:
        rows = self.conn.execute("SELECT realm, keys FROM peer_keys ORDER BY realm").fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def set_peer_keys(self, realm: str, keys: list[dict[str, str]]) -> None:
        self.conn.execute(
            "INSERT INTO peer_keys VALUES (%s, %s) "
            "ON CONFLICT (realm) DO UPDATE SET keys = excluded.keys",
            (realm, json.dumps(keys)),
        )

    def read_feed(
        self,
        user: str,
        after: int,
        limit: int,
        groups: Sequence[tuple[str, int, int | None]] = (),
        upto: int | None = None,
    ) -> list[Envelope]:
        """Private items to or from ``user``, and items of ``groups`` within their
        ``(lo, hi]`` ranges, after ``after`` (and with ``upto``, none above it);
        oldest first."""
        bound = "" if upto is None else " AND pos <= %s"
        parts = [
            f"SELECT {_COLS} FROM items WHERE recipient = %s AND pos > %s{bound}",
            f"SELECT {_COLS} FROM items WHERE sender = %s AND pos > %s{bound} "
            "AND recipient <> sender AND left(recipient, 1) <> '#'",
        ]
        params: list[Any] = [user, after] if upto is None else [user, after, upto]
        params += params
        for group, lo, hi in groups:
            if hi is not None and hi <= after:
                continue
            part = f"SELECT {_COLS} FROM items WHERE recipient = %s AND pos > %s"
            params += [group, max(after, lo)]
            if hi is not None:
                part += " AND pos <= %s"
                params.append(hi)
            parts.append(part)
        # UNION (not ALL): ranges may overlap (an invite, then a membership under the
        # history rule "all"), and a duplicate row would waste the page.
        query = " UNION ".join(f"({p})" for p in parts) + " ORDER BY pos LIMIT %s"
        params.append(limit)
        items = [_row(r) for r in self.conn.execute(query, params).fetchall()]
        return current_view(items, self._refs(items, edits_only=True), reactions=False)

    def read_events(self, after: int, limit: int, upto: int | None = None) -> list[Envelope]:
        """Group events (kind ``event``) after ``after`` (none above ``upto``), oldest
        first (for replay)."""
        rows = self.conn.execute(
            f"SELECT {_COLS} FROM items WHERE kind = 'event' AND pos > %s AND pos <= %s "
            "ORDER BY pos LIMIT %s",
            (after, 2**62 if upto is None else upto, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def conversation_partners(self, user: str, after: int = 0) -> list[str]:
        """The users ``user`` has a private conversation with (after ``after``)."""
        rows = self.conn.execute(
            "SELECT DISTINCT sender FROM items WHERE recipient = %(u)s AND sender <> %(u)s "
            "AND pos > %(a)s "
            "UNION SELECT DISTINCT recipient FROM items WHERE sender = %(u)s "
            "AND recipient <> %(u)s AND left(recipient, 1) <> '#' AND pos > %(a)s",
            {"u": user, "a": after},
        ).fetchall()
        return [r[0] for r in rows]

    def history(
        self,
        conversation: str,
        before: int | None,
        after: int | None,
        limit: int,
        floor: int = 0,
        upto: int | None = None,
    ) -> list[Envelope]:
        c = self.conn
        if after is not None:
            rows = c.execute(
                f"SELECT {_COLS} FROM items WHERE conv = %s AND pos > %s AND pos <= %s "
                f"AND NOT {_REF_KINDS_SQL} ORDER BY pos LIMIT %s",
                (conversation, max(after, floor), 2**62 if upto is None else upto, limit),
            ).fetchall()
        else:
            bound = before if before is not None else 2**62
            rows = c.execute(
                f"SELECT {_COLS} FROM items WHERE conv = %s AND pos < %s AND pos > %s "
                f"AND NOT {_REF_KINDS_SQL} ORDER BY pos DESC LIMIT %s",
                (conversation, bound, floor, limit),
            ).fetchall()
            rows.reverse()
        items = [_row(r) for r in rows]
        return current_view(items, self._refs(items))

    def get_ack(self, user: str, device: str) -> int:
        c = self.conn
        row = c.execute(
            "SELECT pos FROM acks WHERE addr = %s AND device = %s", (user, escape_text(device))
        ).fetchone()
        if row:
            return int(row[0])
        row = c.execute("SELECT max(pos) FROM acks WHERE addr = %s", (user,)).fetchone()
        return int(row[0] or 0) if row else 0

    def max_pos(self) -> int:
        row = self.conn.execute("SELECT max(pos) FROM items").fetchone()
        return int(row[0] or 0) if row else 0

    # read markers, conversations, preferences (queries in chatproto/store/reading.py)

    def _rows(self, query: str, params: Sequence[Any]) -> list[Any]:
        return self.conn.execute(query.replace("?", "%s"), params).fetchall()  # type: ignore[arg-type]

    def _item(self, row: Any) -> Envelope:
        return _row(row)

    def _mention_sql(self) -> tuple[str, Any]:
        return "body ~* ?", mention_pattern

    def _search_sql(self, words: Sequence[str]) -> tuple[str, str, Any]:
        query = " & ".join(f"'{w}':*" for w in words)  # words are letters and digits
        cond = "to_tsvector('simple', s.body) @@ to_tsquery('simple', ?)"
        return "JOIN search_text s ON s.pos = items.pos", cond, query

    def _current(self, items: list[Envelope]) -> list[Envelope]:
        return current_view(items, self._refs(items))

    def index_search(self, limit: int) -> int:
        """Nothing to do: a trigger keeps search_text in each item's transaction."""
        return 0

    def _set_reads(self, reads: dict[tuple[str, str], int]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO read_markers VALUES (%s, %s, %s) ON CONFLICT (conv, user_addr) "
                "DO UPDATE SET pos = greatest(read_markers.pos, excluded.pos)",
                [(conv, u, p) for (u, conv), p in reads.items()],
            )

    def set_pref(self, user: str, key: str, value: str | None) -> None:
        """Set (or with None, clear) preference ``key`` of ``user``."""
        if value is None:
            self.conn.execute("DELETE FROM prefs WHERE user_addr = %s AND key = %s", (user, key))
        else:
            self.conn.execute(
                "INSERT INTO prefs VALUES (%s, %s, %s) "
                "ON CONFLICT (user_addr, key) DO UPDATE SET value = excluded.value",
                (user, key, value),
            )

    # files --------------------------------------------------------------------------

    _FILE_COLS = ", ".join(FILE_META) + ", sender, recipient, ts, pos"

    def file_info(self, file_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            f"SELECT {self._FILE_COLS} FROM files WHERE file_id = %s", (escape_text(file_id),)
        ).fetchone()
        if row is None:
            return None
        rec = dict(zip((*FILE_META, "sender", "recipient", "ts", "pos"), row, strict=True))
        for k in ("file_id", "name", "media_type"):
            rec[k] = unescape_text(rec[k])
        rec["ts"] = shown_ts(rec["ts"])
        return rec

    def file_usage(self, sender: str, after: int = 0) -> int:
        row = self.conn.execute(
            "SELECT coalesce(sum(size), 0) FROM files WHERE sender = %s AND pos > %s",
            (sender, after),
        ).fetchone()
        return int(row[0]) if row else 0

    def expire_files(self, before: float) -> list[str]:
        c = self.conn
        with c.transaction():
            digests = {
                r[0]
                for r in c.execute(
                    "DELETE FROM files WHERE ts < %s RETURNING sha256", (before,)
                ).fetchall()
            }
            if not digests:
                return []
            still = {
                r[0]
                for r in c.execute(
                    "SELECT DISTINCT sha256 FROM files WHERE sha256 = ANY(%s)", (list(digests),)
                ).fetchall()
            }
        return sorted(digests - still)

    def blob_referenced(self, sha256: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM files WHERE sha256 = %s LIMIT 1", (sha256,)
        ).fetchone()
        return row is not None

    def put_upload(self, record: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO uploads (upload_id, user_name, record) VALUES (%s, %s, %s) "
            "ON CONFLICT (upload_id) DO UPDATE SET user_name = excluded.user_name, "
            "record = excluded.record",
            (escape_text(record["upload_id"]), escape_text(record["user"]), json.dumps(record)),
        )

    def delete_upload(self, upload_id: str) -> None:
        self.conn.execute("DELETE FROM uploads WHERE upload_id = %s", (escape_text(upload_id),))

    def list_uploads(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT record FROM uploads ORDER BY upload_id").fetchall()
        return [json.loads(r[0]) for r in rows]

    # bulk copy (chatrealmctl migrate-store) ---------------------------------------------

    def is_empty(self) -> bool:
        """No account, item, queued delivery or file recorded yet."""
        row = self.conn.execute(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM items) "
            "+ (SELECT count(*) FROM outbox) + (SELECT count(*) FROM files) "
            "+ (SELECT count(*) FROM uploads) + (SELECT count(*) FROM acks) "
            "+ (SELECT count(*) FROM requests)"
        ).fetchone()
        return not row or int(row[0]) == 0


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
    ) -> None:
        super().__init__(reactor, readers, "postgresql")
        self.dsn = dsn
        self.schema = schema
        self.path = describe_dsn(dsn, schema)
        #: The cluster worker this store writes as (None: the realm's only writer).
        self.worker = worker
        #: With several writers: reads return no item above this position, the last
        #: :meth:`safe_position` seen (a reader never sees an item while one below it
        #: may still commit).  None: no bound (one writer commits in position order).
        self.visible: int | None = None if worker is None else 0
        self.outbox_visible: int | None = None if worker is None else 0

    def _new_writer(self, create: bool = False) -> PostgresDB:
        return PostgresDB(self.dsn, self.schema, create=create, writer=self.worker or SOLE_WRITER)

    def _open_writer(self) -> PostgresDB:
        writer = self._new_writer(create=True)
        try:
            writer.lock_writer(worker=self.worker)
            writer.migrate()
            if self.visible is not None:
                self.visible, self.outbox_visible = writer.safe_positions()
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
    ) -> CommitResult:
        """A commit whose connection turns out lost before COMMIT was sent committed
        nothing: it is done again, once, on a new connection.  Lost later, whether it
        committed is unknown, so it fails (no sender is told "stored")."""
        db = self._db()
        try:
            return db.commit_batch(batches, acks, outbox, remote, outbox_acks, deletions, reads)
        except psycopg.OperationalError:
            if not db.broken or db.commit_sent:
                raise
            self.log.info("{store}: connection lost; reconnecting", store=self.path)
        return self._db().commit_batch(batches, acks, outbox, remote, outbox_acks, deletions, reads)

    def _retry_read(self, db: Any, error: Exception) -> bool:
        return isinstance(error, psycopg.OperationalError) and bool(db.broken)

    # several writers (issue 16) -----------------------------------------------------

    def safe_position(self) -> Deferred[int]:
        """The position every reader may advance to (see
        :meth:`PostgresDB.safe_position`); with several writers it also raises the
        bound of this store's reads (:attr:`visible`, and :attr:`outbox_visible` for
        the outbox).  Fires with it."""

        def seen(safe: tuple[int, int]) -> int:
            pos, seq = safe
            if self.visible is not None and pos > self.visible:
                self.visible = pos
            if self.outbox_visible is not None and seq > self.outbox_visible:
                self.outbox_visible = seq
            return pos

        return self._read(lambda db: db.safe_positions()).addCallback(seen)

    def outbox_read(self, realm: str, after: int, limit: int) -> Deferred[list[Any]]:
        """With several writers, from the database (outbox rows of every worker),
        never above :attr:`outbox_visible`: a row that commits late below one the
        link has acknowledged would otherwise be deleted unsent."""
        upto = self.outbox_visible
        if upto is None:
            return super().outbox_read(realm, after, limit)
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
