"""IRC conformance of the gateway's line logic (issue 19), over StringTransport: one
test per cause the public IRC test suite found (reply order, channel modes, identity,
prefixes, WHOWAS, long lines, NOTICE, WHO masks, nick case, small replies).

The loopback counterparts are in tests/test_irc_conformance_loopback.py."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.irc import IRCFactory
from chatproto.realm import RealmService
from tests.test_irc import (  # noqa: F401
    PW,
    Conn,
    clock_fixture,
    factory_fixture,
    joined_pair,
    login,
    make_realm,
    realm_fixture,
)


class Gate:
    """Holds the store's commits until released (storage that is slow to answer)."""

    def __init__(self, realm: RealmService) -> None:
        self.store = realm.store
        self.append = realm.store.append
        self.held: list[tuple[Deferred[Any], Any, Any]] = []
        realm.store.append = self._held  # type: ignore[method-assign]

    def _held(self, items: Any, outbox: Any = ()) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((d, items, outbox))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, items, outbox in held:
            self.append(items, outbox).chainDeferred(d)

    def open(self) -> None:
        self.store.append = self.append  # type: ignore[method-assign]
        self.release()


def commands(c: Conn) -> list[str]:
    return [f"{cmd} {' '.join(params[:2])}".strip() for cmd, params in c.commands()]


# (1) reply order -----------------------------------------------------------------------


def test_replies_keep_the_order_of_commands(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice", caps="echo-message")
    gate = Gate(realm)
    a.send("PRIVMSG bob :hi", "PING one", "PRIVMSG carol :yo", "PING two")
    assert a.lines() == []  # the PRIVMSGs wait for storage: nothing overtakes them
    assert len(gate.held) == 2  # both sends run at once: only the replies wait
    gate.release()
    out = commands(a)
    assert out == ["PRIVMSG bob hi", "PONG localhost one", "PRIVMSG carol yo", "PONG localhost two"]


def test_lines_after_a_group_change_wait_for_it(factory: IRCFactory, realm: RealmService) -> None:
    """JOIN then PRIVMSG to the channel: the PRIVMSG runs once the JOIN is stored."""
    a = login(factory, "alice", caps="echo-message")
    gate = Gate(realm)
    a.send("JOIN #room", "PRIVMSG #room :first", "PING x")
    assert len(gate.held) == 1 and a.lines() == []
    gate.release()
    assert [c for c, _ in a.commands()] == ["JOIN", "353", "366"]
    assert len(gate.held) == 1  # now the PRIVMSG, to a channel that exists
    gate.open()
    assert commands(a) == ["PRIVMSG #room first", "PONG localhost x"]


def test_labeled_reply_waits_for_an_earlier_unlabeled_one(
    factory: IRCFactory, realm: RealmService
) -> None:
    a = login(factory, "alice", caps="labeled-response batch")
    gate = Gate(realm)
    a.send("JOIN #room", "@label=p1 PING x", "@label=p2 LUSERS")
    assert a.lines() == []
    gate.open()
    lines = a.lines()
    pong = next(i for i, line in enumerate(lines) if " PONG " in line)
    assert " JOIN " in lines[0] and " 366 " in lines[pong - 1]
    assert lines[pong].startswith("@label=p1 ")
    assert lines[pong + 1].startswith("@label=p2;batch=") or "BATCH +" in lines[pong + 1]


def test_quit_closes_after_the_earlier_replies(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice")
    gate = Gate(realm)
    a.send("JOIN #room", "QUIT :bye")
    assert a.lines() == [] and not a.transport.disconnecting
    gate.open()
    names = [c for c, _ in a.commands()]
    assert names[0] == "JOIN" and names[-1] == "ERROR"
    assert a.transport.disconnecting


def test_an_error_reply_keeps_its_place(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice")
    gate = Gate(realm)
    a.send("JOIN #room", "PART #nowhere", "NOSUCHCOMMAND", "PING z")
    assert a.lines() == []
    gate.open()
    names = [c for c, _ in a.commands()]
    assert names == ["JOIN", "353", "366", "403", "421", "PONG"], names


def register(factory: IRCFactory, nick: str, user: str, realname: str, caps: str = "") -> Conn:
    c = Conn(factory)
    if caps:
        c.send("CAP LS 302", f"CAP REQ :{caps}")
    c.send(f"PASS {PW}", f"NICK {nick}", f"USER {user} 0 * :{realname}")
    if caps:
        c.send("CAP END")
    c.lines()
    return c


# (2) channel modes ---------------------------------------------------------------------


def test_channel_modes_are_group_settings(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    c = login(factory, "carol")
    a.send("JOIN #m")
    a.lines()
    a.send("MODE #m")
    cmds = a.commands()
    assert cmds[0] == ("324", ["alice", "#m", "+nt"]) and cmds[1][0] == "329"
    a.send("MODE #m +lk 2 sesame")
    assert a.commands() == [("MODE", ["#m", "+kl", "sesame", "2"])]
    g = realm.groups.get("#m@localhost")
    assert (g.key, g.limit) == ("sesame", 2)
    b.send("JOIN #m")
    assert b.numerics() == ["475"]
    b.send("JOIN #m sesame")
    assert b.numerics()[0] == "JOIN"
    c.send("JOIN #m sesame")
    assert c.numerics() == ["471"]
    a.send("MODE #m -l+m", "MODE #m +v bob", "MODE #m")
    a_cmds = a.commands()
    assert ("MODE", ["#m", "+m-l"]) in a_cmds or ("MODE", ["#m", "-l+m"]) in a_cmds
    assert ("MODE", ["#m", "+v", "bob"]) in a_cmds
    assert ("324", ["alice", "#m", "+kmnt", "sesame"]) in a_cmds
    c.send("JOIN #m sesame", "PRIVMSG #m :hello")
    assert c.numerics()[-1] == "404"  # moderated, not voiced
    b.send("PRIVMSG #m :voiced")
    assert ("PRIVMSG", ["#m", "voiced"]) in c.commands()
    b.lines()
    b.send("TOPIC #m :by bob")
    assert b.numerics() == ["482"]
    a.send("MODE #m -t")
    b.lines()
    b.send("TOPIC #m :by bob")
    assert ("TOPIC", ["#m", "by bob"]) in b.commands()


def test_mode_errors_and_invite_only(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("JOIN #x")
    a.lines()
    a.send(
        "MODE #x +l 0",
        "MODE #x +l nope",
        "MODE #x +k :a b",
        "MODE #x +o carol",
        "MODE #x +o nobody",
    )
    assert a.numerics() == ["696", "696", "696", "441", "401"]
    a.send("MODE #x +i")
    assert a.commands() == [("MODE", ["#x", "+i"])]
    b.send("JOIN #x")
    assert b.numerics() == ["473"]
    a.send("INVITE bob #x")
    b.lines()
    b.send("JOIN #x")
    assert b.numerics()[0] == "JOIN"
    a.lines()
    a.send("MODE #x +o bob")
    assert a.commands() == [("MODE", ["#x", "+o", "bob"])]
    b.send("MODE #x +s")
    assert ("MODE", ["#x", "+s"]) in b.commands()


# (4) identity as sent, (10) WHO masks, (5) creator is @ -------------------------------


def test_who_and_whois_show_the_identity_as_sent(factory: IRCFactory) -> None:
    a = register(factory, "Alice", "myuser", "My Real Name")
    b = register(factory, "bob", "bobu", "Bob B")
    a.send("JOIN #chan")
    b.send("JOIN #chan")
    a.lines()
    b.lines()
    b.send("WHOIS alice")
    cmds = dict(b.commands())
    assert cmds["311"] == ["bob", "Alice", "myuser", "localhost", "*", "My Real Name"]
    assert cmds["319"] == ["bob", "Alice", "@#chan"]  # the creator is an operator
    b.send("WHO #chan")
    who = [p for c, p in b.commands() if c == "352"]
    assert [
        "bob",
        "#chan",
        "myuser",
        "localhost",
        "localhost",
        "Alice",
        "H@",
        "0 My Real Name",
    ] in who
    for mask in ("*", "ali*", "*real*"):
        b.send(f"WHO {mask}")
        cmds = b.commands()
        nicks = sorted(p[5] for c, p in cmds if c == "352")
        assert nicks == (["Alice", "bob"] if mask == "*" else ["Alice"]), mask
        assert cmds[-1] == ("315", ["bob", mask, "End of WHO list"])
    b.send("WHO nobody*")
    assert b.numerics() == ["315"]
    b.send("PRIVMSG alice :hi")
    assert a.lines() == [":bob!bobu@localhost PRIVMSG Alice :hi"]


def test_multi_prefix_and_userhost_in_names(factory: IRCFactory) -> None:
    a = login(factory, "alice", caps="multi-prefix userhost-in-names")
    a.send("JOIN #p", "MODE #p +v alice", "NAMES #p")
    names = [p for c, p in a.commands() if c == "353"]
    assert names[-1] == ["alice", "=", "#p", "@+alice!u@localhost"]
    b = login(factory, "bob")
    b.send("JOIN #p", "NAMES #p")
    assert [p for c, p in b.commands() if c == "353"][-1] == ["bob", "=", "#p", "@alice bob"]


# (6) WHOWAS, (11) nick case, (12) USERHOST, TIME, 301 ------------------------------------


def test_whowas_after_the_last_connection(factory: IRCFactory, clock: Clock) -> None:
    a = register(factory, "Alice", "au", "First")
    b = login(factory, "bob")
    b.send("WHOWAS alice")
    assert b.numerics() == ["406", "369"]
    a.send("QUIT")
    a.proto.connectionLost(None)
    a2 = register(factory, "ALICE", "au2", "Second")
    a2.send("QUIT")
    a2.proto.connectionLost(None)
    b.send("WHOWAS alice", "WHOWAS alice 1", "WHOWAS")
    cmds = b.commands()
    was = [p for c, p in cmds if c == "314"]
    assert was[0] == ["bob", "ALICE", "au2", "localhost", "*", "Second"]
    assert was[1] == ["bob", "Alice", "au", "localhost", "*", "First"]
    assert was[2] == was[0] and len(was) == 3  # count 1: the newest only
    assert cmds[-1][0] == "461"


def test_nick_case_change_is_acknowledged(factory: IRCFactory) -> None:
    a, b = joined_pair(factory, "#n")
    a.send("NICK Alice", "NICK Alice")
    assert a.lines() == [":alice!u@localhost NICK Alice"]  # once: the second changes nothing
    assert b.lines() == [":alice!u@localhost NICK Alice"]
    b.send("PRIVMSG alice :x")
    assert a.lines() == [":bob!u@localhost PRIVMSG Alice :x"]


def test_userhost_time_away_and_empty_realname(factory: IRCFactory, realm: RealmService) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    b.send("AWAY :lunch")
    b.lines()
    a.send("USERHOST bob alice nobody", "TIME", "PRIVMSG bob :are you there")
    cmds = a.commands()
    assert cmds[0] == ("302", ["alice", "bob=-u@localhost alice=+u@localhost"])
    assert cmds[1][0] == "391"
    assert cmds[2] == ("301", ["alice", "bob", "lunch"])
    c = Conn(factory)
    c.send(f"PASS {PW}", "NICK carol", "USER carol 0 * :")
    assert c.numerics() == ["461"]


# (8) long lines, (14) the small ones ---------------------------------------------------


def test_a_message_too_long_for_one_line_is_refused_not_split(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    head = len(":alice!u@localhost PRIVMSG bob :")
    a.send("PRIVMSG bob :" + "x" * (510 - head))  # fits exactly at the recipient
    assert [len(line.encode()) for line in b.lines()] == [510]
    a.send("PRIVMSG bob :" + "x" * (511 - head))
    assert a.numerics() == ["417"] and b.lines() == []
    a.send("@+tag=" + "a" * 4090 + " PRIVMSG bob :hi")  # 4097 bytes of tags
    assert a.numerics() == ["417"] and b.lines() == []


def test_kick_lusers_unknown_commands_and_invalid_keys(factory: IRCFactory) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    c = login(factory, "carol")
    a.send("JOIN #a", "JOIN #b")
    b.send("JOIN #a", "JOIN #b")
    c.send("JOIN #a")
    for x in (a, b, c):
        x.lines()
    c.send("KICK #b bob")
    assert c.numerics() == ["442"]  # the kicker is not on #b
    a.send("KICK #a,#b bob,bob")
    kicks = [p for cmd, p in a.commands() if cmd == "KICK"]
    assert kicks == [["#a", "bob", "alice"], ["#b", "bob", "alice"]]  # default: kicker's nick
    a.send("LUSERS", "FOO_BAR", "MODE #a +k :a b")
    cmds = a.commands()
    assert [n for n, _ in cmds] == ["251", "254", "255", "265", "266", "421", "696"]
    assert cmds[-1][1][:4] == ["alice", "#a", "k", "*"]


# (9) NOTICE stays NOTICE -----------------------------------------------------------------


def test_notice_stays_a_notice_delivered_echoed_and_stored(
    factory: IRCFactory, realm: RealmService
) -> None:
    a = login(factory, "alice", caps="echo-message")
    b = login(factory, "bob")
    a.send("JOIN #n")
    b.send("JOIN #n")
    a.lines()
    b.lines()
    a.send("NOTICE bob :psst", "NOTICE #n :to all")
    assert a.commands() == [("NOTICE", ["bob", "psst"]), ("NOTICE", ["#n", "to all"])]
    assert b.commands() == [("NOTICE", ["bob", "psst"]), ("NOTICE", ["#n", "to all"])]
    stored = [e for e in realm.store.items if e.kind == "text"]
    assert [(e.body, e.meta) for e in stored] == [
        ("psst", {"notice": True}),
        ("to all", {"notice": True}),
    ]


def test_list_shows_ones_own_secret_channels_and_who_names_the_channel(
    factory: IRCFactory,
) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("JOIN #Sec", "MODE #sec +s")
    a.lines()
    a.send("LIST")
    assert [p[1] for c, p in a.commands() if c == "322"] == ["#sec"]
    b.send("LIST")
    assert [p for c, p in b.commands() if c == "322"] == []
    a.send("WHO #SEC")
    assert [p[1] for c, p in a.commands() if c == "352"] == ["#sec"]


def test_quit_is_relayed_to_channel_members_and_coming_back_is_a_join(
    factory: IRCFactory, clock: Clock
) -> None:
    """(14) QUIT: the other IRC users of a shared channel see it when the user's last
    IRC connection closes (not before), once each; a new connection is a JOIN."""
    a = login(factory, "alice")
    b = login(factory, "bob")
    c = login(factory, "carol")
    for conn in (a, b):
        conn.send("JOIN #q", "JOIN #r")
    c.send("JOIN #q")
    a.lines(), b.lines(), c.lines()
    a2 = login(factory, "alice")  # a second connection: nothing to tell
    assert b.lines() == [] and c.lines() == []
    a.send("QUIT :gone fishing")
    a.proto.connectionLost(None)
    assert b.lines() == [] and c.lines() == []
    a2.transport.loseConnection()  # dropped, no QUIT: a reason all the same
    a2.proto.connectionLost(None)
    assert b.commands() == [("QUIT", ["Connection closed"])]  # once for #q and #r
    assert c.lines() == [":alice!u@localhost QUIT :Connection closed"]
    login(factory, "alice")
    assert b.commands() == [("JOIN", ["#q"]), ("JOIN", ["#r"])]
    assert c.lines() == [":alice!u@localhost JOIN #q"]


def test_quit_reason_is_the_clients(factory: IRCFactory, clock: Clock) -> None:
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("JOIN #q")
    b.send("JOIN #q")
    a.lines(), b.lines()
    a.send("QUIT :qux out", bytewise=True)
    a.proto.connectionLost(None)
    assert b.lines() == [":alice!u@localhost QUIT :Quit: qux out"]


def test_lusers_max_is_the_most_online_since_start(factory: IRCFactory) -> None:
    """(14) LUSERS 265/266 give the current and the most users online at once."""
    a = login(factory, "alice")
    b = login(factory, "bob")
    b.send("QUIT")
    b.proto.connectionLost(None)
    a.send("LUSERS")
    got = dict(a.commands())
    assert got["265"][1:3] == ["1", "2"] and got["266"][1:3] == ["1", "2"]


def test_info_lists_then_ends(factory: IRCFactory) -> None:
    """(3) INFO: RPL_INFO lines, then RPL_ENDOFINFO (for anyone: the gateway has no
    operators of its own)."""
    a = login(factory, "alice")
    a.send("INFO", "INFO My.Little.Server")
    got = a.commands()
    assert [c for c, _ in got] == ["371"] * 4 + ["374"] + ["371"] * 4 + ["374"]
    assert all(p[0] == "alice" for _, p in got)


def test_names_of_several_channels_ends_once(factory: IRCFactory) -> None:
    """(14) NAMES #a,#b: the 353 of each, then one 366 naming both (RFC 2812)."""
    a = login(factory, "alice")
    a.send("JOIN #chan1", "JOIN #chan2")
    a.lines()
    a.send("NAMES #chan1,#chan2,#nope")
    assert a.commands() == [
        ("353", ["alice", "=", "#chan1", "@alice"]),
        ("353", ["alice", "=", "#chan2", "@alice"]),
        ("366", ["alice", "#chan1,#chan2,#nope", "End of /NAMES list"]),
    ]
    a.send("NAMES #chan1")
    assert [c for c, _ in a.commands()] == ["353", "366"]


def test_topic_who_and_when_on_join_and_query(factory: IRCFactory, clock: Clock) -> None:
    """(14) RPL_TOPICWHOTIME (333) after RPL_TOPIC on JOIN and TOPIC: who set it, when."""
    a = login(factory, "alice")
    clock.advance(1000)
    a.send("JOIN #chan", "TOPIC #chan :new topic")
    a.lines()
    b = login(factory, "bob")
    b.send("JOIN #chan")
    got = b.commands()
    assert ("332", ["bob", "#chan", "new topic"]) in got
    assert [p for c, p in got if c == "333"] == [["bob", "#chan", "alice", "1000"]]
    b.send("TOPIC #chan")
    assert [c for c, _ in b.commands()] == ["332", "333"]


def test_mode_o_from_a_non_member_is_442_not_441(factory: IRCFactory) -> None:
    """(14) MODE +o on a channel the sender is not in: 442 (the sender is not on it),
    one reply; 441 only when the sender is and the target is not."""
    a = login(factory, "alice")
    b = login(factory, "bob")
    c = login(factory, "carol")
    a.send("JOIN #chan")
    c.send("JOIN #unrelated")
    b.send("JOIN #chan", "JOIN #unrelated")
    a.lines(), b.lines()
    a.send("MODE #unrelated +o bob")
    assert a.numerics() == ["442"]
    a.send("MODE #chan +o carol", "KICK #chan carol")
    assert a.numerics() == ["441", "441"]


def test_minus_n_lets_non_members_send(factory: IRCFactory, realm: RealmService) -> None:
    """(2) +n (the default): only members send; -n (group setting external): anyone
    may, unless the channel is moderated; RPL_CHANNELMODEIS lists n while it is on."""
    a = login(factory, "alice")
    b = login(factory, "bob")
    a.send("JOIN #chan", "MODE #chan +int")
    a.lines()
    a.send("MODE #chan")
    assert a.commands()[0][1][2] == "+int"
    b.send("PRIVMSG #chan :hi from bob")
    assert b.numerics() == ["404"]
    assert a.lines() == []
    a.send("MODE #chan -int")
    assert a.commands() == [("MODE", ["#chan", "-itn"])]
    assert realm.groups.groups["#chan@localhost"].external is True
    b.send("PRIVMSG #chan :hi again")
    assert a.commands() == [("PRIVMSG", ["#chan", "hi again"])]
    assert b.lines() == []  # not a member: it does not receive the channel
    a.send("MODE #chan +m")
    a.lines()
    b.send("PRIVMSG #chan :moderated now")
    assert b.numerics() == ["404"]
    a.send("MODE #chan -m+n")
    assert a.commands() == [("MODE", ["#chan", "-m+n"])]
    assert realm.groups.groups["#chan@localhost"].external is False


def test_commands_sent_while_the_backlog_is_read_keep_their_order(
    factory: IRCFactory, realm: RealmService
) -> None:
    """A client may send its first commands on 376, before its session has read its
    backlog; the session holds live items until then (chatproto.realm.sessions), so
    the replies those commands' items carry (JOIN, an echo, TOPIC) must not be
    overtaken by the replies that need no item (PONG)."""
    read_feed = realm.store.read_feed
    held: list[tuple[Deferred[Any], tuple[Any, ...]]] = []

    def slow_read_feed(*args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append((d, args))
        return d

    realm.store.read_feed = slow_read_feed  # type: ignore[method-assign]
    a = login(factory, "alice", caps="echo-message")
    assert len(held) == 1  # the backlog read is still with the store
    a.send("JOIN #room", "PING 1", "PRIVMSG #room :hello", "PING 2", "TOPIC #room :t", "PING 3")
    realm.store.read_feed = read_feed  # type: ignore[method-assign]
    for d, args in held:
        read_feed(*args).chainDeferred(d)
    names = [c for c, _ in a.commands()]
    assert names == ["JOIN", "353", "366", "PONG", "PRIVMSG", "PONG", "TOPIC", "PONG"], names


class HeldStream:
    """The stream of a cluster worker, held: what the realm commits reaches its
    sessions once released (a worker routes every item from the store, in
    position order, a round trip after its commit: chatproto.cluster.stream)."""

    def __init__(self, realm: RealmService) -> None:
        self.realm = realm
        self.held: list[tuple[Any, tuple[str, ...]]] = []
        self.delivered = 0
        self.waiters: list[tuple[int, Deferred[None]]] = []

    def committed(self, env: Any, users: Any) -> None:
        self.held.append((env, tuple(users)))

    def until_routed(self, pos: int) -> Deferred[None] | None:
        if pos <= self.delivered:
            return None
        d: Deferred[None] = Deferred()
        self.waiters.append((pos, d))
        return d

    def standing_changed(self, *args: Any) -> None:
        pass

    def release(self) -> None:
        held, self.held = self.held, []
        for env, users in held:
            self.realm.sessions.route(env, users)
            self.delivered = max(self.delivered, env.pos)
        waiters, self.waiters = self.waiters, []
        for pos, d in waiters:
            if pos <= self.delivered:
                d.callback(None)
            else:
                self.waiters.append((pos, d))


def test_replies_carried_by_items_keep_their_order_on_a_cluster_worker(
    factory: IRCFactory, realm: RealmService
) -> None:
    """On a worker of a cluster a commit reaches the sessions after its Deferred
    fired (from the store, in position order): the JOIN, the echo and the TOPIC
    that answer a command must still come before the PONG of a later PING."""
    a = login(factory, "alice", caps="echo-message")
    stream = HeldStream(realm)
    realm.cluster = stream
    a.send("JOIN #room", "PING 1", "PRIVMSG #room :hello", "PING 2", "TOPIC #room :t", "PING 3")
    for _ in range(10):
        stream.release()
    names = [c for c, _ in a.commands()]
    assert names == ["JOIN", "353", "366", "PONG", "PRIVMSG", "PONG", "TOPIC", "PONG"], names
