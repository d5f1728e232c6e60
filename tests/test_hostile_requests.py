"""A hostile client over real loopback TCP against the newer requests (replies,
reactions, edits, deletes, read markers, typing, search, reports, admin requests),
written from PROTOCOL.md: each bad request ends in a documented error code, with no
traceback in the realm's log and the connection still usable."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from chatproto.config import Config
from tests.conftest import LogWatch, raw_client
from tests.test_web import web  # noqa: F401  (a fixture)

PW = "password-h"


class Asker:
    """Numbered requests on a raw client; :meth:`ask` fires with the reply."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.n = 0

    def ask(self, req: dict[str, Any]) -> Any:
        self.n += 1
        self.client.send({**req, "id": self.n})
        return self.client.reply(self.n)


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
@pytest_twisted.inlineCallbacks
def test_search_words_of_any_letters_are_plain_terms(server: Any) -> Any:
    """A query is words, never full-text syntax: FTS5 operators, quotes, column
    filters and NEAR find the words only.  A word with a letter SQLite's tokenizer
    reads as a separator (U+19B0, Unicode 8's New Tai Lue) was an FTS5 phrase, which
    the index refuses: internal_error and a traceback; now it is found."""
    realm, _factory, addr = server
    watch = LogWatch()
    try:
        yield realm.create_user("alice", PW)
        alice = Asker((yield raw_client(addr, ("alice", PW))))
        yield alice.ask({"type": "send", "to": "alice", "body": "na\u19b0me and body"})
        yield alice.ask({"type": "send", "to": "alice", "body": "NEAR or not"})
        yield alice.ask({"type": "send", "to": "alice", "body": "\u19b0\u19b5 alone"})
        for query, found in [
            ("na\u19b0me", ["na\u19b0me and body"]),
            ("na\u19b0", ["na\u19b0me and body"]),
            ("NEAR(or not)", ["NEAR or not"]),
            ('"or" OR body*', []),  # three words, all needed
            ("body:and", ["na\u19b0me and body"]),
            ("-body ^and", ["na\u19b0me and body"]),
            ("x" * 256, []),
            ("\u19b0\u19b5", ["\u19b0\u19b5 alone"]),  # letters only SQLite splits on
            ("\u19b0\u19b5 alone", ["\u19b0\u19b5 alone"]),
        ]:
            reply = yield alice.ask({"type": "search", "query": query})
            assert reply["type"] == "result", (query, reply)
            assert [m["body"] for m in reply["messages"]] == found, query
        assert watch.failures == []
    finally:
        watch.close()


@pytest.fixture
def irc_and_native(tmp_path: Any) -> Any:
    from tests.test_irc_loopback import irc_gateway

    yield from irc_gateway(tmp_path, ("alice", "bob", "carol"))


@pytest_twisted.inlineCallbacks
def test_a_suspension_reason_is_a_label(irc_and_native: Any) -> Any:
    """A realm admin's ``suspend`` reason is shown to the user when their sessions end
    (an IRC gateway writes it as ``ERROR :...``).  It was not checked: a line break in
    it wrote lines of the admin's choosing to the user's IRC client.  Now it is a
    label of at most 400 characters, like a report's reason (``bad_request``)."""
    from tests.test_irc_loopback import PW as IRC_PW
    from tests.test_irc_loopback import irc_client

    realm, irc_port, addr = irc_and_native
    watch = LogWatch()
    try:
        yield realm.moderation.grant("alice")
        bob = yield irc_client(irc_port, "bob")
        yield bob.signed_on
        alice = Asker((yield raw_client(addr, ("alice", IRC_PW))))
        forged = "bye\r\n:carol!carol@localhost PRIVMSG bob :give me your password"
        for reason in (forged, "a\x1b[2Jb", "rtl\u202eb", "r" * 401):
            reply = yield alice.ask({"type": "suspend", "user": "bob", "reason": reason})
            assert (reply["type"], reply.get("code")) == ("error", "bad_request"), reason
        assert not realm.admin.is_suspended("bob")
        reply = yield alice.ask({"type": "suspend", "user": "bob", "reason": " spam " + "r" * 390})
        assert reply["type"] == "result" and reply["closed"] == 1
        yield bob.lost
        assert bob.raw[-1] == "ERROR :this account is suspended: spam " + "r" * 390
        assert not any(line.startswith(":carol!") for line in bob.raw), bob.raw
        assert watch.failures == []
    finally:
        watch.close()


def test_an_irc_error_line_is_one_line_whatever_the_realm_says() -> None:
    """StringTransport: the IRC gateway writes the reason a session ends with as one
    ``ERROR`` line (and one ``QUIT`` to the channels), even a reason that is not a
    label (one stored before reasons were checked, or by an older ``chatrealmctl``),
    and the realm refuses such a reason from an admin or operator now."""
    from twisted.internet.task import Clock

    from chatproto.errors import ChatError
    from chatproto.irc import IRCFactory
    from tests.test_irc import login, make_realm

    clock = Clock()
    realm = make_realm(clock)
    factory = IRCFactory(realm, clock)
    bob, carol = login(factory, "bob"), login(factory, "carol")
    bob.send("JOIN #dev")
    carol.send("JOIN #dev")
    bob.lines()
    carol.lines()
    with pytest.raises(ChatError) as refused:
        realm.admin.kick("bob", "x\r\nPRIVMSG carol :hi")
    assert refused.value.code == "bad_request"
    realm.admin.end_sessions("bob@localhost", "session_ended", "old\r\nPRIVMSG carol :x\0y")
    clock.advance(0)
    assert bob.lines()[-1] == "ERROR :old PRIVMSG carol :xy"
    bob.proto.connectionLost(None)
    [quit_line] = carol.lines()
    assert quit_line.startswith(":bob!") and quit_line.endswith(" QUIT :old PRIVMSG carol :xy")


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
@pytest_twisted.inlineCallbacks
def test_distinct_reactions_and_edits_to_one_item_are_bounded(server: Any) -> Any:
    """A flood of reactions with distinct emoji (any short word is one) and of edits,
    all to one message, from one user sending as fast as the realm lets them: each
    history page that shows the message read every one of them.  Past
    ``relations.MAX_CHANGES`` per user and item the realm refuses with
    ``limit_reached``, whatever the requests in flight at once."""
    from chatproto.relations import MAX_CHANGES

    realm, _factory, addr = server
    watch = LogWatch()
    try:
        yield realm.create_user("alice", PW)
        yield realm.create_user("bob", PW)
        alice = Asker((yield raw_client(addr, ("alice", PW))))
        bob = Asker((yield raw_client(addr, ("bob", PW))))
        sent = yield alice.ask({"type": "send", "to": "bob", "body": "target"})
        m = sent["msg_id"]
        asked = []
        for i in range(MAX_CHANGES + 50):  # all at once: none waits for its reply
            kind = "react" if i % 3 else "edit"
            alice.n += 1
            asked.append(alice.n)
            alice.client.send(
                {"type": kind, "id": alice.n, "msg_id": m, "emoji": f":e{i}:", "body": f"v{i}"}
            )
        replies = []
        for rid in asked:
            replies.append((yield alice.client.reply(rid)))
        codes = [r.get("code", "ok") for r in replies]
        assert set(codes) == {"ok", "limit_reached"}
        # (in the order their items were found, which may not be the requests')
        assert sorted(codes) == ["limit_reached"] * 50 + ["ok"] * MAX_CHANGES
        assert not realm.relations._changing  # nothing kept once they are answered
        later = yield alice.ask({"type": "react", "msg_id": m, "emoji": "x"})
        assert later["code"] == "limit_reached"
        page = yield bob.ask({"type": "history", "with": "alice"})
        [shown] = page["messages"]
        shown_reactions = len(shown["meta"]["reactions"])
        assert shown_reactions == sum(1 for i, c in enumerate(codes) if c == "ok" and i % 3)
        ok = yield bob.ask({"type": "react", "msg_id": m, "emoji": "x"})  # bob's own
        assert ok["type"] == "result"
        assert watch.failures == []
    finally:
        watch.close()


@pytest_twisted.inlineCallbacks
def test_a_websocket_ping_flood_from_a_peer_that_does_not_read_is_bounded(
    web: Any,  # noqa: F811
) -> Any:
    """Over loopback, before login: WebSocket pings sent as fast as the socket takes
    them by a peer that reads nothing.  The realm held every pong (8 MB unsent for
    10 MB of pings); now what it holds stays near the transport's own buffer."""
    import base64
    import os
    import socket

    from twisted.internet import reactor, task

    from tests.conftest import tcp_of, unsent, until

    port = web.port.getHost().port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.send(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {web.origin}\r\n\r\n".encode()
    )
    yield until(lambda: len(web.site.ws.sessions.connections) == 1)
    [server] = list(web.site.ws.sessions.connections)
    tcp = tcp_of(server.transport._ws.transport)
    tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pings = (bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125) * 200
    sent = peak = 0
    try:
        while sent < 10 * 2**20:
            try:
                sent += sock.send(pings)
            except BlockingIOError:
                pass
            yield task.deferLater(reactor, 0.001, lambda: None)
            peak = max(peak, unsent(tcp))
    finally:
        sock.close()
    assert peak <= 64 * 1024 + 2 * len(pings), peak


@pytest_twisted.inlineCallbacks
def test_a_flood_of_conversation_lists_is_refused_past_the_bucket(server: Any) -> Any:
    """Requests sent at once, none waiting for its reply: conversation lists (each a
    few storage queries per conversation; 50 at once held another user's history
    5 s with 500 conversations) get rate_limited past the connection's bucket."""
    from chatproto.realm.reading import CONVERSATIONS_BURST

    realm, _factory, addr = server
    watch = LogWatch()
    try:
        yield realm.create_user("alice", PW)
        alice = Asker((yield raw_client(addr, ("alice", PW))))
        first = alice.n + 1
        for _ in range(3 * CONVERSATIONS_BURST):
            alice.n += 1
            alice.client.send({"type": "conversations", "id": alice.n})
        codes = []
        for rid in range(first, alice.n + 1):
            codes.append((yield alice.client.reply(rid)).get("code", "ok"))
        assert codes.count("ok") == CONVERSATIONS_BURST
        assert codes.count("rate_limited") == 2 * CONVERSATIONS_BURST
        assert (yield alice.ask({"type": "ping"}))["type"] == "result"
        assert watch.failures == []
    finally:
        watch.close()


def _post_raw(port: int, head: bytes, body: bytes) -> bytes:
    """Send ``head`` and ``body`` on a blocking socket (in a thread), then the status
    line and headers of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head + body)
        except OSError:  # answered and closed before the whole body was sent
            pass
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
        return answer


@pytest_twisted.inlineCallbacks
def test_a_huge_body_to_the_web_api_is_not_stored(web: Any, monkeypatch: Any) -> Any:  # noqa: F811
    """Before any login: twisted.web keeps a request body of 100 KB or more (or of no
    stated length) in a temporary file before the resource sees it.  The session API
    reads at most 16 KB of it, yet every byte of a 120 MB POST to ``/api/login`` (or to
    any path) went to disk first.  Now only an upload's body (checked from its headers)
    is kept whole; any other is kept up to the API's bound, the rest thrown away."""
    import tempfile

    from twisted.internet.threads import deferToThread
    from twisted.web import http

    written = []
    make_file = tempfile.TemporaryFile

    class Counted:
        def __init__(self) -> None:
            self._f = make_file()

        def write(self, data: bytes) -> None:
            written.append(len(data))
            self._f.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

    monkeypatch.setattr(http.tempfile, "TemporaryFile", Counted)
    port = web.port.getHost().port
    size = 8 * 2**20
    block = b"x" * 65536
    for path, chunked in (("/api/login", False), ("/api/register", True), ("/", False)):
        if chunked:
            length = b"Transfer-Encoding: chunked"
            body = (b"10000\r\n" + block + b"\r\n") * (size // 65536) + b"0\r\n\r\n"
        else:
            length, body = b"Content-Length: %d" % size, block * (size // 65536)
        head = (
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: %s\r\n"
            b"Content-Type: application/json\r\n%s\r\n\r\n"
            % (path.encode(), port, web.origin.encode(), length)
        )
        answer = yield deferToThread(_post_raw, port, head, body)
        status = answer.split(b"\r\n", 1)[0].split(b" ")
        assert len(status) > 1 and status[1] in (b"413", b"405"), (path, answer[:200])
    assert sum(written) == 0


@pytest_twisted.inlineCallbacks
def test_idle_http_connections_to_the_web_listener_are_counted(tmp_path: Any) -> Any:
    """Connections to the web listener that are not WebSocket sessions were not counted
    among the unauthenticated connections: anyone could hold any number open (one byte
    a minute keeps an HTTP connection alive) and take every file descriptor of the
    realm, its native listeners' too.  An HTTP connection now counts until it closes
    or becomes a WebSocket session (which counts until its login)."""
    import socket

    from twisted.internet import reactor, task

    from chatproto.web.site import WebSite
    from tests.conftest import fast_config, make_realm, until
    from tests.test_web import Web

    cfg = fast_config(tmp_path, max_unauthenticated_per_address=4)
    realm = make_realm(cfg)
    yield realm.startService()
    site = WebSite(realm)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    browser = Web(realm, site, port)
    socks: list[Any] = []

    def open_idle() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        s.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(s)
        return s

    def closed(s: socket.socket) -> bool:
        s.setblocking(False)
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    try:
        held = [open_idle() for _ in range(4)]
        yield task.deferLater(reactor, 0.2, lambda: None)
        extra = open_idle()
        yield until(lambda: closed(extra))  # past the bound: closed at once
        assert realm.unauthenticated.count("127.0.0.1") == 4
        assert not any(closed(s) for s in held)
        for s in held:
            s.close()
        yield until(lambda: realm.unauthenticated.count("127.0.0.1") == 0)
        # a WebSocket session counts as itself, until it logs in
        cookie = yield browser.login("alice")
        yield until(lambda: realm.unauthenticated.count("127.0.0.1") == 0)
        ws = yield browser.websocket(cookie)
        yield ws.call("hello", version=1)
        assert realm.unauthenticated.count("127.0.0.1") == 1
        yield ws.call("login")
        assert realm.unauthenticated.count("127.0.0.1") == 0
    finally:
        for s in socks:
            s.close()
        for w in browser.sockets:
            if w.transport is not None:
                w.transport.abortConnection()
        yield port.stopListening()
        yield realm.stopService()


@pytest_twisted.inlineCallbacks
def test_a_flood_of_registrations_before_login_is_refused_before_hashing(server: Any) -> Any:
    """An unauthenticated connection sending registrations without waiting: each one
    cost an argon2 hash (a name taken too: 0.2 s with the default settings) in the
    two-thread pool logins wait in, so 1000 of them held every login some 100 s.  A
    taken name is refused at once; new names past the address's allowance get
    rate_limited."""
    burst = Config().auth.registrations_per_address

    realm, _factory, addr = server
    watch = LogWatch()
    try:
        yield realm.create_user("alice", PW)
        flood = Asker((yield raw_client(addr)))
        first = flood.n + 1
        for i in range(60):
            flood.n += 1
            user = "alice" if i % 2 else f"new{i}"
            flood.client.send({"type": "register", "id": flood.n, "user": user, "password": PW})
        codes = []
        for rid in range(first, flood.n + 1):
            codes.append((yield flood.client.reply(rid)).get("code", "ok"))
        assert codes[1::2] == ["user_exists"] * 30
        assert codes[0::2] == ["ok"] * burst + ["rate_limited"] * (30 - burst)
        alice = yield raw_client(addr, ("alice", PW))  # logins go on
        assert (yield Asker(alice).ask({"type": "ping"}))["type"] == "result"
        assert watch.failures == []
    finally:
        watch.close()
