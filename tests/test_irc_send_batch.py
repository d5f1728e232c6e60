"""The IRC gateway's PRIVMSG/NOTICE lines of one read are one batch for the realm
(IRCProtocol.queue_send): one append, errors per target, and a command after the sends
sees them stored.  StringTransport and a MemoryStore realm (tests/test_irc.py helpers)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.envelope import Envelope
from chatproto.irc import IRCFactory, parse_line
from chatproto.irc.lines import quick_message
from chatproto.realm import RealmService
from tests.conftest import count_appends
from tests.test_irc import Conn, clock_fixture, factory_fixture, login, make_realm, realm_fixture  # noqa: F401


def test_privmsgs_of_one_read_are_one_append(realm: RealmService, factory: IRCFactory) -> None:
    alice = login(factory, "alice")
    bob = login(factory, "bob")
    sizes = count_appends(realm)
    alice.send(*(f"PRIVMSG bob :m{i}" for i in range(5)))
    assert sizes == [5]
    got = [p[-1] for c, p in bob.commands() if c == "PRIVMSG"]
    assert got == [f"m{i}" for i in range(5)]
    assert [e.body for e in realm.store.items if e.kind == "text"] == [f"m{i}" for i in range(5)]
    # one line at a time: one append each
    alice.send(*(f"PRIVMSG bob :b{i}" for i in range(3)), bytewise=True)
    assert sizes == [5, 1, 1, 1]
    realm.stopService()


def test_errors_stay_per_target_and_in_order(realm: RealmService, factory: IRCFactory) -> None:
    alice = login(factory, "alice")
    bob = login(factory, "bob")
    alice.send("PRIVMSG bob :one", "PRIVMSG nobody :lost", "PRIVMSG bob,carol :two", "PING x")
    cmds = alice.commands()
    assert [c for c, _ in cmds] == ["401", "PONG"]
    assert [p[-1] for c, p in bob.commands() if c == "PRIVMSG"] == ["one", "two"]
    assert [e.recipient for e in realm.store.items if e.kind == "text"] == [
        "bob@localhost",
        "bob@localhost",
        "carol@localhost",
    ]
    realm.stopService()


def test_a_command_after_privmsgs_is_stored_after_them(
    realm: RealmService, factory: IRCFactory, clock: Clock
) -> None:
    """PRIVMSG then TOPIC in one read: the message is handed to the realm before the
    TOPIC, so the store holds them in the order they were written."""
    alice = login(factory, "alice")
    login(factory, "bob")
    alice.send("JOIN #room")
    alice.lines()
    alice.send("PRIVMSG bob :first", "TOPIC #room :second")
    clock.advance(0)
    stored = [e.body or (e.meta or {}).get("topic") for e in realm.store.items]
    assert stored[-2:] == ["first", "second"], stored
    realm.stopService()


def two_users(caps: str = "", **irc_opts: Any) -> tuple[Clock, Any, Conn, Conn]:
    """A realm (tests/test_irc.py's) with alice (``caps``) and bob logged in on IRC."""
    clock = Clock()
    realm = make_realm(clock, **irc_opts)
    factory = IRCFactory(realm, clock)
    return clock, realm, login(factory, "alice", caps=caps), login(factory, "bob")


class HeldAppends:
    """The realm's store appends wait until :meth:`release` (a commit in progress)."""

    def __init__(self, realm: Any) -> None:
        self.sizes: list[int] = []
        self.waiting: list[tuple[Any, Any, Deferred[Any]]] = []
        self._append = realm.store.append
        realm.store.append = self.append
        realm.store.append_to = self.append_to

    def append(self, items: Any, outbox: Any = ()) -> Deferred[Any]:
        self.sizes.append(len(items))
        d: Deferred[Any] = Deferred()
        self.waiting.append((items, outbox, d))
        return d

    def append_to(self, waiter: Any, items: Any, outbox: Any = ()) -> None:
        self.append(items, outbox).addCallbacks(waiter.callback, waiter.errback)

    def release(self, error: Exception | None = None) -> None:
        waiting, self.waiting = self.waiting, []
        for items, outbox, d in waiting:
            if error is not None:
                d.errback(error)
            else:
                self._append(items, outbox).chainDeferred(d)


def test_replies_of_a_batch_come_in_command_order_after_the_commit() -> None:
    """Echoes, errors found at once and a later command's reply: in the order of the
    commands, although the errors are known before the batch is committed."""
    _clock, realm, alice, bob = two_users(caps="echo-message")
    held = HeldAppends(realm)
    alice.send("PRIVMSG bob :one", "PRIVMSG nobody :lost", "PRIVMSG bob :two", "PING x")
    assert held.sizes == [1, 1]  # (a recipient to look up cuts the run)
    assert alice.lines() == [] and bob.lines() == []
    held.release()
    cmds = alice.commands()
    assert cmds == [
        ("PRIVMSG", ["bob", "one"]),
        ("401", ["alice", "nobody", "No such nick"]),
        ("PRIVMSG", ["bob", "two"]),
        ("PONG", ["localhost", "x"]),
    ]
    assert [p[-1] for c, p in bob.commands()] == ["one", "two"]
    assert not alice.proto.pending_sends and not alice.proto.replies
    realm.stopService()


def test_a_failed_commit_answers_each_privmsg_then_the_next_command() -> None:
    _clock, realm, alice, bob = two_users(caps="echo-message")
    held = HeldAppends(realm)
    alice.send("PRIVMSG bob :one", "NOTICE bob :two", "PRIVMSG bob :three", "PING x")
    held.release(RuntimeError("disk full"))
    assert alice.numerics() == ["400", "400", "400", "PONG"]
    assert bob.lines() == []
    assert not alice.proto.pending_sends and not alice.proto.replies
    # the connection goes on
    alice.send("PRIVMSG bob :again")
    held.release()
    assert alice.commands() == [("PRIVMSG", ["bob", "again"])]
    assert bob.commands() == [("PRIVMSG", ["bob", "again"])]
    realm.stopService()


def test_rate_limited_lines_of_a_batch_answer_in_order() -> None:
    clock = Clock()
    realm = make_realm(clock)
    realm.config.limits.send_burst = 2  # (before the logins: a session's bucket is made then)
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice", caps="echo-message")
    bob = login(factory, "bob")
    alice.send("PRIVMSG bob :1", "PRIVMSG bob :2", "PRIVMSG bob :3", "NOTICE bob :4", "PING x")
    assert alice.numerics() == ["PRIVMSG", "PRIVMSG", "263", "PONG"]  # a NOTICE: no 263
    assert [p[-1] for c, p in bob.commands()] == ["1", "2"]
    realm.stopService()


def test_lines_held_behind_a_channel_change_are_one_batch() -> None:
    """PRIVMSGs read while a JOIN is being stored wait for it, then go as one batch."""
    _clock, realm, alice, bob = two_users()
    held = HeldAppends(realm)
    alice.send("JOIN #room", "PRIVMSG bob :a", "PRIVMSG bob :b", "PRIVMSG bob :c", "PING x")
    assert held.sizes == [1]  # the JOIN's event; the rest waits for it
    held.release()  # the JOIN is stored: the lines after it run, their sends batched
    assert held.sizes == [1, 3]
    held.release()
    assert [c for c, _ in alice.commands()][-1] == "PONG"
    assert [p[-1] for c, p in bob.commands() if c == "PRIVMSG"] == ["a", "b", "c"]
    realm.stopService()


def test_lines_held_by_the_flood_limit_are_batched_when_they_run() -> None:
    clock, realm, alice, bob = two_users(flood_rate=2.0, flood_burst=3)
    clock.advance(10)  # a full bucket
    sizes = count_appends(realm)
    alice.send(*(f"PRIVMSG bob :m{i}" for i in range(7)))
    assert sizes == [3]  # the burst; 4 lines wait
    clock.advance(1.0)  # two tokens: two lines, one batch
    assert sizes == [3, 2]
    clock.advance(1.0)
    assert sizes == [3, 2, 2]
    assert [p[-1] for c, p in bob.commands() if c == "PRIVMSG"] == [f"m{i}" for i in range(7)]
    realm.stopService()


#: PRIVMSG/NOTICE lines made of the pieces a parser trips on (for the lean lane).
MESSAGE_LINES = st.tuples(
    st.sampled_from(["PRIVMSG ", "NOTICE ", "PRIVMSG", "privmsg ", "PRIVMSGX ", "NOTICE  "]),
    st.lists(
        st.sampled_from(["bob", " ", "  ", ":", " :", "\t", "\x0b", "\xa0", ",", "#c", "é", "x"])
        | st.text(max_size=3),
        max_size=10,
    ).map("".join),
).map("".join)


@settings(max_examples=500)
@given(MESSAGE_LINES)
def test_the_lean_lane_parses_as_parse_line(line: str) -> None:
    """quick_message takes a line only if parse_line gives it no tags, PRIVMSG or
    NOTICE, one target without a comma and a non-empty text, and then the same."""
    quick = quick_message(line)
    if quick is None:
        return
    command, target, text = quick
    assert parse_line(line) == ({}, command, [target, text])
    assert target and "," not in target and text


def test_the_lean_lane_takes_plain_messages_only() -> None:
    """The two tests around this one would pass for a lane that took nothing (the
    property skips every line it refuses; the transcripts would match): it takes the
    plain upper-case lines, and refuses the lower-case ones the general path gets."""
    assert quick_message("PRIVMSG bob :one") == ("PRIVMSG", "bob", "one")
    assert quick_message("NOTICE bob :two") == ("NOTICE", "bob", "two")
    assert quick_message("PRIVMSG  bob  :spaced") == ("PRIVMSG", "bob", "spaced")
    assert quick_message("privmsg bob :one") is None
    assert quick_message("PRIVMSG a,b :x") is None


def _transcript(upper: bool) -> tuple[list[str], list[str]]:
    """What alice (away-notify, no echo-message) and bob get for the same lines,
    sent with upper-case commands (the lean lane) or lower-case (the general path)."""
    clock = Clock()
    realm = make_realm(clock)
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice", caps="away-notify")
    bob = login(factory, "bob")
    carol = login(factory, "carol")
    carol.send("AWAY :lunch")
    carol.lines()
    held = HeldAppends(realm)
    lines = [
        "PRIVMSG bob :one",
        "PRIVMSG nobody :lost",
        "NOTICE nobody :quiet",
        "PRIVMSG carol :are you there",
        "PRIVMSG  bob  :spaced",
        "PRIVMSG bob :" + "x" * 480,
        "NOTICE bob :two",
        "PRIVMSG alice :to myself",
        "PING x",
    ]
    if not upper:
        lines = [line[:8].lower() + line[8:] for line in lines]
    alice.send(*lines)
    held.release()
    return alice.lines(), bob.lines() + carol.lines()


def test_the_lean_lane_answers_as_the_general_path() -> None:
    lean, general = _transcript(True), _transcript(False)
    assert lean == general
    # (the message to ourselves is a delivery, written at the commit, before the
    # replies still held behind the batch's pending lines)
    assert [line.split(" ")[1] for line in lean[0]] == ["401", "301", "PRIVMSG", "417", "PONG"]
    assert len(lean[1]) == 4


def test_two_joins_of_a_new_channel_at_once_both_get_in() -> None:
    """Two clients JOIN a channel nobody has made, at once: each gateway saw no such
    group and asked to create it; the second got 403 (group_exists) and had to join
    again.  On a cluster the same happens to a JOIN within a bus round trip of the
    channel's creation on another worker.  The second is now a join."""
    _clock, realm, alice, bob = two_users()
    held = HeldAppends(realm)
    alice.send("JOIN #fresh")
    bob.send("JOIN #fresh")
    held.release()
    held.release()  # bob's join, committed after alice's create
    assert "403" not in bob.numerics()
    assert sorted(realm.groups.groups["#fresh@localhost"].members) == [
        "alice@localhost",
        "bob@localhost",
    ]


#: Message bodies made of the pieces the recipient's line is careful with.
BODIES = st.lists(
    st.sampled_from(["x", " ", "é", "\U0001f600", "\0", "\r", "\n", "\ud800", "y" * 50, "z" * 200]),
    min_size=1,
    max_size=12,
).map("".join)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BODIES)
def test_the_recipients_line_of_a_text_is_the_general_form(factory: IRCFactory, body: str) -> None:
    """A PRIVMSG's line at its recipient, built in one pass when the body fits one line
    (IRCFactory._encode), holds the bytes the general split gives (IRCFactory._split):
    the body, its NULs dropped, one line per body line, long ones split.  (A short
    body of NULs only is an empty text, not the split's one space, as it always was.)"""
    assume(body.replace("\0", ""))
    env = Envelope("m1", "text", "alice@localhost", "bob@localhost", 0.0, body)
    head = f":{factory.directory.mask('alice@localhost')} PRIVMSG bob :".encode()
    assert factory.lines(env, 0) == IRCFactory._split(head, body)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(BODIES, min_size=1, max_size=5), st.booleans())
def test_a_runs_lines_are_its_items_lines(
    factory: IRCFactory, bodies: list[str], notice: bool
) -> None:
    """IRCFactory.run_lines (a run of private texts, one sender to one recipient) gives
    the bytes IRCFactory.lines gives each item, joined, or None (then each item takes
    its own lines)."""
    assume(all(b.replace("\0", "") for b in bodies))
    meta = {"notice": True} if notice else None
    envs = [
        Envelope(f"m{i}", "text", "alice@localhost", "bob@localhost", 0.0, b, meta, i + 1)
        for i, b in enumerate(bodies)
    ]
    joined = factory.run_lines(envs)
    if joined is None:
        assert notice or any("\n" in b or "\r" in b or "\0" in b or len(b) > 100 for b in bodies)
        return
    assert joined == b"".join(factory.lines(env, 0) for env in envs)


def test_a_run_reaches_an_irc_recipient_in_one_call() -> None:
    """Sessions.route_private hands an IRC recipient without tags a run of one
    sender's texts in one call (IRCProtocol.deliver_run, not deliver per item): one
    write, the lines as one by one; a client with server-time gets each item through
    deliver, each line with its tags."""
    _clock, realm, alice, bob = two_users()
    factory = bob.proto.factory
    carol = login(factory, "carol", caps="server-time")
    calls: list[str] = []
    for conn in (bob, carol):
        deliver = conn.proto.deliver
        conn.proto.deliver = lambda env, d=deliver: (calls.append(env.recipient), d(env))
    writes: list[bytes] = []
    write = bob.transport.write
    bob.transport.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    bodies = [f"m{i}" for i in range(4)] + ["\u00e9t\u00e9"]
    alice.send(*(f"PRIVMSG bob :{b}" for b in bodies), *(f"PRIVMSG carol :{b}" for b in bodies))
    assert len(writes) == 1
    assert [p[-1] for c, p in bob.commands() if c == "PRIVMSG"] == bodies
    assert calls == ["carol@localhost"] * 5
    lines = carol.lines()
    assert [line.rsplit(" :", 1)[1] for line in lines if " PRIVMSG " in line] == bodies
    assert all(line.startswith("@time=") for line in lines if " PRIVMSG " in line)
    realm.stopService()


def test_quick_lines_share_a_reply_until_another_line() -> None:
    """The fast lane (IRCProtocol._take_lines): the quick lines of a read between two
    other lines wait behind one Reply, with one PendingSend per target, not one each;
    the batch is one append as before and every line is delivered."""
    _clock, realm, alice, bob = two_users()
    held = HeldAppends(realm)
    alice.send("PRIVMSG bob :1", "PRIVMSG bob :2", "NOTICE bob :3", "PING x", "PRIVMSG bob :4")
    assert held.sizes == [3, 1]  # (the PING hands over the sends read before it)
    replies = list(alice.proto.replies)
    assert len(replies) == 3  # the three lines', the PING's (held), the last line's
    assert [r.sends for r in replies] == [3, 0, 1]
    assert alice.lines() == []
    held.release()
    assert alice.commands() == [("PONG", ["localhost", "x"])]
    assert [p[-1] for c, p in bob.commands()] == ["1", "2", "3", "4"]
    assert not alice.proto.replies and not alice.proto._shared
    realm.stopService()


def test_a_quick_line_refused_at_the_flush_answers_after_an_earlier_lines_commit() -> None:
    """A quick line refused when the batch is handed over (263: the rate limit) while
    the line before it is still being stored: its 263 comes after that line's 400
    when the commit fails, as each line's own Reply would have it (flush_sends gives
    the lines that shared one a Reply each: IRCProtocol._unshare)."""
    clock = Clock()
    realm = make_realm(clock)
    realm.config.limits.send_burst = 1  # (before the logins: a session's bucket is made then)
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice")
    login(factory, "bob")
    held = HeldAppends(realm)
    alice.send("PRIVMSG bob :1", "PRIVMSG bob :2", "NOTICE bob :3", "PING x")
    assert held.sizes == [1]
    assert alice.lines() == []
    held.release(RuntimeError("disk full"))
    assert alice.numerics() == ["400", "263", "PONG"]  # (a NOTICE: no 263)
    assert not alice.proto.replies
    realm.stopService()


def test_a_line_between_quick_lines_is_seen_by_the_next() -> None:
    """What the fast lane found of a target holds only up to the next other line:
    alice's AWAY between two messages to herself makes the second one's 301."""
    _clock, realm, alice, _bob = two_users()
    alice.send("PRIVMSG alice :1", "AWAY :gone", "PRIVMSG alice :2", "PRIVMSG alice :3")
    # (the messages to herself are deliveries, written at the commit, before the
    # second 301, held behind the line before it)
    assert alice.numerics() == ["PRIVMSG", "306", "301", "PRIVMSG", "PRIVMSG", "301"]
    realm.stopService()


#: Lines around the fast lane's quick lines (``{}``: a number making each text its
#: own): quick ones, and every kind that cuts them off or that the realm refuses.
LANE_LINES = st.sampled_from(
    [
        "PRIVMSG bob :{}",
        "PRIVMSG bob :{}",
        "NOTICE bob :{}",
        "PRIVMSG  bob  :{}",
        "PRIVMSG carol :{}",
        "NOTICE carol :{}",
        "PRIVMSG nobody :{}",
        "NOTICE nobody :{}",
        "PRIVMSG alice :{}",
        "PRIVMSG b@d :{}",
        "PRIVMSG bob :{}" + "x" * 440,
        "PRIVMSG bob :{}" + "x" * 480,
        "PRIVMSG bob :{}\x1b[0m",
        "PRIVMSG bob :{}\r",
        "PRIVMSG bob :\r",
        "PRIVMSG bob :",
        "PRIVMSG bob,carol :{}",
        "PRIVMSG #room :{}",
        "JOIN #room",
        "PING {}",
        "AWAY :{}",
        "AWAY",
        "NICK alicia",
        "NICK alice",
    ]
)


def _lane_transcript(
    lines: list[str],
    upper: bool,
    caps: str,
    carol_away: bool,
    burst: int,
    cuts: list[int],
    fail: int | None,
    bare: list[bool],
) -> tuple[list[str], ...]:
    """What alice, bob and carol get, and what is stored, for ``lines`` sent by alice
    (upper-case commands: the fast and lean lanes; lower-case: the general path) in
    the reads ``cuts`` makes of them, each commit held until the reads are in, then
    released in turn (the ``fail``-th with an error).  A line ends with LF alone where
    ``bare`` says so, else with CR LF."""
    clock = Clock()
    realm = make_realm(clock)
    realm.config.limits.send_burst = burst
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice", caps=caps)
    bob = login(factory, "bob")
    carol = login(factory, "carol")
    if carol_away:
        carol.send("AWAY :lunch")
        carol.lines()
    held = HeldAppends(realm)
    if not upper:
        lines = [c.lower() + s + rest for c, s, rest in (line.partition(" ") for line in lines)]
    ends = [*bare, *([False] * len(lines))][: len(lines)]
    data = "".join(
        line + ("\n" if end else "\r\n") for line, end in zip(lines, ends, strict=True)
    ).encode()
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > start:
            alice.proto.dataReceived(data[start:cut])
            start = cut
    for k in range(50):  # (each release may start more appends: lines held behind a JOIN)
        if not held.waiting:
            break
        held.release(RuntimeError("disk full") if k == fail else None)
    stored = [f"{e.kind} {e.recipient} {e.body}" for e in realm.store.items]
    out = (alice.lines(), bob.lines(), carol.lines(), stored)
    assert not alice.proto.replies and not alice.proto._shared
    realm.stopService()
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(LANE_LINES, min_size=1, max_size=12),
    st.sampled_from(["", "echo-message", "away-notify"]),
    st.booleans(),
    st.sampled_from([1000, 3]),
    st.lists(st.integers(0, 600), max_size=3),
    st.none() | st.integers(0, 2),
    st.lists(st.booleans(), max_size=12),
)
def test_the_fast_lane_answers_as_the_general_path(
    lines: list[str],
    caps: str,
    carol_away: bool,
    burst: int,
    cuts: list[int],
    fail: int | None,
    bare: list[bool],
) -> None:
    """The fast lane (IRCProtocol._take_lines) and the lean lane against the general
    path (the same lines in lower case), byte for byte: every connection's lines and
    the store, with held commits released in turn (one may fail), a rate limit that
    refuses some, reads cut anywhere."""
    lines = [line.format(k) for k, line in enumerate(lines)]
    args = (caps, carol_away, burst, cuts, fail, bare)
    assert _lane_transcript(lines, True, *args) == _lane_transcript(lines, False, *args)
