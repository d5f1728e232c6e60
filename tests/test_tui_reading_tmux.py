"""Reading in the real ``chatproto tui`` (tmux, against a real ``twistd chatrealm``):
a fresh install's sidebar from the realm's conversation list with its unread counts
and mentions, the highlight of a mention, ``/search``, and read markers sent when a
conversation is on screen (another device then sees it read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from chatproto import client
from tests.test_tui_tmux import PASSWORD, Tmux, pytestmark, realm, start_tuis, tmux  # noqa: F401


@pytest_twisted.inlineCallbacks
def test_sidebar_mentions_search_and_markers(
    realm: str,  # noqa: F811
    tmux: Tmux,  # noqa: F811
    tmp_path: Path,
) -> Any:
    conns = {}
    for user in ("alice", "bob", "carol"):
        conns[user] = yield client.connect(_reactor, realm, user, PASSWORD, register=True)
    yield conns["alice"].create_group("#dev")
    yield conns["carol"].join("#dev")
    yield conns["carol"].send("#dev", "hi @alice, lunch?")
    yield conns["bob"].send("alice", "lunch at noon?")
    yield conns["bob"].send("alice", "or later")
    for c in conns.values():
        yield c.close()
    # a fresh install (nothing remembered): the sidebar comes from the realm
    yield start_tuis(tmux, realm, tmp_path, "alice")
    yield tmux.wait("alice", r"#dev \(1 @1\)")
    yield tmux.wait("alice", r"bob \(2\)")
    # /search in the status window: everything alice may read, newest first
    tmux.type("alice", "/search LUNCH")
    screen = yield tmux.wait("alice", r"search 'LUNCH' \(everywhere\): 2 found")
    assert screen.index("bob@localhost: lunch at noon?") < screen.index(
        "carol@localhost: hi @alice"
    )
    # open bob's conversation: it is marked read for alice's other devices
    tmux.type("alice", "/msg bob")
    yield tmux.wait("alice", r"<bob> or later")
    phone = yield client.connect(_reactor, realm, "alice", PASSWORD, device="phone", quiet=True)
    try:
        counts: dict[str, int] = {}
        deadline = _reactor.seconds() + 30  # bounded
        while _reactor.seconds() < deadline:
            try:
                listed = yield phone.conversations()
            except client.RemoteError as e:  # a connection's lists are rate-limited
                assert e.code == "rate_limited", e
                yield task.deferLater(_reactor, e.extra["retry_after"], lambda: None)
                continue
            counts = {c["with"]: c["unread"] for c in listed["conversations"]}
            if counts.get("bob@localhost") == 0:
                break
            yield task.deferLater(_reactor, 0.1, lambda: None)
        assert counts.get("bob@localhost") == 0, counts
        assert counts["#dev@localhost"] == 1  # not opened yet
        # /search in a conversation searches that one only
        tmux.type("alice", "/search lunch")
        yield tmux.wait("alice", r"search 'lunch' \(bob\): 1 found")
        # the mention is shown in the group, and opening it clears the count
        tmux.type("alice", "/join #dev")
        yield tmux.wait("alice", r"<carol> hi @alice, lunch\?")
        yield tmux.wait("alice", r"^. #dev\s", timeout=10)
    finally:
        yield phone.close()
