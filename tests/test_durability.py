"""Durability of a real ``twistd chatrealm`` process: acknowledged means stored.

Each test runs the realm as a subprocess (``twistd -n chatrealm``) on a temp data dir,
listening on port 0 of 127.0.0.1; the port is read from the "listening on" log line.
Messages are sent with the client library and the realm is killed with SIGKILL right
after the last acknowledgement, then restarted on the same data dir (or PostgreSQL
schema): every acknowledged message must be there, in order, once.  Every process has a bounded
lifetime and is killed at teardown whatever happens.
"""

from __future__ import annotations

import re
import signal
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto import client
from tests.conftest import pg_schema, postgresql_or_skip
from tests.processes import Proc, Spawner, twistd_argv

PASSWORD = "correct horse"
CONFIG = """\
[auth]
argon2_time_cost = 1
argon2_memory_cost = 1024
argon2_parallelism = 1

[limits]
send_rate = 100000.0
send_burst = 100000
"""

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) ")
_STARTED = "realm localhost started"


@pytest.fixture
def store_kind() -> str:
    """The store of the spawned realms (tests parametrize it to run on several)."""
    return "sqlite"


@pytest.fixture
def spawn(tmp_path: Any, store_kind: str) -> Any:
    """``spawn(*args)`` starts ``twistd -n chatrealm *args`` in tmp_path; all are killed at
    teardown."""
    config = tmp_path / "realm.toml"
    text = CONFIG
    if store_kind == "postgresql":  # every realm of the test on one new schema
        text += (
            f'\n[storage]\nbackend = "postgresql"\ndsn = "{postgresql_or_skip()}"\n'
            f'schema = "{pg_schema()}"\n'
        )
    config.write_text(text)
    spawner = Spawner(str(tmp_path))

    def spawn(*args: str, config_file: str | None = str(config)) -> Proc:
        argv = [*twistd_argv(), "-n", "--pidfile=", "chatrealm"]
        if config_file is not None:
            argv += ["--config", config_file]
        return spawner([*argv, *args])

    yield spawn
    pytest_twisted.blockon(spawner.close())


@pytest.fixture
def start_realm(spawn: Any, tmp_path: Any) -> Any:
    """``start_realm()`` spawns a realm on tmp_path/data and fires with (process, server)."""

    @defer.inlineCallbacks
    def start() -> Any:
        proc = spawn("--data-dir", str(tmp_path / "data"), "--listen", "tcp:0:interface=127.0.0.1")
        listening = yield proc.wait_for(_LISTENING.pattern)
        yield proc.wait_for(re.escape(_STARTED))
        return proc, f"tcp:127.0.0.1:{listening.group(1)}"

    return start


@defer.inlineCallbacks
def _register(server: str, *users: str) -> Any:
    for user in users:
        conn = yield client.connect(_reactor, server, user, PASSWORD, register=True)
        yield conn.close()


@defer.inlineCallbacks
def _kill(proc: Proc, sig: str = "KILL") -> Any:
    proc.kill(sig)
    code = yield proc.ended
    return code


@defer.inlineCallbacks
def _backlog(server: str, user: str) -> Any:
    """Log in as ``user`` and collect the backlog until the realm says it is synced."""
    received: list[dict[str, Any]] = []
    conn = yield client.connect(_reactor, server, user, PASSWORD, on_message=received.append)
    yield conn.synced
    return conn, received


@defer.inlineCallbacks
def _check_survived(server: str, sent: list[str], acks: list[dict[str, Any]]) -> Any:
    """bob's backlog and history hold exactly the acknowledged messages, in order."""
    conn, received = yield _backlog(server, "bob")
    try:
        assert [m["body"] for m in received] == sent
        assert [m["pos"] for m in received] == [a["pos"] for a in acks]
        assert [m["msg_id"] for m in received] == [a["msg_id"] for a in acks]
        assert {m["from"] for m in received} == {"alice@localhost"}
        history = yield conn.history("alice", limit=200)  # the realm's largest page
        assert [m["body"] for m in history] == sent[-200:]
    finally:
        yield conn.close()


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
@pytest_twisted.inlineCallbacks
def test_acknowledged_messages_survive_sigkill(start_realm: Any) -> Any:
    proc, server = yield start_realm()
    yield _register(server, "bob")  # bob is offline: nothing is delivered or acked
    alice = yield client.connect(_reactor, server, "alice", PASSWORD, register=True)
    sent = [f"message {i} \N{SNOWMAN}" for i in range(10)]
    acks = []
    for body in sent:
        acks.append((yield alice.send("bob", body)))
    assert [a["pos"] for a in acks] == sorted({a["pos"] for a in acks})

    code = yield _kill(proc)
    assert code == -signal.SIGKILL
    yield alice.protocol.closed_d

    _proc2, server2 = yield start_realm()
    yield _check_survived(server2, sent, acks)


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
@pytest_twisted.inlineCallbacks
def test_pipelined_sends_survive_sigkill_after_last_ack(start_realm: Any) -> Any:
    """200 sends in flight at once are group-committed; every acked one is durable."""
    proc, server = yield start_realm()
    yield _register(server, "bob")
    alice = yield client.connect(_reactor, server, "alice", PASSWORD, register=True)
    sent = [f"pipelined {i}" for i in range(200)]
    acks = yield defer.gatherResults([alice.send("bob", body) for body in sent])
    proc.kill()  # at once: no reactor turn between the last ack and the kill
    assert (yield proc.ended) == -signal.SIGKILL
    positions = [a["pos"] for a in acks]
    assert positions == sorted(set(positions)), "positions follow the order of the sends"
    yield alice.protocol.closed_d

    _proc2, server2 = yield start_realm()
    yield _check_survived(server2, sent, acks)


@pytest_twisted.inlineCallbacks
def test_sigterm_shuts_down_cleanly_and_keeps_data(start_realm: Any) -> Any:
    proc, server = yield start_realm()
    yield _register(server, "bob")
    alice = yield client.connect(_reactor, server, "alice", PASSWORD, register=True)
    sent = [f"before shutdown {i}" for i in range(5)]
    acks = []
    for body in sent:
        acks.append((yield alice.send("bob", body)))

    code = yield _kill(proc, "TERM")
    # twistd shuts down cleanly, then re-raises SIGTERM on itself so that the exit
    # status tells a supervisor which signal stopped it (Twisted >= 19.7).
    assert code in (0, -signal.SIGTERM), proc.output
    assert "realm localhost stopped" in proc.output
    assert "Server Shut Down." in proc.output
    assert "Traceback" not in proc.output, proc.output
    yield alice.protocol.closed_d

    proc2, server2 = yield start_realm()
    assert "2 users" in proc2.output
    yield _check_survived(server2, sent, acks)


@pytest_twisted.inlineCallbacks
def test_missing_config_file_is_a_usage_error(spawn: Any) -> Any:
    proc = spawn(config_file="/nonexistent.toml")
    code = yield proc.ended
    assert code != 0
    assert "config file '/nonexistent.toml' not found" in proc.output
    assert "Traceback" not in proc.output, proc.output


@pytest_twisted.inlineCallbacks
def test_port_in_use_exits_with_a_message(spawn: Any, tmp_path: Any) -> Any:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        proc = spawn("--data-dir", str(tmp_path / "data"), "--listen", description)
        code = yield proc.ended
    assert code != 0, proc.output
    assert f"cannot listen on {description}" in proc.output, proc.output
    assert "in use" in proc.output


@pytest_twisted.inlineCallbacks
def test_store_from_a_newer_chatproto_stops_start_up(spawn: Any, tmp_path: Any) -> Any:
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(str(data / "realm.sqlite3"))
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (999)")
    db.commit()
    db.close()
    proc = spawn("--data-dir", str(data), "--listen", "tcp:0:interface=127.0.0.1")
    code = yield proc.ended
    assert code != 0, proc.output
    assert "cannot open the store" in proc.output and "999" in proc.output, proc.output
    assert "listening on" not in proc.output


@pytest_twisted.inlineCallbacks
def test_an_unreachable_postgresql_stops_start_up(spawn: Any, tmp_path: Any) -> Any:
    """A realm configured for a PostgreSQL server it cannot reach says which, and exits
    non-zero before listening."""
    config = tmp_path / "pg-down.toml"
    config.write_text(
        CONFIG + '\n[storage]\nbackend = "postgresql"\n'
        'dsn = "host=127.0.0.1 port=1 dbname=chat user=chat connect_timeout=3"\n'
    )
    proc = spawn(
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        config_file=str(config),
    )
    code = yield proc.ended
    assert code != 0, proc.output
    assert (
        "cannot open the store: cannot connect to postgresql://chat@127.0.0.1:1/chat" in proc.output
    ), proc.output
    assert "listening on" not in proc.output
    assert "Traceback" not in proc.output, proc.output
