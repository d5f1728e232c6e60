"""Replies, reactions, edits and deletes (issue 17) over loopback TCP through the
client library, on SQLite and PostgreSQL; a deleted body is looked for in the raw
SQLite file and in the PostgreSQL row."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto.client import RemoteError, connect
from tests.conftest import until

every_store = pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)


@defer.inlineCallbacks
def _users(addr: str, *names: str) -> Any:
    conns = []
    for name in names:
        inbox: list[dict[str, Any]] = []
        c = yield connect(
            _reactor, addr, name, f"password-{name}", register=True, on_message=inbox.append
        )
        c.inbox = inbox
        yield c.synced
        conns.append(c)
    return conns


def _raw_bytes(path: str) -> bytes:
    """The SQLite database file and whatever journal files lie beside it."""
    data = b""
    for suffix in ("", "-wal", "-journal", "-shm"):
        if os.path.exists(path + suffix):
            data += Path(path + suffix).read_bytes()
    return data


@every_store
@pytest_twisted.inlineCallbacks
def test_reply_react_edit_delete_through_the_client(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield _users(addr, "alice", "bob", "carol")
    m = yield alice.send("bob", "shall we meet at 5?")
    r = yield bob.send("alice", "yes", reply_to=m["msg_id"])
    yield bob.react(m["msg_id"], "👍")
    yield alice.react(r["msg_id"], "🎉")
    e = yield alice.edit(m["msg_id"], "shall we meet at 6?")
    with pytest.raises(RemoteError) as err:
        yield carol.react(m["msg_id"], "👎")
    assert err.value.code == "not_found"
    with pytest.raises(RemoteError) as err:
        yield bob.edit(m["msg_id"], "at 7")
    assert err.value.code == "forbidden"
    yield until(lambda: len(bob.inbox) == 5)
    assert [x["kind"] for x in bob.inbox] == ["text", "text", "reaction", "reaction", "edit"]
    page = yield alice.history("bob")
    assert [(x["body"], x.get("meta")) for x in page] == [
        ("shall we meet at 6?", {"edited": e["ts"], "reactions": {"👍": ["bob@localhost"]}}),
        ("yes", {"reply_to": m["msg_id"], "reactions": {"🎉": ["alice@localhost"]}}),
    ]
    yield bob.delete(r["msg_id"])
    yield bob.react(m["msg_id"], "👍", remove=True)
    page = yield alice.history("bob")
    assert [(x["body"], x.get("meta")) for x in page] == [
        ("shall we meet at 6?", {"edited": e["ts"]}),
        ("", {"deleted": True}),
    ]
    with pytest.raises(RemoteError) as err:
        yield alice.react(r["msg_id"], "👍")
    assert err.value.code == "not_found"
    for c in (alice, bob, carol):
        yield c.close()


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
@pytest_twisted.inlineCallbacks
def test_a_deleted_body_is_gone_from_the_sqlite_file(server: Any) -> Any:
    realm, _, addr = server
    alice, bob = yield _users(addr, "alice", "bob")
    secret = "secret-" + secrets.token_hex(8)
    edited = "edited-" + secrets.token_hex(8)
    kept = "kept-" + secrets.token_hex(8)
    # long enough to take overflow pages too
    long_secret = "long-" + secrets.token_hex(8) + "x" * 9000
    m = yield alice.send("bob", secret)
    yield alice.send("bob", kept)
    big = yield alice.send("bob", long_secret)
    yield alice.edit(m["msg_id"], edited)
    for _ in range(50):  # more pages, so the deleted rows are not alone in theirs
        yield bob.send("alice", "filler " + secrets.token_hex(40))
    yield realm.store._when_idle()
    raw = _raw_bytes(realm.store.path)
    assert secret.encode() in raw and edited.encode() in raw and long_secret[:30].encode() in raw
    yield alice.delete(m["msg_id"])
    yield alice.delete(big["msg_id"])
    raw = _raw_bytes(realm.store.path)
    assert secret.encode() not in raw
    assert edited.encode() not in raw
    assert long_secret[:30].encode() not in raw
    assert kept.encode() in raw  # what was not deleted is still there
    page = yield bob.history("alice", limit=60)
    assert [x["body"] for x in page[:3]] == ["", kept, ""]
    yield alice.close()
    yield bob.close()


@pytest.mark.parametrize("server", ["postgresql"], indirect=True)
@pytest_twisted.inlineCallbacks
def test_a_deleted_body_is_gone_from_the_postgresql_row(server: Any) -> Any:
    import psycopg
    from psycopg import sql

    realm, _, addr = server
    alice, bob = yield _users(addr, "alice", "bob")
    m = yield alice.send("bob", "to be deleted")
    e = yield alice.edit(m["msg_id"], "edited, then deleted")
    yield alice.delete(m["msg_id"])
    cfg = realm.config.storage
    with psycopg.connect(cfg.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(cfg.schema)))
        rows = conn.execute(
            "SELECT id, body, meta, sig FROM items WHERE id = ANY(%s) ORDER BY pos",
            ([m["msg_id"], e["msg_id"]],),
        ).fetchall()
        everywhere = conn.execute(
            "SELECT count(*) FROM items WHERE body LIKE %s OR meta LIKE %s",
            ("%deleted%", "%to be deleted%"),
        ).fetchone()
    assert rows[0] == (m["msg_id"], "", '{"deleted": true}', None)
    assert rows[1][:2] == (e["msg_id"], "")
    assert everywhere == (0,)
    yield alice.close()
    yield bob.close()


@every_store
@pytest_twisted.inlineCallbacks
def test_deleting_a_file_frees_quota_and_bytes_no_one_else_holds(
    server: Any, tmp_path: Path
) -> Any:
    realm, _, addr = server
    alice, bob = yield _users(addr, "alice", "bob")
    data = secrets.token_bytes(5000)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    mine = yield alice.send_file("bob", str(src))
    theirs = yield bob.send_file("alice", str(src))  # the same bytes, held by bob too
    used = yield realm.store.file_usage("alice@localhost")
    assert used == 5000
    blob = realm.files.store.blob_path(mine.get("sha256") or _sha(data))
    yield alice.delete(mine["msg_id"])
    assert (yield realm.store.file_usage("alice@localhost")) == 0
    assert os.path.exists(blob)  # bob's file still holds the bytes
    with pytest.raises(RemoteError) as err:
        yield bob.download(mine["file"], str(tmp_path / "gone"))
    assert err.value.code == "no_such_file"
    yield bob.delete(theirs["msg_id"])
    yield until(lambda: not os.path.exists(blob))
    page = yield alice.history("bob")
    assert [(x["kind"], x["body"], x["meta"]) for x in page] == [
        ("file", "", {"deleted": True}),
        ("file", "", {"deleted": True}),
    ]
    yield alice.close()
    yield bob.close()


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
