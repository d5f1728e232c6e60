"""Black-box tests of PROTOCOL.md's "Keepalive", over loopback TCP with raw frames, on
a realm with short intervals (a second): the ping after `keepalive_interval` of
silence, the `timeout` after twice that, the close of a connection that does not log
in within `login_timeout`, and that any frame counts as an answer."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from tests.blackbox import login, serve
from tests.conftest import fast_config, raw_client, until

INTERVAL = 1.0


@pytest.fixture
def quick(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, keepalive_interval=INTERVAL, login_timeout=INTERVAL)
    yield from serve(cfg, ["alice"])


def _types(client: Any) -> list[Any]:
    return [f.get("type") if isinstance(f, dict) else f for f in client.frames]


@pytest_twisted.inlineCallbacks
def test_login_timeout(quick: Any) -> Any:
    _realm, addr = quick
    start = time.monotonic()
    c = yield raw_client(addr)
    yield until(lambda: c.lost.called, timeout=10)
    took = time.monotonic() - start
    last = c.frames[-1]
    assert last["type"] == "error" and last["code"] == "timeout" and "id" not in last
    assert took >= INTERVAL, took  # not before login_timeout


@pytest_twisted.inlineCallbacks
def test_ping_then_timeout_and_any_frame_answers(quick: Any) -> Any:
    _realm, addr = quick
    talker = yield login(addr, "alice", device="talker")
    silent = yield login(addr, "alice", device="silent")
    start = time.monotonic()
    # The talker answers each ping with some frame (not a pong): it stays.
    answered = 0
    while time.monotonic() - start < 4 * INTERVAL:
        pings = _types(talker).count("ping")
        if pings > answered:
            talker.send({"type": "set_status", "status": "online", "id": f"s{pings}"})
            answered = pings
        yield task.deferLater(_reactor, 0.05, lambda: None)
    assert not talker.lost.called
    assert answered >= 1
    yield until(lambda: silent.lost.called, timeout=10)
    kinds = _types(silent)
    assert "ping" in kinds
    last = silent.frames[-1]
    assert last["type"] == "error" and last["code"] == "timeout" and "id" not in last
    assert kinds.index("ping") < len(kinds) - 1
