"""The IRC gateway's factory: :class:`IRCFactory` builds :class:`IRCProtocol` for one
realm, and encodes each message's line once for all the connections it goes to (the
fan-out hot path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

import chatproto
from chatproto import address
from chatproto.envelope import Envelope
from chatproto.groups import MAX_TOPIC
from chatproto.irc.identity import Directory
from chatproto.irc.lines import (
    CRLF,
    MAX_LINE,
    MAX_TARGETS,
    body_lines,
    channel_of,
    server_time,
)
from chatproto.irc.modes import CHANMODES, MAX_MODES, PREFIX
from chatproto.irc.protocol import IRCProtocol
from chatproto.irc.relations import MsgIds
from chatproto.protocol import ClientFactory
from chatproto.realm import MAX_STATUS_TEXT, RealmService
from chatproto.realm.tags import shown_tags, tag_data

__all__ = ["IRCFactory"]


class IRCFactory(ClientFactory):
    """Builds :class:`IRCProtocol` for one realm.

    Holds the realm, a ``clock`` tests may replace, the live connections (one keepalive
    sweep for all, as :class:`chatproto.protocol.ClientFactory` does) and the encoded
    lines of the message being fanned out.
    """

    protocol = IRCProtocol  # type: ignore[assignment]
    noisy = False
    log = Logger()

    def __init__(self, realm: RealmService, clock: Any = None) -> None:
        super().__init__(realm, clock)
        cfg = realm.config.irc
        self.server_name = cfg.server_name or realm.realm
        self.version = f"chatproto-{chatproto.__version__}"
        self.created = server_time(self.clock.seconds())
        self._cache_env: Envelope | None = None
        self._cache: list[bytes | None] = [None, None, None, None]
        self._isupport: list[list[str]] | None = None
        self._tag_cache_of: dict[str, Any] | None = None
        self._tag_cache: list[bytes | None] = [None, None]
        #: msg_id <-> msgid of the items rendered lately (chatproto.irc.relations)
        self.msgids = MsgIds()
        #: how IRC users are shown, and WHOWAS
        self.directory = Directory(realm.realm)

    def isupport_lines(self) -> list[list[str]]:
        """RPL_ISUPPORT tokens, at most 13 per line."""
        if self._isupport is None:
            realm = self.realm
            lim = realm.config.limits
            tokens = [
                f"AWAYLEN={MAX_STATUS_TEXT}",
                "CASEMAPPING=ascii",
                f"CHANLIMIT=#:{lim.max_groups_per_user}",
                f"CHANMODES={CHANMODES}",
                # a local channel's (#name): what any name of that length joins, as
                # CHANNELLEN says; another realm's, #name/realm, may be longer
                f"CHANNELLEN={1 + address.MAX_NAME}",
                "CHANTYPES=#",
                f"CHATHISTORY={lim.history_page}",
                f"KICKLEN={MAX_TOPIC}",
                f"MODES={MAX_MODES}",
                "MSGREFTYPES=msgid",
                f"NETWORK={realm.realm}",
                f"NICKLEN={address.MAX_NAME}",
                f"PREFIX={PREFIX}",
                f"TARGMAX=PRIVMSG:{MAX_TARGETS},NOTICE:{MAX_TARGETS},JOIN:{MAX_TARGETS},"
                f"PART:{MAX_TARGETS},KICK:{MAX_TARGETS},NAMES:{MAX_TARGETS},TAGMSG:{MAX_TARGETS},"
                "WHOIS:1",
                f"TOPICLEN={MAX_TOPIC}",
                "USERLEN=32",
                "UTF8ONLY",
            ]
            self._isupport = [tokens[i : i + 13] for i in range(0, len(tokens), 13)]
        return self._isupport

    def lines(self, env: Envelope, mode: int) -> bytes:
        """The encoded PRIVMSG line(s) of a text item, the same for every receiver;
        ``mode`` bit 1 adds ``time``, bit 2 ``msgid`` (the stream position, then
        remembered in ``msgids``).  Cached for the item being fanned out, so R
        receivers cost one encoding."""
        if env is not self._cache_env:  # a new item (a DM's one receiver: the usual)
            plain = self._encode(env)
            self._cache = [plain, None, None, None]
            self._cache_env = env
            if mode == 0:
                return plain
        else:
            cached = self._cache[mode]
            if cached is not None:
                return cached
            cached = self._cache[0]
            assert cached is not None  # (encoded when the item was first seen)
            plain = cached
        tags = []
        if mode & 1:
            tags.append(f"time={server_time(env.ts)}")
        if mode & 2:  # message-tags: its msgid, and the client tags kept with it
            self.msgids.remember(env)  # (a msgid a client may name: only one it was shown)
            tags.append(f"msgid={env.pos}")
            meta = env.meta
            if meta is not None:
                client = shown_tags(meta.get("tags"))  # (a row from before the checks)
                reply = self.msgids.msgid(meta.get("reply_to"))
                if reply is not None and not (client and "+draft/reply" in client):
                    client = {**(client or {}), "+draft/reply": str(reply)}  # a reply
                if client:
                    tags.append(tag_data(client))
        prefix = ("@" + ";".join(tags) + " ").encode()
        out = b"".join(prefix + line + CRLF for line in plain.split(CRLF)[:-1])
        self._cache[mode] = out
        return out

    def run_lines(self, envs: Sequence[Envelope]) -> bytes | None:
        """The plain (no tags) lines of a run of private texts of one sender to one
        recipient (Sessions.route_private), as :meth:`lines` gives each with mode 0,
        joined: one line head for the run.  None when an item needs more than one
        plain line (a notice, a body that could be too long for one line, or with
        CR, LF or NUL): then the caller takes them one by one."""
        first = envs[0]
        recipient = first.recipient
        if recipient[:1] == "#":
            return None
        directory = self.directory
        head = f":{directory.mask(first.sender)} PRIVMSG {directory.nick(recipient)} :"
        room = (MAX_LINE - 2 - len(head.encode())) // 4  # (a character: at most 4 bytes)
        for env in envs:
            if env.kind != "text" or env.meta is not None:
                return None
        # each body within room, without CR, LF or NUL (checked on them all at once)
        bodies = [env.body for env in envs]
        if max(map(len, bodies)) > room:
            return None
        text = "".join(bodies)
        if "\n" in text or "\r" in text or "\0" in text:
            return None
        end = "\r\n" + head
        return (head + end.join(bodies) + "\r\n").encode("utf-8", "replace")

    def tag_line(self, data: dict[str, Any], mode: int) -> bytes:
        """The ``TAGMSG`` line of a ``tags`` notice (chatproto.realm.tags) for a
        client with the message-tags capability (``mode`` bit 1: ``time``); its
        ``msgid`` is the notice's id.  Cached for the notice being fanned out."""
        if data is not self._tag_cache_of:
            self._tag_cache_of = data
            self._tag_cache = [None, None]
        i = mode & 1
        cached = self._tag_cache[i]
        if cached is not None:
            return cached
        to = data["to"]
        if to.startswith("#"):
            target = channel_of(to, self.realm.realm)
        else:
            target = self.directory.nick(to)
        tags = f"@time={server_time(data['ts'])};" if i else "@"
        tags += f"msgid={data['id']};{tag_data(data['tags'])}"
        line = f"{tags} :{self.directory.mask(data['from'])} TAGMSG {target}\r\n".encode()
        self._tag_cache[i] = line
        return line

    def _encode(self, env: Envelope) -> bytes:
        directory = self.directory
        recipient = env.recipient
        if recipient[:1] == "#":
            target = channel_of(recipient, self.realm.realm)
        else:
            target = directory.nick(recipient)
        body = env.body
        if env.kind == "text":  # the usual: one line, as the sender wrote it
            meta = env.meta
            verb = "NOTICE" if meta is not None and meta.get("notice") else "PRIVMSG"
            head = f":{directory.mask(env.sender)} {verb} {target} :"
            if "\n" not in body and "\r" not in body and "\0" not in body:
                line = f"{head}{body}\r\n".encode("utf-8", "replace")
                if len(line) <= MAX_LINE:  # (what _split gives for a body that fits)
                    return line
            hb = head.encode()
            if len(body) * 4 <= MAX_LINE - 2 - len(hb) and "\n" not in body and "\r" not in body:
                return hb + body.encode("utf-8", "replace").replace(b"\0", b"") + CRLF
            return self._split(hb, body)
        source = f":{directory.mask(env.sender)} "
        if env.kind == "bounce":  # another realm refused what we sent: from the server
            head = f":{self.server_name} NOTICE {target} :"
            body = f"[not delivered] {env.body}"
        elif env.kind == "file":  # IRC cannot carry it: a notice saying how to fetch it
            head = f"{source}NOTICE {target} :"
            meta = env.meta or {}
            body = (
                f"[file] {meta.get('name', env.body)} ({meta.get('size', '?')} bytes, "
                f"{meta.get('media_type', 'application/octet-stream')}): fetch it with a "
                f"chatproto client, file id {meta.get('file_id', '?')}"
            )
        else:  # kinds to come: a notice naming what it is
            head = f"{source}NOTICE {target} :"
            body = f"[{env.kind}] {env.body}".strip()
        hb = head.encode("utf-8")
        if len(env.body) * 4 <= MAX_LINE - 2 - len(hb) and "\n" not in body and "\r" not in body:
            return hb + body.encode("utf-8", "replace").replace(b"\0", b"") + CRLF
        return self._split(hb, body)

    @staticmethod
    def _split(hb: bytes, body: str) -> bytes:
        """``body`` as IRC lines after the head ``hb``: one per body line, long ones
        split (no line longer than MAX_LINE)."""
        room = MAX_LINE - 2 - len(hb)
        return b"".join(
            hb + piece.encode("utf-8", "replace") + CRLF for piece in body_lines(body, room)
        )
