"""``chatproto search`` and ``chatproto conversations``: the real command in a
subprocess against a realm on loopback."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tests.test_cli import _register, run_cli, server  # noqa: F401


@pytest_twisted.inlineCallbacks
def test_search_and_conversations(server: str) -> Any:  # noqa: F811
    yield _register(server, "alice", "bob", "carol")
    for body in ("lunch at noon", "lunch again", "nothing to see"):
        out, err, code = yield run_cli(server, "bob", "send", "alice", body)
        assert code == 0, err
    yield run_cli(server, "alice", "create", "#dev")
    yield run_cli(server, "alice", "send", "#dev", "team lunch @carol")
    out, err, code = yield run_cli(server, "alice", "search", "LUNCH")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "#dev@localhost alice@localhost: team lunch @carol",
        "bob@localhost: lunch again",
        "bob@localhost: lunch at noon",
    ]
    out, err, code = yield run_cli(
        server, "alice", "search", "lunch", "--in", "bob", "--limit", "1"
    )
    assert code == 0, err
    [line, more] = out.splitlines()
    assert line.endswith("bob@localhost: lunch again") and more.startswith("(more: --before ")
    before = more.split()[-1].rstrip(")")
    out, err, code = yield run_cli(
        server, "alice", "search", "lunch", "--in", "bob", "--before", before, "--json"
    )
    assert code == 0, err
    assert [json.loads(x)["body"] for x in out.splitlines()] == ["lunch at noon"]
    # carol is no member of #dev: she cannot search it
    out, err, code = yield run_cli(server, "carol", "search", "lunch", "--in", "#dev")
    assert code != 0 and "not_member" in err, (code, out, err)
    out, err, code = yield run_cli(server, "alice", "search", "...")
    assert code != 0 and "no word" in err, err
    out, err, code = yield run_cli(server, "alice", "conversations")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("#dev@localhost (read)")
    assert lines[1].startswith("bob@localhost (3 unread)") and lines[1].endswith("nothing to see")
    out, err, code = yield run_cli(server, "alice", "conversations", "--json")
    assert [json.loads(x)["unread"] for x in out.splitlines()] == [0, 3]
