"""The store's read markers, conversation list and preferences, on every backend
(SQLite and PostgreSQL with their real threads and group commit, and memory), and
the SQLite schema migration that adds them."""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from chatproto.envelope import Envelope, conversation_key, new_message_id
from chatproto.mentions import mentions
from chatproto.store.sqlite import SQLiteDB
from tests.conftest import old_sqlite, pg_schema, postgresql_or_skip
from tests.test_store import (  # noqa: F401
    _memory,
    _postgresql,
    _sqlite,
    hold_next_commit,
    open_store,
)

ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"


def item(sender: str, recipient: str, body: str = "hi", kind: str = "text") -> Envelope:
    return Envelope(
        id=new_message_id(),
        kind=kind,
        sender=sender,
        recipient=recipient,
        ts=1700000000.0,
        body=body,
        meta={"event": "joined", "user": sender} if kind == "event" else None,
    )


@pytest.fixture(params=[_sqlite, _memory, _postgresql], ids=["sqlite", "memory", "postgresql"])
def store(request: Any, open_store: Any) -> Any:  # noqa: F811
    return open_store(request.param)


@pytest_twisted.inlineCallbacks
def test_conversations_markers_and_counts(store: Any) -> Any:
    yield store.append([item(BOB, ALICE, "one"), item(BOB, ALICE, "two")])
    yield store.append([item(CAROL, BOB, "not alice's")])
    yield store.append([item(ALICE, CAROL, "yo")])
    yield store.append([item(CAROL, "#dev@localhost", "", "event")])
    g = yield store.append(
        [item(CAROL, "#dev@localhost", "hi @alice"), item(CAROL, "#dev@localhost", "@alicex")]
    )
    rows = yield store.conversations(ALICE, 0, [("#dev@localhost", 0)], "alice", 10)
    by = {r["conv"]: r for r in rows}
    assert [r["conv"] for r in rows] == [
        "#dev@localhost",
        conversation_key(ALICE, CAROL),
        conversation_key(ALICE, BOB),
    ]
    dev = by["#dev@localhost"]
    assert dev["unread"] == 2 and dev["mentions"] == 1 and dev["last"].pos == g[1].pos
    assert by[conversation_key(ALICE, CAROL)]["unread"] == 0  # her own message
    assert by[conversation_key(ALICE, BOB)]["unread"] == 2
    # a marker, pending (not committed yet) and then committed, counts at once
    bob_conv = conversation_key(ALICE, BOB)
    first = by[bob_conv]["last"].pos - 1
    store.set_read(ALICE, bob_conv, first)
    markers = yield store.read_markers(bob_conv)
    assert markers == {ALICE: first}
    rows = yield store.conversations(ALICE, 0, [], "alice", 10)
    assert {r["conv"]: r["unread"] for r in rows}[bob_conv] == 1
    store.set_read(ALICE, bob_conv, 1)  # never backwards
    store.set_read(BOB, bob_conv, first + 1)
    yield store.append([])  # a group commit writes them
    markers = yield store.read_markers(bob_conv)
    assert markers == {ALICE: first, BOB: first + 1}
    rows = yield store.conversations(ALICE, 0, [], "alice", 1)
    assert len(rows) == 1 and rows[0]["conv"] == conversation_key(ALICE, CAROL)
    # the floor (the account's) and a group's bound hide what is before them
    rows = yield store.conversations(ALICE, g[1].pos, [("#dev@localhost", g[0].pos)], "alice", 10)
    assert [(r["conv"], r["unread"], r["mentions"]) for r in rows] == [("#dev@localhost", 1, 0)]


@pytest_twisted.inlineCallbacks
def test_read_position_by_time(store: Any) -> Any:
    """The newest item of a conversation before a time (IRC's MARKREAD names a marker
    by a message's time), reactions aside, after a floor."""
    conv = conversation_key(ALICE, BOB)
    items = []
    for i, (kind, ts) in enumerate([("text", 10.0), ("text", 20.5), ("reaction", 30.0)]):
        env = item(BOB, ALICE, f"m{i}", kind)
        env.ts = ts
        items.append(env)
    other = item(CAROL, ALICE, "elsewhere")
    other.ts = 15.0
    stored = yield store.append([items[0], other, items[1], items[2]])
    first, second = stored[0].pos, stored[2].pos
    assert (yield store.read_position(conv, 10.0, 0)) == 0  # before: strictly
    assert (yield store.read_position(conv, 10.001, 0)) == first
    assert (yield store.read_position(conv, 20.0, 0)) == first  # carol's is elsewhere
    assert (yield store.read_position(conv, 99.0, 0)) == second  # not the reaction
    assert (yield store.read_position(conv, 99.0, second)) == 0  # after the floor
    assert (yield store.read_position("#dev@localhost", 99.0, 0)) == 0


@pytest_twisted.inlineCallbacks
def test_preferences(store: Any) -> Any:
    yield store.set_pref(ALICE, "read_receipts", "off")
    yield store.set_pref(BOB, "read_receipts", "off")
    yield store.set_pref(BOB, "read_receipts", None)
    prefs = yield store.prefs("read_receipts")
    assert prefs == {ALICE: "off"}


@pytest_twisted.inlineCallbacks
def test_deleting_an_account_deletes_its_markers_and_preferences(store: Any) -> Any:
    yield store.create_user("alice", "h", 0.0)
    yield store.append([item(BOB, ALICE)])
    store.set_read(ALICE, conversation_key(ALICE, BOB), 1)
    store.set_read(BOB, conversation_key(ALICE, BOB), 1)
    yield store.set_pref(ALICE, "read_receipts", "off")
    yield store.append([])
    assert (yield store.delete_user("alice", ALICE))
    markers = yield store.read_markers(conversation_key(ALICE, BOB))
    assert markers == {BOB: 1}
    assert (yield store.prefs("read_receipts")) == {}


def test_sqlite_migration_adds_the_tables(tmp_path: Any) -> None:
    path = str(tmp_path / "old.sqlite3")
    db = old_sqlite(path, 12)
    assert {"read_markers", "prefs"}.isdisjoint(
        r[0] for r in db.conn.execute("SELECT name FROM sqlite_master")
    )
    db.close()
    db = SQLiteDB(path)
    assert db.migrate() == 12
    assert db.read_markers("x") == {} and db.prefs("k") == {}
    with pytest.raises(sqlite3.OperationalError):
        db.conn.execute("CREATE TABLE read_markers (x)")
    db.close()


@pytest_twisted.inlineCallbacks
def test_search_within_scopes_newest_first(store: Any) -> Any:
    yield store.append([item(BOB, ALICE, "Lunch at noon?"), item(CAROL, BOB, "lunch secret")])
    yield store.append([item(ALICE, "#dev@localhost", "lunchtime deploy")])
    yield store.append([item(ALICE, "#ops@localhost", "lunch in ops")])
    yield store.append([item(ALICE, BOB, "no food"), item(BOB, ALICE, "", "event")])
    mine = [("user", ALICE, 0), ("conv", "#dev@localhost", 0)]
    found = yield store.search(["lunch"], mine, None, 10)
    assert [e.body for e in found] == ["lunchtime deploy", "Lunch at noon?"]
    found = yield store.search(["lunch", "noon"], mine, None, 10)
    assert [e.body for e in found] == ["Lunch at noon?"]
    found = yield store.search(["unch"], mine, None, 10)  # words match from their start
    assert found == []
    # paging: before the last one seen
    first = yield store.search(["lunch"], mine, None, 1)
    assert [e.body for e in first] == ["lunchtime deploy"]
    rest = yield store.search(["lunch"], mine, first[0].pos, 10)
    assert [e.body for e in rest] == ["Lunch at noon?"]
    # one conversation, and a bound (a floor, a group member's start)
    conv = [("conv", conversation_key(ALICE, BOB), 0)]
    found = yield store.search(["lunch"], conv, None, 10)
    assert [e.body for e in found] == ["Lunch at noon?"]
    found = yield store.search(["lunch"], [("conv", "#dev@localhost", first[0].pos)], None, 10)
    assert found == []
    assert (yield store.search(["lunch"], [], None, 10)) == []


@pytest_twisted.inlineCallbacks
def test_search_finds_file_names_and_words_in_any_case(store: Any) -> Any:
    f = item(BOB, ALICE, "Quarterly-Report.PDF", "file")
    f.meta = {"file_id": "f1", "sha256": "0" * 64, "size": 1, "name": f.body, "media_type": "a/b"}
    yield store.append([f, item(BOB, ALICE, "héllo wörld")])
    found = yield store.search(["report", "pdf"], [("user", ALICE, 0)], None, 10)
    assert [e.kind for e in found] == ["file"]
    found = yield store.search(["héllo"], [("user", ALICE, 0)], None, 10)
    assert [e.body for e in found] == ["héllo wörld"]


def test_sqlite_search_index_is_filled_for_older_items_and_purged(tmp_path: Any) -> None:
    path = str(tmp_path / "old.sqlite3")
    db = old_sqlite(path, 13)
    db.conn.executemany(  # (the rows of that schema: the conversation's key in each)
        "INSERT INTO items (id, kind, sender, recipient, conv, ts, body) "
        "VALUES (?, 'text', ?, ?, ?, 1700000000.0, ?)",
        [
            (new_message_id(), BOB, ALICE, conversation_key(BOB, ALICE), body)
            for body in ("zqxsecretword stays", "other")
        ],
    )
    db.close()
    db = SQLiteDB(path)
    assert db.migrate() == 13
    assert db.search_upto() == 0  # the store indexes what was there when idle
    [found] = db.search(["zqxsecret"], [("user", ALICE, 0)], None, 10)
    assert db.index_search(2000) == 2 and db.search_upto() == 2
    assert db.search(["zqxsecret"], [("user", ALICE, 0)], None, 10)[0].pos == found.pos
    # a body erased (a deletion) leaves the index, and its words the database file
    db.conn.execute("PRAGMA secure_delete = ON")
    db.conn.execute("UPDATE items SET body = '' WHERE pos = ?", (found.pos,))
    assert db.search(["zqxsecret"], [("user", ALICE, 0)], None, 10) == []
    assert [e.body for e in db.search(["other"], [("user", ALICE, 0)], None, 10)] == ["other"]
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    with open(path, "rb") as fh:
        assert b"zqxsecretword" not in fh.read()


def test_sqlite_new_items_are_found_before_and_after_they_are_indexed(tmp_path: Any) -> None:
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    mine = [("user", ALICE, 0)]
    for n in range(5):
        db.commit_batch([[item(BOB, ALICE, f"zqxword number{n}")]], {})
    db.commit_batch([[item(BOB, CAROL, "zqxword not alice's")]], {})
    assert db.search_upto() == 0  # nothing indexed yet: read directly
    assert [e.body for e in db.search(["zqxword"], mine, None, 3)] == [
        "zqxword number4",
        "zqxword number3",
        "zqxword number2",
    ]
    assert db.index_search(3) == 3 and db.search_upto() == 3
    # two indexed, two not: one search, both halves, newest first, paged
    assert [e.body for e in db.search(["zqxword"], mine, None, 10)] == [
        f"zqxword number{n}" for n in (4, 3, 2, 1, 0)
    ]
    assert [e.body for e in db.search(["zqxword"], mine, 4, 2)] == [
        "zqxword number2",
        "zqxword number1",
    ]
    assert db.index_search(200) == 3 and db.index_search(200) == 0
    assert len(db.conn.execute("SELECT rowid FROM items_fts").fetchall()) == 6
    assert [e.body for e in db.search(["number1"], mine, None, 10)] == ["zqxword number1"]
    db.close()


def test_sqlite_index_holds_each_items_latest_own_edit(tmp_path: Any) -> None:
    """What the search index holds for each item: its latest edit by its own sender's
    text, whether the edits came before the item was indexed or after (then the item
    is indexed again, once, with the latest), a file's name as it is."""
    import attrs

    from chatproto.relations import ref_meta

    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()

    def edit(target: Envelope, body: str, sender: str = BOB) -> Envelope:
        env = item(sender, ALICE if sender == BOB else BOB, body, "edit")
        return attrs.evolve(env, meta=ref_meta("edit", target.id))

    def indexed() -> dict[int, str]:
        return dict(db.conn.execute("SELECT rowid, body FROM items_fts").fetchall())

    a, b, c = item(BOB, ALICE, "alpha one"), item(BOB, ALICE, "beta one"), item(BOB, ALICE, "c")
    f = attrs.evolve(item(BOB, ALICE, "name.txt", "file"), meta={"note": "not a ref"})
    db.commit_batch([[a, b, c, f]], {})
    # before indexing: two edits of a (the latest wins), one of b by another sender
    db.commit_batch([[edit(a, "alpha two"), edit(a, "alpha three"), edit(b, "no", ALICE)]], {})
    pa, pb, pc, pf = (db.stored_item(e.id).pos for e in (a, b, c, f))  # type: ignore[union-attr]
    assert db.index_search(2000) == 7
    assert indexed() == {pa: "alpha three", pb: "beta one", pc: "c", pf: "name.txt"}
    # after indexing: the edits of a step re-index their items, each once, the latest
    db.commit_batch([[edit(b, "beta two"), edit(b, "beta three"), edit(a, "alpha four")]], {})
    db.commit_batch([[edit(c, "nope", ALICE), item(BOB, ALICE, "delta")]], {})
    assert db.index_search(3) == 3
    assert indexed() == {pa: "alpha four", pb: "beta three", pc: "c", pf: "name.txt"}
    assert db.index_search(3) == 2
    rows = db.conn.execute("SELECT rowid, body FROM items_fts ORDER BY rowid").fetchall()
    assert rows[:4] == sorted({pa: "alpha four", pb: "beta three", pc: "c", pf: "name.txt"}.items())
    assert [r[1] for r in rows[4:]] == ["delta"] and db.index_search(3) == 0
    mine = [("user", ALICE, 0)]
    assert [e.body for e in db.search(["beta"], mine, None, 10)] == ["beta three"]
    assert db.search(["one"], mine, None, 10) == []
    db.close()


def test_sqlite_index_step_without_edits_takes_the_items_text(tmp_path: Any) -> None:
    """A step whose range holds no edit indexes its items' own text without probing
    for edits (SQLiteDB.index_search); an edit after the range (committed already)
    is taken by the next step, which re-indexes the item with its latest text."""
    import attrs

    from chatproto.relations import ref_meta

    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    a, b = item(BOB, ALICE, "alpha one"), item(BOB, ALICE, "beta one")
    db.commit_batch([[a, b]], {})
    edits = [
        attrs.evolve(item(BOB, ALICE, body, "edit"), meta=ref_meta("edit", a.id))
        for body in ("alpha two", "alpha three")
    ]
    db.commit_batch([edits], {})
    pa, pb = (db.stored_item(e.id).pos for e in (a, b))  # type: ignore[union-attr]

    def indexed() -> dict[int, str]:
        return dict(db.conn.execute("SELECT rowid, body FROM items_fts").fetchall())

    assert db.index_search(2) == 2
    assert indexed() == {pa: "alpha one", pb: "beta one"}  # (no edit in this range)
    assert db.index_search(2000) == 2 and db.index_search(2000) == 0
    assert indexed() == {pa: "alpha three", pb: "beta one"}
    mine = [("user", ALICE, 0)]
    assert [e.body for e in db.search(["alpha"], mine, None, 10)] == ["alpha three"]
    assert [e.body for e in db.search(["one"], mine, None, 10)] == ["beta one"]
    db.close()


@pytest.fixture
def sqlite_store(open_store: Any) -> Any:  # noqa: F811
    return open_store(_sqlite)


def _indexed_upto(store: Any) -> Any:
    """Fires with the position up to which every item is in the store's search index
    (the indexer's progress)."""
    return store._read(lambda db: db.search_upto())


@pytest_twisted.inlineCallbacks
def test_the_sqlite_store_indexes_when_idle(sqlite_store: Any) -> Any:
    store = sqlite_store
    for n in range(450):  # more than one indexing step
        store.append([item(BOB, ALICE, f"word{n}")])
    yield store.append([item(BOB, ALICE, "last")])
    for _ in range(200):  # bounded: 10 s
        upto = yield _indexed_upto(store)
        if upto == 451:
            break
        yield task.deferLater(_reactor, 0.05, lambda: None)
    assert upto == 451
    found = yield store.search(["word44"], [("user", ALICE, 0)], None, 20)
    assert sorted(e.body for e in found) == ["word44"] + [f"word44{n}" for n in range(10)]


@pytest_twisted.inlineCallbacks
def test_the_sqlite_store_indexes_what_it_finds_unindexed_when_it_opens(tmp_path: Any) -> Any:
    """Items stored before a start and never indexed (the realm stopped while busy, a
    migrated database) were indexed only after the first commit of the new run: a
    realm with no new message kept reading them directly at each search, and never
    found those past SEARCH_TAIL."""
    path = tmp_path / "store" / "realm.sqlite3"
    path.parent.mkdir()
    db = SQLiteDB(str(path))
    db.migrate()
    db.commit_batch([[item(BOB, ALICE, f"zqxold{n}") for n in range(30)]], {})
    assert db.search_upto() == 0
    db.close()
    store = _sqlite(tmp_path)
    yield store.open()
    try:
        for _ in range(100):  # bounded: 5 s (the store waits INDEX_DELAY, 1 s)
            upto = yield _indexed_upto(store)
            if upto == 30:
                break
            yield task.deferLater(_reactor, 0.05, lambda: None)
        assert upto == 30
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_the_sqlite_index_keeps_up_with_a_realm_that_is_never_quiet(
    sqlite_store: Any, monkeypatch: Any
) -> Any:
    """A realm never quiet for INDEX_DELAY indexes once INDEX_FORCE items wait: it took
    one step (INDEX_STEP items) and counted the rest as indexed, so the index fell
    behind by INDEX_FORCE - INDEX_STEP items a round (98% of a busy realm's items), and
    each search read all of them directly (5 s for 100000, and items past
    SEARCH_TAIL were never found).  Now it indexes until fewer than INDEX_FORCE wait."""
    from chatproto.store import groupcommit

    monkeypatch.setattr(groupcommit, "INDEX_FORCE", 5000)
    store = sqlite_store
    total = 0
    for _ in range(30):  # back to back: never quiet
        yield store.append([item(BOB, ALICE, f"busy{total + n}") for n in range(1000)])
        total += 1000
    upto = yield _indexed_upto(store)
    assert upto >= total - 5000 - groupcommit.INDEX_STEP - 1000, upto


@pytest_twisted.inlineCallbacks
def test_steps_between_busy_commits_are_small(sqlite_store: Any, monkeypatch: Any) -> Any:
    """A step holds the writer thread and the commits queued behind it wait for it:
    while a commit runs or waits, a step is of INDEX_BUSY_STEP items (2000 items held
    a realm at 30k messages/s for 9-33 ms); once the realm is quiet, of INDEX_STEP."""

    from twisted.internet.threads import deferToThread

    from chatproto.store import groupcommit

    monkeypatch.setattr(groupcommit, "INDEX_FORCE", 100)
    monkeypatch.setattr(groupcommit, "INDEX_BUSY_STEP", 40)
    monkeypatch.setattr(groupcommit, "INDEX_STEP", 500)
    monkeypatch.setattr(groupcommit, "INDEX_DELAY", 0.05)
    limits: list[int] = []
    index_search = SQLiteDB.index_search

    def recording(db: SQLiteDB, limit: int) -> int:
        limits.append(limit)
        return index_search(db, limit)

    monkeypatch.setattr(SQLiteDB, "index_search", recording)
    store = sqlite_store
    gate, entered, _ = hold_next_commit(store)
    first = store.append([item(BOB, ALICE, f"busy{n}") for n in range(150)])
    assert (yield deferToThread(entered.wait, 30))  # it runs, held
    second = store.append([item(BOB, ALICE, "behind")])  # a commit queued behind it
    gate.set()
    yield first
    yield second
    for _ in range(200):  # (the step was queued on the writer thread behind the second)
        if limits:
            break
        yield task.deferLater(_reactor, 0.01, lambda: None)
    # past INDEX_FORCE once the first was done, with the second in flight: a small step
    assert limits[:1] == [40], limits
    for _ in range(200):  # then quiet: the rest in a large step
        if (yield _indexed_upto(store)) >= 151:
            break
        yield task.deferLater(_reactor, 0.02, lambda: None)
    assert (yield _indexed_upto(store)) >= 151
    assert 500 in limits[1:], limits


@pytest_twisted.inlineCallbacks
def test_a_one_character_word_matches_whole_words_only(store: Any) -> Any:
    """A one-character word as a prefix is the query the full-text indexes answer
    slowest (every word of the index beginning with that letter, merged): sixteen of
    them took 0.8 s on SQLite with 200000 items, and the cost grows with the realm.
    Such a word matches a whole word of the text; longer words still match prefixes."""
    yield store.append([item(BOB, ALICE, "plan a: apples"), item(BOB, ALICE, "apples")])
    yield store.append([item(BOB, ALICE, "option B or x"), item(BOB, ALICE, "5 x 5")])
    mine = [("user", ALICE, 0)]
    for words, found in [
        (["a"], ["plan a: apples"]),
        (["a", "ap"], ["plan a: apples"]),
        (["ap"], ["apples", "plan a: apples"]),
        (["b", "x"], ["option B or x"]),
        (["5"], ["5 x 5"]),
        (["o"], []),
    ]:
        got = yield store.search(words, mine, None, 10)
        assert [e.body for e in got] == found, words


@pytest_twisted.inlineCallbacks
def test_ref_count_counts_one_senders_edits_and_reactions_to_one_item(store: Any) -> Any:
    import attrs

    from chatproto.relations import ref_meta

    target, other = item(ALICE, BOB, "target"), item(ALICE, BOB, "other")
    yield store.append([target, other])

    def ref(sender: str, kind: str, to: Envelope = target, **kw: Any) -> Envelope:
        body = "new text" if kind == "edit" else ""
        env = item(sender, BOB if sender == ALICE else ALICE, body, kind)
        return attrs.evolve(env, meta=ref_meta(kind, to.id, **kw))

    yield store.append([ref(ALICE, "edit"), ref(ALICE, "edit")])
    yield store.append([ref(ALICE, "reaction", emoji="a"), ref(BOB, "reaction", emoji="a")])
    yield store.append([ref(ALICE, "reaction", emoji="a", remove=True)])
    yield store.append([ref(ALICE, "reaction", other, emoji="b")])
    assert (yield store.ref_count(target.id, ALICE)) == 4
    assert (yield store.ref_count(target.id, BOB)) == 1
    assert (yield store.ref_count(other.id, ALICE)) == 1
    assert (yield store.ref_count("no-such-item", ALICE)) == 0
    yield store.append([ref(ALICE, "delete")])  # a delete is no change to count
    assert (yield store.ref_count(target.id, ALICE)) == 4


#: Letters to Python (whose Unicode is newer) that SQLite's FTS5 tokenizer, which keeps
#: to Unicode 6.1, reads as separators (New Tai Lue vowels, Vedic signs): a query word
#: holding one was a phrase of two tokens, which the index (detail=none) refuses.
SPLIT_BY_FTS5 = "\u19b0\u19b5\u19c8\u1cf2"


def test_sqlite_search_words_with_letters_fts5_reads_as_separators(tmp_path: Any) -> None:
    """A query word with a letter the index splits on was sent to FTS5 as one quoted
    string, a phrase: ``sqlite3.OperationalError`` (``internal_error``, a traceback in
    the realm's log).  Now it is found, indexed or not, and nothing else is -- a word
    made of such letters only too (as the other stores find it)."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    mine = [("user", ALICE, 0)]
    for ch in SPLIT_BY_FTS5:
        db.commit_batch([[item(BOB, ALICE, f"zq{ch}x tail")]], {})
    db.commit_batch([[item(BOB, ALICE, "zq x tail")]], {})  # same pieces, other words
    db.commit_batch([[item(BOB, ALICE, f"{SPLIT_BY_FTS5[0]} y")]], {})
    for indexed in (False, True):
        for ch in SPLIT_BY_FTS5:
            assert [e.body for e in db.search([f"zq{ch}x"], mine, None, 10)] == [f"zq{ch}x tail"]
            assert [e.body for e in db.search([f"zq{ch}"], mine, None, 10)] == [f"zq{ch}x tail"]
        # a word of such letters only: no token of the index, found all the same (it
        # was found before the item was indexed, never after)
        found = db.search([SPLIT_BY_FTS5[0]], mine, None, 10)
        assert [e.body for e in found] == [f"{SPLIT_BY_FTS5[0]} y"], indexed
        found = db.search([SPLIT_BY_FTS5[0], "y"], mine, None, 10)
        assert [e.body for e in found] == [f"{SPLIT_BY_FTS5[0]} y"], indexed
        assert db.search([SPLIT_BY_FTS5[1]], mine, None, 10) == []  # (only inside words)
        assert db.search([SPLIT_BY_FTS5[0] * 2], mine, None, 10) == []
        db.index_search(100)
    db.close()


def test_every_query_word_is_one_the_sqlite_index_can_answer(tmp_path: Any) -> None:
    """Every character a query word may hold (letters and digits, to Python), inside
    a word: the SQLite store asks its index without an error."""
    from chatproto.store.reading import search_words

    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    db.commit_batch([[item(BOB, ALICE, "indexed words")]], {})
    db.index_search(100)
    mine = [("user", ALICE, 0)]
    letters = [chr(c) for c in range(0x80, 0x110000) if len(search_words(f"a{chr(c)}b")) == 1]
    bad = []
    for k in range(0, len(letters), 16):  # as many words as a query may have
        chunk = letters[k : k + 16]
        try:
            db.search([f"a{c}b".lower() for c in chunk], mine, None, 1)
        except sqlite3.OperationalError:
            bad += [f"U+{ord(c):04X}" for c in chunk]
    assert len(letters) > 100_000 and bad == []
    db.close()


def test_sqlite_index_takes_a_one_character_word_as_a_whole_word(tmp_path: Any) -> None:
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    for body in ("plan a: apples", "apples", "x\u19b0a"):
        db.commit_batch([[item(BOB, ALICE, body)]], {})
    assert db.index_search(100) == 3
    mine = [("user", ALICE, 0)]
    assert [e.body for e in db.search(["a"], mine, None, 10)] == ["plan a: apples"]
    assert [e.body for e in db.search(["ap"], mine, None, 10)] == ["apples", "plan a: apples"]
    assert [e.body for e in db.search(["x\u19b0a"], mine, None, 10)] == ["x\u19b0a"]
    db.close()


@pytest_twisted.inlineCallbacks
def test_a_deleted_message_is_not_unread(store: Any) -> Any:
    """A deleted message has nothing left to read: it is not counted (nor its
    mentions, its text being gone)."""
    one, _ = yield store.append([item(BOB, ALICE, "one"), item(BOB, ALICE, "two")])
    yield store.append([item(CAROL, "#dev@localhost", "@alice look")])
    [g] = yield store.append([item(CAROL, "#dev@localhost", "@alice again")])
    for target in (one, g):
        gone = item(target.sender, target.recipient, "", "delete")
        gone.meta = {"ref": target.id}
        yield store.append([gone])
    rows = yield store.conversations(ALICE, 0, [("#dev@localhost", 0)], "alice", 10)
    by = {r["conv"]: (r["unread"], r["mentions"]) for r in rows}
    assert by == {conversation_key(ALICE, BOB): (1, 0), "#dev@localhost": (1, 1)}


class _Counted:
    """A connection that counts the statements it is asked to run (an ``execute`` or
    an ``executemany`` is one), passing everything on."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.statements = 0

    def execute(self, *args: Any) -> Any:
        self.statements += 1
        return self._conn.execute(*args)

    def executemany(self, *args: Any) -> Any:
        self.statements += 1
        return self._conn.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_sqlite_forgets_many_logins_and_files_in_a_few_statements(tmp_path: Any) -> None:
    """Forgetting browser logins and expiring files asked SQLite one statement per
    digest (a login's, a file's content); now one statement takes them all."""
    from tests.test_store import file_env

    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    db.create_user("alice", "h", 1.0)
    for n in range(50):
        db.put_session_token(f"d{n}", "alice", 0, "web", 1.0, 1.0)
    shared = "f" * 64
    files = [file_env(ALICE, BOB, f"file{n}", f"{n:064x}", 1, 2.0) for n in range(50)]
    files.append(file_env(ALICE, BOB, "old", shared, 1, 2.0))
    db.commit_batch([files], {})
    db.commit_batch([[file_env(ALICE, BOB, "new", shared, 1, 9.0)]], {})
    counted = _Counted(db.conn)
    db.conn = counted  # type: ignore[assignment]
    assert db.delete_session_tokens([f"d{n}" for n in range(50)] + ["nope"]) == 50
    assert counted.statements == 1
    assert db.session_tokens() == []
    counted.statements = 0
    gone = db.expire_files(5.0)
    assert gone == sorted(f"{n:064x}" for n in range(50))  # not the one "new" holds
    assert counted.statements <= 4  # BEGIN, the delete, one look-up, COMMIT
    db.conn = counted._conn
    db.close()


def _busy_history(rng: random.Random) -> list[list[Envelope]]:
    """Batches of a busy user's realm: private conversations with 40 peers and 15
    groups (texts, some mentioning alice -- or alicex, who is not her --, files,
    reactions, events), in a random order."""
    items: list[Envelope] = []
    for k in range(40):
        peer = f"p{k}@localhost"
        for n in range(rng.randint(1, 6)):
            env = item(*rng.choice([(peer, ALICE), (ALICE, peer)]), f"@alice {n}")
            if n == 3:
                env.kind, env.meta = "file", {"name": "f"}
            items.append(env)
    for j in range(15):
        group = f"#g{j}@localhost"
        items.append(item(f"o{j}@localhost", group, "", "event"))
        for _ in range(rng.randint(1, 8)):
            sender = rng.choice([ALICE, BOB, CAROL, f"o{j}@localhost"])
            items.append(item(sender, group, rng.choice(["hi @alice", "@alicex", "plain"])))
    rng.shuffle(items)
    return [items[i : i + 7] for i in range(0, len(items), 7)]


@pytest_twisted.inlineCallbacks
def test_the_conversations_of_a_busy_user(store: Any) -> Any:
    """Many conversations, with deleted messages and reactions, mentions, bounds,
    committed and pending read markers: each entry is what its items say (counted
    here from the items themselves), most recent first, the same on every store."""
    rng = random.Random(7)
    stored: list[Envelope] = []
    for batch in _busy_history(rng):
        stored += yield store.append(batch)
    targets = [e for e in stored if e.kind in ("text", "file")]
    deleted = rng.sample(targets, 25)
    later = []
    for t in deleted:
        gone = item(t.sender, t.recipient, "", "delete")
        gone.meta = {"ref": t.id}
        later.append(gone)
    for t in rng.sample(targets, 10):
        to = t.recipient if t.recipient.startswith("#") or t.sender != ALICE else t.sender
        reaction = item(ALICE if t.sender != ALICE else BOB, to, "", "reaction")
        reaction.meta = {"ref": t.id, "emoji": "+1"}
        later.append(reaction)
    rng.shuffle(later)
    stored += yield store.append(later)
    gone_ids = {t.id for t in deleted}
    by_conv: dict[str, list[Envelope]] = {}
    for e in stored:
        by_conv.setdefault(e.conversation, []).append(e)
    markers: dict[tuple[str, str], int] = {}
    for n, (conv, items) in enumerate(sorted(by_conv.items())):
        if n % 4 == 0:
            continue
        for user in (ALICE, BOB) if n % 3 else (ALICE,):
            pos = rng.choice(items).pos
            store.set_read(user, conv, pos)
            markers[user, conv] = max(pos, markers.get((user, conv), 0))
        if n == 20:
            yield store.append([])  # the markers so far committed, the others pending
    floor = stored[len(stored) // 5].pos
    groups = [(f"#g{j}@localhost", 0 if j % 2 else stored[len(stored) // 3].pos) for j in range(15)]
    mine = {c for c in by_conv if c.startswith("#") or ALICE in c.split(" ")}
    lows = {c: dict(groups).get(c, floor) for c in mine}

    expected = []
    for conv in mine:
        seen = [e for e in by_conv[conv] if e.pos > lows[conv]]
        if not seen:
            continue
        read = markers.get((ALICE, conv), 0)
        unread = [
            e
            for e in seen
            if e.pos > read
            and e.sender != ALICE
            and e.kind in ("text", "file")
            and e.id not in gone_ids
        ]
        mentioned = [
            e
            for e in unread
            if conv.startswith("#") and e.kind == "text" and mentions(e.body, "alice")
        ]
        marks = {u: p for (u, c), p in markers.items() if c == conv}
        expected.append((seen[-1].pos, conv, seen[-1].id, read, len(unread), len(mentioned), marks))
    expected.sort(reverse=True)
    assert len(expected) > 40 and any(e[5] for e in expected) and any(e[4] for e in expected)
    for limit in (500, 17):
        rows = yield store.conversations(ALICE, floor, groups, "alice", limit)
        got = [
            (
                r["last"].pos,
                r["conv"],
                r["last"].id,
                r["read"],
                r["unread"],
                r["mentions"],
                r["markers"],
            )
            for r in rows
        ]
        assert got == expected[:limit]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_conversation_list_takes_a_few_statements_whatever_its_length(
    tmp_path: Any, backend: str
) -> None:
    """The SQL stores read the conversation list in a few statements, whatever the
    number of conversations (they asked 3 or 4 per conversation, and one per group)."""
    if backend == "sqlite":
        db: Any = SQLiteDB(str(tmp_path / "s.sqlite3"))
    else:
        from chatproto.store.postgresql import PostgresDB

        db = PostgresDB(postgresql_or_skip(), pg_schema())
    db.migrate()
    statements = []
    for convs in (3, 120):
        batches = []
        for k in range(convs):
            to = f"#n{convs}g{k}@localhost" if k % 2 else ALICE
            batches.append([item(f"n{convs}p{k}@localhost", to, "@alice hi")])
        stored = db.append_batch(batches, {})
        groups = [(b[0].recipient, 0) for b in batches if b[0].recipient != ALICE]
        pending = {(ALICE, groups[0][0]): stored[1][0]}
        run = db._run
        seen = []

        def counted(sql: str, params: Any = (), run: Any = run, seen: Any = seen) -> Any:
            seen.append(sql)
            return run(sql, params)

        db._run = counted
        rows = db.conversations(ALICE, 0, groups, "alice", 500, pending)
        db._run = run
        assert len(rows) >= convs
        statements.append(len(seen))
    db.close()
    assert statements[0] == statements[1] <= 5


def _search_db(tmp_path: Any, backend: str) -> Any:
    """A migrated SQLiteDB, or PostgresDB in a schema of its own (skipped without a
    server, outside CI), for the search tests run on both SQL stores."""
    if backend == "sqlite":
        db: Any = SQLiteDB(str(tmp_path / "s.sqlite3"))
    else:
        from chatproto.store.postgresql import PostgresDB

        db = PostgresDB(postgresql_or_skip(), pg_schema())
    db.migrate()
    return db


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_word_with_a_dotted_capital_i_is_found_before_and_after_it_is_indexed(
    tmp_path: Any, backend: str
) -> None:
    """Python lower-cases İ (U+0130) to i + U+0307, which neither full-text index
    holds: "İstanbul" was found by its own text while not indexed (read directly)
    and never once indexed.  Now it is found either way, on both SQL stores, and the
    index's other candidates are matched as before (not "istanbul")."""
    from chatproto.store.reading import search_words

    db = _search_db(tmp_path, backend)
    mine = [("user", ALICE, 0)]
    for body in ("\u0130stanbul trip", "istanbul plain"):
        db.commit_batch([[item(BOB, ALICE, body)]], {})
    for _ in range(2):  # read directly (not indexed yet), then from the index
        for query, found in (
            ("\u0130stanbul", ["\u0130stanbul trip"]),
            ("\u0130st", ["\u0130stanbul trip"]),
            ("istanbul", ["istanbul plain"]),
            ("\u0130STANBUL", ["\u0130stanbul trip"]),
        ):
            got = [e.body for e in db.search(search_words(query), mine, None, 10)]
            assert got == found, (query, db.search_upto())
        while db.index_search(2000):
            pass
    db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_word_with_a_final_sigma_is_found_before_and_after_it_is_indexed(
    tmp_path: Any, backend: str
) -> None:
    """Python lower-cases "ΣΟΦΟΣ" to σοφος (final ς), PostgreSQL's index holds
    σοφοσ: the word was found while not indexed and no longer once indexed (on
    PostgreSQL).  Now the same items either way, on both SQL stores."""
    from chatproto.store.reading import search_words

    db = _search_db(tmp_path, backend)
    mine = [("user", ALICE, 0)]
    for body in ("\u03a3\u039f\u03a6\u039f\u03a3 upper", "\u03c3\u03bf\u03c6\u03bf\u03c2 lower"):
        db.commit_batch([[item(BOB, ALICE, body)]], {})
    both = ["\u03c3\u03bf\u03c6\u03bf\u03c2 lower", "\u03a3\u039f\u03a6\u039f\u03a3 upper"]
    for _ in range(2):  # read directly (not indexed yet), then from the index
        for query in ("\u03a3\u039f\u03a6\u039f\u03a3", "\u03c3\u03bf\u03c6\u03bf\u03c2"):
            got = [e.body for e in db.search(search_words(query), mine, None, 10)]
            assert got == both, (query, db.search_upto())
        while db.index_search(2000):
            pass
    db.close()


def test_sqlite_reads_an_ids_alternates_through_the_id_index(tmp_path: Any) -> None:
    """stored_item_in's alternates are read by the unique id index's range, never by
    walking the conversation (items_conv): the conversation named is compared after.
    With ``conv = ?`` in the statement SQLite chose items_conv, so every reference
    to a missing id a peer named scanned all of a group's items."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    plan = " ".join(
        str(row[-1])
        for row in db.conn.execute("EXPLAIN QUERY PLAN " + db.ALTERNATES_SQL, ("a", "b"))
    )
    assert "(id>? AND id<?)" in plan and "items_conv" not in plan, plan
    db.close()


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_a_search_index_step_commits_without_an_fsync(tmp_path: Any, synchronous: str) -> None:
    """The index is rebuilt from items from the position a step records in its own
    transaction, so a step commits with ``synchronous = NORMAL`` (no fsync of its
    own; the next durable commit's covers its WAL frames); the connection's item
    commits keep the durability it was opened with."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"), synchronous)
    db.migrate()
    db.append_batch([[item(ALICE, BOB, f"zqx{n}")] for n in range(5)], {})
    seen: list[tuple[str, int]] = []

    def trace(sql: str) -> None:  # (the level each statement runs at)
        if not sql.startswith("PRAGMA synchronous"):
            level = db.conn.execute("PRAGMA synchronous").fetchone()[0]
            seen.append((sql.split()[0].upper(), level))

    db.conn.set_trace_callback(trace)
    try:
        assert db.index_search(2000) == 5
    finally:
        db.conn.set_trace_callback(None)
    levels = {sql: level for sql, level in seen if sql in ("BEGIN", "INSERT", "COMMIT")}
    assert levels == {"BEGIN": 1, "INSERT": 1, "COMMIT": 1}  # NORMAL
    assert (
        db.conn.execute("PRAGMA synchronous").fetchone()[0] == {"FULL": 2, "NORMAL": 1}[synchronous]
    )
    assert [e.body for e in db.search(["zqx3"], [("user", ALICE, 0)], None, 10)] == ["zqx3"]
    db.close()
