"""Reading in the web client end to end (tests/e2e/web_reading.mjs in headless
Chromium): a fresh browser's sidebar from the realm's conversation list, mentions,
read markers ("seen", and another browser of the same user), typing, the search box."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.web import WebSite
from tests.test_web_e2e import ARTIFACTS, CHROMIUM, PASSWORD, ROOT, Driver, tools  # noqa: F401

SCRIPT = ROOT / "tests" / "e2e" / "web_reading.mjs"


@pytest_twisted.inlineCallbacks
def test_sidebar_markers_typing_and_search_in_chromium(
    realm: Any,
    tools: Any,  # noqa: F811
    tmp_path: Path,
) -> Any:
    node, package = tools
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PASSWORD)
    yield realm.group_event_as("alice", "created", "#dev")
    yield realm.group_event_as("carol", "joined", "#dev")
    yield realm.post("carol", "#dev", "hi @alice")
    for body in ("one", "two", "lunch at noon?"):
        yield realm.post("bob", "alice", body)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "BASE_URL": f"http://127.0.0.1:{port.getHost().port}",
        "ARTIFACTS": str(ARTIFACTS),
        "PLAYWRIGHT": str(package),
        "CHROMIUM": CHROMIUM,
        "PASSWORD": PASSWORD,
    }
    driver = Driver(lambda user: None)
    _reactor.spawnProcess(driver, node, [node, str(SCRIPT)], env=env, path=str(ROOT))
    try:
        code = yield driver.ended
    finally:
        for proto in list(site.ws.sessions.connections):
            proto.transport.abortConnection()
        yield port.stopListening()
    print(driver.output)
    assert code == 0, driver.output
    assert "e2e reading finished" in driver.output
