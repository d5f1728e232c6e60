"""The terminal client's ``/commands``: the table, the parser and tab completion.

Pure functions over strings (and, for ``PATH`` arguments, the file system), so the
rules are tested without a terminal.  The controller runs a parsed :class:`Command`;
the view asks a :class:`Completer` what Tab should do to the input line.

A line not starting with ``/`` is a message to the conversation on screen; ``//text``
sends ``/text`` literally.  A command may be abbreviated to any unique prefix
(``/j #dev``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import attrs

__all__ = [
    "COMMANDS",
    "Command",
    "CommandSpec",
    "Completer",
    "Param",
    "Say",
    "UsageError",
    "candidates",
    "help_text",
    "parse",
]


class UsageError(Exception):
    """A command line that cannot be run as typed; the message says why, for the user."""


@attrs.frozen
class Param:
    """One argument: ``kind`` picks the completion source (``user``, ``group``,
    ``peer``, ``path``, ``file``, ``status``, ``command``, ``text``); ``rest`` takes
    the rest of the line, spaces included.  A ``message`` (the number shown beside a
    message) is optional and first: a word of digits is one when the command has
    nothing else to take or more words follow (``/edit 3 new text``; ``/edit 3``
    makes the text "3")."""

    name: str
    kind: str
    optional: bool = False
    rest: bool = False


@attrs.frozen
class CommandSpec:
    name: str
    params: tuple[Param, ...]
    help: str

    @property
    def usage(self) -> str:
        parts = [f"/{self.name}"]
        for p in self.params:
            label = p.name + ("..." if p.rest and p.kind == "text" else "")
            parts.append(f"[{label}]" if p.optional else label)
        return " ".join(parts)


def _p(name: str, kind: str, optional: bool = False, rest: bool = False) -> Param:
    return Param(name, kind, optional, rest)


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "msg",
            (_p("USER", "peer"), _p("TEXT", "text", True, True)),
            "open the conversation with USER (or #group), and send TEXT if given",
        ),
        CommandSpec(
            "query",
            (_p("USER", "peer"), _p("TEXT", "text", True, True)),
            "the same as /msg (irssi's habit)",
        ),
        CommandSpec(
            "me",
            (_p("TEXT", "text", rest=True),),
            "an action in this conversation: '* you TEXT' (IRC's /me, CTCP ACTION)",
        ),
        CommandSpec("join", (_p("#GROUP", "group"),), "join a group and open it"),
        CommandSpec(
            "create",
            (_p("#GROUP", "group"), _p("TOPIC", "text", True, True)),
            "create a public group (you become its owner) and open it",
        ),
        CommandSpec("leave", (_p("#GROUP", "group", True),), "leave a group (default: this one)"),
        CommandSpec("part", (_p("#GROUP", "group", True),), "the same as /leave"),
        CommandSpec(
            "topic",
            (_p("TEXT", "text", True, True),),
            "show this group's topic, or set it to TEXT",
        ),
        CommandSpec(
            "who",
            (_p("#GROUP", "group", True),),
            "who is online (in this group: its members, online or not)",
        ),
        CommandSpec(
            "names",
            (_p("#GROUP", "group", True),),
            "the members of a group (default: this one): ~owner, @admin, + online",
        ),
        CommandSpec(
            "whois",
            (_p("USER", "user"),),
            "whether USER exists, whether they are online, and their status",
        ),
        CommandSpec(
            "invite",
            (_p("USER", "user"), _p("#GROUP", "group", True)),
            "invite USER to a group (default: this one)",
        ),
        CommandSpec(
            "kick",
            (_p("USER", "user"), _p("REASON", "text", True, True)),
            "remove USER from this group",
        ),
        CommandSpec(
            "ban",
            (_p("USER", "user"), _p("REASON", "text", True, True)),
            "remove USER from this group and refuse their joins",
        ),
        CommandSpec("unban", (_p("USER", "user"),), "let a banned USER join this group again"),
        CommandSpec(
            "reply",
            (_p("N", "message", True), _p("TEXT", "text", rest=True)),
            "answer message N (the number beside it; default: the latest of someone else)",
        ),
        CommandSpec(
            "react",
            (_p("N", "message", True), _p("EMOJI", "text")),
            "react with EMOJI to message N (default: the latest of someone else); "
            "again: take it back",
        ),
        CommandSpec(
            "edit",
            (_p("N", "message", True), _p("TEXT", "text", rest=True)),
            "replace the text of your message N (default: your latest) (shown '(edited)')",
        ),
        CommandSpec(
            "delete",
            (_p("N", "message", True),),
            "delete your message or file N (default: your latest)",
        ),
        CommandSpec(
            "report",
            (_p("REASON", "text", rest=True),),
            "report the latest message someone else sent here to the realm's admins",
        ),
        CommandSpec("send", (_p("PATH", "path", rest=True),), "send a file to this conversation"),
        CommandSpec(
            "download",
            (_p("FILE", "file", True), _p("PATH", "path", True, True)),
            "save a file sent here (default: the latest) to PATH (default: the download directory)",
        ),
        CommandSpec(
            "search",
            (_p("WORDS", "text", rest=True),),
            "search the messages you may read (in a group or conversation: only that one)",
        ),
        CommandSpec(
            "status",
            (_p("STATUS", "status"), _p("TEXT", "text", True, True)),
            "show yourself as online, away or busy, with an optional text",
        ),
        CommandSpec(
            "window",
            (_p("N", "window"),),
            "go to window N of the sidebar (1: the status window; Alt-1..Alt-9, Alt-0: 10)",
        ),
        CommandSpec("close", (), "remove this conversation from the sidebar"),
        CommandSpec("help", (_p("COMMAND", "command", True),), "list commands, or explain one"),
        CommandSpec("quit", (), "close the connection and leave"),
    )
}

STATUSES = ("online", "away", "busy")


@attrs.frozen
class Command:
    """A parsed command: its spec and arguments by parameter name (absent if omitted)."""

    spec: CommandSpec
    args: dict[str, str]

    @property
    def name(self) -> str:
        return self.spec.name

    def get(self, name: str, default: str = "") -> str:
        return self.args.get(name, default)


@attrs.frozen
class Say:
    """A message for the conversation on screen."""

    text: str


def lookup(name: str) -> CommandSpec:
    """The command named ``name`` or uniquely abbreviated by it."""
    name = name.lower()
    if name in COMMANDS:
        return COMMANDS[name]
    matches = [spec for n, spec in COMMANDS.items() if n.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join("/" + s.name for s in matches)
        raise UsageError(f"/{name} is ambiguous: {names}")
    raise UsageError(f"unknown command /{name} (/help lists the commands)")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _present(params: Sequence[Param], words: Sequence[str]) -> Sequence[Param]:
    """``params`` without a leading message number that ``words`` do not give."""
    if params and params[0].kind == "message":
        first = words[0] if words else ""
        if not (first.isascii() and first.isdigit() and (len(params) == 1 or len(words) > 1)):
            return params[1:]
    return params


def parse(line: str) -> Command | Say | None:
    """Parse an input line: None for a blank line, :class:`Say` for a message,
    :class:`Command` for a command; raises :class:`UsageError`."""
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Say(line)
    if line.startswith("//"):
        return Say(line[1:])
    name, _, tail = line[1:].partition(" ")
    if not name:
        raise UsageError("a command name must follow '/' (/help lists the commands)")
    spec = lookup(name)
    args: dict[str, str] = {}
    rest = tail.strip()
    for param in _present(spec.params, rest.split(" ")):
        if not rest:
            if not param.optional:
                raise UsageError(f"usage: {spec.usage}")
            break
        if param.rest:
            args[param.name] = _unquote(rest) if param.kind == "path" else rest
            rest = ""
            break
        word, _, rest = rest.partition(" ")
        args[param.name] = word
        rest = rest.strip()
    if rest:
        raise UsageError(f"too many arguments; usage: {spec.usage}")
    return Command(spec, args)


def help_text(name: str | None = None) -> list[str]:
    """Lines of help: every command, or one command (raises UsageError if unknown)."""
    if name:
        spec = lookup(name.lstrip("/"))
        return [f"{spec.usage}: {spec.help}"]
    width = max(len(s.usage) for s in COMMANDS.values())
    lines = [f"{s.usage:<{width}}  {s.help}" for s in COMMANDS.values()]
    lines += [
        "Keys: Enter sends; Alt-Enter adds a line; Tab completes; Up/Down browse what you "
        "typed; PgUp/PgDn scroll (PgUp at the top loads older messages); Ctrl-N/Ctrl-P or "
        "Alt-Down/Alt-Up switch conversations; Alt-1..Alt-9 (Alt-0: 10) go to that window "
        "of the sidebar, 1 being this status window; Alt-A goes to the next unread one; "
        "F1 shows this help; Ctrl-Q quits.",
        "A line starting with // sends a message starting with /.",
    ]
    return lines


# completion -----------------------------------------------------------------------

#: names(kind) -> the candidates of a completion source (``user``, ``group``, ``file``...)
Names = Callable[[str], Sequence[str]]


def _paths(prefix: str) -> list[str]:
    expanded = os.path.expanduser(prefix)
    directory, partial = os.path.split(expanded)
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    out = []
    for entry in sorted(entries):
        if not entry.startswith(partial) or (entry.startswith(".") and not partial):
            continue
        full = os.path.join(directory, entry)
        shown = prefix[: len(prefix) - len(partial)] + entry
        out.append(shown + "/" if os.path.isdir(full) else shown)
    return out


def _source(kind: str, prefix: str, names: Names) -> list[str]:
    if kind == "command":
        return ["/" + n for n in COMMANDS if ("/" + n).startswith(prefix)] or [
            n for n in COMMANDS if n.startswith(prefix)
        ]
    if kind == "path":
        return _paths(prefix)
    if kind == "status":
        pool: Sequence[str] = STATUSES
    elif kind == "peer":
        pool = [*names("group"), *names("user")]
    elif kind in ("user", "group", "file"):
        pool = names(kind)
    else:
        return []
    low = prefix.lower()
    seen: dict[str, None] = {}
    for n in pool:
        if n.lower().startswith(low):
            seen[n] = None
    return list(seen)


def candidates(line: str, cursor: int, names: Names) -> tuple[int, list[str]]:
    """What could replace the word before ``cursor``: ``(start, [candidates])``.

    The word is ``line[start:cursor]``.  After ``/``: command names; in a command's
    arguments: the source of that parameter; in a message: user names.
    """
    head = line[:cursor]
    if head.startswith("/") and " " not in head:
        return 1, [n for n in COMMANDS if n.startswith(head[1:].lower())]
    if head.startswith("/") and not head.startswith("//"):
        name, _, tail = head[1:].partition(" ")
        try:
            spec = lookup(name)
        except UsageError:
            return cursor, []
        words = tail.lstrip().split(" ") if tail.strip() else [""]
        index = len(words) - 1
        for i, param in enumerate(_present(spec.params, words)):
            if param.rest and index >= i and param.kind == "text":
                break  # free text: complete names in it, as in a message
            if param.rest and index >= i:
                start = len(head) - len(" ".join(words[i:]))
                return start, _source(param.kind, head[start:], names)
            if i == index:
                word = words[-1]
                return cursor - len(word), _source(param.kind, word, names)
        else:
            return cursor, []
    word = head.rpartition(" ")[2]
    return cursor - len(word), _source("user", word, names)


def _common_prefix(words: Sequence[str]) -> str:
    if not words:
        return ""
    first, last = min(words), max(words)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


class Completer:
    """Tab completion with cycling, as in irssi or a shell.

    The first Tab completes a unique candidate (adding a space, or nothing after a
    directory), or extends the word to the candidates' common prefix; Tab again (the
    line unchanged) cycles through the candidates.  :attr:`offered` holds the
    candidates of the last Tab, for the view to show.
    """

    def __init__(self, names: Names) -> None:
        self.names = names
        self.offered: list[str] = []
        self._state: tuple[str, int, int, int] | None = None  # line, cursor, start, index

    def reset(self) -> None:
        self.offered = []
        self._state = None

    def complete(self, line: str, cursor: int) -> tuple[str, int]:
        """The new ``(line, cursor)`` after one Tab."""
        if self._state is not None and self._state[:2] == (line, cursor) and self.offered:
            _, _, start, index = self._state
            index = (index + 1) % len(self.offered)
            choice = self.offered[index]
            new = line[:start] + choice + line[cursor:]
            self._state = (new, start + len(choice), start, index)
            return new, start + len(choice)
        start, found = candidates(line, cursor, self.names)
        self.offered = list(found)
        self._state = None
        if not found:
            return line, cursor
        word = line[start:cursor]
        if len(found) == 1:
            choice = found[0]
            tail = "" if choice.endswith("/") else " "
            if line[cursor:].startswith(" "):
                tail = ""
            new = line[:start] + choice + tail + line[cursor:]
            return new, start + len(choice) + len(tail)
        prefix = _common_prefix(found)
        if len(prefix) > len(word):
            new = line[:start] + prefix + line[cursor:]
            self._state = (new, start + len(prefix), start, -1)
            return new, start + len(prefix)
        choice = found[0]
        new = line[:start] + choice + line[cursor:]
        self._state = (new, start + len(choice), start, 0)
        return new, start + len(choice)
