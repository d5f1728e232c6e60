"""``chatproto send --reply-to``, ``react``, ``edit`` and ``redact`` (issue 17): the CLI
as a subprocess against a realm on loopback TCP."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from chatproto.display import format_message
from tests.test_cli import _register, run_cli, server  # noqa: F401  (the fixture)


def _id(out: str) -> str:
    return dict(part.split("=", 1) for part in out.split())["id"]


@pytest_twisted.inlineCallbacks
def test_reply_react_edit_redact_from_the_command_line(server: str) -> Any:  # noqa: F811
    yield _register(server, "alice", "bob")
    out, err, code = yield run_cli(server, "alice", "send", "bob", "lunch", "at", "12?")
    assert code == 0, err
    first = _id(out)
    out, err, code = yield run_cli(server, "bob", "send", "alice", "yes", "--reply-to", first)
    assert code == 0, err
    reply = _id(out)
    out, err, code = yield run_cli(server, "bob", "react", first, "👍")
    assert code == 0 and out.startswith("reacted 👍 pos="), (out, err)
    out, err, code = yield run_cli(server, "alice", "edit", first, "lunch at 1?")
    assert code == 0 and out.startswith(f"edited {first} pos="), (out, err)
    out, err, code = yield run_cli(server, "bob", "history", "alice", "--ids")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(first + " [") and lines[0].endswith(
        "alice@localhost: lunch at 1? (edited) [👍 1]"
    )
    assert lines[1].startswith(reply + " [")
    assert lines[1].endswith(f"bob@localhost: (re {first}) yes")
    # bob may not edit alice's message; a message nobody has is not found
    out, err, code = yield run_cli(server, "bob", "edit", first, "mine")
    assert code == 1 and "forbidden" in err
    out, err, code = yield run_cli(server, "bob", "redact", "nothing-here")
    assert code == 1 and "not_found" in err
    out, err, code = yield run_cli(server, "bob", "redact", reply)
    assert code == 0 and out.startswith(f"deleted {reply}"), (out, err)
    out, err, code = yield run_cli(server, "bob", "react", first, "👍", "--remove")
    assert code == 0, err
    out, err, code = yield run_cli(server, "alice", "history", "bob")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("alice@localhost: lunch at 1? (edited)")
    assert lines[1].endswith("bob@localhost: (deleted)")


def test_format_reactions_edits_deletes() -> None:
    base = {"ts": 0, "from": "bob@x", "to": "#g@x", "body": ""}
    react = {**base, "kind": "reaction", "meta": {"ref": "m1", "emoji": "🎉"}}
    assert format_message(react, False).endswith("] #g@x bob@x reacted 🎉 to m1")
    back = {**base, "kind": "reaction", "meta": {"ref": "m1", "emoji": "🎉", "remove": True}}
    assert format_message(back, False).endswith("bob@x took back 🎉 to m1")
    edit = {**base, "kind": "edit", "body": "new", "meta": {"ref": "m1"}}
    assert format_message(edit, False).endswith("bob@x edited m1: new")
    gone = {**base, "to": "al@x", "kind": "delete", "meta": {"ref": "m1"}}
    assert format_message(gone, False).endswith("] bob@x deleted m1")
    deleted_file = {**base, "kind": "file", "meta": {"deleted": True}}
    assert format_message(deleted_file, False).endswith("#g@x bob@x: (deleted)")
