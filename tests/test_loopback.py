"""The realm over real loopback TCP, driven by the client library."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto import wire
from chatproto.client import RemoteError, connect
from tests.conftest import drop_sessions, resuming_service, until

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
