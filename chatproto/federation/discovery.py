"""Where a peer realm listens: its static endpoint, else DNS SRV, else the realm name
on the default port (PROTOCOL.md, "Federation"); the endpoint a
:class:`chatproto.federation.peer.PeerLink` connects through."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto.config import DEFAULT_FEDERATION_PORT

__all__ = ["SRV_SERVICE", "PeerEndpoint"]

#: DNS SRV service looked up for a realm without a static endpoint:
#: ``_chatproto-fed._tcp.<realm>``.
SRV_SERVICE = "_chatproto-fed._tcp"


@implementer(IStreamClientEndpoint)
class PeerEndpoint:
    """Where a peer realm listens, found at each attempt: the static ``endpoint`` of
    its ``[[federation.peers]]`` entry, else the DNS SRV record
    ``_chatproto-fed._tcp.<realm>`` (lowest priority, then highest weight), else the
    realm name itself on port 7422.  Connects with TLS expecting ``realm``'s name."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        realm: str,
        static: str,
        creator: Any,
        resolver: Any = None,
    ) -> None:
        self.reactor = reactor
        self.realm = realm
        self.static = static
        self.creator = creator
        self.resolver = resolver
        #: (host, port) of the last attempt, for logs and status.
        self.target: tuple[str, int] | None = None
        #: Called at the start of each attempt (the link's state becomes "connecting").
        self.on_attempt: Any = None
        #: Called with the Failure of an attempt that did not connect.
        self.on_failure: Any = None

    def __repr__(self) -> str:
        where = self.static or f"{self.realm} (SRV or port {DEFAULT_FEDERATION_PORT})"
        return f"federation peer {self.realm} at {where}"

    def resolve(self) -> Deferred[tuple[str, int]]:
        if self.static:
            host, _, port = self.static.rpartition(":")
            return succeed((host.strip("[]"), int(port)))
        resolver = self.resolver
        if resolver is None:
            from twisted.names import client as dns_client

            resolver = dns_client
        default = (self.realm, DEFAULT_FEDERATION_PORT)

        def found(result: Any) -> tuple[str, int]:
            answers = result[0]
            records = [a.payload for a in answers if getattr(a.payload, "port", None)]
            records = [r for r in records if str(r.target) not in ("", ".")]
            if not records:
                return default
            best = sorted(records, key=lambda r: (r.priority, -r.weight))[0]
            return (str(best.target).rstrip("."), int(best.port))

        def none(f: Failure) -> tuple[str, int] | Failure:
            if f.check(CancelledError):  # the attempt was stopped: no connection
                return f
            return default

        d = resolver.lookupService(f"{SRV_SERVICE}.{self.realm}")
        return d.addCallbacks(found, none)

    def connect(self, factory: Any) -> Deferred[Any]:
        """Resolve, then connect; cancelling the result cancels whichever step is under
        way (ClientService cancels an attempt when it is stopped)."""
        steps: list[Deferred[Any]] = []

        def cancel(_: Deferred[Any]) -> None:
            steps[-1].cancel()

        result: Deferred[Any] = Deferred(cancel)
        if self.on_attempt is not None:
            self.on_attempt()

        def settle(outcome: Any) -> None:
            if not result.called:
                if isinstance(outcome, Failure):
                    if self.on_failure is not None and not outcome.check(CancelledError):
                        self.on_failure(outcome)
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif not isinstance(outcome, Failure) and hasattr(outcome, "transport"):
                outcome.transport.abortConnection()  # connected after all: not wanted

        def go(target: tuple[str, int]) -> None:
            self.target = target
            inner = HostnameEndpoint(self.reactor, target[0], target[1], timeout=10)
            connecting = wrapClientTLS(self.creator, inner).connect(factory)
            steps.append(connecting)
            connecting.addBoth(settle)

        resolving = self.resolve()
        steps.append(resolving)
        resolving.addCallbacks(go, settle)
        return result
