"""Black-box: framing, control frames, the session's states, hello, register and
login, each checked over loopback TCP against what PROTOCOL.md says (sections
"Framing", "Control frames", "Session", `hello`, `register`, `login`, "Before
login")."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.blackbox import PW, Realm, errcode
from tests.conftest import until


@pytest.fixture
def bb(tmp_path: Any) -> Any:
    realm = Realm.open(tmp_path, send_burst=10_000, send_rate=10_000.0)
    yield realm
    realm.close()


# framing and control frames --------------------------------------------------------

PING = b'{"type":"ping","id":1'
#: Payloads and what the realm answers: (code or "ok", closes).  All after hello.
PAYLOADS = [
    ("empty payload", b"", "bad_frame", True),
    ("binary frame before login", b"\x00\x00\x00\x00\x01data", "bad_frame", True),
    ("unknown frame kind", b"\x01{}", "bad_frame", True),
    ("leading space", b" " + PING + b"}", "bad_frame", True),
    ("byte order mark", b"\xef\xbb\xbf" + PING + b"}", "bad_frame", True),
    ("an array", b"[1]", "bad_frame", True),
    ("a string", b'"ping"', "bad_frame", True),
    ("trailing whitespace", PING + b"} \t\r\n", "ok", False),
    ("trailing form feed", PING + b"}\x0c", "bad_frame", True),
    ("trailing garbage", PING + b"}x", "bad_frame", True),
    ("two objects", PING + b"}{}", "bad_frame", True),
    ("truncated", PING, "bad_frame", True),
    ("NaN", PING + b',"x":NaN}', "bad_frame", True),
    ("Infinity", PING + b',"x":[Infinity]}', "bad_frame", True),
    ("-Infinity", PING + b',"x":-Infinity}', "bad_frame", True),
    ("duplicate name", PING + b',"id":2}', "bad_frame", True),
    ("duplicate name, escaped", PING + b',"\\u0069d":2}', "bad_frame", True),
    ("duplicate nested", PING + b',"x":{"a":1,"a":1}}', "bad_frame", True),
    ("names differing in case", PING + b',"ID":2}', "ok", False),
    ("4300-digit integer", PING + b',"x":' + b"9" * 4300 + b"}", "ok", False),
    ("4301-digit integer", PING + b',"x":' + b"9" * 4301 + b"}", "bad_frame", True),
    ("500 levels", PING + b',"x":' + b"[" * 499 + b"]" * 499 + b"}", "ok", False),
    ("invalid UTF-8", PING + b',"x":"\xff"}', "bad_frame", True),
    ("overlong UTF-8", PING + b',"x":"\xc0\xaf"}', "bad_frame", True),
    ("UTF-8 surrogate", PING + b',"x":"\xed\xa0\x80"}', "bad_frame", True),
    ("raw control in a string", PING + b',"x":"a\x01"}', "bad_frame", True),
    ("single quotes", b"{'type':'ping'}", "bad_frame", True),
    ("leading zero", b'{"type":"ping","id":01}', "bad_frame", True),
    ("lone surrogate value", PING + b',"x":"\\ud800"}', "bad_request", False),
    ("lone surrogate key", PING + b',"\\udc00":1}', "bad_request", False),
    ("escaped pair", PING + b',"x":"\\ud83d\\ude00"}', "ok", False),
    ("1e400 in an unknown field", PING + b',"x":1e400}', "ok", False),
    ("no type", b'{"id":1}', "bad_request", False),
    ("type not a string", b'{"type":5,"id":1}', "bad_request", False),
    ("type null", b'{"type":null,"id":1}', "bad_request", False),
    ("unknown type", b'{"type":"PING","id":1}', "unknown_type", False),
    ("empty type", b'{"type":"","id":1}', "unknown_type", False),
]


@pytest.mark.parametrize(
    "payload,code,closes", [p[1:] for p in PAYLOADS], ids=[p[0] for p in PAYLOADS]
)
@pytest_twisted.inlineCallbacks
def test_payloads(bb: Realm, payload: bytes, code: str, closes: bool) -> Any:
    peer = yield bb.connect()
    peer.send_raw(payload)
    yield until(lambda: len(peer.frames) > 1)
    answer = peer.frames[1]
    assert errcode(answer) == code, answer
    if code in ("bad_frame", "bad_request") and b"type" not in payload[:9]:
        assert "id" not in answer
    if code == "bad_frame" or "surrogate" in str(answer.get("message")):
        assert "id" not in answer  # detected before the id could be read
    if closes:
        yield peer.lost
        assert peer.frames[1:] == [answer]
    else:
        r = yield peer.req("ping")
        assert r["type"] == "result"


#: ``id`` values: echoed, or refused with bad_request and no id.
IDS = [
    ("a string", "abc", True),
    ("an empty string", "", True),
    ("64 characters", "x" * 64, True),
    ("64 astral characters", "\U0001f600" * 64, True),
    ("65 characters", "x" * 65, False),
    ("zero", 0, True),
    ("2**53 - 1", 2**53 - 1, True),
    ("-(2**53 - 1)", -(2**53 - 1), True),
    ("2**53", 2**53, False),
    ("-2**53", -(2**53), False),
    ("true", True, False),
    ("false", False, False),
    ("a float", 1.0, False),
    ("an object", {}, False),
    ("a list", [1], False),
]


@pytest_twisted.inlineCallbacks
def test_ids_are_echoed_or_refused_without_id(bb: Realm) -> Any:
    peer = yield bb.connect()
    for label, value, ok in IDS:
        peer.send({"type": "ping", "id": value})
        n = len(peer.frames)
        yield until(lambda n=n: len(peer.frames) > n)
        answer = peer.frames[n]
        if ok:
            assert answer == {"type": "result", "id": value}, label
        else:
            assert answer["code"] == "bad_request" and "id" not in answer, (label, answer)
    peer.send({"type": "ping", "id": None})  # null counts as absent
    n = len(peer.frames)
    yield until(lambda: len(peer.frames) > n)
    assert peer.frames[n] == {"type": "result"}
    r = yield peer.req_raw({"type": "ping", "id": "1e2", "x": 1})  # a string: echoed
    assert r == {"type": "result", "id": "1e2"}
    peer.send_raw(b'{"type":"ping","id":1e2}')  # a float written with an exponent
    n = len(peer.frames)
    yield until(lambda: len(peer.frames) > n)
    assert peer.frames[n]["code"] == "bad_request"


@pytest_twisted.inlineCallbacks
def test_frame_size_limits_before_and_after_login(bb: Realm) -> Any:
    """16384 bytes of payload before login, max_frame (65536) after; exactly at the
    limit is accepted, one past it is too_large (no id) and closes."""

    def ping_of(size: int) -> bytes:
        head = b'{"type":"ping","id":"big","pad":"'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    for size, ok in ((16384, True), (16385, False)):
        peer = yield bb.connect()
        peer.send_raw(ping_of(size))
        yield until(lambda peer=peer: len(peer.frames) > 1)
        if ok:
            assert peer.frames[1] == {"type": "result", "id": "big"}
        else:
            assert peer.frames[1]["code"] == "too_large" and "id" not in peer.frames[1]
            assert "16384" in peer.frames[1]["message"]
            yield peer.lost
    alice = yield bb.user("alice")
    r = yield alice.req("ping")
    alice.send_raw(ping_of(65536))
    yield alice.wait_for(lambda f: f.get("id") == "big")
    alice.transport.write(struct.pack("!I", 65537) + b"{")  # refused at its length
    yield alice.lost
    assert alice.frames[-1]["code"] == "too_large" and "id" not in alice.frames[-1]
    assert r["type"] == "result"


# session states -----------------------------------------------------------------------

#: Every request that needs a login (PROTOCOL.md, "Session", state 2).
NEED_LOGIN = [
    "send", "tags", "history", "react", "edit", "delete", "who", "ack", "conversations",
    "mark_read", "set_read_receipts", "typing", "search", "set_status", "create_group",
    "join", "leave", "invite", "kick", "ban", "unban", "set_topic", "set_group",
    "set_voice", "set_role", "delete_group", "list_groups", "members", "group_info",
    "report", "reports", "suspend", "unsuspend", "file_offer", "file_resume",
    "file_finish", "file_cancel", "download", "download_cancel",
]  # fmt: skip


@pytest_twisted.inlineCallbacks
def test_what_each_state_allows(bb: Realm) -> Any:
    peer = yield bb.connect(hello=False)
    for type_ in [*NEED_LOGIN, "register", "login", "ping", "pong"]:
        r = yield peer.req(type_)
        assert r["code"] == "hello_required", (type_, r)
    r = yield peer.req("no_such_request")
    assert r["code"] == "unknown_type"
    r = yield peer.req("hello", version=1)
    assert r["type"] == "result"
    for type_ in NEED_LOGIN:
        r = yield peer.req(type_)
        assert r["code"] == "not_authenticated", (type_, r)
    yield peer.fence()
    peer.send({"type": "pong", "id": "p"})  # allowed: no answer at all
    assert (yield peer.fence()) == []
    r = yield peer.req("hello", version=1)
    assert r["code"] == "bad_request"
    r = yield peer.req("register", user="alice", password=PW)
    assert r == {"type": "result", "id": r["id"], "user": "alice@localhost"}
    # a second login while the first is checked; then one on a logged-in connection
    first = peer.req("login", user="alice", password=PW)
    second = peer.req("login", user="alice", password=PW)
    codes = yield defer.gatherResults([first, second])
    assert [errcode(c) for c in codes] == ["ok", "already_authenticated"]
    r = yield peer.req("login", user="alice", password=PW)
    assert r["code"] == "already_authenticated"
    r = yield peer.req("hello", version=1)
    assert r["code"] == "bad_request"
    r = yield peer.req("register", user="bob", password=PW)  # still allowed, session kept
    assert r["user"] == "bob@localhost"
    r = yield peer.req("who", user="alice")
    assert r["users"] == [{"user": "alice@localhost", "sessions": 1}]


# hello --------------------------------------------------------------------------------

#: ``version`` values: the code, and whether the connection closes.
VERSIONS = [
    (1, "ok", False),
    (2, "unsupported_version", True),
    (0, "unsupported_version", True),
    (-1, "unsupported_version", True),
    (2**53 - 1, "unsupported_version", True),
    (2**53, "bad_request", False),
    ("1", "bad_request", False),
    (1.0, "bad_request", False),
    (True, "bad_request", False),
    (None, "bad_request", False),
    ([1], "bad_request", False),
]


@pytest.mark.parametrize("version,code,closes", VERSIONS)
@pytest_twisted.inlineCallbacks
def test_hello_versions(bb: Realm, version: Any, code: str, closes: bool) -> Any:
    peer = yield bb.connect(hello=False)
    r = yield peer.req("hello", version=version)
    assert errcode(r) == code, r
    if code == "unsupported_version":
        assert r["supported"] == [1]
    if closes:
        yield peer.lost
    else:
        r2 = yield peer.req("ping")
        assert errcode(r2) == ("ok" if code == "ok" else "hello_required")


@pytest_twisted.inlineCallbacks
def test_hello_result(bb: Realm) -> Any:
    peer = yield bb.connect(hello=False)
    r = yield peer.req("hello", version=1)
    assert list(r) == ["type", "id", "version", "realm", "limits", "features"]
    assert r["version"] == 1 and r["realm"] == "localhost"
    lim = r["limits"]
    ints = ["max_frame", "max_body", "send_burst", "history_page", "max_file_size"]
    ints += ["file_quota", "file_chunk"]
    assert all(type(lim[k]) is int for k in ints)
    assert all(type(lim[k]) is float for k in ("send_rate", "keepalive_interval"))
    assert lim["max_frame"] == 65536 and lim["max_body"] == 16384
    assert lim["history_page"] == 200
    assert r["features"] == ["resume", "multi-device", "files", "register"]


@pytest_twisted.inlineCallbacks
def test_hello_without_register_feature_when_registration_is_closed(tmp_path: Any) -> Any:
    bb = yield Realm.start(tmp_path, auth={"allow_registration": False})
    try:
        peer = yield bb.connect(hello=False)
        r = yield peer.req("hello", version=1)
        assert "register" not in r["features"]
        r = yield peer.req("register", user="alice", password=PW)
        assert r["code"] == "registration_closed"
    finally:
        yield bb.stop()


# register ----------------------------------------------------------------------------

#: (user, password) -> the code, or the canonical address.
REGISTRATIONS = [
    ("alice", PW, "alice@localhost"),
    ("ALICE", PW, "user_exists"),
    ("\uff21\uff2c\uff29\uff23\uff25", PW, "user_exists"),  # full-width
    ("alice@localhost", PW, "bad_address"),
    ("#team", PW, "bad_address"),
    ("guest-1", PW, "bad_address"),
    ("Guest-2", PW, "bad_address"),
    ("guest1", PW, "guest1@localhost"),
    ("Stra\u00dfe", PW, "strasse@localhost"),
    ("strasse", PW, "user_exists"),
    ("\ufb01nn", PW, "finn@localhost"),  # the ligature fi
    ("\u212aelvin", PW, "kelvin@localhost"),  # KELVIN SIGN
    ("kelvin", PW, "user_exists"),
    ("\u0430lice", PW, "bad_address"),  # Cyrillic a
    ("al\u200bice", PW, "bad_address"),  # zero-width space
    ("al\u200dice", PW, "bad_address"),  # zero-width joiner
    ("al\u202eice", PW, "bad_address"),  # bidi override
    ("al ice", PW, "bad_address"),
    ("-bob", PW, "bad_address"),
    ("_bob", PW, "bad_address"),
    ("bob.smith-2_x", PW, "bob.smith-2_x@localhost"),
    ("b" * 32, PW, "b" * 32 + "@localhost"),
    ("c" * 33, PW, "bad_address"),
    ("", PW, "bad_address"),
    ("\u00e9", PW, "bad_address"),
    ("dave", "x" * 7, "bad_request"),
    ("dave", "x" * 8, "dave@localhost"),
    ("erin", "x" * 1024, "erin@localhost"),
    ("fred", "x" * 1025, "bad_request"),
    ("gina", "\U0001f600" * 8, "gina@localhost"),  # 8 characters
    ("hugo", 12345678, "bad_request"),
    ("ivan", None, "bad_request"),
    (None, PW, "bad_request"),
    (5, PW, "bad_request"),
]


@pytest_twisted.inlineCallbacks
def test_register(bb: Realm) -> Any:
    peer = yield bb.connect()
    for user, password, want in REGISTRATIONS:
        r = yield peer.req("register", user=user, password=password)
        if "@" in want:
            assert r == {"type": "result", "id": r["id"], "user": want}, (user, r)
        else:
            assert r["code"] == want, (user, r)
    # registering does not log in
    r = yield peer.req("send", to="alice", body="x")
    assert r["code"] == "not_authenticated"


# login --------------------------------------------------------------------------------

#: login fields (besides the password) -> the code, or the result's user and device.
LOGINS = [
    ({"user": "alice"}, ("alice@localhost", "default")),
    ({"user": "ALICE@LocalHost."}, ("alice@localhost", "default")),
    ({"user": "\uff41lice"}, ("alice@localhost", "default")),
    ({"user": "alice", "device": "d" * 64}, ("alice@localhost", "d" * 64)),
    ({"user": "alice", "device": "\U0001f4f1" * 64}, ("alice@localhost", "\U0001f4f1" * 64)),
    ({"user": "alice", "device": "my phone \u200d"}, ("alice@localhost", "my phone \u200d")),
    ({"user": "alice", "device": "d" * 65}, "bad_request"),
    ({"user": "alice", "device": ""}, "bad_request"),
    ({"user": "alice", "device": "a\tb"}, "bad_request"),
    ({"user": "alice", "device": "a\u202eb"}, "bad_request"),
    ({"user": "alice", "device": "a\u0085b"}, "bad_request"),
    ({"user": "alice", "device": 5}, "bad_request"),
    ({"user": "alice", "since": -1}, "bad_request"),
    ({"user": "alice", "since": 2**53}, "bad_request"),
    ({"user": "alice", "since": 1.0}, "bad_request"),
    ({"user": "alice", "since": "1"}, "bad_request"),
    ({"user": "alice", "since": True}, "bad_request"),
    ({"user": "alice", "quiet": 1}, "bad_request"),
    ({"user": "alice", "quiet": "true"}, "bad_request"),
    ({"user": "alice@elsewhere.org"}, "auth_failed"),
    ({"user": "#alice"}, "auth_failed"),
    ({"user": "-alice"}, "auth_failed"),
    ({"user": "nobody"}, "auth_failed"),
    ({"user": 5}, "bad_request"),
    ({}, "bad_request"),
]


@pytest_twisted.inlineCallbacks
def test_login_fields(bb: Realm) -> Any:
    yield bb.user("alice")
    for fields, want in LOGINS:
        peer = yield bb.connect()
        r = yield peer.req("login", password=PW, **fields)
        if isinstance(want, tuple):
            assert (r.get("user"), r.get("device")) == want, (fields, r)
            assert list(r) == ["type", "id", "user", "device"]
        else:
            assert r["code"] == want, (fields, r)
        yield peer.close()
    peer = yield bb.connect()
    r = yield peer.req("login", user="alice", password="wrong-password")
    assert r["code"] == "auth_failed"
    r = yield peer.req("login", user="alice")
    assert r["code"] == "bad_request"


@pytest_twisted.inlineCallbacks
def test_login_sends_result_backlog_synced_presence_in_this_order(bb: Realm) -> Any:
    # contacts named so that registration order is not address order
    zed = yield bb.user("zed")
    mia = yield bb.user("mia")
    quiet = yield bb.user("kim", quiet=True)
    yield bb.user("alice")
    sent = []
    for peer in (zed, mia, quiet, zed):
        r = yield peer.req("send", to="alice", body=f"from {peer.name}")
        sent.append(r["pos"])
    for start, want in ((None, sent), (0, sent), (sent[1], sent[2:]), (2**53 - 1, [])):
        extra = {} if start is None else {"since": start}
        peer = yield bb.connect()
        r = yield peer.req("login", user="alice", password=PW, device="laptop", **extra)
        synced = yield peer.wait_for(lambda f: f["type"] == "synced")
        yield until(lambda peer=peer: len(peer.pushed("presence")) == 2)
        fence = yield peer.fence()
        kinds = [f["type"] for f in peer.frames[1:]]  # (after the hello result)
        assert kinds[: kinds.index("synced") + 1] == ["result"] + ["msg"] * len(want) + ["synced"]
        assert [f["pos"] for f in peer.pushed("msg")] == want
        # synced: the last msg sent, or the start position (clamped to the newest)
        assert synced["pos"] == (want[-1] if want else max(sent))
        assert [f["user"] for f in peer.pushed("presence")] == ["mia@localhost", "zed@localhost"]
        assert kinds.index("presence") > kinds.index("synced")
        assert r == peer.frames[1] and fence[1] == r
        yield peer.close()


@pytest_twisted.inlineCallbacks
def test_positions_on_a_connection_only_increase_while_the_backlog_streams(bb: Realm) -> Any:
    """Items committed while the backlog is sent come after it, once each."""
    bob = yield bb.user("bob")
    yield bb.user("alice")
    for i in range(150):
        bob.send({"type": "send", "to": "alice", "body": f"old {i}"})
    yield bob.fence()
    peer = yield bb.connect()
    peer.send({"type": "login", "id": "l", "user": "alice", "password": PW, "since": 0})
    for i in range(150):
        bob.send({"type": "send", "to": "alice", "body": f"new {i}"})
    yield bob.fence()
    yield until(lambda: len(peer.pushed("msg")) == 300 and bool(peer.pushed("synced")))
    positions = [f["pos"] for f in peer.pushed("msg")]
    assert positions == sorted(set(positions))
    bodies = [f["body"] for f in peer.pushed("msg")]
    assert bodies == [f"old {i}" for i in range(150)] + [f"new {i}" for i in range(150)]


@pytest_twisted.inlineCallbacks
def test_too_many_sessions(tmp_path: Any) -> Any:
    bb = yield Realm.start(tmp_path, max_sessions_per_user=2)
    try:
        yield bb.user("alice")
        yield bb.login("alice", quiet=True)
        peer = yield bb.connect()
        r = yield peer.req("login", user="alice", password=PW)
        assert r["code"] == "too_many_sessions"
    finally:
        yield bb.stop()


# login throttling --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_failed_logins_are_throttled_per_account_whatever_the_spelling(tmp_path: Any) -> Any:
    bb = yield Realm.start(tmp_path, auth={"failure_delay": 30.0})
    try:
        yield bb.user("alice")
        peer = yield bb.connect()
        codes = []
        for user in ("alice", "ALICE", "alice@LOCALHOST", "\uff41lice"):
            r = yield peer.req("login", user=user, password="wrong-password")
            codes.append(errcode(r))
        # the 4th failure (3 are free) makes the next attempt wait failure_delay,
        # the right password too, under any spelling; a refused attempt is no failure
        for user in ("alice", "Alice@localhost."):
            r = yield peer.req("login", user=user, password=PW)
            codes.append(errcode(r))
            assert 29 < r["retry_after"] <= 30
        assert codes == ["auth_failed"] * 4 + ["rate_limited"] * 2
        # another account is not affected
        yield bb.user("bob")
        r = yield peer.req("login", user="bob", password=PW)
        assert r["type"] == "result"
        # names that are not valid local names are keyed by the string, case-folded
        codes = []
        for user in ("Not Valid!", "not valid!", "NOT VALID!", "not VALID!", "Not valid!"):
            other = yield bb.connect()
            r = yield other.req("login", user=user, password="x")
            codes.append(errcode(r))
        assert codes == ["auth_failed"] * 4 + ["rate_limited"]
    finally:
        yield bb.stop()


@pytest_twisted.inlineCallbacks
def test_failed_logins_are_throttled_per_address(tmp_path: Any) -> Any:
    bb = yield Realm.start(tmp_path, auth={"failure_delay": 30.0, "free_failures_per_address": 3})
    try:
        yield bb.user("alice")
        peer = yield bb.connect()
        codes = []
        for user in ("ghost1", "ghost2", "ghost3", "ghost4"):  # 4 accounts, 1 address
            r = yield peer.req("login", user=user, password="wrong-password")
            codes.append(errcode(r))
        r = yield peer.req("login", user="alice", password=PW)  # any account now
        assert [*codes, errcode(r)] == ["auth_failed"] * 4 + ["rate_limited"]
        assert 29 < r["retry_after"] <= 30
    finally:
        yield bb.stop()


@pytest_twisted.inlineCallbacks
def test_registrations_per_address(tmp_path: Any) -> Any:
    """5 that can succeed at once; those that cannot (refused before the hash) do
    not count."""
    bb = yield Realm.start(tmp_path, auth={"registrations_per_address": 5})
    try:
        peer = yield bb.connect()
        r = yield peer.req("register", user="alice", password=PW)
        assert r["type"] == "result"
        codes = []
        for user, password in [("alice", PW), ("-bad", PW), ("guest-1", PW), ("bob", "short")]:
            codes.append(errcode((yield peer.req("register", user=user, password=password))))
        assert codes == ["user_exists", "bad_address", "bad_address", "bad_request"]
        codes = []
        for i in range(5):
            other = yield bb.connect()  # per address, not per connection
            r = yield other.req("register", user=f"user{i}", password=PW)
            codes.append(errcode(r))
        assert codes == ["ok"] * 4 + ["rate_limited"] and r["retry_after"] > 0
    finally:
        yield bb.stop()


@pytest_twisted.inlineCallbacks
def test_a_lone_surrogate_deep_down_is_bad_request_or_bad_frame(bb: Realm) -> Any:
    """A lone surrogate is ``bad_request``, and nesting deeper than the server reads
    (past 500 levels) may be refused (``bad_frame``): a frame with both is one or
    the other, not ``internal_error``.  The realm read such a frame (the JSON
    decoder goes deeper than 900 levels) and then failed looking for the surrogate,
    recursively, past Python's recursion limit, logging a 1000-line traceback each
    time."""
    for depth in (600, 800, 900, 950, 970):
        peer = yield bb.connect()
        payload = PING + b',"x":' + b"[" * depth + b'"\\ud800"' + b"]" * depth + b"}"
        peer.send_raw(payload)
        yield until(lambda p=peer: len(p.frames) > 1)
        answer = peer.frames[1]
        assert errcode(answer) in ("bad_request", "bad_frame"), (depth, answer)
        assert "id" not in answer
        if errcode(answer) == "bad_request":
            r = yield peer.req("ping")
            assert r["type"] == "result"
        peer.transport.loseConnection()
