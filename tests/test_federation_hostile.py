"""A hostile home realm over real mutual TLS: realm c.example, home of groups, tries to
speak for users it has no say over (issue 14, item 5).

The hostile side is a raw peer presenting c.example's genuine certificate: the link is
accepted (c.example is who it says it is), what it asserts is not."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

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
