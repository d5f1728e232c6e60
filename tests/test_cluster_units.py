"""The cluster's logic without processes: the stream reader against a store whose safe
position the test moves (a commit held back), presence across workers, nonce ids, the
``--worker`` option and ``[cluster]`` checks, and ``SO_REUSEPORT`` ports."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python import usage

from chatproto import config as configmod
from chatproto import tap
from chatproto.cluster.listen import listen_shared
from chatproto.cluster.presence import ClusterPresence
from chatproto.cluster.stream import StreamReader
from chatproto.cluster.worker import nonce_id
from chatproto.envelope import Envelope
from chatproto.groups import Groups
from chatproto.realm.groups import GroupHandler
from chatproto.realm.sessions import Sessions
from tests.conftest import fired


def item(pos: int, sender: str = "a@x", recipient: str = "b@x") -> Envelope:
    return Envelope(f"id{pos}", "text", sender, recipient, 1.0, f"m{pos}", pos=pos)


class Store:
    """Items committed at positions; ``safe`` is what safe_position answers (a test
    holds it back as a writer in flight would)."""

    def __init__(self) -> None:
        self.items: dict[int, Envelope] = {}
        self.safe = 0
        #: The highest position drawn (None: the highest committed item's).
        self.top: int | None = None
        self.fail: Exception | None = None
        self.skipped: list[list[int]] = []

    def safe_position(self) -> Deferred[int]:
        if self.fail is not None:
            from twisted.internet.defer import fail

            return fail(self.fail)
        return succeed(self.safe)

    def stream_top(self) -> Deferred[int]:
        if self.fail is not None:
            from twisted.internet.defer import fail

            return fail(self.fail)
        return succeed(self.top if self.top is not None else max(self.items, default=0))

    def read_stream(
        self, after: int, upto: int, limit: int, skip: Any = ()
    ) -> Deferred[list[Envelope]]:
        self.skipped.append(list(skip))
        out = [self.items[p] for p in sorted(self.items) if after < p <= upto and p not in skip]
        return succeed(out[:limit])


class Sink:
    """What ``realm.sessions.route`` is given."""

    def __init__(self) -> None:
        self.routed: list[tuple[int, tuple[str, ...]]] = []

    def route(self, env: Envelope, users: Any) -> None:
        self.routed.append((env.pos, tuple(users)))


class Realm:
    realm = "x"

    def __init__(self) -> None:
        self.sessions = Sink()
        self.groups = Groups(100, 100, "x")
        self.group_handler = GroupHandler(self)  # type: ignore[arg-type]
        self.conversations: list[tuple[str, str]] = []
        self.presence = self
        self.bursts = 0

    def realms_of(self, users: Any) -> set[str]:
        return set()  # (no federation)

    def new_conversation(self, a: str, b: str) -> None:
        self.conversations.append((a, b))

    def on_join(self, user: str, group: str) -> None:
        pass

    def begin_burst(self) -> None:
        self.bursts += 1

    def end_burst(self) -> None:
        pass


def reader(store: Store, realm: Realm, clock: Clock, **kw: Any) -> StreamReader:
    r = StreamReader(realm, store, clock, 1.0, **kw)
    r.start(0)
    return r


def test_a_held_back_commit_is_never_jumped_over() -> None:
    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    store.items[1] = item(1)
    store.items[3] = item(3)  # 2 is in flight on another writer: not safe past 1
    store.safe = 1
    r.wake(3)
    assert [p for p, _ in realm.sessions.routed] == [1]
    store.items[2] = item(2)  # committed late
    store.safe = 3
    clock.advance(1.0)  # the poll, without any wake-up
    assert [p for p, _ in realm.sessions.routed] == [1, 2, 3]
    assert r.delivered == 3
    r.wake(3)  # a late wake-up for what is delivered: nothing more
    assert [p for p, _ in realm.sessions.routed] == [1, 2, 3]
    r.stop()
    assert not clock.getDelayedCalls()


def test_catch_up_waits_for_what_was_acknowledged_above_a_commit_in_flight() -> None:
    """A group created on another worker (committed at 3, acknowledged) above a commit
    still in flight at 2: a join checked here must see the group, so catch_up waits
    past 3, not only to the safe position (1).  It fired at once before."""
    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    store.items[1] = item(1)
    store.items[3] = item(3)
    store.safe = 1
    r.wake(3)
    assert r.delivered == 1
    done: list[Any] = []
    r.catch_up().addBoth(done.append)
    assert done == []
    store.safe = 3  # 2 was rolled back: nothing wakes the reader but its poll
    clock.advance(1.0)
    assert done == [None]
    assert [p for p, _ in realm.sessions.routed] == [1, 3]
    assert fired(r.catch_up()) is None  # nothing above what is delivered: at once
    r.stop()


def test_own_items_wait_for_the_safe_position_and_keep_their_audience() -> None:
    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    mine = item(2, "a@x", "c@x")
    store.items[2] = mine
    store.safe = 0  # someone else's 1 is in flight
    r.committed(mine, ["a@x", "c@x"])
    assert realm.sessions.routed == []
    store.items[1] = item(1)
    store.safe = 2
    r.wake(2)
    assert realm.sessions.routed == [(1, ("b@x", "a@x")), (2, ("c@x", "a@x"))]
    assert store.skipped[-1] == [2]  # its own item is not read back
    # someone else's private item makes its two ends presence partners here
    assert realm.conversations == [("a@x", "b@x")]
    r.stop()


def test_until_routed_fires_once_the_stream_routed_the_position() -> None:
    """A worker's own commit reaches its sessions from the stream, once safe: a
    gateway whose reply is that item (IRC's JOIN) waits for until_routed."""
    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    mine = item(2, "a@x", "c@x")
    store.items[2] = mine
    r.committed(mine, ["a@x", "c@x"])  # (1 is in flight elsewhere: safe stays 0)
    done: list[Any] = []
    r.until_routed(2).addBoth(done.append)  # type: ignore[union-attr]
    assert done == [] and realm.sessions.routed == []
    store.items[1] = item(1)
    store.safe = 2
    clock.advance(1.0)  # the poll
    assert done == [None]
    assert [p for p, _ in realm.sessions.routed] == [1, 2]
    assert r.until_routed(2) is None and r.until_routed(1) is None  # routed: at once
    r.stop()


def test_store_failure_is_reported_once_and_recovery_too() -> None:
    store, realm, clock = Store(), Realm(), Clock()
    seen: list[Any] = []
    r = reader(store, realm, clock, on_error=seen.append, on_ok=lambda: seen.append("ok"))
    store.fail = RuntimeError("server closed the connection")
    r.wake()
    clock.advance(1.0)
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
    waiting = r.catch_up()
    assert waiting.called  # fails at once: the store does not answer
    waiting.addErrback(lambda f: seen.append(f.type))
    store.fail = None
    store.items[1] = item(1)
    store.safe = 1
    clock.advance(1.0)
    assert seen[1:] == [RuntimeError, "ok"]
    assert [p for p, _ in realm.sessions.routed] == [1]
    r.stop()


def test_catch_up_waits_for_the_stream() -> None:
    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    store.items[1] = item(1)
    store.safe = 1
    done = r.catch_up()
    assert done.called  # read at once
    assert r.delivered == 1
    r.stop()


def test_group_events_of_other_workers_are_applied_in_order() -> None:
    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    create = Envelope("e1", "event", "a@x", "#g@x", 1.0, "", {"event": "created"}, pos=1)
    joined = {"event": "joined", "user": "b@x"}
    join = Envelope("e2", "event", "b@x", "#g@x", 1.0, "", joined, pos=2)
    text = Envelope("t3", "text", "a@x", "#g@x", 1.0, "hi", pos=3)
    store.items.update({1: create, 2: join, 3: text})
    store.safe = 3
    r.wake()
    assert realm.groups.groups["#g@x"].members.keys() >= {"a@x", "b@x"}
    assert set(realm.sessions.routed[2][1]) == {"a@x", "b@x"}


class Mind:
    def __init__(self) -> None:
        self.notices: list[dict[str, Any]] = []

    def notify(self, notice: Any) -> None:
        self.notices.append(notice.data)


class OnlineSession:
    def __init__(self, user: str) -> None:
        self.user_id = user
        self.mind = Mind()
        self._syncing = False


def presence_pair() -> tuple[ClusterPresence, list[str], OnlineSession]:
    limits = configmod.Limits()
    sessions = Sessions(limits)
    groups = Groups(100, 100, "x")
    published: list[str] = []
    p = ClusterPresence(
        "x",
        sessions,
        groups,
        None,
        lambda: None,
        lambda users: set(),
        worker="w1",
        publish=published.append,
    )
    alice = OnlineSession("alice@x")
    sessions.online["alice@x"] = [alice]  # type: ignore[list-item]
    p.partners["alice@x"] = {"bob@x"}
    return p, published, alice


def test_presence_heard_from_another_worker() -> None:
    p, published, alice = presence_pair()
    p.heard(json.dumps({"w": "w2", "u": "bob@x", "d": 1}))
    assert p.of("bob@x") == ("online", "")
    assert p.is_online("bob@x") and p.online_count() == 1
    p.heard(json.dumps({"w": "w2", "u": "bob@x", "s": "away", "t": "lunch"}))
    assert alice.mind.notices[-1] == {
        "type": "presence",
        "user": "bob@x",
        "status": "away",
        "text": "lunch",
    }
    assert p.who() == [{"user": "bob@x", "sessions": 1, "status": "away", "text": "lunch"}]
    p.heard(json.dumps({"w": "w1", "u": "bob@x", "d": 5}))  # our own: ignored
    p.heard("not json")
    p.heard(json.dumps({"w": 1}))
    assert p.who()[0]["sessions"] == 1
    # w2 dies: its part of the directory is gone at the next heartbeat
    p.directory({"w1": {"alice@x": 1}})
    assert p.of("bob@x") == ("offline", "")
    assert alice.mind.notices[-1] == {"type": "presence", "user": "bob@x", "status": "offline"}
    assert published == []  # nothing of ours changed


def test_presence_offline_is_not_said_while_online_elsewhere() -> None:
    p, published, _ = presence_pair()
    p.heard(json.dumps({"w": "w2", "u": "alice@x", "d": 1}))
    p.broadcast("alice@x", "offline", "")
    assert published == []
    p.broadcast("alice@x", "busy", "")
    assert json.loads(published[-1]) == {"w": "w1", "u": "alice@x", "s": "busy", "t": ""}


def test_directory_repairs_a_missed_message_and_drops_after_two_misses() -> None:
    p, _, _ = presence_pair()
    p.directory({"w2": {"bob@x": 2}})  # no message said so: added
    assert p.who(["bob@x"])[0]["sessions"] == 2
    p.directory({"w2": {}})  # missing once: kept (the message may be on its way)
    assert p.is_online("bob@x")
    p.directory({"w2": {}})
    assert not p.is_online("bob@x")


def test_nonce_ids_are_stable_and_per_user() -> None:
    a = nonce_id("x", "a@x", "n1")
    assert a == nonce_id("x", "a@x", "n1")
    assert a != nonce_id("x", "b@x", "n1") != nonce_id("x", "a@x", "n2")
    assert len(a) == 35 and int(a, 16) >= 0


def test_worker_option_and_cluster_checks(tmp_path: Any) -> None:
    pg = tmp_path / "pg.toml"
    pg.write_text('[storage]\nbackend = "postgresql"\ndsn = "host=127.0.0.1 dbname=x"\n')
    opts = tap.Options()
    opts.parseOptions(["--config", str(pg), "--worker", "w1"])
    cfg = opts.realm_config
    assert cfg.worker == "w1"
    assert cfg.control_socket.endswith("control.sock.w1")
    with pytest.raises(usage.UsageError, match="--worker needs the PostgreSQL store"):
        tap.Options().parseOptions(["--worker", "w1"])
    with pytest.raises(usage.UsageError, match="--worker: a name of 1-32"):
        tap.Options().parseOptions(["--config", str(pg), "--worker", "W 1"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nredis = "localhost"\n')
    with pytest.raises(usage.UsageError, match=r"cluster\.redis must be HOST:PORT"):
        tap.Options().parseOptions(["--config", str(bad)])
    shared = tmp_path / "files"
    cfg.cluster.files_dir = str(shared)
    assert cfg.files_path == str(shared)


def test_shared_ports_take_several_listeners() -> None:
    from twisted.internet.endpoints import serverFromString

    factory = Factory.forProtocol(Protocol)
    first = listen_shared(
        serverFromString(_reactor, "tcp:0:interface=127.0.0.1"), factory, _reactor
    )
    assert first is not None
    port = first.getHost().port
    second = listen_shared(
        serverFromString(_reactor, f"tcp:{port}:interface=127.0.0.1"), factory, _reactor
    )
    assert second is not None and second.getHost().port == port
    # without SO_REUSEPORT the port is taken
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", port))
    assert listen_shared(serverFromString(_reactor, "unix:/tmp/x.sock"), factory, _reactor) is None
    first.stopListening()
    second.stopListening()


def test_login_throttle_changes_are_told_and_applied_quietly() -> None:
    from chatproto.ratelimit import FailureThrottle

    told: list[tuple[str, str, float]] = []
    mine = FailureThrottle(1, 10.0, 60.0, 300.0)
    mine.listener = lambda *change: told.append(change)
    mine.failed("eve", 100.0)
    mine.succeeded("eve")
    assert told == [("failed", "eve", 100.0), ("succeeded", "eve", 0.0)]
    other = FailureThrottle(1, 10.0, 60.0, 300.0)
    other.listener = lambda *change: told.append(change)
    other.apply("failed", "eve", 100.0)  # what another worker reported
    other.apply("failed", "eve", 101.0)
    assert other.wait("eve", 101.0) == 10.0
    assert len(told) == 2  # applying tells nobody (no echo back over the bus)
    other.apply("succeeded", "eve", 0.0)
    assert other.wait("eve", 101.0) == 0.0


def test_a_full_page_delivers_own_items_only_up_to_its_end() -> None:
    from chatproto.cluster import stream

    store, realm, clock = Store(), Realm(), Clock()
    r = reader(store, realm, clock)
    page, stream.PAGE = stream.PAGE, 2
    try:
        for p in (1, 3, 5):
            store.items[p] = item(p)
        for p in (2, 4, 6):
            store.items[p] = item(p, "c@x", "d@x")
            r._mine[p] = (store.items[p], ("c@x",))
        store.safe = 6
        r.wake()
    finally:
        stream.PAGE = page
    assert [p for p, _ in realm.sessions.routed] == [1, 2, 3, 4, 5, 6]
    assert store.skipped == [[2, 4, 6], [4, 6]]
    r.stop()


class OneAtATimeBus:
    """A bus whose group lock cannot be waited for: a second request while it is
    held fails as a lock that "stays taken" would."""

    def __init__(self) -> None:
        self.held = False
        self.requests = 0

    def lock(self, name: str) -> Deferred[str]:
        from twisted.internet.defer import fail

        from chatproto.cluster.bus import BusUnavailable

        self.requests += 1
        if self.held:
            return fail(BusUnavailable(f"the cluster lock {name} stays taken"))
        self.held = True
        return succeed("token")

    def unlock(self, name: str, token: str) -> None:
        self.held = False


class CaughtUp:
    def catch_up(self) -> Deferred[None]:
        return succeed(None)


class FakeWorker:
    def __init__(self) -> None:
        self.bus = OneAtATimeBus()
        self.stream = CaughtUp()

    def problem(self) -> None:
        return None


@pytest_twisted.inlineCallbacks
def test_a_crowd_of_joins_asks_the_cluster_lock_one_at_a_time(realm: Any) -> Any:
    """40 joins of one group arriving together on one worker queue on the worker,
    and ask Redis for the group's lock one after the other: none waits for the lock
    behind its own worker's other joins (they failed with ``unavailable`` when each
    polled Redis on its own)."""
    from twisted.internet import defer

    from chatproto.cluster.worker import ClusterGroupHandler

    worker = FakeWorker()
    handler = ClusterGroupHandler(realm, worker)  # type: ignore[arg-type]
    realm.group_handler = handler
    names = [f"u{i}" for i in range(40)]
    for name in ["owner", *names]:
        yield realm.create_user(name, "correct horse")
    yield handler.change("owner@localhost", "created", "#crowd", {})
    joins = [handler.change(f"{n}@localhost", "joined", "#crowd", {}) for n in names]
    results = yield defer.DeferredList(joins, consumeErrors=True)
    failures = [r.getErrorMessage() for ok, r in results if not ok]
    assert failures == []
    assert worker.bus.requests == 41
    assert len(realm.groups.groups["#crowd@localhost"].members) == 41


class SlowRedis:
    """The command connection of a RedisBus, answering when the test says."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def execute_command(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


def slow_bus(clock: Clock, changes: list[bool]) -> tuple[Any, SlowRedis]:
    from chatproto.cluster.bus import RedisBus

    bus = RedisBus("127.0.0.1:6379", "p", "w1", clock, heartbeat=1.0, on_change=changes.append)
    redis = SlowRedis()
    bus._conn = redis
    bus._subscriber = object()  # subscribed: the bus is up once a heartbeat says so
    bus._set_up(True)
    return bus, redis


def test_a_late_answer_from_redis_is_not_an_outage_but_silence_is() -> None:
    """Three workers on two cores: Redis's answer to one command can come after its
    timeout.  That command fails, but the bus stays up (sends go on) until Redis
    has answered nothing for ``grace`` seconds; then it is down."""
    from chatproto.cluster.bus import BusUnavailable

    clock, changes = Clock(), []
    bus, redis = slow_bus(clock, changes)
    assert bus.grace == 3.0
    errors: list[Any] = []
    late = bus.command("SET", "k", "v")
    late.addErrback(errors.append)
    clock.advance(1.0)  # no answer within the timeout
    assert errors and errors[0].check(BusUnavailable)
    assert bus.up and changes == [True]
    answered = bus.command("PING")
    clock.advance(0.5)
    redis.pending[1].callback("PONG")
    assert fired(answered) == "PONG" and bus.up
    for _ in range(2):  # silent since 1.5 s: 2.5 s and 3.5 s are within the grace
        bus.command("PING").addErrback(lambda _: None)
        clock.advance(1.0)
        assert bus.up
    bus.command("PING").addErrback(lambda _: None)
    clock.advance(1.0)  # 4.5 s: three seconds without an answer
    assert not bus.up and changes == [True, False]
    assert clock.getDelayedCalls() == []


def test_a_refused_connection_is_an_outage_at_once() -> None:
    from twisted.internet.error import ConnectionRefusedError

    clock, changes = Clock(), []
    bus, redis = slow_bus(clock, changes)
    d = bus.command("PING")
    d.addErrback(lambda _: None)
    redis.pending[0].errback(ConnectionRefusedError())
    assert not bus.up and changes == [True, False]
    assert clock.getDelayedCalls() == []


def test_user_buckets_fill_up_again_and_are_forgotten_then() -> None:
    from chatproto.ratelimit import UserBuckets

    limit = UserBuckets(rate=0.5, burst=2)
    assert [fired(limit.take("eve", 0.0)) for _ in range(3)] == [0.0, 0.0, 2.0]
    assert fired(limit.take("bob", 0.0)) == 0.0  # per key
    limit.prune(1.0)
    assert set(limit._buckets) == {"eve", "bob"}
    limit.prune(4.0)  # both full again
    assert limit._buckets == {}


class AnsweringBus:
    """A bus whose commands get the answers the test gives (or BusUnavailable)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.commands: list[tuple[Any, ...]] = []

    def key(self, *parts: str) -> str:
        return ":".join(("p", *parts))

    def command(self, *args: Any) -> Deferred[Any]:
        from twisted.internet.defer import fail

        from chatproto.cluster.bus import BusUnavailable

        self.commands.append(args)
        answer = self.answers.pop(0)
        if answer is None:
            return fail(BusUnavailable("Redis at x: gone"))
        return succeed(answer)


def test_redis_buckets_take_in_redis_and_count_alone_without_it() -> None:
    """A worker's report limit is one bucket per user in Redis (what Redis answers
    is the wait); while Redis does not answer, the worker counts on its own."""
    from chatproto.cluster.bus import RedisBuckets

    bus = AnsweringBus([b"0", b"119.5", None, None, None])
    limit = RedisBuckets(bus, "report", 1 / 120, 2)  # type: ignore[arg-type]
    assert fired(limit.take("eve@x", 10.0)) == 0.0
    assert fired(limit.take("eve@x", 10.5)) == 119.5
    name, _script, nkeys, key, *argv = bus.commands[0]
    assert (name, nkeys, key, argv) == ("EVAL", 1, "p:bucket:report:eve@x", [1 / 120, 2, 10.0])
    # Redis gone: this worker's own bucket (full at first), not a refusal
    assert [fired(limit.take("eve@x", 11.0)) for _ in range(3)] == [0.0, 0.0, 120.0]


def test_a_workers_register_limit_is_counted_in_redis_and_alone_without_it() -> None:
    """A worker counts the registrations of a client address in Redis (what Redis
    answers is the wait), so an address cannot register its allowance on each
    worker; while Redis does not answer the worker counts on its own.  A refused
    registration costs no hash."""
    from chatproto.cluster.bus import RedisBuckets
    from chatproto.errors import ChatError
    from chatproto.testing import make_test_realm

    clock = Clock()
    clock.advance(1000)
    realm = make_test_realm(clock)
    burst = realm.config.auth.registrations_per_address
    rate = 1 / realm.config.auth.registration_interval
    accounts = realm.accounts
    hashes: list[str] = []
    hash_password = accounts.hasher.hash
    accounts.hasher.hash = lambda pw: (hashes.append(pw), hash_password(pw))[1]  # type: ignore[method-assign]
    bus = AnsweringBus([b"0", b"29.5"] + [None] * (burst + 1))
    accounts.register_limit = RedisBuckets(bus, "register", rate, burst)  # type: ignore[arg-type]
    assert str(fired(realm.register("ann", "password1", "192.0.2.1"))) == "ann@localhost"
    name, _script, nkeys, key, *argv = bus.commands[0]
    assert (name, nkeys, key, argv) == (
        "EVAL",
        1,
        "p:bucket:register:192.0.2.1",
        [rate, burst, 1000.0],
    )
    with pytest.raises(ChatError) as refused:
        fired(realm.register("bea", "password1", "192.0.2.1"))
    assert refused.value.code == "rate_limited"
    assert refused.value.extra["retry_after"] == 29.5
    assert hashes == ["password1"]
    # a name taken asks Redis nothing
    with pytest.raises(ChatError):
        fired(realm.register("ann", "password1", "192.0.2.1"))
    assert len(bus.commands) == 2
    # Redis gone: this worker's own allowance (full at first), not a refusal
    for n in range(burst):
        assert str(fired(realm.register(f"c{n}", "password1", "192.0.2.1"))) == f"c{n}@localhost"
    with pytest.raises(ChatError) as refused:
        fired(realm.register("dee", "password1", "192.0.2.1"))
    assert refused.value.code == "rate_limited"
    assert realm.stats.refused["register"] == 2
    assert bus.answers == []


def test_a_sender_woken_while_a_commit_held_the_outbox_back_looks_again(tmp_path: Any) -> None:
    """The federation sender reads no outbox row above the safe outbox position.  A
    link woken while another worker's commit is in flight (say one that only stores
    acks: it queues nothing, so no wake-up follows it) would leave a row committed
    above that position unsent until the next item for its realm; the sender looks
    again RECHECK seconds later, as long as a commit held the position back."""
    from types import SimpleNamespace

    from chatproto.cluster.federation import SendingFederation
    from chatproto.tls import write_dev_certs

    clock = Clock()
    cfg = configmod.Config(realm="a.test", data_dir=str(tmp_path))
    cfg.federation.enabled = True
    certs = write_dev_certs(str(tmp_path / "certs"), "a.test")
    cfg.federation.certificate, cfg.federation.private_key = certs["cert"], certs["key"]
    cfg.federation.ca = certs["ca"]

    class HeldStore:
        outbox_held = True

        def safe_position(self) -> Deferred[int]:
            return succeed(0)

    realm = SimpleNamespace(realm="a.test", config=cfg, store=HeldStore())
    fed = SendingFederation(realm, clock, clock)
    woken: list[str] = []
    fed.link = lambda peer: SimpleNamespace(wake=lambda n: woken.append(peer))  # type: ignore[method-assign]
    fed.running = True
    fed.wake("b.test")
    fed.wake("b.test")  # one look again a realm at a time
    assert woken == ["b.test", "b.test"]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(SendingFederation.RECHECK)
    assert woken == ["b.test"] * 3  # held still: again later
    realm.store.outbox_held = False
    clock.advance(SendingFederation.RECHECK)
    assert woken == ["b.test"] * 4
    assert clock.getDelayedCalls() == []  # no longer held: no more


def test_a_delete_of_another_worker_rechecks_the_downloads_here() -> None:
    """A worker stopped its own downloads of a file it deleted, but the downloads of
    that file on other workers went on to the end.  Now a worker that routes another
    worker's delete has the realm's files check their downloads in progress (once per
    page of items); its own deletes and other items do not."""

    class Files:
        def __init__(self) -> None:
            self.rechecks = 0

        def recheck(self) -> Deferred[None]:
            self.rechecks += 1
            return succeed(None)

    store, realm, clock = Store(), Realm(), Clock()
    realm.files = files = Files()  # type: ignore[attr-defined]
    r = reader(store, realm, clock)
    ref = {"ref": "id1"}
    own = Envelope("d3", "delete", "a@x", "b@x", 1.0, "", ref, pos=3)
    store.items.update({1: item(1), 2: item(2)})
    store.safe = 2
    r.wake()
    assert files.rechecks == 0
    r.committed(own, ["a@x", "b@x"])
    store.items[3] = own
    store.safe = 3
    r.wake()
    assert files.rechecks == 0  # (this worker withdrew them when it committed it)
    for pos in (4, 5):
        store.items[pos] = Envelope(f"d{pos}", "delete", "a@x", "b@x", 1.0, "", ref, pos=pos)
    store.safe = 5
    r.wake()
    assert files.rechecks == 1 and r.delivered == 5
