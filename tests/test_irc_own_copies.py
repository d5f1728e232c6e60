"""A private text's copy for its sender's own sessions (Sessions.route_private): an IRC
session without echo-message, which would show it nowhere, is not handed it (its mind's
``own_copies`` is false), yet its position moves past it and is acknowledged as before;
the sender's other sessions (native, IRC with echo-message) still get it.
StringTransport and a MemoryStore realm (tests/test_irc.py helpers)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from chatproto import irc
from chatproto.envelope import Envelope
from chatproto.irc import IRCFactory
from chatproto.testing import frames, logged_in
from tests.test_irc import PW, Conn, login, make_realm


def counting(conn: Conn) -> list[Envelope]:
    """The envelopes the realm hands to ``conn``'s mind from now on."""
    handed: list[Envelope] = []
    deliver = conn.proto.deliver

    def record(env: Envelope) -> None:
        handed.append(env)
        deliver(env)

    conn.proto.deliver = record  # type: ignore[method-assign]
    return handed


def setup() -> tuple[Clock, Any, IRCFactory]:
    clock = Clock()
    realm = make_realm(clock)
    return clock, realm, IRCFactory(realm, clock)


def texts(realm: Any) -> list[Envelope]:
    return [e for e in realm.store.items if e.kind == "text"]


def test_the_sender_without_echo_message_is_not_handed_its_own_copy() -> None:
    clock, realm, factory = setup()
    a1 = login(factory, "alice")  # sends; no echo-message
    a2 = login(factory, "alice", caps="echo-message")
    a3 = login(factory, "alice")  # another IRC client without echo-message
    native, transport = logged_in(realm, clock, "alice", PW, device="phone")
    frames(transport)
    bob = login(factory, "bob")
    handed = {c: counting(c) for c in (a1, a2, a3, bob)}
    a1.send("PRIVMSG bob :one", "PRIVMSG bob :two", "NOTICE bob :three")
    stored = texts(realm)
    assert [e.body for e in stored] == ["one", "two", "three"]
    last = stored[-1].pos
    assert handed[a1] == [] and handed[a3] == []  # no deliver call: shown nowhere
    assert handed[a2] == stored and handed[bob] == stored
    assert a1.lines() == [] and a3.lines() == []
    assert [p[-1] for c, p in a2.commands()] == ["one", "two", "three"]
    assert [p[-1] for c, p in bob.commands()] == ["one", "two", "three"]
    got = [f for f in frames(transport) if f.get("type") == "msg"]
    assert [f["body"] for f in got] == ["one", "two", "three"]  # a native echo
    # ... yet counted as delivered: the sessions' positions moved past the items
    for c in (a1, a2, a3):
        assert c.proto.session.delivered == last
    assert realm.stats.deliveries_live == 3 * 5  # (alice's four sessions and bob's)
    # A text to ourselves is received: handed over as before.
    a1.send("PRIVMSG alice :me")
    assert a1.commands() == [("PRIVMSG", ["alice", "me"])]
    assert handed[a1] == texts(realm)[-1:]
    native.connectionLost(None)
    realm.stopService()


def test_echo_message_asked_for_later_brings_the_copies_back() -> None:
    _clock, realm, factory = setup()
    a = login(factory, "alice")
    login(factory, "bob")
    handed = counting(a)
    a.send("PRIVMSG bob :quiet")
    assert handed == [] and a.lines() == []
    a.send("CAP REQ :echo-message")
    a.lines()
    a.send("PRIVMSG bob :echoed")
    assert [e.body for e in handed] == ["echoed"]
    assert a.commands() == [("PRIVMSG", ["bob", "echoed"])]
    realm.stopService()


def test_the_skipped_copies_are_acknowledged_and_resume_loses_nothing() -> None:
    clock, realm, factory = setup()
    a = login(factory, "alice")
    bob = login(factory, "bob")
    a.send("PRIVMSG bob :one", "PRIVMSG bob :two")
    last = texts(realm)[-1].pos
    assert bob.lines()
    # The ack timer is armed as the dropped copy armed it: acknowledged after the delay.
    assert realm.store.acks.get(("alice@localhost", irc.DEVICE), 0) == 0
    clock.advance(irc.ACK_DELAY + 0.1)
    assert realm.store.acks[("alice@localhost", irc.DEVICE)] == last
    # Reconnect: nothing replayed twice, and what came meanwhile exactly once.
    a.send("QUIT :bye")
    a.proto.connectionLost(None)
    bob.send("PRIVMSG alice :while away")
    before = realm.stats.deliveries_backlog
    a2 = Conn(factory)
    a2.send(f"PASS {PW}", "NICK alice", "USER u 0 * :R")
    clock.advance(0)
    assert [line for line in a2.lines() if " PRIVMSG " in line] == [
        ":bob!u@localhost PRIVMSG alice :while away"
    ]
    assert realm.stats.deliveries_backlog - before == 1  # (not "one" and "two" again)
    assert a2.proto.session.delivered == texts(realm)[-1].pos
    realm.stopService()
