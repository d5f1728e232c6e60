"""Black-box: which requests cost a token of which bucket, as PROTOCOL.md says ("Send
rate", and the buckets of mark_read, typing, search, conversations and report): a
request refused for its fields costs nothing; one that passed them pays, even when
it fails next (an unknown recipient, a message that is not there)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted

from tests.blackbox import Realm, errcode


@pytest.fixture
def bb(tmp_path: Any) -> Any:
    # A send bucket of 3 that does not refill while a test runs.
    realm = Realm.open(tmp_path, send_burst=3, send_rate=0.0001)
    yield realm
    realm.close()


#: Sends refused for their fields: none of them may cost a token.
BAD_SENDS = [
    {"body": "x"},  # no "to"
    {"to": "bob", "body": 5},
    {"to": "bob", "body": "x", "notice": "yes"},
    {"to": "bob", "body": "x", "nonce": ""},
    {"to": "bob", "body": "x", "tags": {"no-plus": "x"}},
    {"to": "bob", "body": "x", "tags": {"+a": 1}},
    {"to": "bob", "body": "x", "tags": {"+a": "two\nlines"}},
    {"to": "bob", "body": "x", "tags": {}},
    {"to": "bob", "body": "x", "reply_to": ""},
    {"to": "bob", "body": "x", "reply_to": "m" * 129},
    {"to": "bob", "body": "esc \x1b[2J"},
]


@pytest_twisted.inlineCallbacks
def test_a_send_refused_for_its_fields_costs_no_token(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    yield bb.user("bob")
    for fields in BAD_SENDS:
        r = yield alice.req("send", **fields)
        assert errcode(r) == "bad_request", (fields, r)
    codes = []
    for _ in range(4):
        r = yield alice.req("send", to="bob", body="hi")
        codes.append(errcode(r))
    assert codes == ["ok", "ok", "ok", "rate_limited"]


@pytest_twisted.inlineCallbacks
def test_a_send_past_the_field_checks_costs_a_token_even_when_it_fails(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    codes = []
    for to in ("nobody", "-bad", "carol@example.org"):
        r = yield alice.req("send", to=to, body="x")
        codes.append(errcode(r))
    r = yield alice.req("send", to="alice", body="x")
    assert [*codes, errcode(r)] == ["no_such_user", "bad_address", "remote_realm", "rate_limited"]
    assert r["retry_after"] > 0


@pytest_twisted.inlineCallbacks
def test_tags_react_edit_delete_share_the_send_bucket(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    first = yield alice.req("send", to="alice", body="one")
    r = yield alice.req("tags", to="alice", tags={"+typing": "active"})
    assert errcode(r) == "ok"
    # refused for fields: free
    for type_, fields in [
        ("react", {"msg_id": first["msg_id"], "emoji": ""}),
        ("edit", {"msg_id": first["msg_id"]}),
        ("delete", {"msg_id": "m" * 129}),
        ("tags", {"to": "alice", "tags": {}}),
    ]:
        r = yield alice.req(type_, **fields)
        assert errcode(r) == "bad_request", (type_, r)
    r = yield alice.req("react", msg_id="no-such-item", emoji="x")  # costs: the last
    assert errcode(r) == "not_found"
    for type_, fields in [
        ("react", {"msg_id": first["msg_id"], "emoji": "x"}),
        ("edit", {"msg_id": first["msg_id"], "body": "two"}),
        ("delete", {"msg_id": first["msg_id"]}),
        ("send", {"to": "alice", "body": "x"}),
        ("tags", {"to": "alice", "tags": {"+a": "b"}}),
    ]:
        r = yield alice.req(type_, **fields)
        assert errcode(r) == "rate_limited", (type_, r)


@pytest_twisted.inlineCallbacks
def test_group_requests_and_set_status_are_not_rate_limited(bb: Realm) -> Any:
    alice = yield bb.user("alice")
    for _ in range(3):
        yield alice.req("send", to="alice", body="x")
    r = yield alice.req("create_group", group="#dev")
    assert errcode(r) == "ok"
    for topic in ("a", "b", "c", "d"):
        r = yield alice.req("set_topic", group="#dev", topic=topic)
        assert errcode(r) == "ok"
    for status in ("away", "busy", "online", "away"):
        r = yield alice.req("set_status", status=status)
        assert errcode(r) == "ok"


#: Each bucket of its own (per connection): its size and rate (tokens a second), and a
#: request that passes the field checks and then fails for its address (which costs a
#: token all the same).
OWN_BUCKETS = [
    (
        "mark_read",
        20,
        5.0,
        {"with": "bob", "pos": 1},
        {"with": "nobody", "pos": 1},
        {"with": "bob"},
    ),
    ("typing", 5, 1.0, {"with": "bob"}, {"with": "nobody"}, {"with": "bob", "typing": 1}),
    ("search", 10, 2.0, {"query": "hello"}, {"query": "x", "with": "#nogroup"}, {"query": "!"}),
    ("conversations", 5, 0.2, {}, None, {"limit": 0}),
]


@pytest.mark.parametrize("type_,size,rate,good,failing,bad", OWN_BUCKETS)
@pytest_twisted.inlineCallbacks
def test_the_reading_buckets(
    bb: Realm, type_: str, size: int, rate: float, good: Any, failing: Any, bad: Any
) -> Any:
    alice = yield bb.user("alice")
    yield bb.user("bob")
    for _ in range(3):  # the bad requests cost nothing
        r = yield alice.req(type_, **bad)
        assert errcode(r) == "bad_request", r
    codes = []
    start = time.monotonic()
    if failing is not None:
        r = yield alice.req(type_, **failing)
        codes.append(errcode(r))
        assert codes[0] in ("no_such_user", "no_such_group"), r
    while True:
        r = yield alice.req(type_, **good)
        if errcode(r) != "ok":
            break
        codes.append("ok")
        # the bucket refills at its rate meanwhile (the requests are slow on a loaded
        # machine): no more than that
        assert len(codes) <= size + int((time.monotonic() - start) * rate), (len(codes), r)
    assert len(codes) >= size, codes
    assert errcode(r) == "rate_limited" and r["retry_after"] > 0
    # per connection: another of alice's connections has a full bucket
    other = yield bb.login("alice", device="other")
    r = yield other.req(type_, **good)
    assert errcode(r) == "ok"
    # the send bucket is another one
    r = yield alice.req("send", to="bob", body="x")
    assert errcode(r) == "ok"
