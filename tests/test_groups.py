"""Groups over StringTransport: permissions, events, fan-out, history rule, presence."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from chatproto.config import Config
from chatproto.protocol import delivery_frame
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests.conftest import fast_config, make_realm


class User:
    """One logged-in StringTransport session with a request helper."""

    def __init__(
        self, realm: Any, clock: Clock, name: str, device: str = "default", **login: Any
    ) -> None:
        if name not in realm.store.users:
            realm.create_user(name, "password1")
        self.clock = clock
        self.proto, self.t = connect_string_transport(realm)
        self.proto.dataReceived(frame({"type": "hello", "version": 1}))
        self.proto.dataReceived(
            frame(
                {"type": "login", "user": name, "password": "password1", "device": device, **login}
            )
        )
        clock.advance(0)
        self.inbox: list[dict[str, Any]] = []
        self.drain()  # login result, backlog, synced, presence snapshot

    def drain(self) -> list[dict[str, Any]]:
        new = frames(self.t)
        self.inbox += new
        return new

    def req(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.proto.dataReceived(frame({"type": type_, "id": "r", **fields}))
        self.clock.advance(0)
        replies = [f for f in self.drain() if f.get("id") == "r"]
        assert len(replies) == 1, replies
        return replies[0]

    def ok(self, type_: str, **fields: Any) -> dict[str, Any]:
        r = self.req(type_, **fields)
        assert r["type"] == "result", r
        return r

    def code(self, type_: str, **fields: Any) -> str:
        r = self.req(type_, **fields)
        assert r["type"] == "error", r
        return r["code"]

    def msgs(self) -> list[dict[str, Any]]:
        self.drain()
        out = [f for f in self.inbox if f["type"] == "msg"]
        self.inbox = [f for f in self.inbox if f["type"] != "msg"]
        return out

    def events(self) -> list[tuple[str, str | None]]:
        return [
            (m["meta"]["event"], m["meta"].get("user")) for m in self.msgs() if m["kind"] == "event"
        ]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def realm(clock: Clock) -> Any:
    cfg = Config()
    cfg.limits.send_burst = 10_000
    r = make_test_realm(clock, cfg)
    yield r
    r.stopService()


def test_create_join_talk_fan_out(realm: Any, clock: Clock) -> None:
    alice, bob, carol = (User(realm, clock, n) for n in ("alice", "bob", "carol"))
    alice_phone = User(realm, clock, "alice", device="phone")
    r = alice.ok("create_group", group="#Lobby", topic="hi all")
    assert r["group"] == "#lobby@localhost"
    assert alice.events() == [("created", None)]
    bob.ok("join", group="#lobby")
    carol.ok("join", group="#lobby@localhost")
    sent = alice.ok("send", to="#lobby", body="hello group")
    got = {
        name: u.msgs()
        for name, u in (("alice", alice), ("phone", alice_phone), ("bob", bob), ("carol", carol))
    }
    for name, msgs in got.items():
        texts = [m for m in msgs if m["kind"] == "text"]
        assert len(texts) == 1, name
        assert texts[0]["pos"] == sent["pos"] and texts[0]["from"] == "alice@localhost"
        assert texts[0]["to"] == "#lobby@localhost"
    # Encoded once: the envelope carries the bytes every session was sent.
    env = realm.store.items[-1]
    assert env.frame is not None and delivery_frame(env) is env.frame


def test_permissions(realm: Any, clock: Clock) -> None:
    alice, bob, carol = (User(realm, clock, n) for n in ("alice", "bob", "carol"))
    alice.ok("create_group", group="#g")
    assert alice.code("create_group", group="#g") == "group_exists"
    assert bob.code("send", to="#g", body="x") == "not_member"
    assert bob.code("join", group="#nope") == "no_such_group"
    assert bob.code("members", group="#g") == "not_member"
    assert bob.code("history", **{"with": "#g"}) == "not_member"
    bob.ok("join", group="#g")
    assert bob.code("join", group="#g") == "already_member"
    carol.ok("join", group="#g")
    assert bob.code("kick", group="#g", user="carol") == "forbidden"
    assert bob.code("set_topic", group="#g", topic="x") == "forbidden"
    assert bob.code("set_role", group="#g", user="carol", role="admin") == "forbidden"
    assert bob.code("delete_group", group="#g") == "forbidden"
    alice.ok("set_role", group="#g", user="bob", role="admin")
    bob.ok("set_topic", group="#g", topic="bob's topic")
    assert bob.code("kick", group="#g", user="alice") == "forbidden"  # owner outranks admin
    bob.ok("kick", group="#g", user="carol", reason="spam")
    assert bob.code("kick", group="#g", user="carol") == "not_member"
    assert bob.code("kick", group="#g", user="nobody") == "no_such_user"
    assert bob.code("kick", group="#g", user="bob") == "bad_request"
    assert alice.code("leave", group="#g") == "forbidden"  # the only owner
    assert alice.code("set_role", group="#g", user="alice", role="member") == "forbidden"
    assert alice.code("set_role", group="#g", user="bob", role="king") == "bad_request"
    members = alice.ok("members", group="#g")["members"]
    assert members == [
        {"user": "alice@localhost", "role": "owner", "online": True},
        {"user": "bob@localhost", "role": "admin", "online": True},
    ]
    info = bob.ok("group_info", group="#g")
    assert info["topic"] == "bob's topic" and info["role"] == "admin" and info["members"] == 2


def test_ban_invite_and_events(realm: Any, clock: Clock) -> None:
    alice, bob, carol = (User(realm, clock, n) for n in ("alice", "bob", "carol"))
    alice.ok("create_group", group="#club", visibility="invite")
    assert bob.code("join", group="#club") == "not_invited"
    alice.ok("invite", group="#club", user="bob")
    assert bob.events() == [("invited", "bob@localhost")]  # the invitee hears of it
    bob.ok("join", group="#club")
    assert bob.code("join", group="#club") == "already_member"
    alice.ok("ban", group="#club", user="bob", reason="rude")
    assert ("banned", "bob@localhost") in bob.events()  # the banned member hears of it
    assert bob.code("join", group="#club") == "banned"
    assert alice.code("invite", group="#club", user="bob") == "banned"
    alice.ok("unban", group="#club", user="bob")
    assert bob.code("join", group="#club") == "not_invited"  # the invite was used up
    alice.ok("invite", group="#club", user="bob")
    bob.ok("join", group="#club")
    alice.ok("set_topic", group="#club", topic="new")
    alice.events()
    assert [e for e, _ in bob.events()] == ["invited", "joined", "topic"]
    assert carol.code("group_info", group="#club") == "not_member"  # invite-only: private
    assert realm.list_groups() == []  # not listed
    alice.ok("delete_group", group="#club")
    assert bob.events() == [("deleted", None)]
    assert bob.code("send", to="#club", body="x") == "no_such_group"


def test_history_rule_and_offline_backlog(realm: Any, clock: Clock) -> None:
    alice = User(realm, clock, "alice")
    alice.ok("create_group", group="#joined")
    alice.ok("create_group", group="#all", history="all")
    for g in ("#joined", "#all"):
        alice.ok("send", to=g, body=f"early {g}")
    bob = User(realm, clock, "bob")
    for g in ("#joined", "#all"):
        bob.ok("join", group=g)
    hist = {
        g: [m["body"] for m in bob.ok("history", **{"with": g})["messages"] if m["kind"] == "text"]
        for g in ("#joined", "#all")
    }
    assert hist == {"#joined": [], "#all": ["early #all"]}
    # bob goes offline; the group moves on; bob is kicked; he learns it all at login.
    bob.proto.connectionLost(None)
    alice.ok("send", to="#joined", body="while away")
    alice.ok("kick", group="#joined", user="bob")
    alice.ok("send", to="#joined", body="after the kick")
    again = User(realm, clock, "bob")
    backlog = [
        (m["kind"], m["body"] or m["meta"]["event"]) for m in again.inbox if m["type"] == "msg"
    ]
    assert ("text", "while away") in backlog and ("event", "kicked") in backlog
    assert ("text", "after the kick") not in backlog
    positions = [f["pos"] for f in again.inbox if f["type"] == "msg"]
    assert positions == sorted(positions) and len(positions) == len(set(positions))


def test_limits(clock: Clock) -> None:
    cfg = Config()
    cfg.limits.max_members_per_group = 2
    cfg.limits.max_groups_per_user = 1
    realm = make_test_realm(clock, cfg)
    alice, bob, carol = (User(realm, clock, n) for n in ("alice", "bob", "carol"))
    alice.ok("create_group", group="#a")
    assert alice.code("create_group", group="#b") == "limit_reached"
    bob.ok("join", group="#a")
    assert carol.code("join", group="#a") == "group_full"
    assert alice.code("set_topic", group="#a", topic="x" * 600) == "too_large"
    assert carol.code("create_group", group="#c", visibility="secret") == "bad_request"
    assert carol.code("create_group", group="#c", history="never") == "bad_request"


def test_presence_to_group_members_and_dm_partners(realm: Any, clock: Clock) -> None:
    alice = User(realm, clock, "alice")
    alice.ok("create_group", group="#p")
    bob = User(realm, clock, "bob")
    bob.ok("join", group="#p")
    carol = User(realm, clock, "carol")  # shares nothing with bob
    bob.proto.connectionLost(None)
    presence = [f for f in alice.drain() + alice.inbox if f["type"] == "presence"]
    assert {"type": "presence", "user": "bob@localhost", "status": "offline"} in presence
    assert [f for f in carol.drain() if f["type"] == "presence"] == []
    bob = User(realm, clock, "bob")
    assert {"type": "presence", "user": "bob@localhost", "status": "online"} in alice.drain()
    # bob's snapshot after sync names his online contacts (alice), not strangers (carol)
    snapshot = [f["user"] for f in bob.inbox if f["type"] == "presence"]
    assert snapshot == ["alice@localhost"]
    alice.inbox.clear()
    bob.ok("set_status", status="away", text="lunch")
    assert {"type": "presence", "user": "bob@localhost", "status": "away", "text": "lunch"} in (
        alice.drain()
    )
    assert bob.code("set_status", status="asleep") == "bad_request"
    who = alice.ok("who", group="#p")["users"]
    assert {"user": "bob@localhost", "sessions": 1, "status": "away", "text": "lunch"} in who
    assert carol.code("who", group="#p") == "not_member"
    # DM partners hear presence too
    carol.ok("send", to="alice", body="hi")
    carol.proto.connectionLost(None)
    assert {"type": "presence", "user": "carol@localhost", "status": "offline"} in alice.drain()


@pytest_twisted.inlineCallbacks
def test_group_state_survives_restart(tmp_path: Any) -> Any:
    """Group state is the replay of stored events: a restarted realm has the same groups."""
    from chatproto.address import Address
    from chatproto.realm import Session

    cfg = fast_config(tmp_path)
    realm = make_realm(cfg)
    yield realm.startService()
    try:
        yield realm.create_user("alice", "password1")
        yield realm.create_user("bob", "password1")
        yield realm.create_user("carol", "password1")
        alice = Session(realm, Address("alice", "localhost"), "d", None)
        bob = Session(realm, Address("bob", "localhost"), "d", None)
        yield realm.group_event(alice, "created", "#kept", topic="t", visibility="invite")
        yield realm.group_event(alice, "invited", "#kept", user="bob")
        yield realm.group_event(bob, "joined", "#kept")
        yield realm.group_event(alice, "role", "#kept", user="bob", role="admin")
        yield realm.group_event(bob, "banned", "#kept", user="carol")
        yield realm.group_event(alice, "created", "#gone")
        yield realm.group_event(alice, "deleted", "#gone")
        before = realm.groups.get("#kept@localhost")
    finally:
        yield realm.stopService()
    again = make_realm(cfg)
    yield again.startService()
    try:
        g = again.groups.get("#kept@localhost")
        assert g == before
        assert g.topic == "t" and g.visibility == "invite" and set(g.bans) == {"carol@localhost"}
        assert {u: m.role for u, m in g.members.items()} == {
            "alice@localhost": "owner",
            "bob@localhost": "admin",
        }
        assert "#gone@localhost" not in again.groups.groups
    finally:
        yield again.stopService()


def test_offline_invitee_gets_the_invite_and_deletion_reaches_former_members(
    realm: Any, clock: Clock
) -> None:
    alice = User(realm, clock, "alice")
    bob = User(realm, clock, "bob")
    carol = User(realm, clock, "carol")
    alice.ok("create_group", group="#club", visibility="invite")
    alice.ok("invite", group="#club", user="carol")
    carol.ok("join", group="#club")
    bob.proto.connectionLost(None)
    carol.proto.connectionLost(None)
    alice.ok("invite", group="#club", user="bob")  # bob is offline
    alice.ok("send", to="#club", body="last words")
    alice.ok("delete_group", group="#club")  # carol is offline
    bob = User(realm, clock, "bob")
    assert [m["meta"]["event"] for m in bob.msgs()] == ["invited"]
    carol = User(realm, clock, "carol")
    got = [(m["kind"], m["body"] or m["meta"]["event"]) for m in carol.msgs()]
    assert got[-2:] == [("text", "last words"), ("event", "deleted")]


def test_recreated_name_does_not_expose_the_old_group(realm: Any, clock: Clock) -> None:
    alice = User(realm, clock, "alice")
    alice.ok("create_group", group="#reuse")
    alice.ok("send", to="#reuse", body="old secret")
    alice.ok("delete_group", group="#reuse")
    bob = User(realm, clock, "bob")
    bob.ok("create_group", group="#reuse", history="all")
    alice.ok("join", group="#reuse")
    bodies = [m["body"] for m in alice.ok("history", **{"with": "#reuse"})["messages"]]
    assert "old secret" not in bodies


def test_last_member_leaving_frees_the_name(realm: Any, clock: Clock) -> None:
    alice = User(realm, clock, "alice")
    alice.ok("create_group", group="#solo")
    alice.ok("leave", group="#solo")
    assert alice.code("join", group="#solo") == "no_such_group"
    alice.ok("create_group", group="#solo")


def test_rejoin_keeps_unread_items_of_the_earlier_membership(realm: Any, clock: Clock) -> None:
    alice = User(realm, clock, "alice")
    alice.ok("create_group", group="#g")
    bob = User(realm, clock, "bob")
    bob.ok("join", group="#g")
    alice.ok("send", to="#g", body="first membership")
    bob.ok("leave", group="#g")
    bob.ok("join", group="#g")
    alice.ok("send", to="#g", body="second membership")
    # A device that never synced gets both memberships' messages, not just the current.
    tablet = User(realm, clock, "bob", device="tablet2")
    bodies = [m["body"] for m in tablet.msgs() if m["kind"] == "text"]
    assert bodies == ["first membership", "second membership"]


@pytest_twisted.inlineCallbacks
def test_concurrent_creates_and_joins_are_serialised(tmp_path: Any) -> Any:
    from twisted.internet import defer

    from chatproto.address import Address
    from chatproto.realm import Session

    cfg = fast_config(tmp_path)
    cfg.limits.max_members_per_group = 3
    realm = make_realm(cfg)
    yield realm.startService()
    try:
        sessions = []
        for name in ("alice", "bob", "carol", "dave", "erin"):
            yield realm.create_user(name, "password1")
            sessions.append(Session(realm, Address(name, "localhost"), "d", None))
        results = yield defer.DeferredList(
            [realm.group_event(s, "created", "#race") for s in sessions[:2]], consumeErrors=True
        )
        outcomes = sorted(ok for ok, _ in results)
        assert outcomes == [False, True]
        joins = yield defer.DeferredList(
            [realm.group_event(s, "joined", "#race") for s in sessions[1:]], consumeErrors=True
        )
        assert len(realm.groups.get("#race@localhost").members) == 3
        codes = sorted(r.value.code for ok, r in joins if not ok)
        assert codes == ["already_member", "group_full"] or codes == ["group_full", "group_full"]
    finally:
        yield realm.stopService()


def test_quiet_sessions_do_not_show_presence(realm: Any, clock: Clock) -> None:
    alice = User(realm, clock, "alice")
    alice.ok("send", to="alice", body="x")
    realm.create_user("bob", "password1")
    bob = User(realm, clock, "bob", quiet=True)
    bob.ok("send", to="alice", body="hi")  # DM partners now
    assert [f for f in alice.drain() if f["type"] == "presence"] == []
    assert alice.ok("who")["users"] == [{"user": "alice@localhost", "sessions": 1}]
    bob.proto.connectionLost(None)
    assert [f for f in alice.drain() if f["type"] == "presence"] == []
    # A visible session of bob's is announced as usual.
    User(realm, clock, "bob")
    assert {"type": "presence", "user": "bob@localhost", "status": "online"} in alice.drain()


def test_a_delivery_burst_writes_each_connection_once_in_order(realm: Any, clock: Clock) -> None:
    """Frames delivered during a burst (one group commit) are held per connection and
    written together when it ends; any other write flushes them first, keeping order."""
    alice = User(realm, clock, "alice")
    bob = User(realm, clock, "bob")
    alice.ok("create_group", group="#b")
    bob.ok("join", group="#b")
    alice.drain()
    bob.drain()
    writes: list[bytes] = []
    original = bob.t.write
    bob.t.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign]
    realm.begin_burst()
    for i in range(3):
        alice.proto.dataReceived(frame({"type": "send", "to": "#b", "body": f"m{i}", "id": i}))
    assert writes == []  # held by bob's connection
    # alice's own results were written at once, each after her held echo (order kept)
    assert [f["type"] for f in frames(alice.t)] == ["msg", "result"] * 3
    realm.end_burst()
    assert len(writes) == 1
    assert [f["body"] for f in frames(bob.t)] == ["m0", "m1", "m2"]


def test_settings_key_limit_moderated_secret_topic_lock(realm: Any, clock: Clock) -> None:
    """The group settings behind IRC's channel modes, from the native protocol."""
    alice, bob, carol, dave = (User(realm, clock, n) for n in ("alice", "bob", "carol", "dave"))
    alice.ok("create_group", group="#s")
    assert bob.code("set_group", group="#s", moderated=True) == "not_member"
    bob.ok("join", group="#s")
    assert bob.code("set_group", group="#s", moderated=True) == "forbidden"
    for bad in ({"limit": -1}, {"limit": True}, {"key": "a b"}, {"key": "x" * 33}, {}):
        assert alice.code("set_group", group="#s", **bad) == "bad_request", bad
    alice.ok("set_group", group="#s", key="sesame", limit=3)
    assert [m["meta"] for m in bob.msgs() if m["meta"]["event"] == "settings"] == [
        {"event": "settings", "key": "sesame", "limit": 3}
    ]
    assert carol.code("join", group="#s") == "bad_key"
    assert carol.code("join", group="#s", key="wrong") == "bad_key"
    carol.ok("join", group="#s", key="sesame")
    assert dave.code("join", group="#s", key="sesame") == "group_full"  # limit 3
    alice.ok("invite", group="#s", user="dave")
    dave.ok("join", group="#s")  # an invitee needs no key and may exceed the limit
    # moderated: members speak only when voiced; admins and owners always
    alice.ok("set_group", group="#s", moderated=True, key="", limit=0)
    assert bob.code("send", to="#s", body="hi") == "moderated"
    alice.ok("send", to="#s", body="still here")
    alice.ok("set_voice", group="#s", user="bob", voice=True)
    bob.ok("send", to="#s", body="voiced now")
    alice.ok("set_voice", group="#s", user="bob", voice=False)
    assert bob.code("send", to="#s", body="hi") == "moderated"
    # topic_lock off: any member sets the topic
    assert bob.code("set_topic", group="#s", topic="mine") == "forbidden"
    alice.ok("set_group", group="#s", topic_lock=False)
    bob.ok("set_topic", group="#s", topic="mine")
    # secret: not listed
    assert [g["group"] for g in carol.ok("list_groups")["groups"]] == ["#s@localhost"]
    alice.ok("set_group", group="#s", secret=True, visibility="invite")
    assert carol.ok("list_groups")["groups"] == []
    info = carol.ok("group_info", group="#s")
    assert info["secret"] and info["visibility"] == "invite" and not info["topic_lock"]
    assert "key" not in info and info["has_key"] is False


def test_setting_external_lets_non_members_send(realm: Any, clock: Clock) -> None:
    """external (IRC's -n): a non-member may send to the group, not when moderated;
    the members get it, the sender (not a member) does not."""
    alice, bob = (User(realm, clock, n) for n in ("alice", "bob"))
    alice.ok("create_group", group="#x")
    assert bob.code("send", to="#x", body="knock") == "not_member"
    assert bob.code("set_group", group="#x", external=True) == "not_member"
    assert alice.code("set_group", group="#x", external="yes") == "bad_request"
    alice.ok("set_group", group="#x", external=True)
    assert alice.ok("group_info", group="#x")["external"] is True
    alice.msgs()
    bob.ok("send", to="#x", body="from outside")
    assert [m["body"] for m in alice.msgs() if m["kind"] == "text"] == ["from outside"]
    assert [m for m in bob.msgs() if m["kind"] == "text"] == []
    alice.ok("set_group", group="#x", moderated=True)
    assert bob.code("send", to="#x", body="again") == "not_member"


@pytest_twisted.inlineCallbacks
def test_settings_survive_restart(tmp_path: Any) -> Any:
    """Settings are events: replayed at start-up like every other group change."""
    cfg = fast_config(tmp_path)
    realm = make_realm(cfg)
    yield realm.startService()
    yield realm.create_user("alice", "password1")
    yield realm.create_user("bob", "password1")
    yield realm.group_event_as("alice@localhost", "created", "#r")
    yield realm.group_event_as("bob@localhost", "joined", "#r")
    yield realm.group_event_as("alice@localhost", "settings", "#r", key="k1", moderated=True)
    yield realm.group_event_as("alice@localhost", "voice", "#r", user="bob", voice=True)
    yield realm.stopService()
    again = make_realm(cfg)
    yield again.startService()
    g = again.groups.get("#r@localhost")
    assert (g.key, g.moderated, g.members["bob@localhost"].voice) == ("k1", True, True)
    yield again.stopService()


def test_a_notice_is_a_text_item_with_notice_meta(realm: Any, clock: Clock) -> None:
    alice, bob = (User(realm, clock, n) for n in ("alice", "bob"))
    alice.ok("send", to="bob", body="automated", notice=True)
    assert [(m["body"], m.get("meta")) for m in bob.msgs()] == [("automated", {"notice": True})]
    assert alice.code("send", to="bob", body="x", notice="yes") == "bad_request"


def test_group_changes_have_a_bucket_per_connection(realm: Any, clock: Clock) -> None:
    """Each change is a stored event and a frame to every member: a connection had no
    bound (join/leave or set_topic in a loop).  group_change_burst at once, then one
    a second: rate_limited with retry_after, nothing stored; another connection of
    the same user has its own bucket; a refused change gives its token back."""
    burst = realm.config.limits.group_change_burst
    alice, bob = User(realm, clock, "alice"), User(realm, clock, "bob")
    alice.ok("create_group", group="#busy")
    for _ in range(burst + 5):  # refused: no token kept
        assert bob.code("join", group="#nowhere") == "no_such_group"
    for i in range(burst):  # join, leave, ...: bob ends outside
        bob.ok("join" if i % 2 == 0 else "leave", group="#busy")
    stored = len(realm.store.items)
    r = bob.req("join", group="#busy")
    assert r["type"] == "error" and r["code"] == "rate_limited", r
    assert 0 < r["retry_after"] <= 1.0
    assert bob.code("join", group="#nowhere") == "rate_limited"  # before other checks
    assert len(realm.store.items) == stored
    bob_phone = User(realm, clock, "bob", device="phone")
    bob_phone.ok("join", group="#busy")
    clock.advance(1.0)
    bob.ok("leave", group="#busy")
    assert bob.code("join", group="#busy") == "rate_limited"
    assert realm.stats.refused["group_change"] == 3
