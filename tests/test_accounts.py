"""Account lifecycle: deletion, re-registration under the same name, schema migration."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.accounts import removal_request
from chatproto.config import Config
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.groups import ACCOUNT_DELETED, Groups
from chatproto.realm import RealmService
from chatproto.store import backend as store_backend
from chatproto.store.memory import MemoryStore
from chatproto.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteDB
from chatproto.testing import (
    InlineHasher,
    NullMind,
    connect_string_transport,
    frame,
    frames,
    make_test_realm,
)
from tests.conftest import fast_config, fired, make_realm


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

        env = Envelope("id-1", "text", "alice@localhost", "bob@localhost", 0.0, "old")
        yield realm.store.append([env])
        yield realm.delete_user("bob")
        yield realm.create_user("bob", "password1")
        floor = yield realm.store.user_floor("bob")
        assert floor == env.pos + 1  # the deletion consumed a position
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

    class Mind(NullMind):
        def __init__(self, fail: bool) -> None:
            self.fail, self.closed = fail, False

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


# deleting an account ends its group standing (issue 14, item 2; the loopback
# regression tests are in test_account_deletion.py) -----------------------------------

G = "#g@localhost"
ALICE, BOB, CAROL, DAVE, ERIN = (
    f"{n}@localhost" for n in ("alice", "bob", "carol", "dave", "erin")
)


def _event(pos: int, sender: str, **meta: Any) -> Envelope:
    return Envelope(f"e{pos}", "event", sender, G, float(pos), "", meta, pos=pos)


HISTORY = [
    _event(1, ALICE, event="created", visibility="invite"),
    _event(2, ALICE, event="invited", user=CAROL),
    _event(3, CAROL, event="joined", user=CAROL),
    _event(4, ALICE, event="invited", user=BOB),
    _event(5, BOB, event="joined", user=BOB),
    _event(6, ALICE, event="invited", user=DAVE),
    _event(7, ALICE, event="banned", user=ERIN),
    _event(8, ALICE, event="role", user=BOB, role="admin"),
]


def _replayed(events: list[Envelope]) -> Groups:
    groups = Groups(100, 100, "localhost")
    for env in events:
        groups.apply(env)
    return groups


def test_removal_events_and_succession() -> None:
    groups = _replayed(HISTORY[:7])
    assert groups.standing(DAVE) == {G: 6} and groups.standing(ERIN) == {G: 7}
    assert groups.standing(CAROL) == {G: 3}  # the join consumed the invitation
    assert groups.standing_of_suffix("@localhost")[ALICE] == {G: 1}
    # the member there longest succeeds an only owner ...
    gone = {"event": "left", "user": ALICE, "reason": ACCOUNT_DELETED}
    assert groups.account_removal(G, ALICE) == [{**gone, "successor": CAROL}]
    # ... unless there is an admin, who is owner once the event is applied
    groups = _replayed(HISTORY)
    [meta] = groups.account_removal(G, ALICE)
    assert meta == {**gone, "successor": BOB}
    applied = _replayed([*HISTORY, _event(9, ALICE, **meta)])
    assert {u: m.role for u, m in applied.groups[G].members.items()} == {
        CAROL: "member",
        BOB: "owner",
    }
    # with another owner, nobody is promoted
    groups.apply(_event(9, ALICE, event="role", user=CAROL, role="owner"))
    assert groups.account_removal(G, ALICE) == [gone]
    # an invitation or a ban ends too, and leaves no trace in the feed
    assert [r[0] for r in groups.past[DAVE]] == [G]
    for user, pos in ((DAVE, 10), (ERIN, 11)):
        [meta] = groups.account_removal(G, user)
        groups.apply(_event(pos, user, **meta))
        assert groups.standing(user) == {} and user not in groups.past
    assert groups.account_removal(G, DAVE) == []  # no standing: nothing to end
    # a group whose last member is deleted is gone, its name free
    for user, pos in ((BOB, 12), (CAROL, 13), (ALICE, 14)):
        for meta in groups.account_removal(G, user):
            groups.apply(_event(pos, user, **meta))
    assert G not in groups.groups and groups.of_user == {} and ALICE not in groups.past


def _secret_group(realm: Any, clock: Clock) -> tuple[Any, Any]:
    from tests.test_groups import User

    alice, bob = User(realm, clock, "alice"), User(realm, clock, "bob")
    alice.ok("create_group", group="#secret", visibility="invite")
    alice.ok("invite", group="#secret", user="bob")
    bob.ok("join", group="#secret")
    alice.ok("send", to="#secret", body="old secret")
    bob.msgs()
    return alice, bob


@pytest.mark.parametrize("recreated_by", ["realm", "chatrealmctl"])
def test_an_account_replaced_behind_the_realms_back(recreated_by: str) -> None:
    """``chatrealmctl`` deletes alice while the realm runs (the realm is not told: her
    session stays, a limitation documented until there is a control channel), and a
    new alice appears: registered through the realm, or added by ``chatrealmctl`` and
    logging in.  The realm sees another account under the name (another floor) and
    ends everything of the old one then: its session, its token, its group standing."""
    from tests.test_groups import User

    clock = Clock()
    realm = make_test_realm(clock)
    old, bob = _secret_group(realm, clock)
    token, _ = fired(realm.issue_token("alice", "password1"))
    assert fired(realm.store.delete_user("alice", ALICE)) is True  # behind its back
    assert not old.t.disconnecting
    if recreated_by == "realm":
        fired(realm.create_user("alice", "password1"))
    else:
        fired(realm.store.create_user("alice", fired(realm.hasher.hash("password1")), 0.0))
    new = User(realm, clock, "alice")
    assert old.t.disconnecting and not new.t.disconnecting
    assert realm.token_user(token) is None
    assert isinstance(realm.login_token(token, None).result.value, ChatError)
    assert [e for e in bob.events()] == [("left", ALICE)]
    assert new.code("history", **{"with": "#secret"}) == "not_member"
    assert new.code("send", to="#secret", body="mine now") == "not_member"
    assert new.code("kick", group="#secret", user="bob") == "not_member"
    assert [m["user"] for m in bob.ok("members", group="#secret")["members"]] == [BOB]


@pytest_twisted.inlineCallbacks
def test_startup_ends_standing_an_older_deletion_left(tmp_path: Any) -> Any:
    """A database where accounts were deleted without ending their group standing (by
    an older chatproto, or by chatrealmctl while the realm ran): at start-up the realm
    commits the events that end it -- for a name with no account, and for a name
    registered again (standing from before its floor) -- once."""
    cfg = fast_config(tmp_path)
    realm = make_realm(cfg)
    yield realm.startService()
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, "password1")
    yield realm.group_event_as("alice", "created", "#g", visibility="invite")
    yield realm.group_event_as("alice", "invited", "#g", user="bob")
    yield realm.group_event_as("bob", "joined", "#g")
    yield realm.group_event_as("alice", "invited", "#g", user="carol")
    yield realm.stopService()
    db = store_backend.connect(cfg)  # the store the realm runs on, from outside it
    assert db.delete_user("alice", ALICE) and db.delete_user("carol", CAROL)
    db.create_user("carol", "hash", 0.0)  # registered again, the old way
    db.close()
    for _ in range(2):
        realm = make_realm(cfg)
        yield realm.startService()
        try:
            group = realm.groups.get(G)
            assert {u: m.role for u, m in group.members.items()} == {BOB: "owner"}
            assert group.invites == {}
            events = [
                (e.meta["event"], e.meta.get("user"), e.meta.get("reason"))
                for e in (yield realm.store.read_events(0, 100))
            ]
            assert events[-2:] == [
                ("left", ALICE, ACCOUNT_DELETED),
                ("left", CAROL, ACCOUNT_DELETED),
            ]
            assert len(events) == 6  # the second start found nothing to end
        finally:
            yield realm.stopService()


def test_a_deleted_member_of_another_realms_group_leaves_it_there(tmp_path: Any) -> None:
    """alice@a.example, the only owner of #dev@h.example, and invited to #priv there:
    a.example deletes her and tells h.example, which promotes the member there longest
    and ends the invitation; a's mirror loses her at once; nobody is bounced."""
    from tests.test_federation_groups import Links, fed_realm
    from tests.test_groups import User

    clock = Clock()
    links = Links()
    names = ("h.example", "a.example", "b.example")
    h, a, b = (links.add(fed_realm(clock, n, tmp_path)) for n in names)
    owner = User(h, clock, "owner")
    owner.ok("create_group", group="#dev")
    owner.ok("create_group", group="#priv", visibility="invite")
    alice = User(a, clock, "alice")
    alice.ok("join", group="#dev@h.example")
    links.pump()
    owner.ok("set_role", group="#dev", user="alice@a.example", role="owner")
    owner.ok("leave", group="#dev")
    carol, bob = User(h, clock, "carol"), User(b, clock, "bob")
    carol.ok("join", group="#dev")
    bob.ok("join", group="#dev@h.example")
    owner.ok("invite", group="#priv", user="alice@a.example")
    links.pump()
    assert fired(a.delete_user("alice")) is True
    assert "#dev@h.example" not in a.groups.groups  # her realm's mirror, at once
    links.pump()
    assert links.rejected == []
    roles = {"carol@h.example": "owner", "bob@b.example": "member"}
    for realm in (h, b):
        group = realm.groups.get("#dev@h.example")
        assert {u: m.role for u, m in group.members.items()} == roles
    assert h.groups.get("#priv@h.example").invites == {}
    assert ("left", "alice@a.example") in bob.events()
    new = User(a, clock, "alice")
    links.pump()
    assert new.msgs() == []  # no bounce of the old alice's requests, no backlog
    new.ok("join", group="#priv@h.example")  # pending: h.example decides, and refuses
    links.pump()
    assert [r["code"] for r in links.rejected] == ["not_invited"]
    # a home realm that refuses the end of a deleted account bounces nobody: the
    # account is gone, and its name may belong to someone else by then
    refused = removal_request("alice@a.example", "#dev@h.example", 0.0)
    fired(a.bounce("h.example", [(refused, "forbidden", "no")]))
    assert new.msgs() == []


class HeldHasher(InlineHasher):
    """Password checks that wait until the test lets them answer (argon2 in its
    thread takes that long: a change to the account may come meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[bool], bool]] = []

    def verify(self, pwhash: str | None, password: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.held.append((d, self._verify(pwhash, password)))
        return d

    def answer(self) -> None:
        held, self.held = self.held, []
        for d, ok in held:
            d.callback(ok)


@pytest.mark.parametrize("change", ["deleted", "password changed", "deleted and registered"])
@pytest.mark.parametrize("how", ["login", "browser login"])
def test_a_password_checked_before_the_account_changed_opens_nothing(change: str, how: str) -> None:
    """A login whose (right) password was being checked when the operator deleted the
    account or changed its password failed open: a session of a deleted account,
    sending in its name, or one made with the old password outliving passwd."""
    clock = Clock()
    hasher = HeldHasher()
    realm = RealmService(Config(), MemoryStore(), clock, clock=clock, hasher=hasher)
    realm.startService()
    fired(realm.create_user("vic", "old password"))
    if how == "login":
        d = realm.login("vic", "old password", NullMind(), "phone", "127.0.0.1")
    else:
        d = realm.accounts.issue_token("vic", "old password", "web", "127.0.0.1")
    assert len(hasher.held) == 1  # being checked
    if change == "password changed":
        realm.admin.set_password("vic", "new password")
    else:
        realm.admin.delete_user("vic")
        if change == "deleted and registered":
            realm.create_user("vic", "another password")
    clock.advance(0)
    hasher.answer()
    failures: list[Any] = []
    d.addErrback(failures.append)
    [failure] = failures
    assert failure.check(ChatError) and failure.value.code == "auth_failed"
    assert list(realm.sessions.of("vic@localhost")) == []
    assert realm.accounts.tokens.logins("vic") == []
    # the next login (with the password of now) is not refused
    password = "old password" if change == "deleted" else "another password"
    if change == "password changed":
        password = "new password"
    if change != "deleted":
        d = realm.login("vic", password, NullMind(), "phone", "127.0.0.1")
        hasher.answer()
        session = fired(d)
        assert list(realm.sessions.of("vic@localhost")) == [session]


@pytest_twisted.inlineCallbacks
def test_a_login_checked_while_the_account_was_deleted_fails_over_loopback(
    tmp_path: Any,
) -> Any:
    """The same over TCP: the right password of an account deleted while it was being
    checked gets auth_failed, and the connection may log in as nobody."""
    from twisted.internet import reactor

    from chatproto.protocol import ClientFactory
    from chatproto.store.backend import make_store
    from tests.conftest import raw_client, until

    cfg = fast_config(tmp_path)
    hasher = HeldHasher()
    realm = RealmService(cfg, make_store(cfg, reactor), reactor, hasher=hasher)
    yield realm.startService()
    port = reactor.listenTCP(0, ClientFactory(realm), interface="127.0.0.1")
    try:
        yield realm.create_user("vic", "old password")
        client = yield raw_client(f"tcp:127.0.0.1:{port.getHost().port}")
        client.send({"type": "login", "user": "vic", "password": "old password", "id": 1})
        yield until(lambda: hasher.held)
        yield realm.delete_user("vic")
        hasher.answer()
        reply = yield client.reply(1)
        assert (reply["type"], reply["code"]) == ("error", "auth_failed")
        assert list(realm.sessions.of("vic@localhost")) == []
        client.send({"type": "send", "to": "vic", "body": "x", "id": 2})
        reply = yield client.reply(2)
        assert reply["code"] == "not_authenticated"
        client.transport.loseConnection()
        yield client.lost
    finally:
        yield port.stopListening()
        yield realm.stopService()


def test_a_failed_login_logs_the_name_it_was_given_without_line_breaks(log_watch: Any) -> None:
    """A name that is no address went into the log as the client wrote it: a line
    break (or a bidi override) in it wrote a line of the client's choosing, before
    any login."""
    clock = Clock()
    realm = make_test_realm(clock)
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    forged = "zz\n2026-01-01T00:00:00+0000 [-] login root device x\u202e"
    for i in range(6):  # failed, then throttled
        proto.dataReceived(frame({"type": "login", "user": forged, "password": "x" * 8, "id": i}))
        clock.advance(0)
    codes = [f.get("code") for f in frames(transport) if f.get("type") == "error"]
    assert "auth_failed" in codes and "rate_limited" in codes
    lines = [line for line in log_watch.lines if "login failed" in line or "throttled" in line]
    assert lines and all("\n" not in line.rstrip("\n") and "\u202e" not in line for line in lines)
    assert any("'zz\\n2026" in line for line in lines), lines


@pytest_twisted.inlineCallbacks
def test_a_failed_login_over_loopback_logs_no_line_break(tmp_path: Any, log_watch: Any) -> Any:
    from twisted.internet import reactor

    from chatproto.protocol import ClientFactory
    from tests.conftest import raw_client

    realm = make_realm(fast_config(tmp_path))
    yield realm.startService()
    port = reactor.listenTCP(0, ClientFactory(realm), interface="127.0.0.1")
    try:
        client = yield raw_client(f"tcp:127.0.0.1:{port.getHost().port}")
        client.send({"type": "login", "user": "a\r\nFORGED", "password": "x" * 8, "id": 1})
        reply = yield client.reply(1)
        assert reply["code"] == "auth_failed"
        [line] = [line for line in log_watch.lines if "login failed" in line]
        assert "login failed for 'a\\r\\nforged' from 127.0.0.1" in line
        client.transport.loseConnection()
        yield client.lost
    finally:
        yield port.stopListening()
        yield realm.stopService()
