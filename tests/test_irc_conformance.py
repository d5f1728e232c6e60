"""IRC conformance of the gateway's line logic (issue 19), over StringTransport: one
test per cause the public IRC test suite found (reply order, channel modes, identity,
prefixes, WHOWAS, long lines, NOTICE, WHO masks, nick case, small replies).

The loopback counterparts are in tests/test_irc_conformance_loopback.py."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.irc import IRCFactory
from chatproto.realm import RealmService
from tests.test_irc import Conn, login, make_realm


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def realm(clock: Clock) -> RealmService:
    return make_realm(clock)


@pytest.fixture
def factory(realm: RealmService, clock: Clock) -> IRCFactory:
    return IRCFactory(realm, clock)


class Gate:
    """Holds the store's commits until released (storage that is slow to answer)."""

    def __init__(self, realm: RealmService) -> None:
        self.store = realm.store
        self.append = realm.store.append
        self.held: list[tuple[Deferred[Any], Any, Any]] = []
        realm.store.append = self._held  # type: ignore[method-assign]

    def _held(self, items: Any, outbox: Any = ()) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((d, items, outbox))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, items, outbox in held:
            self.append(items, outbox).chainDeferred(d)

    def open(self) -> None:
        self.store.append = self.append  # type: ignore[method-assign]
        self.release()


def commands(c: Conn) -> list[str]:
    return [f"{cmd} {' '.join(params[:2])}".strip() for cmd, params in c.commands()]


# (1) reply order -----------------------------------------------------------------------


def test_replies_keep_the_order_of_commands(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice", caps="echo-message")
    gate = Gate(realm)
    a.send("PRIVMSG bob :hi", "PING one", "PRIVMSG carol :yo", "PING two")
    assert a.lines() == []  # the PRIVMSGs wait for storage: nothing overtakes them
    assert len(gate.held) == 2  # both sends run at once: only the replies wait
    gate.release()
    out = commands(a)
    assert out == ["PRIVMSG bob hi", "PONG localhost one", "PRIVMSG carol yo", "PONG localhost two"]


def test_lines_after_a_group_change_wait_for_it(factory: IRCFactory, realm: RealmService) -> None:
    """JOIN then PRIVMSG to the channel: the PRIVMSG runs once the JOIN is stored."""
    a = login(factory, "alice", caps="echo-message")
    gate = Gate(realm)
    a.send("JOIN #room", "PRIVMSG #room :first", "PING x")
    assert len(gate.held) == 1 and a.lines() == []
    gate.release()
    assert [c for c, _ in a.commands()] == ["JOIN", "353", "366"]
    assert len(gate.held) == 1  # now the PRIVMSG, to a channel that exists
    gate.open()
    assert commands(a) == ["PRIVMSG #room first", "PONG localhost x"]


def test_labeled_reply_waits_for_an_earlier_unlabeled_one(
    factory: IRCFactory, realm: RealmService
) -> None:
    a = login(factory, "alice", caps="labeled-response batch")
    gate = Gate(realm)
    a.send("JOIN #room", "@label=p1 PING x", "@label=p2 LUSERS")
    assert a.lines() == []
    gate.open()
    lines = a.lines()
    pong = next(i for i, line in enumerate(lines) if " PONG " in line)
    assert " JOIN " in lines[0] and " 366 " in lines[pong - 1]
    assert lines[pong].startswith("@label=p1 ")
    assert lines[pong + 1].startswith("@label=p2;batch=") or "BATCH +" in lines[pong + 1]


def test_quit_closes_after_the_earlier_replies(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice")
    gate = Gate(realm)
    a.send("JOIN #room", "QUIT :bye")
    assert a.lines() == [] and not a.transport.disconnecting
    gate.open()
    names = [c for c, _ in a.commands()]
    assert names[0] == "JOIN" and names[-1] == "ERROR"
    assert a.transport.disconnecting


def test_an_error_reply_keeps_its_place(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice")
    gate = Gate(realm)
    a.send("JOIN #room", "PART #nowhere", "NOSUCHCOMMAND", "PING z")
    assert a.lines() == []
    gate.open()
    names = [c for c, _ in a.commands()]
    assert names == ["JOIN", "353", "366", "403", "421", "PONG"], names
