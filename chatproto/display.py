"""Stream items, group events and presence in words, for people reading a terminal.

One home for how the ``chatproto`` command and the terminal UI show what the realm
sends: ``[time] alice@x: hi``, ``bob joined``, ``bob reacted 👍 to <id>``,
``(edited)``, ``* bob is away: lunch``, ``1.5 KiB``.
"""

from __future__ import annotations

import json
import time
from typing import Any


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
        return json.dumps({k: v for k, v in msg.items() if k != "type"}, ensure_ascii=False)
    if (
        msg.get("kind") == "file"
        and isinstance(msg.get("meta"), dict)
        and not msg["meta"].get("deleted")
    ):
        meta = msg["meta"]
        msg = {
            **msg,
            "body": f"[file {meta.get('name')} ({human_size(meta.get('size', 0))}), "
            f"chatproto download {meta.get('file_id')}]",
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
    ref = meta.get("ref", "?")
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
        body = f"(re {meta['reply_to']}) {body}"
    if meta.get("edited"):
        body += " (edited)"
    reactions = meta.get("reactions")
    if isinstance(reactions, dict) and reactions:
        body += " [" + " ".join(f"{e} {len(u)}" for e, u in reactions.items()) + "]"
    return body


def format_presence(frame: dict[str, Any], as_json: bool, realm: str = "") -> str:
    """One output line for a presence frame: ``* bob is away: lunch``."""
    if as_json:
        return json.dumps(frame, ensure_ascii=False)
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
