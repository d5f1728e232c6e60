"""Reading in the web client end to end (tests/e2e/web_reading.mjs in headless
Chromium): a fresh browser's sidebar from the realm's conversation list, mentions,
read markers ("seen", and another browser of the same user), typing, the search box."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.test_web_e2e import PASSWORD, ROOT, run_on_realm, tools  # noqa: F401

SCRIPT = ROOT / "tests" / "e2e" / "web_reading.mjs"


@pytest_twisted.inlineCallbacks
def test_sidebar_markers_typing_and_search_in_chromium(
    realm: Any,
    tools: Any,  # noqa: F811
    tmp_path: Path,
) -> Any:
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PASSWORD)
    yield realm.group_event_as("alice", "created", "#dev")
    yield realm.group_event_as("carol", "joined", "#dev")
    yield realm.post("carol", "#dev", "hi @alice")
    yield realm.post("carol", "alice", "standup at ten")
    for body in ("one", "two", "lunch at noon?"):
        yield realm.post("bob", "alice", body)
    yield run_on_realm(realm, tools, SCRIPT, tmp_path, "e2e reading finished")
