"""A hostile IRC client against the gateway over real loopback TCP (a SQLite realm):
bytes no well-behaved client sends, each answered as docs/irc.md says ("Lines,
limits and bad input"), the connection kept where it should be."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.conftest import until
from tests.test_irc_conformance_loopback import Raw, both_joined, connect, gateway
from tests.test_irc_loopback import PW

__all__ = ["gateway"]  # (the fixture, imported for the tests of this module)


@pytest_twisted.inlineCallbacks
def test_invalid_utf8_fail_names_the_command_over_tcp(gateway: Any) -> None:
    """UTF8ONLY: ``FAIL PRIVMSG INVALID_UTF8`` (labeled), nothing sent, and the
    connection stays."""
    _, port = gateway
    alice = yield connect(port, "alice", caps="labeled-response batch")
    bob = yield connect(port, "bob")
    alice.transport.write(b"@label=xyz PRIVMSG bob :hi\xaa\r\nPING end\r\n")
    yield until(lambda: alice.has("PONG"))
    assert alice.got[0].startswith("@label=xyz :")
    assert alice.take()[0] == ("FAIL", ["PRIVMSG", "INVALID_UTF8", "Lines must be UTF-8"])
    alice.send("PRIVMSG bob :ok")
    yield until(lambda: bob.has("PRIVMSG"))
    assert bob.take() == [("PRIVMSG", ["bob", "ok"])]


@pytest_twisted.inlineCallbacks
def test_a_line_that_never_ends_closes_the_connection_over_tcp(gateway: Any) -> None:
    """No CR LF, ever: the gateway keeps at most one longest line (8191 + 512 bytes)
    of it, then ``ERROR :Input line was too long`` and the close."""
    _, port = gateway
    alice = yield connect(port, "alice")
    for _ in range(20):
        alice.transport.write(b"A" * 1000)
    yield alice.lost
    assert alice.got[-1] == "ERROR :Input line was too long"


@pytest_twisted.inlineCallbacks
def test_empty_targets_modes_and_missing_parameters_over_tcp(gateway: Any) -> None:
    """One line each: an empty target is ``*`` in its numeric; a MODE of six
    parameter modes applies four (MODES=4); NICK and PRIVMSG with nothing get
    431 and 411."""
    _, port = gateway
    alice, _bob = yield both_joined(port, "#h")
    alice.send("PRIVMSG bob, :x", "NICK", "PRIVMSG", "MODE #h +v-v+v-v+v-v bob bob bob bob bob bob")
    alice.send("PING done")
    yield until(lambda: alice.has("PONG"))
    got = alice.take()
    assert ("401", ["alice", "*", "No such nick/channel"]) in got
    assert ("431", ["alice", "No nickname given"]) in got
    assert ("411", ["alice", "No recipient given (PRIVMSG)"]) in got
    modes = [p for c, p in got if c == "MODE"]
    assert modes == [["#h", "+v", "bob"], ["#h", "-v", "bob"]] * 2, modes


@pytest_twisted.inlineCallbacks
def test_realname_and_quit_reason_reach_others_as_plain_text_over_tcp(gateway: Any) -> None:
    """What the gateway shows others itself -- a realname, a QUIT reason -- holds no
    ESC, C1 control or bidirectional override, whatever the client sent."""
    _, port = gateway
    alice = yield connect(port, "alice")
    user_line = "USER u 0 * :\x1b[31mRed\u202eName\x9b"
    bob = yield connect(port, "bob")
    bob.send("JOIN #p")
    yield until(lambda: bob.has("366"))
    alice.send("JOIN #p")
    yield until(lambda: alice.has("366") and bob.has("JOIN", "#p"))
    carol = yield connect_raw_user(port, "carol", user_line)
    carol.send("JOIN #p")
    yield until(lambda: carol.has("366") and bob.has("JOIN", "#p") and len(bob.got) > 4)
    bob.take()
    bob.send("WHOIS carol")
    yield until(lambda: bob.has("318"))
    assert ("311", ["bob", "carol", "u", "localhost", "*", "[31mRedName"]) in bob.take()
    carol.send("QUIT :\x1b[2Jbye\u202e")
    yield carol.lost
    yield until(lambda: bob.has("QUIT"))
    assert bob.got[-1] == ":carol!u@localhost QUIT :Quit: [2Jbye"


@defer.inlineCallbacks
def connect_raw_user(port: int, nick: str, user_line: str) -> Any:
    """A client logged in with ``user_line`` as its USER line."""
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port)
    client: Raw = yield endpoint.connect(protocol.Factory.forProtocol(Raw))
    client.send(f"PASS {PW}", f"NICK {nick}", user_line)
    yield until(lambda: client.has("376") or client.has("422"))
    client.got = []
    return client
