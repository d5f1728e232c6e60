"""Channel and user modes: ``MODE``, and how group settings, roles and bans read as
IRC modes.

Every channel mode is a group setting or a member's role in the realm, so it works
the same from the native protocol (``set_group``, ``set_role``, ``set_voice``,
``ban``):

- ``i``: visibility ``invite`` (invite-only);
- ``k``: setting ``key``, joining needs it (invitees do not);
- ``l``: setting ``limit``, at most N members (invitees may exceed it);
- ``m``: setting ``moderated``, only voiced members, admins and owners send;
- ``n``: always on, only members send to a group (it cannot be turned off);
- ``s``: setting ``secret``, not listed, not shown to non-members;
- ``t``: setting ``topic_lock`` (on by default), only admins set the topic;
- ``b``: bans (by account; a mask names the account by its nick part);
- ``o``: role admin (``+o``) or member (``-o``); owners show as ``@`` too;
- ``q``: role owner (``+q``) or admin (``-q``), shown as ``+o``/``-o``;
- ``v``: voice, may speak in a moderated group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from chatproto.errors import ChatError
from chatproto.groups import Group, check_settings
from chatproto.irc.channels import group_change
from chatproto.irc.commands import all_of, command
from chatproto.irc.lines import decimal, param
from chatproto.irc.replies import Reply

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

__all__ = ["CHANMODES", "MAX_MODES", "PREFIX", "channel_modes", "settings_modes"]

#: RPL_ISUPPORT: list modes, always-parameter, set-parameter, flags.
CHANMODES = "b,k,l,imnst"
#: RPL_ISUPPORT PREFIX: operators (admins and owners) and voiced members.
PREFIX = "(ov)@+"
#: RPL_ISUPPORT MODES: the most modes with a parameter one MODE command changes;
#: those past it are ignored (as IRC servers do), so a line of ``+vvvv...`` is not
#: a hundred stored events.
MAX_MODES = 4
#: Flag modes and the group setting each one is.
_FLAGS = {"m": "moderated", "s": "secret", "t": "topic_lock"}


def channel_modes(g: Group, member: bool) -> list[str]:
    """The mode string and its parameters for RPL_CHANNELMODEIS (the key only for
    members)."""
    flags = "i" if g.visibility == "invite" else ""
    args = []
    if g.key:
        flags += "k"
        args.append(g.key if member else "*")
    if g.limit:
        flags += "l"
        args.append(str(g.limit))
    flags += "m" if g.moderated else ""
    flags += "" if g.external else "n"
    flags += "s" if g.secret else ""
    flags += "t" if g.topic_lock else ""
    return ["+" + flags, *args]


def settings_modes(meta: dict[str, Any]) -> list[str]:
    """A ``settings`` event as a MODE change: the mode string and its parameters."""
    out: list[tuple[str, str, str | None]] = []
    if meta.get("visibility") in ("public", "invite"):
        out.append(("+" if meta["visibility"] == "invite" else "-", "i", None))
    if isinstance(meta.get("key"), str):
        out.append(("+", "k", meta["key"]) if meta["key"] else ("-", "k", "*"))
    if isinstance(meta.get("limit"), int) and not isinstance(meta.get("limit"), bool):
        out.append(("+", "l", str(meta["limit"])) if meta["limit"] else ("-", "l", None))
    for c, name in _FLAGS.items():
        if isinstance(meta.get(name), bool):
            out.append(("+" if meta[name] else "-", c, None))
    if isinstance(meta.get("external"), bool):  # n: no external messages
        out.append(("-" if meta["external"] else "+", "n", None))
    return mode_string(out)


def mode_string(changes: list[tuple[str, str, str | None]]) -> list[str]:
    """``[(sign, char, arg)]`` -> ``["+ab-c", args...]``."""
    text, args, sign = "", [], ""
    for s, c, arg in changes:
        if s != sign:
            text += s
            sign = s
        text += c
        if arg is not None:
            args.append(arg)
    return [text, *args] if text else []


@command("MODE", params=1)
def mode(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    target = params[0]
    if not target.startswith("#"):
        return _user_mode(p, ctx, params)
    group = p.group_address(target)
    g = p.realm.groups.get(group)
    if len(params) == 1:
        ctx.num("324", target, *channel_modes(g, p.user_id in g.members))
        ctx.num("329", target, str(int(g.created_at)))
        return None
    settings: dict[str, Any] = {}
    members: list[tuple[str, str, str]] = []  # (sign, char, nick)
    list_bans = False
    args = list(params[2:])
    sign = "+"
    variable = 0  # modes with a parameter so far (at most MAX_MODES are changed)
    for c in params[1]:
        if c in "bqovk" or (c == "l" and sign == "+"):
            if c != "b" or args:  # (b without one lists the bans)
                variable += 1
                if variable > MAX_MODES:
                    continue  # ignored, with its parameter
        if c in "+-":
            sign = c
        elif c == "b" and not args:
            list_bans = True
        elif c in "bqov":
            if not args:
                ctx.num("461", "MODE", "Not enough parameters")
                return None
            members.append((sign, c, args.pop(0)))
        elif c == "i":
            settings["visibility"] = "invite" if sign == "+" else "public"
        elif c in _FLAGS:
            settings[_FLAGS[c]] = sign == "+"
        elif c == "l":
            if sign == "-":
                settings["limit"] = 0
            elif not args:
                ctx.num("461", "MODE", "Not enough parameters")
                return None
            else:
                _setting(ctx, target, settings, "l", "limit", args.pop(0))
        elif c == "k":
            value = args.pop(0) if args else ""
            if sign == "-":
                settings["key"] = ""
            else:
                _setting(ctx, target, settings, "k", "key", value)
        elif c == "n":
            settings["external"] = sign == "-"
        else:
            ctx.num("472", c, "is unknown mode char to me")
    if list_bans:
        _ban_list(p, ctx, target, g)
    # Changes that change nothing are not sent (no MODE echo for them).
    current: dict[str, Any] = {
        "visibility": g.visibility,
        "moderated": g.moderated,
        "secret": g.secret,
        "topic_lock": g.topic_lock,
        "limit": g.limit,
        "key": g.key,
        "external": g.external,
    }
    settings = {k: v for k, v in settings.items() if current[k] != v}
    waits: list[Any] = []
    if settings:
        waits.append(group_change(p, ctx, "MODE", target, "settings", **settings))
    for sign, c, arg in members:
        nick = arg.partition("!")[0]
        try:
            user = p.resolve(nick)
        except ChatError:
            ctx.num("401", param(nick), "No such nick/channel")
            continue
        args_: dict[str, Any] = {}
        if c == "b":
            event = "banned" if sign == "+" else "unbanned"
        elif c == "v":
            event, args_ = "voice", {"voice": sign == "+"}
        else:
            role = {"+q": "owner", "-q": "admin", "+o": "admin", "-o": "member"}[sign + c]
            if c == "o" and sign == "+" and g.role_of(user) == "owner":
                continue  # already an operator
            event, args_ = "role", {"role": role}
        waits.append(_chain(p, waits, ctx, target, event, user=user, **args_))
    return all_of(waits)


def _setting(
    ctx: Reply, chan: str, settings: dict[str, Any], char: str, name: str, raw: str
) -> None:
    """One parameter setting, checked by the realm's rule: 696 when it is invalid."""
    value: Any = raw
    if name == "limit":
        number = decimal(raw)
        value = number if number is not None and number >= 0 else -1
        if value == 0:
            value = -1
    try:
        check_settings({name: value})
    except ChatError as e:
        shown = "*" if name == "key" else param(raw)  # an invalid key is not echoed
        ctx.num("696", chan, char, shown, e.message)
        return
    settings[name] = value


def _ban_list(p: IRCProtocol, ctx: Reply, chan: str, g: Group) -> None:
    if p.user_id in g.members or (g.visibility == "public" and not g.secret):
        for user in sorted(g.bans):
            ctx.num("367", chan, f"{p.nick_for(user)}!*@*")
    ctx.num("368", chan, "End of channel ban list")


def _chain(
    p: IRCProtocol, before: list[Any], ctx: Reply, chan: str, event: str, **args: Any
) -> Any:
    """Mode changes one after another, in the order given."""
    prev = before[-1] if before else None
    if prev is None or not isinstance(prev, Deferred):
        return group_change(p, ctx, "MODE", chan, event, **args)
    return prev.addBoth(lambda _: group_change(p, ctx, "MODE", chan, event, **args))


def _user_mode(p: IRCProtocol, ctx: Reply, params: list[str]) -> None:
    try:
        same = p.resolve(params[0]) == p.user_id
    except ChatError:
        same = False
    if not same:
        ctx.num("502", "Cant change mode for other users")
    elif len(params) > 1 and params[1].strip("+-i"):
        ctx.num("501", "Unknown MODE flag")
    else:
        ctx.num("221", "+i")
