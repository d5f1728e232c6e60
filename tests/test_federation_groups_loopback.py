"""A group spanning three realms over real mutual TLS on loopback (tests/fedharness.py):
a member realm's complete mirror (members, topic, ``who``) and presence between users
of two member realms who share only the group, across a peer outage."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor

from chatproto.client import RemoteError, connect
from tests.conftest import until
from tests.fedharness import federation

PW = "password-1"
GROUP = "#dev@h.example"


@defer.inlineCallbacks
def members_when(conn: Any, n: int, timeout: float = 30.0) -> Any:
    """``members`` of GROUP once the caller's realm lists ``n`` (a join is pending until
    the home realm's event arrives: ``remote_realm`` meanwhile)."""
    for _ in range(int(timeout / 0.02)):
        try:
            members = yield conn.members(GROUP)
        except RemoteError as e:
            assert e.code == "remote_realm"
            members = []
        if len(members) == n:
            return members
        yield task.deferLater(_reactor, 0.02, lambda: None)
    raise AssertionError(f"{GROUP} never had {n} members")


@defer.inlineCallbacks
def stop_all(conns: list[Any], nodes: list[Any]) -> Any:
    """A test's end: its client connections closed, then its realms stopped."""
    for conn in conns:
        yield conn.close()
    for n in nodes:
        yield n.stop()


@defer.inlineCallbacks
def owner_and_bob(tmp_path: Any, **bob_kw: Any) -> Any:
    """Realms h.example and b.example, owner registered on h and bob (``bob_kw`` to his
    connect, e.g. on_message) on b: ``(nodes, h, b, owner, bob)``."""
    nodes = yield federation(tmp_path, ["h.example", "b.example"])
    h, b = nodes
    owner = yield connect(_reactor, h.addr, "owner", PW, register=True)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True, **bob_kw)
    return nodes, h, b, owner, bob


@pytest_twisted.inlineCallbacks
def test_member_realms_see_the_whole_group_and_each_others_presence(tmp_path: Any) -> Any:
    nodes = yield federation(tmp_path, ["h.example", "b.example", "c.example"])
    h, b, c = nodes
    conns: list[Any] = []
    try:
        seen: dict[str, list[dict[str, Any]]] = {}

        @defer.inlineCallbacks
        def user(node: Any, name: str) -> Any:
            inbox = seen.setdefault(f"{name}@{node.name}", [])
            conn = yield connect(
                _reactor, node.addr, name, PW, register=True, on_presence=inbox.append
            )
            yield conn.synced
            conns.append(conn)
            return conn

        owner = yield user(h, "owner")
        yield owner.create_group("#dev", topic="across realms")
        carol = yield user(h, "carol")
        yield carol.join(GROUP)
        cathy = yield user(c, "cathy")
        yield cathy.join(GROUP)
        yield members_when(cathy, 3)
        # bob is the first of b.example: the members who joined before him, roles,
        # topic, all come with his join
        bob = yield user(b, "bob")
        yield bob.join(GROUP)
        expected = [
            ("bob@b.example", "member", True),
            ("carol@h.example", "member", True),
            ("cathy@c.example", "member", True),
            ("owner@h.example", "owner", True),
        ]
        # the members, roles and topic come with bob's join; cathy's "online" comes over
        # the c.example -> b.example link, which that join opens (a moment later)
        for _ in range(1500):
            members = yield members_when(bob, 4)
            if [(m["user"], m["role"], m["online"]) for m in members] == expected:
                break
            yield task.deferLater(_reactor, 0.02, lambda: None)
        assert [(m["user"], m["role"], m["online"]) for m in members] == expected
        info = yield bob.group_info(GROUP)
        assert (info["topic"], info["members"], info["role"]) == ("across realms", 4, "member")
        who = yield bob.who(GROUP)
        assert [w["user"] for w in who] == [m["user"] for m in members]
        yield members_when(cathy, 4)
        # bob and cathy share only the group: presence goes b <-> c directly
        yield cathy.set_status("away", "meeting")
        want = {"type": "presence", "user": "cathy@c.example", "status": "away", "text": "meeting"}
        yield until(lambda: want in seen["bob@b.example"], timeout=30)
        # b.example goes away; what cathy does meanwhile is not queued (presence is
        # ephemeral), but c.example's link coming back tells b who is online
        port = b.fed_port
        yield b.stop_federation()
        link = c.fed.links["b.example"]
        yield until(lambda: link.state != "ready", timeout=30)
        yield cathy.set_status("busy")
        b.cfg.federation.port = port
        b.fed.startService()
        busy = {"type": "presence", "user": "cathy@c.example", "status": "busy"}
        yield until(lambda: busy in seen["bob@b.example"], timeout=30)
        yield until(lambda: link.state == "ready", timeout=30)
        yield cathy.close()
        conns.remove(cathy)
        gone = {"type": "presence", "user": "cathy@c.example", "status": "offline"}
        yield until(lambda: gone in seen["bob@b.example"], timeout=30)
        members = yield bob.members(GROUP)
        assert {m["user"]: m["online"] for m in members}["cathy@c.example"] is False
    finally:
        yield stop_all(conns, nodes)


@pytest_twisted.inlineCallbacks
def test_a_remote_members_presence_is_told_once_per_change(tmp_path: Any) -> Any:
    """bob on b.example joins a group of h.example: he hears once that its owner is
    online (with his join), not again when the owner speaks."""
    nodes = yield federation(tmp_path, ["h.example", "b.example"])
    h, b = nodes
    conns: list[Any] = []
    try:
        owner = yield connect(_reactor, h.addr, "owner", PW, register=True)
        conns.append(owner)
        yield owner.synced
        yield owner.create_group("#dev")
        heard: list[dict[str, Any]] = []
        got: list[dict[str, Any]] = []
        bob = yield connect(
            _reactor,
            b.addr,
            "bob",
            PW,
            register=True,
            on_presence=heard.append,
            on_message=got.append,
        )
        conns.append(bob)
        yield bob.synced
        joining = yield connect(_reactor, b.addr, "bob", PW, quiet=True, device="j")
        yield joining.join(GROUP)  # as `chatproto join` does, beside bob's listen
        yield members_when(joining, 2)
        yield joining.close()
        online = {"type": "presence", "user": "owner@h.example", "status": "online"}
        yield until(lambda: online in heard, timeout=30)
        for i in range(3):  # as `chatproto send` does: a quiet session of its own
            once = yield connect(_reactor, h.addr, "owner", PW, quiet=True, device=f"d{i}")
            yield once.send(GROUP, f"hello {i}")
            yield once.close()
        yield until(lambda: sum(m.get("body", "").startswith("hello") for m in got) == 3)
        yield task.deferLater(_reactor, 0.3, lambda: None)  # anything late would be here
        assert [p for p in heard if p["user"] == "owner@h.example"] == [online]
    finally:
        yield stop_all(conns, nodes)


@pytest_twisted.inlineCallbacks
def test_settings_and_voice_reach_a_member_realm(tmp_path: Any) -> Any:
    """Over real mutual TLS: the owner on h.example makes #dev moderated with a key
    and gives bob of b.example a voice; b.example's mirror takes both events (it
    refused them), so bob's group_info says so, bob may speak in the moderated
    group, and the owner gets no bounce."""
    from tests.fedharness import drained

    nodes = yield federation(tmp_path, ["h.example", "b.example"])
    h, b = nodes
    got: list[dict[str, Any]] = []
    owner = yield connect(_reactor, h.addr, "owner", PW, register=True, on_message=got.append)
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    try:
        yield owner.create_group("#dev")
        yield bob.join(GROUP)
        yield members_when(bob, 2)
        yield owner.protocol.request("set_group", group="#dev", moderated=True, key="k3y")
        yield owner.protocol.request("set_voice", group="#dev", user="bob@b.example", voice=True)
        yield drained(h)
        info = yield bob.group_info(GROUP)
        assert (info["moderated"], info["has_key"]) == (True, True)
        assert b.realm.groups.get(GROUP).members["bob@b.example"].voice
        yield bob.send(GROUP, "I have a voice")
        yield drained(b)
        assert [m["kind"] for m in got if m["kind"] == "bounce"] == []
    finally:
        yield stop_all([owner, bob], nodes)


@pytest_twisted.inlineCallbacks
def test_a_user_of_another_realm_joins_a_keyed_group_with_its_key(tmp_path: Any) -> Any:
    """Over real mutual TLS: bob of b.example joins #dev@h.example, which has a key,
    giving it; he is a member on both realms (the key went with his request)."""
    nodes, _h, _b, owner, bob = yield owner_and_bob(tmp_path)
    try:
        yield owner.create_group("#dev")
        yield owner.protocol.request("set_group", group="#dev", key="k3y")
        yield bob.protocol.request("join", group=GROUP, key="k3y")
        members = yield members_when(bob, 2)
        assert sorted(m["user"] for m in members) == ["bob@b.example", "owner@h.example"]
    finally:
        yield stop_all([owner, bob], nodes)


@pytest_twisted.inlineCallbacks
def test_an_admin_on_another_realm_sets_the_groups_settings(tmp_path: Any) -> Any:
    """Over real mutual TLS: bob of b.example, an admin of #dev@h.example, makes it
    moderated and gives himself a voice; h.example applies both (the request carried
    them) and b.example's mirror follows."""
    from tests.fedharness import drained

    nodes, h, b, owner, bob = yield owner_and_bob(tmp_path)
    try:
        yield owner.create_group("#dev")
        yield bob.join(GROUP)
        yield members_when(bob, 2)
        yield owner.protocol.request("set_role", group="#dev", user="bob@b.example", role="admin")
        yield drained(h)
        yield bob.protocol.request("set_group", group=GROUP, moderated=True)
        yield bob.protocol.request("set_voice", group=GROUP, user="bob@b.example", voice=True)
        yield drained(b)
        yield drained(h)
        home = h.realm.groups.get(GROUP)
        assert home.moderated and home.members["bob@b.example"].voice
        info = yield bob.group_info(GROUP)
        assert info["moderated"] is True
    finally:
        yield stop_all([owner, bob], nodes)


@pytest_twisted.inlineCallbacks
def test_an_external_groups_message_from_outside_reaches_a_member_realm(tmp_path: Any) -> Any:
    """Over real mutual TLS: #dev@h.example is external; stranger of h.example, no
    member, writes to it; bob of b.example, a member, gets the message (b.example
    refused it, not_member, while h.example's members had it)."""
    from tests.fedharness import drained

    got: list[dict[str, Any]] = []
    nodes, h, _b, owner, bob = yield owner_and_bob(tmp_path, on_message=got.append)
    stranger = yield connect(_reactor, h.addr, "stranger", PW, register=True)
    try:
        yield owner.create_group("#dev")
        yield bob.join(GROUP)
        yield members_when(bob, 2)
        yield owner.protocol.request("set_group", group="#dev", external=True)
        yield drained(h)
        yield stranger.send(GROUP, "from outside")
        yield until(lambda: any(m.get("body") == "from outside" for m in got))
        assert [m["from"] for m in got if m.get("body") == "from outside"] == ["stranger@h.example"]
    finally:
        yield stop_all([owner, stranger, bob], nodes)
