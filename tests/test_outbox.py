"""The federation outbox in the SQLite store: acknowledgements ride on the next group
commit, rows committed by this process are read from memory (SQLite for the rest),
requests are queued in call order with the appends, and remote items are de-duplicated
before one ``executemany``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail

from chatproto.envelope import Envelope, new_message_id
from chatproto.store import groupcommit
from chatproto.store.sqlite import SQLiteDB, SQLiteStore


def env(sender: str, recipient: str, body: str, mid: str | None = None) -> Envelope:
    return Envelope(mid or new_message_id(), "text", sender, recipient, 1.0, body)


def to_b(body: str) -> Envelope:
    return env("alice@a.example", "bob@b.example", body)


def no_sqlite_reads(store: SQLiteStore) -> None:
    """Make any read on the reader threads fail (the memory path must not need one)."""

    def refuse(*_: Any) -> Deferred[Any]:
        return fail(AssertionError("read SQLite"))

    store._read = refuse  # type: ignore[method-assign]


@pytest_twisted.inlineCallbacks
def test_outbox_read_from_memory_and_ack_rides_on_the_next_commit(tmp_path: Path) -> Any:
    from twisted.internet import reactor

    store = SQLiteStore(str(tmp_path / "r.sqlite3"), reactor)
    yield store.open()
    try:
        envs = [to_b(f"m{i}") for i in range(5)]
        yield store.append(envs[:3], [("b.example", e) for e in envs[:3]])
        no_sqlite_reads(store)
        rows = yield store.outbox_read("b.example", 0, 2)
        assert [(e.body, e.pos > 0) for _, e in rows] == [("m0", True), ("m1", True)]
        seqs = [s for s, _ in rows]
        rest = yield store.outbox_read("b.example", seqs[-1], 10)
        assert [e.body for _, e in rest] == ["m2"]
        # an ack on an idle store commits at once; it fires after the delete
        acked = store.outbox_ack("b.example", seqs[-1])
        assert not acked.called
        yield acked
        yield store.append(envs[3:], [("b.example", e) for e in envs[3:]])
        after = yield store.outbox_read("b.example", seqs[-1], 10)
        assert [e.body for _, e in after] == ["m2", "m3", "m4"]
        del store._read
        counts = yield store.outbox_counts()
        assert counts == {"b.example": 3}
    finally:
        yield store.close()
    db = SQLiteDB(str(tmp_path / "r.sqlite3"))
    assert [e.body for _, e in db.outbox_read("b.example", 0, 10)] == ["m2", "m3", "m4"]
    db.close()


@pytest_twisted.inlineCallbacks
def test_acks_and_appends_queued_together_cost_one_commit(tmp_path: Path) -> Any:
    from twisted.internet import reactor

    store = SQLiteStore(str(tmp_path / "r.sqlite3"), reactor)
    yield store.open()
    try:
        first = [to_b("a"), to_b("b")]
        yield store.append(first, [("b.example", e) for e in first])
        rows = yield store.outbox_read("b.example", 0, 10)
        blocker = store.append([env("x@a.example", "y@a.example", "busy")])  # in flight
        commits = store.commits
        acked = store.outbox_ack("b.example", rows[0][0])
        more = to_b("c")
        appended = store.append([more], [("b.example", more)])
        yield blocker
        yield appended
        # no commit of its own for the ack: it went with the append (or with both)
        assert acked.called and store.commits - commits <= 2
        left = yield store.outbox_read("b.example", 0, 10)  # from SQLite (after < floor)
        assert [e.body for _, e in left] == ["b", "c"]
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_rows_of_a_previous_run_come_from_sqlite_then_memory(tmp_path: Path) -> Any:
    from twisted.internet import reactor

    path = str(tmp_path / "r.sqlite3")
    store = SQLiteStore(path, reactor)
    yield store.open()
    old = [to_b(f"old{i}") for i in range(3)]
    yield store.append(old, [("b.example", e) for e in old])
    yield store.close()

    store = SQLiteStore(path, reactor)  # a restart: the cache knows nothing yet
    yield store.open()
    try:
        new = [to_b(f"new{i}") for i in range(2)]
        yield store.append(new, [("b.example", e) for e in new])
        rows = yield store.outbox_read("b.example", 0, 2)  # before the floor: SQLite
        assert [e.body for _, e in rows] == ["old0", "old1"]
        rows += yield store.outbox_read("b.example", rows[-1][0], 2)
        rows += yield store.outbox_read("b.example", rows[-1][0], 10)
        assert [e.body for _, e in rows] == ["old0", "old1", "old2", "new0", "new1"]
        seqs = [s for s, _ in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        no_sqlite_reads(store)
        tail = yield store.outbox_read("b.example", seqs[2], 10)  # at the floor: memory
        assert [e.body for _, e in tail] == ["new0", "new1"]
    finally:
        store.__dict__.pop("_read", None)
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_outbox_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from twisted.internet import reactor

    monkeypatch.setattr(groupcommit, "OUTBOX_CACHE", 3)
    store = SQLiteStore(str(tmp_path / "r.sqlite3"), reactor)
    yield store.open()
    try:
        envs = [to_b(f"m{i}") for i in range(5)]
        for e in envs:
            yield store.append([e], [("b.example", e)])
        assert len(store._outq["b.example"]) == 3
        rows = yield store.outbox_read("b.example", 0, 10)  # the evicted two: SQLite
        assert [e.body for _, e in rows] == [f"m{i}" for i in range(5)]
        no_sqlite_reads(store)
        tail = yield store.outbox_read("b.example", rows[1][0], 10)
        assert [e.body for _, e in tail] == ["m2", "m3", "m4"]
    finally:
        store.__dict__.pop("_read", None)
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_requests_queue_in_call_order_with_appends(tmp_path: Path) -> Any:
    from twisted.internet import reactor

    store = SQLiteStore(str(tmp_path / "r.sqlite3"), reactor)
    yield store.open()
    try:
        busy = store.append([env("x@a.example", "y@a.example", "busy")])
        request = {"id": "r1", "kind": "request", "from": "alice@a.example", "to": "#g@b.example"}
        queued = store.outbox_enqueue("b.example", [request])
        msg = env("alice@a.example", "#g@b.example", "hello")
        sent = store.append([msg], [("b.example", msg)])
        yield busy
        yield queued
        yield sent
        no_sqlite_reads(store)
        rows = yield store.outbox_read("b.example", 0, 10)
        assert [r["id"] if isinstance(r, dict) else r.body for _, r in rows] == ["r1", "hello"]
    finally:
        store.__dict__.pop("_read", None)
        yield store.close()
    db = SQLiteDB(str(tmp_path / "r.sqlite3"))
    rows = db.outbox_read("b.example", 0, 10)
    assert rows[0][1] == request and rows[1][1].body == "hello"
    db.close()


def test_commit_batch_dedups_remote_items_across_the_commit(tmp_path: Path) -> None:
    db = SQLiteDB(str(tmp_path / "r.sqlite3"))
    db.migrate()
    stored = env("dave@b.example", "alice@a.example", "stored", mid="r0")
    assert db.append_batch([[stored]], {}, None, [True]) == [[1]]
    again = env("dave@b.example", "alice@a.example", "stored", mid="r0")
    r1 = env("dave@b.example", "alice@a.example", "one", mid="r1")
    r1_twice = env("dave@b.example", "alice@a.example", "one", mid="r1")
    r2 = env("dave@b.example", "alice@a.example", "two", mid="r2")
    local = env("alice@a.example", "bob@a.example", "local")
    out, queued = db.commit_batch(
        [[again, r1, r1_twice], [local], [r1, r2]],
        {},
        [[("c.example", r1)], [], [("c.example", r1), ("c.example", r2)]],
        [True, False, True],
        {"b.example": 10},
    )
    assert out == [[None, 2, None], [3], [None, 4]]
    assert [(realm, body.body) for realm, _, body in queued] == [
        ("c.example", "one"),
        ("c.example", "two"),
    ]
    seqs = [s for _, s, _ in queued]
    assert seqs[1] == seqs[0] + 1
    assert [(s, e.body) for s, e in db.outbox_read("c.example", 0, 10)] == [
        (seqs[0], "one"),
        (seqs[1], "two"),
    ]
    rows = db.conn.execute("SELECT pos, id FROM items ORDER BY pos").fetchall()
    assert rows == [(1, "r0"), (2, "r1"), (3, local.id), (4, "r2")]
    # an id held by another conversation's item (stored, or local earlier in this
    # commit): stored under its alternate id, which a retry finds
    squat = env("mallory@b.example", "alice@a.example", "squat", mid="r3")
    mine = env("alice@a.example", "bob@a.example", "mine", mid="r4")
    real3 = env("carol@c.example", "alice@a.example", "real", mid="r3")
    real4 = env("carol@c.example", "alice@a.example", "real", mid="r4")
    out = db.append_batch([[squat], [mine], [real3, real4]], {}, None, [True, False, True])
    assert out == [[5], [6], [7, 8]]
    assert real3.id.startswith("r3~") and real4.id.startswith("r4~")
    retry = [env("carol@c.example", "alice@a.example", "real", mid=m) for m in ("r3", "r4")]
    assert db.append_batch([retry], {}, None, [True]) == [[None, None]]
    assert [e.id for e in retry] == [real3.id, real4.id]
    db.close()


@pytest_twisted.inlineCallbacks
def test_the_outbox_is_read_only_as_far_as_commits_the_realm_has_seen_through(
    tmp_path: Path,
) -> Any:
    """A reader thread sees a row as soon as the writer commits it; the realm applies
    what the commit means (a join to its group state) only when the commit's result
    reaches the reactor.  A link that sent such a row in between let the peer act on
    it first (found as a lost group message: the peer's member wrote back before the
    home realm had added them).  Reads stop at the last commit the reactor has seen."""
    from twisted.internet import reactor

    path = str(tmp_path / "r.sqlite3")
    store = SQLiteStore(path, reactor)
    yield store.open()
    try:
        # a commit whose result has not reached the reactor: straight into the file
        store._writer.outbox_enqueue("b.example", [{"id": "r1", "kind": "request"}])
        assert (yield store.outbox_read("b.example", 0, 10)) == []
        e = env("alice@a.example", "bob@b.example", "x")
        yield store.append([e], [("b.example", e)])  # seen through: both rows now
        rows = yield store.outbox_read("b.example", 0, 10)
        assert [(seq, getattr(item, "body", None)) for seq, item in rows] == [(1, None), (2, "x")]
    finally:
        yield store.close()
    # rows of an earlier run are there to read at once
    again = SQLiteStore(path, reactor)
    yield again.open()
    try:
        assert [seq for seq, _ in (yield again.outbox_read("b.example", 0, 10))] == [1, 2]
    finally:
        yield again.close()
