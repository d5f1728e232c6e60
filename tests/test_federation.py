"""Federation without sockets: configuration, the outbox in both stores, the inbound
protocol over StringTransport (byte by byte too), link bookkeeping, discovery, and
``chatrealmctl gen-certs`` / ``peers``."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import crypto
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns

from chatproto import config, ctl, tls, wire
from chatproto.envelope import Envelope, new_message_id
from chatproto.federation import (
    MAX_INFLIGHT,
    MAX_LINKS_PER_REALM,
    MAX_TXN_ITEMS,
    PRESENCE_BURST,
    PRESENCE_RATE,
    STATUS_FILE,
    FederationService,
    PeerEndpoint,
)
from chatproto.signing import parse_keys
from chatproto.store.memory import MemoryStore
from chatproto.store.sqlite import SCHEMA_VERSION, SQLiteDB, SQLiteStore
from chatproto.testing import NullMind, make_test_realm
from tests.conftest import fired

# configuration ---------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, dict[str, str]]:
    d = str(tmp_path / "certs")
    return {name: tls.write_dev_certs(d, name) for name in ("a.example", "b.example")}


def federate(cfg: config.Config, paths: dict[str, str]) -> config.Federation:
    """Turn federation on in ``cfg`` with the certificate ``paths`` of its realm."""
    f = cfg.federation
    f.enabled = True
    f.certificate = paths["cert"]
    f.private_key = paths["key"]
    f.ca = paths["ca"]
    return f


def fed_config(certs: dict[str, dict[str, str]], tmp_path: Path, **fed: Any) -> config.Config:
    cfg = config.Config(realm="a.example", data_dir=str(tmp_path / "data"))
    f = federate(cfg, certs["a.example"])
    for k, v in fed.items():
        setattr(f, k, v)
    return cfg


def test_federation_config_from_toml(certs: Any, tmp_path: Path) -> None:
    a = certs["a.example"]
    with open(certs["b.example"]["cert"], "rb") as f:
        pin = tls.fingerprint(f.read())
    text = f"""
[realm]
name = "a.example"
[federation]
enabled = true
certificate = {json.dumps(a["cert"])}
private_key = {json.dumps(a["key"])}
allow = ["B.Example."]
deny = ["evil.example"]
[[federation.peers]]
realm = "b.example"
endpoint = "127.0.0.1:7522"
fingerprint = "{pin.upper().replace("SHA256", "sha256")}"
"""
    path = tmp_path / "realm.toml"
    path.write_text(text)
    cfg = config.load(str(path))
    cfg.check()
    f = cfg.federation
    assert f.allow == ["b.example"] and f.deny == ["evil.example"]
    peer = f.peer("b.example")
    assert peer is not None and peer.fingerprint == pin and peer.endpoint == "127.0.0.1:7522"
    assert f.allows("b.example") and not f.allows("c.example") and not f.allows("evil.example")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"certificate": ""}, "federation.certificate is required"),
        ({"ca": ""}, "no trust configured"),
        ({"ca": "/nonexistent/ca.pem"}, "does not exist"),
        ({"retry_initial": 0.0}, "retry_initial"),
        ({"window": 0}, "window"),
        ({"peers": [config.Peer("b.example", endpoint="nohost")]}, "HOST:PORT"),
        ({"peers": [config.Peer("b.example", fingerprint="md5:00")]}, "sha256"),
        ({"peers": [config.Peer("a.example")]}, "not its own peer"),
        ({"peers": [config.Peer("b.example"), config.Peer("B.example")]}, "twice"),
        ({"deny": ["bad_realm!"]}, "invalid realm"),
        ({"max_peers": 0}, "max_peers must be between"),
        ({"max_peers_per_user": 0}, "max_peers_per_user must be between"),
        ({"give_up_unreached": -1.0}, "give_up_unreached must be >= 0"),
        (
            {"max_peers": 1, "peers": [config.Peer("b.example"), config.Peer("c.example")]},
            "2 realms",
        ),
    ],
)
def test_federation_config_errors(certs: Any, tmp_path: Path, change: Any, message: str) -> None:
    cfg = fed_config(certs, tmp_path, **change)
    with pytest.raises(config.ConfigError, match=message):
        cfg.check()


def test_certificate_must_name_the_realm(certs: Any, tmp_path: Path) -> None:
    cfg = fed_config(certs, tmp_path)
    cfg.federation.certificate = certs["b.example"]["cert"]
    with pytest.raises(config.ConfigError, match=r"names b\.example, not this realm"):
        cfg.check()


def test_bad_toml_values() -> None:
    for data, message in [
        ({"federation": {"peers": {"realm": "x"}}}, "array of tables"),
        ({"federation": {"peers": [{"endpoint": "x:1"}]}}, "needs realm"),
        ({"federation": {"peers": [{"realm": "x", "port": 1}]}}, "unknown key"),
        ({"federation": {"allow": "b.example"}}, "list of realm names"),
        ({"federation": {"enabled": "yes"}}, "must be bool"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.from_dict(data)


def test_fingerprints() -> None:
    digest = "ab" * 32
    assert tls.normalise_fingerprint("SHA256:" + ":".join(["AB"] * 32)) == "sha256:" + digest
    for bad in ("ab" * 32, "sha1:" + digest, "sha256:" + digest[:-2], "sha256:" + "zz" * 32):
        with pytest.raises(ValueError):
            tls.normalise_fingerprint(bad)


# the outbox in the stores -------------------------------------------------------------------


def env(sender: str, recipient: str, body: str, mid: str | None = None) -> Envelope:
    return Envelope(mid or new_message_id(), "text", sender, recipient, 1.0, body)


def test_sqlite_outbox_same_transaction_dedup_and_order(tmp_path: Path) -> None:
    db = SQLiteDB(str(tmp_path / "r.sqlite3"))
    db.migrate()
    local = env("alice@a.example", "bob@a.example", "local")
    out1 = env("alice@a.example", "bob@b.example", "to b 1")
    out2 = env("alice@a.example", "carol@c.example", "to c")
    remote = env("dave@b.example", "alice@a.example", "from b", mid="remote-1")
    res = db.append_batch(
        [[local], [out1, out2], [remote], [env("x@a.example", "y@a.example", "after")]],
        {},
        [[], [("b.example", out1), ("c.example", out2)], [], []],
        [False, False, True, False],
    )
    assert res == [[1], [2, 3], [4], [5]]  # positions follow the call order
    again = db.append_batch([[remote]], {}, None, [True])
    assert again == [[None]]  # already stored: skipped, no position used
    assert db.outbox_counts() == {"b.example": 1, "c.example": 1}
    rows = db.outbox_read("b.example", 0, 10)
    assert [(e.body, e.pos) for _, e in rows] == [("to b 1", 2)]
    assert db.outbox_holds("b.example", 2) and not db.outbox_holds("c.example", 2)
    db.outbox_ack("b.example", rows[-1][0])
    assert db.outbox_counts() == {"c.example": 1}
    assert not db.outbox_holds("b.example", 2)  # acknowledged: no longer queued
    # a second run of the migrations changes nothing; the outbox survives reopening
    db.close()
    db = SQLiteDB(str(tmp_path / "r.sqlite3"))
    assert db.migrate() == SCHEMA_VERSION
    assert [e.body for _, e in db.outbox_read("c.example", 0, 10)] == ["to c"]


@pytest_twisted.inlineCallbacks
def test_sqlite_store_append_remote_through_group_commit(tmp_path: Path) -> Any:
    from twisted.internet import reactor

    store = SQLiteStore(str(tmp_path / "r.sqlite3"), reactor)
    yield store.open()
    try:
        e1 = env("dave@b.example", "alice@a.example", "one", mid="m1")
        e2 = env("dave@b.example", "alice@a.example", "two", mid="m2")
        first = yield store.append_remote([e1])
        again = env("dave@b.example", "alice@a.example", "one", mid="m1")
        second = yield store.append_remote([again, e2])
        assert [e.body for e in first] == ["one"] and [e.body for e in second] == ["two"]
        assert e2.pos > e1.pos and again.pos == 0
    finally:
        yield store.close()


def test_memory_outbox() -> None:
    store = MemoryStore()
    e = env("alice@a.example", "bob@b.example", "x")
    store.append([e], [("b.example", e)])
    rows = store.outbox_read("b.example", 0, 10).result  # type: ignore[attr-defined]
    assert rows == [(1, e)]
    assert store.outbox_counts().result == {"b.example": 1}  # type: ignore[attr-defined]
    assert store.outbox_holds("b.example", e.pos).result  # type: ignore[attr-defined]
    assert not store.outbox_holds("c.example", e.pos).result  # type: ignore[attr-defined]
    dup = env("alice@a.example", "bob@b.example", "x", mid=e.id)
    assert store.append_remote([dup]).result == []  # type: ignore[attr-defined]
    store.outbox_ack("b.example", 1)
    assert store.outbox_counts().result == {}  # type: ignore[attr-defined]
    assert not store.outbox_holds("b.example", e.pos).result  # type: ignore[attr-defined]


# the inbound protocol over StringTransport ------------------------------------------------


class CertTransport(StringTransport):
    """A StringTransport that presents a TLS peer certificate (as TLSMemoryBIOProtocol)."""

    def __init__(self, cert_path: str | None, chain_error: str | None = None) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self._cert = None
        if cert_path:
            with open(cert_path, "rb") as f:
                self._cert = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
        self.chain_error = chain_error
        self.chain_checked = True  # (a handshake that checked the chain: _record_verify)

    def getPeerCertificate(self) -> Any:
        return self._cert


def frame(obj: dict[str, Any]) -> bytes:
    payload = wire.encode(obj)
    return struct.pack("!I", len(payload)) + payload


def frames(transport: StringTransport) -> list[dict[str, Any]]:
    data = transport.value()
    transport.clear()
    out = []
    while data:
        (n,) = struct.unpack("!I", data[:4])
        out.append(wire.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


@pytest.fixture
def node(certs: Any, tmp_path: Path) -> Any:
    """Realm b.example on a MemoryStore with federation (not listening), user bob."""
    clock = Clock()
    cfg = config.Config(realm="b.example", data_dir=str(tmp_path / "b"))
    federate(cfg, certs["b.example"])
    cfg.check()
    realm = make_test_realm(clock, cfg)
    realm.create_user("bob", "password-1")
    fed = FederationService(realm, clock, clock=clock, status_path="")
    return realm, fed, clock


def connect(fed: Any, cert: str | None, chain_error: str | None = None) -> Any:
    proto = fed.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = CertTransport(cert, chain_error)
    proto.makeConnection(transport)
    return proto, transport


def hello(realm: str = "a.example") -> bytes:
    return frame({"type": "hello", "version": 1, "realm": realm})


def item(n: int, sender: str = "alice@a.example", to: str = "bob@b.example") -> dict[str, Any]:
    return {"id": f"id-{n}", "kind": "text", "from": sender, "to": to, "ts": 1.0, "body": f"m{n}"}


def test_a_certificate_not_checked_in_this_handshake_is_refused(node: Any, certs: Any) -> None:
    """A TLS session resumed (no chain checked in its handshake: the verify callback
    never ran) does not authenticate, whatever certificate the session names."""
    _, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    transport.chain_checked = False  # what a resumed session leaves on the transport
    proto.dataReceived(hello())
    (error,) = frames(transport)
    assert error["code"] == "untrusted_peer" and "resumed a TLS session" in error["message"]
    assert transport.disconnecting
    proto, transport = connect(fed, certs["a.example"]["cert"])
    transport.chain_checked = True
    proto.dataReceived(hello())
    assert frames(transport)[0]["type"] == "welcome"


def test_a_realm_has_at_most_a_few_links_in_at_once(node: Any, certs: Any) -> None:
    """Each inbound link has its own presence, reading and transaction limits: a
    realm opening links without end would multiply them.  Past MAX_LINKS_PER_REALM
    links from one realm, its hello is refused (``rate_limited``, no penalty); one
    closing makes room.  Other realms are not concerned."""
    _, fed, _ = node
    links = []
    for _ in range(MAX_LINKS_PER_REALM):
        proto, transport = connect(fed, certs["a.example"]["cert"])
        proto.dataReceived(hello())
        assert frames(transport)[0]["type"] == "welcome"
        links.append(proto)
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    (error,) = frames(transport)
    assert error["code"] == "rate_limited" and "links from a.example" in error["message"]
    assert transport.disconnecting
    proto.connectionLost(None)
    links[0].transport.loseConnection()
    links[0].connectionLost(None)
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    assert frames(transport)[0]["type"] == "welcome"
    assert fed.inbound_refusal("a.example", CertTransport(certs["a.example"]["cert"]))[1]


def test_hello_txn_ack_byte_by_byte(node: Any, certs: Any) -> None:
    realm, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    data = hello() + frame({"type": "txn", "id": "1-2", "items": [item(1), item(2)]})
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert frames(transport) == [
        {
            "type": "welcome",
            "version": 1,
            "realm": "b.example",
            "max_frame": 4194304,
            "keys": realm.signing.announce(),  # its signing key (see test_signing.py)
        },
        {"type": "ack", "id": "1-2"},
    ]
    feed = realm.store.read_feed("bob@b.example", 0, 10).result
    assert [(e.body, e.sender, e.id) for e in feed] == [
        ("m1", "alice@a.example", "id-1"),
        ("m2", "alice@a.example", "id-2"),
    ]
    # retried: acknowledged again, stored once
    proto.dataReceived(frame({"type": "txn", "id": "1-2", "items": [item(1), item(2)]}))
    assert frames(transport) == [{"type": "ack", "id": "1-2"}]
    assert len(realm.store.read_feed("bob@b.example", 0, 10).result) == 2
    assert not transport.disconnecting


def test_a_peer_refers_to_its_item_stored_under_an_alternate_id(node: Any, certs: Any) -> None:
    """An item whose id another conversation took first is stored under an alternate
    id; its peer still names it by its own id: its reactions, edits, replies and
    deletes find it (and are stored referring to the alternate id), never the item
    that took the id."""
    realm, fed, _ = node
    fired(realm.create_user("erin", "password-1"))
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    frames(transport)

    def txn(tid: str, *items: dict[str, Any]) -> dict[str, str]:
        proto.dataReceived(frame({"type": "txn", "id": tid, "items": list(items)}))
        (ack,) = frames(transport)
        assert ack["type"] == "ack" and ack["id"] == tid, ack
        return {r["id"]: r["code"] for r in ack.get("rejected", [])}

    def it(mid: str, kind: str, body: str = "", to: str = "bob@b.example", **meta: Any) -> Any:
        return {
            "id": mid,
            "kind": kind,
            "from": "alice@a.example",
            "to": to,
            "ts": 1.0,
            "body": body,
            "meta": meta,
        }

    squat = {**it("shared", "text", "squatted", to="erin@b.example"), "meta": None}
    real = {**it("shared", "text", "teh plan"), "meta": None}
    assert txn("1-2", squat, real) == {}
    alt = fired(realm.store.read_feed("bob@b.example", 0, 10))[0].id
    assert alt.startswith("shared~")
    assert (
        txn(
            "3-5",
            it("r1", "reaction", ref="shared", emoji="x"),
            it("e1", "edit", "the plan", ref="shared"),
            it("p1", "text", "re", reply_to="shared"),
        )
        == {}
    )
    for mid, key in (("r1", "ref"), ("e1", "ref"), ("p1", "reply_to")):
        assert fired(realm.store.stored_item(mid)).meta[key] == alt, mid
    feed = fired(realm.store.read_feed("bob@b.example", 0, 10))
    assert [(e.id, e.body) for e in feed if e.kind == "text"] == [(alt, "the plan"), ("p1", "re")]
    assert fired(realm.store.ref_count(alt, "alice@a.example")) == 2
    assert fired(realm.store.ref_count("shared", "alice@a.example")) == 0
    assert txn("6-6", it("d1", "delete", ref="shared")) == {}
    wiped = fired(realm.store.stored_item(alt))
    assert (wiped.body, wiped.meta) == ("", {"deleted": True})
    squatter = fired(realm.store.stored_item("shared"))
    assert (squatter.recipient, squatter.body, squatter.meta) == (
        "erin@b.example",
        "squatted",
        None,
    )
    assert not transport.disconnecting


def test_stopping_closes_inbound_links_cleanly_then_aborts_after_a_grace(
    node: Any, certs: Any
) -> None:
    from chatproto.federation import CLOSE_GRACE

    _realm, fed, clock = node
    fed.startService = lambda: None  # type: ignore[method-assign]  # not listening
    fed.running = True
    realms_own = set(clock.getDelayedCalls())
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    d = fed.stopService()
    assert transport.disconnecting and not aborted  # loseConnection: TLS close_notify
    assert not d.called  # waits for the link to close
    clock.advance(CLOSE_GRACE)
    assert aborted == [True]  # a peer that does not close is cut off
    proto.connectionLost(None)
    assert d.called
    assert {c for c in clock.getDelayedCalls() if c.active()} <= realms_own  # no link timer


def test_items_breaking_rules_are_rejected_one_by_one(node: Any, certs: Any) -> None:
    realm, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    bad = [
        item(1, sender="mallory@c.example"),
        item(2, to="nobody@b.example"),
        item(3, to="carol@c.example"),
        {**item(4), "kind": "event"},
        {**item(5), "body": 5},
        {**item(6), "meta": {"x": 1}},
        "not an object",
        item(7, to="#group@b.example"),
        {**item(8), "id": ""},
        item(9),
    ]
    proto.dataReceived(frame({"type": "txn", "id": "t", "items": bad}))
    _, ack = frames(transport)
    codes = [(r["id"], r["code"]) for r in ack["rejected"]]
    assert codes == [
        ("id-1", "forged_sender"),
        ("id-2", "no_such_user"),
        ("id-3", "bad_address"),
        ("id-4", "bad_request"),
        ("id-5", "bad_request"),
        ("id-6", "bad_request"),
        (None, "bad_request"),
        ("id-7", "no_such_group"),
        ("", "bad_request"),
    ]
    assert [e.body for e in realm.store.read_feed("bob@b.example", 0, 10).result] == ["m9"]


#: Item ids a peer may not use (PROTOCOL.md, Federation, Numbers): control characters
#: (C0, DEL, C1), a space, line and paragraph separators, bidi formatting characters.
BAD_ITEM_IDS = [
    "nul\x00",
    "cr\r",
    "lf\n",
    "crlf\r\nPRIVMSG #x :hi",
    "tab\t",
    "sp ace",
    "esc\x1b[31m",
    "del\x7f",
    "c1\x9b31m",
    "nel\x85",
    "ls\u2028",
    "ps\u2029",
    "bidi\u202e",
    "isolate\u2066",
    "x" * 65,
]


@pytest.fixture
def captured() -> Any:
    from tests.fedharness import LogCapture

    capture = LogCapture()
    yield capture
    capture.close()


def test_item_ids_with_control_characters_are_rejected_and_never_stored(
    node: Any, certs: Any, captured: Any
) -> None:
    """Every id a client names goes through check_msg_id; a peer's item id was only
    length-checked, so an item no one could react to, edit or delete, whose id held
    CR/LF or an escape, was stored and delivered.  Each is refused in the ``ack``
    (``bad_request``), the rest of the transaction stored; byte by byte as well."""
    realm, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    items: list[Any] = [{**item(n), "id": mid} for n, mid in enumerate(BAD_ITEM_IDS)]
    items.append({**item(99), "id": "ok~1.x_y-Z"})  # '~', '.', '_' and '-' are fine
    items.append(
        {
            "id": "req\r\n",
            "kind": "request",
            "from": "alice@a.example",
            "to": "#g@b.example",
            "event": "joined",
            "args": {},
        }
    )
    data = hello() + frame({"type": "txn", "id": "1-9", "items": items})
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    _, ack = frames(transport)
    assert [(r["id"], r["code"]) for r in ack["rejected"]] == [
        (mid, "bad_request") for mid in [*BAD_ITEM_IDS, "req\r\n"]
    ]
    assert all("id" in r["message"] for r in ack["rejected"]), ack
    feed = realm.store.read_feed("bob@b.example", 0, 100).result
    assert [(e.id, e.body) for e in feed] == [("ok~1.x_y-Z", "m99")]
    for mid in BAD_ITEM_IDS:
        assert realm.store.stored_item(mid).result is None, repr(mid)
    assert not transport.disconnecting
    # Logged with the id spelled so that it cannot start a line of its own.
    refusals = [line for line in captured.lines if "rejected item" in line]
    assert len(refusals) == len(BAD_ITEM_IDS) + 1
    assert not [line for line in refusals if not line.isprintable()], refusals
    assert any("'crlf\\r\\nPRIVMSG #x :hi'" in line for line in refusals), refusals


@pytest.mark.parametrize("mid", BAD_ITEM_IDS)
def test_the_rule_of_a_peers_item_id_is_that_of_a_msg_id(mid: str) -> None:
    """The intake's rule (chatproto.realm.remote) refuses what check_msg_id refuses,
    and every id longer than a federation item id may be."""
    from chatproto.errors import ChatError
    from chatproto.realm.remote import check_item_id
    from chatproto.relations import check_msg_id

    with pytest.raises(ChatError) as e:
        check_item_id(mid)
    assert e.value.code == "bad_request"
    if len(mid) <= 64:
        with pytest.raises(ChatError):
            check_msg_id(mid)
    for good in ("0193a1b2c3d4e5f60718293a4b5c6d7e8f9", "Zk3...1~bounce", "é✓"):
        assert check_item_id(good) == good


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame({"type": "txn", "id": "1", "items": []}), "bad_request"),  # before hello
        (hello() + hello(), "bad_request"),
        (frame({"type": "hello", "version": 2, "realm": "a.example"}), "unsupported_version"),
        (frame({"type": "hello", "version": 1, "realm": "bad realm"}), "bad_request"),
        (hello() + frame({"type": "nonsense"}), "unknown_type"),
        (hello() + struct.pack("!I", 3) + b"\x00ab", "bad_frame"),
        (hello() + frame({"type": "txn", "id": 5, "items": []}), "bad_request"),
        (hello() + frame({"type": "txn", "id": "x", "items": {}}), "bad_request"),
        (
            hello() + frame({"type": "txn", "id": "x", "items": [{}] * (MAX_TXN_ITEMS + 1)}),
            "too_large",
        ),
        (hello() + struct.pack("!I", 4 * 1024 * 1024 + 1), "too_large"),
    ],
)
def test_misbehaviour_is_an_error_and_a_disconnect(
    node: Any, certs: Any, data: bytes, code: str
) -> None:
    _, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(data)
    errors = [f for f in frames(transport) if f["type"] == "error"]
    assert errors and errors[-1]["code"] == code
    assert transport.disconnecting


def test_misbehaving_peer_is_refused_for_a_while(node: Any, certs: Any) -> None:
    _, fed, clock = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello() + frame({"type": "nonsense"}))
    assert transport.disconnecting
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    assert frames(transport)[0]["code"] == "rate_limited"
    clock.advance(fed.cfg.retry_initial + 0.01)
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    assert frames(transport)[0]["type"] == "welcome"


def test_flood_of_unacknowledged_transactions(node: Any, certs: Any) -> None:
    realm, fed, _ = node
    pending: Deferred[list[Any]] = Deferred()
    realm.receive_remote = lambda origin, items, fetch=None, queued=None: pending  # slow
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    for i in range(MAX_INFLIGHT):
        proto.dataReceived(frame({"type": "txn", "id": str(i), "items": []}))
    assert not transport.disconnecting
    proto.dataReceived(frame({"type": "txn", "id": "one too many", "items": []}))
    assert frames(transport)[-1]["code"] == "rate_limited"
    assert transport.disconnecting


@pytest.mark.parametrize(
    ("cert", "claim", "chain_error", "reason"),
    [
        (None, "a.example", None, "presented no certificate"),
        ("a.example", "c.example", None, "certificate is for a.example, not c.example"),
        ("a.example", "a.example", "untrusted CA", "certificate not trusted: untrusted CA"),
        ("a.example", "b.example", None, "this realm's own name"),
    ],
)
def test_hello_refusals(
    node: Any, certs: Any, cert: str | None, claim: str, chain_error: str | None, reason: str
) -> None:
    _, fed, _ = node
    proto, transport = connect(fed, certs[cert]["cert"] if cert else None, chain_error)
    proto.dataReceived(hello(claim))
    (error,) = frames(transport)
    assert error["type"] == "error" and reason in error["message"]
    assert error["code"] == "untrusted_peer"
    assert transport.disconnecting


def test_denied_realm_and_hello_timeout(node: Any, certs: Any) -> None:
    _, fed, clock = node
    fed.cfg.deny = ["a.example"]
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    assert frames(transport)[0]["code"] == "peer_denied"
    proto, transport = connect(fed, certs["a.example"]["cert"])
    clock.advance(30.0)
    assert frames(transport)[0]["code"] == "timeout"
    assert transport.disconnecting
    proto.connectionLost(None)
    assert proto._timeout is None
    assert all("_hello_timeout" not in repr(c) for c in clock.getDelayedCalls())


def test_remote_presence_reaches_local_partners(node: Any, certs: Any) -> None:
    realm, fed, _ = node
    proto, _ = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello() + frame({"type": "txn", "id": "1", "items": [item(1)]}))

    class Mind(NullMind):
        notices: list[Any] = []

        def notify(self, notice: Any) -> None:
            self.notices.append(notice.data)

    mind = Mind()
    session = realm.login("bob", "password-1", mind).result
    session.start().result  # noqa: B018
    proto.dataReceived(frame({"type": "presence", "user": "alice@a.example", "status": "away"}))
    proto.dataReceived(frame({"type": "presence", "user": "eve@c.example", "status": "away"}))
    assert mind.notices == [{"type": "presence", "user": "alice@a.example", "status": "away"}]


def test_presence_of_users_no_one_hears_is_kept_within_a_bound(
    node: Any, certs: Any, monkeypatch: Any
) -> None:
    """A peer naming new users in presence frames without end: those no user here
    hears are kept (a contact may come online), up to MAX_UNHEARD_PER_REALM of the
    realm, the oldest forgotten first; one with a contact here online is kept."""
    from chatproto.realm import presence

    monkeypatch.setattr(presence, "MAX_UNHEARD_PER_REALM", 50, raising=False)
    realm, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello() + frame({"type": "txn", "id": "1", "items": [item(1)]}))
    session = realm.login("bob", "password-1", NullMind()).result
    session.start().result  # noqa: B018  (alice@a.example is bob's partner)
    data = frame({"type": "presence", "user": "alice@a.example", "status": "away"})
    for n in range(200):
        data += frame({"type": "presence", "user": f"u{n}@a.example", "status": "online"})
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    known = realm.presence.remote
    assert len(known) == 51 and known["alice@a.example"] == ("away", "")
    newest = sorted(f"u{n}@a.example" for n in range(150, 200))
    assert sorted(known) == ["alice@a.example", *newest]
    offline = frame({"type": "presence", "user": "u199@a.example", "status": "offline"})
    proto.dataReceived(offline)
    assert "u199@a.example" not in known and len(known) == 50
    assert not transport.disconnecting


def test_presence_past_the_unheard_bound_is_kept_for_a_user_heard_since(
    node: Any, certs: Any, monkeypatch: Any
) -> None:
    """The oldest unheard user past MAX_UNHEARD_PER_REALM is forgotten only if still
    no one here hears them: alice@a.example, told while her partner bob was offline,
    is heard once bob logs in, and her presence stays when newer users push her out
    of the unheard ones."""
    from chatproto.realm import presence

    monkeypatch.setattr(presence, "MAX_UNHEARD_PER_REALM", 50)
    realm, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello() + frame({"type": "txn", "id": "1", "items": [item(1)]}))
    proto.dataReceived(frame({"type": "presence", "user": "alice@a.example", "status": "away"}))
    session = realm.login("bob", "password-1", NullMind()).result
    session.start().result  # noqa: B018  (alice@a.example is bob's partner now)
    data = b"".join(
        frame({"type": "presence", "user": f"u{n}@a.example", "status": "online"})
        for n in range(50)
    )
    proto.dataReceived(data)
    known = realm.presence.remote
    assert known["alice@a.example"] == ("away", "")
    assert len(known) == 51
    proto.dataReceived(frame({"type": "presence", "user": "u50@a.example", "status": "online"}))
    assert "u0@a.example" not in known and len(known) == 51  # (unheard: forgotten)
    assert not transport.disconnecting


def test_keepalive_pings_an_idle_peer_and_drops_a_silent_one(node: Any, certs: Any) -> None:
    _, fed, clock = node
    fed.cfg.keepalive = 30.0
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    clock.advance(29)
    assert [f["type"] for f in frames(transport)] == ["welcome"]
    clock.advance(1)  # 30 s without a byte from the peer: ping
    assert [f["type"] for f in frames(transport)] == ["ping"]
    proto.dataReceived(frame({"type": "pong"}))  # the peer is there
    proto.dataReceived(frame({"type": "ping"}))  # and may ask the same
    assert frames(transport)[-1] == {"type": "pong"}
    clock.advance(60)
    assert not transport.disconnecting
    clock.advance(30)  # 90 s of silence: the connection is dropped (no penalty)
    assert transport.disconnecting
    assert fed.inbound_refusal("a.example", CertTransport(certs["a.example"]["cert"]))[1] is None
    # a ping before hello is a protocol error
    proto2, transport2 = connect(fed, certs["a.example"]["cert"])
    proto2.dataReceived(frame({"type": "ping"}))
    assert frames(transport2)[-1]["code"] == "bad_request"


def test_a_link_reads_nothing_while_the_peer_does_not_read(node: Any, certs: Any) -> None:
    """The link is the producer of its connection: told the peer is not reading what
    it writes (the connection's buffer is full), it reads and handles nothing more
    -- each frame read could make it write, a pong per ping, an ack per txn -- and
    handles what waited, in order, once the peer reads again."""
    realm, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    assert transport.producer is proto.flow and transport.streaming
    proto.dataReceived(hello())
    assert [f["type"] for f in frames(transport)] == ["welcome"]
    proto.flow.pauseProducing()  # what the transport does when its buffer is full
    assert transport.producerState == "paused"  # no more bytes read from the socket
    data = frame({"type": "ping"}) * 3 + frame({"type": "txn", "id": "t1", "items": [item(1)]})
    for i in range(len(data)):  # (what was read already waits as well)
        proto.dataReceived(data[i : i + 1])
    assert frames(transport) == []
    assert realm.store.stored_item("id-1").result is None
    proto.flow.resumeProducing()
    assert transport.producerState == "producing"
    assert frames(transport) == [{"type": "pong"}] * 3 + [{"type": "ack", "id": "t1"}]
    assert not transport.disconnecting


def test_a_file_fetch_that_makes_no_progress_is_dropped(node: Any, certs: Any) -> None:
    """A peer that answers pings but never sends the bytes of a file it sent would
    hold its transaction (and its link) for ever: after three keepalive intervals
    without a byte of the file, the link is closed with ``timeout``."""
    _, fed, clock = node
    fed.cfg.keepalive = 30.0
    proto, transport = connect(fed, certs["a.example"]["cert"])
    data = b"never sent"
    meta = {
        "file_id": "f" * 32,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "name": "n.txt",
        "media_type": "text/plain",
    }
    file_item = {**item(1), "kind": "file", "body": "n.txt", "meta": meta}
    proto.dataReceived(hello() + frame({"type": "txn", "id": "t1", "items": [file_item]}))
    assert [f["type"] for f in frames(transport)] == ["welcome", "fetch"]
    for _ in range(2):  # the peer is there (pongs)...
        clock.advance(30)
        proto.dataReceived(frame({"type": "pong"}))
        assert not transport.disconnecting
    clock.advance(29.9)
    proto.dataReceived(frame({"type": "ping"}))
    clock.advance(0.1)  # ...but 90 s without a byte of the file
    errors = [f for f in frames(transport) if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["timeout"]
    assert "no progress" in errors[0]["message"]
    assert transport.disconnecting
    proto.connectionLost(None)  # the transaction is abandoned, the partial file dropped


def test_a_flood_of_presence_is_refused(node: Any, certs: Any) -> None:
    _, fed, clock = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    one = frame({"type": "presence", "user": "alice@a.example", "status": "away"})
    proto.dataReceived(one * int(PRESENCE_BURST))  # a burst is fine
    clock.advance(1.0)
    proto.dataReceived(one * int(PRESENCE_RATE))  # so is the rate, a second later
    assert not transport.disconnecting
    proto.dataReceived(one * 2)  # past it: a flood
    errors = [f for f in frames(transport) if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]
    assert transport.disconnecting


@functools.cache
def _fuzz_fed() -> Any:
    d = tempfile.mkdtemp(prefix="chatproto-fuzz-")
    paths = tls.write_dev_certs(d, "b.example")
    cfg = config.Config(realm="b.example", data_dir=d)
    f = cfg.federation
    f.enabled, f.certificate, f.private_key, f.ca = True, paths["cert"], paths["key"], paths["ca"]
    cfg.check()
    clock = Clock()
    return FederationService(make_test_realm(clock, cfg), clock, clock=clock, status_path="")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_a_value_or_a_clean_error(data: bytes) -> None:
    fed = _fuzz_fed()
    proto = fed.factory.buildProtocol(None)
    transport = CertTransport(None)
    proto.makeConnection(transport)
    proto.dataReceived(struct.pack("!I", len(data)) + data)
    for f in frames(transport):
        assert f["type"] == "error"
    proto.connectionLost(None)


# outbound bookkeeping and discovery ---------------------------------------------------------


class _Out:
    """Stands in for an OutboundProtocol: records the frames a PeerLink sends."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.sent.append(obj)

    def fail(self, code: str, message: str) -> None:
        self.closed = True


def test_link_sends_in_order_within_the_window_and_acks(node: Any) -> None:
    realm, fed, _ = node
    fed.cfg.batch_size = 2
    fed.cfg.window = 2
    link = fed.link("a.example")  # not started: the test plays the connection
    for i in range(5):
        realm.post("bob", "alice@a.example", f"m{i}")

    out = _Out()
    link.proto = out  # type: ignore[assignment]
    link._waiting = 5  # five items queued (the realm's wakes while not connected)
    link.pump()
    assert [t["id"] for t in out.sent] == ["1-2", "3-4"]  # window of 2
    link.acked(out, "1-2", [])  # type: ignore[arg-type]
    assert [t["id"] for t in out.sent] == ["1-2", "3-4", "5-5"]
    assert [i["body"] for t in out.sent for i in t["items"]] == [f"m{i}" for i in range(5)]
    assert realm.store.outbox_counts().result == {"a.example": 3}
    link.acked(out, "5-5", [])  # type: ignore[arg-type]  # not the oldest: misbehaviour
    assert out.closed
    # connection lost: the unacknowledged transactions go again on the next one
    link.lost(out, None)  # type: ignore[arg-type]
    again = _Out()
    link.proto = again  # type: ignore[assignment]
    link.sent_seq = link.acked_seq
    link._waiting = fed.cfg.batch_size  # as when a connection becomes ready
    link.pump()
    assert [t["id"] for t in again.sent] == ["3-4", "5-5"]


def test_an_item_too_large_for_any_transaction_bounces_instead_of_blocking_the_link(
    node: Any,
) -> None:
    realm, fed, _ = node
    realm.config.limits.max_body = 200_000
    link = fed.link("a.example")  # not started: the test plays the connection
    link.peer_max_frame = 65536  # the peer's limit (from its welcome) is below ours
    out = _Out()
    link.proto = out  # type: ignore[assignment]
    small = realm.post("bob", "alice@a.example", "before").result
    link._waiting = 1
    link.pump()
    assert [t["id"] for t in out.sent] == ["1-1"]
    big = realm.post("bob", "alice@a.example", "\x01" * 20_000).result  # 120 KB of JSON
    after = realm.post("bob", "alice@a.example", "after").result
    link._waiting = 2
    link.pump()  # "before" is unacknowledged: the big one waits, is not sent
    assert [t["id"] for t in out.sent] == ["1-1"]
    assert realm.store.outbox_counts().result == {"a.example": 3}
    link.acked(out, "1-1", [])  # type: ignore[arg-type]
    # then it is bounced and dropped, and what follows goes on
    assert [t["id"] for t in out.sent] == ["1-1", "3-3"]
    assert [i["id"] for i in out.sent[-1]["items"]] == [after.id]
    feed = fired(realm.store.read_feed("bob@b.example", 0, 10))
    bounce = feed[-1]
    assert (bounce.kind, bounce.meta["id"], bounce.meta["code"]) == ("bounce", big.id, "too_large")
    assert link.rejected_items == 1
    link.acked(out, "3-3", [])  # type: ignore[arg-type]
    assert realm.store.outbox_counts().result == {}
    assert small.id != big.id


def test_rejected_items_bounce_to_their_sender_once_before_the_outbox_forgets_them(
    node: Any,
) -> None:
    realm, fed, _ = node
    realm.create_user("carol", "password-1")
    link = fed.link("a.example")  # not started: the test plays the connection
    sent = [realm.post("bob", "nobody@a.example", "m0").result]
    sent.append(realm.post("carol", "alice@a.example", "m1").result)
    out = _Out()
    link.proto = out  # type: ignore[assignment]
    link._waiting = 2
    link.pump()
    assert [t["id"] for t in out.sent] == ["1-2"]
    # the bounce is committed before the outbox rows go: hold its commit
    held: list[Deferred[None]] = []
    real_bounce = realm.bounce

    def slow_bounce(peer: str, rejected: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        held.append(d)
        return d.addCallback(lambda _: real_bounce(peer, rejected))

    realm.bounce = slow_bounce
    rejected = [{"id": sent[0].id, "code": "no_such_user", "message": "no user nobody"}]
    link.acked(out, "1-2", rejected)  # type: ignore[arg-type]
    realm.post("carol", "alice@a.example", "m2")
    link._waiting = 1  # (the service is not running: wakes do not reach the link)
    link.pump()
    assert [t["id"] for t in out.sent] == ["1-2", "3-3"]
    link.acked(out, "3-3", [])  # type: ignore[arg-type]  # a later ack waits its turn
    assert realm.store.outbox_counts().result == {"a.example": 3}
    assert [e.kind for e in realm.store.read_feed("bob@b.example", 0, 10).result] == ["text"]
    held[0].callback(None)
    assert realm.store.outbox_counts().result == {}
    assert link._settling is None
    feed = realm.store.read_feed("bob@b.example", 0, 10).result
    assert [e.kind for e in feed] == ["text", "bounce"]
    bounce = feed[1]
    assert (bounce.sender, bounce.recipient) == ("nobody@a.example", "bob@b.example")
    assert bounce.meta == {"id": sent[0].id, "code": "no_such_user", "realm": "a.example"}
    assert [e.kind for e in realm.store.read_feed("carol@b.example", 0, 10).result] == [
        "text",
        "text",
    ]
    # the same refusal again (the transaction was sent again after a crash): one bounce
    realm.bounce = real_bounce
    realm.bounce("a.example", [(sent[0], "no_such_user", "no user nobody")])
    feed = realm.store.read_feed("bob@b.example", 0, 10).result
    assert [e.kind for e in feed] == ["text", "bounce"]
    # only our own users are told; rejections naming no item sent bounce nothing
    forwarded = Envelope("x1", "text", "zed@c.example", "#g@b.example", 1.0, "hi")
    assert realm.bounce("a.example", [(forwarded, "not_member", "no")]).result is None
    link.proto = out  # type: ignore[assignment]
    realm.post("bob", "alice@a.example", "m3")
    link._waiting = 1
    link.pump()
    link.acked(out, out.sent[-1]["id"], ["junk", {"id": 5}, {"id": "unknown"}])  # type: ignore[arg-type]
    assert link.rejected_items == 3  # the two objects; "junk" is ignored
    assert [e.kind for e in realm.store.read_feed("bob@b.example", 0, 10).result] == [
        "text",
        "bounce",
        "text",
    ]


@pytest.mark.parametrize(
    "message",
    ["\x1b[2J\x1b[31mpwned", "line\r\nforged line", "c1 \x9b2J", "\u202etxt.exe", "nul\x00"],
)
def test_a_peers_refusal_message_reaches_the_bounce_only_as_plain_text(
    node: Any, captured: Any, message: str
) -> None:
    """The ``message`` of a ``rejected`` entry is written into the ``bounce`` item our
    user is sent: one that is not a label (an escape sequence, CR/LF, a C1 control, a
    bidi override) reads as empty, as PROTOCOL.md says of another ``message``; and
    the id the peer names is logged so that it cannot start a line of its own."""
    realm, fed, _ = node
    link = fed.link("a.example")  # not started: the test plays the connection
    sent = realm.post("bob", "alice@a.example", "m0").result
    out = _Out()
    link.proto = out  # type: ignore[assignment]
    link._waiting = 1
    link.pump()
    rejected = [
        {"id": sent.id, "code": "no_such_user", "message": message},
        {"id": "forged\r\nfederation: all is well", "code": "x", "message": "fine"},
    ]
    link.acked(out, out.sent[-1]["id"], rejected)  # type: ignore[arg-type]
    feed = realm.store.read_feed("bob@b.example", 0, 10).result
    assert [e.kind for e in feed] == ["text", "bounce"]
    assert feed[1].body.endswith("was refused by a.example: no_such_user: "), feed[1].body
    lines = [line for line in captured.lines if "rejected item" in line]
    assert len(lines) == 2 and all(line.isprintable() for line in lines), lines
    assert "'forged\\r\\nfederation: all is well'" in lines[1], lines


def test_items_for_a_peer_down_too_long_or_no_longer_allowed_bounce(node: Any) -> None:
    realm, fed, clock = node
    fed.cfg.give_up_after = 100.0
    link = fed.link("a.example")  # not started; down since it was made, at time 0
    fed.running = True  # as if started (the test plays the links: nothing listens)
    old = [realm.post("bob", "alice@a.example", f"old {i}").result for i in range(2)]
    pending = realm.group_event_as("bob", "joined", "#dev@a.example").result
    assert pending.pos == 0  # a request queued for the group's home realm
    clock.advance(60)
    young = realm.post("bob", "alice@a.example", "young").result
    clock.advance(50)  # 110 s down: the old three are given up on, "young" waits on
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {"a.example": 1}
    feed = realm.store.read_feed("bob@b.example", 0, 10).result
    bounces = [e for e in feed if e.kind == "bounce"]
    assert [(b.meta["id"], b.meta["code"], b.sender) for b in bounces] == [
        (old[0].id, "peer_unreachable", "alice@a.example"),
        (old[1].id, "peer_unreachable", "alice@a.example"),
        (pending.id, "peer_unreachable", "#dev@a.example"),
    ]
    assert bounces[2].meta["event"] == "joined"
    assert "a.example could not be reached for 100 seconds" in bounces[0].body
    assert link.given_up == 3 and link.status()["given_up"] == 3
    # a link that is up gives up on nothing, however old its queue
    link.down_since = None
    clock.advance(1000)
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {"a.example": 1}
    # a realm no longer allowed: everything queued bounces at once
    fed.cfg.deny = ["a.example"]
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {}
    last = realm.store.read_feed("bob@b.example", 0, 10).result[-1]
    assert (last.kind, last.meta["id"], last.meta["code"]) == ("bounce", young.id, "peer_denied")
    # 0: never give up (a realm that answered once: one never reached would still
    # be given up on after give_up_unreached)
    fed.reached_realm("a.example")
    fed.cfg.deny = []
    fed.cfg.give_up_after = 0.0
    link.down_since = 0.0
    realm.post("bob", "alice@a.example", "patient")
    clock.advance(10**7)
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {"a.example": 1}


class SilentResolver:
    """DNS that never answers: a link to any realm stays ``connecting``."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookupService(self, name: str) -> Deferred[Any]:
        self.asked.append(name)
        return Deferred()


def _code(d: Deferred[Any]) -> str:
    failure = d.result  # type: ignore[attr-defined]
    d.addErrback(lambda f: None)
    return str(failure.value.code)


def test_open_federation_keeps_state_for_at_most_max_peers_realms(node: Any) -> None:
    """With an empty allow list every made-up realm a user names would get a link
    (outbox cursor, retries, DNS look-ups, metrics labels).  Past max_peers the send,
    the invite, the group request are refused (peer_denied) and nothing is stored; a
    realm with a link takes more.  Once the made-up realms' items are given up on,
    their links idle and are forgotten, and a new realm fits again.  (Before the
    bound, all seven realms got a link.)"""
    realm, fed, clock = node
    fed.cfg.max_peers = 3
    fed.cfg.give_up_after = 100.0
    fed.cfg.idle_after = 10.0
    fed.resolver = SilentResolver()
    fed.running = True  # as if started (the links connect for ever: DNS never answers)
    made_up = [f"made-up-{i}.example" for i in range(7)]
    refusal = bob_takes_places_then_is_refused(realm, made_up[:3], made_up[3:6])
    assert "(federation.max_peers)" in refusal
    assert sorted(fed.links) == made_up[:3]
    assert realm.store.outbox_counts().result == {
        made_up[0]: 2,
        made_up[1]: 1,
        made_up[2]: 1,
    }
    feed = realm.store.read_feed("bob@b.example", 0, 20).result
    assert {e.recipient for e in feed if e.kind == "text"} == {f"x@{r}" for r in made_up[:3]} | {
        f"y@{made_up[0]}"
    }
    # An item queued by a path that did not ask first (a file item's commit): it
    # bounces to its sender instead of making a fourth link.
    env = realm.messages.new_envelope("bob@b.example", f"z@{made_up[6]}", "text", "late")
    realm.commit_item(env).result  # noqa: B018
    assert made_up[6] not in fed.links
    assert made_up[6] not in realm.store.outbox_counts().result
    last = realm.store.read_feed("bob@b.example", 0, 20).result[-1]
    assert (last.kind, last.meta["id"], last.meta["code"]) == ("bounce", env.id, "peer_denied")
    assert "max_peers" in last.body
    # The made-up realms never answer: their items are given up on, their links idle
    # (idle_after) and are forgotten; a new realm has a place again.
    clock.advance(101)
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {}
    clock.advance(fed.cfg.idle_after)
    assert fed.links == {}
    realm.post("bob", f"x@{made_up[3]}", "now").result  # noqa: B018
    assert sorted(fed.links) == [made_up[3]]
    fed.running = False
    for link in fed.links.values():
        link.stop()


def test_idle_links_are_forgotten_at_the_bound_but_not_static_peers(node: Any) -> None:
    """A link made for a realm that ends up with nothing (a history request for a
    group there, a presence frame) is kept RESERVED seconds, then forgotten when a
    new realm finds the bound reached; a static peer's link is never forgotten."""
    from chatproto.federation.peer import RESERVED

    realm, fed, clock = node
    fed.cfg.max_peers = 2
    fed.cfg.peers = [config.Peer("a.example")]
    fed.running = True
    fed.link("a.example")  # listed from start
    assert fed.admit("c.example")
    assert not fed.admit("d.example")  # c's link is new: its item may be committing
    clock.advance(RESERVED)
    asked: list[str] = []  # (a scan of every group, for each link: not at the bound)
    realm.presence_wanted = lambda r: asked.append(r) or False  # type: ignore[method-assign]
    assert fed.admit("d.example")
    assert asked == []
    assert sorted(fed.links) == ["a.example", "d.example"]
    assert _code(realm.post("bob", "x@e.example", "hi")) == "peer_denied"  # d: too new
    # queued with no link and no place for one (a wake-up lost): the sweep bounces it
    env = realm.messages.new_envelope("bob@b.example", "z@f.example", "text", "behind")
    realm.store.append([env], [("f.example", env)]).result  # noqa: B018
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {}
    assert sorted(fed.links) == ["a.example", "d.example"]
    last = realm.store.read_feed("bob@b.example", 0, 20).result[-1]
    assert (last.kind, last.meta["id"], last.meta["code"]) == ("bounce", env.id, "peer_denied")
    fed.running = False


def _message(d: Deferred[Any]) -> str:
    failure = d.result  # type: ignore[attr-defined]
    d.addErrback(lambda f: None)
    return f"{failure.value.code}: {failure.value.message}"


def bob_takes_places_then_is_refused(realm: Any, taken: list[str], refused: list[str]) -> str:
    """bob sends to a user of each realm of ``taken`` (each send takes a place),
    then is refused (peer_denied) a message to ``refused[0]``, the invitation of a
    user of ``refused[1]`` into his new group #dev and a request for a group of
    ``refused[2]``; a realm with a link (``taken[0]``) still takes his items.
    Returns the message's refusal, ``peer_denied: <why>``."""
    for r in taken:
        realm.post("bob", f"x@{r}", "hi").result  # noqa: B018
    refusal = _message(realm.post("bob", f"x@{refused[0]}", "hi"))
    assert refusal.startswith("peer_denied: "), refusal
    realm.group_event_as("bob", "created", "#dev").result  # noqa: B018
    assert _code(realm.group_event_as("bob", "invited", "#dev", user=f"x@{refused[1]}")) == (
        "peer_denied"
    )
    assert _code(realm.group_event_as("bob", "joined", f"#g@{refused[2]}")) == "peer_denied"
    realm.post("bob", f"y@{taken[0]}", "a realm with a link takes more").result  # noqa: B018
    return refusal


def test_one_user_cannot_take_every_place_with_realms_never_reached(node: Any) -> None:
    """max_peers 10, max_peers_per_user 3: bob's sends to three made-up realms take
    his three places; a fourth realm is refused to him (peer_denied naming
    max_peers_per_user) for a message, an invitation and a group request alike, while
    alice still reaches a new realm and a realm with a link still takes bob's items.
    A realm that answers (a handshake either way) is proven: its place is no longer
    bob's, so he has one again.  A peer's key requests are charged to that peer.
    (Before, the bound was global only: bob could take all ten.)"""
    realm, fed, _ = node
    realm.create_user("alice", "password-1")
    fed.cfg.max_peers = 10
    fed.cfg.max_peers_per_user = 3
    fed.resolver = SilentResolver()
    fed.running = True
    made_up = [f"made-up-{i}.example" for i in range(8)]
    refusal = bob_takes_places_then_is_refused(realm, made_up[:3], [made_up[3]] * 3)
    assert "max_peers_per_user" in refusal
    realm.post("alice", f"x@{made_up[3]}", "someone else is not refused").result  # noqa: B018
    assert fed.held == {
        "bob@b.example": set(made_up[:3]),
        "alice@b.example": {made_up[3]},
    }
    assert made_up[4] not in fed.links
    # made-up-1 answers after all (our link's welcome, or its hello): it is proven and
    # no one's; bob has a place again, and bob's next send there costs nothing.
    fed.peer_connected(made_up[1])
    assert fed.held["bob@b.example"] == {made_up[0], made_up[2]}
    realm.post("bob", f"x@{made_up[4]}", "a place again").result  # noqa: B018
    realm.post("bob", f"z@{made_up[1]}", "proven").result  # noqa: B018
    assert _code(realm.post("bob", f"x@{made_up[5]}", "hi")) == "peer_denied"
    # A peer's transactions asking for the keys of realms never reached: charged to
    # that peer, at most max_peers_per_user of them.
    for r in made_up[5:8]:
        fed.want_keys(r, "evil.example")
    assert fed.held["evil.example"] == set(made_up[5:8])
    assert fed.want_keys("made-up-9.example", "evil.example").result is False
    assert "made-up-9.example" not in fed.links
    # Presence alone makes no link to a realm never reached (a user's contacts on
    # made-up realms would get links each time they come online), but does to one
    # that was reached.
    fed.presence({"made-up-10.example"}, {"type": "presence", "user": "bob@b.example"})
    assert "made-up-10.example" not in fed.links
    fed.reached.add("real.example")
    fed.presence({"real.example"}, {"type": "presence", "user": "bob@b.example"})
    assert "real.example" in fed.links and fed.links["real.example"].holder is None
    fed.running = False
    for link in fed.links.values():
        link.stop()


def test_items_for_a_realm_never_reached_are_given_up_after_give_up_unreached(node: Any) -> None:
    """give_up_unreached 100 s (give_up_after a week): bob's items for a made-up realm
    bounce (peer_unreachable, "never answered") after 100 s, when those for a realm
    that was reached once wait on; the made-up realm's link then idles and is
    forgotten.  Bob's place is his again as soon as they are given up on (until he
    writes there again).  (Before, they waited give_up_after, and the place stayed
    taken for a week.)"""
    realm, fed, clock = node
    fed.cfg.max_peers_per_user = 1
    fed.cfg.give_up_unreached = 100.0
    fed.cfg.idle_after = 10.0
    fed.resolver = SilentResolver()
    fed.running = True
    fed.reached.add("real.example")  # it answered once (it is down now)
    realm.post("bob", "x@made-up.example", "lost").result  # noqa: B018
    realm.post("bob", "x@real.example", "later").result  # noqa: B018
    assert fed.held == {"bob@b.example": {"made-up.example"}}
    assert _code(realm.post("bob", "x@other.example", "hi")) == "peer_denied"
    clock.advance(99)
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {"made-up.example": 1, "real.example": 1}
    clock.advance(2)
    fed.give_up().result  # noqa: B018
    assert realm.store.outbox_counts().result == {"real.example": 1}
    last = realm.store.read_feed("bob@b.example", 0, 20).result[-1]
    assert (last.kind, last.meta["code"]) == ("bounce", "peer_unreachable")
    assert "never answered" in last.body
    assert fed.held == {}  # at once: nothing of bob's waits there any more
    # Writing there again (its link is still there, retrying) takes the place again.
    realm.post("bob", "x@made-up.example", "again").result  # noqa: B018
    assert fed.held == {"bob@b.example": {"made-up.example"}}
    assert _code(realm.post("bob", "x@other.example", "hi")) == "peer_denied"
    clock.advance(101)
    fed.give_up().result  # noqa: B018
    assert fed.held == {}
    clock.advance(fed.cfg.idle_after)
    assert sorted(fed.links) == ["real.example"]
    realm.post("bob", "x@other.example", "a place again").result  # noqa: B018
    fed.running = False
    for link in fed.links.values():
        link.stop()


class FakeResolver:
    def __init__(self, records: list[tuple[int, int, int, str]] | Exception) -> None:
        self.records = records
        self.asked: list[str] = []

    def lookupService(self, name: str) -> Deferred[Any]:
        self.asked.append(name)
        if isinstance(self.records, Exception):
            from twisted.internet.defer import fail

            return fail(self.records)
        answers = [
            dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(p, w, port, target))
            for p, w, port, target in self.records
        ]
        return succeed((answers, [], []))


def test_discovery_static_then_srv_then_default() -> None:
    static = PeerEndpoint(None, "b.example", "10.0.0.2:7522", None, FakeResolver([]))
    assert static.resolve().result == ("10.0.0.2", 7522)  # type: ignore[attr-defined]
    resolver = FakeResolver([(20, 5, 9000, "slow.b.example"), (10, 1, 7600, "chat.b.example")])
    srv = PeerEndpoint(None, "b.example", "", None, resolver)
    assert srv.resolve().result == ("chat.b.example", 7600)  # type: ignore[attr-defined]
    assert resolver.asked == ["_chatproto-fed._tcp.b.example"]
    none = PeerEndpoint(None, "b.example", "", None, FakeResolver(dns.DomainError("nx")))
    assert none.resolve().result == ("b.example", 7422)  # type: ignore[attr-defined]
    empty = PeerEndpoint(None, "b.example", "", None, FakeResolver([(0, 0, 0, "")]))
    assert empty.resolve().result == ("b.example", 7422)  # type: ignore[attr-defined]


def test_realm_refuses_remote_recipients_when_federation_is_off() -> None:
    realm = make_test_realm(Clock())
    realm.create_user("alice", "password-1")
    d = realm.post("alice", "bob@b.example", "x")
    assert d.result.value.code == "remote_realm"  # type: ignore[attr-defined]
    d.addErrback(lambda f: None)


# chatrealmctl -----------------------------------------------------------------------------


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    status = ctl.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def test_gen_certs_prints_fingerprint_and_federation_snippet(capsys: Any, tmp_path: Path) -> None:
    d = str(tmp_path / "certs")
    status, out, _ = run(capsys, "gen-certs", "--dir", d, "--realm", "a.example")
    assert status == 0
    with open(os.path.join(d, "a.example.pem"), "rb") as f:
        assert f"Certificate fingerprint: {tls.fingerprint(f.read())}" in out
    assert "[federation]" in out and "[[federation.peers]]" in out
    status, out, _ = run(capsys, "gen-certs", "--dir", d, "--realm", "b.example")
    assert status == 0 and "CA certificate (reused)" in out


def test_gen_certs_from_the_realms_own_config_before_its_certificates_exist(
    capsys: Any, tmp_path: Path
) -> None:
    """The config names the certificate gen-certs is about to make: it loads anyway,
    and the snippet carries that config's realm and federation port."""
    d = tmp_path / "certs"
    conf = tmp_path / "b.toml"
    conf.write_text(
        f'[realm]\nname = "b.example"\ndata_dir = "{tmp_path / "data"}"\n'
        f"[federation]\nenabled = true\nport = 7522\n"
        f'certificate = "{d / "b.example.pem"}"\nprivate_key = "{d / "b.example.key"}"\n'
        f'ca = "{d / "ca.pem"}"\n'
    )
    status, _, err = run(capsys, "--config", str(conf), "check-config")
    assert status != 0 and "does not exist" in err  # other commands still need them
    status, out, _ = run(capsys, "--config", str(conf), "gen-certs", "--dir", str(d))
    assert status == 0 and (d / "b.example.pem").exists()
    assert "  port = 7522\n" in out and 'endpoint = "127.0.0.1:7522"' in out
    assert 'realm = "b.example"' in out
    status, _, _ = run(capsys, "--config", str(conf), "check-config")
    assert status == 0


def test_peers_shows_queues_and_link_state(capsys: Any, certs: Any, tmp_path: Path) -> None:
    cfg = fed_config(certs, tmp_path)
    conf = tmp_path / "realm.toml"
    a = certs["a.example"]
    conf.write_text(
        f"""[realm]
name = "a.example"
data_dir = {json.dumps(cfg.data_dir)}
[federation]
enabled = true
certificate = {json.dumps(a["cert"])}
private_key = {json.dumps(a["key"])}
ca = {json.dumps(a["ca"])}
[[federation.peers]]
realm = "c.example"
"""
    )
    status, out, _ = run(capsys, "--config", str(conf), "peers")
    assert status == 0 and "no link state" in out and "c.example" in out
    os.makedirs(cfg.data_dir, exist_ok=True)
    db = SQLiteDB(cfg.database_path)
    db.migrate()
    e = env("alice@a.example", "bob@b.example", "x")
    db.append_batch([[e]], {}, [[("b.example", e)]])
    db.close()
    with open(os.path.join(cfg.data_dir, STATUS_FILE), "w") as f:
        json.dump(
            {
                "realm": "a.example",
                "time": 1000.0,
                "pid": 42,
                "inbound": ["c.example"],
                "links": [
                    {
                        "realm": "b.example",
                        "state": "backoff",
                        "failures": 3,
                        "sent_items": 120,
                        "rejected_items": 2,
                        "given_up": 7,
                        "retry_at": 1004.0,
                        # what a peer's error frame said: its words, not terminal codes
                        "last_error": "Connection refused\rFAKE\x1b[2J\u202e",
                    }
                ],
            },
            f,
        )
    status, out, _ = run(capsys, "--config", str(conf), "peers")
    assert status == 0
    lines = out.splitlines()
    b_line = next(line for line in lines if line.startswith("b.example"))
    assert b_line.split()[:8] == ["b.example", "1", "backoff", "-", "3", "120", "2", "7"]
    assert lines[1].split()[:5] == ["REALM", "QUEUED", "LINK", "IN", "FAILURES"]
    assert "in 4.0s" in b_line and "Connection refused\u240dFAKE\u241b[2J\ufffd" in b_line
    c_line = next(line for line in lines if line.startswith("c.example"))
    assert c_line.split()[:4] == ["c.example", "0", "-", "up"]


def test_recipient_created_behind_the_realms_back_is_found_in_the_store(
    node: Any, certs: Any
) -> None:
    realm, fed, _ = node
    realm.store.users["carol"] = "hash"  # as chatrealmctl adduser does, on the database
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(
        hello() + frame({"type": "txn", "id": "1", "items": [item(1, to="carol@b.example")]})
    )
    assert frames(transport)[-1] == {"type": "ack", "id": "1"}
    assert [e.body for e in realm.store.read_feed("carol@b.example", 0, 10).result] == ["m1"]


def test_bytes_fetched_from_a_peer_are_verified(node: Any) -> None:
    import hashlib

    from chatproto.errors import ChatError

    realm, _, _ = node
    files = realm.files
    data = b"the real bytes"
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(ChatError) as e:
        files.receive_blob(sha, files.config.max_file_size + 1)
    assert e.value.code == "too_large"
    blob = files.receive_blob(sha, len(data))
    with pytest.raises(ChatError) as e:
        blob.write(data + b"!")  # more than announced
    assert e.value.code == "too_large"
    blob = files.receive_blob(sha, len(data))
    blob.write(b"other bytes!!!")
    failure = blob.finish()
    assert failure.result.value.code == "checksum_mismatch"  # type: ignore[attr-defined]
    failure.addErrback(lambda f: None)
    blob = files.receive_blob(sha, len(data))
    blob.write(data[:5])
    failure = blob.finish()
    assert failure.result.value.code == "incomplete"  # type: ignore[attr-defined]
    failure.addErrback(lambda f: None)
    blob = files.receive_blob(sha, len(data))
    blob.write(data)
    blob.finish()
    blob.release()
    assert files.store.has_blob(sha).result  # type: ignore[attr-defined]


def test_file_items_from_a_peer_are_checked(node: Any, certs: Any) -> None:
    _, fed, _ = node
    proto, transport = connect(fed, certs["a.example"]["cert"])
    meta = {"file_id": "f" * 20, "sha256": "a" * 64, "size": 3, "name": "x", "media_type": "a/b"}
    bad = [
        {**item(1), "kind": "file", "body": "x", "meta": {**meta, "sha256": "nothex"}},
        {**item(2), "kind": "file", "body": "y", "meta": meta},  # body is not the name
        {**item(3), "kind": "file", "body": "x", "meta": {**meta, "extra": 1}},
        {**item(4), "kind": "file", "body": "x", "meta": meta, "to": "#g@b.example"},
        {**item(5), "kind": "file", "body": "x", "meta": meta, "to": "#g@c.example"},
    ]
    proto.dataReceived(hello() + frame({"type": "txn", "id": "t", "items": bad}))
    ack = frames(transport)[-1]
    codes = [r["code"] for r in ack["rejected"]]
    assert codes == ["bad_request"] * 3 + ["no_such_group", "forged_sender"]
    # a data frame with no fetch in progress is a protocol error
    proto.dataReceived(struct.pack("!I", 4) + b"\x00abc")
    assert frames(transport)[-1]["code"] == "bad_frame"
    assert transport.disconnecting


def test_twistd_options_report_a_key_that_does_not_fit(certs: Any, tmp_path: Path) -> None:
    from twisted.python import usage

    from chatproto import tap

    a, b = certs["a.example"], certs["b.example"]
    conf = tmp_path / "realm.toml"
    conf.write_text(
        f"""[realm]
name = "a.example"
data_dir = {json.dumps(str(tmp_path / "d"))}
[federation]
enabled = true
certificate = {json.dumps(a["cert"])}
private_key = {json.dumps(b["key"])}
ca = {json.dumps(a["ca"])}
"""
    )
    with pytest.raises(usage.UsageError, match="cannot use certificate"):
        tap.Options().parseOptions(["--config", str(conf)])
    conf.write_text(conf.read_text().replace(b["key"], a["key"]))
    opts = tap.Options()
    opts.parseOptions(["--config", str(conf)])
    from twisted.internet import reactor

    top, realm = tap.build(opts.realm_config, reactor)
    assert top.getServiceNamed("federation").realm is realm


# files in groups across realms (realm to realm without sockets) ---------------------------


class _BlobSink:
    """An IConsumer writing a served file into a RemoteBlob (what the data frames do)."""

    def __init__(self, blob: Any) -> None:
        self.blob = blob

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.blob.write(data)


class Realms:
    """h.example, a.example and b.example on MemoryStores, federating (not listening):
    :meth:`relay` carries one realm's outbox to another the way a link does --
    ``receive_remote`` with a ``fetch`` that reads ``serve_remote`` of the sender --
    and acknowledges it."""

    def __init__(self, tmp_path: Path) -> None:
        certdir = str(tmp_path / "certs")
        self.clock = Clock()
        self.realms: dict[str, Any] = {}
        self.fetches: list[tuple[str, str, str]] = []  # (from realm, to realm, file)
        for name in ("h.example", "a.example", "b.example"):
            paths = tls.write_dev_certs(certdir, name)
            cfg = config.Config(realm=name, data_dir=str(tmp_path / name))
            f = cfg.federation
            f.enabled, f.certificate, f.private_key, f.ca = (
                True,
                paths["cert"],
                paths["key"],
                paths["ca"],
            )
            cfg.check()
            realm = make_test_realm(self.clock, cfg)
            FederationService(realm, self.clock, clock=self.clock, status_path="")
            self.realms[name] = realm
        for realm in self.realms.values():  # the keys each hello/welcome would carry
            for other in self.realms.values():
                if other is not realm:
                    keys = parse_keys(other.federation.announce())
                    fired(realm.peer_keys.learn(other.realm, keys))

    def __getitem__(self, name: str) -> Any:
        return self.realms[name]

    def relay(self, src: str, dst: str, ack: bool = True) -> list[dict[str, Any]]:
        from chatproto.federation import envelope_to_wire

        source, dest = self.realms[src], self.realms[dst]
        rows = fired(source.store.outbox_read(dst, 0, 1000))
        if not rows:
            return []

        def fetch(file_id: str, blob: Any) -> Any:
            self.fetches.append((src, dst, file_id))
            d = source.files.serve_remote(dst, file_id)
            return d.addCallback(lambda download: download.start(_BlobSink(blob)))

        items = [envelope_to_wire(e) for _, e in rows]
        rejected = fired(dest.receive_remote(src, items, fetch=fetch))
        if ack:
            fired(source.store.outbox_ack(dst, rows[-1][0]))
        return rejected  # type: ignore[no-any-return]

    def settle(self) -> None:
        """Relay between every pair until no outbox holds anything."""
        for _ in range(10):
            moved = False
            for src in self.realms:
                for dst in self.realms:
                    if src != dst and fired(self.realms[src].store.outbox_counts()).get(dst):
                        assert self.relay(src, dst) == []
                        moved = True
            if not moved:
                return
        raise AssertionError("the outboxes do not drain")


def _upload(realm: Any, sender: str, to: str, data: bytes) -> Any:
    import hashlib

    files = realm.files
    up = fired(files.offer(sender, to, "notes.txt", len(data), hashlib.sha256(data).hexdigest()))
    fired(files.write(sender, up.upload_id, 0, data))
    return fired(files.finish(sender, up.upload_id))


def _read(realm: Any, user: str, file_id: str) -> bytes:
    download = fired(realm.files.open_download(user, file_id))
    transport = StringTransport()
    fired(download.start(transport))
    return bytes(transport.value())


@pytest.fixture
def spanning(tmp_path: Path) -> Realms:
    """#dev@h.example with owner@h.example, alice@a.example, bob@b.example, bob2@b.example."""
    r = Realms(tmp_path)
    for realm, names in (
        ("h.example", ["owner"]),
        ("a.example", ["alice"]),
        ("b.example", ["bob", "bob2"]),
    ):
        for name in names:
            fired(r[realm].create_user(name, "password-1"))
    fired(r["h.example"].group_event_as("owner@h.example", "created", "#dev"))
    for user in ("alice@a.example", "bob@b.example", "bob2@b.example"):
        realm = r[user.partition("@")[2]]
        fired(realm.group_event_as(user, "joined", "#dev@h.example"))
    r.settle()
    members = set(r["h.example"].groups.get("#dev@h.example").members)
    assert members == {"owner@h.example", "alice@a.example", "bob@b.example", "bob2@b.example"}
    return r


def test_a_members_file_reaches_every_realm_of_the_group_through_its_home(
    spanning: Realms,
) -> None:
    r = spanning
    h, a, b = r["h.example"], r["a.example"], r["b.example"]
    data = os.urandom(200_000)
    info, env = _upload(a, "alice@a.example", "#dev@h.example", data)
    # stored on a.example at once (its members see it), queued for the home realm only
    assert env.pos > 0 and env.recipient == "#dev@h.example"
    assert fired(a.store.outbox_counts()) == {"h.example": 1}
    assert r.relay("a.example", "h.example") == []
    # h.example fetched the bytes from a.example, and queued the item once for b.example
    # (two members there), not back to a.example
    assert r.fetches == [("a.example", "h.example", info.file_id)]
    assert fired(h.store.outbox_counts()) == {"b.example": 1}
    assert r.relay("h.example", "b.example") == []
    assert r.fetches[-1] == ("h.example", "b.example", info.file_id)
    # everyone downloads identical bytes from their own realm
    assert _read(h, "owner@h.example", info.file_id) == data
    assert _read(b, "bob@b.example", info.file_id) == data
    assert _read(b, "bob2@b.example", info.file_id) == data
    assert _read(a, "alice@a.example", info.file_id) == data
    for realm, user in ((h, "owner@h.example"), (b, "bob2@b.example")):
        feed = fired(realm.store.read_feed(user, 0, 100, realm.groups.feed_ranges(user)))
        files = [e for e in feed if e.kind == "file"]
        assert [(e.id, e.sender, e.meta["sha256"]) for e in files] == [
            (env.id, "alice@a.example", info.sha256)
        ]
    # acknowledged: nobody may fetch it any more; and a.example never served b.example
    for realm, peer in ((a, "h.example"), (a, "b.example"), (h, "b.example"), (h, "a.example")):
        failure = realm.files.serve_remote(peer, info.file_id)
        assert fired(failure.addErrback(lambda f: f.value.code)) == "no_such_file"


def test_a_file_from_the_home_realm_reaches_each_member_realm_once(spanning: Realms) -> None:
    r = spanning
    h, a, b = r["h.example"], r["a.example"], r["b.example"]
    data = b"minutes of the meeting\n" * 1000
    info, env = _upload(h, "owner@h.example", "#dev", data)
    assert fired(h.store.outbox_counts()) == {"a.example": 1, "b.example": 1}
    # while queued, a realm that is not its destination may not read it
    assert fired(h.store.outbox_holds("c.example", env.pos)) is False
    failure = h.files.serve_remote("c.example", info.file_id)
    assert fired(failure.addErrback(lambda f: f.value.code)) == "no_such_file"
    r.settle()
    assert sorted(r.fetches) == [
        ("h.example", "a.example", info.file_id),
        ("h.example", "b.example", info.file_id),
    ]
    assert _read(a, "alice@a.example", info.file_id) == data
    assert _read(b, "bob@b.example", info.file_id) == data
    # a.example and b.example forward nothing: only the home realm fans out
    assert fired(a.store.outbox_counts()) == {} and fired(b.store.outbox_counts()) == {}


def test_group_files_from_the_wrong_realm_or_a_non_member_are_rejected(
    spanning: Realms,
) -> None:
    r = spanning
    h, a = r["h.example"], r["a.example"]
    fired(a.create_user("eve", "password-1"))
    data = b"forged"
    import hashlib

    meta = {
        "file_id": "f" * 32,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "name": "x.bin",
        "media_type": "application/octet-stream",
    }

    def file_item(n: int, sender: str, to: str) -> dict[str, Any]:
        return {
            "id": f"forged-{n}",
            "kind": "file",
            "from": sender,
            "to": to,
            "ts": 1.0,
            "body": "x.bin",
            "meta": meta,
        }

    fetched: list[str] = []

    def fetch(file_id: str, blob: Any) -> Any:
        fetched.append(file_id)
        blob.write(data)
        return succeed(None)

    items = [
        file_item(1, "bob@b.example", "#dev@h.example"),  # a.example carrying b's user
        file_item(2, "eve@a.example", "#dev@h.example"),  # not a member
        file_item(3, "alice@a.example", "#other@b.example"),  # a third realm's group
    ]
    rejected = fired(h.receive_remote("a.example", items, fetch=fetch))
    assert [(x["id"], x["code"]) for x in rejected] == [
        ("forged-1", "forged_sender"),
        ("forged-2", "not_member"),
        ("forged-3", "forged_sender"),
    ]
    # a member realm accepts a group's files only from the group's home realm
    b = r["b.example"]
    rejected = fired(
        b.receive_remote(
            "a.example", [file_item(4, "alice@a.example", "#dev@h.example")], fetch=fetch
        )
    )
    assert [x["code"] for x in rejected] == ["forged_sender"]
    assert fetched == [] and fired(h.store.file_info("f" * 32)) is None
    # a non-member cannot even offer a file to the group through their own realm
    failure = a.files.offer("eve@a.example", "#dev@h.example", "x.bin", 1, "0" * 64)
    assert fired(failure.addErrback(lambda f: f.value.code)) == "not_member"
    # a file whose bytes do not match is rejected by the home realm, and not forwarded
    bad = {
        **file_item(5, "alice@a.example", "#dev@h.example"),
        "meta": {**meta, "sha256": "0" * 64},
    }
    rejected = fired(h.receive_remote("a.example", [bad], fetch=fetch))
    assert [x["code"] for x in rejected] == ["bad_signature"]  # not a.example's word
    assert fetched == []  # not even fetched
    env = Envelope(bad["id"], "file", bad["from"], bad["to"], 1.0, "x.bin", bad["meta"])
    bad["sig"] = a.signing.sign(env)
    rejected = fired(h.receive_remote("a.example", [bad], fetch=fetch))
    assert [x["code"] for x in rejected] == ["checksum_mismatch"]
    assert fired(h.store.outbox_counts()) == {}


def test_a_file_id_taken_first_by_a_member_realm_does_not_hide_a_group_file(
    spanning: Realms,
) -> None:
    """A group's file id is seen by every member realm: one of them (a.example) races
    the home realm to b.example with a file of its own under that id.  b.example stores
    the group's file under an id of its own, so its members still get it."""
    import hashlib

    r = spanning
    _h, a, b = r["h.example"], r["a.example"], r["b.example"]
    data = os.urandom(50_000)
    info, env = _upload(a, "alice@a.example", "#dev@h.example", data)
    assert r.relay("a.example", "h.example") == []
    bogus = b"not the group's file"
    race = {
        "id": "race-1",
        "kind": "file",
        "from": "alice@a.example",
        "to": "bob@b.example",
        "ts": 1.0,
        "body": "notes.txt",
        "meta": {
            "file_id": info.file_id,
            "sha256": hashlib.sha256(bogus).hexdigest(),
            "size": len(bogus),
            "name": "notes.txt",
            "media_type": "text/plain",
        },
    }

    def fetch(file_id: str, blob: Any) -> Any:
        blob.write(bogus)
        return succeed(None)

    assert fired(b.receive_remote("a.example", [race], fetch=fetch)) == []
    assert r.relay("h.example", "b.example", ack=False) == []
    assert r.relay("h.example", "b.example") == []  # sent again before the ack: once
    feed = fired(
        b.store.read_feed("bob2@b.example", 0, 100, b.groups.feed_ranges("bob2@b.example"))
    )
    files = [e for e in feed if e.kind == "file"]
    assert [e.id for e in files] == [env.id]
    local_id = files[0].meta["file_id"]
    assert local_id != info.file_id
    assert _read(b, "bob2@b.example", local_id) == data
    assert _read(b, "bob@b.example", local_id) == data
    assert _read(b, "bob@b.example", info.file_id) == bogus  # a.example's own file to bob


def test_a_group_file_fetch_cut_off_half_way_is_stored_and_forwarded_once_when_sent_again(
    spanning: Realms,
) -> None:
    from chatproto.federation import envelope_to_wire

    r = spanning
    h, a = r["h.example"], r["a.example"]
    data = os.urandom(100_000)
    info, _env = _upload(a, "alice@a.example", "#dev@h.example", data)
    rows = fired(a.store.outbox_read("h.example", 0, 10))

    def cut(file_id: str, blob: Any) -> Any:
        blob.write(data[:30_000])
        raise ConnectionError("the link closed during a file fetch")

    failed = h.receive_remote("a.example", [envelope_to_wire(e) for _, e in rows], fetch=cut)
    with pytest.raises(ConnectionError):
        fired(failed)  # the transaction is not acknowledged: a.example sends it again
    assert fired(h.store.file_info(info.file_id)) is None
    assert fired(h.store.outbox_counts()) == {}  # nothing forwarded
    parts = os.path.join(h.files.store.root, "uploads")
    assert not os.path.isdir(parts) or os.listdir(parts) == []  # the partial bytes are gone
    assert r.relay("a.example", "h.example") == []
    assert r.relay("h.example", "b.example") == []
    assert _read(r["b.example"], "bob@b.example", info.file_id) == data
    assert fired(h.store.outbox_counts()) == {}


def test_a_notice_crosses_realms_as_a_notice(spanning: Realms) -> None:
    """A text item with ``meta {"notice": true}`` (IRC's NOTICE) is accepted by the
    group's home realm, forwarded to the member realms, and by a DM's realm; it was
    refused before ("a text item has no meta")."""
    r = spanning
    h, a, b = r["h.example"], r["a.example"], r["b.example"]
    fired(a.messages.send_as("alice@a.example", "#dev@h.example", "to all", {"notice": True}))
    fired(a.messages.send_as("alice@a.example", "bob@b.example", "to bob", {"notice": True}))
    r.settle()  # asserts nothing was rejected
    for realm in (h, b):
        got = [(e.body, e.meta) for e in realm.store.items if e.kind == "text"]
        assert ("to all", {"notice": True}) in got
    assert ("to bob", {"notice": True}) in [(e.body, e.meta) for e in b.store.items]


class _SlowSink:
    """A consumer that takes one write, then stops reading (pauses its producer)."""

    def __init__(self, write: Any) -> None:
        self._write = write
        self.producer: Any = None
        self.written = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self._write(data)
        self.producer.pauseProducing()


def _delete(realm: Any, user: str, msg_id: str) -> None:
    """``user`` (a user of ``realm``, on a MemoryStore) deletes their item ``msg_id``."""
    from chatproto.testing import logged_in

    proto, _ = logged_in(realm, realm.clock, user.partition("@")[0], "password-1")
    fired(realm.relations.delete(proto.session, msg_id))


def test_a_peers_delete_of_a_file_stops_its_downloads_and_frees_its_bytes(
    tmp_path: Path,
) -> None:
    """alice@a.example sends bob@b.example a file, then deletes it while bob
    downloads it from b.example.  On b's MemoryStore the delete wiped the item (its
    meta) before the intake looked at it for the file: bob's download went on to the
    end and the bytes stayed on b's disk.  Now the download stops with no_such_file
    and the bytes go."""
    from chatproto.errors import ChatError
    from chatproto.transfer import BLOCK

    r = Realms(tmp_path)
    a, b = r["a.example"], r["b.example"]
    fired(b.create_user("bob", "password-1"))
    fired(a.create_user("alice", "password-1"))
    data = os.urandom(3 * BLOCK)
    info, env = _upload(a, "alice@a.example", "bob@b.example", data)
    assert r.relay("a.example", "b.example") == []
    download = fired(b.files.open_download("bob@b.example", info.file_id))
    got = bytearray()
    sink = _SlowSink(got.extend)
    streaming = download.start(sink)
    assert got == data[:BLOCK] and not streaming.called
    _delete(a, "alice@a.example", env.id)
    assert r.relay("a.example", "b.example") == []  # the delete
    with pytest.raises(ChatError) as e:
        fired(streaming)
    assert e.value.code == "no_such_file"
    assert sink.producer is None and got == data[:BLOCK]  # not one byte more
    assert not b.files.downloads
    assert not os.path.exists(b.files.store.blob_path(info.sha256))


def test_a_peers_fetch_of_a_file_deleted_meanwhile_ends_with_no_such_file(
    tmp_path: Path,
) -> None:
    """b.example fetches the bytes of alice's file from a.example, reading slowly;
    alice deletes the file meanwhile.  a.example kept serving the deleted file's
    bytes to the end, and b.example stored the file.  Now the fetch stops with
    no_such_file (what a.example answers in ``fetch_error``): b.example rejects the
    file item and keeps nothing of it."""
    from chatproto.federation import envelope_to_wire
    from chatproto.transfer import BLOCK

    r = Realms(tmp_path)
    a, b = r["a.example"], r["b.example"]
    fired(b.create_user("bob", "password-1"))
    fired(a.create_user("alice", "password-1"))
    data = os.urandom(3 * BLOCK)
    info, env = _upload(a, "alice@a.example", "bob@b.example", data)
    rows = fired(a.store.outbox_read("b.example", 0, 10))
    sinks: list[_SlowSink] = []

    def fetch(file_id: str, blob: Any) -> Any:
        sinks.append(_SlowSink(blob.write))
        d = a.files.serve_remote("b.example", file_id)
        return d.addCallback(lambda download: download.start(sinks[-1]))

    storing = b.receive_remote("a.example", [envelope_to_wire(e) for _, e in rows], fetch=fetch)
    assert not storing.called and sinks[0].written == BLOCK  # one block sent, paused
    _delete(a, "alice@a.example", env.id)
    [rejected] = fired(storing)
    assert (rejected["id"], rejected["code"]) == (env.id, "no_such_file")
    assert sinks[0].producer is None and sinks[0].written == BLOCK
    assert not a.files.downloads
    assert fired(b.store.file_info(info.file_id)) is None
    assert not os.path.exists(b.files.store.blob_path(info.sha256))


def test_a_delete_refused_for_its_signature_stops_no_download(spanning: Realms) -> None:
    """A delete of alice's group file relayed by the home realm, its signature
    altered: b.example refuses it (``bad_signature``), after having checked what it
    deletes.  The intake treated every delete it had checked as committed: bob's
    download of the file, which is not deleted, stopped with no_such_file.  Now it
    goes on."""
    from chatproto.federation import envelope_to_wire
    from chatproto.transfer import BLOCK

    r = spanning
    h, a, b = r["h.example"], r["a.example"], r["b.example"]
    data = os.urandom(3 * BLOCK)
    info, env = _upload(a, "alice@a.example", "#dev@h.example", data)
    r.settle()
    download = fired(b.files.open_download("bob@b.example", info.file_id))
    got = bytearray()
    sink = _SlowSink(got.extend)
    streaming = download.start(sink)
    _delete(a, "alice@a.example", env.id)
    assert r.relay("a.example", "h.example") == []
    [(_, delete)] = fired(h.store.outbox_read("b.example", 0, 10))
    raw = envelope_to_wire(delete)
    sig = raw["sig"]["ed25519"]
    raw["sig"] = {**raw["sig"], "ed25519": ("B" if sig[0] == "A" else "A") + sig[1:]}
    [rejected] = fired(b.receive_remote("h.example", [raw]))
    assert (rejected["id"], rejected["code"]) == (delete.id, "bad_signature")
    assert not streaming.called and b.files.downloads
    for _ in range(2):  # the two blocks left
        sink.producer.resumeProducing()
    assert fired(streaming) == len(data) and bytes(got) == data
