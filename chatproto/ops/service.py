"""The operator's handle on a running realm process: readiness, metrics, control.

:class:`Operations` is a service of ``twistd chatrealm`` (wired by
:func:`chatproto.tap.build`).  It knows the process's chat listeners and the
factories behind them, so it can say whether the realm is ready to serve
(:meth:`Operations.readiness`, ``/ready``), reload their TLS certificates
(:meth:`Operations.reload_tls`) and drain the process (:meth:`Operations.drain`).  It
owns the realm's :class:`chatproto.ops.metrics.RealmMetrics` when ``[metrics] listen``
is set, and the control socket (:mod:`chatproto.ops.control`) unless ``[control]
enabled`` is false.  It decides nothing about chat: it reads the realm and calls its
methods.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from chatproto.ops.metrics import ConnectionSource, RealmMetrics

__all__ = ["READY_TIMEOUT", "Listener", "Operations"]

#: Seconds the store has to answer a readiness check before it counts as unreachable.
READY_TIMEOUT = 5.0


class Listener(Protocol):
    """A listening service (``chatproto.tap.ListenerService``): its endpoint
    description, its port while it listens (else None), its replaceable TLS settings
    (None for a plain listener), and how to stop it."""

    description: str
    port: Any
    tls: Any

    def load_tls(self) -> Any: ...
    def use_tls(self, options: Any) -> str: ...
    def stopService(self) -> Any: ...


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
        if realm.config.control.enabled:
            from chatproto.ops.control import ControlService

            ControlService(self, reactor, realm.config.control_socket).setServiceParent(self)
        #: What ends the process once drained: the reactor's ``stop`` (tests replace it).
        self.stop_process: Any = getattr(reactor, "stop", None) or (lambda: None)

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

    def reload_tls(self) -> list[tuple[str, str]]:
        """Read every TLS listener's certificate and key again; new connections get
        them.  All or nothing: if one listener's files cannot be used (``ValueError``
        naming it), every listener keeps what it had.  Returns ``(description,
        fingerprint)`` per listener."""
        listeners = [li for li in self.listeners if li.tls is not None]
        if not listeners:
            raise ValueError("no TLS listener: the realm serves no ssl: endpoint")
        loaded = [(li, li.load_tls()) for li in listeners]
        return [(li.description, li.use_tls(options)) for li, options in loaded]

    @inlineCallbacks
    def drain(self, grace: float = 0.0) -> Any:
        """Stop taking connections: ``/ready`` answers 503 at once; after ``grace``
        seconds (for load balancers to notice) the listeners close and every session
        is told ``shutting_down``.  Fires with the number of sessions closed; the
        caller then stops the process (:attr:`stop_process`), which finishes the
        commits in flight and closes the store."""
        self.draining = True
        self.log.info("draining: not ready; listeners close in {grace}s", grace=grace)
        if grace > 0:
            yield deferLater(self.clock, grace, lambda: None)
        for listener in self.listeners:
            yield maybeDeferred(listener.stopService)
        closed = 0
        for s in self.realm.sessions.all():
            try:
                s.mind.disconnect("shutting_down", "the realm is being drained")
            except Exception:
                self.log.failure("closing {user} while draining", user=s.user_id)
            s.logout()
            closed += 1
        self.log.info("drained: listeners closed, {n} sessions closed", n=closed)
        return closed

    @inlineCallbacks
    def readiness(self) -> Any:
        """Fires with ``{"ready": bool, "checks": {name: "ok" or why not}}``: the
        store answers a read within :data:`READY_TIMEOUT` seconds, the realm and
        every listener run, the realm is not draining, and (a worker of a cluster)
        it reaches its database and its bus."""
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
        if realm.cluster is not None:  # a worker: it refuses sends without its bus
            checks["cluster"] = realm.cluster.problem() or "ok"
        return {"ready": all(v == "ok" for v in checks.values()), "checks": checks}
