"""In-process federated realms for tests: each a real realm (SQLite) with its client
listener and its federation listener on 127.0.0.1 port 0, certificates from one dev CA
(or another, for the refusal tests), and static peer entries pointing at each other."""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor

from chatproto import tls
from chatproto.config import Config, Peer
from chatproto.federation import FederationService
from chatproto.protocol import ClientFactory
from tests.conftest import fast_config, make_realm


class Node:
    """One realm of a federation test."""

    def __init__(self, base: Any, name: str, certs: str, **fed: Any) -> None:
        self.name = name
        self.dir = base / name
        cfg = fast_config(self.dir, send_burst=100_000, send_rate=100_000.0)
        cfg.realm = name
        paths = tls.write_dev_certs(certs, name)
        f = cfg.federation
        f.enabled = True
        f.port = 0
        f.certificate = paths["cert"]
        f.private_key = paths["key"]
        f.ca = paths["ca"]
        f.retry_initial = 0.05
        f.retry_max = 0.5
        for k, v in fed.items():
            setattr(f, k, v)
        self.cfg: Config = cfg
        self.realm: Any = None
        self.fed: Any = None
        self.client_port: Any = None
        self.factory: Any = None

    def build(self, cert: dict[str, str] | None = None) -> None:
        """``cert``: paths (``cert``, ``key``) to use instead of the realm's own, set
        after the config check (which would refuse a certificate for another name)."""
        self.cfg.check()
        if cert is not None:
            self.cfg.federation.certificate = cert["cert"]
            self.cfg.federation.private_key = cert["key"]
        self.realm = make_realm(self.cfg)
        self.fed = FederationService(self.realm, _reactor)
        self.fed.listen()

    @property
    def fed_port(self) -> int:
        return int(self.fed.port.getHost().port)

    def peer(self, other: Node) -> None:
        endpoint = f"127.0.0.1:{other.fed_port}"
        existing = self.cfg.federation.peer(other.name)
        if existing is not None:
            existing.endpoint = endpoint
        else:
            self.cfg.federation.peers.append(Peer(realm=other.name, endpoint=endpoint))

    @defer.inlineCallbacks
    def start(self) -> Any:
        yield self.realm.startService()
        self.fed.startService()
        self.factory = ClientFactory(self.realm)
        self.client_port = _reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    @property
    def addr(self) -> str:
        return f"tcp:127.0.0.1:{self.client_port.getHost().port}"

    @defer.inlineCallbacks
    def stop_federation(self) -> Any:
        """Stop links and the listener (the realm goes on)."""
        if self.fed is not None and self.fed.running:
            yield self.fed.stopService()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.stop_federation()
        if self.client_port is not None:
            for proto in list(self.factory.connections):
                proto.transport.abortConnection()
            yield self.client_port.stopListening()
            self.client_port = None
        if self.realm is not None and self.realm.running:
            yield self.realm.stopService()


@defer.inlineCallbacks
def federation(
    base: Any,
    names: list[str],
    certs: dict[str, dict[str, str]] | None = None,
    pins: bool = False,
    before_start: Any = None,
    **fed: Any,
) -> Any:
    """Started nodes for ``names``, every one a static peer of every other.

    ``certs`` maps a realm name to certificate paths replacing its own (refusal
    tests).  ``pins``: trust by pinned fingerprints only (no CA bundle).
    """
    certdir = str(base / "certs")
    os.makedirs(certdir, exist_ok=True)
    nodes = [Node(base, n, certdir, **fed) for n in names]
    if pins:
        for n in nodes:
            n.cfg.federation.ca = ""
            for other in nodes:
                if other is not n:
                    with open(other.cfg.federation.certificate, "rb") as f:
                        n.cfg.federation.peers.append(
                            Peer(realm=other.name, fingerprint=tls.fingerprint(f.read()))
                        )
    for n in nodes:
        n.build((certs or {}).get(n.name))
    for n in nodes:
        for other in nodes:
            if other is not n:
                n.peer(other)
    if before_start is not None:
        before_start(nodes)
    for n in nodes:
        yield n.start()
    return nodes


def stop_all(nodes: list[Node]) -> None:
    for n in nodes:
        pytest_twisted.blockon(n.stop())


@defer.inlineCallbacks
def drained(node: Node, timeout: float = 10.0) -> Any:
    """Wait until ``node``'s outbox is empty (every item acknowledged by its peer)."""
    for _ in range(int(timeout / 0.02)):
        counts = yield node.realm.store.outbox_counts()
        if not counts:
            return
        yield task.deferLater(_reactor, 0.02, lambda: None)
    raise AssertionError(f"outbox of {node.name} not drained: {counts}")


class LogCapture:
    """Collects the formatted log lines of the realms while a test runs."""

    def __init__(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        self.lines: list[str] = []
        self._format = formatEvent
        self._publisher = globalLogPublisher
        self._publisher.addObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(self._format(event))

    def close(self) -> None:
        self._publisher.removeObserver(self)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


if os.environ.get("CHATPROTO_TEST_LOG"):  # debugging aid: the realms' log on stderr
    import sys

    from twisted.logger import globalLogPublisher, textFileLogObserver

    globalLogPublisher.addObserver(textFileLogObserver(sys.stderr))
