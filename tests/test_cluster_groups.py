"""A group of a realm run by two workers, with members on another realm: the realms
an item of the group goes to are those of the realm's order (positions), not those
the committing worker knew when it checked the item.

Realm h.example is two workers in this process (w1, the federation sender, and w2)
on one PostgreSQL schema and a Redis bus (a key prefix of the test's own), each with
its own clock for timers; a.example is a realm on a MemoryStore.  Federation is the
stand-in of tests/test_federation_groups.py: the test moves outbox rows and requests
itself.  The same over real ``twistd`` workers: tests/test_cluster.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock

from chatproto.cluster.worker import Worker
from chatproto.config import Config
from chatproto.realm import RealmService
from chatproto.signing import parse_keys
from chatproto.store.backend import make_store
from chatproto.testing import InlineHasher
from tests.conftest import until
from tests.services import redis_drop_prefix, redis_or_skip, redis_prefix, use_postgresql
from tests.test_federation_groups import (
    Links,
    _Fed,
    fed_realm,
    over_the_wire,
    requests_for_home,
)
from tests.test_groups import User

GROUP = "#dev@h.example"


class Home:
    """Workers w1 (the federation sender) and w2 of realm h.example."""

    def __init__(self, tmp_path: Path, links: Links) -> None:
        self.redis = redis_or_skip()
        self.prefix = redis_prefix()
        self.realms: list[RealmService] = []
        base = Config(realm="h.example")
        use_postgresql(base)
        for name in ("w1", "w2"):
            cfg = Config(realm="h.example", data_dir=str(tmp_path / "h"))  # one signing key
            cfg.storage = base.storage
            cfg.federation.enabled = True
            cfg.worker = name
            cfg.cluster.redis = self.redis
            cfg.cluster.redis_prefix = self.prefix
            cfg.cluster.federation_sender = "w1"
            clock = Clock()  # timers (polls, heartbeats) stay still: Redis wakes
            store = make_store(cfg, _reactor)
            realm = RealmService(cfg, store, _reactor, clock=clock, hasher=InlineHasher())
            Worker(realm, _reactor)
            realm.federation = links.stand_in(realm)
            self.realms.append(realm)

    @pytest_twisted.inlineCallbacks
    def start(self) -> Any:
        for realm in self.realms:
            yield realm.startService()
        # Redis answers: a worker's bus is up once a heartbeat finds its subscribing
        # connection made.  The heartbeats' clock stands still (one beat, at start),
        # and on a loaded machine the subscriber may connect after that beat: beat
        # again until both are up.
        for _ in range(200):
            down = [r.cluster for r in self.realms if not r.cluster.bus.up]
            if not down:
                return
            yield defer.gatherResults([worker.heartbeat() for worker in down])
            yield task.deferLater(_reactor, 0.05, lambda: None)
        raise AssertionError("the workers' Redis bus did not come up")

    def delivered(self, i: int, pos: int) -> Any:
        """Fires once worker ``i`` delivered the stream up to ``pos``."""
        stream = self.realms[i].cluster.stream
        stream.wake()
        return until(lambda: stream.delivered >= pos)

    @pytest_twisted.inlineCallbacks
    def close(self) -> Any:
        for realm in self.realms:
            yield realm.stopService()
        redis_drop_prefix(self.redis, self.prefix)


class ClusterLinks(Links):
    """:class:`Links` where realm h.example is its two workers (one outbox, in the
    database; the test receives h.example's requests on w2)."""

    def stand_in(self, realm: RealmService) -> Any:
        return _Fed(self, realm.realm)


@pytest.fixture
def net(tmp_path: Path) -> Any:
    links = ClusterLinks()
    clock = Clock()
    a = links.add(fed_realm(clock, "a.example", tmp_path))
    home = Home(tmp_path, links)
    pytest_twisted.blockon(home.start())
    w1, w2 = home.realms
    links.realms["h.example"] = w2
    for worker in (w1, w2):  # what hello and welcome do
        for realm, other in ((worker, a), (a, worker)):
            keys = parse_keys(other.signing.announce())
            pytest_twisted.blockon(realm.peer_keys.learn(other.realm, keys))
    yield links, clock, home, a
    pytest_twisted.blockon(home.close())


@pytest_twisted.inlineCallbacks
def group_with_owner(home: Home) -> Any:
    """``owner`` (on w1) creates GROUP; both workers know it."""
    w1, _ = home.realms
    yield w1.create_user("owner", "password1")
    created = yield w1.group_event_as("owner", "created", GROUP)
    yield home.delivered(1, created.pos)
    return created


def queued_for(realm: RealmService, dest: str) -> Any:
    """The items h.example queued for ``dest`` (as the peer would decode them)."""
    return (
        realm.store.safe_position()
        .addCallback(lambda _: realm.store.outbox_read(dest, 0, 100))
        .addCallback(over_the_wire)
    )


def hold_stream(worker: RealmService) -> Any:
    """Stop ``worker``'s stream from delivering (its items are committed, not
    delivered: as if the worker died right after its commits); returns the undo."""
    stream = worker.cluster.stream
    wake = stream.wake
    stream.wake = lambda upto=None: None  # type: ignore[method-assign]

    def release() -> None:
        stream.wake = wake  # type: ignore[method-assign]

    return release


@pytest_twisted.inlineCallbacks
def test_an_item_committed_after_a_join_on_another_worker_reaches_the_joiners_realm(
    net: Any,
) -> Any:
    """alice of a.example joins through w2; w1 checks a message to the group before it
    has heard of the join, and commits it after the join: it is queued for a.example
    in its own transaction (the store knows the join came first), a row like any
    other -- there before w1's stream delivers it (a worker dying then loses
    nothing), and the row a.example's fetch of a file item is checked against."""
    _links, clock, home, a = net
    w1, w2 = home.realms
    yield group_with_owner(home)
    alice = User(a, clock, "alice")
    alice.ok("join", group=GROUP)
    requests = requests_for_home(a)
    assert (yield w2.receive_remote("a.example", requests["a.example"])) == []
    # w1 has not heard of the join yet (the wake-up is on its way over Redis)
    assert "alice@a.example" not in w1.groups.get(GROUP).members
    release = hold_stream(w1)
    sent = yield w1.post("owner@h.example", GROUP, "right after alice joined")
    joined = w2.groups.get(GROUP).members["alice@a.example"].since
    assert sent.pos > joined  # after the join, in the realm's order
    assert w1.cluster.stream.delivered < sent.pos  # not delivered on w1

    items = yield queued_for(w2, "a.example")
    assert [(i["kind"], i.get("body")) for i in items] == [
        ("event", ""),
        ("text", "right after alice joined"),
    ]
    assert (yield w2.store.outbox_holds("a.example", sent.pos))
    release()
    yield home.delivered(0, sent.pos)
    assert (yield a.receive_remote("h.example", items)) == []
    bodies = [m.get("body") for m in alice.msgs() if m["kind"] == "text"]
    assert bodies == ["right after alice joined"]
    items = yield queued_for(w1, "a.example")
    assert len(items) == 2  # nothing queued twice


@pytest_twisted.inlineCallbacks
def test_an_item_committed_after_a_realms_last_member_left_on_another_worker_is_not_queued_there(
    net: Any,
) -> Any:
    """alice, a.example's only member, leaves through w2; w1 checks a message before
    it has heard of the leave and commits it after: a.example had no member at its
    position, so it is not queued for a.example (which never receives the group's
    text).  Once alice is back, the group's items go there again."""
    _links, clock, home, a = net
    w1, w2 = home.realms
    yield group_with_owner(home)
    alice = User(a, clock, "alice")
    alice.ok("join", group=GROUP)
    assert (yield w2.receive_remote("a.example", requests_for_home(a)["a.example"])) == []
    yield home.delivered(0, w2.groups.get(GROUP).members["alice@a.example"].since)
    alice.ok("leave", group=GROUP)
    assert (yield w2.receive_remote("a.example", requests_for_home(a)["a.example"])) == []
    assert "alice@a.example" in w1.groups.get(GROUP).members  # w1 has not heard yet
    sent = yield w1.post("owner@h.example", GROUP, "right after alice left")
    yield home.delivered(0, sent.pos)
    assert "alice@a.example" not in w1.groups.get(GROUP).members
    yield home.delivered(1, sent.pos)

    for worker in (w1, w2):
        items = yield queued_for(worker, "a.example")
        assert [i.get("meta", {}).get("event") for i in items] == ["joined", "left"]
    assert not (yield w1.store.outbox_holds("a.example", sent.pos))
    assert (yield a.receive_remote("h.example", items)) == []
    assert "right after alice left" not in [m.get("body") for m in alice.msgs()]

    # back in the group: its items go to a.example again
    alice.ok("join", group=GROUP)
    assert (yield w2.receive_remote("a.example", requests_for_home(a)["a.example"])) == []
    yield home.delivered(0, w2.groups.get(GROUP).members["alice@a.example"].since)
    later = yield w1.post("owner@h.example", GROUP, "alice is back")
    assert (yield w1.store.outbox_holds("a.example", later.pos))


@pytest_twisted.inlineCallbacks
def test_an_item_relayed_after_a_realms_last_member_left_on_another_worker_is_not_queued_there(
    net: Any, tmp_path: Path
) -> Any:
    """The same for an item of a member on another realm, which h.example relays to
    the group's other realms: bob, b.example's only member, leaves through w2; an item
    of alice (a.example) reaches w1 before it has heard of the leave.  It is relayed
    to the realms with a member at its position but a.example: none."""
    links, clock, home, a = net
    w1, w2 = home.realms
    b = links.add(fed_realm(clock, "b.example", tmp_path))
    for worker in (w1, w2):
        for realm, other in ((worker, b), (b, worker)):
            keys = parse_keys(other.signing.announce())
            yield realm.peer_keys.learn(other.realm, keys)
    yield group_with_owner(home)
    alice, bob = User(a, clock, "alice"), User(b, clock, "bob")
    for user, realm in ((alice, a), (bob, b)):
        user.ok("join", group=GROUP)
        requests = requests_for_home(realm)[realm.realm]
        assert (yield w2.receive_remote(realm.realm, requests)) == []
        # the join comes back (the realm's mirror of the group: its member may act)
        assert (yield realm.receive_remote("h.example", (yield queued_for(w2, realm.realm)))) == []
    yield home.delivered(0, w2.groups.get(GROUP).members["bob@b.example"].since)
    bob.ok("leave", group=GROUP)
    assert (yield w2.receive_remote("b.example", requests_for_home(b)["b.example"])) == []
    assert "bob@b.example" in w1.groups.get(GROUP).members  # w1 has not heard yet
    alice.ok("send", to=GROUP, body="after bob left")
    items = requests_for_home(a)["a.example"]
    assert [i.get("body") for i in items] == ["after bob left"]
    assert (yield w1.receive_remote("a.example", items)) == []
    relayed = yield w1.store.stored_item(items[0]["id"])
    assert relayed is not None and relayed.pos
    assert not (yield w1.store.outbox_holds("b.example", relayed.pos))
    queued = yield queued_for(w1, "b.example")
    assert "after bob left" not in [i.get("body") for i in queued]
