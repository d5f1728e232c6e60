"""Federation durability with a real ``twistd chatrealm`` process: realm b.example runs
as a subprocess with federation on; realm a.example runs in-process and streams
messages to a user of b.  b is killed with SIGKILL mid-stream and restarted on the same
data directory: every message a.example acknowledged to its sender reaches bob exactly
once, in order, without anyone sending anything more."""

from __future__ import annotations

import json
import re
import signal
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto import client, tls
from chatproto.config import Peer
from tests.conftest import until
from tests.fedharness import Node, drained
from tests.processes import Spawner, twistd_argv

PASSWORD = "correct horse"
_LISTENING = re.compile(r"chatrealm b\.example listening on 127\.0\.0\.1:(\d+) ")
_STARTED = re.escape("realm b.example started")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_realm_config(
    tmp_path: Any, realm: str, paths: dict[str, str], fed_port: int, peer: str, peer_port: int
) -> Any:
    """The TOML file of a twistd realm federating with ``peer`` (fast hashing, fast retry)."""
    conf = tmp_path / f"{realm.split('.')[0]}.toml"
    conf.write_text(
        f"""[realm]
name = "{realm}"
data_dir = {json.dumps(str(tmp_path / (realm.split(".")[0] + "-data")))}
listen = ["tcp:0:interface=127.0.0.1"]
[auth]
argon2_time_cost = 1
argon2_memory_cost = 1024
argon2_parallelism = 1
[federation]
enabled = true
port = {fed_port}
certificate = {json.dumps(paths["cert"])}
private_key = {json.dumps(paths["key"])}
ca = {json.dumps(paths["ca"])}
retry_initial = 0.05
retry_max = 0.5
[[federation.peers]]
realm = "{peer}"
endpoint = "127.0.0.1:{peer_port}"
"""
    )
    return conf


@pytest.fixture
def spawner(tmp_path: Any) -> Any:
    s = Spawner(str(tmp_path))
    yield s
    pytest_twisted.blockon(s.close())


@pytest_twisted.inlineCallbacks
def test_sigkill_of_the_receiving_realm_mid_stream(tmp_path: Any, spawner: Any) -> Any:
    certs = str(tmp_path / "certs")
    b_paths = tls.write_dev_certs(certs, "b.example")
    b_fed_port = free_port()

    a = Node(tmp_path, "a.example", certs, batch_size=10, window=2)
    a.build()
    a.cfg.federation.peers.append(Peer("b.example", endpoint=f"127.0.0.1:{b_fed_port}"))
    yield a.start()

    conf = write_realm_config(tmp_path, "b.example", b_paths, b_fed_port, "a.example", a.fed_port)

    @defer.inlineCallbacks
    def start_b() -> Any:
        proc = spawner([*twistd_argv(), "-n", "--pidfile=", "chatrealm", "--config", str(conf)])
        listening = yield proc.wait_for(_LISTENING.pattern)
        yield proc.wait_for(_STARTED)
        return proc, f"tcp:127.0.0.1:{listening.group(1)}"

    try:
        proc, server = yield start_b()
        bob = yield client.connect(_reactor, server, "bob", PASSWORD, register=True)
        yield bob.close()
        alice = yield client.connect(_reactor, a.addr, "alice", PASSWORD, register=True)
        sent = [f"stream {i}" for i in range(300)]
        acks = yield defer.gatherResults([alice.send("bob@b.example", body) for body in sent])
        assert len(acks) == 300  # all durable on a.example (in its outbox)
        link = a.fed.links["b.example"]
        yield until(lambda: link.acked_seq >= 40, timeout=30)  # b has stored some...
        proc.kill()  # ...and is killed mid-stream
        assert (yield proc.ended) == -signal.SIGKILL
        counts = yield a.realm.store.outbox_counts()
        assert 0 < counts.get("b.example", 0) < 300

        _proc2, server2 = yield start_b()  # nobody sends anything from here on
        yield drained(a, timeout=30)
        received: list[dict[str, Any]] = []
        bob = yield client.connect(_reactor, server2, "bob", PASSWORD, on_message=received.append)
        yield bob.synced
        assert [m["body"] for m in received] == sent  # exactly once, in order
        assert [m["msg_id"] for m in received] == [ack["msg_id"] for ack in acks]
        assert {m["from"] for m in received} == {"alice@a.example"}
        yield bob.close()
        yield alice.close()
    finally:
        yield a.stop()


@pytest_twisted.inlineCallbacks
def test_sigkill_of_the_sending_realm_with_a_queue_then_restart(tmp_path: Any, spawner: Any) -> Any:
    """a.example (a twistd process) accepts messages for b.example while b is down,
    is killed with SIGKILL, then restarted: its outbox resumes on its own."""
    certs = str(tmp_path / "certs")
    a_paths = tls.write_dev_certs(certs, "a.example")
    a_fed_port, b_fed_port = free_port(), free_port()
    conf = write_realm_config(tmp_path, "a.example", a_paths, a_fed_port, "b.example", b_fed_port)
    listening = re.compile(r"chatrealm a\.example listening on 127\.0\.0\.1:(\d+) ")

    @defer.inlineCallbacks
    def start_a() -> Any:
        proc = spawner([*twistd_argv(), "-n", "--pidfile=", "chatrealm", "--config", str(conf)])
        m = yield proc.wait_for(listening.pattern)
        yield proc.wait_for(re.escape("realm a.example started"))
        return proc, f"tcp:127.0.0.1:{m.group(1)}"

    proc, server = yield start_a()
    alice = yield client.connect(_reactor, server, "alice", PASSWORD, register=True)
    sent = [f"queued {i}" for i in range(50)]
    acks = []
    for body in sent:  # b.example is down: each is acknowledged once in a's outbox
        acks.append((yield alice.send("bob@b.example", body)))
    proc.kill()
    assert (yield proc.ended) == -signal.SIGKILL

    b = Node(tmp_path, "b.example", certs)
    b.cfg.federation.port = b_fed_port
    b.build()
    b.cfg.federation.peers.append(Peer("a.example", endpoint=f"127.0.0.1:{a_fed_port}"))
    yield b.start()
    try:
        received: list[dict[str, Any]] = []
        bob = yield client.connect(
            _reactor, b.addr, "bob", PASSWORD, register=True, on_message=received.append
        )
        _proc2, _server2 = yield start_a()  # resumes its outbox; nobody sends anything
        yield until(lambda: len(received) == 50, timeout=30)
        assert [m["body"] for m in received] == sent
        assert [m["msg_id"] for m in received] == [ack["msg_id"] for ack in acks]
        yield bob.close()
    finally:
        yield b.stop()
