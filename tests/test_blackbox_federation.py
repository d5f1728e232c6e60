"""Black-box tests of PROTOCOL.md's "Federation" rules (No forgery, Numbers, Exactly
once), over real mutual TLS: a raw peer presenting a.example's genuine certificate
sends b.example transactions of items, each with the code PROTOCOL.md gives it in the
`ack` (None: stored), and bob@b.example's sessions show what was stored."""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto import wire
from chatproto.client import connect
from tests.conftest import until
from tests.test_federation_loopback import logs, raw_peer, realms  # noqa: F401  (fixtures)

PW = "password-1"
NOW = time.time()


def text(item_id: str, **over: Any) -> dict[str, Any]:
    item = {
        "id": item_id,
        "kind": "text",
        "from": "alice@a.example",
        "to": "bob@b.example",
        "ts": NOW,
        "body": item_id,
    }
    item.update(over)
    return {k: v for k, v in item.items() if v is not None}


#: (item, the code of its rejection or None when stored).
ITEMS = [
    (text("ok-plain"), None),
    (text("forged-third", **{"from": "carol@c.example"}), "forged_sender"),
    (text("forged-own", **{"from": "bob@b.example"}), "forged_sender"),
    (text("no-user", to="nobody@b.example"), "no_such_user"),
    (text("no-group", to="#nogroup@b.example"), "no_such_group"),
    (text("not-member", to="#g@b.example"), "not_member"),
    (text("third-realm-to", to="dave@c.example"), "bad_address"),
    (text("third-realm-group", to="#g@c.example"), "forged_sender"),  # not its home
    (text("own-realm-group", to="#g@a.example"), "not_member"),  # no mirror here
    (text("bad-from", **{"from": "-x@a.example"}), "bad_address"),
    (text("ts-true", ts=True), "bad_request"),
    (text("ts-string", ts="1"), "bad_request"),
    (text("ts-2^53", ts=2**53), "bad_request"),
    (text("ts-2^53-1", ts=2**53 - 1), None),
    (text("ts--2^53", ts=-(2**53)), "bad_request"),
    (text("ts-negative", ts=-1), None),
    (text("ts-null", ts=None), "bad_request"),
    (text("meta-extra", meta={"colour": "red"}), "bad_request"),
    (text("meta-notice-false", meta={"notice": False}), "bad_request"),
    (text("meta-notice", meta={"notice": True}), None),
    (text("kind-bounce", kind="bounce"), "bad_request"),
    (text("kind-unknown", kind="sticker"), "bad_request"),
    (
        text("created", kind="event", to="#g@b.example", body="", meta={"event": "created"}),
        "bad_request",
    ),
    (text("body-int", body=5), "bad_request"),
    (text("ts-old", ts=100.0), None),
    (text("ts-future", ts=NOW + 86400 * 365), None),
    (text("pos-poison", pos=-5, msg_id="other"), None),
    (text("x" * 129), "bad_request"),
    # An item id is a msg_id (no control character, space, separator or bidi
    # formatting character): else no one could react to, edit or delete the item, and
    # CR/LF or an escape in it reached every client that shows ids.
    (text("id-nul\x00", body="x"), "bad_request"),
    (text("id-cr\r", body="x"), "bad_request"),
    (text("id-lf\nPRIVMSG #x :hi", body="x"), "bad_request"),
    (text("id sp", body="x"), "bad_request"),
    (text("id-esc\x1b[2J", body="x"), "bad_request"),
    (text("id-c1\x9b2J", body="x"), "bad_request"),
    (text("id-ls\u2028", body="x"), "bad_request"),
    (text("id-bidi\u202e", body="x"), "bad_request"),
    (text("id-ok~é.x_y", body="x"), None),
    (text("tags", meta={"tags": {"+draft/react": "x"}}), None),
    (text("tags-bad", meta={"tags": {"nope": "x"}}), "bad_request"),
    (text("reply-unknown", meta={"reply_to": "nothing-here"}), "not_found"),
    (text("reply-ok", meta={"reply_to": "ok-plain"}), None),
    (text("edit-other", kind="edit", body="x", meta={"ref": "BOBS"}), "forbidden"),
    (text("delete-other", kind="delete", body="", meta={"ref": "BOBS"}), "forbidden"),
    (text("react-ok", kind="reaction", body="", meta={"ref": "BOBS", "emoji": "x"}), None),
    (
        text("react-unknown", kind="reaction", body="", meta={"ref": "nothing", "emoji": "x"}),
        "not_found",
    ),
    (
        text("react-event", kind="reaction", body="", meta={"ref": "GROUP", "emoji": "x"}),
        "not_found",
    ),
]


@pytest_twisted.inlineCallbacks
def test_items_from_a_peer(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"])
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    yield bob.synced
    made = yield bob.create_group("#g")
    mine = yield bob.send("alice@a.example", "bob's own")
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    ids = {"BOBS": mine["msg_id"], "GROUP": made["msg_id"]}
    items = [item for item, _ in ITEMS]
    for item in items:
        ref = (item.get("meta") or {}).get("ref")
        if ref in ids:
            item["meta"] = {**item["meta"], "ref": ids[ref]}
    peer.send({"type": "txn", "id": "1-1", "items": items})
    yield until(lambda: any(f.get("type") == "ack" for f in peer.frames), timeout=30)
    ack = next(f for f in peer.frames if f.get("type") == "ack")
    rejected = {r["id"]: r["code"] for r in ack.get("rejected", [])}
    wrong = [
        (item["id"][:20], want, rejected.get(item["id"]))
        for item, want in ITEMS
        if rejected.get(item["id"]) != want
    ]
    assert not wrong
    stored = [item["id"] for item, want in ITEMS if want is None]

    def theirs() -> list[dict[str, Any]]:
        return [m for m in got if m["from"] == "alice@a.example" and m["kind"] != "bounce"]

    yield until(lambda: len(theirs()) >= len(stored), timeout=30)
    texts = theirs()
    assert [m["msg_id"] for m in texts] == stored
    group_pos = min(m["pos"] for m in got)
    for m in texts:
        assert m["to"] == "bob@b.example"
        assert 946684800 <= m["ts"] <= time.time() + 600, m
        assert m["pos"] > group_pos  # the receiver's own positions
    # Replayed: the same transaction again stores nothing twice, and is acknowledged.
    peer.send({"type": "txn", "id": "1-1", "items": items})
    yield until(lambda: len([f for f in peer.frames if f.get("type") == "ack"]) == 2, timeout=30)
    again = [f for f in peer.frames if f.get("type") == "ack"][1]
    assert {r["id"]: r["code"] for r in again.get("rejected", [])} == rejected
    feed = yield b.realm.store.read_feed("bob@b.example", 0, 100)
    assert sorted(
        e.id for e in feed if e.sender == "alice@a.example" and e.kind != "bounce"
    ) == sorted(stored)
    # An id taken by another conversation: stored under an alternate id.
    yield connect(_reactor, b.addr, "erin", PW, register=True).addCallback(lambda c: c.close())
    peer.send(
        {
            "type": "txn",
            "id": "2-2",
            "items": [text("ok-plain", to="erin@b.example", body="theirs")],
        }
    )
    yield until(lambda: len([f for f in peer.frames if f.get("type") == "ack"]) == 3, timeout=30)
    assert "rejected" not in peer.frames[-1], peer.frames[-1]
    efeed = yield b.realm.store.read_feed("erin@b.example", 0, 10)
    assert [e.body for e in efeed] == ["theirs"]
    assert efeed[0].id.startswith("ok-plain~"), efeed[0].id
    # Sent again: recognised under its alternate id, not stored twice.
    peer.send(
        {
            "type": "txn",
            "id": "2-2",
            "items": [text("ok-plain", to="erin@b.example", body="theirs")],
        }
    )
    yield until(lambda: len([f for f in peer.frames if f.get("type") == "ack"]) == 4, timeout=30)
    assert "rejected" not in peer.frames[-1], peer.frames[-1]
    efeed = yield b.realm.store.read_feed("erin@b.example", 0, 10)
    assert [e.body for e in efeed] == ["theirs"]
    # The peer names it by its own id: its reaction and edit find it, in its
    # conversation (not bob's item that took the id).
    to_erin = {"to": "erin@b.example", "body": ""}
    peer.send(
        {
            "type": "txn",
            "id": "3-4",
            "items": [
                text("erin-r", kind="reaction", meta={"ref": "ok-plain", "emoji": "x"}, **to_erin),
                text("erin-e", kind="edit", meta={"ref": "ok-plain"}, **{**to_erin, "body": "new"}),
            ],
        }
    )
    yield until(lambda: len([f for f in peer.frames if f.get("type") == "ack"]) == 5, timeout=30)
    assert "rejected" not in peer.frames[-1], peer.frames[-1]
    erin = yield connect(_reactor, b.addr, "erin", PW)
    page = yield erin.history("alice@a.example")
    yield erin.close()
    shown = next(m for m in page if m["kind"] == "text")
    assert (shown["msg_id"], shown["body"]) == (efeed[0].id, "new")
    assert shown["meta"]["reactions"] == {"x": ["alice@a.example"]}
    assert (yield b.realm.store.stored_item("ok-plain")).body == "ok-plain"  # bob's, unedited
    peer.transport.loseConnection()
    yield peer.lost
    yield bob.close()


BAD_TXNS = {
    "id too long": {"type": "txn", "id": "1" * 65, "items": []},
    "id empty": {"type": "txn", "id": "", "items": []},
    "id not a string": {"type": "txn", "id": 5, "items": []},
    "items not a list": {"type": "txn", "id": "1-1", "items": {}},
    "too many items": {
        "type": "txn",
        "id": "1-1001",
        "items": [text(f"i{i}") for i in range(1001)],
    },
    "unknown type": {"type": "frobnicate"},
    "ack of nothing": {"type": "ack", "id": "9-9"},
}


@pytest_twisted.inlineCallbacks
def test_malformed_link_frames_close_the_link(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"], retry_initial=0.05, retry_max=0.05)
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    wrong = []
    for label, frame in BAD_TXNS.items():
        # the last link's misbehaviour holds a.example off for a while (retry_initial)
        yield until(lambda: not _held_off(b, "a.example"), timeout=30)
        peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
        peer.send({"type": "hello", "version": 1, "realm": "a.example"})
        yield until(lambda p=peer: bool(p.frames), timeout=30)
        assert peer.frames[0]["type"] == "welcome", (label, peer.frames)
        peer.send(frame)
        yield until(lambda p=peer: p.lost.called, timeout=30)
        last = peer.frames[-1]
        want = {"too many items": ("too_large", "bad_request")}.get(label, ("bad_request",))
        if label in ("unknown type", "ack of nothing"):
            want = ("unknown_type",)
        if last.get("type") != "error" or last.get("code") not in want:
            wrong.append((label, peer.frames))
    assert not wrong


def _held_off(node: Any, realm: str) -> bool:
    """Whether ``node`` refuses links from ``realm`` for now (it misbehaved lately:
    ``FederationService.penalise``)."""
    return bool(node.fed._penalties.get(realm, (0.0, 0))[0] > node.fed.clock.seconds())


@pytest_twisted.inlineCallbacks
def test_infinite_ts_is_refused_in_the_ack(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"])
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.synced
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    payload = wire.encode(
        {"type": "txn", "id": "1-2", "items": [text("inf", ts=12345.0), text("fine")]}
    )
    peer.sendString(payload.replace(b"12345.0", b"1e400"))
    yield until(lambda: any(f.get("type") == "ack" for f in peer.frames), timeout=30)
    ack = next(f for f in peer.frames if f.get("type") == "ack")
    assert [(r["id"], r["code"]) for r in ack["rejected"]] == [("inf", "bad_request")]
    feed = yield b.realm.store.read_feed("bob@b.example", 0, 10)
    assert [e.id for e in feed] == ["fine"]
    peer.transport.loseConnection()
    yield bob.close()


def request(
    rid: str, event: str, who: str = "alice@a.example", to: str = "#pub@b.example", **args: Any
) -> dict[str, Any]:
    return {
        "id": rid,
        "kind": "request",
        "from": who,
        "to": to,
        "event": event,
        "args": args,
        "ts": NOW,
    }


#: Requests of a.example's users to groups of b.example, and the code of their
#: rejection in the ack (None: applied).
REQUESTS = [
    (request("r-join", "joined"), None),
    (request("r-join-invite", "joined", to="#inv@b.example"), "not_invited"),
    (request("r-third", "joined", who="carol@c.example"), "forged_sender"),
    (request("r-own", "joined", who="bob@b.example"), "forged_sender"),
    (request("r-created", "created"), "bad_request"),
    (request("r-unknown", "frobnicated"), "bad_request"),
    (request("r-kick-owner", "kicked", user="bob@b.example"), "forbidden"),
    (request("r-topic-locked", "topic", topic="mine"), "forbidden"),
    (request("r-no-group", "joined", to="#none@b.example"), "no_such_group"),
    (request("r-join-again", "joined"), "already_member"),
    (request("r-deleted-nobody", "left", who="zed@a.example", reason="account deleted"), None),
]


@pytest_twisted.inlineCallbacks
def test_requests_from_a_peer(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"])
    got: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_message=got.append)
    yield bob.synced
    yield bob.create_group("#pub")
    yield bob.create_group("#inv", visibility="invite")
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    peer.send({"type": "txn", "id": "1-1", "items": [r for r, _ in REQUESTS]})
    yield until(lambda: any(f.get("type") == "ack" for f in peer.frames), timeout=30)
    ack = next(f for f in peer.frames if f.get("type") == "ack")
    rejected = {r["id"]: r["code"] for r in ack.get("rejected", [])}
    wrong = [
        (r["id"], want, rejected.get(r["id"]))
        for r, want in REQUESTS
        if rejected.get(r["id"]) != want
    ]
    assert not wrong
    yield until(
        lambda: any((m.get("meta") or {}).get("event") == "joined" for m in got), timeout=30
    )
    joined = [m for m in got if (m.get("meta") or {}).get("event") == "joined"]
    assert [(m["from"], m["to"]) for m in joined] == [("alice@a.example", "#pub@b.example")]
    peer.transport.loseConnection()
    yield peer.lost
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_more_than_16_transactions_awaiting_acks_is_a_flood(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"], retry_initial=5.0, retry_max=10.0)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.synced
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    yield until(lambda: bool(peer.frames), timeout=30)
    burst = b"".join(
        _framed({"type": "txn", "id": f"{i}-{i}", "items": [text(f"flood-{i}")]})
        for i in range(1, 41)
    )
    peer.transport.write(burst)
    yield until(lambda: peer.lost.called, timeout=30)
    last = peer.frames[-1]
    assert last["type"] == "error" and last["code"] == "rate_limited", peer.frames[-3:]
    acks = [f["id"] for f in peer.frames if f.get("type") == "ack"]
    assert acks == [f"{i}-{i}" for i in range(1, len(acks) + 1)]  # in order
    yield bob.close()


def _framed(obj: dict[str, Any]) -> bytes:
    import struct

    payload = wire.encode(obj)
    return struct.pack("!I", len(payload)) + payload


@pytest_twisted.inlineCallbacks
def test_remote_groups_from_a_users_side_and_bounces(realms: Any) -> Any:  # noqa: F811
    """A user's requests about another realm's group: create is remote_realm, info of
    a group the realm knows nothing of is remote_realm, a join is pending (pos 0)
    and, refused by the home realm, comes back as a `bounce` with `meta.event`; a
    message to a user who does not exist there bounces too."""
    from tests.blackbox import call, code, login, msgs, wait_for

    a, b = yield realms(["a.example", "b.example"])
    yield a.realm.create_user("alice", "password-bb")
    yield b.realm.create_user("bob", "password-bb")
    alice = yield login(a.addr, "alice")
    r = yield call(alice, {"type": "create_group", "group": "#x@b.example"})
    assert code(r) == "remote_realm", r
    for req in (
        {"type": "group_info", "group": "#x@b.example"},
        {"type": "members", "group": "#x@b.example"},
    ):
        r = yield call(alice, req)
        assert code(r) == "remote_realm", (req, r)
    j = yield call(alice, {"type": "join", "group": "#nope@b.example"})
    assert j["type"] == "result" and j["pos"] == 0 and j["msg_id"], j
    bounce = yield wait_for(alice, lambda f: f.get("kind") == "bounce")
    assert bounce["from"] == "#nope@b.example" and bounce["to"] == "alice@a.example"
    assert bounce["meta"]["code"] == "no_such_group" and bounce["meta"]["event"] == "joined"
    assert bounce["meta"]["id"] == j["msg_id"] and bounce["meta"]["realm"] == "b.example"
    s = yield call(alice, {"type": "send", "to": "nobody@b.example", "body": "hello?"})
    assert s["pos"] > 0
    b2 = yield wait_for(
        alice, lambda f: f.get("kind") == "bounce" and f["from"] == "nobody@b.example"
    )
    assert b2["meta"]["code"] == "no_such_user" and b2["meta"]["id"] == s["msg_id"]
    h = yield call(alice, {"type": "history", "with": "nobody@b.example"})
    assert [m["kind"] for m in h["messages"]] == ["text", "bounce"], h
    assert [m["pos"] for m in msgs(alice)] == sorted(m["pos"] for m in msgs(alice))
