"""Black-box: the WebSocket transport's handshake and the browser's HTTP session API,
with raw HTTP over loopback TCP, against PROTOCOL.md ("WebSocket transport")."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from chatproto.web import WebSite
from tests.blackbox import Realm
from tests.conftest import until


class RawHTTP(Protocol):
    """Writes one request as given; keeps what comes back."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    @property
    def status(self) -> int | None:
        head = self.data.split(b"\r\n", 1)[0].split(b" ")
        return int(head[1]) if len(head) > 1 else None

    @property
    def body(self) -> Any:
        return json.loads(self.data.partition(b"\r\n\r\n")[2])


@pytest.fixture
def site(tmp_path: Any) -> Any:
    bb = Realm.open(tmp_path)
    web = WebSite(bb.realm)
    port = _reactor.listenTCP(0, web, interface="127.0.0.1")
    yield bb, port.getHost().port
    pytest_twisted.blockon(port.stopListening())
    bb.close()


@defer.inlineCallbacks
def http(port: int, request: bytes) -> Any:
    proto = RawHTTP()
    yield connectProtocol(TCP4ClientEndpoint(_reactor, "127.0.0.1", port), proto)
    proto.transport.write(request)
    yield until(lambda: b"\r\n\r\n" in proto.data)
    return proto


def handshake(port: int, origin: str | None) -> bytes:
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


#: Origin of the WebSocket handshake -> the HTTP status.
ORIGINS = [
    ("same", 101),
    (None, 403),
    ("null", 403),  # what a sandboxed page or a file:// page sends
    ("http://evil.example", 403),
    ("https://127.0.0.1:{port}", 403),  # another scheme is another origin
    ("http://127.0.0.1:1", 403),
    ("not a url", 400),  # not an origin at all: the WebSocket layer refuses it
]


@pytest.mark.parametrize("origin,status", ORIGINS)
@pytest_twisted.inlineCallbacks
def test_the_websocket_handshake_needs_an_allowed_origin(
    site: Any, origin: str | None, status: int
) -> Any:
    _, port = site
    if origin == "same":
        origin = f"http://127.0.0.1:{port}"
    elif origin is not None:
        origin = origin.format(port=port)
    proto = yield http(port, handshake(port, origin))
    assert proto.status == status, proto.data[:200]
    proto.transport.loseConnection()


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.0", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def set_cookies(answer: bytes) -> list[str]:
    """The values of the ``Set-Cookie`` headers of an HTTP answer."""
    return [
        line.split(b":", 1)[1].strip().decode()
        for line in answer.split(b"\r\n")
        if line.lower().startswith(b"set-cookie:")
    ]


@defer.inlineCallbacks
def log_in_alice(port: int, origin: str | None) -> Any:
    """alice (password-1) registers over ``POST /api/register``, then logs in over
    ``POST /api/login``, with ``Origin: origin`` (none if None).  Deferred: the
    ``Set-Cookie`` values of the login's answer."""
    creds = json.dumps({"user": "alice", "password": "password-1"}).encode()
    json_ = {"Content-Type": "application/json"}
    if origin is not None:
        json_["Origin"] = origin
    for path in ("/api/register", "/api/login"):
        proto = yield http(port, post(port, path, creds, json_))
        yield proto.lost
    return set_cookies(proto.data)


@defer.inlineCallbacks
def alice_session(port: int) -> Any:
    """alice registered and logged in from the site's own origin.  Deferred: her
    session cookie, ``name=value`` (the first one set, without its attributes)."""
    cookies = yield log_in_alice(port, f"http://127.0.0.1:{port}")
    return cookies[0].split(";")[0].strip()


@pytest_twisted.inlineCallbacks
def test_the_json_requests(site: Any) -> Any:
    _, port = site
    same = f"http://127.0.0.1:{port}"
    json_ = {"Content-Type": "application/json"}
    creds = json.dumps({"user": "alice", "password": "password-1"}).encode()
    cases = [
        ("/api/register", creds, {**json_, "Origin": same}, 200, None),
        ("/api/register", creds, {**json_, "Origin": same}, 409, "user_exists"),
        ("/api/login", creds, {**json_, "Origin": "http://evil.example"}, 403, "forbidden"),
        ("/api/login", creds, {**json_, "Origin": "null"}, 403, "forbidden"),
        ("/api/login", creds, {"Content-Type": "text/plain", "Origin": same}, 415, None),
        ("/api/login", creds, {"Origin": same}, 415, None),
        ("/api/login", b"[1]", {**json_, "Origin": same}, 400, "bad_request"),
        ("/api/login", b'{"user":NaN}', {**json_, "Origin": same}, 400, "bad_request"),
        ("/api/login", b'{"user":"a","user":"b"}', {**json_, "Origin": same}, 400, "bad_request"),
        ("/api/login", b"{" + b" " * 16383, {**json_, "Origin": same}, 400, "bad_request"),
        ("/api/login", b"{" + b" " * 16384, {**json_, "Origin": same}, 413, "too_large"),
        ("/api/login", b'{"user":"alice","password":"wrong-pass"}', {**json_}, 401, "auth_failed"),
        # a program (no Origin: not a browser) may use the API
        ("/api/login", creds, json_, 200, None),
        ("/api/logout", b'{"everywhere":1}', {**json_, "Origin": same}, 400, "bad_request"),
        (
            "/files?to=alice&name=x&sha256=" + "0" * 64,
            b"x",
            {"Content-Type": "text/plain"},
            403,
            "forbidden",
        ),
    ]
    for path, body, headers, status, code in cases:
        proto = yield http(port, post(port, path, body, headers))
        yield proto.lost
        assert proto.status == status, (path, headers, proto.data[:300])
        if code is not None:
            assert proto.body["code"] == code, (path, proto.body)


@pytest_twisted.inlineCallbacks
def test_answers_are_compact_json_like_control_frames(site: Any) -> Any:
    """The server writes compact JSON, non-ASCII as raw UTF-8 (PROTOCOL.md's
    conventions), over HTTP as over the other transports."""
    _, port = site
    headers = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"}
    creds = b'{"user":"alice","password":"password-1"}'
    proto = yield http(port, post(port, "/api/register", creds, headers))
    yield proto.lost
    assert proto.data.partition(b"\r\n\r\n")[2] == b'{"type":"result","user":"alice@localhost"}'
    proto = yield http(port, post(port, "/api/login", creds, headers))
    yield proto.lost
    body = proto.data.partition(b"\r\n\r\n")[2]
    assert body == b'{"type":"result","user":"alice@localhost","device":"web"}'
    bad = '{"user":"\u00e9l\u00e8ve","password":"password-1"}'.encode()
    proto = yield http(port, post(port, "/api/register", bad, headers))
    yield proto.lost
    body = proto.data.partition(b"\r\n\r\n")[2]
    assert body.startswith(b'{"type":"error","code":"bad_address","message":"')
    assert "\u00e9l\u00e8ve".encode() in body
    proto = yield http(port, post(port, "/api/login", creds, {"Content-Type": "text/plain"}))
    yield proto.lost
    assert proto.data.partition(b"\r\n\r\n")[2].startswith(b'{"type":"error","code":')


@pytest_twisted.inlineCallbacks
def test_api_login_is_throttled_like_login(site: Any) -> Any:
    """``POST /api/login`` is "checked and throttled exactly like login": after the
    free failures of an account, the next attempt within the delay is 429
    ``rate_limited`` with ``retry_after`` and a ``Retry-After`` header -- the right
    password too -- on a status line with its reason phrase (twisted.web knows none
    for 429 and wrote "Unknown Status")."""
    _, port = site
    headers = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"}
    creds = json.dumps({"user": "alice", "password": "password-1"}).encode()
    bad = json.dumps({"user": "alice", "password": "wrong-pass"}).encode()
    proto = yield http(port, post(port, "/api/register", creds, headers))
    yield proto.lost
    for _ in range(4):  # 3 free failures, then one that starts the delay
        proto = yield http(port, post(port, "/api/login", bad, headers))
        yield proto.lost
        assert proto.status == 401, proto.data[:200]
    proto = yield http(port, post(port, "/api/login", creds, headers))
    yield proto.lost
    head = proto.data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0].split(b" ", 1)[1] == b"429 Too Many Requests"
    assert b"Retry-After: 1" in head
    assert proto.body["code"] == "rate_limited" and 0 < proto.body["retry_after"] <= 1
    assert not any(h.lower().startswith(b"set-cookie") for h in head)


def ws_frame(opcode: int, payload: bytes, length: int | None = None) -> bytes:
    """A client's masked WebSocket frame (a zero mask: the payload as it is); its
    header announces ``length`` (default: the payload's) bytes."""
    n = len(payload) if length is None else length
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def ws_messages(data: bytes) -> list[tuple[int, bytes]]:
    """The server's (unmasked) frames in ``data``: ``(opcode, payload)``."""
    out = []
    while len(data) >= 2:
        op, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + n:
            break
        out.append((op, data[at : at + n]))
        data = data[at + n :]
    return out


def ws_close_code(data: bytes) -> int | None:
    """The status code of the first close frame among the server's (unmasked)
    frames in ``data``, or None if it sent none (or not all of it yet)."""
    for op, payload in ws_messages(data):
        if op == 8:
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    return None


@pytest.mark.parametrize("logged_in", [False, True])
@pytest_twisted.inlineCallbacks
def test_a_message_over_twice_the_limit_is_closed_with_1009(site: Any, logged_in: bool) -> Any:
    """PROTOCOL.md: a message "over twice that limit is refused by the WebSocket
    layer itself, close code 1009" (before login: over 32768 bytes).  A close frame
    with that code, not a dropped connection (which a client reports as 1006,
    abnormal closure)."""
    bb, port = site
    proto = yield http(port, handshake(port, f"http://127.0.0.1:{port}"))
    assert proto.status == 101, proto.data[:200]
    proto.data = proto.data.partition(b"\r\n\r\n")[2]
    proto.transport.write(ws_frame(1, b'{"type":"hello","version":1,"id":1}'))
    limit = 2 * 16384
    if logged_in:
        yield bb.realm.create_user("carol", "password-1")
        proto.transport.write(
            ws_frame(1, b'{"type":"login","id":2,"user":"carol","password":"password-1"}')
        )
        yield until(lambda: b'"synced"' in proto.data)
        limit = 2 * bb.realm.config.limits.max_frame
    # the header of one byte too many, and the start of its payload
    proto.transport.write(ws_frame(1, b'{"type":"ping"', length=limit + 1))
    yield until(lambda: ws_close_code(proto.data) is not None or proto.lost.called)
    assert ws_close_code(proto.data) == 1009, proto.data[-200:]
    proto.transport.loseConnection()


@pytest.mark.parametrize(
    "headers,status,code",
    [
        # over files.max_file_size (256 MiB by default)
        ({"Content-Length": str(256 * 2**20 + 1)}, 413, "too_large"),
        # no length: a chunked body
        ({"Transfer-Encoding": "chunked"}, 411, "bad_request"),
        # a client that asks before it sends (curl does for large bodies) is not
        # told to go on
        ({"Content-Length": str(2**40), "Expect": "100-continue"}, 413, "too_large"),
        ({"Content-Length": "10", "Cookie": None}, 401, "auth_failed"),
        ({"Content-Length": "10", "Origin": "http://evil.example"}, 403, "forbidden"),
        # the body in the same write as the headers: one answer all the same
        ({"Content-Length": "10", "Cookie": None, "body": "0123456789"}, 401, "auth_failed"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_an_upload_refused_from_its_headers_is_answered_before_its_body(
    site: Any, headers: dict[str, Any], status: int, code: str
) -> Any:
    """PROTOCOL.md, ``POST /files``: "Content-Length against max_file_size (413
    too_large, before the body is read; 411 without it)".  The answer comes as soon
    as the headers are in, with the connection closing after it: the realm used to
    read (and discard) the whole announced body first, so a client that waited for
    an answer before sending, or a program that sent 256 MiB, waited for nothing."""
    _, port = site
    same = f"http://127.0.0.1:{port}"
    cookie = yield alice_session(port)
    fields = {
        "Host": f"127.0.0.1:{port}",
        "Origin": same,
        "Cookie": cookie,
        "Content-Type": "application/octet-stream",
        **headers,
    }
    head = [f"POST /files?to=alice&name=x.bin&sha256={'0' * 64} HTTP/1.1"]
    body = fields.pop("body", "")  # (none by default)
    head += [f"{k}: {v}" for k, v in fields.items() if v is not None]
    proto = yield http(port, ("\r\n".join(head) + "\r\n\r\n" + body).encode())
    assert proto.status == status, proto.data[:300]
    yield until(lambda: proto.lost.called or len(proto.data.partition(b"\r\n\r\n")[2]) > 10)
    assert proto.body["code"] == code
    assert b"100 Continue" not in proto.data
    yield proto.lost  # closed: the body announced is not read
    assert proto.data.count(b"HTTP/1.1") == 1, proto.data


@pytest_twisted.inlineCallbacks
def test_upload_parameters_are_read_strictly(site: Any) -> Any:
    """``POST /files?to=T&name=N&sha256=H``: a parameter whose percent-encoded
    bytes are not UTF-8, or one given twice, is 400 ``bad_request``, as a control
    frame that is not UTF-8 or names a field twice is refused (PROTOCOL.md, "Control
    frames": the server refuses to guess).  The realm used to store the name with
    U+FFFD for the bad bytes, and to take the first of two recipients."""
    bb, port = site
    same = f"http://127.0.0.1:{port}"
    yield bb.realm.create_user("bob", "password-1")
    cookie = yield alice_session(port)
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # "test"
    headers = {"Origin": same, "Cookie": cookie, "Content-Type": "text/plain"}
    for query, status in [
        (f"to=bob&name=a%FFb.txt&sha256={sha}", 400),
        (f"to=bob&name=%C3.txt&sha256={sha}", 400),
        (f"to=bob&to=carol&name=a.txt&sha256={sha}", 400),
        (f"to=bob&name=a.txt&name=b.txt&sha256={sha}", 400),
        (f"to=bob&name=caf%C3%A9.txt&sha256={sha}", 200),
    ]:
        proto = yield http(port, post(port, "/files?" + query, b"test", headers))
        yield proto.lost
        assert proto.status == status, (query, proto.data[:300])
        if status == 400:
            assert proto.body["code"] == "bad_request", proto.body
    assert proto.body["file"]["name"] == "caf\u00e9.txt"
    assert bb.realm.files.uploads == {}


@pytest_twisted.inlineCallbacks
def test_file_bytes_over_a_websocket(site: Any) -> Any:
    """Over WebSocket a text message is "the UTF-8 JSON object that would be the
    frame's payload" (PROTOCOL.md): one that is a binary data frame (first byte
    0x00) is bad_frame, as a binary message is.  The realm took it as upload data.
    And the data frames of a ``download`` asked over WebSocket come as binary
    messages: the realm sent the file's bytes as text messages, which a browser must
    refuse (not UTF-8: close 1007)."""
    import hashlib

    from tests.blackbox import PW, data_frame

    bb, port = site
    alice = yield bb.user("alice")
    yield bb.realm.create_user("bob", PW)
    content = bytes(range(256))
    offer = yield alice.req(
        "file_offer", to="bob", name="b.bin", size=256, sha256=hashlib.sha256(content).hexdigest()
    )
    alice.send_raw(data_frame(offer["stream"], 0, content))
    done = yield alice.req("file_finish", upload=offer["upload"])
    assert done["type"] == "result", done

    @defer.inlineCallbacks
    def logged_in_ws(user: str) -> Any:
        proto = yield http(port, handshake(port, f"http://127.0.0.1:{port}"))
        assert proto.status == 101
        proto.data = proto.data.partition(b"\r\n\r\n")[2]
        proto.transport.write(ws_frame(1, b'{"type":"hello","version":1,"id":1}'))
        login = {"type": "login", "id": 2, "user": user, "password": PW}
        proto.transport.write(ws_frame(1, json.dumps(login).encode()))
        yield until(lambda: b'"synced"' in proto.data)
        return proto

    bob = yield logged_in_ws("bob")
    bob.data = b""
    bob.transport.write(
        ws_frame(1, json.dumps({"type": "download", "id": 3, "file": done["file"]}).encode())
    )
    data = b"\x00\x02" + (1).to_bytes(4, "big") + bytes(8) + content  # stream 1, offset 0
    yield until(lambda: data in bob.data)
    bob.transport.write(ws_frame(1, b'{"type":"ping","id":4}'))  # still open
    yield until(lambda: b'"id":4' in bob.data)
    got = ws_messages(bob.data)
    assert (2, data) in got, got
    assert all(op == 1 for op, payload in got if payload != data), got
    bob.transport.loseConnection()

    alice_ws = yield logged_in_ws("alice")
    offer = yield alice.req(
        "file_offer", to="bob", name="c.txt", size=5, sha256=hashlib.sha256(b"hello").hexdigest()
    )
    alice_ws.data = b""
    alice_ws.transport.write(ws_frame(1, data_frame(1, 0, b"hello")))
    yield until(lambda: ws_close_code(alice_ws.data) is not None)
    (op, payload), (close, _) = ws_messages(alice_ws.data)
    assert (op, json.loads(payload)["code"], close) == (1, "bad_frame", 8), alice_ws.data


@pytest_twisted.inlineCallbacks
def test_an_upload_answers_the_stored_file_as_documented(site: Any) -> Any:
    """``POST /files`` answers ``{"file":{...},"pos","msg_id"}``, the file with the
    fields of a ``download`` result but the range and stream, ``file`` being the
    ``file_id`` of the ``file`` message's ``meta`` (PROTOCOL.md said only "as in a
    file message", whose ``meta`` names it ``file_id``)."""
    bb, port = site
    bob = yield bb.user("bob")
    same = f"http://127.0.0.1:{port}"
    cookie = yield alice_session(port)
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # "test"
    headers = {"Origin": same, "Cookie": cookie, "Content-Type": "text/plain"}
    proto = yield http(port, post(port, f"/files?to=bob&name=t.txt&sha256={sha}", b"test", headers))
    yield proto.lost
    res = proto.body
    assert list(res) == ["type", "file", "pos", "msg_id"], res
    info = res["file"]
    assert list(info) == [
        "file", "name", "size", "media_type", "sha256", "from", "to", "ts", "pos",
    ], info  # fmt: skip
    msg = yield bob.wait_for(lambda f: f.get("type") == "msg" and f.get("kind") == "file")
    assert info["file"] == msg["meta"]["file_id"] and info["pos"] == res["pos"] == msg["pos"]
    got = yield bob.req("download", file=info["file"])
    assert {k: got[k] for k in info} == info


@pytest_twisted.inlineCallbacks
def test_the_session_cookie_has_the_documented_attributes(site: Any) -> Any:
    """PROTOCOL.md, ``POST /api/login``: the cookie comes with "``HttpOnly;
    SameSite=Strict; Path=/``" (plus ``Secure`` over HTTPS, not here).  twisted.web
    wrote ``SameSite=strict``."""
    _, port = site
    (cookie,) = yield log_in_alice(port, None)
    assert cookie.startswith("chatproto_session=") and "Secure" not in cookie
    assert "HttpOnly; SameSite=Strict; Path=/" in cookie, cookie
    assert "Max-Age=1209600" in cookie  # web.session_ttl


@pytest_twisted.inlineCallbacks
def test_an_upload_is_checked_before_its_body_is_read(site: Any) -> Any:
    """``POST /files``: "the same checks as a native upload, all before any byte
    is kept" (PROTOCOL.md, as a native ``file_offer``'s "before any byte is sent"):
    the recipient, the fields and the quota are answered as soon as the headers are
    in, the body unread; an accepted upload gets its ``100 Continue`` (when asked)
    only then; one whose connection goes before its body is whole leaves no
    unfinished upload behind.  The realm read the whole body first."""
    bb, port = site
    same = f"http://127.0.0.1:{port}"
    yield bb.realm.create_user("bob", "password-1")
    cookie = yield alice_session(port)
    sha = "0" * 64

    def head(query: str, length: int, expect: bool = False) -> bytes:
        lines = [
            f"POST /files?{query} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            f"Origin: {same}",
            f"Cookie: {cookie}",
            "Content-Type: text/plain",
            f"Content-Length: {length}",
        ] + (["Expect: 100-continue"] if expect else [])
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    bb.realm.files.config.quota_per_user = 1000
    for query, length, status, code in [
        (f"to=nobody&name=a.txt&sha256={sha}", 10, 404, "no_such_user"),
        (f"to=%23nowhere&name=a.txt&sha256={sha}", 10, 404, "no_such_group"),
        (f"to=bob&name=a/b&sha256={sha}", 10, 400, "bad_request"),
        ("to=bob&name=a.txt&sha256=xyz", 10, 400, "bad_request"),
        (f"to=bob&name=a.txt&sha256={sha}", 1001, 413, "quota_exceeded"),
    ]:
        proto = yield http(port, head(query, length))  # and no body
        assert proto.status == status, (query, proto.data[:300])
        yield proto.lost
        assert proto.body["code"] == code, (query, proto.body)
    assert proto.body["quota"] == 1000 and proto.body["used"] == 0
    # accepted: told to go on, then the body
    body = b"test"
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    proto = yield http(port, head(f"to=bob&name=t.txt&sha256={sha}", 4, expect=True))
    assert proto.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), proto.data
    proto.transport.write(body)
    yield until(lambda: b'"msg_id"' in proto.data)
    assert proto.data.split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200 ")
    proto.transport.loseConnection()
    # accepted, then the connection goes with half of the body: no upload is left
    proto = yield http(port, head(f"to=bob&name=u.txt&sha256={sha}", 4, expect=True))
    yield until(lambda: len(bb.realm.files.uploads) == 1)
    proto.transport.write(b"te")
    proto.transport.loseConnection()
    yield proto.lost
    yield until(lambda: not bb.realm.files.uploads)


@pytest_twisted.inlineCallbacks
def test_other_methods_and_paths_of_the_api_are_json_errors(site: Any) -> Any:
    """PROTOCOL.md: the API answers with control frames and an HTTP status, whatever
    the request: another method than an endpoint's, or a name under ``/api/`` that is
    no request, is a JSON ``bad_request`` (400), not twisted.web's HTML 501 or 404."""
    _, port = site
    cases = [
        b"PUT /api/login HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"DELETE /api/session HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"PATCH /files HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /api/nothing HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET /api/ HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET /api HTTP/1.0\r\nHost: x\r\n\r\n",
        b"POST /api/nothing HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}",
    ]
    for request in cases:
        proto = yield http(port, request)  # (HTTP/1.0: the answer ends with the connection)
        yield proto.lost
        head = proto.data.partition(b"\r\n\r\n")[0].lower()
        assert proto.status == 400, (request, proto.data[:200])
        assert b"content-type: application/json" in head, (request, head)
        assert proto.body["type"] == "error" and proto.body["code"] == "bad_request"
