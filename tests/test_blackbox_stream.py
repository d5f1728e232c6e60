"""Black-box tests of PROTOCOL.md's "Messages and stream positions" (positions, acks
and resume, multi-device, de-duplication) and "Accounts" (what deleting one
removes), over loopback TCP with raw frames: acks of positions never sent, resume
from the future, nonces repeated across reconnects, a deleted account's name
registered again."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest_twisted
from twisted.internet import defer

from tests.blackbox import PW, call, closed, code, data_frame, login, msgs, wait_for
from tests.conftest import raw_client, until

AB_SHA = hashlib.sha256(b"ab").hexdigest()


def synced(client: Any) -> int:
    return next(
        f["pos"] for f in client.frames if isinstance(f, dict) and f.get("type") == "synced"
    )


def positions(client: Any) -> list[int]:
    return [m["pos"] for m in msgs(client)]


@defer.inlineCallbacks
def send(client: Any, to: str, body: str, **kw: Any) -> Any:
    r = yield call(client, {"type": "send", "to": to, "body": body, **kw})
    assert r["type"] == "result", r
    return r


@pytest_twisted.inlineCallbacks
def test_acks_and_resume(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    bob = yield login(addr, "bob", device="phone")
    sent = []
    for i in range(5):
        r = yield send(bob, "alice", f"m{i}")
        sent.append(r["pos"])
    # A user who never acknowledged anything: a new device gets the whole feed.
    a1 = yield login(addr, "alice", device="laptop")
    assert positions(a1) == sent and synced(a1) == sent[-1]
    # Acks never move backwards; an ack beyond what was sent is clamped.
    a1.send({"type": "ack", "pos": sent[2]})
    a1.send({"type": "ack", "pos": sent[0]})
    yield call(a1, {"type": "ping"})
    yield closed(a1)
    a2 = yield login(addr, "alice", device="laptop")
    assert positions(a2) == sent[3:], "acks never move backwards"
    # A device never seen starts after the highest ack of the user's devices.
    a3 = yield login(addr, "alice", device="tablet")
    assert positions(a3) == sent[3:]
    # With since, the backlog starts there whatever is stored.
    a4 = yield login(addr, "alice", device="laptop", since=0)
    assert positions(a4) == sent
    for c in (a2, a3, a4):
        yield closed(c)


@pytest_twisted.inlineCallbacks
def test_acks_and_resume_past_the_end_skip_nothing(server: Any) -> Any:
    """An ack of a position never sent, or a `since` from the future, cannot make a
    device skip items committed later."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    bob = yield login(addr, "bob")
    first = yield send(bob, "alice", "first")
    a = yield login(addr, "alice", device="d1")
    a.send({"type": "ack", "pos": 10**12})
    yield call(a, {"type": "ping"})
    yield closed(a)
    later = yield send(bob, "alice", "later")
    a = yield login(addr, "alice", device="d1")
    assert positions(a) == [later["pos"]], a.frames
    yield closed(a)
    # since from the future: clamped to the newest committed position.
    b2 = yield login(addr, "alice", device="d2", since=2**53 - 1)
    assert positions(b2) == [] and synced(b2) >= later["pos"]
    live = yield send(bob, "alice", "live")
    yield wait_for(b2, lambda f: f.get("pos") == live["pos"] and f.get("type") == "msg")
    b2.send({"type": "ack", "pos": 2**53 - 1})
    yield call(b2, {"type": "ping"})
    yield closed(b2)
    after = yield send(bob, "alice", "after")
    b3 = yield login(addr, "alice", device="d2")
    assert positions(b3) == [after["pos"]], b3.frames
    assert first["pos"] < later["pos"] < live["pos"] < after["pos"]


ACK_VALUES = [
    (-1, "bad_request"),
    (2**53, "bad_request"),
    (1.5, "bad_request"),
    (True, "bad_request"),
    ("5", "bad_request"),
]


@pytest_twisted.inlineCallbacks
def test_ack_and_since_out_of_range(server: Any) -> Any:
    realm, _factory, addr = server
    yield realm.create_user("alice", PW)
    a = yield login(addr, "alice")
    for value, want in ACK_VALUES:
        r = yield call(a, {"type": "ack", "pos": value})
        assert code(r) == want, (value, r)
    # An ack that is fine is never answered (a ping after it is the next answer).
    a.send({"type": "ack", "pos": 0, "id": "quiet"})
    yield call(a, {"type": "ping"})
    assert not [f for f in a.frames if isinstance(f, dict) and f.get("id") == "quiet"]
    for since in (-1, 2**53, 1.0, "0"):
        c = yield raw_client(addr)
        r = yield call(c, {"type": "login", "user": "alice", "password": PW, "since": since})
        assert code(r) == "bad_request", (since, r)
        yield closed(c)


@pytest_twisted.inlineCallbacks
def test_multi_device_and_order(server: Any) -> Any:
    """Every connection of the sender and the recipient gets each item once, in
    increasing position order, private and group items interleaved."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a1 = yield login(addr, "alice", device="one")
    a2 = yield login(addr, "alice", device="two")
    b = yield login(addr, "bob")
    g = yield call(a1, {"type": "create_group", "group": "#g"})
    j = yield call(b, {"type": "join", "group": "#g"})
    want = [g["pos"], j["pos"]]
    for i in range(6):
        r = yield send(
            a1 if i % 2 else b, "#g" if i % 3 else ("bob" if i % 2 else "alice"), f"x{i}"
        )
        want.append(r["pos"])
    for c in (a1, a2, b):
        expect = want if c is not b else want[1:]  # bob was no member at `created`
        n = len(expect)
        yield until(lambda c=c, n=n: len(msgs(c)) >= n)
        assert positions(c) == expect, (positions(c), expect)
    # The sending connection's msg frame came before its result (no backlog then).
    order = [f.get("type") for f in a1.frames if isinstance(f, dict) and f.get("pos") == want[-1]]
    assert order == ["msg", "result"], order


@pytest_twisted.inlineCallbacks
def test_nonces_across_reconnects_and_connections(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice", device="one")
    first = yield send(a, "bob", "once", nonce="n-1")
    yield closed(a)
    a = yield login(addr, "alice", device="two")
    again = yield send(a, "bob", "once", nonce="n-1")
    assert (again["pos"], again["msg_id"], again["ts"]) == (
        first["pos"],
        first["msg_id"],
        first["ts"],
    )
    # Another body with the same nonce: still the first send's result.
    other = yield send(a, "bob", "another", nonce="n-1")
    assert other["pos"] == first["pos"]
    # Another user's nonce space is their own.
    b = yield login(addr, "bob")
    theirs = yield send(b, "alice", "once", nonce="n-1")
    assert theirs["pos"] != first["pos"]
    # Nonce bounds: 1-64 characters.
    for bad in ("", "n" * 65):
        r = yield call(a, {"type": "send", "to": "bob", "body": "x", "nonce": bad})
        assert code(r) == "bad_request", (bad, r)
    ok = yield send(a, "bob", "x", nonce="n" * 64)
    assert ok["pos"] > theirs["pos"]
    b_msgs = [m for m in msgs(b) if m["body"] == "once"]
    assert len(b_msgs) == 2  # alice's once, bob's own once


@pytest_twisted.inlineCallbacks
def test_a_deleted_name_registered_again_inherits_nothing(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    old = yield login(addr, "alice", device="d")
    bob = yield login(addr, "bob")
    g = yield call(old, {"type": "create_group", "group": "#g", "history": "all"})
    assert g["type"] == "result", g
    yield call(bob, {"type": "join", "group": "#g"})
    yield call(old, {"type": "create_group", "group": "#solo"})
    sent = yield send(old, "bob", "from the old alice", nonce="k")
    yield send(bob, "alice", "to the old alice")
    up = yield call(
        old,
        {
            "type": "file_offer",
            "to": "bob",
            "name": "a.txt",
            "size": 2,
            "sha256": AB_SHA,
        },
    )
    old.send_raw(data_frame(up["stream"], 0, b"ab"))
    f = yield call(old, {"type": "file_finish", "upload": up["upload"]})
    assert f["type"] == "result", f
    pending = yield call(
        old,
        {
            "type": "file_offer",
            "to": "bob",
            "name": "b.txt",
            "size": 2,
            "sha256": AB_SHA,
        },
    )
    old.send({"type": "ack", "pos": f["pos"]})
    yield call(old, {"type": "ping"})
    yield realm.delete_user("alice")
    yield until(lambda: old.lost.called)
    ended = [x for x in old.frames if isinstance(x, dict) and x.get("type") == "error"]
    assert ended and ended[-1]["code"] == "auth_failed", old.frames
    # Bob sees alice leave #g (she was the only owner: bob succeeds her).
    left = yield wait_for(bob, lambda m: m.get("meta", {}).get("event") == "left")
    assert left["meta"] == {
        "event": "left",
        "user": "alice@localhost",
        "reason": "account deleted",
        "successor": "bob@localhost",
    }
    assert left["from"] == "alice@localhost"
    # #solo is deleted: its name is free again.
    yield realm.create_user("alice", PW)
    new = yield login(addr, "alice", device="d", since=0)
    assert positions(new) == [], new.frames
    h = yield call(new, {"type": "history", "with": "bob"})
    assert h["messages"] == [], h
    d = yield call(new, {"type": "download", "file": f["file"]})
    assert code(d) == "no_such_file", d
    again = yield send(new, "bob", "from the new alice", nonce="k")
    assert again["pos"] > sent["pos"]
    gone = yield call(new, {"type": "file_resume", "upload": pending["upload"]})
    assert code(gone) == "no_such_upload", gone
    for req, want in (
        ({"type": "send", "to": "#g", "body": "hi"}, "not_member"),
        ({"type": "set_topic", "group": "#g", "topic": "mine"}, "not_member"),
        ({"type": "history", "with": "#g"}, "not_member"),
    ):
        r = yield call(new, req)
        assert code(r) == want, (req, r)
    solo = yield call(new, {"type": "create_group", "group": "#solo"})
    assert solo["type"] == "result", solo
    members = yield call(bob, {"type": "members", "group": "#g"})
    assert members["members"] == [{"user": "bob@localhost", "role": "owner", "online": True}]
    # Bob keeps the conversation: his history still has the old alice's message.
    hb = yield call(bob, {"type": "history", "with": "alice"})
    assert "from the old alice" in [m["body"] for m in hb["messages"]]
    # Bob still downloads the old alice's file.
    ok = yield call(bob, {"type": "download", "file": f["file"]})
    assert ok["type"] == "result", ok


@pytest_twisted.inlineCallbacks
def test_leaving_and_joining_again_loses_nothing_a_device_had_not_received(
    server: Any,
) -> Any:
    """A device offline while its user left a group and joined it again gets the
    items of both memberships, and nothing from between them."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    main = yield login(addr, "bob", device="main")
    yield call(a, {"type": "create_group", "group": "#g"})
    j1 = yield call(main, {"type": "join", "group": "#g"})
    main.send({"type": "ack", "pos": j1["pos"]})
    yield call(main, {"type": "ping"})
    yield closed(main)
    m1 = yield send(a, "#g", "m1")
    tool = yield login(addr, "bob", device="tool", since=m1["pos"])
    left = yield call(tool, {"type": "leave", "group": "#g"})
    m2 = yield send(a, "#g", "m2")
    j2 = yield call(tool, {"type": "join", "group": "#g"})
    m3 = yield send(a, "#g", "m3")
    k = yield call(a, {"type": "kick", "group": "#g", "user": "bob"})
    m4 = yield send(a, "#g", "m4")
    main = yield login(addr, "bob", device="main")
    assert positions(main) == [m1["pos"], left["pos"], j2["pos"], m3["pos"], k["pos"]]
    assert m2["pos"] not in positions(main) and m4["pos"] not in positions(main)
    h = yield call(main, {"type": "history", "with": "#g"})
    assert code(h) == "not_member", h


@pytest_twisted.inlineCallbacks
def test_items_committed_while_the_backlog_streams(server: Any) -> Any:
    """Nothing lost, nothing twice, in increasing order, `synced` after every item at
    or below its position, while another connection keeps sending."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    b = yield login(addr, "bob")
    for i in range(150):
        b.send({"type": "send", "to": "alice", "body": f"old{i}", "id": f"o{i}"})
    yield b.reply("o149")
    a = yield raw_client(addr)
    a.send({"type": "login", "id": "login", "user": "alice", "password": PW})
    for i in range(50):
        b.send({"type": "send", "to": "alice", "body": f"new{i}", "id": f"n{i}"})
    yield b.reply("n49")
    yield until(
        lambda: (
            len(msgs(a)) >= 200
            and any(f.get("type") == "synced" for f in a.frames if isinstance(f, dict))
        )
    )
    pos = positions(a)
    assert pos == sorted(set(pos)) and len(pos) == 200
    sent = sorted(
        f["pos"]
        for f in b.frames
        if isinstance(f, dict) and f.get("type") == "result" and "pos" in f
    )
    assert pos == sent
    kinds = [f for f in a.frames if isinstance(f, dict) and f.get("type") in ("msg", "synced")]
    at = next(i for i, f in enumerate(kinds) if f["type"] == "synced")
    assert all(f["pos"] <= kinds[at]["pos"] for f in kinds[:at])
    assert all(f["pos"] > kinds[at]["pos"] for f in kinds[at + 1 :])


@pytest_twisted.inlineCallbacks
def test_the_other_party_keeps_a_deleted_accounts_conversation(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    one = yield send(a, "bob", "one")
    up = yield call(
        a, {"type": "file_offer", "to": "bob", "name": "a.txt", "size": 2, "sha256": AB_SHA}
    )
    a.send_raw(data_frame(up["stream"], 0, b"ab"))
    f = yield call(a, {"type": "file_finish", "upload": up["upload"]})
    yield realm.delete_user("alice")
    yield until(lambda: a.lost.called)
    h = yield call(b, {"type": "history", "with": "alice"})
    assert [m["pos"] for m in h["messages"]] == [one["pos"], f["pos"]], h
    d = yield call(b, {"type": "download", "file": f["file"]})
    assert d["type"] == "result", d
    r = yield call(b, {"type": "send", "to": "alice", "body": "gone?"})
    assert code(r) == "no_such_user", r
    b2 = yield login(addr, "bob", device="new", since=0)
    assert positions(b2) == [one["pos"], f["pos"]]


@pytest_twisted.inlineCallbacks
def test_the_envelope_fields_and_their_order(server: Any) -> Any:
    """`msg` frames: type, pos, msg_id, kind, from, to, ts, body, then meta when there
    is one; history entries the same without `type`."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    t = yield send(a, "bob", "plain")
    n = yield send(a, "bob", "notice", notice=True)
    g = yield call(a, {"type": "create_group", "group": "#g"})
    r = yield call(a, {"type": "react", "msg_id": t["msg_id"], "emoji": "x"})
    yield call(a, {"type": "ping"})
    order = ["type", "pos", "msg_id", "kind", "from", "to", "ts", "body"]
    for p in (t["pos"], n["pos"], g["pos"], r["pos"]):
        m = next(f for f in msgs(a) if f["pos"] == p)
        keys = list(m)
        assert keys[:8] == order, keys
        assert keys[8:] in ([], ["meta"]), keys
        assert isinstance(m["ts"], (int, float)) and isinstance(m["msg_id"], str)
    assert "meta" not in next(f for f in msgs(a) if f["pos"] == t["pos"])
    assert next(f for f in msgs(a) if f["pos"] == n["pos"])["meta"] == {"notice": True}
    h = yield call(a, {"type": "history", "with": "bob"})
    for m in h["messages"]:
        assert list(m)[:7] == order[1:], list(m)
