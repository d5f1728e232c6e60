"""The IRC gateway's protocol logic over StringTransport: registration, CAP/SASL, every
command and its numerics, the IRCv3 capabilities, flood limits and bad input.

Everything runs on a MemoryStore realm with a task.Clock (chatproto.testing)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from chatproto import irc
from chatproto.config import Config
from chatproto.irc import IRCFactory, IRCProtocol
from chatproto.irc.lines import format_line
from chatproto.realm import RealmService
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests.conftest import FlowTransport

PW = "correct-horse"


class Conn:
    """One IRC client connection on a StringTransport (with Twisted's flow control:
    :class:`tests.conftest.FlowTransport`)."""

    def __init__(self, factory: IRCFactory, host: str = "127.0.0.1") -> None:
        self.proto: IRCProtocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))  # type: ignore[assignment]
        self.transport = FlowTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.proto.makeConnection(self.transport)

    def send(self, *lines: str, bytewise: bool = False) -> None:
        data = "".join(line + "\r\n" for line in lines).encode()
        if bytewise:
            for i in range(len(data)):
                self.proto.dataReceived(data[i : i + 1])
        else:
            self.proto.dataReceived(data)

    def lines(self) -> list[str]:
        data = self.transport.read().decode()
        assert data == "" or data.endswith("\r\n"), data
        return data.split("\r\n")[:-1]

    def commands(self) -> list[tuple[str, list[str]]]:
        """(command, params) of every line written, tags and source dropped."""
        out = []
        for line in self.lines():
            _tags, command, params = irc.parse_line(line)
            out.append((command, params))
        return out

    def numerics(self) -> list[str]:
        return [c for c, _ in self.commands()]


def parsed(c: Conn) -> list[tuple[dict[str, str], str, list[str]]]:
    """(tags, command, params) of every line written to ``c``."""
    return [irc.parse_line(line) for line in c.lines()]


def make_realm(clock: Clock, **irc_opts: Any) -> RealmService:
    cfg = Config()
    cfg.irc.enabled = True
    cfg.irc.motd = "hello\nsecond line"
    cfg.irc.flood_rate = 0.0
    cfg.limits.send_rate = 1000.0
    cfg.limits.send_burst = 1000
    for k, v in irc_opts.items():
        setattr(cfg.irc, k, v)
    cfg.check()
    realm = make_test_realm(clock, cfg)
    for name in ("alice", "bob", "carol"):
        realm.create_user(name, PW)
    return realm


# The StringTransport fixtures of the IRC tests (other modules import these functions;
# the fixtures' names are clock, realm and factory).
@pytest.fixture(name="clock")
def clock_fixture() -> Clock:
    return Clock()


@pytest.fixture(name="realm")
def realm_fixture(clock: Clock) -> RealmService:
    return make_realm(clock)


@pytest.fixture(name="factory")
def factory_fixture(realm: RealmService, clock: Clock) -> IRCFactory:
    return IRCFactory(realm, clock)


def login(factory: IRCFactory, nick: str, caps: str = "", bytewise: bool = False) -> Conn:
    c = Conn(factory)
    if caps:
        c.send("CAP LS 302", f"CAP REQ :{caps}")
    c.send(f"PASS {PW}", f"NICK {nick}", "USER u 0 * :Real Name", bytewise=bytewise)
    if caps:
        c.send("CAP END")
    lines = c.lines()
    assert any(f" 001 {nick} " in line for line in lines), lines
    return c


def joined_pair(factory: IRCFactory, channel: str) -> tuple[Conn, Conn]:
    """alice and bob logged in, both in ``channel``, what they were sent read."""
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send(f"JOIN {channel}")
    b.send(f"JOIN {channel}")
    a.lines()
    b.lines()
    return a, b


# registration ------------------------------------------------------------------------


def test_pass_registration_welcome_burst(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send(f"PASS {PW}", "NICK alice", "USER alice 0 * :Alice")
    cmds = c.commands()
    names = [n for n, _ in cmds]
    for code in ("001", "002", "003", "004", "005", "251", "254", "255", "375", "372", "376"):
        assert code in names, (code, names)
    assert names.index("001") < names.index("005") < names.index("375")
    welcome = dict(cmds)["001"]
    assert welcome[0] == "alice"
    isupport = [t for n, p in cmds if n == "005" for t in p[1:-1]]
    assert "CASEMAPPING=ascii" in isupport
    assert "CHANTYPES=#" in isupport
    assert "PREFIX=(ov)@+" in isupport
    assert "NETWORK=localhost" in isupport
    assert all(len(p) <= 15 for n, p in cmds if n == "005")  # nick + 13 tokens + text
    motd = [p[-1] for n, p in cmds if n == "372"]
    assert motd == ["- hello", "- second line"]
    assert c.proto.state == "ready"
    assert c.proto.session is not None and c.proto.session.device == irc.DEVICE


def test_registration_bytewise_and_case_folded_nick(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send(f"PASS {PW}", "NICK Alice", "USER a 0 * :A", bytewise=True)
    cmds = c.commands()
    # The account's nick in the client's spelling: no NICK change before 001.
    assert "NICK" not in [n for n, _ in cmds]
    assert dict(cmds)["001"][0] == "Alice"


def test_pass_with_account_prefix(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send(f"PASS bob:{PW}", "NICK whoever", "USER a 0 * :A")
    assert dict(c.commands())["001"][0] == "bob"


def test_wrong_password_464_and_disconnect(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("PASS wrong-password", "NICK alice", "USER a 0 * :A")
    cmds = c.commands()
    assert [n for n, _ in cmds] == ["464", "ERROR"]
    assert c.transport.disconnecting
    assert c.proto.session is None


def test_no_password_is_refused(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("NICK alice", "USER a 0 * :A")
    assert [n for n, _ in c.commands()] == ["464", "ERROR"]
    assert c.transport.disconnecting


def test_failed_logins_share_the_realm_throttle(factory: IRCFactory, realm: RealmService) -> None:
    """IRC failures count toward the same per-account slowdown as the native protocol."""
    for _ in range(realm.config.auth.free_failures_per_account + 1):
        c = Conn(factory)
        c.send("PASS nope-nope", "NICK alice", "USER a 0 * :A")
        assert c.numerics()[0] == "464"
    # The native protocol now sees the account throttled ...
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    proto.dataReceived(frame({"type": "login", "id": 2, "user": "alice", "password": PW}))
    out = frames(transport)
    assert out[-1]["code"] == "rate_limited"
    # ... and so does IRC, even with the right password.
    c = Conn(factory)
    c.send(f"PASS {PW}", "NICK alice", "USER a 0 * :A")
    lines = c.lines()
    assert " 464 " in lines[0] and "retry after" in lines[0]


def test_commands_before_registration_451(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("JOIN #x", "PRIVMSG bob :hi", "FOO")
    assert c.numerics() == ["451", "451", "451"]
    c.send("PING :abc")
    assert c.commands() == [("PONG", ["localhost", "abc"])]


def test_user_needs_params_and_rereg_462(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("USER a b")
    assert c.numerics() == ["461"]
    c = login(factory, "alice")
    c.send("USER a 0 * :x", "PASS again")
    assert c.numerics() == ["462", "462"]


def test_nick_change_to_other_account_refused(factory: IRCFactory) -> None:
    c = login(factory, "alice")
    c.send("NICK bob", "NICK ALICE", "NICK bad!nick")
    # Another case of one's own account is acknowledged with NICK (issue 19).
    assert c.commands() == [
        ("433", ["alice", "bob", "Your nick is your account name; it cannot change"]),
        ("NICK", ["ALICE"]),
        ("432", ["ALICE", "bad!nick", "Erroneous nickname"]),
    ]


# CAP and SASL ----------------------------------------------------------------------------


def sasl_plain(user: str, password: str, authz: str = "") -> str:
    return base64.b64encode(f"{authz}\0{user}\0{password}".encode()).decode()


def test_cap_ls_302_and_sasl_plain(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("CAP LS 302", "NICK guest", "USER u 0 * :R")
    ls = c.commands()
    assert ls[0][0] == "CAP" and ls[0][1][1] == "LS"
    offered = ls[0][1][2].split()
    assert "sasl=PLAIN" in offered and "server-time" in offered
    assert len(ls) == 1  # registration waits for CAP END
    c.send("CAP REQ :sasl server-time")
    assert c.commands() == [("CAP", ["guest", "ACK", "sasl server-time"])]
    c.send("AUTHENTICATE PLAIN")
    assert c.lines() == ["AUTHENTICATE +"]
    c.send("AUTHENTICATE " + sasl_plain("carol", PW))
    assert c.numerics() == ["900", "903"]
    c.send("CAP END")
    cmds = c.commands()
    assert cmds[0] == ("NICK", ["carol"])
    assert dict(cmds)["001"][0] == "carol"
    c.send("CAP LIST")
    assert c.commands() == [("CAP", ["carol", "LIST", "sasl server-time"])]


def test_sasl_before_nick_and_user_like_irssi(factory: IRCFactory) -> None:
    """irssi authenticates and ends CAP before it sends NICK and USER."""
    c = Conn(factory)
    c.send("CAP LS 302", "JOIN :", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
    c.send("AUTHENTICATE " + sasl_plain("alice", PW), "CAP END", "NICK Someone", "USER a a h :A")
    cmds = c.commands()
    assert [n for n, _ in cmds][:6] == ["CAP", "451", "CAP", "AUTHENTICATE", "900", "903"]
    assert ("NICK", ["alice"]) in cmds and dict(cmds)["001"][0] == "alice"


def test_cap_req_unknown_is_nak(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("CAP LS", "CAP REQ :server-time no-such-cap", "CAP FOO")
    cmds = c.commands()
    assert cmds[1] == ("CAP", ["*", "NAK", "server-time no-such-cap"])
    assert cmds[2][0] == "410"
    assert "sasl" in cmds[0][1][2].split()  # no mechanism list before 302


def test_sasl_failure_then_cap_end_disconnects(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("CAP LS 302", "CAP REQ sasl", "NICK alice", "USER u 0 * :R")
    c.lines()
    c.send("AUTHENTICATE PLAIN", "AUTHENTICATE " + sasl_plain("alice", "wrong-pass"))
    assert c.numerics() == ["AUTHENTICATE", "904"]
    c.send("CAP END")
    assert c.numerics() == ["464", "ERROR"]
    assert c.transport.disconnecting


def test_sasl_edge_cases(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("CAP LS 302", "CAP REQ sasl")
    c.lines()
    c.send("AUTHENTICATE SCRAM-SHA-256")
    assert c.numerics() == ["908", "904"]
    c.send("AUTHENTICATE PLAIN", "AUTHENTICATE *")
    assert c.numerics() == ["AUTHENTICATE", "906"]
    c.send("AUTHENTICATE PLAIN", "AUTHENTICATE !!notbase64!!")
    assert c.numerics() == ["AUTHENTICATE", "904"]
    c.send("AUTHENTICATE PLAIN", "AUTHENTICATE " + sasl_plain("alice", PW, authz="bob"))
    assert c.numerics() == ["AUTHENTICATE", "904"]
    c.send("AUTHENTICATE PLAIN", "AUTHENTICATE " + "A" * 401)
    assert c.numerics() == ["AUTHENTICATE", "905"]
    # A PLAIN message of exactly 400 bytes is followed by "+".
    pw = "p" * (300 - len("alice") - 2)
    factory.realm.create_user("dave", pw)
    blob = sasl_plain("dave", pw)
    assert len(blob) == 400
    c.send("AUTHENTICATE PLAIN", "AUTHENTICATE " + blob)
    assert c.numerics() == ["AUTHENTICATE"]
    c.send("AUTHENTICATE +")
    assert c.numerics() == ["900", "903"]
    c.send("AUTHENTICATE PLAIN")
    assert c.numerics() == ["907"]


# messages ----------------------------------------------------------------------------------


def test_dm_between_irc_users_and_split_of_long_bodies(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("PRIVMSG bob :hello bob")
    assert b.lines() == [":alice!u@localhost PRIVMSG bob :hello bob"]
    assert a.lines() == []  # no echo-message: nothing back
    a.send("NOTICE BOB :a notice")
    assert b.commands() == [("NOTICE", ["bob", "a notice"])]
    # A native user's long multi-line body becomes several IRC lines of <= 512 bytes.
    factory.realm.post("carol", "bob", "first\n" + "é" * 600)
    lines = b.lines()
    assert lines[0] == ":carol!carol@localhost PRIVMSG bob :first"
    assert len(lines) == 4
    assert all(len(line.encode()) + 2 <= 512 for line in lines)
    assert "".join(line.split(" :", 1)[1] for line in lines[1:]) == "é" * 600


def test_privmsg_errors(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    a.send(
        "PRIVMSG nobody :x", "PRIVMSG #nochan :x", "PRIVMSG bob", "PRIVMSG", "PRIVMSG a,b,c,d,e :x"
    )
    assert a.numerics() == ["401", "403", "412", "411", "407"]  # 411: not 461 (RFC 2812)
    a.send("PRIVMSG :", "NOTICE", "NOTICE :", "NICK", "NICK :")
    assert a.commands() == [
        ("411", ["alice", "No recipient given (PRIVMSG)"]),  # (a NOTICE: no reply)
        ("431", ["alice", "No nickname given"]),
        ("431", ["alice", "No nickname given"]),
    ]
    c = Conn(factory)  # before registration too
    c.send("NICK", "NICK :")
    assert c.numerics() == ["431", "431"]
    a.send("PRIVMSG bob/other.example :x")
    assert a.numerics() == ["401"]
    a.send("NOTICE nobody :x")  # NOTICE never gets automatic replies
    assert a.lines() == []


def test_rate_limit_263(clock: Clock) -> None:
    realm = make_realm(clock)
    realm.config.limits.send_burst = 2
    f = IRCFactory(realm, clock)
    a = login(f, "alice")
    a.send("PRIVMSG bob :1", "PRIVMSG bob :2", "PRIVMSG bob :3")
    assert a.numerics() == ["263"]


def test_echo_message_server_time_message_tags(factory: IRCFactory, clock: Clock) -> None:
    clock.advance(1_700_000_000.25)
    a = login(factory, "alice", caps="echo-message server-time message-tags")
    b = login(factory, "bob")
    a.send("PRIVMSG bob :tagged")
    (line,) = a.lines()
    assert line.startswith("@time=2023-11-14T22:13:20.250Z;msgid=")
    assert line.endswith(" :alice!u@localhost PRIVMSG bob :tagged")
    assert b.lines() == [":alice!u@localhost PRIVMSG bob :tagged"]


def test_labeled_response(factory: IRCFactory) -> None:
    a = login(factory, "alice", caps="echo-message labeled-response batch")
    login(factory, "bob")
    a.send("@label=one PRIVMSG bob :hi")
    assert a.lines() == ["@label=one :alice!u@localhost PRIVMSG bob :hi"]
    a.send("@label=two PONG x")
    assert a.lines() == ["@label=two :localhost ACK"]
    a.send("@label=three LUSERS")
    lines = a.lines()
    assert lines[0].startswith("@label=three :localhost BATCH +")
    ref = lines[0].split("+")[1].split()[0]
    assert all(line.startswith(f"@batch={ref} ") for line in lines[1:-1])
    assert lines[-1] == f":localhost BATCH -{ref}"
    a.send("@label=four JOIN #lab")
    lines = a.lines()
    assert "labeled-response" in lines[0]
    assert any("JOIN #lab" in line for line in lines)


# groups ------------------------------------------------------------------------------------


def test_join_creates_then_others_join_and_talk(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("JOIN #dev")
    cmds = a.commands()
    assert cmds[0] == ("JOIN", ["#dev"])
    assert ("353", ["alice", "=", "#dev", "@alice"]) in cmds
    assert cmds[-1] == ("366", ["alice", "#dev", "End of /NAMES list"])
    b.send("JOIN #dev")
    assert b.commands()[:1] == [("JOIN", ["#dev"])]
    assert a.lines() == [":bob!u@localhost JOIN #dev"]
    b.send("PRIVMSG #dev :hi all")
    assert a.lines() == [":bob!u@localhost PRIVMSG #dev :hi all"]
    assert b.lines() == []
    a.send("JOIN #dev")  # already in: nothing
    assert a.lines() == []
    b.send("PART #dev")
    assert a.lines() == [":bob!u@localhost PART #dev :left"]
    b.send("PRIVMSG #dev :gone")
    assert b.numerics() == ["PART", "404"]


def test_login_joins_member_channels_and_replays_backlog(factory: IRCFactory, clock: Clock) -> None:
    a = login(factory, "alice")
    a.send("JOIN #dev")
    b = login(factory, "bob")
    b.send("JOIN #dev", "QUIT :bye")
    assert b.transport.disconnecting
    b.proto.connectionLost(None)
    a.send("PRIVMSG #dev :while you were out", "PRIVMSG bob :a dm")
    clock.advance(2)
    b2 = Conn(factory)
    b2.send("CAP LS 302", "CAP REQ :server-time")
    b2.send(f"PASS {PW}", "NICK bob", "USER u 0 * :R", "CAP END")
    lines = b2.lines()
    joins = [line for line in lines if " JOIN " in line]
    assert joins == [":bob!u@localhost JOIN #dev"]
    replay = [line for line in lines if " PRIVMSG " in line]
    assert len(replay) == 2 and all(line.startswith("@time=") for line in replay)
    assert replay[0].endswith("PRIVMSG #dev :while you were out")
    assert replay[1].endswith("PRIVMSG bob :a dm")
    # Not acknowledged while the client is not reading what was written.
    b2.proto.pauseProducing()
    clock.advance(irc.ACK_DELAY * 3)
    assert factory.realm.store.acks.get(("bob@localhost", irc.DEVICE), 0) < b2.proto.session._last
    b2.proto.resumeProducing()
    # Acked after the delay: a third login replays nothing.
    clock.advance(irc.ACK_DELAY + 0.1)
    b2.proto.connectionLost(None)
    b3 = login(factory, "bob")
    assert b3.lines() == []


def test_a_reader_that_stops_is_dropped_once_max_output_buffer_is_held(clock: Clock) -> None:
    """Issue 14, on the IRC gateway: past max_output_buffer bytes that the transport
    could not take, the connection is closed (ERROR :SendQ exceeded), not fed forever."""
    realm = make_realm(clock)
    realm.config.limits.max_output_buffer = 100_000
    factory = IRCFactory(realm, clock)
    b = login(factory, "bob")
    posted = peak = 0
    while b.proto.state != "closed" and posted < 500:
        realm.post("alice", "bob", f"{posted:04d}" + "x" * 3000)  # 8 lines each
        posted += 1
        peak = max(peak, b.transport.unread() + b.proto._out.held)
    assert b.proto.state == "closed" and b.transport.disconnecting
    assert 40 < posted < 60 and peak < 100_000 + b.transport.bufferSize + 4000
    lines = b.lines()
    assert lines[-1] == "ERROR :SendQ exceeded"
    got = [line for line in lines if " PRIVMSG " in line]
    assert got and len(got) < posted * 8  # whole lines, the older ones
    realm.post("alice", "bob", "after")
    assert b.transport.read() == b""
    b.proto.connectionLost(None)
    b2 = Conn(factory)  # the backlog since the last ack: nothing lost
    b2.send(f"PASS {PW}", "NICK bob", "USER u 0 * :R")
    lines = []
    while more := b2.lines():  # reading resumes the (paced) backlog
        lines += more
    replay = [line for line in lines if " PRIVMSG " in line]
    assert replay[-1].endswith(":after")
    assert sum(1 for line in replay if line.endswith("x" * 100)) >= posted - len(got) // 8


def test_topic_names_list_who_whois(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("JOIN #dev", "TOPIC #dev :the topic")
    a.lines()
    b.send("JOIN #dev")
    a.lines()
    cmds = b.commands()
    assert ("332", ["bob", "#dev", "the topic"]) in cmds
    assert ("353", ["bob", "=", "#dev", "@alice bob"]) in cmds
    b.send("TOPIC #dev", "TOPIC #dev :mine now", "NAMES #dev", "LIST")
    cmds = b.commands()
    assert cmds[0] == ("332", ["bob", "#dev", "the topic"])
    assert cmds[1][0] == "333" and cmds[1][1][1:3] == ["#dev", "alice"]  # who set it
    assert cmds[2][0] == "482" and "admin role" in cmds[2][1][2]
    assert cmds[3] == ("353", ["bob", "=", "#dev", "@alice bob"])
    assert cmds[5] == ("321", ["bob", "Channel", "Users  Name"])
    assert cmds[6] == ("322", ["bob", "#dev", "2", "the topic"])
    assert cmds[7][0] == "323"
    b.send("WHO #dev")
    cmds = b.commands()
    assert cmds[0] == (
        "352",
        ["bob", "#dev", "u", "localhost", "localhost", "alice", "H@", "0 Real Name"],
    )
    assert cmds[-1][0] == "315"
    a.send("AWAY :lunch")
    assert a.numerics() == ["306"]
    b.send("WHOIS alice", "WHOIS nobody")
    cmds = b.commands()
    assert [n for n, _ in cmds] == ["311", "319", "312", "301", "330", "318", "401", "318"]
    assert cmds[1][1][-1] == "@#dev"
    assert cmds[3][1][-1] == "lunch"
    a.send("AWAY")
    assert a.numerics() == ["305"]


def test_invite_kick_ban_roles_invite_only(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice", caps="away-notify")
    b = login(factory, "bob")
    c = login(factory, "carol")
    a.lines()
    # An invite-only group (created natively by alice) maps to +i.
    session = realm.sessions.online["alice@localhost"][0]
    session.group_event("created", "#priv", visibility="invite")
    assert a.commands()[0] == ("JOIN", ["#priv"])
    a.send("MODE #priv")
    assert a.commands() == [("324", ["alice", "#priv", "+int"]), ("329", ["alice", "#priv", "0"])]
    b.send("JOIN #priv")
    assert b.numerics() == ["473"]
    a.send("INVITE bob #priv")
    assert a.commands() == [("341", ["alice", "bob", "#priv"])]
    assert b.lines() == [":alice!u@localhost INVITE bob #priv"]
    b.send("JOIN #priv")
    b.lines()
    a.lines()
    # Op roles: +o makes bob admin, who may then kick carol but not alice.
    a.send("MODE #priv +o bob")
    assert b.lines() == [":alice!u@localhost MODE #priv +o bob"]
    a.lines()
    a.send("INVITE carol #priv")
    c.send("JOIN #priv")
    c.lines()
    b.lines()
    a.lines()
    b.send("KICK #priv carol :out", "KICK #priv alice")
    assert c.lines() == [":bob!u@localhost KICK #priv carol :out"]
    assert b.commands() == [
        ("KICK", ["#priv", "carol", "out"]),
        ("482", ["bob", "#priv", "You're not channel operator"]),
    ]
    a.lines()
    b.send("KICK #priv carol")
    assert b.commands() == [("441", ["bob", "carol", "#priv", "They aren't on that channel"])]
    # Bans, and the ban list.
    a.send("MODE #priv +b carol!*@*", "MODE #priv b")
    cmds = a.commands()
    assert ("MODE", ["#priv", "+b", "carol!*@*"]) in cmds
    assert ("367", ["alice", "#priv", "carol!*@*"]) in cmds
    assert cmds[-1][0] == "368"
    a.send("MODE #priv -b carol", "MODE #priv +x", "MODE #priv -i", "MODE alice", "MODE bob +i")
    cmds = a.commands()
    assert ("MODE", ["#priv", "-b", "carol!*@*"]) in cmds
    assert ("MODE", ["#priv", "-i"]) in cmds  # invite-only is a group setting (issue 19)
    assert [n for n, _ in cmds if n.isdigit()] == ["472", "221", "502"]
    b.lines()
    b.send("INVITE alice #priv")
    assert b.numerics() == ["443"]
    # away-notify
    b.send("AWAY :gone")
    assert ":bob!u@localhost AWAY :gone" in a.lines()


def test_outgoing_lines_stay_within_512_bytes(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    a.send("JOIN #t")
    a.lines()
    topic = "ü" * 400  # 800 bytes of UTF-8: the realm allows it, IRC lines cannot hold it
    factory.realm.sessions.online["alice@localhost"][0].group_event("topic", "#t", topic=topic)
    (line,) = a.lines()
    assert len(line.encode()) + 2 <= 512
    assert line.startswith(":alice!u@localhost TOPIC #t :üü")
    a.send("TOPIC #t")
    line, who = a.lines()  # 332, then 333 (who set it)
    assert len(line.encode()) + 2 <= 512 and line.endswith("ü")
    assert " 333 alice #t alice " in who


def test_deleted_and_bad_channels(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    a.send("JOIN nochan", "PART #nope", "TOPIC #nope", "JOIN #bad!name")
    assert a.numerics() == ["403", "403", "403", "403"]


def test_ping_quit_motd_unknown(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    a.send("PING tok", "MOTD", "WHATEVER x", "TAGMSG bob")
    cmds = a.commands()
    assert cmds[0] == ("PONG", ["localhost", "tok"])
    assert [n for n, _ in cmds[1:]] == ["375", "372", "372", "376", "421"]
    a.send("QUIT :bye")
    assert a.commands() == [("ERROR", ["Closing link: alice (Quit: bye)"])]
    assert a.transport.disconnecting


def test_keepalive_and_login_timeout(factory: IRCFactory, clock: Clock) -> None:
    factory.startFactory()
    lim = factory.realm.config.limits
    idle = Conn(factory)
    a = login(factory, "alice")
    clock.advance(lim.login_timeout + 1)
    assert idle.numerics() == ["ERROR"] and idle.transport.disconnecting
    clock.advance(lim.keepalive_interval)
    assert a.commands() == [("PING", ["localhost"])]
    clock.advance(lim.keepalive_interval)
    assert a.numerics() == ["ERROR"] and a.transport.disconnecting
    factory.stopFactory()


def test_flood_limit_delays_then_disconnects(clock: Clock) -> None:
    realm = make_realm(clock, flood_rate=1.0, flood_burst=3)
    f = IRCFactory(realm, clock)
    c = Conn(f)
    c.send("PING 1", "PING 2", "PING 3", "PING 4", "PING 5")
    assert [p[-1] for _, p in c.commands()] == ["1", "2", "3"]
    assert c.transport.producerState == "paused"
    clock.advance(1.0)
    assert [p[-1] for _, p in c.commands()] == ["4"]
    clock.advance(1.0)
    assert [p[-1] for _, p in c.commands()] == ["5"]
    assert c.transport.producerState == "producing"
    c.send(*["PING x"] * (irc.MAX_QUEUED + 10))
    assert c.transport.disconnecting
    assert c.lines()[-1] == "ERROR :Excess Flood"
    c.proto.connectionLost(None)
    assert [d for d in clock.getDelayedCalls() if "IRC" in repr(d.func)] == []


def test_long_and_bad_lines(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    a.send("PRIVMSG bob :" + "x" * 600)
    assert a.numerics() == ["417"]
    a.proto.dataReceived(b"PRIVMSG bob :\xff\xfe\r\n")
    assert a.commands() == [("FAIL", ["PRIVMSG", "INVALID_UTF8", "Lines must be UTF-8"])]
    a.send("", ":onlyprefix", "   ")
    assert a.lines() == []
    a.proto.dataReceived(b"x" * (irc.MAX_TAGS + irc.MAX_LINE + 10))
    assert a.lines() == ["ERROR :Input line was too long"]
    assert a.transport.disconnecting


def test_invalid_utf8_fail_names_the_command_and_keeps_the_label(factory: IRCFactory) -> None:
    """UTF8ONLY: a line that is not UTF-8 is refused with ``FAIL <command>
    INVALID_UTF8`` (the IRCv3 utf8-only spec; irctest's utf8 tests check the
    command), labeled when the line was, and is not sent; ``*`` when the command
    itself is not UTF-8.  (It was ``FAIL *`` with no label.)"""
    a = login(factory, "alice", caps="labeled-response batch echo-message")
    b = login(factory, "bob")
    for bytewise in (False, True):
        data = b"@label=xyz PRIVMSG bob :hi\xaa\r\nNICK \xff\r\nPR\xffIVMSG bob :x\r\nPING end\r\n"
        if bytewise:
            for i in range(len(data)):
                a.proto.dataReceived(data[i : i + 1])
        else:
            a.proto.dataReceived(data)
        got = parsed(a)
        assert got[0] == (
            {"label": "xyz"},
            "FAIL",
            ["PRIVMSG", "INVALID_UTF8", "Lines must be UTF-8"],
        )
        assert got[1][1:] == ("FAIL", ["NICK", "INVALID_UTF8", "Lines must be UTF-8"])
        assert got[2][1:] == ("FAIL", ["*", "INVALID_UTF8", "Lines must be UTF-8"])
        assert got[3][1:] == ("PONG", [factory.server_name, "end"])
        assert b.lines() == []  # nothing was sent
    c = Conn(factory)  # before registration too
    c.proto.dataReceived(b"USER u 0 * :R\xe9al\r\n")
    assert c.commands() == [("FAIL", ["USER", "INVALID_UTF8", "Lines must be UTF-8"])]


def test_empty_or_colon_targets_are_never_empty_middle_parameters(factory: IRCFactory) -> None:
    """A client's empty target (``PRIVMSG bob, :hi``, ``INVITE bob :``) or one
    starting with ``:`` echoed in a numeric made a malformed line (``401 alice
    :No such nick``: an empty middle parameter, or one read as the trailing): the
    numeric now names it as a middle parameter can (``*``, without the ``:``)."""
    a = login(factory, "alice")
    a.send("PRIVMSG bob, :hi", "PRIVMSG bob,:evil :x", "INVITE bob :", "KICK #x :")
    lines = a.lines()
    assert "  " not in "".join(lines), lines
    got = [irc.parse_line(line)[1:] for line in lines]
    assert got == [
        ("401", ["alice", "*", "No such nick/channel"]),
        ("401", ["alice", "evil", "No such nick/channel"]),
        ("403", ["alice", "*", "No such channel"]),
        ("401", ["alice", "*", "No such nick"]),
    ], got
    assert format_line("s", "401", "me", "", "text") == b":s 401 me * :text\r\n"
    assert format_line("s", "X", ":a", "b c", "d") == b":s X a b_c d\r\n"


def test_mode_changes_at_most_modes_parameter_modes(factory: IRCFactory) -> None:
    """``MODES=4``: one MODE changes at most 4 modes with a parameter; the rest of the
    line is ignored (it was all done: ``+v-v+v-v...`` of a hundred was a hundred
    stored events, ``+bbbb...`` a hundred 401s).  Flag modes still apply."""
    a, _b = joined_pair(factory, "#m")
    a.send("MODE #m +v-v+v-v+v-v bob bob bob bob bob bob")
    modes = [p for c, p in a.commands() if c == "MODE"]
    assert modes == [["#m", "+v", "bob"], ["#m", "-v", "bob"]] * 2, modes
    a.send("MODE #m +bbbbbb x0 x1 x2 x3 x4 x5")
    assert [p[1] for c, p in a.commands()] == ["x0", "x1", "x2", "x3"]
    a.send("MODE #m +vvvvvm bob bob bob bob bob")  # the flag after them applies
    assert ("MODE", ["#m", "+m"]) in a.commands()
    assert "MODES=4" in " ".join(" ".join(chunk) for chunk in factory.isupport_lines())


def test_who_masks_are_irc_masks_and_cached_boundedly(factory: IRCFactory) -> None:
    """WHO's mask: ``*`` and ``?`` are its only wildcards (``[a]*`` is not fnmatch's
    class ``[a]``), and a new mask per WHO does not grow fnmatch's cache of 32768
    compiled patterns (some 240 MB pinned by one client's WHOs)."""
    import fnmatch

    a = login(factory, "alice")
    a.send("WHO [a]*", "WHO al?c*", "WHO *A*L*I*C*E*")
    got = [p[1:3] for c, p in a.commands() if c in ("352", "315")]
    assert got == [
        ["[a]*", "End of WHO list"],
        ["*", "u"],
        ["al?c*", "End of WHO list"],
        ["*", "u"],
        ["*A*L*I*C*E*", "End of WHO list"],
    ], got
    cached = fnmatch._compile_pattern.cache_info().currsize  # type: ignore[attr-defined]
    a.send(*[f"WHO *{n}?*" for n in range(100)])
    assert fnmatch._compile_pattern.cache_info().currsize == cached  # type: ignore[attr-defined]
    assert a.numerics() == ["315"] * 100


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_any_input_never_crashes(data: bytes) -> None:
    clock = Clock()
    realm = make_realm(clock)
    f = IRCFactory(realm, clock)
    c = Conn(f)
    c.send(f"PASS {PW}", "NICK alice", "USER u 0 * :R")
    c.proto.dataReceived(data + b"\r\n")
    out = c.transport.value()
    assert b" 400 " not in out  # never an internal error


def _parse_line_by_parsemsg(line: str) -> tuple[str, list[str]]:
    """parse_line's command and params as they were: twisted.words' parsemsg of the
    line after its tags, and a per-character check of the command."""
    from twisted.words.protocols import irc as twirc

    if line.startswith("@"):
        line = line.partition(" ")[2]
    line = line.lstrip(" ")
    if not line or (line.startswith(":") and " " not in line.strip()):
        raise irc.IRCBadLine("empty line")
    try:
        _prefix, command, params = twirc.parsemsg(line)
    except (twirc.IRCBadMessage, ValueError, IndexError):
        raise irc.IRCBadLine("unparsable line") from None
    if not command or not all(c.isalnum() or c in "_-" for c in command):
        raise irc.IRCBadLine("bad command")
    return command.upper(), params


#: Lines made of the pieces a parser trips on, and of any text.
IRCISH = st.lists(
    st.sampled_from(["PRIVMSG", "ping", " ", "  ", ":", " :", "@a=b\\s;c", "\t", "\x0b",
                     "x", "é", "²", "٣", "-", "_", "#c", ",", "!"])
    | st.text(max_size=3),
    max_size=12,
).map("".join)  # fmt: skip


@settings(max_examples=400)
@given(IRCISH)
def test_parse_line_is_parsemsg(line: str) -> None:
    """parse_line splits a line without a prefix itself; the same result (or
    IRCBadLine) as with twisted.words' parsemsg, for any text."""
    try:
        want: Any = _parse_line_by_parsemsg(line)
    except irc.IRCBadLine:
        want = irc.IRCBadLine
    try:
        got: Any = irc.parse_line(line)[1:]
    except irc.IRCBadLine:
        got = irc.IRCBadLine
    assert got == want


def test_file_items_become_notices(factory: IRCFactory, realm: RealmService) -> None:
    from chatproto.envelope import Envelope, new_message_id

    b = login(factory, "bob")
    meta = {
        "file_id": "F1",
        "sha256": "00",
        "size": 12,
        "name": "a.txt",
        "media_type": "text/plain",
    }
    env = Envelope(new_message_id(), "file", "carol@localhost", "bob@localhost", 0.0, "a.txt", meta)
    realm.commit_item(env)
    assert b.lines() == [
        ":carol!carol@localhost NOTICE bob :[file] a.txt (12 bytes, text/plain): "
        "fetch it with a chatproto client, file id F1"
    ]


def test_bounces_are_server_notices(factory: IRCFactory, realm: RealmService) -> None:
    """Another realm refused something bob sent: a notice from the server (the item's
    ``from`` may be a group, which is no IRC source)."""
    b = login(factory, "bob")
    meta = {"id": "m1", "code": "not_invited", "realm": "h.example", "event": "joined"}
    body = "your join request for #s@h.example was refused by h.example: not_invited: no"
    realm.bounce(
        "h.example",
        [
            (
                {"id": "m1", "from": "bob@localhost", "to": "#s@h.example", "event": "joined"},
                "not_invited",
                "no",
            )
        ],
    )
    assert b.lines() == [f":localhost NOTICE bob :[not delivered] {body}"]
    assert meta == realm.store.read_feed("bob@localhost", 0, 5).result[-1].meta


def test_chathistory(factory: IRCFactory) -> None:
    a = login(factory, "alice", caps="batch server-time message-tags draft/chathistory")
    b = login(factory, "bob")
    for i in range(5):
        b.send(f"PRIVMSG alice :m{i}")
    a.lines()
    a.send("CHATHISTORY LATEST bob * 3")
    lines = a.lines()
    assert lines[0].startswith(":localhost BATCH +") and lines[0].endswith(" chathistory bob")
    ref = lines[0].split("+")[1].split()[0]
    body = lines[1:-1]
    assert [line.rsplit(":", 1)[1] for line in body] == ["m2", "m3", "m4"]
    assert all(line.startswith(f"@batch={ref};time=") and ";msgid=" in line for line in body)
    assert lines[-1] == f":localhost BATCH -{ref}"
    first = body[0].split("msgid=")[1].split()[0]
    a.send(f"CHATHISTORY BEFORE bob msgid={first} 10")
    assert [line.rsplit(":", 1)[1] for line in a.lines()[1:-1]] == ["m0", "m1"]
    a.send(f"CHATHISTORY AFTER bob msgid={first} 1")
    assert [line.rsplit(":", 1)[1] for line in a.lines()[1:-1]] == ["m3"]
    b.send("JOIN #h")
    a.send("JOIN #h")
    b.send("PRIVMSG #h :in the group")
    a.lines()
    a.send("CHATHISTORY LATEST #h * 10")
    assert [line.rsplit(" :", 1)[1] for line in a.lines()[1:-1]] == ["in the group"]
    a.send(
        "CHATHISTORY AROUND bob * 3",
        "CHATHISTORY LATEST bob timestamp=2020-01-01T00:00:00.000Z 3",
        "CHATHISTORY LATEST bob * 0",
        "CHATHISTORY BEFORE bob * 3",
        "CHATHISTORY LATEST nobody@x@y * 3",
        "CHATHISTORY LATEST #nochan * 3",
    )
    codes = [p[1] for c, p in a.commands()]
    assert codes == [
        "INVALID_PARAMS",
        "INVALID_MSGREFTYPE",
        "INVALID_PARAMS",
        "INVALID_PARAMS",
        "INVALID_TARGET",
        "INVALID_TARGET",
    ]


def _batch_tags(line: str) -> list[str]:
    tags = line[1:].split(" ", 1)[0].split(";") if line.startswith("@") else []
    return [t for t in tags if t.startswith("batch=")]


def test_chathistory_tags_every_line_of_a_multiline_message(factory: IRCFactory) -> None:
    """Every line of a batch carries its tag (IRCv3 batch), every line of a message
    shown as several too; inside a labeled-response batch, the chathistory batch is
    nested: its opening line carries the outer tag, its lines only their own."""
    a = login(factory, "alice", caps="batch server-time message-tags labeled-response")
    login(factory, "bob")
    factory.realm.post("bob@localhost", "alice", "one\ntwo\nthree")
    a.lines()
    a.send("CHATHISTORY LATEST bob * 3")
    lines = a.lines()
    ref = lines[0].split("+")[1].split()[0]
    assert [line.rsplit(" :", 1)[1] for line in lines[1:-1]] == ["one", "two", "three"]
    assert [_batch_tags(line) for line in lines[1:-1]] == [[f"batch={ref}"]] * 3
    a.send("@label=h CHATHISTORY LATEST bob * 3")
    lines = a.lines()
    assert lines[0].startswith("@label=h :localhost BATCH +") and "labeled-response" in lines[0]
    outer = lines[0].split("+")[1].split()[0]
    assert _batch_tags(lines[1]) == [f"batch={outer}"] and " BATCH +" in lines[1]
    inner = lines[1].split("+")[1].split()[0]
    assert [_batch_tags(line) for line in lines[2:-2]] == [[f"batch={inner}"]] * 3
    assert lines[-2] == f"@batch={outer} :localhost BATCH -{inner}"
    assert lines[-1] == f":localhost BATCH -{outer}"


def test_too_many_sessions_is_not_a_bad_password(clock: Clock) -> None:
    realm = make_realm(clock)
    realm.config.limits.max_sessions_per_user = 1
    f = IRCFactory(realm, clock)
    login(f, "alice")
    c = Conn(f)
    c.send(f"PASS {PW}", "NICK alice", "USER u 0 * :R")
    (line,) = c.lines()
    assert line.startswith("ERROR :Access denied: ") and "sessions" in line
    c = Conn(f)
    c.send("CAP LS 302", "CAP REQ sasl", "AUTHENTICATE PLAIN")
    c.lines()
    c.send("AUTHENTICATE " + sasl_plain("alice", PW))
    (line,) = c.lines()
    assert " 904 " in line and "sessions" in line


def test_roles_join_zero_delete_and_events_in_backlog(
    factory: IRCFactory, realm: RealmService, clock: Clock
) -> None:
    a = login(factory, "alice", caps="server-time")
    b = login(factory, "bob")
    a.send("JOIN #r")
    b.send("JOIN #r")
    a.lines()
    b.lines()
    a.send("MODE #r +q bob")
    assert b.lines() == [":alice!u@localhost MODE #r +o bob"]
    assert a.lines()[0].endswith(":alice!u@localhost MODE #r +o bob")  # server-time tag
    a.send("MODE #r -o bob")  # owners may change any role: back to member
    assert b.lines() == [":alice!u@localhost MODE #r -o bob"]
    a.lines()
    # bob leaves while alice is away; alice sees it in her backlog, with its time.
    a.send("QUIT")
    a.proto.connectionLost(None)
    clock.advance(5)
    b.send("TOPIC #r :set while away", "JOIN 0")
    # bob saw alice QUIT (her last IRC connection); a member may not set the topic
    assert [n for n, _ in b.commands()] == ["QUIT", "482", "PART"]
    a2 = Conn(factory)
    a2.send("CAP LS 302", "CAP REQ server-time", f"PASS {PW}", "NICK alice", "USER u 0 * :R")
    a2.send("CAP END")
    cmds = [irc.parse_line(line) for line in a2.lines()]
    assert (cmds[-1][1], cmds[-1][2]) == ("PART", ["#r", "left"])
    assert cmds[-1][0]["time"].startswith("1970-01-01T00:00:05")
    # deleting the group (natively) kicks the IRC owner out of the channel
    realm.sessions.online["alice@localhost"][0].group_event("deleted", "#r")
    assert a2.commands() == [("KICK", ["#r", "alice", "the channel was deleted"])]
    a2.send("PRIVMSG #r :x")
    assert a2.numerics() == ["403"]


COMMANDS = [*sorted(irc._HANDLERS), "FOO"]
WORDS = st.sampled_from(
    ["#dev", "#nope", "alice", "bob", "*", "+o", "-b", "+b", "+q", "-i", "b", "0", "",
     "msgid=1", "LATEST", "BEFORE", "PLAIN", "+", "LS", "REQ", "END", "x" * 40, ":", "a/b.c"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(COMMANDS), st.lists(WORDS, max_size=4), WORDS),
                max_size=8))  # fmt: skip
def test_any_command_sequence_never_crashes(script: list[tuple[str, list[str], str]]) -> None:
    """Structured fuzzing: every handler with odd parameters answers, never fails."""
    clock = Clock()
    realm = make_realm(clock)
    f = IRCFactory(realm, clock)
    other = login(f, "bob")
    other.send("JOIN #dev")
    c = login(f, "alice", caps="labeled-response batch echo-message message-tags")
    for command, middle, trailing in script:
        c.send(" ".join(["@label=L", command, *[w for w in middle if w]]) + " :" + trailing)
    out = c.transport.value() + other.transport.value()
    assert b" 400 " not in out, out  # never an internal error


def test_join_of_another_realms_group_asks_its_home_realm(
    factory: IRCFactory, realm: RealmService
) -> None:
    """``JOIN #dev/h.example`` with no member of it here yet is a join request queued
    for h.example (which decides; the JOIN line comes with its joined event), not an
    attempt to create it here (which answered 403)."""
    realm.config.federation.enabled = True

    class Federation:
        woken: list[str] = []

        def admit(self, peer: str, user: str | None = None) -> bool:
            return True

        def wake(self, peer: str) -> None:
            self.woken.append(peer)

    realm.federation = fed = Federation()
    b = login(factory, "bob")
    b.send("JOIN #dev/h.example")
    assert not any(" 403 " in line for line in b.lines())
    [(_, request)] = realm.store.outbox_read("h.example", 0, 10).result
    assert (request["kind"], request["event"], request["from"], request["to"]) == (
        "request",
        "joined",
        "bob@localhost",
        "#dev@h.example",
    )
    assert fed.woken == ["h.example"]


def test_topics_reasons_and_away_are_plain_text(factory: IRCFactory) -> None:
    """Issue 14, item 4: IRC formatting is dropped from topics, kick reasons and away
    texts (the realm keeps them as plain text); other control characters are refused
    with a numeric, and a body with ESC is refused, never an internal error."""
    a, b = joined_pair(factory, "#dev")
    a.send("TOPIC #dev :\x02big\x02 \x0304news\x03")
    assert factory.realm.groups.get("#dev@localhost").topic == "big news"
    a.lines()
    a.send("TOPIC #dev :evil\x1b[2J")
    (line,) = a.lines()
    assert " 400 alice TOPIC :the topic contains a control" in line, line
    a.send("AWAY :\x1dlunch\x1d")
    assert a.numerics() == ["306"]
    a.send("AWAY :gone\u202eevil")
    (line,) = a.lines()
    assert " 400 alice AWAY :the status text contains" in line, line
    a.send("KICK #dev bob :\x02spam\x02")
    kicked = [ln for ln in b.lines() if " KICK " in ln]
    assert kicked and kicked[0].endswith("KICK #dev bob :spam")
    a.lines()
    a.send("PRIVMSG #dev :\x02bold\x02 is fine", "PRIVMSG #dev :esc \x1b[31m is not")
    lines = a.lines()
    assert any(" 400 alice PRIVMSG :body contains U+001B" in ln for ln in lines), lines
    assert not any("Internal error" in ln for ln in lines)


def test_numbers_from_an_irc_client_are_checked(factory: IRCFactory, log_watch: Any) -> None:
    """Issue 14: numeric parameters are ASCII digits within +-(2**53 - 1).
    ``str.isdigit`` accepted ``²`` (which int() refuses: a traceback) and any number
    of digits (a 500-digit msgid reached the store)."""
    a = login(factory, "alice", caps="batch draft/chathistory")
    a.send("JOIN #dev")
    a.lines()
    sup = "\u00b2"
    a.send(f"CAP LS {sup}", "CAP LS 302\u0663")
    assert [c for c, _ in a.commands()] == ["CAP", "CAP"]
    for line in (
        f"CHATHISTORY LATEST bob * {sup}",
        "CHATHISTORY LATEST bob * " + "9" * 400,
        f"CHATHISTORY BEFORE bob msgid={sup} 10",
        "CHATHISTORY BEFORE bob msgid=" + "9" * 400 + " 10",
        "CHATHISTORY AFTER bob msgid=-5 10",
    ):
        a.send(line)
        (reply,) = a.lines()
        assert reply.startswith(":localhost FAIL CHATHISTORY "), (line, reply)
    a.send(f"MODE #dev +l {sup}", "MODE #dev +l " + "9" * 400, f"WHOWAS alice {sup}")
    replies = a.lines()
    assert replies and not any(" 400 " in r for r in replies), replies
    assert not log_watch.failures, log_watch.failures[0]


def test_the_source_of_messages_follows_nick_and_connections(factory: IRCFactory) -> None:
    """The sender's mask (remembered by the directory) changes with a NICK, with a
    newer connection of the same account (its USER), and back when that one closes."""
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("PRIVMSG bob :1")
    a.send("NICK Alice")
    a.lines()
    a.send("PRIVMSG bob :2")
    a2 = Conn(factory)
    a2.send(f"PASS {PW}", "NICK alice", "USER second 0 * :Second")
    a2.lines()
    a.send("PRIVMSG bob :3")
    a2.proto.connectionLost(None)
    a.send("PRIVMSG bob :4")
    got = [line for line in b.lines() if " PRIVMSG " in line]
    assert got == [
        ":alice!u@localhost PRIVMSG bob :1",
        ":Alice!u@localhost PRIVMSG bob :2",
        ":alice!second@localhost PRIVMSG bob :3",  # the newest connection's identity
        ":Alice!u@localhost PRIVMSG bob :4",
    ]


@given(
    st.text(min_size=1, max_size=120),
    st.sampled_from(["PRIVMSG", "NOTICE"]),
    st.text(min_size=1, max_size=60),
    st.text(max_size=520),
)
def test_a_text_no_longer_than_text_room_surely_fits_a_line(
    mask: str, command: str, shown: str, text: str
) -> None:
    """The 417 check of PRIVMSG and NOTICE (send_text and the fast lane of a read's
    quick lines) measures in bytes only a text longer than text_room: any text that
    long or shorter fits one line at the recipient, whatever its characters."""
    from chatproto.irc.lines import MAX_LINE, text_room

    room = text_room(mask, command, shown)
    line = f":{mask} {command} {shown} :{text}".encode("utf-8", "surrogatepass")
    if len(text) <= room:
        assert len(line) <= MAX_LINE - 2


def test_lists_past_targmax(factory: IRCFactory) -> None:
    """TARGMAX (docs/irc.md): JOIN of a thousand channels in one line joins the first
    4; TAGMSG is announced with its limit of 4 too."""
    a = login(factory, "alice")
    a.send("JOIN " + ",".join(f"#c{n}" for n in range(1000))[: irc.MAX_LINE - 8])
    assert [p for c, p in a.commands() if c == "JOIN"] == [[f"#c{n}"] for n in range(4)]
    assert sorted(factory.realm.groups.of_user["alice@localhost"]) == [
        f"#c{n}@localhost" for n in range(4)
    ]
    tokens = " ".join(" ".join(chunk) for chunk in factory.isupport_lines())
    assert ",TAGMSG:4," in tokens


def test_realname_and_username_are_shown_as_plain_text(factory: IRCFactory) -> None:
    """A realname is text shown to others (WHO, WHOIS, WHOWAS): an ESC (terminal
    escape sequences), a C1 control or a bidirectional override in it reached other
    users' IRC clients as sent.  Like a topic or an away text it is now plain text:
    IRC formatting and what a label may not hold (chatproto.text) are dropped."""
    c = Conn(factory)
    c.send(f"PASS alice:{PW}", "NICK x", "USER u\x1b[2J!@ 0 * :\x1b[31mEvil\u202eName\x02b\x9b")
    lines = c.lines()
    assert lines[0] == ":x!u[2J@localhost NICK alice", lines  # (the username as shown)
    assert all("\x1b" not in line for line in lines), lines
    b = login(factory, "bob")
    b.send("WHOIS alice")
    whois = [p for cmd, p in b.commands() if cmd == "311"]
    assert whois == [["bob", "alice", "u[2J", "localhost", "*", "[31mEvilNameb"]], whois


def test_channellen_is_what_a_local_channel_name_may_be(factory: IRCFactory) -> None:
    """CHANNELLEN (Modern; irctest's testChannellen): a channel name of that length
    joins, one longer is 403.  It said 287 (a remote ``#name/realm``), and a local
    channel of 287 characters was 403."""
    tokens = dict(t.partition("=")[::2] for chunk in factory.isupport_lines() for t in chunk)
    n = int(tokens["CHANNELLEN"])
    a = login(factory, "alice")
    a.send("JOIN #" + "a" * (n - 1))
    assert a.commands()[0] == ("JOIN", ["#" + "a" * (n - 1)])
    a.send("JOIN #" + "b" * n)
    assert a.commands() == [("403", ["alice", "#" + "b" * n, "No such channel"])]


def test_quit_reason_is_shown_to_others_as_plain_text(factory: IRCFactory) -> None:
    """A QUIT reason goes to the IRC users sharing a channel: an ESC, C1 control or
    bidirectional override in it reached them raw (the realm never sees it to refuse
    it); it is now plain text like a kick reason."""
    a, b = joined_pair(factory, "#q")
    b.send("QUIT :\x1b[2Jbye\u202e\x02x\x9b")
    b.proto.connectionLost(None)
    assert a.lines() == [":bob!u@localhost QUIT :Quit: [2Jbyex"]
    assert b.lines()[-1] == "ERROR :Closing link: bob (Quit: [2Jbyex)"


def test_a_nick_change_is_told_without_a_pass_over_every_connection(
    factory: IRCFactory,
) -> None:
    """A change of case is told to the IRC users sharing a channel, found through
    their own connections: it was a pass over every connection of the gateway per
    NICK (a flood of NICKs cost the gateway's size each)."""
    a, b = joined_pair(factory, "#n")
    c = login(factory, "carol")

    class NoPass(set):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            raise AssertionError("a pass over every connection")

    factory.connections = NoPass(factory.connections)
    a.send("NICK Alice")
    assert a.lines() == [":alice!u@localhost NICK Alice"]
    assert b.lines() == [":alice!u@localhost NICK Alice"]
    assert c.lines() == []  # shares no channel


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
        min_size=1,
        max_size=6,
    )
)
def test_format_line_keeps_its_parameters_whatever_they_hold(params: list[str]) -> None:
    """Any parameters: one line of at most 512 bytes, without NUL, with (when not cut
    at 512) exactly as many parameters as given, as an IRC parser splits it (single
    spaces; the trailing after `` :``), none of the middle ones empty.  A middle
    parameter that was only NUL came out empty (``X  last``)."""
    line = format_line("s", "X", *params)
    assert line.endswith(b"\r\n") and line.count(b"\r") == 1 and line.count(b"\n") == 1
    assert b"\0" not in line and len(line) <= 512
    if len(line) < 510:
        head, sep, _trailing = line[:-2].decode().partition(" :")
        parts = head.split(" ")
        assert "" not in parts, line
        assert len(parts[2:]) + (1 if sep else 0) == len(params), line
