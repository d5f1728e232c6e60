"""Read markers and typing notices of a private conversation across two realms (real
mutual TLS links on loopback): ephemeral ``reading`` frames, markers translated by
item id (positions are per realm), a marker made while the link is down sent when it
comes up, and what a peer may not say (another realm's user, an unknown recipient).
Typing in a group spanning three realms, through its home realm."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.client import connect
from chatproto.envelope import Envelope
from chatproto.realm.reading import TYPING_BURST
from tests.conftest import until
from tests.test_federation_groups_loopback import members_when
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
    _a, b = yield realms(["a.example", "b.example"])
    seen: list[dict[str, Any]] = []
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, on_notice=seen.append)
    # Notices reach synced sessions only (PROTOCOL.md: ephemeral, not part of the
    # backlog): under load the login's backlog read could still be running here.
    yield bob.synced
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
    # a msg_id that is no message id (PROTOCOL.md), even of an item of the
    # conversation stored before ids were checked: refused, so ignored
    old = Envelope("old\x1b[2J", "text", "alice@a.example", "bob@b.example", 1.0, "old")
    yield b.realm.store.append_remote([old])
    for bad in (old.id, "x" * 129, 5):
        yield reading.remote(
            "a.example", {"kind": "read", "from": "alice", "to": "bob", "msg_id": bad}
        )
    reading.remote("a.example", {"kind": "typing", "from": "alice", "to": "bob", "typing": True})
    yield until(lambda: len(seen) == 1, timeout=10)
    assert seen == [
        {"type": "typing", "with": "alice@a.example", "user": "alice@a.example", "typing": True}
    ]
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_typing_in_a_group_across_realms(realms: Any) -> Any:  # noqa: F811
    """``#dev@h.example`` with members on h, b and c: a member's typing reaches every
    other member, b's and c's through the home realm h, never stored; what a peer may
    not say is ignored, and a typist of another realm is rate-limited at each hop."""
    h, b, c = yield realms(["h.example", "b.example", "c.example"])
    group = "#dev@h.example"
    seen: dict[str, list[dict[str, Any]]] = {}

    def user(node: Any, name: str) -> Any:
        inbox = seen.setdefault(f"{name}@{node.name}", [])
        return connect(_reactor, node.addr, name, PW, register=True, on_notice=inbox.append)

    def typing(who: str) -> list[dict[str, Any]]:
        return [f for f in seen[who] if f.get("type") == "typing"]

    owner = yield user(h, "owner")
    yield owner.create_group("#dev")
    bob = yield user(b, "bob")
    yield bob.join(group)
    yield members_when(bob, 2)
    cathy = yield user(c, "cathy")
    yield cathy.join(group)
    yield members_when(cathy, 3)
    yield until(lambda: len(b.realm.groups.groups[group].members) == 3, timeout=30)
    # a member realm's user: to the home realm, which tells the third realm
    result = yield bob.typing(group)
    assert result == {"with": group}
    frame = {"type": "typing", "with": group, "user": "bob@b.example", "typing": True}
    yield until(lambda: typing("owner@h.example") and typing("cathy@c.example"), timeout=30)
    assert typing("owner@h.example") == typing("cathy@c.example") == [frame]
    # the home realm's user, and the third realm's
    yield owner.typing(group)
    yield cathy.typing(group, False)
    yield until(lambda: len(typing("bob@b.example")) == 2, timeout=30)
    yield until(lambda: len(typing("cathy@c.example")) == 2, timeout=30)
    yield until(lambda: len(typing("owner@h.example")) == 2, timeout=30)
    assert typing("bob@b.example") == [
        {"type": "typing", "with": group, "user": "owner@h.example", "typing": True},
        {"type": "typing", "with": group, "user": "cathy@c.example", "typing": False},
    ]
    assert typing("owner@h.example")[1]["user"] == "cathy@c.example"
    assert typing("cathy@c.example")[1]["user"] == "owner@h.example"
    # what a peer may not say: b about c's user to the home realm; b relaying a group
    # it is not home of; a non-member; our own user; a bad address
    bad = [
        (h, "b.example", {"from": "cathy@c.example", "to": group}),
        (c, "b.example", {"from": "bob@b.example", "to": group}),
        (h, "b.example", {"from": "zed@b.example", "to": group}),
        (h, "b.example", {"from": "owner@h.example", "to": group}),
        (h, "b.example", {"from": "bob@b.example", "to": "#nogroup@h.example"}),
        (h, "b.example", {"from": "bob@b.example", "to": "#@"}),
    ]
    for node, origin, fields in bad:
        node.realm.reading.remote(origin, {"kind": "typing", "typing": True, **fields})

    # a typist of another realm: at most TYPING_BURST at once, the rest refused, on
    # the home realm and again on the member realm it relays to
    def bobs(who: str) -> int:
        return sum(1 for f in typing(who) if f["user"] == "bob@b.example")

    for _ in range(TYPING_BURST + 3):
        h.realm.reading.remote(
            "b.example", {"kind": "typing", "from": "bob", "to": group, "typing": True}
        )
    refused_h = h.realm.stats.refused.get("remote_typing", 0)
    assert refused_h >= 3
    passed = TYPING_BURST + 3 - refused_h
    yield owner.typing(group, False)  # after them on the h -> c link
    last = {"type": "typing", "with": group, "user": "owner@h.example", "typing": False}
    yield until(lambda: typing("cathy@c.example")[-1] == last, timeout=30)
    yield until(lambda: bobs("owner@h.example") == 1 + passed, timeout=30)
    refused_c = c.realm.stats.refused.get("remote_typing", 0)
    assert bobs("cathy@c.example") == 1 + passed - refused_c
    assert bobs("cathy@c.example") >= 1 + TYPING_BURST - 2  # c's bucket had one used
    # nothing of what a peer may not say reached anyone
    yield until(lambda: typing("bob@b.example")[-1] == last, timeout=30)
    users = {who: [(f["user"], f["typing"]) for f in typing(who)] for who in seen}
    assert (
        users["owner@h.example"]
        == [
            ("bob@b.example", True),
            ("cathy@c.example", False),
        ]
        + [("bob@b.example", True)] * passed
    )
    assert users["bob@b.example"] == [
        ("owner@h.example", True),
        ("cathy@c.example", False),
        ("owner@h.example", False),
    ]
    # never stored: no realm has a typing item
    for node in (h, b, c):
        page = yield node.realm.store.history(group, None, None, 100, 0)
        assert {e.kind for e in page} <= {"text", "event"}
    for conn in (owner, bob, cathy):
        yield conn.close()
