"""Logins wait until the realm has loaded its state at start (issue 18): a suspended
account restarted into a realm whose suspensions are still being read is refused, not
let in by a login that came first.  StringTransport-free: the realm API on a MemoryStore
whose ``suspensions`` read is held back."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatproto.config import Config
from chatproto.errors import ChatError
from chatproto.realm import RealmService
from chatproto.store.memory import MemoryStore
from chatproto.testing import InlineHasher, NullMind


def test_a_login_during_start_waits_for_the_suspensions() -> None:
    clock = Clock()
    store = MemoryStore()
    first = RealmService(Config(), store, clock, clock=clock, hasher=InlineHasher())
    first.startService()
    first.create_user("alice", "password1")
    first.admin.suspend("alice", "spam")
    first.stopService()

    held: Deferred[Any] = Deferred()
    suspensions = store.suspensions
    store.suspensions = lambda: held  # type: ignore[method-assign]
    realm = RealmService(Config(), store, clock, clock=clock, hasher=InlineHasher())
    realm.startService()
    assert not realm.when_started().called
    outcome: list[Any] = []
    realm.login("alice", "password1", NullMind()).addBoth(outcome.append)
    assert outcome == []  # waiting for the start, not let in
    suspensions().chainDeferred(held)
    clock.advance(0)
    assert realm.when_started().called
    [failure] = outcome
    assert failure.check(ChatError) and failure.value.code == "account_suspended"
    realm.stopService()


def test_a_peer_is_welcomed_once_the_suspensions_are_loaded(tmp_path: Any) -> None:
    """Federation intake waits for the start too: a peer realm that connects during it
    is welcomed (and only then sends its transactions) once the realm has loaded its
    state, so a message to a suspended account is refused, not stored."""
    from chatproto import tls
    from chatproto.federation import FederationService
    from tests.test_federation import connect, federate, frame, frames, hello

    certs = {n: tls.write_dev_certs(str(tmp_path / "certs"), n) for n in ("a.example", "b.example")}
    cfg = Config(realm="b.example", data_dir=str(tmp_path / "b"))
    federate(cfg, certs["b.example"])
    cfg.check()
    clock = Clock()
    store = MemoryStore()
    first = RealmService(cfg, store, clock, clock=clock, hasher=InlineHasher())
    first.startService()
    first.create_user("bob", "password1")
    first.admin.suspend("bob", "spam")
    first.stopService()

    held: Deferred[Any] = Deferred()
    suspensions = store.suspensions
    store.suspensions = lambda: held  # type: ignore[method-assign]
    realm = RealmService(cfg, store, clock, clock=clock, hasher=InlineHasher())
    fed = FederationService(realm, clock, clock=clock, status_path="")
    realm.startService()
    proto, transport = connect(fed, certs["a.example"]["cert"])
    txn = {"type": "txn", "id": "1-1", "items": [
        {"id": "m1", "kind": "text", "from": "alice@a.example", "to": "bob@b.example",
         "ts": 1.0, "body": "hi"},
    ]}  # fmt: skip
    seen: list[dict[str, Any]] = []

    def peer() -> None:
        """What a.example does: its transaction goes once it is welcomed."""
        out = frames(transport)
        seen.extend(out)
        if any(f["type"] == "welcome" for f in out):
            proto.dataReceived(frame(txn))
            seen.extend(frames(transport))

    proto.dataReceived(hello())
    peer()
    assert seen == []  # no welcome while the realm is starting
    suspensions().chainDeferred(held)
    clock.advance(0)
    peer()
    assert [f["type"] for f in seen] == ["welcome", "ack"]
    assert [r["code"] for r in seen[1]["rejected"]] == ["account_suspended"]
    assert [e for e in store.items if e.id == "m1"] == []
    realm.stopService()
