"""``chatrealmctl``'s moderation commands: browser logins, realm admins, abuse reports.

Like the account commands of :mod:`chatproto.ctl`, each acts through the running
realm's control channel when the realm runs (the change takes effect at once: a
revoked browser login's web sessions close) and on the store otherwise, and says
which it did (:mod:`chatproto.ctlaccess`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from chatproto import config as configmod
from chatproto.ctlaccess import (
    EXIT_USAGE,
    CtlError,
    ask,
    in_store,
    name_arg,
    on_realm_or_store,
    open_db,
    running_realm,
)
from chatproto.display import terminal_label
from chatproto.ops import commands
from chatproto.tokens import LOGIN_ID_LENGTH

__all__ = [
    "add_parsers",
    "add_session_parsers",
    "cmd_admins",
    "cmd_grant_admin",
    "cmd_reports",
    "cmd_revoke_admin",
    "cmd_revoke_logins",
    "cmd_web_logins",
]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def cmd_web_logins(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """``sessions web [NAME]``: the live browser logins."""
    name = name_arg(args.name) if args.name else ""
    client = running_realm(cfg)
    rows: list[dict[str, Any]] = []
    if client is not None:
        with client:
            total = 1
            while len(rows) < total:
                page = ask(
                    client, commands.ListLogins, user=name, offset=len(rows), limit=commands.PAGE
                )
                total = page["total"]
                if not page["logins"]:
                    break
                rows.extend(page["logins"])
    else:
        now = time.time()
        with open_db(cfg) as db:
            for digest, user, _floor, device, created, last_used in db.session_tokens():
                if (not name or user == name) and now - last_used <= cfg.web.session_ttl:
                    rows.append(
                        {
                            "user": f"{user}@{cfg.realm}",
                            "login": digest[:LOGIN_ID_LENGTH],
                            "device": device,
                            "created": created,
                            "last_used": last_used,
                        }
                    )
        rows.sort(key=lambda r: (r["user"], r["last_used"]))
    if not rows:
        print("no browser logins" + ("" if client is not None else f" {in_store(cfg)}"))
        return 0
    print(f"{'USER':<32} {'LOGIN':<12} {'DEVICE':<16} {'SINCE':<16} LAST USED")
    for r in rows:
        print(
            f"{r['user']:<32} {r['login']:<12} {r['device']:<16} "
            f"{_when(r['created']):<16} {_when(r['last_used'])}"
        )
    return 0


def cmd_revoke_logins(args: argparse.Namespace, cfg: configmod.Config) -> int:
    """``sessions revoke NAME [LOGIN...]``: end browser logins (all of NAME's when no
    LOGIN is named)."""
    name = name_arg(args.name)
    user = f"{name}@{cfg.realm}"
    wanted = [w.strip().lower() for w in args.logins]
    for w in wanted:
        if len(w) != LOGIN_ID_LENGTH or any(c not in "0123456789abcdef" for c in w):
            raise CtlError(f"{w!r} is not a login id (see: sessions web {name})")
    client = running_realm(cfg)
    if client is not None:
        with client:
            answer = ask(client, commands.RevokeLogins, user=name, logins=wanted)
        ended, closed = answer["ended"], answer["closed"]
        where = f"by the running realm ({_plural(closed, 'web session')} closed)"
    else:
        with open_db(cfg) as db:
            if db.user_floor(name) is None:
                raise CtlError(f"no user {user}")
            if wanted:
                digests = [
                    d
                    for d, u, *_ in db.session_tokens()
                    if u == name and d[:LOGIN_ID_LENGTH] in wanted
                ]
                ended = db.delete_session_tokens(digests)
            else:
                ended = db.delete_user_session_tokens(name)
        where = in_store(cfg)
    if wanted and ended < len(set(wanted)):
        missing = len(set(wanted)) - ended
        print(f"{_plural(missing, 'login')} of {user} not found (expired or ended already)")
    print(f"ended {_plural(ended, 'browser login')} of {user} {where}")
    return 0 if ended or not wanted else 1


def add_session_parsers(sessions: argparse.ArgumentParser) -> None:
    """``sessions web`` and ``sessions revoke`` under the ``sessions`` command (which
    alone lists the logged-in sessions)."""
    nested = sessions.add_subparsers(
        dest="sessions_command", metavar="SUBCOMMAND", parser_class=type(sessions)
    )
    nested.required = False
    p = nested.add_parser(
        "web",
        help="list the browser logins (session cookies), of NAME or everyone",
        description="List the live browser logins: user, login id, device, when it "
        "logged in and when it was last used.  They last across restarts of the realm.",
    )
    p.add_argument("name", nargs="?", help="only this user's")
    p.set_defaults(func=cmd_web_logins)
    p = nested.add_parser(
        "revoke",
        help="end browser logins of NAME (all, or the LOGIN ids given)",
        description="End browser logins: the session cookies stop working and, if the "
        "realm runs, the web sessions opened with them close (session_ended).  Without "
        "LOGIN ids, every browser login of NAME ends.",
    )
    p.add_argument("name")
    p.add_argument("logins", nargs="*", metavar="LOGIN", help="login ids (sessions web)")
    p.set_defaults(func=cmd_revoke_logins)


def cmd_grant_admin(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = name_arg(args.name)
    user = f"{name}@{cfg.realm}"

    def live(client: Any) -> bool:
        ask(client, commands.GrantAdmin, user=name)  # (an unknown user: its error)
        return True

    granted, where = on_realm_or_store(cfg, live, lambda db: db.grant_admin(name, time.time()))
    if not granted:
        raise CtlError(f"no user {user}")
    print(f"{user} is a realm admin {where}")
    return 0


def cmd_revoke_admin(args: argparse.Namespace, cfg: configmod.Config) -> int:
    name = name_arg(args.name)
    user = f"{name}@{cfg.realm}"
    had, where = on_realm_or_store(
        cfg,
        lambda client: ask(client, commands.RevokeAdmin, user=name)["was_admin"],
        lambda db: db.revoke_admin(name),
    )
    if not had:
        raise CtlError(f"{user} is not a realm admin")
    print(f"{user} is no longer a realm admin {where}")
    return 0


def cmd_admins(args: argparse.Namespace, cfg: configmod.Config) -> int:
    admins, _ = on_realm_or_store(
        cfg,
        lambda client: ask(client, commands.ListAdmins)["admins"],
        lambda db: sorted(f"{n}@{cfg.realm}" for n in db.admins()),
    )
    print("\n".join(admins) if admins else "no realm admins")
    return 0


#: Reports per control-channel page (see ``ListReports``).
_REPORTS_PAGE = 8


def cmd_reports(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if not 1 <= args.limit <= 1000:
        raise CtlError("--limit must be between 1 and 1000", EXIT_USAGE)
    rows: list[dict[str, Any]] = []
    client = running_realm(cfg)
    if client is not None:
        with client:
            before = 0
            while len(rows) < args.limit:
                want = min(_REPORTS_PAGE, args.limit - len(rows))
                page = ask(client, commands.ListReports, before=before, limit=want)["reports"]
                rows.extend(page)
                if len(page) < want:
                    break
                before = page[-1]["id"]
    else:
        with open_db(cfg) as db:
            rows = db.reports(None, args.limit)
    if not rows:
        print("no reports")
        return 0
    for r in rows:
        excerpt = r["excerpt"].replace("\n", " ")
        if len(excerpt) > 120:
            excerpt = excerpt[:119] + "…"
        # A user's words on the operator's terminal: a message body may hold CR,
        # BS, BEL, NUL or a bidi override (only ESC and the C1 controls are refused),
        # which would rewrite or reorder the lines printed; shown as pictures instead.
        print(
            f"#{r['id']} {_when(r['ts'])} {r['reporter']} reports "
            f"{terminal_label(r['msg_id'])} ({r['sender']} to {r['recipient']}, "
            f"position {r['pos']}): {terminal_label(r['reason'])}\n"
            f"    {terminal_label(excerpt)}"
        )
    return 0


def add_parsers(add: Any) -> None:
    """The admin and report commands (``add`` makes a subcommand's parser)."""
    p = add(
        "grant-admin",
        help="make an account a realm admin",
        description="A realm admin may, from any client, suspend and unsuspend accounts "
        "and read the abuse reports (and, over IRC, OPER with their own password).",
    )
    p.add_argument("name")
    p.set_defaults(func=cmd_grant_admin)
    p = add("revoke-admin", help="take the realm admin role away")
    p.add_argument("name")
    p.set_defaults(func=cmd_revoke_admin)
    p = add("admins", help="list the realm admins")
    p.set_defaults(func=cmd_admins)
    p = add(
        "reports",
        help="list the abuse reports, newest first",
        description="Abuse reports users made (the report request): who reported which "
        "message, why, and what the message was when reported.",
    )
    p.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    p.set_defaults(func=cmd_reports)
