"""The PostgreSQL store's search index: ``search_text`` and its GIN index, filled in
steps after the commits (issue 20), never in them.

Part of :mod:`chatproto.store.postgresql` (a mixin of its
:class:`chatproto.store.postgresql.db.PostgresDB`).  As in SQLite (schema 16,
:meth:`chatproto.store.sqlite.SQLiteDB.index_search`): the setting ``search_upto``
says every text and file item up to that position is in the index, with its current
text; :meth:`chatproto.store.reading.ReadingSQL.search` reads the items above it
directly.  The store takes a step (:meth:`SearchIndex.index_search`) on its writer
thread when it has no commit to make (:class:`chatproto.store.groupcommit.GroupCommitStore`).

Several writers (a cluster's workers) share the schema: a step never goes past the
safe position (an item below it may still commit, and would never be indexed), and
takes a transaction lock, so one writer indexes at a time and none indexes an item
twice.  A step that could not go as far as the items committed (the lock was
another's, or the safe position was below some of them) says so (``index_later``):
the store steps again after a delay, commits or not.  Everything a step does is
decided by positions: the items in its range with their current text, the edits in
its range of items indexed before, the items whose deletes are in its range (a
deletion takes its item's row out in its own commit, too: see
:meth:`chatproto.store.postgresql.commit.CommitSQL._wipe`; a step that read the item
just before it was wiped is corrected by the step that reaches the delete).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from chatproto.store.postgresql.writers import index_lock_key

__all__ = ["SearchIndex"]

#: The words of a text as search_text holds them (runs of letters and digits).
_WORDS = "regexp_replace({}, '[^[:alnum:]]+', ' ', 'g')"

#: The text and file items in ``(%(lo)s, %(hi)s]`` with their current text (their
#: latest own edit's, see chatproto/relations.py; an edit comes after its item).
_INDEX_RANGE = (
    "WITH latest AS (SELECT DISTINCT ON (r.ref, e.conv, e.sender) r.ref, e.conv, "
    "e.sender, e.body FROM items e JOIN refs r ON r.pos = e.pos "
    "WHERE e.pos > %(lo)s AND e.kind = 'edit' ORDER BY r.ref, e.conv, e.sender, e.pos DESC) "
    "INSERT INTO search_text (pos, body) SELECT t.pos, "
    + _WORDS.format("coalesce(l.body, t.body)")
    + " FROM items t LEFT JOIN latest l ON l.ref = t.id AND l.conv = t.conv "
    "AND l.sender = t.sender AND t.kind = 'text' WHERE t.pos > %(lo)s AND t.pos <= %(hi)s "
    "AND t.kind IN ('text', 'file') AND t.body <> '' "
    "ON CONFLICT (pos) DO UPDATE SET body = excluded.body"
)

#: The items indexed before (``pos <= %(lo)s``) that an edit in ``(%(lo)s, %(hi)s]``
#: changed: the latest such edit's text.
_EDITED_IN_RANGE = (
    "UPDATE search_text s SET body = "
    + _WORDS.format("x.body")
    + " FROM (SELECT DISTINCT ON (t.pos) t.pos, e.body FROM items e "
    "JOIN refs r ON r.pos = e.pos JOIN items t ON t.id = r.ref "
    "WHERE e.pos > %(lo)s AND e.pos <= %(hi)s AND e.kind = 'edit' AND t.pos <= %(lo)s "
    "AND t.conv = e.conv AND t.sender = e.sender AND t.kind = 'text' AND t.body <> '' "
    "ORDER BY t.pos, e.pos DESC) x WHERE s.pos = x.pos"
)

#: The rows of items deleted (their body erased) by a delete in ``(%(lo)s, %(hi)s]``.
_DELETED_IN_RANGE = (
    "DELETE FROM search_text WHERE pos IN (SELECT t.pos FROM items d "
    "JOIN refs r ON r.pos = d.pos JOIN items t ON t.id = r.ref "
    "WHERE d.pos > %(lo)s AND d.pos <= %(hi)s AND d.kind = 'delete' AND t.body = '')"
)


def _tsquery_term(word: str) -> str:
    """``word`` (lower-cased by Python) as a term of the index's query.  Python
    lower-cases a word-final capital sigma to U+03C2 (final sigma), PostgreSQL's
    ``lower`` to U+03C3: the index held an upper-case word ending in a sigma with
    U+03C3, the query asked for U+03C2, and the word was found only while it was not
    indexed yet.  A word with a U+03C2 asks for both spellings (the candidates are
    then matched by :func:`chatproto.store.reading.words_match`)."""
    term = f"'{word}'" if len(word) == 1 else f"'{word}':*"
    if "\u03c2" not in word:
        return term
    other = _tsquery_term(word.replace("\u03c2", "\u03c3"))
    return f"({term} | {other})"


class SearchIndex:
    """Search over ``search_text`` and its filling, over the connection ``conn``
    (set by the class using it, with :meth:`safe_position`)."""

    conn: psycopg.Connection[Any]
    schema: str
    #: The core's (see :meth:`chatproto.store.postgresql.writers.WriterPositions.safe_position`).
    safe_position: Callable[[], int]

    #: Whether the last :meth:`index_search` left items it could not index yet (another
    #: writer's step held the lock, or a commit in flight below them kept the safe
    #: position under them): the store steps again later, commits or not.
    index_later = False

    #: The id an edit, delete or reaction refers to (see
    #: :meth:`chatproto.store.reading.ReadingSQL.search`).
    REF_SQL = "meta::json ->> 'ref'"

    def _search_sql(self, words: Sequence[str]) -> tuple[str, str, Any]:
        # words are letters and digits; one of one character is a whole word
        query = " & ".join(_tsquery_term(w) for w in words)
        cond = "to_tsvector('simple', s.body) @@ to_tsquery('simple', ?)"
        return "JOIN search_text s ON s.pos = items.pos", cond, query

    #: The core's (see :meth:`chatproto.store.reading.ReadingSQL.search_upto`).
    search_upto: Callable[[], int]

    def index_search(self, limit: int) -> int:
        """Index (for search) up to ``limit`` items after
        :meth:`chatproto.store.reading.ReadingSQL.search_upto`, never
        past the safe position, in one transaction; returns how many items it went
        past (fewer than ``limit``: caught up, or stopped short: :attr:`index_later`).

        Its commit waits for no WAL flush (``synchronous_commit = off`` for the
        step): the index is rebuilt from ``items`` from the position the step
        records in the same transaction, so a crash that loses a step loses nothing
        else (as SQLiteDB.index_search)."""
        # (outside the transaction: its locks of other writers' in-flight marks must
        # end with its statement, not hold their next commit back)
        safe = self.safe_position()
        c = self.conn
        self.index_later = False
        with c.transaction():
            c.execute("SET LOCAL synchronous_commit TO off")
            row = c.execute(
                "SELECT pg_try_advisory_xact_lock(%s)", (index_lock_key(self.schema),)
            ).fetchone()
            if not row or not row[0]:
                # another writer's step, which may stop before this writer's items
                self.index_later = True
                return 0
            # items above the safe position: committed or in flight, to index later
            row = c.execute("SELECT max(pos) FROM items WHERE pos > %s", (safe,)).fetchone()
            self.index_later = bool(row and row[0] is not None)
            lo = self.search_upto()
            if safe <= lo:
                return 0
            # how many items the step goes past, and the last (one row, not ``limit``)
            row = c.execute(
                "SELECT count(*), max(pos) FROM (SELECT pos FROM items WHERE pos > %s "
                "AND pos <= %s ORDER BY pos LIMIT %s) AS s",
                (lo, safe, limit),
            ).fetchone()
            n = int(row[0]) if row else 0
            hi = int(row[1]) if row and n >= limit else safe
            span = {"lo": lo, "hi": hi}
            c.execute(_INDEX_RANGE, span)
            c.execute(_EDITED_IN_RANGE, span)
            c.execute(_DELETED_IN_RANGE, span)
            c.execute("UPDATE settings SET value = %s WHERE key = 'search_upto'", (str(hi),))
        return n
