"""A chat bot on the chatproto client library.

    CHATPROTO_PASSWORD=bot-password-1 python examples/bot.py \\
        --server tcp:127.0.0.1:7420 --user bot --group '#lobby' --register

It logs in (``--register`` creates the account first if it does not exist), joins the
group (creating it when it does not exist) and answers commands posted there:

- ``!echo TEXT``: replies ``TEXT``;
- ``!time``: replies the current UTC time;
- ``!help``: lists the commands.

It runs on :class:`chatproto.client.ChatClientService`: when the connection drops it
reconnects with backoff and resumes after the last message it processed, so each
command is seen once.  The logic is :class:`EchoBot` (``handle(message)`` returns the
replies), testable without a network.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from chatproto.client import ChatClientService, RemoteError, connect, endpoint_for

log = Logger(namespace="bot")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class EchoBot:
    """The bot's logic: which messages are commands, and what to answer.

    ``group`` is the group it serves (``#lobby`` or ``#lobby@realm``); ``user`` its own
    account name (its own messages are never answered).
    """

    def __init__(self, user: str, group: str, now: Callable[[], datetime.datetime] = _utcnow):
        self.user = user.casefold()
        self.group = group if group.startswith("#") else "#" + group
        self.now = now

    def _is_mine(self, address: str) -> bool:
        return address.partition("@")[0].casefold() == self.user.partition("@")[0]

    def _in_group(self, to: str) -> bool:
        name, _, realm = self.group.casefold().partition("@")
        to_name, _, to_realm = to.casefold().partition("@")
        return name == to_name and (not realm or realm == to_realm)

    def handle(self, message: dict[str, Any]) -> list[str]:
        """The replies (message bodies for the group) to one received message frame."""
        if message.get("kind", "text") != "text" or self._is_mine(message.get("from", "")):
            return []
        if not self._in_group(message.get("to", "")):
            return []
        body = message.get("body", "").strip()
        command, _, rest = body.partition(" ")
        if command == "!echo":
            return [rest.strip()] if rest.strip() else []
        if command == "!time":
            return [self.now().strftime("%Y-%m-%d %H:%M:%S UTC")]
        if command == "!help":
            return ["commands: !echo TEXT, !time, !help"]
        return []


class BotService(ChatClientService):
    """An :class:`EchoBot` kept connected: answers in the group, joins it when ready."""

    def __init__(
        self, reactor: Any, server: str, user: str, password: str, group: str, **kwargs: Any
    ) -> None:
        self.bot = EchoBot(user, group)
        super().__init__(
            reactor,
            endpoint_for(reactor, server),
            user,
            password,
            device="bot",
            on_message=self._on_message,
            **kwargs,
        )
        self.ready: defer.Deferred[str] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        self.whenReady().addCallback(self._join).addErrback(self._fail)

    def _fail(self, failure: Any) -> None:
        log.failure("cannot join {group}", failure, group=self.bot.group)
        if not self.ready.called:
            self.ready.errback(failure)
        self.stopService()

    @defer.inlineCallbacks
    def _join(self, conn: Any) -> Any:
        """Join the group, or create it when there is no such group."""
        group = self.bot.group
        try:
            result = yield conn.join(group)
        except RemoteError as e:
            if e.code == "already_member":
                result = yield conn.group_info(group)
            elif e.code == "no_such_group":
                result = yield conn.create_group(group, topic="bot: !echo, !time, !help")
            else:
                raise
        self.bot.group = result["group"]  # canonical: #name@realm
        log.info("{user} ready in {group}", user=conn.user, group=self.bot.group)
        print(f"bot {conn.user} ready in {self.bot.group}", flush=True)
        if not self.ready.called:
            self.ready.callback(self.bot.group)

    def _on_message(self, message: dict[str, Any]) -> None:
        for reply in self.bot.handle(message):
            self.say(reply)

    def say(self, body: str, attempts: int = 3) -> defer.Deferred[Any]:
        """Send ``body`` to the group on the current connection (waiting for one); a
        send cut by a dropped connection is retried on the next one."""

        def failed(failure: Any) -> Any:
            if failure.check(RemoteError) or attempts <= 1:
                log.failure("reply {body!r} not sent", failure, body=body)
                return None
            return self.say(body, attempts - 1)

        d = self.whenReady().addCallback(lambda conn: conn.send(self.bot.group, body))
        return d.addErrback(failed)


@defer.inlineCallbacks
def register(reactor: Any, server: str, user: str, password: str) -> Any:
    """Create the account (an existing one is fine)."""
    try:
        conn = yield connect(reactor, server, user, password, register=True, quiet=True)
    except RemoteError as e:
        if e.code != "user_exists":
            raise
        return
    yield conn.close()


@defer.inlineCallbacks
def main(reactor: Any, argv: list[str]) -> Any:
    parser = argparse.ArgumentParser(description="An echo/time bot for a chatproto group.")
    parser.add_argument("--server", default="tcp:127.0.0.1:7420")
    parser.add_argument("--user", default="bot")
    parser.add_argument("--group", default="#lobby")
    parser.add_argument("--register", action="store_true", help="create the account if needed")
    args = parser.parse_args(argv)
    password = os.environ.get("CHATPROTO_PASSWORD")
    if not password:
        parser.error("set CHATPROTO_PASSWORD")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    if args.register:
        yield register(reactor, args.server, args.user, password)
    bot = BotService(reactor, args.server, args.user, password, args.group)
    bot.startService()
    reactor.addSystemEventTrigger("before", "shutdown", bot.stopService)
    try:
        yield bot.done  # fires when stopped (Ctrl-C), fails on a fatal error
    except RemoteError as e:
        raise SystemExit(f"bot: {e}") from None


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
