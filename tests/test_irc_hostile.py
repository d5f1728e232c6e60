"""A hostile IRC client against the gateway over real loopback TCP (a SQLite realm):
bytes no well-behaved client sends, each answered as docs/irc.md says ("Lines,
limits and bad input"), the connection kept where it should be."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.conftest import until
from tests.test_irc_conformance_loopback import connect, gateway

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
