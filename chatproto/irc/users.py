"""User queries: WHO, WHOIS, WHOWAS, USERHOST (and TIME).

Users show as their IRC identity (:mod:`chatproto.irc.identity`): the nick as typed,
the username and realname of their ``USER`` line.  Every user is invisible (``+i``):
``WHO`` with a mask lists the users who share a channel with the asker (and the asker),
and a nick without wildcards names one user wherever they are.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chatproto.errors import ChatError
from chatproto.groups import Group
from chatproto.irc.commands import command
from chatproto.irc.lines import channel_of, decimal, param, prefix
from chatproto.irc.oper import oper_host, whois_oper_lines
from chatproto.irc.replies import Reply

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

#: Nicks one USERHOST may name.
MAX_USERHOST = 5


def _visible(g: Group, user: str) -> bool:
    """May ``user`` see the group's members (a member, or a public, non-secret group)?"""
    return user in g.members or (g.visibility == "public" and not g.secret)


def mask_matcher(mask: str) -> Callable[[str], Any]:
    """A function telling whether a name matches the IRC mask ``mask``: ``*`` any run
    of characters, ``?`` one, anything else itself (``[`` too: IRC masks have no
    classes, fnmatch's do).

    Compiled by ``re.compile`` (its cache holds 512 patterns) rather than
    ``fnmatch.fnmatchcase``, whose cache keeps 32768 compiled patterns for the life
    of the process: a client sending WHO with a new 500-byte mask each time would
    pin some 240 MB.  fnmatch's translation makes each ``*`` an atomic group, so a
    mask like ``*a*a*a...b`` cannot backtrack for ever on a long realname."""
    return re.compile(fnmatch.translate(mask.replace("[", "[[]"))).match


@command("WHO")
def who(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    assert p.session is not None
    mask = params[0] if params and params[0] else "*"
    multi = p.has("multi-prefix")
    groups = p.realm.groups
    if mask.startswith("#"):
        try:
            g = groups.get(p.group_address(mask))
        except ChatError:
            g = None
        if g is not None and _visible(g, p.user_id):
            chan = channel_of(g.address, p.realm.realm)  # its name, whatever case was asked
            for user, m in sorted(g.members.items()):
                who_line(p, ctx, chan, user, prefix(m.role, m.voice, multi))
    elif any(c in mask for c in "*?"):
        match = mask_matcher(mask.lower())
        shared = {p.user_id}
        for addr in groups.of_user.get(p.user_id, ()):
            shared.update(groups.groups[addr].members)
        directory = p.factory.directory
        for user in sorted(shared):
            i = directory.get(user)
            fields = (i.nick, i.username, i.host, i.realname, p.server)
            if any(match(f.lower()) for f in fields):
                who_line(p, ctx, "*", user, "")
    else:
        found = p.known_user(mask)
        if found is not None:
            who_line(p, ctx, "*", found, "")
    ctx.num("315", param(mask), "End of WHO list")
    return None


def who_line(p: IRCProtocol, ctx: Reply, chan: str, user: str, pfx: str) -> None:
    i = p.factory.directory.get(user)
    presence = p.realm.presence_of(user)
    flag = "G" if presence and presence[0] in ("away", "busy", "offline") else "H"
    if p.realm.moderation.is_admin(user):
        flag += "*"
    host = oper_host(p, user, i.host)
    ctx.num("352", chan, i.username, host, p.server, i.nick, flag + pfx, f"0 {i.realname}")


@command("WHOIS", params=1)
def whois(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    nick = params[-1].split(",")[0]
    user = p.known_user(nick)
    if user is None:
        ctx.num("401", param(nick), "No such nick")
        ctx.num("318", param(nick), "End of /WHOIS list")
        return None
    realm = p.realm.realm
    groups = p.realm.groups
    i = p.factory.directory.get(user)
    n = i.nick
    ctx.num("311", n, i.username, i.host, "*", i.realname)
    chans = []
    for group in sorted(groups.of_user.get(user, ())):
        g = groups.groups[group]
        if _visible(g, p.user_id):
            m = g.members[user]
            chans.append(prefix(m.role, m.voice, p.has("multi-prefix")) + channel_of(group, realm))
    if chans:
        ctx.num("319", n, " ".join(chans))
    ctx.num("312", n, p.server, f"chatproto realm {realm}")
    presence = p.realm.presence_of(user)
    if presence and presence[0] in ("away", "busy"):
        ctx.num("301", n, presence[1] or presence[0])
    whois_oper_lines(p, ctx, user, n)
    if not p.realm.guests.is_guest(user):  # a guest is logged in to no account
        account = user.partition("@")[0] if user.endswith("@" + realm) else user
        ctx.num("330", n, account, "is logged in as")
    ctx.num("318", n, "End of /WHOIS list")
    return None


@command("WHOWAS", params=1)
def whowas(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    """``WHOWAS nick [count]``: the identities the nick had on IRC, newest first
    (a count of 0 or less, or none: all kept)."""
    nick = params[0].split(",")[0]
    count = params[1] if len(params) > 1 else ""
    limit = decimal(count) or 0
    entries = p.factory.directory.was(nick.lower())
    if limit > 0:
        entries = entries[:limit]
    if not entries:
        ctx.num("406", param(nick), "There was no such nickname")
    for i in entries:
        ctx.num("314", i.nick, i.username, i.host, "*", i.realname)
        ctx.num("312", i.nick, p.server, time.strftime("%c", time.gmtime(i.gone_at)))
    ctx.num("369", param(nick), "End of WHOWAS")


@command("USERHOST", params=1)
def userhost(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    """``USERHOST nick...``: ``nick=+user@host`` (``-`` when away) of up to five."""
    out = []
    directory = p.factory.directory
    for nick in params[:MAX_USERHOST]:
        try:
            user = p.resolve(nick)
        except ChatError:
            continue
        if not (directory.on_irc(user) or p.realm.is_user(user)):
            continue
        i = directory.get(user)
        presence = p.realm.presence_of(user)
        away = "-" if presence and presence[0] in ("away", "busy") else "+"
        out.append(f"{i.nick}={away}{i.username}@{i.host}")
    ctx.num("302", " ".join(out))


@command("TIME")
def time_(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    now = p.factory.clock.seconds()
    ctx.num("391", p.server, time.strftime("%A %B %d %Y -- %H:%M:%S +00:00", time.gmtime(now)))


@command("INFO")
def info(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    """``INFO [server]``: what the server is (371 lines, then 374)."""
    f = p.factory
    for text in (
        f"{f.version}: the IRC gateway of the chatproto realm {p.realm.realm}",
        "IRC users, native, web and TUI clients share one realm: accounts, private",
        "messages, groups (channels), history; see the realm's docs/irc.md.",
        f"Server started {f.created}",
    ):
        ctx.num("371", text)
    ctx.num("374", "End of INFO list")
