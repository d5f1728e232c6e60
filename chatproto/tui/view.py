"""urwid widgets for the terminal client: the login form and the chat screen.

The widgets only render the :class:`chatproto.tui.model.ChatModel` and hand input to
the :class:`chatproto.tui.controller.ChatController`; the rules live in those two.
The formatting of a line (:func:`message_markup`, :func:`sidebar_markup`) is plain
functions returning urwid text markup.  Any widget renders without a terminal:
``widget.render((cols, rows)).text`` gives its rows as bytes, which is how the tests
read the screen.

Layout of the chat screen::

    +-conversations-+-#dev: topic ------------------------------+
    | status        | --- Wednesday 25 November 2026 ---        |
    | #dev (3)      | 14:03 <alice> hello                       |
    | * bob         | 14:04 -!- bob joined                      |
    |               | [completion candidates / progress bars]   |
    |               | > input line                              |
    +---------------+-------------------------------------------+
    [online] alice@localhost on tcp:127.0.0.1:7420   unread 3
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Callable
from typing import Any

import urwid

from chatproto.display import (
    action,
    describe_event,
    human_size,
    short,
    terminal_label,
    terminal_text,
)
from chatproto.mentions import mentions
from chatproto.tui.model import (
    STATUS,
    ChatModel,
    Conversation,
    DaySeparator,
    InputHistory,
    MessageLine,
    NewMarker,
    NoticeLine,
    Transfer,
)

__all__ = [
    "PALETTE",
    "ChatView",
    "InputLine",
    "LoginView",
    "message_markup",
    "sidebar_markup",
]

#: Senders get one of these colours (by a hash of their address).
_NICK_COLOURS = ("light cyan", "light magenta", "yellow", "light blue", "brown", "dark cyan")

PALETTE = [
    ("header", "white,bold", "dark blue"),
    ("sidebar", "light gray", "black"),
    ("sidebar active", "black", "light gray"),
    ("unread", "white,bold", "black"),
    ("mention", "black,bold", "yellow"),
    ("online", "light green", "black"),
    ("away", "yellow", "black"),
    ("busy", "light red", "black"),
    ("left", "dark gray", "black"),
    ("time", "dark cyan", ""),
    *((f"nick{i}", f"{colour},bold", "") for i, colour in enumerate(_NICK_COLOURS)),
    ("me", "light green,bold", ""),
    ("event", "dark gray", ""),
    ("file", "light magenta", ""),
    ("notice", "yellow", ""),
    ("error", "light red,bold", ""),
    ("day", "light blue", ""),
    ("hint", "dark gray", ""),
    ("status", "white", "dark blue"),
    ("status bad", "white,bold", "dark red"),
    ("field", "white", "dark gray"),
    ("field focus", "black", "light gray"),
    ("button", "white", "dark blue"),
    ("button focus", "black", "light cyan"),
    ("pbar normal", "white", "dark gray"),
    ("pbar complete", "black", "light green"),
]

_PRESENCE_MARK = {"online": "*", "away": "~", "busy": "!"}


def safe_markup(markup: Any) -> Any:
    """urwid text markup with every string passed through
    :func:`chatproto.display.terminal_text`: what the realm sent is shown, never acted
    on by the terminal (whatever urwid itself filters)."""
    if isinstance(markup, str):
        return terminal_text(markup)
    if isinstance(markup, tuple):
        return (markup[0], safe_markup(markup[1]))
    if isinstance(markup, list):
        return [safe_markup(m) for m in markup]
    return markup


class SafeText(urwid.Text):
    """A ``urwid.Text`` whose markup goes through :func:`safe_markup`."""

    def set_text(self, markup: Any) -> None:
        super().set_text(safe_markup(markup))


def _clock(ts: float, tz: datetime.tzinfo | None) -> str:
    return datetime.datetime.fromtimestamp(ts, tz).strftime("%H:%M")


def nick_attr(sender: str) -> str:
    """The palette entry of a sender: one of a few colours, the same in every session."""
    return f"nick{zlib.crc32(sender.encode('utf-8')) % len(_NICK_COLOURS)}"


def message_markup(
    line: MessageLine | NoticeLine, me: str, realm: str, tz: datetime.tzinfo | None = None
) -> list[Any]:
    """The urwid markup of one message or notice line."""
    if isinstance(line, NoticeLine):
        mark = "!! " if line.error else "-- "
        return [
            ("time", _clock(line.ts, tz) + " "),
            ("error" if line.error else "notice", mark + line.text),
        ]
    item = line.item
    when = ("time", _clock(line.ts, tz) + " ")
    sender = str(item.get("from", "?"))
    kind = item.get("kind")
    if kind == "event":
        return [when, ("event", "-!- " + describe_event(item))]
    if kind == "bounce":  # another realm refused something we sent (PROTOCOL.md)
        return [when, ("error", "!! " + str(item.get("body", "")))]
    nick = ("me" if sender == me else nick_attr(sender), f"<{short(sender, realm)}>")
    raw = item.get("meta")
    meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if meta.get("deleted"):
        return [when, nick, " ", ("hint", "(deleted)")]
    if kind == "file":
        name = meta.get("name", "?")
        size = meta.get("size")
        fid = terminal_label(meta.get("file_id", "?"))
        text = f"[file] {name}" + (f" ({human_size(size)})" if isinstance(size, int) else "")
        body = str(item.get("body") or "")
        out: list[Any] = [when, nick, " ", ("file", text), ("hint", f"  /download {fid}")]
        if body and body != name:
            out.append(" " + body)
        return [*out, *_marks(meta)]
    quote = _quote(line, realm, len(when[1]))
    acted = action(str(item.get("body", "")))
    if acted is not None:  # /me waves: "* alice waves"
        return [*quote, when, (nick[0], f"* {short(sender, realm)}"), " ", acted, *_marks(meta)]
    # Lines after the first of a multi-line body start under the first one.
    indent = "\n" + " " * (len(when[1]) + len(nick[1]) + 1)
    body = str(item.get("body", "")).replace("\n", indent)
    if kind not in (None, "text"):
        return [when, nick, " ", ("hint", f"[{kind}] "), body]
    if mentions_me(item, me):  # @name of the user in a group: highlighted
        return [*quote, when, nick, " ", ("mention", body), *_marks(meta)]
    return [*quote, when, nick, " ", body, *_marks(meta)]


def _quote(line: MessageLine, realm: str, indent: int) -> list[Any]:
    """The line a reply starts with: the message it answers, quoted (one line)."""
    reply_to = (line.item.get("meta") or {}).get("reply_to")
    if not reply_to:
        return []
    q = line.quote
    if q is None:
        text = "(a message not loaded)"
    elif (q.get("meta") or {}).get("deleted"):
        text = f"<{short(str(q.get('from', '?')), realm)}> (deleted)"
    else:
        body = " ".join(str(q.get("body", "")).split())
        body = body if len(body) <= 60 else body[:59] + "…"
        text = f"<{short(str(q.get('from', '?')), realm)}> {body}"
    return [("hint", " " * indent + "┌ " + text + "\n")]


def _marks(meta: dict[str, Any]) -> list[Any]:
    """What follows a message: ``(edited)`` and its reactions, ``[👍 2 🎉 1]``."""
    out: list[Any] = []
    if meta.get("edited"):
        out.append(("hint", " (edited)"))
    reactions = meta.get("reactions")
    if isinstance(reactions, dict) and reactions:
        shown = " ".join(f"{e} {len(u)}" for e, u in reactions.items() if isinstance(u, list))
        out.append(("hint", f"  [{shown}]"))
    return out


def mentions_me(item: dict[str, Any], me: str) -> bool:
    """A group message from someone else that mentions ``me`` (chatproto.mentions)."""
    if item.get("from") == me or not str(item.get("to", "")).startswith("#") or not me:
        return False
    return mentions(str(item.get("body", "")), me.rpartition("@")[0])


def sidebar_markup(conv: Conversation, model: ChatModel, width: int = 22) -> list[Any]:
    """The sidebar entry of a conversation: presence mark, name, unread count."""
    if conv.address == STATUS:
        name = "status"
        attr = "sidebar"
        mark = " "
    else:
        name = short(conv.address, model.realm)
        if conv.is_group:
            mark = " "
            attr = "sidebar" if conv.joined else "left"
        else:
            status = model.presence.get(conv.address, ("offline", ""))[0]
            mark = _PRESENCE_MARK.get(status, " ")
            attr = status if status in _PRESENCE_MARK else "left"
    count = f" ({conv.unread})" if conv.unread else ""
    if conv.mentions:
        count = f" ({conv.unread} @{conv.mentions})"
    room = max(1, width - 2 - len(count))
    if len(name) > room:
        name = name[: room - 1] + "~"
    if conv.address == model.active:
        return [("sidebar active", f"{mark} {name}{count}".ljust(width))]
    label_attr = "unread" if conv.unread else ("sidebar" if attr in _PRESENCE_MARK else attr)
    if conv.mentions:
        label_attr = "mention"
    return [(attr, mark), (label_attr, f" {name}{count}")]


def title_markup(model: ChatModel) -> str:
    conv = model.current
    number = model.window_number(conv.address) if conv.address in model.conversations else 0
    if conv.address == STATUS:
        return f" [{number}] status: {model.me or 'not logged in'}"
    name = f"[{number}] {short(conv.address, model.realm)}"
    if conv.is_group:
        text = f" {name}" + (f": {conv.topic}" if conv.topic else "")
        text += "" if conv.joined else " (not a member)"
    else:
        status, note = model.presence.get(conv.address, ("offline", ""))
        text = f" {name} ({status}{': ' + note if note else ''})"
    typists = [short(u, model.realm) for u in model.typists(conv)]
    if typists:
        verb = "is" if len(typists) == 1 else "are"
        text += f"  · {', '.join(typists)} {verb} typing…"
    return text


def status_markup(model: ChatModel) -> tuple[str, str]:
    """(attribute, text) of the bottom status line."""
    state = model.connection
    detail = f" {model.connection_detail}" if model.connection_detail else ""
    unread = model.unread_total()
    extra = f"   unread {unread}" if unread else ""
    bad = state in ("reconnecting", "failed", "offline")
    return ("status bad" if bad else "status", f"[{state}]{detail}{extra}")


class InputLine(urwid.Edit):
    """The message line: Enter sends, Alt-Enter (or a bracketed paste) adds lines,
    Up/Down browse the history, Tab completes."""

    def __init__(
        self,
        on_submit: Callable[[str], Any],
        complete: Callable[[str, int], tuple[str, int]] | None = None,
        reset_completion: Callable[[], None] | None = None,
        on_edit: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__("> ", multiline=True)
        self.on_submit = on_submit
        self.complete = complete
        self.reset_completion = reset_completion
        #: told the text after each key that changed it (typing notices)
        self.on_edit = on_edit
        self.history = InputHistory()
        self.pasting = False

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key == "begin paste":
            self.pasting = True
            return None
        if key == "end paste":
            self.pasting = False
            return None
        if key != "tab" and self.reset_completion is not None:
            self.reset_completion()
        if key == "enter" and self.pasting:
            self.insert_text("\n")
            return None
        if key == "enter":
            text = self.edit_text
            if not text.strip():
                return None
            self.history.add(text)
            self.set_edit_text("")
            if self.on_edit is not None:
                self.on_edit("")  # (typing is over: before the message goes)
            self.on_submit(text)
            return None
        if key in ("meta enter", "shift enter", "ctrl enter"):
            self.insert_text("\n")
            return None
        if key == "tab":
            if self.complete is not None:
                text, pos = self.complete(self.edit_text, self.edit_pos)
                self.set_edit_text(text)
                self.set_edit_pos(pos)
            return None
        if key == "up" and "\n" not in self.edit_text[: self.edit_pos]:
            entry = self.history.previous(self.edit_text)
            if entry is not None:
                self.set_edit_text(entry)
                self.set_edit_pos(len(entry))
            return None
        if key == "down" and "\n" not in self.edit_text[self.edit_pos :]:
            entry = self.history.next()
            if entry is not None:
                self.set_edit_text(entry)
                self.set_edit_pos(len(entry))
            return None
        before = self.edit_text
        out = super().keypress(size, key)  # type: ignore[arg-type]
        if self.on_edit is not None and self.edit_text != before:
            self.on_edit(self.edit_text)
        return out  # type: ignore[no-any-return]


class MessagePane(urwid.ListBox):
    """The lines of the conversation on screen; remembers its last rendered size so
    the chat screen can scroll it while the input line has the focus."""

    def __init__(self) -> None:
        super().__init__(urwid.SimpleFocusListWalker([]))
        self.last_size: tuple[int, int] = (80, 20)

    def render(self, size: tuple[int, int], focus: bool = False) -> Any:  # type: ignore[override]
        self.last_size = size
        return super().render(size, focus)

    def at_top(self) -> bool:
        return "top" in self.ends_visible(self.last_size)

    def at_bottom(self) -> bool:
        return not self.body or "bottom" in self.ends_visible(self.last_size)


class ChatView(urwid.WidgetWrap):
    """The chat screen: sidebar, title, messages, hints and transfers, input, status.

    :meth:`refresh` rebuilds what changed from the model (the app calls it once per
    reactor turn after model changes; tests call it directly before rendering).
    """

    SIDEBAR = 24

    def __init__(
        self,
        model: ChatModel,
        controller: Any,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        self.model = model
        self.controller = controller
        self.tz = tz
        self.sidebar: Any = urwid.SimpleFocusListWalker([])
        self.pane = MessagePane()
        self.title = SafeText("", wrap="ellipsis")
        self.hint = SafeText("")
        self.transfers = urwid.Pile([])
        self.input = InputLine(
            self._submit, self._complete, self._reset_completion, self.controller.edited
        )
        self.status = SafeText("", wrap="ellipsis")
        self._status = urwid.AttrMap(self.status, "status")
        self._shown: str | None = None
        self._cache: dict[tuple[Any, ...], urwid.Widget] = {}
        right = urwid.Pile(
            [
                ("pack", urwid.AttrMap(self.title, "header")),
                self.pane,
                ("pack", self.hint),
                ("pack", self.transfers),
                ("pack", self.input),
            ],
            focus_item=4,
        )
        side = urwid.AttrMap(urwid.ListBox(self.sidebar), "sidebar")
        body = urwid.Columns([(self.SIDEBAR, side), right], dividechars=1, focus_column=1)
        super().__init__(urwid.Frame(body, footer=self._status, focus_part="body"))
        self.refresh()

    # input --------------------------------------------------------------------------

    def _submit(self, text: str) -> None:
        self.controller.run(text)

    def _complete(self, text: str, pos: int) -> tuple[str, int]:
        result = self.controller.completer.complete(text, pos)
        offered = self.controller.completer.offered
        self.hint.set_text(("hint", "  ".join(offered[:20])) if len(offered) > 1 else "")
        return result  # type: ignore[no-any-return]

    def _reset_completion(self) -> None:
        if self.controller.completer.offered:
            self.controller.completer.reset()
            self.hint.set_text("")

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key in ("page up", "page down"):
            self._scroll(key)
            return None
        if key in ("ctrl n", "meta down"):
            self.controller.cycle(1)
            return None
        if key in ("ctrl p", "meta up"):
            self.controller.cycle(-1)
            return None
        if key == "meta a":
            self.controller.next_unread()
            return None
        if key.startswith("meta ") and key[5:].isdigit() and len(key) == 6:
            self.controller.window(int(key[5:]) or 10)  # Alt-1..Alt-9, Alt-0: window 10
            return None
        if key == "f1":
            self.controller.run("/help")
            return None
        unhandled: str | None = super().keypress(size, key)
        if unhandled in ("ctrl q", "ctrl d") and not self.input.edit_text:
            self.controller.run("/quit")
            return None
        return unhandled

    def _scroll(self, key: str) -> None:
        was_top = self.pane.at_top()
        self.pane.keypress(self.pane.last_size, key)
        if key == "page up" and was_top:
            self.controller.older()

    # rendering ----------------------------------------------------------------------

    def refresh(self) -> None:
        model = self.model
        width = self.SIDEBAR
        convs = model.sidebar()
        self.sidebar[:] = [
            SafeText(sidebar_markup(c, model, width), wrap="ellipsis") for c in convs
        ]
        active = [i for i, c in enumerate(convs) if c.address == model.active]
        if active:
            self.sidebar.set_focus(active[0])  # a long list scrolls to the one on screen
        self.title.set_text(title_markup(model))
        attr, text = status_markup(model)
        self.status.set_text(text)
        self._status.set_attr_map({None: attr})
        self._refresh_transfers(model)
        self._refresh_messages(model)

    def _refresh_transfers(self, model: ChatModel) -> None:
        # Running ones only: how a transfer ended is a line in its conversation.
        shown = list(model.active_transfers())[-3:]
        self.transfers.contents[:] = [
            (self._transfer_widget(t), self.transfers.options()) for t in shown
        ]

    def _transfer_widget(self, t: Transfer) -> urwid.Widget:
        arrow = "up" if t.direction == "up" else "down"
        label = f" {arrow} {t.name} {human_size(t.done)}/{human_size(t.total)}"
        bar = urwid.ProgressBar(
            "pbar normal", "pbar complete", current=t.done, done=max(t.total, 1)
        )
        return urwid.Columns([SafeText(label, wrap="ellipsis"), (24, bar)], dividechars=1)

    def _line_widget(self, line: Any, conv: Conversation) -> urwid.Widget:
        if isinstance(line, NewMarker):
            return SafeText(("error", "--- new ---"), align="center")
        if isinstance(line, DaySeparator):
            key: tuple[Any, ...] = ("day", line.day)
        elif isinstance(line, MessageLine):
            # the item dict is replaced when it changes (an edit, a reaction...)
            key = ("msg", conv.address, line.pos, id(line.item), id(line.quote))
        else:
            key = ("notice", conv.address, line.seq)
        widget = self._cache.get(key)
        if widget is None:
            if isinstance(line, DaySeparator):
                widget = SafeText(("day", f"--- {line.text()} ---"), align="center")
            else:
                widget = SafeText(message_markup(line, self.model.me, self.model.realm, self.tz))
            self._cache[key] = widget
        return widget

    def _refresh_messages(self, model: ChatModel) -> None:
        conv = model.current
        switched = self._shown != conv.address
        follow = switched or self.pane.at_bottom()
        focus_key: Any = None
        if not switched and self.pane.body:
            focus_key = getattr(self.pane.focus, "_chat_key", None)
        widgets: list[urwid.Widget] = []
        head = {
            "complete": "--- beginning of the conversation ---",
            "partial": "--- PgUp for older messages ---",
            "loading": "--- loading ---",
        }.get(conv.history)
        if conv.address == STATUS:
            head = None
        if head:
            widgets.append(SafeText(("hint", head), align="center"))
        numbers = conv.numbers()
        width = number_width(max(numbers.values(), default=0))
        for line in conv.lines(self.tz):
            w = self._line_widget(line, conv)
            if conv.address == STATUS:
                pass  # no messages there: no numbers
            elif isinstance(line, MessageLine):
                quoted = bool((line.item.get("meta") or {}).get("reply_to"))
                w = _numbered(w, numbers.get(line.pos), width, quoted)
            elif isinstance(line, NoticeLine):
                w = _numbered(w, None, width)
            w._chat_key = _line_key(line)  # type: ignore[attr-defined]
            widgets.append(w)
        self.pane.body[:] = widgets  # type: ignore[index]
        self._shown = conv.address
        if not widgets:
            return
        if follow:
            self.pane.set_focus(len(widgets) - 1, coming_from="above")
        elif focus_key is not None:
            for i, w in enumerate(widgets):
                if getattr(w, "_chat_key", None) == focus_key:
                    self.pane.set_focus(i, coming_from="below")
                    break


#: The least width of the column of message numbers (what /react, /edit... take).
NUMBER_WIDTH = 4


def number_width(highest: int) -> int:
    """The width of the column of message numbers when the highest shown is
    ``highest``: :data:`NUMBER_WIDTH`, wider past 999 (the digits and a space)."""
    return max(NUMBER_WIDTH, len(str(highest)) + 1)


def _numbered(
    widget: urwid.Widget, number: int | None, width: int = NUMBER_WIDTH, quoted: bool = False
) -> urwid.Widget:
    """A message line with its number in a column on its left (``width`` wide: every
    line of a conversation the same), beside the message (under the quote of a
    reply); blank for other lines."""
    label = f"{number:>{width - 1}} " if number is not None else ""
    if label and quoted:
        label = "\n" + label
    return urwid.Columns([(width, SafeText(("hint", label))), widget])


def _line_key(line: Any) -> tuple[Any, ...]:
    if isinstance(line, NewMarker):
        return ("new",)
    if isinstance(line, DaySeparator):
        return ("day", line.day)
    if isinstance(line, MessageLine):
        return ("msg", line.pos)
    return ("notice", line.seq)


class LoginView(urwid.WidgetWrap):
    """The login form: server, user, password, TLS name and CA file, "new account".

    Enter submits from any field; Tab and the arrows move between fields.  ``on_submit``
    gets a dict of the values (``register`` a bool); the app shows the outcome with
    :meth:`set_message`.
    """

    def __init__(
        self,
        values: dict[str, str],
        on_submit: Callable[[dict[str, Any]], Any],
    ) -> None:
        self.on_submit = on_submit
        self.fields: dict[str, urwid.Edit] = {}
        rows: list[urwid.Widget] = [
            SafeText(("header", " chatproto "), align="center"),
            urwid.Divider(),
        ]
        labels = [
            ("server", "Server    "),
            ("user", "User      "),
            ("password", "Password  "),
            ("realm", "TLS name  "),
            ("ca", "CA file   "),
        ]
        for name, label in labels:
            edit = urwid.Edit(label, values.get(name, ""), mask="*" if name == "password" else None)
            self.fields[name] = edit
            rows.append(urwid.AttrMap(edit, "field", "field focus"))
        self.register = urwid.CheckBox("create this account first")
        rows.append(self.register)
        rows.append(urwid.Divider())
        button = urwid.Button("Log in", on_press=lambda _: self.submit())
        rows.append(urwid.Padding(urwid.AttrMap(button, "button", "button focus"), width=12))
        rows.append(urwid.Divider())
        self.message = SafeText("")
        rows.append(self.message)
        rows.append(
            SafeText(
                (
                    "hint",
                    "Server: tcp:HOST:PORT, or tls:HOST:PORT (the certificate is "
                    "verified: TLS name defaults to HOST, CA file to the system's). "
                    "The server and user are remembered; the password never is. "
                    "Enter logs in, Tab moves, Ctrl-C quits.",
                ),
            )
        )
        self.pile = urwid.Pile(rows)
        # Start on the first empty field (the password when server and user are known).
        for i, w in enumerate(rows):
            base = getattr(w, "base_widget", w)
            if isinstance(base, urwid.Edit) and not base.edit_text:
                self.pile.focus_position = i
                break
        box = urwid.LineBox(urwid.Padding(self.pile, left=1, right=1), title="Log in")
        super().__init__(
            urwid.Filler(
                urwid.Padding(box, align="center", width=("relative", 60), min_width=50),
                valign="middle",
            )
        )
        self.busy = False

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: e.edit_text.strip() for k, e in self.fields.items()}
        out["password"] = self.fields["password"].edit_text  # spaces are significant
        out["register"] = self.register.get_state()
        return out

    def submit(self) -> None:
        if not self.busy:
            self.on_submit(self.values())

    def set_message(self, text: str, error: bool = False) -> None:
        self.message.set_text(("error" if error else "notice", text))

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key == "enter":
            focus = self.pile.focus
            if isinstance(getattr(focus, "base_widget", None), urwid.CheckBox):
                return super().keypress(size, key)  # type: ignore[no-any-return]
            self.submit()
            return None
        if key in ("tab", "down"):
            self._move(1)
            return None
        if key in ("shift tab", "up"):
            self._move(-1)
            return None
        return super().keypress(size, key)  # type: ignore[no-any-return]

    def _move(self, step: int) -> None:
        positions = [i for i, w in enumerate(self.pile.contents) if w[0].selectable()]
        current = self.pile.focus_position
        later = [p for p in positions if (p - current) * step > 0]
        if later:
            self.pile.focus_position = later[0] if step > 0 else later[-1]
