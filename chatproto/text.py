"""What a client-chosen string may contain when the realm shows it to others.

One rule for every short string a client names something with and others see: file
names, group topics, kick and ban reasons, status texts, device names (which also go
to the operator's log).  Such a *label* is one line of plain text, so it may not hold
the characters that make a terminal, a log file or a page show something else than
what was written:

- the C0 controls U+0000-U+001F (NUL, tab, newline, escape...) and DEL U+007F;
- the C1 controls U+0080-U+009F (U+009B is the 8-bit CSI that starts terminal escape
  sequences, U+0085 a line break);
- the line and paragraph separators U+2028 and U+2029;
- the bidirectional embeddings, overrides and isolates U+202A-U+202E and
  U+2066-U+2069, which reorder the text after them (a file name that reads
  ``invoice_fdp.exe`` as ``invoice_exe.pdf``).  The marks U+200E, U+200F and U+061C,
  which reorder nothing beyond themselves, and the joiners U+200C/U+200D (emoji
  sequences, Persian) are allowed.

A message *body* is text a person wrote, often on several lines, and IRC users format
it with control codes (bold U+0002, colour U+0003, CTCP U+0001 for ``/me``...), so it
keeps those, tabs, newlines and bidirectional controls (text in Arabic or Hebrew may
need them); it may not hold ESC U+001B or the C1 controls, which introduce terminal
control sequences and are no part of any text.  Clients display bodies as text
(PROTOCOL.md says how).

The realm service applies these rules (they are rules, not translation); a refused
string is ``bad_request``.
"""

from __future__ import annotations

import re

from chatproto.errors import ChatError

__all__ = [
    "MAX_REASON",
    "check_body",
    "check_label",
    "check_reason",
    "label_problem",
    "log_shown",
    "without_forbidden",
]

_LABEL_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_BODY_FORBIDDEN = re.compile("[\x1b\x80-\x9f]")

#: The longest reason given for a moderation action (a report, a suspension, an
#: operator's kick), in characters.
MAX_REASON = 400


def _name(char: str) -> str:
    return f"U+{ord(char):04X}"


def label_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label (see the module docstring), or None."""
    m = _LABEL_FORBIDDEN.search(value)
    if m is None:
        return None
    return f"control or bidirectional formatting character {_name(m.group())}"


def without_forbidden(value: str) -> str:
    """``value`` with the characters a label may not hold dropped (what
    :func:`label_problem` finds): for a text shown to others that is cleaned rather
    than refused (an IRC realname or QUIT reason)."""
    return _LABEL_FORBIDDEN.sub("", value)


def log_shown(value: object, longest: int = 64) -> str:
    """``value`` (a peer's, unchecked) as it goes in the operator's log: its first
    ``longest`` characters, as ``ascii()`` spells them if any is not printable (no
    CR/LF or escape in the log)."""
    shown = str(value)[:longest]
    return shown if shown.isprintable() else ascii(shown)


def check_label(value: str, what: str) -> str:
    """``value`` if it is a valid label, else ``bad_request`` naming ``what``."""
    problem = label_problem(value)
    if problem is not None:
        raise ChatError("bad_request", f"{what} contains a {problem}")
    return value


def check_reason(value: str, required: bool = False) -> str:
    """A reason for a moderation action, shown to the user it concerns or to the
    realm's admins: ``value`` without leading and trailing spaces, a label of at most
    :data:`MAX_REASON` characters (and at least one if ``required``); else
    ``bad_request``."""
    value = check_label(value.strip(), "the reason")
    if len(value) > MAX_REASON or (required and not value):
        low = 1 if required else 0
        raise ChatError("bad_request", f"a reason is {low} to {MAX_REASON} characters")
    return value


def check_body(value: str) -> str:
    """``value`` if it is a valid message body, else ``bad_request``."""
    # ASCII text (known without a scan) can hold only ESC of the forbidden characters:
    # one memchr instead of the pattern's character-class loop.
    if value.isascii() and "\x1b" not in value:
        return value
    m = _BODY_FORBIDDEN.search(value)
    if m is not None:
        raise ChatError(
            "bad_request",
            f"body contains {_name(m.group())} (escape or C1 control: not text)",
        )
    return value
