"""The control channel (chatproto.ops.control): chatrealmctl and the running realm over
a real UNIX socket, its locks (permission bits, peer credentials, the token), and the
protocol logic over StringTransport."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols import amp

from chatproto import config as configmod
from chatproto import ctl, tap
from chatproto.client import RemoteError, connect
from chatproto.ops import commands as c
from chatproto.ops.control import ControlFactory
from chatproto.ops.service import Operations
from chatproto.testing import make_test_realm
from tests.conftest import until
from tests.test_irc_loopback import SignOnFailed, irc_client
from tests.test_web import Web

PW = "password-one"
NOBODY = 65534


@pytest.fixture
def short_dir() -> Any:
    """A directory with a short path (UNIX socket paths are short), which other users
    may enter: the socket's own permission bits are what keeps them out."""
    path = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _write_config(tmp_path: Path, sock: Path, **sections: dict[str, Any]) -> Path:
    tables = {
        "realm": {"data_dir": str(tmp_path / "data"), "listen": ["tcp:0:interface=127.0.0.1"]},
        "auth": {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1},
        "storage": {"synchronous": "NORMAL"},
        "control": {"socket": str(sock)},
        **sections,
    }
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "realm.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Running:
    """A realm process wired by tap.build, in this process, on the test reactor."""

    def __init__(self, conf: Path) -> None:
        self.conf = str(conf)
        self.cfg = configmod.load(self.conf)
        self.cfg.check()
        self.top, self.realm = tap.build(self.cfg, _reactor)
        self.ops: Operations = self.top.getServiceNamed("operations")
        self.stopped: defer.Deferred[None] = defer.Deferred()
        self.ops.stop_process = lambda: self.stopped.callback(None)
        self.top.privilegedStartService()
        self.top.startService()

    def port(self, factory_class: str) -> int:
        for svc in self.top:
            if isinstance(svc, tap.ListenerService) and svc.port is not None:
                if type(svc.factory).__name__ == factory_class:
                    return int(svc.port.getHost().port)
        raise AssertionError(f"no {factory_class} listener")

    def listener(self, factory_class: str) -> Any:
        return next(
            s
            for s in self.top
            if isinstance(s, tap.ListenerService) and type(s.factory).__name__ == factory_class
        )

    def ctl(self, *argv: str) -> defer.Deferred[int]:
        """chatrealmctl in a thread (it blocks on the socket; the realm answers here)."""
        return deferToThread(ctl.main, ["--config", self.conf, *argv])

    def stop(self) -> Any:
        return self.top.stopService() if self.top.running else None


@pytest.fixture
def pwfile(tmp_path: Path) -> str:
    path = tmp_path / "pw"
    path.write_text("a-new-password\n")
    return str(path)


@defer.inlineCallbacks
def _three_sessions(r: Running, user: str) -> Any:
    """``user`` logged in natively, over IRC and from a browser (WebSocket)."""
    native = yield connect(_reactor, f"tcp:127.0.0.1:{r.port('ClientFactory')}", user, PW)
    yield native.synced
    irc = yield irc_client(r.port("IRCFactory"), user, PW)
    yield irc.signed_on
    web_listener = r.listener("WebSite")
    web = Web(r.realm, web_listener.factory, web_listener.port)
    response, _ = yield web.request("POST", "/api/login", {"user": user, "password": PW})
    assert response.code == 200
    cookie = response.headers.getRawHeaders("set-cookie")[0].split(";")[0].split("=", 1)[1]
    ws = yield web.websocket(cookie)
    yield ws.call("hello", version=1)
    reply = yield ws.call("login")
    assert reply["type"] == "result", reply
    yield until(lambda: len(r.realm.sessions.of(f"{user}@localhost")) == 3)
    return native, irc, ws, cookie, web


def _everything(tmp_path: Path, short_dir: Path) -> Path:
    return _write_config(
        tmp_path,
        short_dir / "control.sock",
        web={"listen": ["tcp:0:interface=127.0.0.1"]},
        irc={"enabled": True, "listen": ["tcp:0:interface=127.0.0.1"], "flood_rate": 0.0},
    )


@pytest.mark.parametrize("command", ["passwd", "deluser"])
@pytest_twisted.inlineCallbacks
def test_passwd_and_deluser_end_native_web_and_irc_sessions_at_once(
    command: str, tmp_path: Path, short_dir: Path, pwfile: str, capsys: Any
) -> Any:
    r = Running(_everything(tmp_path, short_dir))
    try:
        yield r.realm.create_user("alice", PW)
        native, irc, ws, cookie, web = yield _three_sessions(r, "alice")
        argv = (
            ["passwd", "alice", "--password-file", pwfile]
            if command == "passwd"
            else [command, "alice"]
        )
        status = yield r.ctl(*argv)
        done = time.monotonic()
        out, err = capsys.readouterr()
        assert status == 0, err
        assert out.strip().endswith("by the running realm (3 sessions ended)")
        # every connection is closed within a second of the answer
        yield until(
            lambda: native.protocol.lost and irc.lost.called and ws.closed.called, timeout=1.0
        )
        assert time.monotonic() - done < 1.0
        assert r.realm.sessions.of("alice@localhost") == ()
        expected = "session_ended" if command == "passwd" else "auth_failed"
        assert native.protocol.last_error.code == expected
        # the browser's login is gone too: its cookie logs nobody in
        response, _ = yield web.request("GET", "/api/session", cookie=cookie)
        assert response.code == 401
        if command == "passwd":
            again = yield connect(
                _reactor, f"tcp:127.0.0.1:{r.port('ClientFactory')}", "alice", "a-new-password"
            )
            yield again.close()
        else:
            assert not (yield r.realm.store.user_exists("alice"))
    finally:
        yield r.stop()


@pytest_twisted.inlineCallbacks
def test_kick_and_sessions_over_the_socket(tmp_path: Path, short_dir: Path, capsys: Any) -> Any:
    r = Running(_everything(tmp_path, short_dir))
    try:
        for name in ("alice", "bob"):
            yield r.realm.create_user(name, PW)
        yield _three_sessions(r, "alice")
        bob = yield connect(
            _reactor, f"tcp:127.0.0.1:{r.port('ClientFactory')}", "bob", PW, device="laptop"
        )
        status = yield r.ctl("sessions")
        out, err = capsys.readouterr()
        assert status == 0, err
        rows = [line.split() for line in out.splitlines()[1:]]
        assert sorted((row[0], row[1]) for row in rows) == [
            ("alice@localhost", "irc"),
            ("alice@localhost", "native"),
            ("alice@localhost", "web"),
            ("bob@localhost", "native"),
        ]
        assert ["laptop", "127.0.0.1"] == [rows[-1][2], rows[-1][3]]
        status = yield r.ctl("kick", "ALICE", "--reason", "spam")
        out, err = capsys.readouterr()
        assert (status, out) == (0, "kicked alice@localhost: 3 sessions ended\n"), err
        assert r.realm.sessions.of("alice@localhost") == ()
        assert len(r.realm.sessions.of("bob@localhost")) == 1
        # refusals of the realm are one line, exit 1
        status = yield r.ctl("kick", "nobody@elsewhere.example")
        _, err = capsys.readouterr()
        assert status == 1 and err.startswith("chatrealmctl: invalid name")
        # a name with no account is an error, not "0 sessions ended" (an operator's typo)
        for command in (("kick", "ghost"), ("sessions", "revoke", "ghost")):
            status = yield r.ctl(*command)
            out, err = capsys.readouterr()
            assert (status, out, err) == (1, "", "chatrealmctl: no user ghost@localhost\n")
        status = yield r.ctl("deluser", "ghost")
        _, err = capsys.readouterr()
        assert (status, err) == (1, "chatrealmctl: no user ghost@localhost\n")
        yield bob.close()
    finally:
        yield r.stop()


@pytest_twisted.inlineCallbacks
def test_without_a_running_realm_ctl_changes_the_store_and_says_so(
    tmp_path: Path, short_dir: Path, pwfile: str, capsys: Any
) -> Any:
    conf = _write_config(tmp_path, short_dir / "control.sock")
    r = Running(conf)
    yield r.realm.create_user("alice", PW)
    yield r.stop()
    assert not (short_dir / "control.sock").exists()  # removed at a clean stop
    status = yield deferToThread(
        ctl.main, ["--config", str(conf), "passwd", "alice", "--password-file", pwfile]
    )
    out, _ = capsys.readouterr()
    assert (status, out) == (
        0,
        "password changed for alice@localhost in the store (the realm is not running)\n",
    )
    # A socket left by a killed realm (nobody listens): not running either.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_dir / "control.sock"))
    stale.close()
    status = yield deferToThread(ctl.main, ["--config", str(conf), "deluser", "alice"])
    out, _ = capsys.readouterr()
    assert (status, out) == (0, "deleted alice@localhost in the store (the realm is not running)\n")
    for command in ("kick alice", "sessions", "reload-tls", "drain"):
        status = yield deferToThread(ctl.main, ["--config", str(conf), *command.split()])
        _, err = capsys.readouterr()
        assert status == 1 and "the realm is not running" in err
    # ...and the next realm replaces the stale socket.
    r = Running(conf)
    try:
        assert stat.S_ISSOCK(os.stat(short_dir / "control.sock").st_mode)
        status = yield r.ctl("sessions")
        assert (status, capsys.readouterr().out) == (0, "no sessions\n")
    finally:
        yield r.stop()


@pytest_twisted.inlineCallbacks
def test_a_second_realm_on_the_same_socket_does_not_start(tmp_path: Path, short_dir: Path) -> Any:
    conf = _write_config(tmp_path, short_dir / "control.sock")
    first = Running(conf)
    try:
        cfg = configmod.load(str(conf))
        cfg.data_dir = str(tmp_path / "other")
        cfg.check()
        top, realm = tap.build(cfg, _reactor)
        with pytest.raises(SystemExit, match="another realm is running"):
            top.privilegedStartService()
        yield realm.store.close()
        assert first.ops.readiness  # the first one is untouched
        status = yield first.ctl("sessions")
        assert status == 0
    finally:
        yield first.stop()


def test_a_socket_path_too_long_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = configmod.Config(data_dir="/tmp/" + "d" * 120)
    with pytest.raises(configmod.ConfigError, match=r"control\.socket"):
        cfg.check()
    cfg.control.enabled = False
    cfg.check()


@pytest_twisted.inlineCallbacks
def test_a_suspended_user_is_out_everywhere_until_unsuspended(
    tmp_path: Path, short_dir: Path, capsys: Any
) -> Any:
    conf = _everything(tmp_path, short_dir)
    r = Running(conf)
    try:
        for name in ("alice", "bob"):
            yield r.realm.create_user(name, PW)
        native, irc, ws, _cookie, web = yield _three_sessions(r, "alice")
        status = yield r.ctl("suspend", "alice", "--reason", "spam")
        out, err = capsys.readouterr()
        assert (status, out) == (
            0,
            "suspended alice@localhost by the running realm (3 sessions ended)\n",
        ), err
        yield until(
            lambda: native.protocol.lost and irc.lost.called and ws.closed.called, timeout=1.0
        )
        assert native.protocol.last_error.code == "account_suspended"
        assert any("this account is suspended: spam" in line for line in irc.raw)
        chat = f"tcp:127.0.0.1:{r.port('ClientFactory')}"
        # no login anywhere: native, IRC, web
        with pytest.raises(RemoteError) as e:
            yield connect(_reactor, chat, "alice", PW)
        assert e.value.code == "account_suspended"
        irc2 = yield irc_client(r.port("IRCFactory"), "alice", PW)
        with pytest.raises(SignOnFailed, match="closed before the welcome"):
            yield irc2.signed_on
        yield irc2.lost
        assert any("suspended" in line for line in irc2.raw)
        response, body = yield web.request("POST", "/api/login", {"user": "alice", "password": PW})
        assert response.code >= 400 and json.loads(body)["code"] == "account_suspended"
        # messages to her are refused
        bob = yield connect(_reactor, chat, "bob", PW)
        with pytest.raises(RemoteError) as e:
            yield bob.send("alice", "hello?")
        assert e.value.code == "account_suspended"
        yield bob.close()
    finally:
        yield r.stop()
    # it lasts: a restarted realm still refuses her, until unsuspend (without a realm
    # running: in the store)
    r = Running(conf)
    try:
        # the realm reads its suspensions as it starts (after the accounts and the
        # browser logins): wait for that, not for the listener alone
        yield until(lambda: r.realm.admin.is_suspended("alice"))
        chat = f"tcp:127.0.0.1:{r.port('ClientFactory')}"
        with pytest.raises(RemoteError) as e:
            yield connect(_reactor, chat, "alice", PW)
        assert e.value.code == "account_suspended"
    finally:
        yield r.stop()
    status = yield deferToThread(ctl.main, ["--config", str(conf), "unsuspend", "alice"])
    out, _ = capsys.readouterr()
    assert (status, out) == (
        0,
        "suspension of alice@localhost lifted in the store (the realm is not running)\n",
    )
    r = Running(conf)
    try:
        alice = yield connect(_reactor, f"tcp:127.0.0.1:{r.port('ClientFactory')}", "alice", PW)
        yield alice.close()
        status = yield r.ctl("unsuspend", "alice")
        _, err = capsys.readouterr()
        assert (status, err) == (1, "chatrealmctl: alice@localhost is not suspended\n")
    finally:
        yield r.stop()


# the locks ----------------------------------------------------------------------------


#: A Python another user may run (this one may live in root's home).
OTHER_PYTHON = "/usr/bin/python3"


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OTHER_PYTHON, "-c", code],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "")},
        cwd="/",
    )


_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1] if len(sys.argv) > 1 else {path!r})
except PermissionError:
    print("EACCES"); sys.exit(0)
s.settimeout(10)
try:
    s.sendall(b"\\x00\\x04_ask\\x00\\x011\\x00\\x08_command\\x00\\x06Status\\x00\\x00")
    data = s.recv(4096)
except (BrokenPipeError, ConnectionResetError):
    data = b""
print("CLOSED" if not data else "ANSWERED " + repr(data))
"""


@pytest_twisted.inlineCallbacks
def test_the_socket_refuses_other_users(tmp_path: Path, short_dir: Path) -> Any:
    sock = short_dir / "control.sock"
    r = Running(_write_config(tmp_path, sock))
    try:
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(str(sock) + ".token").st_mode) == 0o600
        if os.geteuid() != 0 or not os.path.exists(OTHER_PYTHON):
            pytest.skip("needs root and a system Python to run as another user (bits checked)")
        # another user: the permission bits stop it at connect()
        out = yield deferToThread(_as_nobody, _CONNECT.format(path=str(sock)))
        assert out.stdout.strip() == "EACCES", out.stderr
        # with the bits opened by mistake, the realm still closes its connection at once
        # (peer credentials), before any command is read
        os.chmod(sock, 0o666)
        out = yield deferToThread(_as_nobody, _CONNECT.format(path=str(sock)))
        assert out.stdout.strip() == "CLOSED", out.stderr
        # and it cannot read the token
        out = yield deferToThread(_as_nobody, f"open({str(sock) + '.token'!r})")
        assert "PermissionError" in out.stderr
    finally:
        yield r.stop()


@pytest_twisted.inlineCallbacks
def test_nothing_is_answered_before_authentication(tmp_path: Path, short_dir: Path) -> Any:
    sock = short_dir / "control.sock"
    r = Running(_write_config(tmp_path, sock))
    try:

        def raw(box: bytes) -> bytes:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            s.settimeout(10)
            s.sendall(box)
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    return b"".join(chunks)
                chunks.append(data)

        status = amp.Box({b"_ask": b"1", b"_command": b"Status"}).serialize()
        out = yield deferToThread(raw, status)
        assert b"NOT_AUTHENTICATED" in out and b"pid" not in out  # and then closed
        wrong = amp.Box({b"_ask": b"1", b"_command": b"Authenticate", b"token": b"guess"})
        out = yield deferToThread(raw, wrong.serialize() + status)
        assert b"wrong token" in out and b"pid" not in out and b"sessions" not in out
    finally:
        yield r.stop()


# drain and TLS ----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_drain_flips_ready_then_closes_listeners_and_sessions(
    tmp_path: Path, short_dir: Path, capsys: Any
) -> Any:
    conf = _write_config(
        tmp_path, short_dir / "control.sock", metrics={"listen": ["tcp:0:interface=127.0.0.1"]}
    )
    r = Running(conf)
    try:
        from tests.test_metrics import _get

        ops_port = r.port("OpsSite")
        chat = f"tcp:127.0.0.1:{r.port('ClientFactory')}"
        yield r.realm.create_user("alice", PW)
        alice = yield connect(_reactor, chat, "alice", PW)
        assert (yield _get(ops_port, "/ready"))[0] == 200
        draining = r.ctl("drain", "--grace", "1")
        yield until(lambda: r.ops.draining)
        code, body = yield _get(ops_port, "/ready")
        assert code == 503 and json.loads(body)["checks"]["draining"] == "draining"
        # during the grace the realm still serves
        bob_conn = yield connect(_reactor, chat, "alice", PW, device="second")
        yield alice.send("alice", "still here")
        status = yield draining
        out, err = capsys.readouterr()
        assert status == 0, err
        assert "2 sessions ended" in out
        yield until(lambda: alice.protocol.lost and bob_conn.protocol.lost, timeout=1.0)
        assert alice.protocol.last_error.code == "shutting_down"
        with pytest.raises(error.ConnectionRefusedError):
            yield connect(_reactor, chat, "alice", PW)
        yield r.stopped  # and the process is told to stop once ctl has its answer
    finally:
        yield r.stop()


def _certs(directory: Path, name: str) -> dict[str, str]:
    from chatproto import tls

    return tls.write_dev_certs(str(directory / name), "localhost")


@pytest_twisted.inlineCallbacks
def test_reload_tls_is_seen_by_a_new_client(tmp_path: Path, short_dir: Path, capsys: Any) -> Any:
    from chatproto import tls

    first = _certs(tmp_path, "first")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first["cert"], live / "cert.pem")
    shutil.copy(first["key"], live / "key.pem")
    conf = _write_config(
        tmp_path,
        short_dir / "control.sock",
        tls={
            "certificate": str(live / "cert.pem"),
            "private_key": str(live / "key.pem"),
            "port": 0,
        },
    )
    r = Running(conf)
    try:
        listener = next(
            s for s in r.top if isinstance(s, tap.ListenerService) and s.tls is not None
        )
        port = listener.port.getHost().port
        yield r.realm.create_user("alice", PW)

        @defer.inlineCallbacks
        def seen(ca: str) -> Any:
            conn = yield connect(
                _reactor, f"tls:127.0.0.1:{port}", "alice", PW, realm="localhost", ca=ca
            )
            cert = conn.protocol.transport.getPeerCertificate().to_cryptography()
            return conn, tls.fingerprint(cert)

        old_conn, fp = yield seen(first["ca"])
        assert fp == tls.fingerprint(Path(first["cert"]).read_bytes())
        # a bad pair (another key): refused, and the listener keeps its certificate
        second = _certs(tmp_path, "second")
        shutil.copy(second["cert"], live / "cert.pem")
        status = yield r.ctl("reload-tls")
        _, err = capsys.readouterr()
        assert status == 1 and err.startswith("chatrealmctl: ssl:"), err
        still, fp = yield seen(first["ca"])
        assert fp == tls.fingerprint(Path(first["cert"]).read_bytes())
        yield still.close()
        # the new pair: a new client sees it, the open connection stays up
        shutil.copy(second["key"], live / "key.pem")
        status = yield r.ctl("reload-tls")
        out, err = capsys.readouterr()
        new_fp = tls.fingerprint(Path(second["cert"]).read_bytes())
        assert status == 0 and new_fp in out, err
        conn, fp = yield seen(second["ca"])
        assert fp == new_fp
        yield old_conn.send("alice", "the old connection is still up")
        yield conn.close()
        yield old_conn.close()
    finally:
        yield r.stop()


# the protocol, without sockets -------------------------------------------------------


def _pump(client: amp.AMP, ct: StringTransport, server: amp.AMP, st: StringTransport) -> None:
    for _ in range(10):  # bounded: each round moves what the other side wrote
        moved = False
        for data, to in ((ct, server), (st, client)):
            out = data.value()
            if out:
                data.clear()
                for i in range(len(out)):  # one byte at a time
                    to.dataReceived(out[i : i + 1])
                moved = True
        if not moved:
            return


def test_control_protocol_over_string_transports() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    ops = Operations(realm, clock)
    factory = ControlFactory(ops, "the-token")
    server = factory.buildProtocol(None)
    st = StringTransport()
    server.makeConnection(st)
    client = amp.AMP()
    ct = StringTransport()
    client.makeConnection(ct)

    results: list[Any] = []
    client.callRemote(c.Status).addBoth(results.append)
    _pump(client, ct, server, st)
    assert results[0].check(c.NotAuthenticated) and st.disconnecting

    server = factory.buildProtocol(None)
    st = StringTransport()
    server.makeConnection(st)
    client = amp.AMP()
    ct = StringTransport()
    client.makeConnection(ct)
    client.callRemote(c.Authenticate, token="the-token").addBoth(results.append)
    client.callRemote(c.Kick, user="bad name!", reason="").addBoth(results.append)
    client.callRemote(c.ListSessions, offset=0, limit=1000).addBoth(results.append)
    client.callRemote(c.Status).addBoth(results.append)
    _pump(client, ct, server, st)
    assert results[1] == {"realm": "localhost", "pid": os.getpid()}
    assert results[2].check(c.ControlError) and str(results[2].value).startswith("bad_address")
    assert results[3].check(c.ControlError) and "limit" in str(results[3].value)
    assert results[4]["sessions"] == 0 and results[4]["draining"] is False
    assert not st.disconnecting
