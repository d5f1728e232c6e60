"""``chatrealmctl migrate-store``: a SQLite realm copied into PostgreSQL, over loopback.

A realm on SQLite gets users, DMs, a group with messages and events, a file, an
unfinished upload, an item queued for another realm and read positions; it stops;
``chatrealmctl migrate-store`` copies it into a new PostgreSQL schema; a realm started
there serves the same users, histories, file and positions, and goes on numbering
after them.  Each test on schemas of its own; skipped without PostgreSQL unless CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto import ctl
from chatproto.client import connect
from chatproto.envelope import Envelope, new_message_id
from chatproto.protocol import ClientFactory
from chatproto.store.migrate import COPIED, NOT_COPIED
from chatproto.store.postgresql import PostgresDB
from chatproto.store.sqlite import SQLiteDB
from tests.conftest import fast_config, make_realm, pg_schema, postgresql_or_skip, until

PASSWORD = "correct horse"


def _conf(tmp_path: Path, data: Path, schema: str, dsn: str) -> str:
    path = tmp_path / "pg.toml"
    path.write_text(
        "[realm]\n"
        f"data_dir = {json.dumps(str(data))}\n"
        "[auth]\n"
        "argon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n"
        "[storage]\n"
        'backend = "postgresql"\n'
        f"dsn = {json.dumps(dsn)}\n"
        f"schema = {json.dumps(schema)}\n"
    )
    return str(path)


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    status = ctl.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def _serve(realm: Any) -> tuple[Any, str]:
    port = _reactor.listenTCP(0, ClientFactory(realm), interface="127.0.0.1")
    return port, f"tcp:127.0.0.1:{port.getHost().port}"


@pytest_twisted.inlineCallbacks
def test_a_sqlite_realm_moves_to_postgresql_intact(tmp_path: Path, capsys: Any) -> Any:
    dsn = postgresql_or_skip()
    cfg = fast_config(tmp_path, store="sqlite", send_burst=10_000, send_rate=10_000.0)
    data = Path(cfg.data_dir)

    # 1. a realm on SQLite, with a bit of everything --------------------------------
    realm = make_realm(cfg)
    yield realm.startService()
    port, addr = _serve(realm)
    try:
        conns = {}
        for name in ("alice", "bob", "carol"):
            conns[name] = yield connect(_reactor, addr, name, PASSWORD, register=True)
        alice, carol = conns["alice"], conns["carol"]
        yield conns["bob"].close()
        got: list[dict[str, Any]] = []
        bob = yield connect(_reactor, addr, "bob", PASSWORD, device="phone", on_message=got.append)
        yield bob.synced
        for i in range(5):
            yield alice.send("bob", f"seen {i}")
        yield alice.create_group("#dev", history="all", topic="the dev group")
        yield bob.join("#dev")
        yield carol.join("#dev")
        yield carol.send("#dev", "hello dev")
        src = tmp_path / "doc.bin"
        src.write_bytes(os.urandom(100_000))
        sent_file = yield alice.send_file("bob", str(src))
        yield until(lambda: any(m.get("kind") == "file" for m in got))
        yield until(lambda: bob.last_pos >= sent_file["pos"])
        yield bob.close()  # bob's phone acknowledged everything up to here
        acked = got[-1]["pos"]
        unread = []
        for i in range(3):
            unread.append((yield alice.send("bob", f"unread {i}")))
        yield carol.send("#dev", "while bob is away")
        # an unfinished upload, and an item queued for another realm
        blob = os.urandom(50_000)
        up = yield realm.files.offer(
            "carol@localhost", "alice", "part.bin", len(blob), hashlib.sha256(blob).hexdigest()
        )
        yield realm.files.write("carol@localhost", up.upload_id, 0, blob[:20_000])
        remote = Envelope(new_message_id(), "text", "alice@localhost", "#x@b.example", 1.0, "q")
        remote.sig = {"key": "0123456789abcdef", "ed25519": "A" * 86 + "=="}  # signed
        yield realm.store.append([remote], [("b.example", remote)])
        b_keys = [{"id": "0123456789abcdef", "ed25519": "B" * 43 + "="}]
        yield realm.store.set_peer_keys("b.example", b_keys)  # as b.example announced
        history_before = yield alice.history("bob", limit=100)
        group_before = yield carol.history("#dev", limit=100)
        top_before = yield realm.store.max_pos()
        yield alice.close()
        yield carol.close()
    finally:
        yield port.stopListening()
        yield realm.stopService()
    old = SQLiteDB(cfg.database_path)
    id_key = old.conn.execute("SELECT value FROM settings WHERE key = 'id_key'").fetchone()[0]
    while old.index_search(2000):  # SQLite's search index is complete (search_upto: top)
        pass
    assert old.search_upto() == top_before
    # a queue numbered far past the positions (on PostgreSQL, rows are numbered from
    # their items' positions: what is queued there must come after it)
    far = (top_before + 5) * 1_000_000 + 3
    old.conn.execute("UPDATE outbox SET seq = ?", (far,))
    old.close()

    # 2. chatrealmctl migrate-store ------------------------------------------------
    schema = pg_schema()
    conf = _conf(tmp_path, data, schema, dsn)
    status, out, err = run(capsys, "--config", conf, "migrate-store")
    assert (status, err) == (0, ""), err
    assert "  items: " in out and "copied " in out and "3 users" in out
    assert "1 queued for other realms, 1 files" in out
    # twice: the target is no longer empty, nothing is written
    status, _, err = run(capsys, "--config", conf, "migrate-store")
    assert status == 1 and "already holds a realm" in err
    assert run(capsys, "--config", conf, "list-users")[1] == (
        "alice@localhost\nbob@localhost\ncarol@localhost\n"
    )
    pg = PostgresDB(dsn, schema, create=False)
    try:
        assert pg.conn.execute("SELECT value FROM settings WHERE key = 'id_key'").fetchone() == (
            id_key,
        )
        # PostgreSQL's search index is its own: nothing of it is there yet (SQLite's
        # search_upto, copied with the settings, made every item unfindable)
        assert pg.search_upto() == 0
        found = pg.search(["seen"], [("user", "bob@localhost", 0)], None, 10)
        assert [e.body for e in found] == [f"seen {i}" for i in (4, 3, 2, 1, 0)]
        assert pg.index_search(2000) > 0
        found = pg.search(["seen"], [("user", "bob@localhost", 0)], None, 10)
        assert [e.body for e in found] == [f"seen {i}" for i in (4, 3, 2, 1, 0)]
    finally:
        pg.close()

    # 3. a realm on PostgreSQL serves the same realm --------------------------------
    cfg_pg = ctl.load_config(ctl.build_parser().parse_args(["--config", conf, "list-users"]))
    realm = make_realm(cfg_pg)
    yield realm.startService()
    port, addr = _serve(realm)
    try:
        assert realm.store.path.startswith("postgresql://")
        assert (yield realm.store.max_pos()) == top_before
        assert (yield realm.store.outbox_counts()) == {"b.example": 1}
        ((seq, queued),) = yield realm.store.outbox_read("b.example", 0, 10)
        assert seq == far
        assert queued.sig == remote.sig  # the signature goes with the item
        later = Envelope(new_message_id(), "text", "alice@localhost", "#x@b.example", 2.0, "r")
        yield realm.store.append([later], [("b.example", later)])
        rows = yield realm.store.outbox_read("b.example", 0, 10)
        assert [e.id for _, e in rows] == [remote.id, later.id]
        assert rows[1][0] > far and later.pos > top_before + 5
        assert (yield realm.store.peer_keys()) == {"b.example": b_keys}
        # bob's phone resumes after its ack: only what it had not seen, same positions
        got2: list[dict[str, Any]] = []
        bob = yield connect(_reactor, addr, "bob", PASSWORD, device="phone", on_message=got2.append)
        synced = yield bob.synced
        assert [m["body"] for m in got2] == [
            "unread 0",
            "unread 1",
            "unread 2",
            "while bob is away",
        ]
        assert [m["pos"] for m in got2[:3]] == [u["pos"] for u in unread]
        assert all(m["pos"] > acked for m in got2) and synced == got2[-1]["pos"]
        # histories are the same, item for item
        alice = yield connect(_reactor, addr, "alice", PASSWORD)
        assert (yield alice.history("bob", limit=100)) == history_before
        carol = yield connect(_reactor, addr, "carol", PASSWORD)
        group_after = yield carol.history("#dev", limit=100)
        assert group_after[: len(group_before)] == group_before
        info = yield carol.group_info("#dev")
        assert info["topic"] == "the dev group"
        assert {m["user"] for m in (yield carol.members("#dev"))} == {
            "alice@localhost",
            "bob@localhost",
            "carol@localhost",
        }
        # the file (record copied, bytes where they were) downloads
        dst = tmp_path / "doc.down"
        yield bob.download(sent_file["file"], str(dst))
        assert dst.read_bytes() == src.read_bytes()
        # the unfinished upload resumes
        again = yield realm.files.status("carol@localhost", up.upload_id)
        assert again.offset == 20_000
        yield realm.files.write("carol@localhost", up.upload_id, 20_000, blob[20_000:])
        yield realm.files.finish("carol@localhost", up.upload_id)
        # new items go on after the old positions; a wrong password is still wrong
        r = yield alice.send("bob", "on postgresql")
        assert r["pos"] > top_before
        yield until(lambda: got2[-1]["body"] == "on postgresql")
        with pytest.raises(Exception, match="auth"):
            yield connect(_reactor, addr, "bob", "wrong password")
        for c in (alice, bob, carol):
            yield c.close()
    finally:
        yield port.stopListening()
        yield realm.stopService()


def test_every_sqlite_table_is_copied_or_deliberately_left(tmp_path: Path) -> None:
    """A table added to the SQLite schema must be added to migrate-store too."""
    db = SQLiteDB(str(tmp_path / "r.sqlite3"))
    try:
        db.migrate()
        tables = {
            r[0]
            for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_")
        }
    finally:
        db.close()
    assert tables == set(COPIED) | (NOT_COPIED - {"sqlite_sequence"})


def test_migrate_store_errors(tmp_path: Path, capsys: Any) -> None:
    dsn = postgresql_or_skip()
    data = tmp_path / "data"
    conf = _conf(tmp_path, data, pg_schema(), dsn)
    status, _, err = run(capsys, "--config", conf, "migrate-store")
    assert status == 1 and err.startswith("chatrealmctl: no SQLite database at ")
    plain = tmp_path / "plain.toml"
    plain.write_text(f"[realm]\ndata_dir = {json.dumps(str(data))}\n")
    status, _, err = run(capsys, "--config", str(plain), "migrate-store")
    assert status == 2 and 'set [storage] backend = "postgresql"' in err
    # a source with a table this chatproto does not know: refused, nothing written
    data.mkdir()
    SQLiteDB(str(data / "realm.sqlite3")).migrate()
    con = sqlite3.connect(str(data / "realm.sqlite3"))
    con.execute("CREATE TABLE later_feature (x INTEGER)")
    con.commit()
    con.close()
    status, _, err = run(capsys, "--config", conf, "migrate-store")
    assert status == 1 and "tables this chatproto cannot copy: later_feature" in err


def test_refs_to_ids_stored_escaped_are_copied_escaped(tmp_path: Path) -> None:
    """The items about an item whose id PostgreSQL stores escaped (a peer's id with a
    leading U+0001) still find it once copied: refs rows are copied escaped too."""
    from chatproto.envelope import conversation_key
    from chatproto.relations import ref_meta
    from chatproto.store.migrate import copy_sqlite_to_postgresql

    dave, alice = "dave@b.example", "alice@localhost"
    src = SQLiteDB(str(tmp_path / "realm.sqlite3"))
    src.migrate()
    target = Envelope("\x01x", "text", dave, alice, 1.0, "was")
    src.append_batch([[target]], {}, remote=[True])
    edit = Envelope(new_message_id(), "edit", dave, alice, 2.0, "now", ref_meta("edit", target.id))
    src.append_batch([[edit]], {}, remote=[True])
    pg = PostgresDB(postgresql_or_skip(), pg_schema())
    try:
        copy_sqlite_to_postgresql(src, pg)
        assert pg.ref_count(target.id, dave) == 1
        page = pg.history(conversation_key(alice, dave), None, None, 10)
        assert [(e.id, e.body) for e in page] == [(target.id, "now")]
    finally:
        pg.close()
        src.close()
