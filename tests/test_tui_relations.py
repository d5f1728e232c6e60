"""Replies, reactions, edits and deletes in the TUI (issue 17): the model and markup,
then the real ``chatproto tui`` in tmux against a real ``twistd chatrealm`` (see
tests/test_tui_tmux.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto import client
from chatproto.irc import parse_line
from chatproto.tui import commands
from chatproto.tui.controller import ChatController
from chatproto.tui.model import STATUS, ChatModel, MessageLine
from chatproto.tui.view import ChatView, message_markup, title_markup
from tests.conftest import (
    server,  # noqa: F401
    until,
)
from tests.test_irc_conformance_loopback import connect as raw_connect
from tests.test_irc_loopback import PW as IRC_PW
from tests.test_irc_loopback import irc_gateway
from tests.test_tui import UTC, FakeController, text_of
from tests.test_tui_loopback import bodies, logged_in, notices, register
from tests.test_tui_tmux import PASSWORD, Tmux, realm, start_tuis, tmux  # noqa: F401
from tests.test_tui_tmux import pytestmark as needs_tmux


def _text(markup: list[Any]) -> str:
    return "".join(p[1] if isinstance(p, tuple) else p for p in markup)


def _item(pos: int, kind: str, sender: str, body: str = "", **meta: Any) -> dict[str, Any]:
    return {
        "pos": pos,
        "msg_id": f"m{pos}",
        "kind": kind,
        "from": sender,
        "to": "bob@x" if sender == "al@x" else "al@x",
        "ts": 1767225600.0 + pos,
        "body": body,
        **({"meta": meta} if meta else {}),
    }


def test_the_model_applies_reactions_edits_and_deletes() -> None:
    model = ChatModel()
    model.me, model.realm = "al@x", "x"
    model.receive(_item(1, "text", "bob@x", "lunch?"))
    model.receive(_item(2, "text", "al@x", "yes", reply_to="m1"))
    conv = model.conversation("bob@x")
    unread = conv.unread
    model.receive(_item(3, "reaction", "bob@x", ref="m2", emoji="👍"))
    model.receive(_item(4, "reaction", "al@x", ref="m2", emoji="👍"))
    model.receive(_item(5, "edit", "bob@x", "lunch at 1?", ref="m1"))
    model.receive(_item(6, "edit", "al@x", "forged", ref="m1"))  # not the sender's: ignored
    assert conv.unread == unread  # they change lines, they are no lines of their own
    assert sorted(conv.items) == [1, 2]
    lines = [line for line in conv.lines() if isinstance(line, MessageLine)]
    first, second = (_text(message_markup(line, "al@x", "x")) for line in lines)
    assert first.endswith("<bob> lunch at 1? (edited)")
    assert "┌ <bob> lunch at 1?\n" in second and second.endswith("<al> yes  [👍 2]")
    model.receive(_item(7, "reaction", "bob@x", ref="m2", emoji="👍", remove=True))
    model.receive(_item(8, "delete", "bob@x", ref="m1"))
    lines = [line for line in conv.lines() if isinstance(line, MessageLine)]
    first, second = (_text(message_markup(line, "al@x", "x")) for line in lines)
    assert first.endswith("<bob> (deleted)")
    assert "┌ <bob> (deleted)\n" in second and second.endswith("<al> yes  [👍 1]")
    assert conv.latest(False, "al@x") is None and conv.latest(True, "al@x")["msg_id"] == "m2"


def test_messages_are_numbered_and_commands_take_a_number() -> None:
    """Beside each message or file not deleted, its number (1: the newest); /react,
    /reply, /edit and /delete take one first (a word of digits followed by more, or
    alone for /delete)."""
    model = ChatModel()
    model.me, model.realm = "al@x", "x"
    for i, (who, body) in enumerate([("bob@x", "one"), ("al@x", "two"), ("bob@x", "three")]):
        model.receive(_item(i + 1, "text", who, body))
    model.receive(_item(4, "event", "bob@x"))
    conv = model.conversation("bob@x")
    assert conv.numbers() == {3: 1, 2: 2, 1: 3}
    assert conv.numbered(3)["body"] == "one" and conv.numbered(4) is None
    model.receive(_item(5, "delete", "bob@x", ref="m3"))
    assert conv.numbers() == {2: 1, 1: 2}
    model.select("bob@x")
    conv.history = "complete"
    screen = text_of(ChatView(model, FakeController(), tz=UTC), (80, 10))
    assert "  2 00:00 <bob> one" in screen and "  1 00:00 <al> two" in screen
    assert "    00:00 <bob> (deleted)" in screen
    parse = commands.parse
    assert parse("/react 2 👍").args == {"N": "2", "EMOJI": "👍"}  # type: ignore[union-attr]
    assert parse("/react 👍").args == {"EMOJI": "👍"}  # type: ignore[union-attr]
    assert parse("/react 3").args == {"EMOJI": "3"}  # type: ignore[union-attr]
    assert parse("/edit 2 new text").args == {"N": "2", "TEXT": "new text"}  # type: ignore[union-attr]
    assert parse("/edit 2").args == {"TEXT": "2"}  # type: ignore[union-attr]
    assert parse("/reply \uff12 x").args == {"TEXT": "\uff12 x"}  # type: ignore[union-attr]
    assert parse("/delete 4").args == {"N": "4"}  # type: ignore[union-attr]
    assert parse("/delete").args == {}  # type: ignore[union-attr]
    for bad in ("/delete x", "/delete 4 5", "/react 1 👍 more", "/react"):
        try:
            parse(bad)
        except commands.UsageError:
            continue
        raise AssertionError(bad)


@pytest_twisted.inlineCallbacks
def test_react_edit_delete_by_number_over_tcp(server: Any) -> Any:  # noqa: F811
    """The controller against a real realm: a message picked by its number."""
    _, _, addr = server
    yield register(addr, "alice", "bob")
    alice = yield logged_in(addr, "alice")
    bob = yield logged_in(addr, "bob")
    try:
        for body in ("first", "second", "third"):
            yield bob.run(f"/msg alice {body}")
        yield alice.run("/msg bob mine")
        yield until(lambda: bodies(alice, "bob@localhost") == ["first", "second", "third", "mine"])
        conv = alice.model.conversation("bob@localhost")
        yield alice.run("/react 3 🎉")  # "second": 1 is "mine", 2 "third"
        yield alice.run("/reply 4 back to the start")
        # the reply is 1 now: "third" is 3, bob's: refused, nothing sent
        yield alice.run("/edit 3 not mine")
        yield alice.run("/delete 9")
        assert notices(alice, "bob@localhost")[-2:] == [
            "message 3 is not yours",
            "no message 9 here (the number beside it)",
        ]
        yield alice.run("/edit 2 mine, edited")
        bconv = bob.model.conversation("alice@localhost")

        def shown(c: Any) -> dict[str, Any]:
            return {i["body"]: i.get("meta") or {} for i in c.items.values()}

        yield until(lambda: shown(bconv).get("mine, edited", {}).get("edited"))
        assert shown(bconv)["second"]["reactions"] == {"🎉": ["alice@localhost"]}
        first_id = next(i["msg_id"] for i in bconv.items.values() if i["body"] == "first")
        assert shown(bconv)["back to the start"]["reply_to"] == first_id
        yield bob.run("/delete 5")  # "first", his own
        yield until(lambda: shown(conv).get("", {}).get("deleted"))
        assert "first" not in bodies(alice, "bob@localhost")
    finally:
        yield alice.stop()
        yield bob.stop()


def test_typing_shows_in_the_title_for_six_seconds() -> None:
    now = [1000.0]
    model = ChatModel(clock=lambda: now[0])
    model.me, model.realm = "al@x", "x"
    model.receive(_item(1, "text", "bob@x", "hi"))
    model.select("bob@x")
    model.set_typing("bob@x", "bob@x", True)
    model.set_typing("nobody@x", "nobody@x", True)  # not in the sidebar: ignored
    assert "nobody@x" not in model.conversations
    assert title_markup(model).endswith("(offline)  · bob is typing…")
    now[0] += 5.9
    assert "typing" in title_markup(model)
    now[0] += 0.2
    assert "typing" not in title_markup(model)
    model.set_typing("bob@x", "bob@x", True)
    model.receive(_item(2, "text", "bob@x", "done typing"))  # the message ends it
    assert "typing" not in title_markup(model)
    model.set_typing("bob@x", "bob@x", True)
    model.set_typing("bob@x", "bob@x", False)
    assert "typing" not in title_markup(model)


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    yield from irc_gateway(tmp_path, ("alice", "bob", "carol"), IRC_PW)


@pytest_twisted.inlineCallbacks
def test_the_tui_shows_typing_from_irc_and_native_users(gateway: Any) -> Any:
    """An IRC user's ``+typing`` (TAGMSG, relayed as client tags) and a native
    client's ``typing`` show in the TUI's title, in a DM and in a group."""
    _, port, addr = gateway
    alice = ChatController(_reactor, ChatModel())
    yield alice.login(addr, "alice", IRC_PW)
    irc = yield raw_connect(port, "bob", "message-tags", IRC_PW)
    carol = yield client.connect(_reactor, addr, "carol", IRC_PW)
    try:
        yield alice.run("/create #t")
        irc.send("JOIN #t")
        yield carol.join("#t")
        irc.send("PRIVMSG alice :hello")
        yield until(lambda: "bob@localhost" in alice.model.conversations)
        alice.open("bob@localhost")
        irc.send("@+typing=active TAGMSG alice")
        yield until(lambda: "bob is typing…" in title_markup(alice.model))
        irc.send("@+typing=done TAGMSG alice")
        yield until(lambda: "typing" not in title_markup(alice.model))
        alice.open("#t@localhost")
        irc.send("@+typing=active TAGMSG #t")
        yield carol.typing("#t")
        yield until(lambda: "bob, carol are typing…" in title_markup(alice.model))
        irc.send("@+typing=paused TAGMSG #t")
        yield until(lambda: title_markup(alice.model).endswith("carol is typing…"))
    finally:
        yield alice.stop()
        yield carol.close()
        irc.transport.loseConnection()


def test_the_input_line_tells_the_controller_what_it_holds() -> None:
    model = ChatModel()
    model.me, model.realm = "al@x", "x"
    ctl = FakeController()
    view = ChatView(model, ctl, tz=UTC)
    for key in "hi":
        view.keypress((80, 10), key)
    view.keypress((80, 10), "left")  # the text is the same: nothing said
    view.keypress((80, 10), "enter")
    assert ctl.edits == ["h", "hi", ""] and ctl.lines == ["hi"]


@pytest_twisted.inlineCallbacks
def test_typing_in_the_tui_reaches_an_irc_user(gateway: Any) -> Any:
    """What the user types (not commands) is a typing notice, at most one every
    TYPING_EVERY seconds, and "done" once the line is empty: an IRC user with
    message-tags gets TAGMSG +typing."""
    _, port, addr = gateway
    alice = ChatController(_reactor, ChatModel())
    yield alice.login(addr, "alice", IRC_PW)
    irc = yield raw_connect(port, "bob", "message-tags", IRC_PW)
    # Typing goes to synced sessions only, and bob's reads its backlog after 376:
    # its PONG, held until then, says it is synced (else "active" may be dropped).
    irc.send("PING synced")
    yield until(lambda: irc.has("PONG", "localhost", "synced"))
    try:
        alice.open("bob@localhost")

        def typing() -> list[str]:
            return [p[0]["+typing"] for p in map(parse_line, irc.got) if p[1] == "TAGMSG"]

        alice.edited("h")
        alice.edited("he")  # within TYPING_EVERY: not again
        yield until(lambda: typing() == ["active"])
        alice.edited("")
        yield until(lambda: typing() == ["active", "done"])
        alice.edited("/msg carol")  # a command: not typing
        alice.edited("//not a command")
        yield until(lambda: typing() == ["active", "done", "active"])
        alice.model.select(STATUS)
        alice.edited("x")  # the status window: nobody to tell
        alice.model.select("bob@localhost")
        alice.edited("")
        yield until(lambda: typing() == ["active", "done", "active", "done"])
    finally:
        yield alice.stop()
        irc.transport.loseConnection()


@needs_tmux
@pytest_twisted.inlineCallbacks
def test_reply_react_edit_delete_in_the_real_tui(
    realm: str,  # noqa: F811
    tmux: Tmux,  # noqa: F811
    tmp_path: Path,
) -> Any:
    for user in ("alice", "bob"):
        conn = yield client.connect(_reactor, realm, user, PASSWORD, register=True)
        yield conn.close()
    yield start_tuis(tmux, realm, tmp_path, "alice", "bob")
    tmux.type("alice", "/msg bob lunch today?")
    yield tmux.wait("bob", r"alice \(1\)")
    tmux.key("bob", "C-n")
    yield tmux.wait("bob", r"<alice> lunch today\?")
    tmux.type("bob", "/reply yes, at one")
    # the reply shows the message it answers, quoted, on both sides
    for user in ("alice", "bob"):
        yield tmux.wait(user, r"┌ <alice> lunch today\?\n.*<bob> yes, at one")
    tmux.type("alice", "/react 👍")
    yield tmux.wait("bob", r"<bob> yes, at one  \[👍 1\]")
    tmux.type("alice", "/edit lunch tomorrow?")
    screen = yield tmux.wait("bob", r"<alice> lunch tomorrow\? \(edited\)")
    assert "┌ <alice> lunch tomorrow?" in screen
    tmux.type("bob", "/edit yes, at two")
    yield tmux.wait("alice", r"<bob> yes, at two \(edited\)  \[👍 1\]")
    tmux.type("alice", "/react 👍")  # again: taken back
    yield tmux.wait("bob", r"<bob> yes, at two \(edited\)$")
    tmux.type("alice", "/delete")
    screen = yield tmux.wait("bob", r"<alice> \(deleted\)")
    assert "lunch tomorrow" not in screen and "┌ <alice> (deleted)" in screen
    tmux.type("bob", "/react 👍")  # nothing of alice's is left to react to
    yield tmux.wait("bob", r"!! no message of someone else's here")
    # any message in view, by the number beside it (1: the newest)
    tmux.type("alice", "/msg bob one more")
    screen = yield tmux.wait("bob", r"  1 \d\d:\d\d <alice> one more")
    assert re.search(r"  2 \d\d:\d\d <bob> yes, at two \(edited\)", screen), screen
    tmux.type("bob", "/react 2 🎉")  # his own, not the latest of alice's
    yield tmux.wait("alice", r"<bob> yes, at two \(edited\)  \[🎉 1\]")
    tmux.type("bob", "/edit 1 no")
    yield tmux.wait("bob", r"!! message 1 is not yours")


def test_message_numbers_past_999_are_shown_in_a_wider_column() -> None:
    """The column of numbers was 4 wide and left messages past the 999th without a
    number (they could be picked by it all the same): it grows with the highest."""
    model = ChatModel()
    model.me, model.realm = "al@x", "x"
    for i in range(1001):
        model.receive(_item(i + 1, "text", "bob@x", f"m{i + 1}"))
    model.select("bob@x")
    conv = model.conversation("bob@x")
    conv.history = "complete"
    assert conv.numbered(1001)["body"] == "m1"
    view = ChatView(model, FakeController(), tz=UTC)
    view.pane.set_focus(0)  # the oldest, at the top
    screen = text_of(view, (80, 10))
    assert " 1001 00:00 <bob> m1" in screen and " 1000 00:00 <bob> m2" in screen
    assert "  999 00:00 <bob> m3" in screen
