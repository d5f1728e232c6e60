"""An IRC connection that ends itself in the read that carried its last PRIVMSGs
(``QUIT``, a line too long): the echoes and labeled replies of those PRIVMSGs are
written first, then ``ERROR``, then the close; nothing after the closing line is
handled, and a commit that never answers keeps the connection at most
``keepalive_interval`` (docs/irc.md, "Closing").

Over StringTransport (MemoryStore, Clock, commits held back), then over loopback TCP
(SQLite, where commits take a real round trip)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from chatproto.irc import IRCFactory
from chatproto.realm import RealmService
from tests.conftest import until
from tests.test_fatal_after_sends import _held_commits
from tests.test_irc import Conn, clock_fixture, factory_fixture, login, realm_fixture  # noqa: F401
from tests.test_irc_conformance_loopback import connect as raw_connect
from tests.test_irc_loopback import PW, gateway  # noqa: F401

CAPS = "echo-message labeled-response batch"
#: Longer than any line the gateway keeps (8191 bytes of tags + 512).
TOO_LONG = "x" * 9000


def _check_closed_after_echoes(a: Conn, b: Conn, realm: RealmService, error: str) -> None:
    lines = a.lines()
    assert lines == [
        ":alice!u@localhost PRIVMSG bob :one",
        "@label=x :alice!u@localhost PRIVMSG bob :two",
        f"ERROR :{error}",
    ]
    assert a.transport.disconnecting
    assert b.lines() == [
        ":alice!u@localhost PRIVMSG bob :one",
        ":alice!u@localhost PRIVMSG bob :two",
    ]
    assert [e.body for e in realm.store.items] == ["one", "two"]


@pytest.mark.parametrize("bytewise", [False, True], ids=["one_read", "bytewise"])
def test_quit_after_privmsgs_writes_their_echoes_then_error(
    factory: IRCFactory, realm: RealmService, bytewise: bool
) -> None:
    a = login(factory, "alice", caps=CAPS)
    b = login(factory, "bob")
    commit = _held_commits(realm)
    lines = ["PRIVMSG bob :one", "@label=x PRIVMSG bob :two", "QUIT :bye"]
    # read with the QUIT, never handled: no message, no group, no reply
    after = ["PRIVMSG bob :after", "JOIN #late", "PING x"]
    a.send(*lines, *after, bytewise=bytewise)
    assert a.lines() == [] and not a.transport.disconnecting  # waiting for the commits
    assert a.proto.state == "closing"
    a.send("PRIVMSG bob :later")  # a later read: not read at all
    commit()
    _check_closed_after_echoes(a, b, realm, "Closing link: alice (Quit: bye)")
    assert "#late@localhost" not in realm.groups.groups
    # QUIT acknowledges what it wrote: the next login has no backlog
    assert realm.store.acks[("alice@localhost", "irc")] == realm.store.items[-1].pos


@pytest.mark.parametrize("bytewise", [False, True], ids=["one_read", "bytewise"])
def test_a_line_too_long_after_privmsgs_writes_their_echoes_then_error(
    factory: IRCFactory, realm: RealmService, bytewise: bool
) -> None:
    a = login(factory, "alice", caps=CAPS)
    b = login(factory, "bob")
    commit = _held_commits(realm)
    lines = ["PRIVMSG bob :one", "@label=x PRIVMSG bob :two", TOO_LONG, "PRIVMSG bob :after"]
    if bytewise:  # (the line too long is found before its end: no need to feed it all)
        data = "".join(line + "\r\n" for line in lines).encode()
        for i in range(len(data)):
            a.proto.dataReceived(data[i : i + 1])
    else:
        a.send(*lines)
    assert a.lines() == [] and not a.transport.disconnecting
    commit()
    _check_closed_after_echoes(a, b, realm, "Input line was too long")


def test_lines_held_behind_a_join_run_before_the_line_too_long(
    factory: IRCFactory, realm: RealmService
) -> None:
    """A JOIN holds the lines after it until it is stored; the line too long waits
    in its turn behind them, so the PRIVMSG read before it is still sent."""
    a = login(factory, "alice", caps=CAPS)
    commit = _held_commits(realm)
    a.send("JOIN #dev", "PRIVMSG #dev :hi", TOO_LONG)
    commit()  # the JOIN: then the PRIVMSG is handled, its commit held in turn
    commit()
    cmds = a.commands()
    assert [c for c, _ in cmds] == ["JOIN", "353", "366", "PRIVMSG", "ERROR"]
    assert cmds[3] == ("PRIVMSG", ["#dev", "hi"])
    assert a.transport.disconnecting


def test_a_commit_that_never_answers_closes_after_keepalive_interval(
    factory: IRCFactory, realm: RealmService, clock: Clock
) -> None:
    factory.startFactory()
    a = login(factory, "alice", caps=CAPS)
    login(factory, "bob")
    _held_commits(realm)  # never committed
    a.send("PRIVMSG bob :one", "QUIT :bye")
    interval = realm.config.limits.keepalive_interval
    for _ in range(3):  # the client still talking does not keep it open
        clock.advance(interval / 4)
        a.send("PONG :localhost")
    assert not a.transport.disconnecting
    clock.advance(interval / 4)
    assert a.lines() == ["ERROR :Closing link: alice (Quit: bye)"]
    assert a.transport.disconnecting
    a.proto.connectionLost(None)
    factory.stopFactory()
    mine = [
        c
        for c in clock.getDelayedCalls()
        if getattr(c.func, "__self__", None) in (a.proto, factory)
    ]
    assert mine == []


def test_quit_with_nothing_pending_closes_at_once(factory: IRCFactory) -> None:
    a = login(factory, "alice", caps=CAPS)
    a.send("QUIT :bye", "PRIVMSG bob :after")
    assert a.lines() == ["ERROR :Closing link: alice (Quit: bye)"]
    assert a.transport.disconnecting and a.proto.state == "closed"


# over loopback TCP ------------------------------------------------------------------


@pytest.mark.parametrize("closing", ["QUIT :bye", TOO_LONG], ids=["quit", "too_long"])
@pytest_twisted.inlineCallbacks
def test_echoes_then_error_over_tcp(gateway: Any, closing: str) -> Any:  # noqa: F811
    realm, port, _ = gateway
    a = yield raw_connect(port, "alice", CAPS)
    b = yield raw_connect(port, "bob")
    a.transport.write(
        f"PRIVMSG bob :one\r\n@label=x PRIVMSG bob :two\r\n{closing}\r\n"
        "PRIVMSG bob :after\r\n".encode()
    )
    yield until(lambda: a.lost.called)  # the server closes it (bounded: until's 10 s)
    error = (
        "Closing link: alice (Quit: bye)"
        if closing.startswith("QUIT")
        else "Input line was too long"
    )
    assert a.got == [
        ":alice!u@localhost PRIVMSG bob :one",
        "@label=x :alice!u@localhost PRIVMSG bob :two",
        f"ERROR :{error}",
    ]

    def dms() -> list[str]:  # (not the 005 line, which names PRIVMSG too)
        return [line for line in b.got if " PRIVMSG bob :" in line]

    yield until(lambda: len(dms()) >= 2)
    page = yield realm.store.read_feed("bob@localhost", 0, 100)
    assert [e.body for e in page if e.kind == "text"] == ["one", "two"]  # not "after"
    assert dms() == [
        ":alice!u@localhost PRIVMSG bob :one",
        ":alice!u@localhost PRIVMSG bob :two",
    ]
    b.transport.loseConnection()
    yield b.lost
