"""Typing between native clients and IRC clients (IRCv3 ``+typing``): a native
``typing`` notice reaches an IRC user with ``message-tags`` as ``TAGMSG`` with
``+typing=active``/``done``, in a private conversation and in a channel; a client
without the capability gets nothing."""

from __future__ import annotations

from twisted.internet.task import Clock

from chatproto.irc import IRCFactory
from chatproto.testing import connect_string_transport, frame, frames
from tests.test_irc import PW, Conn, clock_fixture, factory_fixture, login, parsed, realm_fixture  # noqa: F401


def test_native_typing_reaches_irc_users_as_tagmsg(factory: IRCFactory, clock: Clock) -> None:
    realm = factory.realm
    bob = login(factory, "bob", "message-tags server-time")
    carol = login(factory, "carol", "")
    for c in (bob, carol):
        c.send("JOIN #t")
    bob.lines(), carol.lines()
    proto, t = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
    proto.dataReceived(frame({"type": "login", "id": 2, "user": "alice", "password": PW}))
    clock.advance(0)
    proto.dataReceived(frame({"type": "join", "id": 3, "group": "#t"}))
    frames(t), bob.lines(), carol.lines()
    proto.dataReceived(frame({"type": "typing", "id": 4, "with": "bob"}))
    assert frames(t)[-1] == {"type": "result", "id": 4, "with": "bob@localhost"}
    [(tags, cmd, params)] = parsed(bob)
    assert cmd == "TAGMSG" and params == ["bob"] and tags["+typing"] == "active"
    assert tags["msgid"] and "time" in tags
    proto.dataReceived(frame({"type": "typing", "id": 5, "with": "bob", "typing": False}))
    [(tags, cmd, params)] = parsed(bob)
    assert tags["+typing"] == "done"
    proto.dataReceived(frame({"type": "typing", "id": 6, "with": "#t"}))
    [(tags, cmd, params)] = parsed(bob)
    assert cmd == "TAGMSG" and params == ["#t"] and tags["+typing"] == "active"
    assert carol.lines() == []  # no message-tags: nothing
