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
from chatproto.testing import InlineHasher


class Mind:
    protocol_name = "other"

    def deliver(self, envelope: Any) -> None:
        pass

    def synced(self, pos: int) -> None:
        pass

    def notify(self, notice: Any) -> None:
        pass

    def wait_writable(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)

    def disconnect(self, code: str, message: str) -> None:
        pass


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
    realm.login("alice", "password1", Mind()).addBoth(outcome.append)
    assert outcome == []  # waiting for the start, not let in
    suspensions().chainDeferred(held)
    clock.advance(0)
    assert realm.when_started().called
    [failure] = outcome
    assert failure.check(ChatError) and failure.value.code == "account_suspended"
    realm.stopService()
