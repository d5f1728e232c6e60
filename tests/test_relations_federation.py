"""Replies, reactions, edits and deletes across realms (issue 17) over real mutual TLS
on loopback (tests/fedharness.py): a group whose home is h.example with members on
b.example and c.example, and a private conversation; then what a peer may not do,
fed straight to a realm's intake."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor

from chatproto.client import RemoteError, connect
from chatproto.envelope import Envelope
from tests.conftest import until
from tests.fedharness import drained, federation

PW = "password-1"
GROUP = "#dev@h.example"


@defer.inlineCallbacks
def _user(node: Any, name: str, conns: list[Any]) -> Any:
    inbox: list[dict[str, Any]] = []
    conn = yield connect(_reactor, node.addr, name, PW, register=True, on_message=inbox.append)
    conn.inbox = inbox
    yield conn.synced
    conns.append(conn)
    return conn


@defer.inlineCallbacks
def _joined(conn: Any, n: int) -> Any:
    for _ in range(1500):
        try:
            members = yield conn.members(GROUP)
        except RemoteError as e:
            assert e.code == "remote_realm"
            members = []
        if len(members) == n:
            return
        yield task.deferLater(_reactor, 0.02, lambda: None)
    raise AssertionError("the join did not arrive")


def _got(conn: Any, kind: str, ref: str) -> bool:
    return any(m["kind"] == kind and (m.get("meta") or {}).get("ref") == ref for m in conn.inbox)


@defer.inlineCallbacks
def _page(conn: Any, msg_id: str) -> Any:
    page = yield conn.history(GROUP)
    return next(m for m in page if m["msg_id"] == msg_id)


@pytest_twisted.inlineCallbacks
def test_group_reactions_edits_and_deletes_reach_every_realm(tmp_path: Any) -> Any:
    nodes = yield federation(tmp_path, ["h.example", "b.example", "c.example"])
    h, b, c = nodes
    conns: list[Any] = []
    try:
        owner = yield _user(h, "owner", conns)
        yield owner.create_group("#dev")
        bob = yield _user(b, "bob", conns)
        yield bob.join(GROUP)
        yield _joined(bob, 2)
        early = yield owner.send(GROUP, "before cathy")  # never on c.example
        cathy = yield _user(c, "cathy", conns)
        yield cathy.join(GROUP)
        yield _joined(cathy, 3)
        yield _joined(bob, 3)

        # a reaction by a user of b.example to the home realm's message: b stores it,
        # h checks and relays it to c with b's signature
        hello = yield owner.send(GROUP, "hello all")
        yield until(lambda: any(m["msg_id"] == hello["msg_id"] for m in bob.inbox))
        yield bob.react(hello["msg_id"], "👍")
        r = yield bob.send(GROUP, "hi!", reply_to=hello["msg_id"])
        for conn in (owner, cathy):
            yield until(lambda conn=conn: _got(conn, "reaction", hello["msg_id"]))
        yield until(lambda: any(m["msg_id"] == r["msg_id"] for m in cathy.inbox))
        reply = next(m for m in cathy.inbox if m["msg_id"] == r["msg_id"])
        assert reply["meta"] == {"reply_to": hello["msg_id"]}
        for conn in (owner, bob, cathy):
            shown = yield _page(conn, hello["msg_id"])
            assert shown["meta"] == {"reactions": {"👍": ["bob@b.example"]}}, conn.user
        # a reply to an item c.example never had reaches it all the same (h judged it)
        yield until(lambda: any(m["msg_id"] == early["msg_id"] for m in bob.inbox))
        r = yield bob.send(GROUP, "re before", reply_to=early["msg_id"])
        yield until(lambda: any(m["msg_id"] == r["msg_id"] for m in cathy.inbox))
        # a member realm's reply to what its user may not read is refused at home
        secret = yield owner.send("owner", "a note to self")
        forged = Envelope(
            "forged-reply", "text", "bob@b.example", GROUP, 1767225600.0, "re",
            {"reply_to": secret["msg_id"]},
        )  # fmt: skip
        forged.sig = b.realm.signing.sign(forged)  # all but the reply is in order
        rejected = yield h.realm.receive_remote("b.example", [forged.to_item()])
        assert [r["code"] for r in rejected] == ["not_found"]

        # an edit, then a delete, of bob's own message
        typo = yield bob.send(GROUP, "teh secret plan")
        yield until(lambda: any(m["msg_id"] == typo["msg_id"] for m in cathy.inbox))
        e = yield bob.edit(typo["msg_id"], "the secret plan")
        yield until(lambda: _got(cathy, "edit", typo["msg_id"]))
        for conn in (owner, cathy):
            shown = yield _page(conn, typo["msg_id"])
            assert shown["body"] == "the secret plan" and "edited" in shown["meta"], conn.user
        # cathy (c.example) may not edit or delete bob's message: her realm says so
        for attempt in (cathy.edit(typo["msg_id"], "mine now"), cathy.delete(typo["msg_id"])):
            with pytest.raises(RemoteError) as err:
                yield attempt
            assert err.value.code == "forbidden"
        yield bob.delete(typo["msg_id"])
        for conn in (owner, cathy):
            yield until(lambda conn=conn: _got(conn, "delete", typo["msg_id"]))
        for node in nodes:
            yield drained(node)
            stored = yield node.realm.store.stored_item(typo["msg_id"])
            assert (stored.body, stored.meta) == ("", {"deleted": True}), node.name
            edit = yield node.realm.store.stored_item(e["msg_id"])
            assert edit.body == "", node.name

        # the group's owner (home realm) deletes cathy's message: gone on c.example too
        spam = yield cathy.send(GROUP, "buy cheap watches")
        yield until(lambda: any(m["msg_id"] == spam["msg_id"] for m in owner.inbox))
        yield owner.delete(spam["msg_id"])
        yield until(lambda: _got(cathy, "delete", spam["msg_id"]))
        yield drained(h)
        for node in nodes:
            stored = yield node.realm.store.stored_item(spam["msg_id"])
            assert stored.body == "" and stored.meta == {"deleted": True}, node.name
    finally:
        for conn in conns:
            yield conn.close()
        for node in nodes:
            yield node.stop()


@pytest_twisted.inlineCallbacks
def test_private_reactions_edits_deletes_across_realms_and_what_a_peer_may_not(
    tmp_path: Any,
) -> Any:
    nodes = yield federation(tmp_path, ["h.example", "b.example"])
    h, b = nodes
    conns: list[Any] = []
    try:
        hank = yield _user(h, "hank", conns)
        bea = yield _user(b, "bea", conns)
        m = yield hank.send("bea@b.example", "the code is 1234")
        yield until(lambda: any(x["msg_id"] == m["msg_id"] for x in bea.inbox))
        yield bea.react(m["msg_id"], "🙏")
        yield until(lambda: _got(hank, "reaction", m["msg_id"]))
        yield hank.edit(m["msg_id"], "the code is 4321")
        yield until(lambda: _got(bea, "edit", m["msg_id"]))
        page = yield bea.history("hank@h.example")
        assert page[-1]["body"] == "the code is 4321"
        assert page[-1]["meta"]["reactions"] == {"🙏": ["bea@b.example"]}
        yield hank.delete(m["msg_id"])
        yield until(lambda: _got(bea, "delete", m["msg_id"]))
        stored = yield b.realm.store.stored_item(m["msg_id"])
        assert (stored.body, stored.meta) == ("", {"deleted": True})

        # What b.example may not make h.example store (fed to h's intake directly):
        mine = yield hank.send("bea@b.example", "hank's words")
        other = yield hank.send("hank", "a note to self")
        yield drained(h)

        def item(n: int, kind: str, sender: str, body: str = "", **meta: Any) -> dict[str, Any]:
            return {
                "id": f"forged{n}",
                "kind": kind,
                "from": sender,
                "to": "hank@h.example",
                "ts": 1767225600.0,
                "body": body,
                "meta": meta,
            }

        raw = [
            # bea may not edit or delete hank's message
            item(1, "edit", "bea@b.example", "bea's words", ref=mine["msg_id"]),
            item(2, "delete", "bea@b.example", ref=mine["msg_id"]),
            # nor touch an item of another conversation, or one that does not exist
            item(3, "reaction", "bea@b.example", ref=other["msg_id"], emoji="x"),
            item(4, "reaction", "bea@b.example", ref="nothing-here", emoji="x"),
            # b.example speaks for its own users only
            item(5, "reaction", "zed@c.example", ref=mine["msg_id"], emoji="x"),
            # malformed
            item(6, "reaction", "bea@b.example", ref=mine["msg_id"]),
            item(7, "delete", "bea@b.example", "text", ref=mine["msg_id"]),
            item(8, "edit", "bea@b.example", "x", ref=mine["msg_id"], extra=1),
            item(9, "reaction", "bea@b.example", ref=mine["msg_id"], emoji="x", remove=False),
            {**item(10, "text", "bea@b.example", "x"), "meta": {"reply_to": 5}},
            # a reply answers an item of its conversation that its sender may read
            {**item(13, "text", "bea@b.example", "re"), "meta": {"reply_to": other["msg_id"]}},
            {**item(14, "text", "bea@b.example", "re"), "meta": {"reply_to": "nothing-here"}},
        ]
        rejected = yield h.realm.receive_remote("b.example", raw)
        codes = {r["id"]: r["code"] for r in rejected}
        assert codes == {
            "forged1": "forbidden",
            "forged2": "forbidden",
            "forged3": "not_found",
            "forged4": "not_found",
            "forged5": "forged_sender",
            "forged6": "bad_request",
            "forged7": "bad_request",
            "forged8": "bad_request",
            "forged9": "bad_request",
            "forged10": "bad_request",
            "forged13": "not_found",
            "forged14": "not_found",
        }
        stored = yield h.realm.store.stored_item(mine["msg_id"])
        assert stored.body == "hank's words"
        # an item sent again (a retried transaction) is acknowledged, not refused
        ok = item(11, "reaction", "bea@b.example", ref=mine["msg_id"], emoji="x")
        assert (yield h.realm.receive_remote("b.example", [ok])) == []
        assert (yield h.realm.receive_remote("b.example", [ok])) == []
        # a reply, a notice too
        reply = {**item(12, "text", "bea@b.example", "re"), "meta": {}}
        reply["meta"] = {"notice": True, "reply_to": mine["msg_id"]}
        assert (yield h.realm.receive_remote("b.example", [reply])) == []
        stored = yield h.realm.store.stored_item("forged12")
        assert stored.meta == {"notice": True, "reply_to": mine["msg_id"]}
    finally:
        for conn in conns:
            yield conn.close()
        for node in nodes:
            yield node.stop()
