"""The IRC gateway's PRIVMSG/NOTICE lines of one read are one batch for the realm
(IRCProtocol.queue_send): one append, errors per target, and a command after the sends
sees them stored.  StringTransport and a MemoryStore realm (tests/test_irc.py helpers)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.irc import IRCFactory
from tests.test_irc import login, make_realm


def count_appends(realm: Any) -> list[int]:
    sizes: list[int] = []
    append = realm.store.append

    def counting(items: Any, outbox: Any = ()) -> Deferred[Any]:
        sizes.append(len(items))
        return append(items, outbox)

    realm.store.append = counting
    return sizes


def test_privmsgs_of_one_read_are_one_append() -> None:
    clock = Clock()
    realm = make_realm(clock)
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice")
    bob = login(factory, "bob")
    sizes = count_appends(realm)
    alice.send(*(f"PRIVMSG bob :m{i}" for i in range(5)))
    assert sizes == [5]
    got = [p[-1] for c, p in bob.commands() if c == "PRIVMSG"]
    assert got == [f"m{i}" for i in range(5)]
    assert [e.body for e in realm.store.items if e.kind == "text"] == [f"m{i}" for i in range(5)]
    # one line at a time: one append each
    alice.send(*(f"PRIVMSG bob :b{i}" for i in range(3)), bytewise=True)
    assert sizes == [5, 1, 1, 1]
    realm.stopService()


def test_errors_stay_per_target_and_in_order() -> None:
    clock = Clock()
    realm = make_realm(clock)
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice")
    bob = login(factory, "bob")
    alice.send("PRIVMSG bob :one", "PRIVMSG nobody :lost", "PRIVMSG bob,carol :two", "PING x")
    cmds = alice.commands()
    assert [c for c, _ in cmds] == ["401", "PONG"]
    assert [p[-1] for c, p in bob.commands() if c == "PRIVMSG"] == ["one", "two"]
    assert [e.recipient for e in realm.store.items if e.kind == "text"] == [
        "bob@localhost",
        "bob@localhost",
        "carol@localhost",
    ]
    realm.stopService()


def test_a_command_after_privmsgs_is_stored_after_them() -> None:
    """PRIVMSG then TOPIC in one read: the message is handed to the realm before the
    TOPIC, so the store holds them in the order they were written."""
    clock = Clock()
    realm = make_realm(clock)
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice")
    login(factory, "bob")
    alice.send("JOIN #room")
    alice.lines()
    alice.send("PRIVMSG bob :first", "TOPIC #room :second")
    clock.advance(0)
    stored = [e.body or (e.meta or {}).get("topic") for e in realm.store.items]
    assert stored[-2:] == ["first", "second"], stored
    realm.stopService()
