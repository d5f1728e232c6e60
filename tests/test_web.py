"""The web listener: session API, security headers, and the WebSocket gateway.

Protocol logic (login by session cookie, frame relaying) is tested without sockets
(StringTransport, task.Clock); the HTTP side and the gateway on a real ``twisted.web``
site bound to 127.0.0.1 port 0, driven by Twisted's HTTP client and autobahn's
WebSocket client.  The browser end-to-end test is tests/test_web_e2e.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from chatproto import config as configmod
from chatproto import tap, wire
from chatproto.testing import frame, frames, make_test_realm
from chatproto.web import SESSION_COOKIE, WebSite
from chatproto.web.gateway import FrameTransport, WebSessionFactory, cookie_value
from chatproto.web.site import CSP, origin_allowed
from tests.conftest import until

PASSWORD = "correct horse battery"


# protocol logic without sockets -------------------------------------------------------


def _session(realm: Any, token: str | None) -> tuple[Any, Any]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    factory = WebSessionFactory(realm)
    proto: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    proto.token = token
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    return proto, transport


def test_login_by_session_token_is_a_native_session() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("alice", PASSWORD)
    token, addr = [], []
    realm.issue_token("alice", PASSWORD, "web-1", "127.0.0.1").addCallback(
        lambda r: (token.append(r[0]), addr.append(r[1]))
    )
    assert str(addr[0]) == "alice@localhost"
    proto, transport = _session(realm, token[0])
    data = frame({"type": "hello", "version": 1, "id": 1}) + frame({"type": "login", "id": 2})
    for i in range(len(data)):  # one byte at a time: the same framing rules
        proto.dataReceived(data[i : i + 1])
    clock.advance(0)
    out = frames(transport)
    assert out[1] == {"type": "result", "id": 2, "user": "alice@localhost", "device": "web-1"}
    assert out[2] == {"type": "synced", "pos": 0}
    # a send goes through the realm's rules like any other session
    proto.dataReceived(frame({"type": "send", "id": 3, "to": "nobody", "body": "x"}))
    assert frames(transport)[-1]["code"] == "no_such_user"
    proto.dataReceived(frame({"type": "send", "id": 4, "to": "alice", "body": "note"}))
    kinds = [f["type"] for f in frames(transport)]
    assert kinds == ["msg", "result"]
    proto.connectionLost(None)
    assert not realm.sessions_of("alice@localhost")


def test_login_without_valid_token_fails_and_password_login_still_works() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("bob", PASSWORD)
    proto, transport = _session(realm, "not-a-token")
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    proto.dataReceived(frame({"type": "login", "id": 2, "since": 0}))
    err = frames(transport)[-1]
    assert (err["type"], err["code"], err["id"]) == ("error", "auth_failed", 2)
    assert proto.state == "auth"  # may try again
    proto.dataReceived(frame({"type": "login", "id": 3, "user": "bob", "password": PASSWORD}))
    clock.advance(0)
    assert frames(transport)[0] == {
        "type": "result",
        "id": 3,
        "user": "bob@localhost",
        "device": "default",
    }
    proto.connectionLost(None)


def test_tokens_expire_after_ttl_and_die_with_the_account() -> None:
    clock = Clock()
    cfg = configmod.Config()
    cfg.web.session_ttl = 100.0
    realm = make_test_realm(clock, cfg)
    realm.create_user("carol", PASSWORD)
    tokens: list[str] = []
    for _ in range(2):
        realm.issue_token("carol", PASSWORD).addCallback(lambda r: tokens.append(r[0]))
    clock.advance(60)
    assert realm.token_user(tokens[0]) is not None  # used: lives another 100 s
    clock.advance(60)
    assert realm.token_user(tokens[1]) is None  # idle for 120 s
    assert realm.token_user(tokens[0]) is not None
    realm.delete_user("carol")
    assert realm.token_user(tokens[0]) is None
    failures: list[Any] = []
    realm.issue_token("carol", "wrong password!").addErrback(failures.append)
    assert failures[0].value.code == "auth_failed"


def test_frame_transport_sends_one_message_per_frame() -> None:
    class FakeWS:
        transport = None
        STATE_OPEN = state = 1

        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
            assert isBinary == (payload[:1] == b"\x00")  # text but for data frames
            self.sent.append(payload)

    ws: Any = FakeWS()
    t = FrameTransport(ws)
    a, b = wire.encode({"type": "ping"}), wire.encode({"type": "msg", "body": "é" * 300})
    c = wire.encode_data(wire.OP_DOWNLOAD, 1, 0, bytes(range(256)))
    data = frame({"type": "ping"}) + frame({"type": "msg", "body": "é" * 300})
    data += len(c).to_bytes(4, "big") + c
    t.write(data)
    assert ws.sent == [a, b, c]
    ws.sent.clear()
    for i in range(len(data)):
        t.write(data[i : i + 1])
    assert ws.sent == [a, b, c]


def test_a_data_frame_in_a_websocket_text_message_is_bad_frame() -> None:
    """StringTransport: a text message is a JSON object; one that is a data frame
    (kind 0x00) is bad_frame and closes, as a binary message does: it was taken as
    upload data."""
    import hashlib

    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("alice", PASSWORD)
    realm.create_user("bob", PASSWORD)
    ws, transport = _open_gateway(realm, None, clock)
    ws.dataReceived(_ws_frame(b'{"type":"hello","version":1,"id":1}'))
    login = {"type": "login", "id": 2, "user": "alice", "password": PASSWORD}
    ws.dataReceived(_ws_frame(json.dumps(login).encode()))
    clock.advance(0)
    sha = hashlib.sha256(b"hello").hexdigest()
    offer = {"type": "file_offer", "id": 3, "to": "bob", "name": "a", "size": 5, "sha256": sha}
    ws.dataReceived(_ws_frame(json.dumps(offer).encode()))
    clock.advance(0)
    assert [f.get("id") for f in _ws_messages(transport.value())][-1] == 3
    transport.clear()
    ws.dataReceived(_ws_frame(wire.encode_data(wire.OP_UPLOAD, 1, 0, b"hello")))
    data = transport.value()
    close = data.rindex(b"\x88")
    (error,) = _ws_messages(data[:close])
    assert error["code"] == "bad_frame" and "id" not in error
    assert data[close:] == b"\x88\x02\x03\xe8"


def test_origin_rules_and_cookie_parsing() -> None:
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", False, [])
    assert origin_allowed(b"https://chat.example.org", b"chat.example.org", True, [])
    assert not origin_allowed("http://chat.example.org", "chat.example.org", True, [])
    assert not origin_allowed("http://evil.example", "127.0.0.1:8080", False, [])
    assert not origin_allowed(None, "127.0.0.1:8080", False, [])
    assert not origin_allowed("null", "127.0.0.1:8080", False, [])
    allowed = ["https://chat.example.org"]
    assert origin_allowed("https://chat.example.org", "internal:8080", False, allowed)
    assert not origin_allowed("http://internal:8080", "internal:8080", False, allowed)
    assert cookie_value(f"a=b; {SESSION_COOKIE}=tok123; c=d") == "tok123"
    assert cookie_value(b"other=1") is None
    assert cookie_value(None) is None


def test_web_config_section_and_tap_option(tmp_path: Any) -> None:
    cfg = configmod.from_dict(
        {"web": {"listen": "tcp:0:interface=127.0.0.1", "origins": ["https://a.example"]}}
    )
    assert cfg.web.listen == ["tcp:0:interface=127.0.0.1"]
    assert cfg.web_descriptions() == ["tcp:0:interface=127.0.0.1"]
    with pytest.raises(configmod.ConfigError, match="list of strings"):
        configmod.from_dict({"web": {"origins": [1]}})
    bad = configmod.Config()
    bad.web.origins = ["a.example"]
    with pytest.raises(configmod.ConfigError, match=r"web\.origins"):
        bad.check()
    bad = configmod.Config()
    bad.web.tls_port = 8443
    with pytest.raises(configmod.ConfigError, match=r"tls\.certificate"):
        bad.check()
    opts = tap.Options()
    opts.parseOptions(
        ["--data-dir", str(tmp_path), "--web", "tcp:0:interface=127.0.0.1", "--web", "tcp:0"]
    )
    assert opts.realm_config.web.listen == ["tcp:0:interface=127.0.0.1", "tcp:0"]
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="bad endpoint"):
        tap.Options().parseOptions(["--data-dir", str(tmp_path), "--web", "nonsense:1"])


# the real site on 127.0.0.1 -------------------------------------------------------------


class Web:
    """A WebSite on 127.0.0.1:0 with an HTTP agent and WebSocket clients."""

    def __init__(self, realm: Any, site: WebSite, port: Any) -> None:
        self.realm = realm
        self.site = site
        self.port = port
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.origin = self.base
        self.agent = Agent(_reactor)
        self.sockets: list[Any] = []

    @defer.inlineCallbacks
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        cookie: str | None = None,
        origin: str | None = "same",
        ctype: str = "application/json",
    ) -> Any:
        headers = Headers()
        if origin is not None:
            headers.addRawHeader("origin", self.origin if origin == "same" else origin)
        if cookie:
            headers.addRawHeader("cookie", f"{SESSION_COOKIE}={cookie}")
        producer = None
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            producer = FileBodyProducer(io.BytesIO(raw))
            headers.addRawHeader("content-type", ctype)
        response = yield self.agent.request(
            method.encode(), (self.base + path).encode(), headers, producer
        )
        data = yield readBody(response)
        return response, data

    @defer.inlineCallbacks
    def login(self, user: str) -> Any:
        yield self.realm.create_user(user, PASSWORD)
        response, _ = yield self.request(
            "POST", "/api/login", {"user": user, "password": PASSWORD, "device": "web-" + user}
        )
        assert response.code == 200
        return _cookie(response)

    @defer.inlineCallbacks
    def websocket(self, cookie: str | None = None, origin: str | None = "same") -> Any:
        url = self.base.replace("http:", "ws:") + "/ws"
        headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"} if cookie else {}
        factory = WebSocketClientFactory(
            url, origin=self.origin if origin == "same" else origin, headers=headers
        )
        factory.protocol = WSClient
        factory.opened = defer.Deferred()
        endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", self.port.getHost().port)
        proto = yield endpoint.connect(factory)
        self.sockets.append(proto)
        yield factory.opened
        return proto


def _cookie(response: Any) -> str:
    header = response.headers.getRawHeaders("set-cookie")[0]
    return header.split(";")[0].split("=", 1)[1]


class WSClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.inbox: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.closed: defer.Deferred[Any] = defer.Deferred()
        self.next_id = 1

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.inbox.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback(code)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(obj).encode())

    @defer.inlineCallbacks
    def call(self, type_: str, **fields: Any) -> Any:
        rid = self.next_id
        self.next_id += 1
        self.send_json({"type": type_, "id": rid, **fields})
        reply = yield self.until(lambda f: f.get("id") == rid)
        return reply

    @defer.inlineCallbacks
    def until(self, pred: Any) -> Any:
        for _ in range(200):
            f = yield self.inbox.get()
            if pred(f):
                return f
        raise AssertionError("no matching frame")


@pytest.fixture
def web(realm: Any) -> Any:
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    w = Web(realm, site, port)
    yield w
    for s in w.sockets:
        if s.transport is not None:
            s.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.inlineCallbacks
def test_page_assets_and_security_headers(web: Web) -> Any:
    response, body = yield web.request("GET", "/")
    assert response.code == 200
    h = response.headers
    assert h.getRawHeaders("content-security-policy") == [CSP]
    assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
    assert "frame-ancestors 'none'" in CSP
    assert h.getRawHeaders("x-content-type-options") == ["nosniff"]
    assert h.getRawHeaders("content-type")[0].startswith("text/html")
    assert b'<script type="module" src="/static/app.js">' in body
    response, body = yield web.request("GET", "/static/app.js")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/javascript")
    assert b"innerHTML" not in body  # user data goes in as text only
    response, _ = yield web.request("GET", "/static/")
    assert response.code == 404  # no directory listing
    response, _ = yield web.request("GET", "/nothing-here")
    assert response.code == 404
    assert response.headers.getRawHeaders("content-security-policy") == [CSP]


@pytest_twisted.inlineCallbacks
def test_login_sets_an_httponly_samesite_cookie(web: Web) -> Any:
    yield web.realm.create_user("alice", PASSWORD)
    response, body = yield web.request(
        "POST", "/api/login", {"user": "alice", "password": "wrong password"}
    )
    assert response.code == 401
    assert json.loads(body)["code"] == "auth_failed"
    assert response.headers.getRawHeaders("set-cookie") is None
    response, body = yield web.request(
        "POST", "/api/login", {"user": "Alice", "password": PASSWORD, "device": "web-x"}
    )
    assert response.code == 200
    assert json.loads(body) == {"type": "result", "user": "alice@localhost", "device": "web-x"}
    cookie = response.headers.getRawHeaders("set-cookie")[0]
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert attrs[0].startswith(SESSION_COOKIE + "=") and len(attrs[0]) > 40
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # plain http: the browser would drop a Secure cookie
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    token = _cookie(response)
    response, body = yield web.request("GET", "/api/session", cookie=token)
    assert response.code == 200 and json.loads(body)["user"] == "alice@localhost"
    response, body = yield web.request("GET", "/api/session")
    assert response.code == 401
    # log out: the token dies
    response, _ = yield web.request("POST", "/api/logout", {}, cookie=token)
    assert response.code == 200
    assert "max-age=0" in response.headers.getRawHeaders("set-cookie")[0].lower()
    response, _ = yield web.request("GET", "/api/session", cookie=token)
    assert response.code == 401


@pytest_twisted.inlineCallbacks
def test_api_refuses_foreign_origins_and_form_posts(web: Web) -> Any:
    yield web.realm.create_user("alice", PASSWORD)
    creds = {"user": "alice", "password": PASSWORD}
    response, body = yield web.request("POST", "/api/login", creds, origin="http://evil.example")
    assert response.code == 403 and json.loads(body)["code"] == "forbidden"
    form = b"user=alice&password=correct+horse+battery"
    response, _ = yield web.request(
        "POST", "/api/login", form, ctype="application/x-www-form-urlencoded"
    )
    assert response.code == 415
    response, body = yield web.request("POST", "/api/login", b"{not json")
    assert response.code == 400 and json.loads(body)["code"] == "bad_request"
    response, body = yield web.request("POST", "/api/register", {"user": "dave", "password": "x"})
    assert response.code == 400
    response, body = yield web.request("POST", "/api/register", creds)
    assert response.code == 409 and json.loads(body)["code"] == "user_exists"


@pytest_twisted.inlineCallbacks
def test_websocket_refuses_foreign_origin(web: Web) -> Any:
    cookie = yield web.login("alice")
    with pytest.raises(ConnectionError):
        yield web.websocket(cookie, origin="http://evil.example")
    with pytest.raises(ConnectionError):
        yield web.websocket(cookie, origin=None)
    ws = yield web.websocket(cookie)  # same origin: accepted
    hello = yield ws.call("hello", version=1)
    assert hello["realm"] == "localhost"


@pytest_twisted.inlineCallbacks
def test_dm_and_group_over_websockets_and_markup_stays_text(web: Web) -> Any:
    ca = yield web.login("alice")
    cb = yield web.login("bob")
    alice = yield web.websocket(ca)
    bob = yield web.websocket(cb)
    for ws, name in ((alice, "alice"), (bob, "bob")):
        yield ws.call("hello", version=1)
        res = yield ws.call("login")
        assert res["user"] == f"{name}@localhost" and res["device"] == f"web-{name}"
        yield ws.until(lambda f: f["type"] == "synced")
    xss = '<img src=x onerror=alert(1)> & "quotes"'
    res = yield alice.call("send", to="bob", body=xss, nonce="n1")
    got = yield bob.until(lambda f: f["type"] == "msg")
    assert got["body"] == xss and got["from"] == "alice@localhost" and got["pos"] == res["pos"]
    # the same nonce again (a retry after a reconnect): no second message
    again = yield alice.call("send", to="bob", body=xss, nonce="n1")
    assert again["msg_id"] == res["msg_id"]
    yield alice.call("create_group", group="#dev")
    yield bob.call("join", group="#dev")
    yield alice.call("send", to="#dev", body="hello group")
    got = yield bob.until(lambda f: f["type"] == "msg" and f["kind"] == "text")
    assert (got["to"], got["body"]) == ("#dev@localhost", "hello group")
    page = yield bob.call("history", **{"with": "#dev", "limit": 10})
    assert [m["body"] for m in page["messages"] if m["kind"] == "text"] == ["hello group"]
    bob.send_json({"type": "ack", "pos": got["pos"]})
    # bob reconnects with since: nothing lost, nothing repeated
    yield alice.call("send", to="bob", body="while you were away")
    yield bob.until(lambda f: f["type"] == "msg" and f["body"] == "while you were away")
    bob.sendClose()
    yield bob.closed
    yield alice.call("send", to="bob", body="after the drop")
    bob2 = yield web.websocket(cb)
    yield bob2.call("hello", version=1)
    yield bob2.call("login", since=got["pos"])
    frames_seen = []
    while True:
        f = yield bob2.inbox.get()
        if f["type"] == "synced":
            break
        frames_seen.append(f)
    assert [f["body"] for f in frames_seen if f["type"] == "msg"] == [
        "while you were away",
        "after the drop",
    ]


@pytest_twisted.inlineCallbacks
def test_a_browser_that_stops_reading_is_dropped_and_memory_stays_bounded(web: Web) -> Any:
    """Issue 14 on the WebSocket gateway: a browser that stops reading gets at most
    max_output_buffer held for it, then slow_reader and a close (code 1000)."""
    realm = web.realm
    limit = realm.config.limits.max_output_buffer
    yield realm.create_user("alice", PASSWORD)
    cookie = yield web.login("bob")
    bob = yield web.websocket(cookie)
    yield bob.call("hello", version=1)
    yield bob.call("login")
    yield bob.until(lambda f: f["type"] == "synced")
    (server,) = [p for p in web.site.ws.sessions.connections if p.session is not None]
    tcp = server.transport._ws.transport  # under the WebSocket
    kernel = 0
    for sock, opt in (
        (bob.transport.getHandle(), socket.SO_RCVBUF),
        (tcp.getHandle(), socket.SO_SNDBUF),
    ):
        sock.setsockopt(socket.SOL_SOCKET, opt, 64 * 1024)
        kernel += sock.getsockopt(socket.SOL_SOCKET, opt)
    bob.transport.pauseProducing()  # the browser's tab stops reading
    body = "x" * 16000
    posted = peak = 0
    while server.state != "closed" and posted < (limit + 8 * 2**20) // len(body):
        for _ in range(8):
            realm.post("alice", "bob", body)
            posted += 1
        yield task.deferLater(_reactor, 0.005, lambda: None)
        peak = max(peak, server._out.held + len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen)
    assert server.state == "closed", f"not dropped after {posted * len(body)} bytes"
    assert peak <= limit + 64 * 1024 + 4 * 16200
    bob.transport.resumeProducing()
    code = yield bob.closed
    got = list(bob.inbox.pending)
    assert code == 1000 and got[-1]["type"] == "error" and got[-1]["code"] == "slow_reader"
    msgs = [f for f in got if f["type"] == "msg"]
    assert len(msgs) * len(body) <= kernel + 64 * 1024 + 4 * 16200


@pytest_twisted.inlineCallbacks
def test_websocket_limits_and_bad_frames(web: Web) -> Any:
    cookie = yield web.login("alice")
    ws = yield web.websocket(cookie)
    ws.send_json({"type": "login"})
    err = yield ws.inbox.get()
    assert err["code"] == "hello_required"
    yield ws.call("hello", version=1)
    # before login, a message over 16384 bytes (chatproto.admission.LOGIN_MAX_FRAME)
    ws.send_json({"type": "ping", "pad": "x" * 20_000})
    err = yield ws.inbox.get()
    assert err["code"] == "too_large" and "before login" in err["message"]
    yield ws.closed
    # logged in, up to max_frame; over it, too_large
    ws = yield web.websocket(cookie)
    yield ws.call("hello", version=1)
    yield ws.call("login")
    yield ws.until(lambda f: f["type"] == "synced")
    yield ws.call("ping", pad="x" * 30_000)
    big = "x" * (web.realm.config.limits.max_frame + 10)
    ws.send_json({"type": "ping", "pad": big})
    err = yield ws.until(lambda f: f["type"] == "error")
    assert err["code"] == "too_large"
    yield ws.closed
    ws = yield web.websocket(cookie)
    ws.sendMessage(b"\x00\x01", isBinary=True)
    err = yield ws.inbox.get()
    assert err["code"] == "bad_frame"
    yield ws.closed
    # logout closes the open session of that cookie
    ws = yield web.websocket(cookie)
    yield ws.call("hello", version=1)
    yield ws.call("login")
    yield ws.until(lambda f: f["type"] == "synced")
    # (a session of the same browser that logged in with a password stays open)
    by_password = yield web.websocket(cookie)
    yield by_password.call("hello", version=1)
    yield by_password.call("login", user="alice", password=PASSWORD)
    yield by_password.until(lambda f: f["type"] == "synced")
    yield web.request("POST", "/api/logout", {}, cookie=cookie)
    err = yield ws.until(lambda f: f["type"] == "error")
    assert err["code"] == "auth_failed"
    yield ws.closed
    pong = yield by_password.call("ping")
    assert pong["type"] == "result"
    by_password.sendClose()
    yield by_password.closed


@pytest_twisted.inlineCallbacks
def test_non_standard_json_over_websocket_and_the_api_is_refused(web: Web) -> Any:
    """Issue 14, item 3: NaN, Infinity and a name given twice are not JSON the realm
    reads: bad_frame and a close on the WebSocket, 400 on the HTTP API."""
    cookie = yield web.login("alice")
    yield web.realm.create_user("bob", PASSWORD)
    for text in (
        b'{"type":"send","id":3,"to":"bob","body":"x","n":NaN}',
        b'{"type":"send","id":3,"to":"bob","body":"x","n":-Infinity}',
        b'{"type":"send","id":3,"to":"carol","to":"bob","body":"x"}',
    ):
        ws = yield web.websocket(cookie)
        yield ws.call("hello", version=1)
        yield ws.call("login")
        yield ws.until(lambda f: f["type"] == "synced")
        ws.sendMessage(text)
        err = yield ws.until(lambda f: f["type"] in ("error", "result"))
        assert err["type"] == "error" and err["code"] == "bad_frame" and "id" not in err
        code = yield ws.closed
        assert code == 1000
    assert (yield web.realm.store.max_pos()) == 0
    for body in (
        b'{"user":"bob","password":NaN}',
        b'{"user":"bob","user":"alice","password":"' + PASSWORD.encode() + b'"}',
        b'{"user":"bob","password":"\\ud800"}',  # a lone surrogate
    ):
        response, data = yield web.request("POST", "/api/login", body)
        assert response.code == 400, (body, data)
        assert json.loads(data)["code"] == "bad_request"


# HTTPS, wired by tap from the config ------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_tap_serves_the_web_client_over_https_with_secure_cookie(tmp_path: Any) -> Any:
    from twisted.internet.endpoints import wrapClientTLS
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from chatproto import tls

    certs = tls.write_dev_certs(str(tmp_path / "tls"), "localhost")
    cfg = configmod.Config(data_dir=str(tmp_path / "data"))
    cfg.auth.argon2_time_cost, cfg.auth.argon2_memory_cost = 1, 1024
    cfg.auth.argon2_parallelism = 1
    cfg.listen = []
    cfg.web.listen = [tls.server_description(certs["cert"], certs["key"], 0)]
    cfg.check()
    top, realm = tap.build(cfg, _reactor)
    top.privilegedStartService()
    top.startService()
    try:
        yield realm.create_user("alice", PASSWORD)
        listener = next(s for s in top if isinstance(getattr(s, "factory", None), WebSite))
        port = listener.port.getHost().port
        with open(certs["ca"], "rb") as f:
            ca = Certificate.loadPEM(f.read())
        agent = Agent(_reactor, BrowserLikePolicyForHTTPS(trustRoot=ca))
        base = f"https://localhost:{port}"
        headers = Headers({"content-type": ["application/json"], "origin": [base]})
        body = json.dumps({"user": "alice", "password": PASSWORD}).encode()
        response = yield agent.request(
            b"POST", f"{base}/api/login".encode(), headers, FileBodyProducer(io.BytesIO(body))
        )
        yield readBody(response)
        assert response.code == 200
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        assert "secure" in [a.strip().lower() for a in cookie.split(";")]
        token = _cookie(response)
        # the WebSocket over TLS (wss), through the same listener
        factory = WebSocketClientFactory(
            f"wss://localhost:{port}/ws",
            origin=base,
            headers={"Cookie": f"{SESSION_COOKIE}={token}"},
        )
        factory.protocol = WSClient
        factory.opened = defer.Deferred()
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=ca),
            TCP4ClientEndpoint(_reactor, "127.0.0.1", port),
        )
        ws = yield endpoint.connect(factory)
        yield factory.opened
        yield ws.call("hello", version=1)
        res = yield ws.call("login")
        assert res["user"] == "alice@localhost"
        yield ws.until(lambda f: f["type"] == "synced")
        sent = yield ws.call("send", to="alice", body="over wss")
        assert sent["type"] == "result"
        ws.sendClose()
        yield ws.closed
    finally:
        yield top.stopService()


def test_web_tls_port_uses_the_tls_certificate(tmp_path: Any) -> None:
    from chatproto import tls

    certs = tls.write_dev_certs(str(tmp_path / "tls"), "localhost")
    cfg = configmod.Config()
    cfg.tls.certificate, cfg.tls.private_key = certs["cert"], certs["key"]
    cfg.web.tls_port = 8443
    cfg.check()
    assert cfg.web_descriptions() == [
        tls.server_description(certs["cert"], certs["key"], 8443, "127.0.0.1")
    ]
    cfg.web.tls_port = cfg.tls.port
    with pytest.raises(configmod.ConfigError, match="differ"):
        cfg.check()


# files over HTTP --------------------------------------------------------------------------


@defer.inlineCallbacks
def _upload(web: Web, cookie: str, to: str, data: bytes, name: str = "a b.bin", **kw: Any) -> Any:
    import hashlib
    from urllib.parse import urlencode

    query = {"to": to, "name": name, "sha256": kw.pop("sha256", hashlib.sha256(data).hexdigest())}
    response, body = yield web.request(
        "POST",
        "/files?" + urlencode(query),
        data,
        cookie=cookie,
        ctype=kw.pop("ctype", "application/octet-stream"),
        **kw,
    )
    return response, json.loads(body)


@pytest_twisted.inlineCallbacks
def test_upload_and_ranged_download_over_http(web: Web) -> Any:
    ca = yield web.login("alice")
    cb = yield web.login("bob")
    yield web.login("eve")
    ce = yield web.realm.issue_token("eve", PASSWORD)
    data = bytes(range(256)) * 4000 + b"tail"  # 1 MB: several blocks, a temp-file body
    response, res = yield _upload(
        web, ca, "bob", data, name="report é.pdf", ctype="application/pdf"
    )
    assert response.code == 200, res
    info = res["file"]
    assert (info["size"], info["name"], info["to"]) == (len(data), "report é.pdf", "bob@localhost")
    file_url = f"/files/{info['file']}"
    # bob: the whole file, as an attachment that cannot run in the page's origin
    response, body = yield web.request("GET", file_url, cookie=cb)
    assert response.code == 200 and body == data
    h = response.headers
    assert h.getRawHeaders("content-type") == ["application/pdf"]
    assert response.length == len(data)  # Content-Length (a connection header for Agent)
    assert h.getRawHeaders("accept-ranges") == ["bytes"]
    disposition = h.getRawHeaders("content-disposition")[0]
    assert (
        disposition.startswith("attachment;")
        and "filename*=UTF-8''report%20%C3%A9.pdf" in disposition
    )
    assert h.getRawHeaders("content-security-policy") == ["sandbox; default-src 'none'"]
    assert h.getRawHeaders("x-content-type-options") == ["nosniff"]
    # ranges: a middle, an open end, a suffix; outside the file: 416
    for header, want in (
        ("bytes=10-19", data[10:20]),
        (f"bytes={len(data) - 4}-", b"tail"),
        ("bytes=-6", data[-6:]),
    ):
        web.agent = Agent(_reactor)
        response, body = yield _get_range(web, file_url, cb, header)
        assert response.code == 206 and body == want, header
        first = len(data) - len(want) if header != "bytes=10-19" else 10
        assert response.headers.getRawHeaders("content-range") == [
            f"bytes {first}-{first + len(want) - 1}/{len(data)}"
        ]
    response, _ = yield _get_range(web, file_url, cb, f"bytes={len(data)}-")
    assert response.code == 416
    assert response.headers.getRawHeaders("content-range") == [f"bytes */{len(data)}"]
    # the same permission checks as the native protocol: eve may not read it
    response, body = yield web.request("GET", file_url, cookie=ce[0])
    assert response.code == 404 and json.loads(body)["code"] == "no_such_file"
    response, _ = yield web.request("GET", file_url)
    assert response.code == 401
    # the file message reached bob's WebSocket session like any other item
    ws = yield web.websocket(cb)
    yield ws.call("hello", version=1)
    yield ws.call("login", since=0)
    msg = yield ws.until(lambda f: f["type"] == "msg")
    assert msg["kind"] == "file" and msg["meta"]["file_id"] == info["file"]


@pytest_twisted.inlineCallbacks
def test_an_empty_upload_over_http(web: Web) -> Any:
    """An upload with no body (``Content-Length: 0``) is not offered before its body
    (there is none): it takes the request's own path, and is stored and read back
    as any other file, 0 bytes."""
    ca = yield web.login("alice")
    cb = yield web.login("bob")
    response, res = yield _upload(web, ca, "bob", b"", name="empty.txt")
    assert response.code == 200, res
    assert (res["file"]["size"], res["file"]["name"]) == (0, "empty.txt")
    response, body = yield web.request("GET", f"/files/{res['file']['file']}", cookie=cb)
    assert response.code == 200 and body == b""


@defer.inlineCallbacks
def _get_range(web: Web, path: str, cookie: str, rng: str) -> Any:
    headers = Headers({"cookie": [f"{SESSION_COOKIE}={cookie}"], "range": [rng]})
    response = yield web.agent.request(b"GET", (web.base + path).encode(), headers)
    body = yield readBody(response)
    return response, body


@pytest_twisted.inlineCallbacks
def test_a_range_of_thousands_of_digits_is_answered_cleanly(web: Web, log_watch: Any) -> Any:
    """Issue 14: a Range header with a 5000-digit number reached int() (which refuses
    more than 4300 digits): a traceback and a 500.  Now it is a number larger than
    the file: 416, or the whole file."""
    ca = yield web.login("alice")
    response, res = yield _upload(web, ca, "alice", b"0123456789")
    file_url = f"/files/{res['file']['file']}"
    huge = "9" * 5000
    for rng, code, body in (
        (f"bytes={huge}-", 416, None),
        (f"bytes=0-{huge}", 206, b"0123456789"),
        (f"bytes=-{huge}", 206, b"0123456789"),
    ):
        response, got = yield _get_range(web, file_url, ca, rng)
        assert response.code == code, (rng[:20], response.code)
        if body is not None:
            assert got == body
    assert not log_watch.failures, log_watch.failures[0]


@pytest_twisted.inlineCallbacks
def test_uploads_are_checked_like_native_ones(web: Web) -> Any:
    ca = yield web.login("alice")
    yield web.login("bob")
    files = web.realm.files
    files.config.max_file_size = 1000
    # too large by Content-Length: refused before the body is read, nothing offered
    response, res = yield _upload(web, ca, "bob", b"x" * 1001)
    assert response.code == 413 and res["code"] == "too_large"
    assert not files.uploads
    # wrong digest: nothing stored
    response, res = yield _upload(web, ca, "bob", b"hello", sha256="0" * 64)
    assert response.code == 422 and res["code"] == "checksum_mismatch"
    assert response.phrase == b"Unprocessable Content"  # (not twisted.web's Unknown Status)
    assert not files.uploads
    # not logged in, foreign origin, unknown recipient, a group one is not in
    response, res = yield _upload(web, "bogus", "bob", b"hello")
    assert response.code == 401
    response, res = yield _upload(web, ca, "bob", b"hello", origin="http://evil.example")
    assert response.code == 403
    response, res = yield _upload(web, ca, "nobody", b"hello")
    assert response.code == 404 and res["code"] == "no_such_user"
    yield web.realm.group_event_as("bob", "created", "#ops")
    response, res = yield _upload(web, ca, "#ops", b"hello")
    assert response.code == 403 and res["code"] == "not_member"
    response, res = yield _upload(web, ca, "bob", b"hello", name="../etc/passwd")
    assert response.code == 400 and res["code"] == "bad_request"
    # a parameter that is not UTF-8, or given twice: refused, not repaired or guessed
    for query in ("to=bob&name=a%FF&sha256=", "to=bob&to=carol&name=a&sha256="):
        response, body = yield web.request(
            "POST", "/files?" + query + "0" * 64, b"hello", cookie=ca, ctype="text/plain"
        )
        assert response.code == 400 and json.loads(body)["code"] == "bad_request", query
    # quota: stored files count
    files.config.quota_per_user = 8
    response, res = yield _upload(web, ca, "bob", b"123456")
    assert response.code == 200
    response, res = yield _upload(web, ca, "bob", b"abcdef")
    assert response.code == 413 and res["code"] == "quota_exceeded"
    assert not files.uploads


def test_parse_range() -> None:
    from chatproto.web.site import RangeNotSatisfiable, parse_range

    assert parse_range(None, 100) is None
    assert parse_range(b"bytes=0-0", 100) == (0, 1)
    assert parse_range(b"bytes=90-200", 100) == (90, 10)
    assert parse_range(b"bytes=-200", 100) == (0, 100)
    assert parse_range(b"bytes=1-2,5-6", 100) is None  # several ranges: the whole file
    assert parse_range(b"items=1-2", 100) is None
    for bad in (b"bytes=100-", b"bytes=5-4", b"bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 100)


# decoders of untrusted input: a value or a clean refusal, never a crash ---------------


@given(
    st.binary(max_size=40) | st.from_regex(rb"\Abytes=[0-9]{0,5000}-[0-9]{0,5000}\Z"),
    st.integers(min_value=0, max_value=10**6),
)
def test_parse_range_never_crashes(header: bytes, size: int) -> None:
    from chatproto.web.site import RangeNotSatisfiable, parse_range

    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if got is not None:
        offset, length = got
        assert 0 <= offset and 1 <= length and offset + length <= size


@given(st.one_of(st.none(), st.binary(max_size=80), st.text(max_size=80)))
def test_cookie_value_never_crashes(header: Any) -> None:
    value = cookie_value(header)
    assert value is None or (isinstance(value, str) and value)


@given(st.binary(max_size=200))
def test_websocket_text_of_any_bytes_is_answered_cleanly(payload: bytes) -> None:
    """What a browser may send as one text message goes through the native decoder:
    an answer or a clean close, never an unhandled exception."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    realm = make_test_realm(Clock())
    proto: Any = WebSessionFactory(realm).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.stringReceived(payload)
    out = frames(transport)
    assert out and all(f["type"] in ("result", "error") for f in out)


def test_autobahn_keeps_its_own_quiet_logger() -> None:
    """autobahn logs every frame at debug level through ``self.log``; that must stay
    txaio's logger (a no-op below its level), not a twisted Logger that formats and
    writes each call to the realm's log."""
    from chatproto.web.gateway import ChatWebSocket

    proto = ChatWebSocket()
    assert type(proto.log).__module__.startswith("txaio")
    assert proto.log.debug.__name__ == "_no_op"


# the gateway on a StringTransport: handshake, frames, flow control -----------------------


def _ws_frame(text: bytes) -> bytes:
    """A client text frame, masked with a zero key (so the payload reads as is)."""
    n = len(text)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + text


def _ws_messages(data: bytes) -> list[dict[str, Any]]:
    """The server's (unmasked) text frames in ``data``, after the handshake."""
    out = []
    while data:
        n, off = data[1] & 0x7F, 2
        if n == 126:
            n, off = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, off = int.from_bytes(data[2:10], "big"), 10
        assert data[0] == 0x81, data[:2]
        out.append(json.loads(data[off : off + n]))
        data = data[off + n :]
    return out


def test_gateway_over_string_transport_pauses_and_drops_a_slow_reader() -> None:
    from twisted.internet.testing import StringTransport

    from chatproto.web.gateway import ChatWebSocketFactory

    clock = Clock()
    realm = make_test_realm(clock)
    realm.config.limits.max_output_buffer = 20000
    realm.create_user("alice", PASSWORD)
    realm.create_user("bob", PASSWORD)
    token: list[str] = []
    realm.issue_token("bob", PASSWORD, "web-b").addCallback(lambda r: token.append(r[0]))
    factory = ChatWebSocketFactory(realm, lambda o, h, s: o == "http://chat.test", clock)
    ws: Any = factory.buildProtocol(None)
    transport = StringTransport()
    ws.makeConnection(transport)
    handshake = (
        "GET /ws HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: http://chat.test\r\nCookie: {SESSION_COOKIE}={token[0]}\r\n\r\n"
    ).encode()
    for i in range(len(handshake)):  # the handshake one byte at a time
        ws.dataReceived(handshake[i : i + 1])
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    session = ws.session
    assert transport.producer is session  # flow control is the connection's
    ws.dataReceived(_ws_frame(b'{"type":"hello","version":1,"id":1}'))
    ws.dataReceived(_ws_frame(b'{"type":"login","id":2}'))
    clock.advance(0)
    got = _ws_messages(transport.value())
    transport.clear()
    assert [f["type"] for f in got] == ["result", "result", "synced"]
    assert got[1]["user"] == "bob@localhost" and got[1]["device"] == "web-b"
    # bob's browser stops reading: the transport pauses the session; live messages are
    # held by the session (not written) until more than max_output_buffer bytes are,
    # then they are dropped, the error slow_reader written, and the WebSocket closed
    transport.producer.pauseProducing()
    for i in range(10):
        realm.post("alice", "bob", f"{i:04d}" + "x" * 4000)
        if session.state == "closed":
            break
        assert transport.value() == b""  # held, not written
    assert session.state == "closed" and 4 <= i <= 6
    data = transport.value()
    close = data.rindex(b"\x88")  # the server's close frame (code 1000) ends the output
    assert data[close:] == b"\x88\x02\x03\xe8"
    (error,) = _ws_messages(data[:close])
    assert error["type"] == "error" and error["code"] == "slow_reader"
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    ws.connectionLost(Failure(ConnectionLost()))
    assert not realm.sessions_of("bob@localhost")  # resumes from its ack next time


def test_pings_of_a_peer_that_does_not_read_get_one_pong() -> None:
    """StringTransport: autobahn answers every WebSocket ping with a pong, written to
    the connection past the session's output bound: a peer that sent pings and never
    read made the realm hold all the pongs (8 MB for 10 MB of pings, before login).
    While the connection is paused only the latest ping is kept, and answered once
    the peer reads again (RFC 6455 5.5.3 allows answering the latest only)."""
    clock = Clock()
    realm = make_test_realm(clock)
    ws, transport = _open_gateway(realm, None, clock)

    def ping(payload: bytes) -> bytes:  # masked with a zero key
        return bytes([0x89, 0x80 | len(payload)]) + b"\0\0\0\0" + payload

    ws.dataReceived(ping(b"a"))
    assert transport.value() == b"\x8a\x01a"  # a reading peer: answered at once
    transport.clear()
    transport.producer.pauseProducing()  # the peer stops reading
    data = b"".join(ping(b"%04d" % i) for i in range(1000))
    for i in range(0, len(data), 7):  # in pieces
        ws.dataReceived(data[i : i + 7])
    assert transport.value() == b""
    transport.producer.resumeProducing()
    assert transport.value() == b"\x8a\x040999"  # the latest only
    transport.clear()
    ws.dataReceived(ping(b"b"))
    assert transport.value() == b"\x8a\x01b"


def test_a_message_over_twice_the_limit_gets_close_1009_not_a_drop() -> None:
    """StringTransport: a text frame announcing more than twice the limit before
    login (32768 bytes) gets a close frame with code 1009 (PROTOCOL.md, "WebSocket
    transport"), not an aborted connection; the bytes that follow are discarded, and
    the connection goes once the close handshake times out."""
    clock = Clock()
    realm = make_test_realm(clock)
    ws, transport = _open_gateway(realm, None, clock)
    head = bytes([0x81, 0x80 | 126]) + (2 * 16384 + 1).to_bytes(2, "big") + b"\0\0\0\0"
    ws.dataReceived(head + b'{"type":"ping"')
    close = transport.value()
    assert close[0] == 0x88 and close[2:4] == (1009).to_bytes(2, "big"), close
    assert not transport.disconnecting
    transport.clear()
    ws.dataReceived(b"x" * 40000)  # the rest of it: read and dropped
    assert transport.value() == b""
    clock.advance(10)  # no close frame back: the close handshake times out
    assert transport.disconnecting


class _HalfClosing:
    """A StringTransport that records a half-close (``loseWriteConnection``), as TCP
    transports can."""

    def __new__(cls) -> Any:
        from twisted.internet.testing import StringTransport

        class T(StringTransport):
            write_closed = False

            def loseWriteConnection(self) -> None:
                self.write_closed = True

        return T(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))


def _alice_upload_channel(realm: Any, clock: Clock) -> tuple[Any, Any, str]:
    """A web channel on ``realm`` over a _HalfClosing transport, its delayed calls on
    ``clock``, and alice's web session token: ``(channel, transport, token)``."""
    token: list[str] = []
    realm.issue_token("alice", PASSWORD, "web").addCallback(lambda r: token.append(r[0]))
    site = WebSite(realm, clock=clock)
    channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    channel.callLater = clock.callLater
    transport = _HalfClosing()
    channel.makeConnection(transport)
    return channel, transport, token[0]


@pytest.mark.parametrize("expect", [False, True])
def test_an_upload_over_the_size_limit_is_answered_from_its_headers(expect: bool) -> None:
    """StringTransport: ``POST /files`` whose Content-Length is over max_file_size
    gets its 413 as soon as its headers are in (fed one byte at a time), with no
    ``100 Continue`` first; the write side is closed after it, what the client still
    sends is dropped, and the connection is aborted LINGER seconds later unless the
    client closes it first."""
    from chatproto.web.site import LINGER

    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("alice", PASSWORD)
    channel, transport, token = _alice_upload_channel(realm, clock)
    head = (
        "POST /files?to=alice&name=a&sha256=" + "0" * 64 + " HTTP/1.1\r\n"
        "Host: chat.test\r\nOrigin: http://chat.test\r\n"
        f"Cookie: {SESSION_COOKIE}={token}\r\n"
        + ("Expect: 100-continue\r\n" if expect else "")
        + f"Content-Length: {realm.config.files.max_file_size + 1}\r\n\r\n"
    ).encode()
    for i in range(len(head)):
        channel.dataReceived(head[i : i + 1])
    data = transport.value()
    assert data.startswith(b"HTTP/1.1 413 "), data
    assert b"100 Continue" not in data and b"connection: close" in data.lower()
    answer = json.loads(data.partition(b"\r\n\r\n")[2])
    assert answer["type"] == "error" and answer["code"] == "too_large"
    assert transport.write_closed and not transport.disconnecting
    transport.clear()
    channel.dataReceived(b"x" * 100000)  # the body, dropped
    assert transport.value() == b""

    def lingering() -> list[Any]:
        return [c for c in clock.getDelayedCalls() if "abortConnection" in repr(c)]

    assert lingering()
    if expect:  # the client closes first: nothing is left scheduled
        channel.connectionLost(None)
    else:
        clock.advance(LINGER)
        assert transport.disconnecting
    assert not lingering()


@pytest.mark.parametrize("to,status", [("nobody", b"404"), ("bob", b"100")])
def test_an_upload_is_offered_to_the_realm_before_its_body(to: str, status: bytes) -> None:
    """StringTransport: headers (one byte at a time) of an upload to an unknown
    user get 404 at once, the write side closed; to a user, the realm's upload is
    made, ``100 Continue`` written, and the upload goes with the connection when
    its body never came."""
    clock = Clock()
    realm = make_test_realm(clock)
    for name in ("alice", "bob"):
        realm.create_user(name, PASSWORD)
    channel, transport, token = _alice_upload_channel(realm, clock)
    head = (
        f"POST /files?to={to}&name=a&sha256=" + "0" * 64 + " HTTP/1.1\r\n"
        "Host: chat.test\r\nOrigin: http://chat.test\r\n"
        f"Cookie: {SESSION_COOKIE}={token}\r\nExpect: 100-continue\r\n"
        "Content-Length: 10\r\n\r\n"
    ).encode()
    for i in range(len(head)):
        channel.dataReceived(head[i : i + 1])
    clock.advance(0)
    data = transport.value()
    assert data.startswith(b"HTTP/1.1 " + status), data
    if to == "nobody":
        assert json.loads(data.partition(b"\r\n\r\n")[2])["code"] == "no_such_user"
        assert transport.write_closed and not realm.files.uploads
    else:
        assert data == b"HTTP/1.1 100 Continue\r\n\r\n" and len(realm.files.uploads) == 1
        channel.dataReceived(b"01234")  # half of it, then the connection goes
        channel.connectionLost(None)
        clock.advance(0)
        assert not realm.files.uploads


@pytest.mark.parametrize("outcome", ["lost", "failed"])
def test_an_upload_offer_that_ends_after_its_connection_or_fails_is_cleaned_up(
    outcome: str, log_watch: Any
) -> None:
    """StringTransport, an offer the realm answers later: made while the connection
    went (no body will come), the upload is cancelled at once; failing with
    something else than a ChatError, the request gets 500 internal_error at once."""
    clock = Clock()
    realm = make_test_realm(clock)
    for name in ("alice", "bob"):
        realm.create_user(name, PASSWORD)
    later: defer.Deferred[Any] = defer.Deferred()
    real_offer = realm.files.offer
    realm.files.offer = lambda *a: later.addCallback(lambda _: real_offer(*a))
    channel, transport, token = _alice_upload_channel(realm, clock)
    channel.dataReceived(
        (
            "POST /files?to=bob&name=a&sha256=" + "0" * 64 + " HTTP/1.1\r\n"
            "Host: chat.test\r\nOrigin: http://chat.test\r\n"
            f"Cookie: {SESSION_COOKIE}={token}\r\nContent-Length: 10\r\n\r\n"
        ).encode()
    )
    assert transport.producerState == "paused"  # not read while the realm checks
    if outcome == "lost":
        channel.connectionLost(None)
        later.callback(None)
        clock.advance(0)
        assert not realm.files.uploads
    else:
        later.errback(RuntimeError("disk on fire"))
        data = transport.value()
        assert data.startswith(b"HTTP/1.1 500 ")
        assert json.loads(data.partition(b"\r\n\r\n")[2])["code"] == "internal_error"
        assert any("disk on fire" in text for text in log_watch.failures)


@defer.inlineCallbacks
def _logged_in_websocket(web: Web, user: str) -> Any:
    cookie = yield web.login(user)
    ws = yield web.websocket(cookie)
    yield ws.call("hello", version=1)
    yield ws.call("login")
    yield ws.until(lambda f: f["type"] == "synced")
    return ws


@pytest_twisted.inlineCallbacks
def test_sends_before_a_binary_message_are_answered_before_it_over_websockets(web: Web) -> Any:
    """Two sends, a binary message and a send after it, written at once over a real
    WebSocket connection: both results (the messages stored), then bad_frame, then
    the close (tests/test_fatal_after_sends.py over StringTransport)."""
    bob = yield _logged_in_websocket(web, "bob")
    alice = yield _logged_in_websocket(web, "alice")
    for i, body in enumerate(("one", "two"), 101):
        alice.send_json({"type": "send", "to": "bob", "body": body, "id": i})
    alice.sendMessage(b"\x00\x01", isBinary=True)
    alice.send_json({"type": "send", "to": "bob", "body": "never", "id": 103})
    yield alice.closed
    answers = [
        (f.get("id"), f.get("code", "ok"))
        for f in alice.inbox.pending
        if f["type"] in ("result", "error")
    ]
    assert answers == [(101, "ok"), (102, "ok"), (None, "bad_frame")], alice.inbox.pending
    got = []
    for _ in range(2):
        f = yield bob.until(lambda f: f["type"] == "msg")
        got.append(f["body"])
    assert got == ["one", "two"]
    feed = yield web.realm.store.read_feed("bob@localhost", 0, 10)
    assert [e.body for e in feed if e.kind == "text"] == ["one", "two"]


def _open_gateway(realm: Any, token: str | None, clock: Any = None) -> tuple[Any, Any]:
    """A ChatWebSocket of ``realm`` on a StringTransport, past the handshake (with
    the browser login cookie ``token``, if any)."""
    from twisted.internet.testing import StringTransport

    from chatproto.web.gateway import ChatWebSocketFactory

    factory = ChatWebSocketFactory(realm, lambda o, h, s: True, clock)
    ws: Any = factory.buildProtocol(None)
    transport = StringTransport()
    ws.makeConnection(transport)
    cookie = f"Cookie: {SESSION_COOKIE}={token}\r\n".encode() if token is not None else b""
    ws.dataReceived(
        b"GET /ws HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: http://chat.test\r\n" + cookie + b"\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return ws, transport


@pytest_twisted.inlineCallbacks
def test_gateway_has_at_most_max_in_flight_requests_over_string_transport(realm: Any) -> Any:
    """The native bound on requests in progress (MAX_IN_FLIGHT) over the WebSocket
    gateway: a browser pipelining history requests made the realm start them all at
    once (every page built before the slow-reader bound sees it).  At the bound the
    connection is paused, the messages of the read after it wait, in order, and are
    handled as answers go out (one byte at a time, the same); a binary message among
    them is refused in its turn, once the requests before it are read."""
    from chatproto import protocol

    yield realm.create_user("carol", PASSWORD)
    token, _ = yield realm.issue_token("carol", PASSWORD, "web-c")
    ws, transport = _open_gateway(realm, token)
    session = ws.session
    ws.dataReceived(_ws_frame(b'{"type":"hello","version":1,"id":"h"}'))
    ws.dataReceived(_ws_frame(b'{"type":"login","id":"l"}'))
    yield until(lambda: b'"synced"' in transport.value())
    transport.clear()
    n = 3 * protocol.MAX_IN_FLIGHT
    data = b"".join(_ws_frame(b'{"type":"history","id":%d,"with":"carol"}' % i) for i in range(n))
    for one_byte_at_a_time in (False, True):
        if one_byte_at_a_time:
            for k in range(len(data)):
                ws.dataReceived(data[k : k + 1])
        else:
            ws.dataReceived(data)
        assert session._in_flight == protocol.MAX_IN_FLIGHT
        assert len(session._waiting) == n - protocol.MAX_IN_FLIGHT
        assert transport.producerState == "paused"
        yield until(lambda: len(_ws_messages(transport.value())) == n)
        assert sorted(f["id"] for f in _ws_messages(transport.value())) == list(range(n))
        assert transport.producerState == "producing"
        assert session._in_flight == 0 and not session._waiting
        transport.clear()
    # what follows the bound is handled in its turn: here a fatal binary message
    binary = b"\x82\x80\0\0\0\0"
    ws.dataReceived(data + binary + _ws_frame(b'{"type":"ping","id":"never"}'))
    assert session.state == "ready" and len(session._waiting) == n + 2 - protocol.MAX_IN_FLIGHT
    yield until(lambda: session.state == "closed" or session.state == "closing")
    got = _ws_messages(transport.value()[: transport.value().rindex(b"\x88")])
    # (the requests still in progress then go unanswered, as PROTOCOL.md says)
    answered = {f["id"] for f in got[:-1]}
    assert answered <= set(range(n)) and len(answered) > n - protocol.MAX_IN_FLIGHT
    assert got[-1]["type"] == "error" and got[-1]["code"] == "bad_frame"
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    ws.connectionLost(Failure(ConnectionDone()))
    assert session.state == "closed" and not session._waiting


@pytest_twisted.inlineCallbacks
def test_pipelined_history_over_a_websocket_is_read_max_in_flight_at_a_time(web: Web) -> Any:
    """A real WebSocket connection pipelining hundreds of history requests in one
    write, reading nothing meanwhile: the realm works on at most MAX_IN_FLIGHT of them
    at once and stops reading the socket (the messages of the read it was parsing
    wait); it reads on as answers go out, and every request is answered."""
    from chatproto import protocol

    yield web.realm.create_user("bob", PASSWORD)
    alice = yield _logged_in_websocket(web, "alice")
    for i in range(3):
        yield alice.call("send", to="bob", body=f"m{i}")
    (server,) = [
        p
        for p in web.site.ws.sessions.connections
        if p.session is not None and p.session.user_id == "alice@localhost"
    ]
    tcp = server.transport._ws.transport  # the socket under the WebSocket
    n = 20 * protocol.MAX_IN_FLIGHT
    ids = set(range(1000, 1000 + n))
    for i in sorted(ids):  # in one write: autobahn writes as it is asked to
        alice.send_json({"type": "history", "id": i, "with": "bob", "limit": 2})

    def answered() -> list[Any]:
        return [f["id"] for f in alice.inbox.pending if f["type"] == "result" and f["id"] in ids]

    peak = paused = 0
    # (bounded, 30 s, looking every millisecond: zero-delay turns would keep the
    # reactor holding the GIL and starve the reader threads that build the pages)
    for _ in range(30_000):
        if len(answered()) == n:
            break
        peak = max(peak, server._in_flight)
        assert peak <= protocol.MAX_IN_FLIGHT, peak
        if server._requests_paused:
            paused += 1
            assert tcp not in _reactor.getReaders()  # the realm does not read it
        yield task.deferLater(_reactor, 0.001, lambda: None)
    assert sorted(answered()) == sorted(ids)
    assert peak == protocol.MAX_IN_FLIGHT and paused
    assert server._in_flight == 0 and not server._requests_paused and not server._waiting
    alice.inbox.pending.clear()
    r = yield alice.call("ping")
    assert r["type"] == "result"


class _RawHTTP(Protocol):
    """One HTTP request over a plain TCP connection, reading the answer raw; it stops
    reading (pauses the transport) after the first bytes arrive."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False

    def connectionMade(self) -> None:
        sock = self.transport.getHandle()  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)

    def dataReceived(self, data: bytes) -> None:
        if not self.data:
            self.transport.pauseProducing()
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


@pytest_twisted.inlineCallbacks
def test_a_browser_download_of_a_file_deleted_meanwhile_is_cut_short(web: Web) -> Any:
    """bob's browser downloads a large file (GET /files/<id>) and reads slowly;
    meanwhile alice deletes the file's message.  The realm kept streaming the deleted
    file's bytes to the end; now it stops: the connection closes short of the
    announced Content-Length (which tells the browser the download failed), having
    sent a part of the file only."""
    import hashlib
    import os

    realm = web.realm
    ca = yield web.login("alice")
    cb = yield web.login("bob")
    files = realm.files
    size = 16 * 2**20
    data = os.urandom(size)
    up = yield files.offer(
        "alice@localhost", "bob", "big.bin", size, hashlib.sha256(data).hexdigest()
    )
    for i in range(0, size, 2**20):
        yield files.write("alice@localhost", up.upload_id, i, data[i : i + 2**20])
    info, env = yield files.finish("alice@localhost", up.upload_id)
    factory = Factory.forProtocol(_RawHTTP)
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", web.port.getHost().port)
    client = yield endpoint.connect(factory)
    client.transport.write(
        f"GET /files/{info.file_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: {SESSION_COOKIE}={cb}\r\n\r\n".encode()
    )
    yield until(lambda: client.data)  # the answer began; bob reads no more for now
    ws = yield web.websocket(ca)
    yield ws.call("hello", version=1)
    yield ws.call("login")
    deleted = yield ws.call("delete", msg_id=env.id)
    assert deleted["type"] == "result"
    client.transport.resumeProducing()
    yield until(lambda: client.lost)  # the realm closed the connection
    head, _, body = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"content-length: {size}".encode() in head.lower()
    assert 0 < len(body) < size and data.startswith(body)
    assert not realm.files.downloads


@pytest_twisted.inlineCallbacks
def test_a_browser_download_of_a_file_deleted_before_its_first_byte_is_404(web: Web) -> Any:
    """The file of a GET /files/<id> is deleted after the realm opened it and before
    its first block was read from disk: the answer is 404 no_such_file (a JSON error,
    none of the file's headers), not the deleted file's bytes."""
    import hashlib

    realm = web.realm
    ca = yield web.login("alice")
    cb = yield web.login("bob")
    files = realm.files
    data = b"secret bytes " * 1000
    up = yield files.offer(
        "alice@localhost", "bob", "s.bin", len(data), hashlib.sha256(data).hexdigest()
    )
    yield files.write("alice@localhost", up.upload_id, 0, data)
    info, env = yield files.finish("alice@localhost", up.upload_id)
    run = files.store.run
    held: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def holding(fn: Any, *args: Any) -> Any:
        if getattr(fn, "__name__", "") != "_read":
            return run(fn, *args)
        held.append((defer.Deferred(), fn, args))  # a block of a download
        return held[-1][0]

    files.store.run = holding
    answer = web.request("GET", f"/files/{info.file_id}", cookie=cb)
    yield until(lambda: held)
    ws = yield web.websocket(ca)
    yield ws.call("hello", version=1)
    yield ws.call("login")
    deleted = yield ws.call("delete", msg_id=env.id)
    assert deleted["type"] == "result"
    files.store.run = run
    d, _, args = held.pop()
    d.callback(data[: args[1]])  # the block (read before the delete removed the bytes)
    yield until(lambda: answer.called)
    response, body = yield answer
    assert response.code == 404 and json.loads(body)["code"] == "no_such_file"
    assert not response.headers.hasHeader("content-disposition")
    assert not realm.files.downloads


@pytest_twisted.inlineCallbacks
def test_a_browser_gone_while_its_download_opens_leaves_no_download_behind(web: Web) -> Any:
    """A GET /files/<id> whose client disconnects while the realm opens the download
    (looks for the bytes on disk): starting it on the request gone failed, and the
    download stayed among its file's downloads in progress for good (one more per
    such request).  Now it is closed."""
    import hashlib

    realm = web.realm
    cb = yield web.login("bob")
    files = realm.files
    data = b"x" * 1000
    up = yield files.offer("bob@localhost", "bob", "x", len(data), hashlib.sha256(data).hexdigest())
    yield files.write("bob@localhost", up.upload_id, 0, data)
    info, _ = yield files.finish("bob@localhost", up.upload_id)
    run = files.store.run
    held: list[defer.Deferred[Any]] = []

    def holding(fn: Any, *args: Any) -> Any:
        if fn is not os.path.exists:
            return run(fn, *args)
        held.append(defer.Deferred())  # is the blob there: answered below
        return held[-1]

    files.store.run = holding
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", web.port.getHost().port)
    client = yield endpoint.connect(Factory.forProtocol(_RawHTTP))
    client.transport.write(
        f"GET /files/{info.file_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: {SESSION_COOKIE}={cb}\r\n\r\n".encode()
    )
    yield until(lambda: held)
    client.transport.abortConnection()
    yield until(lambda: realm.unauthenticated.waiting == 0)  # the realm saw it close
    files.store.run = run
    held[0].callback(True)
    assert not files.downloads


def test_another_method_or_name_under_the_api_is_a_json_bad_request(web: Web) -> None:
    """The resources themselves (no socket): PUT on a request, or a name under
    ``/api/`` that is none, renders the JSON error frame with 400."""
    from twisted.web.test.requesthelper import DummyRequest

    api = web.site.root.children[b"api"]
    for resource, method in (
        (api.children[b"login"], b"PUT"),
        (web.site.root.children[b"files"], b"DELETE"),
        (api.getChildWithDefault(b"nothing", DummyRequest([])), b"POST_IT"),
    ):
        request = DummyRequest([])
        request.method = method
        out = resource.render(request)
        assert request.responseCode == 400, (resource, method)
        assert json.loads(out)["code"] == "bad_request"
        assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
