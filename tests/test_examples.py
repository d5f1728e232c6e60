"""The programs in examples/ run as documented.

- examples/test_hooks.py (the extension's own tests) passes under pytest;
- examples/embedded.tac runs under ``twistd -ny``: a client logs in on its chat port
  and the status page on its web port shows the user online; SIGTERM stops it cleanly;
- examples/bot.py, as a subprocess against an in-process realm, answers "!echo hi" in
  its group, and still answers after the realm aborts its connection (it reconnects and
  resumes by itself).

Everything is on loopback with port 0, every subprocess has a bounded life and is
killed at teardown.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.web.client import Agent, readBody

from chatproto import client
from chatproto.protocol import ClientFactory
from tests.processes import TIMEOUT, Spawner, twistd_argv
from tests.processes import env as child_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PASSWORD = "correct horse"


@pytest.fixture
def spawn(tmp_path: Any) -> Any:
    """``spawn(argv, **env)`` starts a subprocess in tmp_path; all are killed at teardown."""
    spawner = Spawner(str(tmp_path))
    yield spawner
    pytest_twisted.blockon(spawner.close())


@defer.inlineCallbacks
def until(predicate: Any, timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``predicate`` every 50 ms until it is true (AssertionError after ``timeout``)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(_reactor, 0.05, lambda: None)
        waited += 0.05


def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"chatproto_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# examples/test_hooks.py ---------------------------------------------------------------


def test_hooks_example_tests_pass() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "examples/test_hooks.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_hooks_toml_names_the_hook() -> None:
    import tomllib

    from chatproto import config

    data = tomllib.loads((EXAMPLES / "hooks.toml").read_text())
    cfg = config.from_dict(data)
    cfg.check()
    assert cfg.plugins == ["hooks:setup"]


# examples/embedded.tac ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_embedded_tac(spawn: Any, tmp_path: Any) -> Any:
    proc = spawn(
        [*twistd_argv(), "-ny", str(EXAMPLES / "embedded.tac"), "--pidfile="],
        CHATPROTO_PORT="0",
        CHATPROTO_WEB_PORT="0",
        CHATPROTO_DATA=str(tmp_path / "data"),
        CHATPROTO_CHEAP_ARGON2="1",
    )
    chat = yield proc.wait_for(r"listening on 127\.0\.0\.1:(\d+) ")
    web = yield proc.wait_for(r"status page on (http://127\.0\.0\.1:\d+/)")
    yield proc.wait_for(r"realm localhost started")
    server = f"tcp:127.0.0.1:{chat.group(1)}"
    conn = yield client.connect(_reactor, server, "alice", PASSWORD, register=True)
    try:
        yield conn.create_group("#lobby", topic="embedded")
        agent = Agent(_reactor)
        response = yield agent.request(b"GET", web.group(1).encode()).addTimeout(TIMEOUT, _reactor)
        assert response.code == 200
        page = (yield readBody(response)).decode()
        assert "Realm localhost" in page
        assert "alice@localhost" in page
        assert "#lobby@localhost" in page
        response = yield agent.request(b"GET", web.group(1).encode() + b"status.json")
        status = json.loads((yield readBody(response)))
        assert status["online"] == ["alice@localhost"]
    finally:
        yield conn.close()
    assert (tmp_path / "data" / "realm.sqlite3").exists()
    proc.kill("TERM")
    code = yield proc.ended
    # twistd shuts down cleanly, then re-raises SIGTERM on itself (see test_durability)
    assert code in (0, -signal.SIGTERM), proc.output
    assert "realm localhost stopped" in proc.output
    assert "Server Shut Down." in proc.output
    assert "Traceback" not in proc.output, proc.output


# examples/bot.py ----------------------------------------------------------------------


def test_bot_logic() -> None:
    import datetime

    bot_module = _load_example("bot")
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    bot = bot_module.EchoBot("bot", "#lobby", now=lambda: now)

    def msg(body: str, sender: str = "alice@localhost", to: str = "#lobby@localhost") -> Any:
        return {"kind": "text", "from": sender, "to": to, "body": body, "pos": 1}

    assert bot.handle(msg("!echo hi there")) == ["hi there"]
    assert bot.handle(msg("!time")) == ["2024-05-06 07:08:09 UTC"]
    assert bot.handle(msg("!help"))
    assert bot.handle(msg("hello")) == []
    assert bot.handle(msg("!echo")) == []
    assert bot.handle(msg("!echo loop", sender="bot@localhost")) == []
    assert bot.handle(msg("!echo elsewhere", to="#other@localhost")) == []
    assert bot.handle({**msg("!echo x"), "kind": "event"}) == []


@pytest_twisted.inlineCallbacks
def test_bot_answers_and_survives_a_dropped_connection(spawn: Any, realm: Any) -> Any:
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = f"tcp:127.0.0.1:{port.getHost().port}"
    alice = None
    try:
        bot = spawn(
            [
                sys.executable,
                str(EXAMPLES / "bot.py"),
                "--server",
                server,
                "--user",
                "bot",
                "--group",
                "#lobby",
                "--register",
            ],
            CHATPROTO_PASSWORD=PASSWORD,
        )
        yield bot.wait_for(r"bot bot@localhost ready in #lobby@localhost")
        received: list[dict[str, Any]] = []
        alice = yield client.connect(
            _reactor, server, "alice", PASSWORD, register=True, on_message=received.append
        )
        yield alice.join("#lobby")  # the bot created it

        def replies() -> list[str]:
            return [m["body"] for m in received if m["from"] == "bot@localhost"]

        yield alice.send("#lobby", "!echo hi")
        yield until(lambda: replies() == ["hi"], what=f"the bot's reply\n{bot.output}")

        # the realm drops the bot's connection; it reconnects and resumes by itself
        (old,) = realm.sessions_of("bot@localhost")
        for proto in list(factory.connections):
            if proto.session is old:
                proto.transport.abortConnection()
        yield until(lambda: old.closed, what="the bot's session to close")
        yield alice.send("#lobby", "!echo again")
        yield until(
            lambda: replies() == ["hi", "again"], what=f"the reply after reconnecting\n{bot.output}"
        )
        (new,) = realm.sessions_of("bot@localhost")
        assert new is not old
        assert bot.running
    finally:
        if alice is not None:
            yield alice.close()
        yield port.stopListening()
