"""Federation on the workers of a cluster: any worker receives, one sends.

Every worker runs a federation listener (sharing ``[federation] port`` through
``SO_REUSEPORT`` on one machine), so a peer realm's link lands on any of them and its
items are stored there like any other commit (the other workers deliver them from the
store).  Only the worker named by ``[cluster] federation_sender`` runs outbound links
(:class:`SendingFederation`): the others (:class:`ReceivingFederation`) pass what the
realm would send -- link wake-ups, presence, and ``reading`` frames (read markers,
typing) -- to it over the bus, and it reads
every worker's outbox rows from the store, in position order (they are numbered from
their items' positions), never past the safe position.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory

from chatproto.cluster.listen import ReusePort
from chatproto.federation import STATUS_FILE, FederationService

if TYPE_CHECKING:
    from chatproto.store.postgresql import PostgresStore

__all__ = ["ReceivingFederation", "SendingFederation"]


def _listen_shared(service: FederationService) -> None:
    """``FederationService.listen`` with ``SO_REUSEPORT``."""
    if service.port is not None:
        return
    cfg = service.cfg
    wrapped = TLSMemoryBIOFactory(service.tls.server(), False, service.factory)
    port = ReusePort(cfg.port, wrapped, 50, cfg.interface, service.reactor)
    try:
        port.startListening()
    except CannotListenError as e:
        raise SystemExit(
            f"chatrealm: cannot listen for federation on {cfg.interface}:{cfg.port}: "
            f"{e.socketError}"
        ) from None
    service.port = port
    host = port.getHost()
    service.log.info(
        "federation for {realm} listening on {host}:{port}",
        realm=service.realm.realm,
        host=host.host,
        port=host.port,
    )


class SendingFederation(FederationService):
    """The federation sender's service: links and listener, as in one process; a
    link woken reads the outbox once the store's safe position is known (it reads no
    row above it: see ``PostgresStore.outbox_read``)."""

    def listen(self) -> None:
        _listen_shared(self)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: realm -> the call that wakes its link again (see :meth:`wake`)
        self._rechecks: dict[str, Any] = {}

    #: Seconds after which a link woken while another writer's commit held the safe
    #: position back is woken again.
    RECHECK = 0.2

    def wake(self, realm: str, n: int = 1) -> None:
        # A cluster's store: PostgresStore (safe_position, outbox_held).
        store: PostgresStore = self.realm.store

        def go(_: object) -> None:
            FederationService.wake(self, realm, n)
            if store.outbox_held:
                # A row committed above the bound the link reads to (a worker's commit
                # in flight below it, which may queue nothing: no wake-up follows) is
                # read once the bound passes it: look again shortly.
                self._recheck(realm)

        store.safe_position().addBoth(go)

    def _recheck(self, realm: str) -> None:
        pending = self._rechecks.get(realm)
        if pending is not None and pending.active():
            return
        self._rechecks[realm] = self.clock.callLater(self.RECHECK, self.wake, realm)

    def stopService(self) -> Any:
        for call in self._rechecks.values():
            if call.active():
                call.cancel()
        self._rechecks.clear()
        return FederationService.stopService(self)


class ReceivingFederation(FederationService):
    """A worker's federation service when it is not the sender: the listener only.

    ``publish(message)`` puts a JSON text on the bus's ``federation`` channel, which
    the sender acts on (see ``Worker``).  Its link state file is its own
    (``federation-status.json.<worker>``): ``chatrealmctl peers`` shows the sender's.
    """

    def __init__(self, realm: Any, reactor: Any, worker: str, publish: Any) -> None:
        path = os.path.join(realm.config.data_dir, f"{STATUS_FILE}.{worker}")
        super().__init__(realm, reactor, status_path=path)
        self._publish = publish

    def listen(self) -> None:
        _listen_shared(self)

    def startService(self) -> None:
        # The listener only: no outbound link, no queue resumed, nothing given up on
        # (the sender does all three).
        MultiService.startService(self)
        self.listen()
        self.status_changed()

    def admit(self, realm: str, user: str | None = None) -> bool:
        """This worker keeps no link: ``[federation] max_peers`` is the sender's to
        hold (past it, its ``wake`` bounces what was queued: ``peer_denied``), and
        ``max_peers_per_user`` is not held here (the sender does not know whose
        items it wakes for; ``give_up_unreached`` still frees their places)."""
        return True

    def wake(self, realm: str, n: int = 1) -> None:
        self._publish(json.dumps({"wake": realm}))

    def presence(self, realms: set[str], frame: dict[str, Any]) -> None:
        self._publish(json.dumps({"presence": sorted(realms), "data": frame}))

    def reading(self, realm: str, frame: dict[str, Any]) -> None:
        """A read marker or typing notice for ``realm``: the sender's links carry it."""
        self._publish(json.dumps({"reading": realm, "data": frame}))

    def want_keys(self, realm: str, by: str | None = None) -> Deferred[bool]:
        """Keys come in a link's hello: known when a link from ``realm`` is up here
        (this worker makes no link of its own)."""
        return succeed(any(p.peer_realm == realm and p.is_up() for p in self.inbound))
