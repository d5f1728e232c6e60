"""End to end: the real ``chatproto tui`` in tmux against a real ``twistd chatrealm``.

The realm runs as a subprocess on port 0 of 127.0.0.1 (the port is read from its log);
each user's client runs in its own tmux session on a private tmux server (``-S`` socket
in the test's temp dir), with ``HOME`` and ``XDG_CONFIG_HOME`` there too.  Keys are
typed with ``send-keys``, a multi-line text is pasted with ``paste-buffer -p``
(bracketed paste), and the screen is read with ``capture-pane``.  Every wait is bounded;
the tmux server and the realm are killed at teardown.

tmux is installed by ``.ci/run``; without it the test is skipped, except under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor

from chatproto import client
from tests.processes import Spawner, twistd_argv

PASSWORD = "correct horse"
CONFIG = """\
[auth]
argon2_time_cost = 1
argon2_memory_cost = 1024
argon2_parallelism = 1
"""
_LISTENING = r"listening on 127\.0\.0\.1:(\d+) "

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None and not os.environ.get("CI"),
    reason="tmux is not installed (.ci/run installs it)",
)


class Tmux:
    """A private tmux server; one session per client."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.socket = str(tmp / "tmux.sock")

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-S", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={_quote(v)}" for k, v in env.items())
        command = (
            f"env {exports} {' '.join(_quote(a) for a in argv)}; echo exit status $?; sleep 60"
        )
        self("new-session", "-d", "-s", name, "-x", "100", "-y", "30", command)

    def screen(self, name: str) -> str:
        return self("capture-pane", "-p", "-t", name)

    def type(self, name: str, text: str, enter: bool = True) -> None:
        self("send-keys", "-t", name, "-l", text)
        if enter:
            self("send-keys", "-t", name, "Enter")

    def key(self, name: str, key: str) -> None:
        self("send-keys", "-t", name, key)

    def paste(self, name: str, text: str) -> None:
        self("set-buffer", "-b", "paste", text)
        self("paste-buffer", "-p", "-b", "paste", "-t", name)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10)

    @defer.inlineCallbacks
    def wait(self, name: str, pattern: str, timeout: float = 20.0) -> Any:
        """Fires with the screen once ``pattern`` (a regex) is on it."""
        screen = ""
        for _ in range(int(timeout / 0.1)):
            screen = self.screen(name)
            if re.search(pattern, screen, re.M):
                return screen
            yield task.deferLater(_reactor, 0.1, lambda: None)
        raise AssertionError(f"{pattern!r} never showed on {name}'s screen:\n{screen}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.fixture
def realm(tmp_path: Path) -> Any:
    (tmp_path / "realm.toml").write_text(CONFIG)
    spawner = Spawner(str(tmp_path))
    argv = [*twistd_argv(), "-n", "--pidfile=", "chatrealm", "--config", "realm.toml"]
    argv += ["--data-dir", str(tmp_path / "data"), "--listen", "tcp:0:interface=127.0.0.1"]
    proc = spawner(argv)
    port = pytest_twisted.blockon(proc.wait_for(_LISTENING)).group(1)
    yield f"tcp:127.0.0.1:{port}"
    pytest_twisted.blockon(spawner.close())


@pytest.fixture
def tmux(tmp_path: Path) -> Any:
    t = Tmux(tmp_path)
    yield t
    t.kill()


def _client_env(tmp_path: Path, user: str) -> dict[str, str]:
    home = tmp_path / user
    (home / "Downloads").mkdir(parents=True)
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TERM": "tmux-256color",
        "LANG": "C.UTF-8",
    }


@defer.inlineCallbacks
def start_tuis(tmux: Tmux, realm: str, tmp_path: Path, *users: str) -> Any:
    """Start ``chatproto tui`` in tmux for each of ``users`` (accounts that exist; each
    with a home of its own and a log in ``tmp_path``), type each one's password and
    wait until it is online."""
    for user in users:
        argv = [sys.executable, "-m", "chatproto.cli", "tui", "--server", realm]
        argv += ["--user", user, "--log", str(tmp_path / f"{user}.log")]
        tmux.start(user, argv, _client_env(tmp_path, user))
    for user in users:
        yield tmux.wait(user, r"Password")
        tmux.type(user, PASSWORD)
        yield tmux.wait(user, rf"\[online\] {user}@localhost on {realm}")


@pytest_twisted.inlineCallbacks
def test_two_users_chat_in_the_real_tui(realm: str, tmux: Tmux, tmp_path: Path) -> Any:
    for user in ("alice", "bob"):
        conn = yield client.connect(_reactor, realm, user, PASSWORD, register=True)
        yield conn.close()
    yield start_tuis(tmux, realm, tmp_path, "alice", "bob")
    # the login is remembered, the password is not
    saved = (tmp_path / "alice" / "config" / "chatproto" / "tui.toml").read_text()
    assert f'server = "{realm}"' in saved and 'user = "alice"' in saved
    assert PASSWORD not in saved

    tmux.type("alice", "/msg bob hello from alice")
    yield tmux.wait("alice", r"<alice> hello from alice")
    screen = yield tmux.wait("bob", r"alice \(1\)")  # unread in bob's sidebar
    assert "unread 1" in screen
    tmux.key("bob", "C-n")
    yield tmux.wait("bob", r"<alice> hello from alice")
    screen = yield tmux.wait("bob", r"alice \(online\)")  # presence in the title...
    assert re.search(r"^\* alice ", screen, re.M), screen  # ... and the sidebar
    # a multi-line paste stays one message; Enter sends it
    tmux.paste("bob", "first line\nsecond line")
    tmux.key("bob", "Enter")
    # (the continuation line starts under the first: sidebar, then 12 columns in)
    screen = yield tmux.wait("alice", r"<bob> first line\n.{25} {16}second line$")
    assert screen.count("hello from alice") == 1
    # a realm error is a readable line, not a traceback
    tmux.type("bob", "/msg nobody hi")
    screen = yield tmux.wait("bob", r"!! no_such_user: ")
    assert "Traceback" not in screen
    # Tab completes commands and names
    tmux.type("bob", "/ms", enter=False)
    tmux.key("bob", "Tab")
    tmux.type("bob", "ali", enter=False)
    tmux.key("bob", "Tab")
    yield tmux.wait("bob", r"> /msg alice$")  # (capture-pane drops trailing spaces)
    tmux.type("bob", "completed")
    yield tmux.wait("alice", r"<bob> completed")
    # alice sends a file; bob sees it in the conversation and downloads it
    data = os.urandom(300_000)
    (tmp_path / "report.bin").write_bytes(data)
    tmux.type("alice", f"/send {tmp_path / 'report.bin'}")
    yield tmux.wait("bob", r"<alice> \[file\] report\.bin \(293\.0 KiB\)\s+/download")
    tmux.type("bob", "/download")
    yield tmux.wait("bob", r"-- saved report\.bin to ")
    assert (tmp_path / "bob" / "Downloads" / "report.bin").read_bytes() == data
    # /quit closes the connection and ends the program
    tmux.type("alice", "/quit")
    screen = yield tmux.wait("alice", r"exit status \d+")
    assert "exit status 0" in screen, screen
    yield tmux.wait("bob", r"alice \(offline\)")


@pytest_twisted.inlineCallbacks
def test_own_messages_from_another_device_go_to_their_recipient(
    realm: str, tmux: Tmux, tmp_path: Path
) -> Any:
    """What alice sent bob from another device, while her TUI was closed, is in her
    conversation with bob as her own line (it was filed under a conversation with
    herself, as if she had written to herself)."""
    for user in ("alice", "bob"):
        conn = yield client.connect(_reactor, realm, user, PASSWORD, register=True)
        yield conn.close()
    # (a device that acknowledges nothing, like the chatproto command's one-shots)
    phone = yield client.connect(_reactor, realm, "alice", PASSWORD, device="phone", ack=False)
    yield phone.send("bob", "sent from my phone")
    yield phone.close()
    yield start_tuis(tmux, realm, tmp_path, "alice")
    screen = yield tmux.wait("alice", r"^. bob\b")  # the sidebar has bob...
    assert not re.search(r"^. alice\b", screen, re.M), screen  # ...and not herself
    tmux.key("alice", "C-n")
    screen = yield tmux.wait("alice", r"<alice> sent from my phone")
    assert "unread" not in screen, screen  # her own line is not unread


@pytest_twisted.inlineCallbacks
def test_irssi_habits(realm: str, tmux: Tmux, tmp_path: Path) -> Any:
    """What irssi and weechat users type by habit: /query, /me, /names, /whois, /ban,
    /part, Alt-1..9 between windows, and /help in the status window (window 1)."""
    for user in ("alice", "bob"):
        conn = yield client.connect(_reactor, realm, user, PASSWORD, register=True)
        yield conn.close()
    got: list[dict[str, Any]] = []
    bob = yield client.connect(_reactor, realm, "bob", PASSWORD, on_message=got.append)
    try:
        yield start_tuis(tmux, realm, tmp_path, "alice")
        tmux.type("alice", "/query bob hello bob")
        yield tmux.wait("alice", r"<alice> hello bob")
        tmux.type("alice", "/me waves")
        yield tmux.wait("alice", r"\* alice waves")
        # an action is IRC's CTCP ACTION, which IRC users see as one
        yield until_true(lambda: any(m.get("body") == "\x01ACTION waves\x01" for m in got))
        tmux.type("alice", "/whois bob")
        yield tmux.wait("alice", r"-- bob \(bob@localhost\): online, 1 session")
        tmux.type("alice", "/whois nobody")
        yield tmux.wait("alice", r"!! no_such_user: ")
        tmux.type("alice", "/create #dev")
        yield tmux.wait("alice", r"-!- alice created the group")
        yield bob.join("#dev")
        tmux.type("alice", "/names")
        yield tmux.wait("alice", r"#dev: 2 members, 2 online \(\+\): ~alice\+ bob\+")
        tmux.type("alice", "/ban bob spamming")
        yield tmux.wait("alice", r"-!- alice banned bob \(spamming\)")
        # windows: 1 status, 2 #dev, 3 bob (groups first, then people)
        tmux.key("alice", "M-3")
        yield tmux.wait("alice", r"\[3\] bob \(online\)")
        tmux.key("alice", "M-1")
        yield tmux.wait("alice", r"\[1\] status: alice@localhost")
        tmux.key("alice", "M-2")
        yield tmux.wait("alice", r"\[2\] #dev")
        tmux.type("alice", "/help me")  # lands in the status window, which comes up
        screen = yield tmux.wait("alice", r"-- /me TEXT\.\.\.: an action in this conversation")
        assert "[1] status:" in screen, screen
        tmux.type("alice", "/window 2")
        yield tmux.wait("alice", r"\[2\] #dev")
        tmux.type("alice", "/part")
        yield tmux.wait("alice", r"-!- alice left")
    finally:
        yield bob.close()


@defer.inlineCallbacks
def until_true(predicate: Any, timeout: float = 10.0) -> Any:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield task.deferLater(_reactor, 0.05, lambda: None)
    raise AssertionError("condition not met in time")
