"""Limits on connections that have not authenticated yet.

Anyone can open a connection; until it has logged in (a client) or said a valid
``hello`` (a peer realm), nothing it sends is worth much memory.  Every listener
therefore holds such connections to small frames (:data:`LOGIN_MAX_FRAME` for a
client, :data:`PREAUTH_MAX_FRAME` for a peer realm) and counts them: at most
``total`` overall and ``per_address`` from one address (0: no bound).  A connection
past either bound is aborted at once -- before a TLS handshake, before reading a
byte -- so a flood of connections costs neither memory nor CPU.

One :class:`Admission` is shared by the realm's client listeners (native, TLS,
WebSocket, IRC: ``[limits]``), another serves the federation listener
(``[federation]``).  Protocols take a :class:`Ticket` when a connection opens and
release it when it authenticates or closes.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

__all__ = [
    "LOGIN_MAX_FRAME",
    "PREAUTH_MAX_FRAME",
    "Admission",
    "Ticket",
]

#: The longest frame (payload bytes) a peer realm may send before its ``hello`` is
#: accepted: a federation ``hello`` is about 60 bytes.
PREAUTH_MAX_FRAME = 8192
#: The longest frame (payload bytes) a client connection (native, TLS, WebSocket) may
#: send before it has logged in: enough for every valid ``login`` and ``register``
#: with every string written as JSON escapes -- a 1024-character password of
#: characters outside the BMP is 12 288 bytes escaped (surrogate pairs), with the
#: longest user address, device name and id about 14.4 KiB -- far below the limits
#: after it.  (At 8192, such a password could not log in from a client whose JSON
#: library escapes what is not ASCII, as Python's does by default.)
LOGIN_MAX_FRAME = 16384
#: Seconds between two log lines about refused connections (the ones in between are
#: counted, and the next line says how many).
LOG_EVERY = 10.0


class Ticket:
    """One unauthenticated connection, counted until :meth:`release`."""

    __slots__ = ("_admission", "host")

    def __init__(self, admission: Admission, host: str) -> None:
        self._admission: Admission | None = admission
        self.host = host

    def release(self) -> None:
        """The connection authenticated or closed: it no longer counts.  Idempotent."""
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.host)


class Admission:
    """Counts the unauthenticated connections of one kind (``what``, for logs) per
    address and overall, and refuses those past ``total`` or ``per_address``.

    ``clock`` (an ``IReactorTime``) paces the log lines about refusals."""

    log = Logger()

    def __init__(self, what: str, total: int, per_address: int, clock: Any) -> None:
        self.what = what
        self.total = total
        self.per_address = per_address
        self.clock = clock
        self.waiting = 0
        self._by_host: dict[str, int] = {}
        self._refused = 0
        self._logged_at: float | None = None

    def admit(self, host: str) -> Ticket | None:
        """A ticket for a new connection from ``host``, or None (and a log line, at
        most every :data:`LOG_EVERY` seconds) when a bound is reached."""
        here = self._by_host.get(host, 0)
        if self.total and self.waiting >= self.total:
            self._refuse(host, f"{self.waiting} connections wait to authenticate (the limit)")
            return None
        if self.per_address and here >= self.per_address:
            self._refuse(host, f"{here} connections from it wait to authenticate (the limit)")
            return None
        self.waiting += 1
        self._by_host[host] = here + 1
        return Ticket(self, host)

    def count(self, host: str) -> int:
        """Unauthenticated connections from ``host`` now."""
        return self._by_host.get(host, 0)

    def _release(self, host: str) -> None:
        self.waiting -= 1
        left = self._by_host.get(host, 0) - 1
        if left > 0:
            self._by_host[host] = left
        else:
            self._by_host.pop(host, None)

    def _refuse(self, host: str, why: str) -> None:
        self._refused += 1
        now = self.clock.seconds()
        if self._logged_at is not None and now - self._logged_at < LOG_EVERY:
            return
        more = self._refused - 1
        self.log.warn(
            "{what}: refused a connection from {host}: {why}{more}",
            what=self.what,
            host=host,
            why=why,
            more=f" ({more} more refused in the last {now - self._logged_at:.0f}s)"
            if more and self._logged_at is not None
            else "",
        )
        self._logged_at = now
        self._refused = 0
