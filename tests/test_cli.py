"""The ``chatproto`` command against a real realm on a loopback socket.

The realm runs in the test process; the command runs as a subprocess driven by a
ProcessProtocol, so the reactor keeps serving the realm meanwhile.  Every process gets a
bounded lifetime (killed on timeout).  Argument parsing is tested in-process.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from chatproto import cli, client, display, failures
from chatproto.protocol import ClientFactory

PASSWORD = "correct horse"
TIMEOUT = 30.0


class _Process(protocol.ProcessProtocol):
    """Collects a subprocess' output; ``ended`` fires with (stdout, stderr, status)."""

    def __init__(self, stdin: bytes | None, on_err: Any = None) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.on_err = on_err
        self.ended: defer.Deferred[tuple[str, str, int]] = defer.Deferred()
        self._timeout: Any = None

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()
        self._timeout = _reactor.callLater(TIMEOUT, self.transport.signalProcess, "KILL")

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data
        if self.on_err is not None:
            self.on_err(self.err.decode())

    def processEnded(self, reason: Any) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        code = reason.value.exitCode
        if code is None:  # killed by a signal
            code = -(reason.value.signal or 1)
        self.ended.callback((self.out.decode(), self.err.decode(), code))


def _env(password: str = PASSWORD) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME")}
    env["CHATPROTO_PASSWORD"] = password
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(
    server: str, user: str, *args: str, password: str = PASSWORD, stdin: bytes | None = None
) -> _Process:
    proc = _Process(stdin)
    argv = [sys.executable, "-m", "chatproto.cli", "--server", server, "--user", user, *args]
    _reactor.spawnProcess(proc, sys.executable, argv, env=_env(password))
    return proc


def run_cli(server: str, user: str, *args: str, **kw: Any) -> defer.Deferred[Any]:
    return spawn(server, user, *args, **kw).ended


@pytest.fixture
def server(realm: Any) -> Any:
    port = _reactor.listenTCP(0, ClientFactory(realm), interface="127.0.0.1")
    yield f"tcp:127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@defer.inlineCallbacks
def _register(server: str, *users: str) -> Any:
    for user in users:
        out, err, code = yield run_cli(server, user, "register")
        assert code == 0, err
        assert out.strip() == f"registered {user}@localhost"


# end to end ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_register_send_history(server: str) -> Any:
    yield _register(server, "alice", "bob")

    out, err, code = yield run_cli(server, "alice", "send", "bob", "hello", "there")
    assert code == 0, err
    fields = dict(part.split("=", 1) for part in out.split())
    assert fields["pos"].isdigit() and fields["id"]

    out, err, code = yield run_cli(server, "alice", "send", "bob", "-", stdin=b"line 1\nline 2\n")
    assert code == 0, err

    out, err, code = yield run_cli(server, "bob", "history", "alice", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["body"] for m in lines] == ["hello there", "line 1\nline 2"]
    assert {m["from"] for m in lines} == {"alice@localhost"}
    assert lines[0]["msg_id"] == fields["id"] and lines[0]["pos"] == int(fields["pos"])

    out, err, code = yield run_cli(server, "bob", "history", "alice", "--limit", "1")
    assert code == 0, err
    assert out.endswith("] alice@localhost: line 1\nline 2\n")
    assert out.startswith("[")


@pytest_twisted.inlineCallbacks
def test_listen_backlog_then_live(server: str, realm: Any) -> Any:
    yield _register(server, "alice", "carol")
    # A one-shot command before the first listen must not hide the backlog from it.
    out, err, code = yield run_cli(server, "alice", "send", "carol", "backlog")
    assert code == 0, err
    out, err, code = yield run_cli(server, "carol", "who")
    assert code == 0, err

    listening: defer.Deferred[None] = defer.Deferred()

    def on_err(text: str) -> None:
        if "listening as" in text and not listening.called:
            listening.callback(None)

    proc = _Process(None, on_err)
    argv = [sys.executable, "-m", "chatproto.cli", "--server", server, "--user", "carol"]
    argv += ["listen", "--count", "2", "--json"]
    _reactor.spawnProcess(proc, sys.executable, argv, env=_env())
    yield defer.DeferredList([listening, proc.ended], fireOnOneCallback=True)
    assert listening.called, proc.err

    conn = yield client.connect(_reactor, server, "alice", PASSWORD, device="test")
    try:
        yield conn.send("carol", "live one")
    finally:
        yield conn.close()
    out, err, code = yield proc.ended
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    # Presence frames (alice is carol's conversation partner) keep their "type".
    msgs = [m for m in lines if m.get("type") != "presence"]
    assert [m["body"] for m in msgs] == ["backlog", "live one"]
    assert all(p["user"] == "alice@localhost" for p in lines if p.get("type") == "presence")
    assert msgs[1]["from"] == "alice@localhost" and msgs[1]["to"] == "carol@localhost"
    assert "Traceback" not in err

    # Both were acknowledged for device "cli": the next listen sees only newer ones.
    out, err, code = yield run_cli(server, "alice", "send", "carol", "after")
    assert code == 0, err
    out, err, code = yield run_cli(server, "carol", "listen", "--count", "1")
    assert code == 0, err
    assert out.endswith("] alice@localhost: after\n"), out


@pytest_twisted.inlineCallbacks
def test_listen_says_when_it_has_reconnected(realm: Any) -> Any:
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = f"tcp:127.0.0.1:{port.getHost().port}"
    try:
        yield _register(server, "alice", "erin")
        notes: list[str] = []
        listening: defer.Deferred[None] = defer.Deferred()
        back: defer.Deferred[None] = defer.Deferred()

        def on_err(text: str) -> None:
            notes.append(text)
            if "listening as" in text and not listening.called:
                listening.callback(None)
            if "reconnected" in "".join(notes) and not back.called:
                back.callback(None)

        proc = _Process(None, on_err)
        argv = [sys.executable, "-m", "chatproto.cli", "--server", server, "--user", "erin"]
        _reactor.spawnProcess(proc, sys.executable, [*argv, "listen", "--count", "1"], env=_env())
        yield defer.DeferredList([listening, proc.ended], fireOnOneCallback=True)
        assert listening.called, proc.err
        (erin,) = [p for p in factory.connections if p.session.user_id == "erin@localhost"]
        erin.transport.abortConnection()  # the realm side drops it
        yield defer.DeferredList([back, proc.ended], fireOnOneCallback=True)
        assert back.called, proc.err
        out, err, code = yield run_cli(server, "alice", "send", "erin", "after the drop")
        assert code == 0, err
        out, err, code = yield proc.ended
        assert code == 0, err
        assert "after the drop" in out
        lost = err.index("connection lost; reconnecting")
        assert err.index("reconnected; resuming where it left off") > lost
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_listen_count_acks_only_what_was_printed(server: str) -> Any:
    yield _register(server, "alice", "dave")
    for body in ("m1", "m2", "m3"):
        out, err, code = yield run_cli(server, "alice", "send", "dave", body)
        assert code == 0, err
    seen = []
    for _ in range(3):
        out, err, code = yield run_cli(server, "dave", "listen", "--count", "1", "--json")
        assert code == 0, err
        seen += [json.loads(line)["body"] for line in out.splitlines()]
    assert seen == ["m1", "m2", "m3"]


@pytest_twisted.inlineCallbacks
def test_who(server: str) -> Any:
    yield _register(server, "alice", "bob")
    bob = yield client.connect(_reactor, server, "bob", PASSWORD)
    out, err, code = yield run_cli(server, "alice", "who", "--json")
    assert code == 0, err
    users = [json.loads(line) for line in out.splitlines()]
    # alice's one-shot command is a quiet session (no presence for her contacts), but
    # she is there: listed as herself, with no other session
    assert users == [
        {"user": "alice@localhost", "sessions": 0, "you": True},
        {"user": "bob@localhost", "sessions": 1},
    ]
    out, err, code = yield run_cli(server, "alice", "who")
    assert code == 0, err
    assert out.splitlines() == ["alice@localhost (you)", "bob@localhost (1 session)"]
    out, err, code = yield run_cli(server, "bob", "who")  # bob's own session counts
    assert out.splitlines() == ["bob@localhost (you; 1 session)", "nobody else is online"]
    # a group with nobody else online says so (it printed nothing at all)
    out, err, code = yield run_cli(server, "alice", "create", "#dev")
    assert code == 0, err
    out, err, code = yield run_cli(server, "alice", "who", "#dev")
    assert out.splitlines() == ["alice@localhost (you)", "nobody else in #dev is online"], err
    yield bob.join("#dev")
    out, err, code = yield run_cli(server, "alice", "who", "#dev")
    assert out.splitlines() == ["alice@localhost (you)", "bob@localhost (1 session)"], err
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_errors(server: str) -> Any:
    yield _register(server, "alice")

    _out, err, code = yield run_cli(server, "alice", "who", password="wrong password")
    assert code == 1
    assert err.strip() == "chatproto: auth_failed: unknown user or wrong password"

    _out, err, code = yield run_cli(server, "alice", "listen", password="wrong password")
    assert code == 1
    assert "chatproto: auth_failed" in err and "Traceback" not in err

    _out, err, code = yield run_cli(server, "alice", "send", "nobody", "hi")
    assert code == 1
    assert err.startswith("chatproto: no_such_user: ")

    _out, err, code = yield run_cli(server, "alice", "register")
    assert code == 1
    assert err.startswith("chatproto: user_exists")

    _out, err, code = yield run_cli(server, "alice", "history", "alice", "--before", "x")
    assert code == 2
    assert "usage:" in err


@pytest_twisted.inlineCallbacks
def test_connection_refused(server: str) -> Any:
    port = _reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    number = port.getHost().port
    yield port.stopListening()
    refused = f"tcp:127.0.0.1:{number}"
    for command in ("who", "listen"):
        _out, err, code = yield run_cli(refused, "alice", command)
        assert code == 1
        assert err.startswith(f"chatproto: cannot connect to {refused}: ")
        assert "refused" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


@pytest_twisted.inlineCallbacks
def test_groups_create_join_send_history_members_kick(server: str) -> Any:
    yield _register(server, "alice", "bob", "carol")

    out, err, code = yield run_cli(
        server, "alice", "create", "Lounge", "--topic", "tea and talk", "--history", "all"
    )
    assert code == 0, err
    assert out.strip() == "created #lounge@localhost"
    for user, group in (("bob", "lounge"), ("carol", "#lounge@localhost")):
        out, err, code = yield run_cli(server, user, "join", group)
        assert code == 0, err
        assert out.strip() == "joined #lounge@localhost"

    out, err, code = yield run_cli(server, "alice", "groups")
    assert code == 0, err
    assert out.strip() == "#lounge@localhost (3 members, public, history all): tea and talk"

    out, err, code = yield run_cli(server, "bob", "send", "#lounge", "hi", "all")
    assert code == 0, err
    fields = dict(part.split("=", 1) for part in out.split())
    out, err, code = yield run_cli(server, "alice", "send", "#lounge", "-", stdin=b"welcome\n")
    assert code == 0, err

    out, err, code = yield run_cli(server, "carol", "history", "#lounge", "--json")
    assert code == 0, err
    items = [json.loads(line) for line in out.splitlines()]
    assert [m["body"] for m in items if m["kind"] == "text"] == ["hi all", "welcome"]
    assert [m["meta"]["event"] for m in items if m["kind"] == "event"] == [
        "created",
        "joined",
        "joined",
    ]
    [hi] = [m for m in items if m["body"] == "hi all"]
    assert hi["pos"] == int(fields["pos"]) and hi["to"] == "#lounge@localhost"

    out, err, code = yield run_cli(server, "carol", "history", "#lounge")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("] #lounge@localhost: alice created the group; topic: tea and talk")
    assert lines[1].endswith("] #lounge@localhost: bob joined")
    assert lines[3].endswith("] #lounge@localhost bob@localhost: hi all")

    out, err, code = yield run_cli(server, "alice", "role", "lounge", "bob", "admin")
    assert code == 0, err
    assert out.strip() == "bob is now admin in #lounge@localhost"
    # bob is online through a client; carol's one-shot command is a quiet session.
    bob = yield client.connect(_reactor, server, "bob", PASSWORD)
    out, err, code = yield run_cli(server, "carol", "members", "#lounge", "--json")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"user": "alice@localhost", "role": "owner", "online": False},
        {"user": "bob@localhost", "role": "admin", "online": True},
        {"user": "carol@localhost", "role": "member", "online": False},
    ]
    out, err, code = yield run_cli(server, "carol", "members", "lounge")
    assert code == 0, err
    assert out.splitlines() == [
        "alice@localhost owner",
        "bob@localhost admin (online)",
        "carol@localhost member",
    ]
    yield bob.close()

    _out, err, code = yield run_cli(server, "carol", "kick", "lounge", "bob")
    assert code == 1
    assert err.startswith("chatproto: forbidden: ")
    out, err, code = yield run_cli(server, "bob", "kick", "lounge", "carol", "--reason", "noise")
    assert code == 0, err
    assert out.strip() == "kicked carol from #lounge@localhost"
    _out, err, code = yield run_cli(server, "carol", "send", "#lounge", "hello?")
    assert code == 1
    assert err.startswith("chatproto: not_member: ")
    out, err, code = yield run_cli(server, "alice", "history", "#lounge", "--limit", "1")
    assert code == 0, err
    assert out.strip().endswith("] #lounge@localhost: bob kicked carol (noise)")

    _out, err, code = yield run_cli(server, "alice", "join", "nowhere")
    assert code == 1
    assert err.strip() == "chatproto: no_such_group: no group #nowhere@localhost"
    _out, err, code = yield run_cli(server, "alice", "create", "not a name")
    assert code == 1
    assert err.startswith("chatproto: bad_address: ") and "Traceback" not in err


@pytest_twisted.inlineCallbacks
def test_group_admin_commands(server: str) -> Any:
    yield _register(server, "alice", "bob")
    out, err, code = yield run_cli(server, "alice", "create", "club", "--invite-only")
    assert code == 0, err
    _out, err, code = yield run_cli(server, "bob", "join", "club")
    assert (code, err.split(":")[1].strip()) == (1, "not_invited")
    out, err, code = yield run_cli(server, "alice", "groups")
    assert (code, out) == (0, "")  # invite-only groups are not listed
    for argv, expected in (
        (("invite", "club", "bob"), "invited bob to #club@localhost"),
        (("topic", "club", "members", "only"), "topic of #club@localhost set"),
        (("ban", "club", "bob", "--reason", "rude"), "banned bob from #club@localhost"),
        (("unban", "club", "bob"), "unbanned bob from #club@localhost"),
        (("invite", "club", "bob"), "invited bob to #club@localhost"),
    ):
        out, err, code = yield run_cli(server, "alice", *argv)
        assert code == 0, err
        assert out.strip() == expected
    out, err, code = yield run_cli(server, "bob", "join", "club")
    assert code == 0, err
    out, err, code = yield run_cli(server, "bob", "info", "club", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["topic"] == "members only" and info["role"] == "member"
    assert info["visibility"] == "invite" and info["members"] == 2
    out, err, code = yield run_cli(server, "bob", "leave", "#club")
    assert (code, out.strip()) == (0, "left #club@localhost"), err
    out, err, code = yield run_cli(server, "alice", "status", "away", "back", "soon")
    assert code == 0, err
    out, err, code = yield run_cli(server, "alice", "delete", "club")
    assert (code, out.strip()) == (0, "deleted #club@localhost"), err


@pytest_twisted.inlineCallbacks
def test_listen_prints_group_events_and_presence(server: str) -> Any:
    yield _register(server, "alice", "carol")
    out, err, code = yield run_cli(server, "alice", "create", "lounge")
    assert code == 0, err
    out, err, code = yield run_cli(server, "carol", "join", "lounge")
    assert code == 0, err

    listening: defer.Deferred[None] = defer.Deferred()

    def on_err(text: str) -> None:
        if "listening as" in text and not listening.called:
            listening.callback(None)

    proc = _Process(None, on_err)
    argv = [sys.executable, "-m", "chatproto.cli", "--server", server, "--user", "carol"]
    argv += ["listen", "--count", "3", "--status", "busy", "--status-text", "reading"]
    _reactor.spawnProcess(proc, sys.executable, argv, env=_env())
    yield defer.DeferredList([listening, proc.ended], fireOnOneCallback=True)
    assert listening.called, proc.err

    seen: list[dict[str, Any]] = []
    conn = yield client.connect(
        _reactor, server, "alice", PASSWORD, device="test", on_presence=seen.append
    )
    try:
        yield conn.synced
        busy = {"type": "presence", "user": "carol@localhost", "status": "busy", "text": "reading"}
        # carol's status reaches alice: in the login snapshot, or (when the listening
        # process was slow to send it, on a loaded machine) just after
        for _ in range(500):
            if busy in seen:
                break
            yield deferLater(_reactor, 0.01, lambda: None)
        assert busy in seen, seen
        assert all(f["user"] == "carol@localhost" for f in seen)
        yield conn.send("#lounge", "hi carol")
        yield conn.kick("lounge", "carol", reason="bye")
    finally:
        yield conn.close()
    out, err, code = yield proc.ended
    assert code == 0, err
    lines = out.splitlines()
    assert "* alice is online" in lines
    events = [line for line in lines if not line.startswith("* ")]
    assert len(events) == 3, out
    assert events[0].endswith("] #lounge@localhost: carol joined")
    assert events[1].endswith("] #lounge@localhost alice@localhost: hi carol")
    assert events[2].endswith("] #lounge@localhost: alice kicked carol (bye)")
    assert "Traceback" not in err


# in-process -------------------------------------------------------------------------


def test_parse_defaults() -> None:
    args = cli.parse_args(["--user", "alice", "send", "bob", "hello", "world"])
    assert args.server == cli.DEFAULT_SERVER
    assert args.device == "cli" and args.realm is None and args.ca is None
    assert args.command == "send" and args.peer == "bob" and args.body == "hello world"


def test_parse_options_after_the_command() -> None:
    args = cli.parse_args(["history", "bob", "--user", "al", "--server", "tls:h:1", "--limit", "5"])
    assert (args.user, args.server, args.limit) == ("al", "tls:h:1", 5)
    assert args.before is None and args.after is None and not args.json


def test_parse_stdin_body() -> None:
    assert cli.parse_args(["--user", "a", "send", "b", "-"]).body is None
    assert cli.parse_args(["--user", "a", "send", "b", "-", "x"]).body == "- x"


def test_parse_listen() -> None:
    args = cli.parse_args(["--user", "a", "--device", "laptop", "listen", "--count", "3"])
    assert (args.command, args.count, args.device, args.json) == ("listen", 3, "laptop", False)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--user", "a"],
        ["--user", "a", "send", "b"],
        ["--user", "a", "history", "b", "--before", "1", "--after", "2"],
        ["--user", "a", "history", "b", "--limit", "0"],
        ["--user", "a", "listen", "--count", "-1"],
        ["--user", "a", "frobnicate"],
        ["--user", "a", "who", "--password", "x"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: Any) -> None:
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_user_is_required(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.delenv(cli.USER_ENV, raising=False)
    assert cli.main(["who"]) == 2
    assert "--user is required" in capsys.readouterr().err


def test_password_from_env_or_prompt(monkeypatch: Any) -> None:
    assert cli.read_password("a", True, {cli.PASSWORD_ENV: "s3cret!!"}) == "s3cret!!"
    answers = iter(["one", "two"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(failures.CommandError, match="do not match"):
        cli.read_password("a", True, {})
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: "same")
    assert cli.read_password("a", True, {}) == "same"


def test_format_message() -> None:
    msg = {"type": "msg", "pos": 3, "from": "a@x", "to": "b@x", "ts": 0.0, "body": "hi"}
    assert display.format_message(msg, False).endswith("] a@x: hi")
    assert display.format_message(msg, False, me="a@x").endswith("] a@x -> b@x: hi")
    bounce = {**msg, "kind": "bounce", "from": "b@y", "to": "a@x", "body": "refused by y"}
    assert display.format_message(bounce, False).endswith("] ! not delivered: refused by y")
    assert json.loads(display.format_message(msg, True)) == {
        k: v for k, v in msg.items() if k != "type"
    }


def test_parse_group_commands() -> None:
    args = cli.parse_args(["--user", "a", "create", "g", "--invite-only", "--history", "all"])
    assert (args.group, args.invite_only, args.history, args.topic) == ("g", True, "all", "")
    args = cli.parse_args(["--user", "a", "kick", "#g", "bob", "--reason", "spam"])
    assert (args.command, args.group, args.member, args.reason) == ("kick", "#g", "bob", "spam")
    args = cli.parse_args(["--user", "a", "topic", "g", "new", "topic"])
    assert args.text == "new topic"
    args = cli.parse_args(["--user", "a", "status", "away", "at", "lunch"])
    assert (args.status, args.text) == ("away", "at lunch")
    args = cli.parse_args(["--user", "a", "who", "g"])
    assert args.group == "g"
    assert cli.parse_args(["--user", "a", "who"]).group is None
    args = cli.parse_args(["--user", "a", "listen", "--status", "away"])
    assert (args.status, args.status_text, args.no_presence) == ("away", "", False)
    assert cli.parse_args(["--user", "a", "listen", "--no-presence"]).no_presence


@pytest.mark.parametrize(
    "argv",
    [
        ["--user", "a", "create"],
        ["--user", "a", "create", "g", "--history", "some"],
        ["--user", "a", "role", "g", "bob", "king"],
        ["--user", "a", "status", "offline"],
        ["--user", "a", "listen", "--status", "invisible"],
        ["--user", "a", "kick", "g"],
        ["--user", "a", "topic", "g"],
    ],
)
def test_group_usage_errors_exit_2(argv: list[str], capsys: Any) -> None:
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "meta, sender, expected",
    [
        ({"event": "joined", "user": "bob@x"}, "bob@x", "bob joined"),
        ({"event": "left", "user": "bob@x"}, "bob@x", "bob left"),
        ({"event": "kicked", "user": "bob@x", "reason": "spam"}, "al@x", "al kicked bob (spam)"),
        ({"event": "banned", "user": "bob@y"}, "al@x", "al banned bob@y"),
        ({"event": "unbanned", "user": "bob@x"}, "al@x", "al unbanned bob"),
        ({"event": "invited", "user": "bob@x"}, "al@x", "al invited bob"),
        ({"event": "topic", "topic": "tea"}, "al@x", "al set the topic: tea"),
        ({"event": "topic", "topic": ""}, "al@x", "al cleared the topic"),
        ({"event": "role", "user": "bob@x", "role": "admin"}, "al@x", "al made bob admin"),
        (
            {"event": "created", "visibility": "invite"},
            "al@x",
            "al created the group (invite-only)",
        ),
        ({"event": "deleted"}, "al@x", "al deleted the group"),
        ({"event": "renamed"}, "al@x", "al: renamed"),
    ],
)
def test_format_group_event(meta: dict[str, Any], sender: str, expected: str) -> None:
    msg = {"type": "msg", "pos": 9, "kind": "event", "from": sender, "to": "#g@x", "ts": 0.0}
    msg["body"], msg["meta"] = "", meta
    assert display.format_message(msg, False).endswith(f"] #g@x: {expected}")
    assert json.loads(display.format_message(msg, True))["meta"] == meta


def test_format_group_message_and_presence() -> None:
    msg = {"type": "msg", "pos": 3, "kind": "text", "from": "a@x", "to": "#g@x", "ts": 0.0}
    msg["body"] = "hi"
    assert display.format_message(msg, False, me="a@x").endswith("] #g@x a@x: hi")
    frame = {"type": "presence", "user": "bob@x", "status": "away", "text": "lunch"}
    assert display.format_presence(frame, False, "x") == "* bob is away: lunch"
    assert display.format_presence(frame, False) == "* bob@x is away: lunch"
    assert json.loads(display.format_presence(frame, True)) == frame
    online = {"type": "presence", "user": "bob@x", "status": "online"}
    assert display.format_presence(online, False, "x") == "* bob is online"


def test_explain() -> None:
    err = failures.explain(client.RemoteError("no_such_user", "no user x"), "tcp:h:1")
    assert (str(err), err.status) == ("no_such_user: no user x", 1)
    assert str(failures.explain(ValueError("boom"), "s")) == "unexpected error: ValueError: boom"


def test_explain_words_tls_failures() -> None:
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch

    from chatproto.failures import explain

    err = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("other.example"))])
    text = str(explain(err, "tls:127.0.0.1:7421"))
    assert "does not match the expected name" in text and "tls:127.0.0.1:7421" in text


def test_group_changes_on_another_realm_are_reported_as_pending(capsys: Any) -> None:
    cli._group_done({"group": "#dev@x", "pos": 12}, "joined #dev@x")
    cli._group_done({"group": "#dev@h.example", "pos": 0}, "joined #dev@h.example")
    assert capsys.readouterr().out.splitlines() == [
        "joined #dev@x",
        "joined #dev@h.example: pending until h.example (the group's home realm) confirms; "
        "a refusal comes back as '! not delivered'",
    ]


def test_who_shows_members_on_other_realms_as_online(capsys: Any) -> None:
    entries = [
        {"user": "bob@localhost", "sessions": 2},
        {"user": "alice@a.example"},  # online there (its realm counts no sessions here)
        {"user": "carol@a.example", "status": "away", "text": "lunch"},
    ]

    class Conn:
        user = "bob@localhost"

        def who(self, group: Any) -> Any:
            return defer.succeed(entries)

    args = SimpleNamespace(group="#dev", json=False)
    d = defer.ensureDeferred(cli._who(Conn(), args))  # type: ignore[arg-type]
    assert d.called
    assert capsys.readouterr().out.splitlines() == [
        "bob@localhost (you; 2 sessions)",
        "alice@a.example (online, another realm)",
        "carol@a.example (another realm) away: lunch",
    ]


@pytest_twisted.inlineCallbacks
def test_an_untrusted_certificate_names_the_ca_option(realm: Any, tmp_path: Any) -> Any:
    """``certificate verify failed`` says what usually cures it: --ca (a development
    CA from gen-certs is in no system trust store)."""
    from twisted.internet.endpoints import serverFromString

    from chatproto import tls

    certs = tls.write_dev_certs(str(tmp_path / "tls"), "localhost")
    desc = tls.server_description(certs["cert"], certs["key"], 0)
    port = yield serverFromString(_reactor, desc).listen(ClientFactory(realm))
    server = f"tls:127.0.0.1:{port.getHost().port}"
    try:
        _out, err, code = yield run_cli(server, "alice", "register")
        assert code == 1, err
        assert "certificate verify failed" in err and "give it with --ca FILE" in err, err
        assert "gen-certs" in err and "Traceback" not in err
        _out, err, code = yield run_cli(server, "alice", "--ca", certs["ca"], "register")
        assert code == 0, err
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_listen_shows_own_messages_from_another_device_as_outgoing(server: str) -> Any:
    """A message alice sent from another device reads ``alice -> bob`` in her listen,
    in the backlog as live (it read ``alice: ...`` as if bob had written it)."""
    yield _register(server, "alice", "bob")
    out, err, code = yield run_cli(server, "alice", "send", "bob", "offline A")
    assert code == 0, err
    out, err, code = yield run_cli(server, "alice", "listen", "--count", "1", "--no-presence")
    assert code == 0, err
    assert out.endswith("] alice@localhost -> bob@localhost: offline A\n"), out
    out, err, code = yield run_cli(server, "bob", "send", "alice", "reply")
    assert code == 0, err
    out, err, code = yield run_cli(server, "alice", "listen", "--count", "1", "--no-presence")
    assert out.endswith("] bob@localhost: reply\n"), out


def test_actions_read_as_actions() -> None:
    """An action (/me from the TUI or an IRC client: CTCP ACTION) is shown as one, not
    with its control characters."""
    msg = {
        "ts": 0,
        "kind": "text",
        "from": "alice@x",
        "to": "bob@x",
        "body": "\x01ACTION waves\x01",
    }
    assert display.format_message(msg, False).endswith("] * alice@x waves")
    assert display.format_message(msg, False, me="alice@x").endswith("] * alice@x -> bob@x waves")
    group = {**msg, "to": "#dev@x"}
    assert display.format_message(group, False).endswith("] #dev@x * alice@x waves")
    assert json.loads(display.format_message(msg, True))["body"] == msg["body"]  # --json: as is
