"""Replies, reactions, edits and deletes in the TUI (issue 17): the model and markup,
then the real ``chatproto tui`` in tmux against a real ``twistd chatrealm`` (see
tests/test_tui_tmux.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto import client
from chatproto.tui.model import ChatModel, MessageLine
from chatproto.tui.view import message_markup
from tests.test_tui_tmux import PASSWORD, Tmux, _client_env, realm, tmux  # noqa: F401
from tests.test_tui_tmux import pytestmark as needs_tmux


def _text(markup: list[Any]) -> str:
    return "".join(p[1] if isinstance(p, tuple) else p for p in markup)


def _item(pos: int, kind: str, sender: str, body: str = "", **meta: Any) -> dict[str, Any]:
    return {
        "pos": pos,
        "msg_id": f"m{pos}",
        "kind": kind,
        "from": sender,
        "to": "bob@x" if sender == "al@x" else "al@x",
        "ts": 1767225600.0 + pos,
        "body": body,
        **({"meta": meta} if meta else {}),
    }


def test_the_model_applies_reactions_edits_and_deletes() -> None:
    model = ChatModel()
    model.me, model.realm = "al@x", "x"
    model.receive(_item(1, "text", "bob@x", "lunch?"))
    model.receive(_item(2, "text", "al@x", "yes", reply_to="m1"))
    conv = model.conversation("bob@x")
    unread = conv.unread
    model.receive(_item(3, "reaction", "bob@x", ref="m2", emoji="👍"))
    model.receive(_item(4, "reaction", "al@x", ref="m2", emoji="👍"))
    model.receive(_item(5, "edit", "bob@x", "lunch at 1?", ref="m1"))
    model.receive(_item(6, "edit", "al@x", "forged", ref="m1"))  # not the sender's: ignored
    assert conv.unread == unread  # they change lines, they are no lines of their own
    assert sorted(conv.items) == [1, 2]
    lines = [line for line in conv.lines() if isinstance(line, MessageLine)]
    first, second = (_text(message_markup(line, "al@x", "x")) for line in lines)
    assert first.endswith("<bob> lunch at 1? (edited)")
    assert "┌ <bob> lunch at 1?\n" in second and second.endswith("<al> yes  [👍 2]")
    model.receive(_item(7, "reaction", "bob@x", ref="m2", emoji="👍", remove=True))
    model.receive(_item(8, "delete", "bob@x", ref="m1"))
    lines = [line for line in conv.lines() if isinstance(line, MessageLine)]
    first, second = (_text(message_markup(line, "al@x", "x")) for line in lines)
    assert first.endswith("<bob> (deleted)")
    assert "┌ <bob> (deleted)\n" in second and second.endswith("<al> yes  [👍 1]")
    assert conv.latest(False, "al@x") is None and conv.latest(True, "al@x")["msg_id"] == "m2"


@needs_tmux
@pytest_twisted.inlineCallbacks
def test_reply_react_edit_delete_in_the_real_tui(
    realm: str,  # noqa: F811
    tmux: Tmux,  # noqa: F811
    tmp_path: Path,
) -> Any:
    for user in ("alice", "bob"):
        conn = yield client.connect(_reactor, realm, user, PASSWORD, register=True)
        yield conn.close()
    for user in ("alice", "bob"):
        argv = [sys.executable, "-m", "chatproto.cli", "tui", "--server", realm]
        argv += ["--user", user, "--log", str(tmp_path / f"{user}.log")]
        tmux.start(user, argv, _client_env(tmp_path, user))
    for user in ("alice", "bob"):
        yield tmux.wait(user, r"Password")
        tmux.type(user, PASSWORD)
        yield tmux.wait(user, rf"\[online\] {user}@localhost on {realm}")
    tmux.type("alice", "/msg bob lunch today?")
    yield tmux.wait("bob", r"alice \(1\)")
    tmux.key("bob", "C-n")
    yield tmux.wait("bob", r"<alice> lunch today\?")
    tmux.type("bob", "/reply yes, at one")
    # the reply shows the message it answers, quoted, on both sides
    for user in ("alice", "bob"):
        yield tmux.wait(user, r"┌ <alice> lunch today\?\n.*<bob> yes, at one")
    tmux.type("alice", "/react 👍")
    yield tmux.wait("bob", r"<bob> yes, at one  \[👍 1\]")
    tmux.type("alice", "/edit lunch tomorrow?")
    screen = yield tmux.wait("bob", r"<alice> lunch tomorrow\? \(edited\)")
    assert "┌ <alice> lunch tomorrow?" in screen
    tmux.type("bob", "/edit yes, at two")
    yield tmux.wait("alice", r"<bob> yes, at two \(edited\)  \[👍 1\]")
    tmux.type("alice", "/react 👍")  # again: taken back
    yield tmux.wait("bob", r"<bob> yes, at two \(edited\)$")
    tmux.type("alice", "/delete")
    screen = yield tmux.wait("bob", r"<alice> \(deleted\)")
    assert "lunch tomorrow" not in screen and "┌ <alice> (deleted)" in screen
    tmux.type("bob", "/react 👍")  # nothing of alice's is left to react to
    yield tmux.wait("bob", r"!! no message of someone else's here")
