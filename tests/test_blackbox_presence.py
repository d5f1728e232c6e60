"""Black-box tests of PROTOCOL.md's "Presence", "Server-pushed frames", "Errors" and
"Before login", over loopback TCP with raw frames."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor

from tests.blackbox import PW, call, closed, code, login
from tests.conftest import raw_client, until


def presence(client: Any) -> list[dict[str, Any]]:
    return [f for f in client.frames if isinstance(f, dict) and f.get("type") == "presence"]


@defer.inlineCallbacks
def settle(*clients: Any) -> Any:
    """Every frame the realm sent before now has arrived (a ping round trip each)."""
    for c in clients:
        yield call(c, {"type": "ping"})


@defer.inlineCallbacks
def sessions(client: Any, user: str) -> Any:
    """The number of sessions ``who`` counts for ``user`` (0 when not listed)."""
    r = yield call(client, {"type": "who", "user": user})
    return sum(u["sessions"] for u in r["users"])


@defer.inlineCallbacks
def until_sessions(client: Any, user: str, n: int) -> Any:
    """Ask ``who`` until it counts ``n`` sessions of ``user`` (at most 10 s)."""
    for _ in range(1000):
        now = yield sessions(client, user)
        if now == n:
            return
        yield task.deferLater(_reactor, 0.01, lambda: None)
    raise AssertionError(f"{user} never had {n} sessions (last: {now})")


@pytest_twisted.inlineCallbacks
def test_presence_of_contacts(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    # Not contacts yet: nothing.
    yield settle(a, b)
    assert presence(a) == presence(b) == []
    r = yield call(b, {"type": "send", "to": "alice", "body": "hi"})
    assert r["type"] == "result"
    # A second session of bob, and a quiet one: no frame.  The snapshot of a new
    # session of alice names bob once, without text.
    b2 = yield login(addr, "bob", device="two")
    bq = yield login(addr, "bob", device="quiet", quiet=True)
    a2 = yield login(addr, "alice", device="two")
    yield settle(a, a2, b, b2, bq)
    assert presence(a) == []
    assert presence(a2) == [{"type": "presence", "user": "bob@localhost", "status": "online"}]
    # set_status: every contact session told, text absent when empty; own sessions not.
    yield call(b, {"type": "set_status", "status": "away", "text": "lunch"})
    yield call(b, {"type": "set_status", "status": "away", "text": "lunch"})  # no change
    yield call(b, {"type": "set_status", "status": "busy"})
    yield settle(a, a2, b, b2, bq)
    want = [
        {"type": "presence", "user": "bob@localhost", "status": "away", "text": "lunch"},
        {"type": "presence", "user": "bob@localhost", "status": "away", "text": "lunch"},
        {"type": "presence", "user": "bob@localhost", "status": "busy"},
    ]
    assert presence(a) == want
    assert presence(a2)[1:] == want
    # Bob's own sessions: his new ones had alice in their snapshot, nothing of bob.
    assert presence(b) == []
    for c in (b2, bq):
        assert presence(c) == [{"type": "presence", "user": "alice@localhost", "status": "online"}]
    for bad in ("offline", "Online", ""):
        r = yield call(b, {"type": "set_status", "status": bad})
        assert code(r) == "bad_request", (bad, r)
    r = yield call(b, {"type": "set_status", "status": "away", "text": "t" * 257})
    assert code(r) is not None, r
    r = yield call(b, {"type": "set_status", "status": "away", "text": "t" * 256})
    assert r["type"] == "result", r
    # One of bob's two non-quiet sessions closes: no frame, checked once the realm has
    # dropped it (``who`` counts one session fewer), so a frame it caused came before.
    yield settle(a)
    told = len(presence(a))
    before = yield sessions(a, "bob")
    yield closed(b)
    yield until_sessions(a, "bob", before - 1)
    assert presence(a)[told:] == []
    # The last non-quiet session closes: offline, though a quiet one stays.
    yield closed(b2)
    yield until(lambda: presence(a)[-1]["status"] == "offline")
    assert presence(a)[-1] == {"type": "presence", "user": "bob@localhost", "status": "offline"}
    # The status was forgotten: the next login is plain online.
    b3 = yield login(addr, "bob", device="three")
    yield until(lambda: presence(a)[-1]["status"] == "online")
    assert presence(a)[-1] == {"type": "presence", "user": "bob@localhost", "status": "online"}
    for c in (a, a2, b3, bq):
        yield closed(c)


@pytest_twisted.inlineCallbacks
def test_a_quiet_user_never_appears_online(server: Any) -> Any:
    """A quiet session does not make the user appear online to contacts: no presence
    frame because of it, not even when it sets a status (which is kept for the
    user's next session that is not quiet)."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    b = yield login(addr, "bob")
    yield call(b, {"type": "send", "to": "alice", "body": "hi"})
    yield closed(b)
    a = yield login(addr, "alice")
    bq = yield login(addr, "bob", device="quiet", quiet=True)
    yield call(bq, {"type": "set_status", "status": "away", "text": "hidden"})
    yield settle(bq, a)
    members = yield call(a, {"type": "who"})
    assert "bob@localhost" not in [u["user"] for u in members["users"]], members
    assert presence(a) == [], presence(a)
    a2 = yield login(addr, "alice", device="two")
    yield settle(a2)
    assert presence(a2) == [], presence(a2)
    # A non-quiet login later shows the status set meanwhile (kept, unseen).
    b2 = yield login(addr, "bob", device="two")
    yield until(lambda: bool(presence(a)))
    want = {"type": "presence", "user": "bob@localhost", "status": "away", "text": "hidden"}
    assert presence(a) == [want]
    a3 = yield login(addr, "alice", device="three")
    assert presence(a3) == presence(a)
    # From the quiet session, with a non-quiet one open: told.
    yield call(bq, {"type": "set_status", "status": "busy"})
    yield until(lambda: len(presence(a)) == 2)
    assert presence(a)[1] == {"type": "presence", "user": "bob@localhost", "status": "busy"}
    for c in (bq, b2, a, a2, a3):
        yield closed(c)


@pytest_twisted.inlineCallbacks
def test_requests_before_login(server: Any) -> Any:
    realm, _factory, addr = server
    yield realm.create_user("alice", PW)
    c = yield raw_client(addr)
    for req in (
        {"type": "send", "to": "alice", "body": "x"},
        {"type": "ack", "pos": 1},
        {"type": "who"},
        {"type": "file_offer", "to": "alice", "name": "n", "size": 0, "sha256": "0" * 64},
    ):
        r = yield call(c, req)
        assert code(r) == "not_authenticated", (req, r)
    r = yield call(c, {"type": "ping"})
    assert r["type"] == "result"
    r = yield call(c, {"type": "hello", "version": 1})
    assert code(r) == "bad_request", r
    r = yield call(c, {"type": "frobnicate"})
    assert code(r) in ("unknown_type", "not_authenticated"), r
    # A frame of exactly 16384 bytes is read; 16385 is too_large, and closes.
    pad = {"type": "ping", "id": "p", "x": ""}
    base = len(b'{"type":"ping","id":"p","x":""}')
    pad["x"] = "y" * (16384 - base)
    c.send(pad)
    r = yield c.reply("p")
    assert r["type"] == "result", r
    pad["x"] = "y" * (16385 - base)
    pad["id"] = "q"
    c.send(pad)
    yield until(lambda: c.lost.called)
    last = c.frames[-1]
    assert last["type"] == "error" and last["code"] == "too_large" and "id" not in last
    # After login the frame limit is max_frame.
    a = yield login(addr, "alice")
    pad["x"] = "y" * (60000 - base)
    pad["id"] = "big"
    a.send(pad)
    r = yield a.reply("big")
    assert r["type"] == "result", r
    yield closed(a)


@pytest_twisted.inlineCallbacks
def test_ephemeral_frames_wait_for_synced(server: Any) -> Any:
    """A presence change that happens while a session's backlog is being sent is not
    sent to it before `synced`: the snapshot after `synced` tells the state as it is
    then.  (The backlog read is held, so the change surely comes while alice's
    session is attached and syncing.)"""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    b = yield login(addr, "bob")
    for i in range(3):
        yield call(b, {"type": "send", "to": "alice", "body": f"m{i}"})  # contacts
    read_feed, gate, held = realm.store.read_feed, defer.Deferred(), []

    def held_read(user: str, *args: Any, **kw: Any) -> Any:
        if user != "alice@localhost" or gate.called:
            return read_feed(user, *args, **kw)
        held.append(user)
        return gate.addCallback(lambda _: read_feed(user, *args, **kw))

    realm.store.read_feed = held_read
    a = yield raw_client(addr)
    a.send({"type": "login", "id": "login", "user": "alice", "password": PW})
    yield until(lambda: held)  # alice's session is attached, her backlog not sent
    assert len(realm.sessions_of("alice@localhost")) == 1
    yield call(b, {"type": "set_status", "status": "busy", "text": "meeting"})
    gate.callback(None)
    yield until(lambda: presence(a))
    yield settle(a)
    kinds = [f.get("type") for f in a.frames if isinstance(f, dict)]
    synced_at = kinds.index("synced")
    assert "presence" not in kinds[:synced_at], kinds
    assert kinds[:synced_at].count("msg") == 3
    assert presence(a) == [
        {"type": "presence", "user": "bob@localhost", "status": "busy", "text": "meeting"}
    ]
    yield closed(a)
    yield closed(b)


@pytest_twisted.inlineCallbacks
def test_a_join_tells_joiner_and_members_of_each_other(server: Any) -> Any:
    realm, _factory, addr = server
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    c = yield login(addr, "carol", quiet=True)
    yield call(a, {"type": "create_group", "group": "#g"})
    yield call(c, {"type": "join", "group": "#g"})
    yield call(a, {"type": "set_status", "status": "busy", "text": "x"})
    b = yield login(addr, "bob")
    j = yield call(b, {"type": "join", "group": "#g"})
    yield settle(a, b, c)
    # bob: his joined event, then alice's presence (carol is quiet: not online).
    after = [f for f in b.frames if isinstance(f, dict) and f.get("type") in ("msg", "presence")]
    at = next(i for i, f in enumerate(after) if f.get("pos") == j["pos"])
    assert after[at + 1 :] == [
        {"type": "presence", "user": "alice@localhost", "status": "busy", "text": "x"}
    ]
    # alice: the joined event, then bob's presence.
    tail = [f for f in a.frames if isinstance(f, dict) and f.get("type") in ("msg", "presence")]
    at = next(i for i, f in enumerate(tail) if f.get("pos") == j["pos"])
    assert tail[at + 1 :] == [{"type": "presence", "user": "bob@localhost", "status": "online"}]
    # carol, quiet, still hears of bob (she is his contact now).
    assert {"type": "presence", "user": "bob@localhost", "status": "online"} in presence(c)


@pytest_twisted.inlineCallbacks
def test_a_login_with_the_longest_password_escaped_fits_before_login(server: Any) -> Any:
    """Every valid request allowed before login fits, however its strings are
    written: a `register` and a `login` with a 1024-character password of characters
    outside the BMP, a 64-character device and id, all written as \\u escape pairs
    (what Python's json writes by default), are answered, not too_large (over 12 KiB:
    the limit before login was 8192, and such an account could not log in)."""
    _realm, _factory, addr = server
    password = "\U0001f600" * 1024
    c = yield raw_client(addr)
    # (the login names another realm: auth_failed, not too_large)
    for request, expected in (
        ({"type": "register", "id": "r", "user": "\U0001d41a" * 32, "password": password}, None),
        (
            {
                "type": "login",
                "id": "l",
                "user": "\U0001d41a" * 32 + "@" + "x" * 63 + ".localhost",
                "password": password,
                "device": "\U0001f4bb" * 64,
            },
            "auth_failed",
        ),
    ):
        payload = json.dumps(request).encode()  # (ensure_ascii: every escape)
        assert len(payload) > 12288
        c.send_raw(payload)
        r = yield c.reply(request["id"])
        assert code(r) == expected, r
    # the account, by its name in mathematical bold letters (NFKC: "a"), with an id
    # of 64 astral characters
    rid = "\U0001f600" * 64
    req = {"type": "login", "id": rid, "user": "\U0001d41a" * 32, "password": password}
    c.send_raw(json.dumps({**req, "device": "\U0001f4bb" * 64}).encode())
    r = yield c.reply(rid)
    assert r["type"] == "result" and r["user"] == "a" * 32 + "@localhost", r


@pytest_twisted.inlineCallbacks
def test_set_status_has_a_bucket_of_its_own(server: Any) -> Any:
    """Each status change is a frame to every online contact: 10 at once on one
    connection, then rate_limited with retry_after; another connection has its own."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    yield call(b, {"type": "send", "to": "alice", "body": "contacts"})
    for i in range(10):
        r = yield call(b, {"type": "set_status", "status": "away", "text": f"{i}"})
        assert r["type"] == "result", r
    r = yield call(b, {"type": "set_status", "status": "busy"})
    assert code(r) == "rate_limited" and 0 < r["retry_after"] <= 1.0, r
    bad = yield call(b, {"type": "set_status", "status": "nope"})
    assert code(bad) == "bad_request", bad
    b2 = yield login(addr, "bob", device="two")
    r = yield call(b2, {"type": "set_status", "status": "busy"})
    assert r["type"] == "result", r
    yield settle(a)
    told = [p.get("text") for p in presence(a) if p["status"] == "away"]
    assert told == [f"{i}" for i in range(10)]
