"""Federation over real mutual TLS on loopback: in-process realms (SQLite), clients on
real TCP, links between the realms' federation listeners."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, ssl
from twisted.internet import reactor as _reactor
from twisted.protocols.basic import Int32StringReceiver

from chatproto import tls, wire
from chatproto.client import RemoteError, connect
from chatproto.config import Federation
from chatproto.federation import FederationTLS
from tests.conftest import until
from tests.fedharness import LogCapture, drained, federation, stop_all

PW = "password-1"


@pytest.fixture
def two(realms: Any) -> Any:
    return pytest_twisted.blockon(realms(["a.example", "b.example"]))


@pytest.fixture
def realms(tmp_path: Any) -> Any:
    """``realms(names, **options)``: a Deferred of started federated nodes
    (:func:`tests.fedharness.federation`); every node made is stopped at teardown."""
    made: list[Any] = []

    def started(nodes: list[Any]) -> list[Any]:
        made.extend(nodes)
        return nodes

    def make(names: list[str], **kw: Any) -> Any:
        return federation(tmp_path, names, **kw).addCallback(started)

    yield make
    stop_all(made)


@defer.inlineCallbacks
def alice_and_bob(a: Any, b: Any) -> Any:
    """alice registered and logged in on realm ``a``, bob on ``b``, both synced; fires
    with ``(alice, bob, alice's messages, bob's messages)`` (the lists fill up)."""
    got_alice: list[dict[str, Any]] = []
    got_bob: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got_alice.append)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got_bob.append)
    yield defer.gatherResults([alice.synced, bob.synced])
    return alice, bob, got_alice, got_bob


@pytest_twisted.inlineCallbacks
def test_dms_both_ways(two: Any) -> Any:
    a, b = two
    alice, bob, got_alice, got_bob = yield alice_and_bob(a, b)
    r1 = yield alice.send("bob@b.example", "hi bob")
    assert r1["pos"] > 0
    yield until(lambda: len(got_bob) == 1, timeout=30)
    r2 = yield bob.send("alice@a.example", "hi alice ✓")
    yield until(lambda: len(got_alice) == 2 and len(got_bob) == 2, timeout=30)
    assert [m["body"] for m in got_bob] == ["hi bob", "hi alice ✓"]
    assert [m["body"] for m in got_alice] == ["hi bob", "hi alice ✓"]
    assert got_bob[0]["from"] == "alice@a.example" and got_bob[0]["to"] == "bob@b.example"
    assert got_alice[1]["from"] == "bob@b.example"
    # the same message id on both realms (de-duplication key); positions are per realm
    assert got_bob[0]["msg_id"] == got_alice[0]["msg_id"] == r1["msg_id"]
    assert got_alice[1]["msg_id"] == r2["msg_id"]
    history = yield bob.history("alice@a.example")
    assert [m["body"] for m in history] == ["hi bob", "hi alice ✓"]
    # delivered: the outboxes are empty again
    yield drained(a)
    # each link knows the longest frame its peer takes (from its welcome)
    assert a.fed.links["b.example"].peer_max_frame == b.cfg.federation.max_frame
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_offline_recipient_gets_remote_messages_at_login(two: Any) -> Any:
    a, b = two
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.close()
    for i in range(50):
        yield alice.send("bob@b.example", f"m{i}")
    yield drained(a)
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, on_message=got.append)
    yield bob.synced
    assert [m["body"] for m in got] == [f"m{i}" for i in range(50)]
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_unknown_remote_user_and_policy_errors(two: Any) -> Any:
    a, b = two
    got: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got.append)
    a.cfg.federation.deny = ["c.example"]
    with pytest.raises(RemoteError) as e:
        yield alice.send("carol@c.example", "x")
    assert e.value.code == "peer_denied"
    # an unknown user on b: accepted by a (it cannot know), rejected by b, not stored
    sent = yield alice.send("nobody@b.example", "x")
    yield until(lambda: a.fed.links["b.example"].rejected_items == 1, timeout=30)
    items = yield b.realm.store.read_feed("nobody@b.example", 0, 10)
    assert items == []
    # ...and alice is told, durably, in her conversation with nobody@b.example
    yield until(lambda: any(m["kind"] == "bounce" for m in got), timeout=30)
    bounce = got[-1]
    assert bounce["kind"] == "bounce" and bounce["to"] == "alice@a.example"
    assert bounce["from"] == "nobody@b.example"
    assert bounce["meta"] == {"id": sent["msg_id"], "code": "no_such_user", "realm": "b.example"}
    assert "refused by b.example: no_such_user" in bounce["body"]
    feed = yield a.realm.store.read_feed("alice@a.example", 0, 10)
    assert [m.kind for m in feed] == ["text", "bounce"]  # stored in her stream
    history = yield alice.history("nobody@b.example")
    assert [m["kind"] for m in history] == ["text", "bounce"]
    yield drained(a)
    yield alice.close()


@pytest_twisted.inlineCallbacks
def test_peer_down_then_back_queued_messages_arrive_without_anyone_speaking(
    two: Any, logs: Any
) -> Any:
    a, b = two
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield alice.send("bob@b.example", "before")  # a's link to b is up
    yield drained(a)
    port = b.fed_port
    yield b.stop_federation()  # b's federation listener is down
    for i in range(20):
        yield alice.send("bob@b.example", f"queued {i}")
    counts = yield a.realm.store.outbox_counts()
    assert counts == {"b.example": 20}
    link = a.fed.links["b.example"]
    yield until(lambda: link.failures >= 2)  # a retries with backoff meanwhile
    # b closed its links cleanly; what a shows is why the retries fail, not the loss
    assert logs.has("federation: link to b.example lost: Connection was closed cleanly")
    assert link.last_error.startswith(f"cannot connect to 127.0.0.1:{port}: ")
    assert "refused" in link.last_error.lower()
    assert logs.has(f"failed (cannot connect to 127.0.0.1:{port}: ")
    got: list[dict[str, Any]] = []
    bob2 = yield connect(_reactor, b.addr, "bob", PW, on_message=got.append)
    yield bob2.synced
    # b comes back on the same port; nobody sends anything
    b.cfg.federation.port = port
    b.fed.startService()
    queued = lambda: [m["body"] for m in got if m["body"] != "before"]  # noqa: E731
    yield until(lambda: len(queued()) == 20, timeout=30)
    assert queued() == [f"queued {i}" for i in range(20)]
    yield drained(a)
    yield alice.close()
    yield bob.close()
    yield bob2.close()


@pytest_twisted.inlineCallbacks
def test_a_peer_that_never_comes_back_bounces_after_give_up_after(realms: Any) -> Any:
    nodes = yield realms(["a.example", "b.example"], give_up_after=1.0)
    a, b = nodes
    yield b.stop_federation()  # b is gone for good
    got: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got.append)
    sent = yield alice.send("bob@b.example", "are you there?")
    # a's periodic sweep (every second here) gives up once the link has been down
    # a second, and alice is told
    yield until(lambda: any(m["kind"] == "bounce" for m in got), timeout=30)
    bounce = got[-1]
    assert bounce["meta"]["id"] == sent["msg_id"]
    assert bounce["meta"]["code"] == "peer_unreachable"
    yield drained(a)  # the row goes after the bounce is committed (and seen)
    yield alice.close()


@pytest_twisted.inlineCallbacks
def test_an_item_too_large_for_the_peer_bounces_and_the_link_goes_on(realms: Any) -> Any:
    """b.example takes frames up to 64 KiB (its welcome says so); a.example allows
    longer messages.  alice's long one bounces at a.example instead of being sent (b
    would close the link on it every time); the next message still arrives."""

    def limits(nodes: list[Any]) -> None:
        a_cfg = nodes[0].cfg
        a_cfg.limits.max_frame = 1024 * 1024
        a_cfg.limits.max_body = 200_000
        nodes[1].cfg.federation.max_frame = 65536

    a, b = yield realms(["a.example", "b.example"], before_start=limits)
    got_alice: list[dict[str, Any]] = []
    got_bob: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got_alice.append)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got_bob.append)
    yield alice.send("bob@b.example", "first")  # the link connects: b's welcome
    yield until(lambda: a.fed.links["b.example"].peer_max_frame == 65536, timeout=30)
    big = yield alice.send("bob@b.example", "\x01" * 20_000)  # 120 KB as JSON
    yield alice.send("bob@b.example", "short")
    yield until(lambda: any(m["kind"] == "bounce" for m in got_alice), timeout=30)
    bounce = next(m for m in got_alice if m["kind"] == "bounce")
    assert (bounce["meta"]["id"], bounce["meta"]["code"]) == (big["msg_id"], "too_large")
    yield until(lambda: [m["body"] for m in got_bob] == ["first", "short"], timeout=30)
    yield drained(a)
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_a_peer_that_goes_silent_is_dropped_and_retried(realms: Any, logs: Any) -> Any:
    """b.example accepts the connection and the TLS handshake, then says nothing (a
    hung process, a half-open connection): a.example's link does not wait forever --
    it closes the connection after three keepalive intervals and tries again."""
    from chatproto.federation import InboundProtocol

    class Hung(InboundProtocol):
        def handle_hello(self, req: dict[str, Any]) -> None:
            pass  # never welcomes

        def start_keepalive(self, clock: Any, interval: float) -> None:
            pass

    def hang(nodes: Any) -> None:
        nodes[1].fed.factory.protocol = Hung

    nodes = yield realms(["a.example", "b.example"], before_start=hang, keepalive=0.2)
    alice = yield connect(_reactor, nodes[0].addr, "alice", PW, register=True)
    yield alice.send("bob@b.example", "anyone?")  # a's link connects
    yield alice.close()
    link = nodes[0].fed.links["b.example"]
    yield until(lambda: logs.has("federation: b.example is silent"), timeout=30)
    yield until(lambda: link.failures >= 1 and "no frame" in link.last_error, timeout=30)
    assert link.state != "ready"


# identity and refusals ------------------------------------------------------------------


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    yield capture
    capture.close()


@pytest_twisted.inlineCallbacks
def test_trust_by_pinned_fingerprints_only(realms: Any) -> Any:
    nodes = yield realms(["a.example", "b.example"], pins=True)
    a, b = nodes
    got: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    yield alice.send("bob@b.example", "pinned")
    yield until(lambda: len(got) == 1, timeout=30)
    yield alice.close()
    yield bob.close()


@defer.inlineCallbacks
def _refused(realms: Any, logs: Any, expect: str, **kw: Any) -> Any:
    """a.example and b.example where b is not what it claims: a message from alice to
    bob stays queued, and both sides log ``expect``."""
    nodes = yield realms(["a.example", "b.example"], **kw)
    a, b = nodes
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    yield connect(_reactor, b.addr, "bob", PW, register=True).addCallback(lambda c: c.close())
    yield alice.send("bob@b.example", "must not arrive")
    link = a.fed.links["b.example"]
    yield until(lambda: link.failures >= 2, timeout=30)
    yield until(lambda: logs.has(expect), timeout=30)
    assert link.state != "ready"
    assert expect in link.last_error
    counts = yield a.realm.store.outbox_counts()
    assert counts == {"b.example": 1}
    items = yield b.realm.store.read_feed("bob@b.example", 0, 10)
    assert items == []
    yield alice.close()
    return nodes


@pytest_twisted.inlineCallbacks
def test_certificate_for_another_realm_name_is_refused(
    realms: Any, tmp_path: Any, logs: Any
) -> Any:
    other = tls.write_dev_certs(str(tmp_path / "certs"), "c.example")
    nodes = yield _refused(
        realms, logs, "certificate is for c.example, not b.example", certs={"b.example": other}
    )
    # b's own link to a (it has something to send): refused by a's listener, with the
    # reason in a's log
    bob = yield connect(_reactor, nodes[1].addr, "bob", PW)
    yield bob.send("alice@a.example", "must not arrive either")
    yield until(lambda: logs.has("refused inbound link from"), timeout=30)
    yield bob.close()
    assert logs.has("claiming b.example: certificate is for c.example, not b.example")


@pytest_twisted.inlineCallbacks
def test_certificate_from_an_untrusted_ca_is_refused(realms: Any, tmp_path: Any, logs: Any) -> Any:
    rogue = tls.write_dev_certs(str(tmp_path / "rogue-ca"), "b.example")
    nodes = yield _refused(realms, logs, "untrusted CA", certs={"b.example": rogue})
    bob = yield connect(_reactor, nodes[1].addr, "bob", PW)  # b has something for a
    yield bob.send("alice@a.example", "must not arrive either")
    yield until(lambda: logs.has("claiming b.example: certificate not trusted"), timeout=30)
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_wrong_certificate_for_a_pinned_peer_is_refused(
    realms: Any, tmp_path: Any, logs: Any
) -> Any:
    # b presents a valid certificate for its name from the shared CA, but not the one
    # a pinned: the pin wins.
    other = tls.write_dev_certs(str(tmp_path / "elsewhere"), "b.example")
    with open(other["cert"], "rb") as f:
        wrong_pin = tls.fingerprint(f.read())

    def pin(nodes: Any) -> None:
        nodes[0].cfg.federation.peer("b.example").fingerprint = wrong_pin

    nodes = yield realms(["a.example", "b.example"], before_start=pin)
    a = nodes[0]
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    yield alice.send("bob@b.example", "x")
    link = a.fed.links["b.example"]
    yield until(lambda: logs.has("is not the pinned " + wrong_pin), timeout=30)
    assert link.state != "ready"
    yield alice.close()


class RawPeer(Int32StringReceiver):
    """A hand-driven federation client (for misbehaving and forging peers)."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def stringReceived(self, payload: bytes) -> None:
        self.frames.append(wire.decode(payload))

    def send(self, obj: dict[str, Any]) -> None:
        self.sendString(wire.encode(obj))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@defer.inlineCallbacks
def raw_peer(target: Any, as_realm: str, cert: dict[str, str] | None, ca: str) -> Any:
    """Connect to ``target``'s federation listener presenting ``cert`` (None: none)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.internet.protocol import Factory

    if cert is not None:
        cfg = Federation(certificate=cert["cert"], private_key=cert["key"], ca=ca)
        creator: Any = FederationTLS(cfg).client(target.name)
    else:
        creator = ssl.CertificateOptions(verify=False)
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(_reactor, "127.0.0.1", target.fed_port))
    proto = yield endpoint.connect(Factory.forProtocol(RawPeer))
    return proto


@pytest_twisted.inlineCallbacks
def test_no_client_certificate_is_refused(two: Any, logs: Any) -> Any:
    a, b = two
    peer = yield raw_peer(b, "a.example", None, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield peer.lost
    assert peer.frames[0]["type"] == "error" and peer.frames[0]["code"] == "untrusted_peer"
    assert logs.has("claiming a.example: presented no certificate")


@pytest_twisted.inlineCallbacks
def test_a_peer_flooding_presence_is_refused_and_held_off(realms: Any, logs: Any) -> Any:
    """Over real TLS: a peer past the presence rate gets ``rate_limited``, is
    disconnected, and its next hello is refused for a while (backoff)."""
    from chatproto.federation import PRESENCE_BURST

    # the penalty (retry_initial doubled) must outlast a new TLS handshake
    a, b = yield realms(["a.example", "b.example"], retry_initial=5.0, retry_max=10.0)
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    frame = {"type": "presence", "user": "alice@a.example", "status": "away"}
    for _ in range(int(PRESENCE_BURST) + 500):
        peer.send(frame)
    yield until(lambda: peer.lost.called, timeout=30)
    assert [f["type"] for f in peer.frames] == ["welcome", "error"]
    assert peer.frames[1]["code"] == "rate_limited"
    assert logs.has("a.example misbehaved")
    again = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    again.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield again.lost
    assert again.frames[0]["code"] == "rate_limited"


@pytest_twisted.inlineCallbacks
def test_a_peer_forging_a_user_of_a_third_realm_is_refused(two: Any, logs: Any) -> Any:
    a, b = two
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    yield bob.synced
    # a.example's genuine certificate: the link is accepted, the forgery is not
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    item = {"kind": "text", "to": "bob@b.example", "ts": 1.0}
    peer.send(
        {
            "type": "txn",
            "id": "1-2",
            "items": [
                {**item, "id": "forged-1", "from": "mallory@c.example", "body": "forged"},
                {**item, "id": "genuine-1", "from": "alice@a.example", "body": "genuine"},
            ],
        }
    )
    yield until(lambda: len(peer.frames) == 2, timeout=30)
    welcome, ack = peer.frames
    assert welcome == {
        "type": "welcome",
        "version": 1,
        "realm": "b.example",
        "max_frame": 4194304,
        "keys": b.realm.signing.announce(),
    }
    assert ack["type"] == "ack" and ack["id"] == "1-2"
    assert [(r["id"], r["code"]) for r in ack["rejected"]] == [("forged-1", "forged_sender")]
    yield until(lambda: len(got) == 1, timeout=30)
    assert got[0]["body"] == "genuine" and got[0]["from"] == "alice@a.example"
    assert logs.has("rejected item forged-1 from a.example: forged_sender")
    # the same transaction again (a retry): nothing is stored twice
    peer.send(
        {
            "type": "txn",
            "id": "1-2",
            "items": [{**item, "id": "genuine-1", "from": "alice@a.example", "body": "genuine"}],
        }
    )
    yield until(lambda: len(peer.frames) == 3, timeout=30)
    assert peer.frames[2] == {"type": "ack", "id": "1-2"}
    items = yield b.realm.store.read_feed("bob@b.example", 0, 10)
    assert [e.body for e in items] == ["genuine"]
    peer.transport.loseConnection()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_a_peer_reaching_us_resets_our_backoff(realms: Any) -> Any:
    """a waits 30 s before retrying b; b coming back connects to a (it has something for
    a), and that alone makes a deliver its queue at once."""

    def slow_retries(nodes: Any) -> None:
        nodes[0].cfg.federation.retry_initial = 30.0
        nodes[0].cfg.federation.retry_max = 60.0

    nodes = yield realms(["a.example", "b.example"], before_start=slow_retries)
    a, b = nodes
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    yield alice.send("bob@b.example", "before the outage")
    link = a.fed.links["b.example"]
    yield until(lambda: link.state == "ready" and len(got) == 1, timeout=30)
    port = b.fed_port
    yield b.stop_federation()
    yield alice.send("bob@b.example", "after the outage")
    yield bob.send("alice@a.example", "b is back")  # queued on b for a
    yield until(lambda: link.state == "backoff", timeout=30)
    assert link.retry_in is not None and link.retry_in >= 27
    b.cfg.federation.port = port
    b.fed.startService()
    yield until(lambda: len(got) == 3, timeout=10)  # well before a's 27+ s retry
    assert [m["body"] for m in got[1:]] == ["b is back", "after the outage"] or [
        m["body"] for m in got[1:]
    ] == ["after the outage", "b is back"]
    assert link.state == "ready" and link.failures == 0
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_three_realms_each_writes_to_the_next(realms: Any) -> Any:
    names = ["a.example", "b.example", "c.example"]
    nodes = yield realms(names)
    got: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    conns = []
    for node in nodes:
        conn = yield connect(
            _reactor, node.addr, "user", PW, register=True, on_message=got[node.name].append
        )
        yield conn.synced
        conns.append(conn)
    for i, conn in enumerate(conns):
        target = names[(i + 1) % 3]
        yield conn.send(f"user@{target}", f"from {names[i]} to {target}")
    yield until(lambda: all(len(m) == 2 for m in got.values()), timeout=30)
    for i, name in enumerate(names):
        bodies = sorted(m["body"] for m in got[name])
        before, after = names[i - 1], names[(i + 1) % 3]
        assert bodies == sorted([f"from {before} to {name}", f"from {name} to {after}"])
    for conn in conns:
        yield conn.close()


# groups across realms ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_group_spanning_three_realms(realms: Any) -> Any:
    """#dev lives on h.example; members on a.example and b.example join through their
    own realms, write through them, are sent each message once per realm, and obey
    h.example's permissions (joins, kicks)."""
    nodes = yield realms(["h.example", "a.example", "b.example"])
    h, a, b = nodes
    got: dict[str, list[dict[str, Any]]] = {}

    @defer.inlineCallbacks
    def user(node: Any, name: str) -> Any:
        inbox = got.setdefault(f"{name}@{node.name}", [])
        conn = yield connect(_reactor, node.addr, name, PW, register=True, on_message=inbox.append)
        yield conn.synced
        return conn

    owner = yield user(h, "owner")
    alice = yield user(a, "alice")
    bob = yield user(b, "bob")
    bob2 = yield user(b, "bob2")
    yield owner.create_group("#dev")
    yield owner.create_group("#secret", visibility="invite")
    group = "#dev@h.example"

    def heard_join(who: str, joiner: str) -> bool:
        return any(
            m.get("meta", {}).get("event") == "joined" and m["meta"].get("user") == joiner
            for m in got[who]
        )

    for conn, who in ((alice, "alice@a.example"), (bob, "bob@b.example"), (bob2, "bob2@b.example")):
        pending = yield conn.join(group)
        assert pending["pos"] == 0  # decided by h.example; the event comes from there
        # A join is only queued when join() returns: h.example decides the order of
        # joins arriving from different realms.  A realm joining after the others gets
        # their membership in a snapshot, not as join events (PROTOCOL.md, "mirror"),
        # so each join is decided before the next is asked for.
        yield until(lambda who=who: heard_join(who, who), timeout=30)
    # everyone hears the joins after their own (the owner on h, each member through
    # their realm)
    yield until(
        lambda: (
            sum(m.get("meta", {}).get("event") == "joined" for m in got["owner@h.example"]) == 3
        ),
        timeout=30,
    )
    yield until(lambda: heard_join("alice@a.example", "bob2@b.example"), timeout=30)
    yield until(lambda: heard_join("bob@b.example", "bob2@b.example"), timeout=30)
    # ...and every realm has them (alice's view says nothing of b.example's)
    for conn in (owner, alice, bob, bob2):
        members = yield conn.members(group)
        assert sorted(m["user"] for m in members) == sorted(
            ["owner@h.example", "alice@a.example", "bob@b.example", "bob2@b.example"]
        )
    yield drained(h)
    sent_to_b = h.fed.links["b.example"].sent_items
    yield owner.send(group, "hello all")
    yield alice.send(group, "hi from a")
    yield bob.send(group, "hi from b")

    def texts(who: str) -> list[str]:
        return [m["body"] for m in got[who] if m.get("kind") == "text"]

    everyone = ["owner@h.example", "alice@a.example", "bob@b.example", "bob2@b.example"]
    yield until(lambda: all(len(texts(u)) == 3 for u in everyone), timeout=30)
    for u in everyone:
        assert sorted(texts(u)) == sorted(["hello all", "hi from a", "hi from b"])
    # two members on b.example, one copy per message: "hello all" and "hi from a"
    # (b.example's own "hi from b" is not sent back to it)
    assert h.fed.links["b.example"].sent_items - sent_to_b == 2
    # h.example's rules: an invite-only group refuses a remote join...
    pending = yield alice.join("#secret@h.example")
    yield until(lambda: a.fed.links["h.example"].rejected_items == 1, timeout=30)
    assert "alice@a.example" not in h.realm.groups.get("#secret@h.example").members
    # ...a plain member may not kick; the owner may (a member on another realm)
    yield alice.kick(group, "bob@b.example")
    yield until(lambda: a.fed.links["h.example"].rejected_items == 2, timeout=30)
    # alice hears of both refusals, in the conversations they concern
    yield until(lambda: sum(m["kind"] == "bounce" for m in got["alice@a.example"]) == 2, timeout=30)
    refused = [m for m in got["alice@a.example"] if m["kind"] == "bounce"]
    assert [(m["from"], m["meta"]["code"], m["meta"]["event"]) for m in refused] == [
        ("#secret@h.example", "not_invited", "joined"),
        (group, "forbidden", "kicked"),
    ]
    assert refused[0]["meta"]["id"] == pending["msg_id"]
    assert "your join request for #secret@h.example was refused" in refused[0]["body"]
    yield owner.kick(group, "bob@b.example")
    yield until(
        lambda: any(m.get("meta", {}).get("event") == "kicked" for m in got["bob@b.example"]),
        timeout=30,
    )
    yield owner.send(group, "after the kick")
    yield until(lambda: "after the kick" in texts("bob2@b.example"), timeout=30)
    assert "after the kick" not in texts("bob@b.example")
    with pytest.raises(RemoteError) as e:
        yield bob.send(group, "still here?")
    assert e.value.code == "not_member"
    # history of the group on a member's own realm (once it has the last message:
    # h.example sends it to each member realm on its own link)
    yield until(lambda: "after the kick" in texts("alice@a.example"), timeout=30)
    history = yield alice.history(group)
    assert [m["body"] for m in history if m["kind"] == "text"][-1] == "after the kick"
    for conn in (owner, alice, bob, bob2):
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_presence_of_a_dm_partner_on_another_realm(two: Any) -> Any:
    a, b = two
    seen: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_presence=seen.append)
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    yield alice.send("bob@b.example", "hi")
    yield until(lambda: len(got) == 1, timeout=30)
    yield bob.set_status("away", "lunch")
    yield until(lambda: any(p.get("status") == "away" for p in seen), timeout=30)
    assert {"type": "presence", "user": "bob@b.example", "status": "away", "text": "lunch"} in seen
    yield bob.close()
    yield until(lambda: seen[-1].get("status") == "offline", timeout=30)
    assert seen[-1]["user"] == "bob@b.example"
    yield alice.close()


@pytest_twisted.inlineCallbacks
def test_running_realm_writes_link_state_for_chatrealmctl_peers(
    two: Any, tmp_path: Any, capsys: Any
) -> Any:
    import os

    from chatproto import ctl
    from chatproto.federation import STATUS_FILE

    a, _b = two
    path = os.path.join(a.cfg.data_dir, STATUS_FILE)

    def written() -> bool:
        if not os.path.exists(path):
            return False
        with open(path) as f:
            return '"state": "idle"' in f.read()

    yield until(written, timeout=30)  # nothing to send yet: idle links, both ways
    conf = tmp_path / "ctl.toml"
    conf.write_text('[realm]\nname = "a.example"\n')
    assert ctl.main(["--config", str(conf), "--data-dir", a.cfg.data_dir, "peers"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("b.example"))
    assert line.split()[:5] == ["b.example", "0", "idle", "-", "0"]
    # traffic shows in the counts: sent, refused (bounced)
    bob = yield connect(_reactor, _b.addr, "bob", PW, register=True)
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    for body in ("one", "two", "three"):
        yield alice.send("bob@b.example", body)
    yield alice.send("nobody@b.example", "four")

    def counted() -> bool:
        with open(path) as f:
            link = json.load(f)["links"][0]
        return bool(link["sent_items"] == 4 and link["rejected_items"] == 1)

    yield until(counted, timeout=30)
    assert ctl.main(["--config", str(conf), "--data-dir", a.cfg.data_dir, "peers"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("b.example"))
    assert line.split()[2] == "ready" and line.split()[5:8] == ["4", "1", "0"]
    yield alice.close()
    yield bob.close()


# files across realms ----------------------------------------------------------------------


class Collect:
    """An IConsumer collecting a download."""

    def __init__(self) -> None:
        self.data = b""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data


@defer.inlineCallbacks
def upload(node: Any, sender: str, to: str, data: bytes) -> Any:
    import hashlib

    files = node.realm.files
    up = yield files.offer(sender, to, "photo.jpg", len(data), hashlib.sha256(data).hexdigest())
    for i in range(0, len(data), 65536):
        yield files.write(sender, up.upload_id, i, data[i : i + 65536])
    result = yield files.finish(sender, up.upload_id)
    return result


@pytest_twisted.inlineCallbacks
def test_a_file_across_realms_is_downloaded_from_the_recipients_realm(two: Any) -> Any:
    import os

    a, b = two
    got: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    data = os.urandom(700_000)  # several data frames
    info, _ = yield upload(a, "alice@a.example", "bob@b.example", data)
    yield until(lambda: len(got) == 1, timeout=30)
    msg = got[0]
    assert msg["kind"] == "file" and msg["from"] == "alice@a.example"
    assert msg["meta"]["file_id"] == info.file_id and msg["meta"]["size"] == len(data)
    # bob downloads from his own realm, which fetched and verified the bytes
    download = yield b.realm.files.open_download("bob@b.example", info.file_id)
    sink = Collect()
    yield download.start(sink)
    assert sink.data == data
    # a peer may fetch only files sent to its users
    from chatproto.errors import ChatError

    with pytest.raises(ChatError) as refused:
        yield a.realm.files.serve_remote("c.example", info.file_id)
    assert refused.value.code == "no_such_file"
    yield drained(a)
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_a_file_deleted_while_a_peer_fetches_it_is_not_served_further(two: Any) -> Any:
    """b.example fetches the bytes of alice's 16 MiB file to bob from a.example and
    stops reading the link after the first bytes; alice deletes the file meanwhile.
    a.example kept serving the deleted file's bytes to the end (and b.example stored
    the file, bob received it).  Now a.example stops reading it at once and answers
    the fetch with ``fetch_error`` ``no_such_file``: b.example rejects the item (alice
    gets a bounce) and bob never sees the file."""
    import os

    a, b = two
    alice, bob, got_alice, got_bob = yield alice_and_bob(a, b)
    held: list[Any] = []
    receive_blob = b.realm.files.receive_blob

    def slow_blob(sha256: str, size: int) -> Any:
        blob = receive_blob(sha256, size)
        write = blob.write

        def first_write(data: bytes) -> Any:
            if not held:  # b.example reads no more of the link from a.example
                held.extend(p for p in b.fed.inbound if p.peer_realm == "a.example")
                for proto in held:
                    proto.hold_reading("test")
            return write(data)

        blob.write = first_write
        return blob

    b.realm.files.receive_blob = slow_blob
    size = 16 * 1024 * 1024
    data = os.urandom(size)
    info, env = yield upload(a, "alice@a.example", "bob@b.example", data)
    yield until(lambda: held, timeout=30)
    yield alice.delete(env.id)
    sent = a.realm.stats.file_bytes_out  # (counted when a download ends)
    for proto in held:
        proto.release_reading("test")
    yield until(lambda: any(m["kind"] == "bounce" for m in got_alice), timeout=30)
    assert 0 < sent < size  # a.example served the file no more once it was deleted
    assert not a.realm.files.downloads
    bounce = next(m for m in got_alice if m["kind"] == "bounce")
    assert (bounce["meta"]["id"], bounce["meta"]["code"]) == (env.id, "no_such_file")
    yield drained(a)  # the delete too: b.example refuses it (it has no such item)
    assert a.realm.stats.file_bytes_out == sent
    assert not [m for m in got_bob if m["kind"] == "file"]
    assert (yield b.realm.store.file_info(info.file_id)) is None
    assert not os.path.exists(b.realm.files.store.blob_path(info.sha256))
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_files_in_a_group_spanning_three_realms(realms: Any, tmp_path: Any) -> Any:
    """#dev lives on h.example, with members on a.example and b.example.  A file sent
    by alice through a.example is fetched by h.example from a.example, then by
    b.example from h.example; one sent by the owner on h.example is fetched by a.example
    and b.example from h.example.  Every member downloads identical bytes from their
    own realm, over the client protocol."""
    import hashlib
    import os

    nodes = yield realms(["h.example", "a.example", "b.example"])
    h, a, b = nodes
    got: dict[str, list[dict[str, Any]]] = {}
    conns: dict[str, Any] = {}
    for node, name in ((h, "owner"), (a, "alice"), (b, "bob"), (b, "bob2")):
        who = f"{name}@{node.name}"
        inbox = got.setdefault(who, [])
        conns[who] = yield connect(
            _reactor, node.addr, name, PW, register=True, on_message=inbox.append
        )
        yield conns[who].synced
    group = "#dev@h.example"
    yield conns["owner@h.example"].create_group("#dev")
    for who in ("alice@a.example", "bob@b.example", "bob2@b.example"):
        yield conns[who].join(group)
    yield until(lambda: len(h.realm.groups.get(group).members) == 4, timeout=30)
    yield drained(h)  # the member realms' mirrors know their own members

    def files_of(who: str) -> list[dict[str, Any]]:
        return [m for m in got[who] if m.get("kind") == "file"]

    everyone = list(conns)
    home_of = {"owner@h.example": h, "alice@a.example": a, "bob@b.example": b}
    home_of["bob2@b.example"] = b
    sources = [
        ("alice@a.example", os.urandom(700_000)),
        ("owner@h.example", os.urandom(300_001)),
    ]
    for n, (sender, data) in enumerate(sources, 1):
        path = tmp_path / f"upload-{n}.bin"
        path.write_bytes(data)
        sent = yield conns[sender].send_file(group, str(path))
        yield until(lambda n=n: all(len(files_of(u)) == n for u in everyone), timeout=30)
        for who in everyone:
            msg = files_of(who)[-1]
            assert msg["msg_id"] == sent["msg_id"] and msg["from"] == sender
            assert msg["to"] == group and msg["meta"]["file_id"] == sent["file"]
            assert msg["meta"]["sha256"] == hashlib.sha256(data).hexdigest()
            target = tmp_path / f"{who}-{n}.bin"
            yield conns[who].download(sent["file"], str(target))
            assert target.read_bytes() == data
            # from their own realm: the bytes are in its file store
            blob = home_of[who].realm.files.store.blob_path(msg["meta"]["sha256"])
            assert os.path.exists(blob)
    for node in nodes:
        yield drained(node)
    # a.example sent its file to h.example only; h.example forwarded it once to
    # b.example (two members there), never back to a.example
    assert a.fed.links["h.example"].sent_items >= 1
    assert "b.example" not in a.fed.links or a.fed.links["b.example"].sent_items == 0
    # acknowledged everywhere: no peer may fetch either file any more
    from chatproto.errors import ChatError

    first = files_of("bob@b.example")[0]["meta"]["file_id"]
    for node, peer in ((a, "h.example"), (h, "b.example"), (h, "a.example")):
        with pytest.raises(ChatError) as refused:
            yield node.realm.files.serve_remote(peer, first)
        assert refused.value.code == "no_such_file"
    for conn in conns.values():
        yield conn.close()


DEV = "#dev@h.example"


@defer.inlineCallbacks
def dev_group(nodes: list[Any], got: dict[str, list[dict[str, Any]]] | None = None) -> Any:
    """On nodes h, a, b: owner@h creates #dev@h.example, alice@a and bob@b join; fires
    with the three connections (by name) once h has all three members and its outbox
    is drained.  ``got``: each user's items are collected under their name."""
    h, a, b = nodes
    conns = {}
    for node, name in ((h, "owner"), (a, "alice"), (b, "bob")):
        kw = {"on_message": got.setdefault(name, []).append} if got is not None else {}
        conns[name] = yield connect(_reactor, node.addr, name, PW, register=True, **kw)
    yield conns["owner"].create_group("#dev")
    for name in ("alice", "bob"):
        yield conns[name].join(DEV)
    yield until(lambda: len(h.realm.groups.get(DEV).members) == 3, timeout=30)
    yield drained(h)
    return conns


@pytest_twisted.inlineCallbacks
def test_a_group_file_forged_by_a_member_realm_is_rejected(realms: Any, logs: Any) -> Any:
    """a.example may carry its own users' files to h.example's group, not those of
    b.example's users, and never to b.example directly (only the home realm fans out)."""
    import hashlib

    nodes = yield realms(["h.example", "a.example", "b.example"])
    h, a, b = nodes
    conns = yield dev_group(nodes)
    group = DEV
    data = b"not really bob's"
    meta = {
        "file_id": "0123456789abcdef0123456789abcdef",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "name": "x.bin",
        "media_type": "application/octet-stream",
    }
    from chatproto.envelope import Envelope, new_message_id

    forged = [
        Envelope(new_message_id(), "file", "bob@b.example", group, 1.0, "x.bin", dict(meta)),
        Envelope(
            new_message_id(),
            "file",
            "alice@a.example",
            group,
            1.0,
            "x.bin",
            {**meta, "file_id": "fedcba9876543210fedcba9876543210"},
        ),
    ]
    # queued by a.example as if it had sent them (the bytes are not even there)
    yield a.realm.store.append([forged[0]], [("h.example", forged[0])])
    yield a.realm.store.append([forged[1]], [("b.example", forged[1])])
    a.fed.wake("h.example")
    a.fed.wake("b.example")
    yield until(
        lambda: (
            a.fed.links["h.example"].rejected_items == 1
            and a.fed.links["b.example"].rejected_items == 1
        ),
        timeout=30,
    )
    for env in forged:  # logged by the receiving realm with the reason
        assert logs.has(f"rejected item {env.id} from a.example: forged_sender")
    for node in (h, b):
        for env in forged:
            info = yield node.realm.store.file_info(env.meta["file_id"])
            assert info is None
    for conn in conns.values():
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_a_group_file_too_large_for_the_home_realm_bounces_and_goes_nowhere(
    realms: Any, tmp_path: Any
) -> Any:
    """h.example takes files up to 1000 bytes; a.example more.  alice's larger file to
    h.example's group stays with a.example's members: h.example refuses it
    (too_large, before any byte is fetched), forwards it nowhere, and alice is told."""

    def small_home(nodes: list[Any]) -> None:
        nodes[0].realm.files.config.max_file_size = 1000

    nodes = yield realms(["h.example", "a.example", "b.example"], before_start=small_home)
    h, _a, b = nodes
    got: dict[str, list[dict[str, Any]]] = {}
    conns = yield dev_group(nodes, got)
    group = DEV
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 5000)
    sent = yield conns["alice"].send_file(group, str(path))
    yield until(lambda: any(m.get("kind") == "bounce" for m in got["alice"]), timeout=30)
    bounce = next(m for m in got["alice"] if m.get("kind") == "bounce")
    assert bounce["from"] == group and bounce["meta"]["code"] == "too_large"
    assert bounce["meta"]["id"] == sent["msg_id"]
    assert bounce["body"].startswith(f"your file big.bin to {group} was refused")
    yield conns["owner"].send(group, "after the file")  # the link goes on
    yield until(lambda: any(m.get("body") == "after the file" for m in got["bob"]), timeout=30)
    assert not [m for m in got["owner"] + got["bob"] if m.get("kind") == "file"]
    assert (yield h.realm.store.file_info(sent["file"])) is None
    assert (yield b.realm.store.file_info(sent["file"])) is None
    for conn in conns.values():
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_an_irc_user_talks_across_realms(realms: Any) -> Any:
    """bob uses irssi-style IRC on b.example: he joins a.example's #dev as
    ``#dev/a.example``, reads alice's messages there and writes back, and DMs her as
    ``alice/a.example``; she (native client on a.example) gets both."""
    from chatproto.irc import IRCFactory
    from tests.test_irc_loopback import irc_client

    a, b = yield realms(["a.example", "b.example"])
    b.cfg.irc.enabled = True
    b.cfg.irc.flood_rate = 0.0
    factory = IRCFactory(b.realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        yield b.realm.create_user("bob", PW)
        got: list[dict[str, Any]] = []
        alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got.append)
        yield alice.synced
        yield alice.create_group("#dev")
        bob = yield irc_client(port.getHost().port, "bob", PW)
        yield bob.signed_on
        bob.join("#dev/a.example")  # no such group on b.example: a.example decides
        yield until(lambda: ("joined", "#dev/a.example") in bob.events, timeout=30)
        assert any(" 353 bob = #dev/a.example :" in line for line in bob.raw)
        yield until(lambda: "bob@b.example" in a.realm.groups.get("#dev@a.example").members)
        yield alice.send("#dev", "hello irc")
        yield until(
            lambda: ("privmsg", "alice/a.example", "#dev/a.example", "hello irc") in bob.events,
            timeout=30,
        )
        bob.msg("#dev/a.example", "hi from irc")
        bob.msg("alice/a.example", "a dm from irc")
        yield until(lambda: {"hi from irc", "a dm from irc"} <= {m["body"] for m in got}, 30)
        dm = next(m for m in got if m["body"] == "a dm from irc")
        assert (dm["from"], dm["to"]) == ("bob@b.example", "alice@a.example")
        bob.quit("done")
        yield bob.lost
        yield alice.close()
    finally:
        for proto in list(factory.connections):
            proto.transport.abortConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_tui_user_joins_another_realms_group(realms: Any) -> Any:
    """In the terminal UI, /join of another realm's group says the home realm decides,
    and the conversation becomes joined when the home realm's joined event arrives."""
    from tests.test_tui_loopback import logged_in, notices, register

    a, b = yield realms(["a.example", "b.example"])
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    yield alice.create_group("#dev")
    yield register(b.addr, "bob")
    bob = yield logged_in(b.addr, "bob")
    try:
        yield bob.run("/join #dev@a.example")
        assert bob.model.active == "#dev@a.example"
        assert notices(bob, "#dev@a.example")[-1].startswith("asked a.example to let you in")
        conv = bob.model.conversations["#dev@a.example"]
        assert not conv.joined  # not before a.example says so
        yield until(lambda: conv.joined, timeout=30)
        yield alice.send("#dev", "welcome, bob")
        yield until(lambda: any(i.get("body") == "welcome, bob" for i in conv.items.values()), 30)
    finally:
        yield bob.stop()
        yield alice.close()


@pytest_twisted.inlineCallbacks
def test_a_suspended_user_gets_nothing_from_other_realms(two: Any) -> Any:
    """Items from another realm to a suspended account are refused, and their senders
    get a bounce (chatrealmctl suspend; issue 18)."""
    a, b = two
    got: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got.append)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield b.realm.admin.suspend("bob", "spam")
    assert bob.protocol.lost or (yield until(lambda: bob.protocol.lost)) is None
    sent = yield alice.send("bob@b.example", "are you there?")
    yield until(lambda: any(m["kind"] == "bounce" for m in got), timeout=30)
    bounce = got[-1]
    assert bounce["meta"] == {
        "id": sent["msg_id"],
        "code": "account_suspended",
        "realm": "b.example",
    }
    assert (yield b.realm.store.read_feed("bob@b.example", 0, 10)) == []
    # lifted: the next message arrives
    yield b.realm.admin.unsuspend("bob")
    yield alice.send("bob@b.example", "welcome back")
    yield drained(a)
    feed = yield b.realm.store.read_feed("bob@b.example", 0, 10)
    assert [m.body for m in feed] == ["welcome back"]
    yield alice.close()
