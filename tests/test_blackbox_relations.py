"""Black-box tests of PROTOCOL.md's "Items that refer to items" (who may reply,
react, edit and delete, and what is read back), over loopback TCP with raw frames."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.blackbox import PW, call, code, login, msgs


@pytest_twisted.inlineCallbacks
def test_who_may_refer_to_what(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob", "carol", "dave"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    c = yield login(addr, "carol")
    d = yield login(addr, "dave")
    dm = yield call(a, {"type": "send", "to": "bob", "body": "private"})
    g = yield call(a, {"type": "create_group", "group": "#g"})
    yield call(b, {"type": "join", "group": "#g"})
    early = yield call(a, {"type": "send", "to": "#g", "body": "before carol"})
    yield call(c, {"type": "join", "group": "#g"})
    late = yield call(b, {"type": "send", "to": "#g", "body": "after carol"})
    joined_event = g["msg_id"]
    wrong = []

    def check(label: str, reply: dict[str, Any], want: str | None) -> None:
        if code(reply) != want:
            wrong.append((label, want, reply))

    cases = [
        # (label, client, request, expected code)
        (
            "outsider reacts to a DM",
            c,
            {"type": "react", "msg_id": dm["msg_id"], "emoji": "x"},
            "not_found",
        ),
        (
            "outsider replies to a DM",
            c,
            {"type": "send", "to": "alice", "body": "r", "reply_to": dm["msg_id"]},
            "not_found",
        ),
        (
            "reply in another conversation",
            b,
            {"type": "send", "to": "#g", "body": "r", "reply_to": dm["msg_id"]},
            "bad_request",
        ),
        ("unknown msg_id", a, {"type": "react", "msg_id": "nope", "emoji": "x"}, "not_found"),
        (
            "before the reader's join",
            c,
            {"type": "react", "msg_id": early["msg_id"], "emoji": "x"},
            "not_found",
        ),
        ("non-member", d, {"type": "react", "msg_id": late["msg_id"], "emoji": "x"}, "not_found"),
        (
            "an event is no target",
            a,
            {"type": "react", "msg_id": joined_event, "emoji": "x"},
            "bad_request",
        ),
        (
            "edit of another's message",
            a,
            {"type": "edit", "msg_id": late["msg_id"], "body": "mine"},
            "forbidden",
        ),
        (
            "delete of another's item by a member",
            c,
            {"type": "delete", "msg_id": late["msg_id"]},
            "forbidden",
        ),
        ("party reacts to a DM", b, {"type": "react", "msg_id": dm["msg_id"], "emoji": "x"}, None),
        (
            "member reacts after join",
            c,
            {"type": "react", "msg_id": late["msg_id"], "emoji": "x"},
            None,
        ),
        (
            "emoji of spaces only",
            c,
            {"type": "react", "msg_id": late["msg_id"], "emoji": " "},
            "bad_request",
        ),
        (
            "emoji of a joiner only",
            c,
            {"type": "react", "msg_id": late["msg_id"], "emoji": "\u200d"},
            "bad_request",
        ),
        (
            "emoji of 33",
            c,
            {"type": "react", "msg_id": late["msg_id"], "emoji": "a" * 33},
            "bad_request",
        ),
        ("emoji of 32", c, {"type": "react", "msg_id": late["msg_id"], "emoji": "a" * 32}, None),
        ("own edit", b, {"type": "edit", "msg_id": late["msg_id"], "body": "edited"}, None),
        ("owner deletes a member's item", a, {"type": "delete", "msg_id": late["msg_id"]}, None),
        (
            "react to a deleted item",
            b,
            {"type": "react", "msg_id": late["msg_id"], "emoji": "x"},
            "not_found",
        ),
        (
            "edit of a deleted item",
            b,
            {"type": "edit", "msg_id": late["msg_id"], "body": "again"},
            "not_found",
        ),
        ("delete twice", a, {"type": "delete", "msg_id": late["msg_id"]}, "not_found"),
    ]
    for label, client, req, want in cases:
        r = yield call(client, req)
        check(label, r, want)
    # A member who left reads nothing more of the group, nor refers to it.
    yield call(b, {"type": "leave", "group": "#g"})
    r = yield call(b, {"type": "react", "msg_id": early["msg_id"], "emoji": "x"})
    check("left member", r, "not_found")
    # An edit of a file: bad_request.
    up = yield call(
        a,
        {
            "type": "file_offer",
            "to": "bob",
            "name": "e",
            "size": 0,
            "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
    )
    f = yield call(a, {"type": "file_finish", "upload": up["upload"]})
    r = yield call(a, {"type": "edit", "msg_id": f["msg_id"], "body": "x"})
    check("edit of a file", r, "bad_request")
    r = yield call(b, {"type": "react", "msg_id": f["msg_id"], "emoji": "x"})
    check("react to a file", r, None)
    assert not wrong
    # What is read back: the deleted item, and the DM's reactions.
    h = yield call(c, {"type": "history", "with": "#g"})
    gone = next(m for m in h["messages"] if m["msg_id"] == late["msg_id"])
    assert gone["body"] == "" and gone["meta"] == {"deleted": True}, gone
    hd = yield call(a, {"type": "history", "with": "bob"})
    item = next(m for m in hd["messages"] if m["msg_id"] == dm["msg_id"])
    assert item["meta"]["reactions"] == {"x": ["bob@localhost"]}, item


@pytest_twisted.inlineCallbacks
def test_a_new_account_of_a_deleted_name_refers_to_nothing_old(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    b = yield login(addr, "bob")
    old = yield call(b, {"type": "send", "to": "alice", "body": "to the old alice"})
    yield realm.delete_user("alice")
    yield realm.create_user("alice", PW)
    a = yield login(addr, "alice")
    for req in (
        {"type": "react", "msg_id": old["msg_id"], "emoji": "x"},
        {"type": "send", "to": "bob", "body": "re", "reply_to": old["msg_id"]},
        {"type": "delete", "msg_id": old["msg_id"]},
    ):
        r = yield call(a, req)
        assert code(r) == "not_found", (req, r)


@pytest_twisted.inlineCallbacks
def test_what_history_and_the_backlog_read_back(server: Any) -> Any:
    """History shows items as they are now: the latest edit with `meta.edited` (its
    ts), reactions per emoji in the order given, none once taken back; the backlog
    keeps the original item and carries the edit and reaction items after it."""
    realm, _factory, addr = server
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    c = yield login(addr, "carol")
    yield call(a, {"type": "create_group", "group": "#g"})
    yield call(b, {"type": "join", "group": "#g"})
    yield call(c, {"type": "join", "group": "#g"})
    m = yield call(a, {"type": "send", "to": "#g", "body": "first"})
    e1 = yield call(a, {"type": "edit", "msg_id": m["msg_id"], "body": "second"})
    e2 = yield call(a, {"type": "edit", "msg_id": m["msg_id"], "body": "third"})
    for who, emoji, remove in ((c, "b", False), (b, "b", False), (b, "a", False), (c, "b", True)):
        r = yield call(
            who, {"type": "react", "msg_id": m["msg_id"], "emoji": emoji, "remove": remove}
        )
        assert r["type"] == "result", r
    h = yield call(b, {"type": "history", "with": "#g"})
    item = next(x for x in h["messages"] if x["msg_id"] == m["msg_id"])
    assert item["body"] == "third" and item["kind"] == "text"
    assert item["meta"]["edited"] == e2["ts"]
    assert item["meta"]["reactions"] == {"b": ["bob@localhost"], "a": ["bob@localhost"]}
    assert list(item["meta"]["reactions"]) == ["b", "a"]
    # the edit, delete and reaction items themselves are not in history pages
    assert {x["kind"] for x in h["messages"]} <= {"text", "event", "file"}
    assert e1["pos"] < e2["pos"]
    d = yield login(addr, "bob", device="fresh", since=m["pos"] - 1)
    kinds = [(x["kind"], x["pos"]) for x in msgs(d)]
    assert kinds[0] == ("text", m["pos"])
    assert [k for k, _ in kinds[1:]] == [
        "edit",
        "edit",
        "reaction",
        "reaction",
        "reaction",
        "reaction",
    ]
    gone = yield call(a, {"type": "react", "msg_id": m["msg_id"], "emoji": "z"})
    yield call(a, {"type": "react", "msg_id": m["msg_id"], "emoji": "z", "remove": True})
    h2 = yield call(a, {"type": "history", "with": "#g"})
    item2 = next(x for x in h2["messages"] if x["msg_id"] == m["msg_id"])
    assert "z" not in item2["meta"]["reactions"], (gone, item2)
