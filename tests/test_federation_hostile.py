"""A hostile home realm over real mutual TLS: realm c.example, home of groups, tries to
speak for users it has no say over (issue 14, item 5).

The hostile side is a raw peer presenting c.example's genuine certificate: the link is
accepted (c.example is who it says it is), what it asserts is not."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from chatproto import tls
from chatproto.client import connect
from tests.conftest import until
from tests.fedharness import drained
from tests.test_federation_loopback import logs, raw_peer, realms  # noqa: F401  (fixtures)

PW = "password-1"


def _cert(node: Any) -> dict[str, str]:
    return {"cert": node.cfg.federation.certificate, "key": node.cfg.federation.private_key}


@pytest_twisted.inlineCallbacks
def test_a_hostile_home_realm_cannot_speak_for_anyone(realms: Any, logs: Any) -> Any:  # noqa: F811
    """c.example (home of #ok, which dave@a.example joined, and of #evil, which nobody
    of a.example is in) sends a.example, over its own authenticated link, items in the
    name of a.example's users and of a non-member on b.example.  Each is rejected in
    the ack with a reason, none is stored, and dave receives nothing of it."""
    a, b, c = yield realms(["a.example", "b.example", "c.example"])
    got: dict[str, list[dict[str, Any]]] = {}

    @defer.inlineCallbacks
    def user(node: Any, name: str) -> Any:
        inbox = got.setdefault(f"{name}@{node.name}", [])
        conn = yield connect(_reactor, node.addr, name, PW, register=True, on_message=inbox.append)
        yield conn.synced
        return conn

    owner = yield user(c, "owner")
    dave = yield user(a, "dave")
    alice = yield user(a, "alice")
    erin = yield user(a, "erin")
    bob = yield user(b, "bob")
    yield owner.create_group("#ok")
    yield dave.join("#ok@c.example")  # a genuine join, through dave's own realm
    yield until(lambda: "#ok@c.example" in a.realm.groups.groups, timeout=30)
    yield drained(c)
    yield drained(a)
    before = {u: len(m) for u, m in got.items()}

    peer = yield raw_peer(a, "c.example", _cert(c), c.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "c.example"})
    text = {"kind": "text", "ts": 1764093000.25}
    joined_dave = {
        "event": "joined",
        "user": "dave@a.example",
        "snapshot": {
            "topic": "",
            "visibility": "public",
            "history": "all",
            "members": {"mallory@c.example": "owner"},
        },
    }
    forged = [
        # in #ok, where a.example has a member (dave): its mirror says who is in it
        {
            **text,
            "id": "f-alice",
            "from": "alice@a.example",
            "to": "#ok@c.example",
            "body": "from alice (not)",
        },
        {
            **text,
            "id": "f-bob",
            "from": "bob@b.example",
            "to": "#ok@c.example",
            "body": "from bob (not a member)",
        },
        {
            **text,
            "id": "f-erin-joins",
            "kind": "event",
            "from": "erin@a.example",
            "to": "#ok@c.example",
            "body": "",
            "meta": {"event": "joined", "user": "erin@a.example"},
        },
        # in #evil, where a.example has nobody (no mirror)
        {
            **text,
            "id": "e-alice",
            "from": "alice@a.example",
            "to": "#evil@c.example",
            "body": "from alice (not)",
        },
        {
            **text,
            "id": "e-bob",
            "from": "bob@b.example",
            "to": "#evil@c.example",
            "body": "from bob (not)",
        },
        {
            **text,
            "id": "e-dave-joins",
            "kind": "event",
            "from": "dave@a.example",
            "to": "#evil@c.example",
            "body": "",
            "meta": joined_dave,
        },
        {
            **text,
            "id": "e-mallory",
            "from": "mallory@c.example",
            "to": "#evil@c.example",
            "body": "you are in #evil now",
        },
        {
            **text,
            "id": "e-created",
            "kind": "event",
            "from": "dave@a.example",
            "to": "#evil2@c.example",
            "body": "",
            "meta": {"event": "created", "visibility": "public", "history": "all", "topic": ""},
        },
        # a joined event of someone else, naming dave as the one who joined
        {
            **text,
            "id": "e-mallory-joins-dave",
            "kind": "event",
            "from": "mallory@c.example",
            "to": "#ok@c.example",
            "body": "",
            "meta": {"event": "joined", "user": "dave@a.example"},
        },
        # what c.example may say: its own member, in its own group
        {
            **text,
            "id": "genuine",
            "from": "owner@c.example",
            "to": "#ok@c.example",
            "body": "genuine",
        },
    ]
    peer.send({"type": "txn", "id": "1-10", "items": forged})
    yield until(lambda: len(peer.frames) == 2, timeout=30)
    welcome, ack = peer.frames
    assert welcome["type"] == "welcome"
    assert ack["type"] == "ack" and ack["id"] == "1-10"
    reasons = {r["id"]: (r["code"], r["message"]) for r in ack.get("rejected", [])}
    assert {k: v[0] for k, v in reasons.items()} == {
        "f-alice": "forged_sender",
        "f-bob": "not_member",
        "f-erin-joins": "forged_sender",
        "e-alice": "forged_sender",
        "e-bob": "not_member",
        "e-dave-joins": "forged_sender",
        "e-mallory": "not_member",
        "e-created": "bad_request",
        "e-mallory-joins-dave": "bad_request",
    }
    assert "a.example sent no item f-alice from alice@a.example" in reasons["f-alice"][1]
    assert "erin@a.example asked for no such change" in reasons["f-erin-joins"][1]
    assert logs.has("rejected item e-dave-joins from c.example: forged_sender")
    # only the genuine item was stored, and reached dave
    yield until(lambda: any(m["body"] == "genuine" for m in got["dave@a.example"]), timeout=30)
    for mid in reasons:
        assert (yield a.realm.store.stored_item(mid)) is None, mid
    assert (yield a.realm.store.history("#evil@c.example", None, None, 100)) == []
    assert "#evil@c.example" not in a.realm.groups.groups
    assert set(a.realm.groups.groups["#ok@c.example"].members) == {
        "owner@c.example",
        "dave@a.example",
    }
    new = {u: [m["body"] for m in msgs[before[u] :]] for u, msgs in got.items()}
    assert new == {
        "owner@c.example": [],
        "dave@a.example": ["genuine"],
        "alice@a.example": [],
        "erin@a.example": [],
        "bob@b.example": [],
    }
    # the link goes on: a forgery is the item's fault, not the link's
    assert not peer.lost.called
    peer.transport.loseConnection()
    for conn in (owner, dave, alice, erin, bob):
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_a_home_realm_relays_a_third_realms_words_only_with_its_signature(
    realms: Any,  # noqa: F811
    logs: Any,  # noqa: F811
) -> Any:
    """bob@b.example is in #ok@c.example with dave@a.example.  What bob says reaches
    a.example through c.example with b.example's signature, unchanged, and verifies;
    what c.example makes up in bob's name (unsigned, signed with its own key, or
    with b.example's key id on a signature of its own) is refused: bad_signature."""
    from chatproto.envelope import Envelope
    from chatproto.signing import canonical, verify_all

    a, b, c = yield realms(["a.example", "b.example", "c.example"])
    inbox: list[dict[str, Any]] = []
    owner = yield connect(_reactor, c.addr, "owner", PW, register=True)
    dave = yield connect(_reactor, a.addr, "dave", PW, register=True, on_message=inbox.append)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield owner.create_group("#ok")
    yield dave.join("#ok@c.example")
    yield bob.join("#ok@c.example")
    yield until(
        lambda: (
            "bob@b.example" in getattr(a.realm.groups.groups.get("#ok@c.example"), "members", {})
        ),
        timeout=30,
    )
    yield until(lambda: "#ok@c.example" in b.realm.groups.groups, timeout=30)
    sent = yield bob.send("#ok@c.example", "bob, really")
    yield until(lambda: any(m["body"] == "bob, really" for m in inbox), timeout=30)
    theirs = yield b.realm.store.stored_item(sent["msg_id"])
    ours = yield a.realm.store.stored_item(sent["msg_id"])
    assert ours.sig == theirs.sig and ours.sig["key"] == b.realm.signing.id
    assert verify_all([(b.realm.signing.public, ours.sig["ed25519"], canonical(ours))]) == [True]

    peer = yield raw_peer(a, "c.example", _cert(c), c.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "c.example"})
    base = {"kind": "text", "from": "bob@b.example", "to": "#ok@c.example", "ts": 1764093000.5}

    def env(mid: str, body: str) -> Envelope:
        return Envelope(mid, "text", "bob@b.example", "#ok@c.example", base["ts"], body)

    own = c.realm.signing.sign(env("s-own", "signed by c"))
    borrowed = {"key": b.realm.signing.id, "ed25519": own["ed25519"]}
    replayed = dict(ours.sig)  # bob's real signature, on other words
    forged = [
        {**base, "id": "s-none", "body": "unsigned"},
        {**base, "id": "s-own", "body": "signed by c", "sig": own},
        {**base, "id": "s-borrowed", "body": "signed by c", "sig": borrowed},
        {**base, "id": "s-replayed", "body": "bob, really not", "sig": replayed},
    ]
    peer.send({"type": "txn", "id": "1-4", "items": forged})
    yield until(lambda: len(peer.frames) == 2, timeout=30)
    ack = peer.frames[1]
    assert [(r["id"], r["code"]) for r in ack.get("rejected", [])] == [
        ("s-none", "bad_signature"),
        ("s-own", "bad_signature"),
        ("s-borrowed", "bad_signature"),
        ("s-replayed", "bad_signature"),
    ]
    assert logs.has("rejected item s-borrowed from c.example: bad_signature")
    for item in forged:
        assert (yield a.realm.store.stored_item(item["id"])) is None
    assert [m["body"] for m in inbox if m["kind"] == "text"] == ["bob, really"]
    peer.transport.loseConnection()
    for conn in (owner, dave, bob):
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_a_request_sent_again_over_a_real_link_is_applied_once(realms: Any) -> Any:  # noqa: F811
    """Over real mutual TLS, a.example (genuine certificate) sends b.example, home of
    #g, alice's join request, then the same transaction again (as after a lost ack),
    then her leave, then the join once more (an old request replayed).  Every ack is
    clean; the join is applied once (its event has the request's id) and the replay
    does not bring alice back."""
    a, b = yield realms(["a.example", "b.example"])
    carol = yield connect(_reactor, b.addr, "carol", PW, register=True)
    yield carol.create_group("#g")
    peer = yield raw_peer(b, "a.example", _cert(a), a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})

    def request(mid: str, event: str) -> dict[str, Any]:
        return {
            "id": mid,
            "kind": "request",
            "from": "alice@a.example",
            "to": "#g@b.example",
            "event": event,
            "args": {},
            "ts": 1764093000.0,
        }

    sent = [("t1", "r-join", "joined"), ("t1", "r-join", "joined"), ("t2", "r-leave", "left")]
    sent.append(("t1", "r-join", "joined"))
    for n, (txn, mid, event) in enumerate(sent, start=2):
        peer.send({"type": "txn", "id": txn, "items": [request(mid, event)]})
        yield until(lambda n=n: len(peer.frames) == n, timeout=30)
        assert peer.frames[-1] == {"type": "ack", "id": txn}, peer.frames
        if n == 3:
            members = yield carol.members("#g@b.example")
            assert sorted(m["user"] for m in members) == ["alice@a.example", "carol@b.example"]
    members = yield carol.members("#g@b.example")
    assert [m["user"] for m in members] == ["carol@b.example"]
    joined = yield b.realm.store.stored_item("r-join")
    assert (joined.kind, joined.sender) == ("event", "alice@a.example")
    assert joined.meta["event"] == "joined"
    peer.transport.loseConnection()
    yield carol.close()


def _unsent(link: Any) -> int:
    """Bytes a federation link has written that its TCP connection has not sent."""
    tcp = link.transport.transport  # the connection below TLS
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen  # type: ignore[no-any-return]


@pytest_twisted.inlineCallbacks
def test_a_peer_that_writes_and_never_reads_costs_a_bounded_buffer(
    realms: Any,  # noqa: F811
    logs: Any,  # noqa: F811
) -> Any:
    """Over real mutual TLS, a.example's certificate says hello to b.example, then
    reads nothing and writes 40000 pings.  b.example answers until its connection's
    buffer is full, then reads nothing more either: what it holds for the peer stays
    small (all the pongs would be some 700 KB), and the link, silent, is aborted
    after three keepalive intervals."""
    a, b = yield realms(["a.example", "b.example"], keepalive=0.5)
    peer = yield raw_peer(b, "a.example", _cert(a), a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: len(peer.frames) == 1, timeout=10)
    (link,) = list(b.fed.inbound)
    # small socket buffers, so that the kernel does not hide what is not read
    link.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    peer.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    peer.transport.pauseProducing()  # it reads nothing from now on
    pings = b"\x00\x00\x00\x0f" + b'{"type":"ping"}'
    most = 0
    for _ in range(40):
        peer.transport.write(pings * 1000)
        yield task.deferLater(_reactor, 0.01, lambda: None)
        most = max(most, _unsent(link))
    assert most < 256 * 1024, most
    yield until(lambda: not b.fed.inbound, timeout=30)
    assert logs.has("federation: a.example is silent")


@pytest_twisted.inlineCallbacks
def test_presence_naming_users_without_end_is_kept_within_a_bound(
    realms: Any,  # noqa: F811
    monkeypatch: Any,
) -> Any:
    """Over real mutual TLS, a.example's certificate sends presence for 300 users of
    its own that no one on b.example hears: b.example keeps the newest of them only
    (MAX_UNHEARD_PER_REALM, 100 here), not one entry per name for ever."""
    from chatproto.realm import presence

    monkeypatch.setattr(presence, "MAX_UNHEARD_PER_REALM", 100, raising=False)
    a, b = yield realms(["a.example", "b.example"])
    peer = yield raw_peer(b, "a.example", _cert(a), a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    for n in range(300):
        peer.send({"type": "presence", "user": f"u{n}@a.example", "status": "online"})
    peer.send({"type": "ping"})  # answered after the presence frames were handled
    yield until(lambda: len(peer.frames) == 2, timeout=30)
    assert peer.frames[1] == {"type": "pong"}
    assert sorted(b.realm.presence.remote) == sorted(f"u{n}@a.example" for n in range(200, 300))
    peer.transport.loseConnection()


def _hello_over_stdlib_tls(port: int, ctx: ssl.SSLContext, session: Any) -> Any:
    """(In a thread.)  Say hello as a.example over TLS with ``ctx``, resuming
    ``session`` if given; the frame that answers, whether the session was resumed,
    and the session to resume next."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="b.example", session=session) as s:
        hello = json.dumps({"type": "hello", "version": 1, "realm": "a.example"}).encode()
        s.sendall(struct.pack("!I", len(hello)) + hello)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "closed without a word"
            data += chunk
        return json.loads(data[4:]), s.session_reused, s.session


@pytest_twisted.inlineCallbacks
def test_a_refused_certificate_cannot_come_back_by_resuming_its_tls_session(
    realms: Any,  # noqa: F811
    tmp_path: Any,
) -> Any:
    """A certificate naming a.example from a CA b.example does not trust is refused;
    the same client resuming the TLS session of that refused connection (where no
    chain is checked) was welcomed as a.example, with TLS 1.2 session ids and TLS 1.3
    tickets alike.  Sessions are not resumed any more, so each connection's
    certificate is checked; a.example's genuine certificate is welcomed every time."""
    a, b = yield realms(["a.example", "b.example"])
    evil = tls.write_dev_certs(str(tmp_path / "evil"), "a.example")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        for cert, expect in ((evil, "error"), (_cert(a), "welcome")):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.maximum_version = version
            ctx.load_cert_chain(cert["cert"], cert["key"])
            session = None
            for attempt in range(2):
                got, resumed, session = yield deferToThread(
                    _hello_over_stdlib_tls, b.fed_port, ctx, session
                )
                assert got["type"] == expect, (version, attempt, got)
                assert not resumed, (version, attempt)
                if expect == "error":
                    assert got["code"] == "untrusted_peer"
                    assert "not trusted" in got["message"]


@pytest_twisted.inlineCallbacks
def test_a_realm_opening_links_without_end_gets_a_few(realms: Any) -> Any:  # noqa: F811
    """Over real mutual TLS: a.example's certificate opens links to b.example; the
    first MAX_LINKS_PER_REALM are welcomed, the next is refused (rate_limited) while
    they are open; once one closes, a new one is welcomed."""
    from chatproto.federation import MAX_LINKS_PER_REALM

    a, b = yield realms(["a.example", "b.example"])
    peers = []
    for _ in range(MAX_LINKS_PER_REALM + 1):
        peer = yield raw_peer(b, "a.example", _cert(a), a.cfg.federation.ca)
        peer.send({"type": "hello", "version": 1, "realm": "a.example"})
        yield until(lambda peer=peer: peer.frames, timeout=10)
        peers.append(peer)
    assert [p.frames[0]["type"] for p in peers] == ["welcome"] * MAX_LINKS_PER_REALM + ["error"]
    assert peers[-1].frames[0]["code"] == "rate_limited"
    yield peers[-1].lost
    peers[0].transport.loseConnection()
    yield peers[0].lost
    yield until(lambda: len(b.fed.inbound) == MAX_LINKS_PER_REALM - 1, timeout=10)
    again = yield raw_peer(b, "a.example", _cert(a), a.cfg.federation.ca)
    again.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: again.frames, timeout=10)
    assert again.frames[0]["type"] == "welcome"
    for p in [*peers[1:-1], again]:
        p.transport.loseConnection()
