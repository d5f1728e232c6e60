"""Black-box: the group requests over loopback TCP, as PROTOCOL.md describes them
("Group requests" up to `group_info`): fields, the order of the checks, the roles,
the settings, what each event reaches and what each result holds.  Most tests are a
script: (who, request, fields, the answer's code)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.blackbox import Realm, errcode


@pytest.fixture
def bb(tmp_path: Any) -> Any:
    realm = Realm.open(tmp_path, send_burst=10_000, send_rate=10_000.0)
    yield realm
    realm.close()


@pytest_twisted.inlineCallbacks
def play(peers: dict[str, Any], script: list[tuple[str, str, dict[str, Any], str]]) -> Any:
    """Run ``script``: each step's answer must have the code given ("ok": a result)."""
    for who, type_, fields, want in script:
        r = yield peers[who].req(type_, **fields)
        assert errcode(r) == want, (who, type_, fields, r)


@pytest_twisted.inlineCallbacks
def users(bb: Realm, *names: str) -> Any:
    peers = {}
    for name in names:
        peers[name] = yield bb.user(name)
    return peers


def events(peer: Any) -> list[str]:
    return [f["meta"]["event"] for f in peer.pushed("msg") if f["kind"] == "event"]


@pytest_twisted.inlineCallbacks
def test_create_group(bb: Realm) -> Any:
    p = yield users(bb, "alice", "bob")
    alice = p["alice"]
    r = yield alice.req("create_group", group="#Dev")
    assert list(r) == ["type", "id", "group", "pos", "msg_id"]
    assert r["group"] == "#dev@localhost"
    ev = alice.pushed("msg")[-1]  # before the result
    assert alice.frames.index(ev) < alice.frames.index(r)
    assert (ev["pos"], ev["msg_id"], ev["kind"], ev["from"], ev["to"], ev["body"]) == (
        r["pos"], r["msg_id"], "event", "alice@localhost", "#dev@localhost", "",
    )  # fmt: skip
    assert ev["meta"] == {
        "event": "created",
        "visibility": "public",
        "history": "joined",
        "topic": "",
    }
    yield play(
        p,
        [
            ("bob", "create_group", {"group": "#dev"}, "group_exists"),
            ("bob", "create_group", {"group": "#DEV@LOCALHOST."}, "group_exists"),
            ("bob", "create_group", {"group": "\uff03\uff44\uff45\uff56"}, "bad_address"),
            ("bob", "create_group", {"group": "#\uff44\uff45\uff56"}, "group_exists"),
            ("bob", "create_group", {"group": "dev"}, "group_exists"),  # read as #dev
            ("bob", "create_group", {"group": "#dev", "visibility": "x"}, "group_exists"),
            ("bob", "create_group", {"group": "#ops", "visibility": "secret"}, "bad_request"),
            ("bob", "create_group", {"group": "#ops", "history": "some"}, "bad_request"),
            ("bob", "create_group", {"group": "#ops", "topic": "t" * 513}, "too_large"),
            (
                "bob",
                "create_group",
                {"group": "#ops", "topic": "t" * 513, "history": "x"},
                "bad_request",
            ),
            ("bob", "create_group", {"group": "#ops", "topic": "a\u202eb"}, "bad_request"),
            ("bob", "create_group", {"group": "#ops", "topic": "a\nb"}, "bad_request"),
            ("bob", "create_group", {"group": "#ops", "visibility": 1}, "bad_request"),
            ("bob", "create_group", {"group": 5}, "bad_request"),
            ("bob", "create_group", {}, "bad_request"),
            ("bob", "create_group", {"group": "#"}, "bad_address"),
            ("bob", "create_group", {"group": "##ops"}, "bad_address"),
            ("bob", "create_group", {"group": "#-ops"}, "bad_address"),
            ("bob", "create_group", {"group": "#o\u200bps"}, "bad_address"),
            ("bob", "create_group", {"group": "#" + "o" * 33}, "bad_address"),
            ("bob", "create_group", {"group": "#ops@example.org"}, "remote_realm"),
            ("bob", "create_group", {"group": "#" + "o" * 32}, "ok"),
            ("bob", "create_group", {"group": "#ops", "topic": "t" * 512}, "ok"),
            ("bob", "create_group", {"group": "#e", "visibility": "", "history": ""}, "ok"),
            ("bob", "create_group", {"group": "bob"}, "ok"),  # a group may share a user's name
        ],
    )
    info = yield p["bob"].req("group_info", group="#e")
    assert (info["visibility"], info["history"]) == ("public", "joined")


@pytest_twisted.inlineCallbacks
def test_groups_per_user_and_members_per_group(tmp_path: Any) -> Any:
    bb = yield Realm.start(tmp_path, max_groups_per_user=2, max_members_per_group=3)
    try:
        p = yield users(bb, "alice", "bob", "carol", "dave", "erin")
        yield play(
            p,
            [
                ("alice", "create_group", {"group": "#a"}, "ok"),
                ("alice", "create_group", {"group": "#b"}, "ok"),
                ("alice", "create_group", {"group": "#a"}, "group_exists"),  # before the limit
                ("alice", "create_group", {"group": "#c", "visibility": "x"}, "limit_reached"),
                ("bob", "create_group", {"group": "#c"}, "ok"),
                ("alice", "join", {"group": "#c"}, "limit_reached"),
                ("alice", "leave", {"group": "#b"}, "ok"),  # the last member: #b is gone
                ("alice", "join", {"group": "#c"}, "ok"),
                ("carol", "join", {"group": "#c"}, "ok"),
                ("dave", "join", {"group": "#c"}, "group_full"),
                ("bob", "invite", {"group": "#c", "user": "dave"}, "ok"),
                ("dave", "join", {"group": "#c"}, "group_full"),  # the realm's bound holds
                ("carol", "leave", {"group": "#c"}, "ok"),
                ("dave", "join", {"group": "#c"}, "ok"),
                ("erin", "create_group", {"group": "#b"}, "ok"),  # the name is free again
            ],
        )
    finally:
        yield bb.stop()


@pytest_twisted.inlineCallbacks
def test_join_and_invitations(bb: Realm) -> Any:
    p = yield users(bb, "alice", "bob", "carol", "dave")
    yield play(
        p,
        [
            ("alice", "create_group", {"group": "#priv", "visibility": "invite"}, "ok"),
            ("bob", "join", {"group": "#priv"}, "not_invited"),
            ("bob", "join", {"group": "#nogroup"}, "no_such_group"),
            ("bob", "join", {"group": "#priv", "key": 5}, "bad_request"),
            ("carol", "invite", {"group": "#priv", "user": "bob"}, "not_member"),
            ("alice", "invite", {"group": "#priv", "user": "nobody"}, "no_such_user"),
            ("alice", "invite", {"group": "#nogroup", "user": "nobody"}, "no_such_user"),
            ("alice", "invite", {"group": "#priv", "user": "#priv"}, "bad_address"),
            ("alice", "invite", {"group": "#priv", "user": "x@example.org"}, "remote_realm"),
            ("alice", "invite", {"group": "#priv", "user": "alice"}, "already_member"),
            ("alice", "invite", {"group": "#priv", "user": "bob"}, "ok"),
            ("alice", "invite", {"group": "#priv", "user": "bob"}, "ok"),  # again: allowed
            ("alice", "set_group", {"group": "#priv", "limit": 1, "key": "sesame"}, "ok"),
            ("bob", "join", {"group": "#priv"}, "ok"),  # invited: no key, past the limit
            ("bob", "join", {"group": "#priv"}, "already_member"),
            ("bob", "invite", {"group": "#priv", "user": "carol"}, "forbidden"),
            ("alice", "invite", {"group": "#priv", "user": "bob"}, "already_member"),
            ("bob", "leave", {"group": "#priv"}, "ok"),
            ("bob", "join", {"group": "#priv"}, "not_invited"),  # the invitation was used
            ("alice", "set_group", {"group": "#priv", "visibility": "public", "limit": 0}, "ok"),
            ("carol", "join", {"group": "#priv"}, "bad_key"),
            ("carol", "join", {"group": "#priv", "key": "Sesame"}, "bad_key"),
            ("alice", "set_group", {"group": "#priv", "limit": 1}, "ok"),
            ("carol", "join", {"group": "#priv", "key": "sesame"}, "group_full"),
            ("alice", "set_group", {"group": "#priv", "limit": 2}, "ok"),
            ("carol", "join", {"group": "#priv", "key": "sesame"}, "ok"),
            ("alice", "set_group", {"group": "#priv", "key": "", "limit": 0}, "ok"),
            ("dave", "join", {"group": "#priv"}, "ok"),
            ("alice", "ban", {"group": "#priv", "user": "bob"}, "ok"),  # pre-emptive
            ("bob", "join", {"group": "#priv"}, "banned"),
            ("alice", "invite", {"group": "#priv", "user": "bob"}, "banned"),
        ],
    )
    joined = next(f for f in p["carol"].pushed("msg") if f["kind"] == "event")
    assert joined["meta"] == {"event": "joined", "user": "carol@localhost"}  # no key


@pytest_twisted.inlineCallbacks
def test_roles_kick_ban_unban(bb: Realm) -> Any:
    p = yield users(bb, "owner", "admin", "member", "other", "outsider")
    yield play(
        p,
        [
            ("owner", "create_group", {"group": "#g"}, "ok"),
            ("admin", "join", {"group": "#g"}, "ok"),
            ("member", "join", {"group": "#g"}, "ok"),
            ("other", "join", {"group": "#g"}, "ok"),
            ("owner", "set_role", {"group": "#g", "user": "admin", "role": "admin"}, "ok"),
            ("owner", "set_role", {"group": "#g", "user": "admin", "role": "admin"}, "ok"),
            ("owner", "set_role", {"group": "#g", "user": "admin", "role": "king"}, "bad_request"),
            (
                "owner",
                "set_role",
                {"group": "#g", "user": "outsider", "role": "king"},
                "bad_request",
            ),
            (
                "owner",
                "set_role",
                {"group": "#g", "user": "outsider", "role": "admin"},
                "not_member",
            ),
            ("owner", "set_role", {"group": "#g", "user": "owner", "role": "admin"}, "forbidden"),
            ("admin", "set_role", {"group": "#g", "user": "member", "role": "admin"}, "forbidden"),
            (
                "outsider",
                "set_role",
                {"group": "#g", "user": "member", "role": "king"},
                "not_member",
            ),
            # kick: caller, then self, then target membership, then roles
            ("outsider", "kick", {"group": "#g", "user": "member"}, "not_member"),
            ("member", "kick", {"group": "#g", "user": "member"}, "forbidden"),
            ("member", "kick", {"group": "#g", "user": "other"}, "forbidden"),
            ("admin", "kick", {"group": "#g", "user": "admin"}, "bad_request"),
            ("admin", "kick", {"group": "#g", "user": "outsider"}, "not_member"),
            ("admin", "kick", {"group": "#g", "user": "owner"}, "forbidden"),
            ("owner", "set_role", {"group": "#g", "user": "other", "role": "admin"}, "ok"),
            ("admin", "kick", {"group": "#g", "user": "other"}, "forbidden"),  # equal role
            ("owner", "set_role", {"group": "#g", "user": "other", "role": "member"}, "ok"),
            ("admin", "kick", {"group": "#g", "user": "member", "reason": "r" * 513}, "too_large"),
            ("admin", "kick", {"group": "#g", "user": "member", "reason": "a\tb"}, "bad_request"),
            ("admin", "kick", {"group": "#g", "user": "member", "reason": "spam"}, "ok"),
            ("member", "join", {"group": "#g"}, "ok"),  # may join again
            # ban
            ("member", "ban", {"group": "#g", "user": "outsider"}, "forbidden"),
            ("admin", "ban", {"group": "#g", "user": "admin"}, "bad_request"),
            ("admin", "ban", {"group": "#g", "user": "owner"}, "forbidden"),
            ("admin", "ban", {"group": "#g", "user": "outsider"}, "ok"),
            ("admin", "ban", {"group": "#g", "user": "outsider"}, "banned"),
            ("admin", "ban", {"group": "#g", "user": "member", "reason": "again"}, "ok"),
            ("member", "join", {"group": "#g"}, "banned"),
            ("member", "unban", {"group": "#g", "user": "member"}, "not_member"),
            ("other", "unban", {"group": "#g", "user": "member"}, "forbidden"),
            ("admin", "unban", {"group": "#g", "user": "other"}, "bad_request"),
            ("admin", "unban", {"group": "#g", "user": "member"}, "ok"),
            ("admin", "unban", {"group": "#g", "user": "member"}, "bad_request"),
            ("member", "join", {"group": "#g"}, "ok"),  # a public group: no invitation needed
            # owners
            ("owner", "set_role", {"group": "#g", "user": "admin", "role": "owner"}, "ok"),
            ("admin", "set_role", {"group": "#g", "user": "owner", "role": "member"}, "ok"),
            ("admin", "set_role", {"group": "#g", "user": "admin", "role": "member"}, "forbidden"),
            ("owner", "delete_group", {"group": "#g"}, "forbidden"),
            ("owner", "leave", {"group": "#g"}, "ok"),
            ("admin", "leave", {"group": "#g"}, "forbidden"),  # the only owner, others remain
        ],
    )
    kicked = [f for f in p["member"].pushed("msg") if f.get("meta", {}).get("event") == "kicked"]
    assert kicked[0]["meta"] == {"event": "kicked", "user": "member@localhost", "reason": "spam"}
    assert kicked[0]["from"] == "admin@localhost"
    # the banned user was told, also when not a member; the unbanned one was not
    assert "banned" in events(p["outsider"]) and "unbanned" not in events(p["member"])[-2:]


@pytest_twisted.inlineCallbacks
def test_set_group_settings(bb: Realm) -> Any:
    p = yield users(bb, "alice", "bob", "carol", "dave")
    yield play(
        p,
        [
            ("alice", "create_group", {"group": "#g"}, "ok"),
            ("bob", "join", {"group": "#g"}, "ok"),
            ("carol", "join", {"group": "#g"}, "ok"),
            ("dave", "set_group", {"group": "#g", "secret": True}, "not_member"),
            ("bob", "set_group", {"group": "#g", "secret": True}, "forbidden"),
            ("alice", "set_group", {"group": "#g"}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "unknown": 1}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "moderated": None}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "visibility": "secret"}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "moderated": 1}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "limit": -1}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "limit": 1_000_001}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "limit": 1.0}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "limit": 1_000_000}, "ok"),
            ("alice", "set_group", {"group": "#g", "key": "k" * 33}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "key": "a b"}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "key": "a,b"}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "key": "caf\u00e9"}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "key": "\x7f"}, "bad_request"),
            ("alice", "set_group", {"group": "#g", "key": "!~" * 16}, "ok"),
            # moderated: only voiced members, admins and owners send
            ("alice", "set_group", {"group": "#g", "moderated": True}, "ok"),
            ("bob", "send", {"to": "#g", "body": "x"}, "moderated"),
            ("alice", "send", {"to": "#g", "body": "x"}, "ok"),
            ("alice", "set_voice", {"group": "#g", "user": "bob"}, "bad_request"),
            ("alice", "set_voice", {"group": "#g", "user": "dave", "voice": True}, "not_member"),
            ("bob", "set_voice", {"group": "#g", "user": "bob", "voice": True}, "forbidden"),
            ("alice", "set_voice", {"group": "#g", "user": "bob", "voice": "yes"}, "bad_request"),
            ("alice", "set_voice", {"group": "#g", "user": "bob", "voice": True}, "ok"),
            ("bob", "send", {"to": "#g", "body": "x"}, "ok"),
            ("alice", "set_voice", {"group": "#g", "user": "bob", "voice": False}, "ok"),
            ("bob", "send", {"to": "#g", "body": "x"}, "moderated"),
            # external: non-members send too, unless moderated
            ("dave", "send", {"to": "#g", "body": "x"}, "not_member"),
            ("alice", "set_group", {"group": "#g", "external": True}, "ok"),
            ("dave", "send", {"to": "#g", "body": "x"}, "not_member"),
            ("alice", "set_group", {"group": "#g", "moderated": False}, "ok"),
            ("dave", "send", {"to": "#g", "body": "from outside"}, "ok"),
            ("dave", "history", {"with": "#g"}, "not_member"),
            # topic_lock
            ("bob", "set_topic", {"group": "#g", "topic": "x"}, "forbidden"),
            ("alice", "set_group", {"group": "#g", "topic_lock": False}, "ok"),
            ("bob", "set_topic", {"group": "#g", "topic": "x"}, "ok"),
            ("dave", "set_topic", {"group": "#g", "topic": "x"}, "not_member"),
            ("bob", "set_topic", {"group": "#g", "topic": "t" * 513}, "too_large"),
            ("bob", "set_topic", {"group": "#g"}, "bad_request"),
            ("bob", "set_topic", {"group": "#g", "topic": ""}, "ok"),
            # secret: not listed; group_info for members only
            ("alice", "set_group", {"group": "#g", "secret": True}, "ok"),
            ("dave", "group_info", {"group": "#g"}, "not_member"),
        ],
    )
    listed = yield p["dave"].req("list_groups")
    assert listed["groups"] == []
    info = yield p["bob"].req("group_info", group="#g")
    assert info == {
        "type": "result", "id": info["id"], "group": "#g@localhost", "topic": "",
        "visibility": "public", "history": "joined", "members": 3, "moderated": False,
        "secret": True, "topic_lock": False, "limit": 1_000_000, "has_key": True,
        "external": True, "role": "member",
    }  # fmt: skip
    assert list(info) == [
        "type", "id", "group", "topic", "visibility", "history", "members", "moderated",
        "secret", "topic_lock", "limit", "has_key", "external", "role",
    ]  # fmt: skip
    settings = [
        f["meta"] for f in p["bob"].pushed("msg") if f.get("meta", {}).get("event") == "settings"
    ]
    assert settings[0] == {"event": "settings", "limit": 1_000_000}


@pytest_twisted.inlineCallbacks
def test_list_groups_members_group_info(bb: Realm) -> Any:
    p = yield users(bb, "zed", "alice", "bob")
    yield play(
        p,
        [
            ("zed", "create_group", {"group": "#b", "topic": "bees"}, "ok"),
            ("alice", "create_group", {"group": "#a", "history": "all"}, "ok"),
            ("alice", "create_group", {"group": "#hidden", "visibility": "invite"}, "ok"),
            ("bob", "join", {"group": "#a"}, "ok"),
        ],
    )
    quiet = yield bb.user("kim", quiet=True)
    yield quiet.req("join", group="#a")
    r = yield p["bob"].req("list_groups")
    summary = {
        "group": "#a@localhost", "topic": "", "visibility": "public", "history": "all",
        "members": 3, "moderated": False, "secret": False, "topic_lock": True, "limit": 0,
        "has_key": False, "external": False,
    }  # fmt: skip
    assert [g["group"] for g in r["groups"]] == ["#a@localhost", "#b@localhost"]
    assert r["groups"][0] == summary and list(r["groups"][0]) == list(summary)
    r = yield p["bob"].req("members", group="#a")
    assert r["members"] == [
        {"user": "alice@localhost", "role": "owner", "online": True},
        {"user": "bob@localhost", "role": "member", "online": True},
        {"user": "kim@localhost", "role": "member", "online": False},  # quiet
    ]
    r = yield p["zed"].req("group_info", group="a")
    assert r["role"] is None and r["members"] == 3
    yield play(
        p,
        [
            ("zed", "members", {"group": "#a"}, "not_member"),
            ("zed", "group_info", {"group": "#hidden"}, "not_member"),
            ("zed", "group_info", {"group": "#nogroup"}, "no_such_group"),
            ("zed", "group_info", {"group": "#x@example.org"}, "remote_realm"),
            ("zed", "members", {"group": "#-x"}, "bad_address"),
            ("zed", "members", {}, "bad_request"),
            ("zed", "who", {"group": "#a"}, "not_member"),
        ],
    )
    r = yield p["alice"].req("who", group="#a")
    assert r["users"] == [
        {"user": "alice@localhost", "sessions": 1},
        {"user": "bob@localhost", "sessions": 1},
    ]


@pytest_twisted.inlineCallbacks
def test_group_history_rules(bb: Realm) -> Any:
    p = yield users(bb, "alice", "bob", "carol")
    alice, bob = p["alice"], p["bob"]

    def page(peer: Any, group: str) -> Any:
        return peer.req("history", **{"with": group}).addCallback(
            lambda r: (
                [m["body"] or m["meta"]["event"] for m in r["messages"]]
                if r["type"] == "result"
                else r["code"]
            )
        )

    yield play(
        p,
        [
            ("alice", "create_group", {"group": "#j"}, "ok"),
            ("alice", "create_group", {"group": "#all", "history": "all"}, "ok"),
            ("alice", "send", {"to": "#j", "body": "before bob"}, "ok"),
            ("alice", "send", {"to": "#all", "body": "before bob"}, "ok"),
        ],
    )
    assert (yield page(alice, "#j")) == ["created", "before bob"]
    late = yield bb.user("late")  # an account newer than the items
    yield late.req("join", group="#all")
    assert (yield page(late, "#all")) == ["created", "before bob", "joined"]
    yield bob.req("join", group="#j")
    yield alice.req("send", to="#j", body="one")
    assert (yield page(bob, "#j")) == ["joined", "one"]
    yield bob.req("leave", group="#j")
    yield alice.req("send", to="#j", body="while away")
    assert (yield page(bob, "#j")) == "not_member"
    yield bob.req("join", group="#j")
    assert (yield page(bob, "#j")) == ["joined"]  # from the latest join
    # the backlog still covers the former member's time in the group
    again = yield bb.login("bob", device="new", since=0)
    bodies = [f["body"] or f["meta"]["event"] for f in again.pushed("msg")]
    assert bodies == ["joined", "one", "left", "joined"]


@pytest_twisted.inlineCallbacks
def test_who_hears_each_event(bb: Realm) -> Any:
    p = yield users(bb, "alice", "bob", "carol", "dave")
    yield play(
        p,
        [
            ("alice", "create_group", {"group": "#g", "visibility": "invite"}, "ok"),
            ("alice", "invite", {"group": "#g", "user": "bob"}, "ok"),
            ("bob", "join", {"group": "#g"}, "ok"),
            ("alice", "invite", {"group": "#g", "user": "carol"}, "ok"),
            ("alice", "ban", {"group": "#g", "user": "dave"}, "ok"),
            ("alice", "unban", {"group": "#g", "user": "dave"}, "ok"),
            ("alice", "kick", {"group": "#g", "user": "bob"}, "ok"),
            ("alice", "delete_group", {"group": "#g"}, "ok"),
            ("alice", "delete_group", {"group": "#g"}, "no_such_group"),
            ("bob", "create_group", {"group": "#g"}, "ok"),
        ],
    )
    for name in p:
        yield p[name].fence()
    assert events(p["alice"]) == [
        "created", "invited", "joined", "invited", "banned", "unbanned", "kicked", "deleted",
    ]  # fmt: skip
    assert events(p["bob"]) == [
        "invited",
        "joined",
        "invited",
        "banned",
        "unbanned",
        "kicked",
        "created",
    ]
    assert events(p["carol"]) == ["invited"]
    assert events(p["dave"]) == ["banned"]  # not told of the unban


@pytest_twisted.inlineCallbacks
def test_the_order_of_the_checks(bb: Realm) -> Any:
    """Types first, then the group's address, the user acted on, the group's
    existence, and only then the request's own rules (the values of its fields)."""
    p = yield users(bb, "alice", "bob")
    yield play(
        p,
        [
            ("alice", "create_group", {"group": "#g"}, "ok"),
            ("bob", "join", {"group": "#g"}, "ok"),
            ("alice", "kick", {"group": "#g", "user": "nobody", "reason": 5}, "bad_request"),
            ("alice", "kick", {"group": "#-g", "user": "nobody", "reason": "x"}, "bad_address"),
            ("alice", "kick", {"group": "#nog", "user": "nobody", "reason": "x"}, "no_such_user"),
            ("alice", "kick", {"group": "#nog", "user": "bob", "reason": "a\nb"}, "no_such_group"),
            ("alice", "kick", {"group": "#g", "user": "nobody", "reason": "a\nb"}, "no_such_user"),
            (
                "alice",
                "ban",
                {"group": "#g", "user": "nobody", "reason": "r" * 513},
                "no_such_user",
            ),
            ("alice", "set_topic", {"group": "#nog", "topic": "a\u202eb"}, "no_such_group"),
            ("bob", "set_topic", {"group": "#g", "topic": "t" * 513}, "forbidden"),
            (
                "alice",
                "set_role",
                {"group": "#nog", "user": "bob", "role": "king"},
                "no_such_group",
            ),
            ("bob", "set_role", {"group": "#g", "user": "bob", "role": "king"}, "forbidden"),
            ("alice", "set_group", {"group": "#nog", "limit": -1}, "no_such_group"),
            ("bob", "set_group", {"group": "#g", "limit": -1}, "forbidden"),
            ("alice", "set_voice", {"group": "#g", "user": "nobody"}, "bad_request"),
            ("alice", "create_group", {"group": "#g", "topic": "a\u202eb"}, "group_exists"),
            ("alice", "create_group", {"group": "#-x", "visibility": "x"}, "bad_address"),
        ],
    )
