"""Black-box tests of PROTOCOL.md's "Groups" (roles and permissions, settings, events,
delivery), over loopback TCP with raw frames.  Each scenario is a sequence of
requests by named users and the code PROTOCOL.md gives each (None: a result)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.protocol import ClientFactory
from tests.blackbox import PW, call, code, login, msgs, serve
from tests.conftest import fast_config, make_realm

USERS = ("alice", "bob", "carol", "dave", "erin")


def R(actor: str, type_: str, want: str | None = None, **fields: Any) -> tuple[Any, ...]:
    return (actor, {"type": type_, **fields}, want)


G = "#g"
SCENARIOS: dict[str, list[tuple[Any, ...]]] = {
    "the only owner cannot leave a non-empty group, then can alone": [
        R("alice", "create_group", group=G),
        R("bob", "join", group=G),
        R("alice", "leave", "forbidden", group=G),
        R("bob", "leave", group=G),
        R("alice", "leave", group=G),
        R("bob", "join", "no_such_group", group=G),
        R("bob", "create_group", group=G),  # the name is free again
    ],
    "the only owner cannot demote themselves; one of two owners can": [
        R("alice", "create_group", group=G),
        R("bob", "join", group=G),
        R("alice", "set_role", "forbidden", group=G, user="alice", role="admin"),
        R("alice", "set_role", group=G, user="bob", role="owner"),
        R("alice", "set_role", group=G, user="alice", role="member"),
        R("alice", "leave", group=G),
        R("bob", "set_role", "forbidden", group=G, user="bob", role="member"),
    ],
    "owners change other owners' roles; kick needs a lower role": [
        R("alice", "create_group", group=G),
        R("bob", "join", group=G),
        R("carol", "join", group=G),
        R("dave", "join", group=G),
        R("alice", "set_role", group=G, user="bob", role="owner"),
        R("alice", "kick", "forbidden", group=G, user="bob"),
        R("alice", "set_role", group=G, user="bob", role="admin"),
        R("alice", "set_role", group=G, user="carol", role="admin"),
        R("bob", "kick", "forbidden", group=G, user="carol"),  # admin vs admin
        R("bob", "kick", "forbidden", group=G, user="alice"),
        R("bob", "ban", "forbidden", group=G, user="carol"),
        R("bob", "kick", "bad_request", group=G, user="bob"),
        R("bob", "ban", "bad_request", group=G, user="bob"),
        R("dave", "kick", "forbidden", group=G, user="bob"),
        R("bob", "set_role", "forbidden", group=G, user="dave", role="admin"),
        R("alice", "set_role", "bad_request", group=G, user="dave", role="king"),
        R("bob", "kick", group=G, user="dave"),
        R("bob", "kick", "not_member", group=G, user="dave"),
        R("alice", "set_role", "not_member", group=G, user="dave", role="admin"),
        R("dave", "kick", "not_member", group=G, user="bob"),
        R("alice", "kick", "no_such_user", group=G, user="nobody"),
        R("alice", "kick", group=G, user="carol"),  # owner kicks an admin
    ],
    "bans: non-members, repeats, invitations, rejoining through an invite": [
        R("alice", "create_group", group=G, visibility="invite"),
        R("alice", "invite", group=G, user="bob"),
        R("alice", "ban", group=G, user="bob", reason="spam"),  # drops the invitation
        R("bob", "join", "banned", group=G),
        R("alice", "invite", "banned", group=G, user="bob"),
        R("alice", "ban", "banned", group=G, user="bob"),
        R("alice", "unban", group=G, user="bob"),
        R("alice", "unban", "bad_request", group=G, user="bob"),
        R("bob", "join", "not_invited", group=G),  # the ban dropped the invitation
        R("alice", "invite", group=G, user="bob"),
        R("bob", "join", group=G),
        R("alice", "invite", "already_member", group=G, user="bob"),
        R("bob", "join", "already_member", group=G),
        R("bob", "leave", group=G),
        R("bob", "join", "not_invited", group=G),  # the join used the invitation up
        R("alice", "ban", group=G, user="carol"),  # a non-member may be banned
        R("carol", "join", "banned", group=G),
    ],
    "key and limit, bypassed by an invitation": [
        R("alice", "create_group", group=G),
        R("alice", "set_group", group=G, key="s3cret", limit=2),
        R("bob", "join", "bad_key", group=G),
        R("bob", "join", "bad_key", group=G, key="wrong"),
        R("bob", "join", group=G, key="s3cret"),
        R("carol", "join", "group_full", group=G, key="s3cret"),
        R("alice", "invite", group=G, user="carol"),
        R("carol", "join", group=G),  # invited: past the limit, no key
        R("alice", "set_group", "bad_request", group=G, limit=1000001),
        R("alice", "set_group", "bad_request", group=G, limit=-1),
        R("alice", "set_group", "bad_request", group=G, key="with space"),
        R("alice", "set_group", "bad_request", group=G, key="k" * 33),
        R("alice", "set_group", group=G, key="k" * 32, limit=1000000),
        R("alice", "set_group", "bad_request", group=G),  # no setting
        R("bob", "set_group", "forbidden", group=G, moderated=True),
        R("dave", "set_group", "not_member", group=G, moderated=True),
    ],
    "moderated, voice, topic lock, external": [
        R("alice", "create_group", group=G),
        R("bob", "join", group=G),
        R("bob", "set_topic", "forbidden", group=G, topic="t"),
        R("alice", "set_group", group=G, topic_lock=False),
        R("bob", "set_topic", group=G, topic="t"),
        R("alice", "set_group", group=G, moderated=True),
        R("bob", "send", "moderated", to=G, body="x"),
        R("alice", "set_voice", group=G, user="bob", voice=True),
        R("bob", "send", to=G, body="x"),
        R("carol", "send", "not_member", to=G, body="x"),
        R("alice", "set_group", group=G, moderated=False, external=True),
        R("carol", "send", to=G, body="from outside"),
        R("carol", "history", "not_member", **{"with": G}),
        R("bob", "set_voice", "forbidden", group=G, user="bob", voice=False),
        R("alice", "set_voice", "not_member", group=G, user="carol", voice=True),
        R("alice", "set_topic", "too_large", group=G, topic="t" * 513),
        R("alice", "set_topic", group=G, topic="t" * 512),
    ],
    "a member joining again is already_member, whatever else the join lacks": [
        R("alice", "create_group", group=G, visibility="invite"),
        R("alice", "set_group", group=G, key="k", limit=1),
        R("alice", "join", "already_member", group=G),
        R("alice", "join", "already_member", group=G, key="wrong"),
        R("alice", "create_group", group="#g2"),
        R("alice", "create_group", group="#g3"),
        R("alice", "join", "already_member", group="#g3"),  # at max_groups_per_user
    ],
    "visibility: invite-only and secret groups are hidden from non-members": [
        R("alice", "create_group", group=G, visibility="invite"),
        R("bob", "group_info", "not_member", group=G),
        R("bob", "join", "not_invited", group=G),
        R("bob", "members", "not_member", group=G),
        R("alice", "create_group", group="#s"),
        R("alice", "set_group", group="#s", secret=True),
        R("bob", "group_info", "not_member", group="#s"),
        R("alice", "create_group", "group_exists", group="#S"),
        R("alice", "create_group", "bad_request", group="#x", history="some"),
        R("alice", "set_group", "bad_request", group=G, history="all"),
        R("bob", "group_info", "no_such_group", group="#nope"),
    ],
}


@pytest.fixture
def group_server(tmp_path: Any) -> Any:
    cfg = fast_config(
        tmp_path,
        send_burst=10_000,
        send_rate=10_000.0,
        max_groups_per_user=3,
        max_members_per_group=4,
    )
    yield from serve(cfg, USERS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest_twisted.inlineCallbacks
def test_group_rules(group_server: Any, name: str) -> Any:
    _realm, addr = group_server
    conns = {}
    for user in USERS:
        conns[user] = yield login(addr, user)
    wrong = []
    for i, (user, req, want) in enumerate(SCENARIOS[name]):
        r = yield call(conns[user], req)
        if code(r) != want:
            wrong.append((i, user, req, want, r))
    assert not wrong


@pytest_twisted.inlineCallbacks
def test_limits_of_groups_and_members(group_server: Any) -> Any:
    """max_groups_per_user 3, max_members_per_group 4: exactly at is fine."""
    _realm, addr = group_server
    a = yield login(addr, "alice")
    for i in range(3):
        r = yield call(a, {"type": "create_group", "group": f"#g{i}"})
        assert r["type"] == "result", r
    r = yield call(a, {"type": "create_group", "group": "#g3"})
    assert code(r) == "limit_reached", r
    others = {}
    for u in ("bob", "carol", "dave", "erin"):
        others[u] = yield login(addr, u)
    for u in ("bob", "carol", "dave"):
        j = yield call(others[u], {"type": "join", "group": "#g0"})
        assert j["type"] == "result", j
    full = yield call(others["erin"], {"type": "join", "group": "#g0"})
    assert code(full) == "group_full", full
    yield call(a, {"type": "invite", "group": "#g0", "user": "erin"})
    still = yield call(others["erin"], {"type": "join", "group": "#g0"})
    assert code(still) == "group_full", still  # the realm's bound holds for invitees
    left = yield call(a, {"type": "leave", "group": "#g1"})
    assert left["type"] == "result"
    r = yield call(a, {"type": "create_group", "group": "#g3"})
    assert r["type"] == "result", r


@pytest_twisted.inlineCallbacks
def test_delivery_audience_and_ranges(group_server: Any) -> Any:
    """A kicked member gets the `kicked` and nothing after; an unbanned user is not
    told; a banned non-member is; an offline member's backlog ends at their removal;
    a group created again under a used name shows nothing of the old one."""
    _realm, addr = group_server
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    c = yield login(addr, "carol")
    yield call(a, {"type": "create_group", "group": G, "history": "all"})
    yield call(b, {"type": "join", "group": G})
    before = yield call(a, {"type": "send", "to": G, "body": "before"})
    kick = yield call(a, {"type": "kick", "group": G, "user": "bob", "reason": "bye"})
    after = yield call(a, {"type": "send", "to": G, "body": "after"})
    ban = yield call(a, {"type": "ban", "group": G, "user": "carol"})
    unban = yield call(a, {"type": "unban", "group": G, "user": "carol"})
    yield call(a, {"type": "ping"})
    yield call(b, {"type": "ping"})
    yield call(c, {"type": "ping"})
    bpos = [m["pos"] for m in msgs(b)]
    assert before["pos"] in bpos and kick["pos"] in bpos
    assert after["pos"] not in bpos and ban["pos"] not in bpos
    cpos = [m["pos"] for m in msgs(c)]
    assert ban["pos"] in cpos and unban["pos"] not in cpos, msgs(c)
    kicked = next(m for m in msgs(b) if m["pos"] == kick["pos"])
    assert kicked["meta"] == {"event": "kicked", "user": "bob@localhost", "reason": "bye"}
    # Offline: bob's backlog from 0 ends at the kicked event.
    b2 = yield login(addr, "bob", device="other", since=0)
    assert [m["pos"] for m in msgs(b2)][-1] == kick["pos"]
    # Delete, recreate: history "all" of the new group shows only the new group.
    d = yield call(a, {"type": "delete_group", "group": G})
    assert d["type"] == "result", d
    r = yield call(b, {"type": "create_group", "group": G, "history": "all"})
    assert r["type"] == "result", r
    yield call(a, {"type": "join", "group": G})
    h = yield call(a, {"type": "history", "with": G})
    assert h["messages"][0]["pos"] == r["pos"], h


@pytest_twisted.inlineCallbacks
def test_offline_users_learn_of_invitations_bans_and_deletions(group_server: Any) -> Any:
    _realm, addr = group_server
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    yield call(a, {"type": "create_group", "group": G, "visibility": "invite"})
    yield call(a, {"type": "invite", "group": G, "user": "bob"})
    yield call(b, {"type": "join", "group": G})
    b.transport.loseConnection()
    yield b.lost
    inv = yield call(a, {"type": "invite", "group": G, "user": "carol"})
    ban = yield call(a, {"type": "ban", "group": G, "user": "dave"})
    unban = yield call(a, {"type": "unban", "group": G, "user": "dave"})
    said = yield call(a, {"type": "send", "to": G, "body": "bye all"})
    gone = yield call(a, {"type": "delete_group", "group": G})
    c = yield login(addr, "carol")
    d = yield login(addr, "dave")
    b = yield login(addr, "bob")
    assert [m["pos"] for m in msgs(c)] == [inv["pos"]]
    assert [m["pos"] for m in msgs(d)] == [ban["pos"]]
    assert unban["pos"] not in [m["pos"] for m in msgs(d)]
    assert [m["pos"] for m in msgs(b)][-2:] == [said["pos"], gone["pos"]]
    assert msgs(b)[-1]["meta"] == {"event": "deleted"}


@pytest_twisted.inlineCallbacks
def test_a_groups_state_survives_a_restart(tmp_path: Any) -> Any:
    """The state is the replay of the stored events: roles, voice, settings, bans and
    pending invitations hold after a restart."""
    cfg = fast_config(tmp_path, send_burst=10_000, send_rate=10_000.0)
    realm = make_realm(cfg)
    yield realm.startService()
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    addr = f"tcp:127.0.0.1:{port.getHost().port}"
    for name in USERS:
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    for req in (
        {"type": "create_group", "group": G, "topic": "t0"},
        {
            "type": "set_group",
            "group": G,
            "moderated": True,
            "key": "k1",
            "limit": 3,
            "topic_lock": False,
        },
        {"type": "invite", "group": G, "user": "bob"},
    ):
        r = yield call(a, req)
        assert r["type"] == "result", r
    r = yield call(b, {"type": "join", "group": G})
    assert r["type"] == "result", r
    for req in (
        {"type": "set_voice", "group": G, "user": "bob", "voice": True},
        {"type": "set_role", "group": G, "user": "bob", "role": "admin"},
        {"type": "ban", "group": G, "user": "dave"},
        {"type": "invite", "group": G, "user": "carol"},
        {"type": "set_topic", "group": G, "topic": "t1"},
    ):
        r = yield call(a, req)
        assert r["type"] == "result", r
    info_before = yield call(a, {"type": "group_info", "group": G})
    members_before = yield call(a, {"type": "members", "group": G})
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    yield port.stopListening()
    yield realm.stopService()
    realm = make_realm(cfg)
    yield realm.startService()
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    addr = f"tcp:127.0.0.1:{port.getHost().port}"
    try:
        a = yield login(addr, "alice")
        info = yield call(a, {"type": "group_info", "group": G})
        members = yield call(a, {"type": "members", "group": G})
        assert {k: v for k, v in info.items() if k != "id"} == {
            k: v for k, v in info_before.items() if k != "id"
        }
        strip = lambda m: [{k: v for k, v in e.items() if k != "online"} for e in m["members"]]  # noqa: E731
        assert strip(members) == strip(members_before)
        d = yield login(addr, "dave")
        r = yield call(d, {"type": "join", "group": G, "key": "k1"})
        assert code(r) == "banned", r
        e = yield login(addr, "erin")
        r = yield call(e, {"type": "join", "group": G})
        assert code(r) == "bad_key", r
        c = yield login(addr, "carol")
        r = yield call(c, {"type": "join", "group": G})  # invited: no key needed
        assert r["type"] == "result", r
        r = yield call(c, {"type": "send", "to": G, "body": "x"})
        assert code(r) == "moderated", r
        b = yield login(addr, "bob")
        r = yield call(b, {"type": "send", "to": G, "body": "voiced"})
        assert r["type"] == "result", r
        r = yield call(b, {"type": "kick", "group": G, "user": "carol"})  # admin now
        assert r["type"] == "result", r
    finally:
        for proto in list(factory.connections):
            proto.transport.abortConnection()
        yield port.stopListening()
        yield realm.stopService()


@pytest_twisted.inlineCallbacks
def test_deleting_an_only_owner_names_a_successor_and_ends_bans(group_server: Any) -> Any:
    realm, addr = group_server
    conns = {}
    for u in ("alice", "bob", "carol", "dave"):
        conns[u] = yield login(addr, u)
    a = conns["alice"]
    yield call(a, {"type": "create_group", "group": G})
    for u in ("bob", "carol", "dave"):
        yield call(conns[u], {"type": "join", "group": G})
    yield call(a, {"type": "set_role", "group": G, "user": "dave", "role": "admin"})
    yield call(a, {"type": "set_role", "group": G, "user": "carol", "role": "admin"})
    yield call(a, {"type": "create_group", "group": "#other", "visibility": "invite"})
    yield call(a, {"type": "ban", "group": "#other", "user": "erin"})
    yield call(a, {"type": "invite", "group": "#other", "user": "bob"})
    yield realm.delete_user("alice")
    left = yield wait_for_event(conns["bob"], "left")
    # carol joined before dave: the admin who has been a member longest.
    assert left["meta"]["successor"] == "carol@localhost", left
    members = yield call(conns["bob"], {"type": "members", "group": G})
    roles = {m["user"]: m["role"] for m in members["members"]}
    assert roles == {
        "bob@localhost": "member",
        "carol@localhost": "owner",
        "dave@localhost": "admin",
    }
    # #other had only alice: deleted, its name free; erin's ban and bob's invitation end.
    yield realm.delete_user("erin")
    yield realm.create_user("erin", PW)
    e = yield login(addr, "erin")
    r = yield call(e, {"type": "join", "group": "#other"})
    assert code(r) == "no_such_group", r


def wait_for_event(client: Any, event: str) -> Any:
    from tests.blackbox import wait_for

    return wait_for(
        client,
        lambda f: f.get("type") == "msg" and (f.get("meta") or {}).get("event") == event,
    )


@pytest_twisted.inlineCallbacks
def test_event_meta_fields_and_their_order(group_server: Any) -> Any:
    """`meta` has `event` first, then its fields in the order PROTOCOL.md lists;
    `reason` absent when empty; the key only in `settings`."""
    _realm, addr = group_server
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    c = yield login(addr, "carol")
    steps = [
        (a, {"type": "create_group", "group": G, "topic": "t"}),
        (b, {"type": "join", "group": G}),
        (
            a,
            {
                "type": "set_group",
                "group": G,
                "key": "k",
                "limit": 9,
                "topic_lock": False,
                "moderated": True,
                "secret": True,
                "visibility": "invite",
                "external": True,
            },
        ),
        (a, {"type": "set_voice", "group": G, "user": "bob", "voice": True}),
        (a, {"type": "set_role", "group": G, "user": "bob", "role": "admin"}),
        (a, {"type": "set_topic", "group": G, "topic": "new"}),
        (a, {"type": "invite", "group": G, "user": "carol"}),
        (c, {"type": "join", "group": G}),
        (a, {"type": "kick", "group": G, "user": "carol", "reason": ""}),
        (a, {"type": "ban", "group": G, "user": "carol", "reason": "spam"}),
        (a, {"type": "unban", "group": G, "user": "carol"}),
        (b, {"type": "leave", "group": G}),
        (a, {"type": "delete_group", "group": G}),
    ]
    positions = []
    for client, req in steps:
        r = yield call(client, req)
        assert r["type"] == "result", (req, r)
        positions.append(r["pos"])
    yield call(a, {"type": "ping"})
    by_pos = {m["pos"]: m for m in msgs(a)}
    metas = [list(by_pos[p]["meta"].items()) for p in positions]
    assert metas == [
        [("event", "created"), ("visibility", "public"), ("history", "joined"), ("topic", "t")],
        [("event", "joined"), ("user", "bob@localhost")],
        [
            ("event", "settings"),
            ("visibility", "invite"),
            ("moderated", True),
            ("secret", True),
            ("topic_lock", False),
            ("limit", 9),
            ("key", "k"),
            ("external", True),
        ],
        [("event", "voice"), ("user", "bob@localhost"), ("voice", True)],
        [("event", "role"), ("user", "bob@localhost"), ("role", "admin")],
        [("event", "topic"), ("topic", "new")],
        [("event", "invited"), ("user", "carol@localhost")],
        [("event", "joined"), ("user", "carol@localhost")],
        [("event", "kicked"), ("user", "carol@localhost")],
        [("event", "banned"), ("user", "carol@localhost"), ("reason", "spam")],
        [("event", "unbanned"), ("user", "carol@localhost")],
        [("event", "left"), ("user", "bob@localhost")],
        [("event", "deleted")],
    ]
    for p in positions:
        m = by_pos[p]
        assert (m["kind"], m["body"], m["to"]) == ("event", "", "#g@localhost")


@pytest_twisted.inlineCallbacks
def test_listing_and_external_senders(group_server: Any) -> Any:
    _realm, addr = group_server
    a = yield login(addr, "alice")
    c = yield login(addr, "carol")
    for req in (
        {"type": "create_group", "group": "#pub"},
        {"type": "create_group", "group": "#inv", "visibility": "invite"},
        {"type": "create_group", "group": "#sec"},
        {"type": "set_group", "group": "#sec", "secret": True},
        {"type": "set_group", "group": "#pub", "external": True},
    ):
        r = yield call(a, req)
        assert r["type"] == "result", r
    listed = yield call(c, {"type": "list_groups"})
    assert [g["group"] for g in listed["groups"]] == ["#pub@localhost"], listed
    assert listed["groups"][0]["external"] is True
    sent = yield call(c, {"type": "send", "to": "#pub", "body": "from outside"})
    assert sent["type"] == "result", sent
    later = yield call(a, {"type": "send", "to": "#pub", "body": "members only"})
    yield call(c, {"type": "ping"})
    cpos = [m["pos"] for m in msgs(c)]
    assert later["pos"] not in cpos
    apos = [m["pos"] for m in msgs(a)]
    assert sent["pos"] in apos
    assert sent["pos"] not in cpos  # not even their own message: the result is its record
    r = yield call(a, {"type": "set_group", "group": "#pub", "moderated": True})
    r = yield call(c, {"type": "send", "to": "#pub", "body": "moderated now"})
    assert code(r) in ("moderated", "not_member"), r


@pytest_twisted.inlineCallbacks
def test_concurrent_changes_are_one_at_a_time(group_server: Any) -> Any:
    """Two create_group for one name at once: one gets group_exists; joins at once
    cannot pass max_members_per_group (4 here)."""
    _realm, addr = group_server
    conns = {}
    for u in USERS:
        conns[u] = yield login(addr, u)
    conns["alice"].send({"type": "create_group", "group": "#race", "id": "c1"})
    conns["bob"].send({"type": "create_group", "group": "#race", "id": "c2"})
    r1 = yield conns["alice"].reply("c1")
    r2 = yield conns["bob"].reply("c2")
    assert sorted([code(r1) or "ok", code(r2) or "ok"]) == ["group_exists", "ok"], (r1, r2)
    owner = conns["alice"] if code(r1) is None else conns["bob"]
    others = [c for c in conns.values() if c is not owner]
    for i, c in enumerate(others):
        c.send({"type": "join", "group": "#race", "id": f"j{i}"})
    replies = []
    for i, c in enumerate(others):
        r = yield c.reply(f"j{i}")
        replies.append(code(r) or "ok")
    assert sorted(replies) == ["group_full", "ok", "ok", "ok"], replies
