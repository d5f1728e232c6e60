"""Python's cyclic garbage collector and thread switch interval, set for a realm
process (``[performance]``).

Reference counting frees almost everything the send path allocates; the cyclic
collector runs anyway, every 700 net allocations of container objects by default, and
on a busy realm most of what it traverses is alive: the items in flight of a burst
(which it then promotes, so later collections traverse them again) and, in a full
collection, every object of the process, the modules and the realm's state loaded at
start-up included.  ``bench/README.md`` (issue 20) measures that cost and what
:class:`CollectorService` saves.

:class:`CollectorService` is what ``twistd chatrealm`` adds (``chatproto.tap``; an
embedder adds it only if it wants the process-wide change): at start it sets the
thresholds (``gc.set_threshold``; the collector stays enabled, so cycles are still
collected, only less often), and once the realm has loaded its state it collects once
and freezes what is left (``gc.freeze``: those objects are not traversed again), as
Synapse does after start-up.  Stopping puts back the thresholds it replaced and, if it
froze, unfreezes (``gc.unfreeze`` unfreezes everything: an embedder that freezes on its
own should not set ``gc_freeze`` too).

It also sets Python's thread switch interval (``sys.setswitchinterval``, 5 ms by
default) to ``switch_interval`` (0.5 ms), and puts it back when it stops.  A realm runs
its reactor and its database writer in two threads of one interpreter: when the writer
comes back from SQLite (a statement, an fsync) while the reactor runs Python, it waits
for the GIL, and the reactor hands it over on its own only when it makes a system call
-- which it takes back before the writer has woken up -- so the writer's wait ends when
the switch interval forces the reactor to drop it.  A group commit makes ~10 such
returns; at 30k private messages per second each commit took ~10 ms, half of it
waiting, and every message waits for about two commits.  With 0.5 ms a commit takes
~5.5 ms and a message's median latency falls by a quarter (bench/README.md, issue 20).
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from chatproto.config import Performance

__all__ = ["CollectorService"]


class CollectorService(Service):
    """Applies ``[performance] gc_thresholds``, ``gc_freeze`` and ``switch_interval``
    to this process.

    :param settings: the realm's ``[performance]`` section (checked).
    :param realm: the :class:`chatproto.realm.service.RealmService` whose start-up is waited
        for before freezing (its ``when_started``); the freeze happens at once when
        ``None``.
    """

    log = Logger()

    def __init__(self, settings: Performance, realm: Any = None) -> None:
        self.settings = settings
        self.realm = realm
        #: The thresholds found at start, when this service replaced them.
        self.replaced: tuple[int, ...] | None = None
        #: The switch interval found at start, when this service replaced it.
        self.replaced_interval: float | None = None
        #: Objects moved to the permanent generation by this service (0: none).
        self.frozen = 0
        self._stopped = False

    def startService(self) -> None:
        Service.startService(self)
        self._stopped = False
        wanted = tuple(self.settings.gc_thresholds)
        if wanted:
            self.replaced = gc.get_threshold()
            gc.set_threshold(*wanted)
        interval = self.settings.switch_interval
        if interval:
            self.replaced_interval = sys.getswitchinterval()
            sys.setswitchinterval(interval)
        if self.settings.gc_freeze:
            if self.realm is None:
                self._freeze()
            else:
                self.realm.when_started().addCallback(lambda _: self._freeze())
        self.log.info(
            "garbage collector: thresholds {thresholds}{how}",
            thresholds=gc.get_threshold(),
            how=" (Python's own)" if not wanted else "",
        )
        self.log.info(
            "thread switch interval: {interval} s{how}",
            interval=round(sys.getswitchinterval(), 6),  # (kept in microseconds)
            how=" (Python's own)" if not interval else "",
        )

    def _freeze(self) -> None:
        if self._stopped or not self.running:
            return
        gc.collect()  # what start-up left as garbage is not kept forever
        before = gc.get_freeze_count()
        gc.freeze()
        self.frozen = gc.get_freeze_count() - before
        self.log.info(
            "garbage collector: {frozen} objects of the started realm frozen", frozen=self.frozen
        )

    def stopService(self) -> None:
        Service.stopService(self)
        self._stopped = True
        if self.frozen:
            gc.unfreeze()
            self.frozen = 0
        if self.replaced is not None:
            if gc.get_threshold() == tuple(self.settings.gc_thresholds):
                gc.set_threshold(*self.replaced)  # unless someone has changed them since
            self.replaced = None
        if self.replaced_interval is not None:
            # (set back unless someone has changed it since; the getter rounds to us)
            if abs(sys.getswitchinterval() - self.settings.switch_interval) < 1e-6:
                sys.setswitchinterval(self.replaced_interval)
            self.replaced_interval = None
