"""The signing keys of peer realms and what is queued for them (the federation
outbox and its group requests), in SQL.

Mixins of the synchronous store cores (:class:`chatproto.store.sqlite.SQLiteDB`,
:class:`chatproto.store.postgresql.PostgresDB`), like
:class:`chatproto.store.accounts.AccountsSQL`: the same statements on both, written
with ``?`` placeholders and run by the core's ``_run``.  The keys each peer realm last
announced are cached here so that a realm that restarts verifies their signatures
without asking them first (:class:`chatproto.signing.KeyRing` decides what to trust).
Outbox rows are written inside the cores' group commits (positions and sequences are
each dialect's own); :class:`OutboxSQL` reads and deletes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from chatproto.envelope import Envelope

__all__ = ["OutboxSQL", "PeerKeysSQL"]


class PeerKeysSQL:
    """``IStore.peer_keys`` and ``IStore.set_peer_keys`` of the SQL backends.
    ``_run`` is the core's (see :class:`chatproto.store.accounts.AccountsSQL`)."""

    _run: Callable[..., Any]

    def peer_keys(self) -> dict[str, list[dict[str, str]]]:
        rows = self._run("SELECT realm, keys FROM peer_keys ORDER BY realm").fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def set_peer_keys(self, realm: str, keys: list[dict[str, str]]) -> None:
        self._run(
            "INSERT INTO peer_keys VALUES (?, ?) "
            "ON CONFLICT (realm) DO UPDATE SET keys = excluded.keys",
            (realm, json.dumps(keys)),
        )


class OutboxSQL:
    """The federation outbox of the SQL backends (rows are written by the core's
    ``commit_batch``) and their pending group requests.  Hooks, the core's: ``_run`` (see
    :class:`chatproto.store.accounts.AccountsSQL`), ``_text_in`` (a client's free
    text as stored), ``_item`` and ``COLS`` (an item row, see
    :class:`chatproto.store.reading.ReadingSQL`)."""

    _run: Callable[..., Any]
    _text_in: Callable[[str], str]
    _item: Callable[[Any], Envelope]
    COLS: str
    commit_batch: Any

    def outbox_enqueue(self, realm: str, payloads: Sequence[dict[str, Any]]) -> None:
        """Queue ``payloads`` for ``realm`` in a commit of their own, as the store's
        ``outbox_enqueue`` does with its group commit (requests remembered too)."""
        self.commit_batch([[]], {}, [[(realm, p) for p in payloads]])

    def outbox_read(
        self, realm: str, after: int, limit: int, upto: int | None = None
    ) -> list[tuple[int, Envelope | dict[str, Any]]]:
        """Queued entries: stored items (Envelopes) and requests (dicts), in order;
        with ``upto``, none with a greater seq."""
        rows = self._run(
            f"SELECT o.seq, o.payload, {', '.join('i.' + c for c in self.COLS.split(', '))} "
            "FROM outbox o LEFT JOIN items i ON i.pos = o.pos "
            "WHERE o.realm = ? AND o.seq > ? AND o.seq <= ? ORDER BY o.seq LIMIT ?",
            (realm, after, upto if upto is not None else 2**62, limit),
        ).fetchall()
        return [(r[0], json.loads(r[1]) if r[1] is not None else self._item(r[2:])) for r in rows]

    def outbox_ack(self, realm: str, seq: int) -> None:
        self._run("DELETE FROM outbox WHERE realm = ? AND seq <= ?", (realm, seq))

    def outbox_counts(self) -> dict[str, int]:
        rows = self._run("SELECT realm, count(*) FROM outbox GROUP BY realm").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def outbox_holds(self, realm: str, pos: int) -> bool:
        row = self._run(
            "SELECT 1 FROM outbox WHERE realm = ? AND pos = ? LIMIT 1", (realm, pos)
        ).fetchone()
        return row is not None

    def pending_requests(self, actor: str, group: str) -> list[dict[str, Any]]:
        rows = self._run(
            "SELECT payload FROM requests WHERE actor = ? AND grp = ? ORDER BY ts, id",
            (self._text_in(actor), self._text_in(group)),
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def request_done(self, request_id: str) -> None:
        self._run("DELETE FROM requests WHERE id = ?", (self._text_in(request_id),))

    def expire_requests(self, before: float) -> int:
        return int(self._run("DELETE FROM requests WHERE ts < ?", (before,)).rowcount)
