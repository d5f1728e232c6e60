"""chatrealmctl: every subcommand and its error paths, run in-process on temp data dirs.

Errors must be one ``chatrealmctl: ...`` line on stderr with a non-zero status, never a
traceback; one test runs the real module as a subprocess to check exactly that.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import argon2
import pytest
import pytest_twisted
from cryptography import x509
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor as _reactor

from chatproto import ctl
from chatproto.ctlaccess import IN_STORE_UNREACHABLE
from chatproto.realm import RealmService, StoreChecker
from chatproto.store.backend import make_store
from chatproto.store.sqlite import SQLiteDB, SQLiteStore
from tests.conftest import pg_schema, postgresql_or_skip

PASSWORD = "s3cret-password"


@pytest.fixture
def conf(tmp_path: Path) -> str:
    """A config file with a temp data dir and cheap argon2 parameters."""
    path = tmp_path / "realm.toml"
    path.write_text(
        "[realm]\n"
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n"
        "[auth]\n"
        "argon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n"
    )
    return str(path)


@pytest.fixture
def pwfile(tmp_path: Path) -> str:
    path = tmp_path / "pw"
    path.write_text(PASSWORD + "\n")
    return str(path)


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    status = ctl.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def stored_hash(conf: str, name: str) -> str | None:
    cfg = ctl.load_config(_ns(conf))
    if not os.path.exists(cfg.database_path):
        return None
    db = SQLiteDB(cfg.database_path)
    try:
        return db.password_hash(name)
    finally:
        db.close()


def verifies(pwhash: str | None, password: str) -> bool:
    try:
        return pwhash is not None and argon2.PasswordHasher().verify(pwhash, password)
    except argon2.exceptions.VerificationError:
        return False


# accounts ---------------------------------------------------------------------------


def test_adduser_from_file_then_list(capsys: Any, conf: str, pwfile: str) -> None:
    status, out, err = run(capsys, "--config", conf, "adduser", "Alice", "--password-file", pwfile)
    assert (status, out, err) == (0, "created alice@localhost\n", "")
    pwhash = stored_hash(conf, "alice")
    assert verifies(pwhash, PASSWORD)  # the trailing newline is not part of it
    assert pwhash is not None and "$argon2id$" in pwhash and "m=1024,t=1,p=1" in pwhash

    status, out, _ = run(capsys, "--config", conf, "list-users")
    assert (status, out) == (0, "alice@localhost\n")


def test_adduser_from_stdin(capsys: Any, conf: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\r\n"))
    status, out, _ = run(capsys, "--config", conf, "adduser", "bob", "--password-file", "-")
    assert (status, out) == (0, "created bob@localhost\n")
    assert verifies(stored_hash(conf, "bob"), PASSWORD)


@pytest.fixture
def terminal(monkeypatch: Any) -> None:
    """stdin is a terminal: chatrealmctl prompts (getpass, patched by the test)."""
    monkeypatch.setattr(ctl, "_interactive", lambda: True)
    monkeypatch.delenv(ctl.PASSWORD_ENV, raising=False)


def test_adduser_prompts_twice(capsys: Any, conf: str, monkeypatch: Any, terminal: None) -> None:
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return PASSWORD

    monkeypatch.setattr(ctl.getpass, "getpass", ask)
    status, _, _ = run(capsys, "--config", conf, "adduser", "carol")
    assert status == 0
    assert prompts == ["New password for carol@localhost: ", "Repeat the password: "]
    assert verifies(stored_hash(conf, "carol"), PASSWORD)


def test_prompt_mismatch_and_eof(capsys: Any, conf: str, monkeypatch: Any, terminal: None) -> None:
    answers = iter([PASSWORD, PASSWORD + "x"])
    monkeypatch.setattr(ctl.getpass, "getpass", lambda prompt: next(answers))
    status, _, err = run(capsys, "--config", conf, "adduser", "carol")
    assert (status, err) == (1, "chatrealmctl: the passwords do not match\n")

    def eof(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr(ctl.getpass, "getpass", eof)
    status, _, err = run(capsys, "--config", conf, "adduser", "carol")
    assert (status, err) == (1, "chatrealmctl: no password given\n")
    assert stored_hash(conf, "carol") is None


def test_adduser_existing_user(capsys: Any, conf: str, pwfile: str) -> None:
    assert run(capsys, "--config", conf, "adduser", "alice", "--password-file", pwfile)[0] == 0
    before = stored_hash(conf, "alice")
    status, out, err = run(capsys, "--config", conf, "adduser", "ALICE", "--password-file", pwfile)
    assert (status, out, err) == (1, "", "chatrealmctl: user alice@localhost already exists\n")
    assert stored_hash(conf, "alice") == before


@pytest.mark.parametrize(
    "content, message",
    [
        ("short\n", "a password must be 8 to 1024 characters"),
        ("x" * 1025, "a password must be 8 to 1024 characters"),
        ("", "no password given"),
        ("first line\nsecond line\n", "the password must be a single line"),
    ],
)
def test_bad_passwords(capsys: Any, conf: str, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad"
    path.write_text(content)
    status, _, err = run(capsys, "--config", conf, "adduser", "dave", "--password-file", str(path))
    assert status == 1
    assert err.startswith("chatrealmctl: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(ctl.load_config(_ns(conf)).database_path)


def test_bad_name_and_unreadable_file(capsys: Any, conf: str, tmp_path: Path) -> None:
    status, _, err = run(capsys, "--config", conf, "adduser", "no way", "--password-file", "x")
    assert status == 1 and err.startswith("chatrealmctl: invalid name 'no way'")
    missing = str(tmp_path / "missing")
    status, _, err = run(capsys, "--config", conf, "adduser", "erin", "--password-file", missing)
    assert (status, err) == (
        1,
        f"chatrealmctl: cannot read password file {missing}: No such file or directory\n",
    )
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\xfa not utf-8")
    status, _, err = run(
        capsys, "--config", conf, "adduser", "erin", "--password-file", str(binary)
    )
    assert status == 1 and err.startswith(f"chatrealmctl: cannot read password file {binary}")


def test_passwd(capsys: Any, conf: str, pwfile: str, tmp_path: Path) -> None:
    run(capsys, "--config", conf, "adduser", "alice", "--password-file", pwfile)
    new = tmp_path / "new"
    new.write_text("another-password\n")
    status, out, _ = run(capsys, "--config", conf, "passwd", "Alice", "--password-file", str(new))
    assert (status, out) == (
        0,
        "password changed for alice@localhost in the store (the realm is not running)\n",
    )
    pwhash = stored_hash(conf, "alice")
    assert verifies(pwhash, "another-password") and not verifies(pwhash, PASSWORD)

    status, _, err = run(capsys, "--config", conf, "passwd", "zed", "--password-file", str(new))
    assert (status, err) == (1, "chatrealmctl: no user zed@localhost\n")


def test_deluser(capsys: Any, conf: str, pwfile: str) -> None:
    run(capsys, "--config", conf, "adduser", "alice", "--password-file", pwfile)
    run(capsys, "--config", conf, "adduser", "bob", "--password-file", pwfile)
    status, out, _ = run(capsys, "--config", conf, "deluser", "alice")
    assert (status, out) == (0, "deleted alice@localhost in the store (the realm is not running)\n")
    assert run(capsys, "--config", conf, "list-users")[1] == "bob@localhost\n"
    status, _, err = run(capsys, "--config", conf, "deluser", "alice")
    assert (status, err) == (1, "chatrealmctl: no user alice@localhost\n")


def test_commands_refuse_to_create_a_missing_database(capsys: Any, conf: str) -> None:
    for argv in (["list-users"], ["deluser", "x"], ["passwd", "x", "--password-file", "-"]):
        status, _, err = run(capsys, "--config", conf, *argv)
        assert status == 1 and err.startswith("chatrealmctl: no database at "), argv
    assert not os.path.exists(ctl.load_config(_ns(conf)).database_path)


def _ns(conf: str, *extra: str) -> Any:
    return ctl.build_parser().parse_args(["--config", conf, *extra, "list-users"])


def test_data_dir_overrides_config(capsys: Any, conf: str, pwfile: str, tmp_path: Path) -> None:
    other = tmp_path / "other"
    argv = ["--config", conf, "--data-dir", str(other)]
    assert run(capsys, *argv, "adduser", "alice", "--password-file", pwfile)[0] == 0
    assert (other / "realm.sqlite3").exists()
    assert run(capsys, *argv, "list-users")[1] == "alice@localhost\n"
    assert run(capsys, "--config", conf, "list-users")[0] == 1  # not in the config's dir


@pytest_twisted.inlineCallbacks
def test_the_realm_accepts_the_password(conf: str, pwfile: str) -> Any:
    """A hash written by chatrealmctl verifies through the realm's own cred checker."""
    assert ctl.main(["--config", conf, "adduser", "bob", "--password-file", pwfile]) == 0
    cfg = ctl.load_config(_ns(conf))
    realm = RealmService(cfg, SQLiteStore(cfg.database_path, _reactor), _reactor)
    yield realm.startService()
    try:
        checker = StoreChecker(realm.store, realm.hasher)
        name = yield checker.requestAvatarId(UsernamePassword(b"Bob", PASSWORD.encode()))
        assert name == "bob"
        with pytest.raises(UnauthorizedLogin):
            yield checker.requestAvatarId(UsernamePassword(b"bob", b"wrong-password"))
    finally:
        yield realm.stopService()


# certificates -----------------------------------------------------------------------


def test_gen_certs(capsys: Any, conf: str, tmp_path: Path) -> None:
    d = tmp_path / "certs"
    status, out, err = run(capsys, "--config", conf, "gen-certs", "--dir", str(d))
    assert (status, err) == (0, "")
    files = {p.name for p in d.iterdir()}
    assert files == {"ca.pem", "ca.key", "localhost.pem", "localhost.key"}
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (d / "localhost.key").stat().st_mode & 0o777 == 0o600
    listen = f"ssl:7421:interface=127.0.0.1:privateKey={d}/localhost.key:certKey={d}/localhost.pem"
    # the realm's plain listener is named too (--listen replaces the config's list)
    assert f" --listen tcp:7420:interface=127.0.0.1 --listen '{listen}'" in out
    assert f"twistd -n chatrealm --config {conf} --listen" in out
    assert '"tls:127.0.0.1:7421"' in out and f'ca="{d}/ca.pem"' in out
    client_line = f"chatproto --server tls:127.0.0.1:7421 --realm localhost --ca {d}/ca.pem"
    assert client_line in out
    assert "CA certificate (new)" in out
    ca = (d / "ca.pem").read_bytes()

    status, out, _ = run(
        capsys,
        "--config",
        conf,
        "gen-certs",
        "--dir",
        str(d),
        "--realm",
        "Chat.Example",
        "--name",
        "www.chat.example",
        "--name",
        "192.0.2.7",
    )
    assert status == 0 and "CA certificate (reused)" in out and 'realm="chat.example"' in out
    assert (d / "ca.pem").read_bytes() == ca
    cert = x509.load_pem_x509_certificate((d / "chat.example.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["chat.example", "www.chat.example"]

    status, out, _ = run(capsys, "--config", conf, "gen-certs", "--dir", str(d), "--new-ca")
    assert status == 0 and (d / "ca.pem").read_bytes() != ca


def test_gen_certs_default_dir_and_errors(capsys: Any, conf: str, tmp_path: Path) -> None:
    status, _, _ = run(capsys, "--config", conf, "gen-certs")
    assert status == 0
    assert (tmp_path / "data" / "tls" / "localhost.pem").exists()

    status, _, err = run(capsys, "--config", conf, "gen-certs", "--realm", "bad_realm!")
    assert status == 1 and err.startswith("chatrealmctl: invalid realm name")
    status, _, err = run(capsys, "--config", conf, "gen-certs", "--name", "not a name")
    assert status == 1 and "neither a DNS name nor an IP address" in err

    (tmp_path / "data" / "tls" / "ca.key").unlink()
    status, _, err = run(capsys, "--config", conf, "gen-certs")
    assert status == 1 and "ca.key is missing" in err

    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = run(capsys, "--config", conf, "gen-certs", "--dir", str(blocker / "sub"))
    assert status == 1 and err.startswith("chatrealmctl: cannot write certificates in ")


# configuration and usage ------------------------------------------------------------


def test_gen_certs_takes_the_tls_port_from_the_config(
    capsys: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """The second realm of the README's federation pair is told its own TLS port."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    for name, port in (("a", 7441), ("b", 7541)):
        status, out, err = run(
            capsys, "--config", f"config/federation-{name}.toml", "gen-certs", "--dir", "certs"
        )
        assert status == 0, err
        realm = f"{name}.example"
        assert f"--server tls:127.0.0.1:{port} --realm {realm} --ca {tmp_path}/certs/ca.pem" in out
        assert f"ssl:{port}:" in out and "7421" not in out


def test_check_config(capsys: Any, conf: str, tmp_path: Path) -> None:
    status, out, err = run(capsys, "check-config", conf)  # the natural form
    assert (status, err) == (0, "")
    assert f"configuration OK: {conf}" in out
    status, _, err = run(capsys, "--config", conf, "check-config", str(tmp_path / "other.toml"))
    assert status == 2 and "two configuration files" in err
    status, out, err = run(capsys, "--config", conf, "check-config")
    assert (status, err) == (0, "")
    assert "realm:     localhost" in out
    assert f"data dir:  {tmp_path / 'data'}" in out
    assert "listen:    tcp:7420:interface=127.0.0.1" in out


def test_check_config_errors(capsys: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[realm]\nname = 'no good!'\n")
    status, out, err = run(capsys, "--config", str(bad), "check-config")
    assert (status, out) == (2, "")
    assert err.startswith("chatrealmctl: configuration: realm.name: invalid realm name")
    bad.write_text("[limits]\nnonsense = 1\n")
    status, _, err = run(capsys, "--config", str(bad), "check-config")
    assert (status, err) == (2, "chatrealmctl: configuration: unknown key limits.nonsense\n")
    bad.write_text("not toml [")
    assert run(capsys, "--config", str(bad), "check-config")[0] == 2
    missing = str(tmp_path / "missing.toml")
    status, _, err = run(capsys, "--config", missing, "list-users")
    assert (status, err) == (2, f"chatrealmctl: configuration: config file {missing!r} not found\n")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[realm]\nlisten = ["bogus:1"]\n', "bad endpoint description 'bogus:1'"),
        ('[realm]\nlisten = ["tcp:notaport"]\n', "bad endpoint description 'tcp:notaport'"),
        ('[web]\nlisten = ["tcp:x"]\n', "bad endpoint description 'tcp:x'"),
        ('[irc]\nenabled = true\nlisten = ["nope:1"]\n', "bad endpoint description 'nope:1'"),
        ('[metrics]\nlisten = ["tcp"]\n', "bad endpoint description 'tcp'"),
        ('[realm]\nplugins = ["no_such_module_x:setup"]\n', "realm.plugins: cannot import"),
    ],
)
def test_check_config_refuses_what_start_up_refuses(
    capsys: Any, tmp_path: Path, text: str, named: str
) -> None:
    """check-config loads a file "the way twistd chatrealm does": a file it passes
    must not stop the realm at start-up (it passed bad endpoint descriptions)."""
    path = tmp_path / "realm.toml"
    path.write_text(text)
    status, out, err = run(capsys, "check-config", str(path))
    assert (status, out) == (2, ""), out
    assert err.startswith(f"chatrealmctl: configuration: {named}"), err
    assert len(err.splitlines()) == 1


def test_commands_of_the_running_realm_say_when_the_control_channel_is_off(
    capsys: Any, tmp_path: Path
) -> None:
    """With [control] enabled = false the realm may well run: "the realm is not
    running (no control socket at ...)" sent the operator looking for a dead process."""
    path = tmp_path / "realm.toml"
    path.write_text(f"[realm]\ndata_dir = {str(tmp_path / 'data')!r}\n[control]\nenabled = false\n")
    for command in (["kick", "alice"], ["sessions"], ["reload-tls"], ["drain"]):
        status, out, err = run(capsys, "--config", str(path), *command)
        assert (status, out) == (1, ""), command
        assert err == (
            "chatrealmctl: this needs the running realm, reached over its control channel, "
            "which this configuration turns off ([control] enabled = false)\n"
        ), command
    # what changes the store says it did not reach a realm that may run
    SQLiteDB(str(tmp_path / "data" / "realm.sqlite3")).close()
    status, out, err = run(capsys, "--config", str(path), "suspend", "ghost")
    assert (status, err) == (1, "chatrealmctl: no user ghost@localhost\n")
    status, out, err = run(capsys, "--config", str(path), "sessions", "web")
    assert (status, out) == (0, f"no browser logins {IN_STORE_UNREACHABLE}\n"), err
    assert "a running realm is not told" in IN_STORE_UNREACHABLE


def test_an_empty_data_dir_is_an_error_not_the_default(capsys: Any) -> None:
    status, out, err = run(capsys, "--data-dir", "", "list-users")
    assert (status, out, err) == (
        2,
        "",
        "chatrealmctl: configuration: realm.data_dir: an empty directory name\n",
    )


def test_usage_errors(capsys: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # the default data dir is relative to it
    status, _, err = run(capsys)
    assert status == 2 and "the following arguments are required: COMMAND" in err
    status, _, err = run(capsys, "frobnicate")
    assert status == 2 and "invalid choice: 'frobnicate'" in err
    status, _, err = run(capsys, "adduser")
    assert status == 2 and "the following arguments are required: name" in err
    status, _, err = run(capsys, "adduser", "x", "--password", "on-the-command-line")
    assert status == 2 and "unrecognized arguments" in err
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "gen-certs" in out
    assert os.listdir(tmp_path) == []


def test_password_from_the_environment_or_stdin_without_a_terminal(
    conf: str, tmp_path: Path
) -> None:
    """Without a terminal, adduser never prompts (no GetPassWarning): the password
    comes from $CHATPROTO_PASSWORD, else the one line stdin holds; an empty stdin is a
    clear error."""

    def ctl_run(*argv: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != ctl.PASSWORD_ENV}
        return subprocess.run(
            [sys.executable, "-m", "chatproto.ctl", "--config", conf, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**environ, **env},
        )

    done = ctl_run("adduser", "carol", CHATPROTO_PASSWORD=PASSWORD)
    assert (done.returncode, done.stdout) == (0, "created carol@localhost\n"), done.stderr
    assert done.stderr == "chatrealmctl: the password of carol@localhost is $CHATPROTO_PASSWORD\n"
    assert verifies(stored_hash(conf, "carol"), PASSWORD)
    done = ctl_run("adduser", "dave", stdin=PASSWORD + "\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "created dave@localhost\n", "")
    assert verifies(stored_hash(conf, "dave"), PASSWORD)
    done = ctl_run("passwd", "dave", stdin="")
    assert done.returncode == 1 and "Warning" not in done.stderr
    assert done.stderr.startswith("chatrealmctl: no password: stdin is not a terminal and empty")


def test_console_script_subprocess(conf: str, tmp_path: Path) -> None:
    def ctl_run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "chatproto.ctl", "--config", conf, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    done = ctl_run("adduser", "alice", "--password-file", "-", stdin=PASSWORD + "\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "created alice@localhost\n", "")
    done = ctl_run("list-users")
    assert (done.returncode, done.stdout) == (0, "alice@localhost\n")
    done = ctl_run("deluser", "nobody")
    assert (done.returncode, done.stderr) == (1, "chatrealmctl: no user nobody@localhost\n")


# on PostgreSQL ----------------------------------------------------------------------


def _pg_conf(tmp_path: Path, dsn: str, schema: str, name: str = "pg.toml") -> str:
    path = tmp_path / name
    path.write_text(
        "[realm]\n"
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n"
        "[auth]\n"
        "argon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n"
        "[storage]\n"
        'backend = "postgresql"\n'
        f"dsn = {json.dumps(dsn)}\n"
        f"schema = {json.dumps(schema)}\n"
    )
    return str(path)


@pytest.fixture
def pg_conf(tmp_path: Path) -> str:
    """A config on a new schema of the tests' PostgreSQL server."""
    return _pg_conf(tmp_path, postgresql_or_skip(), pg_schema())


def test_accounts_on_postgresql(capsys: Any, pg_conf: str, pwfile: str) -> None:
    status, _, err = run(capsys, "--config", pg_conf, "list-users")
    assert status == 1 and err.startswith("chatrealmctl: no chatproto store in postgresql://")
    assert "(schema chatproto_t" in err and "wrong --config or storage.schema?" in err
    for name in ("bob", "alice"):
        status, out, _ = run(
            capsys, "--config", pg_conf, "adduser", name, "--password-file", pwfile
        )
        assert (status, out) == (0, f"created {name}@localhost\n")
    status, _, err = run(capsys, "--config", pg_conf, "adduser", "bob", "--password-file", pwfile)
    assert (status, err) == (1, "chatrealmctl: user bob@localhost already exists\n")
    assert run(capsys, "--config", pg_conf, "list-users")[1] == "alice@localhost\nbob@localhost\n"
    cfg = ctl.load_config(_ns(pg_conf))
    with ctl.open_db(cfg) as db:
        before = db.password_hash("bob")
    other = Path(pwfile).with_name("pw2")
    other.write_text("another-password\n")
    assert run(capsys, "--config", pg_conf, "passwd", "bob", "--password-file", str(other))[0] == 0
    with ctl.open_db(cfg) as db:
        after = db.password_hash("bob")
    assert verifies(before, PASSWORD) and verifies(after, "another-password")
    assert run(capsys, "--config", pg_conf, "deluser", "alice")[1] == (
        "deleted alice@localhost in the store (the realm is not running)\n"
    )
    assert run(capsys, "--config", pg_conf, "list-users")[1] == "bob@localhost\n"
    status, out, _ = run(capsys, "--config", pg_conf, "peers")
    assert status == 0 and "no peers" in out
    status, out, _ = run(capsys, "--config", pg_conf, "check-config")
    assert (
        status == 0
        and f"database:  postgresql://postgres@127.0.0.1:5432/test (schema {cfg.storage.schema})"
        in out
    )


@pytest_twisted.inlineCallbacks
def test_the_realm_on_postgresql_accepts_the_password(pg_conf: str, pwfile: str) -> Any:
    assert ctl.main(["--config", pg_conf, "adduser", "bob", "--password-file", pwfile]) == 0
    cfg = ctl.load_config(_ns(pg_conf))
    realm = RealmService(cfg, make_store(cfg, _reactor), _reactor)
    yield realm.startService()
    try:
        checker = StoreChecker(realm.store, realm.hasher)
        name = yield checker.requestAvatarId(UsernamePassword(b"bob", PASSWORD.encode()))
        assert name == "bob"
        # chatrealmctl works while the realm runs (it does not take the writer lock)
        assert ctl.main(["--config", pg_conf, "adduser", "carol", "--password-file", pwfile]) == 0
        assert (yield realm.store.list_users()) == ["bob", "carol"]
    finally:
        yield realm.stopService()


def test_postgresql_errors_are_one_line(capsys: Any, tmp_path: Path, pwfile: str) -> None:
    dead = _pg_conf(tmp_path, "host=127.0.0.1 port=1 dbname=x user=u connect_timeout=2", "s")
    for argv in (["list-users"], ["adduser", "x", "--password-file", pwfile], ["peers"]):
        status, out, err = run(capsys, "--config", dead, *argv)
        assert status == 1 and out == "", argv
        assert err.startswith("chatrealmctl: cannot connect to postgresql://u@127.0.0.1:1/x"), err
        assert err.count("\n") == 1
    bad = _pg_conf(tmp_path, "", "s", "bad.toml")
    status, _, err = run(capsys, "--config", bad, "list-users")
    assert status == 2 and 'storage.backend "postgresql" needs storage.dsn' in err
    bad = _pg_conf(tmp_path, "host=h", "No-Good", "bad2.toml")
    status, _, err = run(capsys, "--config", bad, "list-users")
    assert status == 2 and "storage.schema must be a lower-case SQL name" in err
    bad = _pg_conf(tmp_path, "host=h what", "s", "bad3.toml")
    status, _, err = run(capsys, "--config", bad, "list-users")
    assert status == 2 and "storage.dsn is not a valid PostgreSQL DSN" in err
