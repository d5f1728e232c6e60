"""The item reads (an item by id, the feed, events, a conversation's pages, its
partners), read markers, the conversation list, search, per-user settings and the
count of a sender's changes to an item, in SQL.

A mixin of the synchronous store cores (:class:`chatproto.store.sqlite.SQLiteDB`,
:class:`chatproto.store.postgresql.PostgresDB`): the same statements on both, written
with ``?`` placeholders (PostgreSQL's core turns them into ``%s``).  The rules these
queries serve (what counts as unread, what a member may read) are stated in
PROTOCOL.md ("Read markers", "conversations") and decided by the realm
(:mod:`chatproto.realm.reading`); the store only counts.

Read markers are written with the group commit (see ``GroupCommitStore.set_read``),
like acks: a marker is a ``(user, conversation)`` row holding a position, and only
moves forward.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from chatproto.envelope import Envelope, alternate_id, alternate_range
from chatproto.relations import DELETED_META, current_view

__all__ = [
    "REF_KINDS_SQL",
    "SEARCH_KINDS",
    "UNREAD_KINDS",
    "ReadingSQL",
    "alternate_of",
    "conversation_summary",
    "search_words",
    "words_match",
]

#: The kinds of item that count as unread (a message or a file, not an event).
UNREAD_KINDS = ("text", "file")

_KINDS_SQL = "kind IN ('text', 'file')"
#: The ``meta`` column of a deleted item (what the SQL stores write when they wipe it).
_DELETED_JSON = json.dumps(DELETED_META)
#: Selects the items about another (edits, deletes, reactions: chatproto.relations).
REF_KINDS_SQL = "kind IN ('edit', 'delete', 'reaction')"
#: The kinds of item search finds (their body: a message's text, a file's name).
SEARCH_KINDS = UNREAD_KINDS
#: The most items not indexed yet that one search reads directly (the newest): more
#: than the store lets wait (groupcommit.INDEX_FORCE) plus a step.  They cost a search
#: about 55 us each (read, current text, matched here): the bound keeps one under 3 s.
SEARCH_TAIL = 50_000

_WORD = re.compile(r"[^\W_]+")


#: The most rows one statement of :meth:`ReadingSQL.conversations` names (its
#: parameters stay far below both backends' limits).
_CHUNK = 1000


def _chunks(seq: Sequence[Any]) -> list[Sequence[Any]]:
    return [seq[i : i + _CHUNK] for i in range(0, len(seq), _CHUNK)]


def _values(rows: Sequence[tuple[str, int]]) -> tuple[str, list[Any]]:
    """A ``VALUES`` list of ``(text, position)`` rows and its parameters (the cast
    types the column on PostgreSQL whatever size the first integer has)."""
    params: list[Any] = []
    for text, pos in rows:
        params += [text, pos]
    return "VALUES " + ", ".join(["(?, CAST(? AS BIGINT))"] * len(rows)), params


def search_words(query: str) -> list[str]:
    """The words of a search query, lower-cased: runs of letters and digits (what
    the full-text engines index as words; punctuation and ``_`` separate them)."""
    return [w.lower() for w in _WORD.findall(query)]


def _index_term(word: str) -> str:
    """``word`` (one of :func:`search_words`) as the SQL stores ask their full-text
    index for it: the index folds the case of what it holds itself, and folds U+0130
    (İ, the dotted capital I) differently from Python, whose lower case of it is
    ``i`` + U+0307 -- a sequence no index holds, so a word with an İ was found while
    its item was not indexed yet and never after.  Given back its İ, the word is
    folded by the index as the item's text was; the candidates it finds are then
    matched by :func:`words_match`, as every other."""
    return word.replace("i\u0307", "\u0130")


def words_match(words: Sequence[str], body: str) -> bool:
    """Whether every one of ``words`` begins a word of ``body`` -- is one, for a word
    of one character (as a prefix it is the query full-text indexes answer slowest,
    and finds next to everything) -- (the memory store's search; the SQL stores ask
    their full-text index the same)."""
    have = search_words(body)
    return all(any(h == w if len(w) == 1 else h.startswith(w) for h in have) for w in words)


def alternate_of(item_id: str, items: Sequence[Envelope], key: bytes) -> Envelope | None:
    """The first of ``items`` (of one conversation) stored under the alternate id
    of an item sent as ``item_id`` (``key``: the store's key of alternate ids)."""
    for e in items:
        if alternate_id(attrs.evolve(e, id=item_id), key) == e.id:
            return e
    return None


def conversation_summary(
    conv: str, last: Envelope | None, read: int, unread: int, mentions: int, markers: Any
) -> dict[str, Any]:
    """One entry of :meth:`IStore.conversations` (every backend returns these)."""
    return {
        "conv": conv,
        "last": last,
        "read": read,
        "unread": unread,
        "mentions": mentions,
        "markers": markers,
    }


class ReadingSQL:
    """Queries shared by the SQL backends.  Hooks: ``_run`` runs a statement written
    with ``?`` placeholders and returns its cursor (:meth:`_rows`: its rows);
    ``_refs`` finds the items about others; :meth:`_item` makes an Envelope of an
    item row (columns :data:`COLS`); :meth:`_mention_sql` is the condition "body
    mentions the name given as its one parameter"."""

    COLS = "pos, id, kind, sender, recipient, ts, body, meta, sig"
    #: The items whose id is in a range (the alternates of an id: stored_item_in),
    #: read through the unique id index.
    ALTERNATES_SQL = f"SELECT {COLS} FROM items WHERE id >= ? AND id <= ? ORDER BY pos"

    @staticmethod
    def conv_sql(key: str) -> str:
        """The ``items.conv`` of the conversation whose key is the SQL expression
        ``key``: the key itself on PostgreSQL; SQLite's items hold a short integer
        instead (:meth:`chatproto.store.sqlite.SQLiteDB.conv_sql`).  Every read
        compares ``items.conv`` only with what this makes of a key."""
        return key

    def _user_convs_sql(self) -> str:
        """The ``items.conv`` of the private conversations of the user given as its
        one parameter (see chatproto/store/userconvs.py): the items to or from a
        user are the items of these."""
        return f"SELECT {self.conv_sql('conv')} FROM user_convs WHERE user_addr = ?"

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return list(self._run(sql, params).fetchall())

    def _item(self, row: Any) -> Envelope:
        raise NotImplementedError

    def _mention_sql(self) -> tuple[str, Any]:
        """``(condition, how to make its parameter from a name)``."""
        raise NotImplementedError

    #: The core's: a client's free text as the store keeps it (see
    #: :meth:`chatproto.store.accounts.AccountsSQL._text_in`).
    _text_in: Callable[[str], str]
    #: The core's: run one statement (``?`` placeholders), return its cursor (see
    #: :meth:`chatproto.store.accounts.AccountsSQL._run`).
    _run: Callable[..., Any]
    #: The core's: the items that refer to any of the items given (with
    #: ``edits_only``, the edits), oldest first.
    _refs: Callable[..., list[Envelope]]
    #: The core's: the store's key of alternate ids (chatproto.envelope.alternate_id).
    _id_key: Callable[[], bytes]

    # items ----------------------------------------------------------------------------

    def stored_item(self, item_id: str) -> Envelope | None:
        rows = self._rows(f"SELECT {self.COLS} FROM items WHERE id = ?", (self._text_in(item_id),))
        return self._item(rows[0]) if rows else None

    def stored_item_in(self, item_id: str, conversation: str) -> Envelope | None:
        """See :meth:`chatproto.store.IStore.stored_item_in`: the alternates of
        ``item_id`` are read by a range of the unique id index
        (:func:`chatproto.envelope.alternate_range`), then checked with the store's
        key."""
        env = self.stored_item(item_id)
        if env is not None and env.conversation == conversation:
            return env
        lo, hi = alternate_range(item_id)
        # By the id range alone, the conversation compared here: with ``conv = ?`` in
        # the statement SQLite walks the conversation's items_conv entries instead
        # (every item of a large group, for each reference a peer names that is not
        # stored: a peer's cheap way to make this realm scan).
        rows = self._rows(
            self.ALTERNATES_SQL,
            (self._text_in(lo), self._text_in(hi)),
        )
        found = [e for e in (self._item(r) for r in rows) if e.conversation == conversation]
        return alternate_of(item_id, found, self._id_key())

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
        bound = "" if upto is None else " AND pos <= ?"
        # The user's private conversations (user_convs), each read through items_conv.
        parts = [
            f"SELECT {self.COLS} FROM items WHERE conv IN ({self._user_convs_sql()}) "
            f"AND pos > ?{bound}"
        ]
        conv = self.conv_sql("?")
        params: list[Any] = [user, after] if upto is None else [user, after, upto]
        for group, lo, hi in groups:
            if hi is not None and hi <= after:
                continue
            part = f"SELECT {self.COLS} FROM items WHERE conv = {conv} AND pos > ?"
            params += [group, max(after, lo)]
            if hi is not None:
                part += " AND pos <= ?"
                params.append(hi)
            parts.append(part)
        # UNION (not ALL): ranges may overlap (an invite, then a membership under the
        # history rule "all"), and a duplicate row would waste the page.
        sql = " UNION ".join(parts) + " ORDER BY pos LIMIT ?"
        params.append(limit)
        items = [self._item(r) for r in self._rows(sql, params)]
        # Edited items show their current text (chatproto.relations); reactions come
        # as items of their own after them.
        return current_view(items, self._refs(items, edits_only=True), reactions=False)

    def read_events(self, after: int, limit: int, upto: int | None = None) -> list[Envelope]:
        """Group events (kind ``event``) after ``after`` (none above ``upto``), oldest
        first (for replay)."""
        bound = "" if upto is None else " AND pos <= ?"
        params = (after, limit) if upto is None else (after, upto, limit)
        rows = self._rows(
            f"SELECT {self.COLS} FROM items WHERE kind = 'event' AND pos > ?{bound} "
            "ORDER BY pos LIMIT ?",
            params,
        )
        return [self._item(r) for r in rows]

    def conversation_partners(self, user: str, after: int = 0) -> list[str]:
        """The users ``user`` has a private conversation with (after ``after``)."""
        rows = self._rows(
            "SELECT peer FROM user_convs u WHERE user_addr = ? AND peer <> ? AND EXISTS "
            f"(SELECT 1 FROM items WHERE items.conv = {self.conv_sql('u.conv')} "
            "AND items.pos > ?) ORDER BY peer",
            (user, user, after),
        )
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
        """A page of ``conversation`` (see ``IStore.history``); with ``upto``, none
        above it."""
        conv = self.conv_sql("?")
        if after is not None:
            bound = "" if upto is None else " AND pos <= ?"
            params: tuple[Any, ...] = (conversation, max(after, floor))
            rows = self._rows(
                f"SELECT {self.COLS} FROM items WHERE conv = {conv} AND pos > ?{bound} "
                f"AND NOT {REF_KINDS_SQL} ORDER BY pos LIMIT ?",
                (*params, limit) if upto is None else (*params, upto, limit),
            )
        else:
            rows = self._rows(
                f"SELECT {self.COLS} FROM items WHERE conv = {conv} AND pos < ? AND pos > ? "
                f"AND NOT {REF_KINDS_SQL} ORDER BY pos DESC LIMIT ?",
                (conversation, before if before is not None else 2**62, floor, limit),
            )
            rows.reverse()
        return self._current([self._item(r) for r in rows])

    def ref_count(self, ref: str, sender: str) -> int:
        """How many ``edit`` and ``reaction`` items from ``sender`` refer to item
        ``ref`` (``IStore.ref_count``)."""
        rows = self._rows(
            "SELECT count(*) FROM refs JOIN items ON items.pos = refs.pos WHERE refs.ref = ? "
            "AND items.sender = ? AND items.kind IN ('edit', 'reaction')",
            (self._text_in(ref), self._text_in(sender)),
        )
        return int(rows[0][0])

    def read_markers(self, conv: str) -> dict[str, int]:
        """``{user: position}`` of every read marker in conversation ``conv``."""
        rows = self._rows("SELECT user_addr, pos FROM read_markers WHERE conv = ?", (conv,))
        return {r[0]: int(r[1]) for r in rows}

    def read_position(self, conv: str, before_ts: float, floor: int) -> int:
        """The position of the newest item of ``conv`` after ``floor`` that is not an
        item about another (a reaction, an edit, a delete) and whose ``ts`` is less
        than ``before_ts``; 0 when none.  Walks the conversation's index from its end:
        cheap for the recent items a client marks read."""
        rows = self._rows(
            f"SELECT pos FROM items WHERE conv = {self.conv_sql('?')} AND pos > ? AND ts < ? "
            "AND kind NOT IN ('edit', 'delete', 'reaction') ORDER BY pos DESC LIMIT 1",
            (conv, floor, before_ts),
        )
        return int(rows[0][0]) if rows else 0

    def prefs(self, key: str) -> dict[str, str]:
        """``{user: value}`` of every user who set preference ``key``."""
        rows = self._rows("SELECT user_addr, value FROM prefs WHERE key = ?", (key,))
        return {r[0]: r[1] for r in rows}

    def set_pref(self, user: str, key: str, value: str | None) -> None:
        """Set (or with None, clear) preference ``key`` of ``user``."""
        if value is None:
            self._run("DELETE FROM prefs WHERE user_addr = ? AND key = ?", (user, key))
        else:
            self._run(
                "INSERT INTO prefs VALUES (?, ?, ?) "
                "ON CONFLICT (user_addr, key) DO UPDATE SET value = excluded.value",
                (user, key, value),
            )

    def conversations(
        self,
        user: str,
        floor: int,
        groups: Sequence[tuple[str, int]],
        name: str,
        limit: int,
        pending: dict[tuple[str, str], int],
    ) -> list[dict[str, Any]]:
        """The conversations of ``user``, most recent first: every private
        conversation with an item after ``floor`` (the account's), and each group of
        ``groups`` (``(group, lo)``: the member reads items after ``lo``) with an item
        they may read.  ``pending``: read markers not committed yet (they count).

        Per conversation: the last item, the user's marker, the items of kind text
        or file after the marker (and what the user may read) sent by others, how
        many of those mention ``name`` (groups only), and every marker in it."""
        # The last position of each conversation: one statement for the private ones
        # (user_convs has one row per conversation), one per chunk of groups.
        last = {
            conv: int(pos)
            for conv, pos in self._rows(
                "SELECT conv, (SELECT max(pos) FROM items WHERE items.conv = "
                f"{self.conv_sql('u.conv')} AND items.pos > ?) FROM user_convs u "
                "WHERE user_addr = ?",
                (floor, user),
            )
            if pos is not None
        }
        lows = dict.fromkeys(last, floor)
        bounds = dict(groups)  # (a group named twice: its last bound, as before)
        for chunk in _chunks(list(bounds.items())):
            values, params = _values(chunk)
            for conv, pos in self._rows(
                f"WITH g (conv, lo) AS ({values}) SELECT g.conv, (SELECT max(pos) "
                f"FROM items WHERE items.conv = {self.conv_sql('g.conv')} "
                "AND items.pos > g.lo) FROM g",
                params,
            ):
                if pos is not None:
                    last[conv] = int(pos)
                    lows[conv] = bounds[conv]
        chosen = sorted(last, key=lambda c: -last[c])[:limit]
        items: dict[int, Envelope] = {}
        markers: dict[str, dict[str, int]] = {conv: {} for conv in chosen}
        for chunk in _chunks(chosen):
            marks = ", ".join("?" * len(chunk))
            for row in self._rows(
                f"SELECT {self.COLS} FROM items WHERE pos IN ({marks})",
                [last[conv] for conv in chunk],
            ):
                items[int(row[0])] = self._item(row)
            for conv, u, p in self._rows(
                f"SELECT conv, user_addr, pos FROM read_markers WHERE conv IN ({marks})", chunk
            ):
                markers[conv][u] = int(p)
        for (u, c), p in pending.items():
            if c in markers and p > markers[c].get(u, 0):
                markers[c][u] = p
        # The unread items after each conversation's bound, and of those the texts of
        # a group that mention ``name``: one statement per chunk of conversations, each
        # count a range of items_conv (correlated subqueries: a join lets PostgreSQL
        # hash all of items).
        cond, param = self._mention_sql()
        unread = (
            f"SELECT count(*) FROM items WHERE items.conv = {self.conv_sql('a.conv')} "
            "AND items.pos > a.since "
            f"AND items.sender <> ? AND items.{_KINDS_SQL}"
        )
        counts: dict[str, tuple[int, int]] = {}
        for chunk in _chunks(chosen):
            values, params = _values(
                [(conv, max(markers[conv].get(user, 0), lows[conv])) for conv in chunk]
            )
            for conv, n, mentioned in self._rows(
                f"WITH a (conv, since) AS ({values}) SELECT a.conv, "
                f"({unread} AND (items.meta IS NULL OR items.meta <> ?)), "
                f"CASE WHEN substr(a.conv, 1, 1) = '#' THEN ({unread} AND items.kind = 'text' "
                f"AND {cond}) ELSE 0 END FROM a",
                [*params, user, _DELETED_JSON, user, param(name)],
            ):
                counts[conv] = (int(n), int(mentioned))
        return [
            conversation_summary(
                conv,
                items.get(last[conv]),
                markers[conv].get(user, 0),
                *counts[conv],
                markers[conv],
            )
            for conv in chosen
        ]

    def _set_reads(self, reads: dict[tuple[str, str], int]) -> None:
        """Inside a group commit: move markers forward (never back)."""
        raise NotImplementedError

    #: The id an edit, delete or reaction refers to, as an SQL expression over its row.
    REF_SQL: str

    def _search_sql(self, words: Sequence[str]) -> tuple[str, str, Any] | None:
        """``(join, condition, parameter)``: the rows of ``items`` whose body has a
        word beginning with each of ``words`` (or more rows: :meth:`search` matches
        them again), through the backend's full-text index; None when the index
        cannot hold such words (no indexed item has them)."""
        raise NotImplementedError

    def _current(self, items: list[Envelope]) -> list[Envelope]:
        """``items`` as ``history`` shows them (edited text, reactions, deletions)."""
        return current_view(items, self._refs(items))

    def search(
        self,
        words: Sequence[str],
        scopes: Sequence[tuple[str, str, int]],
        before: int | None,
        limit: int,
    ) -> list[Envelope]:
        """Items of kind text or file whose current text (an edited item's latest
        edit's; a deleted one has none) matches every one of ``words`` (see
        :meth:`_search_sql`), as ``history`` shows them, newest first, at most
        ``limit``, with ``pos < before``, in the scopes given: ``("user", address,
        floor)`` for the private items to or from that user after ``floor``;
        ``("conv", key, lo)`` for the items of one conversation (a group's
        address, or a private conversation's key) after ``lo``.  No scope: nothing."""
        if not scopes or not words:
            return []
        parts = []
        where: list[Any] = []
        for kind, what, lo in scopes:
            if kind == "user":
                parts.append(f"(items.conv IN ({self._user_convs_sql()}) AND items.pos > ?)")
                where += [what, lo]
            else:
                parts.append(f"(items.conv = {self.conv_sql('?')} AND items.pos > ?)")
                where += [what, lo]
        scope = f"items.{_KINDS_SQL} AND ({' OR '.join(parts)})"
        cols = ", ".join("items." + c for c in self.COLS.split(", "))
        bound = before if before is not None else 2**62
        out: list[Envelope] = []
        upto = self.search_upto()
        stale: list[Any] = []
        edited: list[Envelope] = []
        if bound > upto + 1:
            # The newest items, not in the index yet (it is filled when the store is
            # idle): read and matched here, by their current text.
            rows = self._rows(
                f"SELECT {cols} FROM items WHERE items.pos > ? AND items.pos < ? AND {scope} "
                "ORDER BY items.pos DESC LIMIT ?",
                [upto, bound, *where, SEARCH_TAIL],
            )
            for env in self._current([self._item(r) for r in rows]):
                if env.body and words_match(words, env.body):
                    out.append(env)
                    if len(out) == limit:
                        return out
            bound = upto + 1
            # Items indexed before an edit that is not yet: the index holds their
            # former text, so they are matched here (by their current text) instead.
            rows = self._rows(
                f"SELECT {cols} FROM items WHERE items.id IN (SELECT {self.REF_SQL} FROM "
                f"items WHERE pos > ? AND kind = 'edit') AND items.pos < ? AND {scope}",
                [upto, bound, *where],
            )
            for env in self._current([self._item(r) for r in rows]):
                stale.append(env.pos)
                if env.body and words_match(words, env.body):
                    edited.append(env)
        sql = self._search_sql([_index_term(w) for w in words])
        if sql is None:
            return out + sorted(edited, key=lambda e: -e.pos)[: limit - len(out)]
        join, cond, param = sql
        skip = f" AND items.pos NOT IN ({', '.join('?' * len(stale))})" if stale else ""
        rows = self._rows(
            f"SELECT {cols} FROM items {join} WHERE {cond} AND items.pos < ? AND {scope}{skip} "
            "ORDER BY items.pos DESC LIMIT ?",
            [param, bound, *where, *stale, limit - len(out)],
        )
        found = self._current([self._item(r) for r in rows])
        found = [e for e in found if e.body and words_match(words, e.body)] + edited
        found.sort(key=lambda e: -e.pos)
        return out + found[: limit - len(out)]

    def search_upto(self) -> int:
        """Every text and file item up to this position is in the search index (both
        SQL stores keep it in ``settings``; items past it are matched by a scan)."""
        row = self._run("SELECT value FROM settings WHERE key = 'search_upto'").fetchone()
        return int(row[0]) if row else 0
