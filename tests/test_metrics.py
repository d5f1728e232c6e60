"""Metrics and health (chatproto.ops): scraped over loopback while traffic flows, and
the parts (the lag probe, readiness, the counters) with a test clock."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail
from twisted.web.client import Agent, readBody

from chatproto import tap
from chatproto.client import connect
from chatproto.config import Config
from chatproto.envelope import Envelope
from chatproto.ops.metrics import RealmMetrics
from chatproto.ops.service import READY_TIMEOUT, Operations
from chatproto.store.groupcommit import CommitPhases
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests.conftest import until

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operator-guide.md"


def _config(tmp_path: Any) -> Config:
    cfg = Config()
    cfg.data_dir = str(tmp_path / "data")
    cfg.listen = ["tcp:0:interface=127.0.0.1"]
    cfg.metrics.listen = ["tcp:0:interface=127.0.0.1"]
    cfg.auth.argon2_time_cost = 1
    cfg.auth.argon2_memory_cost = 64
    cfg.auth.argon2_parallelism = 1
    cfg.storage.synchronous = "NORMAL"
    cfg.limits.send_burst = 1000
    cfg.check()
    return cfg


def _port(top: Any, description_of: Any) -> int:
    for svc in top:
        if isinstance(svc, tap.ListenerService) and description_of(svc):
            return int(svc.port.getHost().port)
    raise AssertionError("no such listener")


@defer.inlineCallbacks
def _get(port: int, path: str) -> Any:
    response = yield Agent(_reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    body = yield readBody(response)
    return response.code, body.decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _documented() -> dict[str, str]:
    """Metric name -> type, from the table of docs/operator-guide.md."""
    section = GUIDE.read_text().split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(chatproto_[a-z_]+)` \| (\w+) \|", section, re.M)
    return dict(rows)


@pytest_twisted.inlineCallbacks
def test_a_scrape_while_traffic_flows_sees_the_counters_move(tmp_path: Any) -> Any:
    top, _realm = tap.build(_config(tmp_path), _reactor)
    top.privilegedStartService()
    top.startService()
    clients: list[Any] = []
    try:
        chat = _port(
            top, lambda s: s.factory is not None and s.factory.__class__.__name__ == "ClientFactory"
        )
        ops = _port(top, lambda s: s.factory.__class__.__name__ == "OpsSite")
        code, text = yield _get(ops, "/metrics")
        assert code == 200
        before = _samples(text)
        assert _value(before, "chatproto_sends_total") == 0
        assert _value(before, "chatproto_connections", protocol="native") == 0

        got: list[dict[str, Any]] = []
        a = yield connect(_reactor, f"tcp:127.0.0.1:{chat}", "alice", "password-a", register=True)
        b = yield connect(
            _reactor,
            f"tcp:127.0.0.1:{chat}",
            "bob",
            "password-b",
            register=True,
            on_message=got.append,
        )
        clients += [a, b]
        yield defer.gatherResults([a.synced, b.synced])
        scraped: list[float] = []  # chatproto_sends_total, scraped while alice sends

        @defer.inlineCallbacks
        def keep_sending() -> Any:
            # One send after another until two scrapes taken meanwhile differ (bounded).
            n = 0
            while n < 200 or (n < 5000 and not any(y > x for x, y in itertools.pairwise(scraped))):
                yield a.send("bob", f"m{n}")
                n += 1
            return n

        sending = keep_sending()
        while not sending.called:
            code, text = yield _get(ops, "/metrics")
            scraped.append(_value(_samples(text), "chatproto_sends_total"))
            during = _samples(text)
        sent = yield sending
        yield until(lambda: len(got) == sent)
        code, text = yield _get(ops, "/metrics")
        after = _samples(text)
    finally:
        for c in clients:
            yield c.close()
        yield top.stopService()

    assert _value(during, "chatproto_connections", protocol="native") == 2
    assert _value(during, "chatproto_sessions", protocol="native") == 2
    assert _value(during, "chatproto_users_online") == 2
    assert _value(after, "chatproto_logins_total", protocol="native") == 2
    assert _value(after, "chatproto_login_failures_total") == 0
    assert any(y > x for x, y in itertools.pairwise(scraped))  # moved under our eyes
    total = _value(after, "chatproto_sends_total")
    assert total == sent  # alice's messages: nothing else was committed
    live = _value(after, "chatproto_deliveries_total", path="live")
    assert live == 2 * sent  # each message to bob and, echoed, to alice
    commits = _value(after, "chatproto_store_commits_total")
    assert commits >= 1  # (acknowledgements are committed too, alone at times)
    # The histograms are read as the page is rendered (in a thread), the counters when
    # the scrape began: acks committed meanwhile may count in the first only.
    assert _value(after, "chatproto_store_commit_items_count") >= commits
    assert _value(after, "chatproto_store_commit_items_sum") == total
    assert _value(after, "chatproto_store_sync_seconds_count") >= commits
    assert _value(after, "chatproto_store_commit_seconds_sum") > 0
    # each commit's phases (queued, writing, handoff) add up to its seconds; a commit
    # of acks told between the two histograms' reads is at most a few ms apart
    phase = "chatproto_store_commit_phase_seconds"
    for p in ("queued", "writing", "handoff"):
        assert _value(after, phase + "_count", phase=p) >= commits
    parts = sum(_value(after, phase + "_sum", phase=p) for p in ("queued", "writing", "handoff"))
    assert _value(after, phase + "_sum", phase="writing") > 0
    assert parts == pytest.approx(_value(after, "chatproto_store_commit_seconds_sum"), abs=0.1)
    assert _value(after, "chatproto_store_up") == 1
    assert _value(after, "process_open_fds") > 0
    # Every metric served is documented, with its type, and every documented one served.
    served = {
        f.name + ("_total" if f.type == "counter" else ""): f.type
        for f in text_string_to_metric_families(text)
        if f.name.startswith("chatproto_") and not f.name.endswith("_created")
    }
    assert served == _documented()


@pytest_twisted.inlineCallbacks
def test_health_and_ready_on_the_operations_listener(tmp_path: Any) -> Any:
    top, _realm = tap.build(_config(tmp_path), _reactor)
    top.privilegedStartService()
    top.startService()
    try:
        port = _port(top, lambda s: s.factory.__class__.__name__ == "OpsSite")
        assert (yield _get(port, "/health")) == (200, "ok\n")
        code, body = yield _get(port, "/ready")
        assert code == 200
        assert json.loads(body) == {
            "ready": True,
            "checks": {"draining": "ok", "listeners": "ok", "realm": "ok", "store": "ok"},
        }
        top.getServiceNamed("operations").draining = True
        code, body = yield _get(port, "/ready")
        assert code == 503 and json.loads(body)["checks"]["draining"] == "draining"
        code, _ = yield _get(port, "/nothing")
        assert code == 404
    finally:
        yield top.stopService()


# without sockets --------------------------------------------------------------------


def test_the_lag_probe_measures_how_late_the_reactor_runs_it() -> None:
    clock = task.Clock()
    realm = make_test_realm()
    metrics = RealmMetrics(realm, clock)
    metrics.start()
    clock.advance(0.5)  # on time
    clock.advance(1.25)  # due at 1.0, run at 1.75: 0.75 late
    reg = metrics.registry
    assert reg.get_sample_value("chatproto_event_loop_lag_seconds_count") == 2
    assert reg.get_sample_value("chatproto_event_loop_lag_seconds_sum") == pytest.approx(0.75)
    metrics.stop()
    assert not clock.getDelayedCalls()


def test_each_commit_phase_is_observed_under_its_own_label() -> None:
    """What the store tells of a commit lands in the histograms: its phases each under
    their own label (the loopback scrape above sees them add up only roughly, a commit
    of acks may fall between two histograms' reads)."""
    metrics = RealmMetrics(make_test_realm(), task.Clock())
    metrics.committed(3, 0.75, 0.125, CommitPhases(queued=0.25, writing=0.125, handoff=0.375))
    metrics.committed(0, 0.5, None, CommitPhases(queued=0.0, writing=0.5, handoff=0.0))
    value = metrics.registry.get_sample_value
    phase = "chatproto_store_commit_phase_seconds"
    assert [value(phase + "_sum", {"phase": p}) for p in ("queued", "writing", "handoff")] == [
        0.25,
        0.625,
        0.375,
    ]
    assert all(value(phase + "_count", {"phase": p}) == 2 for p in ("queued", "writing"))
    assert value("chatproto_store_commit_seconds_sum") == 1.25
    assert value("chatproto_store_sync_seconds_count") == 1
    assert value("chatproto_store_commit_items_sum") == 3


def test_outbox_depth_and_age_per_peer_come_from_the_store() -> None:
    clock = task.Clock()
    clock.advance(10_000)
    realm = make_test_realm(clock)
    metrics = RealmMetrics(realm, clock)
    old = Envelope(
        id="x1", kind="text", sender="a@localhost", recipient="b@b.example", ts=9_000.0, body=""
    )
    realm.store.append([old], [("b.example", old)])
    metrics.refresh()
    reg = metrics.registry
    assert reg.get_sample_value("chatproto_federation_outbox_items", {"peer": "b.example"}) == 1
    age = reg.get_sample_value("chatproto_federation_outbox_oldest_seconds", {"peer": "b.example"})
    assert age == 1_000.0
    # A store that fails: the last figures stay, and the failure shows.
    realm.store.outbox_stats = lambda: fail(RuntimeError("disk gone"))  # type: ignore[method-assign]
    metrics.refresh()
    assert reg.get_sample_value("chatproto_store_up") == 0
    assert reg.get_sample_value("chatproto_federation_outbox_items", {"peer": "b.example"}) == 1


def test_refusals_and_logins_are_counted_by_the_realm() -> None:
    clock = task.Clock()
    cfg = Config()
    cfg.limits.send_burst = 1
    cfg.limits.send_rate = 0.001
    realm = make_test_realm(clock, cfg)
    realm.create_user("alice", "password1")
    proto, transport = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1}))
    proto.dataReceived(frame({"type": "login", "user": "alice", "password": "wrong-one"}))
    proto.dataReceived(frame({"type": "login", "user": "alice", "password": "password1"}))
    clock.advance(0)
    for i in range(3):
        proto.dataReceived(frame({"type": "send", "to": "alice", "body": f"{i}", "id": i}))
    codes = [f.get("code") for f in frames(transport) if f["type"] == "error"]
    assert codes == ["auth_failed", "rate_limited", "rate_limited"]
    stats = realm.stats
    assert stats.logins == {"native": 1} and stats.login_failures == 1
    assert stats.refused == {"send": 2}
    assert stats.deliveries_live == 1  # the one send, to alice's own session
    families = {f.name: f for f in RealmMetrics(realm, clock).families()}
    refused = {s.labels["limit"]: s.value for s in families["chatproto_rate_limited"].samples}
    assert refused == {"send": 2, "login": 0}


@pytest_twisted.inlineCallbacks
def test_readiness_names_what_is_wrong() -> Any:
    clock = task.Clock()
    realm = make_test_realm(clock)
    ops = Operations(realm, clock)

    class Listener:
        description = "tcp:7420"
        port: Any = object()

    listener = Listener()
    ops.listeners.append(listener)
    report = yield ops.readiness()
    assert report["ready"] is True
    listener.port = None
    ops.draining = True
    realm.store.max_pos = lambda: fail(RuntimeError("no such table: items"))  # type: ignore[method-assign]
    report = yield ops.readiness()
    assert report == {
        "ready": False,
        "checks": {
            "draining": "draining",
            "listeners": "not listening: tcp:7420",
            "realm": "ok",
            "store": "unreachable: no such table: items",
        },
    }
    # A store that does not answer at all is unreachable after READY_TIMEOUT.
    realm.store.max_pos = lambda: Deferred()  # type: ignore[method-assign]
    pending = ops.readiness()
    clock.advance(READY_TIMEOUT)
    report = yield pending
    assert report["checks"]["store"].startswith("unreachable")


@pytest_twisted.inlineCallbacks
def test_readiness_of_a_worker_says_when_its_bus_or_database_is_away() -> Any:
    """A worker of a cluster (realm.cluster) is not ready while it refuses sends."""
    clock = task.Clock()
    realm = make_test_realm(clock)
    ops = Operations(realm, clock)

    class Cluster:
        why: str | None = None

        def problem(self) -> str | None:
            return self.why

    realm.cluster = Cluster()
    report = yield ops.readiness()
    assert report["ready"] is True and report["checks"]["cluster"] == "ok"
    realm.cluster.why = "the realm's message bus (Redis at 127.0.0.1:6379) does not answer"
    report = yield ops.readiness()
    assert report["ready"] is False
    assert report["checks"]["cluster"].startswith("the realm's message bus")


def test_every_rate_limit_label_the_realm_counts_is_documented() -> None:
    """The operator guide's row of chatproto_rate_limited_total names every value its
    ``limit`` label takes (it left out group_change, set_status, federation_reading
    and remote_typing)."""
    root = Path(__file__).resolve().parent.parent
    counted = set()
    for path in (root / "chatproto").rglob("*.py"):
        text = path.read_text()
        counted |= set(re.findall(r'rate_limited\("([a-z_]+)"\)', text))
        counted |= set(re.findall(r'self\._take\(session, "([a-z_]+)"', text))
    assert {"send", "login", "group_change", "mark_read"} <= counted  # the scan works
    guide = (root / "docs" / "operator-guide.md").read_text()
    [row] = [line for line in guide.splitlines() if line.startswith("| `chatproto_rate_limited")]
    documented = set(re.findall(r"`([a-z_]+)`", row.split("|")[4]))
    assert counted <= documented, counted - documented
