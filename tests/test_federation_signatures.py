"""Signatures of relayed items over StringTransport: b.example (MemoryStore, a task
Clock) receives from a.example, home of #g@a.example, the messages of members on
third realms; and, as the home of #h@b.example, a member realm's messages to relay.
PROTOCOL.md, "Signatures"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chatproto import tls
from chatproto.envelope import Envelope
from chatproto.federation import KEY_WAIT
from chatproto.signing import SigningKeys, canonical, verify_all
from tests.conftest import fired
from tests.test_federation import certs, connect, frame, frames, hello, node  # noqa: F401
from tests.test_federation_home_rules import SNAPSHOT, Home, event, text
from tests.test_groups import User

GROUP = "#g@a.example"


def signed(item: dict[str, Any], keys: SigningKeys) -> dict[str, Any]:
    env = Envelope(
        item["id"],
        item["kind"],
        item["from"],
        item["to"],
        item["ts"],
        item["body"],
        item.get("meta"),
    )
    return {**item, "sig": keys.sign(env)}


def hello_from(fed: Any, realm: str, cert: str, keys: SigningKeys) -> Any:
    """An inbound link from ``realm`` whose hello announces ``keys``."""
    proto, transport = connect(fed, cert)
    proto.dataReceived(
        frame({"type": "hello", "version": 1, "realm": realm, "keys": keys.announce()})
    )
    assert frames(transport)[0]["type"] == "welcome"
    return proto, transport


@pytest.fixture
def relay(node: Any, certs: Any, tmp_path: Path) -> Any:  # noqa: F811
    """dave@b.example is in #g@a.example, with carol@c.example (and erin@d.example,
    whose realm b.example never linked with)."""
    realm, fed, clock = node
    for name in ("c.example", "d.example"):
        certs[name] = tls.write_dev_certs(str(tmp_path / "certs"), name)
    User(realm, clock, "dave")
    home = Home(fed, certs["a.example"]["cert"])
    fired(realm.group_event_as("dave@b.example", "joined", GROUP))
    snap = {**SNAPSHOT, "members": {**SNAPSHOT["members"], "carol@c.example": "member"}}
    assert (
        home.txn(
            event("j1", "dave@b.example", event="joined", user="dave@b.example", snapshot=snap),
            event("j2", "erin@d.example", event="joined", user="erin@d.example"),
        )
        == {}
    )
    c_keys = SigningKeys(Ed25519PrivateKey.generate())
    hello_from(fed, "c.example", certs["c.example"]["cert"], c_keys)
    return realm, fed, clock, home, c_keys


def test_a_relayed_message_is_believed_on_its_authors_signature(relay: Any) -> None:
    realm, _fed, _clock, home, c_keys = relay
    other = SigningKeys(Ed25519PrivateKey.generate())
    genuine = signed(text("m1", "carol@c.example", body="from carol"), c_keys)
    tampered = {**signed(text("m2", "carol@c.example", body="kind words"), c_keys), "body": "lies"}
    unsigned = text("m3", "carol@c.example", body="trust me")
    wrong_key = signed(text("m4", "carol@c.example"), other)  # a key c.example never announced
    forged = {
        **signed(text("m5", "carol@c.example"), other),
        "sig": {
            "key": c_keys.id,
            "ed25519": other.sign(Envelope("m5", "text", "carol@c.example", GROUP, 1.0, "hi"))[
                "ed25519"
            ],
        },
    }
    malformed = {**text("m6", "carol@c.example"), "sig": {"key": "nope", "ed25519": "x"}}
    assert home.txn(genuine, tampered, unsigned, wrong_key, forged, malformed) == {
        "m2": "bad_signature",
        "m3": "bad_signature",
        "m4": "bad_signature",
        "m5": "bad_signature",
        "m6": "bad_request",
    }
    history = fired(realm.store.history(GROUP, None, None, 10))
    stored = [e for e in history if e.kind == "text"]
    assert [(e.id, e.body) for e in stored] == [("m1", "from carol")]
    assert stored[0].sig == genuine["sig"]  # kept: it is part of the item
    # the home realm's own members need no signature: its link proves them
    assert home.txn(text("m7", "owner@a.example", body="from the home realm")) == {}


def test_a_key_not_known_yet_is_fetched_while_the_transaction_waits(relay: Any, certs: Any) -> None:  # noqa: F811
    realm, fed, clock, home, _ = relay
    d_keys = SigningKeys(Ed25519PrivateKey.generate())
    fed.link("d.example")  # made, not started: nothing listens in this test
    fed.running = True
    item = signed(text("m1", "erin@d.example", body="from erin"), d_keys)
    home.proto.dataReceived(frame({"type": "txn", "id": "w1", "items": [item]}))
    assert frames(home.transport) == []  # held: b.example asks d.example for its keys
    clock.advance(KEY_WAIT / 2)
    hello_from(fed, "d.example", certs["d.example"]["cert"], d_keys)  # d.example reaches us
    (ack,) = frames(home.transport)
    assert ack == {"type": "ack", "id": "w1"}
    assert fired(realm.store.stored_item("m1")).body == "from erin"
    # a key d.example does not announce, while its link is up: no wait, refused
    other = SigningKeys(Ed25519PrivateKey.generate())
    assert home.txn(signed(text("m2", "erin@d.example"), other)) == {"m2": "bad_signature"}


def test_a_realm_that_cannot_be_reached_in_time_gets_its_items_refused(relay: Any) -> None:
    realm, fed, clock, home, _ = relay
    fed.link("d.example")
    fed.running = True
    item = signed(text("m1", "erin@d.example"), SigningKeys(Ed25519PrivateKey.generate()))
    home.proto.dataReceived(frame({"type": "txn", "id": "w1", "items": [item]}))
    assert frames(home.transport) == []
    clock.advance(KEY_WAIT)
    (ack,) = [f for f in frames(home.transport) if f["type"] == "ack"]  # (and a ping)
    assert [(r["id"], r["code"]) for r in ack["rejected"]] == [("m1", "unknown_key")]
    assert "could not be reached" in ack["rejected"][0]["message"]
    assert fired(realm.store.stored_item("m1")) is None
    # a realm this one does not federate with: refused at once
    fed.cfg.deny = ["d.example"]
    assert home.txn(
        signed(text("m2", "erin@d.example"), SigningKeys(Ed25519PrivateKey.generate()))
    ) == {"m2": "peer_denied"}


def test_the_home_realm_relays_only_signed_member_items_and_keeps_the_signature(
    node: Any,  # noqa: F811
    certs: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    realm, fed, clock = node
    certs["c.example"] = tls.write_dev_certs(str(tmp_path / "certs"), "c.example")
    owner = User(realm, clock, "owner")
    owner.ok("create_group", group="#h")
    group = "#h@b.example"
    for user in ("alice@a.example", "carol@c.example"):
        fired(
            realm.receive_remote(
                user.partition("@")[2],
                [
                    {
                        "id": f"r-{user}",
                        "kind": "request",
                        "from": user,
                        "to": group,
                        "event": "joined",
                        "args": {},
                    }
                ],
            )
        )
    a_keys = SigningKeys(Ed25519PrivateKey.generate())
    proto, transport = hello_from(fed, "a.example", certs["a.example"]["cert"], a_keys)
    item = text("m1", "alice@a.example", group, "to everyone")
    proto.dataReceived(
        frame({"type": "txn", "id": "t1", "items": [item, signed({**item, "id": "m2"}, a_keys)]})
    )
    (ack,) = frames(transport)
    assert [(r["id"], r["code"]) for r in ack["rejected"]] == [("m1", "bad_signature")]
    # m2 goes on to c.example as a.example signed it
    rows = fired(realm.store.outbox_read("c.example", 0, 100))
    relayed = [e for _, e in rows if getattr(e, "kind", None) == "text"]
    assert [e.id for e in relayed] == ["m2"]
    wire_item = relayed[0].to_item()
    assert wire_item["sig"] == signed({**item, "id": "m2"}, a_keys)["sig"]
    env = Envelope("m2", "text", "alice@a.example", group, 1.0, "to everyone")
    assert verify_all([(a_keys.public, wire_item["sig"]["ed25519"], canonical(env))]) == [True]


def test_a_realms_own_items_to_remote_groups_are_signed(node: Any) -> None:  # noqa: F811
    realm, _fed, clock = node
    User(realm, clock, "dave")
    realm.groups.apply(  # dave is in #g@a.example (as if a.example had said so)
        Envelope(
            "j",
            "event",
            "dave@b.example",
            GROUP,
            1.0,
            "",
            {"event": "joined", "user": "dave@b.example", "snapshot": SNAPSHOT},
            pos=1,
        ),
        mirror=True,
    )
    sent = fired(realm.post("dave@b.example", GROUP, "signed by b"))
    assert sent.sig is not None and sent.sig["key"] == realm.signing.id
    assert verify_all([(realm.signing.public, sent.sig["ed25519"], canonical(sent))]) == [True]
    stored = fired(realm.store.stored_item(sent.id))
    assert stored.sig == sent.sig
    # a message to a group of its own (or a private one) needs none
    assert fired(realm.post("dave@b.example", "x@a.example", "direct")).sig is None
