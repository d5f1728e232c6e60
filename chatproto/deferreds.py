"""Small Deferred combinators the terminal clients share."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def next_turn(reactor: Any, d: Deferred[Any]) -> Deferred[Any]:
    """A new Deferred with ``d``'s result, fired on a later reactor turn (consumes ``d``)."""
    out: Deferred[Any] = Deferred()

    def deliver(result: Any) -> None:
        fire = out.errback if isinstance(result, Failure) else out.callback
        reactor.callLater(0, fire, result)

    d.addBoth(deliver)
    return out


def first_of(*ds: Deferred[Any]) -> Deferred[Any]:
    """The first result (or failure) of ``ds``, which keep theirs."""
    out: Deferred[Any] = Deferred()

    def fire(result: Any) -> Any:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        return result

    for d in ds:
        d.addBoth(fire)
    return out
