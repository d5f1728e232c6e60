"""The systemd unit of docs/operator-guide.md, run the way systemd runs it (no systemd
needed): its ExecStart line in its WorkingDirectory with standard output appended to a
log file (``StandardOutput=append:``), its ExecReload line, a logrotate
``copytruncate`` of that file, and its KillSignal."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from chatproto import tls
from chatproto.client import connect
from tests.conftest import until
from tests.processes import TIMEOUT, Proc, env, twistd_argv
from tests.test_metrics import _get

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operator-guide.md"
VENV = "/opt/chatrealm/venv/bin/"
CONFIG = "/etc/chatrealm/realm.toml"


def unit() -> dict[str, str]:
    """The keys of the unit file in the operator guide (its [Service] section)."""
    blocks = re.findall(r"```ini\n(.*?)```", GUIDE.read_text(), re.S)
    [text] = [b for b in blocks if "ExecStart=" in b]
    keys: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), value.strip())
    return keys


def command(line: str, config: Path) -> list[str]:
    """A unit's command line with this checkout's programs and the test's config."""
    argv = shlex.split(line)
    program = argv[0]
    assert program.startswith(VENV), program
    name = program[len(VENV) :]
    head = twistd_argv() if name == "twistd" else ctl_argv()
    assert name in ("twistd", "chatrealmctl"), name
    return head + [str(config) if a == CONFIG else a for a in argv[1:]]


def ctl_argv() -> list[str]:
    """The chatrealmctl of this checkout."""
    return [sys.executable, "-c", "import sys; from chatproto.ctl import main; sys.exit(main())"]


def test_the_unit_names_what_the_test_runs() -> None:
    keys = unit()
    assert keys["User"] == "chatrealm" and keys["WorkingDirectory"] == "/var/lib/chatrealm"
    assert keys["ExecStart"].split()[0] == VENV + "twistd"
    assert "--nodaemon" in keys["ExecStart"] and CONFIG in keys["ExecStart"]
    assert keys["ExecReload"].endswith("reload-tls") and keys["KillSignal"] == "SIGTERM"


@pytest_twisted.inlineCallbacks
def test_exec_start_reload_logrotate_and_stop(tmp_path: Path) -> Any:
    keys = unit()
    workdir = tmp_path / "var-lib-chatrealm"  # WorkingDirectory
    workdir.mkdir()
    certs = tls.write_dev_certs(str(tmp_path / "tls"), "localhost")
    config = tmp_path / "realm.toml"
    config.write_text(
        "\n".join(
            [
                "[realm]",
                'data_dir = "data"',  # relative to WorkingDirectory, as the guide says
                'listen = ["tcp:0:interface=127.0.0.1"]',
                "[auth]",
                "argon2_time_cost = 1",
                "argon2_memory_cost = 1024",
                "argon2_parallelism = 1",
                "[tls]",
                f'certificate = "{certs["cert"]}"',
                f'private_key = "{certs["key"]}"',
                "port = 0",
                "[metrics]",
                'listen = ["tcp:0:interface=127.0.0.1"]',
                "[control]",
                f'socket = "/tmp/ctl-{os.getpid()}-{tmp_path.name[-12:]}.sock"',
            ]
        )
        + "\n"
    )
    add = subprocess.run(
        [*ctl_argv(), "--config", str(config), "adduser", "alice", "--password-file", "-"],
        input="password-one\n",
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=TIMEOUT,
    )
    assert add.returncode == 0, add.stderr
    log = tmp_path / "chatrealm.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # StandardOutput=append:
    proc = Proc()
    argv = command(keys["ExecStart"], config)
    try:
        _reactor.spawnProcess(
            proc, argv[0], argv, env=env(), path=str(workdir), childFDs={0: "w", 1: fd, 2: fd}
        )
    finally:
        os.close(fd)
    try:
        yield until(lambda: "realm localhost started" in log.read_text(), timeout=TIMEOUT)
        text = log.read_text()
        assert (workdir / "data" / "realm.sqlite3").exists()
        code, _ = yield _get(_metrics_port(text), "/ready")
        assert code == 200
        # ExecReload: the certificates are read again
        reload = yield deferToThread(
            subprocess.run,
            command(keys["ExecReload"], config),
            capture_output=True,
            text=True,
            cwd=workdir,
            timeout=TIMEOUT,
        )
        assert reload.returncode == 0 and "reloaded ssl:" in reload.stdout, reload.stderr
        # logrotate's copytruncate: the next line lands at the start of the file
        (tmp_path / "chatrealm.log.1").write_bytes(log.read_bytes())
        os.truncate(log, 0)
        chat = next(p for kind, p in _listeners(text) if kind == "tcp")
        alice = yield connect(_reactor, f"tcp:127.0.0.1:{chat}", "alice", "password-one")
        yield until(lambda: "login alice@localhost" in log.read_text(), timeout=TIMEOUT)
        data = log.read_bytes()
        assert not data.startswith(b"\0") and b"\0" not in data  # no hole
        assert b"listening on" not in data  # only what came after the truncation
        yield alice.close()
        # KillSignal=SIGTERM: a clean stop
        proc.transport.signalProcess(keys["KillSignal"].removeprefix("SIG"))
        code = yield proc.ended
        # twistd stops cleanly, then re-raises SIGTERM on itself: systemd counts that
        # as a clean exit (as it does 0)
        assert code in (0, -signal.SIGTERM)
        assert "realm localhost stopped" in log.read_text()
    finally:
        proc.kill()


def _listeners(text: str) -> list[tuple[str, int]]:
    return [
        (m.group(2), int(m.group(1)))
        for m in re.finditer(r"listening on 127\.0\.0\.1:(\d+) \((\w+):", text)
    ]


def _metrics_port(text: str) -> int:
    """The operations listener is the last tcp listener the realm starts."""
    return [p for kind, p in _listeners(text) if kind == "tcp"][-1]
