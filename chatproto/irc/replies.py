"""Replies to one IRC command: numerics, labeled responses, and realm errors as the
numerics IRC clients expect.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from chatproto.irc.lines import escape_tag, format_line, with_tag

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

__all__ = ["ERROR_NUMERICS", "Direct", "PendingSend", "Reply", "next_batch_id"]

_batch_ids = itertools.count(1)


def next_batch_id() -> int:
    """A connection-independent counter for batch references."""
    return next(_batch_ids)


#: ChatError code -> (numeric, text).  The target of the numeric is the request's target.
ERROR_NUMERICS = {
    "no_such_user": ("401", "No such nick"),
    "bad_address": ("401", "No such nick/channel"),
    "remote_realm": ("401", "That realm is not reachable (federation is off)"),
    "no_such_group": ("403", "No such channel"),
    "not_member": ("442", "You're not on that channel"),
    "forbidden": ("482", "You're not channel operator"),
    "banned": ("474", "Cannot join channel (+b)"),
    "not_invited": ("473", "Cannot join channel (+i)"),
    "group_full": ("471", "Cannot join channel (+l)"),
    "limit_reached": ("405", "You have joined too many channels"),
    "already_member": ("443", "is already on channel"),
    "group_exists": ("403", "Channel exists"),
}


class Reply:
    """The replies to one command: written at once, or collected for a labeled
    response (one line gets the ``label`` tag; several go in a labeled batch; none
    gets ``ACK``)."""

    __slots__ = ("label", "lines", "proto")

    def __init__(self, proto: IRCProtocol, label: str | None) -> None:
        self.proto = proto
        self.label = label
        self.lines: list[bytes] | None = [] if label is not None else None

    def send(self, line: bytes) -> None:
        if self.lines is None:
            self.proto.write(line)
        else:
            self.lines.append(line)

    def num(self, code: str, *params: str) -> None:
        p = self.proto
        self.send(format_line(p.server, code, p.nick, *params))

    def finish(self) -> None:
        lines, self.lines = self.lines, None
        if lines is None or self.label is None:
            return
        p = self.proto
        label = b"label=" + escape_tag(self.label).encode("utf-8", "replace")
        if not lines:
            p.write(with_tag(f":{p.server} ACK\r\n".encode(), label))
        elif len(lines) == 1 or not p.has("batch"):
            p.write(b"".join([with_tag(lines[0], label), *lines[1:]]))
        else:
            ref = f"L{next_batch_id()}"
            tag = b"batch=" + ref.encode()
            start = with_tag(f":{p.server} BATCH +{ref} labeled-response\r\n".encode(), label)
            body = b"".join(with_tag(line, tag) for line in lines)
            p.write(start + body + f":{p.server} BATCH -{ref}\r\n".encode())


class PendingSend:
    """A PRIVMSG/NOTICE on its way through the realm, until its echo is recognised."""

    __slots__ = ("body", "ctx", "matched", "to")

    def __init__(self, to: str, body: str, ctx: Reply) -> None:
        self.to = to
        self.body = body
        self.ctx = ctx
        self.matched = False


#: The reply object for unlabeled commands: writes straight through.
class Direct(Reply):
    __slots__ = ()

    def finish(self) -> None:
        pass
