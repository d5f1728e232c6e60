"""SQLite implementation of :class:`chatproto.store.IStore`: the embedded default.

Layout: :class:`SQLiteDB` is the synchronous core (one connection, plain methods),
used directly by ``chatrealmctl`` and run in threads by :class:`SQLiteStore`, which is
the group-committing front end of :mod:`chatproto.store.groupcommit` over it: one
writer thread, a few reader threads (WAL lets them read while the writer commits), one
fsync per batch of appends.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from chatproto.envelope import MAX_SHOWN_TS, Envelope, alternate_id, shown_ts
from chatproto.mentions import mentions
from chatproto.relations import DELETED_META, TARGET_KINDS
from chatproto.store import (
    FILE_META,
    MAX_DEVICES,
    IStore,
    stored_meta,
    stored_number,
    stored_sig,
)
from chatproto.store.accounts import AccountsSQL
from chatproto.store.acks import KnownAcks
from chatproto.store.filerows import FilesSQL
from chatproto.store.groupcommit import (
    GroupCommitStore,
    delete_accounts,
    outbox_rows,
    plan_inserts,
    skip_missing_accounts,
    without_users,
)
from chatproto.store.peers import OutboxSQL, PeerKeysSQL
from chatproto.store.reading import REF_KINDS_SQL, ReadingSQL
from chatproto.store.userconvs import MAX_REMEMBERED, UserConvs

__all__ = [
    "SCHEMA_VERSION",
    "SQLiteDB",
    "SQLiteStore",
]

SCHEMA_VERSION = 18

#: Migrations: MIGRATIONS[n] takes a database at version n to n + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        pwhash TEXT NOT NULL,
        created REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE items (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        conv TEXT NOT NULL,
        ts REAL NOT NULL,
        body TEXT NOT NULL,
        meta TEXT
    );
    CREATE INDEX items_recipient ON items (recipient, pos);
    CREATE INDEX items_sender ON items (sender, pos);
    CREATE INDEX items_conv ON items (conv, pos);
    CREATE TABLE acks (
        user TEXT NOT NULL,
        device TEXT NOT NULL,
        pos INTEGER NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID;
    """,
    # v2: an account sees only items after the position at which it was created, so a
    # name deleted and registered again does not inherit its predecessor's messages.
    """
    ALTER TABLE users ADD COLUMN floor INTEGER NOT NULL DEFAULT 0;
    """,
    # v3: group events are replayed at start-up; keep them findable without a scan.
    """
    CREATE INDEX items_events ON items (pos) WHERE kind = 'event';
    """,
    # v4: federation outbox -- items queued per destination realm, by reference to the
    # stored item (no copy of the body); seq orders the queue and is never reused.
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        realm TEXT NOT NULL,
        pos INTEGER NOT NULL
    );
    CREATE INDEX outbox_realm ON outbox (realm, seq);
    """,
    # v5: files.  A file row is written with its message (same transaction) and
    # names its content by sha256 (blobs on disk are stored once per content); an
    # unfinished upload is kept as a JSON record so it can be resumed after a restart.
    """
    CREATE TABLE files (
        file_id TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        name TEXT NOT NULL,
        media_type TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        ts REAL NOT NULL,
        pos INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX files_sha256 ON files (sha256);
    CREATE INDEX files_sender ON files (sender);
    CREATE INDEX files_ts ON files (ts);
    CREATE TABLE uploads (
        upload_id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        record TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # v6: federation requests (a remote user's join/leave... for a group on another
    # realm) queue in the outbox as JSON, with no item behind them (pos 0).
    """
    ALTER TABLE outbox ADD COLUMN payload TEXT;
    """,
    # v7: realm secrets.  id_key keys alternate ids (chatproto.envelope.alternate_id):
    # random, made by SQLite itself, never leaves the database.
    """
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO settings VALUES ('id_key', lower(hex(randomblob(16))));
    """,
    # v8: group requests this realm sent to other realms, kept until answered: an
    # event in which a local user acts must answer one (a group's home realm may not
    # make a user join, or act, on its own say-so).  Written with the outbox row.
    """
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        actor TEXT NOT NULL,
        grp TEXT NOT NULL,
        ts REAL NOT NULL,
        payload TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX requests_actor ON requests (actor, grp, ts);
    """,
    # v9: signatures.  An item relayed for a user of another realm carries that
    # realm's signature (JSON), and the keys peers announced are cached.
    """
    ALTER TABLE items ADD COLUMN sig TEXT;
    CREATE TABLE peer_keys (
        realm TEXT PRIMARY KEY,
        keys TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # v10: suspended accounts (chatrealmctl suspend).  A suspension names the account
    # by its floor: an account created later under the same name is not suspended.
    """
    CREATE TABLE suspensions (
        name TEXT PRIMARY KEY,
        floor INTEGER NOT NULL,
        reason TEXT NOT NULL,
        ts REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # v11 (issue 18): browser logins (the SHA-256 of each session token, never the
    # token), realm administrators and abuse reports.  Logins and admins name the
    # account by its floor, as suspensions do.
    """
    CREATE TABLE session_tokens (
        digest TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        floor INTEGER NOT NULL,
        device TEXT NOT NULL,
        created REAL NOT NULL,
        last_used REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX session_tokens_name ON session_tokens (name);
    CREATE TABLE admins (
        name TEXT PRIMARY KEY,
        floor INTEGER NOT NULL,
        ts REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE reports (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        reporter TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        ts REAL NOT NULL,
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        pos INTEGER NOT NULL,
        excerpt TEXT NOT NULL
    );
    CREATE INDEX reports_reporter ON reports (reporter, ts);
    """,
    # v12: items that refer to another item (edits, deletes, reactions: issue 17) are
    # found by the id they refer to, for the current view of a page.
    """
    CREATE INDEX items_ref ON items (json_extract(meta, '$.ref'))
        WHERE kind IN ('edit', 'delete', 'reaction');
    """,
    # v13: read markers ("read up to P" per user and conversation; see
    # chatproto/store/reading.py) and per-user preferences (the read-receipt switch).
    """
    CREATE TABLE read_markers (
        conv TEXT NOT NULL,
        user_addr TEXT NOT NULL,
        pos INTEGER NOT NULL,
        PRIMARY KEY (conv, user_addr)
    ) WITHOUT ROWID;
    CREATE INDEX read_markers_user ON read_markers (user_addr);
    CREATE TABLE prefs (
        user_addr TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (user_addr, key)
    ) WITHOUT ROWID;
    """,
    # v14: full-text search (FTS5): the current text of every text and file item (its
    # latest edit's, see chatproto/relations.py), kept by triggers (v15 changes how new
    # items get in).  A body erased (a deletion) leaves the index, and 'optimize'
    # rewrites its segments so its words leave the file too.
    """
    CREATE VIRTUAL TABLE items_fts USING fts5(
        body, tokenize = 'unicode61 remove_diacritics 0'
    );
    CREATE TRIGGER items_fts_insert AFTER INSERT ON items
        WHEN new.kind IN ('text', 'file') AND new.body <> ''
        BEGIN
            INSERT INTO items_fts (rowid, body) VALUES (new.pos, new.body);
        END;
    CREATE TRIGGER items_fts_edit AFTER INSERT ON items
        WHEN new.kind = 'edit'
        BEGIN
            DELETE FROM items_fts WHERE rowid = (
                SELECT pos FROM items WHERE id = json_extract(new.meta, '$.ref')
                AND conv = new.conv AND sender = new.sender AND kind = 'text' AND body <> '');
            INSERT INTO items_fts (rowid, body)
                SELECT pos, new.body FROM items WHERE id = json_extract(new.meta, '$.ref')
                AND conv = new.conv AND sender = new.sender AND kind = 'text' AND body <> '';
        END;
    CREATE TRIGGER items_fts_erase AFTER UPDATE OF body ON items
        WHEN new.body = '' AND old.body <> '' AND old.kind IN ('text', 'file')
        BEGIN
            DELETE FROM items_fts WHERE rowid = old.pos;
            INSERT INTO items_fts (items_fts) VALUES ('optimize');
        END;
    CREATE TRIGGER items_fts_delete AFTER DELETE ON items
        WHEN old.kind IN ('text', 'file')
        BEGIN
            DELETE FROM items_fts WHERE rowid = old.pos;
        END;
    """,
    # v15: what an edit, delete or reaction refers to, in a table of its own written only
    # for those items (the expression index of v12 cost every insert ~10% of the send
    # path's CPU: bench/send_path.py).
    """
    DROP INDEX IF EXISTS items_ref;
    CREATE TABLE IF NOT EXISTS refs (
        ref TEXT NOT NULL,
        pos INTEGER NOT NULL,
        PRIMARY KEY (ref, pos)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO refs
        SELECT json_extract(meta, '$.ref'), pos FROM items
        WHERE kind IN ('edit', 'delete', 'reaction') AND json_valid(meta)
        AND json_type(meta, '$.ref') = 'text';
    """,
    # v16: items are indexed for search by the store when it is idle (in batches,
    # SQLiteDB.index_search), not by a trigger per insert: tokenizing row by row cost
    # the commit path as much again as the insert itself.  search_upto: every text and
    # file item up to it is in the index; search reads the items above it directly.
    # The index keeps no positions or sizes (detail=none: search matches words, not
    # phrases), and is rebuilt from the items by the indexer, which also re-indexes
    # the items edited since its last step.  No trigger fires on an insert: even one
    # that does nothing costs each row of a commit.
    """
    DROP TRIGGER items_fts_insert;
    DROP TRIGGER items_fts_edit;
    DROP TABLE items_fts;
    CREATE VIRTUAL TABLE items_fts USING fts5(
        body, tokenize = 'unicode61 remove_diacritics 0', detail = none, columnsize = 0
    );
    INSERT OR REPLACE INTO settings (key, value) VALUES ('search_upto', '0');
    """,
    # v17 (issue 20): a user's private items are read through the conversations they
    # are in (user_convs, see chatproto/store/userconvs.py) and the items_conv index;
    # the indexes on sender and recipient go: every insert paid for both (with many
    # users, as much again as the rest of the insert: bench/store_micro.py).
    """
    CREATE TABLE IF NOT EXISTS user_convs (
        user_addr TEXT NOT NULL,
        conv TEXT NOT NULL,
        peer TEXT NOT NULL,
        PRIMARY KEY (user_addr, conv)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO user_convs
        SELECT sender, conv, recipient FROM items WHERE substr(recipient, 1, 1) <> '#';
    INSERT OR IGNORE INTO user_convs
        SELECT recipient, conv, sender FROM items WHERE substr(recipient, 1, 1) <> '#';
    DROP INDEX IF EXISTS items_sender;
    DROP INDEX IF EXISTS items_recipient;
    """,
    # v18 (issue 20): items name their conversation by a short integer (``convs``: one
    # row per conversation key, never deleted) instead of the key's text (both
    # addresses), in every row and in every entry of items_conv: the writer spends
    # less per item on both, the more so the more conversations a realm has
    # (bench/README.md).  Reads turn a key into its integer in SQL (SQLiteDB.conv_sql).
    # The items table is rebuilt (SQLite cannot change a column's type): its sequence
    # row is kept (positions an account deletion consumed stay consumed), and the
    # search index (by position) and its triggers with it.
    """
    CREATE TABLE convs (
        cid INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE
    );
    INSERT INTO convs (key) SELECT DISTINCT conv FROM items ORDER BY conv;
    CREATE TABLE items_new (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        conv INTEGER NOT NULL,
        ts REAL NOT NULL,
        body TEXT NOT NULL,
        meta TEXT,
        sig TEXT
    );
    INSERT INTO items_new (pos, id, kind, sender, recipient, conv, ts, body, meta, sig)
        SELECT i.pos, i.id, i.kind, i.sender, i.recipient, c.cid, i.ts, i.body, i.meta, i.sig
        FROM items i JOIN convs c ON c.key = i.conv ORDER BY i.pos;
    DELETE FROM sqlite_sequence WHERE name = 'items_new';
    UPDATE sqlite_sequence SET name = 'items_new' WHERE name = 'items';
    DROP TABLE items;
    ALTER TABLE items_new RENAME TO items;
    CREATE INDEX items_conv ON items (conv, pos);
    CREATE INDEX items_events ON items (pos) WHERE kind = 'event';
    CREATE TRIGGER items_fts_erase AFTER UPDATE OF body ON items
        WHEN new.body = '' AND old.body <> '' AND old.kind IN ('text', 'file')
        BEGIN
            DELETE FROM items_fts WHERE rowid = old.pos;
            INSERT INTO items_fts (items_fts) VALUES ('optimize');
        END;
    CREATE TRIGGER items_fts_delete AFTER DELETE ON items
        WHEN old.kind IN ('text', 'file')
        BEGIN
            DELETE FROM items_fts WHERE rowid = old.pos;
        END;
    """,
]

#: The items indexed already (``pos <= ?1``) that an edit in ``(?1, ?2]`` changed, with
#: its text, in edit order (the latest wins).
_EDITED_SINCE = (
    "SELECT t.pos, e.body FROM items e JOIN items t ON t.id = json_extract(e.meta, '$.ref') "
    "WHERE e.pos > ?1 AND e.pos <= ?2 AND e.kind = 'edit' AND t.pos <= ?1 "
    "AND t.conv = e.conv AND t.sender = e.sender AND t.kind = 'text' AND t.body <> '' "
    "ORDER BY e.pos"
)

#: The text and file items in a range of positions with their current text (their
#: latest own edit's, see chatproto/relations.py): what the search index holds.  The
#: edits looked at are those after the range's start (an edit comes after its item),
#: found through ``refs`` (one index probe per text item: the edits of the whole
#: table after the range's start, scanned, cost a step more than the indexing itself
#: once many items wait).
_CURRENT_TEXTS = (
    "SELECT t.pos, CASE WHEN t.kind = 'text' THEN coalesce(("
    "SELECT e.body FROM refs r JOIN items e ON e.pos = r.pos WHERE r.ref = t.id "
    "AND r.pos > ?1 AND e.kind = 'edit' AND e.conv = t.conv AND e.sender = t.sender "
    "ORDER BY r.pos DESC LIMIT 1), t.body) ELSE t.body END "
    "FROM items t WHERE t.pos > ?1 AND t.pos <= ?2 AND t.kind IN ('text', 'file') "
    "AND t.body <> ''"
)


#: What _CURRENT_TEXTS gives when no edit is in the step's range: the items' own text.
#: (An edit after the step's last item is taken by a later step's _EDITED_SINCE.)
_PLAIN_TEXTS = (
    "SELECT pos, body FROM items WHERE pos > ?1 AND pos <= ?2 AND kind IN ('text', 'file') "
    "AND body <> ''"
)


def _statements(script: str) -> list[str]:
    """The SQL statements of a migration, in order (a trigger's body holds ';')."""
    out: list[str] = []
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n;"):
                out.append(buf)
            buf = ""
    if buf.strip(" \n;"):
        out.append(buf)
    return out


#: The kinds an append looks at twice: a file is recorded; an edit, delete or reaction
#: is recorded in ``refs`` (by the id it refers to); a delete wipes its target; an edit
#: of a deleted item (checked before the delete was committed) loses its text.
_INDEXED = frozenset({"file", "delete", "edit", "reaction"})

#: Letters and digits to Python (the rule of a query's words, whose Unicode is newer)
#: that FTS5's ``unicode61`` tokenizer, which keeps to Unicode 6.1, reads as separators
#: (New Tai Lue vowels and tone marks, two Vedic signs).  A query word holding one must
#: be asked as the pieces between them: quoted whole it is a phrase of several tokens,
#: which an index with ``detail=none`` refuses with an error.
_FTS5_SEPARATORS = re.compile("[\u19b0-\u19c0\u19c8\u19c9\u1cf2\u1cf3]+")

_COLS = "pos, id, kind, sender, recipient, ts, body, meta, sig"


def _row(r: tuple[Any, ...]) -> Envelope:
    """An item from its row; ``ts`` and ``meta`` made safe to send (see
    :func:`chatproto.store.stored_meta`), whatever the row holds."""
    pos, id_, kind, sender, recipient, ts, body, meta, sig = r
    return Envelope(
        id=id_,
        kind=kind,
        sender=sender,
        recipient=recipient,
        ts=ts if type(ts) is float and 0.0 <= ts <= MAX_SHOWN_TS else shown_ts(ts),
        body=body,
        meta=stored_meta(meta) if meta is not None else None,
        pos=pos,
        sig=stored_sig(sig),
    )


class SQLiteDB(AccountsSQL, ReadingSQL, PeerKeysSQL, OutboxSQL, FilesSQL):
    """Synchronous access to one SQLite database file (one connection per instance)."""

    #: One writer: an indexing step never stops short (see ``StoreDB.index_later``).
    index_later = False

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        # owner only: the accounts' password hashes and every message are in it
        os.makedirs(parent, mode=0o700, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        #: The durability of this connection's commits (``index_search`` runs its own
        #: without an fsync when it is FULL or EXTRA).
        self.synchronous = synchronous.upper()
        self.conn.execute("PRAGMA busy_timeout=10000")
        self.conn.execute("PRAGMA foreign_keys=ON")
        #: Seconds the last group commit's COMMIT took (its fsync; for the metrics).
        self.sync_seconds = 0.0
        #: Set when the transaction in progress wiped a deleted item: after its commit
        #: the WAL is checkpointed and truncated, so no old copy of a page stays.
        self._wiped = False
        #: The user_convs rows this connection knows are committed.
        self._user_convs = UserConvs()
        #: The acks rows this connection knows are committed (chatproto/store/acks.py).
        self._known_acks = KnownAcks()
        #: Rows per multi-row INSERT of items (nine parameters each): at most
        #: ROWS_PER_INSERT, fewer where the library allows fewer parameters per
        #: statement (999 before SQLite 3.32; Python 3.10 cannot ask: assumed).
        getlimit = getattr(self.conn, "getlimit", None)  # (Python 3.11 on)
        limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit else 999
        self._rows_per_insert = max(1, min(self.ROWS_PER_INSERT, limit // 9))
        #: The same for :meth:`_insert_pair_run` (three parameters a row, three shared).
        self._pair_rows = max(1, min(self.ROWS_PER_INSERT, (limit - 3) // 3))
        #: The key of alternate ids (settings.id_key), read at its first use: the
        #: schema (and the key) may not exist before migrate().
        self._key: bytes | None = None
        #: Conversation key -> its integer in ``convs`` (schema 18), as this writer
        #: knows them: committed, or made by the transaction in progress (their keys
        #: in ``_cids_made``, forgotten if it rolls back: SQLite may give the
        #: integer to another key afterwards).
        self._cids: dict[str, int] = {}
        self._cids_made: list[str] = []

    def close(self) -> None:
        self.conn.close()

    def describe(self) -> str:
        return self.path

    def outbox_top(self) -> int:
        """The highest outbox seq ever assigned (rows may have been deleted since)."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    # schema -------------------------------------------------------------------------

    def version(self) -> int:
        c = self.conn
        c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = c.execute("SELECT version FROM schema_version").fetchone()
        return row[0] if row else 0

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`; return the version found."""
        found = self.version()
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {found}, newer than this chatproto "
                f"({SCHEMA_VERSION}); upgrade chatproto"
            )
        c = self.conn
        for v in range(found, SCHEMA_VERSION):
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _statements(MIGRATIONS[v]):
                    c.execute(stmt)
                c.execute("DELETE FROM schema_version")
                c.execute("INSERT INTO schema_version VALUES (?)", (v + 1,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return found

    # accounts (the statements: chatproto/store/accounts.py) -------------------------

    ITEMS_TOP = "(SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'items')"
    DUPLICATE = sqlite3.IntegrityError

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return int(self.conn.executemany(sql, rows).rowcount)

    def _delete_account(self, name: str, address: str) -> None:
        """Inside a commit, before its batch's outbox rows: the account's rows go and
        one position is consumed, so an account created later under this name starts
        after everything before."""
        c = self.conn
        c.execute("DELETE FROM users WHERE name = ?", (name,))
        c.execute("DELETE FROM acks WHERE user = ?", (address,))
        self._known_acks.forget_all()
        c.execute("DELETE FROM uploads WHERE user = ?", (address,))
        # Its pending group requests: an answer to one must not land on a later account
        # of the name.  (The batch's own requests are inserted after this.)
        c.execute("DELETE FROM requests WHERE actor = ?", (address,))
        c.execute("DELETE FROM read_markers WHERE user_addr = ?", (address,))
        c.execute("DELETE FROM prefs WHERE user_addr = ?", (address,))
        bumped = c.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'items'")
        if bumped.rowcount == 0:  # no item was ever stored
            c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('items', 1)")

    # streams ------------------------------------------------------------------------

    _INSERT = (
        "INSERT INTO items (id, kind, sender, recipient, conv, ts, body, meta, sig) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _params(self, batch: Sequence[Envelope]) -> list[tuple[Any, ...]]:
        """Inside a write transaction: the insert's parameters of each item."""
        return [
            (
                e.id,
                e.kind,
                e.sender,
                e.recipient,
                self._cid(e.conversation),
                e.ts,
                e.body,
                json.dumps(e.meta) if e.meta is not None else None,
                json.dumps(e.sig) if e.sig is not None else None,
            )
            for e in batch
        ]

    _INSERT_REMOTE = _INSERT + " ON CONFLICT (id) DO NOTHING RETURNING pos"

    # conversations (schema 18: items.conv is the integer of the key's convs row) ----

    @staticmethod
    def conv_sql(key: str) -> str:
        """The ``items.conv`` of the conversation whose key is the SQL expression
        ``key`` (NULL, matching no item, for a key never stored)."""
        return f"(SELECT cid FROM convs WHERE key = {key})"

    def _cid(self, key: str) -> int:
        """Inside a write transaction: the integer of conversation ``key``, its
        ``convs`` row inserted if it has none."""
        cid = self._cids.get(key)
        if cid is None:
            c = self.conn
            row = c.execute("SELECT cid FROM convs WHERE key = ?", (key,)).fetchone()
            if row is None:
                row = c.execute(
                    "INSERT INTO convs (key) VALUES (?) RETURNING cid", (key,)
                ).fetchone()
            cid = self._cids[key] = int(row[0])
            self._cids_made.append(key)
        return cid

    def _cids_committed(self) -> None:
        """The transaction committed: the integers it found or made are known."""
        self._cids_made.clear()
        if len(self._cids) > MAX_REMEMBERED:  # (a bound on the writer's memory)
            self._cids.clear()

    def _cids_rolled_back(self) -> None:
        """The transaction (or a savepoint of it) rolled back: forget the integers
        found or made since the last commit (rows made are gone with it; the others
        are looked up again)."""
        for key in self._cids_made:
            self._cids.pop(key, None)
        self._cids_made.clear()

    def append_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
    ) -> list[list[int | None] | Exception]:
        """Commit every batch in one transaction; return positions per batch.
        (:meth:`commit_batch` also returns the outbox rows queued.)"""
        return self.commit_batch(batches, acks, outbox, remote, outbox_acks)[0]

    _INSERT_OUTBOX = (
        "INSERT INTO outbox (realm, pos, payload) "
        "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
        "json_extract(value, '$[2]') FROM json_each(?) ORDER BY key"
    )

    _UPSERT_ACKS = (
        "INSERT INTO acks SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
        "json_extract(value, '$[2]') FROM json_each(?) WHERE true "
        "ON CONFLICT (user, device) DO UPDATE SET pos = max(pos, excluded.pos)"
    )

    #: After _UPSERT_ACKS: the acks of the users ``?1`` (a JSON list) past the ``?2``
    #: highest of each user (the first device names among equal acks) go (see
    #: IStore.set_ack and chatproto/store/acks.py); returns the rows forgotten.  The
    #: users' rows are found by the primary key.
    _TRIM_ACKS = (
        "DELETE FROM acks WHERE (user, device) IN (SELECT user, device FROM ("
        "SELECT user, device, row_number() OVER (PARTITION BY user ORDER BY pos DESC, device) "
        "AS n FROM acks WHERE user IN (SELECT value FROM json_each(?1))"
        ") WHERE n > ?2) RETURNING user, device"
    )

    def commit_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
        deletions: Sequence[tuple[str, str] | None] | None = None,
        reads: dict[tuple[str, str], int] | None = None,
        devices: int = MAX_DEVICES,
    ) -> tuple[list[list[int | None] | Exception], list[tuple[str, int, Any]]]:
        """Commit every batch in one transaction: positions per batch, and the outbox
        rows queued as ``(realm, seq, envelope or request)`` in sequence order.

        ``acks`` maps ``(user, device)`` to positions to move forward; each user named
        there keeps the acks of at most ``devices`` devices (IStore.set_ack).
        ``reads`` maps ``(user, conversation)`` to read markers to move forward.
        ``deletions[i]``, if given, is the ``(name, address)`` of an account that batch
        ``i`` deletes (``IStore.delete_user``): if the account is not there, the batch
        fails alone with :class:`NoSuchAccount` and nothing of it is written; else it
        is deleted after the items are inserted, in the same transaction.

        Fast path: the items of consecutive local batches in one ``executemany``.  This
        connection is the only writer of ``items`` and positions are AUTOINCREMENT, so
        the rows get the consecutive positions ending at ``last_insert_rowid()``.  If
        any item violates a constraint, the transaction is redone batch by batch under
        savepoints, so one bad batch fails alone and never takes the others with it.

        ``remote[i]`` marks batch ``i`` as received from another realm: an item whose
        id is stored already is skipped (its position is ``None``).  ``outbox[i]``
        lists ``(realm, envelope)`` pairs of batch ``i`` to queue for other realms in
        the same transaction, or ``(realm, dict)`` for a request (no stored item).
        ``outbox_acks`` maps realms to the outbox sequence up to which their rows are
        acknowledged (deleted in the same transaction: an ack costs no commit of its
        own).  The sequences of the rows are consecutive, in batch order (the outbox is
        AUTOINCREMENT and written only here).
        """
        c = self.conn
        flags = list(remote) if remote is not None else [False] * len(batches)
        queued_rows: list[tuple[str, int, Any]] = []
        c.execute("BEGIN IMMEDIATE")
        try:
            batches, outbox, missing = skip_missing_accounts(
                batches, outbox, deletions, self.user_floor
            )
            try:
                out = self._append_all(batches, flags)
            except Exception:
                c.execute("ROLLBACK")
                self._cids_rolled_back()
                c.execute("BEGIN IMMEDIATE")
                out = self._append_each(batches, flags)
            gone = delete_accounts(out, missing, deletions, self._delete_account)
            if gone:
                acks = without_users(acks, gone)
                reads = without_users(reads, gone) if reads else reads
            convs = self._user_convs.new_rows(batches, out)
            if convs:
                c.executemany("INSERT OR IGNORE INTO user_convs VALUES (?, ?, ?)", convs)
            if outbox:
                rows, queued_rows, requests = outbox_rows(batches, outbox, out, self._text_in)
                if rows:
                    # One statement for all the rows (json_each yields them in order):
                    # an executemany would hand the GIL back and forth once per row.
                    c.execute(self._INSERT_OUTBOX, (json.dumps(rows),))
                    seq = c.execute("SELECT last_insert_rowid()").fetchone()[0] - len(rows)
                    for k, (realm, _, env) in enumerate(queued_rows):
                        queued_rows[k] = (realm, seq + k + 1, env)
                if requests:
                    c.executemany("INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?)", requests)
            if outbox_acks:
                c.executemany(
                    "DELETE FROM outbox WHERE realm = ? AND seq <= ?", list(outbox_acks.items())
                )
            forgotten: list[tuple[str, str]] = []
            if acks:  # one statement (see the outbox above)
                c.execute(
                    self._UPSERT_ACKS,
                    (json.dumps([(*k, p) for k, p in acks.items()], ensure_ascii=False),),
                )
                users = self._known_acks.new_users(acks)
                if users:  # (the bound: only users who may have a new row)
                    trim = (json.dumps(users, ensure_ascii=False), max(1, devices))
                    forgotten = c.execute(self._TRIM_ACKS, trim).fetchall()
            if reads:
                self._set_reads(reads)
            synced = time.perf_counter()
            c.execute("COMMIT")
            self.sync_seconds = time.perf_counter() - synced
            self._user_convs.committed(convs)
            self._cids_committed()
            if acks:
                self._known_acks.committed(acks, forgotten)
        except BaseException:
            self._wiped = False
            self._cids_rolled_back()
            c.execute("ROLLBACK")
            raise
        if self._wiped:
            self._wiped = False
            self._checkpoint()
        return out, queued_rows

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it: the pages a delete
        rewrote (zeroed with ``secure_delete``) replace their old versions in the
        file, and the old versions in the WAL are gone with it."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _id_key(self) -> bytes:
        if self._key is None:
            row = self.conn.execute("SELECT value FROM settings WHERE key = 'id_key'").fetchone()
            self._key = bytes.fromhex(row[0])
        return self._key

    def _insert_remote(self, batch: Sequence[Envelope]) -> list[int | None]:
        """Insert items from another realm, skipping ids stored already.  A ``file``
        item among them is recorded too: federation stores it only once its bytes
        have been fetched to this realm."""
        c = self.conn
        out: list[int | None] = []
        for env, p in zip(batch, self._params(batch), strict=True):
            row = c.execute(self._INSERT_REMOTE, p).fetchone()
            if row is None:  # stored already -- or the id is taken by another item
                had = c.execute(
                    "SELECT sender, recipient FROM items WHERE id = ?", (env.id,)
                ).fetchone()
                if had is not None and tuple(had) != (env.sender, env.recipient):
                    env.id = alternate_id(env, self._id_key())
                    row = c.execute(self._INSERT_REMOTE, (env.id, *p[1:])).fetchone()
            out.append(row[0] if row else None)
        files = [(e, pos) for e, pos in zip(batch, out, strict=True) if e.kind in _INDEXED and pos]
        if files:
            self._index_files([e for e, _ in files], [pos for _, pos in files if pos])
        return out

    _INSERT_FILE = (
        "INSERT INTO files (file_id, sha256, size, name, media_type, sender, recipient, "
        "ts, pos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _index_files(self, batch: Sequence[Envelope], positions: Sequence[int]) -> None:
        """Record what each item about another refers to (one statement for the
        batch), the file of each ``file`` item (with its message's position), and
        wipe the item each ``delete`` item deletes."""
        refs = [
            (ref, pos)
            for env, pos in zip(batch, positions, strict=True)
            if env.meta is not None
            and not (env.kind == "file" and "file_id" in env.meta)
            and isinstance(ref := env.meta.get("ref"), str)
        ]
        if refs:
            self.conn.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)", refs)
        rows = []
        for env, pos in zip(batch, positions, strict=True):
            if env.kind == "file" and env.meta is not None and "file_id" in env.meta:
                m = env.meta
                rows.append((*(m[k] for k in FILE_META), env.sender, env.recipient, env.ts, pos))
                continue
            if env.kind == "delete" and env.meta is not None:
                self._wipe(env)
            elif env.kind == "edit" and env.meta is not None:
                self.conn.execute(
                    "UPDATE items SET body = '' WHERE pos = ? AND EXISTS (SELECT 1 FROM items "
                    "WHERE id = ? AND json_extract(meta, '$.deleted') IS TRUE)",
                    (pos, env.meta.get("ref")),
                )
        if rows:
            self.conn.executemany(self._INSERT_FILE, rows)

    _DELETED = json.dumps(DELETED_META)

    def _wipe(self, env: Envelope) -> None:
        """Inside a commit: the item ``env`` (a ``delete``) deletes loses its content
        -- body, meta, signature, the bodies of its edits, its file record (the
        sender's quota; the realm removes the bytes no file refers to any more) --
        with ``secure_delete`` on, so SQLite zeroes the bytes it frees.  Only an item
        of the delete's own conversation: the realm checked who may delete it."""
        ref = env.meta.get("ref") if env.meta is not None else None
        if not isinstance(ref, str):
            return
        c = self.conn
        row = c.execute(
            f"SELECT kind, meta FROM items WHERE id = ? AND conv = {self.conv_sql('?')}",
            (ref, env.conversation),
        ).fetchone()
        if row is None or row[0] not in TARGET_KINDS:
            return
        c.execute("PRAGMA secure_delete = ON")
        try:
            c.execute(
                "UPDATE items SET body = '', meta = ?, sig = NULL WHERE id = ?",
                (self._DELETED, ref),
            )
            c.execute(
                "UPDATE items SET body = '' WHERE pos IN (SELECT pos FROM refs WHERE ref = ?) "
                "AND kind = 'edit'",
                (ref,),
            )
            meta = stored_meta(row[1])
            if row[0] == "file" and meta is not None and isinstance(meta.get("file_id"), str):
                c.execute("DELETE FROM files WHERE file_id = ?", (meta["file_id"],))
        finally:
            c.execute("PRAGMA secure_delete = OFF")
        self._wiped = True

    def _refs(self, items: Sequence[Envelope], edits_only: bool = False) -> list[Envelope]:
        """The items that refer to any of ``items`` (edits, deletes, reactions; with
        ``edits_only``, edits), oldest first: one indexed query per 500 items."""
        ids = [e.id for e in items if e.kind in TARGET_KINDS]
        found: list[Envelope] = []
        kinds = "kind = 'edit' AND " if edits_only else ""
        for k in range(0, len(ids), 500):
            chunk = ids[k : k + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT {_COLS} FROM items WHERE {kinds}{REF_KINDS_SQL} "
                f"AND pos IN (SELECT pos FROM refs WHERE ref IN ({marks})) ORDER BY pos",
                chunk,
            ).fetchall()
            found.extend(_row(r) for r in rows)
        if len(ids) > 500:
            found.sort(key=lambda e: e.pos)
        return found

    def _stored_ids(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Which of ``ids`` are stored already, with their (sender, recipient): one
        indexed query per 500 ids."""
        found: dict[str, tuple[str, str]] = {}
        for k in range(0, len(ids), 500):
            chunk = ids[k : k + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT id, sender, recipient FROM items WHERE id IN ({marks})", chunk
            )
            found.update((r[0], (r[1], r[2])) for r in rows)
        return found

    def _append_all(
        self, batches: Sequence[Sequence[Envelope]], remote: Sequence[bool]
    ) -> list[list[int | None] | Exception]:
        """Every item of every batch in a few multi-row inserts, in batch order.

        The items of remote batches are first looked up by id with one query: one
        stored (or earlier in this commit) with the same sender and recipient is left
        out (a retried transaction); one whose id is held by another conversation's
        item goes under its :func:`alternate_id`, as in :meth:`_insert_remote`."""
        plan, chosen, renamed = plan_inserts(batches, remote, self._stored_ids, self._id_key)
        try:
            return self._insert_planned(batches, chosen, plan)
        except Exception:
            for e, original in renamed:  # redone item by item (_append_each)
                e.id = original
            raise

    #: Rows per multi-row insert (and, below it, the powers of two a commit's last rows
    #: are cut into: a handful of statements, each compiled once and kept in the
    #: connection's statement cache).
    ROWS_PER_INSERT = 256

    #: A run of at least this many consecutive plain text items (kind ``text``,
    #: neither ``meta`` nor ``sig``) of one sender to one recipient goes in with
    #: statements that bind the pair once (:meth:`_insert_pair_run`).  Not fewer: a
    #: run's statements are its own (one to three, cut as :meth:`_cut_inserts` says),
    #: and each statement hands the GIL to the reactor thread and waits to get it
    #: back (on a realm paced at 50k DMs/s, a fifth of the writer's time; runs of ~10
    #: made ~140 statements a commit instead of ~7).  Below ~32 rows the binding a run
    #: saves does not pay for that (bench/README.md, issue 20, eleventh session).
    PAIR_RUN = 32

    def _insert_rows(self, items: Sequence[Envelope]) -> int:
        """Insert ``items`` in order; returns the position of the last.

        Runs of :attr:`PAIR_RUN` or more plain text items of one (sender, recipient)
        -- what a busy sender's read brings -- go in with
        :meth:`_insert_pair_run`, the items around them with :meth:`_insert_mixed`,
        one after the other, so every item gets its position in ``items``' order."""
        n = len(items)
        least = self.PAIR_RUN
        last = 0
        done = 0  # the items before it are inserted
        i = 0
        while i < n:
            e = items[i]
            if e.kind != "text" or e.meta is not None or e.sig is not None:
                i += 1
                continue
            sender, recipient = e.sender, e.recipient
            j = i + 1
            while j < n:
                f = items[j]
                if (
                    f.recipient != recipient
                    or f.sender != sender
                    or f.kind != "text"
                    or f.meta is not None
                    or f.sig is not None
                ):
                    break
                j += 1
            if j - i >= least:
                if done < i:
                    last = self._insert_mixed(items[done:i])
                last = self._insert_pair_run(items[i:j])
                done = j
            i = j
        if done < n:
            last = self._insert_mixed(items[done:] if done else items)
        if not last:
            raise sqlite3.InterfaceError("no row inserted")
        return last

    def _insert_pair_run(self, run: Sequence[Envelope]) -> int:
        """Insert ``run`` (plain text items of one sender to one recipient) in order
        with statements of up to :attr:`ROWS_PER_INSERT` rows that name the sender,
        the recipient and the conversation once (numbered parameters ``?1`` to
        ``?3``, :func:`_pair_insert`) and the kind as a literal: each row binds its
        id, time and body only.  A text parameter is copied by SQLite when bound
        (with an allocation), so the pair's four shared values per row were a third
        of the writer's binding work; reusing a bound parameter is a shallow copy.
        Returns the last row's position."""
        e = run[0]
        head = [e.sender, e.recipient, self._cid(e.conversation)]
        flat: list[Any] = []
        add = flat.extend
        for e in run:
            add((e.id, e.ts, e.body))
        return self._cut_inserts(_pair_insert, flat, 3, len(run), self._pair_rows, head)

    def _insert_mixed(self, items: Sequence[Envelope]) -> int:
        """Insert ``items`` in order with ``INSERT ... VALUES (...), (...), ...``
        statements of up to :attr:`ROWS_PER_INSERT` rows; returns the position of the
        last.  One statement runs its rows inside SQLite: an ``executemany`` steps
        once per row, handing the GIL to the reactor thread and taking it back each
        time, and updates ``sqlite_sequence`` (AUTOINCREMENT) once per row, not once
        per statement.  The rows of a statement are inserted in the order of its
        VALUES list, so they get consecutive positions (this connection is the only
        writer of ``items``).  On a failure the caller rolls the transaction back
        (see :func:`_multi_insert`).

        A run of items with neither ``meta`` nor ``sig`` (a plain message) goes in
        with statements that write those NULLs themselves: Python's sqlite3 binds a
        None through its adapter lookup (a tuple, a dict probe, two attribute
        lookups that fail), ~0.3 us each, as much as the rest of the row's binding."""
        step = self._rows_per_insert
        dumps = json.dumps
        cid = self._cid
        last = 0
        sender = recipient = ""  # (the items of a pair share their conversation)
        conv = 0
        flat: list[Any] = []
        add = flat.extend
        rows = 0
        plain = True
        for e in items:
            if e.sender != sender or e.recipient != recipient:
                sender, recipient, conv = e.sender, e.recipient, cid(e.conversation)
            meta, sig = e.meta, e.sig
            shape = meta is None and sig is None
            if shape is not plain or rows == step:
                if rows:
                    last = self._insert_run(flat, rows, plain)
                    flat = []
                    add = flat.extend
                    rows = 0
                plain = shape
            if plain:
                add((e.id, e.kind, sender, recipient, conv, e.ts, e.body))
            else:
                add(
                    (
                        e.id,
                        e.kind,
                        sender,
                        recipient,
                        conv,
                        e.ts,
                        e.body,
                        None if meta is None else dumps(meta),
                        None if sig is None else dumps(sig),
                    )
                )
            rows += 1
        if rows:
            last = self._insert_run(flat, rows, plain)
        return last

    def _insert_run(self, flat: list[Any], rows: int, plain: bool) -> int:
        """Insert ``rows`` rows of one shape (their parameters: ``flat``) with one
        statement of :attr:`ROWS_PER_INSERT` rows, or with statements of the powers of
        two they add up to (a handful of statements, each compiled once and kept in
        the connection's statement cache); returns the last row's position."""
        statement = functools.partial(_multi_insert, plain=plain)
        return self._cut_inserts(statement, flat, len(flat) // rows, rows, self._rows_per_insert)

    def _cut_inserts(
        self,
        statement: Callable[[int], str],
        flat: list[Any],
        width: int,
        rows: int,
        step: int,
        head: list[Any] | None = None,
    ) -> int:
        """Run the statements ``statement(size)`` inserting ``rows`` rows of ``width``
        parameters each (``flat``, each statement's parameters after ``head``):
        statements of ``step`` rows, then of the powers of two the rest adds up to (a
        handful of statements, each compiled once and kept in the connection's
        statement cache); returns the last row's position."""
        c = self.conn
        k = 0
        last = 0
        while rows:
            size = step if rows >= step else 1 << (rows.bit_length() - 1)
            chunk = flat if k == 0 and size == rows else flat[k * width : (k + size) * width]
            last = c.execute(statement(size), head + chunk if head else chunk).lastrowid or 0
            k += size
            rows -= size
        return last

    def _insert_planned(
        self,
        batches: Sequence[Sequence[Envelope]],
        chosen: Sequence[Envelope],
        plan: list[list[bool] | None],
    ) -> list[list[int | None] | Exception]:
        pos = self._insert_rows(chosen) - len(chosen) + 1 if chosen else 0
        out: list[list[int | None] | Exception] = []
        # (one look at the kinds for the commit: most have no item to record, and
        # many batches are of one item each)
        record = any(e.kind in _INDEXED for e in chosen)
        for batch, inserted in zip(batches, plan, strict=True):
            positions: list[int | None]
            if inserted is None:  # a local batch: every item, in order
                n = len(batch)
                positions = list(range(pos, pos + n))
                pos += n
                out.append(positions)
                if not record:
                    continue
            else:
                positions = []
                for m in inserted:
                    if m:
                        positions.append(pos)
                        pos += 1
                    else:
                        positions.append(None)
                out.append(positions)
            files = [
                (e, p)
                for e, p in zip(batch, positions, strict=True)
                if e.kind in _INDEXED and p is not None
            ]
            if files:
                self._index_files([e for e, _ in files], [p for _, p in files])
        return out

    def _append_each(
        self, batches: Sequence[Sequence[Envelope]], remote: Sequence[bool]
    ) -> list[list[int | None] | Exception]:
        c = self.conn
        out: list[list[int | None] | Exception] = []
        for batch, is_remote in zip(batches, remote, strict=True):
            c.execute("SAVEPOINT b")
            try:
                positions: list[int | None]
                if is_remote:
                    positions = self._insert_remote(batch)
                else:
                    local = [
                        c.execute(self._INSERT + " RETURNING pos", p).fetchone()[0]
                        for p in self._params(batch)
                    ]
                    self._index_files(batch, local)
                    positions = list(local)
                c.execute("RELEASE b")
                out.append(positions)
            except Exception as err:  # one bad batch must not fail the others
                c.execute("ROLLBACK TO b")
                self._cids_rolled_back()
                c.execute("RELEASE b")
                out.append(err)
        return out

    # federation outbox (written in commit_batch; the rest: OutboxSQL, store/peers.py)

    def outbox_stats(self) -> dict[str, tuple[int, float | None]]:
        rows = self.conn.execute(
            "SELECT q.realm, q.n, coalesce(i.ts, CASE WHEN json_valid(o.payload) "
            "THEN json_extract(o.payload, '$.ts') END) "
            "FROM (SELECT realm, count(*) AS n, min(seq) AS first FROM outbox GROUP BY realm) q "
            "JOIN outbox o ON o.seq = q.first LEFT JOIN items i ON i.pos = o.pos AND o.pos > 0"
        ).fetchall()
        return {r[0]: (int(r[1]), stored_number(r[2])) for r in rows}

    def get_ack(self, user: str, device: str) -> int:
        c = self.conn
        row = c.execute(
            "SELECT pos FROM acks WHERE user = ? AND device = ?", (user, device)
        ).fetchone()
        if row:
            return int(row[0])
        row = c.execute("SELECT max(pos) FROM acks WHERE user = ?", (user,)).fetchone()
        return int(row[0] or 0)

    def max_pos(self) -> int:
        row = self.conn.execute("SELECT max(pos) FROM items").fetchone()
        return int(row[0] or 0)

    # read markers, conversations, preferences (queries in chatproto/store/reading.py)

    def _item(self, row: Any) -> Envelope:
        return _row(row)

    def _mention_sql(self) -> tuple[str, Any]:
        if not getattr(self, "_has_mentions", False):
            self.conn.create_function("mentions", 2, mentions, deterministic=True)
            self._has_mentions = True
        return "mentions(body, ?)", str

    def _set_reads(self, reads: dict[tuple[str, str], int]) -> None:
        self.conn.execute(  # one statement (see the acks in commit_batch)
            "INSERT INTO read_markers SELECT json_extract(value, '$[0]'), "
            "json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?) "
            "WHERE true ON CONFLICT (conv, user_addr) DO UPDATE SET pos = max(pos, excluded.pos)",
            (json.dumps([(conv, u, p) for (u, conv), p in reads.items()], ensure_ascii=False),),
        )

    REF_SQL = "json_extract(meta, '$.ref')"

    def _search_sql(self, words: Sequence[str]) -> tuple[str, str, Any] | None:
        # Every word, as a prefix; a word the tokenizer splits, as its pieces (each a
        # prefix: more items than the word finds, which the caller matches exactly).
        # The words are letters and digits, so nothing in them is FTS5 syntax.
        # A word of one character is a whole word (see words_match).
        terms = []
        for w in words:
            pieces = [p for p in _FTS5_SEPARATORS.split(w) if p]
            if len(w) == 1 and pieces:
                terms.append(f'"{w}"')
            else:
                terms += [f'"{p}"*' for p in pieces]
        join = "JOIN items_fts ON items_fts.rowid = items.pos"
        if not terms:
            # Words of such letters only: the index holds no token of them, but it
            # keeps each item's current text, where they are found (and matched as
            # words after).  A scan of the scope, in SQLite: no index helps.
            return join, "instr(items_fts.body, ?) > 0", words[0]
        return join, "items_fts MATCH ?", " ".join(terms)

    def index_search(self, limit: int) -> int:
        """Index (for search) up to ``limit`` items after
        :meth:`chatproto.store.reading.ReadingSQL.search_upto`, with
        their current text, in one transaction; returns how many items it went past
        (fewer than ``limit``: the index has caught up).  Run by the store when it has
        no commit to make (see GroupCommitStore).

        Its commit waits for no fsync (``synchronous = NORMAL`` for the step): the
        index is rebuilt from ``items`` from the position it records, in the same
        transaction, so a crash that loses a step loses nothing but the step, and the
        next durable commit's fsync of the WAL (written in order) makes the step's
        frames durable with its own.  On a busy realm the step's fsync and its wait
        were as much of the step as the indexing (bench/README.md)."""
        c = self.conn
        relaxed = self.synchronous in ("FULL", "EXTRA")
        if relaxed:
            c.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._index_step(limit)
        finally:
            if relaxed:
                c.execute(f"PRAGMA synchronous={self.synchronous}")

    def _index_step(self, limit: int) -> int:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            upto = self.search_upto()
            # how many items the step goes past, the last, and whether an edit is
            # among them (one scan of the range, one row out, not ``limit``)
            n, top, edited = c.execute(
                "SELECT count(*), max(pos), max(kind = 'edit') FROM (SELECT pos, kind "
                "FROM items WHERE pos > ? ORDER BY pos LIMIT ?)",
                (upto, limit),
            ).fetchone()
            if n:
                # each item's latest own edit, probed per item only when the range
                # holds an edit (~0.2 us per item; most steps hold none)
                texts = _CURRENT_TEXTS if edited else _PLAIN_TEXTS
                c.execute(f"INSERT INTO items_fts (rowid, body) {texts}", (upto, top))
                # items indexed before and edited since (edits in the range): their
                # latest text (two statements for all of them, not two per item)
                latest = dict(c.execute(_EDITED_SINCE, (upto, top)).fetchall()) if edited else {}
                if latest:
                    c.execute(
                        "DELETE FROM items_fts WHERE rowid IN (SELECT value FROM json_each(?))",
                        (json.dumps(list(latest)),),
                    )
                    c.execute(
                        "INSERT INTO items_fts (rowid, body) SELECT json_extract(value, '$[0]'), "
                        "json_extract(value, '$[1]') FROM json_each(?)",
                        (json.dumps(list(latest.items())),),
                    )
                c.execute("UPDATE settings SET value = ? WHERE key = 'search_upto'", (str(top),))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return int(n)

    # files (the reads: FilesSQL, chatproto/store/filerows.py) -------------------------

    def expire_files(self, before: float) -> list[str]:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            digests = [
                r[0]
                for r in c.execute(
                    "DELETE FROM files WHERE ts < ? RETURNING sha256", (before,)
                ).fetchall()
            ]
            still = c.execute(
                "SELECT DISTINCT sha256 FROM files WHERE sha256 IN "
                "(SELECT value FROM json_each(?))",
                (json.dumps(sorted(set(digests))),),
            ).fetchall()
            gone = sorted(set(digests) - {r[0] for r in still})
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return gone

    def put_upload(self, record: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO uploads (upload_id, user, record) VALUES (?, ?, ?)",
            (record["upload_id"], record["user"], json.dumps(record)),
        )


@functools.cache
def _pair_insert(rows: int) -> str:
    """The statement inserting ``rows`` plain text items of one sender to one recipient
    (see ``SQLiteDB._insert_pair_run``): ``?1``, ``?2`` and ``?3`` are the sender, the
    recipient and the conversation's integer, shared by every row; row ``m`` binds its
    id, time and body as ``?(4 + 3m)`` to ``?(6 + 3m)``.  ``OR FAIL``: see
    :func:`_multi_insert`."""
    values = ",".join(
        f"(?{4 + 3 * m}, 'text', ?1, ?2, ?3, ?{5 + 3 * m}, ?{6 + 3 * m}, NULL, NULL)"
        for m in range(rows)
    )
    return (
        "INSERT OR FAIL INTO items (id, kind, sender, recipient, conv, ts, body, meta, sig) "
        f"VALUES {values}"
    )


@functools.cache
def _multi_insert(rows: int, plain: bool = False) -> str:
    """The statement inserting ``rows`` items (see ``SQLiteDB._insert_rows``); with
    ``plain``, items with neither ``meta`` nor ``sig`` (seven parameters a row).

    ``OR FAIL``: a constraint failure stops the statement and leaves the rows it
    inserted before, where the default (``ABORT``) undoes them -- for which SQLite
    copies every page the statement changes to a statement journal, a temporary file
    (as many writes again as the WAL's).  The caller rolls the whole transaction back
    on any failure (and redoes it batch by batch), so nothing of a failed statement
    is kept either way."""
    one = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
    row = "(?, ?, ?, ?, ?, ?, ?, NULL, NULL)" if plain else one
    sql = SQLiteDB._INSERT.replace("INSERT INTO", "INSERT OR FAIL INTO")
    return sql.replace(one, ",".join([row] * rows))


@implementer(IStore)
class SQLiteStore(GroupCommitStore):
    """The asynchronous, group-committing store used by the realm service: the
    threads and group commit of :class:`GroupCommitStore` over :class:`SQLiteDB`
    connections (WAL lets the readers read while the writer commits)."""

    def __init__(
        self,
        path: str,
        reactor: IReactorThreads,
        synchronous: str = "FULL",
        readers: int = 2,
    ) -> None:
        super().__init__(reactor, readers, "sqlite")
        self.path = path
        self._synchronous = synchronous

    def _open_writer(self) -> SQLiteDB:
        try:
            writer = SQLiteDB(self.path, self._synchronous)
        except sqlite3.Error as e:
            raise RuntimeError(f"cannot open {self.path}: {e}") from None
        try:
            writer.migrate()
        except Exception:
            writer.close()
            raise
        return writer

    def _connect(self) -> SQLiteDB:
        return SQLiteDB(self.path, self._synchronous)
