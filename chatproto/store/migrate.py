"""Copy a realm's SQLite store into PostgreSQL (``chatrealmctl migrate-store``).

The one module that knows both layouts.  Everything is copied as it is -- positions,
outbox sequences, acks, the ``id_key`` secret of alternate ids -- so clients resume
from the positions they acknowledged, peers' retried transactions are still recognised,
and links go on from their queues; the sequences continue after the highest value the
SQLite store ever handed out, so no position is used twice.  The copy is one
PostgreSQL transaction read from one SQLite snapshot: it happens entirely or not at
all.  The target must be empty, and no realm may be running on it (the copy holds the
schema's writer lock).  File bytes stay where they are (``<data_dir>/files``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from chatproto.store.postgresql import PostgresDB, escape_text
from chatproto.store.postgresql.writers import OUTBOX_SPREAD
from chatproto.store.sqlite import SQLiteDB

__all__ = [
    "COPIED",
    "MigrationError",
    "copy_sqlite_to_postgresql",
    "open_source",
]

#: Rows read from SQLite per fetch.
CHUNK = 5000


class MigrationError(Exception):
    """The copy cannot be made (nothing was written)."""


def _text(value: Any) -> str:
    return escape_text(str(value))


def _opt_text(value: Any) -> str | None:
    return None if value is None else escape_text(str(value))


def _real(value: Any) -> float:
    """A SQLite REAL as PostgreSQL's double precision: a row written by hand (text in a
    REAL column) reads as 0.0, as the stores show it."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


def _meta(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return None if "\x00" in text else text  # not JSON (damaged): read as no meta anyway


#: SQLite table -> (its SELECT, the PostgreSQL COPY, a row converter).  Every table of
#: the SQLite schema is listed (tests check it), so a new one cannot be forgotten.
COPIED: dict[str, tuple[str, str, Callable[[Sequence[Any]], tuple[Any, ...]]]] = {
    "users": (
        "SELECT name, pwhash, created, floor FROM users ORDER BY name",
        "COPY users (name, pwhash, created, floor) FROM STDIN",
        lambda r: (r[0], r[1], _real(r[2]), int(r[3])),
    ),
    "items": (
        "SELECT i.pos, i.id, i.kind, i.sender, i.recipient, c.key, i.ts, i.body, i.meta, "
        "i.sig FROM items i JOIN convs c ON c.cid = i.conv ORDER BY i.pos",
        "COPY items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) FROM STDIN",
        lambda r: (
            int(r[0]),
            _text(r[1]),
            r[2],
            r[3],
            r[4],
            r[5],
            _real(r[6]),
            _text(r[7]),
            _meta(r[8]),
            _meta(r[9]),  # a signature is JSON text too
        ),
    ),
    "acks": (
        "SELECT user, device, pos FROM acks ORDER BY user, device",
        "COPY acks (addr, device, pos) FROM STDIN",
        lambda r: (r[0], _text(r[1]), int(r[2])),
    ),
    "outbox": (
        "SELECT seq, realm, pos, payload FROM outbox ORDER BY seq",
        "COPY outbox (seq, realm, pos, payload) FROM STDIN",
        lambda r: (int(r[0]), r[1], int(r[2]), _opt_text(r[3])),
    ),
    "files": (
        "SELECT file_id, sha256, size, name, media_type, sender, recipient, ts, pos "
        "FROM files ORDER BY file_id",
        "COPY files (file_id, sha256, size, name, media_type, sender, recipient, ts, pos) "
        "FROM STDIN",
        lambda r: (
            _text(r[0]),
            r[1],
            int(r[2]),
            _text(r[3]),
            _text(r[4]),
            r[5],
            r[6],
            _real(r[7]),
            int(r[8]),
        ),
    ),
    "uploads": (
        "SELECT upload_id, user, record FROM uploads ORDER BY upload_id",
        "COPY uploads (upload_id, user_name, record) FROM STDIN",
        lambda r: (_text(r[0]), _text(r[1]), r[2]),
    ),
    "requests": (
        "SELECT id, actor, grp, ts, payload FROM requests ORDER BY id",
        "COPY requests (id, actor, grp, ts, payload) FROM STDIN",
        lambda r: (_text(r[0]), _text(r[1]), _text(r[2]), _real(r[3]), r[4]),
    ),
    "peer_keys": (
        "SELECT realm, keys FROM peer_keys ORDER BY realm",
        "COPY peer_keys (realm, keys) FROM STDIN",
        lambda r: (r[0], r[1]),
    ),
    "suspensions": (
        "SELECT name, floor, reason, ts FROM suspensions ORDER BY name",
        "COPY suspensions (name, floor, reason, ts) FROM STDIN",
        lambda r: (r[0], int(r[1]), _text(r[2]), _real(r[3])),
    ),
    "session_tokens": (
        "SELECT digest, name, floor, device, created, last_used FROM session_tokens "
        "ORDER BY digest",
        "COPY session_tokens (digest, name, floor, device, created, last_used) FROM STDIN",
        lambda r: (r[0], r[1], int(r[2]), _text(r[3]), _real(r[4]), _real(r[5])),
    ),
    "admins": (
        "SELECT name, floor, ts FROM admins ORDER BY name",
        "COPY admins (name, floor, ts) FROM STDIN",
        lambda r: (r[0], int(r[1]), _real(r[2])),
    ),
    "reports": (
        "SELECT id, reporter, msg_id, reason, ts, sender, recipient, pos, excerpt "
        "FROM reports ORDER BY id",
        "COPY reports (id, reporter, msg_id, reason, ts, sender, recipient, pos, excerpt) "
        "FROM STDIN",
        lambda r: (
            int(r[0]),
            r[1],
            r[2],
            _text(r[3]),
            _real(r[4]),
            r[5],
            r[6],
            int(r[7]),
            _text(r[8]),
        ),
    ),
    "read_markers": (
        "SELECT conv, user_addr, pos FROM read_markers ORDER BY conv, user_addr",
        "COPY read_markers (conv, user_addr, pos) FROM STDIN",
        lambda r: (r[0], r[1], int(r[2])),
    ),
    "prefs": (
        "SELECT user_addr, key, value FROM prefs ORDER BY user_addr, key",
        "COPY prefs (user_addr, key, value) FROM STDIN",
        lambda r: (r[0], r[1], _text(r[2])),
    ),
    "user_convs": (
        "SELECT user_addr, conv, peer FROM user_convs ORDER BY user_addr, conv",
        "COPY user_convs (user_addr, conv, peer) FROM STDIN",
        lambda r: (r[0], r[1], r[2]),
    ),
    "refs": (
        "SELECT ref, pos FROM refs ORDER BY ref, pos",
        "COPY refs (ref, pos) FROM STDIN",
        lambda r: (_text(r[0]), int(r[1])),
    ),
}

#: SQLite tables not copied row by row: settings (merged, below), the schema version
#: (each store has its own), the conversation keys (``convs``: copied as the items'
#: ``conv``, which PostgreSQL keeps as text), SQLite's own bookkeeping (its sequences,
#: below) and the
#: search index (FTS5's tables and its setting search_upto): the PostgreSQL store
#: indexes the items copied after its commits, as it does its own (the newest
#: SEARCH_TAIL are found until then by reading them).
NOT_COPIED = {
    "settings",
    "schema_version",
    "convs",
    "sqlite_sequence",
    "items_fts",
    "items_fts_config",
    "items_fts_content",
    "items_fts_data",
    "items_fts_idx",
}


def _rows(db: SQLiteDB, query: str) -> Iterator[Sequence[Any]]:
    cur = db.conn.execute(query)
    while True:
        chunk = cur.fetchmany(CHUNK)
        if not chunk:
            return
        yield from chunk


def copy_sqlite_to_postgresql(
    source: SQLiteDB,
    target: PostgresDB,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Copy ``source`` (migrated to the current SQLite schema) into ``target``, which
    must be empty; returns the rows copied per table.  ``progress(table, rows)`` is
    called after each table.  Raises :class:`MigrationError` (nothing written) when
    the target is not empty or a realm runs on it."""
    source.migrate()
    target.migrate()
    try:
        target.lock_writer(wait=0.0)
    except RuntimeError as e:
        raise MigrationError(str(e)) from None
    if not target.is_empty():
        raise MigrationError(
            f"{target.describe()} already holds a realm (accounts, messages or queued "
            "deliveries): migrate-store copies into an empty schema"
        )
    counts: dict[str, int] = {}
    src = source.conn
    src.execute("BEGIN")  # one snapshot of the source for the whole copy
    try:
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        unknown = {t for t in tables if not t.startswith("sqlite_")} - set(COPIED) - NOT_COPIED
        if unknown:
            raise MigrationError(
                f"{source.describe()} has tables this chatproto cannot copy: "
                f"{', '.join(sorted(unknown))}"
            )
        tops = dict(src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        pg = target.conn
        with pg.transaction():
            for table, (select, copy, convert) in COPIED.items():
                n = 0
                with pg.cursor() as cur, cur.copy(copy) as out:
                    for row in _rows(source, select):
                        out.write_row(convert(row))
                        n += 1
                counts[table] = n
                if progress is not None:
                    progress(table, n)
            for key, value in src.execute(
                "SELECT key, value FROM settings WHERE key <> 'search_upto'"
            ).fetchall():
                pg.execute(
                    "INSERT INTO settings VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            for seq, table, column in (
                ("items_pos", "items", "pos"),
                ("reports_id_seq", "reports", "id"),
            ):
                top = max(int(tops.get(table) or 0), _max(source, table, column))
                if seq == "items_pos":  # outbox rows queued from now on follow these
                    top = max(top, _max(source, "outbox", "seq") // OUTBOX_SPREAD)
                if top > 0:  # the next value is top + 1: nothing handed out is reused
                    pg.execute("SELECT setval(%s, %s, true)", (seq, top))
    finally:
        src.execute("ROLLBACK")
    return counts


def _max(db: SQLiteDB, table: str, column: str) -> int:
    row = db.conn.execute(f"SELECT coalesce(max({column}), 0) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def open_source(path: str) -> SQLiteDB:
    """The SQLite database to copy from; it must exist."""
    if not os.path.exists(path):
        raise MigrationError(f"no SQLite database at {os.path.abspath(path)}")
    try:
        return SQLiteDB(path)
    except (sqlite3.Error, OSError) as e:
        raise MigrationError(f"cannot open {path}: {e}") from None
