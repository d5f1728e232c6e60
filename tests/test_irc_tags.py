"""Client tags (issue 19, cause 7): IRCv3 client-only tags kept with a message, and
TAGMSG (ephemeral tags on their own) relayed between IRC users and to native
sessions (chatproto.realm.tags).  StringTransport with a MemoryStore realm, then
tests over loopback TCP with a SQLite realm."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock

from chatproto.client import connect as native_connect
from chatproto.envelope import conversation_key
from chatproto.errors import ChatError
from chatproto.irc import IRCFactory, parse_line
from chatproto.realm.messaging import text_meta
from chatproto.realm.tags import MAX_TAG_DATA, check_tags, client_tags, tag_data
from chatproto.testing import connect_string_transport, frame, frames
from tests.conftest import until
from tests.test_irc import PW, Conn, clock_fixture, factory_fixture, login, parsed, realm_fixture  # noqa: F401
from tests.test_irc import make_realm as make_memory_realm
from tests.test_irc_conformance_loopback import connect as raw_connect
from tests.test_irc_loopback import irc_gateway

CAPS = "message-tags echo-message server-time labeled-response batch"


def channel(factory: IRCFactory, *conns: Conn) -> None:
    for c in conns:
        c.send("JOIN #t")
    for c in conns:
        c.lines()


# the rule (realm) --------------------------------------------------------------------


def test_check_tags_rule() -> None:
    assert check_tags({"+typing": "active", "+draft/reply": "12"}) == {
        "+typing": "active",
        "+draft/reply": "12",
    }
    assert check_tags({"+example.org/x-y": ""}) == {"+example.org/x-y": ""}
    for bad in (
        {},
        [],
        {"typing": "active"},  # not client-only
        {"+a b": "x"},
        {"+": "x"},
        {"+a": 1},
        {"+a": "line\nbreak"},  # a value is a one-line label
        {"+a": "\u202e"},
        {"+a": "\ud800"},  # not valid Unicode
    ):
        with pytest.raises(ChatError) as e:
            check_tags(bad)
        assert e.value.code == "bad_request", bad
    at_limit = {"+a": "x" * (MAX_TAG_DATA - 3)}
    assert len(tag_data(at_limit)) == MAX_TAG_DATA
    check_tags(at_limit)
    with pytest.raises(ChatError) as e:
        check_tags({"+a": "x" * (MAX_TAG_DATA - 2)})
    assert e.value.code == "too_large"
    # Measured as IRC writes them: escapes count.
    with pytest.raises(ChatError):
        check_tags({"+a": ";" * (MAX_TAG_DATA // 2)})


def test_client_tags_keeps_only_client_only_tags() -> None:
    assert client_tags({"label": "1", "+a": "b", "time": "x", "+bad name": "c", "+": ""}) == {
        "+a": "b"
    }


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=5))
def test_check_tags_any_input_is_a_value_or_a_chat_error(tags: dict[str, str]) -> None:
    try:
        out = check_tags(tags)
    except ChatError as e:
        assert e.code in ("bad_request", "too_large")
    else:
        assert out == tags


def test_text_meta_from_other_realms_accepts_tags_checked() -> None:
    assert text_meta({"tags": {"+a": "1"}}) == {"tags": {"+a": "1"}}
    assert text_meta({"notice": True, "tags": {"+a": "1"}}) == {
        "notice": True,
        "tags": {"+a": "1"},
    }
    for bad in ({"tags": {"a": "1"}}, {"notice": False}, {"other": 1}, {}, "x"):
        with pytest.raises(ChatError):
            text_meta(bad)


# messages with client tags -------------------------------------------------------------


def test_privmsg_client_tags_relayed_to_message_tags_clients_only(factory: IRCFactory) -> None:
    alice = login(factory, "alice", "message-tags")
    bob = login(factory, "bob", "message-tags echo-message")
    carol = login(factory, "carol", "server-time")
    channel(factory, alice, bob, carol)
    alice.send("@+baz=bat;fizz=buzz;+draft/reply=7 PRIVMSG #t hi")
    [(tags, cmd, params)] = parsed(bob)
    assert cmd == "PRIVMSG" and params == ["#t", "hi"]
    assert tags["+baz"] == "bat" and tags["+draft/reply"] == "7" and "msgid" in tags
    assert "fizz" not in tags  # not a client-only tag
    [(tags, _, _)] = parsed(carol)
    assert set(tags) == {"time"}  # no client tags without message-tags
    # The echo carries them too, with the same msgid.
    bob.send(r"@+a=x\sy\:z PRIVMSG #t :back")
    [(echo_tags, _, _)] = parsed(bob)
    [(tags, _, _)] = parsed(alice)
    assert tags["+a"] == echo_tags["+a"] == "x y;z"
    assert tags["msgid"] == echo_tags["msgid"]


def test_tags_are_stored_with_the_message_and_replayed(factory: IRCFactory) -> None:
    realm = factory.realm
    alice = login(factory, "alice", "message-tags")
    alice.send("@+draft/reply=1 PRIVMSG bob :hello")
    alice.lines()
    items: list[Any] = []  # the item as stored
    key = conversation_key("alice@localhost", "bob@localhost")
    realm.store.history(key, None, None, 10, 0).addCallback(items.extend)
    assert items and items[-1].meta == {"tags": {"+draft/reply": "1"}}
    # bob logs in later: the backlog carries the tags.
    bob = Conn(factory)
    bob.send("CAP REQ message-tags", f"PASS {PW}", "NICK bob", "USER u 0 * :B", "CAP END")
    lines = bob.lines()
    assert any("+draft/reply=1" in line and "PRIVMSG bob :hello" in line for line in lines)


def test_native_send_with_tags_reaches_irc(factory: IRCFactory) -> None:
    realm = factory.realm
    bob = login(factory, "bob", "message-tags")
    proto, t = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    proto.dataReceived(frame({"type": "login", "id": 2, "user": "alice", "password": PW}))
    frames(t)
    proto.dataReceived(
        frame({"type": "send", "id": 3, "to": "bob", "body": "hi", "tags": {"+draft/react": ":)"}})
    )
    assert frames(t)[-1]["type"] == "result"
    [(tags, cmd, _params)] = parsed(bob)
    assert cmd == "PRIVMSG" and tags["+draft/react"] == ":)"
    proto.dataReceived(
        frame({"type": "send", "id": 4, "to": "bob", "body": "x", "tags": {"a": ""}})
    )
    assert frames(t)[-1]["code"] == "bad_request"


# TAGMSG ----------------------------------------------------------------------------------


def test_tagmsg_to_channel_relayed_and_echoed_with_one_msgid(factory: IRCFactory) -> None:
    alice = login(factory, "alice", "message-tags")
    bob = login(factory, "bob", "message-tags echo-message")
    carol = login(factory, "carol", "server-time")  # no message-tags: gets nothing
    channel(factory, alice, bob, carol)
    bob.send(r"@+buzz=fizz\:buzz;cat=dog;+steel=wootz TAGMSG #t")
    [(echo, cmd, params)] = parsed(bob)
    assert cmd == "TAGMSG" and params == ["#t"]
    [(got, cmd, params)] = parsed(alice)
    assert cmd == "TAGMSG" and params == ["#t"]
    assert got["+buzz"] == "fizz;buzz" and got["+steel"] == "wootz" and "cat" not in got
    assert got["msgid"] == echo["msgid"] and not got["msgid"].isdigit()  # not a position
    assert carol.lines() == []


def test_tagmsg_dm_byte_by_byte_with_label(factory: IRCFactory) -> None:
    alice = login(factory, "alice", CAPS)
    bob = login(factory, "bob", "message-tags")
    alice.send("@label=L1;+typing=active TAGMSG bob", bytewise=True)
    [(echo, cmd, params)] = parsed(alice)
    assert cmd == "TAGMSG" and echo["label"] == "L1" and echo["+typing"] == "active"
    [(got, cmd, params)] = parsed(bob)
    assert cmd == "TAGMSG" and params == ["bob"] and got["+typing"] == "active"
    assert "label" not in got


def test_tagmsg_without_echo_is_acked_and_to_self_comes_back(factory: IRCFactory) -> None:
    alice = login(factory, "alice", "message-tags labeled-response batch")
    alice.send("@label=a;+typing=active TAGMSG bob")
    [(tags, cmd, _)] = parsed(alice)
    assert cmd == "ACK" and tags["label"] == "a"
    alice.send("@+draft/react=x TAGMSG alice")  # to oneself: received as any DM
    [(tags, cmd, params)] = parsed(alice)
    assert cmd == "TAGMSG" and params == ["alice"] and tags["+draft/react"] == "x"


def test_tagmsg_errors_and_nothing_to_relay(factory: IRCFactory) -> None:
    alice = login(factory, "alice", "message-tags")
    login(factory, "bob", "message-tags").send("JOIN #b")
    alice.send("TAGMSG bob")  # no client-only tags: nothing happens
    alice.send("@label=x TAGMSG bob")
    assert alice.lines() == []
    alice.send("@+typing=active TAGMSG nobody", "@+typing=active TAGMSG #nowhere")
    assert [c for c, _ in alice.commands()] == ["401", "403"]
    alice.send("@+typing=active TAGMSG #b")  # not a member
    assert alice.numerics() == ["404"]
    alice.send("@+typing=a TAGMSG a,b,c,d,e")
    assert alice.numerics() == ["407"]
    alice.send("@+bad=\x1b[31m TAGMSG bob")  # a value is a one-line label
    assert alice.numerics() == ["400"]


def test_tags_over_4094_bytes_get_417(factory: IRCFactory) -> None:
    alice = login(factory, "alice", "message-tags echo-message")
    bob = login(factory, "bob", "message-tags")
    channel(factory, alice, bob)
    at_limit = "@foo=bar;+baz={} TAGMSG #t".format("a" * 4081)
    assert at_limit.index("TAGMSG") == 4096
    alice.send(at_limit)
    assert parsed(alice)[0][0]["+baz"] == "a" * 4081
    assert parsed(bob)[0][0]["+baz"] == "a" * 4081
    alice.send("@foo=bar;+baz={} TAGMSG #t".format("a" * 4082))
    assert alice.numerics() == ["417"]
    alice.send("@foo=bar;+baz={} PRIVMSG #t {}".format("a" * 4082, "b" * 495))
    assert alice.numerics() == ["417"]
    assert bob.lines() == []


def test_tagmsg_reaches_native_sessions_and_native_tags_reach_irc(
    factory: IRCFactory, clock: Clock
) -> None:
    realm = factory.realm
    bob = login(factory, "bob", "message-tags server-time")
    proto, t = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    proto.dataReceived(frame({"type": "login", "id": 2, "user": "alice", "password": PW}))
    clock.advance(0)  # the backlog (none), then live
    assert frames(t)[-1]["type"] in ("synced", "presence")
    bob.send("@+typing=active TAGMSG alice")
    [push] = [f for f in frames(t) if f["type"] == "tags"]
    assert push["from"] == "bob@localhost" and push["to"] == "alice@localhost"
    assert push["tags"] == {"+typing": "active"} and isinstance(push["id"], str)
    # native -> IRC: the tags request, answered with the notice's id.
    proto.dataReceived(frame({"type": "tags", "id": 3, "to": "bob", "tags": {"+typing": "done"}}))
    [result] = frames(t)
    assert result["type"] == "result" and result["id"] == 3
    [(tags, cmd, params)] = parsed(bob)
    assert cmd == "TAGMSG" and params == ["bob"] and tags["+typing"] == "done"
    assert tags["msgid"] == result["tags_id"] and "time" in tags
    proto.dataReceived(frame({"type": "tags", "id": 4, "to": "bob", "tags": {"typing": "x"}}))
    assert frames(t)[-1]["code"] == "bad_request"
    proto.dataReceived(frame({"type": "tags", "id": 5, "to": "nobody", "tags": {"+a": "x"}}))
    assert frames(t)[-1]["code"] == "no_such_user"


def test_tagmsg_is_rate_limited_like_messages(clock: Clock) -> None:
    realm = make_memory_realm(clock)
    realm.config.limits.send_rate = 1.0
    realm.config.limits.send_burst = 2
    factory = IRCFactory(realm, clock)
    alice = login(factory, "alice", "message-tags")
    alice.send(*["@+typing=active TAGMSG bob"] * 3)
    assert alice.numerics() == ["263"]


# over loopback TCP ---------------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    yield from irc_gateway(tmp_path, ("alice", "bob", "carol"), PW)


@pytest_twisted.inlineCallbacks
def test_client_tags_and_tagmsg_over_tcp(gateway: Any) -> None:
    _, port, native_addr = gateway
    alice = yield raw_connect(port, "alice", "message-tags echo-message", PW)
    bob = yield raw_connect(port, "bob", "message-tags", PW)
    alice.send("JOIN #t")
    yield until(lambda: alice.has("366"))
    bob.send("JOIN #t")
    yield until(lambda: bob.has("366") and alice.has("JOIN", "#t") and len(alice.got) > 3)
    alice.take(), bob.take()
    alice.send("@+draft/reply=1 PRIVMSG #t :re", "@+typing=active TAGMSG #t")
    yield until(lambda: bob.has("TAGMSG") and bob.has("PRIVMSG"))
    got = [parse_line(line) for line in bob.got]
    assert [c for _, c, _ in got] == ["PRIVMSG", "TAGMSG"]  # in the order sent
    assert got[0][0]["+draft/reply"] == "1" and got[1][0]["+typing"] == "active"
    # A native client sends tags on their own to the channel.
    carol = yield native_connect(_reactor, native_addr, "carol", PW)
    yield carol.protocol.request("join", group="#t")
    result = yield carol.protocol.request("tags", to="#t", tags={"+typing": "paused"})
    yield until(lambda: any(f"msgid={result['tags_id']}" in line for line in bob.got))
    yield carol.close()


@pytest_twisted.inlineCallbacks
def test_an_irc_reply_is_a_realm_reply_over_tcp(gateway: Any) -> None:
    """``@+draft/reply=<msgid> PRIVMSG`` over a real connection: the native sender of
    the message it names gets an item whose ``reply_to`` is that message's id."""
    _, port, native_addr = gateway
    got: list[dict[str, Any]] = []
    carol = yield native_connect(_reactor, native_addr, "carol", PW, on_message=got.append)
    alice = yield raw_connect(port, "alice", "message-tags", PW)
    sent = yield carol.send("alice", "question")
    yield until(lambda: alice.has("PRIVMSG"))
    [(tags, _, params)] = [parse_line(line) for line in alice.got if " PRIVMSG " in line]
    assert params == ["alice", "question"]
    alice.send(f"@+draft/reply={tags['msgid']} PRIVMSG carol :answer")
    yield until(lambda: any(m.get("body") == "answer" for m in got))
    answer = next(m for m in got if m.get("body") == "answer")
    assert answer["from"] == "alice@localhost"
    assert answer["meta"] == {"reply_to": sent["msg_id"]}
    yield carol.close()


def test_a_labeled_reaction_to_a_known_message_echoes_with_its_label(
    factory: IRCFactory,
) -> None:
    """+draft/react naming a msgid the gateway rendered is stored as a reaction (issue
    17); its echo still answers the labeled TAGMSG (label on the echo only)."""
    alice = login(factory, "alice", CAPS)
    bob = login(factory, "bob", CAPS)
    channel(factory, alice, bob)
    bob.send("PRIVMSG #t :react to me")
    bob.lines()
    [(tags, _, _)] = parsed(alice)
    msgid = tags["msgid"]
    alice.send(f"@label=L7;+draft/reply={msgid};+draft/react=x TAGMSG #t")
    [(echo, cmd, params)] = parsed(alice)
    assert cmd == "TAGMSG" and params == ["#t"] and echo["label"] == "L7"
    assert echo["+draft/react"] == "x" and echo["+draft/reply"] == msgid
    [(got, cmd, _)] = parsed(bob)
    assert cmd == "TAGMSG" and "label" not in got and got["msgid"] == echo["msgid"]
    assert [e.kind for e in factory.realm.store.items][-1] == "reaction"  # stored
    assert not alice.proto.pending_sends


# what a stored item holds cannot break an IRC line -------------------------------------


def test_a_stored_item_with_hostile_ids_and_tags_gives_well_formed_irc_lines(
    factory: IRCFactory,
) -> None:
    """Defence in depth: an item stored before the checks of today (a peer's item
    id was only length-checked; a row written by an older release) may hold CR/LF,
    NUL or spaces in its id, ``reply_to``, tag names or values, or tags that are not
    an object.  Its ``msgid`` is its position, a tag value is escaped (NUL, which
    IRCv3 cannot escape, dropped), a tag that is not a well-formed client tag is left
    out: each item is one line, whatever it holds."""
    from chatproto.envelope import Envelope

    evil = "evil\r\nQUIT :x \x00"
    metas: list[Any] = [
        {
            "tags": {
                "+ok": "a\x00b c\r\nd;e\\",
                "+bad name\r\nQUIT": "x",
                "+n": 5,
                "msgid": "1\r\nQUIT",
            },
            "reply_to": evil,
        },
        {"tags": "not an object", "reply_to": ["x"]},
        {"tags": ["+a"]},
    ]
    items = [
        Envelope(
            id=f"{evil}{n}",
            kind="text",
            sender="alice@localhost",
            recipient="bob@localhost",
            ts=1.0,
            body=f"m{n}",
            meta=meta,
        )
        for n, meta in enumerate(metas)
    ]
    factory.realm.store.append(items)
    bob = Conn(factory)
    bob.send("CAP REQ message-tags", f"PASS {PW}", "NICK bob", "USER u 0 * :B", "CAP END")
    data = bob.transport.read()
    assert b"\x00" not in data
    got = [line for line in data.decode().split("\r\n") if " PRIVMSG bob " in line]
    assert len(got) == 3, got
    parsed_lines = [parse_line(line) for line in got]
    assert [params for _, _, params in parsed_lines] == [["bob", f"m{n}"] for n in range(3)]
    first = parsed_lines[0][0]
    assert first["+ok"] == "ab c\r\nd;e\\"  # escaped on the wire, read back intact
    assert set(first) == {"msgid", "+ok"}
    assert first["msgid"] == str(items[0].pos)
    assert [set(tags) for tags, _, _ in parsed_lines[1:]] == [{"msgid"}, {"msgid"}]


def test_format_line_writes_one_line_whatever_its_parameters_hold() -> None:
    """Defence in depth: a nick, reason or topic that reached the gateway with CR, LF
    or NUL in it (from a peer realm or an old row) cannot make a line of its own."""
    from chatproto.irc.lines import format_line

    line = format_line("a!a@h", "KICK", "#dev", "x\r\nQUIT :forged", "bye\x00\nnow")
    assert line == b":a!a@h KICK #dev x__QUIT_:forged :bye now\r\n"  # (one parameter)
    assert format_line("s", "PING", "x") == b":s PING x\r\n"
