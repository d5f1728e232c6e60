"""Messages: PRIVMSG, NOTICE and CHATHISTORY (sending through the realm, and
paging its history)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.irc.commands import all_of, command
from chatproto.irc.lines import (
    MAX_LINE,
    MAX_TARGETS,
    channel_of,
    decimal,
    format_line,
    in_batch,
    param,
    text_room,
)
from chatproto.irc.relations import react_from_tags, reply_from_tags
from chatproto.irc.replies import PendingSend, Reply, next_batch_id
from chatproto.realm.tags import client_tags

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol


@command("PRIVMSG")
def privmsg(
    p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str], notice: bool = False
) -> Any:
    assert p.session is not None
    command = "NOTICE" if notice else "PRIVMSG"
    if not params or not params[0]:  # (RFC 1459/2812, Modern: 411, not 461)
        if not notice:
            ctx.num("411", f"No recipient given ({command})")
        return None
    if len(params) < 2 or not params[1]:
        if not notice:
            ctx.num("412", "No text to send")
        return None
    text = params[1]
    targets = params[0].split(",")
    if len(targets) > MAX_TARGETS:
        if not notice:
            ctx.num("407", params[0][:64], f"Too many targets (at most {MAX_TARGETS})")
        return None
    client = client_tags(tags) if tags else None  # relayed with it (message-tags)
    mask = p.mask(p.user_id)
    for target in targets:
        send_text(p, ctx, command, mask, target, text, client, notice)
    return None


def send_text(
    p: IRCProtocol,
    ctx: Reply,
    command: str,
    mask: str,
    target: str,
    text: str,
    client: dict[str, str] | None,
    notice: bool,
) -> None:
    """One target of a PRIVMSG or NOTICE from ``mask``: checked, then queued in the
    read's batch (IRCProtocol.queue_send).  Also what the lean lane of
    ``IRCProtocol._handle`` calls for the lines ``lines.quick_match`` matches (no
    tags, one target, a text): what :func:`privmsg` does with such a line."""
    try:
        to = p.resolve(target)
    except ChatError as e:
        if not notice:
            p.error(ctx, command, e, target)
        return
    # One IRC line at the recipient, with our source in front: longer is refused
    # (417) rather than split in two messages or cut.  (Encoded only when it could
    # be too long: see text_room.)
    realm = p.factory.realm
    group = to[0] == "#"
    shown = channel_of(to, realm.realm) if group else p.factory.directory.nick(to)
    if len(text) > text_room(mask, command, shown):
        head = f":{mask} {command} {shown} :"
        if len(head.encode()) + len(text.encode()) > MAX_LINE - 2:
            if not notice:
                ctx.num("417", "Message too long for one IRC line with its source")
            return
    if not notice and not group:
        presence = realm.presence_of(to)
        if presence and presence[0] in ("away", "busy"):
            ctx.num("301", shown, presence[1] or presence[0])
    # Settled by the connection once the batch of this read is committed (or
    # refused): ctx finishes when the last of its targets is.
    if client:
        reply_to, tags_kept = reply_from_tags(p, to, client)
    else:
        reply_to = tags_kept = None
    p.queue_send(PendingSend(to, text, ctx, command, target, notice), tags_kept, reply_to)


@command("TAGMSG", params=1)
def tagmsg(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    """``@+typing=active TAGMSG target``: client-only tags on their own, pushed by the
    realm to the target's online sessions (not stored; chatproto.realm.tags), echoed
    with echo-message.  Without client-only tags there is nothing to relay."""
    client = client_tags(tags)
    if not client:
        return None
    targets = params[0].split(",")
    if len(targets) > MAX_TARGETS:
        ctx.num("407", params[0][:64], f"Too many targets (at most {MAX_TARGETS})")
        return None
    # Relayed at once, it would overtake a PRIVMSG sent before it and still being
    # stored (a reaction before the message it reacts to): wait for those first.
    turn = ctx.turn()
    if not turn.called:
        return turn.addCallback(lambda _: _tagmsg(p, ctx, targets, client))
    return _tagmsg(p, ctx, targets, client)


def _tagmsg(p: IRCProtocol, ctx: Reply, targets: list[str], client: dict[str, str]) -> Any:
    if p.session is None:
        return None  # the connection closed meanwhile
    waits = []
    for target in targets:
        try:
            to = p.resolve(target)
        except ChatError as e:
            p.error(ctx, "TAGMSG", e, target)
            continue
        stored = react_from_tags(p, ctx, target, to, client)  # a reaction to a known msgid
        if stored is not None:
            waits.append(stored)
            continue
        d = p.session.send_tags(to, client)
        waits.append(
            d.addCallbacks(
                _tags_sent, _tags_failed, callbackArgs=(p, ctx), errbackArgs=(p, ctx, target)
            )
        )
    return all_of(waits)


def _tags_sent(data: dict[str, Any], p: IRCProtocol, ctx: Reply) -> None:
    if p.has("echo-message") and p.has("message-tags"):
        ctx.send(p.factory.tag_line(data, p.tag_mode))


def _tags_failed(f: Failure, p: IRCProtocol, ctx: Reply, target: str) -> None:
    f.trap(ChatError)
    p.error(ctx, "TAGMSG", f.value, target)  # type: ignore[arg-type]


@command("NOTICE")
def notice(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    return privmsg(p, ctx, params, tags, notice=True)


@command("CHATHISTORY", params=2)
def chathistory(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    """``CHATHISTORY LATEST|BEFORE|AFTER <target> <*|msgid=ID> <limit>`` (msgids are
    realm stream positions)."""

    def fail(code: str, *args: str) -> None:
        ctx.send(format_line(p.server, "FAIL", "CHATHISTORY", code, *args))

    assert p.session is not None
    sub = params[0].upper()
    if sub not in ("LATEST", "BEFORE", "AFTER") or len(params) < 4:
        fail("INVALID_PARAMS", sub[:20], "Supported: LATEST, BEFORE, AFTER with * or msgid=")
        return None
    target, ref, count = params[1], params[2], params[3]
    page = p.realm.config.limits.history_page
    pos: int | None = None
    if ref != "*":
        key, _, value = ref.partition("=")
        pos = decimal(value) if key == "msgid" else None
        if pos is None or pos < 0:
            fail("INVALID_MSGREFTYPE", sub, param(ref), "Only msgid references are supported")
            return None
    limit = decimal(count)
    if limit is None or not 1 <= limit <= page:
        fail("INVALID_PARAMS", sub, f"limit must be 1 to {page}")
        return None
    if ref == "*" and sub != "LATEST":
        fail("INVALID_PARAMS", sub, "BEFORE and AFTER need a msgid")
        return None
    try:
        peer = p.resolve(target)
    except ChatError:
        fail("INVALID_TARGET", sub, param(target), "No such target")
        return None
    before = pos if sub == "BEFORE" else None
    after = pos if sub == "AFTER" else None
    if sub == "LATEST" and pos is not None:
        after = pos  # the newest items after the reference (at most limit)
    d = p.session.history(peer, before, after, limit)

    def got(items: list[Envelope]) -> None:
        ref_id = f"H{next_batch_id()}"
        lines = [f":{p.server} BATCH +{ref_id} chathistory {param(target)}\r\n".encode()]
        for env in items:
            if env.kind == "event":
                continue
            lines.append(
                in_batch(p.factory.lines(env, 3), ref_id)  # each line of a multi-line one
                if p.has("batch")
                else p.factory.lines(env, p.tag_mode)
            )
        lines.append(f":{p.server} BATCH -{ref_id}\r\n".encode())
        if not p.has("batch"):
            lines = lines[1:-1]
        for line in lines:
            ctx.send(line)

    def failed(f: Failure) -> None:
        f.trap(ChatError)
        message = getattr(f.value, "message", "no history")
        fail("INVALID_TARGET", sub, param(target), message)

    return d.addCallbacks(got, failed)
