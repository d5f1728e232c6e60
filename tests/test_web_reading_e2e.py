"""Reading in the web client end to end (tests/e2e/web_reading.mjs in headless
Chromium): a fresh browser's sidebar from the realm's conversation list, mentions,
read markers ("seen", and another browser of the same user), typing, the search box."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.web import WebSite
from tests.test_web_e2e import ARTIFACTS, CHROMIUM, PASSWORD, ROOT, run_script, tools  # noqa: F401

SCRIPT = ROOT / "tests" / "e2e" / "web_reading.mjs"


@pytest_twisted.inlineCallbacks
def test_sidebar_markers_typing_and_search_in_chromium(
    realm: Any,
    tools: Any,  # noqa: F811
    tmp_path: Path,
) -> Any:
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PASSWORD)
    yield realm.group_event_as("alice", "created", "#dev")
    yield realm.group_event_as("carol", "joined", "#dev")
    yield realm.post("carol", "#dev", "hi @alice")
    for body in ("one", "two", "lunch at noon?"):
        yield realm.post("bob", "alice", body)
    code, output = yield run_script(site, port, tools, SCRIPT, tmp_path)
    assert code == 0, output
    assert "e2e reading finished" in output
