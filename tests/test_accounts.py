"""Account lifecycle: deletion, re-registration under the same name, schema migration."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from chatproto.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteDB
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests.conftest import fast_config, make_realm


def _login(realm: Any, clock: Clock, user: str, **kw: Any) -> tuple[Any, Any]:
    proto, t = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1}))
    proto.dataReceived(frame({"type": "login", "user": user, "password": "password1", **kw}))
    clock.advance(0)
    return proto, t


def test_a_recreated_account_does_not_inherit_messages() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("alice", "password1")
    realm.create_user("bob", "password1")
    a, ta = _login(realm, clock, "alice")
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "for the old bob", "id": 1}))
    b, tb = _login(realm, clock, "bob")
    assert [f["body"] for f in frames(tb) if f["type"] == "msg"] == ["for the old bob"]
    deleted = realm.delete_user("BOB")
    assert deleted.result is True
    assert tb.disconnecting  # the deleted account's sessions are closed
    b.connectionLost(None)
    realm.create_user("bob", "password1")
    b2, tb2 = _login(realm, clock, "bob", since=0)
    assert [f for f in frames(tb2) if f["type"] == "msg"] == []
    b2.dataReceived(frame({"type": "history", "with": "alice", "id": "h"}))
    [page] = frames(tb2)
    assert page["messages"] == []
    # The other party keeps the conversation.
    frames(ta)
    a.dataReceived(frame({"type": "history", "with": "bob", "id": "h"}))
    assert [m["body"] for m in frames(ta)[0]["messages"]] == ["for the old bob"]


@pytest_twisted.inlineCallbacks
def test_recreated_account_on_sqlite(tmp_path: Any) -> Any:
    realm = make_realm(fast_config(tmp_path))
    yield realm.startService()
    try:
        yield realm.create_user("alice", "password1")
        yield realm.create_user("bob", "password1")
        from chatproto.envelope import Envelope

        env = Envelope("id-1", "text", "alice@localhost", "bob@localhost", 0.0, "old")
        yield realm.store.append([env])
        yield realm.delete_user("bob")
        yield realm.create_user("bob", "password1")
        floor = yield realm.store.user_floor("bob")
        assert floor == env.pos
        page = yield realm.store.history("alice@localhost bob@localhost", None, None, 10, floor)
        assert page == []
        page = yield realm.store.history("alice@localhost bob@localhost", None, 0, 10, floor)
        assert page == []
        page = yield realm.store.history("alice@localhost bob@localhost", None, None, 10)
        assert [e.body for e in page] == ["old"]
    finally:
        yield realm.stopService()


def test_migration_from_v1_keeps_accounts(tmp_path: Any) -> None:
    path = str(tmp_path / "old.sqlite3")
    db = SQLiteDB(path)
    db.conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for stmt in MIGRATIONS[0].split(";"):
        if stmt.strip():
            db.conn.execute(stmt)
    db.conn.execute("INSERT INTO schema_version VALUES (1)")
    db.conn.execute("INSERT INTO users VALUES ('alice', 'hash', 0.0)")
    db.close()
    db = SQLiteDB(path)
    assert db.migrate() == 1
    assert db.version() == SCHEMA_VERSION
    assert db.password_hash("alice") == "hash"
    assert db.user_floor("alice") == 0
    assert db.migrate() == SCHEMA_VERSION  # idempotent
    db.close()


@pytest_twisted.inlineCallbacks
def test_shutdown_closes_the_store_even_if_a_connection_fails_to_close(tmp_path: Any) -> Any:
    """A mind whose disconnect raises is logged and skipped: every other session is
    still logged out and the store still closed (or the process would hang at exit)."""
    realm = make_realm(fast_config(tmp_path))
    yield realm.startService()
    yield realm.create_user("alice", "password1")
    yield realm.create_user("bob", "password1")

    class Mind:
        def __init__(self, fail: bool) -> None:
            self.fail, self.closed = fail, False

        def deliver(self, envelope: Any) -> None:
            pass

        def synced(self, pos: int) -> None:
            pass

        def notify(self, notice: Any) -> None:
            pass

        def wait_writable(self) -> None:
            return None

        def disconnect(self, code: str, message: str) -> None:
            if self.fail:
                raise RuntimeError("transport already gone")
            self.closed = True

    broken, fine = Mind(True), Mind(False)
    yield realm.login("alice", "password1", broken, "d1")
    yield realm.login("bob", "password1", fine, "d1")
    yield realm.stopService()
    assert fine.closed
    assert not realm.sessions_of("alice@localhost")
    assert not realm.sessions_of("bob@localhost")
