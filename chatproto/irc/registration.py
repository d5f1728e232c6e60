"""Registration of an IRC connection: capability negotiation (CAP), SASL PLAIN,
PASS/NICK/USER, guests, and the welcome burst (numerics 001-005, LUSERS, MOTD, the
JOIN burst of the account's channels, then the backlog).

Handlers are plain functions ``handler(p, ctx, params, tags)`` (see
``chatproto.irc.commands``); ``p`` is the :class:`chatproto.irc.protocol.IRCProtocol`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from chatproto import address
from chatproto.errors import ChatError
from chatproto.irc.commands import command
from chatproto.irc.identity import Identity, clean_realname, clean_username
from chatproto.irc.lines import (
    channel_of,
    decimal,
    format_line,
    nick_of,
    param,
    split_utf8,
    user_of,
)
from chatproto.irc.replies import Reply
from chatproto.realm import Session
from chatproto.realm.sessions import MAX_DEVICE, check_device

if TYPE_CHECKING:
    from chatproto.irc.protocol import IRCProtocol

__all__ = [
    "CAPABILITIES",
    "DEVICE",
    "SASL_CHUNK",
    "device_of",
    "lusers",
    "motd",
    "renamed",
    "try_register",
]

#: The realm device of an IRC connection that names none (its ack position is where
#: the next such IRC login resumes); one that logs in as ``account/name`` is the
#: device ``irc/name`` (see :func:`device_of`).
DEVICE = "irc"
#: IRCv3 capabilities offered in CAP LS (``sasl`` gets its mechanism list with 302).
CAPABILITIES = (
    "away-notify",
    "batch",
    "draft/chathistory",
    "draft/message-redaction",
    "draft/read-marker",
    "echo-message",
    "labeled-response",
    "message-tags",
    "multi-prefix",
    "sasl",
    "server-time",
    "userhost-in-names",
)
#: Base64 chunk size of AUTHENTICATE.
SASL_CHUNK = 400


@command("CAP", params=1, early=True)
def irc_CAP(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    sub = params[0].upper()
    if sub == "LS":
        if p.state != "ready":
            p.cap_negotiating = True
        v302 = len(params) > 1 and (decimal(params[1]) or 0) >= 302
        offered = [c if c != "sasl" or not v302 else "sasl=PLAIN" for c in CAPABILITIES]
        ctx.send(format_line(p.server, "CAP", p.nick, "LS", " ".join(offered)))
    elif sub == "LIST":
        caps = " ".join(sorted(p.caps))
        ctx.send(format_line(p.server, "CAP", p.nick, "LIST", caps))
    elif sub == "REQ":
        if p.state != "ready":
            p.cap_negotiating = True
        wanted = params[1].split() if len(params) > 1 else []
        ok = all(w.lstrip("-") in CAPABILITIES for w in wanted)
        if ok:
            for w in wanted:
                if w.startswith("-"):
                    p.caps.discard(w[1:])
                else:
                    p.caps.add(w)
            p.tag_mode = ("server-time" in p.caps) | ("message-tags" in p.caps) << 1
        reply = "ACK" if ok else "NAK"
        ctx.send(format_line(p.server, "CAP", p.nick, reply, " ".join(wanted)))
    elif sub == "END":
        if p.state != "ready" and p.cap_negotiating:
            p.cap_negotiating = False
            try_register(p)
    else:
        ctx.num("410", sub[:20], "Invalid CAP command")


@command("PASS", params=1, early=True)
def irc_PASS(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    if p.state == "ready" or p.session is not None:
        ctx.num("462", "You may not reregister")
        return
    p.password = params[0]


@command("NICK", early=True)
def irc_NICK(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    if not params or not params[0]:  # (RFC 1459/2812, Modern: 431, not 461)
        ctx.num("431", "No nickname given")
        return None
    wanted = params[0]
    try:
        name = address.normalise_name(user_of(wanted))
    except ChatError:
        ctx.num("432", param(wanted), "Erroneous nickname")
        return
    if p.state == "ready":
        if p.guest and name != p.nick.lower():  # a guest may take a free nick
            return guest_rename(p, ctx, wanted)
        if not p.guest and name != address.normalise_name(p.user_id.partition("@")[0]):
            ctx.num("433", param(wanted), "Your nick is your account name; it cannot change")
        elif wanted != p.nick:  # the same account, another case: shown as typed
            renamed(p, ctx, wanted)
        return None
    p.nick = wanted
    try_register(p)


def guest_rename(p: IRCProtocol, ctx: Reply, nick: str) -> Deferred[None]:
    def done(_: object) -> None:
        if p.state == "ready":
            renamed(p, ctx, nick)

    def taken(f: Failure) -> None:
        f.trap(ChatError)
        ctx.num("433", param(nick), "Nickname is already in use")

    return p.realm.guests.rename(p.user_id, nick).addCallbacks(done, taken)


def renamed(p: IRCProtocol, ctx: Reply, nick: str) -> None:
    """A change of case: told to this connection and to the IRC users who share a
    channel with it."""
    line = format_line(p.mask(p.user_id), "NICK", nick)
    p.nick = nick
    if p.identity is not None:
        p.identity.nick = nick
    p.factory.directory.renamed(p.user_id, nick)
    ctx.send(line)
    groups = p.realm.groups
    seen: set[str] = set()
    for addr in groups.of_user.get(p.user_id, ()):
        seen.update(groups.groups[addr].members)
    # the IRC connections of those users (not a pass over every connection of the
    # gateway for each NICK: that was the gateway's size times the NICK rate)
    connections = p.factory.directory.connections
    for user in seen:
        for conn in connections(user):
            if conn is not p and conn.state == "ready":
                conn.write(line)


@command("USER", params=4, early=True)
def irc_USER(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> None:
    if p.state == "ready" or p.username:
        ctx.num("462", "You may not reregister")
        return
    if not params[3]:
        ctx.num("461", "USER", "Not enough parameters (an empty realname)")
        return
    p.username = params[0][:32]
    p.realname = clean_realname(params[3])
    try_register(p)


def device_of(login: str) -> tuple[str, str]:
    """``(account, device)`` of a login name: ``account/name`` is the device
    ``irc/name`` -- its own ack position, so two IRC clients of one account (a
    laptop's, a phone's) each resume where they left off -- and a name without ``/``
    the shared device ``irc``.  ``name`` is 1 to ``MAX_DEVICE - 4`` characters and a
    label, as the native ``device`` (else ``bad_request``)."""
    account, slash, name = login.partition("/")
    if not slash:
        return login, DEVICE
    longest = MAX_DEVICE - len(DEVICE) - 1
    if not 0 < len(name) <= longest:
        raise ChatError("bad_request", f"a device name (after /) must be 1-{longest} characters")
    device = f"{DEVICE}/{name}"
    check_device(device)  # (a label: no control or bidirectional formatting characters)
    return account, device


@command("AUTHENTICATE", params=1, early=True)
def irc_AUTHENTICATE(p: IRCProtocol, ctx: Reply, params: list[str], tags: dict[str, str]) -> Any:
    arg = params[0]
    if p.session is not None or p.state == "ready":
        ctx.num("907", "You have already authenticated using SASL")
        return None
    if p.logging_in:
        return None
    if arg == "*":
        p.sasl, p.sasl_buffer = None, ""
        ctx.num("906", "SASL authentication aborted")
        return None
    if p.sasl is None:
        if arg.upper() != "PLAIN":
            ctx.num("908", "PLAIN", "are available SASL mechanisms")
            ctx.num("904", "SASL authentication failed")
            return None
        p.sasl = "PLAIN"
        ctx.send(b"AUTHENTICATE +\r\n")
        return None
    if len(arg) > SASL_CHUNK:
        p.sasl, p.sasl_buffer = None, ""
        ctx.num("905", "SASL message too long")
        return None
    if arg != "+":
        p.sasl_buffer += arg
    if len(arg) == SASL_CHUNK:
        if len(p.sasl_buffer) > 4 * SASL_CHUNK:
            p.sasl, p.sasl_buffer = None, ""
            ctx.num("905", "SASL message too long")
        return None  # more to come
    data, p.sasl, p.sasl_buffer = p.sasl_buffer, None, ""
    try:
        authzid, authcid, password = (
            base64.b64decode(data, validate=True).decode("utf-8").split("\0")
        )
    except (binascii.Error, UnicodeDecodeError, ValueError):
        ctx.num("904", "SASL authentication failed: malformed PLAIN message")
        return None
    try:
        account, device = device_of(authcid)
    except ChatError as e:
        ctx.num("904", f"SASL authentication failed: {e.message}")
        return None
    if authzid and authzid not in (authcid, account):
        ctx.num("904", "SASL authentication failed: authzid must be empty or the account")
        return None

    def ok(session: Session) -> None:
        account = nick_of(session.user_id, p.realm.realm)
        ctx.num(
            "900",
            f"{account}!{account}@{p.realm.realm}",
            account,
            f"You are now logged in as {account}",
        )
        ctx.num("903", "SASL authentication successful")
        try_register(p)

    def failed(err: ChatError) -> None:
        if err.code == "rate_limited":
            ctx.num(
                "904",
                f"SASL authentication failed: {err.message}, "
                f"retry after {err.extra.get('retry_after', 1)} s",
            )
        elif err.code == "auth_failed":
            ctx.num("904", "SASL authentication failed")
        else:  # too_many_sessions, a bad device...: say what the realm said
            ctx.num("904", f"SASL authentication failed: {err.message}")

    return login(p, account, password, ok, failed, device)


def login(
    p: IRCProtocol,
    account: str,
    password: str,
    ok: Callable[[Session], None],
    failed: Callable[[ChatError], None],
    device: str = DEVICE,
) -> Deferred[None]:
    """Log in through the realm (its portal, its failure throttle) as ``device``
    (see :func:`device_of`)."""
    return attach(p, lambda: p.realm.login(account, password, p, device, p.peer()), ok, failed)


def attach(
    p: IRCProtocol,
    start: Callable[[], Deferred[Session]],
    ok: Callable[[Session], None],
    failed: Callable[[ChatError], None],
) -> Deferred[None]:
    """Open a session with ``start()`` (a login of some kind) and make it the
    connection's: ``ok`` once it is, ``failed`` with the realm's refusal (neither if
    the connection closed meanwhile; a session opened too late is ended)."""
    p.logging_in = True
    try:
        d = start()
    except ChatError as e:  # pragma: no cover - logins raise inside their Deferred
        d = Deferred()
        d.errback(e)

    def done(session: Session) -> None:
        p.logging_in = False
        if p.state == "closed":
            session.logout()
            return
        p.session = session
        p.user_id = session.user_id
        ok(session)

    def error(f: Failure) -> None:
        p.logging_in = False
        f.trap(ChatError)
        if p.state != "closed":
            failed(f.value)  # type: ignore[arg-type]

    return d.addCallbacks(done, error)


def try_register(p: IRCProtocol) -> None:
    if p.state != "registering" or p.cap_negotiating or p.logging_in:
        return
    if p.nick == "*" or not p.username:
        return
    if p.session is not None:
        welcome(p)
        return
    password = p.password
    if password is None and p.realm.guests.enabled:
        guest_login(p)
        return
    if password is None:
        p.direct.num("464", "Password required: log in with SASL PLAIN or PASS")
        p.close_with("Access denied: no password")
        return
    account, device = p.nick, DEVICE
    name, sep, rest = password.partition(":")
    if sep:  # account:password, or account/device:password
        name, slash, named = name.partition("/")
        try:
            account, password = address.normalise_name(name), rest
        except ChatError:
            pass  # not an account: the whole is the password of the nick's
        else:
            try:
                device = device_of(f"{account}/{named}")[1] if slash else DEVICE
            except ChatError as e:
                p.close_with(f"Access denied: {e.message}")
                return

    def failed(err: ChatError) -> None:
        if err.code == "rate_limited":
            p.direct.num(
                "464",
                f"Password incorrect ({err.message}, retry after "
                f"{err.extra.get('retry_after', 1)} s)",
            )
        elif err.code == "auth_failed":
            p.direct.num("464", "Password incorrect")
        else:  # the password was right, the login still refused (too_many_sessions)
            p.close_with(f"Access denied: {err.message}")
            return
        p.close_with("Access denied: bad password")

    login(p, account, password, lambda s: welcome(p), failed, device)


def guest_login(p: IRCProtocol) -> None:
    """No credentials, and the realm takes guests: a temporary account shown
    under the nick asked for (chatproto.realm.guests)."""
    nick = p.nick

    def ok(session: Session) -> None:
        p.guest = True
        welcome(p)

    def failed(err: ChatError) -> None:
        if err.code in ("user_exists", "bad_address"):  # another NICK may do
            p.nick = "*"
            code, text = ("433", "Nickname is already in use")
            if err.code == "bad_address":
                code, text = ("432", "Erroneous nickname")
            p.direct.num(code, param(nick), text)
            return
        p.close_with(f"Access denied: {err.message}")

    attach(p, lambda: p.realm.login_guest(nick, p, DEVICE, p.peer()), ok, failed)


def welcome(p: IRCProtocol) -> None:
    assert p.session is not None
    f = p.factory
    realm = p.realm
    old = p.nick
    account = nick_of(p.user_id, realm.realm)
    # The nick as typed when it names the account (in another case), else the account.
    same = old.lower() == account.lower() and "/" not in old
    p.nick = old if same or p.guest else account
    p.state = "ready"
    f.authenticated(p)
    ctx = p.direct
    name, _, host = p.user_id.partition("@")
    username = clean_username(p.username) or name
    if old != p.nick and old != "*":
        p.write(f":{old}!{username}@{realm.realm} NICK {p.nick}\r\n".encode())
    p.identity = Identity(p.nick, username, p.realname or name, host)
    back = not f.directory.on_irc(p.user_id)  # its first IRC connection: show it again
    f.directory.arrived(p.user_id, p, p.identity)
    if back:
        mask = p.mask(p.user_id)
        for group, conn in p.channel_audience():
            conn.write(f":{mask} JOIN {channel_of(group, realm.realm)}\r\n".encode())
    ctx.num("001", f"Welcome to the {realm.realm} chat realm, {p.mask(p.user_id)}")
    ctx.num("002", f"Your host is {p.server}, running version {f.version}")
    ctx.num("003", f"This server was created {f.created}")
    ctx.num("004", p.server, f.version, "i", "biqnot", "bqo")
    for chunk in f.isupport_lines():
        ctx.num("005", *chunk, "are supported by this server")
    lusers(p, ctx)
    motd(p, ctx)
    p.log.info("IRC login {user} from {peer}", user=p.user_id, peer=p.peer())
    for group in sorted(realm.groups.of_user.get(p.user_id, ())):
        chan = channel_of(group, realm.realm)
        p.joined.add(group)
        p.write(f":{p.mask(p.user_id)} JOIN {chan}\r\n".encode())
        burst = p.channel_burst(ctx, group, chan)
        if burst is not None:
            p.welcome_bursts.append(burst)
    session = p.session

    def failed(f: Failure) -> None:
        p.log.failure("IRC backlog for {user} failed", f, user=session.user_id)
        p.close_with("could not send the backlog; reconnect")

    p.await_backlog()
    session.start().addErrback(failed)


def lusers(p: IRCProtocol, ctx: Reply) -> None:
    realm = p.realm
    users = realm.online_count()
    ctx.num("251", f"There are {users} users and 0 invisible on 1 servers")
    ctx.num("254", str(len(realm.groups.groups)), "channels formed")
    ctx.num("255", f"I have {users} clients and 0 servers")
    most = max(users, realm.presence.most_online)
    ctx.num("265", str(users), str(most), f"Current local users {users}, max {most}")
    ctx.num("266", str(users), str(most), f"Current global users {users}, max {most}")


def motd(p: IRCProtocol, ctx: Reply) -> None:
    motd = p.realm.config.irc.motd
    if not motd:
        ctx.num("422", "MOTD File is missing")
        return
    ctx.num("375", f"- {p.server} Message of the day - ")
    for text in motd.splitlines() or [""]:
        for piece in split_utf8(text, 400):
            ctx.num("372", f"- {piece}")
    ctx.num("376", "End of /MOTD command.")
