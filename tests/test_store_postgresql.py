"""The PostgreSQL store's own behaviour (its contract is in tests/test_store.py).

Each test works in schemas of its own (dropped when it ends) on the tests' PostgreSQL
server; skipped only when there is none and CI is unset.  Checked here: schema
migration, group commit, constraint isolation between batches of one commit, positions
from a sequence (never reused), acks flushed on close, one writer per schema,
connections lost and replaced, and ``synchronous_commit`` forced on.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from chatproto.envelope import Envelope, conversation_key, new_message_id
from chatproto.store.postgresql import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresDB,
    PostgresStore,
    describe_dsn,
)
from tests.conftest import old_postgres, pg_schema

ALICE, BOB = "alice@localhost", "bob@localhost"


def env(sender: str, recipient: str, body: str = "hi", id_: str | None = None) -> Envelope:
    return Envelope(id_ or new_message_id(), "text", sender, recipient, 1.0, body)


@pytest.fixture
def admin(dsn: str) -> Any:
    """A connection of the test's own (to look at or break the store's)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def open_store(dsn: str, schema: str) -> Any:
    """A PostgresStore open on the test's schema; closed at teardown."""
    store = PostgresStore(dsn, schema, _reactor)
    pytest_twisted.blockon(store.open())
    yield store
    pytest_twisted.blockon(store.close())


def test_migrate_fresh_schema_and_idempotent(dsn: str, schema: str, admin: Any) -> None:
    db = PostgresDB(dsn, schema)  # the schema is created
    try:
        assert db.version() == 0
        assert db.migrate() == 0
        assert db.version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert db.migrate() == SCHEMA_VERSION  # idempotent: nothing left to do
        tables = {
            r[0]
            for r in admin.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
            )
        }
        assert {"users", "items", "acks", "outbox", "files", "uploads", "settings"} <= tables
        assert {"schema_version"} <= tables
        assert db.conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
        key = db.conn.execute("SELECT value FROM settings WHERE key = 'id_key'").fetchone()
        assert key is not None and len(bytes.fromhex(key[0])) == 16
    finally:
        db.close()
    # nothing lands in the connection's default schema
    public = admin.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'items'"
    ).fetchone()
    assert public == (0,)


def test_newer_schema_is_refused(dsn: str, schema: str) -> None:
    db = PostgresDB(dsn, schema)
    db.migrate()
    db.conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    db.close()
    db = PostgresDB(dsn, schema)
    try:
        newer = rf"schema version {SCHEMA_VERSION + 1}, newer .*\({SCHEMA_VERSION}\); upgrade"
        with pytest.raises(RuntimeError, match=newer):
            db.migrate()
        assert db.version() == SCHEMA_VERSION + 1  # left untouched
    finally:
        db.close()
    failures: list[Any] = []
    PostgresStore(dsn, schema, _reactor).open().addErrback(failures.append)
    assert failures, "open() fails at once (under twistd it runs before the reactor)"
    failures[0].trap(RuntimeError)
    assert "newer" in str(failures[0].value)


def test_missing_schema_and_unreachable_server_are_clear(dsn: str, schema: str) -> None:
    with pytest.raises(RuntimeError, match=f"no schema '{schema}'"):
        PostgresDB(dsn, schema, create=False)
    with pytest.raises(RuntimeError, match=r"cannot connect to postgresql://.*:1/"):
        PostgresDB("host=127.0.0.1 port=1 dbname=x user=u connect_timeout=2", schema)
    with pytest.raises(RuntimeError, match="not a valid PostgreSQL DSN"):
        PostgresDB("host=127.0.0.1 this is not a dsn", schema)
    shown = describe_dsn("postgresql://chat:s3cret@db.example:6432/chat", "realm1")
    assert shown == "postgresql://chat@db.example:6432/chat (schema realm1)"
    assert "s3cret" not in describe_dsn("host=h password=s3cret user=u", "s")


@pytest_twisted.inlineCallbacks
def test_group_commit(open_store: Any) -> Any:
    store = open_store
    before = store.commits
    results = yield defer.gatherResults([store.append([env(ALICE, BOB)]) for _ in range(500)])
    assert len(results) == 500
    commits = store.commits - before
    assert 1 <= commits < 500
    assert store.committed_items == 500
    positions = [r[0].pos for r in results]
    assert positions == sorted(set(positions))


@pytest_twisted.inlineCallbacks
def test_bad_batch_fails_alone_within_one_commit(open_store: Any) -> Any:
    store = open_store
    first = env(ALICE, BOB, "in flight")
    d0 = store.append([first])  # the writer is busy with this one...
    before = store.commits
    ok1 = env(ALICE, BOB, "ok1")
    bad = [env(ALICE, BOB, "rolled back"), env(ALICE, BOB, "dup", id_=first.id)]
    ok2 = env(ALICE, BOB, "ok2")
    # ... so these three queue up and are committed together, in one transaction.
    d1, d2, d3 = store.append([ok1]), store.append(bad), store.append([ok2])
    yield d0
    r1 = yield d1
    with pytest.raises(psycopg.errors.UniqueViolation):
        yield d2
    r3 = yield d3
    # (one commit for all four if the first had not started on the writer thread
    # yet: a commit takes what waits when it starts)
    assert store.commits - before in (1, 2)
    assert r1[0].pos < r3[0].pos
    feed = yield store.read_feed(BOB, 0, 10)
    assert [e.body for e in feed] == ["in flight", "ok1", "ok2"]
    assert [e.pos for e in bad] == [0, 0]
    [later] = yield store.append([env(ALICE, BOB, "later")])
    assert later.pos > r3[0].pos


@pytest_twisted.inlineCallbacks
def test_positions_are_not_reused_after_deletion(open_store: Any, admin: Any, schema: str) -> Any:
    store = open_store
    items = yield store.append([env(ALICE, BOB, f"m{i}") for i in range(3)])
    top = items[-1].pos
    admin.execute(f'DELETE FROM "{schema}".items WHERE pos = %s', (top,))
    assert (yield store.max_pos()) == top - 1
    [again] = yield store.append([env(ALICE, BOB, "again")])
    assert again.pos > top
    yield store.create_user("dora", "h", 1.0)
    assert (yield store.user_floor("dora")) == again.pos


@pytest_twisted.inlineCallbacks
def test_close_flushes_pending_acks(dsn: str, schema: str) -> Any:
    store = PostgresStore(dsn, schema, _reactor)
    yield store.open()
    d = store.append([env(ALICE, BOB)])
    store.set_ack(BOB, "phone", 1)  # queued behind the append in flight
    store.set_ack(BOB, "phone", 7)
    store.set_ack(ALICE, "laptop", 3)
    yield store.close()
    assert d.called
    db = PostgresDB(dsn, schema, create=False)
    try:
        assert db.get_ack(BOB, "phone") == 7
        assert db.get_ack(ALICE, "laptop") == 3
        assert db.get_ack(BOB, "other") == 7
    finally:
        db.close()
    reopened = PostgresStore(dsn, schema, _reactor)
    yield reopened.open()
    try:
        assert (yield reopened.get_ack(BOB, "phone")) == 7
        assert (yield reopened.max_pos()) == 1
    finally:
        yield reopened.close()


@pytest_twisted.inlineCallbacks
def test_one_writer_per_schema(open_store: Any, dsn: str, schema: str) -> Any:
    first = open_store
    yield first.append([env(ALICE, BOB, "first")])
    second = PostgresStore(dsn, schema, _reactor)
    with pytest.raises(RuntimeError, match="another realm process is writing to"):
        yield second.open()
    other = PostgresStore(dsn, pg_schema(), _reactor)  # another schema: another realm
    yield other.open()
    yield other.close()
    yield first.close()
    yield second.open()  # the first one is gone
    try:
        feed = yield second.read_feed(BOB, 0, 10)
        assert [e.body for e in feed] == ["first"]
    finally:
        yield second.close()


def _backend_pids(store: PostgresStore) -> list[int]:
    dbs = [store._writer, *store._readers]
    return [db.conn.info.backend_pid for db in dbs if isinstance(db, PostgresDB)]


@pytest_twisted.inlineCallbacks
def test_lost_connections_are_replaced(admin: Any, dsn: str, schema: str) -> Any:
    """The server ends every connection of the store (a restart, a failover): the next
    read is retried on a new connection, the next commit -- lost before COMMIT was
    sent -- is done again on a new writing connection, which is the writer again.

    One reader thread, so the read after the kill is the killed connection's own (with
    two, a thread of the pool not yet idle again when the read is queued makes the pool
    start a second one, with a fresh connection: the killed one stays until its thread
    next reads).  And each kill waits until the server process is gone
    (``pg_terminate_backend`` only signals it by default: a read made before it has
    acted succeeds on the old connection)."""
    store = PostgresStore(dsn, schema, _reactor, readers=1)
    yield store.open()
    try:
        [a] = yield store.append([env(ALICE, BOB, "before")])
        assert (yield store.max_pos()) == a.pos  # the reader connection exists now
        pids = _backend_pids(store)
        assert len(pids) == 2
        for pid in pids:
            row = admin.execute("SELECT pg_terminate_backend(%s, 20000)", (pid,)).fetchone()
            assert row == (True,), f"backend {pid} still there after 20 s"
        assert (yield store.max_pos()) == a.pos
        [reader] = store._readers
        assert isinstance(reader, PostgresDB) and reader.conn.info.backend_pid not in pids
        [b] = yield store.append([env(ALICE, BOB, "after")])
        assert b.pos > a.pos
        assert not set(_backend_pids(store)) & set(pids)
        feed = yield store.read_feed(BOB, 0, 10)
        assert [e.body for e in feed] == ["before", "after"]
        with pytest.raises(RuntimeError, match="another realm process"):
            yield PostgresStore(dsn, schema, _reactor).open()
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_commits_are_synchronous_whatever_the_server_default(schema: str, dsn: str) -> Any:
    """An ack means the commit is on the server's disk: ``synchronous_commit`` is set on
    even when the DSN (or the role, or the server) turns it off."""
    lax = f"{dsn} options='-c synchronous_commit=off'"
    probe = psycopg.connect(lax, autocommit=True)
    try:
        assert probe.execute("SHOW synchronous_commit").fetchone() == ("off",)
    finally:
        probe.close()
    store = PostgresStore(lax, schema, _reactor)
    yield store.open()
    try:
        yield store.append([env(ALICE, BOB)])
        assert (yield store.max_pos()) == 1
        for db in [store._writer, *store._readers]:
            assert isinstance(db, PostgresDB)
            assert db.conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_a_poisoned_row_reads_as_safe_values(open_store: Any, admin: Any, schema: str) -> Any:
    """Rows stored before ``ts`` and ``meta`` were checked (or edited by hand) read as
    values that can always be sent (as in SQLite: see tests/test_federation_bad_values)."""
    store = open_store
    rows = [
        ("inf", float("inf"), None),
        ("nan", float("nan"), None),
        ("huge", 1e300, None),
        ("meta-nan", 1764093000.0, '{"x": NaN, "y": [Infinity]}'),
        ("meta-garbage", 1764093000.0, "{not json"),
    ]
    for mid, ts, meta in rows:
        admin.execute(
            f'INSERT INTO "{schema}".items (pos, id, kind, sender, recipient, conv, ts, body, '
            f"meta) VALUES (nextval('\"{schema}\".items_pos'), %s, 'text', %s, %s, %s, %s, "
            "%s, %s)",
            (mid, ALICE, BOB, f"{ALICE} {BOB}", ts, mid, meta),
        )
    # (the row the store writes with a conversation's first item: the feed reads by it)
    admin.execute(
        f'INSERT INTO "{schema}".user_convs VALUES (%s, %s, %s)', (BOB, f"{ALICE} {BOB}", ALICE)
    )
    feed = yield store.read_feed(BOB, 0, 10)
    assert [e.id for e in feed] == [r[0] for r in rows]
    assert [e.ts for e in feed] == [0.0, 0.0, 0.0, 1764093000.0, 1764093000.0]
    assert [e.meta for e in feed] == [None, None, None, {"x": None, "y": [None]}, None]


# several writers (issue 16, item 4) ---------------------------------------------------


def _wait_until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a thread is doing something we cannot be told about)."""
    import time as _time

    deadline = _time.monotonic() + timeout
    while not predicate():
        if _time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        _time.sleep(0.01)


def _hold_back(admin_dsn: str, schema: str, writer: str) -> Any:
    """A connection holding ``writer``'s row of ``stream_writers`` locked, so that
    writer's next commit stops just before COMMIT (its items inserted, its positions
    drawn, its in-flight lock held) until the connection's transaction ends."""
    conn = psycopg.connect(admin_dsn)
    conn.execute(f'SELECT 1 FROM "{schema}".stream_writers WHERE writer = %s FOR UPDATE', (writer,))
    return conn


def test_positions_across_writers_held_back_commit(dsn: str, schema: str) -> None:
    """Writer A draws a position and is held back before COMMIT; writer B draws a
    higher one and commits.  A reader never advances past A's position while it is in
    flight, so after A commits it reads A's item: nothing below a position it has seen
    is ever missed, and items come in position order.  A naive reader (the highest
    committed position) would have jumped over A's item."""
    import threading

    a = PostgresDB(dsn, schema, writer="a")
    a.migrate()
    b = PostgresDB(dsn, schema, create=False, writer="b")
    reader = PostgresDB(dsn, schema, create=False, writer="reader")
    try:
        a.append_batch([[env(ALICE, BOB, "a0")]], {})
        b.append_batch([[env(ALICE, BOB, "b0")]], {})
        seen = reader.safe_position()
        assert seen == 2
        got = [e.body for e in reader.read_stream(0, seen, 100)]
        assert got == ["a0", "b0"]

        hold = _hold_back(dsn, schema, "a")
        result: list[Any] = []
        late = env(ALICE, BOB, "a1 (late)")
        t = threading.Thread(target=lambda: result.append(a.append_batch([[late]], {})))
        t.start()
        try:
            _wait_until(lambda: reader.items_top() == 3, "A has drawn its position")
            [[pos_b]] = b.append_batch([[env(ALICE, BOB, "b1")]], {})
            assert pos_b == 4
            # B's item is committed and visible, A's (3) is not: the hazard.
            assert reader.max_pos() == 4
            assert [e.body for e in reader.read_stream(seen, 10, 100)] == ["b1"]
            # The safe position stays below A's in-flight position (it may be lower
            # than one seen before, A's row being older: a reader keeps its greatest).
            safe = reader.safe_position()
            assert safe < 3
            assert reader.read_stream(max(seen, safe), safe, 100) == []
            assert [w[0] for w in reader.writers() if w[3]] == ["a"]
        finally:
            hold.rollback()
            hold.close()
            t.join(20)
        assert result == [[[3]]]
        safe = reader.safe_position()
        assert safe == 4
        assert [e.body for e in reader.read_stream(seen, safe, 100)] == ["a1 (late)", "b1"]
        assert not any(w[3] for w in reader.writers())
    finally:
        for db in (a, b, reader):
            db.close()


GROUP = "#dev@localhost"


def _group_item(body: str) -> Envelope:
    return Envelope(new_message_id(), "text", ALICE, GROUP, 1.0, body)


def _leave() -> Envelope:
    meta = {"event": "left", "user": "carol@a.example"}
    return Envelope(new_message_id(), "event", "carol@a.example", GROUP, 1.0, "", meta)


def test_group_items_go_to_the_realms_recorded_at_their_position(dsn: str, schema: str) -> None:
    """Workers of a cluster (chatproto/store/grouprealms.py): writer A commits the
    leave of a.example's last member of GROUP (with the record of the group's realms
    after it) and is held back before COMMIT; writer B commits an item of GROUP that
    its worker checked against the group as it knew it (a.example with a member).  B
    waits for A's group lock before it draws its position, so its item comes after
    the leave in the realm's order, and is queued for the realms recorded then: not
    for a.example.  A join committed by another writer makes the next item go to the
    joiner's realm, which the worker did not know of; and a group with nothing
    recorded goes to the worker's realms.  Without the lock B would draw its
    position after A's and read the record before A's commit: a.example would get
    the group's text after its last member left."""
    import threading

    from chatproto.store.grouprealms import GroupFanout, GroupRealms

    a = PostgresDB(dsn, schema, writer="a")
    a.migrate()
    b = PostgresDB(dsn, schema, create=False, writer="b")
    reader = PostgresDB(dsn, schema, create=False, writer="reader")
    try:
        a.append_batch([[env(ALICE, BOB, "a0")]], {})  # (A's row in stream_writers)
        # nothing recorded of GROUP: the worker's realms
        first = _group_item("before")
        fan = GroupFanout(GROUP, first, ("a.example",))
        [[p1]] = b.append_batch([[first]], {}, [[("", fan)]])
        assert fan.queued == ["a.example"]
        assert reader.outbox_holds("a.example", p1)

        hold = _hold_back(dsn, schema, "a")
        leave = _leave()
        done_a: list[Any] = []
        done_b: list[Any] = []
        t_a = threading.Thread(
            target=lambda: done_a.append(
                a.append_batch(
                    [[leave]], {}, [[("a.example", leave), ("", GroupRealms(GROUP, ()))]]
                )
            )
        )
        t_a.start()
        try:
            _wait_until(lambda: reader.items_top() == p1 + 1, "A has drawn its position")
            after = _group_item("right after the leave")
            stale = GroupFanout(GROUP, after, ("a.example",))  # B's worker: not heard yet
            t_b = threading.Thread(
                target=lambda: done_b.append(b.append_batch([[after]], {}, [[("", stale)]]))
            )
            t_b.start()
            t_b.join(0.5)
            assert t_b.is_alive()  # waiting for GROUP's lock, no position drawn
            assert reader.items_top() == p1 + 1
        finally:
            hold.rollback()
            hold.close()
            t_a.join(20)
            t_b.join(20)
        assert done_a == [[[p1 + 1]]]
        assert done_b == [[[p1 + 2]]]
        assert stale.queued == []
        assert not reader.outbox_holds("a.example", p1 + 2)
        assert [pos for _, pos in _outbox(reader, "a.example")] == [p1, p1 + 1]  # the leave

        # a join recorded by A: B's next item goes to b.example, unknown to its worker
        join = Envelope(
            new_message_id(), "event", "dan@b.example", GROUP, 1.0, "",
            {"event": "joined", "user": "dan@b.example"},
        )  # fmt: skip
        a.append_batch(
            [[join]], {}, [[("b.example", join), ("", GroupRealms(GROUP, ("b.example",)))]]
        )
        later = _group_item("dan is here")
        fan = GroupFanout(GROUP, later, ())
        [[p4]] = b.append_batch([[later]], {}, [[("", fan)]])
        assert fan.queued == ["b.example"] and reader.outbox_holds("b.example", p4)

        # an item and a change in one commit: each in its order
        early, late = _group_item("early"), _group_item("late")
        quit_ = _leave()
        f_early = GroupFanout(GROUP, early, ())
        f_late = GroupFanout(GROUP, late, ())
        b.append_batch(
            [[early], [quit_], [late]],
            {},
            [[("", f_early)], [("", GroupRealms(GROUP, ()))], [("", f_late)]],
        )
        assert (f_early.queued, f_late.queued) == (["b.example"], [])
    finally:
        for db in (a, b, reader):
            db.close()


def _outbox(db: PostgresDB, realm: str) -> list[tuple[int, int]]:
    rows = db.conn.execute(
        "SELECT seq, pos FROM outbox WHERE realm = %s ORDER BY seq", (realm,)
    ).fetchall()
    return [(int(r[0]), int(r[1])) for r in rows]


@pytest_twisted.inlineCallbacks
def test_a_single_process_forgets_the_groups_realms_workers_recorded(dsn: str, schema: str) -> Any:
    """A single-process realm changes groups' realms without recording them: when it
    opens a schema, what workers recorded goes (else workers started after it would
    queue items for the realms of before)."""
    from chatproto.store.grouprealms import GroupRealms

    db = PostgresDB(dsn, schema, writer="w1")
    db.migrate()
    leave = _leave()
    db.append_batch([[leave]], {}, [[("", GroupRealms(GROUP, ("a.example",)))]])
    assert db.conn.execute("SELECT count(*) FROM group_realms").fetchone() == (2,)
    db.close()
    store = PostgresStore(dsn, schema, _reactor)
    yield store.open()
    try:
        rows = yield store._read(
            lambda r: r.conn.execute("SELECT count(*) FROM group_realms").fetchone()
        )
        assert rows == (0,)
    finally:
        yield store.close()


def test_dead_writer_holds_nobody_back(dsn: str, schema: str, admin: Any) -> None:
    """A writer whose connection dies mid-transaction (its process was killed) drew a
    position that will never be committed: once the server has ended its session,
    readers go past it."""
    a = PostgresDB(dsn, schema, writer="a")
    a.migrate()
    reader = PostgresDB(dsn, schema, create=False, writer="reader")
    try:
        a.append_batch([[env(ALICE, BOB, "a0")]], {})
        tx = a.conn.transaction()
        tx.__enter__()
        a._begin_commit()
        [drawn] = a._next("items_pos", 1)
        assert drawn == 2
        assert reader.safe_position() == 1  # in flight
        admin.execute("SELECT pg_terminate_backend(%s)", (a.conn.info.backend_pid,))
        _wait_until(lambda: reader.safe_position() == 2, "the dead writer is ignored")
        assert [e.body for e in reader.read_stream(0, 2, 10)] == ["a0"]
    finally:
        reader.close()
        try:
            a.conn.close()
        except Exception:
            pass


@pytest_twisted.inlineCallbacks
def test_worker_stores_share_a_schema_and_bound_their_reads(dsn: str, schema: str) -> Any:
    """Two worker stores (as two processes would) write to one schema; a store's
    reads (feed, history, newest position) never show an item above its safe
    position, so a session's backlog cannot jump over a commit held back elsewhere.
    A worker name runs once, and a single-process realm is refused beside workers."""
    import threading

    a = PostgresStore(dsn, schema, _reactor, worker="a")
    yield a.open()
    b = PostgresStore(dsn, schema, _reactor, worker="b")
    yield b.open()
    try:
        with pytest.raises(RuntimeError, match="worker 'a' already runs"):
            yield PostgresStore(dsn, schema, _reactor, worker="a").open()
        with pytest.raises(RuntimeError, match="another realm process is writing"):
            yield PostgresStore(dsn, schema, _reactor).open()
        [first] = yield a.append([env(ALICE, BOB, "a0")])
        assert (yield b.read_feed(BOB, 0, 10)) == []  # not yet known safe by b
        assert (yield b.safe_position()) == first.pos
        assert [e.body for e in (yield b.read_feed(BOB, 0, 10))] == ["a0"]

        hold = _hold_back(dsn, schema, "a")
        released = threading.Event()
        try:
            held = a.append([env(ALICE, BOB, "a1 (late)")])
            yield deferToThread_wait(lambda: _top(dsn, schema) == 2)
            [mine] = yield b.append([env(ALICE, BOB, "b1")])
            assert mine.pos == 3
            assert (yield b.safe_position()) == 1
            assert [e.body for e in (yield b.read_feed(BOB, 0, 10))] == ["a0"]
            page = yield b.history(conversation_key(ALICE, BOB), None, None, 10)
            assert all(e.pos <= 1 for e in page)
            assert (yield b.max_pos()) == 1
        finally:
            hold.rollback()
            hold.close()
            released.set()
        yield held
        assert (yield b.safe_position()) == 3
        feed = yield b.read_feed(BOB, 0, 10)
        assert [e.body for e in feed] == ["a0", "a1 (late)", "b1"]
    finally:
        yield a.close()
        yield b.close()


def _top(dsn: str, schema: str, seq: str = "items_pos") -> bool | int:
    """The highest value drawn from sequence ``seq`` (drawn values show at once,
    whatever the transaction that drew them)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            f'SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM "{schema}".{seq}'
        ).fetchone()
        return int(row[0]) if row else 0


def deferToThread_wait(predicate: Any) -> Any:
    from twisted.internet.threads import deferToThread

    return deferToThread(_wait_until, predicate, "the condition")


@pytest_twisted.inlineCallbacks
def test_worker_outbox_reads_stop_below_a_held_back_commit(dsn: str, schema: str) -> Any:
    """The federation sender reads the outbox (every worker's rows) only up to the
    outbox's safe sequence: a row committed late below one it acknowledged would
    otherwise be deleted unsent."""
    a = PostgresStore(dsn, schema, _reactor, worker="a")
    yield a.open()
    b = PostgresStore(dsn, schema, _reactor, worker="b")
    yield b.open()
    try:
        first = env(ALICE, "carol@peer", "a0")
        yield a.append([first], [("peer", first)])
        yield b.safe_position()
        assert [e.body for _, e in (yield b.outbox_read("peer", 0, 10))] == ["a0"]
        hold = _hold_back(dsn, schema, "a")
        try:
            late = env(ALICE, "carol@peer", "a1 (late)")
            held = a.append([late], [("peer", late)])
            # A has drawn its item's position, which numbers its outbox row
            yield deferToThread_wait(lambda: _top(dsn, schema) == 2)
            mine = env(BOB, "carol@peer", "b1")
            yield b.append([mine], [("peer", mine)])
            yield b.safe_position()
            rows = yield b.outbox_read("peer", 0, 10)
            assert [e.body for _, e in rows] == ["a0"]  # b1's row waits for a1's
            assert b.outbox_held  # (the sender looks again: see SendingFederation)
        finally:
            hold.rollback()
            hold.close()
        yield held
        yield b.safe_position()
        assert not b.outbox_held
        rows = yield b.outbox_read("peer", 0, 10)
        assert [e.body for _, e in rows] == ["a0", "a1 (late)", "b1"]
        assert [s for s, _ in rows] == sorted(s for s, _ in rows)
    finally:
        yield a.close()
        yield b.close()


CAROL = "carol@peer"


def _hold_item(dsn: str, schema: str, item_id: str) -> Any:
    """A connection holding the row of item ``item_id`` locked: a writer's commit of a
    ``delete`` of that item (which wipes the row) stops in mid-transaction -- its
    position drawn, its outbox rows not written yet -- until the connection's
    transaction ends."""
    conn = psycopg.connect(dsn)
    conn.execute(f'SELECT 1 FROM "{schema}".items WHERE id = %s FOR UPDATE', (item_id,))
    return conn


def _deletion(item: Envelope) -> Envelope:
    meta = {"ref": item.id}
    return Envelope(new_message_id(), "delete", item.sender, item.recipient, 2.0, "", meta)


@pytest_twisted.inlineCallbacks
def test_worker_outbox_goes_in_position_order_across_writers(dsn: str, schema: str) -> Any:
    """Two devices of alice on two workers write to one conversation with a user of
    another realm.  Writer A draws the position of its item (a delete) and is held
    in mid-transaction, before its outbox row is written; writer B draws the next
    position, queues its item and commits; then A commits.  The federation sender
    (on B) reads nothing past A's position while A is in flight, then both rows in
    position order: the peer stores them in the order alice's realm has them.  (With
    the outbox rows numbered from a sequence of their own, B's row had taken the
    lower number: the peer got B's item first.)"""
    a = PostgresStore(dsn, schema, _reactor, worker="a")
    yield a.open()
    b = PostgresStore(dsn, schema, _reactor, worker="b")
    yield b.open()
    try:
        first = env(ALICE, CAROL, "first")
        yield a.append([first], [("peer", first)])
        yield b.safe_position()
        [(sent, _)] = yield b.outbox_read("peer", 0, 10)
        yield b.outbox_ack("peer", sent)  # sent and acknowledged

        hold = _hold_item(dsn, schema, first.id)
        try:
            gone = _deletion(first)
            held = a.append([gone], [("peer", gone)])
            yield deferToThread_wait(lambda: _top(dsn, schema) == first.pos + 1)
            after = env(ALICE, CAROL, "after, from alice's other device")
            yield b.append([after], [("peer", after)])
            assert after.pos == first.pos + 2
            yield b.safe_position()
            assert (yield b.outbox_read("peer", sent, 10)) == []  # A is in flight below
            assert b.outbox_held
        finally:
            hold.rollback()
            hold.close()
        yield held
        assert gone.pos == first.pos + 1
        yield b.safe_position()
        assert not b.outbox_held
        rows = yield b.outbox_read("peer", sent, 10)
        assert [(e.kind, e.pos) for _, e in rows] == [("delete", gone.pos), ("text", after.pos)]
        seqs = [s for s, _ in rows]
        assert sent < seqs[0] < seqs[1]
        yield b.outbox_ack("peer", seqs[-1])
        assert (yield b.outbox_read("peer", 0, 10)) == []
    finally:
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_worker_killed_mid_commit_loses_and_repeats_nothing_in_the_outbox(
    dsn: str, schema: str, admin: Any
) -> Any:
    """Writer A (a worker's process) is killed in mid-transaction, its position
    drawn: the sender on B reads past it once the server has ended A's session,
    B's row is sent, and nothing of A's (never acknowledged) ever is."""
    import threading

    a = PostgresDB(dsn, schema, writer="a")
    a.migrate()
    b = PostgresStore(dsn, schema, _reactor, worker="b")
    yield b.open()
    try:
        first = env(ALICE, CAROL, "first")
        a.append_batch([[first]], {}, [[("peer", first)]])
        hold = _hold_item(dsn, schema, first.id)
        failed: list[Exception] = []

        def doomed() -> None:
            try:
                gone = _deletion(first)
                a.append_batch([[gone]], {}, [[("peer", gone)]])
            except Exception as e:
                failed.append(e)

        t = threading.Thread(target=doomed)
        t.start()
        try:
            yield deferToThread_wait(lambda: _top(dsn, schema) == 2)
            after = env(ALICE, CAROL, "after")
            yield b.append([after], [("peer", after)])
            assert after.pos == 3
            yield b.safe_position()
            assert [e.body for _, e in (yield b.outbox_read("peer", 0, 10))] == ["first"]
            # (waits until the server has ended A's session: its locks are gone)
            row = admin.execute(
                "SELECT pg_terminate_backend(%s, 20000)", (a.conn.info.backend_pid,)
            ).fetchone()
            assert row == (True,)
            yield deferToThread_wait(lambda: not t.is_alive())
            assert isinstance(failed[0], psycopg.OperationalError)
        finally:
            hold.rollback()
            hold.close()
        assert (yield b.safe_position()) >= 3
        rows = yield b.outbox_read("peer", 0, 10)
        assert [(e.body, e.pos) for _, e in rows] == [("first", 1), ("after", 3)]
    finally:
        yield b.close()
        try:
            a.conn.close()
        except Exception:
            pass


def test_schema_13_outbox_upgrades_and_keeps_its_order(dsn: str, schema: str) -> None:
    """A schema 13 outbox (rows numbered from a sequence of their own, here far
    ahead of the positions) upgrades to 14: its rows keep their order and are read
    first, the rows queued from then on are numbered from their items' positions,
    above every old one (the positions move past the old numbers), and the
    sequence and each writer's mark of it go."""
    old = old_postgres(dsn, schema, 13)
    queued = [env(ALICE, CAROL, "one"), env(ALICE, CAROL, "two")]
    try:
        old.append_batch([queued], {})  # (the outbox rows as schema 13 wrote them:)
        old.conn.execute("SELECT setval('outbox_seq', 4999999)")
        for pos, payload in ((2, None), (0, '{"kind": "request", "id": "r1"}'), (1, None)):
            old.conn.execute(
                "INSERT INTO outbox VALUES (nextval('outbox_seq'), 'peer', %s, %s)", (pos, payload)
            )
    finally:
        old.close()
    new = PostgresDB(dsn, schema, writer="realm")
    try:
        assert new.migrate() == 13 and new.version() == SCHEMA_VERSION
        rows = new.outbox_read("peer", 0, 10)
        assert [s for s, _ in rows] == [5000000, 5000001, 5000002]
        assert [getattr(e, "body", e) for _, e in rows] == [
            "two",
            {"kind": "request", "id": "r1"},
            "one",
        ]
        later = env(ALICE, CAROL, "three")
        [[pos]] = new.append_batch([[later]], {}, [[("peer", later)]])
        assert pos == 6  # past 5000002 // 1000000
        rows = new.outbox_read("peer", 0, 10)
        assert [s for s, _ in rows][-1] == 6000000 and rows[-1][1].body == "three"
        assert new.outbox_top() == 6999999
        gone = new.conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = 'outbox_seq'",
            (schema,),
        ).fetchone()
        assert gone == (0,)
        cols = new.conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'stream_writers'",
            (schema,),
        ).fetchall()
        assert "outbox_upto" not in {c[0] for c in cols}
    finally:
        new.close()


def test_outbox_rows_with_no_item_go_after_the_rows_queued_before_them() -> None:
    """The numbering of a commit's outbox rows (PostgreSQL): from their items'
    positions; a request after the rows queued before it (those of the first item
    when none is); a position drawn only when no row of the commit has an item, or
    when one position's numbers run out."""
    from chatproto.store.postgresql.writers import OUTBOX_SPREAD, outbox_seqs, outbox_upto

    drawn: list[int] = []

    def draw() -> int:
        drawn.append(100 + len(drawn))
        return drawn[-1]

    m = OUTBOX_SPREAD
    # an item queued for two realms, a request, the next item, a request
    assert outbox_seqs([7, 7, 0, 8, 0], draw) == [7 * m, 7 * m + 1, 7 * m + 2, 8 * m, 8 * m + 1]
    # a request queued before the commit's first item goes just before it
    assert outbox_seqs([0, 0, 7, 9], draw) == [7 * m, 7 * m + 1, 7 * m + 2, 9 * m]
    assert drawn == []
    # requests alone: one position drawn for them all
    assert outbox_seqs([0, 0], draw) == [100 * m, 100 * m + 1]
    assert drawn == [100]
    seqs = outbox_seqs([5] + [0] * m, draw)
    assert seqs[-1] == 101 * m and seqs[-2] == 5 * m + m - 1 and len(set(seqs)) == len(seqs)
    assert outbox_upto(5) == 6 * m - 1 and outbox_upto(5) < seqs[-1]


def test_acks_past_max_devices_go_without_waiting_for_other_writers(dsn: str, schema: str) -> None:
    """The acks past the bound (here rows an older chatproto kept) go in the user's
    next commit of an ack; a row another transaction holds (another worker's commit
    of the same user) is left rather than waited for -- two trims waiting for each
    other's rows would deadlock, and PostgreSQL would fail one whole group commit --
    and goes at the user's next trim.  A row this writer stored and another forgot,
    stored again, counts as new (the upsert says it inserted it)."""
    db = PostgresDB(dsn, schema)
    db.migrate()
    db.conn.execute("SET lock_timeout = '10s'")  # a trim that waits fails, not hangs
    other = psycopg.connect(dsn)
    try:
        db.conn.execute(
            "INSERT INTO acks SELECT %s, 'd' || k, k FROM generate_series(1, 6) k", (ALICE,)
        )
        db.conn.execute("INSERT INTO acks VALUES (%s, 'x', 1), (%s, 'y', 2)", (BOB, BOB))
        other.execute(f'SET search_path TO "{schema}"')
        other.execute("SELECT 1 FROM acks WHERE addr = %s AND device = 'd1' FOR UPDATE", (ALICE,))
        db.commit_batch([], {(ALICE, "d4"): 9}, devices=2)  # does not wait for d1's lock

        def devices(user: str) -> dict[str, int]:
            rows = db.conn.execute("SELECT device, pos FROM acks WHERE addr = %s", (user,))
            return dict(rows.fetchall())

        assert devices(ALICE) == {"d1": 1, "d4": 9, "d6": 6}
        assert devices(BOB) == {"x": 1, "y": 2}  # a user with no ack in the commit
        other.rollback()
        db.commit_batch([], {(ALICE, "d6"): 7}, devices=2)
        assert devices(ALICE) == {"d4": 9, "d6": 7}
        assert db.get_ack(ALICE, "d1") == 9
        # another writer forgets d6 (and stores two more); d6 stored again is new
        other.execute(f'SET search_path TO "{schema}"')  # (rolled back with the lock)
        other.execute("DELETE FROM acks WHERE addr = %s AND device = 'd6'", (ALICE,))
        other.execute("INSERT INTO acks VALUES (%s, 'e1', 10), (%s, 'e2', 11)", (ALICE, ALICE))
        other.commit()
        db.commit_batch([], {(ALICE, "d6"): 12}, devices=2)
        assert devices(ALICE) == {"d6": 12, "e2": 11}
    finally:
        other.close()
        db.close()


def test_read_markers_of_two_writers_in_opposite_orders_do_not_deadlock(
    dsn: str, schema: str, admin: Any
) -> None:
    """Two writers (workers of one realm) commit read markers of the same two rows,
    given in opposite orders.  Each commit writes its markers in the rows' key order,
    so the second waits for the first instead of deadlocking (PostgreSQL would end one
    of them, failing its whole group commit).  A third connection holds the second row
    so that each writer is seen waiting before either goes on: B (markers given second
    row first) waits, then A, then the row is let go."""
    import threading

    conv = f"{ALICE} {BOB}"
    first, second = (ALICE, conv), (BOB, conv)  # the rows' key order: (conv, user)
    a = PostgresDB(dsn, schema, writer="a")
    a.migrate()
    b = PostgresDB(dsn, schema, create=False, writer="b")
    hold = psycopg.connect(dsn)
    try:
        for db in (a, b):  # a commit that waits longer fails, not hangs
            db.conn.execute("SET lock_timeout = '20s'")
        a.commit_batch([], {}, reads={first: 1, second: 1})
        hold.execute(
            f'SELECT 1 FROM "{schema}".read_markers WHERE conv = %s AND user_addr = %s FOR UPDATE',
            (conv, BOB),
        )
        failed: list[BaseException] = []

        def commit(db: PostgresDB, reads: dict[tuple[str, str], int]) -> threading.Thread:
            def run() -> None:
                try:
                    db.commit_batch([], {}, reads=reads)
                except BaseException as e:
                    failed.append(e)

            t = threading.Thread(target=run)
            t.start()
            pid = db.conn.info.backend_pid
            _wait_until(
                lambda: (
                    not t.is_alive()
                    or admin.execute(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                        (pid,),
                    ).fetchone()
                    == (True,)
                ),
                f"writer {db.writer} waits for a row lock",
            )
            return t

        tb = commit(b, {second: 7, first: 4})
        ta = commit(a, {first: 5, second: 6})
        assert tb.is_alive() and ta.is_alive()  # both wait
        hold.rollback()
        for t in (tb, ta):
            t.join(30)
            assert not t.is_alive()
        assert failed == []
        assert a.read_markers(conv) == {ALICE: 5, BOB: 7}
    finally:
        hold.close()
        b.close()
        a.close()


# an account deleted by one worker while another's commit writes its ack -----------------


@pytest.fixture
def two_workers(dsn: str, schema: str) -> Any:
    """Two PostgresStores on one schema, writing as workers w1 and w2 of a cluster,
    with alice and bob and one item committed; closed at teardown."""
    stores = [
        PostgresStore(dsn, schema, _reactor, worker=w, realm="localhost") for w in ("w1", "w2")
    ]
    for store in stores:
        pytest_twisted.blockon(store.open())
    w1 = stores[0]
    pytest_twisted.blockon(w1.create_user("alice", "hash-a", 1.0))
    pytest_twisted.blockon(w1.create_user("bob", "hash-b", 1.0))
    [first] = pytest_twisted.blockon(w1.append([env(ALICE, BOB, "first")]))
    yield stores[0], stores[1], first
    for store in stores:
        pytest_twisted.blockon(store.close())


def _hold(db: Any, name: str) -> tuple[threading.Event, threading.Event]:
    """Make the next call of ``db``'s method ``name`` (on its writer thread) wait for
    the first Event; the second is set when it has started waiting."""
    gate, entered = threading.Event(), threading.Event()
    method = getattr(db, name)

    def held(*args: Any) -> Any:
        if not entered.is_set():
            entered.set()
            assert gate.wait(30)
        return method(*args)

    setattr(db, name, held)
    return gate, entered


@pytest_twisted.inlineCallbacks
def _gone_for_good(w1: Any, w2: Any, first: Any, devices: list[str]) -> Any:
    """bob's acks of ``devices`` and his read marker are in neither worker's store, and
    a later bob finds none of them."""
    conv = first.conversation
    for store in (w1, w2):
        for device in devices:
            assert (yield store.get_ack(BOB, device)) == 0
        assert BOB not in (yield store.read_markers(conv))
    yield w1.create_user("bob", "hash-b2", 5.0)
    for device in devices:
        assert (yield w2.get_ack(BOB, device)) == 0
    assert BOB not in (yield w2.read_markers(conv))


@pytest_twisted.inlineCallbacks
def test_an_ack_committed_by_another_worker_after_the_account_deletion_is_not_written(
    two_workers: Any,
) -> Any:
    """w2's group commit holds bob's ack and read marker while w1 deletes bob and
    commits: w2's commit, after it, writes neither (it upserted them: a later bob
    found the first one's ack, pos != 0, before the fix)."""
    w1, w2, first = two_workers
    gate, entered = _hold(w2, "_commit")
    busy = w2.append([env(ALICE, ALICE, "busy")])
    assert (yield deferToThread(entered.wait, 30))  # a commit of w2 runs, held
    w2.set_ack(BOB, "phone", first.pos)  # they wait for w2's next commit
    w2.set_read(BOB, first.conversation, first.pos)
    w2.set_ack(ALICE, "laptop", first.pos)
    after = w2.append([env(ALICE, ALICE, "after")])  # in that commit or a later one
    assert (yield w1.delete_user("bob", BOB)) is True  # committed meanwhile
    gate.set()
    yield busy
    yield after
    assert (yield w2.get_ack(ALICE, "laptop")) == first.pos  # others' are written
    yield _gone_for_good(w1, w2, first, ["phone"])


@pytest_twisted.inlineCallbacks
def test_an_ack_upserted_while_the_deletion_is_uncommitted_waits_for_it(
    two_workers: Any,
) -> Any:
    """w1's deletion of bob has run and not committed when w2's commit upserts bob's
    ack: w2's statement saw bob's row (w1's delete not committed) and wrote the ack
    before the fix; now it waits for bob's row lock and, the row deleted, writes
    nothing."""
    w1, w2, first = two_workers
    gate, entered = _hold(w1._writer, "_end_commit")  # after the deletion, before COMMIT
    deleted = w1.delete_user("bob", BOB)
    assert (yield deferToThread(entered.wait, 30))
    w2.set_ack(BOB, "phone", first.pos)
    w2.set_read(BOB, first.conversation, first.pos)
    after = w2.append([env(ALICE, ALICE, "after")])
    yield deferLater(_reactor, 0.3, lambda: None)  # w2's commit runs (and waits, now)
    gate.set()
    assert (yield deleted) is True
    yield after
    yield _gone_for_good(w1, w2, first, ["phone"])


@pytest_twisted.inlineCallbacks
def test_a_deletion_waits_for_a_commit_that_has_upserted_the_accounts_ack(
    two_workers: Any,
) -> Any:
    """w2's commit has upserted bob's ack and not committed when w1 deletes bob:
    w1's delete of bob's acks did not see the uncommitted row, which stayed before
    the fix; now w1's delete of bob's account waits for w2's commit (its lock on
    bob's row), and its delete of bob's acks, a statement later, sees the ack."""
    w1, w2, first = two_workers
    gate, entered = _hold(w2._writer, "_end_commit")  # after the upserts, before COMMIT
    w2.set_ack(BOB, "phone", first.pos)
    w2.set_read(BOB, first.conversation, first.pos)
    after = w2.append([env(ALICE, ALICE, "after")])
    assert (yield deferToThread(entered.wait, 30))
    deleted = w1.delete_user("bob", BOB)
    yield deferLater(_reactor, 0.3, lambda: None)  # w1's commit runs (and waits, now)
    gate.set()
    yield after
    assert (yield deleted) is True
    yield _gone_for_good(w1, w2, first, ["phone"])
