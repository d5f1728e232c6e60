"""The command table of the IRC gateway: which function handles each command, how
many parameters it needs, and which commands are allowed before registration.

Handlers are plain functions ``handler(proto, reply, params, tags)`` registered with
:func:`command` by the modules that hold them (``chatproto.irc.messages``,
``chatproto.irc.channels``, ``chatproto.irc.users``, and the connection-level
commands of ``chatproto.irc.protocol``).  A handler returns None when its replies
are written, or a Deferred that fires once they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

__all__ = ["COMMANDS", "MIN_PARAMS", "PRE_REGISTRATION", "all_of", "command"]

Handler = Callable[..., Any]

#: Command name -> handler.
COMMANDS: dict[str, Handler] = {}
#: Least number of parameters per command (461 below that).
MIN_PARAMS: dict[str, int] = {}
#: Commands a client may send before registration completes.
PRE_REGISTRATION: set[str] = set()


def command(name: str, params: int = 0, early: bool = False) -> Callable[[Handler], Handler]:
    """Register a handler for ``name`` needing at least ``params`` parameters;
    ``early``: allowed before registration."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        if params:
            MIN_PARAMS[name] = params
        if early:
            PRE_REGISTRATION.add(name)
        return fn

    return register


def all_of(waits: Iterable[Any]) -> Any:
    """None when nothing in ``waits`` is a Deferred, else one Deferred for them all."""
    ds = [d for d in waits if isinstance(d, Deferred)]
    if not ds:
        return None
    if len(ds) == 1:
        return ds[0]
    return gatherResults(ds, consumeErrors=True)
