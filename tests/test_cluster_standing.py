"""Accounts' standing across the workers of a cluster (issue 16): what one worker
changes -- a suspension, the admin role, browser logins, an account deleted, sessions
ended by an operator -- every other worker follows from the store, told over the bus
(channel ``standing``).

Two workers' realms on one store (a MemoryStore, a test Clock), with the cluster side
of each (:class:`chatproto.cluster.worker.Worker`) and their buses joined by a pipe
that carries the ``standing`` channel as Redis would (to every subscriber, the
publisher too).  The same over real ``twistd`` workers, PostgreSQL and Redis, with
``chatrealmctl``: tests/test_cluster.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from chatproto.cluster.worker import Worker
from chatproto.config import Config
from chatproto.errors import ChatError
from chatproto.realm import RealmService
from chatproto.store.memory import MemoryStore
from chatproto.testing import InlineHasher, NullMind
from tests.conftest import fired

PASSWORD = "correct horse"


class Mind(NullMind):
    """A connection that records how it was closed."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, str]] = []

    def disconnect(self, code: str, message: str) -> None:
        self.closed.append((code, message))


class Pair:
    """Workers w1 and w2 of realm ``localhost`` on one store; ``told`` is every
    message published on ``standing``; ``cut`` drops them (a bus outage)."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.told: list[dict[str, Any]] = []
        self.cut = False
        self.realms: list[RealmService] = []
        self.workers: list[Worker] = []
        for name in ("w1", "w2"):
            cfg = Config()
            cfg.worker = name
            realm = RealmService(
                cfg, self.store, self.clock, clock=self.clock, hasher=InlineHasher()
            )
            fired(realm.startService())
            self.realms.append(realm)
            self.workers.append(Worker(realm, self.clock))
        for w in self.workers:
            w.bus.publish = self._publish  # type: ignore[method-assign]

    def _publish(self, channel: str, message: str) -> None:
        if channel != "standing":
            return
        self.told.append(json.loads(message))
        if self.cut:
            return
        for w in self.workers:
            w.bus.handlers[w.bus.key(channel)](message)

    def login(self, i: int, user: str) -> tuple[Any, Mind]:
        mind = Mind()
        session = fired(self.realms[i].login(user, PASSWORD, mind))
        return session, mind

    def close(self) -> None:
        for realm in self.realms:
            fired(realm.stopService())


@pytest.fixture
def pair() -> Any:
    p = Pair()
    for name in ("alice", "bob"):
        fired(p.realms[0].create_user(name, PASSWORD))
    yield p
    p.close()


def failure_code(d: Any) -> str:
    with pytest.raises(ChatError) as e:
        fired(d)
    return e.value.code


def test_a_suspension_on_one_worker_ends_the_sessions_on_the_other(pair: Pair) -> None:
    w1, w2 = pair.realms
    _, mind = pair.login(1, "bob")
    fired(w1.admin.suspend("bob", "spam"))
    assert mind.closed == [("account_suspended", "this account is suspended: spam")]
    assert w2.admin.is_suspended("bob")
    assert failure_code(w2.login("bob", PASSWORD, Mind())) == "account_suspended"
    assert failure_code(w2.issue_token("bob", PASSWORD)) == "account_suspended"
    assert pair.told[-1] == {
        "w": "w1",
        "u": "bob",
        "r": ["logins", "suspensions"],
        "e": ["account_suspended", "this account is suspended: spam"],
    }

    fired(w1.admin.unsuspend("bob"))
    assert not w2.admin.is_suspended("bob")
    pair.login(1, "bob")


def test_the_admin_role_granted_on_one_worker_holds_on_the_other(pair: Pair) -> None:
    w1, w2 = pair.realms
    assert not w2.moderation.is_admin("alice@localhost")
    fired(w1.moderation.grant("alice"))
    assert w2.moderation.is_admin("alice@localhost")
    # ... so alice may act as one there: suspend bob from w2
    _, mind = pair.login(0, "bob")
    fired(w2.moderation.suspend("alice@localhost", "bob", "flood"))
    assert mind.closed and mind.closed[0][0] == "account_suspended"  # bob was on w1
    fired(w1.moderation.revoke("alice"))
    assert not w2.moderation.is_admin("alice@localhost")


def test_browser_logins_follow_across_workers(pair: Pair) -> None:
    w1, w2 = pair.realms
    token, _ = fired(w1.issue_token("bob", PASSWORD))
    assert str(w2.token_user(token)) == "bob@localhost"  # issued on w1, valid on w2
    mind = Mind()
    session = fired(w2.login_token(token, mind))
    assert session.login is not None
    _, by_password = pair.login(1, "bob")
    fired(w1.admin.revoke_logins("bob"))  # "log out everywhere", on w1
    assert mind.closed == [("session_ended", "this browser login was ended")]
    assert by_password.closed == []  # a password session is not a browser login
    assert w2.token_user(token) is None

    token, _ = fired(w1.issue_token("bob", PASSWORD))
    mind = Mind()
    fired(w2.login_token(token, mind))
    w1.revoke_token(token)  # a browser logs out on w1
    assert mind.closed == [("session_ended", "this browser login was ended")]
    assert w2.token_user(token) is None


def test_sessions_an_operator_ends_end_on_every_worker(pair: Pair) -> None:
    w1 = pair.realms[0]
    _, on_w2 = pair.login(1, "bob")
    _, on_w1 = pair.login(0, "bob")
    assert w1.admin.kick("bob", "bye") == ("bob@localhost", 1)
    assert (
        on_w1.closed == on_w2.closed == [("session_ended", "an operator ended your sessions: bye")]
    )

    _, on_w2 = pair.login(1, "bob")
    fired(w1.admin.set_password("bob", "another horse"))
    assert on_w2.closed == [("session_ended", "the password was changed")]


def test_an_account_deleted_on_one_worker_is_gone_on_the_other(pair: Pair) -> None:
    w1, w2 = pair.realms
    _, mind = pair.login(1, "bob")
    assert fired(w1.delete_user("bob"))
    assert mind.closed == [("auth_failed", "this account was deleted")]
    assert not w2.accounts.is_user("bob@localhost")
    # and a new account of the name, made on w1, is a new one on w2 too
    fired(w1.create_user("bob", PASSWORD))
    pair.login(1, "bob")


def test_standing_missed_on_the_bus_is_read_when_redis_answers_again(pair: Pair) -> None:
    w1, w2 = pair.realms
    token, _ = fired(w1.issue_token("alice", PASSWORD))
    web = Mind()
    fired(w2.login_token(token, web))
    _, mind = pair.login(1, "bob")
    pair.cut = True
    fired(w1.admin.suspend("bob", ""))
    fired(w1.moderation.grant("alice"))
    fired(w1.admin.revoke_logins("alice"))
    late, _ = fired(w1.issue_token("alice", PASSWORD))
    assert mind.closed == [] and web.closed == [] and not w2.admin.is_suspended("bob")
    assert w2.token_user(late) is None
    pair.workers[1]._bus_changed(True)  # Redis answers again: re-read from the store
    assert mind.closed == [("account_suspended", "this account is suspended")]
    assert web.closed == [("session_ended", "this browser login was ended")]
    assert w2.admin.is_suspended("bob") and w2.moderation.is_admin("alice@localhost")
    assert str(w2.token_user(late)) == "alice@localhost"
    assert w2.token_user(token) is None


def test_a_login_being_stored_here_is_kept_when_another_worker_makes_one(pair: Pair) -> None:
    """w2 issues bob a browser login whose write is not done yet when w1 tells of
    another one: w2 re-reads bob's logins from the store, which lacks its own, and
    keeps it (it is not a revoked one)."""
    from twisted.internet.defer import Deferred

    w1, w2 = pair.realms
    held: list[Deferred[None]] = []
    put = pair.store.put_session_token

    def slow_put(*args: Any) -> Any:
        d: Deferred[None] = Deferred()
        held.append(d)
        return d.addCallback(lambda _: put(*args))

    pair.store.put_session_token = slow_put  # type: ignore[method-assign]
    pending = w2.issue_token("bob", PASSWORD)
    pair.store.put_session_token = put  # type: ignore[method-assign]
    fired(w1.issue_token("bob", PASSWORD))  # w2 re-reads bob's logins
    held[0].callback(None)
    token, _ = fired(pending)
    assert str(w2.token_user(token)) == "bob@localhost"


def test_a_browser_login_used_on_another_worker_before_the_bus_tells_of_it(
    pair: Pair,
) -> None:
    """A login made on w1 and presented on w2 before the bus message reaches w2 (here
    it never does): w2 reads the store before refusing the token (the store is the
    truth, the bus a wake-up)."""
    w1, w2 = pair.realms
    pair.cut = True
    token, _ = fired(w1.issue_token("bob", PASSWORD, "laptop"))
    mind = Mind()
    session = fired(w2.login_token(token, mind))
    assert (str(session.user), session.device) == ("bob@localhost", "laptop")
    assert str(w2.token_user(token)) == "bob@localhost"  # held on w2 from now on


def test_a_login_revoked_before_another_worker_hears_of_it_stays_refused(pair: Pair) -> None:
    """The store read for a token not held never brings back a revoked one: one
    revoked on the worker that issued it (gone from the store), one revoked here
    whose deletion the store has not confirmed, one revoked while the read was under
    way."""
    from twisted.internet.defer import Deferred

    w1, w2 = pair.realms
    pair.cut = True
    token, _ = fired(w1.issue_token("bob", PASSWORD))
    w1.revoke_token(token)
    assert failure_code(w2.login_token(token, Mind())) == "auth_failed"

    # revoked on w2 (which never held it) while the store still has it
    token, _ = fired(w1.issue_token("bob", PASSWORD))
    delete = pair.store.delete_session_tokens
    held: list[Deferred[None]] = []

    def slow_delete(digests: Any) -> Any:
        d: Deferred[None] = Deferred()
        held.append(d)
        return d.addCallback(lambda _: delete(digests))

    pair.store.delete_session_tokens = slow_delete  # type: ignore[method-assign]
    w2.revoke_token(token)
    pair.store.delete_session_tokens = delete  # type: ignore[method-assign]
    assert failure_code(w2.login_token(token, Mind())) == "auth_failed"
    held[0].callback(None)
    assert failure_code(w2.login_token(token, Mind())) == "auth_failed"

    # every login of the account revoked on w2 (a password changed there), the
    # store's deletion not confirmed yet
    token, _ = fired(w1.issue_token("bob", PASSWORD))
    delete_all = pair.store.delete_user_session_tokens

    def slow_delete_all(name: str) -> Any:
        d: Deferred[None] = Deferred()
        held.append(d)
        return d.addCallback(lambda _: delete_all(name))

    pair.store.delete_user_session_tokens = slow_delete_all  # type: ignore[method-assign]
    w2.tokens.revoke_user("bob")
    pair.store.delete_user_session_tokens = delete_all  # type: ignore[method-assign]
    assert failure_code(w2.login_token(token, Mind())) == "auth_failed"
    held[1].callback(None)
    assert failure_code(w2.login_token(token, Mind())) == "auth_failed"

    # revoked on w1 while w2's read of it is under way (the read saw it live)
    token, _ = fired(w1.issue_token("bob", PASSWORD))
    read = pair.store.session_token
    reads: list[Deferred[None]] = []

    def slow_read(digest: str) -> Any:
        d: Deferred[None] = Deferred()
        reads.append(d)
        row = fired(read(digest))
        return d.addCallback(lambda _: row)

    pair.store.session_token = slow_read  # type: ignore[method-assign]
    pending = w2.login_token(token, Mind())
    pair.store.session_token = read  # type: ignore[method-assign]
    pair.cut = False
    fired(w1.admin.revoke_logins("bob"))  # w2 hears of it: it re-reads bob's logins
    reads[0].callback(None)
    assert failure_code(pending) == "auth_failed"
    assert w2.token_user(token) is None


def test_a_login_read_while_the_bus_tells_of_it_is_taken(pair: Pair) -> None:
    """w2's read of a login it does not hold is under way when the bus tells of it
    (w2 re-reads the account's logins, or another account's): the login is taken
    whichever read ends first (it failed once under load: a re-reading begun during
    the read made w2 refuse it)."""
    from twisted.internet.defer import Deferred

    w1, w2 = pair.realms
    held: list[Deferred[None]] = []

    def holding(method: Any) -> Any:
        def held_call(*args: Any) -> Any:
            d: Deferred[None] = Deferred()
            held.append(d)
            result = fired(method(*args))
            return d.addCallback(lambda _: result)

        return held_call

    for first in ("login", "reload", "another"):
        pair.cut = True
        token, _ = fired(w1.issue_token("bob", PASSWORD))
        w2.tokens.prune()  # (nothing: bob's login is not held on w2)
        read, reread = pair.store.session_token, pair.store.session_tokens
        pair.store.session_token = holding(read)  # type: ignore[method-assign]
        pair.store.session_tokens = holding(reread)  # type: ignore[method-assign]
        pending = w2.login_token(token, Mind())
        who = "alice" if first == "another" else "bob"
        pair.workers[1]._heard_standing(
            json.dumps({"w": "w1", "u": who, "r": ["logins"], "e": None})
        )
        pair.store.session_token, pair.store.session_tokens = read, reread  # type: ignore[method-assign]
        login, reload = held[0], held[1]
        held.clear()
        for d in (login, reload) if first == "login" else (reload, login):
            d.callback(None)
        for d in held:  # a read made again
            d.callback(None)
        held.clear()
        session = fired(pending)
        assert str(session.user) == "bob@localhost", first
        assert str(w2.token_user(token)) == "bob@localhost", first


def test_store_reads_for_tokens_not_held_are_bounded(pair: Pair) -> None:
    """Guessed tokens cost the store at most MISS_READS_AT_ONCE reads at once and
    MISS_READS_PER_SECOND (in bursts of MISS_READS_BURST); a token of another shape
    than those issued costs none.  Past the bound a real token not held yet is refused
    as it was before workers read the store, until the bucket refills."""
    import secrets

    from twisted.internet.defer import Deferred

    from chatproto.tokens import MISS_READS_AT_ONCE, MISS_READS_BURST, MISS_READS_PER_SECOND

    w1, w2 = pair.realms
    pair.cut = True
    read = pair.store.session_token
    reads: list[str] = []
    held: list[Deferred[None]] = []
    hold = True

    def counted(digest: str) -> Any:
        reads.append(digest)
        if not hold:
            return read(digest)
        d: Deferred[None] = Deferred()
        held.append(d)
        return d.addCallback(lambda _: fired(read(digest)))

    pair.store.session_token = counted  # type: ignore[method-assign]
    for junk in ("x", "a" * 42, "a" * 44, "!" * 43, "é" * 43):
        assert failure_code(w2.login_token(junk, Mind())) == "auth_failed"
    assert reads == []

    pending = [w2.login_token(secrets.token_urlsafe(32), Mind()) for _ in range(10)]
    assert len(reads) == MISS_READS_AT_ONCE
    for d in held:
        d.callback(None)
    hold = False
    for d in pending:
        assert failure_code(d) == "auth_failed"
    for _ in range(100):
        failure_code(w2.login_token(secrets.token_urlsafe(32), Mind()))
    assert len(reads) == MISS_READS_BURST
    token, _ = fired(w1.issue_token("bob", PASSWORD))
    assert failure_code(w2.login_token(token, Mind())) == "auth_failed"
    assert len(reads) == MISS_READS_BURST

    pair.clock.advance(1 / MISS_READS_PER_SECOND)
    fired(w2.login_token(token, Mind()))
    assert len(reads) == MISS_READS_BURST + 1


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[]",
        json.dumps({"w": "w1"}),
        json.dumps({"w": "w1", "u": 5, "r": ["suspensions"], "e": None}),
        json.dumps({"w": "w1", "u": "bob", "r": "suspensions", "e": None}),
        json.dumps({"w": "w1", "u": "bob", "r": ["nothing we know"], "e": ["x"]}),
        json.dumps({"w": "w2", "u": "bob", "r": [], "e": ["session_ended", "mine"]}),
    ],
)
def test_a_bad_or_own_standing_message_changes_nothing(pair: Pair, message: str) -> None:
    """What a worker hears on ``standing`` that it cannot read -- or its own message,
    back from Redis -- is dropped without an error."""
    _, mind = pair.login(1, "bob")
    pair.workers[1]._heard_standing(message)
    assert mind.closed == []
