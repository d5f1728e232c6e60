"""User queries: WHO and WHOIS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatproto.errors import ChatError
from chatproto.irc.commands import command
from chatproto.irc.lines import (
    PREFIXES,
    channel_of,
    nick_of,
    param,
)
from chatproto.irc.replies import Reply

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol


@command("WHO")
def who(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    assert p.session is not None
    mask = params[0] if params else "*"
    if mask.startswith("#"):
        try:
            members = p.realm.members(p.session, p.group_address(mask))
            roles = {m["user"]: m["role"] for m in members}
        except ChatError:
            roles = {}
        for user, role in roles.items():
            who_line(p, ctx, mask, user, PREFIXES.get(role, ""))
    elif mask != "*":
        try:
            user = p.resolve(mask)
        except ChatError:
            user = ""
        if user and p.realm.is_user(user):
            who_line(p, ctx, "*", user, "")
    ctx.num("315", param(mask), "End of WHO list")
    return None


def who_line(p: IRCProtocol, ctx: Reply, chan: str, user: str, prefix: str) -> None:
    realm = p.realm.realm
    name, _, where = user.partition("@")
    presence = p.realm.presence_of(user)
    flag = "G" if presence and presence[0] in ("away", "busy", "offline") else "H"
    ctx.num("352", chan, name, where, p.server, nick_of(user, realm), flag + prefix, f"0 {name}")


@command("WHOIS", params=1)
def whois(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    nick = params[-1].split(",")[0]
    try:
        user = p.resolve(nick)
    except ChatError:
        user = ""
    if not user or not p.realm.is_user(user):
        ctx.num("401", param(nick), "No such nick")
        ctx.num("318", param(nick), "End of /WHOIS list")
        return None
    realm = p.realm.realm
    name, _, where = user.partition("@")
    n = nick_of(user, realm)
    ctx.num("311", n, name, where, "*", name)
    chans = []
    for group in sorted(p.realm.groups.of_user.get(user, ())):
        g = p.realm.groups.groups[group]
        if g.visibility == "public" or p.user_id in g.members:
            chans.append(PREFIXES.get(g.members[user].role, "") + channel_of(group, realm))
    if chans:
        ctx.num("319", n, " ".join(chans))
    ctx.num("312", n, p.server, f"chatproto realm {realm}")
    presence = p.realm.presence_of(user)
    if presence and presence[0] in ("away", "busy"):
        ctx.num("301", n, presence[1] or presence[0])
    ctx.num("330", n, n, "is logged in as")
    ctx.num("318", n, "End of /WHOIS list")
    return None
