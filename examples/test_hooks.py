"""Testing a realm extension the way you would test your own: no sockets, no threads.

``chatproto.testing`` gives a started realm on an in-memory store whose time is a
``Clock`` and whose password hashing runs inline, and server protocols connected to
``StringTransport``\\ s: the test writes frames in and reads frames out, and
``clock.advance(0)`` runs whatever the realm scheduled.

Run:  pytest examples/test_hooks.py        (from the repository root)
"""

from __future__ import annotations

from typing import Any

import hooks
from twisted.internet.task import Clock

from chatproto import extensions
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm


def login(realm: Any, clock: Clock, user: str) -> Any:
    """A server protocol logged in as ``user`` (the account must exist)."""
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1}))
    proto.dataReceived(frame({"type": "login", "user": user, "password": "password1"}))
    clock.advance(0)
    assert any(f["type"] == "synced" for f in frames(transport))
    return proto, transport


def request(proto: Any, transport: Any, clock: Clock, **fields: Any) -> list[dict[str, Any]]:
    """Send one request and return every frame written back (result or error first)."""
    proto.dataReceived(frame({"id": 1, **fields}))
    clock.advance(0)
    return frames(transport)


def messages(out: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(f["from"], f["to"], f["body"]) for f in out if f["type"] == "msg"]


def test_counts_and_answers_stats_in_a_group() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    stats = hooks.make_setup(bot="statsbot", flagged={"spam"})(realm)
    for user in ("alice", "bob"):
        realm.create_user(user, "password1")
    alice, ta = login(realm, clock, "alice")
    bob, tb = login(realm, clock, "bob")
    request(alice, ta, clock, type="create_group", group="#lobby")
    request(bob, tb, clock, type="join", group="#lobby")
    for body in ("hello", "buy spam now!"):
        request(alice, ta, clock, type="send", to="#lobby", body=body)
    request(bob, tb, clock, type="send", to="#lobby", body="hi alice")

    assert stats.per_group == {"#lobby@localhost": 3}
    assert "flagged=spam" in stats.audit[1]
    assert "flagged" not in stats.audit[0]

    # bob asks; the bot (created on first use) answers him privately
    out = request(bob, tb, clock, type="send", to="#lobby", body="!stats")
    assert messages(out)[-1] == (
        "statsbot@localhost",
        "bob@localhost",
        "#lobby@localhost: 4 messages (top: alice 2, bob 2)",
    )
    # alice saw bob's "!stats" in the group, but not the bot's private answer
    assert [m[2] for m in messages(frames(ta))][-1] == "!stats"
    realm.stopService()


def test_stats_by_private_message_and_loading_by_name() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    # the way twistd loads it: plugins = ["hooks:setup"] (examples/ on the path)
    stats = extensions.load("hooks:setup")(realm)
    assert realm.observers == [stats.observe]
    realm.create_user("statsbot", "password1")
    realm.create_user("carol", "password1")
    carol, tc = login(realm, clock, "carol")
    out = request(carol, tc, clock, type="send", to="statsbot", body="!stats")
    assert messages(out)[-1] == ("statsbot@localhost", "carol@localhost", "no group messages yet")
    # the bot's own messages are not counted, nor answered
    assert stats.per_group == {}
    realm.stopService()
