"""Listening sockets several worker processes share (``SO_REUSEPORT``).

Workers of a cluster on one machine listen on the same port: the kernel spreads new
connections over them, and when one worker dies the others go on accepting.  Twisted's
endpoints do not set ``SO_REUSEPORT``, so a worker's TCP and TLS listeners are
:class:`ReusePort` ports, made from the endpoint the description gives.  Other
endpoint kinds (UNIX sockets...) listen as usual.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IListeningPort

__all__ = ["ReusePort", "listen_shared"]


class ReusePort(tcp.Port):
    """A TCP port whose socket has ``SO_REUSEPORT`` (and ``SO_REUSEADDR``) set."""

    def createInternetSocket(self) -> socket.socket:
        s: socket.socket = super().createInternetSocket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


def listen_shared(endpoint: Any, factory: Any, reactor: Any) -> IListeningPort | None:
    """Listen on ``endpoint`` (from ``serverFromString``) with ``SO_REUSEPORT``;
    None when it is not a TCP or TLS endpoint (then listen as usual).  Raises
    ``twisted.internet.error.CannotListenError`` like ``listenTCP``."""
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
        return None
    # The endpoint's settings (Twisted keeps them in these attributes, not public).
    port, backlog, interface = endpoint._port, endpoint._backlog, endpoint._interface
    if isinstance(endpoint, SSL4ServerEndpoint):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
    p = ReusePort(port, factory, backlog, interface, reactor)
    p.startListening()
    return p
