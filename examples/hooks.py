"""A realm extension: message statistics and an audit log, added without editing chatproto.

Load it through the ``realm.plugins`` extension point (see ``hooks.toml`` and
README.md)::

    PYTHONPATH=examples twistd -n chatrealm --config examples/hooks.toml

What it does, on every committed stream item (an observer, so it never delays or
blocks a send):

- counts text messages per group and per sender in each group;
- writes one audit log line per group message, flagging words from a configured list
  (``CHATPROTO_HOOKS_FLAG``, comma-separated; observers run after the message is stored,
  so this flags, it does not censor);
- answers ``!stats`` (in a group, or in a private message to the bot user) with a
  private message from the bot user (``CHATPROTO_HOOKS_BOT``, default ``statsbot``),
  sent with ``realm.post()``.  The bot account is created on first use if it does
  not exist (with a random password: nobody logs in as it).

Settings come from the environment because the realm's config file only knows
chatproto's own keys; :func:`make_setup` takes them as arguments (tests use it).
"""

from __future__ import annotations

import os
import secrets
from collections import Counter, defaultdict
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from chatproto.envelope import Envelope

log = Logger(namespace="hooks")

STATS_COMMAND = "!stats"


class MessageStats:
    """The hook's state and logic; one per realm."""

    def __init__(self, realm: Any, bot: str = "statsbot", flagged: set[str] | None = None):
        self.realm = realm
        self.bot = bot
        self.flagged = {w.casefold() for w in (flagged or set())}
        #: group address -> number of text messages seen
        self.per_group: Counter[str] = Counter()
        #: group address -> sender -> number of text messages
        self.per_sender: dict[str, Counter[str]] = defaultdict(Counter)
        #: audit lines (also logged); bounded
        self.audit: list[str] = []

    @property
    def bot_address(self) -> str:
        return f"{self.bot}@{self.realm.realm}"

    def observe(self, env: Envelope) -> None:
        """The observer: called with every committed item, after delivery."""
        if env.kind != "text" or env.sender == self.bot_address:
            return
        if env.recipient.startswith("#"):
            self.per_group[env.recipient] += 1
            self.per_sender[env.recipient][env.sender] += 1
            words = {w.strip(".,!?;:").casefold() for w in env.body.split()}
            hits = sorted(words & self.flagged)
            line = f"{env.recipient} pos={env.pos} from={env.sender} len={len(env.body)}"
            if hits:
                line += f" flagged={','.join(hits)}"
                log.warn("audit: {line}", line=line)
            else:
                log.info("audit: {line}", line=line)
            self.audit.append(line)
            del self.audit[:-1000]
            if env.body.strip() == STATS_COMMAND:
                self.reply(env.sender, self.report(env.recipient))
        elif env.recipient == self.bot_address and env.body.strip() == STATS_COMMAND:
            self.reply(env.sender, self.report(None))

    def report(self, group: str | None) -> str:
        """The text of a ``!stats`` answer: one group, or every group seen."""
        if group is not None:
            top = ", ".join(
                f"{u.partition('@')[0]} {n}" for u, n in self.per_sender[group].most_common(3)
            )
            return f"{group}: {self.per_group[group]} messages (top: {top})"
        if not self.per_group:
            return "no group messages yet"
        return "; ".join(f"{g}: {n}" for g, n in sorted(self.per_group.items()))

    def reply(self, to: str, body: str) -> Deferred[Any]:
        """Post ``body`` to ``to`` as the bot, creating the bot account on first use."""

        def retry(failure: Any) -> Any:
            if getattr(failure.value, "code", None) != "no_such_user":
                return failure
            if self.bot_address in failure.value.message:  # the bot itself is missing
                d = self.realm.create_user(self.bot, secrets.token_urlsafe(24))
                return d.addCallback(lambda _: self.realm.post(self.bot, to, body))
            return failure

        d = self.realm.post(self.bot, to, body).addErrback(retry)
        d.addErrback(lambda f: log.failure("!stats reply to {to} failed", f, to=to))
        return d


def make_setup(bot: str = "statsbot", flagged: set[str] | None = None) -> Any:
    """A ``realm.plugins`` setup callable with explicit settings."""

    def setup(realm: Any) -> MessageStats:
        stats = MessageStats(realm, bot, flagged)
        realm.observers.append(stats.observe)
        log.info("hooks: message stats on, bot user {bot}", bot=bot)
        return stats

    return setup


def setup(realm: Any) -> MessageStats:
    """The entry point named in the config: ``plugins = ["hooks:setup"]``."""
    flagged = {
        w.strip() for w in os.environ.get("CHATPROTO_HOOKS_FLAG", "").split(",") if w.strip()
    }
    return make_setup(os.environ.get("CHATPROTO_HOOKS_BOT", "statsbot"), flagged)(realm)  # type: ignore[no-any-return]
