"""``chatrealmctl``: administer a realm from the shell.

The command works on the realm's store, not through the realm: accounts go straight
into the SQLite database (:class:`chatproto.store.sqlite.SQLiteDB`) or the PostgreSQL
schema (:class:`chatproto.store.postgresql.PostgresDB`) the configuration names, one
short transaction per change (safe while the realm runs: WAL, or PostgreSQL's own
concurrency), hashed with argon2id and the realm's own ``[auth]`` parameters so the
realm verifies them as its own.  ``gen-certs`` writes development TLS certificates
with :mod:`chatproto.tls`, and ``check-config`` loads a configuration the way
``twistd chatrealm`` does.

Every failure is one line on stderr and a non-zero exit status, never a traceback:
1 for an operation that failed, 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import os
import shlex
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from chatproto import config as configmod
from chatproto import ctlmoderation, tls
from chatproto.accounts import plan_removal, remote_groups_of, replay_groups
from chatproto.address import GUEST_PREFIX, normalise_realm, reserved_name
from chatproto.ctlaccess import (  # noqa: F401  (EXIT_FAILED: part of ctl's API)
    EXIT_FAILED,
    EXIT_USAGE,
    CtlError,
    in_store,
    on_realm_or_store,
    open_db,
    running_realm,
    store_exists,
)
from chatproto.ctlaccess import ask as _ask
from chatproto.ctlaccess import by_realm as _by_realm
from chatproto.ctlaccess import first_line as _first_line
from chatproto.ctlaccess import name_arg as _name
from chatproto.ctlaccess import running_or_fail as _running_or_fail
from chatproto.display import terminal_label
from chatproto.errors import ChatError
from chatproto.groups import Groups
from chatproto.ops import commands
from chatproto.realm import argon2_hasher
from chatproto.realm import check_password as realm_check_password
from chatproto.store import UserExists
from chatproto.store import backend as store_backend
from chatproto.text import check_reason

PROG = "chatrealmctl"
#: The environment variable the ``chatproto`` command reads passwords from, honoured
#: here too (before a prompt), so scripts set passwords the same way for both.
PASSWORD_ENV = "CHATPROTO_PASSWORD"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`CtlError` (``main`` returns, not exits)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CtlError(message, EXIT_USAGE)


# helpers ----------------------------------------------------------------------------


def check_password(password: str) -> None:
    """The realm's own password rule (:func:`chatproto.realm.check_password`)."""
    try:
        realm_check_password(password)
    except ChatError as e:
        raise CtlError(e.message) from None


def _one_line(text: str, source: str) -> str:
    """The password in ``text``: one line, its line ending removed."""
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if "\n" in text or "\r" in text:
        raise CtlError(f"{source}: the password must be a single line")
    if not text:
        raise CtlError(f"{source}: no password given")
    return text


def _interactive() -> bool:
    """True when a person can answer a prompt: stdin is a terminal."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed or detached stdin
        return False


def read_password(
    password_file: str | None,
    prompt_for: str,
    stdin: TextIO | None = None,
    ask: Callable[[str], str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Read a new password for ``prompt_for``, from the first of: ``password_file``
    (``-``: stdin), ``$CHATPROTO_PASSWORD``, a prompt (twice) when stdin is a terminal,
    else the one line stdin holds (so a script never meets getpass's "cannot control
    echo" warning, and an empty stdin is a clear error)."""
    environ = os.environ if environ is None else environ
    if password_file == "-":
        password = _one_line(_read_stdin(stdin), "stdin")
    elif password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CtlError(f"cannot read password file {password_file}: {reason}") from None
        password = _one_line(text, password_file)
    elif environ.get(PASSWORD_ENV):
        password = environ[PASSWORD_ENV]
        print(f"{PROG}: the password of {prompt_for} is ${PASSWORD_ENV}", file=sys.stderr)
    elif ask is not None or _interactive():
        ask = ask if ask is not None else getpass.getpass
        try:
            password = ask(f"New password for {prompt_for}: ")
            again = ask("Repeat the password: ")
        except EOFError:
            raise CtlError("no password given") from None
        if password != again:
            raise CtlError("the passwords do not match")
    else:
        text = _read_stdin(stdin)
        if not text:
            raise CtlError(
                f"no password: stdin is not a terminal and empty (give --password-file "
                f"FILE, set ${PASSWORD_ENV}, or pipe the password in)"
            )
        password = _one_line(text, "stdin")
    check_password(password)
    return password


def _read_stdin(stdin: TextIO | None) -> str:
    source = stdin if stdin is not None else sys.stdin
    try:
        return source.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CtlError(f"cannot read the password from stdin: {e}") from None


def load_config(args: argparse.Namespace) -> configmod.Config:
    """The checked configuration named by ``--config``, with ``--data-dir`` applied.
    ``gen-certs`` makes the certificate files the configuration names, so for it they
    need not exist yet."""
    try:
        cfg = configmod.load(args.config)
        if args.data_dir is not None:  # (empty: refused by check, not the default)
            cfg.data_dir = args.data_dir
        cfg.check(files=args.func is not cmd_gen_certs)
    except configmod.ConfigError as e:
        raise CtlError(f"configuration: {e}", EXIT_USAGE) from None
    return cfg


# commands ---------------------------------------------------------------------------


def cmd_adduser(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = _name(args.name)
    if reserved_name(name):
        raise CtlError(f"names starting with {GUEST_PREFIX!r} are kept for IRC guests")
    user = f"{name}@{cfg.realm}"
    if store_exists(cfg):  # fail before asking for a password
        with open_db(cfg) as db:
            if db.password_hash(name) is not None:
                raise CtlError(f"user {user} already exists")
    password = read_password(args.password_file, user)
    pwhash = argon2_hasher(cfg.auth).hash(password)
    # The database is created only now, so a failed adduser leaves nothing behind.
    with open_db(cfg, create=True) as db:
        try:
            db.create_user(name, pwhash, time.time())
        except UserExists:
            raise CtlError(f"user {user} already exists") from None
    print(f"created {user}")
    return 0


def cmd_passwd(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = _name(args.name)
    user = f"{name}@{cfg.realm}"
    client = running_realm(cfg)
    if client is not None:  # the realm hashes it and ends the old password's sessions
        with client:
            password = read_password(args.password_file, user)
            answer = _ask(client, commands.SetPassword, user=name, password=password)
        print(f"password changed for {user} {_by_realm(answer['closed'])}")
        return 0
    with open_db(cfg) as db:
        if db.password_hash(name) is None:
            raise CtlError(f"no user {user}")
        password = read_password(args.password_file, user)
        if not db.set_password(name, argon2_hasher(cfg.auth).hash(password)):
            raise CtlError(f"no user {user}")
        db.delete_user_session_tokens(name)  # browser logins end with the old password
    print(f"password changed for {user} {in_store(cfg)}")
    return 0


def cmd_deluser(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """Delete an account as the realm does (``RealmService.delete_user``): the group
    state is replayed from the database and the events ending the account's standing
    are committed with its deletion (see :mod:`chatproto.accounts`)."""
    name = _name(args.name)
    user = f"{name}@{cfg.realm}"
    client = running_realm(cfg)
    if client is not None:  # RealmService.delete_user itself, sessions closed at once
        with client:
            answer = _ask(client, commands.DeleteUser, user=name)
        if not answer["existed"]:
            raise CtlError(f"no user {user}")
        print(f"deleted {user} {_by_realm(answer['closed'])}")
        return 0
    fed = cfg.federation

    def realms_of(users: Iterable[str]) -> set[str]:  # RealmService._realms_of's rule
        if not fed.enabled:
            return set()
        realms = {u.rpartition("@")[2] for u in users} - {cfg.realm}
        return {r for r in realms if fed.allows(r)}

    with open_db(cfg) as db:
        if db.user_floor(name) is None:
            raise CtlError(f"no user {user}")
        lim = cfg.limits
        groups = Groups(lim.max_members_per_group, lim.max_groups_per_user, cfg.realm)
        replay_groups(groups, db.read_events, cfg.realm)
        addrs = set(groups.standing(user)) | remote_groups_of(groups, user, cfg.realm)
        plan = plan_removal(groups, user, addrs, cfg.realm, realms_of, time.time())
        if not db.delete_user(name, user, plan.items, plan.outbox):
            raise CtlError(f"no user {user}")
    out_of = f" (out of {len(addrs)} groups)" if addrs else ""
    print(f"deleted {user}{out_of} {in_store(cfg)}")
    return 0


def cmd_kick(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = _name(args.name)
    with _running_or_fail(cfg) as client:
        answer = _ask(client, commands.Kick, user=name, reason=args.reason)
    n = answer["closed"]
    print(f"kicked {answer['user']}: {n} session{'' if n == 1 else 's'} ended")
    return 0


def cmd_suspend(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = _name(args.name)
    user = f"{name}@{cfg.realm}"
    client = running_realm(cfg)
    if client is not None:
        with client:
            answer = _ask(client, commands.Suspend, user=name, reason=args.reason)
        print(f"suspended {user} {_by_realm(answer['closed'])}")
        return 0
    try:
        reason = check_reason(args.reason)
    except ChatError as e:
        raise CtlError(e.message) from None
    with open_db(cfg) as db:
        if not db.suspend_user(name, reason, time.time()):
            raise CtlError(f"no user {user}")
        db.delete_user_session_tokens(name)
    print(f"suspended {user} {in_store(cfg)}")
    return 0


def cmd_unsuspend(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = _name(args.name)
    user = f"{name}@{cfg.realm}"
    had, where = on_realm_or_store(
        cfg,
        lambda client: _ask(client, commands.Unsuspend, user=name)["was_suspended"],
        lambda db: db.unsuspend_user(name),
    )
    if not had:
        raise CtlError(f"{user} is not suspended")
    print(f"suspension of {user} lifted {where}")
    return 0


def cmd_sessions(args: argparse.Namespace, cfg: configmod.Config) -> int:
    with _running_or_fail(cfg) as client:
        rows: list[dict[str, Any]] = []
        total = 1
        while len(rows) < total:
            page = _ask(client, commands.ListSessions, offset=len(rows), limit=commands.PAGE)
            total = page["total"]
            if not page["sessions"]:
                break
            rows.extend(page["sessions"])
    if not rows:
        print("no sessions")
        return 0
    now = time.time()
    print(f"{'USER':<32} {'PROTOCOL':<8} {'DEVICE':<16} {'FROM':<24} SINCE")
    for r in rows:
        since = _ago(now - r["opened_at"]) + (" (quiet)" if r["quiet"] else "")
        print(f"{r['user']:<32} {r['protocol']:<8} {r['device']:<16} {r['peer']:<24} {since}")
    return 0


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def cmd_reload_tls(args: argparse.Namespace, cfg: configmod.Config) -> int:
    with _running_or_fail(cfg) as client:
        answer = _ask(client, commands.ReloadTLS)
    for li in answer["listeners"]:
        print(f"reloaded {li['description']}: {li['fingerprint']}")
    return 0


def cmd_drain(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if not 0 <= args.grace <= 3600:
        raise CtlError("--grace must be between 0 and 3600 seconds", EXIT_USAGE)
    with _running_or_fail(cfg) as client:
        answer = _ask(client, commands.Drain, timeout=args.grace + 60, grace=args.grace)
    n = answer["closed"]
    print(f"drained {client.realm}: listeners closed, {n} session{'' if n == 1 else 's'} ended")
    print("the realm is finishing its commits and stopping")
    return 0


def cmd_list_users(args: argparse.Namespace, cfg: configmod.Config) -> int:
    with open_db(cfg) as db:
        names = db.list_users()
    for name in names:
        print(f"{name}@{cfg.realm}")
    return 0


def cmd_gen_certs(args: argparse.Namespace, cfg: configmod.Config) -> int:
    realm = cfg.realm
    if args.realm:
        try:
            realm = normalise_realm(args.realm)
        except ChatError as e:
            raise CtlError(e.message) from None
    directory = args.dir or os.path.join(cfg.data_dir, "tls")
    ca_existed = os.path.exists(os.path.join(directory, tls.CA_CERT_FILE))
    try:
        paths = tls.write_dev_certs(directory, realm, args.name, new_ca=args.new_ca)
    except (ValueError, tls.TLSFileError) as e:
        raise CtlError(str(e)) from None
    except OSError as e:
        raise CtlError(f"cannot write certificates in {directory}: {e.strerror or e}") from None
    port = cfg.tls.port
    ca_note = "reused" if ca_existed and not args.new_ca else "new"
    print(f"CA certificate ({ca_note}): {paths['ca']}")
    print(f"CA key:                {paths['ca_key']}")
    print(f"realm certificate:     {paths['cert']}")
    print(f"realm key:             {paths['key']}")
    print()
    # --listen replaces the config's list: name the realm's own listeners too
    listen = tls.server_description(paths["cert"], paths["key"], port)
    options = [*(f"--listen {shlex.quote(d)}" for d in cfg.listen), f"--listen '{listen}'"]
    config = f" --config {shlex.quote(args.config)}" if args.config else ""
    print("Serve TLS with (its plain listeners too; stop the realm first, if it runs):")
    print(f"  twistd -n chatrealm{config} {' '.join(options)}")
    print("or in the config file:")
    print("  [tls]")
    print(f"  certificate = {_toml_string(paths['cert'])}")
    print(f"  private_key = {_toml_string(paths['key'])}")
    print(f"  port = {port}")
    print("Clients connect with (the realm's TLS port, [tls] port):")
    print(
        f"  chatproto --server tls:127.0.0.1:{port} --realm {realm} "
        f"--ca {shlex.quote(paths['ca'])} --user NAME who"
    )
    print(
        f'  chatproto.client.connect(reactor, "tls:127.0.0.1:{port}", user, password, '
        f'realm="{realm}", ca={_toml_string(paths["ca"])})'
    )
    with open(paths["cert"], "rb") as f:
        fingerprint = tls.fingerprint(f.read())
    print()
    print(f"Certificate fingerprint: {fingerprint}")
    print(f"Federation (realm.name must be {realm}):")
    print("  [federation]")
    print("  enabled = true")
    print(f"  port = {cfg.federation.port}")
    print(f"  certificate = {_toml_string(paths['cert'])}")
    print(f"  private_key = {_toml_string(paths['key'])}")
    print(f"  ca = {_toml_string(paths['ca'])}")
    print(f"Peer realms trusting {realm} by pin (instead of, or as well as, the CA):")
    print("  [[federation.peers]]")
    print(f'  realm = "{realm}"')
    print(f'  endpoint = "127.0.0.1:{cfg.federation.port}"')
    print(f'  fingerprint = "{fingerprint}"')
    return 0


def cmd_peers(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """Outbox length per peer realm (from the database) and link state (from the status
    file the running realm writes): failures in a row, items sent since the realm
    started, refused by the peer (bounced), and given up on (bounced)."""
    from chatproto.federation import STATUS_FILE, read_status

    counts: dict[str, int] = {}
    if store_exists(cfg):
        with open_db(cfg) as db:
            counts = db.outbox_counts()
    status = read_status(os.path.join(cfg.data_dir, STATUS_FILE))
    links = {link["realm"]: link for link in (status or {}).get("links", [])}
    inbound = set((status or {}).get("inbound", []))
    realms = sorted(set(counts) | set(links) | {p.realm for p in cfg.federation.peers})
    if not cfg.federation.enabled:
        print("federation is disabled in this configuration ([federation] enabled)")
    if status is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("time", 0)))
        print(f"link state as of {when} (realm process {status.get('pid')})")
    else:
        print("no link state: the realm is not running with federation (or never ran)")
    if not realms:
        print("no peers")
        return 0
    now = status.get("time", 0) if status else 0
    rows = [
        (
            "REALM",
            "QUEUED",
            "LINK",
            "IN",
            "FAILURES",
            "SENT",
            "REFUSED",
            "GAVE UP",
            "NEXT RETRY",
            "LAST ERROR",
        )
    ]
    for realm in realms:
        link = links.get(realm, {})
        retry = ""
        if link.get("state") == "backoff" and link.get("retry_at") is not None:
            retry = f"in {max(0.0, link['retry_at'] - now):.1f}s"
        rows.append(
            (
                realm,
                str(counts.get(realm, 0)),
                link.get("state", "-"),
                "up" if realm in inbound else "-",
                str(link.get("failures", 0)),
                str(link.get("sent_items", 0)),
                str(link.get("rejected_items", 0)),
                str(link.get("given_up", 0)),
                retry or "-",
                # (a peer's error frame: its words, never terminal codes)
                terminal_label((link.get("last_error") or "-")[:80]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_cluster(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """``cluster status``: the live workers (from Redis: their heartbeats), their
    sessions and how far each has delivered the stream behind the safe position, and
    the writers of the store (from PostgreSQL)."""
    from chatproto.cluster.status import RedisReplyError, workers

    if cfg.storage.backend != "postgresql":
        raise CtlError("a cluster runs on the PostgreSQL store ([storage] backend)")
    address, prefix = cfg.cluster.redis, cfg.cluster.redis_prefix
    try:
        live = workers(address, prefix, cfg.cluster.connect_timeout)
    except (OSError, RedisReplyError) as e:
        raise CtlError(f"cannot read Redis at {address} (cluster.redis): {e}") from None
    from chatproto.store.postgresql import PostgresDB

    with open_db(cfg) as db:
        assert isinstance(db, PostgresDB)
        safe = db.safe_position()
        writers = db.writers()
    print(f"realm {cfg.realm}: safe position {safe}; Redis {address} (prefix {prefix})")
    if not live:
        print("no live worker")
    rows: list[tuple[str, ...]] = [
        ("WORKER", "HOST", "PID", "SESSIONS", "USERS", "DELIVERED", "LAG", "STATE")
    ]
    for name, w in live.items():
        delivered = int(w.get("delivered", 0))
        state = w.get("degraded") or "ok"
        if w.get("federation_sender"):
            state += ", federation sender"
        rows.append(
            (
                name,
                str(w.get("host", "?")),
                str(w.get("pid", "?")),
                str(w.get("sessions", 0)),
                str(len(w.get("online", {}))),
                str(delivered),
                str(max(0, safe - delivered)),
                state,
            )
        )
    if live:
        _table(rows)
    print("writers (PostgreSQL):")
    rows = [("WRITER", "PERSISTED UP TO", "COMMIT IN FLIGHT", "LAST COMMIT")]  # (new table)
    for name, upto, when, inflight in writers:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        rows.append((name, str(upto), "yes" if inflight else "no", stamp))
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


def cmd_migrate_store(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """Copy a SQLite realm into the PostgreSQL store the configuration names."""
    if cfg.storage.backend != "postgresql":
        raise CtlError(
            'migrate-store copies into PostgreSQL: set [storage] backend = "postgresql" '
            'and dsn in the configuration (see the operator guide, "PostgreSQL")',
            EXIT_USAGE,
        )
    import psycopg

    from chatproto.store.migrate import (
        MigrationError,
        copy_sqlite_to_postgresql,
        open_source,
    )
    from chatproto.store.postgresql import PostgresDB

    source_path = args.source or cfg.database_path
    try:
        source = open_source(source_path)
    except MigrationError as e:
        raise CtlError(str(e)) from None
    where = store_backend.describe(cfg)
    try:
        try:
            target = PostgresDB(cfg.storage.dsn, cfg.storage.schema)
        except RuntimeError as e:
            raise CtlError(str(e)) from None
        try:
            counts = copy_sqlite_to_postgresql(
                source, target, lambda table, n: print(f"  {table}: {n} rows")
            )
        finally:
            target.close()
    except (MigrationError, RuntimeError) as e:
        raise CtlError(str(e)) from None
    except sqlite3.Error as e:
        raise CtlError(f"database {os.path.abspath(source_path)}: {_first_line(e)}") from None
    except psycopg.Error as e:
        raise CtlError(f"database {where}: {_first_line(e)}") from None
    finally:
        source.close()
    print(
        f"copied {os.path.abspath(source_path)} into {where}: {counts['users']} users, "
        f"{counts['items']} items, {counts['outbox']} queued for other realms, "
        f"{counts['files']} files"
    )
    print(f"file bytes stay in {os.path.abspath(cfg.files_path)}; start the realm on it")
    return 0


def cmd_rotate_key(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """A new federation signing key; the old one stays announced (public half only)
    so that items signed with it still verify, unless --forget-old."""
    from chatproto.signing import KEY_FILE, KeyFileError, rotate

    path = os.path.join(cfg.data_dir, KEY_FILE)
    existed = os.path.exists(path)
    try:
        new, kept = rotate(path, time.time(), forget_old=args.forget_old)
    except KeyFileError as e:
        raise CtlError(str(e)) from None
    except OSError as e:
        raise CtlError(f"cannot write {path}: {e.strerror or e}") from None
    print(f"new signing key {new} in {path}" + ("" if existed else " (there was none)"))
    if kept:
        print(f"still announced, for items signed before: {', '.join(kept)}")
    elif existed:
        print("older keys forgotten: items signed with them no longer verify")
    print("restart the realm to sign with it (peers learn it when they next connect)")
    return 0


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_check_config(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from chatproto.tap import check_startable  # (the realm's start-up checks)

    try:
        check_startable(cfg)  # endpoint descriptions, extensions, federation keys
    except configmod.ConfigError as e:
        raise CtlError(f"configuration: {e}", EXIT_USAGE) from None
    print(f"configuration OK: {args.config or '(defaults)'}")
    print(f"realm:     {cfg.realm}")
    print(f"data dir:  {os.path.abspath(cfg.data_dir)}")
    print(f"database:  {store_backend.describe(cfg)}")
    print(f"registration: {'open' if cfg.auth.allow_registration else 'closed'}")
    for description in cfg.listen_descriptions():
        print(f"listen:    {description}")
    return 0


# command line -----------------------------------------------------------------------


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password (a single line) from FILE ('-' for stdin) "
        "instead of prompting; passwords are never taken as arguments",
    )


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--password" must not pass for "--password-file".
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Administer a chatproto realm: accounts, TLS certificates, config.",
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="TOML configuration file (as for twistd)"
    )
    parser.add_argument(
        "-d", "--data-dir", metavar="DIR", help="the realm's data directory (overrides config)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add = functools.partial(sub.add_parser, allow_abbrev=False)
    sub.required = True

    p = add("adduser", help="create an account")
    p.add_argument("name", help="user name (without @realm)")
    _password_option(p)
    p.set_defaults(func=cmd_adduser)

    p = add("passwd", help="set a user's password")
    p.add_argument("name")
    _password_option(p)
    p.set_defaults(func=cmd_passwd)

    p = add("deluser", help="delete an account")
    p.add_argument("name")
    p.set_defaults(func=cmd_deluser)

    p = add("list-users", help="list the accounts")
    p.set_defaults(func=cmd_list_users)

    p = add(
        "kick",
        help="end a user's sessions now (running realm)",
        description="Close every session of a user (native, web, IRC) and their browser "
        "logins; they are told session_ended and may log in again.",
    )
    p.add_argument("name")
    p.add_argument("--reason", default="", help="shown to the user")
    p.set_defaults(func=cmd_kick)

    p = add(
        "suspend",
        help="suspend an account: no login anywhere, messages to it refused",
        description="Suspend an account (a realm-wide ban): its sessions (native, web, "
        "IRC) end at once if the realm runs, it cannot log in until unsuspend, and "
        "messages to it -- from this realm or others -- are refused (account_suspended).",
    )
    p.add_argument("name")
    p.add_argument("--reason", default="", help="shown to the user")
    p.set_defaults(func=cmd_suspend)

    p = add("unsuspend", help="lift a suspension")
    p.add_argument("name")
    p.set_defaults(func=cmd_unsuspend)

    p = add(
        "sessions",
        help="list the logged-in sessions (running realm); browser logins: web, revoke",
        description="Without a subcommand: list the logged-in sessions of the running "
        "realm.  'sessions web' lists browser logins, 'sessions revoke' ends them.",
    )
    p.set_defaults(func=cmd_sessions)
    ctlmoderation.add_session_parsers(p)
    ctlmoderation.add_parsers(add)

    p = add(
        "reload-tls",
        help="read the TLS certificates and keys again (running realm)",
        description="Every TLS listener reads its certificate and key files again; new "
        "connections get them, open ones keep theirs.  If one cannot be used, none "
        "changes.",
    )
    p.set_defaults(func=cmd_reload_tls)

    p = add(
        "drain",
        help="stop taking connections and stop the realm cleanly (running realm)",
        description="/ready answers 503 at once; after --grace seconds the listeners "
        "close, sessions are told shutting_down, commits in flight finish and the "
        "realm process exits.",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long to keep serving while load balancers notice (default 0)",
    )
    p.set_defaults(func=cmd_drain)

    p = add(
        "gen-certs",
        help="write a development CA and a realm certificate",
        description="Write a development CA (reused if present) and a certificate for "
        "the realm signed by it, then print how to use them.",
    )
    p.add_argument("--dir", metavar="DIR", help="output directory (default: DATA_DIR/tls)")
    p.add_argument("--realm", metavar="NAME", help="realm name (default: the config's)")
    p.add_argument(
        "--name",
        metavar="NAME",
        action="append",
        default=[],
        help="another DNS name or IP address for the certificate (repeatable)",
    )
    p.add_argument("--new-ca", action="store_true", help="replace an existing CA in DIR")
    p.set_defaults(func=cmd_gen_certs)

    p = add(
        "peers",
        help="show federation peers: queued items, link state, retries",
        description="Per peer realm: items waiting in the outbox, the link state, "
        "failures, next retry and last error (as the running realm last wrote them).",
    )
    p.set_defaults(func=cmd_peers)

    p = add(
        "cluster",
        help="the workers of a cluster: sessions, lag, writers",
        description="status: the live workers of a realm run with --worker (from "
        "Redis), their sessions and users, how far each has delivered the stream "
        "behind the safe position (LAG), and the writers of the PostgreSQL store.",
    )
    p.add_argument("action", choices=["status"], help="what to show")
    p.set_defaults(func=cmd_cluster)

    p = add(
        "migrate-store",
        help="copy a SQLite realm into the PostgreSQL store of the config",
        description="Copy everything of a SQLite realm (accounts, messages and their "
        "positions, read positions, groups, queued federation deliveries, files' records, "
        "unfinished uploads) into the PostgreSQL schema the configuration names, which "
        "must be empty.  Stop the realm first.  File bytes stay in DATA_DIR/files.",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="the SQLite database (default: DATA_DIR/realm.sqlite3)",
    )
    p.set_defaults(func=cmd_migrate_store)

    p = add(
        "rotate-key",
        help="make a new federation signing key",
        description="Make a new signing key for the items this realm's users send to "
        "groups on other realms (DATA_DIR/federation-keys.json, owner-only).  The old "
        "key stays announced to peers so that items signed with it still verify.  The "
        "running realm signs with the new key once restarted.",
    )
    p.add_argument(
        "--forget-old",
        action="store_true",
        help="stop announcing every older key (a compromised key: items it signed, "
        "queued or relayed later, are refused)",
    )
    p.set_defaults(func=cmd_rotate_key)

    p = add(
        "check-config",
        help="load and check the configuration",
        description="Load FILE (or --config FILE) the way twistd chatrealm does and "
        "report what it sets up, or the first problem, without starting anything.",
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="the configuration file")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``chatrealmctl`` with ``argv`` (default: ``sys.argv[1:]``); returns the status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "file", None):  # check-config FILE
            if args.config and args.config != args.file:
                parser.error(f"two configuration files: --config {args.config} and {args.file}")
            args.config = args.file
        cfg = load_config(args)
        status: int = args.func(args, cfg)
        return status
    except CtlError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
