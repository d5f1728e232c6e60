"""``chatproto send --reply-to``, ``react``, ``edit`` and ``redact`` (issue 17): the CLI
as a subprocess against a realm on loopback TCP."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from chatproto.display import format_message, json_line, terminal_label, terminal_text
from chatproto.envelope import Envelope
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


#: What a terminal acts on: escape sequences (7- and 8-bit), CR, BS, BEL, SO.
_ACTED_ON = ("\x1b", "\x9b", "\x9d", "\r", "\x08", "\x07", "\x0e")


@pytest_twisted.inlineCallbacks
def test_ids_refs_and_bodies_stored_before_the_checks_reach_no_terminal(
    server: str,  # noqa: F811
    realm: Any,
) -> Any:
    """Rows stored before the realm checked ids and bodies: what ``history`` prints,
    with ``--ids`` or ``--json``, holds no control a terminal acts on; the text shows
    them as control pictures, the JSON keeps every character (escaped)."""
    yield _register(server, "alice", "bob")
    old = Envelope(
        "old\x1b[2J\nid",
        "text",
        "alice@localhost",
        "bob@localhost",
        1767225600.0,
        "hi\x1b]0;pwned\x07 \x9b2J\rover\x08\x0e",
        {"reply_to": "r\x1b[31m"},
    )
    yield realm.store.append([old])
    out, err, code = yield run_cli(server, "bob", "history", "alice", "--ids")
    assert code == 0, err
    assert not any(c in out for c in _ACTED_ON), repr(out)
    lines = out.splitlines()
    assert lines[0].startswith("old\u241b[2J\u240aid [")
    assert lines[0].endswith(
        "(re r\u241b[31m) hi\u241b]0;pwned\u2407 \ufffd2J\u240dover\u2408\u240e"
    )
    out, err, code = yield run_cli(server, "bob", "history", "alice", "--json")
    assert code == 0, err
    assert not any(c in out for c in _ACTED_ON), repr(out)
    shown = [json.loads(line) for line in out.splitlines()]
    assert [(m["msg_id"], m["body"]) for m in shown] == [(old.id, old.body)]


def test_terminal_text_and_label() -> None:
    react = {"ts": 0, "from": "b@x", "to": "a@x", "kind": "reaction", "body": ""}
    react["meta"] = {"ref": "m\x1b[2J\n", "emoji": "y"}
    assert format_message(react, False).endswith("b@x reacted y to m\u241b[2J\u240a")
    assert terminal_text("plain\ttext\nnext") == "plain\ttext\nnext"
    assert terminal_text("\x02bold\x02 \x0304,05red\x03 \x1dit\x1d") == "bold red it"
    assert terminal_text("a\x1b[2J\x7f\x85") == "a\u241b[2J\u2421\ufffd"
    assert terminal_label("id\n\t\u202eevil") == "id\u240a\u2409\ufffdevil"
    assert json.loads(json_line({"b": "\x9b\x1b\u2028"})) == {"b": "\x9b\x1b\u2028"}
    assert json_line({"b": "\x9bé"}) == '{"b": "\\u009bé"}'
