"""PostgreSQL's search index filled after the commits (schema 12, issue 20).

The search contract itself runs on every store (tests/test_store_reading.py); here,
what is PostgreSQL's own: the upgrade from schema 11 (its per-row trigger) with its
rows kept, the unindexed tail read directly, edits and deletes before and after a
step, and several writers (one indexes at a time, never past the safe position).
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

import chatproto.store.postgresql.db as pg_db
from chatproto.envelope import Envelope, new_message_id
from chatproto.store.postgresql import PostgresDB, PostgresStore
from chatproto.store.postgresql.writers import index_lock_key
from tests.conftest import old_postgres
from tests.test_store_postgresql import _hold_back, _wait_until

ALICE, BOB = "alice@localhost", "bob@localhost"
MINE = [("user", ALICE, 0)]


def env(body: str, kind: str = "text", ref: str | None = None) -> Envelope:
    return Envelope(
        new_message_id(), kind, BOB, ALICE, 1.0, body, None if ref is None else {"ref": ref}
    )


@pytest.fixture
def db(dsn: str, schema: str) -> Any:
    db = PostgresDB(dsn, schema, writer="realm")
    db.migrate()
    yield db
    db.close()


def commit(db: PostgresDB, *items: Envelope) -> list[int]:
    [positions] = db.commit_batch([list(items)], {})[0]
    assert isinstance(positions, list)
    for e, p in zip(items, positions, strict=True):
        e.pos = int(p)
    return [int(p) for p in positions]


def found(db: PostgresDB, *words: str) -> list[str]:
    return [e.body for e in db.search(list(words), MINE, None, 10)]


def rows(db: PostgresDB) -> dict[int, str]:
    return {int(p): b for p, b in db.conn.execute("SELECT pos, body FROM search_text")}


def test_schema_11_upgrades_in_place_and_keeps_its_index(dsn: str, schema: str) -> None:
    """A schema 11 database (search kept by a trigger per row) with items, an edit and
    a delete upgrades to 12: the trigger goes, the rows it wrote stay, everything up
    to the newest item counts as indexed, and the same searches find the same."""
    old = old_postgres(dsn, schema, 11)
    try:
        a, b, c = env("zqx alpha one"), env("zqx bravo two"), env("zqx charlie three")
        commit(old, a, b, c)
        commit(old, env("zqx bravo edited", "edit", b.id), env("", "delete", c.id))
        before = rows(old)
        assert sorted(before.values()) == ["zqx alpha one", "zqx bravo edited"]
        searches = [found(old, w) for w in ("zqx", "bravo", "edited", "charlie")]
    finally:
        old.close()
    new = PostgresDB(dsn, schema, writer="realm")
    try:
        assert new.migrate() == 11 and new.version() == pg_db.SCHEMA_VERSION
        trigger = new.conn.execute(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND t.tgname = 'items_search'",
            (schema,),
        ).fetchone()
        assert trigger == (0,)
        assert rows(new) == before
        assert new.search_upto() == new.max_pos() == 5
        assert [found(new, w) for w in ("zqx", "bravo", "edited", "charlie")] == searches
        assert searches[0] == ["zqx bravo edited", "zqx alpha one"]
        # new items no longer get a row in their commit
        [pos] = commit(new, env("zqx delta"))
        assert pos not in rows(new)
        assert found(new, "delta") == ["zqx delta"]
        assert new.index_search(2000) == 1 and rows(new)[pos] == "zqx delta"
    finally:
        new.close()


def test_a_new_item_is_found_before_and_after_it_is_indexed(db: PostgresDB) -> None:
    positions = commit(db, *(env(f"zqxword number{n}") for n in range(5)))
    assert db.search_upto() == 0 and rows(db) == {}
    assert found(db, "zqxword")[:2] == ["zqxword number4", "zqxword number3"]
    assert db.index_search(3) == 3 and db.search_upto() == positions[2]
    assert sorted(rows(db)) == positions[:3]
    # one search, both halves, newest first, paged
    assert found(db, "zqxword") == [f"zqxword number{n}" for n in (4, 3, 2, 1, 0)]
    page = db.search(["zqxword"], MINE, positions[3], 2)
    assert [e.body for e in page] == ["zqxword number2", "zqxword number1"]
    assert db.index_search(2000) == 2 and db.index_search(2000) == 0
    assert sorted(rows(db)) == positions
    assert found(db, "number1") == ["zqxword number1"]


def test_edits_and_deletes_before_and_after_indexing(db: PostgresDB) -> None:
    """An edit changes what finds its item, a delete makes its words unfindable, and
    its row leave the index: whether the item, the edit or the delete is indexed yet
    or not."""
    old_a, old_b, old_c = env("zqx alpha"), env("zqx bravo"), env("zqx charlie")
    commit(db, old_a, old_b, old_c)
    db.index_search(2000)
    assert found(db, "zqx") == ["zqx charlie", "zqx bravo", "zqx alpha"]
    # indexed items, edited and deleted (the edit and the delete not indexed yet)
    new_a, new_b = env("zqx xylophone", "edit", old_a.id), env("zqx yak")
    commit(db, new_a, env("", "delete", old_b.id), new_b)
    for _ in range(2):  # before the step that takes the edit and the delete, and after
        assert found(db, "xylophone") == ["zqx xylophone"]
        assert found(db, "alpha") == [] and found(db, "bravo") == []
        assert found(db, "zqx") == ["zqx yak", "zqx charlie", "zqx xylophone"]
        # a page of one is not used up by the edited item's former words
        assert [e.body for e in db.search(["zqx"], MINE, None, 1)] == ["zqx yak"]
        assert [e.body for e in db.search(["zqx"], MINE, new_b.pos, 2)] == [
            "zqx charlie",
            "zqx xylophone",
        ]
        assert "zqx bravo" not in rows(db).values()  # gone with its delete's commit
        db.index_search(2000)
    assert rows(db)[old_a.pos] == "zqx xylophone"
    # items edited and deleted before any step reached them
    d, e = env("zqx delta"), env("zqx echo")
    commit(db, d, e)
    commit(db, env("zqx foxtrot", "edit", d.id), env("", "delete", e.id))
    assert found(db, "foxtrot") == ["zqx foxtrot"] and found(db, "delta", "echo") == []
    db.index_search(2000)
    assert found(db, "foxtrot") == ["zqx foxtrot"] and found(db, "delta") == []
    assert rows(db)[d.pos] == "zqx foxtrot" and e.pos not in rows(db)


def test_a_step_that_read_an_item_before_its_delete_is_corrected(db: PostgresDB) -> None:
    """Another writer's step may index an item just before it is deleted (the delete's
    commit finds no row to remove yet): the step that reaches the delete removes it."""
    item = env("zqx secretword")
    commit(db, item)
    commit(db, env("", "delete", item.id))
    # what the other writer's step wrote, racing the delete
    db.conn.execute("INSERT INTO search_text VALUES (%s, 'zqx secretword')", (item.pos,))
    assert found(db, "secretword") == []  # matched by its current text: none
    db.index_search(2000)
    assert item.pos not in rows(db)


def test_two_writers_index_once_and_never_past_the_safe_position(
    dsn: str, schema: str, admin_conn: Any
) -> None:
    """Writer A is held back before its COMMIT (position 2 drawn); B commits 3.  B's
    step stops at 1 (2 may still commit, and would never be indexed).  While a step
    holds the index lock, another writer's step does nothing.  Once A commits, a step
    indexes both, once."""
    a = PostgresDB(dsn, schema, writer="a")
    a.migrate()
    b = PostgresDB(dsn, schema, create=False, writer="b")
    try:
        [first] = commit(a, env("zqx a0"))
        hold = _hold_back(dsn, schema, "a")
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(commit(a, env("zqx a1 late"))))
        t.start()
        try:
            _wait_until(lambda: b.items_top() == 2, "A has drawn its position")
            [mine] = commit(b, env("zqx b1"))
            assert mine == 3
            assert b.index_search(2000) == 1
            assert b.search_upto() == first == 1
            assert found(b, "zqx") == ["zqx b1", "zqx a0"]  # (3 through the tail)
        finally:
            hold.rollback()
            hold.close()
            t.join(20)
        assert result == [[2]]
        assert found(b, "zqx") == ["zqx b1", "zqx a1 late", "zqx a0"]
        with admin_conn.transaction():  # a step of another writer in progress
            admin_conn.execute("SELECT pg_advisory_xact_lock(%s)", (index_lock_key(schema),))
            assert a.index_search(2000) == 0 and b.index_search(2000) == 0
            assert a.search_upto() == 1
        assert a.index_search(2000) == 2 and b.index_search(2000) == 0
        assert b.search_upto() == 3
        assert sorted(rows(b)) == [1, 2, 3]
        assert found(a, "zqx") == ["zqx b1", "zqx a1 late", "zqx a0"]
    finally:
        a.close()
        b.close()


@pytest.fixture
def admin_conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest_twisted.inlineCallbacks
def test_the_postgresql_store_indexes_after_its_commits(dsn: str, schema: str) -> Any:
    """The store's steps (on its writer thread, when it has no commit to make) fill
    the index; a search right after a commit finds the item through the tail."""
    store = PostgresStore(dsn, schema, _reactor)
    yield store.open()
    try:
        for n in range(450):
            store.append([env(f"word{n}")])
        [last] = yield store.append([env("zqx last")])
        found_now = yield store.search(["zqx"], MINE, None, 10)
        assert [e.pos for e in found_now] == [last.pos]
        for _ in range(200):  # bounded: 10 s
            upto = yield store._read(lambda db: db.search_upto())
            if upto == last.pos:
                break
            yield task.deferLater(_reactor, 0.05, lambda: None)
        assert upto == last.pos
        got = yield store.search(["word44"], MINE, None, 20)
        assert sorted(e.body for e in got) == ["word44"] + [f"word44{n}" for n in range(10)]
    finally:
        yield store.close()


class _ClockedReactor:
    """The reactor (threads), with the timers of ``clock``."""

    def __init__(self, clock: task.Clock) -> None:
        self.callLater = clock.callLater

    def __getattr__(self, name: str) -> Any:
        return getattr(_reactor, name)


@pytest_twisted.inlineCallbacks
def test_a_step_skipped_for_another_writers_is_taken_again_later(
    dsn: str, schema: str, admin_conn: Any
) -> Any:
    """A worker's step that finds another writer's step holding the index lock steps
    again INDEX_DELAY later, with no commit to wake it: its items do not wait for the
    realm's next message to be indexed (the other step may have stopped before them)."""
    from chatproto.store.groupcommit import INDEX_DELAY

    clock = task.Clock()
    store = PostgresStore(dsn, schema, _ClockedReactor(clock), worker="w1")  # type: ignore[arg-type]
    yield store.open()
    steps: list[int] = []
    try:
        writer = store._writer
        assert isinstance(writer, PostgresDB)
        index_search = writer.index_search

        def step(limit: int) -> int:
            n = index_search(limit)
            steps.append(n)
            return n

        writer.index_search = step  # type: ignore[method-assign]
        with admin_conn.transaction():  # another writer's step in progress
            admin_conn.execute("SELECT pg_advisory_xact_lock(%s)", (index_lock_key(schema),))
            [item] = yield store.append([env("zqx alone")])
            yield task.deferLater(_reactor, 0, lambda: None)  # (the commit's end)
            assert [c.getTime() for c in clock.getDelayedCalls()] == [INDEX_DELAY]
            clock.advance(INDEX_DELAY)  # the realm is quiet: a step, skipped
            for _ in range(400):  # bounded: 20 s
                if steps and not store._indexing:
                    break
                yield task.deferLater(_reactor, 0.05, lambda: None)
            assert steps == [0]
        assert (yield store._read(lambda db: db.search_upto())) == 0
        clock.advance(INDEX_DELAY)  # no commit since: the timer steps again
        # Wait for the step to be over, not for its commit: search_upto is seen to
        # move before the writer thread has returned the step's count.
        for _ in range(400):  # bounded: 20 s
            if len(steps) > 1 and not store._indexing:
                break
            yield task.deferLater(_reactor, 0.05, lambda: None)
        assert steps == [0, 1]
        assert (yield store._read(lambda db: db.search_upto())) == item.pos
        assert clock.getDelayedCalls() == []  # caught up: no more steps
    finally:
        yield store.close()


def test_a_step_commits_without_waiting_for_its_wal_flush(db: PostgresDB) -> None:
    """As on SQLite: a step's transaction sets ``synchronous_commit`` off for itself
    (the index is rebuilt from the position it records); the connection's commits
    of items keep the server's setting."""
    commit(db, *(env(f"zqxflush number{n}") for n in range(3)))
    before = db.conn.execute("SHOW synchronous_commit").fetchone()[0]
    statements: list[str] = []
    execute = db.conn.execute

    def recording(query: Any, *args: Any, **kw: Any) -> Any:
        statements.append(str(query))
        if str(query).startswith("SELECT max(pos) FROM items WHERE pos >"):  # in the step
            statements.append(execute("SHOW synchronous_commit").fetchone()[0])
        return execute(query, *args, **kw)

    db.conn.execute = recording  # type: ignore[method-assign]
    try:
        assert db.index_search(2000) == 3
    finally:
        del db.conn.execute
    assert "off" in statements
    assert db.conn.execute("SHOW synchronous_commit").fetchone()[0] == before == "on"
    assert found(db, "zqxflush") == [f"zqxflush number{n}" for n in (2, 1, 0)]
