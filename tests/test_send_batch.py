"""The batched send path: the ``send`` requests of one read are one batch.

Over StringTransport (MemoryStore, Clock): one append per run of private messages, the
answers in request order with their ids, positions in request order, and every rule of a
lone send kept per request (errors, rate limit, nonces, groups, suspended recipients,
a commit that fails).  See Messaging.send_batch and ClientProtocol.begin_read.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from chatproto.config import Config
from chatproto.envelope import Envelope
from chatproto.testing import NullMind, frame, frames, make_test_realm
from tests.conftest import count_appends
from tests.test_protocol import clock_fixture, realm_fixture  # noqa: F401
from tests.test_reading import logged_in_clear


def sends(*reqs: dict[str, Any]) -> bytes:
    return b"".join(frame({"type": "send", **r}) for r in reqs)


def test_one_read_is_one_append_and_one_write(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    sizes = count_appends(realm)
    writes: list[bytes] = []
    write = ta.write
    ta.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    a.dataReceived(sends(*({"to": "bob", "body": f"m{i}", "id": i} for i in range(10))))
    assert sizes == [10]
    # the echoes go out in one write (the burst), then the answers in one more (with a
    # group commit they are one write: the answers join the burst's held frames)
    assert len(writes) == 2
    out = frames(ta)
    results = [f for f in out if f["type"] == "result"]
    echoes = [f for f in out if f["type"] == "msg"]
    assert [f["id"] for f in results] == list(range(10))
    assert [f["pos"] for f in results] == [f["pos"] for f in echoes]
    assert sorted(f["pos"] for f in results) == [f["pos"] for f in results]
    got = frames(tb)
    assert [f["body"] for f in got] == [f"m{i}" for i in range(10)]
    assert [f["msg_id"] for f in got] == [f["msg_id"] for f in results]


def test_one_byte_at_a_time(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    data = sends(*({"to": "bob", "body": f"m{i}", "id": i} for i in range(3)))
    for i in range(len(data)):
        a.dataReceived(data[i : i + 1])
    assert [f["id"] for f in frames(ta) if f["type"] == "result"] == [0, 1, 2]
    assert [e.body for e in realm.store.items] == ["m0", "m1", "m2"]


def test_every_request_keeps_its_own_answer(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    a.dataReceived(frame({"type": "create_group", "group": "#g", "id": "g"}))
    frames(ta)
    sizes = count_appends(realm)
    a.dataReceived(
        sends(
            {"to": "bob", "body": "one", "id": 1},
            {"to": "nobody", "body": "x", "id": 2},  # looked up: no_such_user
            {"to": "bob", "body": "bad \x1b[2J", "id": 3},  # ESC: refused at once
            {"to": "bob", "body": 5, "id": 4},  # not a string: refused at once
            {"to": "#g", "body": "to the group", "id": 5},  # the general path
            {"to": "bob", "body": "two", "id": 6},
            {"to": "bob", "body": "three", "nonce": "n1", "id": 7},
            {"to": "bob", "body": "three", "nonce": "n1", "id": 8},  # the same nonce
            {"to": "bob@other.example", "body": "x", "id": 9},  # remote_realm
        )
    )
    out = frames(ta)
    answers = {f["id"]: f for f in out if f["type"] in ("result", "error")}
    assert set(answers) == set(range(1, 10))
    codes = {i: answers[i].get("code") for i in answers}
    assert codes == {
        1: None,
        2: "no_such_user",
        3: "bad_request",
        4: "bad_request",
        5: None,
        6: None,
        7: None,
        8: None,
        9: "remote_realm",
    }
    assert answers[7]["msg_id"] == answers[8]["msg_id"]  # stored once
    bodies = [e.body for e in realm.store.items if e.kind == "text"]
    assert bodies == ["one", "to the group", "two", "three"]
    # positions follow the order of the requests (a run is cut at the group send)
    assert answers[1]["pos"] < answers[5]["pos"] < answers[6]["pos"] < answers[7]["pos"]
    assert sizes == [1, 1, 2]


def test_a_nonce_first_seen_on_the_general_path_holds_later_in_the_batch(
    realm: Any, clock: Clock
) -> None:
    # The user's first nonce ever arrives with a group send (the general path), and its
    # repeat to a user later in the same batch: the repeat is that send's, not stored.
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    a.dataReceived(frame({"type": "create_group", "group": "#g", "id": "g"}))
    frames(ta)
    a.dataReceived(
        sends(
            {"to": "#g", "body": "once", "nonce": "n", "id": 1},
            {"to": "bob", "body": "once", "nonce": "n", "id": 2},
        )
    )
    answers = {f["id"]: f for f in frames(ta) if f["type"] in ("result", "error")}
    assert set(answers) == {1, 2}
    assert answers[1]["msg_id"] == answers[2]["msg_id"]
    assert [e.body for e in realm.store.items if e.kind == "text"] == ["once"]


def test_rate_limit_applies_per_request(clock: Clock) -> None:
    cfg = Config()
    cfg.limits.send_rate = 1.0
    cfg.limits.send_burst = 2
    realm = make_test_realm(clock, cfg)
    a, ta = logged_in_clear(realm, clock, "alice")
    a.dataReceived(sends(*({"to": "alice", "body": "x", "id": i} for i in range(4))))
    answers = [f for f in frames(ta) if f["type"] != "msg"]
    assert sorted((f["id"], f.get("code")) for f in answers) == [
        (0, None),
        (1, None),
        (2, "rate_limited"),
        (3, "rate_limited"),
    ]
    realm.stopService()


def test_rate_limit_counts_only_checked_sends_and_the_general_path_in_order(
    clock: Clock,
) -> None:
    # Tokens are taken in request order by the sends whose fields passed, the general
    # path's included; refused bodies take none; the wait is a lone send's.
    cfg = Config()
    cfg.limits.send_rate = 2.0
    cfg.limits.send_burst = 3
    cfg.limits.max_body = 1000
    realm = make_test_realm(clock, cfg)
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    a.dataReceived(frame({"type": "create_group", "group": "#g", "id": "g"}))
    frames(ta)
    clock.advance(10)  # the bucket is full again
    a.dataReceived(
        sends(
            {"to": "bob", "body": "a", "id": 1},  # token 1
            {"to": "bob", "body": "bad \x1b[2J", "id": 2},  # refused: no token
            {"to": "bob", "body": "x" * 1001, "id": 3},  # too_large: no token
            {"to": "bob", "body": "\u00e9" * 300, "id": 4},  # checked the long way: token 2
            {"to": "#g", "body": "g", "id": 5},  # the general path: token 3
            {"to": "bob", "body": "\u0085", "id": 6},  # C1 control: refused, no token
            {"to": "bob", "body": "b", "id": 7},  # none left
            {"to": "bob", "body": "c", "id": 8},
        )
    )
    answers = {f["id"]: f for f in frames(ta) if f["type"] in ("result", "error")}
    codes = {i: f.get("code") for i, f in answers.items()}
    assert codes == {
        1: None,
        2: "bad_request",
        3: "too_large",
        4: None,
        5: None,
        6: "bad_request",
        7: "rate_limited",
        8: "rate_limited",
    }
    assert answers[7]["retry_after"] == answers[8]["retry_after"] == 0.5
    assert [e.body[:1] for e in realm.store.items if e.kind == "text"] == ["a", "\u00e9", "g"]
    clock.advance(0.5)  # one token back: one more send, the next refused
    a.dataReceived(sends({"to": "bob", "body": "d", "id": 9}, {"to": "bob", "body": "e", "id": 10}))
    answers = {f["id"]: f for f in frames(ta) if f["type"] in ("result", "error")}
    assert {i: f.get("code") for i, f in answers.items()} == {9: None, 10: "rate_limited"}
    realm.stopService()


def test_history_read_with_sends_sees_them(realm: Any, clock: Clock) -> None:
    """A request after sends of the same read is handled after them: the private
    messages (the batched ones) are stored before a history request that follows."""
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    a.dataReceived(
        sends({"to": "bob", "body": "one", "id": 1}, {"to": "bob", "body": "two", "id": 2})
        + frame({"type": "history", "with": "bob", "id": 3})
    )
    [page] = [f for f in frames(ta) if f.get("id") == 3]
    assert [m["body"] for m in page["messages"]] == ["one", "two"]


def test_a_request_after_sends_sees_them_stored(realm: Any, clock: Clock) -> None:
    """Sends read before another request are handed to the realm before it."""
    a, _ta = logged_in_clear(realm, clock, "alice")
    a.dataReceived(frame({"type": "create_group", "group": "#g", "id": "g"}))
    b, tb = logged_in_clear(realm, clock, "bob")
    b.dataReceived(frame({"type": "join", "group": "#g", "id": "j"}))
    frames(tb)
    b.dataReceived(
        sends({"to": "alice", "body": "bye", "id": 1}, {"to": "#g", "body": "last", "id": 2})
        + frame({"type": "leave", "group": "#g", "id": 3})
    )
    answers = {f["id"]: f for f in frames(tb) if f["type"] in ("result", "error")}
    assert all("code" not in answers[i] for i in (1, 2, 3))
    assert answers[1]["pos"] < answers[2]["pos"]


def test_a_failed_commit_answers_every_request_and_forgets_nonces(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")
    append = realm.store.append
    realm.store.append = lambda items, outbox=(): fail(OSError("disk full"))
    a.dataReceived(
        sends(
            {"to": "bob", "body": "x", "id": 1},
            {"to": "bob", "body": "y", "nonce": "n", "id": 2},
        )
    )
    out = frames(ta)
    assert sorted((f["id"], f["code"]) for f in out) == [
        (1, "internal_error"),
        (2, "internal_error"),
    ]
    realm.store.append = append
    a.dataReceived(sends({"to": "bob", "body": "y", "nonce": "n", "id": 3}))
    [result] = [f for f in frames(ta) if f["type"] == "result"]
    assert result["id"] == 3
    assert [e.body for e in realm.store.items] == ["y"]


def test_suspended_recipient_is_refused_in_a_batch(realm: Any, clock: Clock) -> None:
    a, ta = logged_in_clear(realm, clock, "alice")
    realm.create_user("bob", "password1")
    realm.create_user("carol", "password1")
    realm.admin.suspend("carol", "spam")
    clock.advance(0)
    a.dataReceived(
        sends({"to": "bob", "body": "x", "id": 1}, {"to": "carol", "body": "x", "id": 2})
    )
    answers = {f["id"]: f for f in frames(ta) if f["type"] in ("result", "error")}
    assert "code" not in answers[1]
    assert answers[2]["code"] == "account_suspended"


def test_a_large_burst_is_written_as_it_grows(realm: Any, clock: Clock) -> None:
    """The frames held for a connection during a delivery burst go out once the burst
    passes flow.BURST_WRITE bytes, not all at its end: a reader that stopped reading
    is held to the output bound plus about that much."""
    from chatproto.flow import BURST_WRITE

    _a, ta = logged_in_clear(realm, clock, "alice")
    writes: list[bytes] = []
    write = ta.write
    ta.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    body = "x" * 4000
    realm.begin_burst()  # (as a group commit does: its items' frames are held)
    for i in range(40):
        realm.post("alice", "alice", f"{i} {body}")
    assert writes  # before the burst's end
    realm.end_burst()
    assert len(writes) > 1 and all(len(w) <= BURST_WRITE + 5000 for w in writes)
    got = frames(ta)
    assert [f["body"] for f in got if f["type"] == "msg"] == [f"{i} {body}" for i in range(40)]


def _realm_of_alice_and_bob() -> Any:
    """A realm on a Clock with the accounts alice and bob (for the tests hypothesis
    runs many times: a fixture's realm would be shared by their examples)."""
    realm = make_test_realm(Clock())
    realm.create_user("alice", "password1")
    realm.create_user("bob", "password1")
    return realm


def _mixed_run(realm: Any, clock: Clock) -> dict[str, list[tuple[str, str, str]]]:
    """One read of alice's: messages to bob, carol, herself and bob again; bob has two
    sessions, alice a second one.  What each connection receives, (type, from/to, body)."""
    a, ta = logged_in_clear(realm, clock, "alice")
    _a2, ta2 = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    _b2, tb2 = logged_in_clear(realm, clock, "bob")
    _c, tc = logged_in_clear(realm, clock, "carol")
    to = ["bob", "carol", "alice", "bob", "bob", "carol"]
    a.dataReceived(sends(*({"to": t, "body": f"m{i}", "id": i} for i, t in enumerate(to))))
    return {
        name: [(f["type"], f.get("to", ""), f.get("body", str(f.get("id")))) for f in frames(t)]
        for name, t in (("a", ta), ("a2", ta2), ("b", tb), ("b2", tb2), ("c", tc))
    }


def test_a_run_reaches_each_recipient_and_the_senders_sessions_in_order(
    realm: Any, clock: Clock
) -> None:
    """A committed run is routed in one call (Sessions.route_private): every item to
    each session of its recipient and of its sender, once, in position order."""
    got = _mixed_run(realm, clock)
    msgs = [
        (f"{t}@localhost", f"m{i}")
        for i, t in enumerate(["bob", "carol", "alice"] + ["bob"] * 2 + ["carol"])
    ]
    echo = [("msg", to, body) for to, body in msgs]
    assert got["a"] == echo + [("result", "", str(i)) for i in range(6)]
    assert got["a2"] == echo
    mine = [("msg", to, body) for to, body in msgs if to == "bob@localhost"]
    assert got["b"] == got["b2"] == mine
    assert got["c"] == [("msg", to, body) for to, body in msgs if to == "carol@localhost"]
    positions = [e.pos for e in realm.store.items[-6:]]
    assert positions == sorted(positions) and realm.stats.deliveries_live >= 6 + 6 + 6 + 2


def test_with_an_observer_a_run_is_routed_item_by_item_alike(clock: Clock) -> None:
    """Message observers see each item in turn (RealmService.route per item): the
    connections receive the same frames as with one routing call."""
    plain = _mixed_run(make_test_realm(clock), clock)
    realm = make_test_realm(clock)
    seen: list[str] = []
    realm.observers.append(lambda env: seen.append(env.body))
    assert _mixed_run(realm, clock) == plain
    assert seen == [f"m{i}" for i in range(6)]


def test_a_large_run_is_written_as_it_grows(realm: Any, clock: Clock) -> None:
    """A run routed in one call (Sessions.route_private, deliver_run) is still cut where
    the burst passes flow.BURST_WRITE bytes: its recipient's writes stay within the
    bound plus about one item, and hold every item once, in order."""
    from chatproto.flow import BURST_WRITE

    a, _ta = logged_in_clear(realm, clock, "alice")
    _b, tb = logged_in_clear(realm, clock, "bob")
    writes: list[bytes] = []
    write = tb.write
    tb.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    body = "x" * 4000
    a.dataReceived(sends(*({"to": "bob", "body": f"{i} {body}", "id": i} for i in range(40))))
    assert len(writes) > 1 and all(len(w) <= BURST_WRITE + 5000 for w in writes)
    got = frames(tb)
    assert [f["body"] for f in got if f["type"] == "msg"] == [f"{i} {body}" for i in range(40)]


def test_a_mind_without_deliver_run_gets_a_run_item_by_item(realm: Any, clock: Clock) -> None:
    """An embedding application's mind need not have ``deliver_run``: route_private
    hands it each item of a run with ``deliver``, in order, once."""
    from chatproto.testing import NullMind

    class Recorder(NullMind):
        def __init__(self) -> None:
            self.got: list[tuple[int, str]] = []

        def deliver(self, envelope: Any) -> None:
            self.got.append((envelope.pos, envelope.body))

    mind = Recorder()
    assert not hasattr(mind, "deliver_run")
    a, _ta = logged_in_clear(realm, clock, "alice")
    logged_in_clear(realm, clock, "bob")  # (registers bob: the helper's password)
    sessions: list[Any] = []
    realm.login("bob", "password1", mind, "app").addCallback(sessions.append)
    sessions[0].start()  # (what a connection does once logged in: backlog, then live)
    clock.advance(1)
    assert not sessions[0]._syncing
    a.dataReceived(sends(*({"to": "bob", "body": f"m{i}", "id": i} for i in range(5))))
    assert [b for _, b in mind.got] == [f"m{i}" for i in range(5)]
    assert [p for p, _ in mind.got] == sorted(p for p, _ in mind.got)


class RecordingMind(NullMind):
    """A session's mind that records the positions delivered to it and its
    ``written()`` calls (the route_private tests below)."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.written_calls = 0

    def deliver(self, envelope: Any) -> None:
        self.got.append(envelope.pos)

    def written(self) -> None:
        self.written_calls += 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["text", "text", "text", "reaction"]), min_size=1, max_size=6),
    st.integers(0, 8),
    st.booleans(),
    st.booleans(),
)
def test_a_session_shown_no_copy_moves_past_a_run_as_item_by_item(
    kinds: list[str], last: int, syncing: bool, closed: bool
) -> None:
    """Sessions.route_private and a session of the sender whose mind shows its user's
    own texts nowhere (``own_copies`` false): a run of texts moves its position to the
    run's last at once (and ``written()`` once), what the per-item rule gives (a text
    past its position moves it, anything else is delivered as ``_deliver`` does),
    whatever the run's kinds and the session's position, syncing or closed."""

    class Quiet(RecordingMind):
        own_copies = False

    realm = _realm_of_alice_and_bob()
    mind = Quiet()
    sessions: list[Any] = []
    realm.login("alice", "password1", mind, "app").addCallback(sessions.append)
    s = sessions[0]
    s._syncing, s.closed, s._last = syncing, closed, last
    if syncing:
        s._buffer = []
    items = [
        Envelope(f"m{i}", kind, "alice@localhost", "bob@localhost", 1.0, f"b{i}", None, 3 + i)
        for i, kind in enumerate(kinds)
    ]
    # the per-item rule (what the loop of route_private did for each item)
    want_last, want_got, want_buffer, moved = last, [], [], False
    for e in items:
        if e.kind != "text" or syncing or closed or e.pos <= want_last:
            if closed:
                continue
            if syncing:
                want_buffer.append(e.pos)
            elif e.pos > want_last:
                want_last = e.pos
                want_got.append(e.pos)
        else:
            want_last, moved = e.pos, True
    realm.sessions.route_private(items)
    assert (s._last, mind.got, mind.written_calls) == (want_last, want_got, int(moved))
    if syncing:
        assert [e.pos for e in s._buffer] == want_buffer


#: send requests (to, body, nonce, notice, reply_to, tags) of every kind send_batch
#: tells apart: plain ones to a few recipients, refused bodies, groups, unknown users,
#: other realms, repeated nonces, replies and client tags (the general path).
BATCH_REQUESTS = st.tuples(
    st.sampled_from(["bob", "bob", "bob@localhost", "carol", "#g", "#nope", "nobody", "b@d@x"]),
    st.sampled_from(["hi", "hi", "x" * 300, "\u00e9t\u00e9", "bad \x1b[2J", "\u0085", "", 7]),
    st.none() | st.sampled_from(["n1", "n2"]),
    st.booleans(),
    st.none() | st.just("0" * 35),
    st.none() | st.just({"+draft/react": "x"}),
)


def _outcomes(batch: bool, requests: list[Any], burst: int) -> tuple[Any, ...]:
    """What send_batch (or send, one request after another) answers each request
    with, what is stored, and the tokens left."""
    cfg = Config()
    cfg.limits.send_rate = 2.0
    cfg.limits.send_burst = burst
    cfg.limits.max_body = 1000
    clock = Clock()
    realm = make_test_realm(clock, cfg)
    for name in ("alice", "bob", "carol"):
        realm.create_user(name, "password1")
    sessions: list[Any] = []
    realm.login("alice", "password1", NullMind(), "app").addCallback(sessions.append)
    session = sessions[0]
    session.group_event("created", "#g")
    clock.advance(10)  # (a full bucket)
    answers: list[Any] = []

    def answer(out: Any) -> None:
        if isinstance(out, Deferred):
            out.addCallbacks(
                lambda env: answers.append(("env", env.recipient, env.body, env.meta)),
                lambda f: answers.append(("error", f.value.code)),
            )
        elif isinstance(out, Envelope):
            answers.append(("env", out.recipient, out.body, out.meta))
        else:
            answers.append(("error", out.code))

    if batch:
        outcomes, commits = realm.messages.send_batch(session, requests)
        assert len(outcomes) == len(requests)
        made = [o for o in outcomes if isinstance(o, Envelope)]
        assert [e for run in commits for e in run.items] == made  # the runs, in order
        for out in outcomes:
            answer(out)
    else:
        for req in requests:
            answer(realm.messages.send(session, *req))
    clock.advance(1)
    stored = [(e.kind, e.recipient, e.body, e.meta) for e in realm.store.items]
    return answers, stored, session.bucket.tokens


@settings(max_examples=300, deadline=None)
@given(st.lists(BATCH_REQUESTS, min_size=1, max_size=10), st.sampled_from([3, 100]))
def test_a_batch_answers_as_its_sends_one_by_one(requests: list[Any], burst: int) -> None:
    """Messaging.send_batch (the run of plain private messages checked inline, its
    outcomes' list made only once one is not an envelope) and Messaging.send for each
    request in turn: the same answer to each request, the same items stored in the
    same order, the same tokens left."""
    assert _outcomes(True, requests, burst) == _outcomes(False, requests, burst)


@given(
    st.text(max_size=5),
    st.text(max_size=5),
    st.text(max_size=5),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.none() | st.just({"notice": True}),
)
def test_the_send_paths_envelope_is_the_classs(
    msg_id: str, sender: str, recipient: str, ts: float, body: str, meta: Any
) -> None:
    """envelope.new_text (send_batch's items, made without the class call) sets every
    field of Envelope as its __init__ does: a field added to Envelope and not there
    fails here."""
    import attrs

    from chatproto.envelope import new_text

    made = new_text(msg_id, sender, recipient, ts, body, meta)
    want = Envelope(msg_id, "text", sender, recipient, ts, body, meta)
    assert type(made) is Envelope
    for field in attrs.fields(Envelope):
        assert getattr(made, field.name) is getattr(want, field.name), field.name


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["shown", "quiet", "plain"]), min_size=1, max_size=4))
def test_the_senders_sessions_shown_and_not_shown_a_run(kinds: list[str]) -> None:
    """Sessions.route_private and the sender's sessions, each with a mind that shows
    its user's own texts (``own_copies`` true, or no such attribute: the default) or
    not: every session shown them gets the whole run, in order (once), and every other
    one moves past it, whichever the order of the sessions (the common case, all of
    them shown, is told apart without a list: the same result as the general one)."""

    Mind = RecordingMind

    class Shown(Mind):
        own_copies = True

    class Quiet(Mind):
        own_copies = False

    realm = _realm_of_alice_and_bob()
    made = {"shown": Shown, "quiet": Quiet, "plain": Mind}
    minds = [made[k]() for k in kinds]
    sessions: list[Any] = []
    for mind in minds:
        realm.login("alice", "password1", mind, "app").addCallback(sessions.append)
    for s in sessions:
        s._syncing, s._last = False, 0
    items = [
        Envelope(f"m{i}", "text", "alice@localhost", "bob@localhost", 1.0, f"b{i}", None, 3 + i)
        for i in range(3)
    ]
    realm.sessions.route_private(items)
    for kind, mind, s in zip(kinds, minds, sessions, strict=True):
        if kind == "quiet":
            assert (mind.got, mind.written_calls) == ([], 1)
        else:
            assert (mind.got, mind.written_calls) == ([3, 4, 5], 0)
        assert s._last == 5


# The send run (Messaging's waiter of a run's append: no Deferred per batch) ----------


class _Routing:
    """What a SendRun asks of Messaging: route a committed run, settle a failed one."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.routed: list[list[Envelope]] = []
        self.failed: list[Any] = []

    def run_committed(self, items: list[Envelope], outbox: Any, remember: Any) -> list[Envelope]:
        if self.error is not None:
            raise self.error
        self.routed.append(items)
        return items

    def run_failed(self, f: Any, remember: Any) -> Any:
        self.failed.append(f)
        return f


def _run(routing: _Routing) -> Any:
    from chatproto.realm.messaging import SendRun

    items = [Envelope(id="m1", kind="text", sender="a@x", recipient="b@x", ts=1.0, body="hi")]
    return SendRun(routing, items, [], [])  # type: ignore[arg-type]


def test_a_send_run_hands_its_outcome_to_its_listener_before_or_after_the_commit() -> None:
    heard: list[Any] = []
    routing = _Routing()
    early = _run(routing)  # listened to, then committed
    early.listen(lambda items, *a: heard.append(("ok", items, a)), heard.append, 1, 2)
    assert heard == []
    early.callback(None)
    assert heard == [("ok", early.items, (1, 2))]
    late = _run(routing)  # committed (a MemoryStore answers at once), then listened to
    late.callback(None)
    late.listen(lambda items, *a: heard.append(("late", items, a)), heard.append, 3)
    assert heard[1:] == [("late", late.items, (3,))]
    assert routing.routed == [early.items, late.items]  # routed once each, at the commit


def test_a_send_run_that_failed_or_failed_to_route_tells_its_listener() -> None:
    from twisted.python.failure import Failure

    heard: list[Any] = []
    routing = _Routing()
    run = _run(routing)
    run.listen(heard.append, lambda f, *a: heard.append((f.value, a)), "rid")
    boom = OSError("disk full")
    run.errback(Failure(boom))
    assert heard == [(boom, ("rid",))] and routing.failed[0].value is boom
    # a committed run whose routing raises: the listener hears that failure
    bad = _Routing(error=KeyError("bug"))
    run = _run(bad)
    run.listen(heard.append, lambda f, *a: heard.append(f.type), "rid")
    run.callback(None)
    assert heard[-1] is KeyError


def test_a_send_run_has_one_listener() -> None:
    import pytest

    run = _run(_Routing())
    run.listen(print, print)
    with pytest.raises(RuntimeError):
        run.listen(print, print)
    # once the outcome is handed out, too (a second listener would wait for ever)
    heard: list[Any] = []
    for listened_first in (True, False):
        run = _run(_Routing())
        if listened_first:
            run.listen(heard.append, heard.append)
            run.callback(None)
        else:
            run.callback(None)
            run.listen(heard.append, heard.append)
        with pytest.raises(RuntimeError):
            run.listen(heard.append, heard.append)
    assert [[env.id for env in items] for items in heard] == [["m1"], ["m1"]]  # once each


def test_a_listener_that_raises_is_logged_and_costs_the_other_connections_nothing(
    realm: Any, clock: Clock
) -> None:
    from tests.conftest import LogWatch

    a, _ta = logged_in_clear(realm, clock, "alice")
    c, tc = logged_in_clear(realm, clock, "carol")
    logged_in_clear(realm, clock, "bob")
    watch = LogWatch()
    try:

        def broken(items: Any, rids: Any) -> None:
            raise ValueError("a bug writing the answers")

        a._sent_run = broken  # type: ignore[method-assign]
        a.dataReceived(sends({"to": "bob", "body": "from alice", "id": 1}))
        c.dataReceived(sends({"to": "bob", "body": "from carol", "id": 2}))
    finally:
        watch.close()
    assert [f["id"] for f in frames(tc) if f["type"] == "result"] == [2]
    assert any("the listener of a send run failed" in line for line in watch.failures)
    assert [e.body for e in realm.store.items] == ["from alice", "from carol"]
