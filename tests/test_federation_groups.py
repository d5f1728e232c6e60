"""Groups spanning realms without sockets: three realms on MemoryStores and one Clock,
clients over StringTransport, and a stand-in for the federation links that carries
outbox items (through the wire encoding) and presence frames between the realms.

What is checked: a member realm's mirror of a group is complete (members who joined
before anyone of that realm, roles, topic, visibility, history) and durable (rebuilt
from the stored events on restart, SQLite), ``members``/``group_info``/``who`` of a
remote group answer from it for its members only, a mirror is dropped with its last
local member, and presence crosses realms between users who share only a group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from chatproto import config, tls, wire
from chatproto.federation import (
    PRESENCE_BURST,
    PRESENCE_RATE,
    PRESENCE_SILENCE,
    FederationService,
    envelope_to_wire,
)
from chatproto.ratelimit import TokenBucket
from chatproto.realm import RealmService
from chatproto.signing import parse_keys
from chatproto.testing import make_test_realm
from tests.conftest import fast_config, make_realm
from tests.conftest import fired as result
from tests.test_groups import User


def over_the_wire(rows: list[tuple[int, Any]]) -> list[dict[str, Any]]:
    """Outbox rows as the peer decodes them from a ``txn`` frame."""
    txn = {"type": "txn", "id": "t", "items": [envelope_to_wire(e) for _, e in rows]}
    items: list[dict[str, Any]] = wire.decode(wire.encode(txn))["items"]
    return items


class Links:
    """Stands in for the FederationService of every realm of a test: ``wake`` and
    ``presence`` as the realm calls them; :meth:`pump` moves every queued item to its
    realm (JSON round trip, as on the wire) until the outboxes are empty.  A realm
    in ``down`` neither sends nor receives."""

    def __init__(self) -> None:
        self.realms: dict[str, RealmService] = {}
        self.down: set[str] = set()
        self.rejected: list[dict[str, Any]] = []
        self.presence_frames: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, realm: RealmService) -> RealmService:
        self.realms[realm.realm] = realm
        realm.federation = _Fed(self, realm.realm)
        return realm

    def introduce(self) -> None:
        """Every realm learns every other's signing keys (what hello and welcome do)."""
        for realm in self.realms.values():
            for other in self.realms.values():
                if other is not realm and other.signing is not None:
                    keys = parse_keys(other.signing.announce())
                    result(realm.peer_keys.learn(other.realm, keys))

    def up(self, a: str, b: str) -> bool:
        return a not in self.down and b not in self.down and b in self.realms

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, realm in self.realms.items():
                for dest in sorted(result(realm.store.outbox_counts())):
                    if not self.up(name, dest):
                        continue
                    rows = result(realm.store.outbox_read(dest, 0, 1000))
                    items = over_the_wire(rows)
                    self.rejected += result(self.realms[dest].receive_remote(name, items))
                    result(realm.store.outbox_ack(dest, rows[-1][0]))
                    moved = True


class _Fed:
    def __init__(self, links: Links, name: str) -> None:
        self.links = links
        self.name = name

    def admit(self, realm: str, user: str | None = None) -> bool:
        return True  # no bound on peers here (see FederationService.admit)

    def wake(self, realm: str, n: int = 1) -> None:
        pass  # the test pumps

    def presence(self, realms: set[str], frame: dict[str, Any]) -> None:
        for dest in sorted(realms):
            if self.links.up(self.name, dest):
                self.links.presence_frames.append((self.name, dest, frame))
                self.links.realms[dest].remote_presence(
                    self.name, frame["user"], frame["status"], frame.get("text")
                )


def fed_realm(clock: Clock, name: str, base: Path) -> RealmService:
    """A started realm ``name`` with federation on (its signing key in ``base``)."""
    cfg = config.Config(realm=name, data_dir=str(base / name))
    cfg.federation.enabled = True  # links are the test's stand-in: no certificates
    return make_test_realm(clock, cfg)


@pytest.fixture
def net(tmp_path: Path) -> Any:
    clock = Clock()
    links = Links()
    names = ("h.example", "a.example", "b.example")
    h, a, b = (links.add(fed_realm(clock, n, tmp_path)) for n in names)
    links.introduce()
    return links, clock, h, a, b


def presences(user: User) -> list[tuple[str, str]]:
    return [(f["user"], f["status"]) for f in user.drain() if f["type"] == "presence"]


GROUP = "#dev@h.example"


def dev_group(net: Any, *joiners: tuple[RealmService, str]) -> tuple[User, ...]:
    """``owner`` of h.example creates #dev; then each of ``joiners`` (``(realm,
    name)``) logs in and joins it, the links pumped after each join.  Returns the
    owner and the joiners' Users."""
    links, clock, h, _, _ = net
    owner = User(h, clock, "owner")
    owner.ok("create_group", group="#dev")
    users = [owner]
    for realm, name in joiners:
        user = User(realm, clock, name)
        user.ok("join", group=GROUP)
        links.pump()
        users.append(user)
    return tuple(users)


def test_member_realm_sees_the_whole_group(net: Any) -> None:
    links, clock, h, a, b = net
    owner = User(h, clock, "owner")
    carol = User(h, clock, "carol")
    owner.ok("create_group", group="#dev", topic="the dev room", history="all")
    carol.ok("join", group="#dev")
    alice = User(a, clock, "alice")
    assert alice.ok("join", group=GROUP)["pos"] == 0  # pending: h.example decides
    links.pump()
    owner.ok("set_role", group="#dev", user="alice@a.example", role="admin")
    links.pump()
    # bob is the first of b.example: members who joined before him are in its mirror
    bob = User(b, clock, "bob")
    bob.ok("join", group=GROUP)
    links.pump()
    assert links.rejected == []
    roles = {
        "alice@a.example": "admin",
        "bob@b.example": "member",
        "carol@h.example": "member",
        "owner@h.example": "owner",
    }
    for user in (bob, alice, owner):
        members = user.ok("members", group=GROUP)["members"]
        assert {m["user"]: m["role"] for m in members} == roles
    info = bob.ok("group_info", group=GROUP)
    assert {k: info[k] for k in ("topic", "visibility", "history", "members", "role")} == {
        "topic": "the dev room",
        "visibility": "public",
        "history": "all",
        "members": 4,
        "role": "member",
    }
    # the snapshot is for the realm, not for clients
    joined = [m for m in bob.msgs() if m.get("meta", {}).get("event") == "joined"]
    assert joined and all("snapshot" not in m["meta"] for m in joined)
    # later changes keep the mirror in step
    owner.ok("set_topic", group="#dev", topic="new topic")
    carol.ok("leave", group="#dev")
    links.pump()
    assert bob.ok("group_info", group=GROUP)["topic"] == "new topic"
    assert "carol@h.example" not in {m["user"] for m in bob.ok("members", group=GROUP)["members"]}
    # who: online members wherever they are (remote ones as their realm told us)
    owner.ok("set_status", status="away", text="lunch")
    links.pump()
    assert bob.ok("who", group=GROUP)["users"] == [
        {"user": "alice@a.example"},
        {"user": "bob@b.example", "sessions": 1},
        {"user": "owner@h.example", "status": "away", "text": "lunch"},
    ]
    # a mirror is not a group of this realm
    assert bob.ok("list_groups")["groups"] == []


def test_non_members_of_a_remote_group_get_remote_realm(net: Any) -> None:
    _, clock, _, _, b = net
    owner, bob = dev_group(net, (b, "bob"))
    owner.ok("create_group", group="#quiet")
    bob2 = User(b, clock, "bob2")
    for req in ("members", "group_info", "who"):
        assert bob2.code(req, group=GROUP) == "remote_realm"  # b knows; bob2 is not in it
        assert bob.code(req, group="#quiet@h.example") == "remote_realm"  # b knows nothing
    assert bob.code("create_group", group="#new@h.example") == "remote_realm"


def test_mirror_is_dropped_with_its_last_local_member(net: Any) -> None:
    links, _, _, a, b = net
    owner, _alice, bob = dev_group(net, (a, "alice"), (b, "bob"))
    assert set(b.groups.get(GROUP).members) == {
        "owner@h.example",
        "alice@a.example",
        "bob@b.example",
    }
    bob.ok("leave", group=GROUP)
    links.pump()
    assert GROUP not in b.groups.groups
    assert b.groups.of_user == {}  # remote members went with the mirror
    assert bob.code("members", group=GROUP) == "remote_realm"
    # joining again brings a fresh, complete mirror (the items kept flowing to a, not b)
    owner.ok("set_topic", group="#dev", topic="while bob was away")
    links.pump()
    bob.ok("join", group=GROUP)
    links.pump()
    assert b.groups.get(GROUP).topic == "while bob was away"
    assert len(bob.ok("members", group=GROUP)["members"]) == 3
    # kicked: dropped too
    owner.ok("kick", group="#dev", user="bob@b.example")
    links.pump()
    assert GROUP not in b.groups.groups and b.groups.of_user == {}


class HeldCommits:
    """``realm``'s store commits (``append``, ``append_remote``) held, in call order,
    until :meth:`release`."""

    def __init__(self, realm: RealmService) -> None:
        self.store = realm.store
        self.held: list[tuple[Any, Any, Any, Any]] = []
        self.methods = {"append": self.store.append, "append_remote": self.store.append_remote}
        for name, method in self.methods.items():
            setattr(self.store, name, self._holding(method))

    def _holding(self, method: Any) -> Any:
        def held(items: Any, outbox: Any = ()) -> Any:
            d: Any = defer.Deferred()
            self.held.append((method, items, outbox, d))
            return d

        return held

    def release(self) -> None:
        """Commit what was held, in call order, and stop holding."""
        for name, method in self.methods.items():
            setattr(self.store, name, method)
        for _ in range(100):  # bounded: a commit's callbacks may commit again
            if not self.held:
                return
            method, items, outbox, d = self.held.pop(0)
            method(items, outbox).chainDeferred(d)
        raise AssertionError("commits keep coming")


def requests_for_home(*realms: RealmService) -> dict[str, list[dict[str, Any]]]:
    """The requests each of ``realms`` queued for h.example, taken from its outbox."""
    requests = {}
    for realm in realms:
        rows = result(realm.store.outbox_read("h.example", 0, 1000))
        requests[realm.realm] = over_the_wire(rows)
        result(realm.store.outbox_ack("h.example", rows[-1][0]))
    return requests


def test_joins_from_two_realms_decided_together_reach_both(net: Any) -> None:
    """Two join requests from different realms reach the home realm together, each
    check made while the other's commit is under way: joins to one group are decided
    one at a time, so the realm of the first joiner is told of the second's join and
    the second's realm gets the first in its snapshot (none is left out)."""
    links, clock, h, a, b = net
    dev_group(net)
    alice, bob = User(a, clock, "alice"), User(b, clock, "bob")
    for user in (alice, bob):
        user.ok("join", group=GROUP)
    requests = requests_for_home(a, b)
    commits = HeldCommits(h)  # until both requests are being handled
    done = [
        h.receive_remote("b.example", requests["b.example"]),
        h.receive_remote("a.example", requests["a.example"]),
    ]
    commits.release()
    assert [result(d) for d in done] == [[], []]
    links.pump()
    assert links.rejected == []
    everyone = {"owner@h.example", "alice@a.example", "bob@b.example"}
    for realm in (h, a, b):
        assert set(realm.groups.get(GROUP).members) == everyone
    # bob's join was decided first: b.example hears alice's as an event
    heard = [
        m["meta"].get("user") for m in bob.msgs() if m.get("meta", {}).get("event") == "joined"
    ]
    assert heard == ["bob@b.example", "alice@a.example"]
    assert len(alice.ok("members", group=GROUP)["members"]) == 3


def test_messages_sent_while_a_remote_join_commits_reach_the_joiner(net: Any) -> None:
    """Messages to the group checked while a join from a new realm is being committed
    -- one from the home realm's user, one relayed for a member on a third realm --
    are committed after it (the home realm's order), so the joiner's realm gets them
    too."""
    links, clock, h, a, b = net
    _, bob = dev_group(net, (b, "bob"))
    alice = User(a, clock, "alice")
    alice.ok("join", group=GROUP)
    bob.ok("send", to=GROUP, body="from bob")
    requests = requests_for_home(a, b)
    commits = HeldCommits(h)
    done = [h.receive_remote("a.example", requests["a.example"])]
    sent = h.post("owner@h.example", GROUP, "from the owner")
    done.append(h.receive_remote("b.example", requests["b.example"]))
    commits.release()
    assert [result(d) for d in done] == [[], []]
    assert result(sent).pos > h.groups.get(GROUP).members["alice@a.example"].since
    links.pump()
    assert links.rejected == []
    bodies = [m.get("body") for m in alice.msgs() if m["kind"] == "text"]
    assert bodies == ["from the owner", "from bob"]


def test_a_message_sent_while_a_realms_last_member_leaves_is_not_sent_there(
    net: Any,
) -> None:
    """The other way round: a message checked while the leave of a realm's last
    member is being committed is committed after it, so that realm (which drops its
    mirror with the leave) is not sent it -- it would refuse it, and the sender would
    be told of a refusal."""
    links, _, h, _, b = net
    owner, bob = dev_group(net, (b, "bob"))
    bob.ok("leave", group=GROUP)
    requests = requests_for_home(b)
    commits = HeldCommits(h)
    done = h.receive_remote("b.example", requests["b.example"])
    sent = h.post("owner@h.example", GROUP, "after bob")
    commits.release()
    assert result(done) == []
    result(sent)
    queued = result(h.store.outbox_read("b.example", 0, 100))
    assert [(e.meta or {}).get("event") for _, e in queued] == ["left"]  # no message
    links.pump()
    assert links.rejected == []
    assert [m for m in owner.msgs() if m["kind"] == "bounce"] == []
    assert "after bob" not in [m.get("body") for m in bob.msgs()]


def test_a_message_sent_while_a_realms_last_member_is_deleted_is_not_sent_there(
    net: Any,
) -> None:
    """As above, for the end of a member's standing because their realm deleted the
    account (a ``left`` with the account-deleted reason, which the home realm commits
    whatever the rules of leave say): a message checked meanwhile is not sent to the
    realm that has no member left."""
    links, _, h, _, b = net
    owner, _bob = dev_group(net, (b, "bob"))
    assert result(b.delete_user("bob")) is True
    requests = requests_for_home(b)
    commits = HeldCommits(h)
    done = h.receive_remote("b.example", requests["b.example"])
    sent = h.post("owner@h.example", GROUP, "after bob")
    commits.release()
    result(done)
    result(sent)
    queued = result(h.store.outbox_read("b.example", 0, 100))
    assert [(e.meta or {}).get("event") for _, e in queued] == ["left"]  # no message
    links.pump()
    assert links.rejected == []
    assert [m for m in owner.msgs() if m["kind"] == "bounce"] == []


def test_presence_between_realms_sharing_only_a_group(net: Any) -> None:
    links, clock, _, a, b = net
    _owner, alice = dev_group(net, (a, "alice"))
    presences(alice)
    bob = User(b, clock, "bob")  # online before he joins
    bob.ok("join", group=GROUP)
    links.pump()
    # on the join, each side learns who is online on the others
    assert ("alice@a.example", "online") in presences(bob)
    assert ("bob@b.example", "online") in presences(alice)
    assert bob.ok("members", group=GROUP)["members"][0] == {
        "user": "alice@a.example",
        "role": "member",
        "online": True,
    }
    # changes reach the other member realm directly (no DM between them)
    alice.ok("set_status", status="busy", text="deploying")
    assert [f for f in bob.drain() if f["type"] == "presence"] == [
        {"type": "presence", "user": "alice@a.example", "status": "busy", "text": "deploying"}
    ]
    alice.proto.connectionLost(None)
    assert presences(bob) == [("alice@a.example", "offline")]
    assert {"user": "alice@a.example", "role": "member", "online": False} in bob.ok(
        "members", group=GROUP
    )["members"]
    # a frame that changes nothing (a link coming back repeats who is online) is not
    # passed on
    b.remote_presence("a.example", "alice@a.example", "offline", "")
    b.remote_presence("h.example", "owner@h.example", "online", "")
    b.remote_presence("h.example", "owner@h.example", "away", "")
    b.remote_presence("h.example", "owner@h.example", "away", "")
    assert presences(bob) == [("owner@h.example", "away")]


def test_remote_dm_partners_through_the_reverse_index(net: Any) -> None:
    links, clock, _, a, b = net
    bob = User(b, clock, "bob")
    bob2 = User(b, clock, "bob2")
    alice = User(a, clock, "alice")
    alice.ok("send", to="bob@b.example", body="hi")
    links.pump()
    assert b.presence.partner_of == {"alice@a.example": {"bob@b.example"}}
    presences(bob)
    b.remote_presence("a.example", "alice@a.example", "away", "")
    assert presences(bob) == [("alice@a.example", "away")]
    assert presences(bob2) == []  # no conversation, no group
    bob.proto.connectionLost(None)
    assert b.presence.partner_of == {}
    # back online: the partners come from the store
    bob = User(b, clock, "bob")
    assert b.presence.partner_of == {"alice@a.example": {"bob@b.example"}}


class Proto:
    """Stands in for an OutboundProtocol: records what the link sends."""

    def __init__(self, check: Any = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.check = check

    def send(self, obj: dict[str, Any]) -> None:
        if self.check is not None:
            self.check(obj)
        self.sent.append(obj)


def real_link(realm: RealmService, clock: Clock, tmp_path: Path) -> Any:
    """A PeerLink to b.example of a real FederationService (not started: the test
    plays the connection)."""
    certs = tls.write_dev_certs(str(tmp_path), realm.realm)
    f = realm.config.federation
    f.certificate, f.private_key, f.ca = certs["cert"], certs["key"], certs["ca"]
    fed = FederationService(realm, clock, clock=clock, status_path="")
    return fed.link("b.example")


def test_presence_to_a_peer_is_paced_below_its_flood_limit(tmp_path: Path) -> None:
    clock = Clock()
    link = real_link(fed_realm(clock, "h.example", tmp_path), clock, tmp_path)
    peer = TokenBucket(PRESENCE_RATE, PRESENCE_BURST, clock.seconds())  # as the peer counts

    def received(frame: dict[str, Any]) -> None:
        assert peer.take(clock.seconds()) == 0, "the peer would call this a flood"

    proto = Proto(received)
    link.proto = proto
    n = int(PRESENCE_BURST * 1.5)
    for i in range(n):
        link.presence({"type": "presence", "user": f"u{i}@h.example", "status": "online"})
    assert len(proto.sent) == PRESENCE_BURST / 2  # the rest waits
    last = {"type": "presence", "user": f"u{n - 1}@h.example", "status": "away"}
    link.presence(last)  # replaces the frame still waiting for that user
    for _ in range(1000):
        clock.advance(0.1)
    assert len(proto.sent) == n and proto.sent[-1] == last
    assert link._presence_call is None
    # a lost connection drops what waits: the next one sends the state of then
    for i in range(n):
        link.presence({"type": "presence", "user": f"u{i}@h.example", "status": "busy"})
    assert link._presence_call is not None
    link.lost(proto, None)
    assert link._presence_call is None and not link._presence_out


def test_a_link_coming_up_sends_who_is_online(net: Any, tmp_path: Path) -> None:
    _, clock, h, _, b = net
    owner, _bob = dev_group(net, (b, "bob"))
    User(h, clock, "loner")  # no contact on b.example
    dave = User(h, clock, "dave")
    dave.ok("send", to="bob@b.example", body="hello")
    User(h, clock, "quiet", quiet=True).ok("join", group="#dev")  # quiet: never online
    owner.ok("set_status", status="away")
    assert h.presence_for("b.example") == [
        {"type": "presence", "user": "dave@h.example", "status": "online"},
        {"type": "presence", "user": "owner@h.example", "status": "away"},
    ]
    assert h.presence_for("a.example") == []
    # PeerLink sends them when the link is welcomed
    link = real_link(h, clock, tmp_path)
    proto = Proto()

    class Proxy:
        welcomed = succeed(proto)

    link._prepare(Proxy())
    assert [f for f in proto.sent if f["type"] == "presence"] == h.presence_for("b.example")


@pytest_twisted.inlineCallbacks
def test_mirror_survives_a_restart(tmp_path: Path) -> Any:
    """b.example on SQLite: its mirror is the replay of the stored events, the
    snapshot included."""
    clock = Clock()
    h = fed_realm(clock, "h.example", tmp_path)
    h.federation = _Fed(Links(), "h.example")
    owner = User(h, clock, "owner")
    carol = User(h, clock, "carol")
    owner.ok("create_group", group="#dev", topic="kept", visibility="invite")
    carol.code("join", group="#dev")  # invite-only
    owner.ok("invite", group="#dev", user="carol")
    carol.ok("join", group="#dev")
    owner.ok("invite", group="#dev", user="bob@b.example")
    cfg = fast_config(tmp_path)
    cfg.realm = "b.example"
    cfg.federation.enabled = True
    b = make_realm(cfg)
    yield b.startService()
    yield b.create_user("bob", "password1")
    b.federation = _Fed(Links(), "b.example")  # queues moved by hand below

    @pytest_twisted.inlineCallbacks
    def deliver() -> Any:
        rows = result(h.store.outbox_read("b.example", 0, 1000))
        items = over_the_wire(rows)
        rejected = yield b.receive_remote("h.example", items)
        assert rejected == []
        result(h.store.outbox_ack("b.example", rows[-1][0]))

    yield deliver()  # the invite: no member on b, no mirror
    assert "#dev@h.example" not in b.groups.groups
    yield b.group_event_as("bob", "joined", GROUP)
    request = yield b.store.outbox_read("h.example", 0, 10)
    assert result(h.receive_remote("b.example", [request[0][1]])) == []
    owner.ok("set_role", group="#dev", user="carol", role="admin")
    yield deliver()
    before = b.groups.get(GROUP)
    yield b.stopService()
    again = make_realm(cfg)
    yield again.startService()
    try:
        g = again.groups.get(GROUP)
        assert g == before
        assert (g.topic, g.visibility) == ("kept", "invite")
        assert {u: m.role for u, m in g.members.items()} == {
            "owner@h.example": "owner",
            "carol@h.example": "admin",
            "bob@b.example": "member",
        }
    finally:
        yield again.stopService()


def test_snapshots_from_a_peer_are_checked(net: Any) -> None:
    _, clock, _, _, b = net
    User(b, clock, "bob")
    good = {"topic": "", "visibility": "public", "history": "joined", "members": {}}
    base = {"id": "e1", "kind": "event", "from": "owner@h.example", "to": GROUP, "ts": 1.0}
    cases = [
        ({"event": "topic", "topic": "x", "snapshot": good}, "only with the join"),
        ({"event": "joined", "user": "bob@b.example", "snapshot": good}, "non-empty"),
        ({"event": "joined", "user": "bob@b.example", "snapshot": []}, "a snapshot has"),
        (
            {
                "event": "joined",
                "user": "bob@b.example",
                "snapshot": {**good, "members": {"Bob": "owner"}},
            },
            "canonical",
        ),
        (
            {
                "event": "joined",
                "user": "bob@b.example",
                "snapshot": {**good, "members": {"o@h.example": "king"}},
            },
            "roles",
        ),
        (
            {
                "event": "joined",
                "user": "bob@b.example",
                "snapshot": {**good, "visibility": "secret", "members": {"o@h.example": "owner"}},
            },
            "visibility",
        ),
    ]
    for i, (meta, message) in enumerate(cases):
        sender = meta.get("user", base["from"])  # a joined event comes from the joiner
        item = {**base, "id": f"e{i}", "from": sender, "body": "", "meta": meta}
        rejected = result(b.receive_remote("h.example", [item]))
        assert [r["code"] for r in rejected] == ["bad_request"], meta
        assert message in rejected[0]["message"]
    assert GROUP not in b.groups.groups


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_copy_of_its_own_is_queued_in_the_items_transaction(backend: str, tmp_path: Path) -> None:
    """``IStore.append`` with a ``(realm, dict)`` pair: the dict is queued as it is, in
    order with the other entries of that realm, in the same transaction."""
    from chatproto.envelope import Envelope
    from chatproto.store.memory import MemoryStore
    from chatproto.store.sqlite import SQLiteDB

    e1 = Envelope("i1", "event", "o@h.example", GROUP, 1.0, "", {"event": "topic"})
    e2 = Envelope("i2", "event", "b@b.example", GROUP, 2.0, "", {"event": "joined"})
    copy = {**e2.to_item(), "meta": {"event": "joined", "snapshot": {"members": {}}}}
    outbox: list[tuple[str, Any]] = [
        ("b.example", e1),
        ("a.example", e2),
        ("b.example", copy),
    ]
    if backend == "memory":
        store = MemoryStore()
        result(store.append([e1, e2], outbox))
        read = lambda realm: result(store.outbox_read(realm, 0, 10))  # noqa: E731
    else:
        db = SQLiteDB(str(tmp_path / "r.sqlite3"))
        db.migrate()
        assert db.append_batch([[e1, e2]], {}, [outbox], [False]) == [[1, 2]]
        read = lambda realm: db.outbox_read(realm, 0, 10)  # noqa: E731
    to_b = read("b.example")
    assert [envelope_to_wire(e) for _, e in to_b] == [e1.to_item(), copy]
    assert [e.pos for _, e in read("a.example")] == [2]


def test_a_transaction_stays_within_max_frame(tmp_path: Path) -> None:
    """Large items (a group snapshot can be hundreds of KiB) are split over several
    transactions rather than making a frame the peer would refuse for ever."""
    clock = Clock()
    h = fed_realm(clock, "h.example", tmp_path)
    link = real_link(h, clock, tmp_path)
    link.fed.cfg.max_frame = 20_000
    h.create_user("owner", "password1")
    bodies = [f"{i}" * 6000 for i in range(10)]
    for body in bodies:
        h.post("owner", "bob@b.example", body)
    big = {"id": "x", "kind": "event", "from": "o@h.example", "to": GROUP, "ts": 1.0}
    big["body"], big["meta"] = "", {"event": "joined", "snapshot": {"m": "y" * 30_000}}
    result(h.store.append([], [("b.example", big)]))
    proto = Proto()
    link.proto = proto
    link._waiting = 11
    link.pump()
    while link.inflight:
        link.acked(proto, link.inflight[0][0], [])
    sizes = [len(wire.encode(t)) for t in proto.sent]
    assert all(size <= 20_000 for size in sizes) and len(proto.sent) > 3
    assert [i["body"] for t in proto.sent for i in t["items"]] == bodies
    # too long alone: not sent (the peer would close the link on it every time), but
    # bounced to its sender and dropped
    assert result(h.store.outbox_counts()) == {}
    bounce = result(h.store.read_feed("o@h.example", 0, 10))[-1]
    assert (bounce.kind, bounce.meta["id"], bounce.meta["code"]) == ("bounce", "x", "too_large")


def test_presence_of_a_realm_that_stays_away_is_forgotten(tmp_path: Path) -> None:
    """Presence comes only on a realm's link to us: when no link from it is back
    within PRESENCE_SILENCE, its users go offline here (a quick return: nothing)."""
    from tests.test_federation import connect, frame, hello

    d = str(tmp_path / "certs")
    a_cert = tls.write_dev_certs(d, "a.example")["cert"]
    clock = Clock()
    b = fed_realm(clock, "b.example", tmp_path)
    paths = tls.write_dev_certs(d, "b.example")
    f = b.config.federation
    f.certificate, f.private_key, f.ca = paths["cert"], paths["key"], paths["ca"]
    fed = FederationService(b, clock, clock=clock, status_path="")
    bob = User(b, clock, "bob")
    # a conversation, as from the store
    b.presence.add_partners("bob@b.example", ["alice@a.example"])
    online = frame({"type": "presence", "user": "alice@a.example", "status": "online"})
    proto, _ = connect(fed, a_cert)
    proto.dataReceived(hello() + online)
    assert presences(bob) == [("alice@a.example", "online")]
    proto.connectionLost(None)
    clock.advance(PRESENCE_SILENCE / 2)
    again, _ = connect(fed, a_cert)  # back in time: nothing happens
    again.dataReceived(hello() + online)
    clock.advance(PRESENCE_SILENCE)
    assert presences(bob) == []
    again.connectionLost(None)
    clock.advance(PRESENCE_SILENCE - 1)
    assert presences(bob) == []
    clock.advance(1)
    assert presences(bob) == [("alice@a.example", "offline")]
    assert b.presence.remote == {}


def test_a_request_sent_again_is_acknowledged_not_applied_again(net: Any) -> None:
    """A realm sends a transaction again when its ack was lost: the join request in
    it is acknowledged (its event is stored under the request's id), not refused as
    ``already_member`` -- which would bounce a join that was made, and leave the
    requester's realm taking the join event for a forgery.  A request replayed
    after the user left does not make them join again."""
    links, clock, h, a, _ = net
    dev_group(net)
    alice = User(a, clock, "alice")
    join = alice.ok("join", group=GROUP)
    rows = result(a.store.outbox_read("h.example", 0, 1000))
    sent = over_the_wire(rows)
    assert result(h.receive_remote("a.example", sent)) == []  # the ack is lost
    links.pump()  # a.example sends the transaction again
    assert links.rejected == []
    assert set(h.groups.get(GROUP).members) == {"owner@h.example", "alice@a.example"}
    assert set(a.groups.get(GROUP).members) == {"owner@h.example", "alice@a.example"}
    events = [(m["kind"], m["msg_id"], m.get("meta", {}).get("event")) for m in alice.msgs()]
    assert events == [("event", join["msg_id"], "joined")]  # the pending result's id
    alice.ok("leave", group=GROUP)
    links.pump()
    assert result(h.receive_remote("a.example", sent)) == []  # an old request replayed
    assert set(h.groups.get(GROUP).members) == {"owner@h.example"}
    assert result(h.store.outbox_counts()) == {}  # nothing new to tell anyone


def test_a_request_whose_id_another_item_holds_is_applied_under_an_id_of_its_own(
    net: Any,
) -> None:
    """A request's event is stored under the request's id, unless an item that is
    not that event holds the id already (here the group's created event): the
    request is not taken for one applied already, and its event gets an id of its
    own (under the taken id it could not be stored at all)."""
    _, clock, h, a, _ = net
    dev_group(net)
    taken = next(e for e in h.store.items if e.meta and e.meta.get("event") == "created")
    alice = User(a, clock, "alice")
    alice.ok("join", group=GROUP)
    [request] = over_the_wire(result(a.store.outbox_read("h.example", 0, 1000)))
    request["id"] = taken.id
    assert result(h.receive_remote("a.example", [request])) == []
    assert set(h.groups.get(GROUP).members) == {"owner@h.example", "alice@a.example"}
    [joined] = [e for e in h.store.items if e.meta and e.meta.get("event") == "joined"]
    assert joined.sender == "alice@a.example" and joined.id != taken.id
    assert result(h.store.stored_item(taken.id)) == taken


def test_a_user_of_another_realm_joins_a_group_with_a_key(net: Any) -> None:
    """``join`` with ``key`` from a member realm: the request carries the key to the
    home realm, which checks it as for its own users (it was dropped on the way, so
    only an invitation let a user of another realm into a keyed group).  The key is
    in no event."""
    links, clock, h, a, b = net
    (owner,) = dev_group(net)
    owner.ok("set_group", group="#dev", key="k3y")
    alice, bob = User(a, clock, "alice"), User(b, clock, "bob")
    alice.ok("join", group=GROUP, key="k3y")
    bob.ok("join", group=GROUP, key="wrong")
    links.pump()
    assert [(r["code"]) for r in links.rejected] == ["bad_key"]
    assert set(h.groups.get(GROUP).members) == {"owner@h.example", "alice@a.example"}
    assert "alice@a.example" in a.groups.get(GROUP).members
    for realm in (h, a):
        for item in realm.store.items:
            assert "k3y" not in str(item.meta) or item.meta.get("event") == "settings"


def test_an_admin_on_another_realm_sets_the_groups_settings_and_voices(net: Any) -> None:
    """``set_group`` and ``set_voice`` by an admin whose account is on a member realm:
    the request carries the settings and the voice to the home realm, which applies
    them (they were dropped on the way: ``settings changes nothing``, ``voice must be
    true or false``, a bounce for a change that was allowed).  The events answer the
    requests on the admin's realm and keep every mirror in step."""
    links, _, h, a, b = net
    owner, alice, _ = dev_group(net, (a, "alice"), (b, "bob"))
    owner.ok("set_role", group="#dev", user="alice@a.example", role="admin")
    links.pump()
    assert alice.ok("set_group", group=GROUP, moderated=True, limit=3, key="k3y")["pos"] == 0
    assert alice.ok("set_voice", group=GROUP, user="bob@b.example", voice=True)["pos"] == 0
    links.pump()
    assert links.rejected == []
    for realm in (h, a, b):
        group = realm.groups.get(GROUP)
        assert (group.moderated, group.limit, group.key) == (True, 3, "k3y"), realm.realm
        assert group.members["bob@b.example"].voice, realm.realm
    assert result(a.store.pending_requests("alice@a.example", GROUP)) == []
    events = [m["meta"]["event"] for m in alice.msgs() if m["kind"] == "event"]
    assert events[-2:] == ["settings", "voice"]
    # values the home realm refuses are refused there, as for its own admins
    alice.ok("set_group", group=GROUP, limit=-1)
    links.pump()
    assert [r["code"] for r in links.rejected] == ["bad_request"]
