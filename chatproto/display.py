"""Stream items, group events and presence in words, for people reading a terminal.

One home for how the ``chatproto`` command and the terminal UI show what the realm
sends: ``[time] alice@x: hi``, ``bob joined``, ``bob reacted 👍 to <id>``,
``(edited)``, ``* bob is away: lunch``, ``1.5 KiB``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

#: What a terminal acts on rather than shows: the C0 controls but tab and newline
#: (ESC starts escape sequences; CR, BS and VT move the cursor over what was
#: printed; SO switches the character set), DEL, and the C1 controls (U+009B is the
#: 8-bit CSI, U+009D the OSC that sets window titles).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: The formatting codes of IRC users' text (bold, colour with its numbers, hex
#: colour, reset, monospace, reverse, italic, strikethrough, underline): dropped.
_IRC_FORMAT = re.compile(
    "\x03(?:\\d{1,2}(?:,\\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
    "|[\x02\x0f\x11\x16\x1d\x1e\x1f]"
)
#: What an id or a name shown on one line may not hold besides: newline, tab, the
#: line and paragraph separators, the bidirectional embeddings, overrides and
#: isolates (they reorder what follows them on the line).
_LINE_BREAKING = re.compile("[\n\t\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: DEL and the C1 controls (and the separators) inside a JSON line, as \\u escapes.
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029]")


def _picture(m: re.Match[str]) -> str:
    """A control's Unicode control picture (U+2400-U+2421: ESC shows as ␛), U+FFFD
    for the C1 controls and the other characters replaced."""
    code = ord(m.group())
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else "\ufffd"


def terminal_text(text: str) -> str:
    """``text`` from the realm (a body, a name, a whole output line) as it may be
    printed to a terminal: IRC formatting codes dropped and every other control a
    terminal acts on shown as its control picture (``a\\x1b[2J`` -> ``a␛[2J``),
    newlines and tabs kept.  The realm refuses ESC and C1 controls in what it stores
    now (PROTOCOL.md), but not every control, and rows stored before those checks,
    or another realm's, may hold any.  What the ``chatproto`` command prints goes
    through it, and the terminal UI's text."""
    if _CONTROLS.search(text) is None:
        return text
    return _CONTROLS.sub(_picture, _IRC_FORMAT.sub("", text))


def terminal_label(text: Any) -> str:
    """An id, a ref or a name from the realm as shown inside a line: as
    :func:`terminal_text`, and newlines, tabs, separators and bidirectional
    formatting characters shown too (as ␊, ␉, U+FFFD): it stays one line, in order."""
    shown = terminal_text(str(text))
    if _LINE_BREAKING.search(shown) is None:
        return shown
    return _LINE_BREAKING.sub(_picture, shown)


def json_line(value: Any) -> str:
    """``value`` as one line of JSON output, non-ASCII text as it is but DEL and the
    C1 controls (which JSON allows raw in strings) escaped: the same JSON, and
    nothing a terminal acts on."""
    text = json.dumps(value, ensure_ascii=False)
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def action_body(text: str) -> str:
    """The body of a ``/me`` action: IRC's CTCP ACTION, which the IRC gateway stores and
    relays as sent (docs/irc.md), so IRC users see it as an action too."""
    return f"\x01ACTION {text}\x01"


def action(body: str) -> str | None:
    """The text of an action body (see :func:`action_body`), None for any other."""
    if body.startswith("\x01ACTION ") and body.endswith("\x01") and len(body) > 9:
        return body[8:-1]
    return None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def short(addr: Any, realm: str) -> str:
    """``addr`` without ``@realm`` when it is on ``realm`` (how names are shown)."""
    text = str(addr)
    suffix = "@" + realm
    return text[: -len(suffix)] if realm and text.endswith(suffix) else text


def describe_event(msg: dict[str, Any]) -> str:
    """A group event in words: ``bob joined``, ``alice kicked bob (spam)``."""
    meta = msg.get("meta") or {}
    group = str(msg.get("to", ""))
    realm = group.rpartition("@")[2]
    actor = short(msg.get("from", "?"), realm)
    user = short(meta.get("user", "?"), realm)
    event = meta.get("event", "?")
    reason = f" ({meta['reason']})" if meta.get("reason") else ""
    if event == "created":
        text = f"{actor} created the group"
        if meta.get("visibility") == "invite":
            text += " (invite-only)"
        return text + (f"; topic: {meta['topic']}" if meta.get("topic") else "")
    if event == "joined":
        return f"{user} joined"
    if event == "left":
        return f"{user} left"
    if event == "invited":
        return f"{actor} invited {user}"
    if event in ("kicked", "banned"):
        return f"{actor} {event} {user}{reason}"
    if event == "unbanned":
        return f"{actor} unbanned {user}"
    if event == "topic":
        topic = meta.get("topic", "")
        return f"{actor} set the topic: {topic}" if topic else f"{actor} cleared the topic"
    if event == "role":
        return f"{actor} made {user} {meta.get('role', '?')}"
    if event == "deleted":
        return f"{actor} deleted the group"
    return f"{actor}: {event}"


def format_message(msg: dict[str, Any], as_json: bool, me: str | None = None) -> str:
    """One output line for a stream item (``me``: show the recipient of own messages).

    Private: ``[time] alice@x: hi``; group: ``[time] #g@x alice@x: hi``; group event:
    ``[time] #g@x: bob joined``; bounce: ``[time] ! not delivered: <why>``.
    """
    if as_json:
        return json_line({k: v for k, v in msg.items() if k != "type"})
    if (
        msg.get("kind") == "file"
        and isinstance(msg.get("meta"), dict)
        and not msg["meta"].get("deleted")
    ):
        meta = msg["meta"]
        msg = {
            **msg,
            "body": f"[file {meta.get('name')} ({human_size(meta.get('size', 0))}), "
            f"chatproto download {terminal_label(meta.get('file_id'))}]",
        }
    when = f"[{_when(msg.get('ts', 0))}]"
    sender = msg.get("from", "?")
    to = str(msg.get("to", "?"))
    if msg.get("kind") == "bounce":  # another realm refused what we sent
        return f"{when} ! not delivered: {msg.get('body', '')}"
    where = f"{to} " if to.startswith("#") else ""
    refers = describe_relation(msg)
    if refers is not None:
        return f"{when} {where}{refers}"
    msg = {**msg, "body": shown_body(msg)}
    acted = action(str(msg.get("body", "")))  # /me waves (IRC's CTCP ACTION)
    if to.startswith("#"):
        if msg.get("kind") == "event":
            return f"{when} {to}: {describe_event(msg)}"
        if acted is not None:
            return f"{when} {to} * {sender} {acted}"
        return f"{when} {to} {sender}: {msg.get('body', '')}"
    if me is not None and sender == me:
        sender = f"{sender} -> {to}"
    if acted is not None:
        return f"{when} * {sender} {acted}"
    return f"{when} {sender}: {msg.get('body', '')}"


def describe_relation(msg: dict[str, Any]) -> str | None:
    """A reaction, edit or delete item in words (``bob reacted 👍 to <id>``), or None
    for any other item."""
    kind = msg.get("kind")
    meta = msg["meta"] if isinstance(msg.get("meta"), dict) else {}
    ref = terminal_label(meta.get("ref", "?"))
    who = msg.get("from", "?")
    if kind == "reaction":
        took = "took back" if meta.get("remove") else "reacted"
        return f"{who} {took} {meta.get('emoji', '?')} to {ref}"
    if kind == "edit":
        return f"{who} edited {ref}: {msg.get('body', '')}"
    if kind == "delete":
        return f"{who} deleted {ref}"
    return None


def shown_body(msg: dict[str, Any]) -> str:
    """A message's text with what history says of it: ``(deleted)``, ``(edited)``,
    the message it answers and its reactions (``[👍 2]``)."""
    meta = msg["meta"] if isinstance(msg.get("meta"), dict) else {}
    if meta.get("deleted"):
        return "(deleted)"
    body = str(msg.get("body", ""))
    if meta.get("reply_to"):
        body = f"(re {terminal_label(meta['reply_to'])}) {body}"
    if meta.get("edited"):
        body += " (edited)"
    reactions = meta.get("reactions")
    if isinstance(reactions, dict) and reactions:
        body += " [" + " ".join(f"{e} {len(u)}" for e, u in reactions.items()) + "]"
    return body


def format_presence(frame: dict[str, Any], as_json: bool, realm: str = "") -> str:
    """One output line for a presence frame: ``* bob is away: lunch``."""
    if as_json:
        return json_line(frame)
    user = short(frame.get("user", "?"), realm)
    text = f": {frame['text']}" if frame.get("text") else ""
    return f"* {user} is {frame.get('status', '?')}{text}"


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
