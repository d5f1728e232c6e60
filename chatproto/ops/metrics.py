"""The realm's Prometheus metrics: counters read from the realm, histograms observed.

:class:`RealmMetrics` owns one ``prometheus_client`` registry per realm process (not
the library's global one: tests run several realms in one process).  It holds:

- a collector that turns the realm's plain counters
  (:class:`chatproto.ops.stats.RealmStats`, the store's commit counters) and its live
  state (connections, sessions, federation queues) into metric families.  The realm's
  state belongs to the reactor thread, while ``prometheus_client``'s Twisted resource
  renders in a thread: so the families are built on the reactor thread by
  :meth:`RealmMetrics.refresh` (which the ``/metrics`` resource calls before each
  scrape) and the collector only hands out that snapshot;
- histograms (thread-safe ``prometheus_client`` objects): each group commit's size,
  duration, COMMIT (fsync) time and where its time went (queued for the writer
  thread, written, handed back), told by the store's ``commit_observer``, and the
  event loop's lag, measured by a timer that notes how late it runs.

Every metric is documented in docs/operator-guide.md ("Metrics and health"); a test
keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import attrs
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto.store.groupcommit import CommitPhases

__all__ = [
    "COMMIT_ITEMS_BUCKETS",
    "LAG_INTERVAL",
    "PROTOCOLS",
    "RealmMetrics",
]

#: The protocols connections and sessions are counted by (always reported, even at 0).
PROTOCOLS = ("native", "web", "irc", "federation")
#: Seconds between two runs of the event-loop lag probe.
LAG_INTERVAL = 0.5
#: Items per group commit.
COMMIT_ITEMS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))
#: Durations of commits and COMMIT statements, in seconds.
_COMMIT_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    float("inf"),
)
#: How late the reactor ran a timer, in seconds.
_LAG_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))


class ConnectionSource(Protocol):
    """A factory that keeps its live connections in ``connections`` (the native,
    web and IRC factories do, for their keepalive sweeps)."""

    connections: set[Any]


class _Snapshot:
    """A ``prometheus_client`` collector handing out families built elsewhere."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)  # a reference taken at once: swapped, never mutated


class RealmMetrics:
    """The metrics of one realm process.

    ``realm`` is the :class:`chatproto.realm.RealmService`; ``clock`` times the lag
    probe.  :meth:`watch` names the factories whose connections are counted per
    protocol.  :meth:`start` hooks the store and starts the probe; :meth:`stop` undoes
    both.
    """

    log = Logger()

    def __init__(self, realm: Any, clock: Any, registry: CollectorRegistry | None = None) -> None:
        self.realm = realm
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self._sources: list[tuple[str, ConnectionSource]] = []
        #: realm -> (queued items, timestamp of the oldest), as last read from the store
        self.outbox: dict[str, tuple[int, float | None]] = {}
        reg = self.registry
        self.commit_items = Histogram(
            "chatproto_store_commit_items",
            "Stream items stored per group commit (0: only acks or outbox changes).",
            buckets=COMMIT_ITEMS_BUCKETS,
            registry=reg,
        )
        self.commit_seconds = Histogram(
            "chatproto_store_commit_seconds",
            "Seconds from the start of a group commit to its results (the transaction, "
            "including the wait for the writer thread).",
            buckets=_COMMIT_SECONDS,
            registry=reg,
        )
        self.sync_seconds = Histogram(
            "chatproto_store_sync_seconds",
            "Seconds the COMMIT statement of a group commit took (SQLite: the fsync of "
            "the WAL; PostgreSQL: the server's WAL flush and the round trip).",
            buckets=_COMMIT_SECONDS,
            registry=reg,
        )
        self.commit_phase_seconds = Histogram(
            "chatproto_store_commit_phase_seconds",
            "Seconds of a group commit by phase: queued (waiting for the writer "
            "thread), writing (the transaction), handoff (the writer done to the "
            "event loop taking the results).",
            labelnames=["phase"],
            buckets=_COMMIT_SECONDS,
            registry=reg,
        )
        #: (phase name, its histogram), one per field of CommitPhases
        self._phases = [
            (f.name, self.commit_phase_seconds.labels(phase=f.name))
            for f in attrs.fields(CommitPhases)
        ]
        self.loop_lag = Histogram(
            "chatproto_event_loop_lag_seconds",
            "How late the reactor ran a timer due every "
            f"{LAG_INTERVAL:g} s: time spent in callbacks that did not yield.",
            buckets=_LAG_SECONDS,
            registry=reg,
        )
        self._snapshot = _Snapshot()
        reg.register(self._snapshot)  # type: ignore[arg-type]
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self._probe = LoopingCall(self._lag)
        self._probe.clock = clock
        self._due = 0.0
        self._refreshing: Deferred[None] | None = None

    def watch(self, protocol: str, source: ConnectionSource) -> None:
        """Count the connections of ``source`` (a factory) as ``protocol``'s (once,
        however many listeners share it)."""
        if all(s is not source for _, s in self._sources):
            self._sources.append((protocol, source))

    # lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        store = self.realm.store
        if hasattr(store, "commit_observer"):
            store.commit_observer = self.committed
        self._due = self.clock.seconds() + LAG_INTERVAL
        if not self._probe.running:
            self._probe.start(LAG_INTERVAL, now=False)
        self.families()

    def stop(self) -> None:
        store = self.realm.store
        if getattr(store, "commit_observer", None) == self.committed:
            store.commit_observer = None
        if self._probe.running:
            self._probe.stop()

    # observations ---------------------------------------------------------------------

    def committed(
        self, items: int, seconds: float, sync: float | None, phases: CommitPhases
    ) -> None:
        """The store's ``commit_observer``: one group commit is done."""
        self.commit_items.observe(items)
        self.commit_seconds.observe(seconds)
        if sync is not None:
            self.sync_seconds.observe(sync)
        for name, histogram in self._phases:
            histogram.observe(max(0.0, getattr(phases, name)))

    def _lag(self) -> None:
        now = self.clock.seconds()
        self.loop_lag.observe(max(0.0, now - self._due))
        self._due = now + LAG_INTERVAL

    # scraping -----------------------------------------------------------------------

    def refresh(self) -> Deferred[None]:
        """Read what the metrics need from the store (the federation queues), then
        build the snapshot the collector hands out; on the reactor thread.  Fires
        when the snapshot is ready (a store that fails leaves the last queue figures,
        and the scrape goes on: the failure shows in ``chatproto_store_up``)."""
        if self._refreshing is not None:  # scrapes at once share one read
            d: Deferred[None] = Deferred()
            self._refreshing.addBoth(lambda _: d.callback(None))
            return d
        store = self.realm.store
        stats = getattr(store, "outbox_stats", None)
        if stats is None:
            self.families()
            return succeed(None)
        self._refreshing = reading = stats()

        def got(result: dict[str, tuple[int, float | None]]) -> None:
            self.outbox = result
            self._store_up = True

        def failed(f: Failure) -> None:
            self._store_up = False
            self.log.failure("metrics: reading the outbox", f)

        def done(_: object) -> None:
            self._refreshing = None
            self.families()

        reading.addCallbacks(got, failed).addBoth(done)
        return reading

    _store_up = True

    def families(self) -> list[Metric]:
        """Build (and keep, for the collector) the families of the realm's counters
        and state.  On the reactor thread."""
        out = list(self._build())
        self._snapshot.families = out
        return out

    def _build(self) -> Iterator[Metric]:
        realm = self.realm
        stats = realm.stats
        conns = dict.fromkeys(PROTOCOLS, 0)
        for protocol, source in self._sources:
            conns[protocol] = conns.get(protocol, 0) + len(source.connections)
        fed = realm.federation
        if fed is not None:
            up = sum(1 for link in fed.links.values() if link.proto is not None)
            conns["federation"] += len(fed.inbound) + up
        yield _gauge(
            "chatproto_connections",
            "Open connections, by protocol (federation: links in both directions).",
            "protocol",
            conns,
        )
        sessions = dict.fromkeys(PROTOCOLS[:3], 0)
        users = 0
        for user_sessions in realm.sessions.online.values():
            users += 1
            for s in user_sessions:
                sessions[s.protocol] = sessions.get(s.protocol, 0) + 1
        yield _gauge("chatproto_sessions", "Logged-in sessions, by protocol.", "protocol", sessions)
        yield GaugeMetricFamily(
            "chatproto_users_online", "Local users with at least one session.", value=users
        )
        yield _counter(
            "chatproto_logins",
            "Successful logins, by protocol.",
            "protocol",
            {p: stats.logins.get(p, 0) for p in PROTOCOLS[:3]} | stats.logins,
        )
        yield CounterMetricFamily(
            "chatproto_login_failures",
            "Logins refused for a wrong name or password, or an unusable session token.",
            value=stats.login_failures,
        )
        store = realm.store
        items = getattr(store, "committed_items", 0)
        remote = getattr(store, "committed_remote", 0)
        yield CounterMetricFamily(
            "chatproto_sends",
            "Stream items committed from this realm's users (messages, files, group "
            "events), counted per group commit.",
            value=items - remote,
        )
        yield CounterMetricFamily(
            "chatproto_remote_items",
            "Stream items received from other realms and stored (bounces included).",
            value=remote,
        )
        yield CounterMetricFamily(
            "chatproto_store_commits",
            "Group commits: transactions of stream items, acks and outbox changes.",
            value=getattr(store, "commits", 0),
        )
        yield _counter(
            "chatproto_deliveries",
            "Stream items handed to connections: live as they are committed, or from "
            "a session's backlog.",
            "path",
            {"live": stats.deliveries_live, "backlog": stats.deliveries_backlog},
        )
        yield _counter(
            "chatproto_file_bytes",
            "File bytes received (uploads, fetches from other realms) and sent "
            "(downloads by clients and other realms).",
            "direction",
            {"in": stats.file_bytes_in, "out": stats.file_bytes_out},
        )
        yield _counter(
            "chatproto_slow_readers_dropped",
            "Connections closed because they did not read their output "
            "(limits.max_output_buffer), by protocol.",
            "protocol",
            {p: stats.slow_readers.get(p, 0) for p in PROTOCOLS[:3]} | stats.slow_readers,
        )
        yield _counter(
            "chatproto_rate_limited",
            "Requests refused by a rate limit (or, irc_flood, connections closed for "
            "flooding), by limit.",
            "limit",
            dict.fromkeys(("send", "login"), 0) | stats.refused,
        )
        now = self.clock.seconds()
        depth = GaugeMetricFamily(
            "chatproto_federation_outbox_items",
            "Items queued for a peer realm and not yet acknowledged by it.",
            labels=["peer"],
        )
        age = GaugeMetricFamily(
            "chatproto_federation_outbox_oldest_seconds",
            "Age of the oldest item queued for a peer realm (0: nothing queued).",
            labels=["peer"],
        )
        peers = set(self.outbox) | (set(fed.links) if fed is not None else set())
        for peer in sorted(peers):
            n, oldest = self.outbox.get(peer, (0, None))
            depth.add_metric([peer], n)
            age.add_metric([peer], max(0.0, now - oldest) if n and oldest is not None else 0.0)
        yield depth
        yield age
        yield GaugeMetricFamily(
            "chatproto_store_up",
            "1 when the last read of the store for the metrics succeeded, else 0.",
            value=1 if self._store_up else 0,
        )


def _gauge(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key in sorted(values):
        family.add_metric([key], values[key])
    return family


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in sorted(values):
        family.add_metric([key], values[key])
    return family
