"""The terminal client without a terminal: model, commands, settings and widgets.

The widgets are rendered to text with ``widget.render((cols, rows)).text``; key presses
are fed with ``widget.keypress(size, key)``, as urwid's main loop would.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from typing import Any

import pytest
import urwid

from chatproto.tui import commands, settings
from chatproto.tui.model import (
    STATUS,
    ChatModel,
    DaySeparator,
    InputHistory,
    MessageLine,
    NewMarker,
    NoticeLine,
)
from chatproto.tui.view import ChatView, InputLine, LoginView, message_markup, sidebar_markup

UTC = datetime.timezone.utc
DAY1 = datetime.datetime(2026, 11, 24, 23, 58, tzinfo=UTC).timestamp()
DAY2 = datetime.datetime(2026, 11, 25, 0, 1, tzinfo=UTC).timestamp()


def msg(pos: int, frm: str, to: str, body: str = "hi", ts: float = DAY1, **kw: Any) -> dict:
    item = {"pos": pos, "msg_id": f"id{pos}", "kind": "text", "from": frm, "to": to}
    item.update(ts=ts, body=body, **kw)
    return item


def make_model() -> ChatModel:
    model = ChatModel(clock=lambda: DAY2)
    model.me = "alice@x"
    model.realm = "x"
    return model


def text_of(widget: Any, size: tuple[int, ...]) -> str:
    return "\n".join(row.decode("utf-8") for row in widget.render(size).text)


# model -----------------------------------------------------------------------------


def test_items_are_filed_by_peer_and_deduplicated_by_pos_and_id() -> None:
    model = make_model()
    assert model.receive(msg(1, "bob@x", "alice@x"))
    assert model.receive(msg(2, "alice@x", "bob@x"))  # own message: filed under bob
    assert model.receive(msg(3, "carol@x", "#dev@x"))  # group message: under the group
    assert not model.receive(msg(1, "bob@x", "alice@x"))  # same position
    dup = msg(9, "bob@x", "alice@x")
    dup["msg_id"] = "id2"
    assert not model.receive(dup)  # same id (another position cannot be the same item)
    assert sorted(model.conversations["bob@x"].items) == [1, 2]
    assert sorted(model.conversations["#dev@x"].items) == [3]


def test_unread_counts_others_items_outside_the_conversation_on_screen() -> None:
    model = make_model()
    model.receive(msg(1, "bob@x", "alice@x"))
    model.receive(msg(2, "bob@x", "alice@x"))
    model.receive(msg(3, "alice@x", "bob@x"))  # own: never unread
    model.receive(msg(4, "carol@x", "#dev@x"))
    assert model.conversations["bob@x"].unread == 2
    assert model.unread_total() == 3
    model.select("bob@x")
    assert model.conversations["bob@x"].unread == 0
    model.receive(msg(5, "bob@x", "alice@x"))  # on screen: read
    assert model.conversations["bob@x"].unread == 0
    assert model.next_unread() is model.conversations["#dev@x"]
    assert model.next_unread() is None


def test_history_pages_merge_with_the_stream() -> None:
    model = make_model()
    model.receive(msg(10, "bob@x", "alice@x"))
    added = model.add_history("bob@x", [msg(p, "bob@x", "alice@x") for p in (8, 9, 10)], 3)
    assert added == 2
    conv = model.conversations["bob@x"]
    assert conv.history == "partial" and conv.oldest == 8
    assert model.add_history("bob@x", [msg(7, "bob@x", "alice@x")], 3) == 1
    assert conv.history == "complete"
    assert [line.pos for line in conv.lines(UTC) if isinstance(line, MessageLine)] == [
        7,
        8,
        9,
        10,
    ]


def test_lines_have_day_separators_and_notices_in_order() -> None:
    model = make_model()
    model.select("bob@x")
    model.receive(msg(1, "bob@x", "alice@x", ts=DAY1))
    model.notice("a local note")  # after pos 1, stamped DAY2 by the clock
    model.receive(msg(2, "bob@x", "alice@x", ts=DAY2))
    lines = model.conversations["bob@x"].lines(UTC)
    kinds = [type(line).__name__ for line in lines]
    assert kinds == ["DaySeparator", "MessageLine", "DaySeparator", "NoticeLine", "MessageLine"]
    assert lines[0].text() == "Tuesday 24 November 2026"
    assert isinstance(lines[2], DaySeparator) and lines[2].day == datetime.date(2026, 11, 25)


def test_group_events_update_topic_and_membership() -> None:
    model = make_model()
    created = msg(1, "alice@x", "#dev@x", body="", kind="event")
    created["meta"] = {"event": "created", "topic": "plans"}
    model.receive(created)
    conv = model.conversations["#dev@x"]
    assert conv.topic == "plans" and conv.joined
    topic = msg(2, "bob@x", "#dev@x", body="", kind="event", meta={"event": "topic", "topic": "x"})
    model.receive(topic)
    assert conv.topic == "x"
    kicked = msg(3, "bob@x", "#dev@x", body="", kind="event")
    kicked["meta"] = {"event": "kicked", "user": "alice@x"}
    model.receive(kicked)
    assert not conv.joined


def test_presence_and_connection_state() -> None:
    model = make_model()
    model.set_connection("online", "alice@x")
    model.set_presence("bob@x", "away", "lunch")
    assert model.presence == {"bob@x": ("away", "lunch")}
    model.set_presence("bob@x", "offline")
    assert model.presence == {}
    model.set_presence("bob@x", "online")
    model.set_connection("reconnecting", "connection lost")
    assert model.presence == {}  # stale until the snapshot after the next login


def test_sidebar_order_cycle_and_forget() -> None:
    model = make_model()
    for addr in ("zed@x", "#b@x", "amy@x", "#a@x"):
        model.conversation(addr)
    assert [c.address for c in model.sidebar()] == [STATUS, "#a@x", "#b@x", "amy@x", "zed@x"]
    assert model.cycle(1).address == "#a@x"
    assert model.cycle(-2).address == "zed@x"
    model.forget("zed@x")
    assert model.active == STATUS and "zed@x" not in model.conversations


def test_transfers_track_progress() -> None:
    model = make_model()
    t = model.transfer("k", "a.bin", "up", 1000)
    model.progress("k", 250)
    assert t.fraction == 0.25 and list(model.active_transfers()) == [t]
    model.finish_transfer("k")
    assert t.state == "done" and t.fraction == 1.0 and not list(model.active_transfers())
    model.transfer("f", "b.bin", "down", 10)
    model.finish_transfer("f", "no_such_file: gone")
    assert model.transfers["f"].state == "failed"


def test_input_history_keeps_the_draft() -> None:
    h = InputHistory()
    assert h.previous("draft") is None
    h.add("one")
    h.add("two")
    h.add("two")  # repeated: once
    assert h.previous("draft") == "two"
    assert h.previous("x") == "one"
    assert h.previous("x") is None  # the oldest
    assert h.next() == "two"
    assert h.next() == "draft"
    assert h.next() is None


# commands --------------------------------------------------------------------------


def test_parse_messages_and_commands() -> None:
    assert commands.parse("   ") is None
    assert commands.parse("hello") == commands.Say("hello")
    assert commands.parse("//me waves") == commands.Say("/me waves")
    cmd = commands.parse("/msg bob hello there  friend")
    assert isinstance(cmd, commands.Command) and cmd.name == "msg"
    assert cmd.args == {"USER": "bob", "TEXT": "hello there  friend"}
    cmd = commands.parse("/j #dev")  # unique prefix
    assert isinstance(cmd, commands.Command) and cmd.name == "join"
    assert cmd.args == {"#GROUP": "#dev"}
    cmd = commands.parse('/send "/tmp/my file.txt"')
    assert isinstance(cmd, commands.Command) and cmd.args == {"PATH": "/tmp/my file.txt"}
    cmd = commands.parse("/leave")
    assert isinstance(cmd, commands.Command) and cmd.args == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/msg", "usage: /msg USER [TEXT...]"),
        ("/nosuch x", "unknown command /nosuch"),
        ("/s x", "/s is ambiguous: /send, /search, /status"),
        ("/join #a #b", "too many arguments; usage: /join #GROUP"),
        ("/", "a command name must follow '/'"),
        ("/quit now", "too many arguments"),
    ],
)
def test_parse_errors_say_what_to_type(line: str, message: str) -> None:
    with pytest.raises(commands.UsageError, match=message.replace("[", r"\[").replace(".", r"\.")):
        commands.parse(line)


def test_help_lists_every_command() -> None:
    text = "\n".join(commands.help_text())
    for name in ("msg", "join", "leave", "topic", "who", "invite", "kick", "send"):
        assert f"/{name}" in text
    for name in ("download", "quit", "help"):
        assert f"/{name}" in text
    assert commands.help_text("/kick") == ["/kick USER [REASON...]: remove USER from this group"]


def _names(kind: str) -> list[str]:
    return {"user": ["bob", "bea", "carol"], "group": ["#dev", "#design"], "file": ["f1"]}.get(
        kind, []
    )


def test_candidates_follow_the_parameter_kinds(tmp_path: Any) -> None:
    assert commands.candidates("/in", 3, _names) == (1, ["invite"])
    assert commands.candidates("/msg b", 6, _names) == (5, ["bob", "bea"])
    assert commands.candidates("/msg #d", 7, _names) == (5, ["#dev", "#design"])
    assert commands.candidates("/join #de", 9, _names) == (6, ["#dev", "#design"])
    assert commands.candidates("/invite carol #de", 17, _names) == (14, ["#dev", "#design"])
    assert commands.candidates("/status a", 9, _names) == (8, ["away"])
    assert commands.candidates("/help ki", 8, _names)[1] == ["kick"]
    assert commands.candidates("hello ca", 8, _names) == (6, ["carol"])
    assert commands.candidates("/msg bob some te", 16, _names) == (14, [])  # free text
    assert commands.candidates("/kick bob ask ca", 16, _names) == (14, ["carol"])
    assert commands.candidates("/quit ", 6, _names) == (6, [])  # no parameters
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "nested").mkdir()
    line = f"/send {tmp_path}/n"
    start, found = commands.candidates(line, len(line), _names)
    assert start == 6 and found == [f"{tmp_path}/nested/", f"{tmp_path}/notes.txt"]


def test_completer_completes_extends_and_cycles() -> None:
    c = commands.Completer(_names)
    assert c.complete("/inv", 4) == ("/invite ", 8)
    assert c.complete("/invite c", 9) == ("/invite carol ", 14)
    # two candidates with no longer common prefix: cycle through them
    line, pos = c.complete("/msg b", 6)
    assert (line, pos) == ("/msg bob", 8) and c.offered == ["bob", "bea"]
    assert c.complete(line, pos) == ("/msg bea", 8)
    assert c.complete("/msg bea", 8) == ("/msg bob", 8)
    # a longer common prefix first
    c.reset()
    assert c.complete("/join #d", 8) == ("/join #de", 9)
    assert c.complete("/join #de", 9) == ("/join #dev", 10)
    c.reset()
    assert c.complete("/msg zz", 7) == ("/msg zz", 7) and c.offered == []


# settings --------------------------------------------------------------------------


def test_config_path_follows_xdg() -> None:
    assert settings.config_path({"XDG_CONFIG_HOME": "/c", "HOME": "/h"}) == (
        "/c/chatproto/tui.toml"
    )
    assert settings.config_path({"HOME": "/h"}) == "/h/.config/chatproto/tui.toml"


def test_settings_round_trip_and_private_file(tmp_path: Any) -> None:
    path = str(tmp_path / "cfg" / "chatproto" / "tui.toml")
    assert settings.load(path) == settings.Settings()  # missing file: defaults
    s = settings.Settings(server='tls:"odd"\\host:7421', user="Zoë 🦊", ca="/a\x7fb", realm="r")
    settings.save(path, s)
    assert settings.load(path) == s
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "password" not in open(path).read().replace("never the password", "")


def test_conversation_list_state(tmp_path: Any) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path), "HOME": "/h"}
    path = settings.state_path("alice@x", env)
    assert path == str(tmp_path / "chatproto" / "tui" / "alice@x.json")
    assert settings.state_path("a@x", {"HOME": "/h"}) == "/h/.local/state/chatproto/tui/a@x.json"
    assert settings.load_conversations(path) == []
    settings.save_conversations(path, ["bob@x", "#dev@x"])
    assert settings.load_conversations(path) == ["#dev@x", "bob@x"]
    for garbage in ("not json", '{"conversations": 5}', "[1]", '{"conversations": [1, "a@x"]}'):
        with open(path, "w") as f:
            f.write(garbage)
        assert settings.load_conversations(path) in ([], ["a@x"])


def test_bad_settings_file_is_a_readable_error(tmp_path: Any) -> None:
    path = tmp_path / "tui.toml"
    path.write_text("server = [unclosed\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        settings.load(str(path))
    path.write_text('server = 5\nuser = "bob"\nunknown = "x"\n')
    assert settings.load(str(path)) == settings.Settings(user="bob")


# widgets ---------------------------------------------------------------------------


def _flat(markup: list[Any]) -> str:
    return "".join(part[1] if isinstance(part, tuple) else part for part in markup)


def test_message_markup() -> None:
    model = make_model()
    text = MessageLine(msg(1, "bob@x", "alice@x", body="hello", ts=DAY2))
    assert _flat(message_markup(text, model.me, model.realm, UTC)) == "00:01 <bob> hello"
    multi = MessageLine(msg(1, "bob@x", "alice@x", body="one\ntwo", ts=DAY2))
    assert _flat(message_markup(multi, model.me, model.realm, UTC)) == (
        "00:01 <bob> one\n            two"
    )
    own = MessageLine(msg(2, "alice@x", "bob@x", body="yo", ts=DAY2))
    assert message_markup(own, model.me, model.realm, UTC)[1] == ("me", "<alice>")
    colours = {
        message_markup(MessageLine(msg(3, f"u{i}@x", "alice@x")), "", "x")[1][0] for i in range(40)
    }
    assert colours == {f"nick{i}" for i in range(6)}  # senders get different colours
    event = msg(3, "alice@x", "#dev@x", body="", kind="event", ts=DAY2)
    event["meta"] = {"event": "kicked", "user": "bob@x", "reason": "spam"}
    line = _flat(message_markup(MessageLine(event), model.me, model.realm, UTC))
    assert line == "00:01 -!- alice kicked bob (spam)"
    f = msg(4, "bob@x", "alice@x", body="", kind="file", ts=DAY2)
    f["meta"] = {"file_id": "F1", "name": "a.pdf", "size": 2048}
    line = _flat(message_markup(MessageLine(f), model.me, model.realm, UTC))
    assert line == "00:01 <bob> [file] a.pdf (2.0 KiB)  /download F1"
    bounce = msg(5, "nobody@y", "alice@x", body="your message to nobody@y was refused", ts=DAY2)
    bounce["kind"] = "bounce"
    line = _flat(message_markup(MessageLine(bounce), model.me, model.realm, UTC))
    assert line == "00:01 !! your message to nobody@y was refused"
    assert model.peer_of(bounce) == "nobody@y"  # shown in the conversation it concerns
    err = NoticeLine("no_such_user: no user x", DAY2, 0, 0, error=True)
    assert _flat(message_markup(err, model.me, model.realm, UTC)) == (
        "00:01 !! no_such_user: no user x"
    )


def test_sidebar_markup_shows_presence_and_unread() -> None:
    model = make_model()
    model.receive(msg(1, "bob@x", "alice@x"))
    model.set_presence("bob@x", "away")
    assert _flat(sidebar_markup(model.conversations["bob@x"], model)) == "~ bob (1)"
    model.select("bob@x")
    assert _flat(sidebar_markup(model.conversations["bob@x"], model)).rstrip() == "~ bob"


class FakeController:
    """Records what the view asks of the controller (the view's own logic is tested)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.older_calls = 0
        self.cycled: list[int] = []
        self.edits: list[str] = []
        self.completer = commands.Completer(_names)

    def run(self, line: str) -> None:
        self.lines.append(line)

    def edited(self, text: str) -> None:
        self.edits.append(text)

    def older(self) -> None:
        self.older_calls += 1

    def cycle(self, step: int) -> None:
        self.cycled.append(step)

    def next_unread(self) -> None:
        pass


def test_chat_view_renders_sidebar_title_messages_and_status() -> None:
    model = make_model()
    model.set_connection("online", "alice@x on tcp:127.0.0.1:1")
    model.receive(msg(1, "bob@x", "alice@x", body="hello alice", ts=DAY2))
    model.receive(msg(2, "carol@x", "#dev@x", body="standup?", ts=DAY2))
    model.conversation("#dev@x").topic = "daily"
    model.select("#dev@x")
    model.conversation("#dev@x").history = "complete"
    view = ChatView(model, FakeController(), tz=UTC)
    screen = text_of(view, (80, 12))
    assert "#dev: daily" in screen
    assert "bob (1)" in screen
    assert "beginning of the conversation" in screen
    assert "Wednesday 25 November 2026" in screen
    assert "00:01 <carol> standup?" in screen
    assert "[online] alice@x on tcp:127.0.0.1:1   unread 1" in screen.splitlines()[-1]
    assert "hello alice" not in screen


def test_chat_view_shows_controls_from_the_realm_never_acts_on_them() -> None:
    """Rows stored before the realm checked ids and bodies (or another realm's) may
    hold escape sequences and controls: the screen shows them as control pictures
    (whatever urwid filters itself), in bodies, topics, file ids and names."""
    model = make_model()
    model.receive(msg(1, "bob@x", "#dev@x", body="a\x1b[2Jb\rc\x9bd\x07", ts=DAY2))
    f = msg(2, "bob@x", "#dev@x", body="", kind="file", ts=DAY2)
    f["meta"] = {"file_id": "F\x1b]0;t\x07\n", "name": "x\x08.pdf", "size": 1}
    model.receive(f)
    model.conversation("#dev@x").topic = "top\x1b[5mic"
    model.select("#dev@x")
    view = ChatView(model, FakeController(), tz=UTC)
    screen = text_of(view, (100, 12))
    assert "<bob> a\u241b[2Jb\u240dc\ufffdd\u2407" in screen
    assert "[file] x\u2408.pdf" in screen and "/download F\u241b]0;t\u2407\u240a" in screen
    assert "#dev: top\u241b[5mic" in screen


def test_chat_view_keys_reach_the_controller() -> None:
    model = make_model()
    ctl = FakeController()
    view = ChatView(model, ctl, tz=UTC)
    size = (80, 12)
    text_of(view, size)
    for ch in "hi":
        view.keypress(size, ch)
    view.keypress(size, "enter")
    view.keypress(size, "ctrl n")
    view.keypress(size, "page up")  # at the top already: asks for older items
    view.keypress(size, "ctrl q")
    assert ctl.lines == ["hi", "/quit"]
    assert ctl.cycled == [1]
    assert ctl.older_calls == 1


def test_message_pane_follows_new_lines_and_pages_back() -> None:
    model = make_model()
    model.select("bob@x")
    for pos in range(1, 41):
        model.receive(msg(pos, "bob@x", "alice@x", body=f"line {pos}", ts=DAY2))
    view = ChatView(model, FakeController(), tz=UTC)
    size = (60, 10)
    screen = text_of(view, size)
    assert "line 40" in screen and "line 30" not in screen  # scrolled to the newest
    view.keypress(size, "page up")
    text_of(view, size)
    view.keypress(size, "page up")
    screen = text_of(view, size)
    assert "line 40" not in screen
    model.receive(msg(41, "bob@x", "alice@x", body="line 41", ts=DAY2))
    view.refresh()
    assert "line 41" not in text_of(view, size)  # reading back: not yanked to the bottom


def test_input_line_sends_pastes_browses_and_completes() -> None:
    sent: list[str] = []
    completer = commands.Completer(_names)
    line = InputLine(sent.append, completer.complete, completer.reset)
    size = (40,)
    for key in "first":
        line.keypress(size, key)
    line.keypress(size, "enter")
    # a bracketed paste keeps its line breaks; Enter after it sends the whole text
    for key in ["begin paste", *"a", "enter", *"b", "end paste"]:
        line.keypress(size, key)
    assert line.edit_text == "a\nb"
    line.keypress(size, "meta enter")
    line.keypress(size, "c")
    line.keypress(size, "enter")
    assert sent == ["first", "a\nb\nc"]
    line.keypress(size, "up")
    assert line.edit_text == "a\nb\nc"
    line.set_edit_text("")
    for key in "/inv":
        line.keypress(size, key)
    line.keypress(size, "tab")
    assert line.edit_text == "/invite "
    line.keypress(size, "enter")
    assert sent[-1] == "/invite "


def test_login_view_collects_values_and_shows_errors() -> None:
    got: list[dict] = []
    view = LoginView({"server": "tcp:127.0.0.1:1", "user": "alice"}, got.append)
    size = (80, 24)
    assert "tcp:127.0.0.1:1" in text_of(view, size)
    for ch in "s3cret pw":  # focus starts on the first empty field: the password
        view.keypress(size, ch)
    screen = text_of(view, size)
    assert "s3cret" not in screen and "*********" in screen
    view.keypress(size, "tab")  # TLS name
    view.keypress(size, "tab")  # CA file
    view.keypress(size, "tab")  # the "create this account" box
    view.keypress(size, " ")
    view.keypress(size, "enter")  # on the box: toggles, does not submit
    view.keypress(size, "shift tab")
    view.keypress(size, "enter")
    assert got == [
        {
            "server": "tcp:127.0.0.1:1",
            "user": "alice",
            "password": "s3cret pw",
            "realm": "",
            "ca": "",
            "register": False,
        }
    ]
    view.set_message("auth_failed: wrong user or password", error=True)
    assert "auth_failed: wrong user or password" in text_of(view, size)
    assert isinstance(view.pile, urwid.Pile)


def test_tui_command_needs_a_terminal_and_a_readable_config(tmp_path: Any, capsys: Any) -> None:
    from chatproto import cli

    bad = tmp_path / "bad.toml"
    bad.write_text("user = [\n")
    assert cli.main(["tui", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["tui", "--config", str(tmp_path / "none.toml")]) == 2  # stdin: no tty
    assert "tui needs a terminal" in capsys.readouterr().err


def test_sidebar_scrolls_to_the_conversation_on_screen() -> None:
    model = make_model()
    for i in range(30):
        model.conversation(f"user{i:02}@x")
    model.select("user29@x")
    view = ChatView(model, FakeController(), tz=UTC)
    screen = text_of(view, (80, 10))
    assert "user29" in screen and "user00" not in screen


def test_new_marker_sits_before_the_first_unread_item() -> None:
    model = make_model()
    model.receive(msg(1, "bob@x", "alice@x"))
    model.select("bob@x")
    model.select(STATUS)
    model.receive(msg(2, "alice@x", "bob@x"))  # own: not unread
    model.receive(msg(3, "bob@x", "alice@x"))
    model.receive(msg(4, "alice@x", "bob@x"))
    model.receive(msg(5, "bob@x", "alice@x"))
    conv = model.select("bob@x")
    lines = conv.lines(UTC)
    at = [i for i, line in enumerate(lines) if isinstance(line, NewMarker)]
    assert len(at) == 1 and lines[at[0] + 1].pos == 3  # type: ignore[union-attr]
    view = ChatView(model, FakeController(), tz=UTC)
    assert "--- new ---" in text_of(view, (80, 14))
    model.select(STATUS)
    assert not any(isinstance(line, NewMarker) for line in conv.lines(UTC))


def test_transfers_show_as_progress_bars_while_running() -> None:
    model = make_model()
    view = ChatView(model, FakeController(), tz=UTC)
    model.transfer("up:1", "photo.jpg", "up", 4096)
    model.progress("up:1", 1024)
    view.refresh()
    screen = text_of(view, (100, 12))
    assert re.search(r"up photo\.jpg 1\.0 KiB/4\.0 KiB +.*25 %", screen), screen
    model.finish_transfer("up:1")
    view.refresh()
    assert "photo.jpg" not in text_of(view, (100, 12))


def test_downloaded_names_stay_in_the_download_directory(tmp_path: Any) -> None:
    from chatproto.tui.controller import _free_path, _safe_name

    assert _safe_name("../../etc/passwd") == "passwd"
    assert _safe_name("..\\..\\boot.ini") == "boot.ini"
    assert _safe_name("..") == "download" and _safe_name("") == "download"
    assert _safe_name("bad\x1b[2Jname.txt") == "bad[2Jname.txt"
    target = tmp_path / "a.txt"
    assert _free_path(str(target)) == str(target)
    target.write_text("x")
    (tmp_path / "a (1).txt").write_text("x")
    assert _free_path(str(target)) == str(tmp_path / "a (2).txt")


def test_irssi_commands_parse_and_actions_render() -> None:
    from chatproto.display import action, action_body

    assert commands.parse("/query bob hi").name == "query"  # type: ignore[union-attr]
    assert commands.parse("/part").name == "part"  # type: ignore[union-attr]
    assert commands.parse("/me waves at you").args == {"TEXT": "waves at you"}  # type: ignore[union-attr]
    with pytest.raises(commands.UsageError, match="/m is ambiguous: /msg, /me"):
        commands.parse("/m x")
    assert action_body("waves") == "\x01ACTION waves\x01"
    assert action("\x01ACTION waves\x01") == "waves"
    assert action("waves") is None and action("\x01ACTION\x01") is None
    model = ChatModel()
    model.me, model.realm = "alice@x", "x"
    item = {
        "pos": 1,
        "kind": "text",
        "from": "bob@x",
        "to": "alice@x",
        "ts": 0.0,
        "body": action_body("waves"),
    }
    line = MessageLine(item)
    assert _flat(message_markup(line, model.me, model.realm))[6:] == "* bob waves"
    model.conversation("bob@x")
    model.conversation("#dev@x")
    assert model.window(3).address == "bob@x" and model.window(1).address == ""
    with pytest.raises(IndexError):
        model.window(4)
