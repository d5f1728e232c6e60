"""The IStore contract, run against every backend, plus SQLite specifics.

Behavioural tests are parametrised over a store factory (SQLite with its real threads
and the real reactor; the in-memory store; PostgreSQL, in a schema of its own per test,
with its real threads), so all honour the same contract.  SQLite alone is checked here
for schema migration, group commit, constraint isolation between batches of one commit,
AUTOINCREMENT positions and flushing acks on close; tests/test_store_postgresql.py
checks the same of PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from chatproto.envelope import (
    Envelope,
    alternate_id,
    alternate_range,
    conversation_key,
    new_message_id,
    new_message_ids,
)
from chatproto.store import MAX_DEVICES, IStore, UserExists
from chatproto.store.memory import MemoryStore
from chatproto.store.sqlite import SCHEMA_VERSION, SQLiteDB, SQLiteStore
from tests.conftest import pg_schema, postgresql_or_skip, until

ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"


def env(sender: str, recipient: str, body: str = "hi", id_: str | None = None) -> Envelope:
    return Envelope(
        id=id_ or new_message_id(),
        kind="text",
        sender=sender,
        recipient=recipient,
        ts=1700000000.0,
        body=body,
    )


def _sqlite(tmp_path: Any) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "store" / "realm.sqlite3"), _reactor, synchronous="NORMAL")


def _memory(tmp_path: Any) -> MemoryStore:
    return MemoryStore()


def _postgresql(tmp_path: Any) -> Any:
    """A PostgreSQL store in a schema of its own (dropped after the test)."""
    from chatproto.store.postgresql import PostgresStore

    return PostgresStore(postgresql_or_skip(), pg_schema(), _reactor)


@pytest.fixture
def open_store(tmp_path: Any) -> Any:
    """``open_store(factory)`` opens a store; every store opened is closed at teardown."""
    stores: list[Any] = []

    def make(factory: Callable[[Any], Any]) -> Any:
        store = factory(tmp_path)
        pytest_twisted.blockon(defer.maybeDeferred(store.open))
        stores.append(store)
        return store

    yield make
    for store in stores:
        pytest_twisted.blockon(store.close())


@pytest.fixture(params=[_sqlite, _memory, _postgresql], ids=["sqlite", "memory", "postgresql"])
def store(request: Any, open_store: Any) -> Any:
    return open_store(request.param)


@pytest.fixture
def sqlite_store(open_store: Any) -> SQLiteStore:
    return open_store(_sqlite)


def settle(store: Any) -> defer.Deferred[Any]:
    """Fires once writes queued so far (acks included) are committed: an append is
    committed after everything queued before it."""
    return store.append([env(CAROL, CAROL, "barrier")])


# contract, every backend ----------------------------------------------------------------


def test_provides_istore(store: Any) -> None:
    assert verifyObject(IStore, store)


@pytest_twisted.inlineCallbacks
def test_remote_items_cannot_take_each_others_ids(store: Any) -> Any:
    """A peer that saw an id (one sent to every member realm of a group, say) and sent
    an item of its own with it first does not make the real item a "duplicate": the
    real one is stored under an alternate id, keyed with a secret of the store, and is
    still recognised when it is sent again."""
    squatter = Envelope("shared-id", "text", "mallory@b.example", CAROL, 1.0, "first!")
    yield store.append_remote([squatter])
    real = Envelope("shared-id", "text", "alice@c.example", CAROL, 2.0, "the real one")
    stored = yield store.append_remote([real])
    assert [e.body for e in stored] == ["the real one"]
    assert real.id.startswith("shared-id~") and real.pos > squatter.pos
    again = Envelope("shared-id", "text", "alice@c.example", CAROL, 2.0, "the real one")
    assert (yield store.append_remote([again])) == []  # a retried transaction
    assert again.id == real.id
    feed = yield store.read_feed(CAROL, 0, 10)
    assert [(e.id, e.body) for e in feed] == [
        ("shared-id", "first!"),
        (real.id, "the real one"),
    ]
    # the same id in another store gets another alternate: a peer cannot predict it
    other = MemoryStore()
    other.append_remote([Envelope("shared-id", "text", "x@b.example", CAROL, 1.0, "")])
    twin = Envelope("shared-id", "text", "alice@c.example", CAROL, 2.0, "the real one")
    other.append_remote([twin])
    assert twin.id.startswith("shared-id~") and twin.id != real.id


@given(st.text(min_size=1, max_size=80), st.text(max_size=10), st.binary(max_size=32))
def test_an_alternate_id_is_in_the_range_its_stores_read(
    item_id: str, who: str, key: bytes
) -> None:
    """Every alternate of an id lies in alternate_range(id), the range stored_item_in
    reads (an alternate outside it would never be found), and not the range of an
    id that differs from it in its first character."""
    env = Envelope(item_id, "text", who, who + "x", 1.0, "")
    alt = alternate_id(env, key)
    lo, hi = alternate_range(item_id)
    assert lo <= alt <= hi and len(lo) == len(alt) == len(hi)
    olo, ohi = alternate_range(chr(ord(item_id[0]) ^ 1) + item_id[1:])
    assert not olo <= alt <= ohi


@pytest_twisted.inlineCallbacks
def test_an_item_is_found_by_the_id_its_peer_knows_in_its_conversation(store: Any) -> Any:
    """stored_item_in finds an item stored under an alternate id by the id the peer
    sent it with and its conversation (how a peer's reaction, edit or reply names it),
    private or in a group, long id or short; never another conversation's item."""
    group = "#g@b.example"
    squatters = [
        Envelope("shared-id", "text", "mallory@b.example", CAROL, 1.0, "first!"),
        Envelope("g" * 60, "text", "mallory@b.example", CAROL, 1.0, "first too"),
    ]
    yield store.append_remote(squatters)
    real = Envelope("shared-id", "text", "alice@c.example", CAROL, 2.0, "the real one")
    in_group = Envelope("shared-id", "text", "alice@c.example", group, 3.0, "to the group")
    long = Envelope("g" * 60, "text", "alice@c.example", group, 4.0, "long id")
    # the same id in the group again, from another sender: the first is found
    twin = Envelope("shared-id", "text", "dan@c.example", group, 5.0, "another")
    yield store.append_remote([real, in_group, long, twin])
    assert len({real.id, in_group.id, long.id, twin.id}) == 4
    assert all("~" in e.id for e in (real, in_group, long, twin))
    dm = conversation_key("alice@c.example", CAROL)
    found = yield store.stored_item_in("shared-id", dm)
    assert (found.id, found.body) == (real.id, "the real one")
    found = yield store.stored_item_in("shared-id", group)
    assert (found.id, found.body) == (in_group.id, "to the group")
    found = yield store.stored_item_in("g" * 60, group)
    assert (found.id, found.body) == (long.id, "long id")
    # stored under the id itself, in the conversation asked about
    own = conversation_key("mallory@b.example", CAROL)
    found = yield store.stored_item_in("shared-id", own)
    assert (found.id, found.body) == ("shared-id", "first!")
    # nothing of that conversation, or under that id
    assert (yield store.stored_item_in("shared-id", conversation_key(ALICE, BOB))) is None
    assert (yield store.stored_item_in("nothing", group)) is None
    # an id that only looks like an alternate of it (a digest of another key) is not
    fake = Envelope("shared-id~0123456789abcdef", "text", "eve@c.example", "#h@b.example", 6.0, "")
    yield store.append_remote([fake])
    assert (yield store.stored_item_in("shared-id", "#h@b.example")) is None
    # an alternate id named directly is the item itself
    found = yield store.stored_item_in(real.id, dm)
    assert found.body == "the real one"


@pytest_twisted.inlineCallbacks
def test_group_requests_are_remembered_until_done(store: Any) -> Any:
    """A request queued for another realm is remembered with its outbox row, and
    stays remembered after the row is acknowledged, until it is done or expires."""
    group = "#dev@h.example"

    def request(rid: str, actor: str, ts: float, event: str = "joined") -> dict[str, Any]:
        return {
            "id": rid,
            "kind": "request",
            "from": actor,
            "to": group,
            "event": event,
            "args": {},
            "ts": ts,
        }

    yield store.outbox_enqueue("h.example", [request("r2", ALICE, 2.0), request("r1", ALICE, 1.0)])
    yield store.outbox_enqueue("h.example", [request("r3", BOB, 3.0, "left")])
    # a copy of an item queued as a dict is not a request
    yield store.append(
        [], [("h.example", {"id": "x", "kind": "event", "from": ALICE, "to": group})]
    )
    rows = yield store.outbox_read("h.example", 0, 10)
    yield store.outbox_ack("h.example", rows[-1][0])
    assert (yield store.outbox_counts()) == {}
    assert [r["id"] for r in (yield store.pending_requests(ALICE, group))] == ["r1", "r2"]
    assert (yield store.pending_requests(ALICE, "#other@h.example")) == []
    yield store.request_done("r1")
    yield store.request_done("r1")  # twice: nothing more happens
    assert [r["id"] for r in (yield store.pending_requests(ALICE, group))] == ["r2"]
    assert (yield store.expire_requests(2.5)) == 1
    assert (yield store.pending_requests(ALICE, group)) == []
    assert [r["event"] for r in (yield store.pending_requests(BOB, group))] == ["left"]


@pytest_twisted.inlineCallbacks
def test_stored_item_by_id(store: Any) -> Any:
    e = env(ALICE, BOB, "findable")
    yield store.append([e])
    found = yield store.stored_item(e.id)
    assert (found.id, found.sender, found.recipient, found.body, found.pos) == (
        e.id,
        ALICE,
        BOB,
        "findable",
        e.pos,
    )
    assert (yield store.stored_item("no-such-id")) is None


@pytest_twisted.inlineCallbacks
def test_signatures_and_peer_keys_are_kept(store: Any) -> Any:
    """An item's ``sig`` is stored with it (local or remote) and read back with it, by
    every read; the keys peers announce are remembered, replaced per realm."""
    sig = {"key": "0123456789abcdef", "ed25519": "A" * 86 + "=="}
    local = env(ALICE, "#dev@h.example", "signed here")
    local.sig = sig
    remote = env("carol@c.example", "#dev@h.example", "signed there")
    remote.sig = dict(sig, key="fedcba9876543210")
    yield store.append([local], [("h.example", local)])
    yield store.append_remote([remote])
    assert (yield store.stored_item(local.id)).sig == sig
    assert (yield store.stored_item(remote.id)).sig == remote.sig
    ((_, queued),) = yield store.outbox_read("h.example", 0, 10)
    assert queued.to_item()["sig"] == sig
    history = yield store.history("#dev@h.example", None, None, 10)
    assert [e.sig for e in history] == [sig, remote.sig]
    assert (yield store.peer_keys()) == {}
    keys = [{"id": "0123456789abcdef", "ed25519": "B" * 43 + "="}]
    yield store.set_peer_keys("c.example", keys)
    yield store.set_peer_keys("d.example", keys)
    yield store.set_peer_keys("c.example", [])
    assert (yield store.peer_keys()) == {"c.example": [], "d.example": keys}


@pytest.mark.parametrize(
    "make",
    [
        lambda: [new_message_id() for _ in range(20000)],
        # in batches (send_batch), of sizes that cross the pool's refills
        lambda: [i for n in (1, 7, 4095, 4097, 5000, 1, 6799) for i in new_message_ids(n)],
    ],
    ids=["one by one", "in batches"],
)
def test_message_ids_are_unpredictable_and_distinct(make: Any) -> None:
    ids = make()
    assert len(ids) == 20000
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 35 and int(i, 16) >= 0 for i in ids)
    # a time prefix (milliseconds), so ids sort by time (the id index grows at its end)
    assert [i[:11] for i in ids] == sorted(i[:11] for i in ids)
    assert abs(int(ids[-1][:11], 16) / 1000 - time.time()) < 60
    # then 96 random bits: no shared prefix between consecutive ones (a counter would
    # show one)
    rand = [i[11:] for i in ids]
    assert sum(a[:8] == b[:8] for a, b in itertools.pairwise(rand)) == 0


@pytest_twisted.inlineCallbacks
def test_accounts(store: Any) -> Any:
    yield store.create_user("bob", "hash-b", 1.0)
    yield store.create_user("alice", "hash-a", 2.0)
    with pytest.raises(UserExists):
        yield store.create_user("alice", "other", 3.0)
    assert (yield store.list_users()) == ["alice", "bob"]
    assert (yield store.password_hash("alice")) == "hash-a"
    assert (yield store.password_hash("nobody")) is None
    assert (yield store.user_exists("bob")) is True
    assert (yield store.user_exists("nobody")) is False
    assert (yield store.set_password("alice", "new")) is True
    assert (yield store.set_password("nobody", "new")) is False
    assert (yield store.password_hash("alice")) == "new"
    store.set_ack(ALICE, "phone", 5)
    yield settle(store)
    assert (yield store.delete_user("alice", ALICE)) is True
    assert (yield store.delete_user("alice", ALICE)) is False
    assert (yield store.list_users()) == ["bob"]
    assert (yield store.get_ack(ALICE, "phone")) == 0  # read markers went with the account


def hold_next_commit(store: Any) -> tuple[threading.Event, threading.Event, list[int]]:
    """Hold ``store``'s next group commit on the writer thread until ``gate`` is set;
    ``entered`` is set once that commit runs, held.  ``sizes``: the items of each
    commit from then on."""
    gate, entered = threading.Event(), threading.Event()
    sizes: list[int] = []
    commit = store._commit

    def held(batches: Any, *args: Any) -> Any:
        sizes.append(sum(len(b) for b in batches))
        if not entered.is_set():
            entered.set()
            assert gate.wait(30)
        return commit(batches, *args)

    store._commit = held
    return gate, entered, sizes


@pytest.fixture(params=[_sqlite, _postgresql], ids=["sqlite", "postgresql"])
def sql_store(request: Any, open_store: Any) -> Any:
    return open_store(request.param)


@pytest_twisted.inlineCallbacks
def test_an_ack_waiting_when_its_account_is_deleted_goes_with_it(sql_store: Any) -> Any:
    """An ack and a read marker still waiting for a commit when their account is
    deleted go with the deletion's commit: they were written after the account's rows
    were deleted, so they outlived it (and a later account of the name found them)."""
    store = sql_store
    yield store.create_user("alice", "hash-a", 1.0)
    yield store.create_user("bob", "hash-b", 1.0)
    [first] = yield store.append([env(ALICE, BOB, "first")])
    gate, entered, _ = hold_next_commit(store)
    busy = store.append([env(BOB, ALICE, "busy")])
    assert (yield deferToThread(entered.wait, 30))  # a commit runs, held
    conv = first.conversation
    store.set_ack(ALICE, "phone", first.pos)  # both wait for the next commit...
    store.set_read(ALICE, conv, first.pos)
    store.set_ack(BOB, "laptop", first.pos)
    deleted = store.delete_user("alice", ALICE)  # ... and so does the deletion
    gate.set()
    yield busy
    assert (yield deleted) is True
    assert (yield store.get_ack(ALICE, "phone")) == 0
    assert ALICE not in (yield store.read_markers(conv))
    assert (yield store.get_ack(BOB, "laptop")) == first.pos  # others' are written
    # a later alice finds nothing of the first
    yield store.create_user("alice", "hash-a2", 3.0)
    assert (yield store.get_ack(ALICE, "phone")) == 0
    assert ALICE not in (yield store.read_markers(conv))


@pytest_twisted.inlineCallbacks
def test_delete_user_commits_the_end_of_its_standing_with_it(store: Any) -> Any:
    """A deletion is one transaction: the account, its acks and unfinished uploads go,
    the items ending its group standing are committed (with their outbox rows); for an
    account that is not there, nothing at all is committed."""
    yield store.create_user("alice", "hash-a", 1.0)
    yield store.create_user("bob", "hash-b", 1.0)
    [before] = yield store.append([env(ALICE, BOB, "before")])
    store.set_ack(ALICE, "phone", 1)
    yield store.put_upload({"upload_id": "up-a", "user": ALICE})
    yield store.put_upload({"upload_id": "up-b", "user": BOB})
    old = {"id": "r0", "kind": "request", "from": ALICE, "to": "#h@b.example", "event": "joined"}
    yield store.outbox_enqueue("b.example", [old])  # pending: it may still be answered
    assert [r["id"] for r in (yield store.pending_requests(ALICE, "#h@b.example"))] == ["r0"]
    meta = {"event": "left", "user": ALICE, "reason": "account deleted"}
    left = Envelope(new_message_id(), "event", ALICE, "#g@localhost", 2.0, "", meta)
    request = {"id": "r1", "kind": "request", "from": ALICE, "to": "#h@b.example", "event": "left"}
    outbox = [("c.example", left), ("b.example", request)]
    assert (yield store.delete_user("alice", ALICE, [left], outbox)) is True
    # (after the request queued alone, which takes a position on PostgreSQL: see
    # chatproto.store.postgresql.writers.outbox_seqs)
    assert left.pos > before.pos
    assert [(e.id, e.pos, e.meta) for e in (yield store.read_events(0, 10))] == [
        (left.id, left.pos, meta)
    ]
    assert [e.id for _, e in (yield store.outbox_read("c.example", 0, 10))] == [left.id]
    assert [e for _, e in (yield store.outbox_read("b.example", 0, 10))] == [old, request]
    # the old pending request is forgotten (an answer to it would land on the next
    # alice), the deletion's own is pending
    assert [r["id"] for r in (yield store.pending_requests(ALICE, "#h@b.example"))] == ["r1"]
    assert (yield store.list_users()) == ["bob"]
    assert (yield store.user_floors()) == {"bob": 0}
    assert (yield store.get_ack(ALICE, "phone")) == 0
    assert [u["upload_id"] for u in (yield store.list_uploads())] == ["up-b"]
    # not there: nothing of it is committed
    late = Envelope(new_message_id(), "event", ALICE, "#g@localhost", 3.0, "", meta)
    again = [("c.example", late), ("b.example", dict(request, id="r2"))]
    assert (yield store.delete_user("alice", ALICE, [late], again)) is False
    assert late.pos == 0
    assert [e.id for e in (yield store.read_events(0, 10))] == [left.id]
    assert (yield store.outbox_counts()) == {"b.example": 2, "c.example": 1}
    # the deletion consumed a position: a new alice starts after all of it
    yield store.create_user("alice", "hash-new", 4.0)
    assert (yield store.user_floor("alice")) == left.pos + 1
    assert (yield store.user_floors()) == {"alice": left.pos + 1, "bob": 0}
    nxt = env(BOB, ALICE, "after")
    yield store.append([nxt])
    assert nxt.pos == left.pos + 2


@pytest_twisted.inlineCallbacks
def test_a_name_registered_again_always_gets_a_greater_floor(store: Any) -> Any:
    """Even with no item stored at all, before or in between: the floor tells the
    accounts of one name apart."""
    floors = []
    for _ in range(3):
        yield store.create_user("alice", "hash", 1.0)
        floors.append((yield store.user_floor("alice")))
        assert (yield store.delete_user("alice", ALICE)) is True
    assert floors == [0, 1, 2]
    assert (yield store.max_pos()) == 0  # consumed, not stored
    first = env(BOB, BOB, "first")
    yield store.append([first])
    assert first.pos == 4  # three deletions consumed 1, 2 and 3


@pytest_twisted.inlineCallbacks
def test_partners_and_file_usage_after_a_floor(store: Any) -> Any:
    """What an account reads of its name's past is cut at its floor: presence partners
    and the files counted in its quota."""
    yield store.append([env(ALICE, BOB, "old")])
    meta = {"file_id": "f" * 22, "sha256": "a" * 64, "size": 10, "name": "n", "media_type": "x/y"}
    yield store.append([Envelope("m-old", "file", ALICE, CAROL, 1.0, "n", meta)])
    floor = yield store.max_pos()
    yield store.append([env(CAROL, ALICE, "new")])
    meta2 = dict(meta, file_id="g" * 22, size=5)
    yield store.append([Envelope("m-new", "file", ALICE, CAROL, 1.0, "n", meta2)])
    assert sorted((yield store.conversation_partners(ALICE))) == [BOB, CAROL]
    assert (yield store.conversation_partners(ALICE, floor)) == [CAROL]
    assert (yield store.file_usage(ALICE)) == 15
    assert (yield store.file_usage(ALICE, floor)) == 5


@pytest_twisted.inlineCallbacks
def test_a_commit_is_told_with_where_its_time_went(sql_store: Any) -> Any:
    """The commit observer gets the items, the seconds from submission to results,
    the COMMIT's seconds and the phases: queued for the writer, writing, handed
    back, which add up to the seconds (store.timer read at each of those points)."""
    told: list[tuple[Any, ...]] = []
    ticks = iter([100.0, 100.5, 102.0, 105.0])
    lock = threading.Lock()

    def timer() -> float:
        with lock:  # (read on the reactor and on the writer thread)
            return next(ticks)

    sql_store.timer = timer
    sql_store.commit_observer = lambda *args: told.append(args)
    yield sql_store.append([env(ALICE, BOB, "one"), env(ALICE, BOB, "two")])
    [(items, seconds, sync, phases)] = told
    assert (items, seconds) == (2, 5.0) and sync is not None and sync >= 0
    assert (phases.queued, phases.writing, phases.handoff) == (0.5, 1.5, 3.0)


@pytest_twisted.inlineCallbacks
def test_a_commit_behind_a_held_one_is_told_it_was_queued(sql_store: Any) -> Any:
    """On the real clock: the first commit held 0.2 s on the writer thread is told
    as writing that long; the commit submitted behind it, as queued that long."""
    told: list[Any] = []
    sql_store.commit_observer = lambda *args: told.append(args[3])
    gate, entered, _sizes = hold_next_commit(sql_store)
    first = sql_store.append([env(ALICE, BOB, "first")])
    yield deferToThread(entered.wait, 30)
    second = sql_store.append([env(ALICE, BOB, "second")])
    yield deferLater(_reactor, 0.2, lambda: None)
    gate.set()
    yield defer.gatherResults([first, second])
    yield until(lambda: len(told) >= 2)
    assert told[0].writing >= 0.19 and told[0].queued < 0.19
    assert told[1].queued >= 0.15 and told[1].writing < 0.19
    assert all(p.handoff >= 0 for p in told)


@pytest_twisted.inlineCallbacks
def test_positions_strictly_increase(store: Any) -> Any:
    assert (yield store.max_pos()) == 0
    seen: list[int] = []
    for size in (1, 3, 1, 5):
        batch = [env(ALICE, BOB, f"m{i}") for i in range(size)]
        result = yield store.append(batch)
        assert result == batch and all(a is b for a, b in zip(result, batch, strict=True))
        seen += [e.pos for e in batch]
    assert all(0 < a < b for a, b in itertools.pairwise(seen))
    assert (yield store.max_pos()) == seen[-1]


@pytest_twisted.inlineCallbacks
def test_concurrent_appends_keep_call_order(store: Any) -> Any:
    batches = [[env(ALICE, BOB, f"m{i}")] for i in range(500)]
    results = yield defer.gatherResults([store.append(b) for b in batches])
    positions = [r[0].pos for r in results]
    assert positions == sorted(set(positions))
    feed = yield store.read_feed(BOB, 0, 1000)
    assert [e.body for e in feed] == [f"m{i}" for i in range(500)]


@pytest_twisted.inlineCallbacks
def test_read_feed(store: Any) -> Any:
    items = [
        env(ALICE, BOB, "1 a->b"),
        env(CAROL, BOB, "2 c->b"),
        env(BOB, ALICE, "3 b->a"),
        env(ALICE, CAROL, "4 a->c"),
        env(BOB, BOB, "5 b->b"),
        env(CAROL, ALICE, "6 c->a"),
        env(ALICE, BOB, "7 a->b"),
    ]
    for item in items:
        yield store.append([item])
    pos = {e.body[0]: e.pos for e in items}

    def bodies(feed: list[Envelope]) -> list[str]:
        return [e.body[0] for e in feed]

    assert bodies((yield store.read_feed(BOB, 0, 100))) == list("12357")
    assert bodies((yield store.read_feed(ALICE, 0, 100))) == list("13467")
    assert bodies((yield store.read_feed(CAROL, 0, 100))) == list("246")
    assert bodies((yield store.read_feed(BOB, pos["2"], 100))) == list("357")
    assert bodies((yield store.read_feed(BOB, 0, 2))) == list("12")
    assert bodies((yield store.read_feed(BOB, pos["3"], 2))) == list("57")
    assert bodies((yield store.read_feed(BOB, pos["7"], 100))) == []
    assert (yield store.read_feed("nobody@localhost", 0, 100)) == []
    [first] = yield store.read_feed(ALICE, 0, 1)
    assert (first.id, first.sender, first.recipient, first.kind, first.ts) == (
        items[0].id,
        ALICE,
        BOB,
        "text",
        1700000000.0,
    )


@pytest_twisted.inlineCallbacks
def test_meta_round_trips(store: Any) -> Any:
    item = env(ALICE, BOB, "file")
    item.meta = {"name": "x.png", "size": 3, "nested": [1, "\N{SNOWMAN}"]}
    yield store.append([item, env(ALICE, BOB, "plain")])
    feed = yield store.read_feed(BOB, 0, 10)
    assert [e.meta for e in feed] == [item.meta, None]


@pytest_twisted.inlineCallbacks
def test_history_pages(store: Any) -> Any:
    conv = conversation_key(ALICE, BOB)
    mine = []
    for i in range(10):
        a = env(ALICE, BOB, f"ab{i}") if i % 2 else env(BOB, ALICE, f"ab{i}")
        mine.append(a)
        yield store.append([a, env(ALICE, CAROL, f"noise{i}"), env(BOB, "#g@localhost", f"g{i}")])
    p = [e.pos for e in mine]

    def bodies(page: list[Envelope]) -> list[str]:
        return [e.body for e in page]

    assert bodies((yield store.history(conv, None, None, 3))) == ["ab7", "ab8", "ab9"]
    assert bodies((yield store.history(conv, None, None, 100))) == [f"ab{i}" for i in range(10)]
    assert bodies((yield store.history(conv, p[5], None, 3))) == ["ab2", "ab3", "ab4"]
    assert bodies((yield store.history(conv, p[1], None, 3))) == ["ab0"]
    assert bodies((yield store.history(conv, p[0], None, 3))) == []
    assert bodies((yield store.history(conv, None, p[2], 3))) == ["ab3", "ab4", "ab5"]
    assert bodies((yield store.history(conv, None, p[7], 100))) == ["ab8", "ab9"]
    assert bodies((yield store.history(conv, None, 0, 2))) == ["ab0", "ab1"]
    assert bodies((yield store.history(conv, None, p[9], 3))) == []
    group = yield store.history("#g@localhost", None, None, 2)
    assert bodies(group) == ["g8", "g9"]
    assert (yield store.history(conversation_key(BOB, CAROL), None, None, 5)) == []


@pytest_twisted.inlineCallbacks
def test_acks_are_monotonic_and_default_to_the_users_highest(store: Any) -> Any:
    assert (yield store.get_ack(ALICE, "phone")) == 0
    store.set_ack(ALICE, "phone", 5)
    yield settle(store)
    store.set_ack(ALICE, "phone", 3)  # lower: ignored
    yield settle(store)
    assert (yield store.get_ack(ALICE, "phone")) == 5
    store.set_ack(ALICE, "laptop", 2)
    store.set_ack(ALICE, "laptop", 4)
    yield settle(store)
    assert (yield store.get_ack(ALICE, "laptop")) == 4
    assert (yield store.get_ack(ALICE, "new-device")) == 5  # the user's highest
    assert (yield store.get_ack(BOB, "phone")) == 0
    store.set_ack(ALICE, "laptop", 9)
    yield settle(store)
    assert (yield store.get_ack(ALICE, "new-device")) == 9
    assert (yield store.get_ack(ALICE, "phone")) == 5


def stored_devices(store: Any, user: str) -> defer.Deferred[dict[str, int]]:
    """``{device: ack}``: the acks ``store`` holds for ``user``, as stored (a forgotten
    device is not there; :meth:`IStore.get_ack` would answer the user's highest)."""
    if isinstance(store, MemoryStore):
        return defer.succeed({d: p for (u, d), p in store.acks.items() if u == user})
    if isinstance(store, SQLiteStore):
        sql = "SELECT device, pos FROM acks WHERE user = ?"
    else:
        sql = "SELECT device, pos FROM acks WHERE addr = %s"
    return store._read(lambda db: dict(db.conn.execute(sql, (user,)).fetchall()))


@pytest_twisted.inlineCallbacks
def test_acks_are_kept_for_at_most_max_devices_per_user(store: Any) -> Any:
    """A user cannot make the store keep an ack per device name it makes up: past
    ``max_devices`` devices, those with the lowest acks are forgotten in the commit
    that stores the ack, and a forgotten device resumes as a device never seen does
    (after the user's highest ack).  Other users' acks are not touched."""
    store.max_devices = 3
    for k, device in enumerate("abcde"):
        store.set_ack(ALICE, device, k + 1)
        store.set_ack(BOB, device, 10 - k)
        yield settle(store)
    assert (yield stored_devices(store, ALICE)) == {"c": 3, "d": 4, "e": 5}
    assert (yield stored_devices(store, BOB)) == {"a": 10, "b": 9, "c": 8}
    assert (yield store.get_ack(ALICE, "a")) == 5  # forgotten: the user's highest
    assert (yield store.get_ack(ALICE, "c")) == 3
    # A forgotten device acknowledging less than every kept one is forgotten again at
    # once; more than the lowest kept, it takes that one's place.
    store.set_ack(ALICE, "a", 2)
    yield settle(store)
    assert (yield stored_devices(store, ALICE)) == {"c": 3, "d": 4, "e": 5}
    store.set_ack(ALICE, "a", 6)
    yield settle(store)
    assert (yield stored_devices(store, ALICE)) == {"a": 6, "d": 4, "e": 5}
    assert (yield store.get_ack(ALICE, "c")) == 6


@pytest_twisted.inlineCallbacks
def test_acks_of_one_commit_past_max_devices_keep_the_highest(store: Any) -> Any:
    """Many new devices in one commit: the highest acks stay, and among equal acks the
    first device names in code point order."""
    store.max_devices = 2
    for device, pos in (("b", 7), ("é", 7), ("a", 7), ("Z", 3), ("c", 1)):
        store.set_ack(ALICE, device, pos)
    yield settle(store)
    assert (yield stored_devices(store, ALICE)) == {"a": 7, "b": 7}
    store.max_devices = 1  # a lower bound: the user's next new device trims to it
    store.set_ack(ALICE, "c", 8)
    yield settle(store)
    assert (yield stored_devices(store, ALICE)) == {"c": 8}
    assert (yield store.get_ack(ALICE, "a")) == 8


@pytest_twisted.inlineCallbacks
def test_acks_are_kept_for_64_devices_per_user_by_default(store: Any) -> Any:
    assert store.max_devices == MAX_DEVICES == 64
    for k in range(MAX_DEVICES + 10):
        store.set_ack(ALICE, f"web-{k:03}", k + 1)
    yield settle(store)
    kept = yield stored_devices(store, ALICE)
    assert kept == {f"web-{k:03}": k + 1 for k in range(10, MAX_DEVICES + 10)}
    assert (yield store.get_ack(ALICE, "web-000")) == MAX_DEVICES + 10


# SQLite specifics ---------------------------------------------------------------------


def test_migrate_fresh_database_and_idempotent(tmp_path: Any) -> None:
    path = str(tmp_path / "sub" / "dir" / "realm.sqlite3")  # parents are created
    db = SQLiteDB(path)
    try:
        assert db.migrate() == 0
        assert db.version() == SCHEMA_VERSION >= 1
        assert db.migrate() == SCHEMA_VERSION  # idempotent: nothing left to do
        assert db.version() == SCHEMA_VERSION
        tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master")}
        assert {"users", "items", "acks", "schema_version"} <= tables
        assert db.conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    db = SQLiteDB(path)
    try:
        assert db.migrate() == SCHEMA_VERSION
    finally:
        db.close()


def test_newer_schema_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "realm.sqlite3")
    db = SQLiteDB(path)
    db.migrate()
    db.conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    db = SQLiteDB(path)
    try:
        newer = rf"schema version {SCHEMA_VERSION + 1}, newer .*\({SCHEMA_VERSION}\); upgrade"
        with pytest.raises(RuntimeError, match=newer):
            db.migrate()
        assert db.version() == SCHEMA_VERSION + 1  # left untouched
    finally:
        db.close()


@pytest_twisted.inlineCallbacks
def test_store_with_newer_schema_does_not_open(tmp_path: Any) -> Any:
    path = str(tmp_path / "realm.sqlite3")
    db = SQLiteDB(path)
    db.migrate()
    db.conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    store = SQLiteStore(path, _reactor)
    with pytest.raises(RuntimeError, match="newer"):
        yield defer.maybeDeferred(store.open)


@pytest_twisted.inlineCallbacks
def test_group_commit(sqlite_store: SQLiteStore) -> Any:
    before = sqlite_store.commits
    results = yield defer.gatherResults(
        [sqlite_store.append([env(ALICE, BOB)]) for _ in range(500)]
    )
    assert len(results) == 500
    commits = sqlite_store.commits - before
    assert 1 <= commits < 500
    assert sqlite_store.committed_items == 500


@pytest_twisted.inlineCallbacks
def test_a_commit_queued_behind_one_in_flight_takes_what_waits_when_it_starts(
    sqlite_store: SQLiteStore,
) -> Any:
    """The pipelined group commit: while a commit runs on the writer thread, the next
    is queued behind it and takes the appends, acks and read markers that wait when
    it starts -- those queued after it was submitted too -- so the writer goes from
    one commit to the next; results come back in position order, two commits."""
    store = sqlite_store
    yield store.append([env(ALICE, BOB, "warm")])
    gate, entered, calls = hold_next_commit(store)
    before = store.commits
    first = store.append([env(ALICE, BOB, "first")])
    assert (yield deferToThread(entered.wait, 30))  # the first commit runs, held
    second = store.append([env(ALICE, BOB, "second")])  # submitted behind it
    third = store.append([env(BOB, ALICE, "third"), env(BOB, ALICE, "fourth")])
    store.set_ack(BOB, "phone", 1)  # queued after the second was submitted
    assert store._jobs == 2  # the second is on the writer thread's queue already
    order: list[str] = []
    for d, name in ((first, "first"), (second, "second"), (third, "third")):
        d.addCallback(lambda items, name=name: order.append(name) or items)
    gate.set()
    [a], [b], [c, e] = yield defer.gatherResults([first, second, third])
    assert calls == [1, 3]  # the second took the third's items and the ack too
    assert store.commits - before == 2
    assert a.pos < b.pos < c.pos < e.pos and order == ["first", "second", "third"]
    assert (yield store.get_ack(BOB, "phone")) == 1
    feed = yield store.read_feed(BOB, a.pos - 1, 10)
    assert [x.body for x in feed] == ["first", "second", "third", "fourth"]


@pytest_twisted.inlineCallbacks
def test_bad_batch_fails_alone_within_one_commit(sqlite_store: SQLiteStore) -> Any:
    store = sqlite_store
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
    with pytest.raises(sqlite3.IntegrityError):
        yield d2
    r3 = yield d3
    # (one commit for all four if the first had not started on the writer thread
    # yet: a commit takes what waits when it starts)
    assert store.commits - before in (1, 2)
    assert r1[0].pos < r3[0].pos
    feed = yield store.read_feed(BOB, 0, 10)
    assert [e.body for e in feed] == ["in flight", "ok1", "ok2"]
    assert [e.pos for e in bad] == [0, 0]
    # the store keeps working after the failure
    [later] = yield store.append([env(ALICE, BOB, "later")])
    assert later.pos > r3[0].pos


@pytest.mark.parametrize("rows_per_insert", [None, 4])
def test_sqlite_commit_positions_follow_the_items_across_multi_row_inserts(
    tmp_path: Any, rows_per_insert: int | None
) -> None:
    """A commit's items go in with multi-row inserts (up to ROWS_PER_INSERT rows, the
    rest in powers of two): each item gets the position it is stored at, in batch
    order, with remote duplicates left out and a bad batch failing alone."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    if rows_per_insert is not None:
        db._rows_per_insert = rows_per_insert
    [[p0]] = db.append_batch([[env(ALICE, BOB, "first")]], {})
    known = env("x@b.example", ALICE, "stored before")
    db.append_batch([[known]], {}, None, [True])
    sizes = [1, 300, 7, 3, 256, 45, 2]
    batches = [[env(ALICE, BOB, f"b{b} {k}") for k in range(n)] for b, n in enumerate(sizes)]
    again = Envelope(known.id, "text", known.sender, known.recipient, 1.0, "again")
    remote = [env("x@b.example", ALICE, "r0"), again, env("x@b.example", ALICE, "r2")]
    out = db.append_batch([*batches, remote], {}, None, [False] * len(sizes) + [True])
    assert out[-1][1] is None
    stored = [e for b in batches for e in b] + [remote[0], remote[2]]
    positions = [p for r in out for p in r if p is not None]  # type: ignore[union-attr]
    assert positions == list(range(p0 + 2, p0 + 2 + len(stored)))
    for e, p in zip(stored, positions, strict=True):
        assert db.stored_item(e.id).pos == p  # type: ignore[union-attr]
    # a duplicate id in one batch: the commit is redone batch by batch, that one fails
    dup = [env(ALICE, BOB, "dup a"), env(ALICE, BOB, "dup b", id_=stored[0].id)]
    ok = [env(ALICE, BOB, f"ok {k}") for k in range(9)]
    out = db.append_batch([ok[:5], dup, ok[5:]], {})
    assert isinstance(out[1], sqlite3.IntegrityError)
    assert [db.stored_item(e.id).pos for e in ok] == [*out[0], *out[2]]  # type: ignore[union-attr,misc]
    assert db.stored_item(dup[0].id) is None
    db.close()


def stored_in_order(db: SQLiteDB, batches: list[list[Envelope]], items: list[Envelope]) -> None:
    """Commit ``batches`` (``items``, in order) with the multi-row inserts, never redone
    batch by batch: each item is stored, every column as it was, at consecutive
    positions in the commit's order."""

    def redone(*args: Any) -> Any:
        raise AssertionError("the multi-row inserts failed: redone batch by batch")

    db._append_each = redone  # type: ignore[method-assign]
    out = db.append_batch(batches, {})
    positions = [p for r in out for p in r]  # type: ignore[union-attr]
    assert positions == list(range(positions[0], positions[0] + len(items)))
    for e, p in zip(items, positions, strict=True):
        got = db.stored_item(e.id)
        assert got is not None
        assert (got.pos, got.kind, got.sender, got.recipient, got.ts, got.body) == (
            p,
            e.kind,
            e.sender,
            e.recipient,
            e.ts,
            e.body,
        )
        assert (got.meta, got.sig, got.conversation) == (e.meta, e.sig, e.conversation)


@pytest.mark.parametrize("rows_per_insert", [None, 4, 5])
def test_sqlite_plain_items_and_items_with_meta_or_sig_keep_their_order_and_columns(
    tmp_path: Any, rows_per_insert: int | None
) -> None:
    """A commit's plain items (no meta, no sig) go in with statements that write those
    NULLs themselves, the others with every column bound: runs of either shape, of
    any length (statements of ROWS_PER_INSERT rows, a power of two or not, and the
    powers of two below), keep their order, positions and columns."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    if rows_per_insert is not None:
        db._rows_per_insert = rows_per_insert
    rng = random.Random(7)
    items = []
    for k in range(400):
        e = env(ALICE if k % 3 else CAROL, BOB if k % 5 else "x@b.example", f"m{k}")
        if k > 200 or rng.random() < 0.5:  # (runs of every length, and one long run)
            shape = rng.choice(["plain", "plain", "meta", "sig", "both"]) if k < 300 else "plain"
            if shape in ("meta", "both"):
                e.meta = {"x": k, "n": None}
            if shape in ("sig", "both"):
                e.sig = {"realm": "b.example", "sig": str(k)}
        items.append(e)
    cuts = sorted(rng.sample(range(1, 400), 30))
    batches = [items[a:b] for a, b in zip([0, *cuts], [*cuts, 400], strict=True)]

    stored_in_order(db, batches, items)
    nulls = db.conn.execute("SELECT meta IS NULL, sig IS NULL FROM items ORDER BY pos").fetchall()
    assert nulls == [(e.meta is None, e.sig is None) for e in items]
    db.close()


_PAIRS = [(ALICE, BOB), (BOB, ALICE), (CAROL, BOB), (ALICE, "x@b.example")]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(_PAIRS) - 1),  # the pair
            st.integers(1, 48),  # a run of that many items of it
            st.sampled_from(["plain", "plain", "plain", "event", "meta", "sig"]),
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 300),  # where the commit's batches are cut
    st.sampled_from([None, 3, 4, 16]),  # rows per statement
    st.sampled_from([None, 2, 8]),  # the shortest pair run (None: PAIR_RUN's own)
)
def test_sqlite_pair_runs_and_mixed_items_keep_their_order_and_columns(
    runs: list[tuple[int, int, str]], cut: int, rows: int | None, pair_run: int | None
) -> None:
    """Runs of PAIR_RUN or more plain text items of one (sender, recipient) go in with
    statements that bind the pair once (SQLiteDB._insert_pair_run), the items around
    them with every column bound (_insert_mixed): whatever the runs and the shapes
    around them, and however the statements are cut, every item keeps its place in
    the commit's order and every column."""
    with tempfile.TemporaryDirectory() as d:
        db = SQLiteDB(os.path.join(d, "s.sqlite3"))
        db.migrate()
        if rows is not None:
            db._rows_per_insert = db._pair_rows = rows
        if pair_run is not None:
            db.PAIR_RUN = pair_run
        items = []
        for pair, n, shape in runs:
            for k in range(n):
                e = env(*_PAIRS[pair], f"{pair} {shape} {k}")
                e.ts = 1700000000.0 + len(items)
                if shape == "event":
                    e.kind = "event"
                elif shape == "meta":
                    e.meta = {"x": k}
                elif shape == "sig":
                    e.sig = {"realm": "b.example", "sig": str(k)}
                items.append(e)
        batches = [items[i : i + cut] for i in range(0, len(items), cut)]

        stored_in_order(db, batches, items)
        db.close()


def test_sqlite_a_bad_batch_inside_a_pair_run_fails_alone(tmp_path: Any) -> None:
    """A duplicate id in a batch that a pair run spans: the commit is redone batch by
    batch and that batch alone fails; the run's other items are stored in order."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    [[first]] = db.append_batch([[env(ALICE, BOB, "first")]], {})
    known = db.stored_item_in  # (keeps the line short below)
    n = SQLiteDB.PAIR_RUN // 2  # (the three batches' items make one run)
    before = [env(ALICE, BOB, f"a{k}") for k in range(n)]
    bad = [env(ALICE, BOB, "b0"), env(ALICE, BOB, "b1", id_=before[3].id)]
    after = [env(ALICE, BOB, f"c{k}") for k in range(n)]
    out = db.append_batch([before, bad, after], {})
    assert isinstance(out[1], sqlite3.IntegrityError)
    assert out[0] == list(range(first + 1, first + n + 1))
    assert out[2] == list(range(first + n + 1, first + 2 * n + 1))
    assert db.stored_item(bad[0].id) is None
    assert [known(e.id, e.conversation).pos for e in after] == out[2]  # type: ignore[union-attr]
    db.close()


def test_sqlite_commit_writes_acks_and_read_markers_forward_only(tmp_path: Any) -> None:
    """A commit's acks and read markers (one statement each): any device name or
    address text, a position only ever raised."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    conv = conversation_key(ALICE, BOB)
    devices = ["phone", "t\u00e9l\u00e9phone \U0001f600", 'quote " back\\slash', "\x01 \u2028"]
    acks = {(ALICE, d): 10 + k for k, d in enumerate(devices)}
    db.commit_batch([], {**acks, (BOB, "phone"): 3}, reads={(ALICE, conv): 8, (BOB, conv): 2})
    assert [db.get_ack(ALICE, d) for d in devices] == [10, 11, 12, 13]
    assert db.read_markers(conv) == {ALICE: 8, BOB: 2}
    db.commit_batch([], {(ALICE, devices[1]): 5, (BOB, "phone"): 4}, reads={(ALICE, conv): 1})
    assert db.get_ack(ALICE, devices[1]) == 11 and db.get_ack(BOB, "phone") == 4
    assert db.read_markers(conv) == {ALICE: 8, BOB: 2}
    db.close()


def test_sqlite_acks_past_max_devices_go_at_the_users_first_ack(tmp_path: Any) -> None:
    """Acks past the bound (rows an older chatproto kept, or a bound since lowered) go
    in the commit of the user's first ack after the store is opened, whatever device
    it names; users with no ack in the commit keep theirs until they acknowledge
    something.  Later acks of devices stored already rank no rows."""
    db = SQLiteDB(str(tmp_path / "s.sqlite3"))
    db.migrate()
    rows = [(ALICE, f"d{k}", k) for k in range(1, 7)] + [(BOB, "x", 1), (BOB, "y", 2)]
    db.conn.executemany("INSERT INTO acks VALUES (?, ?, ?)", rows)

    def devices(user: str) -> dict[str, int]:
        return dict(db.conn.execute("SELECT device, pos FROM acks WHERE user = ?", (user,)))

    db.commit_batch([], {(ALICE, "d2"): 3}, devices=2)
    assert devices(ALICE) == {"d5": 5, "d6": 6}
    assert devices(BOB) == {"x": 1, "y": 2}
    assert db.get_ack(ALICE, "d2") == 6
    db.commit_batch([], {(ALICE, "d6"): 7}, devices=2)  # known stored from now on
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    db.commit_batch([], {(ALICE, "d6"): 8}, devices=2)
    assert not [s for s in statements if "DELETE FROM acks" in s]
    assert devices(ALICE) == {"d5": 5, "d6": 8}
    db.commit_batch([], {(ALICE, "d7"): 9}, devices=2)
    assert [s for s in statements if "DELETE FROM acks" in s]
    assert devices(ALICE) == {"d6": 8, "d7": 9}
    db.close()


@pytest_twisted.inlineCallbacks
def test_positions_are_not_reused_after_deletion(sqlite_store: SQLiteStore) -> Any:
    store = sqlite_store
    items = yield store.append([env(ALICE, BOB, f"m{i}") for i in range(3)])
    top = items[-1].pos
    db = SQLiteDB(store.path)
    try:
        db.conn.execute("DELETE FROM items WHERE pos = ?", (top,))
    finally:
        db.close()
    assert (yield store.max_pos()) == top - 1
    [again] = yield store.append([env(ALICE, BOB, "again")])
    assert again.pos > top


@pytest_twisted.inlineCallbacks
def test_close_flushes_pending_acks(tmp_path: Any) -> Any:
    store = _sqlite(tmp_path)
    yield store.open()
    d = store.append([env(ALICE, BOB)])
    store.set_ack(BOB, "phone", 1)  # queued behind the append in flight
    store.set_ack(BOB, "phone", 7)
    store.set_ack(ALICE, "laptop", 3)
    yield store.close()
    assert d.called
    db = SQLiteDB(store.path)
    try:
        assert db.get_ack(BOB, "phone") == 7
        assert db.get_ack(ALICE, "laptop") == 3
        assert db.get_ack(BOB, "other") == 7
    finally:
        db.close()
    reopened = _sqlite(tmp_path)
    yield reopened.open()
    try:
        assert (yield reopened.get_ack(BOB, "phone")) == 7
        assert (yield reopened.max_pos()) == 1
    finally:
        yield reopened.close()


@pytest_twisted.inlineCallbacks
def test_acks_and_read_markers_alone_wait_for_a_commit_of_items(sql_store: Any) -> Any:
    """An ack or read marker with nothing else to commit waits MARK_DELAY for a commit
    of items to ride (no commit and fsync of its own per delivery on a quiet realm);
    one comes: they go with it; none comes: they get their own after MARK_DELAY."""
    store = sql_store
    store.mark_delay = 30.0  # (longer than anything below takes on a loaded machine)
    yield settle(store)
    commits = store.commits
    store.set_ack(BOB, "phone", 1)
    store.set_read(BOB, "alice@localhost", 1)
    yield deferLater(_reactor, 0.01, lambda: None)
    assert store.commits == commits  # waiting
    assert (yield stored_devices(store, BOB)) == {}
    assert (yield store.get_ack(BOB, "phone")) == 1  # (read-your-writes all the same)
    [item] = yield store.append([env(ALICE, BOB)])
    assert store.commits == commits + 1  # rode the item's commit
    assert (yield stored_devices(store, BOB)) == {"phone": 1}
    # alone, past the delay: a commit of their own
    store.mark_delay = 0.05
    store.set_ack(BOB, "phone", item.pos)
    yield until(lambda: store.commits == commits + 2)
    assert (yield stored_devices(store, BOB)) == {"phone": item.pos}


@pytest_twisted.inlineCallbacks
def test_close_commits_an_ack_waiting_alone_at_once(tmp_path: Any) -> Any:
    store = _sqlite(tmp_path)
    yield store.open()
    yield store.append([env(ALICE, BOB)])
    yield deferLater(_reactor, 0, lambda: None)  # (that commit's hand-out is over)
    store.set_ack(BOB, "phone", 1)  # nothing in flight: it waits MARK_DELAY...
    started = _reactor.seconds()
    yield store.close()  # ...not when the store closes
    assert _reactor.seconds() - started < 0.04
    db = SQLiteDB(store.path)
    try:
        assert db.get_ack(BOB, "phone") == 1
    finally:
        db.close()


@pytest_twisted.inlineCallbacks
def test_get_ack_sees_an_ack_whose_write_is_in_flight(sqlite_store: SQLiteStore) -> Any:
    """Read-your-writes for acks: one being committed still counts (white-box: the
    writer thread is held so the window is certain, not a race)."""
    store = sqlite_store
    release = threading.Event()
    # Hold the writer thread, so the ack write below stays in flight while we read.
    store._writer_pool.callInThread(release.wait, 10)
    try:
        store.set_ack(ALICE, "phone", 5)
        seen = yield store.get_ack(ALICE, "phone")
    finally:
        release.set()
    yield settle(store)
    assert seen == 5


# more of the contract, every backend -------------------------------------------------


def file_env(sender: str, recipient: str, file_id: str, sha: str, size: int, ts: float) -> Envelope:
    meta = {"file_id": file_id, "sha256": sha, "size": size, "name": "n.txt", "media_type": "a/b"}
    return Envelope(new_message_id(), "file", sender, recipient, ts, "n.txt", meta)


@pytest_twisted.inlineCallbacks
def test_files_and_uploads(store: Any) -> Any:
    a, b = "a" * 64, "b" * 64
    f1 = file_env(ALICE, BOB, "f1", a, 3, 5.0)
    f2 = file_env(ALICE, "#g@localhost", "f2", a, 4, 7.0)  # same content, later
    f3 = file_env(BOB, ALICE, "f3", b, 10, 9.0)
    yield store.append([f1, env(ALICE, BOB, "text")])
    yield store.append([f2, f3])
    rec = yield store.file_info("f1")
    assert rec == {**f1.meta, "sender": ALICE, "recipient": BOB, "ts": 5.0, "pos": f1.pos}
    assert (yield store.file_info("nope")) is None
    assert (yield store.file_usage(ALICE)) == 7
    assert (yield store.file_usage(BOB)) == 10
    assert (yield store.blob_referenced(a)) and not (yield store.blob_referenced("c" * 64))
    assert (yield store.expire_files(5.0)) == []  # ts < before, strictly
    assert (yield store.expire_files(6.0)) == []  # f1 went, but f2 still has its bytes
    assert (yield store.file_info("f1")) is None and (yield store.blob_referenced(a))
    assert (yield store.expire_files(100.0)) == [a, b]
    assert (yield store.file_usage(ALICE)) == 0
    feed = yield store.read_feed(BOB, 0, 10)
    assert [e.kind for e in feed] == ["file", "text", "file"]  # the messages stay
    # unfinished uploads: insert or replace, list, delete
    yield store.put_upload({"upload_id": "u1", "user": ALICE, "size": 9})
    yield store.put_upload({"upload_id": "u2", "user": BOB, "size": 1, "x": [1, 2]})
    yield store.put_upload({"upload_id": "u1", "user": ALICE, "size": 10})
    ups = yield store.list_uploads()
    assert sorted(ups, key=lambda r: r["upload_id"]) == [
        {"upload_id": "u1", "user": ALICE, "size": 10},
        {"upload_id": "u2", "user": BOB, "size": 1, "x": [1, 2]},
    ]
    yield store.delete_upload("u1")
    yield store.delete_upload("never")
    assert [r["upload_id"] for r in (yield store.list_uploads())] == ["u2"]


@pytest_twisted.inlineCallbacks
def test_a_suspension_belongs_to_the_account_not_the_name(store: Any) -> Any:
    assert not (yield store.suspend_user("alice", "spam", 1.0))  # no such account
    yield store.create_user("alice", "h", 1.0)
    yield store.create_user("bob", "h", 1.0)
    assert (yield store.suspensions()) == {}
    assert (yield store.suspend_user("alice", "spam", 5.0))
    assert (yield store.suspend_user("alice", "spam \x00 again", 6.0))  # replaces
    assert (yield store.suspensions()) == {"alice": ("spam \x00 again", 6.0)}
    assert (yield store.unsuspend_user("alice"))
    assert not (yield store.unsuspend_user("alice"))
    assert not (yield store.unsuspend_user("nobody"))
    assert (yield store.suspend_user("bob", "", 7.0))
    assert (yield store.suspensions()) == {"bob": ("", 7.0)}
    # bob's account deleted and the name registered again: the new account is free
    yield store.delete_user("bob", "bob@localhost")
    yield store.create_user("bob", "h", 8.0)
    assert (yield store.suspensions()) == {}
    assert not (yield store.unsuspend_user("bob"))


@pytest_twisted.inlineCallbacks
def test_outbox_stats_give_each_queue_its_depth_and_oldest_item(store: Any) -> Any:
    assert (yield store.outbox_stats()) == {}
    old, later = env(ALICE, "bob@b.example", "old"), env(ALICE, "bob@b.example", "later")
    old.ts, later.ts = 1000.5, 3000.0
    yield store.append([old], [("b.example", old)])
    yield store.outbox_enqueue("c.example", [{"type": "join", "ts": 2000.25}])
    yield store.outbox_enqueue("d.example", [{"type": "join"}, {"type": "join", "ts": 1.0}])
    yield store.outbox_enqueue("e.example", [{"type": "join", "ts": "yesterday"}])
    yield store.append([later], [("b.example", later)])
    assert (yield store.outbox_stats()) == {
        "b.example": (2, 1000.5),
        "c.example": (1, 2000.25),
        "d.example": (2, None),  # the oldest row says nothing of its age
        "e.example": (1, None),
    }
    [(seq, _), _] = yield store.outbox_read("b.example", 0, 10)
    yield store.outbox_ack("b.example", seq)
    assert (yield store.outbox_stats())["b.example"] == (1, 3000.0)


@pytest_twisted.inlineCallbacks
def test_outbox_rides_with_the_items(store: Any) -> Any:
    local = env(ALICE, BOB, "local")
    out1, out2 = env(ALICE, "bob@b.example", "to b 1"), env(ALICE, "carol@c.example", "to c")
    yield store.append([local])
    yield store.append([out1, out2], [("b.example", out1), ("c.example", out2)])
    yield store.outbox_enqueue("b.example", [{"type": "join", "n": 1}, {"type": "join", "n": 2}])
    out3 = env(ALICE, "bob@b.example", "to b 2")
    yield store.append([out3], [("b.example", out3)])
    assert (yield store.outbox_counts()) == {"b.example": 4, "c.example": 1}
    rows = yield store.outbox_read("b.example", 0, 10)
    seqs = [s for s, _ in rows]
    assert seqs == sorted(set(seqs))  # in call order, increasing
    shown = [x.body if isinstance(x, Envelope) else x["n"] for _, x in rows]
    assert shown == ["to b 1", 1, 2, "to b 2"]
    assert rows[0][1].pos == out1.pos and rows[0][1].sender == ALICE
    assert [x for _, x in (yield store.outbox_read("b.example", seqs[0], 2))][1] == {
        "type": "join",
        "n": 2,
    }
    assert (yield store.outbox_holds("b.example", out1.pos))
    assert not (yield store.outbox_holds("c.example", out1.pos))
    assert not (yield store.outbox_holds("b.example", local.pos))
    yield store.outbox_ack("b.example", seqs[1])
    assert (yield store.outbox_counts()) == {"b.example": 2, "c.example": 1}
    assert not (yield store.outbox_holds("b.example", out1.pos))
    rest = yield store.outbox_read("b.example", 0, 10)
    assert [s for s, _ in rest] == seqs[2:]
    yield store.outbox_ack("b.example", seqs[-1])
    yield store.outbox_ack("c.example", 2**40)
    assert (yield store.outbox_counts()) == {}
    # sequences are never reused
    out4 = env(ALICE, "bob@b.example", "to b 3")
    yield store.append([out4], [("b.example", out4)])
    [(seq, _)] = yield store.outbox_read("b.example", 0, 10)
    assert seq > seqs[-1]


@pytest_twisted.inlineCallbacks
def test_remote_items_are_deduplicated_by_id(store: Any) -> Any:
    e1 = Envelope("m1", "text", "dave@b.example", ALICE, 1.0, "one")
    e2 = Envelope("m2", "text", "dave@b.example", ALICE, 1.0, "two")
    first = yield store.append_remote([e1])
    again = Envelope("m1", "text", "dave@b.example", ALICE, 1.0, "one")
    out = env(ALICE, "x@c.example", "relay")
    second = yield store.append_remote([again, e2], [("c.example", e2)])
    assert [e.body for e in first] == ["one"] and [e.body for e in second] == ["two"]
    assert e2.pos > e1.pos and again.pos == 0
    assert [(e.body, e.pos) for e in (yield store.read_feed(ALICE, 0, 10))] == [
        ("one", e1.pos),
        ("two", e2.pos),
    ]
    [(_, queued)] = yield store.outbox_read("c.example", 0, 10)
    assert queued.id == "m2"
    # a remote file item records its file too
    f = file_env("dave@b.example", ALICE, "rf", "d" * 64, 5, 3.0)
    assert (yield store.append_remote([f])) == [f]
    assert (yield store.file_info("rf"))["pos"] == f.pos
    assert out.pos == 0


@pytest_twisted.inlineCallbacks
def test_any_unicode_text_round_trips(store: Any) -> Any:
    """A JSON string may hold U+0000 (PostgreSQL's text cannot: it is stored escaped),
    and text that looks like that escape must come back as it went in."""
    odd = ["nul \x00 inside", "\x00", '\x01"\\u0000"', "\x01", "emoji \N{SNOWMAN}\U0001f600"]
    items = [env(ALICE, BOB, body) for body in odd]
    yield store.append(items)
    remote = [
        Envelope(mid, "text", "dave@b.example", ALICE, 1.0, mid)
        for mid in ("id\x00nul", '\x01"id\x00nul"', "\x01")
    ]
    assert (yield store.append_remote(remote)) == remote
    # the same ids again are recognised (de-duplication works on them too)
    again = [Envelope(e.id, "text", e.sender, e.recipient, 1.0, e.body) for e in remote]
    assert (yield store.append_remote(again)) == []
    feed = yield store.read_feed(BOB, 0, 10)
    assert [e.body for e in feed] == odd
    feed = yield store.read_feed(ALICE, items[-1].pos, 10)
    assert [(e.id, e.body) for e in feed] == [(e.id, e.body) for e in remote]
    page = yield store.history(conversation_key(ALICE, BOB), None, None, 9)
    assert [e.body for e in page] == odd
    store.set_ack(ALICE, "dev\x00ice", 7)
    store.set_ack(ALICE, "\x01", 3)
    yield settle(store)
    assert (yield store.get_ack(ALICE, "dev\x00ice")) == 7
    assert (yield store.get_ack(ALICE, "\x01")) == 3
    assert (yield store.get_ack(ALICE, "dev")) == 7  # never seen: the user's highest


@pytest_twisted.inlineCallbacks
def test_items_about_an_item_whose_id_needs_escaping(store: Any) -> Any:
    """Edits, reactions and a delete of items whose ids PostgreSQL stores escaped (a
    peer's ids are any 1-64 characters): counted, shown and wiped like any other's
    (the refs rows of PostgreSQL's store were written unescaped and read escaped: a
    U+0000 failed the commit, and a leading U+0001 was counted and shown nowhere)."""
    from chatproto.relations import ref_meta

    dave = "dave@b.example"
    targets = [
        Envelope(mid, "text", dave, ALICE, 1.0, f"was {n}")
        for n, mid in enumerate(("id\x00nul", "\x01x", '\x01"\\u0000"'))
    ]
    assert (yield store.append_remote(targets)) == targets
    for t in targets:
        edit = Envelope(new_message_id(), "edit", dave, ALICE, 2.0, "now", ref_meta("edit", t.id))
        yield store.append_remote([edit])
        like = ref_meta("reaction", t.id, "+1")
        yield store.append([Envelope(new_message_id(), "reaction", ALICE, dave, 3.0, "", like)])
        assert (yield store.ref_count(t.id, dave)) == 1
        assert (yield store.ref_count(t.id, ALICE)) == 1
    page = yield store.history(conversation_key(ALICE, dave), None, None, 10)
    assert [(e.id, e.body, e.meta["reactions"]) for e in page] == [
        (t.id, "now", {"+1": [ALICE]}) for t in targets
    ]
    gone = Envelope(
        new_message_id(), "delete", dave, ALICE, 4.0, "", ref_meta("delete", targets[0].id)
    )
    yield store.append_remote([gone])
    wiped = yield store.stored_item(targets[0].id)
    assert wiped.body == "" and wiped.meta == {"deleted": True}
    edits = yield store.read_feed(ALICE, targets[-1].pos, 10)
    assert [e.body for e in edits if e.kind == "edit"] == ["", "now", "now"]  # its edit too


@pytest_twisted.inlineCallbacks
def test_events_partners_and_floors(store: Any) -> Any:
    g = "#g@localhost"
    ev = Envelope(new_message_id(), "event", ALICE, g, 1.0, "", {"event": "created"})
    yield store.append([env(ALICE, BOB, "x"), ev, env(CAROL, ALICE, "y"), env(ALICE, g, "z")])
    yield store.append([env(ALICE, ALICE, "note to self")])
    events = yield store.read_events(0, 10)
    assert [(e.kind, e.meta) for e in events] == [("event", {"event": "created"})]
    assert (yield store.read_events(ev.pos, 10)) == []
    assert sorted((yield store.conversation_partners(ALICE))) == [BOB, CAROL]
    assert (yield store.conversation_partners(BOB)) == [ALICE]
    top = yield store.max_pos()
    yield store.create_user("dora", "h", 1.0)
    assert (yield store.user_floor("dora")) == top  # sees only later items
    assert (yield store.user_floor("nobody")) is None
    # group ranges in the feed: (lo, hi]
    feed = yield store.read_feed("dora@localhost", 0, 10, [(g, 0, None)])
    assert [e.pos for e in feed] == [ev.pos, ev.pos + 2]
    feed = yield store.read_feed("dora@localhost", 0, 10, [(g, ev.pos, None)])
    assert [e.body for e in feed] == ["z"]
    feed = yield store.read_feed("dora@localhost", 0, 10, [(g, 0, ev.pos)])
    assert [e.kind for e in feed] == ["event"]


@pytest_twisted.inlineCallbacks
def test_browser_logins_are_kept_per_account_and_expire(store: Any) -> Any:
    yield store.create_user("alice", "h", 1.0)
    yield store.create_user("bob", "h", 1.0)
    yield store.put_session_token("d1", "alice", 0, "laptop \x00", 10.0, 10.0)
    yield store.put_session_token("d2", "alice", 0, "phone", 11.0, 20.0)
    yield store.put_session_token("d3", "bob", 0, "web", 12.0, 15.0)
    yield store.touch_session_token("d1", 30.0)
    yield store.touch_session_token("d3", 5.0)  # never back
    yield store.touch_session_token("gone", 5.0)
    assert (yield store.session_tokens()) == [
        ("d3", "bob", 0, "web", 12.0, 15.0),
        ("d2", "alice", 0, "phone", 11.0, 20.0),
        ("d1", "alice", 0, "laptop \x00", 10.0, 30.0),
    ]
    assert [r[0] for r in (yield store.session_tokens("alice"))] == ["d2", "d1"]
    assert (yield store.session_tokens("carol")) == []
    assert (yield store.session_token("d2")) == ("d2", "alice", 0, "phone", 11.0, 20.0)
    assert (yield store.session_token("nope")) is None
    assert (yield store.expire_session_tokens(16.0)) == 1  # d3
    assert (yield store.delete_session_tokens(["d2", "nope"])) == 1
    assert [r[0] for r in (yield store.session_tokens())] == ["d1"]
    # a login of a deleted account is not read back, and expires with it
    yield store.put_session_token("d4", "bob", 0, "web", 1.0, 100.0)
    yield store.delete_user("bob", "bob@localhost")
    yield store.create_user("bob", "h", 2.0)
    assert [r[0] for r in (yield store.session_tokens())] == ["d1"]
    assert (yield store.session_token("d4")) is None
    assert (yield store.expire_session_tokens(0.0)) == 1  # d4, whose account is gone
    assert (yield store.delete_user_session_tokens("alice")) == 1
    assert (yield store.session_tokens()) == []


@pytest_twisted.inlineCallbacks
def test_admins_belong_to_the_account_and_reports_page_newest_first(store: Any) -> Any:
    assert not (yield store.grant_admin("alice", 1.0))
    yield store.create_user("alice", "h", 1.0)
    yield store.create_user("bob", "h", 1.0)
    assert (yield store.grant_admin("alice", 5.0))
    assert (yield store.grant_admin("bob", 6.0))
    assert (yield store.admins()) == {"alice": 5.0, "bob": 6.0}
    assert (yield store.revoke_admin("alice"))
    assert not (yield store.revoke_admin("alice"))
    yield store.delete_user("bob", "bob@localhost")
    yield store.create_user("bob", "h", 8.0)
    assert (yield store.admins()) == {}
    assert not (yield store.revoke_admin("bob"))
    assert (yield store.reports(None, 10)) == []
    ids = []
    for i in range(5):
        rep = {
            "reporter": ALICE,
            "msg_id": f"m{i}",
            "reason": f"spam \x00 {i}",
            "ts": 100.0 + i,
            "sender": BOB,
            "recipient": ALICE,
            "pos": i + 1,
            "excerpt": f"buy now {i}",
        }
        ids.append((yield store.add_report(rep)))
    assert ids == sorted(ids) and len(set(ids)) == 5
    page = yield store.reports(None, 2)
    assert [r["msg_id"] for r in page] == ["m4", "m3"]
    assert page[0] == {
        "id": ids[4],
        "reporter": ALICE,
        "msg_id": "m4",
        "reason": "spam \x00 4",
        "ts": 104.0,
        "sender": BOB,
        "recipient": ALICE,
        "pos": 5,
        "excerpt": "buy now 4",
    }
    page = yield store.reports(page[-1]["id"], 10)
    assert [r["msg_id"] for r in page] == ["m2", "m1", "m0"]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 4096, 4097])
def test_a_batchs_ids_are_its_random_bytes_in_hex_behind_the_time(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """new_message_ids: the time in milliseconds (11 hex digits), then each id's 12
    random bytes in hex, as new_message_id makes one (what a slice per id gave)."""
    import chatproto.envelope as envelope

    pool = bytes(range(256)) * (n // 20 + 1)
    monkeypatch.setattr(envelope, "_random", lambda k: pool[: 12 * k])
    monkeypatch.setattr(envelope.time, "time_ns", lambda: 1_764_924_000_123_456_789)
    ids = new_message_ids(n)
    rand = pool[: 12 * n].hex()
    assert ids == [f"{1_764_924_000_123:011x}" + rand[24 * i : 24 * i + 24] for i in range(n)]
