"""Channel commands: JOIN, PART, TOPIC, NAMES, LIST, INVITE, KICK and MODE, each
one group change (or read) through the realm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.groups import MAX_TOPIC
from chatproto.irc.commands import all_of, command
from chatproto.irc.lines import (
    MAX_TARGETS,
    channel_of,
    format_line,
    param,
    plain_text,
)
from chatproto.irc.replies import Reply

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol


def group_change(
    p: IRCProtocol, ctx: Reply, command: str, chan: str, event: str, **args: Any
) -> Any:
    """One group change through the realm; errors become numerics for ``chan``."""
    assert p.session is not None
    try:
        group = p.group_address(chan)
    except ChatError as e:
        p.error(ctx, command, e, chan)
        return None
    if ctx is not p.direct:
        p.awaiting[(event, group)] = ctx
    d = p.session.group_event(event, group, **args)

    def failed(f: Failure) -> Any:
        p.awaiting.pop((event, group), None)
        f.trap(ChatError)
        err: ChatError = f.value  # type: ignore[assignment]
        if err.code == "group_exists" and command == "JOIN":
            # Someone made the channel since this gateway looked (a JOIN at the same
            # moment, or on another worker of a cluster): a JOIN joins it.
            return group_change(p, ctx, "JOIN", chan, "joined")
        target = chan
        g = p.realm.groups.groups.get(group)
        them = args.get("user")
        if (
            err.code == "not_member"
            and them
            and command in ("KICK", "MODE")
            and (g is None or p.user_id in g.members)  # else it is the sender who is not
        ):
            ctx.num(
                "441",
                p.nick_for(them),
                chan,
                "They aren't on that channel",
            )
            return
        if err.code == "already_member" and command == "INVITE":
            ctx.num("443", p.nick_for(args["user"]), chan, "is already on channel")
            return
        if err.code == "no_such_user":
            target = p.nick_for(args.get("user", "*"))
        p.error(ctx, command, err, target)

    def done(env: Envelope) -> Any:
        wait = p.realm.until_routed(env.pos) if isinstance(env, Envelope) and env.pos else None
        if wait is None:
            return routed(env)
        # A worker of a cluster routes the event (and so this command's JOIN,
        # PART...) a round trip after its commit: the command ends once it is here.
        return wait.addBoth(lambda _: routed(env))

    def routed(env: Any) -> Any:
        p.awaiting.pop((event, group), None)
        # A JOIN's channel burst may still be reading the read marker: its MARKREAD
        # and 366 are this command's replies, so the command ends once they are out.
        burst = p.bursts.pop((event, group), None)
        if burst is None:
            return env
        return burst.addBoth(lambda _: env)

    return d.addCallbacks(done, failed)


@command("JOIN", params=1)
def join(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    if params[0] == "0":  # JOIN 0 = part every channel
        waits = [
            group_change(p, ctx, "PART", channel_of(g, p.realm.realm), "left")
            for g in sorted(p.joined)
        ]
        return all_of(waits)
    waits = []
    keys = params[1].split(",") if len(params) > 1 else []
    for i, chan in enumerate(params[0].split(",")[:MAX_TARGETS]):
        key = {"key": keys[i]} if i < len(keys) and keys[i] else {}
        try:
            group = p.group_address(chan)
        except ChatError:
            ctx.num("403", param(chan), "No such channel")
            continue
        g = p.realm.groups.groups.get(group)
        if g is None and not group.endswith("@" + p.realm.realm):
            # another realm's group we have no member of yet: ask its home realm
            # (the JOIN comes when the home realm's joined event does)
            waits.append(group_change(p, ctx, "JOIN", chan, "joined", **key))
        elif g is None:
            waits.append(group_change(p, ctx, "JOIN", chan, "created"))
        elif p.user_id in g.members:
            if group not in p.joined:  # a member whose client had closed it
                p.joined.add(group)
                ctx.send(format_line(p.mask(p.user_id), "JOIN", chan))
                waits.append(p.channel_burst(ctx, group, chan))
        else:
            waits.append(group_change(p, ctx, "JOIN", chan, "joined", **key))
    return all_of(waits)


@command("PART", params=1)
def part(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    return all_of(
        [group_change(p, ctx, "PART", chan, "left") for chan in params[0].split(",")[:MAX_TARGETS]]
    )


@command("TOPIC", params=1)
def topic(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    chan = params[0]
    if len(params) > 1:
        text = plain_text(params[1])[:MAX_TOPIC]
        return group_change(p, ctx, "TOPIC", chan, "topic", topic=text)
    assert p.session is not None
    group = p.group_address(chan)
    info = p.realm.group_info(p.session, group)  # (the realm says who may see it)
    if info["topic"]:
        ctx.num("332", chan, info["topic"])
        p.topic_time(ctx, group, chan)
    else:
        ctx.num("331", chan, "No topic is set")
    return None


@command("NAMES")
def names(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    if not params:
        ctx.num("366", "*", "End of /NAMES list")
        return
    chans = params[0].split(",")[:MAX_TARGETS]
    for chan in chans:  # several: their 353s, then one 366 naming them all (RFC 2812)
        try:
            group = p.group_address(chan)
        except ChatError:
            if len(chans) == 1:
                ctx.num("366", param(chan), "End of /NAMES list")
            continue
        p.names(ctx, group, chan, end=len(chans) == 1)
    if len(chans) > 1:
        ctx.num("366", param(",".join(chans)), "End of /NAMES list")


@command("LIST")
def list_channels(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    wanted = None
    if params and params[0]:
        wanted = set()
        for chan in params[0].split(","):
            try:
                wanted.add(p.group_address(chan))
            except ChatError:
                pass
    ctx.num("321", "Channel", "Users  Name")
    infos = p.realm.list_groups()
    listed = {info["group"] for info in infos}
    groups = p.realm.groups
    for addr in sorted(groups.of_user.get(p.user_id, ())):  # one's own unlisted groups
        if addr not in listed and addr.endswith("@" + p.realm.realm):
            infos.append(groups.groups[addr].summary())
    for info in infos:
        if wanted is None or info["group"] in wanted:
            chan = channel_of(info["group"], p.realm.realm)
            ctx.num("322", chan, str(info["members"]), info["topic"])
    ctx.num("323", "End of /LIST")


@command("INVITE", params=2)
def invite(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    nick, chan = params[0], params[1]
    try:
        user = p.resolve(nick)
    except ChatError:
        ctx.num("401", param(nick), "No such nick")
        return None
    d = group_change(p, ctx, "INVITE", chan, "invited", user=user)
    if d is None:
        return None

    def invited(env: Any) -> None:
        if isinstance(env, Envelope):
            ctx.num("341", p.nick_for(user), chan)

    return d.addCallback(invited)


@command("KICK", params=2)
def kick(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    """``KICK #chan nick[,nick] [:reason]``, or ``KICK #a,#b nick,nick`` (pairs).  The
    default reason is the kicker's nick."""
    chans = params[0].split(",")[:MAX_TARGETS]
    nicks = params[1].split(",")[:MAX_TARGETS]
    reason = plain_text(params[2]) if len(params) > 2 and params[2] else p.nick
    if len(chans) > 1 and len(chans) != len(nicks):
        ctx.num("461", "KICK", "As many channels as nicks, or one channel")
        return None
    waits = []
    for i, nick in enumerate(nicks):
        chan = chans[i] if len(chans) > 1 else chans[0]
        try:
            g = p.realm.groups.groups.get(p.group_address(chan))
        except ChatError:
            g = None
        if g is not None and p.user_id not in g.members:
            ctx.num("442", param(chan), "You're not on that channel")
            continue
        try:
            user = p.resolve(nick)
        except ChatError:
            ctx.num("401", param(nick), "No such nick")
            continue
        waits.append(group_change(p, ctx, "KICK", chan, "kicked", user=user, reason=reason))
    return all_of(waits)


# users ----------------------------------------------------------------------------
