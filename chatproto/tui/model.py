"""What the terminal client shows, as plain data: no urwid, no network.

The controller (:mod:`chatproto.tui.controller`) feeds this model with stream items,
history pages, presence frames and notices; the view (:mod:`chatproto.tui.view`)
renders it and is told to redraw through :meth:`ChatModel.subscribe`.  Keeping the
rules here (which conversation an item belongs to, what counts as unread, where a day
separator goes, what is a duplicate) makes them testable without a terminal.

A conversation's items are keyed by stream position and also remembered by
``msg_id``: an item seen twice (the stream and a history page overlap, or a resume
overlaps) is shown once.  Items are always a contiguous suffix of the conversation
(the live stream plus pages of history fetched backwards from the newest), so paging
back means asking for the items before the oldest loaded position.
"""

from __future__ import annotations

import datetime
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from chatproto.mentions import mentions

__all__ = [
    "STATUS",
    "TYPING_SHOWN",
    "ChatModel",
    "Conversation",
    "DaySeparator",
    "InputHistory",
    "MessageLine",
    "NewMarker",
    "NoticeLine",
    "Transfer",
]

#: The address of the status conversation (notices not about one conversation).
STATUS = ""
#: How many items a history page asks for.
PAGE = 50


#: Items that change another item instead of being a line (PROTOCOL.md, "Items that
#: refer to items").
REF_KINDS = frozenset({"reaction", "edit", "delete"})
#: Seconds a typing notice is shown (PROTOCOL.md, ``typing``).
TYPING_SHOWN = 6.0


@attrs.define
class DaySeparator:
    """``--- Wednesday 25 November 2026 ---`` before the first line of each day."""

    day: datetime.date

    def text(self) -> str:
        return f"{self.day:%A %d %B %Y}"


@attrs.define
class NewMarker:
    """``--- new ---`` before the first item that was unread when the conversation
    was opened."""


@attrs.define
class MessageLine:
    """One stored item (text, event, file) of a conversation, as it is now (edited,
    deleted, reacted to); ``quote``: the item a reply answers, when it is loaded."""

    item: dict[str, Any]
    quote: dict[str, Any] | None = None

    @property
    def pos(self) -> int:
        return int(self.item.get("pos", 0))

    @property
    def ts(self) -> float:
        return float(self.item.get("ts", 0.0))


@attrs.define
class NoticeLine:
    """A local line (command output, an error) shown after position ``after``."""

    text: str
    ts: float
    after: int
    seq: int
    error: bool = False


Line = DaySeparator | NewMarker | MessageLine | NoticeLine


@attrs.define
class Transfer:
    """A file upload or download in progress (or finished), shown with a progress bar."""

    key: str
    name: str
    direction: str  # "up" or "down"
    total: int
    done: int = 0
    state: str = "running"  # running, done, failed
    error: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


@attrs.define(eq=False)
class Conversation:
    """A private conversation (``address`` is the other user) or a group."""

    address: str
    unread: int = 0
    #: unread group messages that mention the user (chatproto.mentions)
    mentions: int = 0
    topic: str = ""
    #: "unloaded", "loading", "partial" (older pages exist) or "complete"
    history: str = "unloaded"
    #: Still a member / still worth listing (False after leaving a group).
    joined: bool = True
    items: dict[int, dict[str, Any]] = attrs.Factory(dict)
    ids: set[str] = attrs.Factory(set)
    #: msg_id -> position of the items (not reactions, edits, deletes) here
    by_id: dict[str, int] = attrs.Factory(dict)
    #: the position of the first item that was unread when the conversation was opened
    marker: int | None = None
    #: user -> when their last "typing" notice came (see ChatModel.typists)
    typing: dict[str, float] = attrs.Factory(dict)
    notices: list[NoticeLine] = attrs.Factory(list)

    @property
    def is_group(self) -> bool:
        return self.address.startswith("#")

    @property
    def oldest(self) -> int | None:
        return min(self.items) if self.items else None

    @property
    def newest(self) -> int:
        return max(self.items) if self.items else 0

    def add(self, item: dict[str, Any]) -> bool:
        """Store ``item``; False when it is already here (same position or id).

        A reaction, edit or delete is not a line of its own: it changes the item it
        refers to, if that is here (PROTOCOL.md, "Items that refer to items")."""
        pos = item.get("pos")
        msg_id = item.get("msg_id")
        if not isinstance(pos, int) or pos in self.items or msg_id in self.ids:
            return False
        if msg_id:
            self.ids.add(msg_id)
        if item.get("kind") in REF_KINDS:
            self.apply(item)
            return True
        self.items[pos] = item
        if msg_id:
            self.by_id[msg_id] = pos
        return True

    def find(self, msg_id: Any) -> dict[str, Any] | None:
        """The item with this id, if it is loaded here."""
        pos = self.by_id.get(msg_id) if isinstance(msg_id, str) else None
        return self.items.get(pos) if pos is not None else None

    def apply(self, ref: dict[str, Any]) -> None:
        """Apply a reaction, edit or delete to the item it refers to (a new dict, so
        views that cache by item see the change)."""
        raw = ref.get("meta")
        meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
        target = self.find(meta.get("ref"))
        if target is None:
            return
        tmeta = dict(target.get("meta") or {})
        if tmeta.get("deleted"):
            return
        kind = ref.get("kind")
        body = target.get("body", "")
        if kind == "delete":
            body, tmeta = "", {"deleted": True}
        elif kind == "edit":
            if ref.get("from") != target.get("from"):
                return
            body, tmeta["edited"] = ref.get("body", ""), ref.get("ts")
        else:
            emoji = str(meta.get("emoji", ""))
            reactions = {e: list(u) for e, u in (tmeta.get("reactions") or {}).items()}
            users = reactions.setdefault(emoji, [])
            who = ref.get("from")
            if meta.get("remove"):
                if who in users:
                    users.remove(who)
            elif who not in users:
                users.append(who)
            tmeta["reactions"] = {e: u for e, u in reactions.items() if u}
            if not tmeta["reactions"]:
                del tmeta["reactions"]
        self.items[target["pos"]] = {**target, "body": body, "meta": tmeta}

    def latest(self, mine: bool, me: str) -> dict[str, Any] | None:
        """The newest message or file here that is (``mine``) or is not one's own,
        not deleted."""
        for pos in sorted(self.items, reverse=True):
            item = self.items[pos]
            if item.get("kind") not in ("text", "file"):
                continue
            if (item.get("meta") or {}).get("deleted"):
                continue
            if (item.get("from") == me) == mine:
                return item
        return None

    def numbers(self) -> dict[int, int]:
        """``{position: number}`` of the messages and files here, not deleted: the
        number shown beside each (1 for the newest, counting back), which ``/react``,
        ``/reply``, ``/edit`` and ``/delete`` take to pick one."""
        out: dict[int, int] = {}
        for pos in sorted(self.items, reverse=True):
            item = self.items[pos]
            if item.get("kind") in ("text", "file") and not (item.get("meta") or {}).get("deleted"):
                out[pos] = len(out) + 1
        return out

    def numbered(self, number: int) -> dict[str, Any] | None:
        """The message or file shown with ``number`` (see :meth:`numbers`)."""
        for pos, n in self.numbers().items():
            if n == number:
                return self.items[pos]
        return None

    def lines(self, tz: datetime.tzinfo | None = None) -> list[Line]:
        """Items and notices in order, with a :class:`DaySeparator` at each new day."""
        keyed: list[tuple[tuple[int, int, int], MessageLine | NoticeLine]] = [
            ((pos, 0, 0), MessageLine(item, self.find((item.get("meta") or {}).get("reply_to"))))
            for pos, item in self.items.items()
        ]
        keyed += [((n.after, 1, n.seq), n) for n in self.notices]
        keyed.sort(key=lambda kv: kv[0])
        out: list[Line] = []
        day: datetime.date | None = None
        for _, line in keyed:
            d = datetime.datetime.fromtimestamp(line.ts, tz).date()
            if d != day:
                out.append(DaySeparator(d))
                day = d
            if isinstance(line, MessageLine) and line.pos == self.marker:
                out.append(NewMarker())
            out.append(line)
        return out

    def mark_unread(self, me: str) -> None:
        """Put the "new" marker before the oldest of the ``unread`` newest items from
        others (or remove it when nothing is unread)."""
        self.marker = None
        left = self.unread
        for pos in sorted(self.items, reverse=True):
            if left <= 0:
                break
            if self.items[pos].get("from") != me:
                self.marker = pos
                left -= 1


class ChatModel:
    """Everything the chat screen shows; listeners are called after each change.

    ``me`` and ``realm`` are set at login (canonical address of the user, realm name).
    ``clock`` gives the time for notices (a ``time.time``-like callable).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.me = ""
        self.realm = ""
        self.conversations: dict[str, Conversation] = {STATUS: Conversation(STATUS)}
        self.active = STATUS
        #: user address -> (status, text); absent means offline
        self.presence: dict[str, tuple[str, str]] = {}
        #: "offline", "connecting", "online", "reconnecting", "failed"
        self.connection = "offline"
        self.connection_detail = ""
        self.transfers: dict[str, Transfer] = {}
        #: the last completion candidates offered (shown above the input line)
        self.hint = ""
        self._seq = itertools.count()
        self._listeners: list[Callable[[], None]] = []

    def reset(self) -> None:
        """Forget everything shown (another account logged in)."""
        self.conversations = {STATUS: Conversation(STATUS)}
        self.active = STATUS
        self.presence.clear()
        self.transfers.clear()
        self.changed()

    # change notification ----------------------------------------------------------

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    # conversations ------------------------------------------------------------------

    def conversation(self, address: str) -> Conversation:
        """The conversation with ``address`` (a canonical address), created if new."""
        conv = self.conversations.get(address)
        if conv is None:
            conv = self.conversations[address] = Conversation(address)
        return conv

    def sidebar(self) -> list[Conversation]:
        """Status first, then groups, then people, each alphabetical."""
        convs = [c for a, c in self.conversations.items() if a != STATUS]
        groups = sorted((c for c in convs if c.is_group), key=lambda c: c.address)
        people = sorted((c for c in convs if not c.is_group), key=lambda c: c.address)
        return [self.conversations[STATUS], *groups, *people]

    def select(self, address: str) -> Conversation:
        previous = self.conversations.get(self.active)
        conv = self.conversation(address)
        if previous is not None and previous is not conv:
            previous.marker = None  # read by now
        if previous is not conv:
            conv.mark_unread(self.me)
        self.active = address
        conv.unread = 0
        conv.mentions = 0
        self.changed()
        return conv

    def cycle(self, step: int) -> Conversation:
        """Select the conversation ``step`` places down (or up) the sidebar."""
        order = [c.address for c in self.sidebar()]
        i = order.index(self.active) if self.active in order else 0
        return self.select(order[(i + step) % len(order)])

    def window(self, number: int) -> Conversation:
        """Select window ``number`` of the sidebar (1: the status window); IndexError
        when there are fewer."""
        order = self.sidebar()
        if not 1 <= number <= len(order):
            raise IndexError(f"there are {len(order)} windows")
        return self.select(order[number - 1].address)

    def window_number(self, address: str) -> int:
        """The sidebar position (from 1) of ``address``."""
        return [c.address for c in self.sidebar()].index(address) + 1

    def next_unread(self) -> Conversation | None:
        """Select the first conversation with unread items (None when there is none)."""
        for conv in self.sidebar():
            if conv.unread:
                return self.select(conv.address)
        return None

    def forget(self, address: str) -> None:
        """Remove a conversation from the sidebar (back to the status view if shown)."""
        if address == STATUS:
            return
        self.conversations.pop(address, None)
        if self.active == address:
            self.active = STATUS
        self.changed()

    @property
    def current(self) -> Conversation:
        return self.conversation(self.active)

    def peer_of(self, item: dict[str, Any]) -> str:
        """The conversation an item belongs to: the group, or the other user."""
        to = str(item.get("to", ""))
        if to.startswith("#"):
            return to
        sender = str(item.get("from", ""))
        return to if sender == self.me else sender

    # feeding ------------------------------------------------------------------------

    def receive(self, item: dict[str, Any]) -> bool:
        """A stream item (backlog or live); False when it was a duplicate.

        Counts as unread unless it is ours or its conversation is on screen.
        """
        address = self.peer_of(item)
        conv = self.conversation(address)
        if not conv.add(item):
            return False
        conv.typing.pop(str(item.get("from", "")), None)  # their message came: not typing
        if item.get("kind") in REF_KINDS:  # changes a line; not unread of its own
            self.changed()
            return True
        meta = item.get("meta") or {}
        if item.get("kind") == "event":
            event = meta.get("event")
            if event == "topic" or (event == "created" and "topic" in meta):
                conv.topic = str(meta.get("topic", ""))
            if meta.get("user") == self.me or (event == "created" and item.get("from") == self.me):
                if event in ("joined", "created"):
                    conv.joined = True
                elif event in ("left", "kicked", "banned"):
                    conv.joined = False
            if event == "deleted":
                conv.joined = False
        if item.get("from") != self.me and address != self.active:
            conv.unread += 1
            if conv.is_group and self.mentioned(item):
                conv.mentions += 1
        self.changed()
        return True

    def set_typing(self, address: str, user: str, active: bool) -> None:
        """``user`` is typing (or stopped) in the conversation with ``address`` (a
        user or a group); ignored for a conversation not in the sidebar, and for
        oneself."""
        conv = self.conversations.get(address)
        if conv is None or user == self.me:
            return
        if active:
            conv.typing[user] = self.clock()
        elif conv.typing.pop(user, None) is None:
            return
        self.changed()

    def typists(self, conv: Conversation) -> list[str]:
        """Who is typing in ``conv``: a notice in the last :data:`TYPING_SHOWN`
        seconds (PROTOCOL.md: typing is over 6 seconds after the last notice)."""
        now = self.clock()
        return sorted(u for u, at in conv.typing.items() if now - at < TYPING_SHOWN)

    def mentioned(self, item: dict[str, Any]) -> bool:
        """Whether ``item`` is a group message from someone else mentioning the user
        (``@name``: the realm's rule, chatproto.mentions)."""
        if item.get("kind") != "text" or item.get("from") == self.me or not self.me:
            return False
        if not str(item.get("to", "")).startswith("#"):
            return False
        return mentions(str(item.get("body", "")), self.me.rpartition("@")[0])

    def set_counts(self, address: str, unread: int, mentions: int) -> None:
        """The realm's unread counts of a conversation (from the conversation list);
        none for the one on screen."""
        conv = self.conversation(address)
        if address != self.active:
            conv.unread, conv.mentions = unread, mentions
        self.changed()

    def add_history(self, address: str, page: list[dict[str, Any]], limit: int) -> int:
        """A history page (oldest first) for ``address``; returns how many were new.

        A page shorter than ``limit`` was the oldest one.
        """
        conv = self.conversation(address)
        added = sum(conv.add(item) for item in page)
        conv.history = "complete" if len(page) < limit else "partial"
        for item in page:
            meta = item.get("meta") or {}
            if item.get("kind") == "event" and "topic" in meta and not conv.topic:
                conv.topic = str(meta["topic"])
        self.changed()
        return added

    def notice(self, text: str, address: str | None = None, error: bool = False) -> None:
        """A local line in ``address`` (default: the conversation on screen)."""
        conv = self.conversation(self.active if address is None else address)
        conv.notices.append(NoticeLine(text, self.clock(), conv.newest, next(self._seq), error))
        self.changed()

    def set_presence(self, user: str, status: str, text: str = "") -> None:
        if status == "offline":
            self.presence.pop(user, None)
        else:
            self.presence[user] = (status, text)
        self.changed()

    def set_connection(self, state: str, detail: str = "") -> None:
        self.connection = state
        self.connection_detail = detail
        if state != "online":
            # Presence is a snapshot re-sent after each login: stale while disconnected.
            self.presence.clear()
        self.changed()

    def unread_total(self) -> int:
        return sum(c.unread for c in self.conversations.values())

    # transfers ----------------------------------------------------------------------

    def transfer(self, key: str, name: str, direction: str, total: int) -> Transfer:
        t = self.transfers[key] = Transfer(key, name, direction, total)
        self.changed()
        return t

    def progress(self, key: str, done: int, total: int | None = None) -> None:
        t = self.transfers.get(key)
        if t is not None:
            t.done = done
            if total is not None:
                t.total = total
            self.changed()

    def finish_transfer(self, key: str, error: str = "") -> None:
        t = self.transfers.get(key)
        if t is not None:
            t.state = "failed" if error else "done"
            t.error = error
            if not error:
                t.done = max(t.done, t.total)
            self.changed()

    def active_transfers(self) -> Iterator[Transfer]:
        return (t for t in self.transfers.values() if t.state == "running")


class InputHistory:
    """Lines sent from the input line, browsed with up/down like a shell's history.

    The line being edited when browsing starts is kept and comes back at the end.
    """

    def __init__(self, limit: int = 500) -> None:
        self.limit = limit
        self.entries: list[str] = []
        self._index: int | None = None
        self._draft = ""

    def add(self, line: str) -> None:
        if line and (not self.entries or self.entries[-1] != line):
            self.entries.append(line)
            del self.entries[: -self.limit]
        self._index = None

    def previous(self, current: str) -> str | None:
        """The entry before the one shown (None at the oldest, or with no history)."""
        if not self.entries:
            return None
        if self._index is None:
            self._draft = current
            self._index = len(self.entries)
        if self._index == 0:
            return None
        self._index -= 1
        return self.entries[self._index]

    def next(self) -> str | None:
        """The entry after the one shown; the draft after the newest; None if not browsing."""
        if self._index is None:
            return None
        self._index += 1
        if self._index >= len(self.entries):
            self._index = None
            return self._draft
        return self.entries[self._index]
