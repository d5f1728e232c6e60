"""The realm's running counters: plain integers the hot paths bump.

Every realm has one :class:`RealmStats` (``realm.stats``), metrics listener or not.
The counters are plain attributes and small dicts touched on the reactor thread only:
no lock, no label look-up per message.  Where a path handles many items at once it
adds the count once (deliveries are counted per routed item and per backlog page, the
store's commits per group commit).  :mod:`chatproto.ops.metrics` reads them when
Prometheus scrapes; nothing else depends on them.
"""

from __future__ import annotations

__all__ = ["RealmStats"]


class RealmStats:
    """What the realm has done since it started (see docs/operator-guide.md,
    "Metrics and health", for the metric each becomes)."""

    __slots__ = (
        "deliveries_backlog",
        "deliveries_live",
        "file_bytes_in",
        "file_bytes_out",
        "login_failures",
        "logins",
        "refused",
        "slow_readers",
    )

    def __init__(self) -> None:
        #: successful logins, by protocol (native, web, irc)
        self.logins: dict[str, int] = {}
        #: logins refused for a wrong name or password (or an unusable session token)
        self.login_failures = 0
        #: stream items handed to a connection as they were committed
        self.deliveries_live = 0
        #: stream items handed to a connection from its backlog (resume, login)
        self.deliveries_backlog = 0
        #: file bytes received (uploads from clients, fetches from other realms)
        self.file_bytes_in = 0
        #: file bytes sent (downloads by clients and other realms)
        self.file_bytes_out = 0
        #: connections closed because they did not read their output, by protocol
        self.slow_readers: dict[str, int] = {}
        #: requests refused with ``rate_limited`` (or a flood disconnect), by limit
        self.refused: dict[str, int] = {}

    def login(self, protocol: str) -> None:
        self.logins[protocol] = self.logins.get(protocol, 0) + 1

    def slow_reader(self, protocol: str) -> None:
        self.slow_readers[protocol] = self.slow_readers.get(protocol, 0) + 1

    def rate_limited(self, limit: str) -> None:
        """A request was refused by ``limit`` (``send``, ``login``, ``irc_flood``,
        ``federation_txn``, ``federation_presence``, ``federation_reading``, ``remote_typing``,
        ``report``, ``register``, ``mark_read``,
        ``typing``, ``search``, ``conversations``, ``set_status``, ``group_change``)."""
        self.refused[limit] = self.refused.get(limit, 0) + 1
