"""The inbound link starts a transaction once the one before has handed its items to
the store (not once it is committed), acks in order, and only after each commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from test_federation import (  # noqa: F401
    certs,
    connect,
    federate,
    frame,
    frames,
    hello,
    item,
    node,
)
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.federation import FederationService


class Calls:
    """A stand-in for ``RealmService.receive_remote`` that records each call; the test
    says when a transaction is queued and when it is committed."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], Deferred[list[Any]], Any]] = []

    def __call__(self, origin: str, items: list[Any], fetch: Any = None, queued: Any = None) -> Any:
        d: Deferred[list[Any]] = Deferred()
        self.calls.append((items, d, queued))
        return d


def acks(transport: Any) -> list[str]:
    return [f["id"] for f in frames(transport) if f["type"] == "ack"]


def linked(node: Any, certs: Any) -> tuple[Calls, Any, Any]:  # noqa: F811
    """An inbound link from a.example, past its hello, to ``node``'s realm, whose
    receive_remote records its calls instead of storing."""
    realm, fed, _ = node
    realm.receive_remote = calls = Calls()
    proto, transport = connect(fed, certs["a.example"]["cert"])
    proto.dataReceived(hello())
    frames(transport)
    return calls, proto, transport


def test_next_transaction_starts_when_the_last_is_queued_and_acks_keep_order(
    node: Any,  # noqa: F811
    certs: Any,  # noqa: F811
) -> None:
    calls, proto, transport = linked(node, certs)
    for n in (1, 2, 3):
        proto.dataReceived(frame({"type": "txn", "id": f"t{n}", "items": [item(n)]}))
    assert len(calls.calls) == 1  # t2 waits until t1's items are with the store
    calls.calls[0][2]()  # t1 queued
    assert len(calls.calls) == 2
    assert acks(transport) == []  # nothing is acked before its commit
    calls.calls[0][1].callback([])  # t1 committed
    assert acks(transport) == ["t1"]
    assert len(calls.calls) == 2  # t2 is still being checked
    calls.calls[1][1].callback([])  # t2 committed without a last batch (never "queued")
    assert acks(transport) == ["t2"]
    assert len(calls.calls) == 3
    calls.calls[2][2]()
    calls.calls[2][2]()  # said twice: harmless
    calls.calls[2][1].callback([{"id": "id-3", "code": "no_such_user", "message": "x"}])
    [ack] = frames(transport)
    assert ack == {"type": "ack", "id": "t3", "rejected": [ack["rejected"][0]]}
    assert not transport.disconnecting


def test_a_failed_commit_closes_the_link_and_acks_nothing_after_it(
    node: Any,  # noqa: F811
    certs: Any,  # noqa: F811
) -> None:
    calls, proto, transport = linked(node, certs)
    proto.dataReceived(frame({"type": "txn", "id": "t1", "items": [item(1)]}))
    proto.dataReceived(frame({"type": "txn", "id": "t2", "items": [item(2)]}))
    calls.calls[0][2]()
    calls.calls[0][1].errback(RuntimeError("disk full"))
    calls.calls[1][1].callback([])  # t2 was committed after all: not acked (resent, de-duplicated)
    assert [f.get("code") for f in frames(transport)] == ["internal_error"]
    assert transport.disconnecting


@pytest_twisted.inlineCallbacks
def test_transactions_received_together_share_a_commit_on_sqlite(
    certs: Any,  # noqa: F811
    tmp_path: Path,
) -> Any:
    from conftest import fast_config, make_realm, until

    cfg = fast_config(tmp_path)
    cfg.realm = "b.example"
    federate(cfg, certs["b.example"])
    cfg.check()
    realm = make_realm(cfg)
    yield realm.startService()
    try:
        yield realm.create_user("bob", "password-1")
        clock = Clock()
        fed = FederationService(realm, clock, clock=clock, status_path="")
        proto, transport = connect(fed, certs["a.example"]["cert"])
        proto.dataReceived(hello())
        frames(transport)
        store = realm.store
        env = realm.messages.new_envelope("bob@b.example", "bob@b.example", "text", "x")
        busy = store.append([env])
        commits = store.commits
        data = b"".join(
            frame({"type": "txn", "id": f"t{n}", "items": [item(2 * n), item(2 * n + 1)]})
            for n in range(3)
        )
        proto.dataReceived(data)  # all three arrive while a commit is under way
        yield busy
        got: list[str] = []
        yield until(lambda: got.extend(acks(transport)) or len(got) == 3)
        assert got == ["t0", "t1", "t2"]
        # all three transactions together: with the one under way if it had not
        # started on the writer thread yet (a commit takes what waits when it
        # starts), else in the next
        assert store.commits - commits in (1, 2)
        feed = yield store.read_feed("bob@b.example", 0, 20)
        assert [e.body for e in feed if e.sender == "alice@a.example"] == [
            f"m{n}" for n in range(6)
        ]
    finally:
        yield realm.stopService()


def test_items_for_a_realm_committed_together_wake_its_link_once() -> None:
    from chatproto.testing import make_test_realm

    realm = make_test_realm(Clock())
    realm.config.federation.enabled = True
    wakes: list[tuple[str, int]] = []

    class Fed:
        def admit(self, peer: str, user: str | None = None) -> bool:
            return True

        def wake(self, peer: str, n: int = 1) -> None:
            wakes.append((peer, n))

    realm.federation = Fed()
    realm.create_user("alice", "password-1")
    realm.begin_burst()  # as the store does while it hands out a group commit
    sent = [realm.post("alice", to, "hi") for to in ("bob@b.example",) * 3 + ("c@c.example",)]
    assert all(d.called for d in sent) and wakes == []
    realm.end_burst()
    assert sorted(wakes) == [("b.example", 3), ("c.example", 1)]
    realm.post("alice", "bob@b.example", "alone")  # outside a burst: at once
    assert wakes[-1] == ("b.example", 1)
