"""Replies, reactions, edits and deletes in the web page (issue 17): two headless
Chromium sessions on a real web listener (``tests/e2e/web_relations.mjs``; the tools
as in tests/test_web_e2e.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.web import WebSite
from tests.test_web_e2e import ARTIFACTS, CHROMIUM, PASSWORD, ROOT, Driver, tools  # noqa: F401

SCRIPT = ROOT / "tests" / "e2e" / "web_relations.mjs"


@pytest_twisted.inlineCallbacks
def test_reply_react_edit_delete_in_two_browsers(
    realm: Any,
    tools: Any,  # noqa: F811
    tmp_path: Path,
) -> Any:
    node, package = tools
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    for name in ("alice", "bob"):
        yield realm.create_user(name, PASSWORD)
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
    assert "e2e relations finished" in driver.output
