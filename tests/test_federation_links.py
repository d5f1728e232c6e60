"""Links over real mutual TLS on loopback: normal events log plain lines, and a link
with nothing to send idles (no connection, no DNS lookup) until something is
queued for its realm or presence needs it."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory

from chatproto.client import connect
from tests.conftest import until
from tests.fedharness import LogCapture
from tests.test_federation import certs, node  # noqa: F401 (fixtures)
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


@pytest_twisted.inlineCallbacks
def test_a_link_lost_during_a_file_fetch_is_one_plain_line(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """b fetches the bytes of a file item a.example sent; the link goes before they
    come.  The transaction is not acknowledged (a sends it again) and b's log says so
    in one line, without a traceback."""
    a, b = yield realms(["a.example", "b.example"])
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.close()
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    data = b"some bytes"
    meta = {
        "file_id": "F" * 20,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "name": "notes.txt",
        "media_type": "text/plain",
    }
    item = {
        "id": "file-1",
        "kind": "file",
        "from": "alice@a.example",
        "to": "bob@b.example",
        "ts": 1764093000.0,
        "body": "notes.txt",
        "meta": meta,
    }
    peer.send({"type": "txn", "id": "1-1", "items": [item]})
    yield until(lambda: any(f["type"] == "fetch" for f in peer.frames), timeout=30)
    peer.sendString(b"\x00" + data[:4])  # some of the bytes, then the link goes
    peer.transport.abortConnection()
    yield until(lambda: logs.has("lost while storing txn 1-1"), timeout=30)
    assert logs.has("it will be sent again")
    assert not [f for f in peer.frames if f["type"] == "ack"]
    no_tracebacks(logs)


# idle links ------------------------------------------------------------------------------


class CountingResolver:
    """Answers SRV look-ups with ``target`` and counts them."""

    def __init__(self, host: str, port: int) -> None:
        self.lookups: list[str] = []
        self.host, self.port = host, port

    def lookupService(self, name: str) -> Any:
        from types import SimpleNamespace

        from twisted.internet.defer import succeed

        self.lookups.append(name)
        record = SimpleNamespace(port=self.port, target=self.host, priority=0, weight=0)
        return succeed(([SimpleNamespace(payload=record)], [], []))


@defer.inlineCallbacks
def resolve_to_nowhere(b: Any) -> Any:
    """Sets b's resolver to a CountingResolver whose every answer is a port nothing
    listens on (it was listened on, then closed): the realms it finds are "down".
    Deferred: the resolver."""
    closed = _reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    port = closed.getHost().port
    yield closed.stopListening()
    b.fed.resolver = CountingResolver("127.0.0.1", port)
    return b.fed.resolver


@defer.inlineCallbacks
def bob_alone_on_b(make_realms: Any, **federation: Any) -> Any:
    """b.example alone (made by ``make_realms``, the ``realms`` fixture, with
    ``federation`` for its [federation] settings), whose look-ups find nothing
    (:func:`resolve_to_nowhere`: the realms it is sent to are "down"), and bob
    registered and logged in there.  Deferred: ``(b, bob, what bob was sent)``."""
    (b,) = yield make_realms(["b.example"], **federation)
    yield resolve_to_nowhere(b)
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    return b, bob, got


@defer.inlineCallbacks
def peer_denied(d: Any) -> Any:
    """Waits for ``d`` (a client call) to fail with the RemoteError ``peer_denied``.
    Deferred: the error's text."""
    from chatproto.client import RemoteError

    with pytest.raises(RemoteError) as e:
        yield d
    assert e.value.code == "peer_denied"
    return str(e.value)


@defer.inlineCallbacks
def take_two_places(bob: Any, bound: str) -> Any:
    """bob's messages to made-up-1 and made-up-2 are taken (and a second one to
    made-up-1: a realm with a link takes more); to made-up-3 he is refused, the
    error naming ``bound``."""
    yield bob.send("x@made-up-1.example", "one")
    yield bob.send("x@made-up-2.example", "two")
    yield bob.send("y@made-up-1.example", "a realm with a link takes more")
    assert bound in (yield peer_denied(bob.send("x@made-up-3.example", "three")))


@defer.inlineCallbacks
def c_says_hello(b: Any, tmp_path: Any) -> Any:
    """A raw c.example (certificates of its own CA in ``tmp_path``) connects to b and
    says hello.  Deferred: the raw peer, past its welcome."""
    from chatproto import tls

    c = tls.write_dev_certs(str(tmp_path / "certs"), "c.example")
    peer = yield raw_peer(b, "c.example", c, c["ca"])
    peer.send({"type": "hello", "version": 1, "realm": "c.example"})
    yield until(lambda: len(peer.frames) == 1, timeout=30)
    assert peer.frames[0]["type"] == "welcome"
    return peer


@pytest_twisted.inlineCallbacks
def test_a_realm_that_said_hello_is_not_called_back_with_nothing_to_send(
    realms: Any,  # noqa: F811
    tmp_path: Any,
    logs: Any,
) -> Any:
    """c.example (no static entry here: found by DNS) connects to b and says hello.  b
    has nothing for it, so b makes no connection and no DNS look-up; once bob writes
    to carol@c.example, b's link looks c up and connects."""
    from twisted.internet import task

    (b,) = yield realms(["b.example"], idle_after=0.5)
    resolver = yield resolve_to_nowhere(b)  # c's listener is "down"
    peer = yield c_says_hello(b, tmp_path)
    peer.transport.loseConnection()
    yield task.deferLater(_reactor, 1.5, lambda: None)  # three idle_after periods
    assert resolver.lookups == []
    assert b.fed.links.get("c.example") is None or b.fed.links["c.example"].state == "idle"
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.send("carol@c.example", "hello carol")
    yield until(lambda: len(resolver.lookups) >= 1, timeout=30)
    assert resolver.lookups[0] == "_chatproto-fed._tcp.c.example"
    assert logs.has("federation: link to c.example wanted (items are queued); connecting")
    yield bob.close()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_a_link_idles_when_nothing_is_queued_and_no_one_there_needs_our_presence(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """alice writes to bob: a's link to b connects, and stays up while alice is
    online (bob is her contact: her presence goes on it).  alice leaves: the link
    idles after idle_after; her next message connects it again."""
    from twisted.internet import task

    a, b = yield realms(["a.example", "b.example"], idle_after=0.3)
    link = a.fed.links["b.example"]
    assert link.state == "idle"  # a static peer, nothing to send
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True)
    yield alice.send("bob@b.example", "one")
    yield until(lambda: len(got) == 1, timeout=30)
    yield task.deferLater(_reactor, 1.0, lambda: None)  # three idle_after periods
    assert link.state == "ready"  # alice is online and bob is her contact
    yield alice.close()
    yield until(lambda: link.state == "idle", timeout=30)
    assert logs.has("federation: link to b.example idle (nothing to send for")
    # the connection closes after the link says idle (a reactor turn or more under load)
    yield until(lambda: link.proto is None and not link.service.running, timeout=30)
    assert not logs.has("federation: link to b.example lost")  # closing is not a loss
    alice = yield connect(_reactor, a.addr, "alice", PW)
    yield alice.send("bob@b.example", "two")
    yield until(lambda: len(got) == 2, timeout=30)
    assert [m["body"] for m in got] == ["one", "two"]
    yield alice.close()
    yield bob.close()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_a_client_cannot_make_links_to_more_realms_than_max_peers(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """Open federation (no allow list), max_peers 2: bob's messages to two made-up
    realms are queued (their links look them up); a third realm is refused
    (peer_denied) for a message, a read marker and an invitation alike, and nothing
    is queued for it.  (Before the bound, every made-up realm got a link.)"""
    b, bob, _ = yield bob_alone_on_b(realms, max_peers=2)  # made-up realms are "down"
    yield take_two_places(bob, "max_peers")
    yield peer_denied(bob.mark_read("x@made-up-4.example", 1))
    yield bob.create_group("#dev")
    yield peer_denied(bob.invite("#dev", "x@made-up-5.example"))
    yield peer_denied(bob.join("#g@made-up-6.example"))
    counts = yield b.realm.store.outbox_counts()
    assert counts == {"made-up-1.example": 2, "made-up-2.example": 1}
    assert sorted(b.fed.links) == ["made-up-1.example", "made-up-2.example"]
    yield bob.close()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_a_realm_given_up_on_frees_its_place_under_max_peers(
    realms: Any,  # noqa: F811
    logs: Any,
    monkeypatch: Any,
) -> Any:
    """max_peers 1: bob's message to a made-up realm takes the only place; a second
    realm is refused.  The made-up realm never answers: its item is given up on
    (bob gets the bounce), and once bob is offline (his contact there no longer
    wants our presence) its link idles and is dropped; carol's message to the second
    realm then goes.  (Before, the link stayed, retrying, for ever.)  Bob online
    again would want the first realm's link back for his presence."""
    from chatproto.federation import peer

    monkeypatch.setattr(peer, "RESERVED", 0.5)  # (a link is kept that long after activity)
    b, bob, got = yield bob_alone_on_b(realms, max_peers=1, give_up_after=1.0, idle_after=0.2)
    yield bob.send("x@made-up-1.example", "one")
    yield peer_denied(bob.send("x@made-up-2.example", "two"))
    yield until(lambda: any(m["kind"] == "bounce" for m in got), timeout=30)
    [bounce] = [m for m in got if m["kind"] == "bounce"]
    assert bounce["meta"]["code"] == "peer_unreachable"
    yield bob.close()
    yield until(lambda: "made-up-1.example" not in b.fed.links, timeout=30)
    carol = yield connect(_reactor, b.addr, "carol", PW, register=True)
    yield carol.send("x@made-up-2.example", "two")
    assert sorted(b.fed.links) == ["made-up-2.example"]
    yield carol.close()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_one_client_cannot_take_every_place_and_unreached_realms_bounce_soon(
    realms: Any,  # noqa: F811
    logs: Any,
    monkeypatch: Any,
) -> Any:
    """max_peers 10, max_peers_per_user 2, give_up_unreached 1 s (give_up_after a
    week): bob's messages to two made-up realms take his places and a third realm is
    refused to him (peer_denied, max_peers_per_user), while carol still reaches a new
    realm.  The made-up realms never answer: within seconds, not a week, bob gets his
    bounces (peer_unreachable), their links idle and are dropped although bob stays
    online, and bob reaches a new realm again.  (Before, one client could take all
    max_peers places, for give_up_after.)"""
    from chatproto.federation import peer

    monkeypatch.setattr(peer, "RESERVED", 0.5)  # (a link is kept that long after activity)
    b, bob, got = yield bob_alone_on_b(
        realms, max_peers=10, max_peers_per_user=2, give_up_unreached=1.0, idle_after=0.2
    )
    assert b.cfg.federation.give_up_after == 7 * 86400.0
    yield take_two_places(bob, "max_peers_per_user")
    yield peer_denied(bob.mark_read("x@made-up-3.example", 1))
    carol = yield connect(_reactor, b.addr, "carol", PW, register=True)
    yield carol.send("x@made-up-3.example", "someone else is not refused")
    assert b.fed.held["bob@b.example"] == {"made-up-1.example", "made-up-2.example"}
    yield until(lambda: len([m for m in got if m["kind"] == "bounce"]) == 3, timeout=30)
    bounces = [m for m in got if m["kind"] == "bounce"]
    assert {m["meta"]["code"] for m in bounces} == {"peer_unreachable"}
    assert all("never answered" in m["body"] for m in bounces)
    yield until(lambda: "bob@b.example" not in b.fed.held, timeout=30)
    yield until(lambda: "made-up-1.example" not in b.fed.links, timeout=30)
    yield bob.send("x@made-up-4.example", "a place again")
    yield bob.close()
    yield carol.close()
    no_tracebacks(logs)


@pytest_twisted.inlineCallbacks
def test_a_realm_that_said_hello_is_charged_to_no_one(
    realms: Any,  # noqa: F811
    tmp_path: Any,
    logs: Any,
) -> Any:
    """max_peers_per_user 1: bob's message to a made-up realm holds his place, so
    c.example (never reached: no static entry, found by DNS) is refused to him.
    c.example then connects to b and says hello: it is proven, charged to no one, and
    bob's message to it goes although his place is still taken.  (Before, every realm
    counted the same: there was no such accounting.)"""
    b, bob, _ = yield bob_alone_on_b(realms, max_peers_per_user=1)
    yield bob.send("x@made-up-1.example", "one")
    assert "max_peers_per_user" in (yield peer_denied(bob.send("carol@c.example", "too soon")))
    peer = yield c_says_hello(b, tmp_path)
    yield bob.send("carol@c.example", "hello carol")
    assert b.fed.held == {"bob@b.example": {"made-up-1.example"}}
    assert b.fed.links["c.example"].holder is None
    peer.transport.loseConnection()
    yield bob.close()
    no_tracebacks(logs)


class FakeService:
    """Stands in for a PeerLink's ClientService (no connection attempts)."""

    def __init__(self) -> None:
        self.running = False
        self.starts = 0

    def startService(self) -> None:
        self.running = True
        self.starts += 1

    def stopService(self) -> Any:
        from twisted.internet.defer import succeed

        self.running = False
        return succeed(None)


def test_when_a_link_is_wanted_and_when_it_idles(node: Any) -> None:  # noqa: F811
    """With a task.Clock: a link connects for queued items, presence (not an offline
    frame) and a key wait, and idles ``idle_after`` seconds after the last of them."""
    realm, fed, clock = node
    fed.cfg.idle_after = 10.0
    fed.running = True
    link = fed.link("a.example")
    link.service = FakeService()
    assert link.state == "idle" and not link.service.running
    link.presence({"type": "presence", "user": "bob@b.example", "status": "offline"})
    assert link.state == "idle"  # nobody of ours is shown online there: nothing to say
    link.wake(1)
    assert link.state == "connecting" and link.service.starts == 1
    assert link.down_since == clock.seconds()
    assert link.wanted() == "items are queued"
    clock.advance(10)
    assert link.service.running  # still queued (not sent: the link is not up)
    link._waiting = 0  # sent and acknowledged
    clock.advance(10)
    assert link.state == "idle" and not link.service.running
    assert link.down_since is None
    link.presence({"type": "presence", "user": "bob@b.example", "status": "online"})
    assert link.state == "connecting" and link.service.starts == 2
    clock.advance(10)
    assert link.state == "idle"
    link.hold(30.0)  # waiting for the peer's signing keys
    assert link.wanted() == "its signing keys are needed"
    clock.advance(20)
    assert link.service.running
    clock.advance(20)
    assert link.state == "idle"
    # an online user with a contact there keeps it up (once the realm answered:
    # presence alone keeps no link to a realm never reached)
    link.reached = True
    realm.presence_wanted = lambda r: r == "a.example"  # type: ignore[method-assign]
    link.wake(1)
    link._waiting = 0
    clock.advance(50)
    assert link.service.running and link.wanted() == "a user with a contact there is online"
    realm.presence_wanted = lambda r: False  # type: ignore[method-assign]
    clock.advance(10)
    assert link.state == "idle"
    fed.running = False
    link.stop()
    assert not [c for c in clock.getDelayedCalls() if c.active() and "idle" in repr(c.func)]
