"""``twistd chatrealm`` options and wiring, tested the way Twisted's
``words/test/test_tap.py`` does: ``Options().parseOptions([...])`` in-process."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet import reactor as _reactor
from twisted.plugin import getPlugins
from twisted.python import usage

from chatproto import client, tap
from chatproto.collector import CollectorService
from chatproto.config import DEFAULT_LISTEN
from chatproto.ops.service import Operations
from chatproto.pacing import LoopPacerService
from chatproto.realm import RealmService
from chatproto.store.sqlite import SQLiteDB

FAST_AUTH = """
[auth]
argon2_time_cost = 1
argon2_memory_cost = 1024
argon2_parallelism = 1
"""


def options(*argv: str) -> tap.Options:
    opts = tap.Options()
    opts.parseOptions(list(argv))
    return opts


def config_file(tmp_path: Any, text: str) -> str:
    path = tmp_path / "realm.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    cfg = options().realm_config
    assert cfg.realm == "localhost"
    assert cfg.data_dir == "chatrealm-data"
    assert cfg.listen == [DEFAULT_LISTEN] == ["tcp:7420:interface=127.0.0.1"]
    assert cfg.listen_descriptions() == ["tcp:7420:interface=127.0.0.1"]
    assert cfg.auth.allow_registration is True


def test_listen_is_repeatable_and_replaces_the_config_list(tmp_path: Any) -> None:
    path = config_file(tmp_path, '[realm]\nlisten = ["tcp:1111", "tcp:2222"]\n')
    assert options("--config", path).realm_config.listen == ["tcp:1111", "tcp:2222"]
    cfg = options("--config", path, "--listen", "tcp:3333", "-l", "unix:/tmp/x.sock").realm_config
    assert cfg.listen == ["tcp:3333", "unix:/tmp/x.sock"]


def test_command_line_overrides_the_config_file(tmp_path: Any) -> None:
    path = config_file(
        tmp_path,
        '[realm]\nname = "Example.ORG"\ndata_dir = "from-file"\n'
        "[auth]\nallow_registration = true\n",
    )
    cfg = options("--config", path).realm_config
    assert (cfg.realm, cfg.data_dir, cfg.auth.allow_registration) == (
        "example.org",
        "from-file",
        True,
    )
    cfg = options(
        "--config", path, "--realm", "Other.Example", "--data-dir", "cli-dir", "--no-register"
    ).realm_config
    assert (cfg.realm, cfg.data_dir, cfg.auth.allow_registration) == (
        "other.example",
        "cli-dir",
        False,
    )
    cfg = options("-c", path, "-r", "short.example", "-d", "d2").realm_config
    assert (cfg.realm, cfg.data_dir) == ("short.example", "d2")


@pytest.mark.parametrize(
    "text, named",
    [
        ("[limits]\nbogus = 1\n", "limits.bogus"),
        ("[realm]\ncolour = 'red'\n", "realm.colour"),
        ("[nonsense]\nx = 1\n", "[nonsense]"),
        ("[limits]\nmax_frame = 'big'\n", "limits.max_frame"),
        ("[limits]\nmax_body = true\n", "limits.max_body"),
        ("[auth]\nallow_registration = 1\n", "auth.allow_registration"),
        ("[realm]\nname = 42\n", "realm.name"),
        ("[realm]\nlisten = [1, 2]\n", "realm.listen"),
        ("[realm]\nname = '-bad.example'\n", "realm.name"),
        ("[realm]\ndata_dir = ''\n", "realm.data_dir: an empty directory name"),
        ("[realm]\nname = 'caf\u00e9.example'\n", "realm.name"),
        ("[limits]\nmax_frame = 2048\nmax_body = 4096\n", "limits.max_body"),
        ("[limits]\nmax_frame = 2048\nmax_body = 2048\n", "limits.max_body"),
        ("[limits]\nsend_rate = 0\n", "limits.send_rate"),
        ("[auth]\nregistrations_per_address = -1\n", "auth.registrations_per_address"),
        ("[auth]\nregistration_interval = 0\n", "auth.registration_interval"),
        ("[storage]\nsynchronous = 'OFF'\n", "storage.synchronous"),
        ("[storage]\nbackend = 'postgres'\n", "storage.backend"),
        ("[tls]\ncertificate = '/nonexistent/cert.pem'\n", "/nonexistent/cert.pem"),
        ("[realm]\nlisten = []\n", "nothing to listen on"),
        ("not toml at all = = =\n", "invalid TOML"),
        ("[auth]\nargon2_memory_cost = 8589934592\n", "auth.argon2_memory_cost"),
        ("[auth]\nargon2_time_cost = 4294967296\n", "auth.argon2_time_cost"),
        ("[auth]\nargon2_parallelism = 100000\n", "auth.argon2_parallelism"),
        ("[auth]\nargon2_parallelism = 0\n", "auth.argon2_parallelism"),
        ("[limits]\nhistory_page = 100000000000000000000000\n", "limits.history_page"),
        ("[files]\nmax_file_size = 9007199254740992\n", "files.max_file_size"),
        ("[limits]\nkeepalive_interval = 0.000001\n", "limits.keepalive_interval"),
        ("[limits]\nlogin_timeout = 0.01\n", "limits.login_timeout"),
        ("[files]\ncleanup_interval = 1e-9\n", "files.cleanup_interval"),
        ("[cluster]\npoll_interval = 0.001\n", "cluster.poll_interval"),
        ("[cluster]\nheartbeat = 0.001\n", "cluster.heartbeat"),
        ("[federation]\nkeepalive = 0.001\n", "federation.keepalive"),
        ("[limits]\nsend_rate = nan\n", "limits.send_rate"),
        ("[limits]\nlogin_timeout = inf\n", "limits.login_timeout"),
        ("[auth]\nfailure_delay = -nan\n", "auth.failure_delay"),
        ("[federation]\ngive_up_after = inf\n", "federation.give_up_after"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path: Any, text: str, named: str) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(usage.UsageError) as info:
        options("--config", path)
    assert named in str(info.value)
    assert str(info.value).startswith("configuration: ")


def test_unreadable_config_is_a_usage_error_not_a_traceback(tmp_path: Any) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[limits]\n")
    not_utf8 = r"^configuration: .*binary\.toml: invalid TOML: not UTF-8"
    with pytest.raises(usage.UsageError, match=not_utf8):
        options("--config", str(binary))
    directory = r"^configuration: config file .* cannot be read: Is a directory"
    with pytest.raises(usage.UsageError, match=directory):
        options("--config", str(tmp_path))


def test_empty_command_line_values_are_errors_not_defaults() -> None:
    """--realm "$REALM" with REALM unset ran a realm named localhost."""
    with pytest.raises(usage.UsageError, match=r"^configuration: realm\.name"):
        options("--realm", "")
    with pytest.raises(usage.UsageError, match=r"^configuration: realm\.data_dir: an empty"):
        options("--data-dir", "")


def test_bad_command_line_values_are_usage_errors(tmp_path: Any) -> None:
    with pytest.raises(usage.UsageError, match=r"realm\.name"):
        options("--realm", "not a realm")
    with pytest.raises(usage.UsageError, match="not found"):
        options("--config", str(tmp_path / "missing.toml"))
    with pytest.raises(usage.UsageError):
        options("--no-such-option")


def test_make_service_realm_first_then_one_listener_per_description(tmp_path: Any) -> None:
    opts = options(
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        "unix:" + str(tmp_path / "realm.sock"),
    )
    top = tap.makeService(opts)
    assert isinstance(top, MultiService)
    services = list(top)
    assert isinstance(services[0], RealmService)
    assert isinstance(services[1], Operations)  # readiness and metrics (chatproto.ops)
    assert isinstance(services[-2], LoopPacerService)  # [performance], last
    assert isinstance(services[-1], CollectorService)
    listeners = services[2:-2]
    assert all(isinstance(s, tap.ListenerService) for s in listeners)
    assert [s.description for s in listeners] == [
        "tcp:0:interface=127.0.0.1",
        "unix:" + str(tmp_path / "realm.sock"),
    ]
    assert not top.running  # nothing bound or opened until the service starts


def test_the_data_dir_is_made_owner_only_whatever_the_umask(tmp_path: Any) -> None:
    """It holds the password hashes and every message: not for the other users of a
    shared host, even under twistd -n with a umask of 022 (an existing directory
    keeps the mode its operator gave it)."""
    old = os.umask(0o022)
    try:
        for data in (tmp_path / "realm-data", tmp_path / "sub" / "store"):
            tap.makeService(options("--data-dir", str(data)))
            assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        SQLiteDB(str(tmp_path / "ctl-data" / "realm.sqlite3")).close()  # chatrealmctl's
        assert stat.S_IMODE(os.stat(tmp_path / "ctl-data").st_mode) == 0o700
        kept = tmp_path / "kept"
        kept.mkdir(mode=0o750)
        tap.makeService(options("--data-dir", str(kept)))
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o750
    finally:
        os.umask(old)


@pytest.mark.parametrize("description", ["tcp:0:interface=::1", "nosuchtype:1"])
def test_bad_listen_description_is_a_usage_error(description: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        options("--listen", description)
    assert description in str(info.value)


@pytest_twisted.inlineCallbacks
def test_built_service_serves_and_stops(tmp_path: Any) -> Any:
    opts = options(
        "--config",
        config_file(tmp_path, FAST_AUTH),
        "--data-dir",
        str(tmp_path / "data"),
        "--realm",
        "test.example",
        "--listen",
        "tcp:0:interface=127.0.0.1",
    )
    top, realm = tap.build(opts.realm_config, _reactor)
    assert realm.realm == "test.example"
    top.privilegedStartService()
    top.startService()
    try:
        [listener] = [s for s in top if isinstance(s, tap.ListenerService)]
        assert listener.port is not None
        port = listener.port.getHost().port
        conn = yield client.connect(
            _reactor, f"tcp:127.0.0.1:{port}", "alice", "correct horse", register=True
        )
        assert conn.user == "alice@test.example" and conn.realm == "test.example"
        yield conn.close()
    finally:
        yield top.stopService()
    assert listener.port is None
    assert (tmp_path / "data" / "realm.sqlite3").exists()


def test_twistd_plugin_is_discoverable() -> None:
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "chatrealm"]
    assert len(makers) == 1
    [maker] = makers
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService
    assert maker.description


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "config/realm.toml"], "configuration: config file 'config/realm.toml'"),
        (
            ["--listen", "nosuchtype:1"],
            "configuration: bad endpoint description 'nosuchtype:1'",
        ),
    ],
)
def test_twistd_reports_a_bad_config_in_one_line(
    tmp_path: Any, args: list[str], message: str
) -> None:
    """Under twistd the error is one line, not twistd's whole usage then the error."""
    import subprocess

    from tests.processes import twistd_argv

    done = subprocess.run(
        [*twistd_argv(), "-n", "--pidfile=", "chatrealm", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == "", done.stdout
    assert done.stderr.startswith(f"twistd chatrealm: {message}"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
