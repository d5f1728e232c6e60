"""Groups and presence over real loopback TCP, several users, driven by the client library.

The last test is a property over arbitrary group names on StringTransport (fast).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock

from chatproto.client import RemoteError, connect
from chatproto.config import Config
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests.conftest import drop_sessions, resuming_service, until

G = "#lounge@localhost"


class User:
    """One logged-in session and everything it was pushed."""

    conn: Any

    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []

    def texts(self, group: str = G) -> list[str]:
        return [m["body"] for m in self.msgs if m["to"] == group and m["kind"] == "text"]

    def events(self, group: str = G) -> list[tuple[str, Any]]:
        return [
            (m["meta"]["event"], m["meta"].get("user"))
            for m in self.msgs
            if m["to"] == group and m["kind"] == "event"
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


@defer.inlineCallbacks
def login(addr: str, name: str, register: bool = False, device: str = "default") -> Any:
    u = User()
    u.conn = yield connect(
        _reactor,
        addr,
        name,
        f"password-{name}",
        register=register,
        device=device,
        on_message=u.msgs.append,
        on_presence=u.presence.append,
    )
    yield u.conn.synced
    return u


@defer.inlineCallbacks
def users(addr: str, *names: str) -> Any:
    out = []
    for name in names:
        out.append((yield login(addr, name, register=True)))
    return out


@defer.inlineCallbacks
def close(*us: User) -> Any:
    for u in us:
        yield u.conn.close()


@defer.inlineCallbacks
def refused(d: defer.Deferred[Any], code: str) -> Any:
    with pytest.raises(RemoteError) as e:
        yield d
    assert e.value.code == code, e.value
    return e.value


# talking -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_three_users_talk_everyone_gets_each_message_once(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    phone = yield login(addr, "alice", device="phone")  # alice's second session
    created = yield alice.create_group("#Lounge", topic="chat")
    assert created["group"] == G and created["pos"] > 0
    yield bob.join("lounge")
    yield carol.join("#lounge@localhost")
    sent = []
    for u, body in ((alice, "hi all"), (bob, "hi alice"), (carol, "hey ✓"), (phone, "from phone")):
        sent.append((yield u.send("#lounge", body)))
    everyone = (alice, phone, bob, carol)
    yield until(lambda: all(len(u.texts()) == 4 for u in everyone))
    yield until(lambda: all(("joined", "carol@localhost") in u.events() for u in everyone))
    bodies = ["hi all", "hi alice", "hey ✓", "from phone"]
    for u in everyone:
        texts = [m for m in u.msgs if m["kind"] == "text"]
        assert [m["body"] for m in texts] == bodies
        assert [m["pos"] for m in texts] == [r["pos"] for r in sent]
        assert [m["from"] for m in texts] == [
            "alice@localhost",
            "bob@localhost",
            "carol@localhost",
            "alice@localhost",
        ]
        positions = [m["pos"] for m in u.msgs]
        assert positions == sorted(set(positions))  # no duplicates, in order
    # The items are identical for everyone (one encoding fanned out).
    assert [m for m in bob.msgs if m["kind"] == "text"] == [
        m for m in carol.msgs if m["kind"] == "text"
    ]
    # bob saw his own join and carol's, never alice's creation (before he joined).
    assert bob.events() == [("joined", "bob@localhost"), ("joined", "carol@localhost")]
    yield close(alice, phone, bob, carol)


@pytest_twisted.inlineCallbacks
def test_topic_change_seen_by_all(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    yield alice.create_group("lounge", topic="old")
    yield bob.join("lounge")
    yield carol.join("lounge")
    yield alice.set_topic("lounge", "new topic ✓")
    for u in (alice, bob, carol):
        yield until(lambda u=u: ("topic", None) in u.events())
        [ev] = [m for m in u.msgs if m["kind"] == "event" and m["meta"]["event"] == "topic"]
        assert ev["meta"]["topic"] == "new topic ✓" and ev["from"] == "alice@localhost"
    info = yield carol.group_info("lounge")
    assert info["topic"] == "new topic ✓" and info["role"] == "member"
    assert info["members"] == 3 and info["group"] == G
    yield refused(carol.set_topic("lounge", "mine"), "forbidden")
    [summary] = yield carol.list_groups()
    assert summary["topic"] == "new topic ✓" and summary["visibility"] == "public"
    yield close(alice, bob, carol)


# moderation ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_kick_then_rejoin_public_group(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield alice.kick("lounge", "bob", reason="be nice")
    yield until(lambda: ("kicked", "bob@localhost") in bob.events())
    [kicked] = [m for m in bob.msgs if m["kind"] == "event" and m["meta"]["event"] == "kicked"]
    assert kicked["meta"]["reason"] == "be nice" and kicked["from"] == "alice@localhost"
    yield refused(bob.send("#lounge", "still here?"), "not_member")
    yield alice.send("#lounge", "bob is gone")
    yield bob.join("lounge")
    yield bob.send("#lounge", "back")
    yield until(lambda: alice.texts() == ["bob is gone", "back"])
    assert bob.texts() == ["back"]  # nothing from while he was out
    members = yield alice.members("lounge")
    assert [m["user"] for m in members] == ["alice@localhost", "bob@localhost"]
    yield close(alice, bob)


@pytest_twisted.inlineCallbacks
def test_ban_refuses_rejoin_until_unban(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield alice.ban("lounge", "bob", reason="spam")
    yield until(lambda: ("banned", "bob@localhost") in bob.events())
    yield refused(bob.join("lounge"), "banned")
    yield refused(alice.invite("lounge", "bob"), "banned")
    yield refused(alice.ban("lounge", "bob"), "banned")
    yield alice.unban("lounge", "bob")
    yield refused(alice.unban("lounge", "bob"), "bad_request")
    yield bob.join("lounge")
    info = yield bob.group_info("lounge")
    assert info["role"] == "member"
    yield close(alice, bob)


@pytest_twisted.inlineCallbacks
def test_invite_only_group(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    yield alice.create_group("secret", visibility="invite")
    yield refused(bob.join("secret"), "not_invited")
    assert (yield bob.list_groups()) == []  # not listed
    yield refused(bob.group_info("secret"), "not_member")
    yield alice.invite("secret", "bob")
    yield until(lambda: ("invited", "bob@localhost") in bob.events("#secret@localhost"))
    yield refused(carol.join("secret"), "not_invited")  # the invitation is bob's
    yield carol.close()  # an offline invitee finds the invitation at login
    yield alice.invite("secret", "carol")
    carol = yield login(addr, "carol")
    assert carol.events("#secret@localhost") == [("invited", "carol@localhost")]
    yield bob.join("secret")
    yield refused(bob.invite("secret", "carol"), "forbidden")  # members cannot invite
    info = yield bob.group_info("secret")
    assert info["visibility"] == "invite" and info["role"] == "member"
    yield close(alice, bob, carol)


@pytest_twisted.inlineCallbacks
def test_roles_members_and_who(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield carol.join("lounge")
    yield refused(bob.set_role("lounge", "carol", "admin"), "forbidden")  # owners only
    yield alice.set_role("lounge", "bob", "admin")
    members = yield carol.members("lounge")
    assert members == [
        {"user": "alice@localhost", "role": "owner", "online": True},
        {"user": "bob@localhost", "role": "admin", "online": True},
        {"user": "carol@localhost", "role": "member", "online": True},
    ]
    yield until(lambda: ("role", "bob@localhost") in carol.events())
    yield refused(carol.kick("lounge", "bob"), "forbidden")  # member -> admin
    yield refused(bob.kick("lounge", "alice"), "forbidden")  # admin -> owner
    yield refused(alice.set_role("lounge", "alice", "member"), "forbidden")  # last owner
    yield refused(alice.leave("lounge"), "forbidden")  # the only owner cannot leave
    yield alice.set_status("busy", "in a meeting")
    yield carol.close()
    yield until(lambda: len(bob.presence) > 0 and bob.presence[-1]["status"] == "offline")
    online = yield bob.who("lounge")
    assert online == [
        {"user": "alice@localhost", "sessions": 1, "status": "busy", "text": "in a meeting"},
        {"user": "bob@localhost", "sessions": 1},
    ]
    members = yield bob.members("lounge")
    assert [(m["user"], m["online"]) for m in members][-1] == ("carol@localhost", False)
    yield bob.kick("lounge", "carol")  # admins may kick members, offline or not
    assert [m["user"] for m in (yield alice.members("#lounge"))] == [
        "alice@localhost",
        "bob@localhost",
    ]
    yield close(alice, bob)


@pytest_twisted.inlineCallbacks
def test_permission_errors_over_the_wire(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield refused(bob.kick("lounge", "alice"), "forbidden")
    yield refused(bob.delete_group("lounge"), "forbidden")
    yield refused(carol.send("#lounge", "let me in"), "not_member")
    yield refused(carol.history("#lounge"), "not_member")
    yield refused(carol.members("lounge"), "not_member")
    yield refused(carol.who("lounge"), "not_member")
    yield refused(carol.leave("lounge"), "not_member")
    yield refused(bob.join("lounge"), "already_member")
    yield refused(carol.create_group("lounge"), "group_exists")
    yield refused(alice.kick("lounge", "alice"), "bad_request")
    yield refused(alice.kick("lounge", "nobody"), "no_such_user")
    yield refused(alice.create_group("lounge2", visibility="secret"), "bad_request")
    yield refused(alice.create_group("lounge3", history="some"), "bad_request")
    yield refused(alice.set_role("lounge", "bob", "king"), "bad_request")
    yield refused(alice.create_group("#x@elsewhere.example"), "remote_realm")
    yield refused(alice.create_group("not a name"), "bad_address")
    for d in (
        carol.join("nowhere"),
        carol.send("#nowhere", "hello?"),
        carol.history("#nowhere"),
        carol.members("nowhere"),
        carol.group_info("nowhere"),
        carol.who("nowhere"),
        alice.set_topic("nowhere", "t"),
    ):
        yield refused(d, "no_such_group")
    # The connections survive every refusal.
    yield bob.send("#lounge", "still fine")
    yield close(alice, bob, carol)


@pytest_twisted.inlineCallbacks
def test_delete_group(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield alice.delete_group("lounge")
    yield until(lambda: ("deleted", None) in bob.events())
    yield refused(bob.send("#lounge", "hello?"), "no_such_group")
    assert (yield bob.list_groups()) == []
    yield bob.create_group("lounge")  # the name is free again
    info = yield bob.group_info("lounge")
    assert info["role"] == "owner" and info["members"] == 1
    yield close(alice, bob)


# offline, resume, history ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_offline_member_gets_group_backlog_in_order(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol, dave = yield users(addr, "alice", "bob", "carol", "dave")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield dave.join("lounge")
    yield close(bob, dave)
    expected = []
    for i in range(5):
        expected.append((yield alice.send("#lounge", f"m{i}"))["pos"])
    expected.append((yield alice.set_topic("lounge", "while you were out"))["pos"])
    expected.append((yield carol.join("lounge"))["pos"])
    expected.append((yield carol.send("#lounge", "hi"))["pos"])
    kicked = yield alice.kick("lounge", "dave", reason="idle")
    expected.append(kicked["pos"])
    yield alice.send("#lounge", "after dave")

    bob = yield login(addr, "bob")
    got = [m for m in bob.msgs if m["to"] == G]
    assert [m["pos"] for m in got] == [*expected, got[-1]["pos"]]
    assert [m["body"] for m in got if m["kind"] == "text"] == [
        "m0",
        "m1",
        "m2",
        "m3",
        "m4",
        "hi",
        "after dave",
    ]
    assert bob.events() == [
        ("topic", None),
        ("joined", "carol@localhost"),
        ("kicked", "dave@localhost"),
    ]
    # dave learns he was kicked, and sees nothing after it.
    dave = yield login(addr, "dave")
    assert [m["pos"] for m in dave.msgs] == expected
    assert dave.msgs[-1]["meta"] == {"event": "kicked", "user": "dave@localhost", "reason": "idle"}
    # Acknowledged: the next login has nothing new.
    yield bob.close()
    bob = yield login(addr, "bob")
    assert bob.msgs == []
    yield close(alice, bob, carol, dave)


@pytest_twisted.inlineCallbacks
def test_resume_group_conversation_across_dropped_connections(server: Any) -> Any:
    _, factory, addr = server
    alice, carol = yield users(addr, "alice", "carol")
    yield alice.create_group("lounge")
    yield carol.join("lounge")
    bob = yield login(addr, "bob", register=True)
    yield bob.join("lounge")
    yield bob.close()
    got: list[dict[str, Any]] = []
    svc = resuming_service(addr, "bob", "password-bob", device="laptop", on_message=got.append)
    svc.startService()
    try:
        yield svc.whenReady()
        total = 300
        for i in range(total):
            d = (alice if i % 2 else carol).send("#lounge", f"m{i}")
            if i % 60 == 30:
                yield d
                drop_sessions(factory, "bob@localhost")
        yield d
        yield until(lambda: len([m for m in got if m["kind"] == "text"]) >= total, timeout=20)
        texts = [m["body"] for m in got if m["kind"] == "text"]
        # Two senders on two connections: commits interleave, each sender's stay in order.
        assert sorted(texts) == sorted(f"m{i}" for i in range(total))
        for sender, parity in (("alice@localhost", 1), ("carol@localhost", 0)):
            mine = [m["body"] for m in got if m["kind"] == "text" and m["from"] == sender]
            assert mine == [f"m{i}" for i in range(total) if i % 2 == parity]
        positions = [m["pos"] for m in got]
        assert positions == sorted(set(positions))
    finally:
        yield svc.stopService()
        yield close(alice, carol)


@pytest_twisted.inlineCallbacks
def test_history_paging_and_history_rules(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    yield alice.create_group("joined-only")  # history rule "joined" (the default)
    yield alice.create_group("open-book", history="all")
    for i in range(10):
        yield alice.send("#joined-only", f"early {i}")
        yield alice.send("#open-book", f"early {i}")
    yield bob.join("joined-only")
    yield carol.join("open-book")
    for i in range(5):
        yield alice.send("#joined-only", f"late {i}")
        yield alice.send("#open-book", f"late {i}")

    late = [f"late {i}" for i in range(5)]
    everything = [f"early {i}" for i in range(10)] + late
    page = yield bob.history("#joined-only")
    assert [m["body"] for m in page if m["kind"] == "text"] == late
    assert page[0]["meta"] == {"event": "joined", "user": "bob@localhost"}
    page = yield carol.history("#open-book")
    assert [m["body"] for m in page if m["kind"] == "text"] == everything
    assert page[0]["meta"]["event"] == "created"
    # Not even explicit positions reach before the join.
    page = yield bob.history("#joined-only", after=0)
    assert [m["body"] for m in page if m["kind"] == "text"] == late

    # Paging backwards with before=, then forwards with after=.
    full = yield alice.history("#open-book")
    pages: list[list[dict[str, Any]]] = []
    before = None
    while True:
        page = yield carol.history("#open-book", before=before, limit=4)
        if not page:
            break
        assert len(page) <= 4
        pages.insert(0, page)
        before = page[0]["pos"]
    assert [m for p in pages for m in p] == full
    forward: list[dict[str, Any]] = []
    after = 0
    while True:
        page = yield carol.history("#open-book", after=after, limit=3)
        if not page:
            break
        forward += page
        after = page[-1]["pos"]
    assert forward == full
    yield close(alice, bob, carol)


@pytest_twisted.inlineCallbacks
def test_rejoin_and_invites_give_a_backlog_without_duplicates(server: Any) -> Any:
    """Overlapping feed ranges (past membership, invitation, current membership with
    history 'all') still give each item once, in order."""
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge", history="all", visibility="invite")
    yield alice.send("#lounge", "before")
    yield alice.invite("lounge", "bob")
    yield bob.join("lounge")
    yield bob.leave("lounge")
    yield alice.send("#lounge", "while out")
    yield alice.invite("lounge", "bob")
    yield bob.join("lounge")
    yield alice.send("#lounge", "after")
    yield bob.close()
    got: list[dict[str, Any]] = []
    again = yield connect(
        _reactor, addr, "bob", "password-bob", since=0, device="new", on_message=got.append
    )
    yield again.synced
    positions = [m["pos"] for m in got]
    assert positions == sorted(set(positions))
    assert [m["body"] for m in got if m["kind"] == "text"] == ["before", "while out", "after"]
    page = yield again.history("#lounge")
    assert [m["pos"] for m in page] == sorted({m["pos"] for m in page})
    yield close(alice)
    yield again.close()


@pytest_twisted.inlineCallbacks
def test_last_member_leaving_frees_the_name(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge")
    yield alice.send("#lounge", "alone")
    yield alice.leave("lounge")
    yield refused(bob.join("lounge"), "no_such_group")
    yield bob.create_group("lounge", history="all")
    page = yield bob.history("#lounge")
    assert [m["meta"]["event"] for m in page] == ["created"]
    yield close(alice, bob)


# presence ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_presence_between_group_members(server: Any) -> Any:
    _, _, addr = server
    alice, bob, carol = yield users(addr, "alice", "bob", "carol")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield alice.close()
    yield until(
        lambda: {"type": "presence", "user": "alice@localhost", "status": "offline"} in bob.presence
    )
    alice = yield login(addr, "alice")
    yield until(
        lambda: (
            bob.presence[-1:]
            == [{"type": "presence", "user": "alice@localhost", "status": "online"}]
        )
    )
    # alice's own snapshot after login: bob is online.
    yield until(
        lambda: {"type": "presence", "user": "bob@localhost", "status": "online"} in alice.presence
    )
    yield alice.set_status("away", "lunch")
    yield until(lambda: bob.presence[-1]["status"] == "away")
    assert bob.presence[-1] == {
        "type": "presence",
        "user": "alice@localhost",
        "status": "away",
        "text": "lunch",
    }
    yield refused(alice.set_status("offline"), "bad_request")
    yield refused(alice.set_status("sleepy"), "bad_request")
    # A second session does not announce alice again; closing one of two is not offline.
    phone = yield login(addr, "alice", device="phone")
    yield phone.close()
    yield alice.close()
    yield until(lambda: bob.presence[-1]["status"] == "offline")
    assert [p["status"] for p in bob.presence if p["user"] == "alice@localhost"][-3:] == [
        "online",
        "away",
        "offline",
    ]
    # carol shares no group and no conversation with alice: she hears nothing of her.
    assert all(p["user"] != "alice@localhost" for p in carol.presence)
    yield close(bob, carol)


@pytest_twisted.inlineCallbacks
def test_presence_callback_on_client_service(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    seen: list[dict[str, Any]] = []
    svc = resuming_service(addr, "bob", "password-bob", device="svc", on_presence=seen.append)
    svc.startService()
    try:
        yield svc.whenReady()
        yield until(
            lambda: {"type": "presence", "user": "alice@localhost", "status": "online"} in seen
        )
        yield alice.set_status("busy")
        yield until(lambda: seen[-1]["status"] == "busy")
    finally:
        yield svc.stopService()
        yield close(alice, bob)


# regressions for core bugs found with these tests (fixed in the realm) -----------------


@pytest_twisted.inlineCallbacks
def test_recreated_group_does_not_leak_old_history(server: Any) -> Any:
    _, _, addr = server
    alice, mallory = yield users(addr, "alice", "mallory")
    yield alice.create_group("lounge")
    yield alice.send("#lounge", "the old secret")
    yield alice.delete_group("lounge")
    yield mallory.create_group("lounge", history="all")
    page = yield mallory.history("#lounge")
    try:
        assert [m["body"] for m in page if m["kind"] == "text"] == []
    finally:
        yield close(alice, mallory)


@pytest_twisted.inlineCallbacks
def test_concurrent_create_of_one_name(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    results = yield defer.DeferredList(
        [alice.create_group("race"), bob.create_group("race")], consumeErrors=True
    )
    yield close(alice, bob)
    assert sorted(ok for ok, _ in results) == [False, True]
    for name in ("alice", "bob"):  # both can still log in
        u = yield login(addr, name)
        yield u.close()


@pytest_twisted.inlineCallbacks
def test_offline_member_learns_of_deletion(server: Any) -> Any:
    _, _, addr = server
    alice, bob = yield users(addr, "alice", "bob")
    yield alice.create_group("lounge")
    yield bob.join("lounge")
    yield bob.close()
    yield alice.send("#lounge", "bye")
    yield alice.delete_group("lounge")
    bob = yield login(addr, "bob")
    try:
        assert bob.texts() == ["bye"] and bob.events() == [("deleted", None)]
    finally:
        yield close(alice, bob)


# group names (property, StringTransport) -----------------------------------------------

_realm_for_names = None


def _string_realm() -> tuple[Any, Any, Any]:
    clock = Clock()
    cfg = Config()
    cfg.limits.max_groups_per_user = 10**6
    cfg.limits.send_burst = 10**6
    cfg.limits.group_change_burst = 10**6
    realm = make_test_realm(clock, cfg)
    realm.create_user("alice", "password1")
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": "h"}))
    proto.dataReceived(frame({"type": "login", "user": "alice", "password": "password1", "id": 1}))
    clock.advance(0)
    frames(transport)
    return realm, proto, transport


_ALLOWED = {"bad_address", "bad_request", "group_exists", "remote_realm", "too_large"}


@given(
    name=st.one_of(
        st.text(max_size=80),
        st.text(alphabet="#@.-_aZ09é ", max_size=20),
        st.from_regex(r"#?[a-z0-9][a-z0-9._-]{0,40}(@[a-z.]{0,12})?", fullmatch=True),
    )
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_group_names_never_crash(name: str) -> None:
    global _realm_for_names
    if _realm_for_names is None:
        _realm_for_names = _string_realm()
    _realm, proto, transport = _realm_for_names
    proto.dataReceived(frame({"type": "create_group", "group": name, "id": 5}))
    replies = [f for f in frames(transport) if f.get("id") == 5]
    assert len(replies) == 1, replies
    [reply] = replies
    if reply["type"] == "error":
        assert reply["code"] in _ALLOWED, reply
        return
    group = reply["group"]
    assert group.startswith("#") and group.endswith("@localhost")
    # The canonical address names the same group: creating it again is group_exists.
    proto.dataReceived(frame({"type": "create_group", "group": group, "id": 6}))
    [again] = [f for f in frames(transport) if f.get("id") == 6]
    assert again["code"] == "group_exists"
    # And it can be talked to by any spelling that created it.
    proto.dataReceived(frame({"type": "send", "to": group, "body": "x", "id": 7}))
    [sent] = [f for f in frames(transport) if f.get("id") == 7]
    assert sent["type"] == "result", sent
