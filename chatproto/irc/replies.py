"""Replies to one IRC command: numerics, labeled responses, and realm errors as the
numerics IRC clients expect.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed

from chatproto.irc.lines import escape_tag, format_line, in_batch, split_lines, with_tag

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
    "remote_realm": ("401", "That realm is not reachable from here"),
    "no_such_group": ("403", "No such channel"),
    "not_member": ("442", "You're not on that channel"),
    "forbidden": ("482", "You're not channel operator"),
    "banned": ("474", "Cannot join channel (+b)"),
    "not_invited": ("473", "Cannot join channel (+i)"),
    "group_full": ("471", "Cannot join channel (+l)"),
    "bad_key": ("475", "Cannot join channel (+k)"),
    "moderated": ("404", "Cannot send to channel (+m)"),
    "limit_reached": ("405", "You have joined too many channels"),
    "already_member": ("443", "is already on channel"),
    "group_exists": ("403", "Channel exists"),
}


class Reply:
    """The replies to one command, in the order the commands came.

    A connection answers its commands in order (clients, bouncers and lag meters rely
    on it: a ``PING`` after a ``JOIN`` is answered after the ``JOIN``'s replies), yet
    a command that waits for storage must not hold up the realm.  So each command
    gets a Reply, and the connection keeps the replies still pending in order
    (``proto.replies``): only the oldest one writes straight through; a later one
    holds its lines until every earlier one has finished, then writes them.

    With a ``label`` (labeled-response) the lines are always collected: one line gets
    the ``label`` tag, several go in a labeled batch, none gets ``ACK``.
    """

    __slots__ = ("done", "label", "lines", "proto", "queued", "sends", "waiting")

    def __init__(self, proto: IRCProtocol, label: str | None, held: bool = False) -> None:
        self.proto = proto
        self.label = label
        #: None: written straight through; a list: held until finish (or until
        #: every earlier reply has finished, when unlabeled)
        self.lines: list[bytes] | None = [] if label is not None or held else None
        self.done = False
        #: in ``proto.replies`` (a command that is pending, or came after one)
        self.queued = False
        self.waiting: list[Deferred[None]] | None = None
        #: the command's messages still with the realm (PRIVMSG/NOTICE sent in a
        #: batch: see IRCProtocol.queue_send); the last one settled finishes it
        self.sends = 0

    def send(self, line: bytes) -> None:
        if self.lines is None:
            self.proto.write(line)
        else:
            self.lines.append(line)

    def num(self, code: str, *params: str) -> None:
        p = self.proto
        self.send(format_line(p.server, code, p.nick, *params))

    def turn(self) -> Deferred[None]:
        """Fires once every earlier command's replies are written (for a command
        whose action, not only its replies, must wait for them: QUIT)."""
        order = self.proto.replies
        if not self.queued or order[0] is self:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self.waiting is None:
            self.waiting = []
        self.waiting.append(d)
        return d

    def finish(self) -> None:
        """The command is complete: write its replies now, or once the earlier
        commands' are written."""
        if self.done:
            return
        self.done = True
        order = self.proto.replies
        if self.queued and order[0] is not self:
            return  # an earlier command is still pending: it releases this one
        if self.lines is not None:  # (nothing to emit otherwise: no call)
            self._emit()
        if self.queued:
            order.popleft()
            while order:
                head = order[0]
                if not head.done:
                    if head.label is None and head.waiting is None:  # _reach_head, inline
                        lines, head.lines = head.lines, None
                        if lines:
                            self.proto.write(b"".join(lines))
                    else:
                        head._reach_head()  # may finish it, which then goes on from there
                    break
                head._reach_head()
                head._emit()
                order.popleft()

    def _reach_head(self) -> None:
        if self.label is None and self.lines is not None and not self.done:
            lines, self.lines = self.lines, None
            if lines:
                self.proto.write(b"".join(lines))
        waiting, self.waiting = self.waiting, None
        for d in waiting or ():
            d.callback(None)

    def _emit(self) -> None:
        lines, self.lines = self.lines, None
        if lines is None:
            return
        p = self.proto
        if self.label is None:
            if lines:
                p.write(b"".join(lines))
            return
        label = b"label=" + escape_tag(self.label).encode("utf-8", "replace")
        # One reply may hold several lines (a multi-line message, a whole batch): the
        # label goes on the only line, or on a batch holding every line.
        data = b"".join(lines)
        each = split_lines(data)
        if not each:
            p.write(with_tag(f":{p.server} ACK\r\n".encode(), label))
        elif len(each) == 1 or not p.has("batch"):
            p.write(b"".join([with_tag(each[0], label), *each[1:]]))
        else:
            ref = f"L{next_batch_id()}"
            start = with_tag(f":{p.server} BATCH +{ref} labeled-response\r\n".encode(), label)
            p.write(start + in_batch(data, ref) + f":{p.server} BATCH -{ref}\r\n".encode())


class PendingSend:
    """A PRIVMSG/NOTICE on its way through the realm, until its echo is recognised.

    ``command`` and ``target`` (as the client wrote it) name it in an error numeric;
    a NOTICE (``quiet``) gets none, as IRC wants."""

    __slots__ = ("body", "command", "ctx", "matched", "quiet", "target", "to")

    def __init__(
        self,
        to: str,
        body: str,
        ctx: Reply,
        command: str = "PRIVMSG",
        target: str = "*",
        quiet: bool = False,
    ) -> None:
        self.to = to
        self.body = body
        self.ctx = ctx
        self.matched = False
        self.command = command
        self.target = target
        self.quiet = quiet


class Direct(Reply):
    """Lines that answer no command (deliveries, registration): straight through."""

    __slots__ = ()

    def finish(self) -> None:
        pass
