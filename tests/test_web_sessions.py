"""Durable browser logins (issue 18): session tokens kept hashed in the store, across a
realm restart; expiry; revocation by "log out everywhere", by ``chatrealmctl sessions
revoke`` through the running realm and in the store.  Chromium's view of a restart is
in tests/test_web_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from chatproto import config as configmod
from chatproto import ctl
from chatproto.realm import RealmService
from chatproto.store.memory import MemoryStore
from chatproto.testing import InlineHasher, frame, frames
from chatproto.tokens import LOGIN_ID_LENGTH, TOUCH_EVERY, digest
from chatproto.web import WebSite
from tests.conftest import fast_config, make_realm, until
from tests.test_control import PW, Running, _write_config, short_dir  # noqa: F401
from tests.test_web import PASSWORD, Web, _cookie, _session


def _realm(store: MemoryStore, clock: Clock, ttl: float = 1000.0) -> RealmService:
    cfg = configmod.Config()
    cfg.web.session_ttl = ttl
    realm = RealmService(cfg, store, clock, clock=clock, hasher=InlineHasher())
    realm.startService()
    return realm


def _issue(realm: RealmService, user: str, device: str = "web") -> str:
    out: list[Any] = []
    realm.issue_token(user, PASSWORD, device).addBoth(out.append)
    assert isinstance(out[0], tuple), out
    return str(out[0][0])


def test_a_restarted_realm_keeps_its_browser_logins_and_only_their_digests() -> None:
    clock, store = Clock(), MemoryStore()
    realm = _realm(store, clock)
    realm.create_user("alice", PASSWORD)
    token = _issue(realm, "alice", "laptop")
    stale = _issue(realm, "alice", "old")
    assert list(store.session_tokens_) == [digest(token), digest(stale)]
    assert token not in repr(store.session_tokens_)  # the token itself is never kept
    clock.advance(600)
    realm.token_user(token)  # used: lives on
    realm.stopService()
    clock.advance(500)  # stale: 1100 s unused; token: 500 s
    again = _realm(store, clock)
    assert str(again.token_user(token)) == "alice@localhost"
    assert again.token_user(stale) is None
    # a login by the cookie after the restart is a web session as before
    proto, transport = _session(again, token)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    proto.dataReceived(frame({"type": "login", "id": 2}))
    clock.advance(0)
    reply = frames(transport)[1]
    assert (reply["user"], reply["device"]) == ("alice@localhost", "laptop")
    proto.connectionLost(None)


def test_a_use_is_written_at_most_every_touch_interval_and_expiry_reaches_the_store() -> None:
    clock, store = Clock(), MemoryStore()
    realm = _realm(store, clock, ttl=10_000.0)
    realm.create_user("bob", PASSWORD)
    token = _issue(realm, "bob")
    key = digest(token)
    for _ in range(10):
        clock.advance(TOUCH_EVERY / 10)
        realm.token_user(token)
    written = store.session_tokens_[key][4]
    assert written == TOUCH_EVERY  # once, not ten times
    clock.advance(10_000 + 2 * TOUCH_EVERY)
    realm.accounts.prune()
    assert key not in store.session_tokens_
    assert realm.token_user(token) is None


def test_a_new_account_of_a_deleted_name_gets_no_old_login() -> None:
    clock, store = Clock(), MemoryStore()
    realm = _realm(store, clock)
    realm.create_user("carol", PASSWORD)
    token = _issue(realm, "carol")
    realm.stopService()
    store.delete_user("carol", "carol@localhost")  # chatrealmctl deluser in the store
    store.create_user("carol", "x", 1.0)
    again = _realm(store, clock)
    assert again.token_user(token) is None


def test_revoking_logins_ends_their_web_sessions_only() -> None:
    clock, store = Clock(), MemoryStore()
    realm = _realm(store, clock)
    realm.create_user("dave", PASSWORD)
    one, two = _issue(realm, "dave", "one"), _issue(realm, "dave", "two")
    protos = []
    for token in (one, two):
        proto, transport = _session(realm, token)
        proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
        proto.dataReceived(frame({"type": "login", "id": 2}))
        clock.advance(0)
        protos.append((proto, transport))
    logins = realm.admin.logins("dave")
    assert [r["device"] for r in logins] == ["one", "two"]
    assert logins[0]["login"] == digest(one)[:LOGIN_ID_LENGTH]
    result: list[Any] = []
    realm.admin.revoke_logins("dave", [logins[0]["login"]], "gone").addCallback(result.append)
    assert result == [("dave@localhost", 1, 1)]
    proto, transport = protos[0]
    err = frames(transport)[-1]
    assert (err["type"], err["code"]) == ("error", "session_ended")
    assert transport.disconnecting
    assert not protos[1][1].disconnecting
    assert realm.token_user(one) is None and realm.token_user(two) is not None
    assert list(store.session_tokens_) == [digest(two)]
    # everything: "log out everywhere"
    realm.admin.revoke_logins("dave").addCallback(result.append)
    assert result[-1] == ("dave@localhost", 1, 1)
    assert store.session_tokens_ == {}


@pytest_twisted.inlineCallbacks
def test_logins_survive_a_restart_on_the_real_store(tmp_path: Path) -> Any:
    cfg = fast_config(tmp_path)
    realm = make_realm(cfg)
    yield realm.startService()
    yield realm.create_user("erin", PASSWORD)
    token, _ = yield realm.issue_token("erin", PASSWORD, "web-erin")
    yield realm.stopService()
    realm = make_realm(cfg)
    yield realm.startService()
    try:
        assert str(realm.token_user(token)) == "erin@localhost"
        _canonical, ended, closed = yield realm.admin.revoke_logins("erin")
        assert (ended, closed) == (1, 0)
    finally:
        yield realm.stopService()
    realm = make_realm(cfg)
    yield realm.startService()
    try:
        assert realm.token_user(token) is None  # the revocation was stored
    finally:
        yield realm.stopService()


@pytest_twisted.inlineCallbacks
def test_log_out_everywhere_over_http(realm: Any) -> Any:
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    web = Web(realm, site, port)
    try:
        cookie_a = yield web.login("frank")
        response, _ = yield web.request(
            "POST", "/api/login", {"user": "frank", "password": PASSWORD, "device": "phone"}
        )
        cookie_b = _cookie(response)
        ws = yield web.websocket(cookie_b)
        yield ws.call("hello", version=1)
        assert (yield ws.call("login"))["type"] == "result"
        response, body = yield web.request("POST", "/api/logout", {"everywhere": "yes"}, cookie_a)
        assert response.code == 400 and b"everywhere" in body
        response, body = yield web.request("POST", "/api/logout", {"everywhere": True}, cookie_a)
        assert response.code == 200, body
        assert b'"logins_ended":2' in body
        err = yield ws.until(lambda f: f.get("type") == "error")
        assert err["code"] == "session_ended"
        yield ws.closed
        for cookie in (cookie_a, cookie_b):
            response, _ = yield web.request("GET", "/api/session", cookie=cookie)
            assert response.code == 401
    finally:
        for s in web.sockets:
            if s.transport is not None:
                s.transport.abortConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_ctl_lists_and_revokes_browser_logins_running_or_not(
    tmp_path: Path,
    short_dir: Path,  # noqa: F811
    capsys: Any,
) -> Any:
    conf = _write_config(
        tmp_path, short_dir / "control.sock", web={"listen": ["tcp:0:interface=127.0.0.1"]}
    )
    r = Running(conf)
    try:
        yield r.realm.create_user("gina", PW)
        yield r.realm.create_user("hank", PW)
        listener = r.listener("WebSite")
        web = Web(r.realm, listener.factory, listener.port)
        cookies = []
        for who, device in (("gina", "desk"), ("gina", "phone"), ("hank", "tablet")):
            response, _ = yield web.request(
                "POST", "/api/login", {"user": who, "password": PW, "device": device}
            )
            cookies.append(_cookie(response))
        ws = yield web.websocket(cookies[1])
        yield ws.call("hello", version=1)
        assert (yield ws.call("login"))["type"] == "result"
        status = yield r.ctl("sessions", "web")
        out, err = capsys.readouterr()
        assert status == 0, err
        rows = [line.split() for line in out.splitlines()[1:]]
        assert [(row[0], row[2]) for row in rows] == [
            ("gina@localhost", "desk"),
            ("gina@localhost", "phone"),
            ("hank@localhost", "tablet"),
        ]
        phone = rows[1][1]
        status = yield r.ctl("sessions", "revoke", "gina", phone)
        out, err = capsys.readouterr()
        assert (status, out) == (
            0,
            "ended 1 browser login of gina@localhost by the running realm (1 web session closed)\n",
        ), err
        assert (yield ws.until(lambda f: f.get("type") == "error"))["code"] == "session_ended"
        status = yield r.ctl("sessions", "revoke", "gina", "nothex")
        _, err = capsys.readouterr()
        assert status == 1 and "is not a login id" in err
        status = yield r.ctl("sessions", "web", "gina")
        out, _ = capsys.readouterr()
        assert [line.split()[2] for line in out.splitlines()[1:]] == ["desk"]
    finally:
        for s in web.sockets:
            if s.transport is not None:
                s.transport.abortConnection()
        yield r.stop()
    # the realm stopped: the same commands work on the store, and say so
    status = yield deferToThread(ctl.main, ["--config", str(conf), "sessions", "web"])
    out, _ = capsys.readouterr()
    assert status == 0 and [line.split()[2] for line in out.splitlines()[1:]] == [
        "desk",
        "tablet",
    ]
    status = yield deferToThread(ctl.main, ["--config", str(conf), "sessions", "revoke", "gina"])
    out, _ = capsys.readouterr()
    assert (status, out) == (
        0,
        "ended 1 browser login of gina@localhost in the store (the realm is not running)\n",
    )
    r = Running(conf)
    try:
        yield until(lambda: len(r.realm.tokens) > 0)  # loaded at start
        assert r.realm.token_user(cookies[0]) is None
        assert str(r.realm.token_user(cookies[2])) == "hank@localhost"
    finally:
        yield r.stop()


def test_logging_a_cookie_out_closes_only_the_sessions_that_logged_in_with_it() -> None:
    """``close_token`` (the logout of a cookie) closes the WebSocket sessions that
    logged in with that cookie's token, not one of the same browser (the cookie sent
    with its handshake) that logged in with a password."""
    from chatproto.web.gateway import ChatWebSocketFactory

    clock, store = Clock(), MemoryStore()
    realm = _realm(store, clock)
    realm.create_user("alice", PASSWORD)
    token = _issue(realm, "alice", "laptop")
    ws = ChatWebSocketFactory(realm, lambda *_: True, clock)
    by_token, t1 = _session(realm, token)
    by_password, t2 = _session(realm, token)
    for proto, login in (
        (by_token, {"type": "login", "id": 2}),
        (by_password, {"type": "login", "id": 2, "user": "alice", "password": PASSWORD}),
    ):
        proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
        proto.dataReceived(frame(login))
    clock.advance(0)
    assert [f.get("user") for f in frames(t1)][1] == "alice@localhost"
    assert [f.get("user") for f in frames(t2)][1] == "alice@localhost"
    ws.sessions.connections.update({by_token, by_password})
    ws.close_token(token)
    assert t1.disconnecting and frames(t1)[-1]["code"] == "auth_failed"
    assert not t2.disconnecting
    by_password.connectionLost(None)
    by_token.connectionLost(None)
