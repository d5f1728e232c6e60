"""TLS: the certificates chatproto.tls makes, served by real loopback listeners.

The loopback tests bind 127.0.0.1 port 0, talk through chatproto.client exactly as an
application would, and stop every listener and connection they start.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater

from chatproto import client, tap, tls
from chatproto.protocol import ClientFactory

PASSWORD = "correct horse battery"


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, str]:
    return tls.write_dev_certs(str(tmp_path / "tls"), "localhost")


def _load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


# certificate contents ---------------------------------------------------------------


def test_ca_is_a_ca() -> None:
    cert_pem, key_pem = tls.generate_ca("test CA")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == cert.subject
    assert b"PRIVATE KEY" in key_pem


def test_realm_cert_names_usages_and_validity() -> None:
    ca_cert, ca_key = tls.generate_ca("test CA")
    cert_pem, _key = tls.generate_cert("Chat.Example", ca_cert, ca_key, ["alt.example", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["chat.example", "alt.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=800) < lifetime < datetime.timedelta(days=830)
    assert cert.issuer == x509.load_pem_x509_certificate(ca_cert).subject


def test_localhost_cert_covers_loopback_addresses(certs: dict[str, str]) -> None:
    san = _load(certs["cert"]).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_bad_names_and_mismatched_ca_key() -> None:
    ca_cert, ca_key = tls.generate_ca("one")
    _other_cert, other_key = tls.generate_ca("two")
    with pytest.raises(ValueError):
        tls.generate_cert("chat.example", ca_cert, ca_key, ["not a name!"])
    with pytest.raises(tls.TLSFileError):
        tls.generate_cert("chat.example", ca_cert, other_key)
    with pytest.raises(tls.TLSFileError):
        tls.generate_cert("chat.example", b"garbage", ca_key)


def test_write_dev_certs_files_modes_and_ca_reuse(tmp_path: Path) -> None:
    d = str(tmp_path / "tls")
    first = tls.write_dev_certs(d, "localhost")
    assert sorted(os.listdir(d)) == ["ca.key", "ca.pem", "localhost.key", "localhost.pem"]
    for key in ("ca_key", "key"):
        assert os.stat(first[key]).st_mode & 0o777 == 0o600
    ca_before = Path(first["ca"]).read_bytes()

    second = tls.write_dev_certs(d, "chat.example")
    assert Path(second["ca"]).read_bytes() == ca_before  # shared by both realms
    assert _load(second["cert"]).issuer == _load(first["cert"]).issuer
    assert os.path.exists(os.path.join(d, "chat.example.pem"))

    third = tls.write_dev_certs(d, "localhost", new_ca=True)
    assert Path(third["ca"]).read_bytes() != ca_before

    os.unlink(third["ca_key"])
    with pytest.raises(tls.TLSFileError):
        tls.write_dev_certs(d, "localhost")


def test_server_description_escapes_colons() -> None:
    desc = tls.server_description("C:/a.pem", "C:/a.key", 0)
    assert desc == r"ssl:0:interface=127.0.0.1:privateKey=C\:/a.key:certKey=C\:/a.pem"


# loopback ---------------------------------------------------------------------------


class Inbox:
    """Collects delivered messages; ``wait`` fires once one matches."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[Any]]] = []

    def __call__(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        for pred, d in list(self._waiters):
            if pred(msg):
                self._waiters.remove((pred, d))
                d.callback(msg)

    def wait(self, pred: Callable[[dict[str, Any]], bool]) -> defer.Deferred[Any]:
        for msg in self.messages:
            if pred(msg):
                return defer.succeed(msg)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append((pred, d))
        return d.addTimeout(10, _reactor)


def _from(sender: str, body: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("from") == sender and m.get("body") == body


@defer.inlineCallbacks
def _drain(factory: ClientFactory) -> Any:
    """Wait (bounded) until the server side has seen its connections close."""
    for _ in range(200):
        if not factory.connections:
            return
        yield deferLater(_reactor, 0.01, lambda: None)


@defer.inlineCallbacks
def _listen_tls(realm: Any, certs: dict[str, str]) -> Any:
    factory = ClientFactory(realm)
    desc = tls.server_description(certs["cert"], certs["key"], 0)
    port = yield serverFromString(_reactor, desc).listen(factory)
    return factory, port


def _login(server: str, user: str, certs: dict[str, str], **kw: Any) -> Any:
    """A client registering ``user`` over TLS, trusting the dev CA for the name localhost."""
    return client.connect(
        _reactor, server, user, PASSWORD, register=True, realm="localhost", ca=certs["ca"], **kw
    )


@pytest_twisted.inlineCallbacks
def test_direct_messages_both_ways_over_tls(realm: Any, certs: dict[str, str]) -> Any:
    factory, port = yield _listen_tls(realm, certs)
    server = f"tls:127.0.0.1:{port.getHost().port}"
    conns = []
    try:
        inbox_a, inbox_b = Inbox(), Inbox()
        alice = yield _login(server, "alice", certs, on_message=inbox_a)
        conns.append(alice)
        bob = yield _login(server, "bob", certs, on_message=inbox_b)
        conns.append(bob)
        assert alice.protocol.transport.getPeerCertificate() is not None

        yield alice.send("bob", "hello over tls")
        got = yield inbox_b.wait(_from("alice@localhost", "hello over tls"))
        assert got["to"] == "bob@localhost"
        yield bob.send("alice@localhost", "and back")
        yield inbox_a.wait(_from("bob@localhost", "and back"))
    finally:
        for conn in conns:
            yield conn.close()
        yield port.stopListening()
        yield _drain(factory)


@pytest_twisted.inlineCallbacks
def test_untrusted_ca_and_wrong_name_are_refused(
    realm: Any, certs: dict[str, str], tmp_path: Path
) -> Any:
    """The TLS layer rejects both; the realm never sees a request."""
    other = tls.write_dev_certs(str(tmp_path / "other"), "localhost")
    factory, port = yield _listen_tls(realm, certs)
    server = f"tls:127.0.0.1:{port.getHost().port}"

    class Probe(protocol.Protocol):
        def __init__(self) -> None:
            self.lost: defer.Deferred[Any] = defer.Deferred()

        def connectionMade(self) -> None:
            self.transport.write(b"\x00\x00\x00\x02{}")

        def connectionLost(self, reason: Any) -> None:
            self.lost.callback([reason])  # a bare Failure would errback

    cases = [
        (other["ca"], "localhost", SSL.Error),
        (certs["ca"], "other.example", VerificationError),
    ]
    try:
        for ca, name, error in cases:
            endpoint = client.endpoint_for(_reactor, server, realm=name, ca=ca)
            probe = yield endpoint.connect(protocol.Factory.forProtocol(Probe))
            [reason] = yield probe.lost.addTimeout(10, _reactor)
            assert reason.check(error), reason

            # the client library fails with the TLS layer's own error, not a bare close
            with pytest.raises(error):
                yield client.connect(
                    _reactor, server, "mallory", PASSWORD, register=True, realm=name, ca=ca
                )
        users = yield realm.store.list_users()
        assert users == []
    finally:
        yield port.stopListening()
        yield _drain(factory)


@pytest_twisted.inlineCallbacks
def test_tap_serves_tls_from_config(tmp_path: Path, certs: dict[str, str]) -> Any:
    config_file = tmp_path / "realm.toml"
    config_file.write_text(
        "[realm]\n"
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n"
        "listen = []\n"
        "[auth]\n"
        "argon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n"
        "[tls]\n"
        f"certificate = {json.dumps(certs['cert'])}\n"
        f"private_key = {json.dumps(certs['key'])}\n"
        "port = 0\n"
        'interface = "127.0.0.1"\n'
    )
    options = tap.Options()
    options.parseOptions(["--config", str(config_file)])
    descriptions = options.realm_config.listen_descriptions()
    assert len(descriptions) == 1 and descriptions[0].startswith("ssl:0:")

    top, realm = tap.build(options.realm_config, _reactor)
    top.startService()
    try:
        [listener] = [s for s in top if isinstance(s, tap.ListenerService)]
        assert listener.port is not None
        server = f"tls:127.0.0.1:{listener.port.getHost().port}"
        inbox = Inbox()
        conn = yield _login(server, "carol", certs, on_message=inbox)
        try:
            yield conn.send("carol", "note to self")
            yield inbox.wait(_from("carol@localhost", "note to self"))
        finally:
            yield conn.close()
        yield _drain(listener.factory)
    finally:
        yield top.stopService()
    assert not realm.running


@pytest_twisted.inlineCallbacks
def test_server_close_over_tls_completes_without_waiting_for_the_sweep(
    realm: Any, certs: dict[str, str]
) -> Any:
    """A TLS transport shuts down only once no producer is registered: the realm's
    close (error frame, then close) must not leave the connection open until the
    keepalive sweep aborts it."""
    factory, port = yield _listen_tls(realm, certs)
    server = f"tls:127.0.0.1:{port.getHost().port}"
    try:
        alice = yield _login(server, "alice", certs)
        assert realm.config.limits.keepalive_interval >= 10
        (proto,) = factory.connections
        proto.close_with("shutdown", "closing for the test")
        yield _drain(factory)
        assert not factory.connections
        assert alice.protocol.transport is None or alice.protocol.lost
    finally:
        yield port.stopListening()
        yield _drain(factory)
