"""A hostile peer over real mutual TLS on loopback: raw frames with bad values thrown
at a realm's federation listener.  Whatever a peer sends, the realm answers with an
``error`` or a ``rejected`` entry in the ``ack``, stores nothing that could break a
user's backlog or history, and logs no traceback."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.protocols.basic import Int32StringReceiver

from chatproto import wire
from chatproto.client import connect
from chatproto.envelope import MAX_SHOWN_TS, MAX_TS_AHEAD, MIN_TS, remote_ts, shown_ts
from chatproto.errors import ChatError
from chatproto.store import stored_meta
from tests.conftest import until
from tests.fedharness import LogCapture, drained
from tests.test_federation_loopback import raw_peer, realms  # noqa: F401 (fixture)

PW = "password-1"


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    yield capture
    capture.close()


def no_tracebacks(logs: LogCapture) -> None:
    bad = [line for line in logs.lines if "Traceback" in line or "Unhandled" in line]
    assert not bad, "\n".join(bad[:3])


def item_json(mid: str, ts: str, **extra: Any) -> str:
    """An item as JSON text, its ``ts`` spelled exactly as given (a JSON encoder would
    refuse or rewrite the values under test)."""
    fields = {
        "id": mid,
        "kind": "text",
        "from": "alice@a.example",
        "to": "bob@b.example",
        "body": mid,
        **extra,
    }
    return json.dumps(fields)[:-1] + f',"ts":{ts}}}'


def txn_payload(txn: str, items: list[str]) -> bytes:
    return f'{{"type":"txn","id":"{txn}","items":[{",".join(items)}]}}'.encode()


@pytest_twisted.inlineCallbacks
def as_a(realms: Any) -> Any:  # noqa: F811
    """Realms a.example and b.example, bob on b, and a raw peer speaking for a.example
    (its genuine certificate) to b's federation listener, past its welcome."""
    a, b = yield realms(["a.example", "b.example"])
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.close()
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: len(peer.frames) == 1, timeout=30)
    assert peer.frames[0]["type"] == "welcome"
    return a, b, peer


# the rules without sockets --------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()  # NaN and the infinities too: what 1e400 and NaN decode to
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.floats(min_value=MIN_TS, max_value=4e9))
def test_remote_ts_is_a_sane_float_or_bad_request(value: Any, now: float) -> None:
    try:
        ts = remote_ts(value, now)
    except ChatError as e:
        assert e.code == "bad_request"
        assert (
            type(value) not in (int, float)
            or (type(value) is float and not math.isfinite(value))
            or (type(value) is int and abs(value) >= 2**53)
        )
        return
    assert type(ts) is float
    assert ts == now or MIN_TS <= ts <= now + MAX_TS_AHEAD
    assert ts == value or not MIN_TS <= value <= now + MAX_TS_AHEAD


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_a_stored_ts_always_reads_as_a_showable_float(value: Any) -> None:
    ts = shown_ts(value)
    assert type(ts) is float and 0.0 <= ts <= MAX_SHOWN_TS
    time.gmtime(ts)  # every date formatter takes it


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), JSON_VALUES.map(lambda v: json.dumps(v))))
def test_a_stored_meta_always_reads_as_something_encodable(text: str) -> None:
    meta = stored_meta(text)
    assert meta is None or isinstance(meta, dict)
    wire.encode({"meta": meta})  # never raises (no NaN, no infinity)


# item 6: numbers from a peer ------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_bad_timestamps_are_rejected_in_the_ack_and_break_no_login(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """Every item whose ts is not a finite number is refused in the ``ack`` (the rest
    of the transaction is stored); a ts before 2000 or far ahead of the receiver's
    clock is stored with the receiver's clock.  bob's login, backlog and history work
    afterwards (they failed for good on an infinite ts)."""
    _a, b, peer = yield as_a(realms)
    now = time.time()
    bad = {
        "inf": "1e400",
        "neg-inf": "-1e400",
        "huge-int": "1" + "0" * 400,
        "huge-negative-int": "-" + "9" * 20,
        "string": '"1764093000"',
        "bool": "true",
        "null": "null",
        "object": '{"t":1}',
    }
    items = [item_json(mid, ts) for mid, ts in bad.items()]
    clamped = {"far-future": "1e300", "before-2000": "1.0", "negative": "-1e300"}
    items += [item_json(mid, ts) for mid, ts in clamped.items()]
    items.append(item_json("ok", repr(now)))
    peer.sendString(txn_payload("1-13", items))
    yield until(lambda: len(peer.frames) == 2, timeout=30)
    ack = peer.frames[1]
    assert ack["type"] == "ack" and ack["id"] == "1-13", ack
    assert sorted(r["id"] for r in ack["rejected"]) == sorted(bad)
    assert {r["code"] for r in ack["rejected"]} == {"bad_request"}
    assert all("ts" in r["message"] for r in ack["rejected"])
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, on_message=got.append)
    yield bob.synced
    assert [m["msg_id"] for m in got] == [*clamped, "ok"]
    assert all(now - 5 <= m["ts"] <= time.time() + 1 for m in got[:3])  # b's clock
    assert got[3]["ts"] == now
    history = yield bob.history("alice@a.example")
    assert [m["msg_id"] for m in history] == [*clamped, "ok"]
    yield bob.close()
    peer.transport.loseConnection()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_a_poisoned_row_stored_before_the_checks_breaks_no_backlog_or_history(
    tmp_path: Any, logs: Any
) -> Any:
    """Rows a realm stored before ``ts`` and ``meta`` were checked (infinite, NaN as
    NULL-less text, absurd, not JSON) are read as safe values: bob's login gets his
    whole backlog, history answers, over real TCP."""
    import sqlite3

    from chatproto.protocol import ClientFactory
    from tests.conftest import fast_config, make_realm, sqlite_only

    sqlite_only()  # PostgreSQL: tests/test_store_postgresql.py, the poisoned row test
    cfg = fast_config(tmp_path)
    realm = make_realm(cfg)
    yield realm.startService()
    for name in ("alice", "bob"):
        yield realm.create_user(name, PW)
    yield realm.stopService()
    db = sqlite3.connect(cfg.database_path)
    rows = [
        ("inf", float("inf"), None),
        ("neg-inf", float("-inf"), None),
        ("huge", 1e300, None),
        ("text", "soon", None),
        ("meta-nan", 1764093000.0, '{"x": NaN, "y": [Infinity]}'),
        ("meta-garbage", 1764093000.0, "{not json"),
        ("meta-list", 1764093000.0, "[1, 2]"),
    ]
    with db:
        # (items name their conversation by its integer in convs: schema 18)
        db.execute("INSERT OR IGNORE INTO convs (key) VALUES ('alice@localhost bob@localhost')")
        for mid, ts, meta in rows:
            db.execute(
                "INSERT INTO items (id, kind, sender, recipient, conv, ts, body, meta) "
                "VALUES (?, 'text', 'alice@localhost', 'bob@localhost', (SELECT cid FROM convs "
                "WHERE key = 'alice@localhost bob@localhost'), ?, ?, ?)",
                (mid, ts, mid, meta),
            )
        # (the rows the store writes with a conversation's first item: feeds read by them)
        db.executemany(
            "INSERT OR IGNORE INTO user_convs VALUES (?, 'alice@localhost bob@localhost', ?)",
            [("alice@localhost", "bob@localhost"), ("bob@localhost", "alice@localhost")],
        )
    db.close()
    realm = make_realm(cfg)
    yield realm.startService()
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        got: list[dict[str, Any]] = []
        addr = f"tcp:127.0.0.1:{port.getHost().port}"
        bob = yield connect(_reactor, addr, "bob", PW, on_message=got.append)
        yield bob.synced
        assert [m["msg_id"] for m in got] == [r[0] for r in rows]
        assert [m["ts"] for m in got] == [0.0, 0.0, 0.0, 0.0] + [1764093000.0] * 3
        assert got[4]["meta"] == {"x": None, "y": [None]}
        assert "meta" not in got[5] and "meta" not in got[6]
        history = yield bob.history("alice")
        assert [m["msg_id"] for m in history] == [r[0] for r in rows]
        yield bob.close()
    finally:
        yield port.stopListening()
        yield realm.stopService()
    no_tracebacks(logs)


# the battery ------------------------------------------------------------------------------

NOW = time.time()
TEXT = {"kind": "text", "from": "alice@a.example", "to": "bob@b.example", "body": "x"}
SHA = "a" * 64
FILE_META = {"file_id": "f" * 20, "sha256": SHA, "size": 1, "name": "n", "media_type": "t/p"}
EVENT = {"kind": "event", "from": "alice@a.example", "to": "#g@a.example", "body": ""}

#: Items a.example may not have sent (each refused in the ack, the rest stored).
BAD_ITEMS: dict[str, str] = {
    "not-an-object": "5",
    "id-int": json.dumps({**TEXT, "id": 5, "ts": NOW}),
    "kind-int": json.dumps({**TEXT, "kind": 7, "ts": NOW}),
    "kind-bounce": json.dumps({**TEXT, "kind": "bounce", "ts": NOW}),
    "from-int": json.dumps({**TEXT, "from": 1, "ts": NOW}),
    "to-list": json.dumps({**TEXT, "to": ["bob"], "ts": NOW}),
    "body-float": json.dumps({**TEXT, "body": 1.5, "ts": NOW}),
    "body-huge": json.dumps({**TEXT, "body": "x" * 100_000, "ts": NOW}),
    "text-meta": json.dumps({**TEXT, "meta": {"n": 1}, "ts": NOW}),
    "ts-inf": item_json("ts-inf", "1e400"),
    "ts-huge": item_json("ts-huge", "9" * 300),
    "ts-neg": item_json("ts-neg", "-1e400"),
    "ts-list": item_json("ts-list", "[1]"),
    "file-size-neg": json.dumps(
        {**TEXT, "kind": "file", "body": "n", "meta": {**FILE_META, "size": -1}, "ts": NOW}
    ),
    "file-size-inf": json.dumps({**TEXT, "kind": "file", "body": "n", "ts": NOW})[:-1]
    + ',"meta":{"file_id":"ffffffffffffffffffff","sha256":"'
    + SHA
    + '","size":1e400,"name":"n","media_type":"t/p"}}',
    "file-size-float": json.dumps(
        {**TEXT, "kind": "file", "body": "n", "meta": {**FILE_META, "size": 1.0}, "ts": NOW}
    ),
    "file-size-huge": json.dumps(
        {**TEXT, "kind": "file", "body": "n", "meta": {**FILE_META, "size": 10**30}, "ts": NOW}
    ),
    "file-size-bool": json.dumps(
        {**TEXT, "kind": "file", "body": "n", "meta": {**FILE_META, "size": True}, "ts": NOW}
    ),
    "file-name-int": json.dumps(
        {**TEXT, "kind": "file", "body": "n", "meta": {**FILE_META, "name": 5}, "ts": NOW}
    ),
    "event-user-int": json.dumps({**EVENT, "meta": {"event": "joined", "user": 5}, "ts": NOW}),
    "event-topic-inf": json.dumps({**EVENT, "ts": NOW})[:-1]
    + ',"meta":{"event":"topic","topic":1e400}}',
    "event-extra-number": json.dumps(
        {**EVENT, "meta": {"event": "joined", "user": "bob@b.example", "n": 1}, "ts": NOW}
    ),
    "event-unknown": json.dumps({**EVENT, "meta": {"event": "exploded"}, "ts": NOW}),
    "event-snapshot-bad": json.dumps(
        {
            **EVENT,
            "meta": {
                "event": "joined",
                "user": "bob@b.example",
                "snapshot": {"topic": 5, "visibility": "x", "history": 1, "members": []},
            },
            "ts": NOW,
        }
    ),
    "request-args-number": json.dumps(
        {
            "kind": "request",
            "from": "alice@a.example",
            "to": "#dev@b.example",
            "event": "joined",
            "args": {"user": 1e300},
        }
    ),
    "request-event-int": json.dumps(
        {"kind": "request", "from": "alice@a.example", "to": "#dev@b.example", "event": 3}
    ),
    "request-to-int": json.dumps(
        {"kind": "request", "from": "alice@a.example", "to": 3, "event": "joined"}
    ),
}


def _with_id(mid: str, text: str) -> str:
    """``text`` (an item's JSON) with ``"id": mid`` unless it sets an id of its own."""
    if not text.startswith("{") or '"id":' in text:
        return text
    return '{"id":' + json.dumps(mid) + "," + text[1:]


#: Frames after the welcome that break the protocol: each gets an error and a close.
BAD_FRAMES: dict[str, bytes] = {
    "not-json": b"{nope",
    "array": b"[1,2]",
    "type-int": b'{"type":5}',
    "unknown-type": b'{"type":"explode"}',
    "hello-again": b'{"type":"hello","version":1,"realm":"a.example"}',
    "welcome": b'{"type":"welcome","version":1,"realm":"a.example","max_frame":1e400}',
    "ack": b'{"type":"ack","id":1e400,"rejected":[{"id":1e400}]}',
    "fetch": b'{"type":"fetch","id":1e400,"file":5}',
    "fetched-unasked": b'{"type":"fetched","id":1}',
    "fetch-error-unasked": b'{"type":"fetch_error","id":-1e400,"code":5,"message":1e400}',
    "data-unasked": b"\x00" + b"x" * 100,
    "txn-id-int": b'{"type":"txn","id":5,"items":[]}',
    "txn-id-inf": b'{"type":"txn","id":1e400,"items":[]}',
    "txn-id-long": b'{"type":"txn","id":"' + b"x" * 65 + b'","items":[]}',
    "txn-items-object": b'{"type":"txn","id":"1-1","items":{"a":1}}',
    "txn-items-many": b'{"type":"txn","id":"1-1","items":[' + b",".join([b"1"] * 1001) + b"]}",
    "deep": b'{"type":"txn","id":"1-1","items":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "id-huger": b'{"type":"ping","id":' + b"9" * 5000 + b"}",
}

#: Frames with NaN or Infinity, or a name twice in an object (not JSON the realm
#: reads, RFC 8259): ``bad_frame`` and a closed link, nothing stored; never a traceback.
NON_STANDARD: dict[str, bytes] = {
    "nan-ts": b'{"type":"txn","id":"1-1","items":[' + item_json("nan", "NaN").encode() + b"]}",
    "infinity-ts": b'{"type":"txn","id":"1-1","items":['
    + item_json("inf", "-Infinity").encode()
    + b"]}",
    "duplicate-from": b'{"type":"txn","id":"1-1","items":['
    + item_json("dup", "1.5")[:-1].encode()
    + b',"from":"mallory@a.example"}]}',
}

#: Frames after the welcome that change nothing and close nothing.
HARMLESS_FRAMES: dict[str, bytes] = {
    "ping-extra": b'{"type":"ping","n":1e400,"m":[-1e400]}',
    "pong-extra": b'{"type":"pong","n":' + b"9" * 400 + b"}",
    "id-huge": b'{"type":"ping","id":' + b"9" * 4000 + b"}",
    "presence-user-int": b'{"type":"presence","user":5,"status":"online"}',
    "presence-status-inf": b'{"type":"presence","user":"alice@a.example","status":1e400}',
    "presence-text-inf": b'{"type":"presence","user":"alice@a.example","status":"away",'
    b'"text":1e400}',
    "presence-third-realm": b'{"type":"presence","user":"eve@c.example","status":"online"}',
    "presence-huge-text": b'{"type":"presence","user":"alice@a.example","status":"away",'
    b'"text":"' + b"x" * 10_000 + b'"}',
}


#: First frames (instead of a valid hello): each gets an error and a closed link.
BEFORE_HELLO: dict[str, bytes] = {
    "version-str": b'{"type":"hello","version":"1","realm":"a.example"}',
    "version-float": b'{"type":"hello","version":1.0,"realm":"a.example"}',
    "version-true": b'{"type":"hello","version":true,"realm":"a.example"}',
    "version-inf": b'{"type":"hello","version":1e400,"realm":"a.example"}',
    "version-huge": b'{"type":"hello","version":' + b"1" * 400 + b',"realm":"a.example"}',
    "version-missing": b'{"type":"hello","realm":"a.example"}',
    "realm-int": b'{"type":"hello","version":1,"realm":5}',
    "realm-list": b'{"type":"hello","version":1,"realm":["a.example"]}',
    "realm-empty": b'{"type":"hello","version":1,"realm":""}',
    "realm-long": b'{"type":"hello","version":1,"realm":"' + b"a" * 300 + b'.example"}',
    "realm-own": b'{"type":"hello","version":1,"realm":"b.example"}',
    "realm-other": b'{"type":"hello","version":1,"realm":"c.example"}',
    "txn": b'{"type":"txn","id":"1-1","items":[]}',
    "presence": b'{"type":"presence","user":"alice@a.example","status":"online"}',
    "ping": b'{"type":"ping"}',
    "fetched": b'{"type":"fetched","id":1}',
    "data": b"\x00abc",
    "garbage": b"\xff\xfe",
    "array": b"[]",
    "oversized": b"{" + b" " * (8192 - 1) + b"x",  # 8193 bytes: over the limit before hello
}


@pytest_twisted.inlineCallbacks
def test_bad_first_frames_are_refused_and_logged_without_traceback(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """Before its hello, a peer (a.example's genuine certificate) gets an ``error`` of
    a known code and a closed link for anything but a valid hello."""
    from chatproto.errors import CODES

    a, b = yield realms(["a.example", "b.example"])
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    for name, payload in BEFORE_HELLO.items():
        b.fed.clean("a.example")
        peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
        peer.sendString(payload)
        yield until(lambda: peer.lost.called, timeout=30).addErrback(  # noqa: B023
            lambda f: pytest.fail(f"{name}: not closed; got {peer.frames}")  # noqa: B023
        )
        assert [f["type"] for f in peer.frames] == ["error"], (name, peer.frames)
        assert peer.frames[0]["code"] in CODES, (name, peer.frames)
    # the realm's side closes after the peer sees it (a reactor turn or more under load)
    yield until(lambda: b.fed.unauthenticated.waiting == 0, timeout=10)
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def hello(b: Any, a: Any) -> Any:
    """A raw peer for a.example on b's listener, past its welcome (any backoff b holds
    against a.example after an earlier case is forgotten first)."""
    b.fed.clean("a.example")
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: len(peer.frames) == 1, timeout=30)
    assert peer.frames[0]["type"] == "welcome", peer.frames
    return peer


@pytest_twisted.inlineCallbacks
def test_a_hostile_peer_breaks_nothing_and_logs_no_traceback(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """The battery: every frame type with bad values, after the welcome.  Protocol
    violations get an ``error`` (a known code) and a closed link; bad items are
    refused one by one in the ``ack``; harmless oddities change nothing.  Then bob's
    login, backlog and history still work, and b's log holds no traceback."""
    from chatproto.errors import CODES

    a, b = yield realms(["a.example", "b.example"])
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.close()
    for name, payload in BAD_FRAMES.items():
        peer = yield hello(b, a)
        peer.sendString(payload)
        yield until(lambda: peer.lost.called, timeout=30).addErrback(  # noqa: B023
            lambda f: pytest.fail(f"{name}: not closed; got {peer.frames}")  # noqa: B023
        )
        assert len(peer.frames) == 2, (name, peer.frames)
        assert peer.frames[1]["type"] == "error", (name, peer.frames)
        assert peer.frames[1]["code"] in CODES, (name, peer.frames)
    for name, payload in NON_STANDARD.items():
        peer = yield hello(b, a)
        peer.sendString(payload)
        yield until(lambda: len(peer.frames) == 2, timeout=30)  # noqa: B023
        answer = peer.frames[1]
        assert answer["type"] == "error" and answer["code"] == "bad_frame", (name, answer)
        yield until(lambda: peer.lost.called, timeout=30)  # noqa: B023
    peer = yield hello(b, a)
    for payload in HARMLESS_FRAMES.values():
        peer.sendString(payload)
    items = [_with_id(mid, text) for mid, text in BAD_ITEMS.items()]
    items.append(item_json("good-1", repr(NOW)))
    items.append(item_json("good-2", repr(NOW + 1)))
    peer.sendString(txn_payload("1-9", items))
    yield until(lambda: any(f["type"] == "ack" for f in peer.frames), timeout=30)
    assert not peer.lost.called
    assert [f["type"] for f in peer.frames] == ["welcome", "pong", "pong", "ack"]
    ack = peer.frames[-1]
    refused = {r["id"]: r["code"] for r in ack["rejected"] if r["id"] is not None}
    unnamed = [r for r in ack["rejected"] if r["id"] is None]
    assert len(unnamed) == 2  # not an object; an id that is not a string
    assert set(refused) == set(BAD_ITEMS) - {"not-an-object", "id-int"}
    assert set(refused.values()) <= {"bad_request", "bad_address", "too_large", "forged_sender"}
    peer.transport.loseConnection()
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, on_message=got.append)
    yield bob.synced
    assert [m["msg_id"] for m in got] == ["good-1", "good-2"]
    history = yield bob.history("alice@a.example")
    assert [m["msg_id"] for m in history] == ["good-1", "good-2"]
    yield bob.close()
    no_tracebacks(logs)


# a hostile listener: what a realm's outbound link is sent -----------------------------------


class HostileListener(Int32StringReceiver):
    """Speaks for b.example (its genuine certificate) to a.example's outbound link,
    and answers each connection with the next scenario of the factory: frames sent
    after the ``hello`` (``"hello"``) or after the first ``txn`` (``"txn"``; ``{txn}``
    in them is replaced by its id, ``{item}`` by its first item's id)."""

    factory: Any

    def connectionMade(self) -> None:
        self.scenario = self.factory.scenarios[min(self.factory.n, len(self.factory.scenarios) - 1)]
        self.factory.n += 1
        self.got: list[dict[str, Any]] = []
        self.factory.seen.append(self.got)

    def stringReceived(self, payload: bytes) -> None:
        frame = json.loads(payload)
        self.got.append(frame)
        _name, trigger, frames = self.scenario
        if frame["type"] == trigger or (trigger == "txn" and frame["type"] == "hello"):
            if frame["type"] == "hello":
                welcome = {"type": "welcome", "version": 1, "realm": "b.example"}
                if trigger == "txn":
                    self.sendString(json.dumps(welcome).encode())
                    return
            for raw in frames:
                if frame["type"] == "txn":
                    raw = raw.replace(b"{txn}", frame["id"].encode())
                    raw = raw.replace(b"{item}", frame["items"][0]["id"].encode())
                self.sendString(raw)


WELCOME = b'{"type":"welcome","version":1,"realm":"b.example"}'

#: (name, trigger, frames): what a.example's link is sent on one connection.
OUTBOUND_SCENARIOS: list[tuple[str, str, list[bytes]]] = [
    ("welcome-version-str", "hello", [b'{"type":"welcome","version":"1","realm":"b.example"}']),
    ("welcome-version-true", "hello", [b'{"type":"welcome","version":true,"realm":"b.example"}']),
    ("welcome-version-inf", "hello", [b'{"type":"welcome","version":1e400,"realm":"b.example"}']),
    ("welcome-realm-int", "hello", [b'{"type":"welcome","version":1,"realm":5}']),
    (
        "welcome-max-frame-inf",
        "hello",
        [b'{"type":"welcome","version":1,"realm":"b.example","max_frame":1e400}'],
    ),
    (
        "welcome-max-frame-small",
        "hello",
        [b'{"type":"welcome","version":1,"realm":"b.example","max_frame":10}'],
    ),
    (
        "welcome-max-frame-huge",
        "hello",
        [b'{"type":"welcome","version":1,"realm":"b.example","max_frame":' + b"9" * 400 + b"}"],
    ),
    ("ack-id-inf", "txn", [b'{"type":"ack","id":1e400}']),
    ("ack-id-huge", "txn", [b'{"type":"ack","id":' + b"9" * 4000 + b"}"]),
    ("ack-wrong-id", "txn", [b'{"type":"ack","id":"0-0"}']),
    ("ack-rejected-inf", "txn", [b'{"type":"ack","id":"0-0","rejected":[{"id":1e400}]}']),
    ("fetch-id-inf", "hello", [WELCOME, b'{"type":"fetch","id":1e400,"file":"x"}']),
    ("fetch-id-huge", "hello", [WELCOME, b'{"type":"fetch","id":' + b"9" * 400 + b',"file":"x"}']),
    ("fetch-id-negative", "hello", [WELCOME, b'{"type":"fetch","id":-1,"file":"x"}']),
    ("fetch-id-zero", "hello", [WELCOME, b'{"type":"fetch","id":0,"file":"x"}']),
    ("fetch-id-true", "hello", [WELCOME, b'{"type":"fetch","id":true,"file":"x"}']),
    ("txn-to-sender", "hello", [WELCOME, b'{"type":"txn","id":"1-1","items":[]}']),
    ("presence-to-sender", "hello", [WELCOME, b'{"type":"presence","user":5}']),
    ("data-to-sender", "hello", [WELCOME, b"\x00" + b"x" * 10]),
    ("ping-before-welcome", "hello", [b'{"type":"ping"}']),
    ("not-json", "hello", [b"{nope"]),
    # then a fetch of a file that is not there (answered, the link goes on), and an
    # ack with rejected entries of every wrong shape, one of them for the item
    (
        "fetch-no-file-then-odd-ack",
        "txn",
        [
            b'{"type":"fetch","id":7,"file":5}',
            b'{"type":"ack","id":"{txn}","rejected":[5,"x",null,{"id":1e400},'
            b'{"id":"{item}","code":1e400,"message":{"m":[-1e400]}}]}',
        ],
    ),
]


@pytest_twisted.inlineCallbacks
def test_a_hostile_listener_breaks_nothing_and_logs_no_traceback(
    realms: Any,  # noqa: F811
    tmp_path: Any,
    logs: Any,
) -> Any:
    """a.example's link to b.example meets a listener that sends bad values in every
    frame a listener sends (welcome, ack, fetch) and frames it may not send.  Each
    time a.example closes the link with an ``error`` of a known code (and retries);
    in the end the odd ack is taken, alice is told her item was refused, and a's log
    holds no traceback."""
    from twisted.internet.protocol import Factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from chatproto import tls
    from chatproto.config import Federation, Peer
    from chatproto.errors import CODES
    from chatproto.federation import FederationTLS

    paths = tls.write_dev_certs(str(tmp_path / "certs"), "b.example")
    factory = Factory.forProtocol(HostileListener)
    factory.scenarios = OUTBOUND_SCENARIOS  # type: ignore[attr-defined]
    factory.n = 0  # type: ignore[attr-defined]
    factory.seen = []  # type: ignore[attr-defined]
    creator = FederationTLS(
        Federation(certificate=paths["cert"], private_key=paths["key"], ca=paths["ca"])
    ).server()
    port = _reactor.listenTCP(
        0, TLSMemoryBIOFactory(creator, False, factory), interface="127.0.0.1"
    )

    def hostile_b(nodes: Any) -> None:
        where = f"127.0.0.1:{port.getHost().port}"
        nodes[0].cfg.federation.peers.append(Peer(realm="b.example", endpoint=where))

    try:
        (a,) = yield realms(["a.example"], before_start=hostile_b, retry_max=0.1)
        got: list[dict[str, Any]] = []
        alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got.append)
        sent = yield alice.send("bob@b.example", "hello?")
        yield until(lambda: any(m["kind"] == "bounce" for m in got), timeout=60)
        bounce = next(m for m in got if m["kind"] == "bounce")
        assert bounce["meta"]["id"] == sent["msg_id"]
        assert bounce["meta"]["code"] == "internal_error"  # the peer's code was 1e400
        yield alice.close()
        seen = factory.seen  # type: ignore[attr-defined]
        assert len(seen) >= len(OUTBOUND_SCENARIOS)
        for (name, _, _), frames in zip(OUTBOUND_SCENARIOS[:-1], seen, strict=False):
            errors = [f for f in frames if f["type"] == "error"]
            assert errors and errors[-1]["code"] in CODES, (name, frames)
        last = seen[len(OUTBOUND_SCENARIOS) - 1]
        fetch_error = next(f for f in last if f["type"] == "fetch_error")
        assert (fetch_error["id"], fetch_error["code"]) == (7, "no_such_file")
        yield drained(a)
    finally:
        yield port.stopListening()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_bad_file_bytes_and_fetch_answers_are_refused_item_by_item(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """While b fetches the bytes of a.example's file items, a raw a.example sends too
    many bytes (an error, the link closed), too few, the wrong ones, and a fetch_error
    with bad values (each file item refused in the ``ack`` with its own code, the link
    goes on); b's log holds no traceback."""
    import hashlib

    a, b = yield realms(["a.example", "b.example"])
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.close()
    peer = yield hello(b, a)
    data = b"0123456789"

    def file_item(n: int) -> dict[str, Any]:
        meta = {
            "file_id": f"file{n:016d}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "name": f"f{n}.bin",
            "media_type": "application/octet-stream",
        }
        item = {**TEXT, "id": f"file-{n}", "kind": "file", "body": meta["name"]}
        return {**item, "meta": meta, "ts": NOW}

    # more bytes than announced: the peer breaks the protocol (the link closes; the
    # transaction is not acknowledged, to be sent again)
    peer.send({"type": "txn", "id": "0-0", "items": [file_item(0)]})
    yield until(lambda: any(f["type"] == "fetch" for f in peer.frames), timeout=30)
    peer.sendString(b"\x00" + data + b"more")
    yield until(lambda: peer.lost.called, timeout=30)
    assert [(f["type"], f.get("code")) for f in peer.frames[1:]] == [
        ("fetch", None),
        ("error", "too_large"),
    ]
    peer = yield hello(b, a)
    answers = [
        [b"\x00" + data[:4], b'{"type":"fetched","id":1}'],  # too few
        [b"\x00" + data[::-1], b'{"type":"fetched","id":2}'],  # the wrong ones
        [b'{"type":"fetch_error","id":3,"code":1e400,"message":[1e400]}'],
        [b'{"type":"fetch_error","id":4,"code":"no_such_file","message":"gone"}'],
    ]
    peer.send({"type": "txn", "id": "1-4", "items": [file_item(n) for n in range(1, 5)]})
    for n, frames in enumerate(answers, 1):
        yield until(
            lambda n=n: sum(f["type"] == "fetch" for f in peer.frames) == n, timeout=30
        ).addErrback(lambda f, n=n: pytest.fail(f"no fetch {n}: {peer.frames}"))
        for raw in frames:
            peer.sendString(raw)
    yield until(lambda: any(f["type"] == "ack" for f in peer.frames), timeout=30)
    ack = next(f for f in peer.frames if f["type"] == "ack")
    codes = [(r["id"], r["code"]) for r in ack["rejected"]]
    assert codes == [
        ("file-1", "incomplete"),
        ("file-2", "checksum_mismatch"),
        ("file-3", "internal_error"),  # a code that is not one
        ("file-4", "no_such_file"),
    ]
    assert not peer.lost.called
    peer.transport.loseConnection()
    no_tracebacks(logs)


# text a peer wants shown to our users ---------------------------------------------------

#: Labels the rule of chatproto.text refuses: C1 (U+009B, the 8-bit CSI), a bidi
#: override, an ASCII escape.
SHOWN_BAD = ["evil\u009b31m.txt", "\u202etxt.exe", "bell\x07.txt"]


@pytest_twisted.inlineCallbacks
def test_a_peers_file_names_follow_the_rule_of_local_ones(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """A file a peer realm sends our user is named by that realm: the name is shown to
    our user as a local one is, so the same rule applies (it was only length-checked:
    a C1 control or a bidi override reached the recipient's terminal)."""
    _a, _b, peer = yield as_a(realms)
    items = []
    for n, name in enumerate(SHOWN_BAD):
        meta = {**FILE_META, "name": name, "file_id": f"{n}" * 20}
        items.append(
            json.dumps(
                {**TEXT, "id": f"bad-{n}", "kind": "file", "body": name, "meta": meta, "ts": NOW}
            )
        )
    peer.sendString(txn_payload("1-20", items))
    yield until(lambda: len(peer.frames) == 2, timeout=30)
    ack = peer.frames[1]
    assert ack["type"] == "ack" and ack["id"] == "1-20", ack
    assert sorted(r["id"] for r in ack["rejected"]) == [f"bad-{n}" for n in range(3)]
    assert {r["code"] for r in ack["rejected"]} == {"bad_request"}
    # (U+009B is refused in the body, a file item's body being its name, already)
    assert all("file name" in r["message"] for r in ack["rejected"][1:]), ack
    peer.transport.loseConnection()
    no_tracebacks(logs)


@pytest.mark.parametrize("text", SHOWN_BAD)
def test_a_peers_topics_reasons_and_status_text_follow_the_local_rule(text: str) -> None:
    from chatproto.groups import check_snapshot
    from chatproto.realm.remote import _event_meta
    from chatproto.testing import make_test_realm

    for key in ("topic", "reason"):
        with pytest.raises(ChatError) as e:
            _event_meta({"event": "topic" if key == "topic" else "kicked", key: text})
        assert e.value.code == "bad_request"
    assert _event_meta({"event": "topic", "topic": "fine"})["topic"] == "fine"
    snapshot = {"topic": text, "visibility": "public", "history": "joined", "members": {}}
    with pytest.raises(ChatError):
        check_snapshot(snapshot)
    realm = make_test_realm()
    realm.presence.remote_change("a.example", "alice@a.example", "away", text)
    assert realm.presence.remote["alice@a.example"] == ("away", "")  # the text dropped
    realm.presence.remote_change("a.example", "alice@a.example", "busy", "in a call")
    assert realm.presence.remote["alice@a.example"] == ("busy", "in a call")


#: meta values of a home realm's events that are not what they name: a user that is
#: no address (CR/LF in it reached IRC users' KICK and MODE lines), an address not in
#: its canonical spelling, a role, visibility or history rule no realm has.
BAD_EVENT_META = [
    {"event": "kicked", "user": "x\r\nPRIVMSG #dev :forged@a.example"},
    {"event": "banned", "user": "mallory a.example"},
    {"event": "unbanned", "user": "Mallory@a.example"},
    {"event": "invited", "user": "bob"},
    {"event": "role", "user": "carol@a.example", "role": "god\r\n"},
    {"event": "left", "user": "carol@a.example", "successor": "#dev@a.example"},
    {"event": "settings", "visibility": "secret"},
    {"event": "settings", "history": "forever"},
]


@pytest.mark.parametrize("meta", BAD_EVENT_META)
def test_a_home_realms_event_names_users_by_address_and_roles_it_knows(
    meta: dict[str, str],
) -> None:
    """PROTOCOL.md (Federation, Numbers): an event's ``user`` and ``successor`` are
    addresses; they were only length-checked, so a hostile home realm could have a
    "user" with CR/LF written into our IRC users' ``KICK``/``MODE`` lines (a line
    injection), or store a role no realm has in our mirror of its group."""
    from chatproto.realm.remote import _event_meta

    with pytest.raises(ChatError) as e:
        _event_meta(meta)
    assert e.value.code == "bad_request"
    for good in (
        {"event": "kicked", "user": "mallory@a.example", "reason": "spam"},
        {"event": "role", "user": "carol@a.example", "role": "admin"},
        {"event": "left", "user": "carol@a.example", "successor": "dave@c.example"},
        {"event": "settings", "visibility": "invite", "history": "all"},
    ):
        assert _event_meta(good) == good
