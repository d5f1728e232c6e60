"""IRCv3 ``draft/read-marker`` on the IRC gateway (issue 17): ``MARKREAD`` sets and
gets the realm's read markers by message time, the user's markers moved elsewhere
reach the IRC client as ``MARKREAD``, a channel's comes with its JOIN before
``RPL_ENDOFNAMES``; bad input is a ``FAIL``, and MARKREAD is rate-limited."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock

from chatproto.client import connect as native_connect
from chatproto.envelope import Envelope, conversation_key
from chatproto.irc import IRCFactory, parse_line
from chatproto.irc.lines import server_time
from chatproto.irc.reading import parse_timestamp
from chatproto.realm import RealmService
from chatproto.realm.reading import MARK_BURST
from chatproto.testing import frame, frames
from tests.conftest import until
from tests.test_irc import PW, Conn, factory_fixture, login, parsed, realm_fixture  # noqa: F401
from tests.test_irc_conformance_loopback import connect as raw_connect
from tests.test_irc_loopback import irc_gateway
from tests.test_reading import logged_in_clear

CAPS = "draft/read-marker server-time message-tags"


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1767225600)  # 2026-01-01
    return clock


def markreads(c: Conn) -> list[list[str]]:
    return [params for _, cmd, params in parsed(c) if cmd == "MARKREAD"]


def stamp(env: Envelope) -> str:
    return "timestamp=" + server_time(env.ts)


def post(factory: IRCFactory, clock: Clock, sender: str, to: str, body: str, dt: float) -> Any:
    clock.advance(dt)
    return factory.realm.post(sender, to, body).result


def marker(realm: RealmService, user: str, conv: str) -> int:
    markers: dict[str, int] = realm.store.read_markers(conv).result
    return markers.get(user, 0)


def test_the_capability_is_offered(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("CAP LS 302")
    [(_, cmd, params)] = parsed(c)
    assert cmd == "CAP" and "draft/read-marker" in params[-1].split()


def test_parse_timestamp() -> None:
    assert parse_timestamp("timestamp=2026-01-01T00:00:01.250Z") == 1767225601.25
    for bad in (
        "*",
        "2026-01-01T00:00:01.250Z",
        "timestamp=2026-01-01T00:00:01Z",
        "timestamp=2026-13-01T00:00:01.250Z",
        "timestamp=2026-01-01T24:00:01.250Z",
        "timestamp=2026-02-31T00:00:01.250Z",
        "timestamp=0000-01-01T00:00:01.250Z",
        "timestamp=2026-01-01T00:00:01.250Z ",
        "timestamp=२०२६-01-01T00:00:01.250Z",  # digits of another script
    ):
        assert parse_timestamp(bad) is None, bad


@given(st.text(max_size=40) | st.from_regex(r"timestamp=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"))
@settings(max_examples=300)
def test_parse_timestamp_any_text(text: str) -> None:
    """Any parameter: a time, or None (a FAIL), never an exception."""
    ts = parse_timestamp(text)
    assert ts is None or server_time(ts) == text.partition("=")[2]


def test_set_and_get_a_private_marker_by_time(factory: IRCFactory, clock: Clock) -> None:
    realm = factory.realm
    alice = login(factory, "alice", CAPS)
    first = post(factory, clock, "bob", "alice", "one", 10.25)
    second = post(factory, clock, "bob", "alice", "two", 10.5)
    alice.lines()
    conv = conversation_key("alice@localhost", "bob@localhost")
    alice.send("MARKREAD bob")
    assert markreads(alice) == [["bob", "*"]]  # no marker yet
    alice.send(f"MARKREAD bob {stamp(first)}")
    assert markreads(alice) == [["bob", stamp(first)]]  # one answer, not two
    assert marker(realm, "alice@localhost", conv) == first.pos
    # A time between the two messages: read up to the first.
    alice.send(f"MARKREAD bob timestamp={server_time(first.ts + 5)}")
    assert markreads(alice) == [["bob", stamp(first)]]
    # An older time: the marker does not go back; the answer is the newer one.
    alice.send("MARKREAD bob timestamp=2025-01-01T00:00:00.000Z")
    assert markreads(alice) == [["bob", stamp(first)]]
    assert marker(realm, "alice@localhost", conv) == first.pos
    # The second message's time (in its millisecond: the tag has no more).
    alice.send(f"MARKREAD bob {stamp(second)}", "MARKREAD bob")
    assert markreads(alice) == [["bob", stamp(second)], ["bob", stamp(second)]]
    assert marker(realm, "alice@localhost", conv) == second.pos


def test_a_marker_by_time_walks_only_the_items_above_the_marker(
    factory: IRCFactory, clock: Clock
) -> None:
    """The walk back for the newest item before a time (Store.read_position) starts
    above the user's marker: what lies below cannot move it (markers never go back),
    and an old time walked every item of the conversation (the whole group, for a
    large one).  The answers are the same."""
    realm = factory.realm
    alice = login(factory, "alice", CAPS)
    first = post(factory, clock, "bob", "alice", "one", 10.25)
    post(factory, clock, "bob", "alice", "two", 10.5)
    alice.lines()
    floors: list[int] = []
    read_position = realm.store.read_position

    def spy(conv: str, before_ts: float, floor: int) -> Any:
        floors.append(floor)
        return read_position(conv, before_ts, floor)

    realm.store.read_position = spy  # type: ignore[method-assign]
    reads: list[str] = []
    read_markers = realm.store.read_markers

    def count(conv: str) -> Any:
        reads.append(conv)
        return read_markers(conv)

    realm.store.read_markers = count  # type: ignore[method-assign]
    alice.send(f"MARKREAD bob {stamp(first)}")
    assert markreads(alice) == [["bob", stamp(first)]]
    del reads[:]
    alice.send("MARKREAD bob timestamp=2025-01-01T00:00:00.000Z")
    assert markreads(alice) == [["bob", stamp(first)]]
    assert floors == [0, first.pos]
    assert len(reads) == 1  # nothing above the marker: the markers are read once


def test_markread_fed_one_byte_at_a_time(factory: IRCFactory, clock: Clock) -> None:
    alice = login(factory, "alice", CAPS)
    env = post(factory, clock, "bob", "alice", "one", 1.5)
    alice.lines()
    alice.send(f"MARKREAD bob {stamp(env)}", bytewise=True)
    assert markreads(alice) == [["bob", stamp(env)]]


def test_markers_moved_elsewhere_reach_the_irc_client(factory: IRCFactory, clock: Clock) -> None:
    realm = factory.realm
    alice = login(factory, "alice", CAPS)
    plain = login(factory, "alice", "server-time")  # another IRC client, without the cap
    bob = login(factory, "bob", CAPS)
    env = post(factory, clock, "bob", "alice", "one", 3.0)
    alice.lines(), plain.lines(), bob.lines()
    phone, t = logged_in_clear(realm, clock, "alice", password=PW)
    phone.dataReceived(frame({"type": "mark_read", "id": 3, "with": "bob", "pos": env.pos}))
    assert frames(t)[-1] == {"type": "result", "id": 3, "with": "bob@localhost", "pos": env.pos}
    assert markreads(alice) == [["bob", stamp(env)]]
    assert markreads(plain) == []
    # bob sees alice's read receipt on the native protocol, never as MARKREAD (the
    # spec's marker is the user's own).
    assert markreads(bob) == []
    # A marker that does not move sends nothing.
    phone.dataReceived(frame({"type": "mark_read", "id": 4, "with": "bob", "pos": 1}))
    assert markreads(alice) == []
    # The other IRC connection's MARKREAD reaches this one too.
    reply = post(factory, clock, "alice", "bob", "two", 1.0)
    alice.lines()
    bob.send(f"MARKREAD alice {stamp(reply)}")
    assert markreads(bob) == [["alice", stamp(reply)]]
    assert markreads(alice) == []  # bob's marker: not alice's business


def test_a_channel_marker_comes_with_its_join_before_end_of_names(
    factory: IRCFactory, clock: Clock
) -> None:
    realm = factory.realm
    alice = login(factory, "alice", CAPS)
    alice.send("JOIN #t")
    cmds = [cmd for _, cmd, _ in parsed(alice)]
    assert cmds[-2:] == ["MARKREAD", "366"]
    carol = login(factory, "carol", "")
    carol.send("JOIN #t")
    assert "MARKREAD" not in [cmd for _, cmd, _ in parsed(carol)]  # no cap: nothing
    env = post(factory, clock, "carol", "#t", "hi", 2.0)
    alice.lines()
    alice.send(f"MARKREAD #t {stamp(env)}")
    assert markreads(alice) == [["#t", stamp(env)]]
    assert marker(realm, "alice@localhost", "#t@localhost") == env.pos
    # On the next login the channel's burst carries the marker.
    again = Conn(factory)
    again.send("CAP LS 302", f"CAP REQ :{CAPS}", f"PASS {PW}", "NICK alice", "USER u 0 * :A")
    again.send("CAP END")
    lines = [(cmd, params) for _, cmd, params in parsed(again)]
    at = lines.index(("MARKREAD", ["#t", stamp(env)]))
    assert lines[at + 1][0] == "366" and lines[at - 1][0] == "353"


def test_bad_markread_input_is_a_fail(factory: IRCFactory, clock: Clock) -> None:
    alice = login(factory, "alice", CAPS)
    carol = login(factory, "carol", CAPS)
    carol.send("JOIN #private")
    carol.lines()
    cases = {
        "MARKREAD": ["MARKREAD", "NEED_MORE_PARAMS"],
        "MARKREAD bob *": ["MARKREAD", "INVALID_PARAMS", "*"],
        "MARKREAD bob yesterday": ["MARKREAD", "INVALID_PARAMS", "yesterday"],
        "MARKREAD bob timestamp=2026-01-01": ["MARKREAD", "INVALID_PARAMS"],
        "MARKREAD nobody": ["MARKREAD", "INVALID_PARAMS", "nobody"],
        "MARKREAD bad!nick": ["MARKREAD", "INVALID_PARAMS", "bad!nick"],
        "MARKREAD #nochannel": ["MARKREAD", "INVALID_PARAMS", "#nochannel"],
        "MARKREAD #private": ["MARKREAD", "INVALID_PARAMS", "#private"],  # not a member
    }
    for line, want in cases.items():
        alice.send(line)
        [(_, cmd, params)] = parsed(alice)
        assert cmd == "FAIL" and params[: len(want)] == want, (line, params)
    assert alice.proto.state == "ready"  # errors keep the connection


def test_markread_is_rate_limited(factory: IRCFactory, clock: Clock) -> None:
    alice = login(factory, "alice", CAPS)
    post(factory, clock, "bob", "alice", "one", 1.0)
    alice.lines()
    alice.send(*["MARKREAD bob"] * (MARK_BURST + 1))
    got = parsed(alice)
    assert [cmd for _, cmd, _ in got[:-1]] == ["MARKREAD"] * MARK_BURST
    _, cmd, params = got[-1]
    assert cmd == "FAIL" and params[:3] == ["MARKREAD", "RATE_LIMITED", "bob"]
    clock.advance(1)
    alice.send("MARKREAD bob")
    assert markreads(alice) == [["bob", "*"]]


# over loopback TCP with the SQLite store ----------------------------------------------


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    yield from irc_gateway(tmp_path, ("alice", "bob"), PW)


@pytest_twisted.inlineCallbacks
def test_read_markers_between_irc_and_native_over_tcp(gateway: Any) -> None:
    realm, port, native_addr = gateway
    alice = yield raw_connect(port, "alice", CAPS, PW)
    bob = yield native_connect(_reactor, native_addr, "bob", PW)
    phone = yield native_connect(_reactor, native_addr, "alice", PW)
    sent = yield bob.protocol.request("send", to="alice", body="one")
    yield bob.protocol.request("send", to="alice", body="two")
    yield until(lambda: sum(1 for c, _ in alice.commands() if c == "PRIVMSG") == 2)
    first = next(parse_line(line) for line in alice.got if " PRIVMSG " in line)
    alice.got = []
    time_one = first[0]["time"]
    # IRC -> realm: the native device sees the marker (its read notice).
    alice.send(f"MARKREAD bob timestamp={time_one}")
    yield until(lambda: alice.has("MARKREAD"))
    assert alice.take() == [("MARKREAD", ["bob", f"timestamp={time_one}"])]
    conv = conversation_key("alice@localhost", "bob@localhost")
    markers = yield realm.store.read_markers(conv)
    assert markers["alice@localhost"] == sent["pos"]
    # realm -> IRC: the native device reads everything; the IRC client is told.
    convs = yield phone.protocol.request("conversations")
    last = convs["conversations"][0]["last"]
    yield phone.protocol.request("mark_read", **{"with": "bob", "pos": last["pos"]})
    yield until(lambda: alice.has("MARKREAD"))
    assert alice.take() == [("MARKREAD", ["bob", "timestamp=" + server_time(last["ts"])])]
    yield bob.close()
    yield phone.close()


class HeldMarkers:
    """The store's read_markers answers wait until :meth:`release` (a slow read)."""

    def __init__(self, realm: RealmService) -> None:
        from twisted.internet.defer import Deferred

        self.held: list[tuple[Deferred[Any], Any]] = []
        self.read = realm.store.read_markers

        def held(conv: str) -> Any:
            d: Deferred[Any] = Deferred()
            self.held.append((d, self.read(conv)))
            return d

        realm.store.read_markers = held  # type: ignore[method-assign]

    def release(self) -> None:
        held, self.held = self.held, []
        for d, answer in held:
            answer.chainDeferred(d)


def test_a_slow_marker_read_keeps_the_joins_replies_before_the_next_commands(
    factory: IRCFactory, clock: Clock
) -> None:
    """JOIN then PING in one read, the channel's marker read slow: the JOIN's MARKREAD
    and 366 are its replies, so the PONG comes after them (it overtook them when the
    JOIN ended with its group event, before the marker was read)."""
    alice = login(factory, "alice", CAPS)
    markers = HeldMarkers(factory.realm)
    alice.send("JOIN #t", "PING :x")
    assert markers.held
    assert "PONG" not in [cmd for _, cmd, _ in parsed(alice)]
    markers.release()
    cmds = [cmd for _, cmd, _ in parsed(alice)]
    assert cmds[-3:] == ["MARKREAD", "366", "PONG"], cmds


def test_a_slow_marker_read_at_registration_holds_the_next_commands(
    factory: IRCFactory, clock: Clock
) -> None:
    """At registration each channel of the user gets its burst; with its marker read
    slow, a PING after registration is answered after that channel's 366."""
    alice = login(factory, "alice", CAPS)
    alice.send("JOIN #t")
    parsed(alice)
    markers = HeldMarkers(factory.realm)
    again = Conn(factory)
    again.send("CAP LS 302", f"CAP REQ :{CAPS}", f"PASS {PW}", "NICK alice", "USER u 0 * :A")
    again.send("CAP END", "PING :y")
    clock.advance(0)
    assert markers.held
    assert "PONG" not in [cmd for _, cmd, _ in parsed(again)]
    markers.release()
    cmds = [cmd for _, cmd, _ in parsed(again)]
    assert cmds[-3:] == ["MARKREAD", "366", "PONG"], cmds


@pytest_twisted.inlineCallbacks
def test_a_slow_marker_read_keeps_the_joins_replies_first_over_tcp(gateway: Any) -> None:
    """Over loopback TCP (SQLite store): JOIN then PING in one write while the
    channel's marker read is held; the PONG comes after the JOIN's MARKREAD and 366."""
    realm, port, _native = gateway
    alice = yield raw_connect(port, "alice", CAPS, PW)
    alice.take()
    markers = HeldMarkers(realm)
    alice.send("JOIN #slow", "PING :z")
    yield until(lambda: markers.held)
    yield until(lambda: alice.has("353"))
    assert not alice.has("PONG")
    markers.release()
    yield until(lambda: alice.has("PONG"))
    cmds = [cmd for cmd, _ in alice.take()]
    assert cmds.index("MARKREAD") < cmds.index("366") < cmds.index("PONG"), cmds
