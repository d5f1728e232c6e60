"""A user's private items read through the conversations they are in (issue 20).

The SQL stores read a user's feed, partners, conversation list and private search
through ``user_convs`` and the ``items_conv`` index (chatproto/store/userconvs.py),
not through indexes on sender and recipient.  Checked here: on a generated realm
(many users, groups, DMs to oneself, users of another realm, edits, deleted and
re-created accounts) every such read gives on SQLite and PostgreSQL what the memory
store (which filters every item) gives; a SQLite database of schema 16 or 17 and a
PostgreSQL one of schema 10 upgrade in place and read the same; the feed's query plan
uses the index; the writer's memory of the rows stays right across a restart and with
two writers on one database.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from chatproto.envelope import Envelope, conversation_key, new_message_id
from chatproto.store.sqlite import SQLiteDB, SQLiteStore
from chatproto.store.userconvs import UserConvs, user_conv_rows
from tests.conftest import old_sqlite, pg_schema, postgresql_or_skip
from tests.test_store import _memory, _postgresql, _sqlite, open_store  # noqa: F401

LOCAL = [f"u{k}@localhost" for k in range(14)]
REMOTE = ["r0@other.example", "r1@other.example"]
GROUPS = ["#g0@localhost", "#g1@localhost"]
WORDS = "lunch deploy merge coffee ship review later".split()


def _env(rng: random.Random, sender: str, recipient: str, kind: str = "text") -> Envelope:
    meta = {"event": "joined", "user": sender} if kind == "event" else None
    return Envelope(
        id=new_message_id(),
        kind=kind,
        sender=sender,
        recipient=recipient,
        ts=1700000000.0 + rng.random(),
        body=" ".join(rng.choice(WORDS) for _ in range(3)) if kind == "text" else "",
        meta=meta,
    )


def _script(seed: int) -> list[tuple[str, Any]]:
    """The same realm history for every store: ``("append", items)``,
    ``("delete", (address, event))``, ``("create", name)``."""
    rng = random.Random(seed)
    everyone = LOCAL + REMOTE
    steps: list[tuple[str, Any]] = [("create", u.split("@")[0]) for u in LOCAL]
    sent: list[Envelope] = []
    for round_ in range(40):
        batch = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            sender = rng.choice(everyone)
            if r < 0.15:
                env = _env(rng, sender, rng.choice(GROUPS))
            elif r < 0.22:
                env = _env(rng, sender, sender)  # a DM to oneself
            elif r < 0.26:
                env = _env(rng, sender, rng.choice(GROUPS), "event")
            elif r < 0.30 and sent:
                target = rng.choice(sent)
                env = _env(rng, target.sender, target.recipient, "edit")
                env.meta = {"ref": target.id}
            else:
                env = _env(rng, sender, rng.choice([u for u in everyone if u != sender]))
            batch.append(env)
        sent.extend(e for e in batch if e.kind == "text")
        steps.append(("append", batch))
        if round_ in (12, 25):
            victim = LOCAL[round_ % 5]
            left = _env(rng, victim, GROUPS[0], "event")
            left.meta = {"event": "left", "user": victim}
            steps.append(("delete", (victim, left)))
            steps.append(("create", victim.split("@")[0]))
    return steps


def _copy(env: Envelope) -> Envelope:
    return Envelope(
        id=env.id,
        kind=env.kind,
        sender=env.sender,
        recipient=env.recipient,
        ts=env.ts,
        body=env.body,
        meta=dict(env.meta) if env.meta is not None else None,
    )


@pytest_twisted.inlineCallbacks
def _play(store: Any, steps: list[tuple[str, Any]]) -> Any:
    for what, arg in steps:
        if what == "append":
            yield store.append([_copy(e) for e in arg])
        elif what == "create":
            yield store.create_user(arg, "h", 0.0)
        else:
            address, event = arg
            assert (yield store.delete_user(address.split("@")[0], address, [_copy(event)]))


def _shown(items: list[Envelope]) -> list[tuple[int, str, str]]:
    return [(e.pos, e.id, e.body) for e in items]


@pytest_twisted.inlineCallbacks
def _reads(store: Any) -> Any:
    """Every read that goes by a user's private conversations, for every user."""
    out: dict[str, Any] = {}
    top = yield store.max_pos()
    for user in [*LOCAL, *REMOTE]:
        floor = 0
        if user.endswith("@localhost"):
            floor = yield store.user_floor(user.split("@")[0])
        groups = [(GROUPS[0], 0, None), (GROUPS[1], top // 3, 2 * top // 3)]
        pages = []
        after = floor
        while True:  # the whole feed, a page of 7 at a time
            page = yield store.read_feed(user, after, 7, groups)
            pages.append(_shown(page))
            if len(page) < 7:
                break
            after = page[-1].pos
        out[user, "feed"] = pages
        out[user, "feed later"] = _shown((yield store.read_feed(user, top // 2, 1000)))
        out[user, "partners"] = yield store.conversation_partners(user, floor)
        out[user, "partners later"] = yield store.conversation_partners(user, top // 2)
        rows = yield store.conversations(user, floor, [(GROUPS[1], top // 4)], "u1", 100)
        out[user, "conversations"] = [
            (r["conv"], r["last"].pos if r["last"] else None, r["unread"], r["mentions"])
            for r in rows
        ]
        for word in WORDS[:3]:
            found = yield store.search([word], [("user", user, floor)], None, 1000)
            out[user, "search", word] = _shown(found)
    return out


@pytest.fixture(params=[_sqlite, _postgresql], ids=["sqlite", "postgresql"])
def sql_store(request: Any, open_store: Any) -> Any:  # noqa: F811
    return open_store(request.param)


@pytest_twisted.inlineCallbacks
def test_reads_by_user_are_those_of_the_memory_store(sql_store: Any) -> Any:
    steps = _script(20)
    memory = _memory(None)
    yield _play(memory, steps)
    yield _play(sql_store, steps)
    expected = yield _reads(memory)
    got = yield _reads(sql_store)
    assert sum(len(p) for k, v in expected.items() if k[1] == "feed" for p in v) > 100
    for key in expected:
        assert got[key] == expected[key], key
    # and the reads by one conversation (history, markers, search...), of every one
    expected = yield _conv_reads(memory)
    got = yield _conv_reads(sql_store)
    assert sum(len(v) for k, v in expected.items() if k[1] == "history") > 100
    for key in expected:
        assert got[key] == expected[key], key


@pytest.mark.parametrize("version", [16, 17])
@pytest_twisted.inlineCallbacks
def test_an_older_database_upgrades_and_reads_the_same(tmp_path: Any, version: int) -> Any:
    """Schema 16 (before user_convs) and 17 (items naming their conversation by its
    key's text, before convs) upgrade in place: the same reads, the same rows."""
    store = _sqlite(tmp_path)
    yield store.open()
    steps = _script(21)
    # the last step deletes an account: it consumes the top position (no item has it)
    victim = LOCAL[3]
    left = _env(random.Random(8), victim, GROUPS[0], "event")
    left.meta = {"event": "left", "user": victim}
    steps += [("delete", (victim, left)), ("create", victim.split("@")[0])]
    store.set_read(LOCAL[0], conversation_key(LOCAL[0], LOCAL[1]), 30)  # (with the first)
    yield _play(store, steps)
    expected = yield _reads(store)
    expected["conv reads"] = yield _conv_reads(store)
    yield store.close()
    new = SQLiteDB(store.path)
    new.index_search(10**6)  # (indexed items keep their index entries)
    top = new.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()[0]
    assert top > new.max_pos()
    new.close()
    old = old_sqlite(str(tmp_path / "old.sqlite3"), version)
    c = old.conn
    indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    if version == 16:
        assert {"items_sender", "items_recipient"} <= indexes
    c.execute("ATTACH ? AS new", (store.path,))
    # (the items as an older chatproto wrote them: the conversation's key in each)
    c.execute(
        "INSERT INTO items SELECT i.pos, i.id, i.kind, i.sender, i.recipient, k.key, i.ts, "
        "i.body, i.meta, i.sig FROM new.items i JOIN new.convs k ON k.cid = i.conv"
    )
    copied = ["users", "refs", "acks", "read_markers"]
    if version == 17:
        copied += ["user_convs"]
        c.execute("INSERT INTO items_fts (rowid, body) SELECT rowid, body FROM new.items_fts")
        c.execute(
            "UPDATE settings SET value = (SELECT value FROM new.settings AS s "
            "WHERE s.key = 'search_upto') WHERE key = 'search_upto'"
        )
    for table in copied:
        c.execute(f"INSERT INTO {table} SELECT * FROM new.{table}")
    c.execute("DELETE FROM sqlite_sequence")
    c.execute("INSERT INTO sqlite_sequence SELECT * FROM new.sqlite_sequence")
    made = set(c.execute("SELECT * FROM new.user_convs").fetchall())
    keys = c.execute("SELECT count(DISTINCT conv) FROM items").fetchone()[0]
    c.execute("DETACH new")
    old.close()

    upgraded = SQLiteDB(str(tmp_path / "old.sqlite3"))
    assert upgraded.migrate() == version
    c = upgraded.conn
    indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert not {"items_sender", "items_recipient"} & indexes
    assert {"items_conv", "items_events"} <= indexes
    triggers = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert triggers == {"items_fts_erase", "items_fts_delete"}
    # the rows the migration derives are those the writer made item by item
    assert set(c.execute("SELECT * FROM user_convs").fetchall()) == made
    # one integer per conversation, in every item; the consumed position stays consumed
    assert c.execute("SELECT count(*) FROM convs").fetchone()[0] == keys
    assert c.execute("SELECT count(*) FROM items WHERE typeof(conv) <> 'integer'").fetchone() == (
        0,
    )
    assert c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone() == (top,)
    upgraded.close()
    again = SQLiteStore(str(tmp_path / "old.sqlite3"), reactor, synchronous="NORMAL")
    yield again.open()
    try:
        got = yield _reads(again)
        got["conv reads"] = yield _conv_reads(again)
        # the next item takes the position after the consumed one, in a conversation
        # of its own (a new integer) or of the items before
        fresh = [_env(random.Random(10), LOCAL[5], LOCAL[6]), _env(random.Random(11), "n@x", "m@x")]
        stored = yield again.append(fresh)
        assert [e.pos for e in stored] == [top + 1, top + 2]
        for env in fresh:
            page = yield again.history(env.conversation, None, None, 1000)
            assert page[-1].id == env.id
    finally:
        yield again.close()
    assert got == expected


@pytest_twisted.inlineCallbacks
def _conv_reads(store: Any) -> Any:
    """The reads by one conversation, of every conversation: history (pages from both
    ends), read markers, read positions, search in the conversation."""
    out: dict[Any, Any] = {}
    convs = sorted(
        {conversation_key(a, b) for a in LOCAL + REMOTE for b in LOCAL + REMOTE} | set(GROUPS)
    )
    for conv in [*convs, "nobody@x nothing@x"]:
        out[conv, "history"] = _shown((yield store.history(conv, None, None, 1000)))
        out[conv, "before"] = _shown((yield store.history(conv, 60, None, 5)))
        out[conv, "after"] = _shown((yield store.history(conv, None, 20, 5, 10)))
        out[conv, "markers"] = yield store.read_markers(conv)
        out[conv, "position"] = yield store.read_position(conv, 1700000000.5, 0)
        found = yield store.search([WORDS[0]], [("conv", conv, 0)], None, 1000)
        out[conv, "search"] = _shown(found)
    return out


def test_the_feed_reads_through_the_conversation_index(tmp_path: Any) -> None:
    db = SQLiteDB(str(tmp_path / "plan.sqlite3"))
    db.migrate()
    rng = random.Random(3)
    db.append_batch([[_env(rng, a, b)] for a in LOCAL for b in LOCAL + GROUPS], {})
    seen: list[tuple[str, Any]] = []
    run = db._run

    def capture(sql: str, params: Any = ()) -> Any:
        seen.append((sql, params))
        return run(sql, params)

    db._run = capture  # type: ignore[method-assign]
    db.read_feed(LOCAL[0], 3, 50, [(GROUPS[0], 0, None)])
    db.conversation_partners(LOCAL[0], 3)
    db.conversations(LOCAL[0], 0, [], "u0", 10, {})
    db.search(["lunch"], [("user", LOCAL[0], 0)], None, 10)
    by_user = [(s, p) for s, p in seen if "user_convs" in s]
    assert len(by_user) >= 4
    for sql, params in by_user:
        plan = [r[3] for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        assert any("USING PRIMARY KEY (user_addr=?)" in p for p in plan), plan
        # (a search of indexed items goes by the search index, the rest by items_conv;
        # the indexed items edited since, by the ids the edits name)
        assert any("items_conv (conv=?" in p or "items_fts" in p or "(id=?" in p for p in plan), (
            plan
        )
        assert not any(p.startswith("SCAN items") and "VIRTUAL" not in p for p in plan), plan
    db.close()


def test_conversation_integers_made_by_a_rolled_back_commit_are_not_used(
    tmp_path: Any,
) -> None:
    """The writer remembers each conversation's integer (schema 18); one it made in a
    transaction that rolled back (a failing batch: the commit is redone batch by
    batch) is gone, and an item must not be stored under it."""
    db = SQLiteDB(str(tmp_path / "c.sqlite3"))
    db.migrate()
    rng = random.Random(12)
    [[first]] = db.append_batch([[_env(rng, LOCAL[0], LOCAL[1])]], {})
    a, b, c = (_env(rng, LOCAL[k], LOCAL[k + 1]) for k in (2, 4, 6))
    dup = _env(rng, LOCAL[8], LOCAL[9])
    dup.id = db.conn.execute("SELECT id FROM items WHERE pos = ?", (first,)).fetchone()[0]
    # the first try makes three conversations' rows, and rolls back (dup's id); the
    # second, batch by batch, rolls dup's batch back to its savepoint
    out = db.append_batch([[a], [b, dup], [c]], {})
    assert isinstance(out[1], sqlite3.IntegrityError)
    again = _env(rng, LOCAL[5], LOCAL[4])  # b's conversation, which has no row now
    db.append_batch([[again], [_env(rng, LOCAL[9], LOCAL[8])]], {})
    keys = dict(db.conn.execute("SELECT cid, key FROM convs").fetchall())
    for env in (a, c, again):
        [(cid,)] = db.conn.execute("SELECT conv FROM items WHERE id = ?", (env.id,))
        assert keys[cid] == env.conversation
        assert [e.id for e in db.history(env.conversation, None, None, 10)] == [env.id]
    assert len(set(keys.values())) == len(keys) == 5
    db.close()


def test_user_conv_rows() -> None:
    rng = random.Random(4)
    a, b = LOCAL[:2]
    assert user_conv_rows(_env(rng, a, GROUPS[0])) == []
    assert user_conv_rows(_env(rng, a, a)) == [(a, conversation_key(a, a), a)]
    key = conversation_key(a, b)
    assert user_conv_rows(_env(rng, a, b)) == [(a, key, b), (b, key, a)]


def test_the_writer_writes_a_conversation_once_and_forgets_within_bounds() -> None:
    rng = random.Random(5)
    a, b, c = LOCAL[:3]
    known = UserConvs(limit=3)
    first = [[_env(rng, a, b)], [_env(rng, b, a)], [_env(rng, a, a)], [_env(rng, c, GROUPS[0])]]
    rows = known.new_rows(first, [[1], [2], [3], [4]])
    assert rows == sorted(
        [
            (a, conversation_key(a, b), b),
            (b, conversation_key(a, b), a),
            (a, conversation_key(a, a), a),
        ]
    )
    # not committed: asked again
    assert known.new_rows(first, [[1], [2], [3], [4]]) == rows
    known.committed(rows)
    assert known.new_rows(first, [[5], [6], [7], [8]]) == []
    # items not stored (a failed batch, a duplicate) add nothing
    fresh = [[_env(rng, a, c)], [_env(rng, b, c)]]
    assert known.new_rows(fresh, [ValueError("no"), [None]]) == []
    more = known.new_rows(fresh, [[9], [10]])
    assert len(more) == 4
    known.committed(more)  # past the bound: the rows seen before are forgotten
    assert known.new_rows(first, [[1], [2], [3], [4]]) == rows


def test_the_writer_looks_at_each_run_of_one_pair_once_but_never_skips_a_stored_item() -> None:
    """Items of the pair of the item before them are passed over -- unless that item
    was not stored (a remote duplicate): then the next stored one brings the rows."""
    rng = random.Random(6)
    a, b, c = LOCAL[:3]
    known = UserConvs()
    run = [_env(rng, a, b), _env(rng, a, b), _env(rng, a, c), _env(rng, a, c), _env(rng, a, b)]
    assert known.new_rows([run], [[None, 2, None, None, 5]]) == sorted(user_conv_rows(run[0]))
    assert known.new_rows([run], [[None, None, None, 4, None]]) == sorted(user_conv_rows(run[2]))
    both = sorted(user_conv_rows(run[0]) + user_conv_rows(run[2]))
    assert known.new_rows([run], [[1, 2, 3, 4, 5]]) == both
    group = [_env(rng, a, GROUPS[0]), _env(rng, a, GROUPS[0]), _env(rng, a, b)]
    assert known.new_rows([group], [[1, 2, 3]]) == sorted(user_conv_rows(run[0]))
    known.committed(both)
    assert known.new_rows([run, group], [[1, 2, 3, 4, 5], [6, 7, 8]]) == []


def test_two_writers_and_a_restart_keep_every_conversation(tmp_path: Any) -> None:
    """Writers sharing a database (cluster workers do, on PostgreSQL) each remember only
    what they saw; a restarted writer remembers nothing: the rows stay right."""
    path = str(tmp_path / "two.sqlite3")
    one, two = SQLiteDB(path), SQLiteDB(path)
    one.migrate()
    rng = random.Random(6)
    a, b, c = LOCAL[:3]
    one.append_batch([[_env(rng, a, b)]], {})
    two.append_batch([[_env(rng, b, a)], [_env(rng, c, a)]], {})
    one.append_batch([[_env(rng, c, a)], [_env(rng, a, c)]], {})
    one.close()
    three = SQLiteDB(path)  # a restart
    three.append_batch([[_env(rng, b, c)]], {})
    assert [e.sender for e in three.read_feed(a, 0, 100)] == [a, b, c, c, a]
    assert three.conversation_partners(a) == [b, c]
    assert three.conversation_partners(c) == [a, b]
    rows = three.conn.execute("SELECT count(*) FROM user_convs").fetchone()[0]
    assert rows == 6
    with pytest.raises(sqlite3.IntegrityError):  # one row per user and conversation
        three.conn.execute(
            "INSERT INTO user_convs VALUES (?, ?, ?)", (a, conversation_key(a, b), b)
        )
    two.close()
    three.close()


@pytest_twisted.inlineCallbacks
def test_a_schema_10_postgresql_database_upgrades_and_reads_the_same() -> Any:
    """PostgreSQL's schema 10 (before user_convs) with a realm's data upgrades in place
    to the same reads as a schema made at 11 with the same history."""
    import psycopg

    import chatproto.store.postgresql.db as pg_db
    from chatproto.store.postgresql import PostgresDB, PostgresStore

    dsn = postgresql_or_skip()
    made, old = pg_schema(), pg_schema()
    store = PostgresStore(dsn, made, reactor)
    yield store.open()
    try:
        yield _play(store, _script(22))
        expected = yield _reads(store)
    finally:
        yield store.close()
    version = pg_db.SCHEMA_VERSION
    pg_db.SCHEMA_VERSION = 10
    try:
        db = PostgresDB(dsn, old)
        db.migrate()
        db.close()
    finally:
        pg_db.SCHEMA_VERSION = version
    with psycopg.connect(dsn, autocommit=True) as admin:
        indexes = {
            r[0]
            for r in admin.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (old,))
        }
        assert {"items_sender", "items_recipient"} <= indexes
        with admin.transaction():  # the items in position order: the search trigger's order
            for table, order in (("users", "name"), ("items", "pos"), ("refs", "pos")):
                admin.execute(
                    f'INSERT INTO "{old}".{table} SELECT * FROM "{made}".{table} ORDER BY {order}'
                )
            admin.execute(
                f'SELECT setval(\'"{old}".items_pos\', (SELECT last_value FROM "{made}".items_pos))'
            )
        rows = set(admin.execute(f'SELECT * FROM "{made}".user_convs').fetchall())
    upgraded = PostgresStore(dsn, old, reactor)
    yield upgraded.open()
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            indexes = {
                r[0]
                for r in admin.execute(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (old,)
                )
            }
            assert not {"items_sender", "items_recipient"} & indexes
            assert set(admin.execute(f'SELECT * FROM "{old}".user_convs').fetchall()) == rows
        got = yield _reads(upgraded)
    finally:
        yield upgraded.close()
    assert got == expected
