"""The synchronous core of the PostgreSQL store: one connection to one schema.

Part of :mod:`chatproto.store.postgresql`: :class:`PostgresDB` opens the connection,
migrates the schema and answers the reads; its append path
(:mod:`chatproto.store.postgresql.commit`), its writer positions
(:mod:`chatproto.store.postgresql.writers`) and its search index
(:mod:`chatproto.store.postgresql.search`) are mixins beside it.  ``chatrealmctl``
uses it directly; :class:`chatproto.store.postgresql.PostgresStore` runs it in
threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from chatproto.envelope import Envelope
from chatproto.mentions import mention_pattern
from chatproto.store import (
    stored_number,
)
from chatproto.store.accounts import AccountsSQL
from chatproto.store.acks import KnownAcks
from chatproto.store.filerows import FilesSQL
from chatproto.store.peers import OutboxSQL, PeerKeysSQL
from chatproto.store.postgresql.commit import CommitSQL
from chatproto.store.postgresql.rows import (
    escape_text,
    item_of_row,
    unescape_text,
)
from chatproto.store.postgresql.schema import MIGRATIONS, SCHEMA_VERSION
from chatproto.store.postgresql.search import SearchIndex
from chatproto.store.postgresql.writers import CTL_WRITER, inflight_lock_key, schema_lock_key
from chatproto.store.reading import ReadingSQL
from chatproto.store.userconvs import UserConvs

__all__ = ["CONNECT_TIMEOUT", "PostgresDB", "describe_dsn"]

#: Seconds to wait for the server when connecting (unless the DSN says otherwise).
CONNECT_TIMEOUT = 10


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


class PostgresDB(CommitSQL, SearchIndex, AccountsSQL, ReadingSQL, PeerKeysSQL, OutboxSQL, FilesSQL):
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
        self._inflight = inflight_lock_key(schema, writer)
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
        self._user_convs = UserConvs()
        #: The acks rows this connection knows are committed (chatproto/store/acks.py).
        self._known_acks = KnownAcks()
        self._locked = False
        #: Seconds the last group commit's COMMIT took (the server's WAL flush and the
        #: round trip; for the metrics).
        self.sync_seconds = 0.0
        #: Whether the last ``commit_batch`` got as far as sending COMMIT (if its
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
            c.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock_key(self.schema) ^ 1,))
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

    # accounts (the statements: chatproto/store/accounts.py) -------------------------

    ITEMS_TOP = "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM items_pos)"
    DUPLICATE = psycopg.errors.UniqueViolation

    def _run(self, query: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(query.replace("?", "%s"), params)  # type: ignore[arg-type]

    def _run_many(self, query: str, rows: Sequence[Sequence[Any]]) -> int:
        with self.conn.cursor() as cur:
            cur.executemany(query.replace("?", "%s"), rows)  # type: ignore[arg-type]
            return int(cur.rowcount)

    def _text_in(self, text: str) -> str:
        return escape_text(text)

    def _text_out(self, text: Any) -> str:
        return unescape_text(str(text))

    def _delete_account(self, name: str, address: str) -> None:
        """Inside a commit, before its batch's outbox rows: the account's rows go (its
        pending requests too: an answer must not land on a later account of the name)
        and one position is consumed, so an account created later under this name
        starts after everything before."""
        c = self.conn
        c.execute("DELETE FROM users WHERE name = %s", (name,))
        c.execute("DELETE FROM acks WHERE addr = %s", (address,))
        self._known_acks.forget_all()
        c.execute("DELETE FROM uploads WHERE user_name = %s", (escape_text(address),))
        c.execute("DELETE FROM requests WHERE actor = %s", (address,))
        c.execute("DELETE FROM read_markers WHERE user_addr = %s", (address,))
        c.execute("DELETE FROM prefs WHERE user_addr = %s", (address,))
        c.execute("SELECT nextval('items_pos')")

    # federation outbox (written in commit_batch; the rest: OutboxSQL, store/peers.py)

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
            out[realm] = (int(n), stored_number(ts))
        return out

    # reads (the item reads: chatproto/store/reading.py) ----------------------------

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

    def _item(self, row: Any) -> Envelope:
        return item_of_row(row)

    def _mention_sql(self) -> tuple[str, Any]:
        return "body ~* ?", mention_pattern

    #: A commit's read markers, one statement over rows in their key's order
    #: (see :meth:`_set_reads`).
    _UPSERT_READS = (
        "INSERT INTO read_markers SELECT * FROM unnest(%s::text[], %s::text[], "
        "%s::bigint[]) ON CONFLICT (conv, user_addr) "
        "DO UPDATE SET pos = greatest(read_markers.pos, excluded.pos)"
    )

    def _set_reads(self, reads: dict[tuple[str, str], int]) -> None:
        """Store ``(user, conv) -> position`` markers (a marker only moves forward).
        One statement whose rows are sorted by the table's key: every writer (the
        workers of a realm share the table) locks the rows it updates in one order, so
        two commits setting markers of the same rows wait for each other instead of
        deadlocking (the server would end one of them, failing its whole group commit),
        as the acks' upsert (commit.py, _UPSERT_ACKS)."""
        keys = sorted((conv, user) for user, conv in reads)
        self.conn.execute(
            self._UPSERT_READS,
            (
                [conv for conv, _ in keys],
                [user for _, user in keys],
                [reads[u, c] for c, u in keys],
            ),
        )

    # files (the reads: FilesSQL, chatproto/store/filerows.py) -------------------------

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

    def put_upload(self, record: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO uploads (upload_id, user_name, record) VALUES (%s, %s, %s) "
            "ON CONFLICT (upload_id) DO UPDATE SET user_name = excluded.user_name, "
            "record = excluded.record",
            (escape_text(record["upload_id"]), escape_text(record["user"]), json.dumps(record)),
        )

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
