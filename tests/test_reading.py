"""Read markers, the conversation list, the read-receipt switch and typing notices:
protocol logic over StringTransport (a real realm on a MemoryStore, a Clock)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from chatproto.mentions import mentions
from chatproto.realm.reading import MARK_BURST, MARK_RATE, TYPING_BURST, TYPING_RATE
from chatproto.testing import connect_string_transport, frame, frames
from tests.test_protocol import clock_fixture, logged_in_clear, realm_fixture  # noqa: F401


def ask(proto: Any, transport: Any, req: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Send ``req`` (id 9); the reply and the other frames that came with it."""
    proto.dataReceived(frame({**req, "id": 9}))
    got = frames(transport)
    [reply] = [f for f in got if f.get("id") == 9]
    return reply, [f for f in got if f.get("id") != 9]


def send(proto: Any, transport: Any, to: str, body: str) -> int:
    reply, _ = ask(proto, transport, {"type": "send", "to": to, "body": body})
    assert reply["type"] == "result", reply
    return int(reply["pos"])


def test_mention_rule() -> None:
    assert mentions("hi @alice", "alice")
    assert mentions("@ALICE: look", "alice")
    assert mentions("thanks @alice.", "alice")
    assert mentions("ping @alice@example.org", "alice")
    assert not mentions("mail bob@alice.org", "alice")
    assert not mentions("hi @alicex", "alice")
    assert not mentions("hi @alice.b", "alice")
    assert not mentions("hi @alice-b", "alice")
    assert not mentions("hi alice", "alice")
    assert mentions("@a.b rocks", "a.b") and not mentions("@aXb", "a.b")
    # letters and digits of any script: not part of the name, nor before the @
    assert not mentions("hi @alice\u00e9", "alice") and not mentions("@alice\u0663", "alice")
    assert not mentions("caf\u00e9@alice", "alice")
    assert not mentions("@alice.\u00e9t\u00e9", "alice")
    assert mentions("@alice\u2019s turn", "alice") and mentions("\u00ab@alice\u00bb", "alice")


def test_conversation_list_unread_and_markers(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    carol, ct = logged_in_clear(realm, clock, "carol")
    send(bob, bt, "alice", "one")
    p2 = send(bob, bt, "alice", "two")
    send(carol, ct, "alice", "hey")
    send(alice, at, "carol", "yo")  # alice's own item is never unread
    reply, _ = ask(alice, at, {"type": "conversations"})
    convs = reply["conversations"]
    assert [c["with"] for c in convs] == ["carol@localhost", "bob@localhost"]
    assert convs[0]["unread"] == 1 and convs[0]["last"]["body"] == "yo"
    assert convs[1] == {
        **convs[1],
        "unread": 2,
        "read": 0,
        "last": {**convs[1]["last"], "body": "two", "pos": p2},
    }
    assert reply["read_receipts"] is True
    assert "peer_read" not in convs[1] and "mentions" not in convs[1]
    # alice reads bob's first message: one unread left; bob is told
    first = convs[1]["last"]["pos"] - 1
    reply, pushed = ask(alice, at, {"type": "mark_read", "with": "BOB", "pos": first})
    assert reply == {"type": "result", "id": 9, "with": "bob@localhost", "pos": first}
    assert pushed == [
        {"type": "read", "with": "bob@localhost", "user": "alice@localhost", "pos": first}
    ]
    assert frames(bt) == [
        {"type": "read", "with": "alice@localhost", "user": "alice@localhost", "pos": first}
    ]
    assert [f for f in frames(ct) if f["type"] == "read"] == []  # not carol's conversation
    reply, _ = ask(alice, at, {"type": "conversations"})
    bobs = reply["conversations"][1]
    assert bobs["read"] == first and bobs["unread"] == 1
    # bob sees how far alice read
    reply, _ = ask(bob, bt, {"type": "conversations"})
    [withalice] = reply["conversations"]
    assert withalice["peer_read"] == first and withalice["unread"] == 0


def test_markers_never_move_back_and_are_clamped(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    p = send(bob, bt, "alice", "hi")
    reply, _ = ask(alice, at, {"type": "mark_read", "with": "bob", "pos": 10**9})
    assert reply["pos"] == p  # the newest position, not past it
    reply, pushed = ask(alice, at, {"type": "mark_read", "with": "bob", "pos": 1})
    assert reply["pos"] == p and pushed == []  # unchanged: nobody is told
    assert frames(bt) == [
        {"type": "read", "with": "alice@localhost", "user": "alice@localhost", "pos": p}
    ]


def test_markers_sync_to_the_users_other_devices(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice", "laptop")
    phone, pt = logged_in_clear(realm, clock, "alice", "phone")
    bob, bt = logged_in_clear(realm, clock, "bob")
    p = send(bob, bt, "alice", "hi")
    frames(pt)
    ask(alice, at, {"type": "mark_read", "with": "bob", "pos": p})
    assert frames(pt) == [
        {"type": "read", "with": "bob@localhost", "user": "alice@localhost", "pos": p}
    ]
    reply, _ = ask(phone, pt, {"type": "conversations"})
    assert reply["conversations"][0]["read"] == p and reply["conversations"][0]["unread"] == 0


def test_read_receipts_switch(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    p = send(bob, bt, "alice", "hi")
    reply, _ = ask(alice, at, {"type": "set_read_receipts", "share": False})
    assert reply == {"type": "result", "id": 9}
    frames(bt)
    reply, pushed = ask(alice, at, {"type": "mark_read", "with": "bob", "pos": p})
    assert reply["pos"] == p and len(pushed) == 1  # her own sessions still are told
    assert frames(bt) == []  # bob is not
    reply, _ = ask(bob, bt, {"type": "conversations"})
    assert "peer_read" not in reply["conversations"][0]
    reply, _ = ask(alice, at, {"type": "conversations"})
    assert reply["read_receipts"] is False and reply["conversations"][0]["read"] == p
    assert realm.store.user_prefs == {("alice@localhost", "read_receipts"): "off"}
    ask(alice, at, {"type": "set_read_receipts", "share": True})
    reply, _ = ask(bob, bt, {"type": "conversations"})
    assert reply["conversations"][0]["peer_read"] == p
    assert realm.store.user_prefs == {}


def test_groups_in_the_list_counts_mentions_and_read_by(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    carol, ct = logged_in_clear(realm, clock, "carol")
    ask(alice, at, {"type": "create_group", "group": "#dev"})
    ask(bob, bt, {"type": "join", "group": "#dev"})
    send(bob, bt, "#dev", "hello @alice")
    send(bob, bt, "#dev", "and @alicex is not you")
    last = send(bob, bt, "#dev", "@Alice again")
    reply, _ = ask(alice, at, {"type": "conversations"})
    [dev] = reply["conversations"]
    assert dev["with"] == "#dev@localhost" and dev["unread"] == 3 and dev["mentions"] == 2
    assert dev["read_by"] == 0 and dev["last"]["pos"] == last
    ask(alice, at, {"type": "mark_read", "with": "#dev", "pos": last})
    assert frames(bt) == []  # group markers are not pushed to the members
    reply, _ = ask(bob, bt, {"type": "conversations"})
    assert reply["conversations"][0]["read_by"] == 1  # alice
    assert reply["conversations"][0]["unread"] == 0  # his own; events never count
    # a non-member neither marks nor types in the group
    reply, _ = ask(carol, ct, {"type": "mark_read", "with": "#dev", "pos": last})
    assert reply["code"] == "not_member"
    reply, _ = ask(carol, ct, {"type": "typing", "with": "#dev"})
    assert reply["code"] == "not_member"
    reply, _ = ask(carol, ct, {"type": "conversations"})
    assert reply["conversations"] == []


def test_a_member_sees_the_group_from_their_join_only(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    ask(alice, at, {"type": "create_group", "group": "#dev"})
    send(alice, at, "#dev", "before bob")
    ask(bob, bt, {"type": "join", "group": "#dev"})
    reply, _ = ask(bob, bt, {"type": "conversations"})
    [dev] = reply["conversations"]
    assert dev["unread"] == 0 and dev["last"]["kind"] == "event"


@pytest.mark.parametrize(
    "req",
    [
        {"type": "mark_read", "with": "bob"},
        {"type": "mark_read", "with": "bob", "pos": -1},
        {"type": "mark_read", "with": "bob", "pos": "5"},
        {"type": "mark_read", "pos": 5},
        {"type": "set_read_receipts"},
        {"type": "set_read_receipts", "share": 1},
        {"type": "conversations", "limit": 0},
        {"type": "conversations", "limit": 501},
        {"type": "typing"},
        {"type": "typing", "with": "bob", "typing": "yes"},
    ],
)
def test_bad_fields(realm: Any, clock: Clock, req: dict[str, Any]) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    realm.create_user("bob", "password1")
    reply, _ = ask(alice, at, req)
    assert reply["code"] == "bad_request" and not at.disconnecting


def test_unknown_peer_and_remote_realm(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    reply, _ = ask(alice, at, {"type": "mark_read", "with": "nobody", "pos": 1})
    assert reply["code"] == "no_such_user"
    reply, _ = ask(alice, at, {"type": "typing", "with": "bob@example.net"})
    assert reply["code"] == "remote_realm"
    reply, _ = ask(alice, at, {"type": "mark_read", "with": "#nogroup", "pos": 1})
    assert reply["code"] == "no_such_group"


def test_requests_need_login(realm: Any) -> None:
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": "h"}))
    frames(transport)
    for kind in ("conversations", "mark_read", "typing", "set_read_receipts"):
        proto.dataReceived(frame({"type": kind, "id": 1}))
        assert frames(transport)[0]["code"] == "not_authenticated"


def test_mark_read_is_rate_limited(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    p = send(bob, bt, "alice", "hi")
    for _ in range(MARK_BURST):
        reply, _ = ask(alice, at, {"type": "mark_read", "with": "bob", "pos": p})
        assert reply["type"] == "result"
    reply, _ = ask(alice, at, {"type": "mark_read", "with": "bob", "pos": p})
    assert reply["code"] == "rate_limited" and reply["retry_after"] == round(1 / MARK_RATE, 3)
    clock.advance(1 / MARK_RATE)
    reply, _ = ask(alice, at, {"type": "mark_read", "with": "bob", "pos": p})
    assert reply["type"] == "result"
    # another connection has its own bucket
    other, ot = logged_in_clear(realm, clock, "alice", "phone")
    reply, _ = ask(other, ot, {"type": "mark_read", "with": "bob", "pos": p})
    assert reply["type"] == "result"


def test_typing_reaches_the_other_end_and_is_never_stored(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    carol, ct = logged_in_clear(realm, clock, "carol")
    items = len(realm.store.items)
    reply, _ = ask(alice, at, {"type": "typing", "with": "bob"})
    assert reply == {"type": "result", "id": 9, "with": "bob@localhost"}
    assert frames(bt) == [
        {"type": "typing", "with": "alice@localhost", "user": "alice@localhost", "typing": True}
    ]
    ask(alice, at, {"type": "typing", "with": "bob", "typing": False})
    assert frames(bt)[0]["typing"] is False
    assert frames(ct) == []
    assert len(realm.store.items) == items  # nothing stored
    ask(alice, at, {"type": "create_group", "group": "#dev"})
    ask(bob, bt, {"type": "join", "group": "#dev"})
    ask(carol, ct, {"type": "join", "group": "#dev"})
    frames(at), frames(bt), frames(ct)
    items = len(realm.store.items)
    reply, pushed = ask(alice, at, {"type": "typing", "with": "#dev"})
    assert reply["with"] == "#dev@localhost" and pushed == []  # not to oneself
    want = {"type": "typing", "with": "#dev@localhost", "user": "alice@localhost", "typing": True}
    assert frames(bt) == [want] and frames(ct) == [want]
    assert len(realm.store.items) == items


def test_typing_is_rate_limited(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    _, bt = logged_in_clear(realm, clock, "bob")
    for _n in range(TYPING_BURST):
        assert ask(alice, at, {"type": "typing", "with": "bob"})[0]["type"] == "result"
    reply, _ = ask(alice, at, {"type": "typing", "with": "bob"})
    assert reply["code"] == "rate_limited" and reply["retry_after"] == round(1 / TYPING_RATE, 3)
    assert len(frames(bt)) == TYPING_BURST  # the refused one reached nobody
    clock.advance(1 / TYPING_RATE)
    assert ask(alice, at, {"type": "typing", "with": "bob"})[0]["type"] == "result"


def test_deleting_an_account_drops_its_markers_and_switch(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    p = send(bob, bt, "alice", "hi")
    ask(alice, at, {"type": "mark_read", "with": "bob", "pos": p})
    ask(alice, at, {"type": "set_read_receipts", "share": False})
    realm.delete_user("alice")
    assert realm.store.reads == {} and realm.store.user_prefs == {}
    assert realm.reading.shares("alice@localhost")


def search(proto: Any, transport: Any, **fields: Any) -> dict[str, Any]:
    reply, _ = ask(proto, transport, {"type": "search", **fields})
    return reply


def bodies(reply: dict[str, Any]) -> list[str]:
    return [m["body"] for m in reply["messages"]]


def test_search_has_the_permissions_of_history(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    carol, ct = logged_in_clear(realm, clock, "carol")
    send(bob, bt, "alice", "lunch today?")
    send(bob, bt, "carol", "lunch with carol")  # not alice's
    ask(alice, at, {"type": "create_group", "group": "#dev"})
    send(alice, at, "#dev", "lunch before carol joined")
    ask(carol, ct, {"type": "join", "group": "#dev"})
    send(alice, at, "#dev", "Lunch after carol joined")
    assert bodies(search(alice, at, query="lunch")) == [
        "Lunch after carol joined",
        "lunch before carol joined",
        "lunch today?",
    ]
    # carol: her DM, and the group from her join on (its history rule is "joined")
    assert bodies(search(carol, ct, query="LUNCH")) == [
        "Lunch after carol joined",
        "lunch with carol",
    ]
    assert bodies(search(carol, ct, query="lunch", **{"with": "#dev"})) == [
        "Lunch after carol joined"
    ]
    assert bodies(search(alice, at, query="lunch", **{"with": "bob"})) == ["lunch today?"]
    # a non-member cannot search a group; nor a former member
    reply = search(bob, bt, query="lunch", **{"with": "#dev"})
    assert reply["code"] == "not_member"
    ask(carol, ct, {"type": "leave", "group": "#dev"})
    assert search(carol, ct, query="lunch", **{"with": "#dev"})["code"] == "not_member"
    assert bodies(search(carol, ct, query="lunch")) == ["lunch with carol"]
    assert search(bob, bt, query="x", **{"with": "#nope"})["code"] == "no_such_group"


def test_search_pages_newest_first(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    for i in range(5):
        send(bob, bt, "alice", f"note {i}")
    page = search(alice, at, query="note", limit=2)
    assert bodies(page) == ["note 4", "note 3"]
    page = search(alice, at, query="note", limit=2, before=page["messages"][-1]["pos"])
    assert bodies(page) == ["note 2", "note 1"]
    page = search(alice, at, query="note", limit=2, before=page["messages"][-1]["pos"])
    assert bodies(page) == ["note 0"]


def test_search_follows_edits_and_forgets_deletes(realm: Any, clock: Clock) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    bob, bt = logged_in_clear(realm, clock, "bob")
    reply, _ = ask(bob, bt, {"type": "send", "to": "alice", "body": "meet at noon"})
    msg_id = reply["msg_id"]
    assert ask(bob, bt, {"type": "edit", "msg_id": msg_id, "body": "meet at five"})[0]["type"] == (
        "result"
    )
    [found] = search(alice, at, query="five")["messages"]
    assert found["msg_id"] == msg_id and found["body"] == "meet at five"
    assert search(alice, at, query="noon")["messages"] == []
    ask(bob, bt, {"type": "delete", "msg_id": msg_id})
    assert search(alice, at, query="meet")["messages"] == []


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"query": 5},
        {"query": "   ...  "},
        {"query": "x" * 257},
        {"query": " ".join("w" * 17)},
        {"query": "a", "limit": 0},
        {"query": "a", "limit": 51},
        {"query": "a", "before": -1},
        {"query": "a", "with": 3},
    ],
)
def test_search_bad_fields(realm: Any, clock: Clock, fields: dict[str, Any]) -> None:
    alice, at = logged_in_clear(realm, clock, "alice")
    assert search(alice, at, **fields)["code"] == "bad_request"


def test_search_is_rate_limited(realm: Any, clock: Clock) -> None:
    from chatproto.realm.reading import SEARCH_BURST, SEARCH_RATE

    alice, at = logged_in_clear(realm, clock, "alice")
    for _n in range(SEARCH_BURST):
        assert search(alice, at, query="x")["type"] == "result"
    reply = search(alice, at, query="x")
    assert reply["code"] == "rate_limited" and reply["retry_after"] == round(1 / SEARCH_RATE, 3)


def test_conversations_is_rate_limited(realm: Any, clock: Clock) -> None:
    """A conversation list costs the store a few queries per conversation (up to 500)
    and one count over each one's unread items: 50 requests at once from one
    connection held another user's history 5 s.  Each connection has a bucket."""
    from chatproto.realm.reading import CONVERSATIONS_BURST, CONVERSATIONS_RATE

    alice, at = logged_in_clear(realm, clock, "alice")
    other, ot = logged_in_clear(realm, clock, "alice", "other")
    for _n in range(CONVERSATIONS_BURST):
        assert ask(alice, at, {"type": "conversations"})[0]["type"] == "result"
    reply = ask(alice, at, {"type": "conversations"})[0]
    wait = round(1 / CONVERSATIONS_RATE, 3)
    assert reply["code"] == "rate_limited" and reply["retry_after"] == wait
    assert ask(other, ot, {"type": "conversations"})[0]["type"] == "result"  # its own
    clock.advance(wait)
    assert ask(alice, at, {"type": "conversations"})[0]["type"] == "result"
    assert realm.stats.refused["conversations"] == 1
