"""The realm over real loopback TCP, driven by the client library."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from chatproto import wire
from chatproto.client import RemoteError, connect
from chatproto.protocol import ClientFactory
from tests.conftest import (
    drop_sessions,
    fast_config,
    make_realm,
    raw_client,
    resuming_service,
    until,
)
from tests.test_store import hold_next_commit

#: The tests that run on every store in the default run (the others on the test store:
#: CHATPROTO_TEST_STORE, SQLite by default).
every_store = pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)


@every_store
@pytest_twisted.inlineCallbacks
def test_two_users_exchange_messages_both_ways(server: Any) -> Any:
    _realm, _, addr = server
    got_a: list[dict[str, Any]] = []
    got_b: list[dict[str, Any]] = []
    a = yield connect(_reactor, addr, "alice", "password-a", register=True, on_message=got_a.append)
    b = yield connect(_reactor, addr, "bob", "password-b", register=True, on_message=got_b.append)
    yield defer.gatherResults([a.synced, b.synced])
    r1 = yield a.send("bob", "hi bob")
    r2 = yield b.send("alice@localhost", "hi alice ✓")
    yield until(lambda: len(got_a) == 2 and len(got_b) == 2)
    assert [m["body"] for m in got_b] == ["hi bob", "hi alice ✓"]
    assert got_a == got_b  # each side sees the whole conversation, in one order
    assert [m["pos"] for m in got_a] == [r1["pos"], r2["pos"]]
    assert got_b[0]["from"] == "alice@localhost" and got_b[1]["from"] == "bob@localhost"
    history = yield b.history("alice")
    assert [m["body"] for m in history] == ["hi bob", "hi alice ✓"]
    users = yield a.who()
    assert {u["user"] for u in users} == {"alice@localhost", "bob@localhost"}
    yield a.close()
    yield b.close()


@every_store
@pytest_twisted.inlineCallbacks
def test_offline_backlog_in_order_at_login(server: Any) -> Any:
    _, _, addr = server
    a = yield connect(_reactor, addr, "alice", "password-a", register=True)
    b = yield connect(_reactor, addr, "bob", "password-b", register=True)
    yield b.close()
    for i in range(30):
        yield a.send("bob", f"offline {i}")
    got: list[dict[str, Any]] = []
    b = yield connect(_reactor, addr, "bob", "password-b", on_message=got.append)
    synced = yield b.synced
    assert [m["body"] for m in got] == [f"offline {i}" for i in range(30)]
    assert synced == got[-1]["pos"]
    yield b.close()
    # Acknowledged: a later login has nothing new.
    again: list[dict[str, Any]] = []
    b = yield connect(_reactor, addr, "bob", "password-b", on_message=again.append)
    yield b.synced
    assert again == []
    yield b.close()
    yield a.close()


@every_store
@pytest_twisted.inlineCallbacks
def test_resume_after_dropped_connections_no_loss_no_duplicates(server: Any) -> Any:
    _realm, factory, addr = server
    a = yield connect(_reactor, addr, "alice", "password-a", register=True)
    yield connect(_reactor, addr, "bob", "password-b", register=True).addCallback(
        lambda c: c.close()
    )
    got: list[dict[str, Any]] = []
    svc = resuming_service(addr, "bob", "password-b", device="laptop", on_message=got.append)
    svc.startService()
    try:
        yield svc.whenReady()
        total = 300
        for i in range(total):
            d = a.send("bob", f"m{i}")
            if i % 60 == 30:
                # Drop bob's connection mid-stream, from the server side.
                yield d
                drop_sessions(factory, "bob@localhost")
        yield d
        yield until(lambda: len(got) >= total, timeout=20)
        bodies = [m["body"] for m in got]
        assert bodies == [f"m{i}" for i in range(total)]
        positions = [m["pos"] for m in got]
        assert positions == sorted(set(positions))
    finally:
        yield svc.stopService()
        yield a.close()


@pytest_twisted.inlineCallbacks
def test_acks_of_at_most_max_devices_per_user_are_kept(tmp_path: Any, store_backend: str) -> Any:
    """A user logging in under ever new device names (the web page makes up one per
    browser) leaves the acks of at most ``max_devices_per_user`` devices: the one with
    the lowest ack is forgotten, and logging in with it again starts after the user's
    highest ack (a device never seen), not where it had left off."""
    cfg = fast_config(tmp_path, max_devices_per_user=4)
    realm = make_realm(cfg)
    yield realm.startService()
    port = _reactor.listenTCP(0, ClientFactory(realm), interface="127.0.0.1")
    addr = f"tcp:127.0.0.1:{port.getHost().port}"
    try:
        bob = yield connect(_reactor, addr, "bob", "password-b", register=True)
        yield connect(
            _reactor, addr, "alice", "password-a", register=True, device="d0"
        ).addCallback(lambda c: c.close())
        for k in range(10):
            yield bob.send("alice", f"m{k}")
            got: list[dict[str, Any]] = []
            alice = yield connect(
                _reactor, addr, "alice", "password-a", device=f"d{k}", on_message=got.append
            )
            yield alice.synced
            # each device is new: it starts after the previous one's ack
            assert [m["body"] for m in got] == [f"m{k}"]
            yield alice.close()  # acknowledges m{k}
        yield bob.send("alice", "barrier")  # committed after every ack before it
        if store_backend == "sqlite":
            query = "SELECT device FROM acks WHERE user = ?"
        else:
            query = "SELECT device FROM acks WHERE addr = %s"
        stored = yield realm.store._read(
            lambda db: sorted(r[0] for r in db.conn.execute(query, ("alice@localhost",)))
        )
        assert stored == ["d6", "d7", "d8", "d9"]
        # A kept device resumes after its own ack; a forgotten one after the highest.
        for device, expected in (("d7", ["m8", "m9", "barrier"]), ("d2", ["barrier"])):
            got = []
            alice = yield connect(
                _reactor,
                addr,
                "alice",
                "password-a",
                device=device,
                on_message=got.append,
                ack=False,
            )
            synced = yield alice.synced
            assert [m["body"] for m in got] == expected, device
            assert synced == got[-1]["pos"]
            yield alice.close()
        yield bob.close()
    finally:
        yield port.stopListening()
        yield realm.stopService()


@pytest_twisted.inlineCallbacks
def test_wrong_password_and_unknown_user_rejected(server: Any) -> Any:
    _, _, addr = server
    a = yield connect(_reactor, addr, "alice", "password-a", register=True)
    for user, pw in (("alice", "not-her-password"), ("mallory", "password-a")):
        with pytest.raises(RemoteError) as e:
            yield connect(_reactor, addr, user, pw)
        assert e.value.code == "auth_failed"
    yield a.close()


@pytest_twisted.inlineCallbacks
def test_impersonation_impossible(server: Any) -> Any:
    """A client-supplied sender is ignored: the realm sets 'from' from the session."""
    _, _, addr = server
    got: list[dict[str, Any]] = []
    mallory = yield connect(_reactor, addr, "mallory", "password-m", register=True)
    bob = yield connect(_reactor, addr, "bob", "password-b", register=True, on_message=got.append)
    yield bob.synced
    # Raw frames: forge every sender-like field the seed protocol trusted.
    forged = wire.encode(
        {
            "type": "send",
            "id": "f",
            "to": "bob",
            "body": "I am alice",
            "from": "alice@localhost",
            "sender": "alice",
            "user": "alice",
        }
    )
    result = defer.Deferred()
    mallory.protocol._pending["f"] = result  # type: ignore[index]
    mallory.protocol.transport.write(struct.pack("!I", len(forged)) + forged)
    yield result
    yield until(lambda: len(got) == 1)
    assert got[0]["from"] == "mallory@localhost" and got[0]["body"] == "I am alice"
    # And logging in as someone else needs their password.
    with pytest.raises(RemoteError):
        yield connect(_reactor, addr, "bob", "password-m")
    yield mallory.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_unsupported_version_over_tcp(server: Any) -> Any:
    _, _, addr = server
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.protocol import Factory

    from chatproto.client import ClientProtocol

    proto = yield clientFromString(_reactor, addr).connect(
        Factory.forProtocol(lambda: ClientProtocol(_reactor))
    )
    with pytest.raises(RemoteError) as e:
        yield proto.request("hello", version=2)
    assert e.value.code == "unsupported_version" and e.value.extra["supported"] == [1]
    yield proto.closed_d  # the server closes the connection


@pytest_twisted.inlineCallbacks
def test_service_send_survives_a_lost_result_without_duplicates(server: Any) -> Any:
    """The connection drops after the send is stored but before its result arrives; the
    retry (same nonce) on the next connection gets the first result, stored once."""
    realm, factory, addr = server
    yield connect(_reactor, addr, "bob", "password-b", register=True).addCallback(
        lambda c: c.close()
    )
    svc = resuming_service(addr, "alice", "password-a")
    yield connect(_reactor, addr, "alice", "password-a", register=True).addCallback(
        lambda c: c.close()
    )
    dropped: list[int] = []

    def drop_alice(env: Any) -> None:
        if env.body == "exactly once" and not dropped:
            dropped.append(env.pos)
            drop_sessions(factory, "alice@localhost")

    realm.observers.append(drop_alice)
    svc.startService()
    try:
        result = yield svc.send("bob", "exactly once").addTimeout(20, _reactor)
        assert dropped == [result["pos"]]
        stored = yield realm.store.history("alice@localhost bob@localhost", None, None, 10)
        assert [e.body for e in stored] == ["exactly once"]
    finally:
        realm.observers.remove(drop_alice)
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_pipelined_sends_of_one_pair_are_stored_in_order_over_tcp(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """A client that sends without waiting for each answer: its sends reach the realm
    in few reads and the SQLite store takes them as pair runs (the pair bound once
    per statement: SQLiteDB._insert_pair_run); every message is stored, in the order
    sent, with its own body, and bob gets them so, live and in history."""
    from chatproto.store.sqlite import SQLiteDB, SQLiteStore

    runs: list[int] = []
    insert = SQLiteDB._insert_pair_run

    def counted(self: SQLiteDB, run: Any) -> int:
        runs.append(len(run))
        return insert(self, run)

    monkeypatch.setattr(SQLiteDB, "_insert_pair_run", counted)
    realm, _, addr = server
    got: list[dict[str, Any]] = []
    a = yield connect(_reactor, addr, "alice", "password-a", register=True)
    b = yield connect(_reactor, addr, "bob", "password-b", register=True, on_message=got.append)
    yield defer.gatherResults([a.synced, b.synced])
    bodies = [f"pipelined {i} ✓" for i in range(300)]
    results = yield defer.gatherResults([a.send("bob", body) for body in bodies])
    yield until(lambda: len(got) == len(bodies))
    if isinstance(realm.store, SQLiteStore):  # (some went in as pair runs)
        assert runs and sum(runs) <= len(bodies)
    assert [m["body"] for m in got] == bodies
    assert [m["pos"] for m in got] == [r["pos"] for r in results]
    assert [m["pos"] for m in got] == sorted(m["pos"] for m in got)
    history = yield b.history("alice", limit=200)
    assert [m["body"] for m in history] == bodies[-200:]
    yield a.close()
    yield b.close()


@every_store
@pytest_twisted.inlineCallbacks
def test_an_ack_read_as_the_account_is_deleted_goes_with_the_account(server: Any) -> Any:
    """Over TCP: bob's ack waits for a group commit (one runs, held on the writer
    thread) when the admin deletes bob, so both go in the next commit.  The ack was
    written after the account's rows were deleted and outlived the account."""
    realm, _, addr = server
    alice = yield connect(_reactor, addr, "alice", "password-a", register=True)
    reg = yield raw_client(addr)
    reg.send({"type": "register", "id": "reg", "user": "bob", "password": "password-b"})
    assert (yield reg.reply("reg"))["type"] == "result"
    bob = yield raw_client(addr, ("bob", "password-b"), device="phone")
    sent = yield alice.send("bob", "first")
    yield until(lambda: any(isinstance(f, dict) and f.get("type") == "msg" for f in bob.frames))
    gate, entered, _ = hold_next_commit(realm.store)
    busy = alice.send("bob", "busy")
    assert (yield deferToThread(entered.wait, 30))  # a commit runs, held
    bob.send({"type": "ack", "pos": sent["pos"]})  # waits for the next commit...
    acked: list[int] = []

    @defer.inlineCallbacks
    def read_ack() -> Any:
        acked.append((yield realm.store.get_ack("bob@localhost", "phone")))

    for _ in range(200):  # (the realm has read it: a waiting ack counts)
        yield read_ack()
        if acked[-1] == sent["pos"]:
            break
    assert acked[-1] == sent["pos"]
    deleted = realm.admin.delete_user("bob")  # ... and so does the deletion
    gate.set()
    yield busy
    _, existed, _ = yield deleted
    assert existed
    assert (yield realm.store.get_ack("bob@localhost", "phone")) == 0
    yield alice.close()


@every_store
@pytest_twisted.inlineCallbacks
def test_one_message_in_flight_costs_about_one_commit_each(server: Any) -> Any:
    """A conversation one message at a time, the recipient acking each delivery: the
    acks ride the next message's group commit (MARK_DELAY) instead of a commit and
    an fsync of their own per message (two commits per message before)."""
    realm, _, addr = server
    got: list[dict[str, Any]] = []
    a = yield connect(_reactor, addr, "alice", "password-a", register=True)
    b = yield connect(_reactor, addr, "bob", "password-b", register=True, on_message=got.append)
    yield defer.gatherResults([a.synced, b.synced])
    yield until(lambda: not realm.store._has_pending() and not realm.store._jobs)
    commits = realm.store.commits
    realm.store.mark_delay = 10.0  # (a loaded machine's pauses must not decide it)
    n = 20
    for k in range(n):
        yield a.send("bob", f"m{k}")
        yield until(lambda k=k: len(got) == k + 1)
    spent = realm.store.commits - commits
    assert spent <= n * 1.5, spent
    realm.store.mark_delay = 0.05
    yield a.close()
    yield b.close()
    # the last ack was committed (the connections closed: nothing else to ride)
    yield until(lambda: not realm.store._has_pending() and not realm.store._jobs)
    assert (yield realm.store.get_ack("bob@localhost", "default")) == got[-1]["pos"]
