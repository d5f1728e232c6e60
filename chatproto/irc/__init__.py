"""The IRC gateway: real IRC clients (irssi, weechat, HexChat) on the realm.

A gateway connection (:class:`IRCProtocol`) is a translator: it parses IRC lines,
calls the realm service or the logged-in :class:`chatproto.realm.Session`, and turns
:class:`chatproto.errors.ChatError` into numerics.  It decides nothing: every rule
(who may send, join, kick, set a topic, the channel modes) lives in the realm.

It is also the session's *mind*.  A gateway connection is an ordinary realm session of
the device ``irc`` (``irc/name`` when it logs in as ``account/name``: one position per
IRC client): it acknowledges what it has written, so an IRC user who comes back
gets everything said while they were away (offline backlog after login, with
``server-time`` tags) -- the always-on bouncer behaviour -- and ``CHATHISTORY`` pages
older history.  Messages sent from IRC are stored before they are delivered, with the
same guarantees as native ones.

Mapping (documented in docs/irc.md): the nick is the account name; a local user is
``name``, a user of another realm ``name/realm``; the group ``#name@realm`` is the
channel ``#name`` (``#name/realm`` for another realm).

Modules: ``lines`` (parsing, formatting, names),
``replies`` (numerics, labeled responses),
``commands`` (the command table), ``protocol``
(the connection: registration, delivery, dispatch), ``messages``,
``channels``, ``users`` (the commands), and
``factory`` (the factory and the fan-out line cache).
"""

from chatproto.irc.commands import COMMANDS as _HANDLERS
from chatproto.irc.factory import IRCFactory
from chatproto.irc.lines import (
    MAX_LINE,
    MAX_TAGS,
    MAX_TARGETS,
    IRCBadLine,
    channel_of,
    group_of,
    nick_of,
    parse_line,
    user_of,
)
from chatproto.irc.protocol import ACK_DELAY, CAPABILITIES, DEVICE, MAX_QUEUED, IRCProtocol

__all__ = [
    "ACK_DELAY",
    "CAPABILITIES",
    "DEVICE",
    "MAX_LINE",
    "MAX_QUEUED",
    "MAX_TAGS",
    "MAX_TARGETS",
    "_HANDLERS",
    "IRCBadLine",
    "IRCFactory",
    "IRCProtocol",
    "channel_of",
    "group_of",
    "nick_of",
    "parse_line",
    "user_of",
]
