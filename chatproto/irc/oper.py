"""Realm administrators on IRC: ``OPER``, ``KILL``, ``WALLOPS``, and what an IRC
operator sees in ``WHO`` and ``WHOIS``.

IRC operators are the realm's admins (:mod:`chatproto.realm.moderation`): ``OPER
<account> <password>`` with the connection's own account name and password makes the
connection an operator if the account is a realm admin (and, when ``irc.opers`` is
set, one of the accounts it names).  The realm decides every action again (a role
revoked meanwhile gets ``481``): ``KILL`` ends every session of a user (native, web
and IRC), ``WALLOPS`` reaches the IRC connections of the other operators.  Operators
see where each session of a user comes from (``WHOIS`` 338, ``WHO``'s host field);
everyone sees who is a realm admin (``WHOIS`` 313, ``WHO``'s ``*`` flag).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from chatproto.errors import ChatError
from chatproto.irc.commands import command
from chatproto.irc.lines import format_line, param
from chatproto.irc.replies import Reply

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

__all__ = ["kill", "oper", "oper_host", "wallops", "whois_oper_lines"]

_NOT_OPER = "Permission Denied- You're not an IRC operator"


def _is_oper(p: IRCProtocol) -> bool:
    return bool(p.oper)


@command("OPER", params=2)
def oper(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    name, password = params[0], params[1]
    user = p.user_id
    d = p.realm.moderation.verify_admin(user, name, password, p.peer())

    def ok(_: Any) -> None:
        opers = p.realm.config.irc.opers
        if opers and user.rpartition("@")[0] not in opers:
            ctx.num("491", "No O-lines for your host")
            return
        p.oper = True
        ctx.num("381", "You are now an IRC operator")
        ctx.send(format_line(p.mask(user), "MODE", p.nick, "+o"))
        p.log.info("IRC: {user} is an IRC operator (OPER)", user=user)

    def failed(f: Failure) -> None:
        f.trap(ChatError)
        err: Any = f.value
        if err.code == "forbidden":
            ctx.num("491", "No O-lines for your host")
        elif err.code == "rate_limited":
            p.error(ctx, "OPER", err, "")
        else:
            ctx.num("464", "Password incorrect")

    return d.addCallbacks(ok, failed)


@command("KILL", params=1)
def kill(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    if not _is_oper(p):
        ctx.num("481", _NOT_OPER)
        return None
    nick = params[0]
    reason = params[1] if len(params) > 1 else ""
    user = p.known_user(nick)
    if user is None:
        ctx.num("401", param(nick), "No such nick")
        return None
    try:
        closed = p.realm.moderation.kill(p.user_id, user, reason)
    except ChatError as e:
        if e.code == "forbidden":
            p.oper = False
            ctx.num("481", _NOT_OPER)
        else:
            p.error(ctx, "KILL", e, nick)
        return None
    if p.state != "closed":  # (an operator may KILL themselves)
        ctx.send(format_line(p.server, "NOTICE", p.nick, f"Killed {nick}: {closed} sessions ended"))
    return None


@command("WALLOPS", params=1)
def wallops(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    if not _is_oper(p) or not p.realm.moderation.is_admin(p.user_id):
        p.oper = False
        ctx.num("481", _NOT_OPER)
        return None
    line = format_line(p.mask(p.user_id), "WALLOPS", params[0][:400])
    for other in list(p.factory.connections):
        if other.state == "ready" and _is_oper(other):
            other.write(line)
    return None


def oper_host(p: IRCProtocol, user: str, host: str) -> str:
    """The host ``WHO`` shows for ``user``: for an operator asking, the address of the
    user's first session (when online), else ``host``."""
    if not _is_oper(p):
        return host
    sessions = p.realm.sessions_of(user)
    return sessions[0].peer if sessions else host


def whois_oper_lines(p: IRCProtocol, ctx: Reply, user: str, nick: str) -> None:
    """``WHOIS`` lines about the realm's moderation: 313 for a realm admin (to
    everyone); to an operator, 338 for each of the user's sessions."""
    if p.realm.moderation.is_admin(user):
        ctx.num("313", nick, "is a realm administrator (IRC operator)")
    if _is_oper(p):
        for s in p.realm.sessions_of(user):
            ctx.num("338", nick, s.peer, f"actually using host ({s.protocol}, {s.device})")
