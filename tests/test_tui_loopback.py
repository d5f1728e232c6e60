"""The terminal client's controller against a real realm on loopback TCP.

Two controllers (alice and bob) log in with the client library's ChatClientService and
their models are read as the screen would show them: messages once each across a
dropped connection, unread counts, history paging, group commands, and realm errors as
readable notices.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString

from chatproto import client, tls
from chatproto.protocol import ClientFactory
from chatproto.tui.controller import ChatController, LoginError
from chatproto.tui.model import STATUS, ChatModel, MessageLine, NoticeLine
from tests.conftest import drop_sessions, until

PASSWORD = "correct horse"


@defer.inlineCallbacks
def register(addr: str, *users: str) -> Any:
    for user in users:
        conn = yield client.connect(_reactor, addr, user, PASSWORD, register=True)
        yield conn.close()


@defer.inlineCallbacks
def logged_in(addr: str, user: str, **kw: Any) -> Any:
    ctl = ChatController(_reactor, ChatModel(), retry_policy=lambda attempt: 0.05, **kw)
    yield ctl.login(addr, user, PASSWORD)
    return ctl


def bodies(ctl: ChatController, address: str) -> list[str]:
    conv = ctl.model.conversations.get(address)
    if conv is None:
        return []
    lines = [line for line in conv.lines() if isinstance(line, MessageLine)]
    return [line.item["body"] for line in lines if line.item["kind"] == "text"]


def notices(ctl: ChatController, address: str) -> list[str]:
    conv = ctl.model.conversations[address]
    return [n.text for n in conv.notices if isinstance(n, NoticeLine)]


@pytest_twisted.inlineCallbacks
def test_login_failures_are_worded_for_the_login_screen(server: Any) -> Any:
    _, _, addr = server
    yield register(addr, "alice")
    ctl = ChatController(_reactor, ChatModel())
    cases = [
        (("alice", "wrong password"), {}, "auth_failed"),
        (("alice", PASSWORD), {"server": "tls:nohost"}, "bad server 'tls:nohost'"),
        (("alice", PASSWORD), {"server": "tcp:127.0.0.1:1"}, "cannot connect to tcp:127.0.0.1:1"),
        (("alice", PASSWORD), {"ca": "/nonexistent.pem", "server": "tls:h:1"}, "CA file"),
        (("", ""), {}, "a user name and a password are needed"),
    ]
    for (user, password), kw, expected in cases:
        server_ = kw.pop("server", addr)
        try:
            yield ctl.login(server_, user, password, **kw)
        except LoginError as e:
            assert expected in str(e), str(e)
        else:
            raise AssertionError(f"{kw} logged in")
        assert ctl.service is None
    assert ctl.model.connection == "offline"


@pytest_twisted.inlineCallbacks
def test_register_then_chat_once_each_across_a_dropped_connection(server: Any) -> Any:
    _, factory, addr = server
    alice = ChatController(_reactor, ChatModel(), retry_policy=lambda attempt: 0.05)
    yield alice.login(addr, "alice", PASSWORD, register=True)
    assert alice.model.me == "alice@localhost" and alice.model.connection == "online"
    yield register(addr, "bob")
    bob = ChatController(_reactor, ChatModel(), retry_policy=lambda attempt: 0.1)
    yield bob.login(addr, "bob", PASSWORD)
    try:
        yield alice.run("/msg bob hello bob")
        assert alice.model.active == "bob@localhost"
        yield until(lambda: bodies(bob, "alice@localhost") == ["hello bob"])
        assert bob.model.conversations["alice@localhost"].unread == 1
        # bob's connection drops; alice goes on writing; bob reconnects and resumes
        drop_sessions(factory, "bob@localhost")
        yield until(lambda: bob.model.connection == "reconnecting")
        assert bob.model.connection_detail == "the connection closed; retrying in 0.1s"
        for i in range(5):
            yield alice.run(f"/msg bob while away {i}")
        yield until(lambda: bob.model.connection == "online")
        # the status window tells the story (realm notices land there, not in a chat)
        assert notices(bob, STATUS)[-2:] == [
            "connection lost; reconnecting",
            f"reconnected to {addr}; nothing missed",
        ]
        expected = ["hello bob"] + [f"while away {i}" for i in range(5)]
        yield until(lambda: bodies(bob, "alice@localhost") == expected)
        assert bob.model.conversations["alice@localhost"].unread == 6
        # opening the conversation loads its history: nothing shown twice
        bob.open("alice@localhost")
        yield until(lambda: bob.model.conversations["alice@localhost"].history == "complete")
        assert bodies(bob, "alice@localhost") == expected
        assert bob.model.conversations["alice@localhost"].unread == 0
        yield bob.run("hi alice")
        yield until(lambda: bodies(alice, "bob@localhost")[-1:] == ["hi alice"])
        assert bodies(alice, "bob@localhost").count("hi alice") == 1
    finally:
        yield alice.stop()
        yield bob.stop()


@pytest_twisted.inlineCallbacks
def test_history_is_paged_back_from_the_realm(server: Any) -> Any:
    _, _, addr = server
    yield register(addr, "alice", "bob")
    sender = yield client.connect(_reactor, addr, "alice", PASSWORD)
    for i in range(25):
        yield sender.send("bob", f"m{i}")
    yield sender.close()
    bob = ChatController(_reactor, ChatModel(), page=10)
    # bob's device saw the backlog before: this device starts at his last ack
    first = yield client.connect(_reactor, addr, "bob", PASSWORD, device="tui")
    yield first.synced
    yield first.close()
    yield bob.login(addr, "bob", PASSWORD)
    try:
        assert bodies(bob, "alice@localhost") == []
        bob.open("alice@localhost")
        yield until(lambda: bob.model.conversations["alice@localhost"].history == "partial")
        assert bodies(bob, "alice@localhost") == [f"m{i}" for i in range(15, 25)]
        added = yield bob.older()
        assert added == 10
        added = yield bob.older()
        assert added == 5
        assert bob.model.conversations["alice@localhost"].history == "complete"
        assert bob.older() is None
        assert bodies(bob, "alice@localhost") == [f"m{i}" for i in range(25)]
    finally:
        yield bob.stop()


@pytest_twisted.inlineCallbacks
def test_group_commands_and_readable_realm_errors(server: Any) -> Any:
    _, _, addr = server
    yield register(addr, "alice", "bob", "carol")
    alice = yield logged_in(addr, "alice")
    bob = yield logged_in(addr, "bob")
    try:
        yield alice.run("/create #dev the dev room")
        assert alice.model.active == "#dev@localhost"
        yield until(lambda: alice.model.current.topic == "the dev room")
        yield bob.run("/join #dev")
        assert bob.model.active == "#dev@localhost"
        yield until(lambda: "bob joined" in alice_events(alice))
        yield bob.run("hello devs")
        yield until(lambda: bodies(alice, "#dev@localhost") == ["hello devs"])
        yield alice.run("/topic new topic")
        yield until(lambda: bob.model.conversations["#dev@localhost"].topic == "new topic")
        yield bob.run("/topic")
        assert notices(bob, "#dev@localhost")[-1] == "topic: new topic"
        yield bob.run("/who")
        assert (
            notices(bob, "#dev@localhost")[-1] == "#dev: 2 members, 2 online: +alice (owner), +bob"
        )
        yield bob.run("/kick alice")
        assert notices(bob, "#dev@localhost")[-1].startswith("forbidden: ")
        yield alice.run("/invite carol")
        yield alice.run("/msg nosuchuser hi")  # shown where alice was
        assert notices(alice, "#dev@localhost")[-1].startswith("no_such_user: ")
        yield alice.run("/bogus")
        assert "unknown command /bogus" in notices(alice, "#dev@localhost")[-1]
        alice.open("#dev@localhost")
        yield alice.run("/kick bob spam")
        yield until(lambda: not bob.model.conversations["#dev@localhost"].joined)
        assert "alice kicked bob (spam)" in alice_events(bob)
        yield bob.run("/leave #dev")
        assert notices(bob, "#dev@localhost")[-1].startswith("not_member: ")
        yield alice.run("/status away lunch")
        assert alice.status == ("away", "lunch")
        yield alice.run("/help who")  # in the status window, which comes up
        assert notices(alice, STATUS)[-1].startswith("/who [#GROUP]: ")
        assert alice.model.active == STATUS
        alice.open("#dev@localhost")
        yield alice.run("/close")
        assert alice.model.active == STATUS and "#dev@localhost" not in alice.model.conversations
        yield alice.run("a message to nobody")
        assert "this is the status view" in notices(alice, STATUS)[-1]
    finally:
        yield alice.stop()
        yield bob.stop()


def alice_events(ctl: ChatController) -> list[str]:
    from chatproto.display import describe_event

    conv = ctl.model.conversations["#dev@localhost"]
    return [describe_event(i) for i in conv.items.values() if i.get("kind") == "event"]


@pytest_twisted.inlineCallbacks
def test_presence_reaches_the_sidebar_and_quit_closes(server: Any) -> Any:
    _, factory, addr = server
    yield register(addr, "alice", "bob")
    alice = yield logged_in(addr, "alice")
    quits: list[bool] = []
    bob = yield logged_in(addr, "bob", on_quit=lambda: quits.append(True))
    try:
        yield alice.run("/msg bob hi")  # now contacts: presence flows
        yield until(lambda: alice.model.presence.get("bob@localhost") == ("online", ""))
        yield bob.run("/status busy focus")
        yield until(lambda: alice.model.presence.get("bob@localhost") == ("busy", "focus"))
        yield bob.run("/quit")
        assert quits == [True] and bob.model.connection == "offline"
        yield until(lambda: "bob@localhost" not in alice.model.presence)
        assert not [p for p in factory.connections if p.session and "bob" in p.session.user_id]
    finally:
        yield alice.stop()
        yield bob.stop()


@pytest_twisted.inlineCallbacks
def test_tls_login_verifies_the_certificate(realm: Any, tmp_path: Any) -> Any:
    certs = tls.write_dev_certs(str(tmp_path / "tls"), "localhost")
    desc = tls.server_description(certs["cert"], certs["key"], 0)
    port = yield serverFromString(_reactor, desc).listen(ClientFactory(realm))
    addr = f"tls:127.0.0.1:{port.getHost().port}"
    ctl = ChatController(_reactor, ChatModel())
    try:
        # the system's trust store does not know the development CA
        with pytest.raises(LoginError) as untrusted:
            yield ctl.login(addr, "alice", PASSWORD, register=True)
        assert "failed: TLS error: certificate verify failed" in str(untrusted.value)
        assert "give it as the CA file" in str(untrusted.value)  # the form's field
        # the right CA, but the certificate does not name "elsewhere"
        with pytest.raises(LoginError) as misnamed:
            yield ctl.login(addr, "alice", PASSWORD, realm="elsewhere", ca=certs["ca"])
        assert "certificate does not match the expected name (TLS name)" in str(misnamed.value)
        yield ctl.login(addr, "alice", PASSWORD, realm="localhost", ca=certs["ca"], register=True)
        assert ctl.model.connection == "online" and ctl.model.me == "alice@localhost"
        transport = ctl.service.connection.protocol.transport  # type: ignore[union-attr]
        assert transport.getPeerCertificate() is not None
    finally:
        yield ctl.stop()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_conversations_are_remembered_per_account(server: Any, tmp_path: Any) -> Any:
    _, _, addr = server
    yield register(addr, "alice", "bob")
    path = lambda account: str(tmp_path / "state" / f"{account}.json")  # noqa: E731
    alice = yield logged_in(addr, "alice", conversations_path=path)
    try:
        yield alice.run("/msg bob hi")
        yield alice.run("/create #dev")
        yield alice.run("/msg nobody typo")  # refused: not remembered, not listed
        assert "nobody@localhost" not in alice.model.conversations
        assert alice.model.active == "#dev@localhost"
    finally:
        yield alice.stop()
    again = yield logged_in(addr, "alice", conversations_path=path)
    try:
        assert set(again.model.conversations) == {STATUS, "bob@localhost", "#dev@localhost"}
        # another account on the same model: nothing of alice's stays
        yield again.stop()
        yield again.login(addr, "bob", PASSWORD)
        assert again.model.me == "bob@localhost"
        yield until(lambda: "alice@localhost" in again.model.conversations)  # the backlog
        assert "#dev@localhost" not in again.model.conversations
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_send_and_download_a_file_with_progress(server: Any, tmp_path: Any) -> Any:
    _, _, addr = server
    yield register(addr, "alice", "bob")
    alice = yield logged_in(addr, "alice")
    bob = yield logged_in(addr, "bob", downloads=str(tmp_path))
    data = bytes(range(256)) * 1000
    (tmp_path / "out").mkdir()
    src = tmp_path / "out" / "notes.bin"
    src.write_bytes(data)
    seen: list[tuple[int, int]] = []
    alice.model.subscribe(
        lambda: seen.extend((t.done, t.total) for t in alice.model.active_transfers())
    )
    try:
        yield alice.run("/send nothing-here")
        assert notices(alice, STATUS)[-1] == "open the conversation to send the file to first"
        yield alice.run("/msg bob here it comes")
        yield alice.run("/send nothing-here")
        assert notices(alice, "bob@localhost")[-1] == "not a file: nothing-here"
        yield alice.run(f"/send {src}")
        (upload,) = alice.model.transfers.values()
        assert upload.state == "done" and upload.done == upload.total == len(data)
        assert seen and seen[-1][1] == len(data)  # progress went through the model
        conv = "alice@localhost"
        yield until(lambda: len(bob.files(conv)) == 1)
        file_id, item = bob.files(conv)[0]
        assert item["meta"]["name"] == "notes.bin" and item["meta"]["size"] == len(data)
        bob.open(conv)
        yield bob.run("/download")
        assert (tmp_path / "notes.bin").read_bytes() == data
        assert notices(bob, conv)[-1] == f"saved notes.bin to {tmp_path / 'notes.bin'}"
        yield bob.run(f"/download {file_id}")  # again: a new name, the first is kept
        assert (tmp_path / "notes (1).bin").read_bytes() == data
        yield bob.run("/download nosuchfileid0000000")
        assert notices(bob, conv)[-1].startswith("no_such_file: ")
        failed = [t for t in bob.model.transfers.values() if t.state == "failed"]
        assert len(failed) == 1 and failed[0].error.startswith("no_such_file: ")
    finally:
        yield alice.stop()
        yield bob.stop()


@pytest_twisted.inlineCallbacks
def test_transfers_resume_after_a_dropped_connection(server: Any, tmp_path: Any) -> Any:
    _, factory, addr = server
    yield register(addr, "alice", "bob")
    alice = yield logged_in(addr, "alice")
    bob = yield logged_in(addr, "bob", downloads=str(tmp_path))
    data = os.urandom(2_000_000)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    dropped: list[str] = []

    def drop_midway(ctl: ChatController, user: str) -> None:
        # The first time a transfer is part-way, the realm aborts the connection.
        for t in ctl.model.active_transfers():
            if 0 < t.done < t.total and user not in dropped:
                dropped.append(user)
                _reactor.callLater(0, drop_sessions, factory, user)

    alice.model.subscribe(lambda: drop_midway(alice, "alice@localhost"))
    bob.model.subscribe(lambda: drop_midway(bob, "bob@localhost"))
    try:
        alice.open("bob@localhost")
        yield alice.run(f"/send {src}")
        assert dropped == ["alice@localhost"]
        (upload,) = alice.model.transfers.values()
        assert upload.state == "done", upload
        yield until(lambda: len(bob.files("alice@localhost")) == 1)
        bob.open("alice@localhost")
        yield bob.run("/download")
        assert dropped == ["alice@localhost", "bob@localhost"]
        (download,) = bob.model.transfers.values()
        assert download.state == "done", download
        assert (tmp_path / "Downloads").exists() is False
        assert (tmp_path / "big (1).bin").read_bytes() == data  # big.bin is the source
        # the file message was shown once, whatever the reconnects
        assert len(alice.files("bob@localhost")) == 1 and len(bob.files("alice@localhost")) == 1
    finally:
        yield alice.stop()
        yield bob.stop()
