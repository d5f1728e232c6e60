"""Protocol logic over StringTransport: a real realm on a MemoryStore, a Clock, no sockets."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from chatproto import wire
from chatproto.config import Config
from chatproto.errors import ChatError
from chatproto.protocol import ClientFactory
from chatproto.testing import (
    connect_string_transport,
    frame,
    frames,
    logged_in,
    make_test_realm,
    parse_frames,
)
from tests.conftest import FlowTransport


# The StringTransport fixtures of the protocol tests (other modules import these
# functions; the fixtures' names are clock and realm).
@pytest.fixture(name="clock")
def clock_fixture() -> Clock:
    return Clock()


@pytest.fixture(name="realm")
def realm_fixture(clock: Clock) -> Any:
    """A started realm on a MemoryStore with time from ``clock`` (stopped after)."""
    r = make_test_realm(clock)
    yield r
    r.stopService()


def logged_in_clear(
    realm: Any, clock: Clock, user: str, device: str = "default", password: str = "password1"
) -> Any:
    """:func:`logged_in` with the login's frames taken off the transport."""
    proto, transport = logged_in(realm, clock, user, password, device=device)
    frames(transport)
    return proto, transport


def hello(proto: Any, transport: Any) -> dict[str, Any]:
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": "h"}))
    [reply] = frames(transport)
    return reply


def test_hello_announces_realm_and_limits(realm: Any) -> None:
    proto, transport = connect_string_transport(realm)
    reply = hello(proto, transport)
    assert reply["type"] == "result" and reply["id"] == "h"
    assert reply["version"] == 1 and reply["realm"] == "localhost"
    assert reply["limits"]["max_frame"] == realm.config.limits.max_frame
    assert reply["limits"]["max_body"] == realm.config.limits.max_body
    assert "register" in reply["features"]


def test_unsupported_version_is_refused_and_closed(realm: Any) -> None:
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 99, "id": 7}))
    [err] = frames(transport)
    assert err["code"] == "unsupported_version" and err["supported"] == [1] and err["id"] == 7
    assert transport.disconnecting


def test_requests_before_hello_and_before_login(realm: Any) -> None:
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "send", "to": "bob", "body": "x", "id": 1}))
    assert frames(transport)[0]["code"] == "hello_required"
    hello(proto, transport)
    proto.dataReceived(frame({"type": "send", "to": "bob", "body": "x", "id": 2}))
    [err] = frames(transport)
    assert err == {**err, "code": "not_authenticated", "id": 2}
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "payload, code, closes",
    [
        (b"{not json", "bad_frame", True),
        (b"[1, 2]", "bad_frame", True),
        (b"\xff\xfe", "bad_frame", True),
        (b"\x00binary", "bad_frame", True),
        (b"", "bad_frame", True),
        (b'{"no": "type"}', "bad_request", False),
        (b'{"type": 5}', "bad_request", False),
        (b'{"type": "frobnicate", "id": 3}', "unknown_type", False),
        (b'{"type": "hello", "version": "1"}', "bad_request", False),
        (b'{"type": "hello", "version": true}', "bad_request", False),
        (b'{"type": "hello", "id": [1]}', "bad_request", False),
    ],
)
def test_bad_input_gets_an_error_code(realm: Any, payload: bytes, code: str, closes: bool) -> None:
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(struct.pack("!I", len(payload)) + payload)
    [err] = frames(transport)
    assert err["type"] == "error" and err["code"] == code and err["message"]
    assert transport.disconnecting is closes


def test_oversized_frame_is_refused_and_closed(clock: Clock) -> None:
    cfg = Config()
    cfg.limits.max_frame = 2048
    realm = make_test_realm(clock, cfg)
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(struct.pack("!I", 4096) + b"{")
    [err] = frames(transport)
    assert err["code"] == "too_large" and transport.disconnecting


def test_frames_before_an_oversized_one_are_answered_and_none_after(clock: Clock) -> None:
    """One read: two pings, a length prefix over the limit, a ping. The pings before
    it are answered, then too_large and the close; the rest is never read."""
    cfg = Config()
    cfg.limits.max_frame = 2048
    realm = make_test_realm(clock, cfg)
    proto, transport = connect_string_transport(realm)
    hello = frame({"type": "hello", "version": 1, "id": 1})
    ping = frame({"type": "ping", "id": 2})
    data = hello + ping + struct.pack("!I", 4096) + b"{" * 10 + frame({"type": "ping", "id": 3})
    proto.dataReceived(data[:7])  # (a frame cut inside its length prefix, then the rest)
    proto.dataReceived(data[7:])
    out = frames(transport)
    assert [(f["type"], f.get("id")) for f in out[:2]] == [("result", 1), ("result", 2)]
    assert [f["code"] for f in out[2:]] == ["too_large"] and transport.disconnecting
    proto.dataReceived(frame({"type": "ping", "id": 4}))
    assert frames(transport) == []


def _login_session() -> bytes:
    return b"".join(
        frame(f)
        for f in (
            {"type": "hello", "version": 1, "id": 1},
            {"type": "login", "user": "alice", "password": "password1", "id": 2},
            {"type": "send", "to": "alice", "body": "note to self", "id": 3},
            {"type": "who", "id": 4},
        )
    )


def _run_chunks(chunks: list[bytes]) -> list[dict[str, Any]]:
    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("alice", "password1")
    proto, transport = connect_string_transport(realm)
    for c in chunks:
        proto.dataReceived(c)
        clock.advance(0)
    clock.advance(0)
    out = frames(transport)
    proto.connectionLost(None)
    realm.stopService()
    return out


def _shape(fs: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    return sorted((f["type"], f.get("id")) for f in fs)


def test_frames_split_at_every_boundary_and_joined() -> None:
    data = _login_session()
    whole = _run_chunks([data])
    assert _shape(whole) == _shape(
        [{"type": "result", "id": i} for i in (1, 2, 3, 4)] + [{"type": "msg"}, {"type": "synced"}]
    )
    one_by_one = _run_chunks([data[i : i + 1] for i in range(len(data))])
    assert _shape(one_by_one) == _shape(whole)
    for cut in range(1, len(data)):
        assert _shape(_run_chunks([data[:cut], data[cut:]])) == _shape(whole)


def test_login_wrong_password_and_unknown_user_look_the_same(realm: Any, clock: Clock) -> None:
    realm.create_user("alice", "password1")
    replies = []
    for user, pw in (("alice", "wrong-password"), ("nobody", "wrong-password"), ("B@D", "x")):
        proto, transport = connect_string_transport(realm, host=f"10.0.0.{len(replies)}")
        hello(proto, transport)
        proto.dataReceived(frame({"type": "login", "user": user, "password": pw, "id": 1}))
        [err] = frames(transport)
        replies.append({k: v for k, v in err.items()})
    assert replies[0] == replies[1] == replies[2]
    assert replies[0]["code"] == "auth_failed"


def test_repeated_failures_are_slowed_per_account_and_address(realm: Any, clock: Clock) -> None:
    realm.create_user("alice", "password1")

    def attempt(pw: str, host: str = "10.1.1.1", user: str = "alice") -> str:
        proto, transport = connect_string_transport(realm, host=host)
        hello(proto, transport)
        proto.dataReceived(frame({"type": "login", "user": user, "password": pw, "id": 1}))
        [reply] = frames(transport)
        return reply.get("code", "ok")

    free = realm.config.auth.free_failures_per_account
    assert [attempt("bad-pass") for _ in range(free + 1)] == ["auth_failed"] * (free + 1)
    # Even the right password waits now: the account is throttled, from any address.
    assert attempt("password1", host="10.9.9.9") == "rate_limited"
    clock.advance(realm.config.auth.failure_delay + 0.01)
    assert attempt("password1", host="10.9.9.9") == "ok"
    # Success cleared the account; an address spraying many accounts is slowed too.
    codes = [attempt("x-bad-pass", "10.2.2.2", f"user{i}") for i in range(12)]
    assert codes[-1] == "rate_limited" and "auth_failed" in codes


def test_send_sets_sender_and_delivers_to_all_sessions(realm: Any, clock: Clock) -> None:
    a1, ta1 = logged_in(realm, clock, "alice")
    _a2, ta2 = logged_in(realm, clock, "alice", device="phone")
    _b1, tb1 = logged_in(realm, clock, "bob")
    for t in (ta1, ta2, tb1):
        frames(t)
    # A forged "from" is ignored: the realm sets the sender.
    a1.dataReceived(frame({"type": "send", "to": "BOB", "body": "hi", "from": "bob", "id": 9}))
    [echo, result] = sorted(frames(ta1), key=lambda f: f["type"])
    assert echo["type"] == "msg" and result["type"] == "result" and result["id"] == 9
    [m2] = frames(ta2)
    [mb] = frames(tb1)
    assert m2 == echo == mb
    assert mb["from"] == "alice@localhost" and mb["to"] == "bob@localhost"
    assert mb["pos"] == result["pos"] and mb["msg_id"] == result["msg_id"]


def test_send_errors(realm: Any, clock: Clock) -> None:
    a, t = logged_in(realm, clock, "alice")
    frames(t)
    cases = [
        ({"to": "nobody", "body": "x"}, "no_such_user"),
        ({"to": "bad name!", "body": "x"}, "bad_address"),
        ({"to": "bob@other.example", "body": "x"}, "remote_realm"),
        ({"to": "#group", "body": "x"}, "no_such_group"),
        ({"to": "#bad group", "body": "x"}, "bad_address"),
        ({"to": "alice", "body": 5}, "bad_request"),
        ({"to": "alice"}, "bad_request"),
        ({"to": "alice", "body": "é" * realm.config.limits.max_body}, "too_large"),
    ]
    for i, (fields, code) in enumerate(cases):
        a.dataReceived(frame({"type": "send", "id": i, **fields}))
        [err] = frames(t)
        assert (err["id"], err["code"]) == (i, code)
    assert not t.disconnecting


def test_send_rate_limit(clock: Clock) -> None:
    cfg = Config()
    cfg.limits.send_rate = 1.0
    cfg.limits.send_burst = 3
    realm = make_test_realm(clock, cfg)
    a, t = logged_in(realm, clock, "alice")
    frames(t)
    for i in range(4):
        a.dataReceived(frame({"type": "send", "to": "alice", "body": "x", "id": i}))
    results = [f for f in frames(t) if f["type"] != "msg"]
    assert [f.get("code") for f in results] == [None, None, None, "rate_limited"]
    assert results[-1]["retry_after"] == pytest.approx(1.0, abs=0.01)
    clock.advance(1.0)
    a.dataReceived(frame({"type": "send", "to": "alice", "body": "x", "id": 5}))
    assert [f["type"] for f in frames(t) if f["type"] != "msg"] == ["result"]


def test_backlog_then_synced_then_live_and_ack_resume(realm: Any, clock: Clock) -> None:
    realm.create_user("bob", "password1")
    a, _ta = logged_in(realm, clock, "alice")
    for i in range(3):
        a.dataReceived(frame({"type": "send", "to": "bob", "body": f"m{i}", "id": i}))
    b, tb = logged_in(realm, clock, "bob")
    got = [f for f in frames(tb) if f["type"] != "presence"]
    assert [f["type"] for f in got] == ["result", "msg", "msg", "msg", "synced"]
    assert [f["body"] for f in got[1:4]] == ["m0", "m1", "m2"]
    assert got[-1]["pos"] == got[3]["pos"]
    b.dataReceived(frame({"type": "ack", "pos": got[2]["pos"]}))  # processed m0, m1
    assert frames(tb) == []  # acks are not answered
    b.connectionLost(None)
    _b2, tb2 = logged_in(realm, clock, "bob")
    again = frames(tb2)
    assert [f.get("body") for f in again if f["type"] == "msg"] == ["m2"]
    # A device never seen starts at the user's newest ack.
    _b3, tb3 = logged_in(realm, clock, "bob", device="tablet")
    assert [f.get("body") for f in frames(tb3) if f["type"] == "msg"] == ["m2"]
    # since= overrides the stored ack.
    _b4, tb4 = logged_in(realm, clock, "bob", device="tablet", since=0)
    assert [f.get("body") for f in frames(tb4) if f["type"] == "msg"] == ["m0", "m1", "m2"]


def test_ack_cannot_skip_ahead(realm: Any, clock: Clock) -> None:
    realm.create_user("bob", "password1")
    b, _tb = logged_in(realm, clock, "bob")
    b.dataReceived(frame({"type": "ack", "pos": 10**9}))
    a, _ta = logged_in(realm, clock, "alice")
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "later", "id": 1}))
    b.connectionLost(None)
    _b2, tb2 = logged_in(realm, clock, "bob")
    assert [f.get("body") for f in frames(tb2) if f["type"] == "msg"] == ["later"]


def test_live_items_during_backlog_are_neither_lost_nor_doubled(realm: Any, clock: Clock) -> None:
    realm.create_user("bob", "password1")
    a, _ta = logged_in(realm, clock, "alice")
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "before", "id": 1}))
    proto, tb = connect_string_transport(realm)
    hello(proto, tb)
    proto.dataReceived(frame({"type": "login", "user": "bob", "password": "password1", "id": 2}))
    # Logged in, backlog not started yet: a live message arrives now.
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "during", "id": 3}))
    clock.advance(0)
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "after", "id": 4}))
    bodies = [f["body"] for f in frames(tb) if f["type"] == "msg"]
    assert bodies == ["before", "during", "after"]


def test_history_pages(realm: Any, clock: Clock) -> None:
    realm.create_user("bob", "password1")
    a, ta = logged_in(realm, clock, "alice")
    for i in range(5):
        a.dataReceived(frame({"type": "send", "to": "bob", "body": f"m{i}", "id": i}))
    frames(ta)

    def page(**kw: Any) -> list[str]:
        a.dataReceived(frame({"type": "history", "with": "bob", "id": "h", **kw}))
        [r] = frames(ta)
        assert r["type"] == "result", r
        return [m["body"] for m in r["messages"]]

    assert page() == ["m0", "m1", "m2", "m3", "m4"]
    assert page(limit=2) == ["m3", "m4"]
    newest = realm.store.items[-1].pos
    assert page(limit=2, before=newest - 1) == ["m1", "m2"]
    assert page(limit=2, after=realm.store.items[0].pos) == ["m1", "m2"]
    a.dataReceived(frame({"type": "history", "with": "bob", "limit": 0, "id": 1}))
    assert frames(ta)[0]["code"] == "bad_request"
    a.dataReceived(frame({"type": "history", "with": "bob", "before": 1, "after": 1, "id": 1}))
    assert frames(ta)[0]["code"] == "bad_request"


def test_who_lists_online_users(realm: Any, clock: Clock) -> None:
    a, ta = logged_in(realm, clock, "alice")
    b, _tb = logged_in(realm, clock, "bob")
    frames(ta)
    a.dataReceived(frame({"type": "who", "id": 1}))
    [r] = frames(ta)
    assert r["users"] == [
        {"user": "alice@localhost", "sessions": 1},
        {"user": "bob@localhost", "sessions": 1},
    ]
    b.connectionLost(None)
    a.dataReceived(frame({"type": "who", "id": 2}))
    assert frames(ta)[0]["users"] == [{"user": "alice@localhost", "sessions": 1}]


def test_who_one_user_says_whether_they_exist_and_are_online(realm: Any, clock: Clock) -> None:
    """``who`` with ``user``: the user if online, ``[]`` if not, ``no_such_user`` for no
    account (what a client asks before a first message: presence comes to contacts)."""
    a, ta = logged_in(realm, clock, "alice")
    b, _tb = logged_in(realm, clock, "bob")
    frames(ta)

    def who(**fields: Any) -> dict[str, Any]:
        a.dataReceived(frame({"type": "who", "id": 7, **fields}))
        clock.advance(0)
        [r] = frames(ta)
        return r

    assert who(user="Bob")["users"] == [{"user": "bob@localhost", "sessions": 1}]
    b.dataReceived(frame({"type": "set_status", "id": 2, "status": "away", "text": "lunch"}))
    assert who(user="bob@localhost")["users"] == [
        {"user": "bob@localhost", "sessions": 1, "status": "away", "text": "lunch"}
    ]
    b.connectionLost(None)
    assert who(user="bob") == {"type": "result", "id": 7, "users": []}
    assert who(user="nobody")["code"] == "no_such_user"
    assert who(user="not a name!")["code"] == "bad_address"
    assert who(user="x@elsewhere.example")["code"] == "remote_realm"
    assert who(user="bob", group="#dev")["code"] == "bad_request"
    assert who(user=5)["code"] == "bad_request"


def test_register_rules(clock: Clock) -> None:
    cfg = Config()
    realm = make_test_realm(clock, cfg)
    proto, t = connect_string_transport(realm)
    hello(proto, t)
    # NFKC + case-folding: fullwidth capitals are the same name as plain lower case.
    proto.dataReceived(
        frame({"type": "register", "user": "ＺOE", "password": "password1", "id": 1})  # noqa: RUF001
    )
    assert frames(t)[0] == {"type": "result", "id": 1, "user": "zoe@localhost"}
    proto.dataReceived(frame({"type": "register", "user": "Zoe", "password": "password1", "id": 2}))
    assert frames(t)[0]["code"] == "user_exists"
    proto.dataReceived(frame({"type": "register", "user": "carol", "password": "short", "id": 3}))
    assert frames(t)[0]["code"] == "bad_request"
    cfg.auth.allow_registration = False
    proto.dataReceived(
        frame({"type": "register", "user": "dave", "password": "password1", "id": 4})
    )
    assert frames(t)[0]["code"] == "registration_closed"


def test_double_login_refused(realm: Any, clock: Clock) -> None:
    a, t = logged_in(realm, clock, "alice")
    frames(t)
    a.dataReceived(frame({"type": "login", "user": "alice", "password": "password1", "id": 5}))
    assert frames(t)[0]["code"] == "already_authenticated"


def test_login_timeout_and_keepalive(realm: Any, clock: Clock) -> None:
    factory = ClientFactory(realm, clock=clock)
    factory.startFactory()
    lim = realm.config.limits
    idle, ti = connect_string_transport(realm, factory)
    a, ta = connect_string_transport(realm, factory)
    hello(a, ta)
    realm.create_user("alice", "password1")
    a.dataReceived(frame({"type": "login", "user": "alice", "password": "password1", "id": 1}))
    clock.advance(0)
    frames(ta)
    clock.advance(lim.login_timeout)
    assert ti.disconnecting and frames(ti)[-1]["code"] == "timeout"
    idle.connectionLost(None)
    assert not ta.disconnecting
    clock.advance(lim.keepalive_interval - lim.login_timeout + 1)
    assert frames(ta) == [{"type": "ping"}]
    a.dataReceived(frame({"type": "pong"}))  # alive: no reply, no close
    clock.advance(lim.keepalive_interval * 1.5)
    assert frames(ta) == [{"type": "ping"}] and not ta.disconnecting
    clock.advance(lim.keepalive_interval)
    assert ta.disconnecting and frames(ta)[-1]["code"] == "timeout"
    a.connectionLost(None)
    factory.stopFactory()
    assert realm.who() == []


def test_slow_reader_is_dropped_and_resumes_without_loss(clock: Clock) -> None:
    cfg = Config()
    cfg.limits.max_output_buffer = 10_000
    cfg.limits.send_burst = 1000
    realm = make_test_realm(clock, cfg)
    realm.create_user("bob", "password1")
    b, tb = logged_in(realm, clock, "bob")
    frames(tb)
    b.pauseProducing()  # what the transport does when the peer stops reading
    a, _ta = logged_in(realm, clock, "alice")
    sent = 0
    while not tb.disconnecting and sent < 1000:
        a.dataReceived(frame({"type": "send", "to": "bob", "body": "x" * 200, "id": sent}))
        sent += 1
    assert tb.disconnecting and sent < 100
    assert realm.stats.slow_readers == {"native": 1}  # counted for the metrics
    delivered = [f for f in frames(tb) if f["type"] == "msg"]
    b.connectionLost(None)
    _b2, tb2 = logged_in(realm, clock, "bob", since=0)
    again = [f for f in frames(tb2) if f["type"] == "msg"]
    assert len(again) == sent and [f["body"] for f in again] == ["x" * 200] * sent
    assert len(delivered) < sent


def _flow_logged_in(realm: Any, clock: Clock, user: str, **kw: Any) -> tuple[Any, FlowTransport]:
    """A logged-in connection on a transport with Twisted's flow control."""
    proto: Any = ClientFactory(realm).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = FlowTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
    proto.makeConnection(transport)
    hello(proto, transport)
    if user not in realm.store.users:
        realm.create_user(user, "password1")
    proto.dataReceived(frame({"type": "login", "user": user, "password": "password1", **kw}))
    clock.advance(0)
    transport.read()
    return proto, transport


def test_a_reader_that_stops_is_dropped_once_max_output_buffer_is_held(clock: Clock) -> None:
    """Issue 14: Twisted calls pauseProducing on every write while the buffer is full,
    which restarted the count: a reader that stopped was never dropped and the realm
    buffered everything.  Now what the transport cannot take is held and counted."""
    limit = 200_000
    cfg = Config()
    cfg.limits.max_output_buffer = limit
    cfg.limits.send_burst = 10**6
    realm = make_test_realm(clock, cfg)
    # the case: one account, a session that never reads, one sending to itself
    r, tr = _flow_logged_in(realm, clock, "alice", device="r")
    w, _tw = logged_in(realm, clock, "alice", device="w")
    body = "x" * 4000
    sent = peak = 0
    while r.state != "closed" and sent < 500:
        w.dataReceived(frame({"type": "send", "to": "alice", "body": body}))
        sent += 1
        peak = max(peak, tr.unread() + r._out.held)
    assert r.state == "closed" and tr.disconnecting
    assert 60 < sent < 70  # 64 KiB in the transport, then 200 000 bytes held
    assert peak <= limit + tr.bufferSize + 2 * 4200  # bounded: not what was sent
    # What the reader finds when it reads again: whole frames, in order, then the error
    got = parse_frames(tr.read())
    assert got[-1] == {
        "type": "error",
        "code": "slow_reader",
        "message": f"more than {limit} bytes of output were not read",
    }
    positions = [f["pos"] for f in got if f["type"] == "msg"]
    assert positions == sorted(positions) and len(positions) < sent
    w.dataReceived(frame({"type": "send", "to": "alice", "body": "after"}))
    assert tr.read() == b""  # a closed connection is written nothing more
    # Nothing is lost: the device resumes from its ack
    r.connectionLost(None)
    _r2, tr2 = logged_in(realm, clock, "alice", device="r", since=0)
    again = [f["body"] for f in frames(tr2) if f["type"] == "msg"]
    assert again == [body] * sent + ["after"]


def test_a_reader_that_keeps_up_is_never_dropped(clock: Clock) -> None:
    """A reader that reads as fast as the realm writes, but never empties the buffer
    for long, is not a slow reader however much goes through."""
    cfg = Config()
    cfg.limits.max_output_buffer = 100_000
    cfg.limits.send_burst = 10**6
    realm = make_test_realm(clock, cfg)
    r, tr = _flow_logged_in(realm, clock, "bob")
    w, _tw = logged_in(realm, clock, "alice")
    received = b""
    blocked = 0
    for i in range(400):  # 1.6 MB through a 64 KiB buffer
        w.dataReceived(frame({"type": "send", "to": "bob", "body": "y" * 4000}))
        if i >= 20:  # behind by 20 messages, then as fast as they come
            received += tr.read(4300)
        blocked += r._out.blocked
    while tr.unread():  # each read to the end resumes the realm, which writes the rest
        received += tr.read()
    assert r.state == "ready" and not tr.disconnecting
    assert blocked > 100  # it was paused most of the time
    msgs = [f for f in parse_frames(received) if f["type"] == "msg"]
    assert len(msgs) == 400 and r._out.held == 0


def test_backlog_waits_for_a_paused_reader(clock: Clock) -> None:
    from chatproto import realm as realm_mod

    cfg = Config()
    cfg.limits.send_burst = 10**6
    realm = make_test_realm(clock, cfg)
    realm.create_user("bob", "password1")
    a, _ta = logged_in(realm, clock, "alice")
    n = realm_mod.SYNC_PAGE + 10
    for i in range(n):
        a.dataReceived(frame({"type": "send", "to": "bob", "body": str(i), "id": i}))
    proto, tb = connect_string_transport(realm)
    hello(proto, tb)
    proto.pauseProducing()
    proto.dataReceived(frame({"type": "login", "user": "bob", "password": "password1", "id": 2}))
    clock.advance(0)
    # Paused: the result is held with one item, and the backlog waits for the reader.
    assert frames(tb) == []
    clock.advance(1)
    assert frames(tb) == [] and 0 < proto._out.held < 400  # the result and one item
    proto.resumeProducing()
    rest = [f for f in frames(tb) if f["type"] != "presence"]
    assert rest[0]["type"] == "result" and rest[0]["id"] == 2
    assert [f["body"] for f in rest if f["type"] == "msg"] == [str(i) for i in range(n)]
    assert rest[-1]["type"] == "synced"


def test_no_delayed_calls_left_after_disconnect(realm: Any, clock: Clock) -> None:
    a, _ta = logged_in(realm, clock, "alice")
    a.connectionLost(None)
    realm.stopService()
    assert clock.getDelayedCalls() == []


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_never_raise(realm: Any, chunks: list[bytes]) -> None:
    proto, transport = connect_string_transport(realm)
    for c in chunks:
        proto.dataReceived(c)
    for f in frames(transport):
        assert f["type"] == "error" and f["code"] in (
            "bad_frame",
            "bad_request",
            "unknown_type",
            "hello_required",
            "too_large",
            "unsupported_version",
        )
    proto.connectionLost(None)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.sampled_from(
        ["hello", "login", "register", "send", "history", "who", "ack", "ping", "pong", "x"]
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "version",
                "user",
                "password",
                "to",
                "body",
                "with",
                "before",
                "after",
                "limit",
                "pos",
                "since",
                "device",
            ]
        ),
        json_values,
        max_size=6,
    ),
)
def test_arbitrary_requests_get_answers_not_crashes(
    realm: Any, clock: Clock, kind: str, fields: dict[str, Any]
) -> None:
    proto, transport = connect_string_transport(realm)
    hello(proto, transport)
    if "alice" not in realm.store.users:
        realm.create_user("alice", "password1")
    proto.dataReceived(frame({"type": "login", "user": "alice", "password": "password1"}))
    clock.advance(0)
    frames(transport)
    proto.dataReceived(frame({**fields, "type": kind}))
    clock.advance(0)
    for f in frames(transport):
        assert f["type"] in ("result", "error", "msg", "synced"), f
        if f["type"] == "error":
            assert f["code"] != "internal_error", f
    proto.connectionLost(None)


def test_wire_decode_rejects_deep_nesting() -> None:
    deep = b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(wire.ChatError) as e:
        wire.decode(deep)
    assert e.value.code == "bad_frame"


@pytest.mark.parametrize("depth", [100, 500, 800, 900, 950, 990, 1100])
@pytest.mark.parametrize("stack", [0, 200])
def test_a_lone_surrogate_at_any_depth_is_a_clean_error(depth: int, stack: int) -> None:
    """A lone surrogate nested as deep as the decoder reads, with the decoder
    called from deep in a stack (``stack`` frames): ``bad_request`` (or
    ``bad_frame`` for nesting too deep to read), never a RecursionError (the
    surrogate walk was recursive and failed past the decoder's own depth)."""
    payload = b'{"type":"ping","x":' + b"[" * depth + b'"\\ud800"' + b"]" * depth + b"}"

    def call(n: int) -> Any:
        return wire.decode(payload) if n == 0 else call(n - 1)

    with pytest.raises(ChatError) as e:
        call(stack)
    assert e.value.code in ("bad_request", "bad_frame")


def test_send_with_nonce_is_idempotent(realm: Any, clock: Clock) -> None:
    realm.create_user("bob", "password1")
    a, ta = logged_in(realm, clock, "alice")
    a2, ta2 = logged_in(realm, clock, "alice", device="phone")
    frames(ta)
    frames(ta2)
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "once", "nonce": "n1", "id": 1}))
    [first] = [f for f in frames(ta) if f["type"] == "result"]
    # the same nonce again, from another of alice's connections (a retry after a drop)
    a2.dataReceived(frame({"type": "send", "to": "bob", "body": "once", "nonce": "n1", "id": 2}))
    [again] = [f for f in frames(ta2) if f["type"] == "result"]
    assert (again["pos"], again["msg_id"]) == (first["pos"], first["msg_id"])
    assert [e.body for e in realm.store.items] == ["once"]
    # a failed send is not remembered: the retry may succeed
    a.dataReceived(frame({"type": "send", "to": "carol", "body": "x", "nonce": "n2", "id": 3}))
    assert frames(ta)[0]["code"] == "no_such_user"
    realm.create_user("carol", "password1")
    a.dataReceived(frame({"type": "send", "to": "carol", "body": "x", "nonce": "n2", "id": 4}))
    assert [f["type"] for f in frames(ta)] == ["msg", "result"]
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "x", "nonce": "", "id": 5}))
    assert frames(ta)[0]["code"] == "bad_request"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"ack","pos":2}',  # the fast path
        b'{"type": "ack", "pos": 2}',  # the general path
        b'{"pos":2,"type":"ack"}',
    ],
)
def test_ack_spellings_are_equivalent(realm: Any, clock: Clock, payload: bytes) -> None:
    realm.create_user("bob", "password1")
    a, _ta = logged_in(realm, clock, "alice")
    for i in range(3):
        a.dataReceived(frame({"type": "send", "to": "bob", "body": f"m{i}", "id": i}))
    b, tb = logged_in(realm, clock, "bob")
    positions = [f["pos"] for f in frames(tb) if f["type"] == "msg"]
    payload = payload.replace(b"2", str(positions[1]).encode())
    b.dataReceived(struct.pack("!I", len(payload)) + payload)
    assert frames(tb) == []
    assert realm.store.acks[("bob@localhost", "default")] == positions[1]


def test_acks_of_at_most_max_devices_per_user_devices_are_kept(clock: Clock) -> None:
    """Full stack on the memory store: ``[limits] max_devices_per_user`` reaches the
    store, logins under ever new device names leave that many acks, and a forgotten
    device's login starts after the user's highest ack, a kept one's after its own."""
    cfg = Config()
    cfg.limits.max_devices_per_user = 3
    realm = make_test_realm(clock, cfg)
    assert realm.store.max_devices == 3
    realm.create_user("alice", "password1")
    bob, _tb = logged_in(realm, clock, "bob")
    sent = []
    for k in range(6):
        bob.dataReceived(frame({"type": "send", "to": "alice", "body": f"m{k}", "id": k}))
        sent.append(realm.store.items[-1].pos)
        a, ta = logged_in(realm, clock, "alice", device=f"d{k}")
        got = [f for f in frames(ta) if f["type"] == "msg"]
        assert [f["body"] for f in got] == [f"m{k}"]  # a new device: after the highest
        a.dataReceived(frame({"type": "ack", "pos": got[-1]["pos"]}))
        a.connectionLost(None)
    acks = {d: p for (u, d), p in realm.store.acks.items() if u == "alice@localhost"}
    assert acks == {"d3": sent[3], "d4": sent[4], "d5": sent[5]}
    bob.dataReceived(frame({"type": "send", "to": "alice", "body": "last", "id": 9}))
    for device, expected in (("d4", ["m5", "last"]), ("d1", ["last"])):
        a, ta = logged_in(realm, clock, "alice", device=device)
        assert [f["body"] for f in frames(ta) if f["type"] == "msg"] == expected, device
        a.connectionLost(None)
    realm.stopService()


def test_malformed_fast_path_ack_falls_back(realm: Any, clock: Clock) -> None:
    b, tb = logged_in(realm, clock, "bob")
    frames(tb)
    for bad in (b'{"type":"ack","pos":-1}', b'{"type":"ack","pos":1x}', b'{"type":"ack","pos":'):
        b.dataReceived(struct.pack("!I", len(bad)) + bad)
    # -1 is valid JSON but no position (bad_request, answered); "1x" is not JSON
    assert [f["code"] for f in frames(tb)] == ["bad_request", "bad_frame"]
    assert tb.disconnecting
    assert ("bob@localhost", "default") not in realm.store.acks


@pytest.mark.parametrize("digits", [b"07", b"00", b"0000000000000001"])
def test_an_ack_with_a_leading_zero_is_not_json(realm: Any, clock: Clock, digits: bytes) -> None:
    """The ack fast path took ``007`` (not JSON: RFC 8259 numbers have no leading
    zero) as 7; like any other frame that is not JSON, it is bad_frame and closes."""
    realm.create_user("bob", "password1")
    a, _ta = logged_in(realm, clock, "alice")
    for i in range(8):
        a.dataReceived(frame({"type": "send", "to": "bob", "body": f"m{i}", "id": i}))
    b, tb = logged_in(realm, clock, "bob")
    frames(tb)
    payload = b'{"type":"ack","pos":' + digits + b"}"
    b.dataReceived(struct.pack("!I", len(payload)) + payload)
    assert [f["code"] for f in frames(tb)] == ["bad_frame"]
    assert tb.disconnecting
    assert ("bob@localhost", "default") not in realm.store.acks


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=400, deadline=None)
@given(
    pos=st.integers(min_value=0, max_value=2**62),
    mid=_text,
    sender=_text,
    recipient=_text,
    ts=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**40), 2**40),
    body=_text,
    meta=st.none() | st.just({"event": "joined", "user": "x@y"}),
)
def test_delivery_frames_are_the_generic_encoding_byte_for_byte(
    pos: int, mid: str, sender: str, recipient: str, ts: float, body: str, meta: Any
) -> None:
    """The formatted fast path of text items says exactly what the JSON encoder would."""
    from chatproto.envelope import Envelope
    from chatproto.protocol import delivery_frame

    env = Envelope(mid, "text", sender, recipient, ts, body, meta, pos)
    frame = delivery_frame(env)
    payload = wire.encode({"type": "msg", **env.to_wire()})
    assert frame == struct.pack("!I", len(payload)) + payload
    assert wire.decode(frame[4:])["body"] == body


def test_delivery_frames_of_a_run_share_their_fields_and_stay_exact() -> None:
    """The fields a run's items share (kind, sender, recipient, time) are formatted
    once for the same objects: a recipient, sender or time that changes between
    items, back and forth, still gives each item the generic encoding."""
    from chatproto.envelope import Envelope
    from chatproto.protocol import delivery_frame, send_result

    ts, later = 1764924000.5, 1764924001.25
    alice, bob, carol = "alice@x", "bob@x", "carol@x"
    bob_again = "".join(["bob", "@x"])  # equal to bob, another object
    runs = [
        (alice, bob, ts),
        (alice, bob, ts),
        (alice, carol, ts),
        (alice, bob, ts),
        (alice, bob_again, ts),
        (carol, bob_again, ts),
        (carol, bob_again, later),
        (alice, bob, later),
    ]
    for n, (sender, recipient, when) in enumerate(runs):
        env = Envelope(f"id{n}", "text", sender, recipient, when, f"m{n}", None, 10 + n)
        payload = wire.encode({"type": "msg", **env.to_wire()})
        assert delivery_frame(env) == struct.pack("!I", len(payload)) + payload
        result = wire.result_frame(n, pos=10 + n, msg_id=f"id{n}", ts=when)
        assert send_result(env, n) == struct.pack("!I", len(result)) + result


_bob_again = "".join(["bob", "@x"])  # equal to "bob@x", another object


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alice@x", "carol@x"]),
            st.sampled_from(["bob@x", _bob_again, "carol@x"]),
            st.sampled_from([1764924000.5, 1764924001.25, 0.0, -0.0]),
            st.sampled_from(["text", "text", "file"]),
            st.none() | st.just({"notice": True}),
            _text,
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_the_frames_of_a_run_are_each_items_generic_encoding(items: list[Any], twice: bool) -> None:
    """protocol.delivery_frames (a run's frames, its items formatted without a call
    each where their fields are the objects last formatted) gives each item's generic
    encoding, joined, caches each item's frame and result tail as delivery_frame does,
    and gives the same bytes for the same run again; items already encoded keep their
    frame."""
    from chatproto.envelope import Envelope
    from chatproto.protocol import delivery_frame, delivery_frames, send_result

    envs = []
    for n, (sender, recipient, ts, kind, meta, body, encoded) in enumerate(items):
        env = Envelope(f"id{n}", kind, sender, recipient, ts, body, meta, 10 + n)
        if encoded:
            delivery_frame(env)
        envs.append(env)
    want = []
    for env in envs:
        payload = wire.encode({"type": "msg", **env.to_wire()})
        want.append(struct.pack("!I", len(payload)) + payload)
    data = delivery_frames(envs)
    assert data == b"".join(want)
    assert [env.frame for env in envs] == want
    for n, env in enumerate(envs):
        result = wire.result_frame(n, pos=env.pos, msg_id=env.id, ts=env.ts)
        assert send_result(env, n) == struct.pack("!I", len(result)) + result
    if twice:
        assert delivery_frames(envs) == data
    assert delivery_frames(list(envs)) == data  # (another list: formatted again)


def test_delivery_frames_of_a_batch_share_the_time_and_stay_exact() -> None:
    """The time's text is cached by the float object a batch shares: equal floats
    that print differently (0.0, -0.0), and one object after another, each give the
    generic encoding."""
    from chatproto.envelope import Envelope
    from chatproto.protocol import delivery_frame, send_result

    shared = 1764924000.123
    for ts in (shared, shared, 0.0, -0.0, float("-0"), 0.0, shared, 1e300, 5e-324):
        for n in range(2):
            env = Envelope(f"id{n}", "text", "a@x", 'b"@x', ts, "é\n", None, 7 + n)
            payload = wire.encode({"type": "msg", **env.to_wire()})
            assert delivery_frame(env) == struct.pack("!I", len(payload)) + payload
            result = wire.result_frame(3, pos=7 + n, msg_id=f"id{n}", ts=ts)
            assert send_result(env, 3) == struct.pack("!I", len(result)) + result


@settings(max_examples=400, deadline=None)
@given(
    pos=st.integers(min_value=0, max_value=2**62),
    mid=_text,
    ts=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**40), 2**40),
    rid=st.none() | st.integers(-(2**63), 2**63) | _text,
)
def test_send_results_are_the_generic_encoding_byte_for_byte(
    pos: int, mid: str, ts: float, rid: Any
) -> None:
    """The formatted result of a send says exactly what wire.result_frame would."""
    from chatproto.envelope import Envelope
    from chatproto.protocol import delivery_frame, send_result

    env = Envelope(mid, "text", "a@x", "b@x", ts, "hi", None, pos)
    frame = send_result(env, rid)
    payload = wire.result_frame(rid, pos=pos, msg_id=mid, ts=ts)
    assert frame == struct.pack("!I", len(payload)) + payload
    # the same once the delivery frame is made (it caches the result's tail)
    delivery_frame(env)
    assert send_result(env, rid) == frame


def test_send_request_errors_are_unchanged(realm: Any, clock: Clock) -> None:
    """The send fast path checks its fields as wire.field does, with the same errors."""
    a, ta = logged_in(realm, clock, "alice")
    logged_in(realm, clock, "bob")
    frames(ta)
    bad: list[dict[str, Any]] = [
        {"type": "send", "id": 1, "body": "x"},
        {"type": "send", "id": 2, "to": None, "body": "x"},
        {"type": "send", "id": 3, "to": 5, "body": "x"},
        {"type": "send", "id": 4, "to": "bob", "body": True},
        {"type": "send", "id": 5, "to": "bob"},
        {"type": "send", "id": 6, "to": "bob", "body": "x", "nonce": 7},
        {"type": "send", "id": 7, "to": "bob", "body": "x", "nonce": ""},
        {"type": "send", "id": 8, "to": "nobody", "body": "x"},
    ]
    for req in bad:
        payload = wire.encode(req)
        a.dataReceived(struct.pack("!I", len(payload)) + payload)
    got = [(f["id"], f["code"], f["message"]) for f in frames(ta)]
    assert got == [
        (1, "bad_request", "missing field 'to'"),
        (2, "bad_request", "missing field 'to'"),
        (3, "bad_request", "field 'to' must be str"),
        (4, "bad_request", "field 'body' must be str"),
        (5, "bad_request", "missing field 'body'"),
        (6, "bad_request", "field 'nonce' must be str"),
        (7, "bad_request", "nonce must be 1-64 characters"),
        (8, "no_such_user", "no user nobody@localhost on this realm"),
    ]
    payload = b'{"type":"send","id":"r1","to":"bob","body":"hi"}'
    a.dataReceived(struct.pack("!I", len(payload)) + payload)
    result = [f for f in frames(ta) if f["type"] == "result"]
    assert [r["id"] for r in result] == ["r1"] and list(result[0]) == [
        "type",
        "id",
        "pos",
        "msg_id",
        "ts",
    ]


def _decode_reference(payload: bytes) -> Any:
    """wire.decode's JSON step as it was before the scanner fast path."""
    try:
        return wire._decoder.decode(payload.decode("utf-8"))
    except wire._NotJSON as e:
        return ("bad_frame", str(e)[:120])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return ("bad_frame", f"malformed JSON: {str(e)[:80]}")


def _decode_outcome(payload: bytes) -> Any:
    try:
        return wire.decode(payload)
    except ChatError as e:
        return (e.code, e.message)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    obj=st.dictionaries(_text, _json_values, max_size=4),
    typ=st.none() | _text,
    tail=st.sampled_from(["", " ", "\n", " x", "}", ",", "{}", "\x00"]),
    cut=st.integers(min_value=0, max_value=200),
)
def test_decode_fast_path_agrees_with_the_json_decoder(
    obj: dict[str, Any], typ: str | None, tail: str, cut: int
) -> None:
    """Whole, cut short or followed by something: the same object or the same error."""
    if typ is not None:
        obj = {"type": typ, **obj}
    text = json.dumps(obj, ensure_ascii=bool(cut % 2), separators=(",", ":")) + tail
    for payload in (text.encode(), text[: max(1, len(text) - cut)].encode()):
        got = _decode_outcome(payload)
        ref = _decode_reference(payload)
        if isinstance(ref, tuple):
            assert got == ref
        elif isinstance(got, dict):
            assert got == ref
        else:  # the object decoded, and a later check (type, id) refused it
            assert got[0] == "bad_request"


_send_values = (
    st.integers(-(2**60), 2**60)
    | _text
    | st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.sampled_from(["\ud800", "a\\u0041", "\x00", "\x1f", '"', "\\", "n" * 65, "é" * 40])
)
_printable = st.text(st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)), max_size=80)
_send_string = _printable | st.sampled_from(["\ud800", "a\\u0041", "\x1f", "tab\tnl\n", ""])
#: Mostly well-formed sends: each field at most once, in any order
_likely_send = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(0, 10**16) | _printable,
        "to": _send_string,
        "body": _send_string,
        "nonce": _send_string | st.just("é" * 40),
    },
).flatmap(lambda d: st.permutations(list(d.items())))
#: Sends in the field orders clients use (the id first, last, or absent)
_client_send = st.builds(
    lambda rid, first, to, body, nonce: (
        ([("id", rid)] if first and rid is not None else [])
        + [("to", to), ("body", body)]
        + ([("nonce", nonce)] if nonce is not None else [])
        + ([("id", rid)] if not first and rid is not None else [])
    ),
    st.none() | st.integers(0, 10**16) | st.integers(-5, 5),
    st.booleans(),
    _send_string,
    _send_string,
    st.none() | _send_string | st.just("é" * 40),
)
_any_fields = st.lists(
    st.tuples(st.sampled_from(["id", "to", "body", "nonce", "type", "x"]), _send_values),
    max_size=5,
)


@settings(max_examples=1500, deadline=None)
@given(
    fields=st.one_of(_client_send, _client_send, _client_send, _likely_send, _any_fields),
    ascii_=st.sampled_from([False, False, False, True]),
    mangle=st.sampled_from([False, False, False, True]),
    edit=st.tuples(st.integers(0, 200), st.sampled_from([" ", "", "0", ",", "}", '"', "\\", "é"])),
    cut=st.integers(0, 3),
)
def test_compact_send_is_what_decode_reads_or_nothing(
    fields: list[tuple[str, Any]], ascii_: bool, mangle: bool, edit: Any, cut: int
) -> None:
    """wire.compact_send (the send fast path) gives exactly the fields wire.decode
    reads, or None (then the general path runs): sends in any field order, with
    repeated names, other fields, values of every kind, escapes, bytes inserted or
    replaced anywhere, cut short."""
    body = ",".join(
        json.dumps(k) + ":" + json.dumps(v, ensure_ascii=ascii_, separators=(",", ":"))
        for k, v in fields
    )
    text = '{"type":"send"' + ("," + body if body else "") + "}"
    if mangle:  # a byte inserted or replaced (cut odd), the end cut off (cut >= 2)
        at, piece = edit
        at = min(at, len(text))
        text = text[:at] + piece + text[at + (cut % 2) :]
    payload = text.encode("utf-8", "surrogatepass")
    if mangle:
        payload = payload[: len(payload) - cut // 2]
    fast = wire.compact_send(payload)
    if fast is None:
        return
    rid, to, body_, nonce = fast
    obj = wire.decode(payload)  # (raises if the fast path took what it must not)
    assert obj == {
        "type": "send",
        **({} if rid is None else {"id": rid}),
        "to": to,
        "body": body_,
        **({} if nonce is None else {"nonce": nonce}),
    }
    assert nonce is None or 0 < len(nonce) <= 64


def test_compact_send_takes_what_clients_write() -> None:
    """The spellings of the client library, the web page and the load generator take
    the fast path; an escape, a repeated id or a leading zero do not."""
    for req, want in (
        ({"type": "send", "id": 7, "to": "bob", "body": "hi é 👍"}, (7, "bob", "hi é 👍", None)),
        ({"type": "send", "id": 7, "to": "b@x", "body": "", "nonce": "n1"}, (7, "b@x", "", "n1")),
        ({"type": "send", "to": "bob", "body": "x", "id": 10**14}, (10**14, "bob", "x", None)),
        ({"type": "send", "to": "#g", "body": "x"}, (None, "#g", "x", None)),
    ):
        assert wire.compact_send(wire.encode(req)) == want
    for payload in (
        b'{"type":"send","id":1,"to":"bob","body":"a\\nb"}',
        b'{"type":"send","id":1,"to":"bob","body":"x","id":2}',
        b'{"type":"send","id":01,"to":"b","body":"x"}',
        b'{"type":"send","id":1234567890123456,"to":"b","body":"x"}',
        b'{"type":"send", "id":1,"to":"b","body":"x"}',
        b'{"type":"send","id":1,"to":"b","body":"x","nonce":""}',
        b'{"type":"send","id":"r1","to":"b","body":"x"}',
    ):
        assert wire.compact_send(payload) is None


def test_compact_sends_are_answered_as_decoded_ones(realm: Any, clock: Clock) -> None:
    """Over StringTransport: the same sends, compact (fast path) and spaced out
    (general path), get the same answers and deliveries; a compact send before
    login gets not_authenticated, as a spaced one does."""
    realm.create_user("bob", "password1")
    out = []
    for compact in (True, False):
        a, ta = logged_in_clear(realm, clock, f"alice{int(compact)}")
        _b, tb = logged_in_clear(realm, clock, "bob")
        reqs = [
            {"type": "send", "id": 1, "to": "bob", "body": "one"},
            {"type": "send", "to": "bob", "body": "two", "id": "x"},
            {"type": "send", "id": 3, "to": "nobody", "body": "three"},
            {"type": "send", "id": 4, "to": "bob", "body": "four", "nonce": "n"},
            {"type": "send", "id": 5, "to": "bob", "body": "again", "nonce": "n"},
        ]
        sep = (",", ":") if compact else (", ", ": ")
        data = b"".join(
            struct.pack("!I", len(p)) + p
            for p in (json.dumps(r, separators=sep).encode() for r in reqs)
        )
        a.dataReceived(data)
        got = [(f["type"], f.get("id"), f.get("code"), f.get("body")) for f in frames(ta)] + [
            (f["type"], f.get("body")) for f in frames(tb)
        ]
        out.append(got)
        _b.connectionLost(None)  # (bob logs in again for the next spelling)
    assert out[0] == out[1] and len(out[0]) > 5
    fresh, t = connect_string_transport(realm)
    fresh.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    fresh.dataReceived(frame({"type": "send", "id": 2, "to": "bob", "body": "x"}))
    assert [f.get("code") for f in frames(t)] == [None, "not_authenticated"]


def test_compact_sends_matched_in_the_read_are_answered_as_decoded_ones(
    realm: Any, clock: Clock
) -> None:
    """The framing loop's fast path (compact sends matched in the read's buffer) and
    the general path (each frame decoded alone) give the same answers and
    deliveries, for UTF-8 text, an id first or last, frames of other types between
    the sends, and (last, alone: they close the connection) bytes that are not
    UTF-8 or an id given twice."""
    realm.create_user("bob", "password1")
    payloads = [
        b'{"type":"send","id":1,"to":"bob","body":"caf\xc3\xa9"}',
        b'{"type":"send","to":"bob","body":"two","id":2}',
        b'{"type":"ping","id":6}',
        b'{"type":"send","to":"bob","body":"seven","nonce":"n7"}',
        b'{"type":"send","id":8,"to":"bob","body":"eight","nonce":"n7"}',
    ]
    for n, fatal in enumerate(
        (
            b'{"type":"send","id":3,"to":"bob","body":"\xff"}',
            b'{"type":"send","id":4,"to":"bob","body":"four","id":5}',
        )
    ):
        out = []
        for batched in (True, False):
            a, ta = logged_in_clear(realm, clock, f"alice{n}{int(batched)}")
            b, tb = logged_in_clear(realm, clock, "bob")
            if batched:
                a.dataReceived(b"".join(struct.pack("!I", len(p)) + p for p in payloads))
                a.dataReceived(struct.pack("!I", len(fatal)) + fatal)
            else:
                for p in [*payloads, fatal]:
                    a.stringReceived(p)
            # (a batch's echoes go out before its results: the same frames, in
            # another order; the recipient's, in order)
            mine = [(f["type"], f.get("id"), f.get("code"), f.get("body")) for f in frames(ta)]
            out.append((sorted(mine, key=repr), [f["body"] for f in frames(tb)]))
            b.connectionLost(None)  # (bob logs in again for the other way)
        assert out[0] == out[1]
        assert ("error", None, "bad_frame", None) in out[0][0]
        assert ("result", 8, None, None) in out[0][0]
        assert out[0][1] == ["café", "two", "seven"]


def test_a_subclass_that_overrides_send_gets_compact_sends_too(clock: Clock) -> None:
    """The compact-send fast path is the native handler's: a protocol subclass with
    its own handle_send sees every send, compact or not."""
    from chatproto.protocol import ClientProtocol

    seen: list[Any] = []

    class Own(ClientProtocol):
        def handle_send(self, req: dict[str, Any]) -> dict[str, Any]:
            seen.append(req.get("body"))
            return {}

    class Plain(ClientProtocol):
        pass

    assert not Own._compact_sends and Plain._compact_sends
    realm = make_test_realm(clock)
    realm.create_user("alice", "password1")
    realm.create_user("bob", "password1")
    factory = ClientFactory(realm)
    factory.protocol = Own  # type: ignore[assignment]
    proto, t = connect_string_transport(realm, factory)
    proto.dataReceived(
        frame({"type": "hello", "version": 1, "id": 1})
        + frame({"type": "login", "user": "alice", "password": "password1", "id": 2})
    )
    clock.advance(0)
    frames(t)
    proto.dataReceived(frame({"type": "send", "id": 3, "to": "bob", "body": "hi"}))
    assert seen == ["hi"] and frames(t) == [{"type": "result", "id": 3}]


# strict JSON (issue 14, item 3) ---------------------------------------------------------

#: JSON-looking text: the grammar's characters, the constants Python would accept,
#: escapes, digits and exponents, so that most examples get deep into the parser.
_json_ish = st.lists(
    st.sampled_from(
        [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            '"',
            '"a"',
            '"type"',
            '"id"',
            "1",
            "-",
            "0.5",
            "e400",
            "E-9",
            "9" * 30,
            "NaN",
            "Infinity",
            "-Infinity",
            "true",
            "null",
            " ",
            "\\u",
            "d83d",
            "\\ud800",
            "\\n",
            "é",
            "\x00",
            "\x7f",
            "\u0085",
        ]
    ),
    max_size=40,
).map("".join)


def _strict_outcome(data: bytes) -> Any:
    try:
        return wire.parse_json(data)
    except ChatError as e:
        assert e.code in ("bad_frame", "bad_request"), e
        return e


def _strict_ok(value: Any) -> None:
    """A value parse_json returns: plain JSON data, encodable again without NaN."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            k.encode("utf-8")
            _strict_ok(v)
    elif isinstance(value, list):
        for v in value:
            _strict_ok(v)
    elif isinstance(value, float):
        assert value == value  # never NaN (infinity: 1e400, valid JSON)
    elif isinstance(value, str):
        value.encode("utf-8")  # no lone surrogate
    else:
        assert value is None or isinstance(value, (bool, int))


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=80), _json_ish.map(lambda t: t.encode("utf-8"))))
def test_parse_json_of_any_bytes_is_a_value_or_a_clean_error(data: bytes) -> None:
    got = _strict_outcome(data)
    if not isinstance(got, ChatError):
        _strict_ok(got)
    try:
        frame_obj = wire.decode(data)
    except ChatError as e:
        assert e.code in ("bad_frame", "bad_request")
    else:
        assert isinstance(frame_obj, dict) and isinstance(frame_obj["type"], str)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"send","n":NaN}',
        '{"type":"send","n":Infinity}',
        '{"type":"send","n":-Infinity}',
        '{"type":"send","n":[1,{"m":NaN}]}',
        '{"type":"send","to":"bob","to":"carol"}',
        '{"type":"send","type":"ping"}',
        '{"type":"send","meta":{"a":1,"a":1}}',
        '{"type":"send","n":' + "7" * 4301 + "}",
        '{"type":"send","n":-' + "7" * 5000 + "}",
        '{"type":"send","n":' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_non_standard_json_is_bad_frame(text: str) -> None:
    with pytest.raises(ChatError) as e:
        wire.decode(text.encode())
    assert e.value.code == "bad_frame"
    assert "Traceback" not in e.value.message and len(e.value.message) <= 140


def test_json_that_is_standard_but_unusual_is_read() -> None:
    assert wire.decode(b'{"type":"x","n":1e400,"m":-1e400}') == {
        "type": "x",
        "n": float("inf"),
        "m": float("-inf"),
    }
    big = "9" * 4300  # Python's limit, not JSON's: read, then refused by every field
    obj = wire.decode(f'{{"type":"x","n":{big},"a":{{"b":1}},"c":{{"b":2}}}}'.encode())
    assert obj["n"] == int(big) and obj["a"] == {"b": 1}
    for name in ("n",):
        with pytest.raises(ChatError) as e:
            wire.field(obj, name, int)
        assert e.value.code == "bad_request"
    with pytest.raises(ChatError) as e:
        wire.field({"n": float("inf")}, "n", float)
    assert e.value.code == "bad_request"


def test_non_standard_json_closes_a_native_connection(realm: Any, clock: Clock) -> None:
    """Over StringTransport: NaN in a send is bad_frame and a close; nothing stored."""
    a, ta = logged_in(realm, clock, "alice")
    logged_in(realm, clock, "bob")
    frames(ta)
    payload = b'{"type":"send","id":1,"to":"bob","body":"x","n":NaN}'
    a.dataReceived(struct.pack("!I", len(payload)) + payload)
    assert frames(ta) == [
        {"type": "error", "code": "bad_frame", "message": "NaN is not JSON (RFC 8259)"}
    ]
    assert ta.disconnecting
    clock.advance(1)
    assert realm.store.max_pos().result == 0


def test_request_id_out_of_range_is_refused_without_echo(realm: Any, clock: Clock) -> None:
    proto, transport = connect_string_transport(realm)
    for rid in (2**53, -(2**53), int("9" * 400)):
        payload = b'{"type":"hello","version":1,"id":' + str(rid).encode() + b"}"
        proto.dataReceived(struct.pack("!I", len(payload)) + payload)
        (f,) = frames(transport)
        assert f == {
            "type": "error",
            "code": "bad_request",
            "message": "'id' is out of range (|n| <= 2**53 - 1)",
        }
    hello(proto, transport)
    assert not transport.disconnecting


def test_registrations_are_throttled_per_address_and_hash_only_when_they_can_succeed(
    clock: Clock,
) -> None:
    """Each ``register`` hashed its password (argon2, in the realm's small hashing
    pool, which logins share) before it looked at anything else: one connection not
    logged in could queue hundreds of hashes -- a name that exists, sent again and
    again, did -- and every login waited behind them.  A registration that cannot
    succeed is refused before the hash; the others are rate-limited per address."""
    auth = Config().auth  # the defaults: 5 at once, then one every 30 s
    burst, interval = auth.registrations_per_address, auth.registration_interval
    realm = make_test_realm(clock, Config())
    hashes = []
    hash_password = realm.accounts.hasher.hash
    realm.accounts.hasher.hash = lambda pw: (hashes.append(pw), hash_password(pw))[1]
    realm.create_user("alice", "password1")
    hashes.clear()
    proto, t = connect_string_transport(realm, host="192.0.2.1")
    hello(proto, t)

    def register(p: Any, tr: Any, user: str) -> dict[str, Any]:
        p.dataReceived(frame({"type": "register", "user": user, "password": "password1", "id": 1}))
        [reply] = frames(tr)
        return reply

    for _ in range(50):
        assert register(proto, t, "ALICE")["code"] == "user_exists"
    assert register(proto, t, "guest-1")["code"] == "bad_address"
    assert hashes == []
    for n in range(burst):
        assert register(proto, t, f"user{n}")["type"] == "result"
    refused = register(proto, t, "one-more")
    assert refused["code"] == "rate_limited"
    assert refused["retry_after"] == interval
    assert len(hashes) == burst
    other, ot = connect_string_transport(realm, host="192.0.2.2")  # its own allowance
    hello(other, ot)
    assert register(other, ot, "from-elsewhere")["type"] == "result"
    clock.advance(interval)
    assert register(proto, t, "one-more")["type"] == "result"
    assert realm.stats.refused["register"] == 1


def test_registrations_per_address_set_in_the_config_and_zero_is_no_bound(
    clock: Clock,
) -> None:
    """Behind a proxy that hides client addresses every client has the proxy's:
    ``auth.registrations_per_address = 0`` lifts the per-address bound; another value
    and ``auth.registration_interval`` set it."""
    for per_address, interval, allowed in ((2, 600.0, 2), (0, 30.0, 12)):
        cfg = Config()
        cfg.auth.registrations_per_address = per_address
        cfg.auth.registration_interval = interval
        realm = make_test_realm(clock, cfg)
        proto, t = connect_string_transport(realm, host="192.0.2.1")
        hello(proto, t)
        codes = []
        for n in range(12):
            proto.dataReceived(
                frame({"type": "register", "user": f"u{n}", "password": "password1", "id": n})
            )
            [reply] = frames(t)
            codes.append(reply.get("code", "ok"))
            if reply.get("code") == "rate_limited":
                assert reply["retry_after"] == interval
        assert codes == ["ok"] * allowed + ["rate_limited"] * (12 - allowed)


def test_refuse_answers_with_an_error_and_closes_for_a_fatal_one(realm: Any) -> None:
    """``refuse`` is how a gateway carrying the protocol in other framing refuses
    what its framing brought (the WebSocket gateway: a binary message)."""
    from chatproto.errors import FatalProtocolError

    proto, t = connect_string_transport(realm)
    proto.refuse(ChatError("bad_request", "not that"), 7)
    assert parse_frames(t.value())[-1] == {
        "type": "error",
        "id": 7,
        "code": "bad_request",
        "message": "not that",
    }
    assert not t.disconnecting
    t.clear()
    proto.refuse(FatalProtocolError("bad_frame", "binary messages are not used"))
    assert parse_frames(t.value()) == [
        {"type": "error", "code": "bad_frame", "message": "binary messages are not used"}
    ]
    assert t.disconnecting
