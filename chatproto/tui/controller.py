"""The terminal client's controller: the client library on one side, the model on the other.

:class:`ChatController` logs in with a :class:`chatproto.client.ChatClientService`
(Twisted's ``ClientService``: reconnect with backoff; the library resumes after the last
processed position, so items are neither lost nor repeated), feeds stream items and
presence frames to the :class:`chatproto.tui.model.ChatModel`, pages history from
the realm, and runs the ``/commands`` parsed by :mod:`chatproto.tui.commands`.

Every failure ends up as a readable notice in the model (``code: message`` for realm
errors, one line for network and TLS errors), never as a traceback: the view has no
stderr to print one to.  Nothing here imports urwid; tests drive it against a real
realm on loopback and read the model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from chatproto import address, client
from chatproto.client import (
    ONESHOT_SINCE,
    ChatClientService,
    Connection,
    RemoteError,
    WatchedEndpoint,
    connect,
    endpoint_for,
)
from chatproto.deferreds import first_of, next_turn
from chatproto.display import action_body, format_message, short
from chatproto.errors import ChatError
from chatproto.failures import explain
from chatproto.tui import commands, settings
from chatproto.tui.model import PAGE, STATUS, TYPING_SHOWN, ChatModel

__all__ = ["TYPING_EVERY", "ChatController", "LoginError"]

#: Seconds between two typing notices while the user types (PROTOCOL.md, ``typing``:
#: one every few seconds, not one per key).
TYPING_EVERY = 3.0


class LoginError(Exception):
    """The first login failed; the message is worded for the login screen."""


class _Service(ChatClientService):
    """A :class:`ChatClientService` that reports its connection state to the controller."""

    def __init__(self, controller: ChatController, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.controller = controller

    def logged_in(self, conn: Connection) -> None:
        # before the backlog: the model files own messages under their recipient
        self.controller.model.me = conn.user
        self.controller.model.realm = conn.realm

    def _prepare(self, proxy: Any) -> Any:
        def prepared(result: Any) -> Any:
            if self._built is not None:
                built = self._built
                built.closed_d.addCallback(lambda _: self.controller._lost(built))
            if self.connection is not None:
                self.controller._online(self.connection)
            return result

        return super()._prepare(proxy).addCallback(prepared)


class ChatController:
    """Runs the chat session behind the screen.

    ``reactor`` runs everything (and gives time to the retry policy); ``retry_policy``
    maps the number of failed attempts to the delay before the next (default: Twisted's
    ``backoffPolicy()``, 1 s growing to 60 s with jitter).  ``on_quit`` is called once
    ``/quit`` has closed the connection.
    """

    def __init__(
        self,
        reactor: Any,
        model: ChatModel,
        *,
        retry_policy: Callable[[int], float] | None = None,
        on_quit: Callable[[], Any] | None = None,
        page: int = PAGE,
        conversations_path: Callable[[str], str] | None = None,
        downloads: str = ".",
    ) -> None:
        self.reactor = reactor
        self.model = model
        self.service: _Service | None = None
        self.server = ""
        self.endpoint: WatchedEndpoint | None = None
        self.on_quit = on_quit
        self.page = page
        self._retry = retry_policy or backoffPolicy()
        #: (status, text) set by /status, applied again after each reconnect
        self.status: tuple[str, str] | None = None
        #: the realm's public groups (for completing /join), as of the last login
        self.public_groups: list[str] = []
        self.completer = commands.Completer(self.names)
        #: the directory /download saves to (unless given a path)
        self.downloads = downloads
        self._transfer_ids = itertools.count(1)
        #: account -> the file remembering its conversations (None: remember nothing)
        self.conversations_path = conversations_path
        self._remembered: tuple[str, set[str]] | None = None  # (file, addresses saved)
        self._typing_call: Any = None  # refreshes the screen when a typing notice expires
        #: where (and when) we last said the user is typing (see edited)
        self._typing_to: str | None = None
        self._typing_at = 0.0
        model.subscribe(self._remember)
        #: read markers: the newest position shown per conversation, what was sent to
        #: the realm, and the pending send (markers go at most every half second)
        self._marked: dict[str, int] = {}
        self._sent_marks: dict[str, int] = {}
        self._marking: Any = None
        self.clock: Any = reactor

    # login and connection state ---------------------------------------------------

    def _policy(self, attempt: int) -> float:
        delay = float(self._retry(attempt))
        why = "no connection; "
        if self.endpoint is not None and self.endpoint.reason is not None:
            why = explain(self.endpoint.reason.value or Exception(), self.server).args[0]
            why = why.replace(f"connection to {self.server} failed: ", "") + "; "
        self.model.set_connection("reconnecting", f"{why}retrying in {delay:.1f}s")
        return delay

    _reconnecting = False

    def _online(self, conn: Connection) -> None:
        if self._reconnecting:
            self._reconnecting = False
            self.model.notice(f"reconnected to {self.server}; nothing missed", STATUS)
        self.model.me = conn.user
        self.model.realm = conn.realm
        self.model.set_connection("online", f"{conn.user} on {self.server}")
        if self.status is not None:
            conn.set_status(*self.status).addErrback(self._failed, None)
        # The conversation on screen may have missed its first page while offline.
        self._load_history(self.model.active)

    def _lost(self, proto: client.ClientProtocol) -> None:
        if self.service is not None and self.service.running:
            self.model.set_connection("reconnecting", "connection lost")
            # realm notices go to the status window: what the realm said, if anything
            said = proto.last_error
            why = f"the realm said {said.code}: {said.message}" if said else "connection lost"
            self.model.notice(f"{why}; reconnecting", STATUS)
            self._reconnecting = True

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, client.ChecksumMismatch):
            return f"the file arrived damaged and was not kept: {exc}"
        reason = self.endpoint.reason if self.endpoint is not None else None
        # (explain() words errors for the command line: name the login form's field)
        text = str(explain(exc, self.server, reason))
        return text.replace("(--realm)", "(TLS name)").replace("with --ca FILE", "as the CA file")

    @inlineCallbacks
    def login(
        self,
        server: str,
        user: str,
        password: str,
        *,
        realm: str = "",
        ca: str = "",
        device: str = "tui",
        register: bool = False,
    ) -> Any:
        """Connect and log in; fires with the :class:`Connection` once the backlog is in.

        Fails with :class:`LoginError` (worded for the user) when the server description
        is bad, the realm cannot be reached, TLS verification fails or the login is
        refused; the service is then stopped.  After a success the service keeps the
        session up by itself.  ``register=True`` creates the account first.
        """
        if not user or not password:
            raise LoginError("a user name and a password are needed")
        try:
            inner = endpoint_for(self.reactor, server, realm or None, ca or None)
        except OSError as e:
            raise LoginError(f"CA file {ca}: {e.strerror or e}") from None
        except Exception as e:
            raise LoginError(f"bad server {server!r}: {e}") from None
        if self.model.me and not self._same_account(server, user):
            self.model.reset()  # another account: nothing of the last one stays
            self.model.me = ""
        self.server = server
        self.endpoint = endpoint = WatchedEndpoint(inner, server)
        self.model.set_connection("connecting", f"connecting to {server}")
        if register:
            try:
                conn = yield connect(
                    self.reactor,
                    endpoint,
                    user,
                    password,
                    device=f"{device}-register",
                    since=ONESHOT_SINCE,
                    ack=False,
                    quiet=True,
                    register=True,
                )
            except Exception as e:
                self.model.set_connection("offline", "")
                raise LoginError(self._describe(e)) from None
            yield conn.close()
        service = self.service = _Service(
            self,
            self.reactor,
            endpoint,
            user,
            password,
            device=device,
            on_message=self._message,
            on_presence=self._presence,
            on_notice=self._notice,
            retryPolicy=self._policy,
        )
        first = next_turn(self.reactor, service.whenConnected(failAfterFailures=1))
        done = next_turn(self.reactor, service.done)
        outcome = first_of(first, done)
        done.addErrback(self._gave_up)  # after first_of has seen the result
        service.startService()
        try:
            yield outcome
        except Exception as e:
            first.addErrback(lambda _: None)
            message = self._describe(e)
            self.service = None
            yield service.stopService()
            self.model.set_connection("offline", message)
            raise LoginError(message) from None
        conn = service.connection
        assert conn is not None  # set before whenConnected fires
        self._recall(conn.user)
        self.reactor.callLater(0, self.discover_groups)
        return conn

    def _recall(self, account: str) -> None:
        """List the conversations remembered for ``account`` in the sidebar."""
        if self.conversations_path is None:
            return
        path = self.conversations_path(account)
        addresses = set(settings.load_conversations(path))
        for addr in addresses:
            self.model.conversation(addr)
        self._remembered = (path, addresses)
        self.model.changed()

    def _remember(self) -> None:
        if self._remembered is None:
            return
        path, saved = self._remembered
        current = {a for a, c in self.model.conversations.items() if a != STATUS and c.joined}
        if current != saved:
            self._remembered = (path, current)
            try:
                settings.save_conversations(path, sorted(current))
            except OSError as e:
                self.model.notice(f"cannot save {path}: {e.strerror or e}", STATUS, True)

    def _same_account(self, server: str, user: str) -> bool:
        """Whether ``user`` on ``server`` is the account the model shows (before the
        login says the canonical name: compare the server and the normalised name)."""
        name, _, realm = user.partition("@")
        try:
            same_name = address.normalise_name(name) == self.model.me.partition("@")[0]
        except ChatError:
            return False
        return server == self.server and same_name and realm in ("", self.model.realm)

    def _gave_up(self, failure: Failure) -> None:
        # Reconnecting cannot cure this (the password changed, the account was deleted).
        if self.model.connection in ("online", "reconnecting"):
            message = self._describe(failure.value or Exception())
            self.model.set_connection("failed", message)
            self.model.notice(f"disconnected for good: {message}", STATUS, error=True)

    def stop(self) -> Deferred[None]:
        """Close the connection (acks flushed) and stop reconnecting."""
        for call in (self._marking, self._typing_call):
            if call is not None and call.active():
                call.cancel()
        self._marking = self._typing_call = None
        service, self.service = self.service, None
        self.model.set_connection("offline", "")
        if service is None or not service.running:
            return Deferred.fromCoroutine(_nothing())
        return service.stopService()  # type: ignore[no-any-return]

    @inlineCallbacks
    def discover_groups(self) -> Any:
        """Put the user's conversations in the sidebar, with the realm's unread counts
        (the conversation list: the same sidebar on every install), and remember the
        public groups (for completion)."""
        if self.service is None:
            return
        try:
            conn = yield self.service.whenReady()
            listed = yield conn.conversations()
            for entry in listed["conversations"]:
                addr = str(entry["with"])
                self.model.set_counts(addr, int(entry["unread"]), int(entry.get("mentions", 0)))
                last = entry.get("last")
                if last and addr != self.model.active:
                    self._marked.setdefault(addr, int(entry.get("read", 0)))
            groups = yield conn.list_groups()
            self.public_groups = [str(info["group"]) for info in groups]
            for info in groups:
                details = yield conn.group_info(info["group"])
                if details.get("role"):
                    conv = self.model.conversation(info["group"])
                    conv.topic = str(info.get("topic", ""))
            self.model.changed()
        except Exception as e:
            self.model.notice(f"cannot list your groups: {self._describe(e)}", STATUS, True)

    # stream and presence ------------------------------------------------------------

    def _message(self, item: dict[str, Any]) -> None:
        if self.model.receive(item) and self.model.peer_of(item) == self.model.active:
            self.mark_read(self.model.active)

    def mark_read(self, addr: str) -> None:
        """The conversation ``addr`` is on screen: tell the realm it is read up to its
        newest item (so the user's other devices and the other party know), once per
        new item at most, never faster than the realm's limit allows."""
        conv = self.model.conversations.get(addr)
        if conv is None or addr == STATUS or self.service is None:
            return
        newest = conv.newest
        if newest <= self._marked.get(addr, 0) or self.model.connection != "online":
            return
        self._marked[addr] = newest
        if self._marking is None:
            self._marking = self.clock.callLater(0.5, self._send_marks)

    def _send_marks(self) -> None:
        self._marking = None
        conn = self.service.connection if self.service is not None else None
        if conn is None:
            return
        for addr, pos in list(self._marked.items()):
            if self._sent_marks.get(addr, 0) < pos:
                self._sent_marks[addr] = pos
                conn.mark_read(addr, pos).addErrback(lambda _: None)

    def edited(self, text: str) -> None:
        """The input line now holds ``text``: tell the conversation on screen that
        the user is typing (a message, not a command), at most once every
        :data:`TYPING_EVERY` seconds, and that they stopped once it is empty (sent
        or cleared).  Best effort: a refusal (the rate limit...) changes nothing."""
        service = self.service
        conn = service.connection if service is not None else None
        addr = self.model.active
        if conn is None or addr == STATUS:
            return
        message = text.strip() != "" and (not text.startswith("/") or text.startswith("//"))
        now = self.reactor.seconds()
        if message:
            if self._typing_to == addr and now - self._typing_at < TYPING_EVERY:
                return
            self._typing_to, self._typing_at = addr, now
            conn.typing(addr, True).addErrback(lambda _: None)
        elif self._typing_to is not None:
            to, self._typing_to = self._typing_to, None
            conn.typing(to, False).addErrback(lambda _: None)

    def _notice(self, frame: dict[str, Any]) -> None:
        """Ephemeral frames: ``typing`` (a native client), and ``tags`` with IRCv3's
        ``+typing`` (an IRC user: ``active``; ``paused`` and ``done`` stop it)."""
        kind = frame.get("type")
        if kind == "typing":
            where, user, active = frame.get("with"), frame.get("user"), frame.get("typing")
        elif kind == "tags" and isinstance(frame.get("tags"), dict) and "+typing" in frame["tags"]:
            to, user = str(frame.get("to", "")), frame.get("from")
            where = to if to.startswith("#") else user
            active = frame["tags"]["+typing"] == "active"
        else:
            return
        if isinstance(where, str) and isinstance(user, str) and isinstance(active, bool):
            self.model.set_typing(where, user, active)
            if active:  # shown until then, unless a newer notice or a message comes
                if self._typing_call is not None and self._typing_call.active():
                    self._typing_call.cancel()
                self._typing_call = self.reactor.callLater(TYPING_SHOWN, self.model.changed)

    def _presence(self, frame: dict[str, Any]) -> None:
        user = str(frame.get("user", ""))
        status = str(frame.get("status", "offline"))
        self.model.set_presence(user, status, str(frame.get("text", "")))

    # conversations and history ------------------------------------------------------

    def open(self, addr: str) -> None:
        """Show the conversation with ``addr`` (canonical), loading its newest page."""
        self.model.select(addr)
        self._load_history(addr)
        self.mark_read(addr)
        if addr and not addr.startswith("#") and addr not in self.model.presence:
            # Presence frames only come for contacts: ask once about a new partner.
            self._ask_presence(addr)

    @inlineCallbacks
    def _ask_presence(self, user: str) -> Any:
        if self.service is None or self.model.connection != "online":
            return
        try:
            conn = yield self.service.whenReady()
            online = yield conn.who()
        except Exception:
            return  # only a nicety: the sidebar shows the user as offline meanwhile
        for entry in online:
            if entry.get("user") == user and user not in self.model.presence:
                status = str(entry.get("status", "online"))
                self.model.set_presence(user, status, str(entry.get("text", "")))

    def cycle(self, step: int) -> None:
        self.open(self.model.cycle(step).address)

    def next_unread(self) -> None:
        conv = self.model.next_unread()
        if conv is not None:
            self._load_history(conv.address)

    def _load_history(self, addr: str) -> None:
        conv = self.model.conversations.get(addr)
        if addr == STATUS or conv is None or conv.history != "unloaded":
            return
        if conv.is_group and not conv.joined:
            return
        self._page(addr, None)

    def older(self) -> Deferred[int] | None:
        """Fetch the page before the oldest item shown (None when there is nothing more
        to fetch or a page is already on its way); fires with the number of new items."""
        addr = self.model.active
        conv = self.model.conversations.get(addr)
        if addr == STATUS or conv is None or conv.history not in ("partial", "unloaded"):
            return None
        if conv.is_group and not conv.joined:
            return None
        return self._page(addr, conv.oldest if conv.history == "partial" else None)

    @inlineCallbacks
    def _page(self, addr: str, before: int | None) -> Any:
        conv = self.model.conversation(addr)
        previous, conv.history = conv.history, "loading"
        self.model.changed()
        try:
            if self.service is None or self.model.connection != "online":
                raise _NotNow()
            conn = yield self.service.whenReady()
            page = yield conn.history(addr, before=before, limit=self.page)
        except _NotNow:
            conv.history = previous
            self.model.changed()
            return 0
        except Exception as e:
            conv.history = previous
            if addr in self.model.conversations:
                self.model.notice(f"cannot load the history: {self._describe(e)}", addr, True)
            return 0
        if self.model.conversations.get(addr) is not conv:
            return 0  # closed (or closed and opened again) meanwhile
        added = self.model.add_history(addr, page, self.page)
        if addr == self.model.active:
            self.mark_read(addr)
        return added

    # input --------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Completion sources: ``user``, ``group`` (as typed: short local names) and
        ``file`` (ids of the files in the conversation on screen)."""
        realm = self.model.realm
        if kind == "group":
            groups = [a for a in self.model.conversations if a.startswith("#")]
            groups += [g for g in self.public_groups if g not in groups]
            return [short(a, realm) for a in groups]
        if kind == "user":
            users = {a for a in self.model.conversations if a and not a.startswith("#")}
            users.update(self.model.presence)
            for item in self.model.current.items.values():
                users.add(str(item.get("from", "")))
            users.discard("")
            return sorted(short(u, realm) for u in users)
        if kind == "file":
            return [fid for fid, _ in self.files()]
        return []

    def files(self, addr: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """``(file id, item)`` of the file items of a conversation, oldest first."""
        conv = self.model.conversation(self.model.active if addr is None else addr)
        out = []
        for pos in sorted(conv.items):
            item = conv.items[pos]
            fid = (item.get("meta") or {}).get("file_id")
            if item.get("kind") == "file" and fid:
                out.append((str(fid), item))
        return out

    def run(self, line: str) -> Deferred[None]:
        """Run one input line (a message or a command); never fails: problems become
        notices in the conversation on screen."""
        return Deferred.fromCoroutine(self._run(line))

    async def _run(self, line: str) -> None:
        where = self.model.active
        try:
            parsed = commands.parse(line)
            if parsed is None:
                return
            if isinstance(parsed, commands.Say):
                await self._say(where, parsed.text)
                return
            handler = getattr(self, f"_cmd_{parsed.name}")
            await handler(parsed)
        # Errors are shown where the user is looking by the time they come back.
        except commands.UsageError as e:
            self.model.notice(str(e), error=True)
        except ChatError as e:
            self.model.notice(str(e), error=True)
        except Exception as e:
            self.model.notice(self._describe(e), error=True)

    def _ready(self) -> Deferred[Connection]:
        if self.service is None:
            raise commands.UsageError("not connected")
        return self.service.whenReady()

    async def _say(self, where: str, text: str) -> None:
        if where == STATUS:
            raise commands.UsageError(
                "this is the status view: open a conversation with /msg USER or /join #GROUP"
            )
        if self.service is None:
            raise commands.UsageError("not connected")
        # Shown when its msg frame arrives (once, whatever the retries).
        await self.service.send(where, text)

    def _address(self, text: str, group: bool | None) -> str:
        realm = self.model.realm
        return str(address.parse(text, realm, group=group))

    def _group(self, text: str) -> str:
        if text:
            return self._address(text if text.startswith("#") else "#" + text, True)
        if not self.model.current.is_group:
            raise commands.UsageError("not in a group: name one (#GROUP)")
        return self.model.active

    def _current_group(self, what: str) -> str:
        if not self.model.current.is_group:
            raise commands.UsageError(f"{what} works in a group: open one first")
        return self.model.active

    async def _cmd_msg(self, cmd: commands.Command) -> None:
        target = self._address(cmd.get("USER"), None)
        previous = self.model.active
        known = target in self.model.conversations
        self.open(target)
        if cmd.get("TEXT"):
            try:
                await self._say(target, cmd.get("TEXT"))
            except RemoteError as e:
                if e.code in ("no_such_user", "no_such_group") and not known:
                    # A typo should not leave a conversation in the sidebar.
                    self.model.forget(target)
                    self.open(previous)
                raise

    def _latest(self, mine: bool, what: str) -> dict[str, Any]:
        if self.model.active == STATUS:
            raise commands.UsageError(f"{what} works in a conversation: open one first")
        item = self.model.current.latest(mine, self.model.me)
        if item is None:
            whose = "of yours" if mine else "of someone else's"
            raise commands.UsageError(f"no message {whose} here")
        return item

    def _pick(self, cmd: commands.Command, mine: bool, what: str) -> dict[str, Any]:
        """The message ``cmd`` names by its number (``N``, the number beside it), or
        else the latest one (``mine``: of the user's own; else of someone else's).
        With a number, ``mine`` requires it to be the user's own."""
        number = cmd.get("N")
        if not number:
            return self._latest(mine, what)
        if self.model.active == STATUS:
            raise commands.UsageError(f"{what} works in a conversation: open one first")
        item = self.model.current.numbered(int(number))
        if item is None:
            raise commands.UsageError(f"no message {number} here (the number beside it)")
        if mine and item.get("from") != self.model.me:
            raise commands.UsageError(f"message {number} is not yours")
        return item

    async def _cmd_reply(self, cmd: commands.Command) -> None:
        item = self._pick(cmd, False, "/reply")
        if self.service is None:
            raise commands.UsageError("not connected")
        await self.service.send(self.model.active, cmd.get("TEXT"), reply_to=item["msg_id"])

    async def _cmd_react(self, cmd: commands.Command) -> None:
        item = self._pick(cmd, False, "/react")
        emoji = cmd.get("EMOJI")
        reacted = (item.get("meta") or {}).get("reactions", {}).get(emoji, ())
        conn = await self._ready()
        await conn.react(item["msg_id"], emoji, remove=self.model.me in reacted)

    async def _cmd_edit(self, cmd: commands.Command) -> None:
        item = self._pick(cmd, True, "/edit")
        if item.get("kind") != "text":
            raise commands.UsageError("that is a file, which has no text to edit: /delete it")
        conn = await self._ready()
        await conn.edit(item["msg_id"], cmd.get("TEXT"))

    async def _cmd_delete(self, cmd: commands.Command) -> None:
        item = self._pick(cmd, True, "/delete")
        conn = await self._ready()
        await conn.delete(item["msg_id"])

    async def _cmd_query(self, cmd: commands.Command) -> None:
        await self._cmd_msg(cmd)

    async def _cmd_me(self, cmd: commands.Command) -> None:
        await self._say(self.model.active, action_body(cmd.get("TEXT")))

    async def _cmd_join(self, cmd: commands.Command) -> None:
        group = self._group(cmd.get("#GROUP"))
        conn = await self._ready()
        result: dict[str, Any] = {}
        try:
            result = await conn.join(group)
        except Exception as e:
            if getattr(e, "code", None) != "already_member":
                raise
        conv = self.model.conversation(group)
        if result.get("pos") == 0:  # another realm's group: its home realm decides
            if not conv.items:  # new here: not joined until the joined event comes
                conv.joined = False
            home = group.rpartition("@")[2]
            self.model.notice(
                f"asked {home} to let you in; you are a member when your joined event "
                "arrives (a refusal comes as a bounce)",
                group,
            )
        else:
            conv.joined = True
        if conv.history == "complete" and not conv.items:
            conv.history = "unloaded"
        self.open(group)

    async def _cmd_create(self, cmd: commands.Command) -> None:
        group = self._group(cmd.get("#GROUP"))
        conn = await self._ready()
        await conn.create_group(group, topic=cmd.get("TOPIC"))
        self.model.conversation(group).joined = True
        self.open(group)

    async def _cmd_leave(self, cmd: commands.Command) -> None:
        group = self._group(cmd.get("#GROUP"))
        conn = await self._ready()
        await conn.leave(group)
        self.model.conversation(group).joined = False
        self.model.changed()

    async def _cmd_part(self, cmd: commands.Command) -> None:
        await self._cmd_leave(cmd)

    async def _cmd_topic(self, cmd: commands.Command) -> None:
        group = self._current_group("/topic")
        conn = await self._ready()
        if cmd.get("TEXT"):
            await conn.set_topic(group, cmd.get("TEXT"))
            return
        info = await conn.group_info(group)
        topic = info.get("topic") or ""
        self.model.conversation(group).topic = topic
        self.model.notice(f"topic: {topic}" if topic else "no topic set", group)

    async def _cmd_who(self, cmd: commands.Command) -> None:
        where = self.model.active
        conn = await self._ready()
        realm = self.model.realm
        if cmd.get("#GROUP") or self.model.current.is_group:
            group = self._group(cmd.get("#GROUP"))
            members = await conn.members(group)
            online = sum(1 for m in members if m.get("online"))
            parts = []
            for m in members:
                role = "" if m.get("role") == "member" else f" ({m.get('role')})"
                mark = "+" if m.get("online") else "-"
                parts.append(f"{mark}{short(str(m['user']), realm)}{role}")
            self.model.notice(
                f"{short(group, realm)}: {len(members)} members, {online} online: "
                + ", ".join(parts),
                where,
            )
            return
        users = await conn.who()
        parts = []
        for u in users:
            status = "" if u.get("status", "online") == "online" else f" ({u['status']})"
            parts.append(short(str(u["user"]), realm) + status)
        self.model.notice(f"{len(users)} online: " + ", ".join(parts), where)

    async def _cmd_names(self, cmd: commands.Command) -> None:
        """irssi's /names: the members with role prefixes, online ones marked."""
        where = self.model.active
        group = self._group(cmd.get("#GROUP"))
        conn = await self._ready()
        members = await conn.members(group)
        realm = self.model.realm
        prefix = {"owner": "~", "admin": "@"}
        names = [
            prefix.get(str(m.get("role")), "")
            + short(str(m["user"]), realm)
            + ("+" if m.get("online") else "")
            for m in members
        ]
        online = sum(1 for m in members if m.get("online"))
        self.model.notice(
            f"{short(group, realm)}: {len(members)} members, {online} online (+): "
            + " ".join(names),
            where,
        )

    async def _cmd_whois(self, cmd: commands.Command) -> None:
        """Whether USER exists and is online (the realm's ``who`` for one user)."""
        where = self.model.active
        user = self._address(cmd.get("USER"), False)
        conn = await self._ready()
        found = await conn.who(user=user)
        name = short(user, self.model.realm)
        if not found:
            self.model.notice(f"{name} ({user}): offline", where)
            return
        entry = found[0]
        state = str(entry.get("status", "online"))
        note = f": {entry['text']}" if entry.get("text") else ""
        n = entry.get("sessions")
        sessions = f", {n} session{'' if n == 1 else 's'}" if isinstance(n, int) else ""
        self.model.notice(f"{name} ({user}): {state}{note}{sessions}", where)

    async def _cmd_invite(self, cmd: commands.Command) -> None:
        group = self._group(cmd.get("#GROUP"))
        user = self._address(cmd.get("USER"), False)
        conn = await self._ready()
        await conn.invite(group, user)

    async def _cmd_kick(self, cmd: commands.Command) -> None:
        group = self._current_group("/kick")
        user = self._address(cmd.get("USER"), False)
        conn = await self._ready()
        await conn.kick(group, user, cmd.get("REASON") or None)

    async def _cmd_ban(self, cmd: commands.Command) -> None:
        group = self._current_group("/ban")
        user = self._address(cmd.get("USER"), False)
        conn = await self._ready()
        await conn.ban(group, user, cmd.get("REASON") or None)

    async def _cmd_unban(self, cmd: commands.Command) -> None:
        group = self._current_group("/unban")
        user = self._address(cmd.get("USER"), False)
        conn = await self._ready()
        await conn.unban(group, user)
        self.model.notice(f"{short(user, self.model.realm)} may join again", group)

    async def _cmd_search(self, cmd: commands.Command) -> None:
        where = self.model.active
        conn = await self._ready()
        peer = None if where == STATUS else where
        found = await conn.search(cmd.get("WORDS"), peer)
        scope = "everywhere" if peer is None else short(peer, self.model.realm)
        words = cmd.get("WORDS")
        if not found:
            self.model.notice(f"search {words!r} ({scope}): nothing found", where)
            return
        self.model.notice(f"search {words!r} ({scope}): {len(found)} found, newest first", where)
        for item in found:
            self.model.notice("  " + format_message(item, False, me=self.model.me), where)

    async def _cmd_report(self, cmd: commands.Command) -> None:
        if self.model.active == STATUS:
            raise commands.UsageError("/report works in a conversation")
        conv = self.model.conversation(self.model.active)
        theirs = [
            item
            for _pos, item in sorted(conv.items.items())
            if item.get("from") != self.model.me and item.get("kind") in ("text", "file")
        ]
        if not theirs:
            raise commands.UsageError("no message from someone else here to report")
        item = theirs[-1]
        conn = await self._ready()
        rid = await conn.report(str(item.get("msg_id")), cmd.get("REASON") or "")
        who = short(str(item.get("from")), self.model.realm)
        self.model.notice(f"reported the latest message of {who} (report {rid})", conv.address)

    async def _cmd_status(self, cmd: commands.Command) -> None:
        status = cmd.get("STATUS").lower()
        if status not in commands.STATUSES:
            raise commands.UsageError(f"status is one of {', '.join(commands.STATUSES)}")
        conn = await self._ready()
        await conn.set_status(status, cmd.get("TEXT"))
        self.status = (status, cmd.get("TEXT"))
        text = f": {cmd.get('TEXT')}" if cmd.get("TEXT") else ""
        self.model.notice(f"you are {status}{text}", self.model.active)

    #: How many lost connections a transfer survives (each time it resumes where the
    #: realm's bytes end) before it gives up.
    TRANSFER_ATTEMPTS = 5

    async def _transfer(
        self, key: str, name: str, start: Callable[[Connection], Deferred[Any]]
    ) -> Any:
        """Run ``start(conn)`` (an upload or a download reporting to the transfer
        ``key``), resuming it on the next connection when one drops."""
        try:
            for _ in range(self.TRANSFER_ATTEMPTS):
                conn = await self._ready()
                try:
                    result = await start(conn)
                except _LOST:
                    continue  # resumed (or started again) on the next connection
                self.model.finish_transfer(key)
                return result
            raise commands.UsageError(
                f"{name}: the connection was lost {self.TRANSFER_ATTEMPTS} times; try again"
            )
        except commands.UsageError as e:
            self.model.finish_transfer(key, str(e))
            raise
        except Exception as e:
            self.model.finish_transfer(key, self._describe(e))
            raise

    def _progress(self, key: str) -> Callable[[int, int], None]:
        return lambda done, total: self.model.progress(key, done, total)

    async def _cmd_send(self, cmd: commands.Command) -> None:
        where = self.model.active
        if where == STATUS:
            raise commands.UsageError("open the conversation to send the file to first")
        path = os.path.expanduser(cmd.get("PATH"))
        if not os.path.isfile(path):
            raise commands.UsageError(f"not a file: {path}")
        name = os.path.basename(path)
        key = f"up:{next(self._transfer_ids)}"
        self.model.transfer(key, name, "up", os.path.getsize(path))
        resume: list[str] = []  # the upload to continue after a lost connection

        def start(conn: Connection) -> Deferred[Any]:
            d = conn.send_file(
                where, path, progress=self._progress(key), resume=resume[-1] if resume else None
            )

            def interrupted(failure: Failure) -> Failure:
                if failure.check(client.TransferInterrupted):
                    resume.append(failure.value.upload)  # type: ignore[union-attr]
                return failure

            return d.addErrback(interrupted)

        # The file's message shows up in the conversation like any other item.
        await self._transfer(key, name, start)

    async def _cmd_download(self, cmd: commands.Command) -> None:
        files = self.files()
        file_id = cmd.get("FILE")
        if not file_id:
            if not files:
                raise commands.UsageError("no file in this conversation")
            file_id = files[-1][0]
        meta = next(((i.get("meta") or {}) for f, i in files if f == file_id), {})
        name = _safe_name(str(meta.get("name") or file_id))
        dest = os.path.expanduser(cmd.get("PATH") or self.downloads)
        if os.path.isdir(dest):
            dest = _free_path(os.path.join(dest, name))
        key = f"down:{next(self._transfer_ids)}"
        size = meta.get("size")
        self.model.transfer(key, name, "down", size if isinstance(size, int) else 0)
        where = self.model.active

        def start(conn: Connection) -> Deferred[Any]:
            return conn.download(file_id, dest, progress=self._progress(key))  # type: ignore[no-any-return]

        await self._transfer(key, name, start)
        self.model.notice(f"saved {name} to {dest}", where)

    async def _cmd_close(self, cmd: commands.Command) -> None:
        if self.model.active == STATUS:
            raise commands.UsageError("the status view cannot be closed")
        self.model.forget(self.model.active)

    async def _cmd_window(self, cmd: commands.Command) -> None:
        text = cmd.get("N")
        if not text.isdigit():
            raise commands.UsageError("usage: /window N (a number: 1 is the status window)")
        self.window(int(text))

    def window(self, number: int) -> None:
        """Go to window ``number`` of the sidebar (Alt-1..Alt-9, ``/window N``)."""
        try:
            conv = self.model.window(number)
        except IndexError as e:
            self.model.notice(f"no window {number}: {e}", error=True)
            return
        self.open(conv.address)

    async def _cmd_help(self, cmd: commands.Command) -> None:
        """The help goes to the status window, which comes up (irssi's window 1)."""
        lines = commands.help_text(cmd.get("COMMAND") or None)
        self.open(STATUS)
        for line in lines:
            self.model.notice(line, STATUS)

    async def _cmd_quit(self, cmd: commands.Command) -> None:
        await self.stop()
        if self.on_quit is not None:
            self.on_quit()

    def _failed(self, failure: Failure, where: str | None) -> None:
        self.model.notice(self._describe(failure.value or Exception()), where, error=True)


#: A transfer stopped by its connection (TransferInterrupted is a ConnectionDone).
_LOST = (client.ConnectionDone, error.ConnectionLost, error.ConnectionDone)


def _safe_name(name: str) -> str:
    """A file name from a sender that cannot leave the download directory."""
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = "".join(c for c in base if c.isprintable())
    return base if base and base not in (".", "..") else "download"


def _free_path(path: str) -> str:
    """``path``, or ``name (1).ext``, ``name (2).ext``... whichever does not exist yet
    (a leftover ``.part`` of an interrupted download is resumed, so it counts as free)."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{stem} ({n}){ext}"
    return candidate


class _NotNow(Exception):
    """Offline: the page will be asked for after the next login."""


async def _nothing() -> None:
    return None
