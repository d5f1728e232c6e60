"""Reactions, replies and deletes through the IRC gateway (issue 17): IRCv3
``+draft/react``/``+draft/unreact`` and ``+draft/reply`` on TAGMSG and PRIVMSG, and
``draft/message-redaction`` (REDACT), both ways between IRC and native clients, over
StringTransport with a MemoryStore realm."""

from __future__ import annotations

from typing import Any

from chatproto.irc import IRCFactory
from chatproto.realm import RealmService
from chatproto.testing import connect_string_transport, frame, frames
from tests.test_irc import PW, Conn, clock_fixture, factory_fixture, login, parsed, realm_fixture  # noqa: F401

CAPS = "message-tags echo-message server-time draft/message-redaction"


class Native:
    """A native client on StringTransport."""

    def __init__(self, realm: RealmService, user: str) -> None:
        realm.create_user(user, PW)
        self.clock = realm.clock
        self.proto, self.t = connect_string_transport(realm)
        self.proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
        self.proto.dataReceived(frame({"type": "login", "id": 2, "user": user, "password": PW}))
        self.got: list[dict[str, Any]] = []
        self.n = 10
        self.drain()

    def drain(self) -> list[dict[str, Any]]:
        self.clock.advance(0)  # type: ignore[attr-defined]
        new = frames(self.t)
        self.got.extend(new)
        return new

    def req(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.n += 1
        self.proto.dataReceived(frame({"type": type_, "id": self.n, **fields}))
        return next(f for f in self.drain() if f.get("id") == self.n)


def test_irc_reacts_and_unreacts_natives_and_irc_see_it(
    factory: IRCFactory, realm: RealmService
) -> None:
    alice = login(factory, "alice", CAPS)
    bob = login(factory, "bob", "message-tags")
    carol = login(factory, "carol", "server-time")  # no message-tags: no reactions
    for c in (alice, bob, carol):
        c.send("JOIN #t")
        c.lines()
    dave = Native(realm, "dave")
    dave.req("join", group="#t")
    bob.lines()
    alice.lines()
    carol.lines()
    bob.send("PRIVMSG #t :ship it?")
    [(tags, _, _)] = parsed(alice)
    msgid = tags["msgid"]
    carol.lines()
    msg = next(f for f in dave.drain() if f.get("body") == "ship it?")
    # a react to a msgid we rendered is a stored reaction, shown to everyone
    alice.send(f"@+draft/react=👍;+draft/reply={msgid} TAGMSG #t")
    [(tags, cmd, params)] = parsed(bob)
    assert cmd == "TAGMSG" and params == ["#t"]
    assert tags["+draft/react"] == "👍" and tags["+draft/reply"] == msgid
    assert tags["msgid"].isdigit()  # a stored item: its position
    [(echo, _, _)] = parsed(alice)  # echo-message
    assert echo["msgid"] == tags["msgid"]
    assert carol.lines() == []
    [item] = [f for f in dave.drain() if f.get("kind") == "reaction"]
    assert item["meta"] == {"ref": msg["msg_id"], "emoji": "👍"}
    page = dave.req("history", **{"with": "#t"})["messages"]
    assert page[-1]["meta"]["reactions"] == {"👍": ["alice@localhost"]}
    alice.send(f"@+draft/unreact=👍;+draft/reply={msgid} TAGMSG #t")
    [(tags, _, _)] = parsed(bob)
    assert tags["+draft/unreact"] == "👍"
    alice.lines()  # the echo
    page = dave.req("history", **{"with": "#t"})["messages"]
    assert "reactions" not in (page[-1].get("meta") or {})
    # a native reaction reaches IRC as a TAGMSG
    dave.req("react", msg_id=msg["msg_id"], emoji="🎉")
    [(tags, cmd, _)] = parsed(alice)
    assert cmd == "TAGMSG" and tags["+draft/react"] == "🎉" and tags["+draft/reply"] == msgid
    # a react to a msgid the gateway does not know stays an ephemeral relay
    alice.lines()
    bob.lines()
    alice.send("@+draft/react=👍;+draft/reply=999999 TAGMSG #t")
    [(tags, _, _)] = parsed(bob)
    assert not tags["msgid"].isdigit()


def test_replies_carry_draft_reply(factory: IRCFactory, realm: RealmService) -> None:
    alice = login(factory, "alice", CAPS)
    dave = Native(realm, "dave")
    dave.req("send", to="alice", body="question")
    [(tags, _, _)] = parsed(alice)
    q = next(f for f in dave.got if f.get("body") == "question")
    dave.req("send", to="alice", body="answer", reply_to=q["msg_id"])
    [(rtags, cmd, params)] = parsed(alice)
    assert cmd == "PRIVMSG" and params == ["alice", "answer"]
    assert rtags["+draft/reply"] == tags["msgid"]


def test_an_irc_reply_is_a_realm_reply(factory: IRCFactory, realm: RealmService) -> None:
    """``@+draft/reply=<msgid> PRIVMSG`` naming a message of the conversation the
    gateway rendered is stored as a reply (``meta.reply_to``): native clients see
    the reply, IRC clients the tag (written from it); other client tags stay."""
    alice = login(factory, "alice", CAPS)
    bob = login(factory, "bob", CAPS)
    for c in (alice, bob):
        c.send("JOIN #t")
    alice.lines(), bob.lines()
    dave = Native(realm, "dave")
    dave.req("join", group="#t")
    alice.lines(), bob.lines()
    dave.req("send", to="#t", body="question")
    [(tags, _, _)] = parsed(alice)
    bob.lines()
    q = next(f for f in dave.got if f.get("body") == "question")
    alice.send(f"@+draft/reply={tags['msgid']};+x=1 PRIVMSG #t :answer", bytewise=True)
    [(echo, cmd, _)] = parsed(alice)
    assert cmd == "PRIVMSG" and echo["+draft/reply"] == tags["msgid"] and echo["+x"] == "1"
    [(got, cmd, params)] = parsed(bob)
    assert params == ["#t", "answer"] and got["+draft/reply"] == tags["msgid"]
    answer = next(f for f in dave.drain() if f.get("body") == "answer")
    assert answer["meta"] == {"reply_to": q["msg_id"], "tags": {"+x": "1"}}
    # In a private conversation too; a msgid of another conversation (or unknown)
    # is no reply: the tag is relayed as it was sent.
    dave.req("send", to="alice", body="dm")
    [(dm, _, _)] = parsed(alice)
    alice.send(f"@+draft/reply={dm['msgid']} PRIVMSG dave :re dm")
    alice.send(f"@+draft/reply={tags['msgid']} PRIVMSG dave :not that one")
    alice.send("@+draft/reply=999999 PRIVMSG dave :unknown")
    alice.lines()
    got_dms = [f for f in dave.drain() if f.get("type") == "msg" and f["to"] == "dave@localhost"]
    dm_id = next(f for f in dave.got if f.get("body") == "dm")["msg_id"]
    assert [f["meta"] for f in got_dms] == [
        {"reply_to": dm_id},
        {"tags": {"+draft/reply": tags["msgid"]}},
        {"tags": {"+draft/reply": "999999"}},
    ]
    # A reply to a message deleted meanwhile: the realm's not_found, as a numeric.
    dave.req("delete", msg_id=dm_id)
    alice.lines()
    alice.send(f"@+draft/reply={dm['msgid']} PRIVMSG dave :too late")
    [(_, cmd, params)] = parsed(alice)
    assert cmd == "400" and params[1] == "PRIVMSG"
    assert not [f for f in dave.drain() if f.get("body") == "too late"]


def test_redact_deletes_and_is_relayed(factory: IRCFactory, realm: RealmService) -> None:
    alice = login(factory, "alice", CAPS)
    bob = login(factory, "bob", CAPS)
    old = login(factory, "carol", "message-tags")  # no redaction capability
    for c in (alice, bob, old):
        c.send("JOIN #t")
        c.lines()
    alice.lines()
    bob.lines()
    dave = Native(realm, "dave")
    dave.req("join", group="#t")
    for c in (alice, bob, old):
        c.lines()
    alice.send("PRIVMSG #t :oops, my password")
    [(tags, _, _)] = parsed(bob)
    msgid = tags["msgid"]
    alice.lines()
    old.lines()
    # bob may not delete alice's message (he is no channel operator)
    bob.send(f"REDACT #t {msgid} :nope")
    [(_, cmd, params)] = parsed(bob)
    assert cmd == "FAIL" and params[:4] == ["REDACT", "REDACT_FORBIDDEN", "#t", msgid]
    bob.send("REDACT #t 123456 :unknown")
    [(_, cmd, params)] = parsed(bob)
    assert params[:2] == ["REDACT", "UNKNOWN_MSGID"]
    bob.send(f"REDACT #nowhere {msgid}")  # a msgid of another conversation
    [(_, cmd, params)] = parsed(bob)
    assert params[:2] == ["REDACT", "UNKNOWN_MSGID"]
    bob.send(f"REDACT no,such {msgid}")
    [(_, cmd, params)] = parsed(bob)
    assert params[:2] == ["REDACT", "INVALID_TARGET"]
    alice.send(f"REDACT #t {msgid} :typo")
    for c in (alice, bob):
        [(_, cmd, params)] = parsed(c)
        assert cmd == "REDACT" and params == ["#t", msgid]
    assert old.lines() == []
    deleted = [f for f in dave.drain() if f.get("kind") == "delete"]
    assert len(deleted) == 1
    page = dave.req("history", **{"with": "#t"})["messages"]
    gone = next(m for m in page if m["from"] == "alice@localhost" and m["kind"] == "text")
    assert gone["body"] == "" and gone["meta"] == {"deleted": True}
    # a native delete reaches IRC as REDACT
    dave.req("send", to="#t", body="mine")
    [(tags, _, _)] = parsed(alice)
    mine = next(f for f in dave.got if f.get("body") == "mine")
    bob.lines()
    dave.req("delete", msg_id=mine["msg_id"])
    [(_, cmd, params)] = parsed(alice)
    assert (cmd, params) == ("REDACT", ["#t", tags["msgid"]])


def test_redaction_is_offered(factory: IRCFactory) -> None:
    c = Conn(factory)
    c.send("CAP LS 302")
    assert "draft/message-redaction" in " ".join(c.lines())


def test_a_react_past_the_limit_is_a_plain_error(factory: IRCFactory, realm: RealmService) -> None:
    """Past ``relations.MAX_CHANGES`` reactions to one message, a ``+draft/react``
    TAGMSG is answered ``400 TAGMSG`` with the realm's reason, not the ``405`` of a
    JOIN ("You have joined too many channels")."""
    from chatproto.relations import MAX_CHANGES

    alice = login(factory, "alice", CAPS)
    bob = login(factory, "bob", CAPS)
    bob.send("PRIVMSG alice :react to this")
    [(tags, _, _)] = parsed(alice)
    msgid = tags["msgid"]
    for i in range(MAX_CHANGES):
        alice.send(f"@+draft/react=e{i};+draft/reply={msgid} TAGMSG bob")
    alice.lines()
    alice.send(f"@+draft/react=more;+draft/reply={msgid} TAGMSG bob")
    [(_, cmd, params)] = parsed(alice)
    assert cmd == "400" and params[:2] == ["alice", "TAGMSG"] and "100 edits" in params[2]


def test_msgids_keep_at_least_the_newest_and_forget_the_older_half_at_once() -> None:
    from chatproto.envelope import Envelope
    from chatproto.irc.relations import MsgIds

    ids = MsgIds(size=4)
    envs = [Envelope(f"m{i}", "text", "a@x", "b@x", 0.0, "hi", pos=i) for i in range(1, 12)]
    for env in envs[:9]:
        ids.remember(env)
    # 9 > 2 x 4: the 5 oldest are forgotten, the newest 4 kept
    assert [ids.msgid(f"m{i}") for i in range(1, 10)] == [None] * 5 + [6, 7, 8, 9]
    assert ids.msg_id("9", "a@x", "b@x") == "m9" and ids.msg_id("5", "a@x", "b@x") is None
    ids.remember(envs[5])  # known: nothing changes
    for env in envs[9:]:
        ids.remember(env)
    assert [ids.msgid(f"m{i}") for i in range(6, 12)] == [6, 7, 8, 9, 10, 11]
    ids.remember(Envelope("m0", "text", "a@x", "b@x", 0.0, "hi"))  # not stored: no msgid
    assert ids.msgid("m0") is None


def test_only_a_msgid_shown_is_remembered(factory: IRCFactory, realm: RealmService) -> None:
    """A client without message-tags is never shown a msgid, so an item rendered only
    to such clients is not remembered (no bookkeeping per plain DM); one shown with
    its msgid is, and a reply naming it is a realm reply."""
    alice = login(factory, "alice")
    bob = login(factory, "bob")
    alice.send("PRIVMSG bob :plain")
    bob.lines()
    plain = next(e for e in realm.store.items if e.body == "plain")
    assert factory.msgids.msgid(plain.id) is None
    carol = login(factory, "carol", caps="message-tags")
    alice.send("PRIVMSG carol :tagged")
    [(tags, _, _)] = parsed(carol)
    tagged = next(e for e in realm.store.items if e.body == "tagged")
    assert factory.msgids.msgid(tagged.id) == tagged.pos == int(tags["msgid"])
    carol.send(f"@+draft/reply={tags['msgid']} PRIVMSG alice :answer")
    answer = next(e for e in realm.store.items if e.body == "answer")
    assert (answer.meta or {}).get("reply_to") == tagged.id
