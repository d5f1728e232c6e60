"""A deleted account's name, registered again, starts with nothing (issue 14, item 2).

Found over the wire: after ``chatrealmctl deluser alice`` and a new registration of
``alice``, the newcomer owned the old alice's invite-only group (read its history,
posted, kicked, deleted it) and downloaded files sent to the old alice.  These tests
replay that over loopback TCP, deleting through the realm API (the realm running) and
through ``chatrealmctl``'s code path against the database (the realm stopped), and
check everything the old account held: memberships, roles, invites, bans, files,
private history, backlog, send nonces and presence partners -- on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto import config as configmod
from chatproto import ctl
from chatproto.client import RemoteError, connect
from chatproto.protocol import ClientFactory
from tests.conftest import make_realm, pg_schema, postgresql_or_skip, until

SECRET, CLUB, PUB = "#secret@localhost", "#club@localhost", "#pub@localhost"
ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"


class Running:
    """A realm on a config file, listening on 127.0.0.1 port 0 (restartable)."""

    def __init__(self, conf: str) -> None:
        self.conf = conf
        self.realm: Any = None
        self.port: Any = None
        self.factory: Any = None

    @defer.inlineCallbacks
    def start(self) -> Any:
        cfg = configmod.load(self.conf)
        cfg.limits.send_burst = 10_000
        cfg.limits.send_rate = 10_000.0
        cfg.check()
        self.realm = make_realm(cfg)
        yield self.realm.startService()
        self.factory = ClientFactory(self.realm)
        self.port = _reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addr = f"tcp:127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for proto in list(self.factory.connections):
            proto.transport.abortConnection()
        yield self.port.stopListening()
        yield self.realm.stopService()


@pytest.fixture(params=["sqlite", "postgresql"])
def conf(request: Any, tmp_path: Path) -> str:
    """The realm's config file, on each store (``chatrealmctl`` works on both)."""
    path = tmp_path / "realm.toml"
    storage = ""
    if request.param == "postgresql":
        dsn, schema = postgresql_or_skip(), pg_schema()
        storage = f'[storage]\nbackend = "postgresql"\ndsn = {json.dumps(dsn)}\n'
        storage += f"schema = {json.dumps(schema)}\n"
    path.write_text(
        "[realm]\n"
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n"
        "[auth]\n"
        "argon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n" + storage
    )
    return str(path)


@pytest.fixture
def running(conf: str) -> Any:
    r = Running(conf)
    pytest_twisted.blockon(r.start())
    yield r
    pytest_twisted.blockon(r.stop())


@defer.inlineCallbacks
def login(addr: str, name: str, register: bool = False, **kw: Any) -> Any:
    msgs: list[dict[str, Any]] = []
    presence: list[dict[str, Any]] = []
    conn = yield connect(
        _reactor,
        addr,
        name,
        f"password-{name}",
        register=register,
        on_message=msgs.append,
        on_presence=presence.append,
        **kw,
    )
    yield conn.synced
    conn.msgs = msgs
    conn.presence = presence
    return conn


def _file(tmp: Path, name: str, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


@defer.inlineCallbacks
def old_alice_world(addr: str, tmp: Path) -> Any:
    """The old alice: owner of invite-only #secret (with history and a file), invited
    to bob's #club, banned from carol's #pub; private messages and a file from bob,
    a backlog waiting.  Returns bob (still online) and the file ids."""
    alice = yield login(addr, "alice", register=True)
    bob = yield login(addr, "bob", register=True)
    carol = yield login(addr, "carol", register=True)
    yield alice.create_group("secret", visibility="invite", history="all")
    yield alice.invite("secret", "bob")
    yield bob.join("secret")
    yield alice.send("#secret", "old secret")
    yield bob.send("#secret", "bob's secret")
    group_file = yield bob.send_file("#secret", _file(tmp, "plans.txt", b"group plans"))
    yield bob.create_group("club", visibility="invite")
    yield bob.invite("club", "alice")
    yield carol.create_group("pub")
    yield alice.join("pub")
    yield carol.ban("pub", "alice")
    dm_file = yield bob.send_file("alice", _file(tmp, "diary.txt", b"for the old alice"))
    yield bob.send("alice", "a private word for the old alice")
    yield alice.send("bob", "old alice to bob", nonce="nonce-1")
    yield alice.close()
    yield bob.send("alice", "backlog for the old alice")
    yield carol.close()
    return bob, dm_file["file"], group_file["file"]


@defer.inlineCallbacks
def refused(d: Any, code: str) -> Any:
    with pytest.raises(RemoteError) as e:
        yield d
    assert e.value.code == code, e.value


@defer.inlineCallbacks
def check_new_alice_starts_with_nothing(addr: str, tmp: Path, bob: Any, files: Any) -> Any:
    dm_file, group_file = files
    alice = yield login(addr, "alice", register=True, since=0)
    # a round trip: presence frames sent at sync have arrived before its answer
    assert (yield alice.history("bob")) == []
    assert alice.msgs == []  # no backlog, not even from position 0
    assert [p for p in alice.presence if p["user"] == BOB] == []  # not bob's DM partner
    # the old alice's group: no history, no posting, no owner's powers
    yield refused(alice.history("#secret"), "not_member")
    yield refused(alice.send("#secret", "mine now"), "not_member")
    yield refused(alice.kick("secret", "bob"), "not_member")
    yield refused(alice.delete_group("secret"), "not_member")
    yield refused(alice.set_topic("secret", "taken"), "not_member")
    yield refused(alice.members("secret"), "not_member")
    yield refused(alice.join("secret"), "not_invited")
    yield refused(alice.join("club"), "not_invited")  # the old invite ended
    # files: neither the one sent to the old alice nor the group's
    yield refused(alice.download(dm_file, str(tmp / "dm.down")), "no_such_file")
    yield refused(alice.download(group_file, str(tmp / "group.down")), "no_such_file")
    assert not (tmp / "dm.down").exists() and not (tmp / "group.down").exists()
    # the old alice's send nonce is not hers: the message is stored and delivered
    r = yield alice.send("bob", "hello from the new alice", nonce="nonce-1")
    yield until(lambda: any(m.get("msg_id") == r["msg_id"] for m in bob.msgs))
    # a ban of the old account is not hers either
    yield alice.join("pub")
    # the group goes on without the old alice: bob was promoted (he was the only
    # other member) and still reads its whole history
    members = yield bob.members("secret")
    assert [(m["user"], m["role"]) for m in members] == [(BOB, "owner")]
    texts = [m["body"] for m in (yield bob.history("#secret")) if m["kind"] == "text"]
    assert texts == ["old secret", "bob's secret"]
    yield alice.close()


def membership_end(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        m["meta"]
        for m in msgs
        if m["to"] == SECRET and m["kind"] == "event" and m["meta"]["event"] in ("left", "role")
    ]


#: bob, the only other member, succeeds the old alice as owner
ENDED = [{"event": "left", "user": ALICE, "reason": "account deleted", "successor": BOB}]


@pytest_twisted.inlineCallbacks
def test_deleted_through_the_realm_the_new_alice_inherits_nothing(
    running: Running, tmp_path: Path
) -> Any:
    bob, dm_file, group_file = yield old_alice_world(running.addr, tmp_path)
    bob.msgs.clear()
    assert (yield running.realm.delete_user("alice")) is True
    # bob, online, sees the membership end as it happens
    yield until(lambda: membership_end(bob.msgs) == ENDED)
    yield check_new_alice_starts_with_nothing(running.addr, tmp_path, bob, (dm_file, group_file))
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_deleted_with_chatrealmctl_the_new_alice_inherits_nothing(
    running: Running, conf: str, tmp_path: Path, capsys: Any
) -> Any:
    bob, dm_file, group_file = yield old_alice_world(running.addr, tmp_path)
    yield bob.close()
    yield running.stop()
    assert ctl.main(["--config", conf, "deluser", "alice"]) == 0
    assert "deleted alice@localhost" in capsys.readouterr().out
    yield running.start()
    bob = yield login(running.addr, "bob")
    # bob, offline at the time, gets the membership end in his backlog
    assert membership_end(bob.msgs) == ENDED
    yield check_new_alice_starts_with_nothing(running.addr, tmp_path, bob, (dm_file, group_file))
    yield bob.close()
