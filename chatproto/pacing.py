"""The event loop's pacing on a busy realm (``[performance] coalesce_wait``).

A realm under steady load from many clients reads one frame per read: each client's
next frame arrives after the reactor has already taken the last one, so every frame
pays a whole readable event (``epoll``, Twisted's dispatch, a ``recv``, the framing
loop, a send batch of one, an append of its own).  A closed loop, where each read
holds many frames, costs the realm a third as much per private message.  Paced at
50k private messages/s, one frame per read saturated the reactor thread (~19 us of it
per message, 38-45k delivered, p99 95-123 ms); bench/README.md, issue 20.

:class:`LoopPacer` makes the reactor wait a little before it polls again after an
iteration that did work, so that what arrives meanwhile is read together: each wait
is at most the CPU time the reactor thread spent since its last poll (the work of the
iteration before: a realm doing little waits little), at most ``coalesce_wait``
(4 ms), never past the reactor's next timed call, and none at all after an iteration
of less than :data:`FLOOR` of work (one message at a time is not delayed).  The wait
is a sleep of the reactor thread: it releases the GIL, so the database writer runs
meanwhile without waiting for it; answers from threads (``callFromThread``) are
handled when it ends.  At 50k/s paced that took the reactor's share from 16-17 us
per message to 10.5-12 and the p99 latency from 84-94 ms to 47-69, all 50k delivered
(bench/README.md).

:class:`LoopPacerService` is what ``twistd chatrealm`` adds (``chatproto.tap``, with
the other process-wide ``[performance]`` settings; an embedder adds it only if it
asks): it wraps the reactor's ``doIteration`` (the one step of Twisted's
``mainLoop`` that waits for input) while it runs and puts it back when it stops.  A
reactor without ``doIteration`` (one driven by another event loop, such as the asyncio
reactor) is left as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from chatproto.config import Performance

__all__ = ["FLOOR", "LoopPacer", "LoopPacerService"]

#: Seconds of the reactor thread's CPU since its last poll below which it polls again
#: at once: an iteration that handled a message or two (tens of microseconds) is not
#: followed by a wait.
FLOOR = 0.0002


class LoopPacer:
    """Waits, before each poll of ``reactor``, as the module says.

    :param max_wait: the most seconds of one wait (``coalesce_wait``); 0: never.
    :param cpu: the reactor thread's CPU clock (``time.thread_time``; tests pass one).
    :param sleep: how to wait (``time.sleep``; tests pass one).
    """

    def __init__(
        self,
        reactor: Any,
        max_wait: float,
        cpu: Callable[[], float] = time.thread_time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.reactor = reactor
        self.max_wait = max_wait
        self._cpu = cpu
        self._sleep = sleep
        self._iterate: Callable[[float | None], None] | None = None
        #: The reactor's own instance attribute ``doIteration`` we replaced (another
        #: wrapper), put back at uninstall; None: the class's method.
        self._replaced: Callable[[float | None], None] | None = None
        self._mark = 0.0
        #: Waits so far, and their seconds in all.
        self.waits = 0
        self.waited = 0.0

    def install(self) -> bool:
        """Wrap the reactor's ``doIteration``; False (nothing done) if it has none or
        ``max_wait`` is 0."""
        iterate = getattr(self.reactor, "doIteration", None)
        if self._iterate is not None or not callable(iterate) or self.max_wait <= 0:
            return False
        replaced = getattr(self.reactor, "__dict__", {}).get("doIteration")
        try:
            self.reactor.doIteration = self.do_iteration
        except AttributeError:  # (a reactor whose attributes are fixed)
            return False
        self._iterate, self._replaced = iterate, replaced
        self._mark = self._cpu()
        return True

    def uninstall(self) -> None:
        """Put back what the reactor had (unless someone replaced ours since)."""
        if self._iterate is None:
            return
        if getattr(self.reactor, "__dict__", {}).get("doIteration") == self.do_iteration:
            if self._replaced is not None:
                self.reactor.doIteration = self._replaced
            else:
                del self.reactor.doIteration  # (the class's own again)
        self._iterate = self._replaced = None

    def do_iteration(self, timeout: float | None) -> None:
        """The reactor's ``doIteration(timeout)``: wait as the module says, then poll
        with what is left of ``timeout`` (None: no timed call pending)."""
        iterate = self._iterate
        if iterate is None:  # uninstalled, but called by a wrapper installed after us
            type(self.reactor).doIteration(self.reactor, timeout)
            return
        now = self._cpu()
        wait = min(now - self._mark, self.max_wait)
        if timeout is not None:
            wait = min(wait, timeout)
        if wait >= FLOOR:
            self._sleep(wait)
            self.waits += 1
            self.waited += wait
            if timeout is not None:
                timeout = max(0.0, timeout - wait)
        self._mark = now  # (a sleep uses none of the thread's CPU)
        iterate(timeout)


class LoopPacerService(Service):
    """Applies ``[performance] coalesce_wait`` to ``reactor`` while it runs."""

    log = Logger()

    def __init__(self, settings: Performance, reactor: Any) -> None:
        self.pacer = LoopPacer(reactor, settings.coalesce_wait)

    def startService(self) -> None:
        Service.startService(self)
        if self.pacer.install():
            self.log.info(
                "event loop: waits up to {wait} s after busy iterations",
                wait=self.pacer.max_wait,
            )
        else:
            self.log.info("event loop: polls again at once (no coalescing wait)")

    def stopService(self) -> None:
        Service.stopService(self)
        self.pacer.uninstall()
