"""Replies, reactions, edits and deletes (issue 17) over StringTransport: a real realm
on a MemoryStore, a Clock, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.relations import check_emoji, current_view
from chatproto.testing import frame, frames, logged_in, make_test_realm
from tests.test_protocol import clock_fixture, realm_fixture  # noqa: F401


class User:
    """A logged-in StringTransport connection, with its frames collected."""

    def __init__(self, realm: Any, clock: Clock, name: str) -> None:
        self.proto, self.transport = logged_in(realm, clock, name)
        self.clock = clock
        self._seen: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}
        self._n = 100
        self.drain()

    @property
    def seen(self) -> list[dict[str, Any]]:
        """Every msg frame so far."""
        self.drain()
        return self._seen

    def drain(self) -> None:
        self.clock.advance(0)
        for f in frames(self.transport):
            if f["type"] == "msg":
                self._seen.append(f)
            elif "id" in f:
                self.replies[f["id"]] = f

    def req(self, type_: str, **fields: Any) -> dict[str, Any]:
        self._n += 1
        rid = self._n
        self.proto.dataReceived(frame({"type": type_, "id": rid, **fields}))
        self.drain()
        return self.replies.pop(rid)

    def ok(self, type_: str, **fields: Any) -> dict[str, Any]:
        r = self.req(type_, **fields)
        assert r["type"] == "result", r
        return r

    def err(self, type_: str, **fields: Any) -> str:
        r = self.req(type_, **fields)
        assert r["type"] == "error", r
        return str(r["code"])

    def history(self, peer: str) -> list[dict[str, Any]]:
        return list(self.ok("history", **{"with": peer})["messages"])


def users(realm: Any, clock: Clock, *names: str) -> list[User]:
    return [User(realm, clock, n) for n in names]


def test_reply_names_an_item_of_the_same_conversation(realm: Any, clock: Clock) -> None:
    alice, bob, carol = users(realm, clock, "alice", "bob", "carol")
    first = alice.ok("send", to="bob", body="lunch?")
    other = alice.ok("send", to="carol", body="hi carol")
    r = bob.ok("send", to="alice", body="yes", reply_to=first["msg_id"])
    mine = [m for m in alice.seen if m["msg_id"] == r["msg_id"]]
    assert mine[0]["meta"] == {"reply_to": first["msg_id"]}
    assert bob.seen[-1]["meta"] == {"reply_to": first["msg_id"]}
    assert bob.history("alice")[-1]["meta"] == {"reply_to": first["msg_id"]}
    # an item bob cannot read, an unknown id, one of another conversation
    assert bob.err("send", to="alice", body="x", reply_to=other["msg_id"]) == "not_found"
    assert bob.err("send", to="alice", body="x", reply_to="nope") == "not_found"
    assert alice.err("send", to="bob", body="x", reply_to=other["msg_id"]) == "bad_request"
    assert carol.err("send", to="alice", body="x", reply_to=first["msg_id"]) == "not_found"
    assert bob.err("send", to="alice", body="x", reply_to=5) == "bad_request"
    # with a notice flag too
    n = alice.ok("send", to="bob", body="auto", notice=True, reply_to=r["msg_id"])
    assert alice.seen[-1]["msg_id"] == n["msg_id"]
    assert alice.seen[-1]["meta"] == {"notice": True, "reply_to": r["msg_id"]}


def test_reactions_are_items_and_aggregate_in_history(realm: Any, clock: Clock) -> None:
    alice, bob, carol = users(realm, clock, "alice", "bob", "carol")
    m = alice.ok("send", to="bob", body="ship it")
    r = bob.ok("react", msg_id=m["msg_id"], emoji="👍")
    assert r["pos"] > m["pos"]
    item = alice.seen[-1]
    assert item["kind"] == "reaction" and item["from"] == "bob@localhost"
    assert item["to"] == "alice@localhost" and item["body"] == ""
    assert item["meta"] == {"ref": m["msg_id"], "emoji": "👍"}
    alice.ok("react", msg_id=m["msg_id"], emoji="👍")
    alice.ok("react", msg_id=m["msg_id"], emoji="🎉")
    bob.ok("react", msg_id=m["msg_id"], emoji="👍")  # again: changes nothing
    [shown] = alice.history("bob")  # reaction items are not history entries
    assert shown["body"] == "ship it"
    assert shown["meta"] == {
        "reactions": {"👍": ["bob@localhost", "alice@localhost"], "🎉": ["alice@localhost"]}
    }
    bob.ok("react", msg_id=m["msg_id"], emoji="👍", remove=True)
    assert bob.seen[-1]["meta"] == {"ref": m["msg_id"], "emoji": "👍", "remove": True}
    alice.ok("react", msg_id=m["msg_id"], emoji="🎉", remove=True)
    [shown] = bob.history("alice")
    assert shown["meta"] == {"reactions": {"👍": ["alice@localhost"]}}
    # not readable: not_found; bad emoji: bad_request
    assert carol.err("react", msg_id=m["msg_id"], emoji="👍") == "not_found"
    assert not [s for s in carol.seen if s["kind"] == "reaction"]
    for bad in ("", "a b", "x" * 33, "\u202e", "\x1b[31m"):
        assert bob.err("react", msg_id=m["msg_id"], emoji=bad) == "bad_request"
    assert bob.err("react", msg_id=m["msg_id"]) == "bad_request"
    assert bob.err("react", msg_id=m["msg_id"], emoji="👍", remove="yes") == "bad_request"
    # one may not react to a reaction (nor to an event)
    assert bob.err("react", msg_id=r["msg_id"], emoji="👍") == "bad_request"


def test_edits_by_the_sender_only_show_in_history_and_backlog(realm: Any, clock: Clock) -> None:
    alice, bob, carol = users(realm, clock, "alice", "bob", "carol")
    m = alice.ok("send", to="bob", body="teh plan")
    e = alice.ok("edit", msg_id=m["msg_id"], body="the plan")
    item = bob.seen[-1]
    assert item["kind"] == "edit" and item["body"] == "the plan"
    assert item["meta"] == {"ref": m["msg_id"]} and item["pos"] == e["pos"]
    [shown] = bob.history("alice")
    assert shown["body"] == "the plan" and shown["meta"] == {"edited": e["ts"]}
    assert shown["pos"] == m["pos"] and shown["msg_id"] == m["msg_id"]
    assert bob.err("edit", msg_id=m["msg_id"], body="hacked") == "forbidden"
    assert carol.err("edit", msg_id=m["msg_id"], body="hacked") == "not_found"
    assert alice.err("edit", msg_id=m["msg_id"]) == "bad_request"
    big = "x" * (realm.config.limits.max_body + 1)
    assert alice.err("edit", msg_id=m["msg_id"], body=big) == "too_large"
    assert alice.err("edit", msg_id=m["msg_id"], body="\x1b[2J") == "bad_request"
    # a device that logs in later: the backlog shows the current text, then the edit
    late = logged_in(realm, clock, "bob", device="late", since=0)
    clock.advance(0)
    backlog = [f for f in frames(late[1]) if f["type"] == "msg"]
    orig = next(f for f in backlog if f["msg_id"] == m["msg_id"])
    assert orig["body"] == "the plan" and orig["meta"] == {"edited": e["ts"]}
    assert backlog[-1]["kind"] == "edit"


def test_deletes_wipe_the_item_and_refuse_what_follows(realm: Any, clock: Clock) -> None:
    alice, bob = users(realm, clock, "alice", "bob")
    m = alice.ok("send", to="bob", body="my password is hunter2")
    alice.ok("edit", msg_id=m["msg_id"], body="my password is hunter3")
    bob.ok("react", msg_id=m["msg_id"], emoji="😱")
    assert bob.err("delete", msg_id=m["msg_id"]) == "forbidden"
    d = alice.ok("delete", msg_id=m["msg_id"])
    item = bob.seen[-1]
    assert item["kind"] == "delete" and item["pos"] == d["pos"]
    assert item["meta"] == {"ref": m["msg_id"]} and item["body"] == ""
    [shown] = bob.history("alice")
    assert shown["body"] == "" and shown["meta"] == {"deleted": True}
    # gone from the store, edits included
    assert not [e for e in realm.store.items if "hunter" in e.body]
    for req, fields in (
        ("edit", {"body": "again"}),
        ("react", {"emoji": "👍"}),
        ("delete", {}),
    ):
        assert alice.err(req, msg_id=m["msg_id"], **fields) == "not_found"
    assert bob.err("send", to="alice", body="?", reply_to=m["msg_id"]) == "not_found"


def test_group_admins_delete_members_read_what_they_may(realm: Any, clock: Clock) -> None:
    owner, member, other, late = users(realm, clock, "owner", "member", "other", "late")
    owner.ok("create_group", group="#dev")
    member.ok("join", group="#dev")
    other.ok("join", group="#dev")
    m = member.ok("send", to="#dev", body="spam")
    o = other.ok("send", to="#dev", body="fine")
    # a plain member deletes or edits only their own
    assert member.err("delete", msg_id=o["msg_id"]) == "forbidden"
    assert member.err("edit", msg_id=o["msg_id"], body="x") == "forbidden"
    member.ok("react", msg_id=o["msg_id"], emoji="👀")
    assert owner.seen[-1]["to"] == "#dev@localhost"
    assert owner.seen[-1]["kind"] == "reaction"
    # not a member: not_found; joined later under the "joined" rule: not_found
    assert late.err("react", msg_id=o["msg_id"], emoji="👀") == "not_found"
    late.ok("join", group="#dev")
    assert late.err("react", msg_id=o["msg_id"], emoji="👀") == "not_found"
    assert late.err("delete", msg_id=o["msg_id"]) == "not_found"
    # the owner removes a member's message; every member hears of it
    owner.ok("delete", msg_id=m["msg_id"])
    for u in (member, other, late):
        assert u.seen[-1]["kind"] == "delete" and u.seen[-1]["meta"] == {"ref": m["msg_id"]}
    page = other.history("#dev")
    spam = next(x for x in page if x["msg_id"] == m["msg_id"])
    assert spam["meta"] == {"deleted": True} and spam["body"] == ""
    fine = next(x for x in page if x["msg_id"] == o["msg_id"])
    assert fine["meta"] == {"reactions": {"👀": ["member@localhost"]}}
    # an admin may delete, a member who left may not
    owner.ok("set_role", group="#dev", user="other", role="admin")
    other.ok("delete", msg_id=o["msg_id"])
    x = member.ok("send", to="#dev", body="bye")
    member.ok("leave", group="#dev")
    assert member.err("delete", msg_id=x["msg_id"]) == "not_found"


def test_moderated_group_reactions_follow_send(realm: Any, clock: Clock) -> None:
    owner, member = users(realm, clock, "owner", "member")
    owner.ok("create_group", group="#mod")
    member.ok("join", group="#mod")
    m = owner.ok("send", to="#mod", body="announcement")
    owner.ok("set_group", group="#mod", moderated=True)
    assert member.err("react", msg_id=m["msg_id"], emoji="👍") == "moderated"


def test_reactions_edits_deletes_are_rate_limited(clock: Clock) -> None:
    from chatproto.config import Config

    cfg = Config()
    cfg.limits.send_burst = 2
    cfg.limits.send_rate = 0.001
    realm = make_test_realm(clock, cfg)
    try:
        alice, _bob = users(realm, clock, "alice", "bob")
        m = alice.ok("send", to="bob", body="x")
        alice.ok("react", msg_id=m["msg_id"], emoji="a")
        r = alice.req("react", msg_id=m["msg_id"], emoji="b")
        assert r["code"] == "rate_limited" and r["retry_after"] > 0
        assert alice.req("edit", msg_id=m["msg_id"], body="y")["code"] == "rate_limited"
        assert alice.req("delete", msg_id=m["msg_id"])["code"] == "rate_limited"
    finally:
        realm.stopService()


def test_requests_one_byte_at_a_time(realm: Any, clock: Clock) -> None:
    alice, bob = users(realm, clock, "alice", "bob")
    m = alice.ok("send", to="bob", body="x")
    data = frame({"type": "react", "id": "r", "msg_id": m["msg_id"], "emoji": "✓"})
    for i in range(len(data)):
        bob.proto.dataReceived(data[i : i + 1])
    bob.drain()
    assert bob.replies["r"]["type"] == "result"
    assert bob.seen[-1]["meta"]["emoji"] == "✓"


def test_current_view_counts_only_the_senders_edits() -> None:
    def env(i: int, kind: str, sender: str, body: str = "", **meta: Any) -> Envelope:
        return Envelope(f"id{i}", kind, sender, "b@x", float(i), body, meta or None, i)

    orig = env(1, "text", "a@x", "one")
    refs = [
        env(2, "edit", "b@x", "forged", ref="id1"),
        env(3, "reaction", "b@x", ref="id1", emoji="+"),
        env(4, "edit", "a@x", "two", ref="id1"),
    ]
    [out] = current_view([orig], refs)
    assert out.body == "two" and out.meta == {"edited": 4.0, "reactions": {"+": ["b@x"]}}
    assert orig.body == "one" and orig.meta is None  # a copy: stores share items
    [plain] = current_view([orig], refs, reactions=False)
    assert plain.meta == {"edited": 4.0}


def test_check_emoji() -> None:
    assert check_emoji("👍🏽") == "👍🏽"
    assert check_emoji(":+1:") == ":+1:"
    for bad in (None, 3, "", "a\tb", "\u2066x"):
        with pytest.raises(ChatError):
            check_emoji(bad)


def test_a_signature_covers_what_an_item_refers_to() -> None:
    from chatproto.signing import canonical

    def env(kind: str, **meta: Any) -> Envelope:
        return Envelope("id1", kind, "a@x", "#g@h", 1.0, "", meta or None)

    base = canonical(env("reaction", ref="m1", emoji="+"))
    assert canonical(env("reaction", ref="m2", emoji="+")) != base
    assert canonical(env("reaction", ref="m1", emoji="-")) != base
    assert canonical(env("reaction", ref="m1", emoji="+", remove=True)) != base
    for kind in ("edit", "delete"):
        assert canonical(env(kind, ref="m1")) != canonical(env(kind, ref="m2"))
    assert canonical(env("text", reply_to="m1")) != canonical(env("text", reply_to="m2"))
    assert canonical(env("text", notice=True)) == canonical(env("text"))


def test_one_user_makes_at_most_max_changes_to_one_item(clock: Clock) -> None:
    """Every history page, search result and conversation list reads all the edits and
    reactions of the items it shows: one user flooding an item with distinct emoji or
    edits made every reader of it pay for them (20000 reactions and 2000 edits: 2 s and
    580 KB a page).  A user's edits and reactions to one item are capped."""
    from chatproto.config import Config
    from chatproto.relations import MAX_CHANGES

    cfg = Config()
    cfg.limits.send_burst = 10**6
    realm = make_test_realm(clock, cfg)
    alice, bob, carol = users(realm, clock, "alice", "bob", "carol")
    alice.ok("create_group", group="#dev")
    for u in (bob, carol):
        u.ok("join", group="#dev")
    m = alice.ok("send", to="#dev", body="x")["msg_id"]
    for i in range(MAX_CHANGES // 2):
        bob.ok("react", msg_id=m, emoji=f"e{i}")
        bob.ok("react", msg_id=m, emoji=f"e{i}", remove=True)
    before = len(alice.seen)
    assert bob.err("react", msg_id=m, emoji="one-more") == "limit_reached"
    assert bob.err("react", msg_id=m, emoji="e0", remove=True) == "limit_reached"
    assert len(alice.seen) == before  # nothing stored
    carol.ok("react", msg_id=m, emoji="e0")  # another user's allowance is theirs
    for i in range(MAX_CHANGES):
        alice.ok("react" if i % 2 else "edit", msg_id=m, emoji="e", body=f"v{i}")
    assert alice.err("edit", msg_id=m, body="again") == "limit_reached"
    [shown] = [e for e in alice.history("#dev") if e["msg_id"] == m]
    assert shown["body"] == f"v{MAX_CHANGES - 2}" and shown["meta"]["reactions"] == {
        "e0": ["carol@localhost"],
        "e": ["alice@localhost"],
    }
    alice.ok("delete", msg_id=m)  # a delete is always possible
    realm.stopService()


def test_a_reaction_shows_something() -> None:
    """A reaction of invisible characters only (a zero-width space, a variation
    selector, a language tag, Hangul fillers...) showed as nothing, a reaction nobody
    can see or tell from another: each was a valid label.  It needs a character that
    shows; emoji sequences keep their joiners, selectors and keycaps."""
    for good in ("❤️", "1️⃣", "🇫🇷", "👩‍💻", "👍🏽", ":+1:", "ok"):
        assert check_emoji(good) == good
    for bad in ("\u200b", "\ufe0f", "\U000e0001", "\u200d\u200d", "\u3164", "\u2800", "\u115f"):
        with pytest.raises(ChatError) as refused:
            check_emoji(bad)
        assert refused.value.code == "bad_request", repr(bad)


def test_an_invisible_reaction_is_refused_over_the_wire(realm: Any, clock: Clock) -> None:
    alice, bob = users(realm, clock, "alice", "bob")
    m = alice.ok("send", to="bob", body="x")["msg_id"]
    assert bob.err("react", msg_id=m, emoji="\u200b\ufe0f") == "bad_request"
    assert bob.seen[-1]["kind"] == "text"  # nothing stored
