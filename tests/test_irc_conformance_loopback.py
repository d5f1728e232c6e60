"""IRC conformance (issue 19) over real loopback TCP with a SQLite realm: raw lines, as
the public IRC test suite sends them, one test per cause."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import LineOnlyReceiver

from chatproto.irc import parse_line
from tests.conftest import until
from tests.test_irc_loopback import PW, irc_gateway

USERS = ("alice", "bob", "carol")


class Raw(LineOnlyReceiver):
    """A client that sends raw lines and keeps every line it receives."""

    delimiter = b"\r\n"
    MAX_LENGTH = 20000

    def __init__(self) -> None:
        self.got: list[str] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.got.append(line.decode("utf-8", "replace"))

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)

    def send(self, *lines: str) -> None:
        self.transport.write("".join(line + "\r\n" for line in lines).encode())

    def commands(self) -> list[tuple[str, list[str]]]:
        return [parse_line(line)[1:] for line in self.got]

    def take(self) -> list[tuple[str, list[str]]]:
        out = self.commands()
        self.got = []
        return out

    def has(self, command: str, *params: str) -> bool:
        return any(
            c == command and list(p[: len(params)]) == list(params) for c, p in self.commands()
        )


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    """(realm, IRC port) of a realm with :data:`USERS`."""
    for realm, port, _native in irc_gateway(tmp_path, USERS, PW):
        yield realm, port


@defer.inlineCallbacks
def connect(port: int, nick: str, caps: str = "", password: str | None = PW) -> Any:
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port)
    client: Raw = yield endpoint.connect(protocol.Factory.forProtocol(Raw))
    lines = [f"PASS {password}"] if password is not None else []
    if caps:
        lines = ["CAP LS 302", f"CAP REQ :{caps}", *lines]
    lines += [f"NICK {nick}", "USER u 0 * :Real Name"]
    if caps:
        lines.append("CAP END")
    client.send(*lines)
    yield until(lambda: client.has("376") or client.has("422"))
    client.got = []
    return client


@defer.inlineCallbacks
def both_joined(port: int, channel: str) -> Any:
    """alice, then bob, connected and joined to ``channel``; alice has seen bob's
    JOIN, and what she was sent so far is taken."""
    alice = yield connect(port, "alice")
    bob = yield connect(port, "bob")
    alice.send(f"JOIN {channel}")
    yield until(lambda: alice.has("366"))
    bob.send(f"JOIN {channel}")
    yield until(lambda: bob.has("366") and alice.has("JOIN", channel) and len(alice.got) > 3)
    alice.take()
    return alice, bob


@pytest_twisted.inlineCallbacks
def test_replies_keep_command_order_over_tcp(gateway: Any) -> None:
    """(1) JOIN, PRIVMSG and TOPIC wait for SQLite; the PINGs after them do not
    overtake their replies."""
    _, port = gateway
    alice = yield connect(port, "alice", caps="echo-message")
    alice.send("JOIN #room", "PING 1", "PRIVMSG #room :hello", "PING 2", "TOPIC #room :t", "PING 3")
    yield until(lambda: alice.has("PONG", "localhost", "3"))
    names = [c for c, _ in alice.take()]
    assert names == ["JOIN", "353", "366", "PONG", "PRIVMSG", "PONG", "TOPIC", "PONG"], names


@pytest_twisted.inlineCallbacks
def test_quit_relayed_and_lusers_max_over_tcp(gateway: Any) -> None:
    """(14) QUIT reaches the members of a shared channel; LUSERS counts the most
    users online at once; (3) INFO."""
    _, port = gateway
    bar, qux = yield both_joined(port, "#chan")
    qux.send("QUIT :qux out")
    yield qux.lost
    yield until(lambda: bar.has("QUIT"))
    assert bar.got[-1] == ":bob!u@localhost QUIT :Quit: qux out"
    bar.send("LUSERS")
    yield until(lambda: bar.has("266"))
    got = dict(bar.take())
    assert got["265"][1:3] == ["1", "2"]
    bar.send("INFO")  # (3) INFO
    yield until(lambda: bar.has("374"))
    assert {c for c, _ in bar.take()} == {"371", "374"}
    bar.send("TOPIC #chan :new topic", "TOPIC #chan")  # (14) 333: who set it, when
    yield until(lambda: bar.has("333"))
    assert [p[1:3] for c, p in bar.take() if c == "333"] == [["#chan", "alice"]]
    bar.send("JOIN #chan2")  # (14) NAMES of several channels: one 366
    yield until(lambda: bar.has("366", "alice", "#chan2"))
    bar.take()
    bar.send("NAMES #chan,#chan2")
    yield until(lambda: bar.has("366"))
    assert [(c, p[1:3]) for c, p in bar.take()] == [
        ("353", ["=", "#chan"]),
        ("353", ["=", "#chan2"]),
        ("366", ["#chan,#chan2", "End of /NAMES list"]),
    ]


@pytest_twisted.inlineCallbacks
def test_mode_o_by_a_non_member_over_tcp(gateway: Any) -> None:
    """(14) MODE +o on a channel the sender is not in: one 442."""
    _, port = gateway
    alice = yield connect(port, "alice")
    bob = yield connect(port, "bob")
    carol = yield connect(port, "carol")
    carol.send("JOIN #unrelated")
    yield until(lambda: carol.has("366"))
    bob.send("JOIN #unrelated")
    yield until(lambda: bob.has("366"))
    alice.send("MODE #unrelated +o bob", "PING done")
    yield until(lambda: alice.has("PONG"))
    assert [c for c, _ in alice.take()] == ["442", "PONG"]


@pytest_twisted.inlineCallbacks
def test_minus_n_over_tcp(gateway: Any) -> None:
    """(2) -n: a non-member's message reaches the channel."""
    _, port = gateway
    alice = yield connect(port, "alice")
    bob = yield connect(port, "bob")
    alice.send("JOIN #chan")
    yield until(lambda: alice.has("366"))
    bob.send("PRIVMSG #chan :refused", "PING 1")
    yield until(lambda: bob.has("PONG"))
    assert [c for c, _ in bob.take()] == ["404", "PONG"]
    alice.send("MODE #chan -n")
    yield until(lambda: alice.has("MODE", "#chan", "-n"))
    bob.send("PRIVMSG #chan :from outside")
    yield until(lambda: alice.has("PRIVMSG", "#chan", "from outside"))


@pytest_twisted.inlineCallbacks
def test_own_copies_over_tcp(gateway: Any) -> None:
    """A private text's copy for its sender's own sessions: the sending session
    without echo-message gets none, a second session of the same user with
    echo-message gets it, the recipient gets it (tests/test_irc_own_copies.py
    over StringTransport; here over loopback TCP and the SQLite store)."""
    _, port = gateway
    sender = yield connect(port, "alice")
    echoed = yield connect(port, "alice", caps="echo-message")
    bob = yield connect(port, "bob")
    sender.send("PRIVMSG bob :one", "PRIVMSG bob :two")
    yield until(lambda: len([c for c, _ in echoed.commands() if c == "PRIVMSG"]) == 2)
    assert [p for c, p in echoed.take() if c == "PRIVMSG"] == [["bob", "one"], ["bob", "two"]]
    yield until(lambda: len([c for c, _ in bob.commands() if c == "PRIVMSG"]) == 2)
    assert [p for c, p in bob.take() if c == "PRIVMSG"] == [["bob", "one"], ["bob", "two"]]
    # The copies went out to every session at once: a PING answered after them
    # shows the sender got none.
    sender.send("PING fence")
    yield until(lambda: sender.has("PONG", "localhost", "fence"))
    assert [c for c, _ in sender.take()] == ["PONG"]
