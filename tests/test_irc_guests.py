"""Opt-in IRC guests (issue 19): a client without credentials gets a temporary account
under a reserved name, shown as the nick it chose, deleted when it leaves, with limits
of its own (chatproto.realm.guests).  StringTransport with a MemoryStore realm, then
over loopback TCP with a SQLite realm."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.internet.task import Clock

from chatproto.address import GUEST_PREFIX, reserved_name
from chatproto.config import Config
from chatproto.errors import ChatError
from chatproto.irc import IRCFactory
from chatproto.realm import RealmService
from chatproto.realm.guests import GUEST_HASH
from chatproto.store.memory import MemoryStore
from chatproto.testing import InlineHasher
from tests.conftest import until
from tests.test_irc import PW, Conn, clock_fixture, factory_fixture, login  # noqa: F401
from tests.test_irc import make_realm as make_memory_realm
from tests.test_irc_conformance_loopback import Raw, connect
from tests.test_irc_loopback import irc_gateway

GUEST_OPTS = {"guests": True, "guests_per_address": 3, "guests_max": 4}


@pytest.fixture
def realm(clock: Clock) -> RealmService:
    return make_memory_realm(clock, **GUEST_OPTS)


def guest(factory: IRCFactory, nick: str, host: str = "127.0.0.1") -> Conn:
    c = Conn(factory, host)
    c.send(f"NICK {nick}", "USER u 0 * :Guest Person")
    lines = c.lines()
    assert any(f" 001 {nick} " in line for line in lines), lines
    return c


def guest_name(realm: RealmService, nick: str) -> str:
    user = realm.guests.user_of(nick)
    assert user is not None
    return user.partition("@")[0]


def test_guests_are_off_by_default(clock: Clock) -> None:
    realm = make_memory_realm(clock)
    assert Config().irc.guests is False
    c = Conn(IRCFactory(realm, clock))
    c.send("NICK foo", "USER u 0 * :F")
    assert c.numerics()[0] == "464"
    assert c.transport.disconnecting
    assert not realm.guests.accounts


def test_a_guest_gets_a_temporary_account_shown_as_its_nick(factory: IRCFactory) -> None:
    realm = factory.realm
    foo = guest(factory, "Foo")
    name = guest_name(realm, "foo")
    assert reserved_name(name) and name.startswith(GUEST_PREFIX)
    assert realm.accounts.is_user(f"{name}@localhost")
    # Other IRC users see the nick, message it, and WHOIS says it has no account.
    alice = login(factory, "alice")
    alice.send("WHOIS foo")
    cmds = alice.commands()
    assert ("311", ["alice", "Foo", "u", "localhost", "*", "Guest Person"]) in cmds
    assert "330" not in [c for c, _ in cmds]
    alice.send("PRIVMSG foo :hello guest")
    alice.lines()
    assert foo.lines() == [":alice!u@localhost PRIVMSG Foo :hello guest"]
    foo.send("PRIVMSG alice :hi", "JOIN #g")
    lines = alice.lines()
    assert lines[0] == ":Foo!u@localhost PRIVMSG alice :hi"


def test_a_guest_cannot_take_an_accounts_or_another_guests_nick(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("NICK alice", "USER u 0 * :x")  # alice is an account
    assert c.commands() == [("433", ["*", "alice", "Nickname is already in use"])]
    c.send("NICK ALICE2")
    assert " 001 ALICE2 " in " ".join(c.lines())
    d = Conn(factory)
    d.send("USER u 0 * :y", "NICK alice2")  # any case
    assert d.numerics() == ["433"]
    d.send("NICK bad!nick")
    assert d.numerics() == ["432"]
    # An account cannot be registered under a nick a guest is using, nor a guest name.
    realm = factory.realm
    for name, code in (("alice2", "user_exists"), ("guest-0123456789", "bad_address")):
        f = realm.register(name, "password-long")
        assert isinstance(f.result.value, ChatError), name
        assert f.result.value.code == code
        f.addErrback(lambda _: None)


def test_a_guest_leaving_deletes_its_account_and_frees_its_nick(
    factory: IRCFactory, clock: Clock
) -> None:
    realm = factory.realm
    foo = guest(factory, "foo")
    name = guest_name(realm, "foo")
    foo.send("JOIN #g")  # it owns a channel, with a member
    alice = login(factory, "alice")
    alice.send("JOIN #g")
    foo.send("QUIT :bye")
    clock.advance(1)
    foo.proto.connectionLost(None)
    assert realm.guests.user_of("foo") is None and not realm.guests.accounts
    assert not realm.accounts.is_user(f"{name}@localhost")
    hashes: list[Any] = []
    realm.store.password_hash(name).addCallback(hashes.append)
    assert hashes == [None]
    assert f"{name}@localhost" not in realm.groups.groups["#g@localhost"].members
    again = guest(factory, "foo")  # the nick is free; another account
    assert guest_name(realm, "foo") != name
    again.transport.loseConnection()


def test_guest_limits(factory: IRCFactory) -> None:
    realm = factory.realm
    conns = [guest(factory, f"g{i}") for i in range(3)]
    c = Conn(factory)  # a fourth from the same address
    c.send("NICK g3", "USER u 0 * :x")
    assert c.commands()[-1][0] == "ERROR" and c.transport.disconnecting
    guest(factory, "g4", host="10.0.0.2")  # the fourth overall
    c = Conn(factory, host="10.0.0.3")  # past guests_max
    c.send("NICK g5", "USER u 0 * :x")
    assert c.commands()[-1][0] == "ERROR"
    assert len(realm.guests.accounts) == 4
    del conns


def test_a_guest_has_its_own_send_rate(clock: Clock) -> None:
    realm = make_memory_realm(clock, guests=True, guest_send_rate=1.0, guest_send_burst=2)
    factory = IRCFactory(realm, clock)
    login(factory, "alice")
    foo = guest(factory, "foo")
    foo.send("PRIVMSG alice :1", "PRIVMSG alice :2", "PRIVMSG alice :3")
    assert foo.numerics() == ["263"]


def test_a_guest_may_change_nick_to_a_free_one(factory: IRCFactory) -> None:
    realm = factory.realm
    foo = guest(factory, "foo")
    alice = login(factory, "alice")
    alice.send("JOIN #g")
    foo.send("JOIN #g")
    alice.lines(), foo.lines()
    foo.send("NICK bar")
    assert foo.lines() == [":foo!u@localhost NICK bar"]
    assert alice.lines() == [":foo!u@localhost NICK bar"]
    assert realm.guests.user_of("foo") is None and realm.guests.user_of("bar") is not None
    foo.send("NICK alice")  # an account's
    assert foo.numerics() == ["433"]


def test_left_over_guest_accounts_are_deleted_at_start(clock: Clock) -> None:
    cfg = Config()
    cfg.irc.guests = True
    store = MemoryStore()
    store.create_user("guest-00aa11bb22", GUEST_HASH, 0.0)
    store.create_user("guest-real", "hash:correct-horse", 0.0)  # an old real account
    realm = RealmService(cfg, store, clock, clock=clock, hasher=InlineHasher())
    realm.startService()
    assert "guest-00aa11bb22" not in realm.accounts.known
    assert "guest-real" in realm.accounts.known
    realm.stopService()


def test_a_guest_password_never_logs_in(factory: IRCFactory) -> None:
    realm = factory.realm
    guest(factory, "foo")
    name = guest_name(realm, "foo")
    for password in (GUEST_HASH, "", "!guest"):
        c = Conn(factory, "10.1.1.1")
        c.send(f"PASS {name}:{password}", "NICK x", "USER u 0 * :x")
        assert "464" in c.numerics()


# over loopback TCP ---------------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    """(realm, IRC port) of a realm with guests on and the user alice."""
    for realm, port, _native in irc_gateway(tmp_path, ("alice",), PW, guests=True):
        yield realm, port


@pytest_twisted.inlineCallbacks
def test_guests_over_tcp(gateway: Any) -> None:
    realm, port = gateway
    alice = yield connect(port, "alice", password=PW)
    foo: Raw = yield connect(port, "foo", password=None)
    name = guest_name(realm, "foo")
    foo.send("PRIVMSG alice :from a guest")
    yield until(lambda: alice.has("PRIVMSG", "alice", "from a guest"))
    assert alice.got[-1].startswith(":foo!u@")
    alice.send("PRIVMSG foo :back")
    yield until(lambda: foo.has("PRIVMSG", "foo", "back"))
    foo.send("QUIT :bye")
    yield foo.lost
    yield until(lambda: not realm.accounts.is_user(f"{name}@localhost"))
    for _ in range(500):  # the store deletes it a moment later
        stored = yield realm.store.password_hash(name)
        if stored is None:
            break
        yield task.deferLater(_reactor, 0.01, lambda: None)
    assert stored is None


def test_replies_and_events_name_a_guest_by_its_nick(factory: IRCFactory) -> None:
    """INVITE (341, 443), KICK and bans show the guest's nick, not its account name."""
    alice = login(factory, "alice")
    bar = guest(factory, "bar")
    alice.send("JOIN #chan", "INVITE bar #chan")
    assert ("341", ["alice", "bar", "#chan"]) in alice.commands()
    assert bar.commands() == [("INVITE", ["bar", "#chan"])]
    bar.send("JOIN #chan")
    bar.lines()
    alice.lines()
    alice.send("INVITE bar #chan")
    assert alice.commands()[0][1][:3] == ["alice", "bar", "#chan"]
    alice.send("KICK #chan bar :bye")
    assert alice.commands() == [("KICK", ["#chan", "bar", "bye"])]
    assert bar.commands() == [("KICK", ["#chan", "bar", "bye"])]
    alice.send("MODE #chan +b bar")
    assert alice.commands()[0] == ("MODE", ["#chan", "+b", "bar!*@*"])


def test_guests_are_refused_for_a_cluster_worker(tmp_path: Any) -> None:
    """Guests are kept per process (nicks, left-over clean-up at start): a worker of
    a cluster refuses the setting."""
    from twisted.python import usage

    from chatproto import tap

    conf = tmp_path / "pg.toml"
    conf.write_text(
        '[storage]\nbackend = "postgresql"\ndsn = "host=127.0.0.1 dbname=x"\n[irc]\nguests = true\n'
    )
    tap.Options().parseOptions(["--config", str(conf)])  # one process: fine
    with pytest.raises(usage.UsageError, match="irc.guests is for a single-process realm"):  # noqa: RUF043
        tap.Options().parseOptions(["--config", str(conf), "--worker", "w1"])
