"""IRC operators are realm admins (issue 18): OPER, KILL, WALLOPS and the operator's
fields of WHO and WHOIS, over StringTransport and over loopback TCP."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock

from chatproto import client
from chatproto.irc import IRCFactory
from chatproto.testing import connect_string_transport, frame, frames
from tests.conftest import until
from tests.test_irc import PW, login, make_realm
from tests.test_irc_loopback import PW as LOOPBACK_PW
from tests.test_irc_loopback import gateway, irc_client  # noqa: F401


def _setup(**irc_opts: Any) -> tuple[Any, Clock, IRCFactory]:
    clock = Clock()
    realm = make_realm(clock, **irc_opts)
    realm.moderation.grant("alice")
    return realm, clock, IRCFactory(realm, clock)


def test_oper_needs_the_own_password_and_the_realm_admin_role() -> None:
    _realm, _clock, factory = _setup()
    alice, bob = login(factory, "alice"), login(factory, "bob")
    bob.send(f"OPER bob {PW}")
    assert bob.commands()[-1] == ("491", ["bob", "No O-lines for your host"])
    alice.send("OPER alice wrong-password")
    assert alice.numerics() == ["464"]
    alice.send(f"OPER bob {PW}")  # another account: not a way in
    assert alice.numerics() == ["464"]
    alice.send("OPER alice")
    assert alice.numerics() == ["461"]
    alice.send(f"OPER alice {PW}", bytewise=True)
    assert alice.commands() == [
        ("381", ["alice", "You are now an IRC operator"]),
        ("MODE", ["alice", "+o"]),
    ]
    assert alice.proto.oper and not bob.proto.oper


def test_irc_opers_limits_which_admins_may_oper() -> None:
    realm, _clock, factory = _setup(opers=["carol"])
    alice = login(factory, "alice")
    alice.send(f"OPER alice {PW}")
    assert alice.numerics() == ["491"]
    realm.moderation.grant("carol")
    carol = login(factory, "carol")
    carol.send(f"OPER carol {PW}")
    assert carol.numerics() == ["381", "MODE"]


def test_kill_ends_every_session_of_the_user_and_needs_oper() -> None:
    realm, clock, factory = _setup()
    alice, bob, carol = login(factory, "alice"), login(factory, "bob"), login(factory, "carol")
    native, native_transport = connect_string_transport(realm)  # bob's other session
    native.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    native.dataReceived(frame({"type": "login", "id": 2, "user": "bob", "password": PW}))
    clock.advance(0)
    frames(native_transport)
    bob.lines()
    carol.send("KILL bob :spam")
    assert carol.commands() == [("481", ["carol", "Permission Denied- You're not an IRC operator"])]
    alice.send("KILL bob :spam")
    assert alice.numerics() == ["481"]  # admin, but not OPERed on this connection
    alice.send(f"OPER alice {PW}")
    alice.lines()
    alice.send("KILL nobody :x")
    assert alice.numerics() == ["401"]
    alice.send("KILL bob :spam")
    assert alice.commands() == [("NOTICE", ["alice", "Killed bob: 2 sessions ended"])]
    err = frames(native_transport)[-1]
    assert (err["code"], err["message"]) == ("session_ended", "killed by alice@localhost: spam")
    assert native_transport.disconnecting
    out = bob.lines()
    assert out[-1].startswith("ERROR :") and "killed by alice@localhost: spam" in out[-1]
    assert bob.transport.disconnecting
    assert realm.sessions_of("bob@localhost") == ()
    # the role revoked: the next KILL is refused, and the connection is no oper any more
    realm.moderation.revoke("alice")
    alice.send("KILL carol")
    assert alice.numerics() == ["481"] and not alice.proto.oper
    assert not carol.transport.disconnecting


def test_wallops_reaches_the_operators_only() -> None:
    realm, _clock, factory = _setup()
    realm.moderation.grant("carol")
    alice, bob, carol = login(factory, "alice"), login(factory, "bob"), login(factory, "carol")
    bob.send("WALLOPS :hello")
    assert bob.numerics() == ["481"]
    for c, name in ((alice, "alice"), (carol, "carol")):
        c.send(f"OPER {name} {PW}")
        c.lines()
    alice.send("WALLOPS :maintenance at noon")
    for c in (alice, carol):
        [line] = c.lines()
        assert line.startswith(":alice!") and line.endswith(" WALLOPS :maintenance at noon")
    assert bob.lines() == []


def test_who_and_whois_show_admins_to_all_and_addresses_to_operators() -> None:
    _realm, _clock, factory = _setup()
    alice, bob = login(factory, "alice"), login(factory, "bob")
    bob.send("WHOIS alice", "WHO alice")
    cmds = bob.commands()
    assert ("313", ["bob", "alice", "is a realm administrator (IRC operator)"]) in cmds
    assert "338" not in [c for c, _ in cmds]
    who = next(p for c, p in cmds if c == "352")
    assert who[6].startswith("H*")  # the flags: here, realm admin
    host_for_all = who[3]
    alice.send(f"OPER alice {PW}")
    alice.lines()
    alice.send("WHOIS bob", "WHO bob")
    cmds = alice.commands()
    [whois_host] = [p for c, p in cmds if c == "338"]
    assert whois_host[:3] == ["alice", "bob", "127.0.0.1"]
    assert whois_host[3].startswith("actually using host (irc, ")
    assert "313" not in [c for c, _ in cmds]  # bob is no admin
    who = next(p for c, p in cmds if c == "352")
    assert who[3] == "127.0.0.1" and host_for_all != "" and who[6].startswith("H")


@pytest_twisted.inlineCallbacks
def test_oper_and_kill_over_loopback_end_a_native_session(gateway: Any) -> Any:  # noqa: F811
    realm, port, native_addr = gateway
    yield realm.moderation.grant("alice")
    bob_native = yield client.connect(_reactor, native_addr, "bob", LOOPBACK_PW)
    alice = yield irc_client(port, "alice")
    yield alice.signed_on
    alice.sendLine(f"OPER alice {LOOPBACK_PW}")
    yield until(lambda: any(" 381 " in line for line in alice.raw))
    alice.sendLine("KILL bob :enough")
    yield until(lambda: bob_native.protocol.lost)
    yield until(lambda: any("Killed bob" in line for line in alice.raw))
    assert realm.sessions_of("bob@localhost") == ()
    alice.transport.loseConnection()
    yield alice.lost
