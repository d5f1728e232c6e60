"""IRC lines: parsing what clients send, formatting what the gateway sends, and the
mapping between realm addresses and IRC nicks and channels.

Pure functions with no state, used by every other module of :mod:`chatproto.irc`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from twisted.words.protocols import irc as twirc

from chatproto.realm.tags import escape_value
from chatproto.text import without_forbidden

__all__ = [
    "CRLF",
    "MAX_CLIENT_TAGS",
    "MAX_LINE",
    "MAX_TAGS",
    "MAX_TARGETS",
    "IRCBadLine",
    "body_lines",
    "channel_of",
    "decimal",
    "escape_tag",
    "format_line",
    "group_of",
    "in_batch",
    "nick_of",
    "param",
    "parse_line",
    "plain_text",
    "prefix",
    "quick_message",
    "server_time",
    "shown_label",
    "split_lines",
    "split_utf8",
    "unescape_tag",
    "user_of",
    "with_tag",
]

#: Longest line (without tags, with CR LF) a client may send and the server sends.
MAX_LINE = 512


def text_room(mask: str, command: str, shown: str) -> int:
    """The most characters of text that surely fit one line ``:mask command shown
    :text`` at the recipient (its ``MAX_LINE`` bytes less CR LF; a character is at most
    4 bytes once UTF-8 encoded, and the line has 5 characters more than its three
    names): a longer text may not fit, and is measured in bytes (the 417 check of
    PRIVMSG and NOTICE)."""
    return (MAX_LINE - 2) // 4 - (len(mask) + len(command) + len(shown) + 5)


#: Longest tag section of a line (with the ``@`` and the space), per the message-tags spec.
MAX_TAGS = 8191
#: Longest tag section a client may send (with the ``@`` and the space): 4094 bytes of
#: tag data, per the message-tags spec; longer gets 417.
MAX_CLIENT_TAGS = 4096
#: Targets one PRIVMSG/NOTICE may name (``TARGMAX``).
MAX_TARGETS = 4

CRLF = b"\r\n"


class IRCBadLine(Exception):
    """A line that cannot be parsed (it is ignored, as RFC 1459 asks)."""


#: IRC formatting: bold, colour (with its numbers), hex colour, reset, monospace,
#: reverse, italic, strikethrough, underline.
_FORMATTING = re.compile(
    "\x02|\x03(?:[0-9]{1,2}(?:,[0-9]{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
    "|[\x0f\x11\x16\x1d\x1e\x1f]"
)


_DECIMAL = re.compile("-?[0-9]{1,15}")


def decimal(text: str) -> int | None:
    """The integer ``text`` spells in ASCII digits (an optional ``-`` and at most 15
    digits, so within +-(2**53 - 1)), or None.  ``str.isdigit`` is not enough: it
    accepts ``²`` and other digits ``int()`` refuses, and any number of them."""
    return int(text) if _DECIMAL.fullmatch(text) else None


def shown_label(text: str) -> str:
    """``text`` as a one-line label others see, for the texts the gateway keeps
    itself (a realname, a QUIT reason; the realm checks topics, reasons and away
    texts): :func:`plain_text`, without the characters a label may not hold
    (:mod:`chatproto.text`: C0 and C1 controls such as ESC, bidirectional
    overrides), which are dropped."""
    return without_forbidden(plain_text(text))


def plain_text(text: str) -> str:
    """``text`` without IRC formatting codes: for topics, kick reasons and away
    texts, which the realm keeps as plain text (no control characters) since every
    kind of client shows them.  Message bodies keep their formatting."""
    return _FORMATTING.sub("", text)


# -- parsing ------------------------------------------------------------------------

_TAG_UNESCAPE = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}


def unescape_tag(value: str) -> str:
    if "\\" not in value:
        return value
    out = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append(_TAG_UNESCAPE.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


#: A tag value as IRC writes it (the realm measures client tags in this form).
escape_tag = escape_value


def parse_line(line: str) -> tuple[dict[str, str], str, list[str]]:
    """``@tags :prefix COMMAND params`` -> (tags, upper-case command, params).

    The part after the tags is split by ``twisted.words.protocols.irc.parsemsg``; the
    client's prefix is ignored.  Raises :class:`IRCBadLine` for an empty or broken line.
    """
    tags: dict[str, str] = {}
    if line.startswith("@"):
        raw, _, line = line.partition(" ")
        for item in raw[1:].split(";"):
            if item:
                key, _, value = item.partition("=")
                tags[key] = unescape_tag(value)
        line = line.lstrip(" ")
    line = line.lstrip(" ")
    if not line or (line.startswith(":") and " " not in line.strip()):
        raise IRCBadLine("empty line")
    if line[0] == ":":
        try:
            _prefix, command, params = twirc.parsemsg(line)
        except (twirc.IRCBadMessage, ValueError, IndexError):
            raise IRCBadLine("unparsable line") from None
    else:  # what parsemsg does with a line without a prefix, without the call
        cut = line.find(" :")
        if cut == -1:
            params = line.split()
        else:
            params = line[:cut].split()
            params.append(line[cut + 2 :])
        if not params:
            raise IRCBadLine("unparsable line")
        command = params.pop(0)
    # letters, digits, "_" and "-" (str.isalnum: any script's, as before)
    if not command.isalnum():
        rest = command.replace("_", "").replace("-", "")
        if not command or (rest and not rest.isalnum()):
            raise IRCBadLine("bad command")
    return tags, command.upper(), params


#: The line :func:`quick_message` takes: the command, one space, the target (no
#: whitespace or comma, not starting with ':') between any whitespace (what
#: ``str.split`` splits on: ``\\s`` in a str pattern), then `` :`` and the text.
#: The first `` :`` of such a line is the one before its text.
_QUICK = re.compile(r"(PRIVMSG|NOTICE) \s*([^\s,:][^\s,]*)\s* :(.+)", re.DOTALL)
#: The match of a line :func:`quick_message` takes (None for others); its
#: ``groups()`` are what that gives.  ``IRCProtocol._handle`` calls it directly (one
#: call less per line).
quick_match: Any = _QUICK.fullmatch


def quick_message(line: str) -> tuple[str, str, str] | None:
    """``(command, target, text)`` of the commonest line, a ``PRIVMSG`` or ``NOTICE``
    with no tags, no prefix, one target and a non-empty text, else None.

    What :func:`parse_line` gives for such a line (``({}, command, [target, text])``),
    for a fraction of its cost (one regular expression, ``quick_match``, which is
    what the lean lane of ``IRCProtocol._handle`` calls, without this call)."""
    m = quick_match(line)
    return None if m is None else m.groups()


# -- names ----------------------------------------------------------------------------


def nick_of(user: str, realm: str) -> str:
    """The IRC nick of a canonical user address: ``name`` or ``name/realm``."""
    name, _, where = user.partition("@")
    return name if where == realm or not where else f"{name}/{where}"


def user_of(nick: str) -> str:
    """The realm address text of a nick (``name/realm`` -> ``name@realm``)."""
    return nick.replace("/", "@", 1)


def channel_of(group: str, realm: str) -> str:
    """The IRC channel of a canonical group address: ``#name`` or ``#name/realm``."""
    name, _, where = group.partition("@")
    return name if where == realm or not where else f"{name}/{where}"


def group_of(channel: str) -> str:
    """The realm address text of a channel (``#name/realm`` -> ``#name@realm``)."""
    return channel.replace("/", "@", 1)


def server_time(ts: float) -> str:
    whole = int(ts)
    ms = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def param(text: str) -> str:
    """A middle parameter cannot hold spaces or start with ':'."""
    return text.replace(" ", "_").lstrip(":") or "*"


#: Commands whose last parameter is free text, always sent as trailing (``:text``).
TEXT_COMMANDS = frozenset(
    {"PRIVMSG", "NOTICE", "TOPIC", "KICK", "PART", "QUIT", "ERROR", "AWAY", "FAIL", "CAP"}
)


def _one_line(text: str) -> str:
    """``text`` without NUL, with CR and LF read as spaces (what :func:`format_line`
    does to a parameter, before it is measured or quoted)."""
    return text.replace("\0", "").replace("\r", " ").replace("\n", " ")


def _middle(text: str) -> str:
    """``text`` as one middle parameter: :func:`param` of it on one line."""
    return param(_one_line(text))


def format_line(source: str | None, command: str, *params: str) -> bytes:
    """One line; the last parameter is sent as trailing (``:text``) for numerics and
    text commands, or when it needs to be (empty, spaces, leading ``:``); the others
    go through :func:`param` when they are not middle parameters as they are (empty,
    a space, a leading ``:``: a client's empty target echoed in a numeric, as
    ``PRIVMSG bob, :hi`` gives, would shift the parameters after it).  CR and LF
    in a parameter read as spaces, NUL is dropped: whatever a stored item or another
    realm managed to put in one, it is never a line of its own."""
    parts = [f":{source} {command}" if source else command]
    if params:
        middle = params[:-1]
        for p in middle:  # a middle parameter that is not one (a client's empty target)
            if not p or p[0] == ":" or " " in p or "\r" in p or "\n" in p or "\0" in p:
                middle = tuple(_middle(p) for p in middle)
                break
        parts.extend(middle)
        last = params[-1]
        if "\0" in last or "\r" in last or "\n" in last:  # (before it is measured)
            last = _one_line(last)
        if (
            command in TEXT_COMMANDS
            or command[0].isdigit()
            or not last
            or " " in last
            or last[0] == ":"
        ):
            last = ":" + last
        parts.append(last)
    data = " ".join(parts).encode("utf-8", "replace")
    if b"\r" in data or b"\n" in data or b"\0" in data:  # never more than one line
        data = data.replace(b"\0", b"").replace(b"\r", b" ").replace(b"\n", b" ")
    if len(data) > MAX_LINE - 2:  # RFC 1459 limit: truncate (a long topic, a long reason)
        cut = MAX_LINE - 2
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # not inside a character
            cut -= 1
        data = data[:cut]
    return data + CRLF


def with_tag(line: bytes, tag: bytes) -> bytes:
    """``line`` (one line) with ``tag`` (``key=value``, escaped) added first."""
    if line.startswith(b"@"):
        return b"@" + tag + b";" + line[1:]
    return b"@" + tag + b" " + line


def split_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` (whole lines, each with its CRLF)."""
    return [line + CRLF for line in data.split(CRLF)[:-1]]


def _in_batch(line: bytes) -> bool:
    """Whether ``line`` carries a ``batch`` tag (it belongs to a batch already)."""
    if not line.startswith(b"@"):
        return False
    tags = line[1 : line.find(b" ")]
    return any(t == b"batch" or t.startswith(b"batch=") for t in tags.split(b";"))


def in_batch(data: bytes, ref: str) -> bytes:
    """Every line of ``data`` tagged ``batch=<ref>`` (IRCv3 batch: each line of a
    batch carries its tag -- every line of a multi-line message too), but for lines
    of a batch nested in it, which carry their own batch's tag (the line opening the
    nested batch carries this one's)."""
    tag = b"batch=" + ref.encode()
    return b"".join(line if _in_batch(line) else with_tag(line, tag) for line in split_lines(data))


def split_utf8(text: str, limit: int) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` UTF-8 bytes, at spaces when one
    is near the end of the piece, never inside a character."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return [text]
    out = []
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # do not split a character
            cut -= 1
        space = data.rfind(b" ", max(1, cut - 80), cut)
        if space > 0:
            cut = space + 1
        out.append(data[:cut].decode("utf-8", "replace"))
        data = data[cut:]
    if data:
        out.append(data.decode("utf-8", "replace"))
    return out


def body_lines(body: str, limit: int) -> list[str]:
    """A message body as IRC texts: one per body line, long lines split."""
    out: list[str] = []
    for raw in body.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "").split("\n"):
        if raw:
            out.extend(split_utf8(raw, limit))
    return out or [" "]


def prefix(role: str, voice: bool, multi: bool = False) -> str:
    """A member's channel prefix (NAMES, WHO, WHOIS): ``@`` for admins and owners
    (channel operators), ``+`` for voiced members; both, highest first, with
    ``multi`` (the multi-prefix capability), else the highest."""
    op = "@" if role in ("owner", "admin") else ""
    if voice and (multi or not op):
        return op + "+"
    return op
