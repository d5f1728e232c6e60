"""What a group's home realm may assert to a member realm, over StringTransport: realm
b.example (MemoryStore) receives transactions from a.example, home of the
groups, on an inbound link; see PROTOCOL.md, "What a home realm may assert"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fired
from tests.test_federation import certs, connect, frame, frames, hello, node  # noqa: F401
from tests.test_groups import User

GROUP = "#g@a.example"
SNAPSHOT = {
    "topic": "",
    "visibility": "public",
    "history": "joined",
    "members": {"owner@a.example": "owner"},
}


def event(mid: str, sender: str, group: str = GROUP, **meta: Any) -> dict[str, Any]:
    return {
        "id": mid,
        "kind": "event",
        "from": sender,
        "to": group,
        "ts": 1.0,
        "body": "",
        "meta": meta,
    }


def text(mid: str, sender: str, group: str = GROUP, body: str = "hi") -> dict[str, Any]:
    return {"id": mid, "kind": "text", "from": sender, "to": group, "ts": 1.0, "body": body}


class Home:
    """An inbound link from a.example (genuine certificate) to b.example."""

    def __init__(self, fed: Any, cert: str) -> None:
        self.proto, self.transport = connect(fed, cert)
        self.proto.dataReceived(hello("a.example"))
        assert frames(self.transport)[0]["type"] == "welcome"
        self.n = 0

    def txn(self, *items: dict[str, Any]) -> dict[str, str]:
        """Send one transaction; the ack's rejections, id -> code."""
        self.n += 1
        self.proto.dataReceived(frame({"type": "txn", "id": f"t{self.n}", "items": list(items)}))
        (ack,) = frames(self.transport)
        assert ack["type"] == "ack" and ack["id"] == f"t{self.n}", ack
        assert not self.transport.disconnecting
        return {r["id"]: r["code"] for r in ack.get("rejected", [])}


@pytest.fixture
def home(node: Any, certs: Any) -> Any:  # noqa: F811
    realm, fed, clock = node
    return realm, clock, Home(fed, certs["a.example"]["cert"])


def requests_of(realm: Any, user: str, group: str = GROUP) -> list[dict[str, Any]]:
    return fired(realm.store.pending_requests(user, group))  # type: ignore[no-any-return]


def joined_dave(realm: Any, home: Home, mid: str = "j1") -> None:
    """dave asks to join through b.example, and a.example answers with the event."""
    fired(realm.group_event_as("dave@b.example", "joined", GROUP))
    assert [r["event"] for r in requests_of(realm, "dave@b.example")] == ["joined"]
    ev = event(mid, "dave@b.example", event="joined", user="dave@b.example", snapshot=SNAPSHOT)
    assert home.txn(ev) == {}
    assert set(realm.groups.get(GROUP).members) == {"owner@a.example", "dave@b.example"}


def test_a_join_is_accepted_only_as_the_answer_to_the_users_request(home: Any) -> None:
    realm, clock, link = home
    dave = User(realm, clock, "dave")
    # not asked for: a.example may not make dave join (he would get its messages)
    forged = event("j0", "dave@b.example", event="joined", user="dave@b.example", snapshot=SNAPSHOT)
    assert link.txn(forged) == {"j0": "forged_sender"}
    assert GROUP not in realm.groups.groups
    joined_dave(realm, link)
    assert requests_of(realm, "dave@b.example") == []  # answered: used up
    # the same event again (a retried transaction): acknowledged, stored once
    assert (
        link.txn(
            event("j1", "dave@b.example", event="joined", user="dave@b.example", snapshot=SNAPSHOT)
        )
        == {}
    )
    assert [i.id for i in realm.store.items if i.recipient == GROUP] == ["j1"]
    # the answer cannot be used twice, nor a leave invented
    assert link.txn(
        event("j2", "dave@b.example", event="joined", user="dave@b.example"),
        event("l1", "dave@b.example", event="left", user="dave@b.example"),
        event("t1", "dave@b.example", event="topic", topic="dave says so"),
    ) == {"j2": "forged_sender", "l1": "forged_sender", "t1": "forged_sender"}
    assert "dave@b.example" in realm.groups.get(GROUP).members
    # in dave's own feed: his join, nothing else
    clock.advance(0)
    got = [f for f in dave.drain() if f["type"] == "msg"]
    assert [(f["msg_id"], f["meta"]["event"]) for f in got] == [("j1", "joined")]


def test_an_answer_must_be_the_change_asked_for(home: Any) -> None:
    realm, clock, link = home
    User(realm, clock, "dave")
    User(realm, clock, "carol")
    joined_dave(realm, link)
    link.txn(event("r0", "owner@a.example", event="role", user="dave@b.example", role="admin"))
    fired(realm.group_event_as("dave@b.example", "invited", GROUP, user="dan@c.example"))
    fired(realm.group_event_as("dave@b.example", "topic", GROUP, topic="ours"))
    # another target, another topic: not what dave asked for
    assert link.txn(
        event("i1", "dave@b.example", event="invited", user="eve@c.example"),
        event("t1", "dave@b.example", event="topic", topic="theirs"),
    ) == {"i1": "forged_sender", "t1": "forged_sender"}
    assert (
        link.txn(
            event("i2", "dave@b.example", event="invited", user="dan@c.example"),
            event("t2", "dave@b.example", event="topic", topic="ours"),
        )
        == {}
    )
    assert realm.groups.get(GROUP).topic == "ours"
    assert requests_of(realm, "dave@b.example") == []


def test_the_home_realm_may_remove_and_notify_local_users(home: Any) -> None:
    realm, clock, link = home
    dave = User(realm, clock, "dave")
    User(realm, clock, "carol")
    joined_dave(realm, link)
    dave.drain()
    # roles and removal of a member: the home realm's call
    assert (
        link.txn(
            event("r1", "owner@a.example", event="role", user="dave@b.example", role="admin"),
            event("k1", "owner@a.example", event="kicked", user="dave@b.example"),
        )
        == {}
    )
    assert GROUP not in realm.groups.groups  # dave was the last member here: mirror gone
    clock.advance(0)
    assert [f["msg_id"] for f in dave.drain() if f["type"] == "msg"] == ["r1", "k1"]
    # with no member here: an invitation or a ban of a local user is a notice to them
    secret = "#secret@a.example"
    assert link.txn(
        event("i1", "owner@a.example", secret, event="invited", user="carol@b.example"),
        event("b1", "owner@a.example", secret, event="banned", user="dave@b.example"),
        event("k2", "owner@a.example", secret, event="kicked", user="dave@b.example"),
        event("t1", "owner@a.example", secret, event="topic", topic="x"),
        event("o1", "owner@a.example", secret, event="joined", user="owner@a.example"),
        text("m1", "owner@a.example", secret),
    ) == {"k2": "not_member", "t1": "no_such_group", "o1": "no_such_group", "m1": "not_member"}
    clock.advance(0)
    assert [f["msg_id"] for f in dave.drain() if f["type"] == "msg"] == ["b1"]
    feed = fired(
        realm.store.read_feed("carol@b.example", 0, 10, realm.groups.feed_ranges("carol@b.example"))
    )
    assert [e.id for e in feed] == ["i1"]


def test_a_snapshot_may_not_list_local_users_nor_come_to_a_member_realm(home: Any) -> None:
    realm, clock, link = home
    User(realm, clock, "dave")
    User(realm, clock, "carol")
    fired(realm.group_event_as("dave@b.example", "joined", GROUP))
    sneaky = {**SNAPSHOT, "members": {"owner@a.example": "owner", "carol@b.example": "member"}}
    ev = event("j1", "dave@b.example", event="joined", user="dave@b.example", snapshot=sneaky)
    assert link.txn(ev) == {"j1": "forged_sender"}
    assert GROUP not in realm.groups.groups
    # the request still stands: the genuine answer is accepted
    ev = event("j2", "dave@b.example", event="joined", user="dave@b.example", snapshot=SNAPSHOT)
    assert link.txn(ev) == {}
    fired(realm.group_event_as("carol@b.example", "joined", GROUP))
    again = event(
        "j3", "carol@b.example", event="joined", user="carol@b.example", snapshot=SNAPSHOT
    )
    assert link.txn(again) == {"j3": "bad_request"}  # it would rewrite the mirror
    assert (
        link.txn({**again, "id": "j4", "meta": {"event": "joined", "user": "carol@b.example"}})
        == {}
    )
    assert set(realm.groups.get(GROUP).members) == {
        "owner@a.example",
        "dave@b.example",
        "carol@b.example",
    }


def test_messages_need_a_member_sender_and_a_local_one_must_be_ours(home: Any) -> None:
    realm, clock, link = home
    User(realm, clock, "dave")
    joined_dave(realm, link)
    sent = fired(realm.post("dave@b.example", GROUP, "mine"))
    assert link.txn(
        text("x1", "stranger@a.example"),  # not a member
        text("x2", "dave@b.example", body="not mine"),  # dave never sent it
        {**text(sent.id, "dave@b.example"), "body": "mine"},  # his own, sent back: known
        text("x3", "owner@a.example", body="from the owner"),
    ) == {"x1": "not_member", "x2": "forged_sender"}
    history = fired(realm.store.history(GROUP, None, None, 10))
    assert [(e.sender, e.body) for e in history if e.kind == "text"] == [
        ("dave@b.example", "mine"),
        ("owner@a.example", "from the owner"),
    ]
    # a member who joins in the transaction may speak in it (events apply in order)
    assert (
        link.txn(
            event("j5", "zed@a.example", event="joined", user="zed@a.example"),
            text("x4", "zed@a.example", body="new here"),
        )
        == {}
    )


def test_created_events_and_misnamed_joins_are_refused(home: Any) -> None:
    realm, clock, link = home
    User(realm, clock, "dave")
    joined_dave(realm, link)
    assert link.txn(
        event("c1", "owner@a.example", "#new@a.example", event="created", visibility="public"),
        event("j1", "owner@a.example", event="joined", user="dave@b.example"),
        event("l1", "owner@a.example", event="left", user="dave@b.example"),
        event("k1", "owner@a.example", event="kicked"),
    ) == {"c1": "bad_request", "j1": "bad_request", "l1": "bad_request", "k1": "bad_request"}
    assert "dave@b.example" in realm.groups.get(GROUP).members


def test_a_refused_request_is_forgotten(node: Any, tmp_path: Path) -> None:  # noqa: F811
    realm, _fed, clock = node
    User(realm, clock, "dave")
    fired(realm.group_event_as("dave@b.example", "joined", GROUP))
    ((_, request),) = fired(realm.store.outbox_read("a.example", 0, 10))
    assert request["kind"] == "request"
    fired(realm.bounce("a.example", [(request, "not_invited", "invite-only")]))
    assert requests_of(realm, "dave@b.example") == []
    # ...and an answer coming after all is not one
    realm.store.outbox.clear()
    rejected = fired(
        realm.receive_remote(
            "a.example",
            [
                event(
                    "j1", "dave@b.example", event="joined", user="dave@b.example", snapshot=SNAPSHOT
                )
            ],
        )
    )
    assert [r["code"] for r in rejected] == ["forged_sender"]


def test_a_request_never_answered_is_forgotten_after_a_while(node: Any) -> None:  # noqa: F811
    from chatproto.federation import REQUEST_TTL

    realm, fed, clock = node
    User(realm, clock, "dave")
    fired(realm.group_event_as("dave@b.example", "joined", GROUP))
    ((seq, _),) = fired(realm.store.outbox_read("a.example", 0, 10))
    fired(realm.store.outbox_ack("a.example", seq))  # a.example has it, and says nothing
    clock.advance(REQUEST_TTL - 1)
    fired(fed.give_up())
    assert len(requests_of(realm, "dave@b.example")) == 1
    clock.advance(2)
    fired(fed.give_up())
    assert requests_of(realm, "dave@b.example") == []


def ref(mid: str, kind: str, sender: str, target: str, body: str = "", **meta: Any) -> Any:
    """A reaction, edit or delete of ``target`` in the group, from ``sender``."""
    return {**text(mid, sender, body=body), "kind": kind, "meta": {"ref": target, **meta}}


def test_reactions_edits_and_deletes_from_the_home_realm_follow_the_local_rules(
    home: Any,
) -> None:
    """The home realm relays the group's reactions, edits and deletes: from members
    only, never in the name of a local user who did not act, a third realm's only
    with its signature, to an item that is here, an edit of one's own words only, a
    delete of one's own or by an admin or owner of the group."""
    realm, clock, link = home
    User(realm, clock, "dave")
    joined_dave(realm, link)
    assert (
        link.txn(
            event("j2", "zed@a.example", event="joined", user="zed@a.example"),
            event("j3", "carol@c.example", event="joined", user="carol@c.example"),
            text("o1", "owner@a.example", body="owner's words"),
        )
        == {}
    )
    mine = fired(realm.post("dave@b.example", GROUP, "dave's words"))
    assert link.txn(
        ref("r1", "reaction", "stranger@a.example", "o1", emoji="x"),  # not a member
        ref("r2", "edit", "owner@a.example", mine.id, body="the owner's now"),  # not theirs
        ref("r3", "reaction", "owner@a.example", "nothing-here", emoji="x"),
        ref("r4", "reaction", "dave@b.example", "o1", emoji="x"),  # dave did not react
        ref("r5", "reaction", "carol@c.example", "o1", emoji="x"),  # c.example's: unsigned
        ref("r6", "delete", "zed@a.example", mine.id),  # a plain member
        ref("r7", "reaction", "zed@a.example", "o1", emoji="x"),
        ref("r8", "delete", "owner@a.example", mine.id),  # the group's owner may
    ) == {
        "r1": "not_member",
        "r2": "forbidden",
        "r3": "not_found",
        "r4": "forged_sender",
        "r5": "bad_signature",
        "r6": "forbidden",
    }
    stored = {f"r{n}": fired(realm.store.stored_item(f"r{n}")) for n in range(1, 9)}
    assert [mid for mid, env in stored.items() if env is not None] == ["r7", "r8"]
    wiped = fired(realm.store.stored_item(mine.id))
    assert (wiped.body, wiped.meta) == ("", {"deleted": True})


def test_settings_and_voice_from_the_home_realm_reach_the_mirror(home: Any) -> None:
    """The home realm's ``settings`` events (booleans, a limit, a key) and ``voice``
    events keep the mirror in step, like its other events: they were refused
    (``bad_request``: only string values were taken), so a member realm never knew
    a group was moderated or keyed, nor who had a voice.  Values that ``set_group``
    or ``set_voice`` would refuse are refused; a voice for one of our users who is no
    member is ``not_member``, as a role is."""
    realm, clock, link = home
    dave = User(realm, clock, "dave")
    joined_dave(realm, link)
    owner = "owner@a.example"
    assert (
        link.txn(
            event("s1", owner, event="settings", moderated=True, limit=5, key="k3y", external=True),
            event("v1", owner, event="voice", user="dave@b.example", voice=True),
        )
        == {}
    )
    group = realm.groups.get(GROUP)
    assert (group.moderated, group.limit, group.key, group.external) == (True, 5, "k3y", True)
    assert group.members["dave@b.example"].voice
    info = dave.ok("group_info", group=GROUP)
    assert (info["moderated"], info["limit"], info["has_key"]) == (True, 5, True)
    assert link.txn(
        event("b1", owner, event="settings", moderated="yes"),
        event("b2", owner, event="settings", limit=-1),
        event("b3", owner, event="settings", key="two words"),
        event("b4", owner, event="voice", user="dave@b.example", voice="yes"),
        event("b5", owner, event="voice", user="dave@b.example"),
        event("b6", owner, event="topic", topic="x", moderated=False),
        event("b7", owner, event="voice", user="carol@b.example", voice=True),
    ) == {
        "b1": "bad_request",
        "b2": "bad_request",
        "b3": "bad_request",
        "b4": "bad_request",
        "b5": "bad_request",
        "b6": "bad_request",
        "b7": "not_member",
    }
    assert realm.groups.get(GROUP).moderated


def test_an_external_groups_messages_from_outside_are_relayed_to_member_realms(
    home: Any,
) -> None:
    """A group open to messages from outside (``external``, not moderated) takes a
    non-member's message at its home realm, which relays it: the member realm stores
    it too (it refused it, ``not_member``, so its users never saw what the home
    realm's did).  Not when the mirror says the group is moderated, nor a reaction
    from outside, nor with no mirror."""
    realm, clock, link = home
    User(realm, clock, "dave")
    joined_dave(realm, link)
    owner = "owner@a.example"
    assert link.txn(text("o1", "stranger@a.example", body="before")) == {"o1": "not_member"}
    assert link.txn(event("s1", owner, event="settings", external=True)) == {}
    assert link.txn(text("o2", "stranger@a.example", body="from outside")) == {}
    history = fired(realm.store.history(GROUP, None, None, 10))
    assert ("stranger@a.example", "from outside") in [(e.sender, e.body) for e in history]
    assert link.txn(ref("o3", "reaction", "stranger@a.example", "o2", emoji="x")) == {
        "o3": "not_member"
    }
    assert link.txn(event("s2", owner, event="settings", moderated=True)) == {}
    assert link.txn(text("o4", "stranger@a.example", body="moderated")) == {"o4": "not_member"}
    assert link.txn(text("o5", "stranger@a.example", "#other@a.example")) == {"o5": "not_member"}
