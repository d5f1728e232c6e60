"""Black-box tests of PROTOCOL.md's "Addresses", over loopback TCP with raw frames,
on a realm named ``example.org``: every example of the table, and the forms a
hostile client tries (case, Unicode, IDN, empty parts, lengths at and past the
bounds, ``#`` and ``@`` in the wrong places, the realm's own name in another case)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.blackbox import PW, call, code, login, serve
from tests.conftest import fast_config

LOCAL_USERS = ("alice", "strasse", "bob.smith-2_x", "fi", "k", "a" * 32, "1abc")

#: `to` of a send -> the canonical `to` of the message, or the error code.
USER_FORMS = [
    ("alice", "alice@example.org"),
    ("Alice", "alice@example.org"),
    ("\uff21\uff2c\uff29\uff23\uff25", "alice@example.org"),
    ("Straße", "strasse@example.org"),
    ("bob.smith-2_x", "bob.smith-2_x@example.org"),
    ("alice@Example.ORG", "alice@example.org"),
    ("alice@EXAMPLE.ORG.", "alice@example.org"),
    ("ﬁ", "fi@example.org"),  # a ligature: NFKC makes it two letters
    ("\u212a", "k@example.org"),  # KELVIN SIGN
    ("a" * 32, "a" * 32 + "@example.org"),
    ("1abc", "1abc@example.org"),
    ("alice@chat.example.org.", "remote_realm"),
    ("alice@localhost", "remote_realm"),
    ("alice@xn--exmple-cua.org", "remote_realm"),
    ("alice@" + "a" * 63 + ".org", "remote_realm"),
    ("alice@" + ".".join(["a" * 62] * 4) + ".a", "remote_realm"),  # 253 characters
    ("alice@127.0.0.1", "remote_realm"),
    ("-bob", "bad_address"),
    ("al ice", "bad_address"),
    (" alice", "bad_address"),
    ("alice ", "bad_address"),
    ("Ω", "bad_address"),
    ("é", "bad_address"),
    ("ALİCE", "bad_address"),  # casefolds to i + COMBINING DOT ABOVE
    ("a" * 33, "bad_address"),
    ("", "bad_address"),
    ("@example.org", "bad_address"),
    ("alice@", "bad_address"),
    ("alice@-bad.org", "bad_address"),
    ("alice@bad-.org", "bad_address"),
    ("bob@exa_mple.org", "bad_address"),
    ("bob@exämple.org", "bad_address"),
    ("bob@example\uff0eorg", "bad_address"),  # a full-width dot
    ("bob@example.org..", "bad_address"),
    ("bob@.example.org", "bad_address"),
    ("bob@example..org", "bad_address"),
    ("alice@" + "a" * 64 + ".org", "bad_address"),
    ("alice@" + ".".join(["a" * 62] * 4) + ".ab", "bad_address"),  # 254 characters
    ("alice@example.org@example.org", "bad_address"),
    ("alice#x", "bad_address"),
    ("alice@exa#mple.org", "bad_address"),
    ("alice@[::1]", "bad_address"),
    ("alice@example.org:7422", "bad_address"),
    ("alice\x00", "bad_address"),
]

#: `group` of group_info (a group of this realm must exist: #dev).
GROUP_FORMS = [
    ("#dev", "#dev@example.org"),
    ("dev", "#dev@example.org"),
    ("#Dev@Example.org", "#dev@example.org"),
    ("#\uff24\uff25\uff36@example.org.", "#dev@example.org"),
    ("#", "bad_address"),
    ("#-dev", "bad_address"),
    ("#dev@", "bad_address"),
    ("##dev", "bad_address"),
    ("# dev", "bad_address"),
    ("#dev@exa_mple.org", "bad_address"),
    ("#" + "d" * 33, "bad_address"),
    ("#dev@example.net", "remote_realm"),
]


@pytest.fixture
def named_realm(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, send_burst=10_000, send_rate=10_000.0)
    cfg.realm = "example.org"
    yield from serve(cfg, LOCAL_USERS)


@pytest_twisted.inlineCallbacks
def test_user_addresses(named_realm: Any) -> Any:
    _realm, addr = named_realm
    alice = yield login(addr, "alice")
    wrong = []
    for given, want in USER_FORMS:
        r = yield call(alice, {"type": "send", "to": given, "body": "hi"})
        got = r.get("code") if r["type"] == "error" else None
        if got is None:
            msg = next(
                f
                for f in alice.frames
                if isinstance(f, dict) and f.get("type") == "msg" and f.get("pos") == r["pos"]
            )
            got = msg["to"]
        if got != want:
            wrong.append((given, want, r))
    assert not wrong


@pytest_twisted.inlineCallbacks
def test_group_addresses(named_realm: Any) -> Any:
    _realm, addr = named_realm
    alice = yield login(addr, "alice")
    made = yield call(alice, {"type": "create_group", "group": "#DEV"})
    assert made["group"] == "#dev@example.org", made
    wrong = []
    for given, want in GROUP_FORMS:
        r = yield call(alice, {"type": "group_info", "group": given})
        got = r["group"] if r["type"] == "result" else r.get("code")
        if got != want:
            wrong.append((given, want, r))
    assert not wrong


@pytest_twisted.inlineCallbacks
def test_groups_and_users_are_not_confused(named_realm: Any) -> Any:
    """A group address where a user is expected, or a user address where a group is
    (but the `group` field), is bad_address; `dev` the user and `#dev` the group are
    unrelated."""
    _realm, addr = named_realm
    alice = yield login(addr, "alice")
    yield call(alice, {"type": "create_group", "group": "#alice"})
    for req in (
        {"type": "invite", "group": "#alice", "user": "#alice"},
        {"type": "kick", "group": "#alice", "user": "#alice@example.org"},
        {"type": "login", "user": "#alice", "password": PW},
        {"type": "history", "with": "#"},
        # only the ASCII # and @ are separators: full-width ones are part of a name
        {"type": "send", "to": "\uff03alice", "body": "x"},
        {"type": "history", "with": "\uff03alice"},
        {"type": "send", "to": "alice\uff20example.org", "body": "x"},
        {"type": "group_info", "group": "\uff03alice"},
    ):
        r = yield call(alice, req)
        want = "already_authenticated" if req["type"] == "login" else "bad_address"
        assert code(r) == want, (req, r)
    dm = yield call(alice, {"type": "send", "to": "alice", "body": "to myself"})
    grp = yield call(alice, {"type": "send", "to": "#alice", "body": "to the group"})
    h = yield call(alice, {"type": "history", "with": "alice"})
    assert [m["pos"] for m in h["messages"]] == [dm["pos"]]
    hg = yield call(alice, {"type": "history", "with": "#alice"})
    assert grp["pos"] in [m["pos"] for m in hg["messages"]]
    assert dm["pos"] not in [m["pos"] for m in hg["messages"]]


@pytest_twisted.inlineCallbacks
def test_login_with_the_realm_in_another_case(named_realm: Any) -> Any:
    _realm, addr = named_realm
    for user in ("alice@EXAMPLE.org", "ALICE@example.org.", "\uff41\uff4c\uff49\uff43\uff45"):
        c = yield login(addr, user)
        r = next(f for f in c.frames if isinstance(f, dict) and f.get("id") == "login")
        assert r["user"] == "alice@example.org", r
        c.transport.loseConnection()
        yield c.lost
