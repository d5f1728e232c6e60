"""A realm on several worker processes (issue 16): real ``twistd`` workers on the
tests' PostgreSQL (a schema of the test's own) and Redis (a key prefix of its own, or
a ``redis-server`` the test starts and kills), clients over loopback TCP.

Skipped only when PostgreSQL or Redis is absent and CI is unset.
"""

from __future__ import annotations

import re
import shutil
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.protocols.basic import LineOnlyReceiver

from chatproto import client
from chatproto.client import RemoteError
from chatproto.config import Config
from tests.processes import Proc, Spawner, twistd_argv
from tests.services import (
    free_port,
    pg_schema,
    postgresql_or_skip,
    redis_drop_prefix,
    redis_or_skip,
    redis_prefix,
)

PASSWORD = "correct horse"
#: Seconds a worker (or Redis) of these tests may live: a whole test's scenario on a
#: loaded machine, not one step of it.
LIFETIME = 180.0

_OWN = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(tcp:0:interface=127\.0\.0\.1\)")
#: A worker's web listener (its own port; the backlog only tells it apart in the log).
_WEB_LISTEN = "tcp:0:interface=127.0.0.1:backlog=49"
_WEB = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(" + re.escape(_WEB_LISTEN) + r"\)")


def _config(
    dsn: str,
    schema: str,
    redis: str,
    prefix: str,
    shared: int,
    control: bool = False,
    web: bool = False,
) -> str:
    web_listen = f'[web]\nlisten = ["{_WEB_LISTEN}"]\n' if web else ""
    return f"""\
{web_listen}
[realm]
listen = ["tcp:{shared}:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]

[auth]
argon2_time_cost = 1
argon2_memory_cost = 1024
argon2_parallelism = 1
free_failures_per_account = 2
failure_delay = 30.0

[limits]
send_rate = 100000.0
send_burst = 100000

[storage]
backend = "postgresql"
dsn = "{dsn}"
schema = "{schema}"

[control]
enabled = {"true" if control else "false"}

[cluster]
redis = "{redis}"
redis_prefix = "{prefix}"
poll_interval = 0.5
heartbeat = 0.5
connect_timeout = 2.0
"""


class Cluster:
    """Workers of one realm, started in ``tmp_path`` (killed at teardown)."""

    def __init__(
        self, tmp_path: Any, redis: str, prefix: str, control: bool = False, web: bool = False
    ) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.prefix = prefix
        self.shared = free_port()
        self.config = tmp_path / "realm.toml"
        self.config.write_text(
            _config(postgresql_or_skip(), pg_schema(), redis, prefix, self.shared, control, web)
        )
        self.spawner = Spawner(str(tmp_path), lifetime=LIFETIME)
        self.procs: dict[str, Proc] = {}

    @defer.inlineCallbacks
    def start(self, name: str) -> Any:
        """Start worker ``name``; fires with its own address (``tcp:...``)."""
        argv = [*twistd_argv(), "-n", "--pidfile=", "chatrealm", "--config", str(self.config)]
        argv += ["--data-dir", str(self.tmp_path / "data"), "--worker", name]
        proc = self.spawner(argv)
        self.procs[name] = proc
        own = yield proc.wait_for(_OWN.pattern)
        yield proc.wait_for(re.escape(f"cluster: worker {name} of realm localhost started"))
        return f"tcp:127.0.0.1:{own.group(1)}"


@pytest.fixture
def cluster(tmp_path: Any) -> Any:
    redis = redis_or_skip()
    prefix = redis_prefix()
    c = Cluster(tmp_path, redis, prefix)
    yield c
    pytest_twisted.blockon(c.spawner.close())
    redis_drop_prefix(redis, prefix)


class Client:
    """A logged-in user collecting what they receive (messages and presence)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.received: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []
        self.notices: list[dict[str, Any]] = []
        self.conn: Any = None

    @defer.inlineCallbacks
    def connect(self, server: str, register: bool = False, since: int | None = None) -> Any:
        self.conn = yield client.connect(
            _reactor,
            server,
            self.user,
            PASSWORD,
            register=register,
            since=since,
            on_message=self.received.append,
            on_presence=self.presence.append,
            on_notice=self.notices.append,
        )
        yield self.conn.synced
        return self

    def bodies(self, sender: str | None = None, to: str | None = None) -> list[str]:
        return [
            m["body"]
            for m in self.received
            if m.get("kind") == "text"
            and (sender is None or m.get("from") == sender)
            and (to is None or m.get("to") == to)
        ]


def ctl_status(cluster: Cluster) -> str:
    """``chatrealmctl --config realm.toml cluster status``, its output."""
    return ctl(cluster, "cluster", "status")


def ctl(cluster: Cluster, *args: str) -> str:
    """``chatrealmctl --config realm.toml ARGS...`` (must succeed), its output."""
    import contextlib
    import io

    from chatproto import ctl

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        argv = ["--config", str(cluster.config), "--data-dir", str(cluster.tmp_path / "data")]
        code = ctl.main([*argv, *args])
    assert code == 0, out.getvalue()
    return out.getvalue()


def until(
    predicate: Any, what: str, timeout: float = 20.0, info: Any = None
) -> defer.Deferred[None]:
    @defer.inlineCallbacks
    def poll() -> Any:
        for _ in range(int(timeout / 0.02)):
            if predicate():
                return
            yield task.deferLater(_reactor, 0.02, lambda: None)
        raise AssertionError(f"timed out waiting until {what}: {info() if info else ''}")

    return poll()


@pytest_twisted.inlineCallbacks
def test_two_workers_dms_groups_presence_and_a_worker_killed(cluster: Cluster) -> Any:
    w1 = yield cluster.start("w1")
    w2 = yield cluster.start("w2")  # on the same shared port: SO_REUSEPORT
    alice = yield Client("alice").connect(w1, register=True)
    dave = yield Client("dave").connect(w1, register=True)
    bob = yield Client("bob").connect(w2, register=True)
    carol = yield Client("carol").connect(w2, register=True)
    frank = yield Client("frank").connect(w1, register=True)  # stays on w1

    # DMs across workers, both ways, in order and once.
    for i in range(10):
        yield alice.conn.send("bob@localhost", f"a->b {i}")
        yield bob.conn.send("alice@localhost", f"b->a {i}")
    want_ab = [f"a->b {i}" for i in range(10)]
    want_ba = [f"b->a {i}" for i in range(10)]
    yield until(lambda: bob.bodies("alice@localhost") == want_ab, "bob has alice's DMs")
    yield until(lambda: alice.bodies("bob@localhost") == want_ba, "alice has bob's DMs")
    for c in (alice, bob):
        positions = [m["pos"] for m in c.received]
        assert positions == sorted(set(positions)), "in position order, once each"

    # A group whose members sit on both workers: fan-out spans them.
    yield alice.conn.create_group("#team")
    for c in (bob, carol, dave, frank):
        yield c.conn.join("#team")
    yield alice.conn.send("#team", "hello team")
    for c in (alice, bob, carol, dave, frank):
        yield until(
            lambda c=c: c.bodies(to="#team@localhost") == ["hello team"],
            f"{c.user} has the group message",
            info=lambda c=c: c.received[-3:],
        )

    # Presence crosses workers: bob (w2) goes away, alice (w1) hears it and sees him.
    yield bob.conn.set_status("away", "lunch")
    yield until(
        lambda: any(
            p.get("user") == "bob@localhost" and p.get("status") == "away" for p in alice.presence
        ),
        "alice hears bob is away",
    )
    # Ephemeral notices cross workers: bob (w2) typing to alice (w1).
    yield bob.conn.protocol.request("typing", **{"with": "alice@localhost", "typing": True})
    yield until(
        lambda: any(
            n.get("type") == "typing" and n.get("user") == "bob@localhost" for n in alice.notices
        ),
        "alice sees bob typing",
    )
    # ... and in a group (carol on w2; alice and frank on w1), and read markers: alice
    # (w1) reads bob's DMs, bob (w2) gets her read receipt and then her marker in
    # the conversation list (once w1's group commit has stored it).
    yield carol.conn.typing("#team")
    for c in (alice, frank):
        yield until(
            lambda c=c: any(
                n.get("type") == "typing" and n.get("with") == "#team@localhost" for n in c.notices
            ),
            f"{c.user} sees carol typing in #team",
        )
    last = max(m["pos"] for m in alice.received if m.get("from") == "bob@localhost")
    yield alice.conn.mark_read("bob@localhost", last)
    receipt = {"type": "read", "with": "alice@localhost", "user": "alice@localhost", "pos": last}
    yield until(lambda: receipt in bob.notices, "bob gets alice's read receipt")

    @defer.inlineCallbacks
    def peer_read() -> Any:
        listed = yield bob.conn.conversations()
        by = {c["with"]: c for c in listed["conversations"]}
        return by["alice@localhost"].get("peer_read")

    for _ in range(500):
        if (yield peer_read()) == last:
            break
        yield task.deferLater(_reactor, 0.02, lambda: None)
    assert (yield peer_read()) == last, "bob's conversation list has alice's marker"
    online = yield alice.conn.who()
    users = {u["user"]: u for u in online}
    assert {"alice@localhost", "bob@localhost", "carol@localhost", "dave@localhost"} <= set(users)
    assert users["bob@localhost"].get("status") == "away"

    # Failed logins on one worker count on the other (the login throttles are
    # shared).  eve fails three times on w1; then alice (w1) changes her status, and
    # once bob (w2) has heard that, w2 has heard the failures too (one publisher, one
    # subscriber: in order): eve's next attempt there is throttled at once (w2 alone
    # would have counted no failure and answered auth_failed).  (eve registers from
    # another address: 127.0.0.1 has spent its allowance of registrations.)
    eve = yield client.connect(
        _reactor, f"{w1}:bindAddress=127.0.0.2", "eve", PASSWORD, register=True
    )
    yield eve.close()
    for _ in range(3):
        with pytest.raises(RemoteError) as failed:
            yield client.connect(_reactor, w1, "eve", "wrong password")
        assert failed.value.code == "auth_failed"
    yield alice.conn.set_status("busy")
    yield until(
        lambda: any(
            p.get("user") == "alice@localhost" and p.get("status") == "busy" for p in bob.presence
        ),
        "bob hears alice is busy",
    )
    with pytest.raises(RemoteError) as failed:
        yield client.connect(_reactor, w2, "eve", "wrong password")
    assert failed.value.code == "rate_limited"

    # Two workers asked to create one group at the same instant: one at a time
    # across the cluster, so exactly one create succeeds.
    for round_ in range(3):
        name = f"#race{round_}"
        results = yield defer.DeferredList(
            [alice.conn.create_group(name), bob.conn.create_group(name)], consumeErrors=True
        )
        ok = [r for good, r in results if good]
        errors = [r.value.code for good, r in results if not good]
        assert len(ok) == 1 and errors == ["group_exists"], (ok, errors)

    # A file: uploaded on w1, its message reaches bob on w2, who downloads it from w2
    # (the workers share the file directory).
    src = cluster.tmp_path / "notes.txt"
    src.write_bytes(b"shared bytes\n" * 1000)
    sent_file = yield alice.conn.send_file("bob@localhost", str(src))
    yield until(
        lambda: any(m.get("kind") == "file" for m in bob.received), "bob has the file message"
    )
    [file_msg] = [m for m in bob.received if m.get("kind") == "file"]
    assert file_msg["meta"]["file_id"] == sent_file["file"]
    dest = cluster.tmp_path / "got.txt"
    yield bob.conn.download(file_msg["meta"]["file_id"], str(dest))
    assert dest.read_bytes() == src.read_bytes()

    # chatrealmctl cluster status: both workers, their sessions, no lag once idle.
    status = ""

    def both_listed() -> bool:
        nonlocal status
        status = ctl_status(cluster)
        return bool(re.search(r"^w1 .* 3 +3 +\d+ +0 +ok", status, re.M)) and bool(
            re.search(r"^w2 .* 2 +2 +\d+ +0 +ok", status, re.M)
        )

    yield until(both_listed, "cluster status lists both workers", info=lambda: status)
    assert re.search(r"^w1 +\d+ +no ", status, re.M), status  # the writers' table

    # w1 is killed while alice sends (a nonce each) to bob and to the group.
    sent: list[str] = []
    acked: set[str] = set()

    @defer.inlineCallbacks
    def traffic() -> Any:
        i = 0
        while True:
            body = f"burst {i}"
            sent.append(body)
            to = "#team" if i % 3 == 0 else "bob@localhost"
            try:
                yield alice.conn.send(to, body, nonce=f"n{i}")
            except Exception:
                return
            acked.add(body)
            i += 1

    running = traffic()
    yield until(lambda: len(acked) >= 30, "traffic is flowing")
    cluster.procs["w1"].kill()
    assert (yield cluster.procs["w1"].ended) == -signal.SIGKILL
    yield running
    # alice and dave reconnect to w2 and resume; alice sends what was not acked again,
    # with the same nonces.
    yield alice.conn.protocol.closed_d
    alice_since, dave_since = alice.conn.last_pos, dave.conn.last_pos
    yield alice.connect(w2, since=alice_since)
    yield dave.connect(w2, since=dave_since)
    for i, body in enumerate(sent):
        if body not in acked:
            to = "#team" if i % 3 == 0 else "bob@localhost"
            yield alice.conn.send(to, body, nonce=f"n{i}")
    to_bob = [b for i, b in enumerate(sent) if i % 3 != 0]
    to_team = ["hello team"] + [b for i, b in enumerate(sent) if i % 3 == 0]
    yield until(
        lambda: bob.bodies("alice@localhost", "bob@localhost")[10:] == to_bob,
        "bob has every DM",
        info=lambda: (bob.bodies("alice@localhost", "bob@localhost")[10:], to_bob),
    )
    for c in (bob, carol, dave, alice):
        yield until(lambda c=c: c.bodies(to="#team@localhost") == to_team, f"{c.user}'s group")
    # frank was only on w1: once w1's heartbeats stop, w2 tells bob he is offline
    yield until(
        lambda: any(
            p.get("user") == "frank@localhost" and p.get("status") == "offline"
            for p in bob.presence
        ),
        "bob hears frank (on the dead worker) is offline",
    )
    online = yield bob.conn.who()
    assert "frank@localhost" not in {u["user"] for u in online}
    assert bob.bodies("alice@localhost", "bob@localhost") == want_ab + to_bob  # once each
    # what alice's own stream shows after the resume: once each, in order
    positions = [m["pos"] for m in alice.received]
    assert positions == sorted(set(positions))
    assert all(c.conn.protocol.connected for c in (bob, carol))  # w2's never noticed
    assert "Traceback" not in cluster.procs["w2"].output, cluster.procs["w2"].output


@pytest_twisted.inlineCallbacks
def test_redis_lost_and_back(tmp_path: Any) -> Any:
    """A Redis of the test's own is killed mid-traffic: sends are refused with
    ``unavailable`` and connections stay; once it is back, sends are accepted again
    and every acknowledged message is delivered once, in order."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis_or_skip()  # txredisapi
    port = free_port()
    spawner = Spawner(str(tmp_path), lifetime=LIFETIME)

    @defer.inlineCallbacks
    def start_redis() -> Any:
        proc = spawner(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
        )
        yield proc.wait_for("Ready to accept connections")
        return proc

    redis = yield start_redis()
    cluster = Cluster(tmp_path, f"127.0.0.1:{port}", redis_prefix())
    try:
        w1 = yield cluster.start("w1")
        w2 = yield cluster.start("w2")
        alice = yield Client("alice").connect(w1, register=True)
        bob = yield Client("bob").connect(w2, register=True)
        acked: list[str] = []
        for i in range(5):
            yield alice.conn.send("bob@localhost", f"before {i}", nonce=f"b{i}")
            acked.append(f"before {i}")

        redis.kill()
        yield redis.ended
        # The workers notice at once (their subscribing connection drops).
        refused = None
        for i in range(200):
            try:
                yield alice.conn.send("bob@localhost", f"during {i}", nonce=f"d{i}")
                acked.append(f"during {i}")
            except RemoteError as e:
                refused = e
                break
            yield task.deferLater(_reactor, 0.02, lambda: None)
        assert refused is not None and refused.code == "unavailable", refused
        assert "Redis" in str(refused)
        try:  # without a nonce (the batched send path) too
            yield alice.conn.send("bob@localhost", "plain")
        except RemoteError as e:
            assert e.code == "unavailable"
        else:
            raise AssertionError("a send without a nonce was taken while Redis was lost")
        assert alice.conn.protocol.connected and bob.conn.protocol.connected
        # committed before the refusals: delivered from the store, without the bus
        yield until(lambda: bob.bodies() == acked, "bob has what was acked (store poll)")

        redis = yield start_redis()
        n = 0
        while True:  # bounded: until() below would fail the test first
            try:
                yield alice.conn.send("bob@localhost", f"after {n}", nonce=f"a{n}")
                acked.append(f"after {n}")
                n += 1
            except RemoteError as e:
                assert e.code == "unavailable"
                yield task.deferLater(_reactor, 0.05, lambda: None)
                continue
            if n == 5:
                break
        yield until(lambda: bob.bodies() == acked, "bob has everything acked, once")
        positions = [m["pos"] for m in bob.received]
        assert positions == sorted(set(positions))
        for proc in cluster.procs.values():
            assert "Traceback" not in proc.output, proc.output
    finally:
        yield cluster.spawner.close()
        yield spawner.close()


@pytest_twisted.inlineCallbacks
def test_worker_without_redis_or_postgresql_says_which_and_exits(tmp_path: Any) -> Any:
    redis_or_skip()
    dead = free_port()
    cluster = Cluster(tmp_path, f"127.0.0.1:{dead}", redis_prefix())
    argv = [*twistd_argv(), "-n", "--pidfile=", "chatrealm", "--config", str(cluster.config)]
    argv += ["--data-dir", str(tmp_path / "data"), "--worker", "w1"]
    try:
        proc = cluster.spawner(argv)
        code = yield proc.ended
        assert code != 0
        assert f"cannot reach Redis at 127.0.0.1:{dead} (cluster.redis)" in proc.output
        assert "Traceback" not in proc.output, proc.output

        text = cluster.config.read_text()
        text = text.replace(f"127.0.0.1:{dead}", redis_or_skip())
        text = re.sub(r'dsn = "[^"]*"', 'dsn = "host=127.0.0.1 port=1 dbname=x user=u"', text)
        cluster.config.write_text(text)
        proc = cluster.spawner(argv)
        code = yield proc.ended
        assert code != 0
        assert "cannot open the store: cannot connect to postgresql://u@127.0.0.1:1/x" in (
            proc.output
        )
        assert "Traceback" not in proc.output, proc.output

        sqlite = tmp_path / "sqlite.toml"
        sqlite.write_text("[control]\nenabled = false\n")
        proc = cluster.spawner([*argv[:-4], "--config", str(sqlite), "--worker", "w1"])
        code = yield proc.ended
        assert code != 0
        assert "--worker needs the PostgreSQL store" in proc.output
    finally:
        yield cluster.spawner.close()


class FederatedCluster:
    """Realm a.test as two workers (w1 sends federation, w2 does not) on a schema of
    its own, realm b.test as one process, federating (killed at teardown)."""

    def __init__(self, tmp_path: Any) -> None:
        from chatproto.tls import write_dev_certs

        self.tmp_path = tmp_path
        self.redis = redis_or_skip()
        self.prefix = redis_prefix()
        certs = tmp_path / "certs"
        paths = {name: write_dev_certs(str(certs), name) for name in ("a.test", "b.test")}
        p1, p2, pb = free_port(), free_port(), free_port()
        self.dsn = postgresql_or_skip()
        self.schema = pg_schema()
        self.spawner = Spawner(str(tmp_path), lifetime=LIFETIME)

        def fed(name: str, port: int, peer: str, peer_port: int) -> str:
            p = paths[name]
            return (
                f'[federation]\nenabled = true\nport = {port}\ninterface = "127.0.0.1"\n'
                f'certificate = "{p["cert"]}"\nprivate_key = "{p["key"]}"\nca = "{p["ca"]}"\n'
                f"retry_initial = 0.1\nretry_max = 0.5\n"
                f'[[federation.peers]]\nrealm = "{peer}"\nendpoint = "127.0.0.1:{peer_port}"\n'
            )

        base = _config(self.dsn, self.schema, self.redis, self.prefix, free_port())
        base = base.replace("[realm]\n", '[realm]\nname = "a.test"\n')
        base += 'federation_sender = "w1"\n'
        for worker, port in (("w1", p1), ("w2", p2)):
            (tmp_path / f"{worker}.toml").write_text(base + fed("a.test", port, "b.test", pb))
        (tmp_path / "b.toml").write_text(
            '[realm]\nname = "b.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            "[auth]\nargon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n"
            "[control]\nenabled = false\n" + fed("b.test", pb, "a.test", p2)
        )

    @defer.inlineCallbacks
    def _start(self, config: str, data: str, *more: str) -> Any:
        argv = [*twistd_argv(), "-n", "--pidfile=", "chatrealm", "--config", config]
        proc = self.spawner([*argv, "--data-dir", str(self.tmp_path / data), *more])
        own = yield proc.wait_for(_OWN.pattern)
        yield proc.wait_for(r"realm \S+ started")
        return proc, f"tcp:127.0.0.1:{own.group(1)}"

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start b.test, then w1 and w2; fires with ``(b, w1, w2)``, each ``(process,
        its own address)``."""
        t = self.tmp_path
        b = yield self._start(str(t / "b.toml"), "data-b")
        w1 = yield self._start(str(t / "w1.toml"), "data-a", "--worker", "w1")
        w2 = yield self._start(str(t / "w2.toml"), "data-a", "--worker", "w2")
        yield w1[0].wait_for("cluster: worker w1 of realm a.test started")
        yield w2[0].wait_for("cluster: worker w2 of realm a.test started")
        return b, w1, w2

    @defer.inlineCallbacks
    def close(self) -> Any:
        yield self.spawner.close()
        redis_drop_prefix(self.redis, self.prefix)


@pytest_twisted.inlineCallbacks
def test_federation_in_on_any_worker_out_from_the_sender(tmp_path: Any) -> Any:
    """Realm a.test runs as two workers (w1 sends federation, w2 does not), realm
    b.test as one process.  b's link lands on w2: its items are stored there and w1
    delivers them.  What a user on w2 sends to b goes out through w1's link; what a
    user on w1 sends too."""
    fc = FederatedCluster(tmp_path)
    try:
        (b, b_addr), (w1, a1), (w2, a2) = yield fc.start()
        x = yield Client("x").connect(a1, register=True)
        z = yield Client("z").connect(a2, register=True)
        y = yield Client("y").connect(b_addr, register=True)
        yield y.conn.send("x@a.test", "from b to x")
        yield until(lambda: x.bodies() == ["from b to x"], "x (w1) has b's message")
        assert "federation: link to" not in w2.output  # w2 makes no link of its own
        yield z.conn.send("y@b.test", "from z on w2")
        yield x.conn.send("y@b.test", "from x on w1")
        yield until(
            lambda: sorted(y.bodies(to="y@b.test")) == ["from x on w1", "from z on w2"],
            "y (b.test) has both",
            info=lambda: (y.bodies(), w1.output[-3000:]),
        )
        # Ephemeral reading frames go out from the sender too: z (on w2) types to y
        # and reads y's message; y hears both over w1's link, and w2 makes no link.
        yield y.conn.send("z@a.test", "from b to z")
        yield until(lambda: "from b to z" in z.bodies(), "z (w2) has b's message")
        yield z.conn.typing("y@b.test")
        yield until(
            lambda: any(n.get("type") == "typing" and n["user"] == "z@a.test" for n in y.notices),
            "y hears z typing",
        )
        last = max(m["pos"] for m in z.received)
        yield z.conn.mark_read("y@b.test", last)
        yield until(
            lambda: any(n.get("type") == "read" and n["user"] == "z@a.test" for n in y.notices),
            "y gets z's read receipt",
        )
        assert "federation: link to" not in w2.output
        for proc in (b, w1, w2):
            assert "Traceback" not in proc.output, proc.output
    finally:
        yield fc.close()


@pytest_twisted.inlineCallbacks
def test_a_peer_gets_one_conversation_in_position_order_from_two_workers(tmp_path: Any) -> Any:
    """x writes to y@b.test from two devices, one on each worker.  w1 draws the
    position of x's delete and is held in mid-transaction (the deleted message's row
    locked by the test); w2 stores x's next message, at the next position, and
    commits first.  y (on b.test) gets the delete, then the message: the order x's
    realm has them in.  (With outbox rows numbered apart from the positions, w2's
    row was numbered first and sent first.)"""
    import psycopg
    from twisted.internet.threads import deferToThread

    fc = FederatedCluster(tmp_path)
    try:
        (b, b_addr), (w1, a1), (w2, a2) = yield fc.start()
        x1 = yield Client("x").connect(a1, register=True)
        x2 = yield Client("x").connect(a2)
        y = yield Client("y").connect(b_addr, register=True)
        first = yield x1.conn.send("y@b.test", "first")
        yield until(lambda: y.bodies() == ["first"], "y has x's first message")

        def top() -> int:
            with psycopg.connect(fc.dsn, autocommit=True) as c:
                row = c.execute(f'SELECT last_value FROM "{fc.schema}".items_pos').fetchone()
                return int(row[0]) if row else 0

        hold = yield deferToThread(psycopg.connect, fc.dsn)
        try:
            yield deferToThread(
                hold.execute,
                f'SELECT 1 FROM "{fc.schema}".items WHERE id = %s FOR UPDATE',
                (first["msg_id"],),
            )
            deleted = x1.conn.delete(first["msg_id"])  # w1: waits for the row
            for _ in range(1000):  # bounded: 20 s
                if (yield deferToThread(top)) > first["pos"]:
                    break
                yield task.deferLater(_reactor, 0.02, lambda: None)
            else:
                raise AssertionError("w1's delete drew no position in 20 s")
            after = yield x2.conn.send("y@b.test", "after")  # w2: the next position
            assert after["pos"] == first["pos"] + 2
        finally:
            yield deferToThread(hold.rollback)
            yield deferToThread(hold.close)
        gone = yield deleted
        assert gone["pos"] == first["pos"] + 1

        def arrived() -> list[tuple[str, str]]:
            return [
                (m["kind"], m.get("body", "")) for m in y.received if m.get("from") == "x@a.test"
            ]

        yield until(lambda: len(arrived()) == 3, "y has all three", info=arrived)
        assert arrived() == [("text", "first"), ("delete", ""), ("text", "after")]
        for proc in (b, w1, w2):
            assert "Traceback" not in proc.output, proc.output
    finally:
        yield fc.close()


class IRCLines(LineOnlyReceiver):
    """A bare IRC client: the lines it got; answers PING."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if text.startswith("PING "):
            self.sendLine(b"PONG " + line[5:])
        self.lines.append(text)

    def say(self, text: str) -> None:
        self.sendLine(text.encode())

    def saw(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)


@pytest_twisted.inlineCallbacks
def test_irc_users_on_two_workers(tmp_path: Any) -> Any:
    """The IRC gateway runs on every worker: IRC users on different workers share a
    channel (a group) and write to each other."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    redis = redis_or_skip()
    cluster = Cluster(tmp_path, redis, redis_prefix())
    text = cluster.config.read_text()
    cluster.config.write_text(
        text + '\n[irc]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1:backlog=49"]\n'
    )
    irc_port = re.compile(
        r"listening on 127\.0\.0\.1:(\d+) \(tcp:0:interface=127\.0\.0\.1:backlog=49\)"
    )
    try:
        w1 = yield cluster.start("w1")
        w2 = yield cluster.start("w2")
        for user, server in (("alice", w1), ("bob", w2)):
            conn = yield client.connect(_reactor, server, user, PASSWORD, register=True)
            yield conn.close()
        clients = []
        for name in ("w1", "w2"):
            port = int(irc_port.search(cluster.procs[name].output).group(1))
            irc = IRCLines()
            yield connectProtocol(TCP4ClientEndpoint(_reactor, "127.0.0.1", port), irc)
            clients.append(irc)
        alice, bob = clients
        for irc, nick in ((alice, "alice"), (bob, "bob")):
            irc.say(f"PASS :{PASSWORD}")
            irc.say(f"NICK {nick}")
            irc.say(f"USER {nick} 0 * :{nick}")
            yield until(
                lambda irc=irc: irc.saw(r" 001 "),
                f"{nick} is welcome",
                info=lambda irc=irc: irc.lines,
            )
        alice.say("JOIN #irc")
        yield until(lambda: alice.saw(r"JOIN :?#irc"), "alice joined", info=lambda: alice.lines)
        # The gateway picks "create" or "join" from its worker's view of the groups:
        # bob joins once w2 has read alice's create (docs/scale-out.md, Known limits).
        known: list[Any] = []

        @defer.inlineCallbacks
        def w2_knows() -> Any:
            conn = yield client.connect(_reactor, w2, "bob", PASSWORD, quiet=True, ack=False)
            try:
                for _ in range(200):
                    try:
                        known.append((yield conn.group_info("#irc")))
                        return
                    except RemoteError:
                        yield task.deferLater(_reactor, 0.05, lambda: None)
            finally:
                yield conn.close()

        yield w2_knows()
        assert known, "w2 never learned of #irc"
        bob.say("JOIN #irc")
        yield until(lambda: bob.saw(r"JOIN :?#irc"), "bob joined", info=lambda: bob.lines)
        alice.say("PRIVMSG #irc :hello from w1")
        yield until(
            lambda: bob.saw(r"^:alice\S* PRIVMSG #irc :hello from w1"),
            "bob (w2) reads alice (w1) in the channel",
            info=lambda: bob.lines,
        )
        bob.say("PRIVMSG alice :hi from w2")
        yield until(
            lambda: alice.saw(r"^:bob\S* PRIVMSG alice :hi from w2"),
            "alice (w1) reads bob's (w2) private message",
            info=lambda: alice.lines,
        )
        for irc in clients:
            irc.transport.loseConnection()
        for proc in cluster.procs.values():
            assert "Traceback" not in proc.output, proc.output
    finally:
        yield cluster.spawner.close()
        redis_drop_prefix(redis, cluster.prefix)


@pytest_twisted.inlineCallbacks
def test_operator_actions_take_effect_on_every_worker(tmp_path: Any) -> Any:
    """``chatrealmctl`` reaches one worker (the first control socket that answers);
    what it changes -- a suspension, the admin role, a kick -- every worker follows
    (told over Redis, read from PostgreSQL): sessions on the other worker end, and
    what that worker allows changes."""
    redis = redis_or_skip()
    prefix = redis_prefix()
    cluster = Cluster(tmp_path, redis, prefix, control=True)
    try:
        w1 = yield cluster.start("w1")
        w2 = yield cluster.start("w2")
        alice = yield Client("alice").connect(w1, register=True)
        bob = yield Client("bob").connect(w2, register=True)
        carol = yield Client("carol").connect(w1, register=True)
        lost = {c.user: c.conn.protocol.closed_d for c in (alice, bob, carol)}

        # Granted through w1's socket; alice then acts as an admin on w2.
        assert "by the running realm" in ctl(cluster, "grant-admin", "alice")
        yield alice.conn.close()
        yield until(lambda: lost["alice"].called, "alice's first connection closed")
        alice = yield Client("alice").connect(w2)

        def admin_on_w2() -> Any:
            return alice.conn.suspend("carol", "test")

        yield until_ok(admin_on_w2, "alice is an admin on w2")
        yield until(lambda: lost["carol"].called, "carol's session on w1 ended")
        with pytest.raises(RemoteError) as refused:
            yield client.connect(_reactor, w1, "carol", PASSWORD)
        assert refused.value.code == "account_suspended"

        # Suspended through w1's socket: bob's session on w2 ends; w2 refuses him.
        out = ctl(cluster, "suspend", "bob", "--reason", "spam")
        assert "by the running realm" in out, out
        yield until(lambda: lost["bob"].called, "bob's session on w2 ended")
        with pytest.raises(RemoteError) as refused:
            yield client.connect(_reactor, w2, "bob", PASSWORD)
        assert refused.value.code == "account_suspended"
        ctl(cluster, "unsuspend", "bob")

        @defer.inlineCallbacks
        def bob_back() -> Any:
            c = yield Client("bob").connect(w2)
            return c

        bob = yield until_ok(bob_back, "bob may log in on w2 again")
        gone = bob.conn.protocol.closed_d
        ctl(cluster, "kick", "bob")
        yield until(lambda: gone.called, "bob's session on w2 kicked")
        for proc in cluster.procs.values():
            assert "Traceback" not in proc.output, proc.output
    finally:
        yield cluster.spawner.close()
        redis_drop_prefix(redis, prefix)


@defer.inlineCallbacks
def until_ok(attempt: Any, what: str, timeout: float = 20.0) -> Any:
    """``attempt()``'s result once it succeeds (a change another worker follows
    within a bus round trip); its last error after ``timeout`` seconds."""
    error: Any = None
    for _ in range(int(timeout / 0.05)):
        try:
            result = yield attempt()
            return result
        except RemoteError as e:
            error = e
        yield task.deferLater(_reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting until {what}: {error}")


@pytest_twisted.inlineCallbacks
def test_a_browser_login_made_on_one_worker_holds_and_ends_on_every_worker(
    tmp_path: Any,
) -> Any:
    """A browser logs in over HTTP on worker w1 and opens its WebSocket on w2 (no
    sticky balancing) at once: w2 knows the login (read from PostgreSQL, whether or
    not Redis told it yet).
    ``chatrealmctl sessions revoke`` through w1 ends it: w2 closes the WebSocket, and
    the cookie opens none any more."""
    from tests.test_web import Web, _cookie

    redis = redis_or_skip()
    prefix = redis_prefix()
    cluster = Cluster(tmp_path, redis, prefix, control=True, web=True)

    class Port:  # what Web reads of a listening port
        def __init__(self, port: int) -> None:
            self.port = port

        def getHost(self) -> Any:
            return self

    @defer.inlineCallbacks
    def web_of(name: str) -> Any:
        match = yield cluster.procs[name].wait_for(_WEB.pattern)
        return Web(None, None, Port(int(match.group(1))))

    try:
        w1 = yield cluster.start("w1")
        yield cluster.start("w2")
        web1 = yield web_of("w1")
        web2 = yield web_of("w2")
        bob = yield Client("bob").connect(w1, register=True)
        yield bob.conn.close()
        response, _ = yield web1.request(
            "POST", "/api/login", {"user": "bob", "password": PASSWORD, "device": "laptop"}
        )
        assert response.code == 200
        cookie = _cookie(response)

        @defer.inlineCallbacks
        def login_on_w2() -> Any:
            ws = yield web2.websocket(cookie)
            yield ws.call("hello", version=1)
            res = yield ws.call("login")
            if res["type"] != "result":
                ws.sendClose()
                raise RemoteError(res.get("code", "?"), res.get("message", ""))
            return ws, res

        ws, res = yield login_on_w2()  # (no retry: w2 reads the store before refusing)
        assert (res["user"], res["device"]) == ("bob@localhost", "laptop")

        out = ctl(cluster, "sessions", "revoke", "bob")
        assert "by the running realm" in out, out
        yield until(lambda: ws.closed.called, "w2 closed the WebSocket of the ended login")
        with pytest.raises(RemoteError) as refused:
            yield login_on_w2()
        assert refused.value.code == "auth_failed"
        for proc in cluster.procs.values():
            assert "Traceback" not in proc.output, proc.output
    finally:
        yield cluster.spawner.close()
        redis_drop_prefix(redis, prefix)


@pytest_twisted.inlineCallbacks
def test_the_report_limit_is_counted_by_every_worker(cluster: Cluster) -> Any:
    """A user's abuse reports are limited per user (a burst of REPORT_BURST, then
    one every two minutes) across the workers: the burst spent through w1, the next
    report through w2 is refused (counted in Redis, not per worker)."""
    from chatproto.realm.moderation import REPORT_BURST

    w1 = yield cluster.start("w1")
    w2 = yield cluster.start("w2")
    bob = yield Client("bob").connect(w1, register=True)
    alice = yield Client("alice").connect(w1, register=True)
    alice2 = yield Client("alice").connect(w2)
    sent = yield bob.conn.send("alice@localhost", "buy cheap pills")
    yield until(lambda: alice2.bodies() == ["buy cheap pills"], "w2 has bob's message")
    for i in range(REPORT_BURST):
        yield alice.conn.report(sent["msg_id"], f"spam {i}")
    with pytest.raises(RemoteError) as refused:
        yield alice2.conn.report(sent["msg_id"], "spam again")
    assert refused.value.code == "rate_limited"
    assert refused.value.extra["retry_after"] > 60
    # another user's allowance is their own
    carol = yield Client("carol").connect(w2, register=True)
    sent = yield bob.conn.send("carol@localhost", "buy more")
    yield until(lambda: carol.bodies() == ["buy more"], "carol has bob's message")
    yield carol.conn.report(sent["msg_id"], "spam")
    for proc in cluster.procs.values():
        assert "Traceback" not in proc.output, proc.output


@pytest_twisted.inlineCallbacks
def test_the_register_limit_is_counted_by_every_worker(cluster: Cluster) -> Any:
    """A client address's registrations are limited (a burst of auth.registrations_per_address, then
    one every 30 seconds) across the workers: the burst spent through w1 and w2 in
    turn, the next registration from that address is refused through either (counted
    in Redis, not per worker); another address has its own allowance."""
    burst = Config().auth.registrations_per_address

    w1 = yield cluster.start("w1")
    w2 = yield cluster.start("w2")
    for n in range(burst):
        conn = yield client.connect(_reactor, (w1, w2)[n % 2], f"u{n}", PASSWORD, register=True)
        yield conn.close()
    for server in (w1, w2):
        with pytest.raises(RemoteError) as refused:
            yield client.connect(_reactor, server, "one-more", PASSWORD, register=True)
        assert refused.value.code == "rate_limited"
        assert refused.value.extra["retry_after"] > 20
    conn = yield client.connect(
        _reactor, f"{w2}:bindAddress=127.0.0.2", "elsewhere", PASSWORD, register=True
    )
    yield conn.close()
    for proc in cluster.procs.values():
        assert "Traceback" not in proc.output, proc.output


@pytest_twisted.inlineCallbacks
def test_a_file_deleted_on_one_worker_stops_its_download_on_another(
    cluster: Cluster, tmp_path: Any
) -> Any:
    """alice (on w1) deletes her file while bob downloads it from w2, reading slowly.
    w1 stopped only its own downloads of the file: w2 sent bob the deleted file to
    the end.  Now w2, routing w1's delete, stops bob's download with no_such_file."""
    import os
    import socket

    w1 = yield cluster.start("w1")
    w2 = yield cluster.start("w2")
    alice = yield Client("alice").connect(w1, register=True)
    bob = yield Client("bob").connect(w2, register=True)
    bob2 = yield Client("bob").connect(w2)  # another device of bob's, reading
    size = 32 * 1024 * 1024
    src = tmp_path / "large.bin"
    src.write_bytes(os.urandom(size))
    sent = yield alice.conn.send_file("bob", str(src))
    yield until(lambda: any(m["kind"] == "file" for m in bob.received), "bob has the file")
    proto = bob.conn.protocol
    proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 512 * 1024)
    progress: list[int] = []

    def stop_reading(done: int, total: int) -> None:
        if not progress:  # bob stops reading at the first bytes, mid-file
            proto.pause()
        progress.append(done)

    d = bob.conn.download(sent["file"], str(tmp_path / "large.down"), progress=stop_reading)
    yield until(lambda: progress, "the download started")
    yield alice.conn.delete(sent["msg_id"])
    yield until(lambda: any(m["kind"] == "delete" for m in bob2.received), "w2 routed the delete")
    yield bob2.conn.protocol.request("ping")
    proto.resume()
    with pytest.raises(RemoteError) as e:
        yield d
    assert e.value.code == "no_such_file"
    for proc in cluster.procs.values():
        assert "Traceback" not in proc.output, proc.output
