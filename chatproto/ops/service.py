"""The operator's handle on a running realm process: readiness and metrics.

:class:`Operations` is a service of ``twistd chatrealm`` (wired by
:func:`chatproto.tap.build`).  It knows the process's chat listeners and the
factories behind them, so it can say whether the realm is ready to serve
(:meth:`Operations.readiness`, ``/ready``), and it owns the realm's
:class:`chatproto.ops.metrics.RealmMetrics` when ``[metrics] listen`` is set.  It
decides nothing about chat: it reads the realm and calls its methods.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from chatproto.ops.metrics import ConnectionSource, RealmMetrics

__all__ = ["READY_TIMEOUT", "Listener", "Operations"]

#: Seconds the store has to answer a readiness check before it counts as unreachable.
READY_TIMEOUT = 5.0


class Listener(Protocol):
    """A listening service (``chatproto.tap.ListenerService``): its endpoint
    description, and its port while it listens (else None)."""

    description: str
    port: Any


class Operations(MultiService):
    """Readiness, draining state and metrics of one realm process.

    ``realm`` is the :class:`chatproto.realm.RealmService`; ``clock`` times the
    checks and the lag probe (the reactor, or a ``task.Clock`` in tests).
    """

    name = "operations"
    log = Logger()

    def __init__(self, realm: Any, reactor: Any, clock: Any = None) -> None:
        super().__init__()
        self.realm = realm
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        #: The chat listeners of the process (readiness: all of them listen).
        self.listeners: list[Listener] = []
        #: Set when the realm stops taking connections (``/ready`` answers 503).
        self.draining = False
        self.metrics: RealmMetrics | None = None
        if realm.config.metrics.listen:
            self.metrics = RealmMetrics(realm, self.clock)

    def watch(self, protocol: str, factory: ConnectionSource, listener: Listener) -> None:
        """``listener`` serves ``factory``, whose connections count as ``protocol``'s."""
        self.listeners.append(listener)
        if self.metrics is not None:
            self.metrics.watch(protocol, factory)

    def startService(self) -> None:
        super().startService()
        if self.metrics is not None:
            self.metrics.start()

    def stopService(self) -> Any:
        self.draining = True  # a process that stops is not ready any more
        if self.metrics is not None:
            self.metrics.stop()
        return super().stopService()

    @inlineCallbacks
    def readiness(self) -> Any:
        """Fires with ``{"ready": bool, "checks": {name: "ok" or why not}}``: the
        store answers a read within :data:`READY_TIMEOUT` seconds, the realm and
        every listener run, and the realm is not draining."""
        checks: dict[str, str] = {}
        realm = self.realm
        checks["realm"] = "ok" if realm.running else "not running"
        down = [li.description for li in self.listeners if li.port is None]
        fed = realm.federation
        if fed is not None and fed.port is None:
            down.append("federation")
        checks["listeners"] = "ok" if not down else "not listening: " + ", ".join(down)
        checks["draining"] = "draining" if self.draining else "ok"
        read: Deferred[Any] = realm.store.max_pos()
        read.addTimeout(READY_TIMEOUT, self.clock)
        try:
            yield read
            checks["store"] = "ok"
        except Exception as e:
            checks["store"] = f"unreachable: {str(e).strip() or type(e).__name__}"[:200]
        return {"ready": all(v == "ok" for v in checks.values()), "checks": checks}
