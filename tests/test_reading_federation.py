"""Read markers and typing notices of a private conversation across two realms (real
mutual TLS links on loopback): ephemeral ``reading`` frames, markers translated by
item id (positions are per realm), a marker made while the link is down sent when it
comes up, and what a peer may not say (another realm's user, an unknown recipient)."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.client import connect
from tests.conftest import until
from tests.test_federation_loopback import PW, realms  # noqa: F401


@pytest_twisted.inlineCallbacks
def test_read_markers_and_typing_across_realms(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"])
    seen_bob: list[dict[str, Any]] = []
    got_alice: list[dict[str, Any]] = []
    alice = yield connect(_reactor, a.addr, "alice", PW, register=True, on_message=got_alice.append)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_notice=seen_bob.append)
    yield bob.send("alice@a.example", "one")
    sent = yield bob.send("alice@a.example", "two")
    yield until(lambda: len(got_alice) == 2, timeout=30)
    # alice reads on realm a, up to her position of "two"; bob hears it on realm b, as
    # his own position of "two"
    yield alice.mark_read("bob@b.example", got_alice[-1]["pos"])
    want = {"type": "read", "with": "alice@a.example", "user": "alice@a.example"}
    yield until(lambda: any(f.get("type") == "read" for f in seen_bob), timeout=30)
    [read] = [f for f in seen_bob if f["type"] == "read"]
    assert read == {**want, "pos": sent["pos"]}
    listed = yield bob.conversations()
    assert listed["conversations"][0]["peer_read"] == sent["pos"]
    # typing: ephemeral, both ways the same frame as within a realm
    yield alice.typing("bob@b.example")
    yield until(lambda: any(f.get("type") == "typing" for f in seen_bob), timeout=30)
    typing = [f for f in seen_bob if f["type"] == "typing"]
    assert typing == [
        {"type": "typing", "with": "alice@a.example", "user": "alice@a.example", "typing": True}
    ]
    # the read-receipt switch holds across realms too
    yield alice.set_read_receipts(False)
    yield bob.send("alice@a.example", "three")
    yield until(lambda: len(got_alice) == 3, timeout=30)
    yield alice.mark_read("bob@b.example", got_alice[-1]["pos"])
    yield alice.typing("bob@b.example", False)  # after the marker, on the same link
    yield until(lambda: len([f for f in seen_bob if f["type"] == "typing"]) == 2, timeout=30)
    assert len([f for f in seen_bob if f["type"] == "read"]) == 1
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_a_peer_speaks_for_its_own_users_only(realms: Any) -> Any:  # noqa: F811
    a, b = yield realms(["a.example", "b.example"])
    seen: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_notice=seen.append)
    reading = b.realm.reading
    # as received from a.example: a user of another realm, an unknown local user, a
    # malformed frame, an item of another conversation -- all ignored
    reading.remote(
        "a.example", {"kind": "typing", "from": "carol@c.example", "to": "bob", "typing": True}
    )
    reading.remote("a.example", {"kind": "typing", "from": "alice", "to": "nobody", "typing": True})
    reading.remote("a.example", {"kind": "typing", "from": 5, "to": "bob", "typing": True})
    reading.remote("a.example", {"kind": "typing", "from": "alice", "to": "bob", "typing": "yes"})
    mine = yield bob.send("bob", "a note to myself")
    item = yield b.realm.store.stored_item(mine["msg_id"])
    yield reading.remote(
        "a.example", {"kind": "read", "from": "alice", "to": "bob", "msg_id": item.id}
    )
    reading.remote("a.example", {"kind": "typing", "from": "alice", "to": "bob", "typing": True})
    yield until(lambda: len(seen) == 1, timeout=10)
    assert seen == [
        {"type": "typing", "with": "alice@a.example", "user": "alice@a.example", "typing": True}
    ]
    yield bob.close()
