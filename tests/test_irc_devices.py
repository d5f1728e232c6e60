"""IRC connections name their realm device: ``PASS account/name:password`` or the SASL
PLAIN login ``account/name`` is the device ``irc/name``, with its own ack position; a
client that names none is the shared device ``irc`` (docs/irc.md, "Devices").  Two IRC
clients of one account (a laptop's, a phone's) each get, when they reconnect, exactly
what they had not been sent.

Over StringTransport (MemoryStore, Clock), then over loopback TCP (SQLite) with
Twisted's IRCClient."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from chatproto.irc import IRCFactory
from chatproto.realm import RealmService
from tests.conftest import until
from tests.test_irc import (  # noqa: F401
    PW,
    Conn,
    clock_fixture,
    factory_fixture,
    login,
    realm_fixture,
    sasl_plain,
)
from tests.test_irc_loopback import PW as TCP_PW
from tests.test_irc_loopback import gateway, irc_client  # noqa: F401


def connect(factory: IRCFactory, password: str | None = None, sasl: str | None = None) -> Conn:
    """alice, logged in with ``PASS password`` or with SASL PLAIN ``sasl`` (the
    authcid; or ``authzid\\0authcid``)."""
    c = Conn(factory)
    if sasl is not None:
        authz, _, authc = sasl.rpartition("\0")
        c.send("CAP LS 302", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
        c.send("AUTHENTICATE " + sasl_plain(authc, PW, authz), "CAP END")
    else:
        c.send(f"PASS :{password if password is not None else PW}")
    c.send("NICK alice", "USER u 0 * :A")
    return c


@pytest.mark.parametrize(
    ("password", "sasl", "device"),
    [
        (PW, None, "irc"),
        (f"alice:{PW}", None, "irc"),
        (f"alice/laptop:{PW}", None, "irc/laptop"),
        (f"ALICE/My Laptop:{PW}", None, "irc/My Laptop"),  # the name as written
        (None, "alice", "irc"),
        (None, "alice/phone", "irc/phone"),
        (None, "alice\0alice/phone", "irc/phone"),  # authzid: the account
        (None, "alice/phone\0alice/phone", "irc/phone"),  # or the authcid
        (None, "alice@localhost/phone", "irc/phone"),
        (None, "alice/" + "d" * 60, "irc/" + "d" * 60),  # the longest: 64 in all
    ],
)
def test_the_login_names_the_device(
    factory: IRCFactory, password: str | None, sasl: str | None, device: str
) -> None:
    c = connect(factory, password, sasl)
    assert "001" in c.numerics()
    assert c.proto.session is not None and c.proto.session.device == device
    assert c.proto.nick == "alice"


@pytest.mark.parametrize(
    "name", ["", "d" * 61, "ring\x07", "rtl\u202e"], ids=["empty", "long", "bell", "bidi"]
)
def test_a_bad_device_name_is_refused_without_a_login(
    factory: IRCFactory, realm: RealmService, name: str
) -> None:
    c = connect(factory, sasl=f"alice/{name}")
    fails = [p[-1] for n, p in c.commands() if n == "904"]
    assert len(fails) == 1 and "device" in fails[0], fails
    assert c.proto.session is None
    if "\x07" not in name:  # (a BEL cannot be in a line: PASS is for the others)
        c = connect(factory, f"alice/{name}:{PW}")
        command, params = c.commands()[-1]
        assert command == "ERROR" and "device" in params[0], params
        assert c.transport.disconnecting and c.proto.session is None
    assert realm.stats.login_failures == 0  # not a failed login (no throttle)


def test_a_foreign_authzid_is_refused(factory: IRCFactory) -> None:
    c = connect(factory, sasl="bob\0alice/phone")
    fails = [p[-1] for n, p in c.commands() if n == "904"]
    assert fails == ["SASL authentication failed: authzid must be empty or the account"]
    assert c.proto.session is None


def test_a_password_with_slash_before_its_colon_names_a_device(factory: IRCFactory) -> None:
    """``PASS a/b:c`` with a valid account ``a`` is that account's device ``b``; the
    password of the nick's account is written ``PASS nick:a/b:c`` (as for any
    password with a ``:``)."""
    realm = factory.realm
    realm.create_user("dave", "pass/word:x")
    c = Conn(factory)
    c.send("PASS dave:pass/word:x", "NICK dave", "USER u 0 * :D")
    assert c.proto.session is not None and c.proto.session.device == "irc"


def _texts(c: Conn) -> list[str]:
    return [p[-1] for n, p in c.commands() if n == "PRIVMSG"]


def _quit(c: Conn) -> None:
    c.send("QUIT")
    assert c.transport.disconnecting
    c.proto.connectionLost(None)


def test_two_clients_of_one_account_resume_each_where_it_was(
    factory: IRCFactory, realm: RealmService, clock: Clock
) -> None:
    laptop = connect(factory, f"alice/laptop:{PW}")
    phone = connect(factory, sasl="alice/phone")
    bob = login(factory, "bob")
    laptop.lines(), phone.lines()
    bob.send("PRIVMSG alice :m1", "PRIVMSG alice :m2")
    assert _texts(phone) == ["m1", "m2"]
    clock.advance(1.0)  # (the gateway acknowledges a second after writing)
    _quit(phone)
    bob.send("PRIVMSG alice :m3", "PRIVMSG alice :m4")
    assert _texts(laptop) == ["m1", "m2", "m3", "m4"]
    clock.advance(1.0)
    _quit(laptop)
    bob.send("PRIVMSG alice :m5")
    acks = {d: p for (u, d), p in realm.store.acks.items() if u == "alice@localhost"}
    assert sorted(acks) == ["irc/laptop", "irc/phone"]
    assert acks["irc/laptop"] > acks["irc/phone"]
    assert _texts(connect(factory, sasl="alice/phone")) == ["m3", "m4", "m5"]
    assert _texts(connect(factory, f"alice/laptop:{PW}")) == ["m5"]
    # a client naming no device: the shared "irc", new here, so it starts after the
    # highest ack of the account's devices (PROTOCOL.md, "Acks and resume")
    assert _texts(connect(factory)) == ["m5"]


def test_a_client_naming_no_device_resumes_the_shared_irc_device(
    factory: IRCFactory, realm: RealmService
) -> None:
    """What every IRC client was before devices: it goes on where it was."""
    old = connect(factory)
    bob = login(factory, "bob")
    old.lines()
    bob.send("PRIVMSG alice :seen")
    _quit(old)  # acknowledges "seen" for the device irc
    bob.send("PRIVMSG alice :missed")
    assert _texts(connect(factory)) == ["missed"]


# over loopback TCP --------------------------------------------------------------------


def _got(client: Any) -> list[str]:
    return [e[3] for e in client.events if e[0] == "privmsg"]


@pytest_twisted.inlineCallbacks
def test_two_irc_clients_of_one_account_each_get_what_they_missed_over_tcp(
    gateway: Any,  # noqa: F811
) -> Any:
    """irssi on a laptop and weechat on a phone, one account: each acknowledges a
    different amount (at QUIT), and each gets, on reconnecting, exactly what it had
    not been sent.  (With one shared device, the phone lost m3 and m4.)"""
    _realm, port, _ = gateway
    laptop = yield irc_client(port, "alice", f"alice/laptop:{TCP_PW}")
    phone = yield irc_client(port, "alice", f"alice/phone:{TCP_PW}")
    bob = yield irc_client(port, "bob")
    for c in (laptop, phone, bob):
        yield c.signed_on
    bob.msg("alice", "m1")
    bob.msg("alice", "m2")
    yield until(lambda: _got(phone) == ["m1", "m2"] and _got(laptop) == ["m1", "m2"])
    phone.quit("bye")  # acknowledges m1, m2 for irc/phone
    yield until(lambda: phone.lost.called)  # (the server closes it: bounded)
    bob.msg("alice", "m3")
    bob.msg("alice", "m4")
    yield until(lambda: _got(laptop) == ["m1", "m2", "m3", "m4"])
    laptop.quit("bye")  # m1..m4 for irc/laptop
    yield until(lambda: laptop.lost.called)
    bob.msg("alice", "m5")
    phone = yield irc_client(port, "alice", f"alice/phone:{TCP_PW}")
    yield until(lambda: _got(phone)[-1:] == ["m5"])
    assert _got(phone) == ["m3", "m4", "m5"]
    laptop = yield irc_client(port, "alice", f"alice/laptop:{TCP_PW}")
    yield until(lambda: _got(laptop)[-1:] == ["m5"])
    assert _got(laptop) == ["m5"]
    for c in (laptop, phone, bob):
        c.quit("done")
        yield until(lambda c=c: c.lost.called)
