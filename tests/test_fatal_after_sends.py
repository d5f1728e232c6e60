"""Sends read before a frame that closes the connection (``bad_frame``): they are
stored and delivered, and the sender gets their results before the closing error
(PROTOCOL.md, "Requests are answered by exactly one of").  Over StringTransport
(MemoryStore, Clock); the loopback TCP test is in test_hostile_loopback.py."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from chatproto import wire
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests.test_protocol import clock_fixture, realm_fixture  # noqa: F401
from tests.test_reading import logged_in_clear

#: Fatal frames: not UTF-8, a name twice, a bad frame kind (an empty payload).
FATAL = {
    "not_utf8": b'{"type":"ping","x":"\xff"}',
    "bad_kind": b"\x07{}",
    "name_twice": b'{"type":"ping","type":"ping"}',
    "empty": b"",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _raw(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _two_sends_then(fatal: bytes) -> bytes:
    return (
        frame({"type": "send", "to": "bob", "body": "one", "id": 1})
        + frame({"type": "send", "to": "bob", "body": "two", "nonce": "n2", "id": 2})
        + _raw(fatal)
        + frame({"type": "send", "to": "bob", "body": "after", "id": 3})  # never read
    )


def _answers(out: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    return [(f.get("id"), f.get("code", "ok")) for f in out if f["type"] in ("result", "error")]


def _held_commits(realm: Any) -> Any:
    """Hold the store's commits back until the returned function is called."""
    append = realm.store.append
    held: list[Deferred[None]] = []

    def append_later(items: Any, outbox: Any = ()) -> Any:
        d: Deferred[None] = Deferred()
        held.append(d)
        return d.addCallback(lambda _: append(items, outbox))

    def commit() -> None:
        while held:
            held.pop(0).callback(None)

    realm.store.append = append_later
    return commit


def _check(realm: Any, ta: Any, tb: Any) -> None:
    out = frames(ta)
    assert _answers(out) == [(1, "ok"), (2, "ok"), (None, "bad_frame")], out
    assert out[-1]["type"] == "error"  # the last frame written: nothing after it
    echoes = [f["body"] for f in out if f["type"] == "msg"]
    assert echoes == ["one", "two"]
    assert ta.disconnecting
    assert [f["body"] for f in frames(tb)] == ["one", "two"]
    assert [e.body for e in realm.store.items] == ["one", "two"]


@pytest.mark.parametrize("fatal", FATAL.values(), ids=FATAL.keys())
def test_results_of_sends_read_before_a_fatal_frame_come_before_the_error(
    realm: Any, clock: Clock, fatal: bytes
) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    a.dataReceived(_two_sends_then(fatal))
    _check(realm, ta, tb)


def test_a_repeated_nonce_in_the_batch_is_answered_too(realm: Any, clock: Clock) -> None:
    """A send of the general path (a nonce seen before: answered with the stored
    message) before the fatal frame."""
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "x", "nonce": "n", "id": 0}))
    [first] = [f for f in frames(ta) if f["type"] == "result"]
    a.dataReceived(
        frame({"type": "send", "to": "bob", "body": "x", "nonce": "n", "id": 1}) + _raw(b"\xff")
    )
    out = frames(ta)
    assert _answers(out) == [(1, "ok"), (None, "bad_frame")]
    assert out[0]["pos"] == first["pos"]
    assert ta.disconnecting


def test_one_byte_at_a_time(realm: Any, clock: Clock) -> None:
    """Each send is its own read: their commits (held back here) are still in progress
    when the fatal frame comes; the close waits for them too."""
    a, ta = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    commit = _held_commits(realm)
    data = _two_sends_then(b"\xff")
    for i in range(len(data)):
        a.dataReceived(data[i : i + 1])
    assert not ta.disconnecting
    commit()
    _check(realm, ta, tb)


def test_the_close_waits_for_a_commit_in_progress(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    commit = _held_commits(realm)
    a.dataReceived(_two_sends_then(b"\xff"))
    assert not ta.disconnecting  # waiting for the commit
    assert _answers(frames(ta)) == []
    a.dataReceived(frame({"type": "send", "to": "bob", "body": "later", "id": 4}))  # not read
    commit()
    _check(realm, ta, tb)


def test_a_failed_commit_is_answered_then_the_connection_closes(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    gate: Deferred[None] = Deferred()
    realm.store.append = lambda items, outbox=(): gate.addCallback(
        lambda _: fail(OSError("disk full"))
    )
    a.dataReceived(_two_sends_then(b"\xff"))
    assert not ta.disconnecting
    gate.callback(None)
    assert _answers(frames(ta)) == [
        (1, "internal_error"),
        (2, "internal_error"),
        (None, "bad_frame"),
    ]
    assert ta.disconnecting


def test_a_commit_that_never_ends_does_not_keep_the_connection_open(
    realm: Any, clock: Clock
) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    realm.store.append = lambda items, outbox=(): Deferred()  # the store hangs
    a.dataReceived(_two_sends_then(b"\xff"))
    assert not ta.disconnecting
    interval = realm.config.limits.keepalive_interval
    clock.advance(interval / 2)
    a.factory.sweep()
    assert not ta.disconnecting
    clock.advance(interval / 2)
    a.factory.sweep()
    assert _answers(frames(ta)) == [(None, "bad_frame")]
    assert ta.disconnecting


def test_websocket_gateway_a_binary_message_after_sends(realm: Any, clock: Clock) -> None:
    """The WebSocket gateway shares the path: the text messages of one read, then a
    binary message (bad_frame), as ChatWebSocket.dataReceived hands them on."""
    from chatproto.web.gateway import ChatWebSocket, WebSessionFactory

    realm.create_user("alice", "password1")
    a, ta = connect_string_transport(realm, WebSessionFactory(realm, clock))
    a.dataReceived(frame({"type": "hello", "version": 1, "id": "h"}))
    a.dataReceived(frame({"type": "login", "user": "alice", "password": "password1", "id": "l"}))
    clock.advance(0)
    frames(ta)
    _b, tb = logged_in_clear(realm, clock, "bob")
    ws: Any = ChatWebSocket()
    ws.session = a
    a.begin_read()
    for i, body in enumerate(("one", "two"), 1):
        ws.onMessage(wire.encode({"type": "send", "to": "bob", "body": body, "id": i}), False)
    ws.onMessage(b"\x00\x01", True)
    ws.onMessage(wire.encode({"type": "send", "to": "bob", "body": "after", "id": 3}), False)
    a.end_read()
    _check(realm, ta, tb)


def test_a_frame_over_the_limit_after_sends(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    too_long = struct.pack("!I", realm.config.limits.max_frame + 1)
    a.dataReceived(
        frame({"type": "send", "to": "bob", "body": "one", "id": 1})
        + frame({"type": "send", "to": "bob", "body": "two", "nonce": "n2", "id": 2})
        + too_long
        + b"xx"
    )
    out = frames(ta)
    assert _answers(out) == [(1, "ok"), (2, "ok"), (None, "too_large")], out
    assert ta.disconnecting
    assert [f["body"] for f in frames(tb)] == ["one", "two"]


def test_no_download_starts_while_the_connection_waits_to_close(
    tmp_path: Any, clock: Clock
) -> None:
    """A download opened in the read that ends with a fatal frame is answered (its
    result is ready before the error) but sends no data: the connection is
    "closing", waiting only for the answers of its sends."""
    from tests.conftest import fast_config
    from tests.test_files_protocol import split_frames

    realm = make_test_realm(clock, fast_config(tmp_path))
    try:
        realm.create_user("alice", "password1")
        data = b"abc" * 1000
        up = realm.files.offer("alice@localhost", "alice", "f", len(data), sha256(data))
        realm.files.write("alice@localhost", up.result.upload_id, 0, data)
        info, _ = realm.files.finish("alice@localhost", up.result.upload_id).result
        a, ta = logged_in_clear(realm, clock, "alice")
        logged_in_clear(realm, clock, "bob")
        commit = _held_commits(realm)
        a.dataReceived(
            frame({"type": "send", "to": "bob", "body": "one", "id": 1})
            + frame({"type": "download", "file": info.file_id, "id": "d"})
            + _raw(b"\xff")
        )
        clock.advance(0)  # when the download's data would start
        assert a.state == "closing"
        commit()
        clock.advance(1)
        control, got = split_frames(ta.value())
        assert got == []  # not one data frame
        assert _answers(control) == [("d", "ok"), (1, "ok"), (None, "bad_frame")], control
        assert ta.disconnecting and not a._download_sinks
    finally:
        realm.stopService()
