"""Black-box: the requests of a logged-in session other than the group requests --
send, tags, history, react, edit, delete, who, ack, set_status, typing, read
markers, conversations, search and the moderation requests -- over loopback TCP,
each checked against what PROTOCOL.md says of its fields, errors and result."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.blackbox import PW, Realm, errcode
from tests.conftest import until


@pytest.fixture
def bb(tmp_path: Any) -> Any:
    realm = Realm.open(tmp_path, send_burst=10_000, send_rate=10_000.0)
    yield realm
    realm.close()


# send ----------------------------------------------------------------------------------

#: send fields -> the code (or "ok"), for alice, with bob and #dev existing.
SENDS = [
    ({"to": "bob", "body": "hi"}, "ok"),
    ({"to": "BOB@LocalHost.", "body": "hi"}, "ok"),
    ({"to": "alice", "body": "a note to self"}, "ok"),
    ({"to": "bob", "body": ""}, "ok"),
    ({"to": "bob", "body": "x" * 16384}, "ok"),
    ({"to": "bob", "body": "x" * 16385}, "too_large"),
    ({"to": "bob", "body": "\u00e9" * 8192}, "ok"),  # 16384 bytes
    ({"to": "bob", "body": "\u00e9" * 8193}, "too_large"),
    ({"to": "bob", "body": "\U0001f600" * 4096}, "ok"),
    ({"to": "bob", "body": "\U0001f600" * 4097}, "too_large"),
    ({"to": "bob", "body": "tab\tnewline\n bold\x02 colour\x03 \x01ACTION x\x01 \u202eltr"}, "ok"),
    ({"to": "bob", "body": "esc \x1b[2J"}, "bad_request"),
    ({"to": "bob", "body": "csi \x9b"}, "bad_request"),
    ({"to": "bob", "body": "c1 \x85"}, "bad_request"),
    ({"to": "bob", "body": 5}, "bad_request"),
    ({"to": "bob", "body": None}, "bad_request"),
    ({"to": "bob", "body": ["x"]}, "bad_request"),
    ({"to": 5, "body": "x"}, "bad_request"),
    ({"body": "x"}, "bad_request"),
    ({"to": "bob", "body": "x", "notice": True}, "ok"),
    ({"to": "bob", "body": "x", "notice": False}, "ok"),
    ({"to": "bob", "body": "x", "notice": 1}, "bad_request"),
    ({"to": "bob", "body": "x", "notice": "true"}, "bad_request"),
    ({"to": "bob", "body": "x", "nonce": "n" * 64}, "ok"),
    ({"to": "bob", "body": "x", "nonce": "m" * 65}, "bad_request"),
    ({"to": "bob", "body": "x", "nonce": ""}, "bad_request"),
    ({"to": "bob", "body": "x", "nonce": 5}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+draft/react": "\U0001f44d", "+a": ""}}, "ok"),
    ({"to": "bob", "body": "x", "tags": {"+example.org/x-1": "v"}}, "ok"),
    ({"to": "bob", "body": "x", "tags": {"+a": "x" * 4091}}, "ok"),  # +a=... 4094 bytes
    ({"to": "bob", "body": "x", "tags": {"+a": "x" * 4092}}, "too_large"),
    ({"to": "bob", "body": "x", "tags": {"a": "x"}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+": "x"}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+\u00e9": "x"}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+a b": "x"}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+a": 1}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+a": "x\ny"}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {"+a": "x\u202ey"}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": {}}, "bad_request"),
    ({"to": "bob", "body": "x", "tags": ["+a"]}, "bad_request"),
    ({"to": "bob", "body": "x", "reply_to": ""}, "bad_request"),
    ({"to": "bob", "body": "x", "reply_to": "m" * 129}, "bad_request"),
    ({"to": "bob", "body": "x", "reply_to": "m" * 128}, "not_found"),
    ({"to": "bob", "body": "x", "reply_to": 5}, "bad_request"),
    ({"to": "nobody", "body": "x"}, "no_such_user"),
    ({"to": "carol@example.org", "body": "x"}, "remote_realm"),
    ({"to": "-bob", "body": "x"}, "bad_address"),
    ({"to": "bob@", "body": "x"}, "bad_address"),
    ({"to": "bob@exa_mple.org", "body": "x"}, "bad_address"),
    ({"to": "b\u200bob", "body": "x"}, "bad_address"),
    ({"to": "", "body": "x"}, "bad_address"),
    ({"to": "#", "body": "x"}, "bad_address"),
    ({"to": "##dev", "body": "x"}, "bad_address"),
    ({"to": "#dev", "body": "x"}, "ok"),
    ({"to": "#DEV@localhost", "body": "x"}, "ok"),
    ({"to": "#nogroup", "body": "x"}, "no_such_group"),
    ({"to": "#dev@example.org", "body": "x"}, "remote_realm"),
    ({"to": "#ops", "body": "x"}, "not_member"),
    # checked in this order: size before address, fields before size
    ({"to": "nobody", "body": "x" * 16385}, "too_large"),
    ({"to": "bob", "body": "x" * 16385, "notice": 1}, "bad_request"),
]


@pytest_twisted.inlineCallbacks
def test_send_fields_and_errors(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    yield alice.req("create_group", group="#dev")
    yield bob.req("create_group", group="#ops")
    for fields, want in SENDS:
        r = yield alice.req("send", **fields)
        assert errcode(r) == want, (fields, r)
        if want == "ok":
            assert list(r) == ["type", "id", "pos", "msg_id", "ts"]
            assert type(r["pos"]) is int and type(r["msg_id"]) is str
            assert type(r["ts"]) is float


@pytest_twisted.inlineCallbacks
def test_a_send_is_delivered_before_its_result_and_the_server_sets_from_and_ts(
    bb: Realm,
) -> Any:
    alice = yield bb.user("alice")
    alice2 = yield bb.login("alice", device="phone")
    bob = yield bb.user("bob")
    before = yield alice.fence()
    # fields a client has no say in: ignored
    r = yield alice.req(
        "send", to="bob", body="hi", ts=1.0, pos=1, msg_id="mine", kind="x", **{"from": "bob"}
    )
    after = yield alice.fence()
    assert before == [] or all(f["type"] != "msg" for f in before)
    msg = {"type": "msg", "pos": r["pos"], "msg_id": r["msg_id"], "kind": "text"}
    msg |= {"from": "alice@localhost", "to": "bob@localhost", "ts": r["ts"], "body": "hi"}
    assert after == [msg, r]  # the sender's own connection: the msg first
    assert list(after[0]) == list(msg)
    assert r["ts"] > 1_700_000_000 and r["msg_id"] != "mine"
    for peer in (alice2, bob):
        got = yield peer.wait_for(lambda f: f.get("pos") == r["pos"])
        assert got == msg


@pytest_twisted.inlineCallbacks
def test_send_meta_notice_reply_and_tags(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    first = yield bob.req("send", to="alice", body="lunch?")
    r = yield alice.req(
        "send", to="bob", body="yes", notice=True, reply_to=first["msg_id"], tags={"+a": "b"}
    )
    got = yield bob.wait_for(lambda f: f.get("pos") == r["pos"])
    assert got["meta"] == {"notice": True, "tags": {"+a": "b"}, "reply_to": first["msg_id"]}
    assert list(got["meta"]) == ["notice", "tags", "reply_to"]
    r2 = yield alice.req("send", to="bob", body="x", notice=False)
    got = yield bob.wait_for(lambda f: f.get("pos") == r2["pos"])
    assert "meta" not in got
    # a reply to an item of another conversation, or one the sender cannot read
    other = yield alice.req("send", to="alice", body="note")
    r = yield alice.req("send", to="bob", body="re", reply_to=other["msg_id"])
    assert r["code"] == "bad_request"
    carol = yield bb.user("carol")
    r = yield carol.req("send", to="bob", body="re", reply_to=first["msg_id"])
    assert r["code"] == "not_found"
    page = yield bob.req("history", **{"with": "alice"})
    assert [m["body"] for m in page["messages"]] == ["lunch?", "yes", "x"]
    assert page["messages"][1]["meta"]["reply_to"] == first["msg_id"]


@pytest_twisted.inlineCallbacks
def test_a_nonce_makes_a_send_idempotent_for_the_user(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    other = yield bb.login("alice", device="other")
    bob = yield bb.user("bob")
    # in flight at once, on two connections: one message
    d1 = alice.req("send", to="bob", body="once", nonce="n1")
    d2 = other.req("send", to="bob", body="once", nonce="n1")
    r1 = yield d1
    r2 = yield d2
    strip = lambda r: {k: r[k] for k in ("pos", "msg_id", "ts")}  # noqa: E731
    assert strip(r1) == strip(r2)
    # whatever to and body say, once the fields have their types
    r3 = yield alice.req("send", to="-invalid", body="\x1b", nonce="n1")
    assert strip(r3) == strip(r1)
    r4 = yield alice.req("send", to="bob", nonce="n1")
    assert r4["code"] == "bad_request"
    # another user's nonce is another nonce; a failed send is not remembered
    r5 = yield bob.req("send", to="alice", body="x", nonce="n1")
    assert r5["pos"] != r1["pos"]
    r6 = yield alice.req("send", to="nobody", body="x", nonce="n2")
    assert r6["code"] == "no_such_user"
    r7 = yield alice.req("send", to="bob", body="now", nonce="n2")
    assert r7["type"] == "result"
    page = yield bob.req("history", **{"with": "alice"})
    assert [m["body"] for m in page["messages"]] == ["once", "x", "now"]


# tags ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_tags_are_pushed_not_stored(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    alice2 = yield bb.login("alice", device="phone")
    bob = yield bb.user("bob")
    yield alice.fence()
    r = yield alice.req("tags", to="bob", tags={"+typing": "active"}, ts=5.0)
    assert list(r) == ["type", "id", "tags_id", "ts"] and r["ts"] > 1_700_000_000
    frame = {"type": "tags", "id": r["tags_id"], "from": "alice@localhost"}
    frame |= {"to": "bob@localhost", "ts": r["ts"], "tags": {"+typing": "active"}}
    for peer in (bob, alice2):
        got = yield peer.wait_for(lambda f: f.get("type") == "tags")
        assert got == frame and list(got) == list(frame)
    assert (yield alice.fence()) == [r]  # not the sending connection
    r = yield alice.req("tags", to="alice", tags={"+a": "b"})
    assert [f["type"] for f in (yield alice.fence())] == ["tags", "result"]
    page = yield bob.req("history", **{"with": "alice"})
    assert page["messages"] == []
    for fields, code in [
        ({"to": "bob"}, "bad_request"),
        ({"to": "bob", "tags": {}}, "bad_request"),
        ({"to": "bob", "tags": {"+a": "x" * 4092}}, "too_large"),
        ({"to": "nobody", "tags": {"+a": "b"}}, "no_such_user"),
        ({"to": "#nogroup", "tags": {"+a": "b"}}, "no_such_group"),
        ({"to": "-x", "tags": {"+a": "b"}}, "bad_address"),
    ]:
        r = yield alice.req("tags", **fields)
        assert r["code"] == code, (fields, r)


# history -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_history_pages(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    pos = []
    for i in range(7):
        peer = alice if i % 2 else bob
        r = yield peer.req("send", to="bob" if peer is alice else "alice", body=f"m{i}")
        pos.append(r["pos"])
    yield bob.req(
        "react",
        msg_id=(yield alice.req("history", **{"with": "bob"}))["messages"][0]["msg_id"],
        emoji="x",
    )

    def page(**fields: Any) -> Any:
        return alice.req("history", **{"with": "bob", **fields}).addCallback(
            lambda r: [m["pos"] for m in r["messages"]] if r["type"] == "result" else r["code"]
        )

    assert (yield page()) == pos  # reactions are not in pages
    assert (yield page(limit=3)) == pos[-3:]
    assert (yield page(limit=3, before=pos[-3])) == pos[1:4]
    assert (yield page(limit=3, before=pos[1])) == pos[:1]
    assert (yield page(limit=3, after=0)) == pos[:3]
    assert (yield page(limit=3, after=pos[2])) == pos[3:6]
    assert (yield page(limit=3, after=pos[6])) == []
    assert (yield page(before=0)) == []
    assert (yield page(after=2**53 - 1)) == []
    assert (yield page(limit=200)) == pos
    assert (yield page(before=None, after=pos[4])) == pos[5:]  # null is absent
    for fields in (
        {"limit": 0}, {"limit": 201}, {"limit": -1}, {"limit": 1.0}, {"limit": True},
        {"before": -1}, {"after": 2**53}, {"before": "5"}, {"before": 5, "after": 1},
    ):  # fmt: skip
        assert (yield page(**fields)) == "bad_request", fields
    # the peer is not looked up; a bad address is
    for with_, want in (("nobody", []), ("x@example.org", []), ("alice", [])):
        r = yield alice.req("history", **{"with": with_})
        assert r["messages"] == want, with_
    for with_, code in (
        ("-x", "bad_address"),
        ("#nogroup", "no_such_group"),
        ("#dev@other.example", "remote_realm"),  # (no federation)
        (5, "bad_request"),
    ):
        r = yield alice.req("history", **{"with": with_})
        assert r["code"] == code, with_
    r = yield alice.req("history")
    assert r["code"] == "bad_request"


# react, edit, delete -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_react_edit_delete(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    carol = yield bb.user("carol")
    m = (yield alice.req("send", to="bob", body="hello"))["msg_id"]
    react = []
    for peer, fields, want in [
        (bob, {"emoji": "\U0001f44d"}, "ok"),
        (bob, {"emoji": "\U0001f44d\U0001f3fd"}, "ok"),
        (alice, {"emoji": ":+1:"}, "ok"),
        (alice, {"emoji": "x" * 32}, "ok"),
        (alice, {"emoji": "x" * 33}, "bad_request"),
        (alice, {"emoji": ""}, "bad_request"),
        (alice, {"emoji": "a b"}, "bad_request"),
        (alice, {"emoji": "a\u00a0b"}, "bad_request"),
        (alice, {"emoji": "a\tb"}, "bad_request"),
        (alice, {"emoji": "a\u202eb"}, "bad_request"),
        (alice, {"emoji": "\ufe0f"}, "bad_request"),  # a variation selector alone
        (alice, {"emoji": "\u200d\u200d"}, "bad_request"),
        (alice, {"emoji": "\u0301"}, "bad_request"),
        (alice, {"emoji": "\u3164"}, "bad_request"),
        (alice, {"emoji": "\u2800"}, "bad_request"),
        (alice, {"emoji": "\U000e0041"}, "bad_request"),  # a tag character
        (alice, {"emoji": 5}, "bad_request"),
        (alice, {"emoji": "x", "remove": "yes"}, "bad_request"),
        (alice, {"emoji": "\U0001f389", "remove": True}, "ok"),  # never given: stored
        (carol, {"emoji": "x"}, "not_found"),
    ]:
        r = yield peer.req("react", msg_id=m, **fields)
        assert errcode(r) == want, (fields, r)
        if want == "ok":
            assert list(r) == ["type", "id", "pos", "msg_id", "ts"]
            react.append(r)
    got = yield alice.wait_for(lambda f: f.get("pos") == react[0]["pos"])
    assert got["kind"] == "reaction" and got["from"] == "bob@localhost"
    assert got["to"] == "alice@localhost" and got["body"] == ""
    assert got["meta"] == {"ref": m, "emoji": "\U0001f44d"}
    got = yield bob.wait_for(lambda f: f.get("pos") == react[-1]["pos"])
    assert got["meta"] == {"ref": m, "emoji": "\U0001f389", "remove": True}
    for fields, want in [
        ({"msg_id": m, "body": "hello, world"}, "ok"),
        ({"msg_id": m, "body": "x" * 16385}, "too_large"),
        ({"msg_id": "nothing", "body": "x" * 16385}, "too_large"),
        ({"msg_id": m, "body": "\x1b"}, "bad_request"),
        ({"msg_id": m}, "bad_request"),
        ({"msg_id": "m" * 129, "body": "x"}, "bad_request"),
        ({"msg_id": react[0]["msg_id"], "body": "x"}, "bad_request"),  # a reaction
        ({"msg_id": "nothing", "body": "x"}, "not_found"),
    ]:
        r = yield alice.req("edit", **fields)
        assert errcode(r) == want, (fields, r)
    r = yield bob.req("edit", msg_id=m, body="mine now")
    assert r["code"] == "forbidden"
    r = yield carol.req("edit", msg_id=m, body="x")
    assert r["code"] == "not_found"
    page = yield bob.req("history", **{"with": "alice"})
    [item] = page["messages"]
    assert item["body"] == "hello, world" and type(item["meta"]["edited"]) is float
    assert item["meta"]["reactions"] == {
        "\U0001f44d": ["bob@localhost"],
        "\U0001f44d\U0001f3fd": ["bob@localhost"],
        ":+1:": ["alice@localhost"],
        "x" * 32: ["alice@localhost"],
    }
    for peer, msg_id, want in [
        (bob, m, "forbidden"),
        (carol, m, "not_found"),
        (alice, react[0]["msg_id"], "bad_request"),
        (alice, "m" * 129, "bad_request"),
        (alice, m, "ok"),
        (alice, m, "not_found"),
    ]:
        r = yield peer.req("delete", msg_id=msg_id)
        assert errcode(r) == want, (msg_id, r)
    for type_, fields in (("react", {"emoji": "x"}), ("edit", {"body": "x"})):
        r = yield bob.req(type_, msg_id=m, **fields)
        assert r["code"] == "not_found"
    r = yield bob.req("send", to="alice", body="x", reply_to=m)
    assert r["code"] == "not_found"
    page = yield bob.req("history", **{"with": "alice"})
    assert page["messages"][0]["body"] == "" and page["messages"][0]["meta"] == {"deleted": True}


@pytest_twisted.inlineCallbacks
def test_at_most_100_edits_and_reactions_per_user_and_item_in_flight_too(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    m = (yield alice.req("send", to="alice", body="x"))["msg_id"]
    answers = []
    for i in range(60):
        answers.append(alice.req("react", msg_id=m, emoji="x", remove=bool(i % 2)))
    for i in range(50):
        answers.append(alice.req("edit", msg_id=m, body=f"v{i}"))
    codes = [errcode(r) for r in (yield defer.gatherResults(answers))]
    assert codes.count("ok") == 100 and codes.count("limit_reached") == 10
    r = yield alice.req("delete", msg_id=m)  # never refused for it
    assert r["type"] == "result"


# who, set_status -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_who_and_set_status(bb: Realm) -> Any:
    zoe = yield bb.user("zoe")
    yield bb.login("zoe", device="second")
    yield bb.login("zoe", device="quiet", quiet=True)
    alice = yield bb.user("alice")
    yield bb.user("kim", quiet=True)
    r = yield alice.req("who")
    assert r["users"] == [
        {"user": "alice@localhost", "sessions": 1},
        {"user": "zoe@localhost", "sessions": 2},
    ]
    for fields, want in [
        ({"user": "zoe"}, [{"user": "zoe@localhost", "sessions": 2}]),
        ({"user": "KIM"}, []),
        ({"user": "nobody"}, "no_such_user"),
        ({"user": "#dev"}, "bad_address"),
        ({"user": "x@example.org"}, "remote_realm"),
        ({"user": "zoe", "group": "#dev"}, "bad_request"),
        ({"group": "#nogroup"}, "no_such_group"),
        ({"group": "nogroup"}, "no_such_group"),  # read as #nogroup, like a group request's
        ({"group": "#-x"}, "bad_address"),
        ({"group": 5}, "bad_request"),
    ]:
        r = yield alice.req("who", **fields)
        assert (r["users"] if r["type"] == "result" else r["code"]) == want, fields
    # status: told to contacts (not the user's own sessions), even when unchanged
    yield zoe.req("send", to="alice", body="hi")
    for fields, want in [
        ({"status": "away", "text": "lunch"}, "ok"),
        ({"status": "away", "text": "lunch"}, "ok"),
        ({"status": "busy", "text": "t" * 256}, "ok"),
        ({"status": "busy", "text": "t" * 257}, "bad_request"),
        ({"status": "busy", "text": "a\nb"}, "bad_request"),
        ({"status": "offline"}, "bad_request"),
        ({"status": "Away"}, "bad_request"),
        ({"status": 1}, "bad_request"),
        ({}, "bad_request"),
        ({"status": "busy", "text": "meeting"}, "ok"),
    ]:
        r = yield zoe.req("set_status", **fields)
        assert errcode(r) == want, fields
        if want == "ok":
            assert r == {"type": "result", "id": r["id"]}
    yield until(lambda: len(alice.pushed("presence")) >= 4)
    statuses = [(f.get("status"), f.get("text")) for f in alice.pushed("presence")]
    assert statuses[-4:] == [
        ("away", "lunch"),
        ("away", "lunch"),
        ("busy", "t" * 256),
        ("busy", "meeting"),
    ]
    assert not zoe.pushed("presence") or all(
        f["user"] != "zoe@localhost" for f in zoe.pushed("presence")
    )
    r = yield alice.req("who", user="zoe")
    assert r["users"] == [
        {"user": "zoe@localhost", "sessions": 2, "status": "busy", "text": "meeting"}
    ]
    yield zoe.req("set_status", status="online")
    r = yield alice.req("who", user="zoe")
    assert r["users"] == [{"user": "zoe@localhost", "sessions": 2}]
    yield zoe.req("set_status", status="online", text="here")
    r = yield alice.req("who", user="zoe")
    assert r["users"] == [
        {"user": "zoe@localhost", "sessions": 2, "status": "online", "text": "here"}
    ]


# ack -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_ack_is_never_answered_but_by_an_error_and_moves_resume(bb: Realm) -> Any:
    alice = yield bb.user("alice", device="laptop")
    bob = yield bb.user("bob")
    pos = []
    for i in range(4):
        pos.append((yield bob.req("send", to="alice", body=f"m{i}"))["pos"])
    yield until(lambda: len(alice.pushed("msg")) == 4)
    yield alice.fence()
    for fields, code in [
        ({"pos": pos[1]}, None),
        ({"pos": 0}, None),  # acknowledges nothing
        ({"pos": pos[0]}, None),  # backwards: ignored
        ({}, "bad_request"),
        ({"pos": -1}, "bad_request"),
        ({"pos": 1.5}, "bad_request"),
        ({"pos": "5"}, "bad_request"),
        ({"pos": True}, "bad_request"),
        ({"pos": 2**53}, "bad_request"),
    ]:
        alice.send({"type": "ack", "id": "a", **fields})
        got = yield alice.fence()
        assert [f.get("code") for f in got] == ([] if code is None else [code]), fields
        if code is not None:
            assert got[0]["id"] == "a"
    yield alice.close()
    again = yield bb.login("alice", device="laptop")
    assert [f["pos"] for f in again.pushed("msg")] == pos[2:]
    # an ack past what the connection was sent counts as what it was sent
    again.send({"type": "ack", "pos": 2**53 - 1})
    yield again.fence()
    later = yield bob.req("send", to="alice", body="later")
    yield again.wait_for(lambda f: f.get("pos") == later["pos"])
    yield again.close()
    third = yield bb.login("alice", device="laptop")
    assert [f["pos"] for f in third.pushed("msg")] == [later["pos"]]


@pytest_twisted.inlineCallbacks
def test_an_ack_that_is_not_json_closes_like_any_other_frame(bb: Realm) -> Any:
    """``{"type":"ack","pos":07}`` is not JSON (a leading zero): bad_frame and the
    close, as for every other request, and the device's position does not move."""
    alice = yield bb.user("alice", device="laptop")
    bob = yield bb.user("bob")
    pos = []
    for i in range(2):
        pos.append((yield bob.req("send", to="alice", body=f"m{i}"))["pos"])
    yield until(lambda: len(alice.pushed("msg")) == 2)
    alice.send_raw(b'{"type":"ack","pos":0' + str(pos[1]).encode() + b"}")
    yield alice.lost
    assert alice.frames[-1]["code"] == "bad_frame" and "id" not in alice.frames[-1]
    again = yield bb.login("alice", device="laptop")
    assert [f["pos"] for f in again.pushed("msg")] == pos  # nothing was acknowledged


# typing --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_typing(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    alice2 = yield bb.login("alice", device="phone")
    bob = yield bb.user("bob")
    carol = yield bb.user("carol")
    yield alice.req("create_group", group="#dev")
    yield bob.req("join", group="#dev")
    r = yield alice.req("typing", **{"with": "BOB"})
    assert r == {"type": "result", "id": r["id"], "with": "bob@localhost"}
    got = yield bob.wait_for(lambda f: f["type"] == "typing")
    want = {"type": "typing", "with": "alice@localhost", "user": "alice@localhost", "typing": True}
    assert got == want and list(got) == list(want)
    r = yield alice.req("typing", **{"with": "#dev", "typing": False})
    assert r["with"] == "#dev@localhost"
    yield until(lambda: len(bob.pushed("typing")) == 2)
    assert bob.pushed("typing")[1] == {
        "type": "typing", "with": "#dev@localhost", "user": "alice@localhost", "typing": False,
    }  # fmt: skip
    yield alice.fence()
    yield alice2.fence()
    assert alice.pushed("typing") == alice2.pushed("typing") == []
    for fields, code in [
        ({"with": "bob", "typing": 1}, "bad_request"),
        ({}, "bad_request"),
        ({"with": "nobody"}, "no_such_user"),
        ({"with": "#nogroup"}, "no_such_group"),
    ]:
        r = yield alice2.req("typing", **fields)
        assert r["code"] == code, fields
    r = yield carol.req("typing", **{"with": "#dev"})
    assert r["code"] == "not_member"


# read markers, conversations -----------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_mark_read_and_read_receipts(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    m1 = yield bob.req("send", to="alice", body="one")
    m2 = yield bob.req("send", to="alice", body="two")
    yield alice.fence()
    r = yield alice.req("mark_read", **{"with": "Bob", "pos": m1["pos"]})
    assert r == {"type": "result", "id": r["id"], "with": "bob@localhost", "pos": m1["pos"]}
    read = {"type": "read", "with": "bob@localhost", "user": "alice@localhost", "pos": m1["pos"]}
    assert (yield alice.fence()) == [read, r]  # every session of the reader, this one too
    got = yield bob.wait_for(lambda f: f["type"] == "read")
    assert got == {**read, "with": "alice@localhost"}
    r = yield alice.req("mark_read", **{"with": "bob", "pos": 1})  # never backwards
    assert r["pos"] == m1["pos"] and (yield alice.fence()) == [r]
    r = yield alice.req("mark_read", **{"with": "bob", "pos": 2**53 - 1})  # clamped
    assert r["pos"] >= m2["pos"] and r["pos"] < 2**53 - 1
    for fields, code in [
        ({"with": "bob", "pos": 2**53}, "bad_request"),
        ({"with": "bob", "pos": -1}, "bad_request"),
        ({"with": "bob"}, "bad_request"),
        ({"with": "nobody", "pos": 1}, "no_such_user"),
        ({"with": "#nogroup", "pos": 1}, "no_such_group"),
        ({"with": "x@example.org", "pos": 1}, "remote_realm"),
    ]:
        r = yield alice.req("mark_read", **fields)
        assert r["code"] == code, fields
    conv = yield bob.req("conversations")
    assert conv["conversations"][0]["peer_read"] >= m2["pos"]
    yield until(lambda: len(bob.pushed("read")) == 2)
    # alice turns receipts off: bob no longer sees her marker, she still does
    for share, code in ((0, "bad_request"), (None, "bad_request"), (False, "ok")):
        r = yield alice.req("set_read_receipts", share=share)
        assert errcode(r) == code
    conv = yield bob.req("conversations")
    assert "peer_read" not in conv["conversations"][0]
    m3 = yield bob.req("send", to="alice", body="three")
    yield bob.fence()
    r = yield alice.req("mark_read", **{"with": "bob", "pos": m3["pos"]})
    yield alice.wait_for(lambda f: f["type"] == "read" and f["pos"] == m3["pos"])
    yield bob.fence()
    assert len(bob.pushed("read")) == 2
    mine = yield alice.req("conversations")
    assert mine["read_receipts"] is False and mine["conversations"][0]["read"] == m3["pos"]


@pytest_twisted.inlineCallbacks
def test_a_mention_is_no_part_of_a_longer_word_in_any_script(bb: Realm) -> Any:
    """PROTOCOL.md: the name of a mention is not followed by a letter, and the @
    follows none.  Letters are any script's: "@anaïs" and "café@ana" do not mention
    ana (the rule knew only A-Z, and counted both); "@ana\u2019s" (a right quotation mark) does."""
    ana = yield bb.user("ana")
    carol = yield bb.user("carol")
    yield carol.req("create_group", group="#fr")
    yield ana.req("join", group="#fr")
    for body in ("salut @ana\u00efs", "caf\u00e9@ana", "@ana.\u00e9t\u00e9", "@ana\u2019s turn"):
        r = yield carol.req("send", to="#fr", body=body)
        assert r["type"] == "result", r
    r = yield ana.req("conversations")
    fr = r["conversations"][0]
    assert (fr["with"], fr["unread"], fr["mentions"]) == ("#fr@localhost", 4, 1)


@pytest_twisted.inlineCallbacks
def test_conversations(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    carol = yield bb.user("carol")
    yield carol.req("create_group", group="#dev")
    yield alice.req("join", group="#dev")
    yield bob.req("send", to="alice", body="hi alice")
    yield alice.req("send", to="alice", body="note")
    yield carol.req("send", to="#dev", body="@alice look")
    yield carol.req("send", to="#dev", body="@ALICE. and bob@alice, @alice.b, x@alice")
    r = yield alice.req("conversations")
    assert list(r) == ["type", "id", "conversations", "read_receipts"]
    assert r["read_receipts"] is True
    convs = r["conversations"]
    assert [c["with"] for c in convs] == ["#dev@localhost", "alice@localhost", "bob@localhost"]
    dev, me, bob_ = convs
    assert dev["unread"] == 2 and dev["mentions"] == 2 and dev["read"] == 0
    assert dev["read_by"] == 0 and "peer_read" not in dev
    assert me["unread"] == 0 and "mentions" not in me
    assert bob_["unread"] == 1 and bob_["last"]["body"] == "hi alice"
    assert "type" not in bob_["last"]
    r = yield alice.req("conversations", limit=1)
    assert [c["with"] for c in r["conversations"]] == ["#dev@localhost"]
    # a reaction is the last item (and moves the conversation up); a deleted message
    # is not unread any more
    hi = bob_["last"]
    r = yield bob.req("react", msg_id=hi["msg_id"], emoji="x")
    convs = (yield alice.req("conversations"))["conversations"]
    assert convs[0]["with"] == "bob@localhost" and convs[0]["last"]["pos"] == r["pos"]
    assert convs[0]["last"]["kind"] == "reaction" and convs[0]["unread"] == 1
    yield bob.req("delete", msg_id=hi["msg_id"])
    yield carol.req("delete", msg_id=dev["last"]["msg_id"])
    convs = (yield alice.req("conversations"))["conversations"]
    assert [(c["with"], c["last"]["kind"], c["unread"], c.get("mentions")) for c in convs] == [
        ("#dev@localhost", "delete", 1, 1),
        ("bob@localhost", "delete", 0, None),
        ("alice@localhost", "text", 0, None),
    ]
    r = yield alice.req("conversations", limit=0)
    assert r["code"] == "bad_request"
    r = yield alice.req("conversations", limit=501)
    assert r["code"] == "bad_request"


# search --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_search_finds_a_word_with_a_dotted_capital_i_once_indexed_too(bb: Realm) -> Any:
    """ "İstanbul" was found by its own text right after it was sent (read directly)
    and no longer once the realm had indexed it (a second later): Python lower-cases
    İ to i + U+0307, which the index does not hold."""
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    yield bob.req("send", to="alice", body="\u0130stanbul trip")
    # (and a word-final capital sigma: PostgreSQL's index lower-cases it to U+03C3)
    sent = yield bob.req("send", to="alice", body="\u03a3\u039f\u03a6\u039f\u03a3")
    store: Any = bb.realm.store
    for _ in range(2):  # not indexed yet, then indexed
        r = yield alice.req("search", query="\u0130stanbul")
        assert [m["body"] for m in r["messages"]] == ["\u0130stanbul trip"], r
        r = yield alice.req("search", query="\u0130STANBUL")
        assert [m["body"] for m in r["messages"]] == ["\u0130stanbul trip"], r
        r = yield alice.req("search", query="\u03c3\u03bf\u03c6\u03bf\u03c2")
        assert [m["body"] for m in r["messages"]] == ["\u03a3\u039f\u03a6\u039f\u03a3"], r
        if not hasattr(store, "_read"):
            break  # (the memory store has no index)
        for _ in range(300):  # bounded: 15 s (the realm indexes after a quiet second)
            upto = yield store._read(lambda db: db.search_upto())
            if upto >= sent["pos"]:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert upto >= sent["pos"]


@pytest_twisted.inlineCallbacks
def test_search(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    yield bob.req("create_group", group="#dev")
    yield bob.req("send", to="#dev", body="lunch in the group")
    bodies = [
        "Lunch?",
        "lunchtime soon",
        "brunch",
        "plan a",
        "apples",
        "5 x 5",
        "50",
        "caf\u00e9",
        "snake_case",
        "cafe\u0301 noir",  # decomposed: the mark ends the word "cafe"
        "\ufb01le",  # the ligature fi: not "file" (no normalisation)
    ]
    for body in bodies:
        yield bob.req("send", to="alice", body=body)

    # each connection's search bucket holds 10: a connection per few searches
    conns = [alice]
    for i in range(3):
        conns.append((yield bb.login("alice", device=f"d{i}")))

    def found(**fields: Any) -> Any:
        conn = conns[0]
        conns.append(conns.pop(0))
        return conn.req("search", **fields).addCallback(
            lambda r: [m["body"] for m in r["messages"]] if r["type"] == "result" else r["code"]
        )

    assert (yield found(query="lunch")) == ["lunchtime soon", "Lunch?"]  # newest first
    assert (yield found(query="LUNCH", limit=1)) == ["lunchtime soon"]
    assert (yield found(query="a")) == ["plan a"]
    assert (yield found(query="5")) == ["5 x 5"]
    assert (yield found(query="cafe")) == ["cafe\u0301 noir"]
    assert (yield found(query="caf\u00e9")) == ["caf\u00e9"]
    assert (yield found(query="file")) == []
    assert (yield found(query="\ufb01le")) == ["\ufb01le"]
    assert (yield found(query="snake case")) == ["snake_case"]
    assert (yield found(query="lunch", **{"with": "#dev"})) == "not_member"
    assert (yield found(query="lunch", **{"with": "nobody"})) == []
    for fields in (
        {"query": ""}, {"query": "!?"}, {"query": "x" * 257}, {"query": " ".join(["w"] * 17)},
        {"query": "x", "limit": 0}, {"query": "x", "limit": 51}, {"query": "x", "before": -1},
        {},
    ):  # fmt: skip
        assert (yield found(**fields)) == "bad_request", fields
    assert (yield found(query="x" * 256)) == []
    assert (yield found(query=" ".join(["w"] * 16))) == []
    yield alice.req("join", group="#dev")
    assert (yield found(query="lunch", **{"with": "#dev"})) == []  # under "joined"
    page = yield alice.req("search", query="5 x")
    before = page["messages"][0]["pos"]
    assert (yield found(query="lunch", before=before)) == ["lunchtime soon", "Lunch?"]
    assert (yield found(query="lunch", before=before - 8)) == []


# moderation ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_report_reports_suspend(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    admin = yield bb.user("admin")
    carol = yield bb.user("carol")
    yield bb.realm.moderation.grant("admin")  # a store write: done before admin asks
    m = yield alice.req("send", to="bob", body="buy now")
    for peer, fields, want in [
        (alice, {"msg_id": m["msg_id"], "reason": "x"}, "bad_request"),  # own message
        (carol, {"msg_id": m["msg_id"], "reason": "spam"}, "not_found"),
        (bob, {"msg_id": m["msg_id"], "reason": ""}, "bad_request"),
        (bob, {"msg_id": m["msg_id"], "reason": "   "}, "bad_request"),
        (bob, {"msg_id": m["msg_id"], "reason": "r" * 401}, "bad_request"),
        (bob, {"msg_id": m["msg_id"], "reason": "a\nb"}, "bad_request"),
        (bob, {"msg_id": "m" * 201, "reason": "x"}, "bad_request"),
        (bob, {"msg_id": "m" * 129, "reason": "x"}, "bad_request"),
        (bob, {"msg_id": "m\x1b[2J", "reason": "x"}, "bad_request"),
        (bob, {"msg_id": "m m", "reason": "x"}, "bad_request"),
        (bob, {"msg_id": "", "reason": "x"}, "bad_request"),
        (bob, {"msg_id": m["msg_id"]}, "bad_request"),
        (bob, {"msg_id": m["msg_id"], "reason": "  " + "r" * 400 + "  "}, "ok"),
    ]:
        r = yield peer.req("report", **fields)
        assert errcode(r) == want, (fields, r)
    assert list(r) == ["type", "id", "report"] and type(r["report"]) is int
    for peer in (bob, alice):
        for type_, fields in (
            ("reports", {}),
            ("suspend", {"user": "carol"}),
            ("unsuspend", {"user": "carol"}),
        ):
            r = yield peer.req(type_, **fields)
            assert r["code"] == "forbidden", (type_, r)
    page = yield admin.req("reports")
    [rep] = page["reports"]
    assert list(rep) == [
        "id",
        "reporter",
        "msg_id",
        "reason",
        "ts",
        "sender",
        "recipient",
        "pos",
        "excerpt",
    ]
    assert rep["reason"] == "r" * 400 and rep["excerpt"] == "buy now"
    assert (rep["reporter"], rep["sender"], rep["recipient"]) == (
        "bob@localhost", "alice@localhost", "bob@localhost",
    )  # fmt: skip
    for fields in ({"limit": 0}, {"limit": 101}, {"before": -1}):
        r = yield admin.req("reports", **fields)
        assert r["code"] == "bad_request", fields
    for fields, want in [
        ({"user": "admin"}, "bad_request"),
        ({"user": "x@example.org"}, "bad_address"),
        ({"user": "#dev"}, "bad_address"),
        ({"user": "nobody"}, "no_such_user"),
        ({"user": "alice", "reason": "r" * 401}, "bad_request"),
        ({"user": "alice", "reason": "bye"}, "ok"),
    ]:
        r = yield admin.req("suspend", **fields)
        assert errcode(r) == want, (fields, r)
    assert r == {"type": "result", "id": r["id"], "user": "alice@localhost", "closed": 1}
    yield alice.lost
    assert alice.frames[-1]["code"] == "account_suspended" and "id" not in alice.frames[-1]
    r = yield bob.req("send", to="alice", body="x")
    assert r["code"] == "account_suspended"
    peer = yield bb.connect()
    r = yield peer.req("login", user="alice", password=PW)
    assert r["code"] == "account_suspended"
    r = yield admin.req("unsuspend", user="alice")
    assert r == {"type": "result", "id": r["id"], "user": "alice@localhost", "was_suspended": True}
    r = yield admin.req("unsuspend", user="alice")
    assert r["was_suspended"] is False
    r = yield peer.req("login", user="alice", password=PW)
    assert r["type"] == "result"


@pytest_twisted.inlineCallbacks
def test_an_admin_request_with_a_bad_field_is_bad_request_from_anyone(bb: Realm) -> Any:
    """PROTOCOL.md, moderation requests: "An admin's request from anyone else fails
    with forbidden, once its fields passed their checks (bad_request first, as for
    every request)".  A ``reports`` limit outside 1 to 100 and a ``suspend`` reason
    that is too long or not a label are field checks: a non-admin got forbidden for
    them, an admin bad_request."""
    bob = yield bb.user("bob")
    admin = yield bb.user("admin")
    yield bb.realm.moderation.grant("admin")
    for type_, fields in [
        ("reports", {"limit": 101}),
        ("reports", {"limit": 2**53 - 1}),
        ("suspend", {"user": "admin", "reason": "r" * 401}),
        ("suspend", {"user": "admin", "reason": "a\nb"}),
        ("suspend", {"user": "admin", "reason": "a\u202eb"}),
    ]:
        for peer in (bob, admin):
            r = yield peer.req(type_, **fields)
            assert errcode(r) == "bad_request", (peer.name, type_, fields, r)
    r = yield bob.req("reports", limit=100)
    assert r["code"] == "forbidden"
    r = yield bob.req("suspend", user="admin", reason="r" * 400)
    assert r["code"] == "forbidden"


@pytest_twisted.inlineCallbacks
def test_reports_are_five_at_once(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    m = yield alice.req("send", to="bob", body="spam")
    codes = []
    for _ in range(6):
        r = yield bob.req("report", msg_id=m["msg_id"], reason="spam")
        codes.append(errcode(r))
    assert codes == ["ok"] * 5 + ["rate_limited"] and r["retry_after"] > 0
    # a report of a message that is not there counts too (the look-up is bounded)
    carol = yield bb.user("carol")
    codes = []
    for _ in range(5):
        codes.append(errcode((yield carol.req("report", msg_id="nothing", reason="x"))))
    r = yield carol.req("report", msg_id=m["msg_id"], reason="x")
    assert codes == ["not_found"] * 5 and errcode(r) == "rate_limited"


@pytest_twisted.inlineCallbacks
def test_a_status_set_from_quiet_sessions_only_does_not_show_the_user_online(
    bb: Realm,
) -> Any:
    """A quiet session does not make its user appear online: its set_status told the
    contacts "away", and nothing ever took it back (no "offline" when the quiet
    session closed), so they showed a user away who was not there."""
    bob = yield bb.user("bob")
    alice = yield bb.user("alice")
    yield alice.req("send", to="bob", body="hi")  # contacts
    yield alice.close()
    yield until(lambda: [f["status"] for f in bob.pushed("presence")][-1:] == ["offline"])
    seen = len(bob.pushed("presence"))
    quiet = yield bb.login("alice", quiet=True)
    r = yield quiet.req("set_status", status="away", text="lunch")
    assert r["type"] == "result"
    yield bob.fence()
    assert len(bob.pushed("presence")) == seen
    r = yield bob.req("who", user="alice")
    assert r["users"] == []
    # a session that shows her: the contacts learn her status, as who says it
    visible = yield bb.login("alice", device="laptop")
    yield until(lambda: len(bob.pushed("presence")) > seen)
    away = {"type": "presence", "user": "alice@localhost", "status": "away", "text": "lunch"}
    assert bob.pushed("presence")[seen:] == [away]
    r = yield bob.req("who", user="alice")
    assert r["users"] == [
        {"user": "alice@localhost", "sessions": 1, "status": "away", "text": "lunch"}
    ]
    yield visible.close()
    yield until(lambda: bob.pushed("presence")[-1]["status"] == "offline")
    # her last session closes: the status is forgotten
    yield quiet.close()
    again = yield bb.login("alice")
    yield until(lambda: bob.pushed("presence")[-1]["status"] == "online")
    online = {"type": "presence", "user": "alice@localhost", "status": "online"}
    assert bob.pushed("presence")[-1] == online
    r = yield bob.req("who", user="alice")
    assert r["users"] == [{"user": "alice@localhost", "sessions": 1}]
    yield again.close()


@pytest_twisted.inlineCallbacks
def test_sends_of_a_connection_are_stored_in_the_order_they_were_made(bb: Realm) -> Any:
    """A reply is stored after its target is looked up; the sends made after it on
    the connection wait for it, so a conversation shows them as they were written
    (a plain message sent right behind a reply was stored first)."""
    alice = yield bb.user("alice")
    bob = yield bb.user("bob")
    yield alice.req("create_group", group="#dev")
    yield bob.req("join", group="#dev")
    for to in ("bob", "#dev"):
        first = yield bob.req("send", to=to if to != "bob" else "alice", body="question")
        answers = [
            alice.req("send", to=to, body="a reply", reply_to=first["msg_id"]),
            alice.req("send", to=to, body="then this"),
            alice.req("send", to=to, body="another reply", reply_to=first["msg_id"]),
            alice.req("send", to=to, body="a bad reply", reply_to="nothing"),
            alice.req("send", to=to, body="and this", notice=True),
            alice.req("send", to="alice", body="a note between"),
        ]
        results = yield defer.gatherResults(answers)
        assert [errcode(r) for r in results] == ["ok", "ok", "ok", "not_found", "ok", "ok"]
        positions = [r["pos"] for r in results if "pos" in r]
        assert positions == sorted(positions), (to, positions)
