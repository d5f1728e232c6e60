"""The IRC gateway over real loopback TCP (and TLS), with Twisted's own
``twisted.words.protocols.irc.IRCClient`` as the client, and an IRC user talking to a
native-protocol user in a DM and in a group."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import LineOnlyReceiver
from twisted.words.protocols import irc as twirc

from chatproto.client import connect
from chatproto.irc import IRCFactory
from tests.conftest import fast_config, make_realm, until

PW = "password-irc"


class SignOnFailed(AssertionError):
    """A :class:`Client` was not signed on: its connection closed first (a refused
    login), or it waited :attr:`Client.sign_on_timeout` seconds."""


class Client(twirc.IRCClient):
    """An IRCClient that records what it is told.

    ``signed_on`` fires at the welcome (001), or fails with :class:`SignOnFailed`
    (with the last lines read) when the connection closes first or after
    ``sign_on_timeout`` seconds: a refused login fails its test, never hangs it."""

    #: Bounded, and long enough for a heavily loaded machine.
    sign_on_timeout = 30.0

    def __init__(self, nick: str, password: str | None) -> None:
        self.nickname = nick
        self.password = password
        self.events: list[tuple[Any, ...]] = []
        self.signed_on: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.raw: list[str] = []
        self._sign_on_timer: Any = None

    def connectionMade(self) -> None:
        self._sign_on_timer = _reactor.callLater(self.sign_on_timeout, self._sign_on_timed_out)
        super().connectionMade()

    def _sign_on_timed_out(self) -> None:
        self._sign_on_timer = None
        self._not_signed_on(f"not signed on within {self.sign_on_timeout:g} s")
        self.transport.abortConnection()

    def _not_signed_on(self, why: str) -> None:
        if self._sign_on_timer is not None:
            self._sign_on_timer.cancel()
            self._sign_on_timer = None
        if not self.signed_on.called:
            last = self.raw[-5:]
            self.signed_on.errback(SignOnFailed(f"IRC {self.nickname}: {why}; last lines {last}"))

    def lineReceived(self, line: bytes) -> None:
        self.raw.append(line.decode("utf-8", "replace"))
        super().lineReceived(line)

    def signedOn(self) -> None:
        if self._sign_on_timer is not None:
            self._sign_on_timer.cancel()
            self._sign_on_timer = None
        self.signed_on.callback(None)

    def privmsg(self, user: str, channel: str, message: str) -> None:
        self.events.append(("privmsg", user.split("!")[0], channel, message))

    def joined(self, channel: str) -> None:
        self.events.append(("joined", channel))

    def userJoined(self, user: str, channel: str) -> None:
        self.events.append(("userJoined", user.split("!")[0], channel))

    def topicUpdated(self, user: str, channel: str, newTopic: str) -> None:
        self.events.append(("topic", channel, newTopic))

    def kickedFrom(self, channel: str, kicker: str, message: str) -> None:
        self.events.append(("kickedFrom", channel, kicker.split("!")[0], message))

    def irc_ERR_PASSWDMISMATCH(self, prefix: str, params: list[str]) -> None:
        self.events.append(("464",))

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self._not_signed_on("the connection closed before the welcome")
        if not self.lost.called:
            self.lost.callback(None)


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    yield from irc_gateway(tmp_path, ("alice", "bob"))


def irc_gateway(tmp_path: Any, users: tuple[str, ...], password: str = PW, **irc: Any) -> Any:
    """A started realm with ``users`` (each with ``password``), its IRC gateway and a
    native listener on 127.0.0.1: yields ``(realm, irc port, native endpoint
    description)``, then closes everything (a fixture's body).  ``irc``: settings of
    the ``[irc]`` section (``guests=True``)."""
    cfg = fast_config(tmp_path, send_burst=10_000, send_rate=10_000.0)
    cfg.irc.enabled = True
    cfg.irc.flood_rate = 0.0
    for name, value in irc.items():
        setattr(cfg.irc, name, value)
    realm = make_realm(cfg)
    pytest_twisted.blockon(realm.startService())
    for name in users:
        pytest_twisted.blockon(realm.create_user(name, password))
    factory = IRCFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    from chatproto.protocol import ClientFactory

    native = ClientFactory(realm)
    nport = _reactor.listenTCP(0, native, interface="127.0.0.1")
    yield realm, port.getHost().port, f"tcp:127.0.0.1:{nport.getHost().port}"
    for proto in list(factory.connections) + list(native.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(nport.stopListening())
    pytest_twisted.blockon(realm.stopService())


@defer.inlineCallbacks
def irc_client(port: int, nick: str, password: str | None = PW) -> Any:
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port)
    client = yield endpoint.connect(protocol.Factory.forProtocol(lambda: Client(nick, password)))
    return client


class StalledClient(LineOnlyReceiver):
    """Registers, then (when told) stops reading; counts what it read."""

    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.received = 0
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendLine(f"PASS {PW}".encode())
        self.sendLine(b"NICK bob")
        self.sendLine(b"USER bob 0 * :Bob")

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_an_irc_client_that_stops_reading_is_dropped(gateway: Any) -> None:
    """Issue 14 on the IRC gateway: past max_output_buffer held, ERROR :SendQ
    exceeded and a close; memory stays bounded."""
    realm, port, _ = gateway
    limit = realm.config.limits.max_output_buffer
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port)
    bob = yield endpoint.connect(protocol.Factory.forProtocol(StalledClient))
    yield until(lambda: any(b" 001 bob " in line for line in bob.lines))
    (session,) = realm.sessions_of("bob@localhost")
    server = session.mind
    kernel = 0
    for sock, opt in (
        (bob.transport.getHandle(), socket.SO_RCVBUF),
        (server.transport.getHandle(), socket.SO_SNDBUF),
    ):
        sock.setsockopt(socket.SOL_SOCKET, opt, 64 * 1024)
        kernel += sock.getsockopt(socket.SOL_SOCKET, opt)
    bob.transport.pauseProducing()
    before = bob.received
    body = "x" * 16000
    posted = peak = 0
    while server.state != "closed" and posted < (limit + 8 * 2**20) // len(body):
        for _ in range(8):
            realm.post("alice", "bob", body)
            posted += 1
        yield task.deferLater(_reactor, 0.005, lambda: None)
        t = server.transport
        peak = max(peak, server._out.held + len(t.dataBuffer) - t.offset + t._tempDataLen)
    assert server.state == "closed", f"not dropped after {posted * len(body)} bytes"
    assert peak <= limit + 64 * 1024 + 4 * 17000
    bob.transport.resumeProducing()
    yield bob.lost
    assert bob.lines[-1] == b"ERROR :SendQ exceeded"
    assert bob.received - before <= kernel + 64 * 1024 + 4 * 17000


class CapClient(StalledClient):
    """Registers as alice with the batch, server-time and message-tags capabilities."""

    def connectionMade(self) -> None:
        for line in ("CAP REQ :batch server-time message-tags", f"PASS {PW}", "NICK alice"):
            self.sendLine(line.encode())
        self.sendLine(b"USER alice 0 * :Alice")
        self.sendLine(b"CAP END")


@pytest_twisted.inlineCallbacks
def test_chathistory_tags_every_line_of_a_multiline_message_over_tcp(gateway: Any) -> None:
    realm, port, _ = gateway
    yield realm.post("bob", "alice", "one\ntwo\nthree")
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port)
    alice = yield endpoint.connect(protocol.Factory.forProtocol(CapClient))
    yield until(lambda: any(b" 001 alice " in line for line in alice.lines))
    alice.sendLine(b"CHATHISTORY LATEST bob * 3")
    yield until(lambda: any(b" BATCH -" in line for line in alice.lines))
    start = next(i for i, line in enumerate(alice.lines) if b" BATCH +" in line)
    ref = alice.lines[start].split(b"+")[1].split()[0]
    body = alice.lines[start + 1 : -1]
    assert [line.rsplit(b" :", 1)[1] for line in body] == [b"one", b"two", b"three"]
    assert all(line.startswith(b"@batch=" + ref + b";") for line in body), body
    alice.transport.loseConnection()
    yield alice.lost


@pytest_twisted.inlineCallbacks
def test_irc_clients_dm_and_channel(gateway: Any) -> None:
    realm, port, _ = gateway
    alice = yield irc_client(port, "alice")
    bob = yield irc_client(port, "bob")
    yield alice.signed_on
    yield bob.signed_on
    alice.msg("bob", "hello over tcp")
    yield until(lambda: ("privmsg", "alice", "bob", "hello over tcp") in bob.events)
    alice.join("#room")
    yield until(lambda: ("joined", "#room") in alice.events)
    bob.join("#room")
    yield until(lambda: ("userJoined", "bob", "#room") in alice.events)
    bob.msg("#room", "hi room")
    yield until(lambda: ("privmsg", "bob", "#room", "hi room") in alice.events)
    alice.topic("#room", "new topic")
    yield until(lambda: ("topic", "#room", "new topic") in bob.events)
    alice.kick("#room", "bob", "bye")
    yield until(lambda: ("kickedFrom", "#room", "alice", "bye") in bob.events)
    # Stored durably: the realm's history has both messages.
    items = yield realm.store.history("#room@localhost", None, None, 10, 0)
    assert [e.body for e in items if e.kind == "text"] == ["hi room"]
    alice.quit("done")
    bob.quit("done")
    yield alice.lost
    yield bob.lost


@pytest_twisted.inlineCallbacks
def test_wrong_password_over_tcp(gateway: Any) -> None:
    """A refused login: 464, ERROR, closed; waiting for the sign-on fails at once,
    saying so, instead of hanging the test."""
    _realm, port, _ = gateway
    client = yield irc_client(port, "alice", "not-the-password")
    with pytest.raises(SignOnFailed, match=r"closed before the welcome.*ERROR "):
        yield client.signed_on
    yield client.lost
    assert ("464",) in client.events
    assert any(line.startswith("ERROR ") for line in client.raw)


@pytest_twisted.inlineCallbacks
def test_waiting_for_a_sign_on_that_never_comes_is_bounded() -> None:
    """A server that accepts and never answers: the sign-on wait fails after
    ``sign_on_timeout`` seconds and the client hangs up."""
    silent = _reactor.listenTCP(
        0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
    )
    try:

        def client() -> Client:
            c = Client("alice", PW)
            c.sign_on_timeout = 0.2
            return c

        endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", silent.getHost().port)
        c = yield endpoint.connect(protocol.Factory.forProtocol(client))
        with pytest.raises(
            SignOnFailed, match=r"IRC alice: not signed on within 0.2 s; last lines \[\]"
        ):
            yield c.signed_on
        yield c.lost
    finally:
        yield silent.stopListening()


@pytest_twisted.inlineCallbacks
def test_irc_user_and_native_user_dm_and_group(gateway: Any) -> None:
    """An IRC user and a native-protocol user see each other's messages."""
    _realm, port, native_addr = gateway
    got: list[dict[str, Any]] = []
    carol = yield connect(
        _reactor, native_addr, "carol", "password-carol", register=True, on_message=got.append
    )
    yield carol.synced
    alice = yield irc_client(port, "alice")
    yield alice.signed_on
    # DM both ways.
    alice.msg("carol", "from irc")
    yield until(lambda: any(m.get("body") == "from irc" for m in got))
    yield carol.send("alice", "from native")
    yield until(lambda: ("privmsg", "carol", "alice", "from native") in alice.events)
    # A group created natively, joined from IRC.
    yield carol.create_group("#mixed")
    alice.join("#mixed")
    yield until(lambda: ("joined", "#mixed") in alice.events)
    yield carol.send("#mixed@localhost", "native to group")
    yield until(lambda: ("privmsg", "carol", "#mixed", "native to group") in alice.events)
    alice.msg("#mixed", "irc to group")
    yield until(
        lambda: any(m.get("body") == "irc to group" and m["to"] == "#mixed@localhost" for m in got)
    )
    sender = next(m for m in got if m.get("body") == "irc to group")["from"]
    assert sender == "alice@localhost"
    alice.quit()
    yield alice.lost
    yield carol.close()


FAST_AUTH = """
[auth]
argon2_time_cost = 1
argon2_memory_cost = 1024
argon2_parallelism = 1
"""


def test_irc_config_section_and_descriptions(tmp_path: Any) -> None:
    from twisted.python import usage

    from chatproto import tap

    path = tmp_path / "realm.toml"
    path.write_text('[irc]\nenabled = true\nlisten = "tcp:6668"\nmotd = "hi"\n')
    opts = tap.Options()
    opts.parseOptions(["--config", str(path)])
    cfg = opts.realm_config
    assert cfg.irc.enabled and cfg.irc.listen == ["tcp:6668"] and cfg.irc.motd == "hi"
    assert cfg.irc_descriptions() == ["tcp:6668"]
    cfg.tls.certificate = "/tmp/c.pem"
    assert cfg.irc_descriptions()[1].startswith("ssl:6697:interface=127.0.0.1:")
    cfg.irc.enabled = False
    assert cfg.irc_descriptions() == []
    for text, named in [
        ("[irc]\nlisten = [1]\n", "irc.listen"),
        ("[irc]\nflood_rate = -1\n", "irc.flood_rate"),
        ("[irc]\nserver_name = 'a b'\n", "irc.server_name"),
        ("[irc]\ntls_port = 70000\n", "irc.tls_port"),
        ("[irc]\nenabled = true\nlisten = []\n", "irc.enabled"),
        ("[irc]\nbogus = 1\n", "irc.bogus"),
    ]:
        path.write_text(text)
        with pytest.raises(usage.UsageError, match=named.replace(".", r"\.")):
            tap.Options().parseOptions(["--config", str(path)])
    path.write_text("[irc]\nenabled = true\nlisten = 'nosuchtype:1'\n")
    with pytest.raises(usage.UsageError, match="nosuchtype"):
        tap.Options().parseOptions(["--config", str(path)])


@pytest_twisted.inlineCallbacks
def test_twistd_wiring_serves_irc(tmp_path: Any) -> Any:
    """tap.build with [irc] enabled listens for IRC; an IRCClient signs on through it."""
    from chatproto import tap

    path = tmp_path / "realm.toml"
    path.write_text(FAST_AUTH + '[irc]\nenabled = true\nlisten = "tcp:0:interface=127.0.0.1"\n')
    opts = tap.Options()
    opts.parseOptions(
        [
            "--config",
            str(path),
            "--data-dir",
            str(tmp_path / "d"),
            "-l",
            "tcp:0:interface=127.0.0.1",
        ]
    )
    top, realm = tap.build(opts.realm_config, _reactor)
    top.privilegedStartService()
    top.startService()
    try:
        listeners = [s for s in top if isinstance(s, tap.ListenerService)]
        assert [type(s.factory).__name__ for s in listeners] == ["ClientFactory", "IRCFactory"]
        yield realm.create_user("alice", PW)
        client = yield irc_client(listeners[1].port.getHost().port, "alice")
        yield client.signed_on
        client.quit()
        yield client.lost
    finally:
        yield top.stopService()


@pytest_twisted.inlineCallbacks
def test_irc_over_tls_with_the_realm_certificate(tmp_path: Any) -> Any:
    """IRC over TLS (an ssl: description in irc.listen; irc.tls_port adds the same
    description for the realm's certificate), verified against the dev CA."""
    import json

    from twisted.internet import ssl
    from twisted.internet.endpoints import wrapClientTLS

    from chatproto import tap
    from chatproto.tls import server_description, write_dev_certs

    certs = write_dev_certs(str(tmp_path / "tls"), "localhost")
    path = tmp_path / "realm.toml"
    path.write_text(
        FAST_AUTH
        + f"[realm]\ndata_dir = {json.dumps(str(tmp_path / 'd'))}\n"
        + 'listen = ["tcp:0:interface=127.0.0.1"]\n'
        + f"[tls]\ncertificate = {json.dumps(certs['cert'])}\n"
        + f"private_key = {json.dumps(certs['key'])}\nport = 0\n"
        + "[irc]\nenabled = true\ntls_port = 0\n"
        + f"listen = {json.dumps([server_description(certs['cert'], certs['key'], 0)])}\n"
    )
    opts = tap.Options()
    opts.parseOptions(["--config", str(path)])
    assert opts.realm_config.irc_descriptions()[0].startswith("ssl:0:")
    top, realm = tap.build(opts.realm_config, _reactor)
    top.privilegedStartService()
    top.startService()
    try:
        [irc_listener] = [
            s
            for s in top
            if isinstance(s, tap.ListenerService) and isinstance(s.factory, IRCFactory)
        ]
        yield realm.create_user("alice", PW)
        with open(certs["ca"], "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=ca)
        port = irc_listener.port.getHost().port
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(_reactor, "127.0.0.1", port))
        client = yield endpoint.connect(protocol.Factory.forProtocol(lambda: Client("alice", PW)))
        yield client.signed_on
        client.quit()
        yield client.lost
    finally:
        yield top.stopService()
