"""Black-box tests of PROTOCOL.md's "Limits and flow control" (the limits at and one
past their bounds, the send rate, login throttling), over loopback TCP with raw
frames."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from tests.blackbox import PW, call, code, login, serve
from tests.conftest import fast_config, raw_client, until


@pytest.fixture
def limited(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, send_burst=5, send_rate=0.5, max_sessions_per_user=3)
    cfg.auth.failure_delay = 0.3
    cfg.auth.max_failure_delay = 0.6
    yield from serve(cfg, ("alice", "bob"))


@pytest_twisted.inlineCallbacks
def test_body_at_and_past_max_body(server: Any) -> Any:
    realm, _factory, addr = server
    yield realm.create_user("alice", PW)
    a = yield login(addr, "alice")
    limit = realm.config.limits.max_body
    r = yield call(a, {"type": "send", "to": "alice", "body": "é" * (limit // 2)})
    assert r["type"] == "result", r
    r = yield call(a, {"type": "send", "to": "alice", "body": "é" * (limit // 2) + "x"})
    assert code(r) == "too_large", r
    assert not a.lost.called


@pytest_twisted.inlineCallbacks
def test_sessions_send_rate_and_login_throttle(limited: Any) -> Any:
    _realm, addr = limited
    conns = []
    for i in range(3):
        c = yield login(addr, "alice", device=f"d{i}")
        conns.append(c)
    extra = yield raw_client(addr)
    r = yield call(extra, {"type": "login", "user": "alice", "password": PW})
    assert code(r) == "too_many_sessions", r
    # The send bucket: 5 at once, then rate_limited with retry_after, per connection.
    for i in range(5):
        r = yield call(conns[0], {"type": "send", "to": "bob", "body": f"{i}"})
        assert r["type"] == "result", r
    r = yield call(conns[0], {"type": "send", "to": "bob", "body": "6"})
    assert code(r) == "rate_limited" and 0 < r["retry_after"] <= 2.0, r
    r = yield call(conns[1], {"type": "send", "to": "bob", "body": "other connection"})
    assert r["type"] == "result", r
    # A send that fails its field checks takes no token.
    for _ in range(10):
        r = yield call(conns[2], {"type": "send", "to": "bob", "body": 5})
        assert code(r) == "bad_request"
    r = yield call(conns[2], {"type": "send", "to": "bob", "body": "fine"})
    assert r["type"] == "result", r
    # Login throttling: 3 free failures for bob, then a wait, for every spelling.
    c = yield raw_client(addr)
    for _ in range(4):
        r = yield call(c, {"type": "login", "user": "bob", "password": "wrong-password"})
        assert code(r) == "auth_failed", r
    for spelling in ("bob", "BOB", "bob@LOCALHOST", "\uff42\uff4f\uff42"):
        r = yield call(c, {"type": "login", "user": spelling, "password": PW})
        assert code(r) == "rate_limited" and 0 < r["retry_after"] <= 0.3, (spelling, r)
    yield task.deferLater(_reactor, 0.35, lambda: None)
    r = yield call(c, {"type": "login", "user": "bob", "password": PW})
    assert r["type"] == "result", r


@pytest.fixture
def few_waiting(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, max_unauthenticated_per_address=3)
    for _realm, addr in serve(cfg, ["alice"]):
        yield addr


@pytest_twisted.inlineCallbacks
def test_unauthenticated_connections_per_address(few_waiting: Any) -> Any:
    """Past `max_unauthenticated_per_address` waiting connections, one more is closed
    at once without a word; a connection stops counting when it logs in."""
    addr = few_waiting
    waiting = []
    for _ in range(3):
        c = yield raw_client(addr)
        waiting.append(c)
    extra = yield _bare(addr)
    yield until(lambda: extra.lost.called)
    assert extra.frames == [] and extra.received == 0
    r = yield call(waiting[0], {"type": "login", "user": "alice", "password": PW})
    assert r["type"] == "result", r
    again = yield raw_client(addr)  # one fewer waiting: room again
    assert not again.lost.called
    extra = yield _bare(addr)
    yield until(lambda: extra.lost.called)
    assert extra.received == 0


def _bare(addr: str) -> Any:
    """A connection that sends nothing (a RawClient without hello)."""
    from twisted.internet.protocol import Factory

    from chatproto.client import endpoint_for
    from tests.conftest import RawClient

    return endpoint_for(_reactor, addr, "localhost", None).connect(Factory.forProtocol(RawClient))


@pytest_twisted.inlineCallbacks
def test_group_changes_have_a_bucket_per_connection(server: Any) -> Any:
    """join/leave in a loop stored an event and wrote a frame to every member each
    time, without bound: CHANGE_BURST changes at once on a connection, then
    rate_limited with retry_after, and the members hear nothing more."""
    realm, _factory, addr = server
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    a = yield login(addr, "alice")
    b = yield login(addr, "bob")
    r = yield call(a, {"type": "create_group", "group": "#loop"})
    assert r["type"] == "result", r
    lim = realm.config.limits
    start = time.monotonic()
    changes = 0
    while True:
        r = yield call(b, {"type": "join" if changes % 2 == 0 else "leave", "group": "#loop"})
        if r["type"] != "result":
            break
        changes += 1
        # the bucket refills at its rate meanwhile (each change is a commit: slow on a
        # loaded machine): no more than that
        refilled = int((time.monotonic() - start) * lim.group_change_rate)
        assert changes <= lim.group_change_burst + refilled, changes
    assert changes >= lim.group_change_burst, changes
    assert code(r) == "rate_limited" and 0 < r["retry_after"] <= 1.0, r
    r = yield call(a, {"type": "set_topic", "group": "#loop", "topic": "still works"})
    assert r["type"] == "result", r  # alice's connection has its own bucket
    assert not b.lost.called
